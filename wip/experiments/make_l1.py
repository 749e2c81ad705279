import sys, torch
sys.path.insert(0, "/work/exp")
from common import *
import simprune
target = float(sys.argv[1]); crit = sys.argv[2]; out = sys.argv[3]
pruned, rep = simprune.prune(TEACHER, torch.zeros(1, 3, 224, 224), crit, {"macs": target}, calibration=batches(XC[FIT]),
                             repair=simprune.Repair(refit=False, recalibrate_bn=True))
print(rep["reduction"], rep["seconds"])
measure(pruned, f"{crit} {target} bn-only")
simprune.save(out, pruned, {"model": "torchvision:mobilenet_v2", "model_args": {}, "input_shape": [3, 224, 224]})
