"""``simprune compare``: criteria x targets (x compensations, x schedules) on one model and data set.

Every run stands on the same footing: the same seeded calibration images, groups that cannot be
compensated (read by a parameter-free layer) left whole, BatchNorm statistics re-estimated on the
calibration images, no fine-tuning. A criterion's scores are computed once and reused for every
one-shot target (the statistics pass is the costly part). Writes results.md / .csv / .json,
accuracy_vs_flops.png (one line per criterion, the unpruned model dashed) and report.md / .html.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from simprune.errors import SimpruneError
from simprune.verify.reports import markdown_table

COMPENSATIONS = ("default", "lstsq", "twin", "none")
COLUMNS = ["label", "criterion", "compensated", "schedule", "target", "flops_removed", "params_removed", "macs",
           "params", "top1", "change", "score_s", "seconds"]


@dataclass(frozen=True)
class Spec:
    """One criterion to compare: its label in tables, registry name and options."""

    label: str
    name: str
    options: dict = field(default_factory=dict)


def parse_specs(text: str) -> list[Spec]:
    """``"qsfm,qsfm:cosine,l1,tp:lamp"`` -> specs; ``NAME:METRIC`` sets the criterion's similarity metric
    unless the whole item is a criterion's name (``tp:lamp``)."""
    from simprune.criteria import available_criteria, get_criterion  # noqa: PLC0415

    specs, names = [], available_criteria()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, metric = item.partition(":")
        if item in names:  # a name with a colon, e.g. tp:lamp
            name, metric = item, ""
        options = {"similarity": metric} if metric else {}
        get_criterion(name, **options)  # unknown names and options fail here, before any work
        specs.append(Spec(item, name, options))
    labels = [s.label for s in specs]
    if not specs or len(set(labels)) != len(labels):
        raise SimpruneError(f"--criteria {text!r} must name distinct criteria, e.g. qsfm,l1,random")
    return specs


def parse_fractions(text: str, flag: str) -> list[float]:
    """``"0.3,0.5"`` -> [0.3, 0.5]: distinct fractions in (0, 1), sorted."""
    try:
        values = sorted({float(t) for t in text.split(",") if t.strip()})
    except ValueError as exc:
        raise SimpruneError(f"{flag} {text!r} must be comma-separated fractions, e.g. 0.3,0.5,0.7") from exc
    if not values or not all(0 < v < 1 for v in values):
        raise SimpruneError(f"{flag} {text!r} must be fractions to remove in (0, 1), e.g. 0.3,0.5,0.7")
    return values


def parse_choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in items if t not in allowed]
    if not items or bad:
        raise SimpruneError(f"{flag} {text!r}: choose from {', '.join(allowed)} (comma-separated)")
    return items


def _modes(crit, requested: list[str]) -> list:
    """api.prune ``compensate`` values to run: the requested modes where the criterion can compensate,
    else one run without compensation."""
    if not getattr(crit, "compensate_by_default", False):
        return [False]
    return list(dict.fromkeys(None if m == "default" else False if m == "none" else m for m in requested))


def schedule_options(schedule: str) -> dict:
    """api.prune options of a schedule: ``oneshot``, or ``iterative[:STEPS]`` (default 5 re-scored steps)."""
    name, _, steps = schedule.partition(":")
    if name == "oneshot" and not steps:
        return {}
    if name == "iterative":
        if steps and not (steps.isdigit() and int(steps) >= 1):
            raise SimpruneError(f"schedule {schedule!r}: give the steps as a positive integer, e.g. iterative:5")
        return {"schedule": "iterative", "steps": int(steps or 5)}
    if name == "soft":
        raise SimpruneError("the soft schedule trains while it prunes; compare runs without fine-tuning, so use "
                            "`simprune prune --schedule soft --finetune-epochs N` for it")
    raise SimpruneError(f"unknown schedule {schedule!r}; use oneshot or iterative[:STEPS]")


