"""Refit ridge chosen on the calibration split: refit on FIT (400), agreement on HOLD (100, never refit on)."""
import sys, time, torch
sys.path.insert(0, "/work/exp")
from common import *
import simprune
from simprune.repair.refit import RefitOptions
target, ridge, scope, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
t0 = time.time()
pruned, rep = simprune.prune(TEACHER, torch.zeros(1, 3, 224, 224), "refit-error", {"macs": target},
                             calibration=batches(XC[FIT]),
                             repair=simprune.Repair(refit=RefitOptions(ridge=ridge, scope=scope)))
print("seconds", round(time.time() - t0), {k: round(v) for k, v in rep["seconds"].items()}, flush=True)
measure(pruned, f"ridge {ridge} scope {scope} target {target}")
simprune.save(out, pruned, {"model": "torchvision:mobilenet_v2", "model_args": {}, "input_shape": [3, 224, 224]})
