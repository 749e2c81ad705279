"""`simprune compare`: criteria x targets in one run, with results tables, plot and report."""
from __future__ import annotations

import argparse
import re
import time
import warnings
from pathlib import Path

import torch

from simprune.allocation.allocator import Guards
from simprune.allocation.selection import Selection
from simprune.calibrate.calibration import calibration_loader
from simprune.cli.common import (
    check_compatible,
    command_line,
    data_options,
    device_option,
    load_or_build,
    model_options,
    positive,
    warn_if_random,
)
from simprune.errors import SimpruneError
from simprune.export.latency import benchmark
from simprune.export.onnx import require
from simprune.graph.removal import get_structure
from simprune.io.data import load_dataset
from simprune.io.files import atomic_output_dir, atomic_write_json, read_json, resolve_model_path, save_model
from simprune.train.loop import evaluate
from simprune.verify.compare import (
    COMPENSATIONS,
    Grid,
    parse_choices,
    parse_fractions,
    parse_specs,
    pivot_table,
    run_grid,
    schedule_options,
    write_results,
)
from simprune.verify.reports import environment_versions
from simprune.verify.tables import markdown_table


def add_compare_parser(sub) -> None:
    """Register ``simprune compare`` on the CLI's sub-parsers."""

    p = sub.add_parser("compare", help="criteria x targets on one model: table, CSV, JSON, plot, report")

    device_option(p)
    model_options(p, required=False)
    p.add_argument("--checkpoint", help="trained model directory (its JSON names the architecture and data)")
    p.add_argument("--input", default=None, help="input shape CxHxW (default: the checkpoint's, else the data's)")
    data_options(p, required=False)
    p.add_argument("--calib-data", default=None, help="calibration data set (default: --data)")
    p.add_argument("--calib-images", type=positive, default=640)
    p.add_argument("--criteria", default="qsfm,l1,random",
                   help="comma-separated; NAME:METRIC sets a similarity metric, e.g. qsfm:cosine; auto: the "
                        "library's default (refit-error or tp:l2, chosen per target on held-aside images)")
    p.add_argument("--targets", default="0.3,0.5,0.7", help="comma-separated fractions to remove")
    p.add_argument("--target-kind", choices=["flops", "params"], default="flops")
    p.add_argument("--compensate", default="default",
                   help=f"comma-separated, for criteria that compensate: {', '.join(COMPENSATIONS)}")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="refit the layers to reproduce the unpruned model's outputs after every prune (default: "
                        "on, except for rows of an explicit --compensate lstsq/twin fold)")
    p.add_argument("--schedules", default="oneshot",
                   help="comma-separated: oneshot, iterative[:STEPS] (re-scored steps, no fine-tuning between)")
    p.add_argument("--protect-uncompensable", action=argparse.BooleanOptionalAction, default=True,
                   help="leave groups read by parameter-free layers whole for every criterion (default: on)")
    p.add_argument("--round-to", type=positive, default=1, help="keep channel counts multiples of this")
    p.add_argument("--eval-images", type=positive, default=None, help="evaluate on the first N test images only")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--keep-models", action=argparse.BooleanOptionalAction, default=True,
                   help="write every pruned model to OUT/models/LABEL-TARGET/ (default: on)")
    p.add_argument("--latency", action="store_true",
                   help="also time the unpruned and every pruned model in onnxruntime (batch 1, interleaved)")
    p.add_argument("--threads", type=positive, default=1, help="intra-op threads for --latency (default 1)")
    p.add_argument("--quiet", action="store_true", help="no stage messages or progress")
    p.set_defaults(fn=cmd_compare)


def model_folder(row: dict) -> str:
    """``models/qsfm-ssim-0.5``: where a compare run's pruned model is kept."""
    safe = re.sub(r"[^A-Za-z0-9._]+", "-", row["label"]).strip("-")
    return f"models/{safe}-{row['target']:g}"


def _keep(tmp: Path, run: dict, desc: dict, shape, source: str) -> None:
    """Write one pruned model (model.safetensors, model.json, report.json) under ``tmp/models/``."""
    folder = tmp / model_folder(run["row"])
    folder.mkdir(parents=True)
    pruning = {"criterion": run["row"]["criterion"], "target": run["report"]["target"], "source": source}
    save_model(folder, run["model"], {**{k: v for k, v in desc.items() if k in ("model", "model_args", "data")},
                                      "input_shape": list(shape), "pruning": pruning,
                                      "structure": get_structure(run["model"])})
    atomic_write_json(folder / "report.json", run["report"])


def _time_models(baseline, runs: list[dict], shape, threads: int) -> dict:
    """onnxruntime batch-1 latency of the unpruned and every pruned model, interleaved; adds the figures to rows."""
    require("onnx", "onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = benchmark([baseline] + [r["model"] for r in runs], shape, threads=threads, batches=(1,),
                          engines=("onnxruntime",))[("onnxruntime", 1)]
    for run, s in zip(runs, stats[1:]):
        run["row"].update({"latency_ms": s["median_ms"], "latency_iqr_ms": s["iqr_ms"],
                           "speedup": s["vs_first"]["speedup"], "speedup_stable": s["vs_first"]["stable"]})
    return stats[0]


