"""Statistics-pass speed and memory: QSFM (global SSIM) over N calibration images on ResNet-56.

Each (criterion, N) runs in a fresh process so peak RSS is its own. Goal (issue 4):
640 images in <= 15 s on the 2-core dev machine, and peak memory growing < 10 % from
N=640 to N=2560 (statistics are sums, never stored maps).

    python bench/calibration.py                  # table + bench/results/calibration.json
    python bench/calibration.py --worker ssim 640   # one measurement (used internally)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = Path(os.environ.get("SIMPRUNE_BENCH_CHECKPOINT", ROOT / "zoo" / "resnet56-fashion-mnist"))
CRITERIA = {"qsfm-ssim": {"ssim", "gram"}, "qsfm-psnr": {"psnr", "gram"}, "qsfm-cosine": {"cosine", "gram"},
            "feature-stats": {"mstd", "cosine", "gram"}, "hrank": {"rank"}}


def worker(name: str, n: int) -> dict:
    import torch

    from simprune.calibrate.calibration import calibration_loader, collect_statistics
    from simprune.graph.groups import PruningGraph
    from simprune.io.files import load_model
    from simprune.models import build_model

    if (CHECKPOINT / "model.safetensors").exists():
        model, _ = load_model(CHECKPOINT)
    else:
        model = build_model("resnet56", in_channels=1).eval()
    loader = calibration_loader("fashion-mnist", n, pad_to=32, batch_size=128)
    graph = PruningGraph(model, torch.zeros(1, 1, 32, 32))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    probes = collect_statistics(model, graph, loader, CRITERIA[name], progress=False)
    seconds = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"criterion": name, "images": n, "seconds": seconds, "peak_mib": rss1 / 1024,
            "pass_growth_mib": (rss1 - rss0) / 1024, "probes": sum(len(p) for p in probes.values()),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", nargs=2, metavar=("CRITERION", "N"))
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    ap.add_argument("--images", nargs="+", type=int, default=[640, 2560])
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    rows = []
    for name in args.criteria:
        for n in args.images:
            out = subprocess.run([sys.executable, __file__, "--worker", name, str(n)], capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{name} N={n}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    for name in args.criteria:
        mine = {r["images"]: r for r in rows if r["criterion"] == name}
        if len(mine) >= 2:
            lo, hi = mine[min(mine)], mine[max(mine)]
            hi["peak_growth_vs_smallest_%"] = 100 * (hi["peak_mib"] / lo["peak_mib"] - 1)
    print_table(rows, ["criterion", "images", "seconds", "peak_mib", "peak_growth_vs_smallest_%", "probes",
                       "threads"])
    print(f"wrote {write_json('calibration', {'checkpoint': str(CHECKPOINT), 'rows': rows})}")


if __name__ == "__main__":
    main()
