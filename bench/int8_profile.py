"""Where an int8 file's time goes in onnxruntime, and what onnxruntime offers to cut it (issue 23).

ResNet-56 (zoo/resnet56-fashion-mnist) is pruned as a user would run it, with the default pipeline:
``simprune prune --checkpoint zoo/resnet56-fashion-mnist --target-flops 0.62 --calib-data fashion-mnist
--int8`` (in process). Then, at batch 1 and one thread:

1. **Profile** (onnxruntime's own profiler, ``SessionOptions.enable_profiling``) of the original float32,
   the pruned float32 and the pruned int8 file: nodes per run after onnxruntime's graph optimisation, the
   time in convolution kernels, in the other kernels, and between kernels (a run's time less its kernels':
   onnxruntime's per-node dispatch), and the **floor**: what a run would cost if every convolution took
   no time at all, and the speed-up over the float32 original that floor allows.
2. **Variants** of the pruned int8 file, each quantized from the same pruned float32 ONNX on the same
   calibration images, and timed interleaved with the original: QDQ (simprune's default) against
   QOperator format, per-channel against per-tensor weights, uint8 against int8 activations, and
   onnxruntime's graph optimisation level (basic / extended / all) on the default file; top-1 of each in
   onnxruntime on the Fashion-MNIST test set.

    python bench/int8_profile.py                 # table + bench/results/int8-profile.json
    python bench/int8_profile.py --target 0.48 --runs 300
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402
from simprune.cli.main import main as simprune  # noqa: E402
from simprune.export.latency import export_for_timing  # noqa: E402
from simprune.export.onnx import _quiet  # noqa: E402
from simprune.export.quantize import INT8_FILE, PERCENTILE, BatchReader, top1_side_by_side  # noqa: E402
from simprune.io.data import load_dataset  # noqa: E402
from simprune.io.files import load_model, read_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESNET56 = ROOT / "zoo" / "resnet56-fashion-mnist"
SHAPE = (1, 32, 32)
CONV_OPS = {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcFusedConv", "QLinearConvTranspose"}
PROFILE_COLUMNS = ["file", "nodes", "run_ms", "conv_ms", "other_kernels_ms", "between_ms", "conv_share_%",
                   "floor_ms", "floor_speedup", "top_ops"]
VARIANT_COLUMNS = ["variant", "format", "weights", "activations", "optimisation", "ms", "speedup", "nodes", "top1"]


def session(path: Path, level: str = "all", profile_prefix: str | None = None):
    """An onnxruntime session: one thread, graph optimisation ``level``, optionally profiling."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def profile(path: Path, runs: int, work: Path) -> dict:
    """Per-run nodes and milliseconds (convolution kernels, other kernels, between kernels) from the profiler."""
    sess = session(path, profile_prefix=str(work / path.stem))
    feed = {sess.get_inputs()[0].name: np.zeros((1, *SHAPE), np.float32)}
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs_us = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][5:]
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run = len(kernels) / max(1, len(runs_us) + 5)
    skip = int(5 * per_run)  # the warm-up runs' kernels
    kernels = kernels[skip:]
    n = max(1, len(runs_us))
    conv = sum(e["dur"] for e in kernels if e["args"].get("op_name") in CONV_OPS) / n / 1e3
    other = sum(e["dur"] for e in kernels if e["args"].get("op_name") not in CONV_OPS) / n / 1e3
    run_ms = float(np.median(runs_us)) / 1e3
    ops = Counter(e["args"].get("op_name") for e in kernels)
    return {"nodes": round(per_run), "run_ms": run_ms, "conv_ms": conv, "other_kernels_ms": other,
            "between_ms": max(0.0, run_ms - conv - other), "conv_share_%": 100 * conv / run_ms,
            "floor_ms": max(1e-6, run_ms - conv),
            "top_ops": ", ".join(f"{op} {round(c / n)}" for op, c in ops.most_common(4))}


