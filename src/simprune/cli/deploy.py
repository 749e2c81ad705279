"""`simprune export` and `simprune bench`, and the latency/int8 steps and latency target of `simprune prune`.

``export DIR --onnx`` writes ``DIR/model.onnx``, verified in onnxruntime; ``--int8`` writes
``DIR/model.int8.onnx`` (onnxruntime static quantization calibrated on the images the pruning
used, checked against float32 on the test set). ``bench DIR`` times the original and the pruned
model (onnxruntime and PyTorch eager, batch 1 and a larger batch; the int8 file in onnxruntime
too, interleaved with them) and writes ``DIR/latency.json`` and the ``latency_ms``/``speedup``/
``latency``/``size_mib`` keys of ``DIR/report.json``. The original is the recorded ``pruning.source`` checkpoint when it still
exists, else the unpruned architecture (latency does not depend on the weights' values).
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from simprune import api
from simprune.allocation.allocator import Guards
from simprune.allocation.rounding import vector_block
from simprune.calibrate.calibration import calibration_loader
from simprune.calibrate.sensitivity import is_logits, output_tensors
from simprune.cli.common import builder_option, data_options, load_saved, positive
from simprune.errors import SimpruneError
from simprune.export.latency import benchmark, export_for_timing, latency_report
from simprune.export.onnx import export_onnx, require
from simprune.export.quantize import EVAL_BATCH, INT8_FILE, MAX_DROP, quantize_int8
from simprune.graph.counting import count
from simprune.io.data import load_dataset
from simprune.io.files import atomic_write_json, read_json
from simprune.io.images import Preprocess, is_image_source, labelled_images
from simprune.models import build_model
from simprune.schedules.kinds import ToLatency
from simprune.verify.reports import refresh_prune_report

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


def original_model(directory: Path, desc: dict, builder: str | None = None) -> tuple[Any, str]:
    """The model ``directory`` was pruned from, and a phrase saying which one it is (``builder``: --model)."""

    source = (desc.get("pruning") or {}).get("source") or ""
    if source and Path(source).exists():
        model, _ = load_saved(source, builder)
        return model, f"checkpoint {source}"
    name = desc.get("model") or builder
    if not isinstance(name, str):
        raise SimpruneError(f"{directory}/model.json names no model; cannot rebuild the original to compare with")
    model = build_model(name, **(desc.get("model_args") or {}))
    return model.eval(), f"unpruned {name} architecture (untrained weights; latency does not depend on them)"


def bench_dir(directory: str | Path, *, threads: int = 1, batch: int = DEFAULT_BATCH, runs: int = 30,
              warmup: int = 5, engines: tuple[str, ...] = ("onnxruntime", "torch"), int8: bool | None = None,
              log: Callable[[str], None] | None = None, model: str | None = None) -> dict[str, Any]:
    """Time original vs pruned model of ``directory`` (and its int8 file: ``int8`` True, or None when it
    exists); write latency.json and update report.json. ``model``: the builder that made it (--model)."""
    directory = Path(directory)
    int8_file = directory / INT8_FILE
    if int8 and not int8_file.exists():
        raise SimpruneError(f"{int8_file} does not exist; run `simprune export {directory} --int8` first")
    int8 = "onnxruntime" in engines and int8_file.exists() and int8 is not False
    if "onnxruntime" in engines:
        require("onnx", "onnxruntime")
    pruned, desc = load_saved(directory, model)
    shape = _input_shape(desc, directory / "model.json")
    original, which = original_model(directory, desc, model)

    x = torch.zeros(1, *shape)
    macs_before, macs_after = count(original, x).macs, count(pruned, x).macs
    batches = (1,) if batch == 1 else (1, batch)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="simprune-bench-") as tmp:
        warnings.simplefilter("ignore")
        files = export_for_timing([original, pruned], shape, tmp) if "onnxruntime" in engines else []
        files += [int8_file] if int8 else []
        sizes = {k: f.stat().st_size / 2**20 for k, f in zip(("original", "pruned", "int8"), files)}
        timings = benchmark([original, pruned], shape, threads=threads, batches=batches, runs=runs,
                            warmup=warmup, engines=engines, onnx_files=files or None)
    keys = latency_report(timings, macs_before, macs_after, threads, runs)
    if sizes:
        keys["size_mib"] = sizes  # the ONNX files onnxruntime timed
    details = {**keys, "original": which, "macs": {"before": macs_before, "after": macs_after},
               "input_shape": list(shape), "warmup": warmup,
               "timings": [{"engine": e, "batch": b, "before": s[0], "after": s[1], **({"int8": s[2]} if s[2:] else {})}
                           for (e, b), s in timings.items()]}
    atomic_write_json(directory / "latency.json", details)
    report_path = directory / "report.json"
    report = read_json(report_path) if report_path.exists() else {}
    atomic_write_json(report_path, {**{k: v for k, v in report.items() if k != "size_mib"}, **keys})
    if log:
        _print_rows(keys, log)
    return keys


def _print_rows(keys: dict, log: Callable[[str], None]) -> None:
    lat = keys["latency"]
    load = lat.get("load_average")
    int8 = any("int8_ms" in r for r in lat["rows"])
    log(f"latency, median (inter-quartile range) of at least {lat['runs']} interleaved runs with {lat['threads']} "
        f"thread(s) on {lat['machine']}" + (f", 1-minute load average {load:.2f}:" if load is not None else ":"))
    log(f"  {'engine':12s} {'batch':>5s} {'before ms':>16s} {'after ms':>16s} {'speed-up':>9s} {'95 % interval':>13s}"
        + (f" {'int8 ms':>9s} {'speed-up':>9s}" if int8 else ""))
    for r in lat["rows"]:
        middle = f"{r['speedup_low']:.2f}-{r['speedup_high']:.2f}x" if "speedup_low" in r else ""
        flag = "  unstable" if r.get("stable") is False else ""
        log(f"  {r['engine']:12s} {r['batch']:5d} {r['before_ms']:8.3f} ({r['before_spread_ms']:5.2f}) "
            f"{r['after_ms']:8.3f} ({r['after_spread_ms']:5.2f}) {r['speedup']:8.2f}x {middle:>13s}"
            + (f" {r['int8_ms']:9.3f} {r['int8_speedup']:8.2f}x" if "int8_ms" in r else "") + flag)
    s = keys["speedup"]
    log(f"measured speed-up {s['measured']:.2f}x (onnxruntime, batch 1) vs MAC speed-up {s['macs']:.2f}x: "
        f"ratio {s['ratio']:.2f}" + (f"; int8 {s['int8']:.2f}x" if "int8" in s else "")
        + ("" if lat.get("stable", True) else " (unstable timings: see the warning)"))
    if keys.get("size_mib"):
        log("ONNX file size: " + ", ".join(f"{k} {v:.2f} MiB" for k, v in keys["size_mib"].items()))


# ---- export -----------------------------------------------------------------------------------------

def calibration_record(name: str | None, images: int, seed: int, pad_to: int | None,
                       data_dir: str | None, preprocess: Preprocess | None = None) -> dict | None:
    """model.json's ``calibration``: what rebuilds the calibration images a model was pruned with (for one's
    own images, their folder and preprocessing)."""
    if not name:
        return None
    own = is_image_source(name)
    return {"data": _absolute_source(name) if own else name, "images": images,
            "seed": seed, "pad_to": pad_to, **({"data_dir": str(data_dir)} if data_dir else {}),
            **({"preprocess": (preprocess or Preprocess()).describe()} if own else {})}


def _absolute_source(source: str) -> str:
    """A folder or ``PATH.csv[:SPLIT]`` with an absolute path, so a later command run elsewhere finds it."""
    path, csv, split = source.partition(".csv")
    return str(Path(path + csv).resolve()) + split if csv else str(Path(source).resolve())


def recorded_preprocess(record: dict) -> Preprocess | None:
    """The Preprocess a calibration record names (None for a named data set)."""
    pre = record.get("preprocess")
    return Preprocess.from_dict(pre) if pre else None


def int8_dir(directory: str | Path, *, calibration: dict | None = None, data: str | None = None,
             data_dir: str | None = None, pad_to: int | None = None, eval_images: int | None = None,
             threads: int = 1, max_drop: float | None = None, log: Callable[[str], None] | None = None,
             model: str | None = None) -> dict[str, Any]:
    """Write ``DIR/model.int8.onnx``, calibrated on the images ``DIR/model.json`` records (or ``calibration``)
    and checked against float32 on the test split of ``data`` (else the model's, else the calibration's
    data set); adds the ``int8`` key to report.json."""
    directory, builder = Path(directory), model
    model, desc = load_saved(directory, builder)
    shape = _input_shape(desc, directory / "model.json")
    source = calibration or desc.get("calibration")
    if not source:
        raise SimpruneError(f"{directory}/model.json records no calibration images (pruned without --calib-data); "
                            "pass --calib-data NAME")
    pre = recorded_preprocess(source)
    calib = calibration_loader(source["data"], source.get("images", 640), data_dir=source.get("data_dir", data_dir),
                               pad_to=source.get("pad_to"), seed=source.get("seed", 0), preprocess=pre)
    trained_on = desc.get("data") or {}
    name = data or trained_on.get("name") or source["data"]
    classifier = _is_classifier(model, shape)
    unlabelled = name == source["data"] and is_image_source(name) and not str(name).lower().partition(".csv")[1]
    if not data and unlabelled and classifier:
        raise SimpruneError(f"the calibration images {name} have no labels to check the int8 file on; pass --data "
                            "DIR (CLASS/*.jpg folders) or --data PATH.csv:SPLIT")
    if not data and unlabelled:
        evaluation = calib  # not a classifier: int8's outputs are checked against float32's, no labels needed
    else:
        if is_image_source(name):
            test = labelled_images(name, pre or Preprocess())
        else:
            test = load_dataset(name, "test", data_dir, pad_to if pad_to is not None else
                                trained_on.get("pad_to", source.get("pad_to")))
        if eval_images:
            test = Subset(test, range(min(eval_images, len(test))))
        evaluation = DataLoader(test, batch_size=EVAL_BATCH)
    original, which = original_model(directory, desc, builder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize_int8(model, _example(shape)[:1], calib, evaluation,
                               directory / INT8_FILE, threads=threads, max_drop=MAX_DROP if max_drop is None else max_drop,
                               original=original if which.startswith("checkpoint") else None)
    result = {**result, "path": INT8_FILE, "calibration": source, "data": name}
    report_path = directory / "report.json"
    report = read_json(report_path) if report_path.exists() else {}
    atomic_write_json(report_path, {**report, "int8": result})
    if log:
        log(_int8_line(directory, result, source["data"], name))
    return result


def _int8_line(directory: Path, result: dict, calibrated_on: str, checked_on: str) -> str:
    """One line on the int8 file written: sizes, calibration, and the check it passed."""
    line = (f"wrote {directory / INT8_FILE} ({result['bytes'] / 2**20:.2f} MiB, float32 {result['fp32_bytes'] / 2**20:.2f} "
            f"MiB; {result['calibration_images']} calibration images of {calibrated_on}); ")
    if result.get("output_error") is not None:
        return line + (f"outputs against float32 on {result['images']} images of {checked_on}: squared error "
                       f"{result['output_error']:.4f} of their image-to-image spread (tolerance "
                       f"{result['tolerance']['max_output_error']:g})")
    tolerance = result["tolerance"]
    return line + (f"top-1 on {result['images']} test images of {checked_on}: "
                   + ("" if result["original_top1"] is None else f"original float32 {result['original_top1']:.2f} %, ")
                   + ("" if result["fp32_top1"] is None else
                      f"float32 {result['fp32_top1']:.2f} %, int8 {result['int8_top1']:.2f} % ")
                   + f"(agreement {result['agreement']:.1f} %, tolerance "
                   + (f"{tolerance['max_drop']:.1f} points)" if "max_drop" in tolerance else
                      f"{tolerance['min_agreement']:g} % agreement)"))


def _is_classifier(model: nn.Module, shape) -> bool:
    """Whether ``model`` returns one (batch, classes) tensor on an example input (checked by top-1)."""
    with torch.no_grad():
        return is_logits(output_tensors(model.eval()(_example(shape)[:1])))


def cmd_export(args) -> int:
    if not (args.onnx or args.int8):
        raise SimpruneError("choose an export format: --onnx and/or --int8")
    require("onnx", "onnxruntime")
    directory = Path(args.directory)
    model, desc = load_saved(directory, args.model)
    shape = _input_shape(desc, directory / "model.json")
    if args.onnx:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = export_onnx(model, _example(shape), directory / "model.onnx", opset=args.opset,
                                 dynamic_batch=not args.static_batch)
        if result["notice"]:
            print(f"notice: {result['notice']}")
        print(f"wrote {result['path']} (opset {result['opset']}, {result['exporter']} exporter, "
              f"{result['bytes']:,} bytes); onnxruntime matches PyTorch within {result['max_abs_diff']:.2g}")
    if args.int8:
        pad_to = args.pad_to if args.pad_to is not None else (desc.get("data") or {}).get("pad_to")
        recorded = recorded_preprocess(desc.get("calibration") or {})  # the model's own input size and scaling
        int8_dir(directory, calibration=calibration_record(args.calib_data, args.calib_images, args.seed, pad_to,
                                                           args.data_dir, recorded),
                 data=args.data, data_dir=args.data_dir, pad_to=args.pad_to, eval_images=args.eval_images,
                 threads=args.threads, max_drop=args.int8_max_drop, log=print, model=args.model)
        _refresh_report(directory)
    return 0


def _refresh_report(directory: Path) -> bool:
    """Render report.md/html again when the folder holds a pruning report (new int8 or latency keys)."""
    if (directory / "report.json").exists() and "reduction" in read_json(directory / "report.json"):
        refresh_prune_report(directory)
        return True
    return False


def add_int8_options(p: argparse.ArgumentParser) -> None:
    """The int8 check's tolerance (shared by export and prune)."""
    p.add_argument("--int8-max-drop", type=float, default=None, metavar="POINTS",
                   help="refuse the int8 file when its top-1 is more than this many points below float32's "
                        "(default 1.0)")


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a saved model to ONNX (float32 or int8), verified in onnxruntime")
    p.add_argument("directory", metavar="DIR", help="a model directory (model.safetensors + model.json)")
    p.add_argument("--onnx", action="store_true", help="write DIR/model.onnx")
    p.add_argument("--int8", action="store_true",
                   help="write DIR/model.int8.onnx: onnxruntime static int8 quantization, calibrated on the images "
                        "the pruning used, checked against float32 on the test set")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset, 17 or newer (default 18; 17 comes from the legacy exporter)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis to 2 instead of a dynamic one")
    p.add_argument("--calib-data", default=None,
                   help="--int8: calibration data set (default: the one recorded when the model was pruned)")
    p.add_argument("--calib-images", type=positive, default=640, help="with --calib-data")
    p.add_argument("--seed", type=int, default=0, help="with --calib-data: which images")
    data_options(p, required=False)
    p.add_argument("--eval-images", type=positive, default=None, help="--int8: check on the first N test images only")
    add_int8_options(p)
    _timing_options(p)
    builder_option(p)
    p.set_defaults(fn=cmd_export)