def _grid_options(args) -> tuple[list, list[float], list, list[str]]:
    """Criteria specs, targets, compensations and schedules from the flags, each checked."""
    specs = parse_specs(args.criteria)
    targets = parse_fractions(args.targets, "--targets")
    compensations = parse_choices(args.compensate, COMPENSATIONS, "--compensate")
    schedules = list(dict.fromkeys(t.strip() for t in args.schedules.split(",") if t.strip())) or ["oneshot"]
    for schedule in schedules:
        schedule_options(schedule)
    return specs, targets, compensations, schedules


def _print_summary(args, rows: list[dict], base_top1: float, test_images: int, data: str,
                   baseline_latency: dict | None) -> None:
    header, body = pivot_table(rows, args.target_kind)
    print(f"unpruned top-1 {base_top1:.2f} % on {test_images} {data} test images")
    print(markdown_table(header, body))
    if baseline_latency:
        print(f"\nonnxruntime batch 1, {args.threads} thread(s): unpruned {baseline_latency['median_ms']:.3f} ms")
        print(markdown_table(["run", "target", "ms (IQR)", "speed-up"], [
            [r["label"], f"{r['target']:g}", f"{r['latency_ms']:.3f} ({r['latency_iqr_ms']:.2f})",
             f"{r['speedup']:.2f}x" + ("" if r["speedup_stable"] else " (unstable)")] for r in rows]))
    kept = f", models/ ({len(rows)} pruned models)" if args.keep_models else ""
    print(f"wrote {args.out}/results.md, results.csv, results.json, accuracy_vs_flops.png, report.html{kept}")


def cmd_compare(args) -> int:
    t_start = time.perf_counter()
    specs, targets, compensations, schedules = _grid_options(args)
    ckpt_data = (read_json(resolve_model_path(args.checkpoint)[1]).get("data") or {}) if args.checkpoint else {}
    data = args.data or ckpt_data.get("name")
    if not data:
        raise SimpruneError("pass --data NAME (the evaluation data set; the checkpoint records none)")
    pad_to = args.pad_to if args.pad_to is not None else ckpt_data.get("pad_to")
    calib_data = args.calib_data or data
    with atomic_output_dir(Path(args.out), overwrite=args.overwrite) as tmp:
        test = load_dataset(data, "test", args.data_dir, pad_to)
        image_shape = tuple(test[0][0].shape)
        model, desc, shape = load_or_build(args, args.input or (None if args.checkpoint else
                                                                 "x".join(map(str, image_shape))))
        if tuple(shape) != image_shape:
            raise SimpruneError(f"{data} images are {'x'.join(map(str, image_shape))} but the model takes "
                                f"{'x'.join(map(str, shape))}; pass --pad-to / --input or other --data")
        check_compatible(model, desc, test)
        if args.eval_images:
            test = torch.utils.data.Subset(test, range(min(args.eval_images, len(test))))
        calibration = calibration_loader(calib_data, args.calib_images, data_dir=args.data_dir, pad_to=pad_to,
                                         seed=args.seed)
        base_top1 = evaluate(model, test, device=args.device)["top1"]
        chart_target = min(targets, key=lambda t: abs(t - 0.5))
        rows, layers, runs = [], {}, []
        for run in run_grid(model, torch.zeros(1, *shape), specs, targets, calibration=calibration, test=test,
                            base_top1=base_top1, progress=True, selection=Selection(guards=Guards(round_to=args.round_to)),
                            grid=Grid(args.target_kind, tuple(compensations), tuple(schedules), (args.reconstruct,),
                                      args.protect_uncompensable, args.device)):
            rows.append(run["row"])
            if run["row"]["target"] == chart_target:
                layers[run["row"]["label"]] = run["report"]["layers"]
            if args.keep_models:
                _keep(tmp, run, desc, shape, str(args.checkpoint or ""))
                run["row"]["model_dir"] = model_folder(run["row"])
            if args.latency:
                runs.append({"row": run["row"], "model": run["model"]})
        baseline_latency = _time_models(model, runs, shape, args.threads) if runs else None
        result = {"kind": "compare", "model": desc.get("model"), "checkpoint": args.checkpoint, "data": data,
                  "test_images": len(test), "input_shape": list(shape),
                  "calibration": {"data": calib_data, "images": len(calibration.dataset), "seed": args.seed},
                  "target_kind": args.target_kind, "targets": targets, "round_to": args.round_to,
                  "baseline_top1": base_top1, "rows": rows, "weights": desc.get("weights"),
                  "baseline_latency_ms": baseline_latency and baseline_latency["median_ms"],
                  "layers": layers if len(layers) <= 10 else {},
                  "layers_title": f"Channels per layer at {100 * chart_target:.0f} % of "
                                  f"{'MACs' if args.target_kind == 'flops' else 'parameters'} removed",
                  "layers_caption": "output channels of every layer before (grey bars) and kept by each "
                                    "criterion (lines)",
                  "command": command_line(), "versions": environment_versions(),
                  "seconds": time.perf_counter() - t_start}
        write_results(tmp, result)
    warn_if_random(args)
    _print_summary(args, rows, base_top1, len(test), data, baseline_latency)
    return 0
