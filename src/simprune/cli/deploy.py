"""`simprune export` and `simprune bench`, and the latency step and latency target of `simprune prune`.

``export DIR --onnx`` writes ``DIR/model.onnx``, verified in onnxruntime. ``bench DIR`` times
the original and the pruned model (onnxruntime and PyTorch eager, batch 1 and a larger batch)
and writes ``DIR/latency.json`` and the ``latency_ms``/``speedup``/``latency`` keys of
``DIR/report.json``. The original is the recorded ``pruning.source`` checkpoint when it still
exists, else the unpruned architecture (latency does not depend on the weights' values).
"""
from __future__ import annotations

import argparse
import importlib.util
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from simprune.allocation.allocator import Guards
from simprune.allocation.rounding import vector_block
from simprune.cli.common import positive
from simprune.errors import SimpruneError
from simprune.export.latency import benchmark, latency_report
from simprune.export.onnx import export_onnx, require
from simprune.graph.counting import count
from simprune.io.files import atomic_write_json, load_model, read_json
from simprune.models import build_model
from simprune.schedules.latency import prune_to_latency

DEFAULT_BATCH = 8


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def _example(shape) -> Any:
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))


def _input_shape(desc: dict, source: Path) -> tuple[int, ...]:
    shape = tuple(desc.get("input_shape") or ())
    if len(shape) != 3:
        raise SimpruneError(f"{source} records no input_shape; re-create the model with `simprune prune`")
    return shape


def original_model(directory: Path, desc: dict) -> tuple[Any, str]:
    """The model ``directory`` was pruned from, and a phrase saying which one it is."""

    source = (desc.get("pruning") or {}).get("source") or ""
    if source and Path(source).exists():
        model, _ = load_model(source)
        return model, f"checkpoint {source}"
    name = desc.get("model")
    if not isinstance(name, str):
        raise SimpruneError(f"{directory}/model.json names no model; cannot rebuild the original to compare with")
    model = build_model(name, **(desc.get("model_args") or {}))
    return model.eval(), f"unpruned {name} architecture (untrained weights; latency does not depend on them)"


