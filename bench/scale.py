"""How the cost of pruning grows with images, resolution and model, against a bare forward pass.

Statistics rows: two fresh processes over the same seeded random images, in the batches the library's
calibration loader uses for such images (128 of a data set's 32 px images, 50 photos at 224 px and up):
a bare forward (no_grad, the same bf16 autocast as calibration) and qsfm's statistics pass through the
public criterion (``get_criterion("qsfm").statistics``: SSIM + Gram + chance-level sums). Peak memory
is the process's VmHWM after the pass minus its VmRSS just before (the high-water mark is reset
through /proc/self/clear_refs, so model building and image creation do not count). 1 thread.
Goals (issue 24): qsfm statistics <= 2x the faster bare forward on ResNet-56 (640 images); ResNet-50
at 224, 64 images, <= 3x and peak growth <= 1.5 GiB.

Stage rows (``--stages``): one fresh process per (model, resolution, images, precision) prunes 30 % of
the MACs with ``--criterion`` (qsfm), the default repair (refit + BatchNorm), a label-free recovery of
``--recovery-steps`` steps, then exports ONNX; each stage's seconds and peak growth come from the
library's own stage messages (bench/stage_clock.py), beside a bare forward over the same images in the
same precision (calibration forward, refit and recovery all in ``fp32`` or ``bf16``). Random weights
and images: these rows measure cost, not quality.

    OMP_NUM_THREADS=1 python bench/scale.py                    # table + bench/results/scale.json
    OMP_NUM_THREADS=1 python bench/scale.py --images 64 256    # skip 1024 on a slow machine
    OMP_NUM_THREADS=1 python bench/scale.py --images --keep --torchrun 1 2   # add the 1-vs-2 process timing
    OMP_NUM_THREADS=1 python bench/scale.py --sweep images --images 1024 --keep   # add one row later
    python bench/scale.py --images --keep --stages --threads 2   # the stage table (both models, the full grid)
    python bench/scale.py --images --keep --stages --models torchvision:mobilenet_v2 --stage-images 64 256
    python bench/scale.py --images --keep --stages --models torchvision:resnet50 --stage-images 1024 --images-only
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
from stage_clock import StageClock, reset_peak, status_kib  # noqa: E402

RESULTS_JSON = Path(__file__).resolve().parent / "results" / "scale.json"
BIG = "torchvision:resnet50"
COLUMNS = ["sweep", "model", "resolution", "images", "batch", "stats_s", "forward_s", "ratio", "stats_growth_mib",
           "forward_growth_mib"]


def loader_batch(resolution: int) -> int:
    """The calibration loader's batch for such images: a named data set's small ones, or photos."""
    from simprune.calibrate.calibration import DATASET_BATCH, FOLDER_BATCH

    return DATASET_BATCH if resolution <= 64 else FOLDER_BATCH


def _setup(model_name: str, resolution: int, images: int):
    import torch

    from simprune.graph.groups import PruningGraph
    from simprune.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name).eval()
    g = torch.Generator().manual_seed(0)
    batch = loader_batch(resolution)
    batches = [(torch.randn(min(batch, images - i), 3, resolution, resolution, generator=g), None)
               for i in range(0, images, batch)]
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
    reset_peak()
    rss0 = status_kib("VmRSS")
    t0 = time.perf_counter()
    if mode == "forward":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for x, _ in batches:
                model(x)
    else:
        crit.statistics(graph, batches)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "growth_mib": (status_kib("VmHWM") - rss0) / 1024,
            "threads": torch.get_num_threads()}


def measure(model_name: str, resolution: int, images: int) -> dict:
    row = {"model": model_name, "resolution": resolution, "images": images, "batch": loader_batch(resolution)}
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
    """(sweep, model, resolution, images): images at 224 px, resolution at 64 images, models at 64 images
    (ResNet-56 at 640, the issue's measure)."""
    rows = [("images", BIG, 224, n) for n in images]
    rows += [("resolution", BIG, r, 64) for r in (112, 224, 320)]
    rows += [("model", m, r, n) for m, r, n in (("resnet56", 32, 640), ("torchvision:mobilenet_v2", 224, 64),
                                                (BIG, 224, 64))]
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
    from simprune.stats.channel_stats import NULL_BLOCK

    model, batches, graph = _setup(BIG, resolution, images)
    every = torch.cat([x for x, _ in batches])  # sharded as the calibration loader does: whole null blocks
    own = every[distributed.shard(list(range(len(every))), block=NULL_BLOCK)]
    batch = loader_batch(resolution)
    mine = [(own[i:i + batch], None) for i in range(0, len(own), batch)]
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


STAGES = ("statistics", "scoring", "allocation", "removal", "refit", "bn", "recovery", "export")
STAGE_COLUMNS = ["model", "resolution", "images", "precision", "forward_s", *(f"{s}_s" for s in STAGES), "total_s",
                 "statistics_x", "total_x", "peak_growth_mib", "recovery_steps", "recovery_s_per_step"]


def stage_worker(model_name: str, resolution: int, images: int, precision: str, criterion: str, steps: int) -> dict:
    """One stage row in this (fresh) process: a bare forward, then the prune stage by stage, then the export."""
    import tempfile

    import torch

    import simprune
    from simprune import Recovery, RefitOptions, Repair, Selection, progress
    from simprune.distributed import forward_precision
    from simprune.export.onnx import export_onnx

    model, batches, _ = _setup(model_name, resolution, images)
    example = torch.zeros(1, 3, resolution, resolution)
    with torch.no_grad(), forward_precision("cpu", precision):
        model(batches[0][0][:2])  # warm-up: oneDNN kernel selection
        t0 = time.perf_counter()
        for x, _ in batches:
            model(x)
        forward = time.perf_counter() - t0
    recover = Recovery(steps=steps, time_budget_s=None, checks=2, patience=steps, bf16=precision == "bf16")
    repair = Repair(refit=RefitOptions(precision=precision), recover=recover)
    clock, rss0 = StageClock(), status_kib("VmRSS")
    t0 = time.perf_counter()
    with progress.reporting(clock):
        pruned, report = simprune.prune(model, example, criterion, {"flops": 0.3}, calibration=batches,
                                        selection=Selection(calib_precision=precision), repair=repair)
        clock.begin("export")
        with tempfile.TemporaryDirectory() as folder:
            export_onnx(pruned, example, Path(folder) / "pruned.onnx")
        clock.end()
    row = {"model": model_name, "resolution": resolution, "images": images, "precision": precision,
           "criterion": criterion, "batch": loader_batch(resolution), "threads": torch.get_num_threads(),
           "forward_s": forward, "total_s": time.perf_counter() - t0,
           "peak_growth_mib": clock.peak_growth_mib(rss0), "recovery_steps": (report.get("recovered") or {}).get("steps_run"),
           "macs_removed_%": 100 * report["reduction"]["flops"], "stages": clock.stages}
    for name in STAGES:
        row[f"{name}_s"] = clock.stages.get(name, {}).get("seconds", 0.0)
    row["statistics_x"], row["total_x"] = row["statistics_s"] / forward, row["total_s"] / forward
    row["recovery_s_per_step"] = row["recovery_s"] / max(1, row["recovery_steps"] or 0)
    return row


def stage_rows(args) -> list[dict]:
    """The stage grid: images at 224 px, 320 px at the fewest images; both precisions at the fewest images."""
    fewest = min(args.stage_images)
    plan = [(m, 224, n, "bf16") for m in args.models for n in args.stage_images]
    if not args.images_only:
        plan += [(m, 320, fewest, "bf16") for m in args.models] + [(m, 224, fewest, "fp32") for m in args.models]
    rows = []
    for model_name, resolution, n, precision in plan:
        cmd = [sys.executable, __file__, "--stage-worker", model_name, str(resolution), str(n), precision,
               args.criterion, str(args.recovery_steps)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:  # recorded, and the grid goes on
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"model": model_name, "resolution": resolution, "images": n, "precision": precision,
                         "error": last[:300]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print_table(rows[-1:], STAGE_COLUMNS)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=4, metavar=("MODE", "MODEL", "RESOLUTION", "IMAGES"))
    ap.add_argument("--dist-worker", nargs=2, type=int, metavar=("IMAGES", "RESOLUTION"))
    ap.add_argument("--images", nargs="*", type=int, default=[64, 256, 1024], help="none: no sweep rows")
    ap.add_argument("--torchrun", nargs="*", type=int, default=None, metavar="P",
                    help="process counts for the torchrun timing (ResNet-50, 224 px, 64 images)")
    ap.add_argument("--sweep", choices=("images", "resolution", "model"), default=None, help="only this sweep")
    ap.add_argument("--stages", action="store_true", help="also the stage table (see the module doc)")
    ap.add_argument("--stage-worker", nargs=6, metavar=("MODEL", "RESOLUTION", "IMAGES", "PRECISION", "CRITERION",
                                                        "STEPS"))
    ap.add_argument("--models", nargs="+", default=[BIG, "torchvision:mobilenet_v2"], help="stage table models")
    ap.add_argument("--stage-images", nargs="+", type=int, default=[64, 256, 1024])
    ap.add_argument("--images-only", action="store_true", help="stage rows at 224 px in bf16 only (no 320 px, fp32)")
    ap.add_argument("--criterion", default="qsfm", help="the stage table's criterion")
    ap.add_argument("--recovery-steps", type=int, default=30, help="recovery steps in the stage table")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the stage table")
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
    if args.stage_worker:
        m, r, n, precision, crit, steps = args.stage_worker
        print(json.dumps(stage_worker(m, int(r), int(n), precision, crit, int(steps))))
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
    stages = stage_rows(args) if args.stages else old.get("stages", [])  # not asked for: the table stays
    if args.keep and args.stages:
        key = lambda r: (r["model"], r["resolution"], r["images"], r["precision"])  # noqa: E731
        new = {key(r) for r in stages}
        stages = [r for r in old.get("stages", []) if key(r) not in new] + stages
    stages.sort(key=lambda r: (r["model"], r["precision"], r["resolution"], r["images"]))
    if stages:
        print_table(stages, STAGE_COLUMNS)
    print(f"wrote {write_json('scale', {'criterion': 'qsfm', 'rows': rows, 'torchrun': dist, 'stages': stages})}")


if __name__ == "__main__":
    main()
