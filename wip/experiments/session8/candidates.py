"""Which criteria could join "auto"'s candidates: held-aside output change of each candidate's trial prune
(MobileNetV2, 35 % of MACs, refit + BN, 400 calibration images fitted, 100 held aside; no labels, no
evaluation split). Prints the choice record. Usage: python candidates.py SAMPLE_DIR TARGET NAME..."""
import json
import sys

import torch

from simprune import Choose, Repair, Selection
from simprune.io.imagenet import load_pretrained
from simprune.io.images import calibration_images, torchvision_preprocess
from simprune.schedules.choice import choose_criterion
from simprune.schedules.kinds import OneShot

sample, target, names = sys.argv[1], float(sys.argv[2]), tuple(sys.argv[3:])
model = load_pretrained("mobilenet_v2", "IMAGENET1K_V1")
pre = torchvision_preprocess("mobilenet_v2", "IMAGENET1K_V1")
calib = calibration_images(f"{sample}/manifest.csv:calibration", pre, n_images=500)
chosen, record = choose_criterion(Choose(candidates=names), model, torch.zeros(1, 3, 224, 224),
                                  {"flops": target}, calib, Selection(), Repair.auto(), OneShot())
print(json.dumps(record, indent=1), flush=True)
