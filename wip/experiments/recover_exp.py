import sys, time, json, torch
sys.path.insert(0, "/work/exp")
from common import *
import simprune
from simprune.repair.recovery import Recovery, recover
src = sys.argv[1]
opts = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
tag = sys.argv[3] if len(sys.argv) > 3 else "rec"
pruned = simprune.load(src)
measure(pruned, f"{src} start")
calib = batches(XC[FIT])   # 400: my HOLD slice stays unseen by refit and recovery; recovery holds aside 20 % of these itself
t0 = time.time()
s = recover(TEACHER, pruned, calib, Recovery(**opts))
print(json.dumps({k: v for k, v in s.items() if k not in ("history", "options")}), flush=True)
for h in s["history"]: print(h, flush=True)
measure(pruned, f"{tag} {opts} after {time.time()-t0:.0f}s")
