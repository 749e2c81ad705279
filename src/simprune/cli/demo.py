"""``simprune demo``: the mission in one offline command, on an embedded default.

Prunes the Fashion-MNIST ResNet-56 shipped inside the package to about half its MACs with the library's
default pipeline (criterion "auto", least-squares refit, BatchNorm re-estimation; no fine-tuning), compares
it with the seeds' methods (qsfm, filter-similarity, feature-stats) and the l1 and random floors under the
same repair (:func:`compare.run_grid`), exports the most accurate model to ONNX (verified in onnxruntime) and to int8 (onnxruntime static quantization
on the calibration images, checked on the test set), times batch-1 inference of the original,
pruned and int8 files, prints a table and writes report.json, report.md and report.html. Evaluates on the full
Fashion-MNIST test set when it is installed (``apt-get install dataset-fashion-mnist``), else on
the real sample shipped inside the package (``fashion-mnist-sample``).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from simprune import api
from simprune.allocation.allocator import Guards
from simprune.allocation.selection import Selection
from simprune.calibrate.calibration import calibration_loader
from simprune.cli.common import command_line, positive
from simprune.errors import SimpruneError
from simprune.export.latency import benchmark, latency_report
from simprune.export.onnx import export_onnx, require
from simprune.export.quantize import EVAL_BATCH, INT8_FILE, quantize_int8
from simprune.graph.counting import count
from simprune.io.data import SAMPLE, has_local_files, load_dataset
from simprune.io.files import atomic_output_dir, atomic_write_json
from simprune.train.loop import evaluate
from simprune.verify.compare import Spec, run_grid
from simprune.verify.plots import similarity_heatmaps
from simprune.verify.reports import environment_versions, network_order, write_report

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "zoo" / "resnet56-fashion-mnist"
SPECS = [Spec("default", "auto"), Spec("qsfm", "qsfm", {"similarity": "ssim"}), Spec("filter-similarity", "filter-similarity"),
         Spec("feature-stats", "feature-stats"), Spec("l1", "l1"), Spec("random", "random")]
MODEL_DIR = "pruned-model"  # the most accurate row's model, its ONNX and int8 files


def demo_data(requested: str, checkpoint_data: str | None) -> str:
    """``auto``: the full Fashion-MNIST when it is on disk, else the shipped sample (never a download)."""

    if requested != "auto":
        return requested
    if checkpoint_data in (None, "fashion-mnist"):
        return "fashion-mnist" if has_local_files("fashion-mnist") else SAMPLE
    return checkpoint_data


def _check_out(out: Path) -> None:
    """The demo replaces its own earlier output, and nothing else."""
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        previous = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict) or not (previous.get("kind") == "demo" or "target_flops" in previous):
        raise SimpruneError(f"{out} holds files that are not an earlier demo's; pick another --out")


def _latency(baseline, pruned, shape, macs: tuple[int, int], out_dir: Path, threads: int, runs: int,
             calibration, test, data: str) -> dict:
    """Export the pruned model to ``out_dir/model.onnx`` and, quantized to int8 on the calibration images and
    checked on ``test``, to ``out_dir/model.int8.onnx``; time the baseline (a temporary file) and the pruned
    files at batch 1 in onnxruntime (interleaved); the report's latency keys plus ``onnx``, ``int8``, ``size_mib``.
    An int8 file outside the check's tolerance is not written; ``int8_refused`` says why.
    (``simprune bench DIR`` times more engines and batch sizes.)"""

    example = torch.zeros(1, *shape)
    with tempfile.TemporaryDirectory(prefix="simprune-demo-") as tmp:
        base_file = export_onnx(baseline, example, Path(tmp) / "baseline.onnx")["path"]
        info = export_onnx(pruned, example, out_dir / "model.onnx")
        files, extra = [Path(base_file), Path(info["path"])], {}
        try:
            int8 = quantize_int8(pruned, example, calibration, torch.utils.data.DataLoader(test, batch_size=EVAL_BATCH),
                                 out_dir / INT8_FILE, threads=threads, original=baseline)
            files.append(Path(int8["path"]))
            extra["int8"] = {**int8, "path": f"{MODEL_DIR}/{INT8_FILE}", "data": data}
        except SimpruneError as exc:  # outside the tolerance: the demo goes on without the int8 file
            extra["int8_refused"] = str(exc)
        timings = benchmark([baseline, pruned], shape, threads=threads, batches=(1,), runs=runs,
                            engines=("onnxruntime",), onnx_files=files)
        sizes = {k: f.stat().st_size / 2**20 for k, f in zip(("original", "pruned", "int8"), files)}
    keys = latency_report(timings, macs[0], macs[1], threads, runs)
    keys["latency"]["load_average"] = os.getloadavg()[0]  # other processes running while we timed
    return {**keys, "size_mib": sizes, "onnx": {**info, "path": f"{MODEL_DIR}/model.onnx"}, **extra}


def _deploy_keys(summary: dict, seconds: dict, model, kept: dict, shape, macs_before: int, folder: Path,
                 timing: tuple[int, int], images: tuple) -> None:
    """The latency and int8 keys of the demo report, or why they were skipped (no onnxruntime);
    ``images``: (calibration, test set, data set name)."""
    try:
        require("onnx", "onnxruntime")
    except SimpruneError as exc:
        summary["latency_skipped"] = str(exc)
        return
    t0 = time.perf_counter()
    summary.update(_latency(model, kept["model"], shape, (macs_before, kept["row"]["macs"]), folder, *timing,
                            *images))
    seconds["export_and_latency"] = time.perf_counter() - t0


def run_demo(out: Path, target: float = 0.5, data: str = "auto", eval_images: int | None = None,
             calib_images: int = 256, checkpoint: Path | None = None, threads: int = 1, latency_runs: int = 50,
             round_to: int = 8, progress: bool = False, command: str = "simprune demo") -> dict:
    """Run the demo into ``out`` (written atomically) and return the report dict.

    ``round_to`` keeps every group's channel count a multiple of 8 by default: onnxruntime's CPU
    convolutions work in blocks of 8 channels; on this project's 2-core Xeon (1 thread, batch 1) the
    QSFM ResNet-56 at half the MACs ran 1.02x faster with odd widths and 1.31x with multiples of 8."""

    if not 0 < target < 1:
        raise SimpruneError(f"--target {target} is outside (0, 1); give the fraction of MACs to remove, e.g. 0.5")
    t_start = time.perf_counter()
    out = Path(out)
    _check_out(out)
    checkpoint = Path(checkpoint or DEFAULT_CHECKPOINT)
    model, desc = api.load_model(checkpoint)
    data = demo_data(data, (desc.get("data") or {}).get("name"))
    pad_to = (desc.get("data") or {}).get("pad_to")
    shape = tuple(desc["input_shape"])
    seconds = {}
    with atomic_output_dir(out, overwrite=True) as tmp:
        test = load_dataset(data, "test", pad_to=pad_to)
        if eval_images:
            test = torch.utils.data.Subset(test, range(min(eval_images, len(test))))
        calib = calibration_loader(data, calib_images, pad_to=pad_to, seed=0)
        t0 = time.perf_counter()
        base = evaluate(model, test, progress=True, desc="top-1 of the unpruned model")["top1"]
        seconds["evaluate_unpruned"] = time.perf_counter() - t0
        cost = count(model, torch.zeros(1, *shape))
        rows = [{"label": "unpruned", "criterion": "unpruned", "top1": base, "change": 0.0, "macs": cost.macs,
                 "params": cost.params, "flops_removed": 0.0, "params_removed": 0.0}]
        layers, runs = {}, []
        for run in run_grid(model, torch.zeros(1, *shape), SPECS, [target], calibration=calib, test=test,
                            base_top1=base, progress=progress, selection=Selection(guards=Guards(round_to=round_to))):
            rows.append(run["row"])  # every row with the default repair: refit + BatchNorm re-estimation
            layers[run["row"]["label"]] = run["report"]["layers"]
            runs.append(run)
        kept = max(runs, key=lambda r: r["row"]["top1"])  # the model a user would deploy
        seconds["prune_and_evaluate"] = sum(r.get("seconds", 0) for r in rows)
        save_desc = {**{k: desc[k] for k in ("model", "model_args", "data") if k in desc}, "input_shape": list(shape),
                     "command": command, "pruning": {"criterion": kept["report"]["criterion"],
                                                     "target": {"flops": target}, "source": str(checkpoint)},
                     "calibration": {"data": data, "images": calib_images, "seed": 0, "pad_to": pad_to}}
        api.save(tmp / MODEL_DIR, kept["model"], save_desc, {**kept["report"], "model": desc.get("model")})
        summary = {"kind": "demo", "model": desc.get("model"), "checkpoint": str(checkpoint), "data": data,
                   "test_images": len(test), "input_shape": list(shape),
                   "calibration": {"data": data, "images": len(calib.dataset), "seed": 0},
                   "target_flops": target, "round_to": round_to, "baseline_top1": base, "rows": rows,
                   "kept": kept["row"]["label"], "chosen": next(r["row"].get("chosen") for r in runs),
                   "layers": layers,
                   "layers_title": f"Channels per layer at {100 * target:.0f} % of MACs removed"}
        _deploy_keys(summary, seconds, model, kept, shape, cost.macs, tmp / MODEL_DIR,
                     (threads, latency_runs), (calib, test, data))
        qsfm = next(r["result"] for r in runs if r["row"]["criterion"] == "qsfm")
        if qsfm is not None and qsfm.similarity:  # what the seeds' redundancy looks like
            similarity_heatmaps(network_order(qsfm.similarity), tmp / "similarity.png", label="ssim")
        seconds["total"] = time.perf_counter() - t_start
        summary.update({"seconds": seconds, "command": command, "versions": environment_versions()})
        atomic_write_json(tmp / "report.json", summary)
        write_report(tmp, "demo", summary)
    return summary


def print_summary(summary: dict, out) -> None:
    """The demo's table on stdout."""
    print(f"{summary['model']} on {summary['data']} ({summary['test_images']} test images, "
          f"{summary['calibration']['images']} calibration images), {100 * summary['target_flops']:.0f} % of "
          "MACs removed, every row refit on the calibration images (no labels, no fine-tuning)")
    print(f"{'':22s} {'top-1 %':>8s} {'change':>7s} {'MACs':>9s} {'MACs removed':>13s} {'params removed':>15s}")
    for r in summary["rows"]:
        removed = "" if r["criterion"] == "unpruned" else f"{r['flops_removed']:13.1%} {r['params_removed']:15.1%}"
        change = "" if r["criterion"] == "unpruned" else f"{r['change']:+7.2f}"
        print(f"{r['label']:22s} {r['top1']:8.2f} {change:>7s} {r['macs'] / 1e6:8.2f}M {removed}")
    int8 = summary.get("int8")
    if int8:
        print(f"{summary['kept'] + ' int8':22s} {int8['int8_top1']:8.2f} {int8['int8_top1'] - summary['baseline_top1']:+7.2f} "
              f"(onnxruntime; the float32 file scores {int8['fp32_top1']:.2f})")
    elif summary.get("int8_refused"):
        print(f"{summary['kept']} int8: {summary['int8_refused']}")
    lat = summary.get("latency_ms")
    if lat:
        sp, info, mib = summary["speedup"], summary["latency"], summary["size_mib"]
        print(f"{summary['kept']} model in onnxruntime, batch 1, {info['threads']} thread(s): {lat['before']:.2f} ms -> "
              f"{lat['after']:.2f} ms ({sp['measured']:.2f}x faster for {sp['macs']:.2f}x fewer MACs)"
              + (f", int8 {lat['int8']:.2f} ms ({sp['int8']:.2f}x)" if "int8" in lat else "")
              + "; ONNX files " + " -> ".join(f"{v:.2f}" for v in mib.values()) + " MiB")
    else:
        print(f"latency skipped: {summary.get('latency_skipped')}")
    print(f"wrote {out}/report.html, report.md, report.json and {MODEL_DIR}/ (model.safetensors, model.json"
          f"{', model.onnx' if lat else ''}{', model.int8.onnx' if int8 else ''})")