def run_grid(model, example: torch.Tensor, specs: list[Spec], targets: list[float], *, calibration, test,
             base_top1: float, kind: str = "flops", compensations=("default",), schedules=("oneshot",),
             protect_uncompensable: bool = True, progress: bool = False, **prune_options) -> Iterator[dict]:
    """Prune ``model`` for every (criterion, compensation, schedule, target) and evaluate on ``test``.

    Yields {"row", "model", "report", "result"} one run at a time (``result``: the criterion's
    CriterionResult, e.g. its similarity matrices); ``model`` itself is never modified.
    ``prune_options`` (e.g. ``cost_weight``, ``guards``) go to every :func:`api.prune` call.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    from simprune import api  # noqa: PLC0415
    from simprune.criteria import ScoreCache, get_criterion  # noqa: PLC0415
    from simprune.train.loop import evaluate  # noqa: PLC0415

    crits = [get_criterion(s.name, **s.options) for s in specs]
    for crit in crits:
        if hasattr(crit, "progress"):
            crit.progress = False
    total = sum(len(_modes(c, list(compensations))) for c in crits) * len(schedules) * len(targets)
    bar = tqdm(total=total, desc="compare", disable=not progress, leave=False)
    try:
        for spec, crit in zip(specs, crits):
            for schedule in schedules:
                extra = schedule_options(schedule)
                cache = ScoreCache(crit, reuse=not extra)  # re-scored at every step of a schedule
                score_s = None
                for comp in _modes(crit, list(compensations)):
                    for target in targets:
                        bar.set_postfix_str(f"{spec.label} {target:g}")
                        t0 = time.perf_counter()
                        pruned, report = api.prune(model, example, cache, {kind: target}, calibration=calibration,
                                                   compensate=comp, protect_uncompensable=protect_uncompensable,
                                                   recalibrate_bn=calibration is not None, **extra,
                                                   **prune_options)
                        score_s = (report.get("seconds") or {}).get("scores") if score_s is None else score_s
                        top1 = evaluate(pruned, test)["top1"]
                        row = {"criterion": spec.label, "compensated": report["compensated"], "schedule": schedule,
                               "target": target, "flops_removed": report["reduction"]["flops"],
                               "params_removed": report["reduction"]["params"], "macs": report["macs"]["after"],
                               "params": report["params"]["after"], "top1": top1, "change": top1 - base_top1,
                               "score_s": score_s, "seconds": time.perf_counter() - t0}
                        row = {"label": run_label(row), **row}
                        bar.update()
                        yield {"row": row, "model": pruned, "report": report, "result": cache.result}
    finally:
        bar.close()


def run_label(row: dict) -> str:
    """"qsfm", "qsfm + twin" (an explicit compensation), "l1 / iterative:5" (a schedule other than one-shot)."""
    comp, schedule = row.get("compensated"), row.get("schedule") or "oneshot"
    return row["criterion"] + (f" + {comp}" if isinstance(comp, str) else "") + \
        (f" / {schedule}" if schedule != "oneshot" else "")


def pivot_table(rows: list[dict], kind: str = "flops") -> tuple[list[str], list[list[str]]]:
    """One line per criterion (+ compensation, + schedule), one column per target: "top-1 (change)"."""
    by: dict[str, dict[float, dict]] = {}
    for r in rows:
        by.setdefault(run_label(r), {})[r["target"]] = r
    targets = sorted({r["target"] for r in rows})
    unit = "MACs" if kind == "flops" else "params"
    header = ["criterion"] + [f"{100 * t:.0f} % {unit}: top-1 (change)" for t in targets]
    body = [[label] + [f"{cells[t]['top1']:.2f} ({cells[t]['change']:+.2f})" if t in cells else "" for t in targets]
            for label, cells in by.items()]
    return header, body


def results_markdown(data: dict) -> str:
    header, rows = pivot_table(data["rows"], data["target_kind"])
    cal = data["calibration"]
    detail = [[r["label"], f"{r['target']:g}", f"{100 * r['flops_removed']:.1f}", f"{100 * r['params_removed']:.1f}",
               f"{r['top1']:.2f}", f"{r['change']:+.2f}", f"{r['seconds']:.1f}"] for r in data["rows"]]
    return (f"# {data['model']}: criteria compared\n\n" + markdown_table(header, rows) +
            f"\n\nBaseline top-1 {data['baseline_top1']:.2f} % on {data['test_images']} {data['data']} test images; "
            f"{cal['images']} calibration images of {cal['data']}; no fine-tuning.\n\n"
            + markdown_table(["run", "target", "MACs removed %", "params removed %", "top-1 %", "change", "seconds"], detail)
            + f"\n\n`{data['command']}`\n")


def results_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_results(directory: Path, data: dict) -> None:
    """results.{json,csv,md}, accuracy_vs_flops.png and report.{md,html} into ``directory``."""
    from simprune.io.files import atomic_write_bytes, atomic_write_json  # noqa: PLC0415
    from simprune.verify.plots import accuracy_vs_flops  # noqa: PLC0415
    from simprune.verify.reports import write_report  # noqa: PLC0415

    atomic_write_json(directory / "results.json", data)
    atomic_write_bytes(directory / "results.csv", results_csv(data["rows"]).encode())
    atomic_write_bytes(directory / "results.md", results_markdown(data).encode())
    accuracy_vs_flops(data["rows"], data["baseline_top1"], directory / "accuracy_vs_flops.png",
                      f"{data['model']} on {data['data']}: top-1 vs MACs removed, no fine-tuning")
    write_report(directory, "compare", data)


# ---- command line ---------------------------------------------------------------------------

def add_compare_parser(sub) -> None:
    """Register ``simprune compare`` on the CLI's sub-parsers."""
    from simprune.cli.main import _data_options, _model_options, _positive  # noqa: PLC0415 - cli imports this module

    p = sub.add_parser("compare", help="criteria x targets on one model: table, CSV, JSON, plot, report")
    _model_options(p, required=False)
    p.add_argument("--checkpoint", help="trained model directory (its JSON names the architecture and data)")
    p.add_argument("--input", default=None, help="input shape CxHxW (default: the checkpoint's, else the data's)")
    _data_options(p, required=False)
    p.add_argument("--calib-data", default=None, help="calibration data set (default: --data)")
    p.add_argument("--calib-images", type=_positive, default=640)
    p.add_argument("--criteria", default="qsfm,l1,random",
                   help="comma-separated; NAME:METRIC sets a similarity metric, e.g. qsfm:cosine")
    p.add_argument("--targets", default="0.3,0.5,0.7", help="comma-separated fractions to remove")
    p.add_argument("--target-kind", choices=["flops", "params"], default="flops")
    p.add_argument("--compensate", default="default",
                   help=f"comma-separated, for criteria that compensate: {', '.join(COMPENSATIONS)}")
    p.add_argument("--schedules", default="oneshot",
                   help="comma-separated: oneshot, iterative[:STEPS] (re-scored steps, no fine-tuning between)")
    p.add_argument("--protect-uncompensable", action=argparse.BooleanOptionalAction, default=True,
                   help="leave groups read by parameter-free layers whole for every criterion (default: on)")
    p.add_argument("--round-to", type=_positive, default=1, help="keep channel counts multiples of this")
    p.add_argument("--eval-images", type=_positive, default=None, help="evaluate on the first N test images only")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_compare)


