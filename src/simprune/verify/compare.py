"""``simprune compare``: criteria x targets (x compensations, x schedules) on one model and data set.

Every run stands on the same footing: the same seeded calibration images, groups that cannot be
compensated (read by a parameter-free layer) left whole, BatchNorm statistics re-estimated on the
calibration images, no fine-tuning. A criterion's scores are computed once and reused for every
one-shot target (the statistics pass is the costly part). Writes results.md / .csv / .json,
accuracy_vs_flops.png (one line per criterion, the unpruned model dashed) and report.md / .html.
"""
from __future__ import annotations

import csv
import io
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from simprune.allocation.selection import Selection
from simprune.criteria import ScoreCache, available_criteria, get_criterion
from simprune.errors import SimpruneError
from simprune.io.files import atomic_write_bytes, atomic_write_json
from simprune.progress import note as progress_note
from simprune.repair.stage import Repair
from simprune.schedules.choice import AUTO, Choose
from simprune.schedules.kinds import Iterative, OneShot
from simprune.schedules.run import run_schedule
from simprune.train.loop import evaluate
from simprune.verify.reports import write_report
from simprune.verify.tables import markdown_table, pivot_table, run_label

COMPENSATIONS = ("default", "lstsq", "twin", "none")
COLUMNS = ["label", "criterion", "compensated", "reconstructed", "schedule", "target", "flops_removed",
           "params_removed", "macs", "params", "top1", "change", "score_s", "seconds", "latency_ms", "speedup",
           "model_dir"]


@dataclass(frozen=True)
class Spec:
    """One criterion to compare: its label in tables, registry name and options."""

    label: str
    name: str
    options: dict = field(default_factory=dict)


def parse_specs(text: str) -> list[Spec]:
    """``"qsfm,qsfm:cosine,l1,tp:lamp"`` -> specs; ``NAME:METRIC`` sets the criterion's similarity metric
    unless the whole item is a criterion's name (``tp:lamp``)."""
    specs, names = [], available_criteria()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, metric = item.partition(":")
        if item in names or item == AUTO:  # a name with a colon, e.g. tp:lamp; the library's default
            name, metric = item, ""
        options = {"similarity": metric} if metric else {}
        _criterion(Spec(item, name, options))  # unknown names and options fail here, before any work
        specs.append(Spec(item, name, options))
    labels = [s.label for s in specs]
    if not specs or len(set(labels)) != len(labels):
        raise SimpruneError(f"criteria {text!r} must name distinct criteria, e.g. qsfm,l1,random")
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


def _criterion(spec: Spec):
    """The criterion object of ``spec``; "auto" is the library's default choice between trial prunes."""
    return Choose() if spec.name == AUTO else get_criterion(spec.name, **spec.options)


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


@dataclass(frozen=True)
class Grid:
    """What a comparison varies besides the criteria and targets: the target ``kind``, the channel folds
    (``compensations``), ``schedules``, refit settings (``reconstructions``: values of Repair.refit, None the
    default), whether uncompensable groups stay whole, and the ``device`` the work runs on."""

    kind: str = "flops"
    compensations: tuple = ("default",)
    schedules: tuple = ("oneshot",)
    reconstructions: tuple = (None,)
    protect_uncompensable: bool = True
    device: str | None = None

    def schedule(self, name: str):
        """The schedule object of ``name`` (see :func:`schedule_options`) on :attr:`device`."""
        extra = schedule_options(name)
        return Iterative(extra["steps"], device=self.device) if extra else OneShot(device=self.device)


def run_grid(model, example: torch.Tensor, specs: list[Spec], targets: list[float], *, calibration, test,
             base_top1: float, grid: Grid = Grid(), selection: Selection = Selection(),
             progress: bool = False) -> Iterator[dict]:
    """Prune ``model`` for every (criterion, compensation, refit, schedule, target) of ``grid`` and evaluate
    on ``test``; ``selection`` (guards, cost weight, ...) is the same for every run.

    Yields {"row", "model", "report", "result"} one run at a time (``result``: the criterion's
    CriterionResult, e.g. its similarity matrices); ``model`` itself is never modified.
    """
    crits = [_criterion(s) for s in specs]
    total = sum(len(_modes(c, list(grid.compensations))) for c in crits) * len(grid.schedules) * len(targets) * \
        len(grid.reconstructions)
    done = 0
    for spec, crit in zip(specs, crits):
        for schedule in grid.schedules:
            plan = grid.schedule(schedule)
            # scores kept across one-shot targets (re-scored at every step of a schedule); auto prunes trials per target
            cache = crit if isinstance(crit, Choose) else ScoreCache(crit, reuse=isinstance(plan, OneShot))
            score_s = None
            for comp, refit, target in itertools.product(_modes(crit, list(grid.compensations)),
                                                         grid.reconstructions, targets):
                t0 = time.perf_counter()
                repair = Repair(fold=comp, protect_uncompensable=grid.protect_uncompensable,
                                refit=refit)  # BatchNorm: the library's default for these data
                pruned, report = run_schedule(model, example, cache, {grid.kind: target}, calibration=calibration,
                                              selection=selection, repair=repair, schedule=plan)
                report = report.to_dict()
                score_s = (report.get("seconds") or {}).get("scores") if score_s is None else score_s
                top1 = evaluate(pruned, test, progress=progress, desc=f"top-1 of {spec.label} at {target:g}",
                                device=grid.device)["top1"]
                row = {"criterion": spec.label, "compensated": report["compensated"],
                       "reconstructed": bool(report.get("reconstructed")), "schedule": schedule,
                       "target": target, "flops_removed": report["reduction"]["flops"],
                       "params_removed": report["reduction"]["params"], "macs": report["macs"]["after"],
                       "params": report["params"]["after"], "top1": top1, "change": top1 - base_top1,
                       "score_s": score_s, "seconds": time.perf_counter() - t0}
                if isinstance(crit, Choose):
                    row["chosen"] = report["criterion"]
                row = {"label": run_label(row), **row}
                done += 1
                if progress:
                    progress_note(f"[{done}/{total}] {row['label']} at {target:g}: MACs "
                                  f"-{row['flops_removed']:.1%}, top-1 {top1:.2f} % ({row['seconds']:.0f} s)")
                yield {"row": row, "model": pruned, "report": report, "result": getattr(cache, "result", None)}


def results_markdown(data: dict) -> str:
    header, rows = pivot_table(data["rows"], data["target_kind"])
    cal = data["calibration"]
    detail = [[r["label"] + (f" (chose {r['chosen']})" if r.get("chosen") else ""), f"{r['target']:g}", f"{100 * r['flops_removed']:.1f}", f"{100 * r['params_removed']:.1f}",
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
    from simprune.verify.plots import accuracy_vs_flops  # noqa: PLC0415 - matplotlib only when results are written

    atomic_write_json(directory / "results.json", data)
    atomic_write_bytes(directory / "results.csv", results_csv(data["rows"]).encode())
    atomic_write_bytes(directory / "results.md", results_markdown(data).encode())
    accuracy_vs_flops(data["rows"], data["baseline_top1"], directory / "accuracy_vs_flops.png",
                      f"{data['model']} on {data['data']}: top-1 vs MACs removed, no fine-tuning")
    write_report(directory, "compare", data)


# ---- command line ---------------------------------------------------------------------------
