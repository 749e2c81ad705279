"""Session 12: relative error of each MobileNetV2 block output (pruned vs unpruned) on fitted vs held-aside
calibration images vs evaluation images: where the refit's fit stops carrying over."""
import sys
import torch
from safetensors.torch import load_file

import simprune
from simprune.io.imagenet import load_pretrained

path = sys.argv[1]
d = load_file("/tmp/mnv2_data.safetensors")
model = load_pretrained("mobilenet_v2", "IMAGENET1K_V1").eval()
pruned = simprune.load(path, load_pretrained("mobilenet_v2", "IMAGENET1K_V1")).eval()

@torch.no_grad()
def outs(m, x):
    res, h = [], x
    for blk in m.features:
        h = blk(h); res.append(h)
    res.append(m.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1)))
    return res

def errs(x):
    tot = None
    for xb in x.split(50):
        a, b = outs(model, xb), outs(pruned, xb)
        e = [((p - o).pow(2).sum().item(), o.pow(2).sum().item()) if p.shape == o.shape else (float('nan'), 1) for o, p in zip(a, b)]
        tot = e if tot is None else [(t[0] + u[0], t[1] + u[1]) for t, u in zip(tot, e)]
    return [(s / n) ** 0.5 for s, n in tot]

f, h, e = errs(d["fit"][:200]), errs(d["held"]), errs(d["ev_x"][:200])
for i, (a, b, c) in enumerate(zip(f, h, e)):
    print(f"block {i:2d}  fit {a:.3f}  held {b:.3f}  eval {c:.3f}")
