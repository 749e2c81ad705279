"""Session 13, issue 24: the scores of the feature-map criteria before and after a change to the statistics
pass, on three models. `save OUT.safetensors` writes them; `compare OUT.safetensors` compares this code's
scores to a saved file (largest difference, and whether the channels removed at 30/50 % of each group's
ranking stay the same). Timing per model is printed too (1 thread)."""
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from simprune.calibrate.calibration import calibration_loader
from simprune.criteria import get_criterion
from simprune.graph.groups import PruningGraph
from simprune.io.files import load_model
from simprune.io.imagenet import load_pretrained
from simprune.io.images import calibration_images, torchvision_preprocess
from simprune.models import build_model

torch.set_num_threads(1)


def cases():
    model, desc = load_model("zoo/resnet56-fashion-mnist")
    calib = calibration_loader(desc["data"]["name"], 640, pad_to=desc["data"]["pad_to"], seed=0)
    yield "resnet56", model, torch.zeros(1, *desc["input_shape"]), calib
    pre = torchvision_preprocess("mobilenet_v2", "IMAGENET1K_V1")
    calib = calibration_images("../shared/imagenet-sample/manifest.csv:calibration", pre, n_images=64)
    yield "mobilenet_v2", load_pretrained("mobilenet_v2", "IMAGENET1K_V1"), torch.zeros(1, 3, 224, 224), calib
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    yield "resnet50", build_model("torchvision:resnet50").eval(), torch.zeros(1, 3, 224, 224), \
        [(torch.randn(32, 3, 224, 224, generator=g), None) for _ in range(2)]


def scores():
    out = {}
    for name, model, example, calib in cases():
        graph = PruningGraph(model, example)
        for crit_name in ("qsfm", "feature-stats"):
            crit = get_criterion(crit_name, progress=False)
            t0 = time.perf_counter()
            res = crit.score(graph, calib)
            print(f"{name} {crit_name}: {time.perf_counter() - t0:.1f} s", flush=True)
            for root, s in res.scores.items():
                out[f"{name}/{crit_name}/{root}"] = s.double().contiguous()
    return out


def compare(old, new):
    worst, changed = 0.0, []
    for k, a in old.items():
        b = new[k]
        worst = max(worst, float((a - b).abs().max()))
        for frac in (0.3, 0.5):
            n = int(frac * a.numel())
            if set(a.argsort(stable=True)[:n].tolist()) != set(b.argsort(stable=True)[:n].tolist()):
                changed.append(f"{k}@{frac}")
    print(f"largest score difference {worst:.3g}; removal sets changed: {changed or 'none'}")


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    got = scores()
    if mode == "save":
        save_file(got, path)
    else:
        compare(load_file(path), got)
