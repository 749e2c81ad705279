"""Session 13, issue 24: where the default prune (criterion auto + refit + BN) of the ImageNet MobileNetV2
spends its time, 500 calibration images, 2 threads. python wip/experiments/session13/profile_default.py [CRIT]"""
import cProfile
import pstats
import sys
import time

import torch

import simprune
from simprune.io.imagenet import load_pretrained
from simprune.io.images import calibration_images, torchvision_preprocess

crit = sys.argv[1] if len(sys.argv) > 1 else "auto"
torch.set_num_threads(2)
model = load_pretrained("mobilenet_v2", "IMAGENET1K_V1")
pre = torchvision_preprocess("mobilenet_v2", "IMAGENET1K_V1")
calib = calibration_images("../shared/imagenet-sample/manifest.csv:calibration", pre, n_images=500)
prof = cProfile.Profile()
t0 = time.perf_counter()
prof.enable()
pruned, report = simprune.prune(model, torch.zeros(1, 3, 224, 224), crit, {"flops": 0.35}, calibration=calib)
prof.disable()
print("total", time.perf_counter() - t0)
print("seconds", report["seconds"])
print("choice", (report.get("criterion_choice") or {}).get("seconds"))
st = pstats.Stats(prof)
st.sort_stats("cumulative").print_stats(45)
st.sort_stats("tottime").print_stats(25)
