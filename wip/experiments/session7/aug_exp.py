"""Refit on the 400 FIT images plus one augmented view of each (random resized crop + flip, as recovery's)."""
import sys, time, json, torch
sys.path.insert(0, "/work/exp")
from common import *
import simprune
from simprune.repair.refit import RefitOptions
from simprune.repair.recovery import augment
target, out, views = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
gen = torch.Generator().manual_seed(0)
x = XC[FIT]
extra = [torch.cat([augment(x[i:i+50], gen, 0.25, 0.0) for i in range(0, len(x), 50)]) for _ in range(views - 1)]
allx = torch.cat([x] + extra)
t0 = time.time()
pruned, rep = simprune.prune(TEACHER, torch.zeros(1, 3, 224, 224), "refit-error", {"macs": target},
                             calibration=batches(allx), repair=simprune.Repair(refit=RefitOptions(ridge=0.03)))
print("seconds", round(time.time() - t0), {k: round(v) for k, v in rep["seconds"].items()}, flush=True)
print("refit", {k: v for k, v in (rep.get("reconstructed") or {}).items() if k in ("skipped", "whole_model_passes", "blocks", "seconds")}, flush=True)
measure(pruned, f"{out} target {target} views {views}")
simprune.save(out, pruned, {"model": "torchvision:mobilenet_v2", "model_args": {}, "input_shape": [3, 224, 224]})
