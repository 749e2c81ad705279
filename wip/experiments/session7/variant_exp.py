"""One MobileNetV2 prune variant on the calibration split (400 refit, 100 held aside; labels never read)."""
import sys, time, json, torch
sys.path.insert(0, "/work/exp")
from common import *
import simprune
from simprune.repair.refit import RefitOptions
target, out = float(sys.argv[1]), sys.argv[2]
opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
cost_weight = opts.pop("_cost_weight", 0.0)
ridge = opts.pop("_ridge", 0.03)
bn = opts.pop("_bn", None)
criterion = opts.pop("_criterion", "refit-error")
views = opts.pop("_views", 1)
norm = opts.pop("_norm", None)
recover = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
t0 = time.time()
repair = simprune.Repair(refit=RefitOptions(ridge=ridge, views=views), recalibrate_bn=bn, recover=simprune.Recovery(**recover) if recover is not None else None)
pruned, rep = simprune.prune(TEACHER, torch.zeros(1, 3, 224, 224), criterion, {"macs": target},
                             calibration=batches(XC[FIT]), selection=simprune.Selection(criterion_options=opts, cost_weight=cost_weight, normalization=norm),
                             repair=repair)
print("seconds", round(time.time() - t0), {k: round(v) for k, v in rep["seconds"].items()}, flush=True)
print("notes", rep.get("criterion_notes"), flush=True)
widths = {l["name"]: (l["channels_before"], l["channels_after"]) for l in rep["layers"] if l["channels_before"] != l["channels_after"]}
print("widths", widths, flush=True)
print("refit", {k: v for k, v in (rep.get("reconstructed") or {}).items() if k in ("skipped", "whole_model_passes", "blocks", "seconds")}, flush=True)
measure(pruned, f"{out} {criterion} views {views} target {target} norm {norm} opts {opts} cw {cost_weight} ridge {ridge} recover {recover}")
simprune.save(out, pruned, {"model": "torchvision:mobilenet_v2", "model_args": {}, "input_shape": [3, 224, 224]})
