"""Recovery on a saved prune, trained on the 400 FIT images, early-stopped on the 100 HOLD images (never refit on)."""
import sys, time, json, torch
sys.path.insert(0, "/work/exp")
from common import *
import simprune
from simprune.repair.recovery import Recovery, recover
src, opts, tag = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
pruned = simprune.load(src)
t0 = time.time()
s = recover(TEACHER, pruned, batches(XC[FIT]), Recovery(**opts), held_aside=XC[HOLD])
print(tag, json.dumps({k: v for k, v in s.items() if k not in ("history", "options")}), flush=True)
for h in s["history"]: print(tag, h, flush=True)
measure(pruned, f"{tag} {opts} after {time.time()-t0:.0f}s")
