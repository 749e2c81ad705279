"""Session 12: where does the refit fit its own images? Prune MobileNetV2 (tp:l2, 35 %, refit, BN kept),
print kept widths and agreement on fitted / held-aside calibration images / evaluation split; save the
pruned model to /tmp for follow-up experiments (our own file)."""
import sys, time, copy, json
from simprune.repair.refit import RefitOptions
from pathlib import Path
import torch
from torch import nn
import simprune
from safetensors.torch import save_file
from simprune import Repair, Selection
import os
from simprune.io.imagenet import load_pretrained
from simprune.io.images import calibration_images, manifest_dataset, torchvision_preprocess

SAMPLE = Path(__file__).resolve().parents[4] / "shared" / "imagenet-sample"

@torch.no_grad()
def top(model, batches):
    model.eval()
    return torch.cat([model(x).argmax(1) for x in batches])

def main():
    crit = sys.argv[1] if len(sys.argv) > 1 else "tp:l2"
    target = float(sys.argv[2]) if len(sys.argv) > 2 else 0.35
    refit = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    tag = sys.argv[4] if len(sys.argv) > 4 else ""
    pre = torchvision_preprocess("mobilenet_v2", "IMAGENET1K_V1")
    model = load_pretrained("mobilenet_v2", "IMAGENET1K_V1").eval()
    flat = torch.cat(list(calibration_images(f"{SAMPLE}/manifest.csv:calibration", pre, n_images=500)))
    fit, held = list(flat[:400].split(50)), list(flat[400:].split(50))
    ev = torch.utils.data.DataLoader(manifest_dataset(f"{SAMPLE}/manifest.csv:evaluation", pre), batch_size=50)
    ev_x, ev_y = zip(*ev); ev_x, ev_y = list(ev_x), torch.cat(ev_y)
    save_file({"fit": flat[:400].contiguous(), "held": flat[400:].contiguous(), "ev_x": torch.cat(ev_x),
               "ev_y": ev_y}, "/tmp/mnv2_data.safetensors")
    t0 = time.time()
    pruned, rep = simprune.prune(model, torch.zeros(1, 3, 224, 224), crit, {"flops": target},
                                 calibration=fit, selection=Selection(ignore=tuple(filter(None, os.environ.get('IGNORE', '').split(',')))), repair=Repair(refit=RefitOptions(**refit), recalibrate_bn=False))
    print(f"pruned in {time.time()-t0:.0f}s", flush=True)
    simprune.save(f"/tmp/mnv2_{crit.replace(':','_')}_{target}{tag}", pruned, overwrite=True)
    om = dict(model.named_modules())
    for n, m in pruned.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            o = om[n]
            a = (o.weight.shape[0], o.weight.shape[1]); b = (m.weight.shape[0], m.weight.shape[1])
            if a != b and False: print(f"{n:28s} {a} -> {b}")
    rf, rh, re_ = top(model, fit), top(model, held), top(model, ev_x)
    f, h, e = top(pruned, fit), top(pruned, held), top(pruned, ev_x)
    pc = lambda a, b: 100 * (a == b).double().mean().item()
    print(f"fit agr {pc(f, rf):.1f} held agr {pc(h, rh):.1f} eval agr {pc(e, re_):.1f} eval top1 {pc(e, ev_y):.1f}")

main()
