import sys, time, copy, torch
sys.path.insert(0, "/work/exp")
from common import *
import simprune
import simprune.schedules.oneshot as oneshot
from simprune.criteria import ScoreCache, get_criterion
from torch import nn
target = float(sys.argv[1]) if len(sys.argv) > 1 else 0.35
measure(TEACHER, "teacher")
crit = ScoreCache(get_criterion("refit-error"), reuse=True)
calib = batches(XC[FIT])
orig_targets = oneshot.refit_targets
x = torch.zeros(1, 3, 224, 224)
for variant in ["no-linear", "all"]:
    def filtered(graph, remove, scope="all", _v=variant):
        t = orig_targets(graph, remove, scope)
        if _v == "no-linear":
            t = {n: k for n, k in t.items() if not isinstance(graph.model.get_submodule(n), nn.Linear)}
        return t
    oneshot.refit_targets = filtered
    t0 = time.time()
    pruned, rep = simprune.prune(TEACHER, x, crit, {"flops": target}, calibration=calib)
    print(variant, "seconds", round(time.time() - t0), rep["seconds"], flush=True)
    measure(pruned, f"{variant} refit+bn {target}")
    simprune.save(f"/work/exp/p{int(target*100)}_{variant}", pruned, report=rep, overwrite=True)
