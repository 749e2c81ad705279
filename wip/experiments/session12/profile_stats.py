"""Session 12, issue 24: where qsfm's statistics pass spends its time (torch.profiler, one thread).
python wip/experiments/session12/profile_stats.py [MODEL] [RES] [IMAGES]"""
import sys
import time
import torch
sys.path.insert(0, "bench")
from scale import _setup  # noqa: E402
from simprune.criteria import get_criterion  # noqa: E402

name = sys.argv[1] if len(sys.argv) > 1 else "torchvision:resnet50"
res = int(sys.argv[2]) if len(sys.argv) > 2 else 224
n = int(sys.argv[3]) if len(sys.argv) > 3 else 32
torch.set_num_threads(1)
model, batches, graph = _setup(name, res, n)
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    model(batches[0][0][:2])
    t0 = time.perf_counter()
    for x, _ in batches:
        model(x)
    fwd = time.perf_counter() - t0
crit = get_criterion("qsfm", progress=False)
from torch.profiler import profile, ProfilerActivity  # noqa: E402
with profile(activities=[ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    crit.statistics(graph, batches)
    st = time.perf_counter() - t0
print(f"forward {fwd:.1f} s, statistics {st:.1f} s, ratio {st / fwd:.1f}")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))