def quantize_variant(fp32: Path, out: Path, reader: BatchReader, fmt: str, per_channel: bool, activations: str):
    """``quantize_static`` of the pruned float32 file with one combination of onnxruntime's options."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    with _quiet(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quant_pre_process(str(fp32), str(pre))
        reader.set_range(0, len(reader))
        quantize_static(str(pre), str(out), reader,
                        quant_format=QuantFormat.QDQ if fmt == "QDQ" else QuantFormat.QOperator,
                        per_channel=per_channel, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": PERCENTILE, "CalibStridedMinMax": 1})


VARIANTS = [  # name, format, per-channel weights, activations, optimisation level
    ("simprune default", "QDQ", True, "uint8", "all"),
    ("QOperator", "QOperator", True, "uint8", "all"),
    ("per-tensor", "QDQ", False, "uint8", "all"),
    ("int8 activations", "QDQ", True, "int8", "all"),
    ("QOperator per-tensor", "QOperator", False, "uint8", "all"),
    ("default, extended opt.", "QDQ", True, "uint8", "extended"),
    ("default, basic opt.", "QDQ", True, "uint8", "basic"),
]


def prune_resnet56(work: Path, target: float) -> tuple[Path, dict, float]:
    out = work / "resnet56"
    argv = ["prune", "--checkpoint", str(RESNET56), "--target-flops", str(target), "--calib-data", "fashion-mnist",
            "--data", "fashion-mnist", "--int8", "--no-latency", "--threads", "1", "--out", str(out)]
    started = time.perf_counter()
    if simprune(argv) != 0:
        raise SystemExit("simprune prune failed: " + " ".join(argv))
    return out, {"command": "simprune " + " ".join(argv)}, time.perf_counter() - started


def timed_levels(files: list[tuple[Path, str]], runs: int) -> list[float]:
    """Median ms of each (file, optimisation level), interleaved with one another."""
    from simprune.export.latency import time_until_stable

    sessions = [session(p, level) for p, level in files]
    x = np.zeros((1, *SHAPE), np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    times = time_until_stable([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)], runs, 10)
    return [float(np.median(t)) * 1e3 for t in times]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.62, help="MACs fraction to remove (default 0.62)")
    ap.add_argument("--runs", type=int, default=300, help="timed runs per file (at least 30)")
    ap.add_argument("--calib-images", type=int, default=640)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-int8-profile-") as tmp:
        work = Path(tmp)
        out, record, seconds = prune_resnet56(work, args.target)
        report = read_json(out / "report.json")
        original, pruned = export_for_timing([load_model(RESNET56)[0], load_model(out)[0]], SHAPE, work)
        files = {"original float32": original, "pruned float32": pruned, "pruned int8": out / INT8_FILE}
        profiles = [{"file": k, **profile(p, args.runs, work)} for k, p in files.items()]
        base_ms = profiles[0]["run_ms"]
        for row in profiles:
            row["floor_speedup"] = base_ms / row["floor_ms"]
        print_table(profiles, PROFILE_COLUMNS)
        train = load_dataset("fashion-mnist", "train", pad_to=32)
        calib = torch.stack([train[i][0] for i in range(args.calib_images)])
        reader = BatchReader([calib[i:i + 64] for i in range(0, len(calib), 64)], session(pruned).get_inputs()[0].name)
        test = torch.utils.data.DataLoader(load_dataset("fashion-mnist", "test", pad_to=32), batch_size=256)
        variants = []
        for name, fmt, per_channel, acts, level in VARIANTS:
            path = work / f"v{len(variants)}.onnx"
            if level == "all":
                quantize_variant(pruned, path, reader, fmt, per_channel, acts)
            else:
                path = variants[0]["path"]
            variants.append({"variant": name, "format": fmt, "weights": "per-channel" if per_channel else "per-tensor",
                             "activations": acts, "optimisation": level, "path": path})
        ms = timed_levels([(original, "all")] + [(v["path"], v["optimisation"]) for v in variants], args.runs)
        accuracy = {}
        for v in variants:
            if v["optimisation"] == "all":
                accuracy[v["path"]] = top1_side_by_side([session(v["path"])], test)["top1"][0]
        for v, t in zip(variants, ms[1:]):
            v.update(ms=t, speedup=ms[0] / t, top1=accuracy.get(v["path"]),
                     nodes=profile(v["path"], 50, work)["nodes"] if v["optimisation"] == "all" else None)
        for v in variants:
            v["path"] = v["path"].name
        print_table(variants, VARIANT_COLUMNS)
    q = report["int8"]
    write_json("int8-profile", {**record, "prune_and_int8_seconds": seconds, "criterion": report["criterion"],
                                "macs_removed": report["reduction"]["flops"], "original_top1": q["original_top1"],
                                "fp32_top1": q["fp32_top1"], "int8_top1": q["int8_top1"], "original_ms": ms[0],
                                "runs": args.runs, "batch": 1, "threads": 1, "profiles": profiles,
                                "variants": variants})
    return 0


if __name__ == "__main__":
    sys.exit(main())
