"""Edge files: original float32, pruned float32 and pruned int8, side by side (accuracy, ms, MiB).

ResNet-56 (zoo/resnet56-fashion-mnist, 94.21 %) is pruned by `simprune prune` as a user would run it
(its default criterion unless --criterion: refit-error, since calibration data is given; 48 % of MACs;
kept widths aligned as by default: multiples of 16, or of 8 where 16
cannot reach the target; the 640 calibration images of the refit and BatchNorm re-estimation)
with --int8, which quantizes the pruned model in
onnxruntime (static, QDQ, per-channel int8 weights) calibrated on the same images; top-1 of all
three files in onnxruntime on the 10,000 Fashion-MNIST test images. Goals: int8 within 1.0 point
of the unpruned float32 model, >= 3x faster than it.

MobileNetV2 (torchvision IMAGENET1K_V1, `make weights`) is pruned with bench/latency.py's settings to
the QSFM paper's 1.53x speed-up: the smallest of --mobilenet-flops that reaches it by thread CPU time
(--target-latency measures wall-clock time while pruning, which other processes skew here), then
quantized on the same 128 calibration crops of scikit-image's photographs; ImageNet is not here,
so each file's top-1 is compared with the unpruned float32 model's on the ten crops of every
photograph (agreement).
Its int8 file is timed whatever its agreement; the JSON says whether `simprune export`'s default
tolerance would have written it.

Latency: onnxruntime, batch 1, 1 thread, the three files interleaved: the median CPU time of the one
thread onnxruntime runs on (the 2-core machine is shared by several sessions, whose processes
preempt long runs more often than short ones and skew wall-clock ratios), and the wall-clock median
and 10th percentile with the load average; size: the ONNX file on disk.

    python bench/int8.py                          # both models; table + bench/results/int8.json
    python bench/int8.py --models resnet56 --criterion qsfm --name int8-qsfm --wait 0
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_json  # noqa: E402
from latency import EDGE_SPEEDUP, wait_for_quiet  # noqa: E402
from latency import models as latency_models  # noqa: E402
from simprune.allocation.allocator import Guards  # noqa: E402
from simprune.allocation.rounding import vector_block  # noqa: E402
from simprune.api import prune  # noqa: E402
from simprune.cli.main import main as simprune  # noqa: E402
from simprune.export.latency import export_for_timing, measure_onnx_many, ort_session  # noqa: E402
from simprune.export.quantize import INT8_FILE, MAX_DROP, MIN_AGREEMENT, int8_verdict, quantize_int8, top1_side_by_side  # noqa: E402
from simprune.io.files import load_model, read_json  # noqa: E402
from simprune.io.imagenet import PHOTOS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESNET56 = ROOT / "zoo" / "resnet56-fashion-mnist"
GOALS = {"max_drop_points": 1.0, "min_speedup": 3.0}
KINDS = ("original float32", "pruned float32", "pruned int8")


def timed(files: list[Path], shape, runs: int) -> list[dict]:
    """Each file's ms and speed-up over the first: wall clock (median, 10th percentile) and the CPU time of
    the one thread onnxruntime runs on (median), each from its own interleaved run. Other processes on
    the shared cores preempt long runs more often than short ones; thread CPU time leaves that out."""
    wall = measure_onnx_many(files, shape, 1, 1, runs)
    cpu = measure_onnx_many(files, shape, 1, 1, runs, clock=time.thread_time)
    return [{"ms": w["median_ms"], "speedup": wall[0]["median_ms"] / w["median_ms"], "ms_p10": w["p10_ms"],
             "speedup_p10": wall[0]["p10_ms"] / w["p10_ms"], "cpu_ms": c["median_ms"],
             "cpu_speedup": cpu[0]["median_ms"] / c["median_ms"], "MiB": f.stat().st_size / 2**20}
            for w, c, f in zip(wall, cpu, files)]


def resnet56(work: Path, criterion: str | None, target: float, runs: int) -> dict:
    """`simprune prune ... --int8` in process, then the three files timed; the three-way rows."""
    out = work / "resnet56"
    argv = ["prune", "--checkpoint", str(RESNET56), "--target-flops", str(target),
            "--calib-data", "fashion-mnist", "--data", "fashion-mnist", "--int8", "--no-latency", "--threads", "1",
            "--out", str(out)] + (["--criterion", criterion] if criterion else [])
    started = time.perf_counter()
    code = simprune(argv)
    seconds = time.perf_counter() - started
    if code != 0:
        return {"model": "ResNet-56", "command": "simprune " + " ".join(argv), "failed": f"exit code {code}"}
    shape = (1, 32, 32)
    files = export_for_timing([load_model(RESNET56)[0], load_model(out)[0]], shape, work) + [out / INT8_FILE]
    report = read_json(out / "report.json")
    q = report["int8"]
    top1 = (q["original_top1"], q["fp32_top1"], q["int8_top1"])
    rows = [{"model": "ResNet-56", "file": kind, "top1": acc, "top1_change": acc - top1[0], **t}
            for kind, acc, t in zip(KINDS, top1, timed(files, shape, runs))]
    drop, int8 = top1[0] - top1[2], rows[2]
    return {"model": "ResNet-56", "weights": "zoo/resnet56-fashion-mnist", "command": "simprune " + " ".join(argv),
            "criterion": report["criterion"], "macs_removed": report["reduction"]["flops"],
            "torch_top1_bf16": report["accuracy"], "test_images": q["images"], "int8": q, "rows": rows,
            "prune_and_int8_seconds": seconds,
            "goals": {**GOALS, "drop_points": drop, "speedup_cpu": int8["cpu_speedup"], "speedup": int8["speedup"],
                      "speedup_p10": int8["speedup_p10"],
                      "met": drop <= GOALS["max_drop_points"] and int8["cpu_speedup"] >= GOALS["min_speedup"]}}


def _prune_to_speedup(spec: dict, sweep: list[float], work: Path) -> tuple:
    """Prune at each share of MACs in ``sweep`` (ascending) until the CPU-time speed-up over the original
    reaches EDGE_SPEEDUP; the pruned model, its report and the sweep (speed-ups from 50 interleaved runs)."""
    model, x, shape = spec["model"], torch.zeros(1, *spec["shape"]), spec["shape"]
    guards = Guards(round_to=vector_block(), **spec["guards"])
    (base,) = export_for_timing([model], shape, work / "sweep-original")
    tried = []
    for flops in sorted(sweep):
        pruned, report = prune(model, x, spec["criterion"], {"flops": flops}, guards=guards, **spec["options"])
        (path,) = export_for_timing([pruned], shape, work / f"sweep-{flops}")
        before, after = measure_onnx_many([base, path], shape, 1, 1, 50, clock=time.thread_time)
        tried.append({"target_flops": flops, "macs_removed": report["reduction"]["flops"],
                      "cpu_speedup": before["median_ms"] / after["median_ms"]})
        print(f"  {100 * flops:.0f} % of MACs: {tried[-1]['cpu_speedup']:.2f}x (thread CPU time)", flush=True)
        if tried[-1]["cpu_speedup"] >= EDGE_SPEEDUP:
            break
    return pruned, report, tried


def mobilenetv2(work: Path, runs: int, sweep: list[float]) -> dict:
    """Pruned to the QSFM paper's 1.53x (bench/latency.py's settings; the smallest MAC share of ``sweep``
    that gets there by thread CPU time), int8 on the same crops; agreement on the photos.

    The int8 file is written whatever its agreement with the pruned float32 model (``min_agreement=0``), so
    that its speed is measured; ``int8.kept_by_default`` says whether quantize_int8's default tolerance
    (MIN_AGREEMENT) would have kept it."""
    spec = latency_models(["mobilenetv2"])[0]
    model, x = spec["model"], torch.zeros(1, *spec["shape"])
    pruned, report, tried = _prune_to_speedup(spec, sweep, work)
    calibration, photos = spec["options"]["calibration"], spec["agreement"]
    files = export_for_timing([model, pruned], spec["shape"], work)
    int8_path = work / "mobilenetv2.int8.onnx"
    q = quantize_int8(pruned, x, calibration, [photos], int8_path, threads=1, min_agreement=0.0)
    q["kept_by_default"] = int8_verdict(None, None, q["agreement"]) is None
    files.append(int8_path)
    check = top1_side_by_side([ort_session(f, 1) for f in files], [photos])
    rows = [{"model": "MobileNetV2", "file": kind, "agreement": agree, **t}
            for kind, agree, t in zip(KINDS, check["agreement"], timed(files, spec["shape"], runs))]
    return {"model": "MobileNetV2", "weights": spec["weights"], "criterion": spec["label"],
            "options": {**{k: v for k, v in spec["options"].items() if k != "calibration"}, **spec["guards"],
                        "round_to": vector_block()},
            "sweep": tried,
            "macs_removed": report["reduction"]["flops"], "photos": list(PHOTOS), "agreement_images": check["images"],
            "calibration_images": len(calibration.dataset), "int8": q, "rows": rows,
            "int8_vs_pruned_float32_agreement": q["agreement"], "default_min_agreement": MIN_AGREEMENT,
            "speedup_goal": EDGE_SPEEDUP}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=["resnet56", "mobilenetv2"], default=["resnet56", "mobilenetv2"])
    ap.add_argument("--criterion", default=None, help="ResNet-56: criterion (default: `simprune prune`'s default)")
    ap.add_argument("--target", type=float, default=0.48, help="ResNet-56: fraction of MACs removed")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--mobilenet-flops", type=float, nargs="+", default=[0.38, 0.42, 0.46, 0.50, 0.54],
                    help="MobileNetV2: shares of MACs to try, smallest first, until 1.53x")
    ap.add_argument("--wait", type=float, default=30, help="minutes to wait for a quiet machine")
    ap.add_argument("--name", default="int8", help="writes bench/results/NAME.json")
    ap.add_argument("--merge", action="store_true", help="keep the other models' results of bench/results/NAME.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    busy, waited, load = wait_for_quiet(args.wait)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        if "resnet56" in args.models:
            print("ResNet-56 ...", flush=True)
            results.append(resnet56(Path(tmp), args.criterion, args.target, args.runs))
        if "mobilenetv2" in args.models:
            print("MobileNetV2 ...", flush=True)
            results.append(mobilenetv2(Path(tmp), args.runs, args.mobilenet_flops))
    for r in results:
        print(f"\n{r['model']}: " + (r.get("failed") or f"{r['criterion']}, {100 * r['macs_removed']:.1f} % of MACs "
                                     f"removed; int8 picks the pruned float32 class on {r['int8']['agreement']:.1f} % "
                                     f"of {r['int8']['images']} test images"))
        if r.get("int8", {}).get("kept_by_default") is False:
            print(f"  (below the default tolerance of {MIN_AGREEMENT:g} %: `simprune export` would not write this file)")
        if r.get("rows"):
            accuracy = ["top1", "top1_change"] if r["model"] == "ResNet-56" else ["agreement"]
            print_table(r["rows"], ["file", *accuracy, "cpu_ms", "cpu_speedup", "ms", "speedup", "ms_p10",
                                    "speedup_p10", "MiB"])
        if r.get("goals"):
            g = r["goals"]
            print(f"goals: drop {g['drop_points']:.2f} points (<= {g['max_drop_points']}), {g['speedup_cpu']:.2f}x "
                  f"faster by thread CPU time (>= {g['min_speedup']}x; wall clock: {g['speedup']:.2f}x by medians, "
                  f"{g['speedup_p10']:.2f}x by 10th percentiles): {'met' if g['met'] else 'NOT met'}")
    import onnxruntime  # noqa: PLC0415

    previous = RESULTS / f"{args.name}.json"
    if args.merge and previous.exists():  # the models not run now keep their earlier result (and its command)
        ran = {r["model"] for r in results}
        kept = [r for r in json.loads(previous.read_text())["results"] if r["model"] not in ran]
        results = [*kept, *results]
    path = write_json(args.name, {"threads": 1, "batch": 1, "runs": args.runs, "onnxruntime": onnxruntime.__version__,
                               "int8_tolerance_points": MAX_DROP, "background_busy": busy,
                               "waited_minutes": round(waited, 1), "load_average_at_start": round(load, 2),
                               "load_average_at_end": round(os.getloadavg()[0], 2), "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
