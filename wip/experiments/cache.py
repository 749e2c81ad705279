import csv, torch, time
import simprune.compat
from simprune.compat import import_torchvision
tv = import_torchvision()
from PIL import Image
root = "/work/shared/imagenet-sample"
tf = tv.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
rows = list(csv.DictReader(open(f"{root}/manifest.csv")))
out = {}
for split in ("calibration", "evaluation"):
    r = [x for x in rows if x["split"] == split]
    xs = torch.stack([tf(Image.open(f"{root}/{x['file']}").convert("RGB")) for x in r])
    out[split] = (xs, torch.tensor([int(x["class_index"]) for x in r]))
# raw images at 256-short-side for augmentation: keep the resized (not cropped) images as uint8 at 256x256 center region
import torchvision.transforms.v2.functional as F
raw = []
for x in [x for x in rows if x["split"] == "calibration"]:
    im = F.pil_to_tensor(Image.open(f"{root}/{x['file']}").convert("RGB"))
    im = F.resize(im, [288], antialias=True); im = F.center_crop(im, [288, 288])
    raw.append(im)
out["calibration_raw"] = torch.stack(raw)
torch.save(out, "/work/exp/inet.pt")
print({k: v[0].shape if isinstance(v, tuple) else v.shape for k, v in out.items()})