# ---- bench --------------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    engines = tuple(args.engine or ("onnxruntime", "torch"))
    bench_dir(args.directory, threads=args.threads, batch=args.batch, runs=args.runs, warmup=args.warmup,
              engines=engines, int8=args.int8, log=print, model=args.model)
    rendered = _refresh_report(Path(args.directory))
    print(f"wrote {args.directory}/latency.json and the latency keys of report.json"
          + (" (report.md and report.html updated)" if rendered else ""))
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
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=None,
                   help="time DIR/model.int8.onnx too, in onnxruntime (default: when it exists; see `simprune export "
                        "--int8`)")
    builder_option(p)
    p.set_defaults(fn=cmd_bench)


# ---- prune: --target-latency and the latency step ----------------------------------------------------------

def add_prune_latency_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-latency", type=float, default=None,
                   help="fraction of onnxruntime batch-1 latency to remove, measured on this machine")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                   help="time original vs pruned at the end (default: on when onnxruntime is installed)")
    _timing_options(p)
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx (onnxruntime static int8, calibrated on --calib-data, checked "
                        "against float32 on the test set) and time it")
    add_int8_options(p)


def prune_latency_target(args, model, example, criterion, ratio: float, *, calibration, selection,
                         repair) -> tuple[Any, dict]:
    """`simprune prune --target-latency R`: one-shot pruning to a measured latency reduction."""
    guards = selection.guards

    if getattr(args, "schedule", "oneshot") != "oneshot" or getattr(args, "finetune_epochs", None) \
            or getattr(args, "epochs_between", None):
        raise SimpruneError("--target-latency prunes one-shot; drop --schedule/--finetune-epochs (fine-tune the "
                            "result with `simprune finetune`)")
    if guards.round_to == 1:  # channels inside a vector block cost the same time: remove whole blocks
        guards = Guards(guards.min_channels, guards.max_layer_ratio, vector_block())
        print(f"notice: --target-latency keeps channel counts in multiples of {guards.round_to} (onnxruntime's vector "
              "block on this CPU); pass --round-to N (N > 1) to choose another")
        selection = selection.replace(guards=guards)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = api.prune(model, example, criterion, {"latency": ratio}, calibration=calibration,
                                   selection=selection, repair=repair, inplace=True,
                                   schedule=ToLatency(threads=args.threads, log=print))
    t = report["latency_target"]
    print(f"latency table: {t['table']['layers']} layers ({t['table']['configs']} distinct, {t['table']['points']} "
          f"widths) timed in {t['table']['seconds']:.1f} s")
    print(f"latency removed: {t['achieved']:.1%} measured (target {ratio:.1%} +- {t['tolerance']:.0%}"
          f"{'' if t['met'] else ', NOT met: closest result kept'}) after {len(t['iterations'])} iteration(s)")
    return pruned, report


