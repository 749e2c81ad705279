"""Session 12: does a recovery that trains only BatchNorm affine parameters and biases (few parameters,
cannot memorise 400 images) carry over better than the full one? Starts from where_overfit.py's saved
model (tp:l2 35 %, refit on 400 calibration images, BN kept); early-stops on the other 100 calibration
images; evaluation split only measures. python affine_recovery.py MODEL_DIR LR STEPS [all]"""
import sys
import time
import torch
from safetensors.torch import load_file

import simprune
from simprune.io.imagenet import load_pretrained
from simprune.repair.recovery import Recovery, recover

path, lr, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
everything = len(sys.argv) > 4 and sys.argv[4] == "all"
d = load_file("/tmp/mnv2_data.safetensors")
teacher = load_pretrained("mobilenet_v2", "IMAGENET1K_V1").eval()
student = simprune.load(path, load_pretrained("mobilenet_v2", "IMAGENET1K_V1")).eval()
if not everything:
    for m in student.modules():
        for name, p in m.named_parameters(recurse=False):
            p.requires_grad_(isinstance(m, torch.nn.BatchNorm2d) or name == "bias")
print("trainable", sum(p.numel() for p in student.parameters() if p.requires_grad), "of",
      sum(p.numel() for p in student.parameters()))

@torch.no_grad()
def top1(m):
    m.eval()
    pred = torch.cat([m(x).argmax(1) for x in d["ev_x"].split(50)])
    ref = torch.cat([teacher(x).argmax(1) for x in d["ev_x"].split(50)])
    return 100 * (pred == d["ev_y"]).double().mean().item(), 100 * (pred == ref).double().mean().item()

print("start eval top1 / agreement", top1(student), flush=True)
t0 = time.time()
s = recover(teacher, student, [d["fit"]], Recovery(steps=steps, lr=lr, time_budget_s=None, checks=12, patience=12, min_scale=float(sys.argv[5]) if len(sys.argv) > 5 else 0.25, cutmix=float(sys.argv[6]) if len(sys.argv) > 6 else 0.5),
            held_aside=d["held"])
print(f"{time.time() - t0:.0f}s steps {s['steps']} held change {s['held_out_change']} agreement {s['held_out_agreement']}")
print("end eval top1 / agreement", top1(student), flush=True)