def cmd_compare(args) -> int:
    from simprune.allocation.allocator import Guards  # noqa: PLC0415
    from simprune.calibrate.calibration import calibration_loader  # noqa: PLC0415
    from simprune.cli.main import _check_compatible, _command_line, _load_or_build  # noqa: PLC0415
    from simprune.io.data import load_dataset  # noqa: PLC0415
    from simprune.io.files import atomic_output_dir, read_json, resolve_model_path  # noqa: PLC0415
    from simprune.verify.reports import environment_versions  # noqa: PLC0415
    from simprune.train.loop import evaluate  # noqa: PLC0415

    t_start = time.perf_counter()
    specs = parse_specs(args.criteria)
    targets = parse_fractions(args.targets, "--targets")
    compensations = parse_choices(args.compensate, COMPENSATIONS, "--compensate")
    schedules = list(dict.fromkeys(t.strip() for t in args.schedules.split(",") if t.strip())) or ["oneshot"]
    for schedule in schedules:
        schedule_options(schedule)
    ckpt_data = (read_json(resolve_model_path(args.checkpoint)[1]).get("data") or {}) if args.checkpoint else {}
    data = args.data or ckpt_data.get("name")
    if not data:
        raise SimpruneError("pass --data NAME (the evaluation data set; the checkpoint records none)")
    pad_to = args.pad_to if args.pad_to is not None else ckpt_data.get("pad_to")
    calib_data = args.calib_data or data
    progress = not args.quiet and sys.stderr.isatty()
    with atomic_output_dir(Path(args.out), overwrite=args.overwrite) as tmp:
        test = load_dataset(data, "test", args.data_dir, pad_to)
        image_shape = tuple(test[0][0].shape)
        model, desc, shape = _load_or_build(args, args.input or (None if args.checkpoint else
                                                                 "x".join(map(str, image_shape))))
        if tuple(shape) != image_shape:
            raise SimpruneError(f"{data} images are {'x'.join(map(str, image_shape))} but the model takes "
                                f"{'x'.join(map(str, shape))}; pass --pad-to / --input or other --data")
        _check_compatible(model, desc, test)
        if args.eval_images:
            test = torch.utils.data.Subset(test, range(min(args.eval_images, len(test))))
        calibration = calibration_loader(calib_data, args.calib_images, data_dir=args.data_dir, pad_to=pad_to,
                                         seed=args.seed)
        base_top1 = evaluate(model, test)["top1"]
        chart_target = min(targets, key=lambda t: abs(t - 0.5))
        rows, layers = [], {}
        for run in run_grid(model, torch.zeros(1, *shape), specs, targets, calibration=calibration, test=test,
                            base_top1=base_top1, kind=args.target_kind, compensations=compensations,
                            schedules=schedules, protect_uncompensable=args.protect_uncompensable,
                            progress=progress, guards=Guards(round_to=args.round_to)):
            rows.append(run["row"])
            if run["row"]["target"] == chart_target:
                layers[run["row"]["label"]] = run["report"]["layers"]
        result = {"kind": "compare", "model": desc.get("model"), "checkpoint": args.checkpoint, "data": data,
                  "test_images": len(test), "input_shape": list(shape),
                  "calibration": {"data": calib_data, "images": len(calibration.dataset), "seed": args.seed},
                  "target_kind": args.target_kind, "targets": targets, "round_to": args.round_to, "baseline_top1": base_top1, "rows": rows,
                  "layers": layers if len(layers) <= 10 else {},
                  "layers_title": f"Channels per layer at {100 * chart_target:.0f} % of "
                                  f"{'MACs' if args.target_kind == 'flops' else 'parameters'} removed",
                  "layers_caption": "output channels of every layer before (grey bars) and kept by each "
                                    "criterion (lines)",
                  "command": _command_line(), "versions": environment_versions(),
                  "seconds": time.perf_counter() - t_start}
        write_results(tmp, result)
    header, body = pivot_table(rows, args.target_kind)
    print(f"unpruned top-1 {base_top1:.2f} % on {len(test)} {data} test images")
    print(markdown_table(header, body))
    print(f"wrote {args.out}/results.md, results.csv, results.json, accuracy_vs_flops.png, report.html")
    return 0