def bench_dir(directory: str | Path, *, threads: int = 1, batch: int = DEFAULT_BATCH, runs: int = 30,
              warmup: int = 5, engines: tuple[str, ...] = ("onnxruntime", "torch"),
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time original vs pruned model of ``directory``; write latency.json and update report.json."""

    directory = Path(directory)
    if "onnxruntime" in engines:
        require("onnx", "onnxruntime")
    pruned, desc = load_model(directory)
    shape = _input_shape(desc, directory / "model.json")
    original, which = original_model(directory, desc)

    x = torch.zeros(1, *shape)
    macs_before, macs_after = count(original, x).macs, count(pruned, x).macs
    batches = (1,) if batch == 1 else (1, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = benchmark([original, pruned], shape, threads=threads, batches=batches, runs=runs,
                            warmup=warmup, engines=engines)
    keys = latency_report(timings, macs_before, macs_after, threads, runs)
    details = {**keys, "original": which, "macs": {"before": macs_before, "after": macs_after},
               "input_shape": list(shape), "warmup": warmup,
               "timings": [{"engine": e, "batch": b, "before": s[0], "after": s[1]} for (e, b), s in timings.items()]}
    atomic_write_json(directory / "latency.json", details)
    report_path = directory / "report.json"
    report = read_json(report_path) if report_path.exists() else {}
    atomic_write_json(report_path, {**report, **keys})
    if log:
        _print_rows(keys, log)
    return keys


def _print_rows(keys: dict, log: Callable[[str], None]) -> None:
    lat = keys["latency"]
    load = lat.get("load_average")
    log(f"latency, median (inter-quartile range) of at least {lat['runs']} interleaved runs with {lat['threads']} "
        f"thread(s) on {lat['machine']}" + (f", 1-minute load average {load:.2f}:" if load is not None else ":"))
    log(f"  {'engine':12s} {'batch':>5s} {'before ms':>16s} {'after ms':>16s} {'speed-up':>9s} {'95 % interval':>13s}")
    for r in lat["rows"]:
        middle = f"{r['speedup_low']:.2f}-{r['speedup_high']:.2f}x" if "speedup_low" in r else ""
        flag = "  unstable" if r.get("stable") is False else ""
        log(f"  {r['engine']:12s} {r['batch']:5d} {r['before_ms']:8.3f} ({r['before_spread_ms']:5.2f}) "
            f"{r['after_ms']:8.3f} ({r['after_spread_ms']:5.2f}) {r['speedup']:8.2f}x {middle:>13s}{flag}")
    s = keys["speedup"]
    log(f"measured speed-up {s['measured']:.2f}x (onnxruntime, batch 1) vs MAC speed-up {s['macs']:.2f}x: "
        f"ratio {s['ratio']:.2f}" + ("" if lat.get("stable", True) else " (unstable timings: see the warning)"))


# ---- export -----------------------------------------------------------------------------------------

def cmd_export(args) -> int:
    if not args.onnx:
        raise SimpruneError("choose an export format: --onnx (the only one so far)")
    require("onnx", "onnxruntime")
    directory = Path(args.directory)
    model, desc = load_model(directory)
    shape = _input_shape(desc, directory / "model.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_onnx(model, _example(shape), directory / "model.onnx", opset=args.opset,
                             dynamic_batch=not args.static_batch)
    if result["notice"]:
        print(f"notice: {result['notice']}")
    print(f"wrote {result['path']} (opset {result['opset']}, {result['exporter']} exporter, {result['bytes']:,} bytes); "
          f"onnxruntime matches PyTorch within {result['max_abs_diff']:.2g}")
    return 0


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a saved model to ONNX, verified in onnxruntime")
    p.add_argument("directory", metavar="DIR", help="a model directory (model.safetensors + model.json)")
    p.add_argument("--onnx", action="store_true", help="write DIR/model.onnx")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset, 17 or newer (default 18; 17 comes from the legacy exporter)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis to 2 instead of a dynamic one")
    p.set_defaults(fn=cmd_export)


# ---- bench --------------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    engines = tuple(args.engine or ("onnxruntime", "torch"))
    bench_dir(args.directory, threads=args.threads, batch=args.batch, runs=args.runs, warmup=args.warmup,
              engines=engines, log=print)
    print(f"wrote {args.directory}/latency.json and the latency keys of report.json")
    return 0


def _timing_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive, default=1, help="intra-op threads for both engines (default 1)")


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="latency of the original vs the pruned model (onnxruntime and PyTorch)")
    p.add_argument("directory", metavar="DIR", help="a pruned model directory")
    _timing_options(p)
    p.add_argument("--batch", type=positive, default=DEFAULT_BATCH, help="the larger batch size (batch 1 always)")
    p.add_argument("--runs", type=positive, default=30, help="timed runs per setting (at least 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    p.add_argument("--engine", action="append", choices=["onnxruntime", "torch"],
                   help="time only this engine (repeatable; default both)")
    p.set_defaults(fn=cmd_bench)


# ---- prune: --target-latency and the latency step ----------------------------------------------------------

def add_prune_latency_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-latency", type=float, default=None,
                   help="fraction of onnxruntime batch-1 latency to remove, measured on this machine")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                   help="time original vs pruned at the end (default: on when onnxruntime is installed)")
    _timing_options(p)


def prune_latency_target(args, model, example, criterion, ratio: float, *, calibration, guards,
                         prune_options: dict) -> tuple[Any, dict]:
    """`simprune prune --target-latency R`: one-shot pruning to a measured latency reduction."""

    if getattr(args, "schedule", "oneshot") != "oneshot" or getattr(args, "finetune_epochs", None) \
            or getattr(args, "epochs_between", None):
        raise SimpruneError("--target-latency prunes one-shot; drop --schedule/--finetune-epochs (fine-tune the "
                            "result with `simprune finetune`)")
    if guards.round_to == 1:  # channels inside a vector block cost the same time: remove whole blocks
        guards = Guards(guards.min_channels, guards.max_layer_ratio, vector_block())
        print(f"notice: --target-latency keeps channel counts in multiples of {guards.round_to} (onnxruntime's vector "
              "block on this CPU); pass --round-to N (N > 1) to choose another")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = prune_to_latency(model, example, criterion, ratio, threads=args.threads,
                                          calibration=calibration, guards=guards, log=print, **prune_options)
    t = report["latency_target"]
    print(f"latency table: {t['table']['layers']} layers ({t['table']['configs']} distinct, {t['table']['points']} "
          f"widths) timed in {t['table']['seconds']:.1f} s")
    print(f"latency removed: {t['achieved']:.1%} measured (target {ratio:.1%} +- {t['tolerance']:.0%}"
          f"{'' if t['met'] else ', NOT met: closest result kept'}) after {len(t['iterations'])} iteration(s)")
    return pruned, report


def check_latency_options(args) -> None:
    """Fail early (before pruning) when latency was asked for and onnx/onnxruntime are missing."""
    if args.latency or args.target_latency is not None:
        require("onnx", "onnxruntime")


def latency_step(args, out: Path) -> None:
    """The latency step at the end of `simprune prune` (skipped with a notice without onnxruntime)."""
    if args.latency is False:
        return
    if not onnxruntime_available():
        print("notice: onnxruntime not installed, latency not measured (pip install 'simprune[onnx]')")
        return
    bench_dir(out, threads=args.threads, log=print)