def check_latency_options(args) -> None:
    """Fail early (before pruning) when latency or int8 was asked for and onnx/onnxruntime (or, for int8,
    calibration images) are missing."""
    if args.int8 and not args.calib_data:
        raise SimpruneError("--int8 calibrates on the pruning's calibration images; pass --calib-data NAME")
    if args.latency or args.target_latency is not None or args.int8:
        require("onnx", "onnxruntime")


def int8_step(args, out: Path) -> None:
    """`simprune prune --int8`: the int8 file, calibrated on the images the pruning used (model.json's record)."""
    if not args.int8:
        return
    try:
        int8_dir(out, data=args.data, data_dir=args.data_dir, pad_to=args.pad_to, eval_images=args.eval_images,
                 threads=args.threads, max_drop=args.int8_max_drop, log=print)
    except SimpruneError as exc:
        raise SimpruneError(f"{exc} (the pruned float32 model is in {out})") from exc


def latency_step(args, out: Path) -> None:
    """The latency step at the end of `simprune prune` (skipped with a notice without onnxruntime)."""
    if args.latency is False:
        return
    if not onnxruntime_available():
        print("notice: onnxruntime not installed, latency not measured (pip install 'simprune[onnx]')")
        return
    bench_dir(out, threads=args.threads, log=print)
