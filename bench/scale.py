"""How the statistics pass grows with images, resolution and model, against a bare forward pass.

Each row measures two fresh processes over the same seeded random images (batches of 32): a bare
forward (no_grad, the same bf16 autocast as calibration) and qsfm's statistics pass through the
public criterion (``get_criterion("qsfm").statistics``: SSIM + Gram + chance-level sums). Peak memory
is the process's VmHWM after the pass minus its VmRSS just before (the high-water mark is reset
through /proc/self/clear_refs, so model building and image creation do not count). 1 thread.
Goals (issue 17): ResNet-50 at 224, 64 images, statistics <= 3x a bare forward and peak growth
<= 1.5 GiB; seconds linear in images, memory flat from 64 to 640.

    OMP_NUM_THREADS=1 python bench/scale.py                    # table + bench/results/scale.json
    OMP_NUM_THREADS=1 python bench/scale.py --images 64 256    # skip 640 on a slow machine
    OMP_NUM_THREADS=1 python bench/scale.py --images --keep --torchrun 1 2   # add the 1-vs-2 process timing
    OMP_NUM_THREADS=1 python bench/scale.py --sweep images --images 640 --keep   # add one row later
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

RESULTS_JSON = Path(__file__).resolve().parent / "results" / "scale.json"
BIG = "torchvision:resnet50"
BATCH = 32
COLUMNS = ["sweep", "model", "resolution", "images", "stats_s", "forward_s", "ratio", "stats_growth_mib",
           "forward_growth_mib"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Make VmHWM restart from the current RSS (Linux >= 4.0), so only what follows counts."""
    Path("/proc/self/clear_refs").write_text("5")


def _setup(model_name: str, resolution: int, images: int):
    import torch

    from simprune.graph.groups import PruningGraph
    from simprune.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(min(BATCH, images - i), 3, resolution, resolution, generator=g), None)
               for i in range(0, images, BATCH)]
    return model, batches, PruningGraph(model, torch.zeros(1, 3, resolution, resolution))


def worker(mode: str, model_name: str, resolution: int, images: int) -> dict:
    """One measurement in this (fresh) process: ``mode`` is "forward" or "stats"."""
    import torch

    from simprune.criteria import get_criterion

    torch.set_num_threads(1)
    model, batches, graph = _setup(model_name, resolution, images)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(batches[0][0][:2])  # warm-up: oneDNN kernel selection is not part of either pass
    crit = get_criterion("qsfm", progress=False)
    _reset_peak()
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if mode == "forward":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for x, _ in batches:
                model(x)
    else:
        crit.statistics(graph, batches)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "growth_mib": (_status_kib("VmHWM") - rss0) / 1024,
            "threads": torch.get_num_threads()}


def measure(model_name: str, resolution: int, images: int) -> dict:
    row = {"model": model_name, "resolution": resolution, "images": images}
    for mode in ("forward", "stats"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode, model_name, str(resolution), str(images)],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        got = json.loads(out.stdout.strip().splitlines()[-1])
        row[f"{mode}_s"], row[f"{mode}_growth_mib"] = got["seconds"], got["growth_mib"]
    row["ratio"] = row["stats_s"] / row["forward_s"]
    print(f"{model_name} {resolution} px, {images} images: statistics {row['stats_s']:.1f} s, forward "
          f"{row['forward_s']:.1f} s, growth {row['stats_growth_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return row


def plan(images: list[int]) -> list[tuple[str, str, int, int]]:
    """(sweep, model, resolution, images): images at 224 px, resolution at 64 images, model at 64 images."""
    rows = [("images", BIG, 224, n) for n in images]
    rows += [("resolution", BIG, r, 64) for r in (32, 112, 224)]
    rows += [("model", m, r, 64) for m, r in (("resnet56", 32), ("torchvision:mobilenet_v2", 224), (BIG, 224))]
    return rows


def sweeps(images: list[int], only: str | None = None) -> list[dict]:
    done: dict[tuple, dict] = {}
    rows = []
    for sweep, model_name, resolution, n in plan(images):
        if only and sweep != only:
            continue
        key = (model_name, resolution, n)
        if key not in done:
            done[key] = measure(model_name, resolution, n)
        rows.append({"sweep": sweep, **done[key]})
    return rows


def dist_worker(images: int, resolution: int) -> None:
    """Under torchrun: this rank's shard of the statistics pass; rank 0 prints the wall time."""
    import torch

    from simprune import distributed
    from simprune.criteria import get_criterion

    torch.set_num_threads(1)
    distributed.init_from_env()
    model, batches, graph = _setup(BIG, resolution, images)
    mine = [(x, y) for i, (x, y) in enumerate(batches) if i % distributed.world_size() == distributed.rank()]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(mine[0][0][:2])
    crit = get_criterion("qsfm", progress=False)
    distributed.barrier()
    t0 = time.perf_counter()
    crit.statistics(graph, mine)  # all-reduced across ranks inside
    distributed.barrier()
    seconds = time.perf_counter() - t0
    if distributed.is_main():
        print(json.dumps({"processes": distributed.world_size(), "seconds": seconds}))
    distributed.cleanup()


def torchrun_rows(counts: list[int], images: int, resolution: int) -> list[dict]:
    rows = []
    for p in counts:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={p}", __file__,
               "--dist-worker", str(images), str(resolution)]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        launch = time.perf_counter() - t0
        got = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
        rows.append({"processes": p, "images": images, "resolution": resolution, "stats_s": got["seconds"],
                     "launch_to_exit_s": launch})
        print(f"torchrun {p} process(es): statistics {got['seconds']:.1f} s", file=sys.stderr, flush=True)
    base = rows[0]["stats_s"]
    for r in rows:
        r["speedup"] = base / r["stats_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=4, metavar=("MODE", "MODEL", "RESOLUTION", "IMAGES"))
    ap.add_argument("--dist-worker", nargs=2, type=int, metavar=("IMAGES", "RESOLUTION"))
    ap.add_argument("--images", nargs="*", type=int, default=[64, 256, 640], help="none: no sweep rows")
    ap.add_argument("--torchrun", nargs="*", type=int, default=None, metavar="P",
                    help="process counts for the torchrun timing (ResNet-50, 224 px, 64 images)")
    ap.add_argument("--sweep", choices=("images", "resolution", "model"), default=None, help="only this sweep")
    ap.add_argument("--keep", action="store_true",
                    help="merge into scale.json: rows measured now replace theirs, the others stay")
    args = ap.parse_args()
    if args.worker:
        mode, model_name, resolution, images = args.worker
        print(json.dumps(worker(mode, model_name, int(resolution), int(images))))
        return
    if args.dist_worker:
        dist_worker(*args.dist_worker)
        return
    old = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    rows = sweeps(args.images, args.sweep) if args.images else []
    if args.keep:
        key = lambda r: (r["sweep"], r["model"], r["resolution"], r["images"])  # noqa: E731
        new = {key(r) for r in rows}
        rows = [r for r in old.get("rows", []) if key(r) not in new] + rows
    dist = torchrun_rows(args.torchrun or [1, 2], 64, 224) if args.torchrun is not None else old.get("torchrun", [])
    print_table(rows, COLUMNS)
    if dist:
        print_table(dist, ["processes", "images", "resolution", "stats_s", "speedup", "launch_to_exit_s"])
    print(f"wrote {write_json('scale', {'batch': BATCH, 'criterion': 'qsfm', 'rows': rows, 'torchrun': dist})}")


if __name__ == "__main__":
    main()