# ---- command line ---------------------------------------------------------------------------

def add_demo_parser(sub) -> None:
    """Register ``simprune demo`` on the CLI's sub-parsers."""

    p = sub.add_parser("demo", help="prune the shipped Fashion-MNIST ResNet-56: the default pipeline vs the seeds' "
                                      "methods vs l1 and random, ONNX, int8, latency")
    p.add_argument("--out", default="runs/demo", help="output folder (replaced when it holds an earlier demo)")
    p.add_argument("--target", type=float, default=0.5, help="fraction of MACs to remove")
    p.add_argument("--data", default="auto",
                   help="auto: fashion-mnist when installed, else the shipped fashion-mnist-sample")
    p.add_argument("--eval-images", type=positive, default=None, help="evaluate on the first N test images only")
    p.add_argument("--calib-images", type=positive, default=256,
                   help="calibration images (256: the default row within 0.03 of 640 here, in two thirds of the time)")
    p.add_argument("--checkpoint", default=None, help="another trained model directory instead of the shipped one")
    p.add_argument("--round-to", type=positive, default=8,
                   help="keep channel counts multiples of this (8: what onnxruntime's CPU kernels need to speed up)")
    p.add_argument("--threads", type=positive, default=1,
                   help="intra-op threads for the latency measurement (1: steadiest with other work running)")
    p.add_argument("--latency-runs", type=positive, default=50)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_demo)


def cmd_demo(args) -> int:
    summary = run_demo(Path(args.out), args.target, args.data, args.eval_images, args.calib_images,
                       Path(args.checkpoint) if args.checkpoint else None, args.threads, args.latency_runs,
                       args.round_to, progress=True, command=command_line())
    print_summary(summary, args.out)
    return 0
