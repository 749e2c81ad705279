"""One-shot pruning: score once, allocate under the target, then the repair stage (fold, removal, refit,
recovery, BN).

Data flows one way: (calibration) -> criterion scores -> allocation under the target ->
structural removal and repair -> the report. The iterative and soft schedules reuse these steps.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from simprune import progress
from simprune.allocation.allocator import CostModel
from simprune.allocation.selection import Selection
from simprune.calibrate.batches import Calibration
from simprune.calibrate.consumer_inputs import positions_per_image, starved_groups
from simprune.criteria import get_criterion, set_calib_precision
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph
from simprune.io.description import INPUT_ATTR
from simprune.models import SOURCE_ATTR
from simprune.repair.stage import Removal, Repair
from simprune.schedules.report import PruneReport, Snapshot, prune_report, target_met


def resolve_criterion(criterion: str | Any, options: dict | None = None, calibration=None):
    """A criterion object from its registry name (or the object itself); refuses data criteria without data."""
    crit = get_criterion(criterion, **(options or {})) if isinstance(criterion, str) else criterion
    if getattr(crit, "needs_data", False) and calibration is None:
        raise SimpruneError(f"criterion {crit.name!r} needs calibration data; pass calibration=")
    return crit


@dataclass
class Job:
    """One prune's inputs, resolved once: the model (pruned in place), its example input, the criterion
    object, the target, the calibration images and the stage options."""

    model: nn.Module
    example: torch.Tensor
    criterion: Any
    target: dict[str, float]
    calibration: Calibration | None = None
    selection: Selection = field(default_factory=Selection)
    repair: Repair = field(default_factory=Repair.auto)
    held_aside: torch.Tensor | None = None  # images no statistics or refit sees: the recovery's early stopping

    def __post_init__(self):
        self.criterion = resolve_criterion(self.criterion, self.selection.criterion_options, self.calibration)
        if self.selection.calib_precision is not None:
            set_calib_precision(self.criterion, self.selection.calib_precision)
        self.calibration = Calibration.of(self.calibration, self.example)
        self.repair = self.repair.resolve(self.criterion, self.calibration)
        share = getattr(self.repair.recover, "holdout", None)
        if share and self.held_aside is None:
            self.calibration, self.held_aside = self.calibration.hold_aside(share, self.repair.recover.seed)
        if self.repair.refit and self.repair.refit.views > 1:  # selection, refit and BatchNorm read the views
            self.calibration = self.calibration.with_views(self.repair.refit.views, self.repair.refit.seed)

    def replace(self, **changes) -> Job:
        return dataclasses.replace(self, **changes)


def starved_for_the_refit(graph: PruningGraph, example: torch.Tensor, calibration, refit) -> dict[str, str]:
    """The groups whose readers the refit would fit on too few rows (see :func:`starved_groups`)."""
    images = calibration.count()
    return starved_groups(graph, example, images, positions_per_image(refit.max_positions, images))


def warn_preferred_released(starved: dict[str, str], doubtful: set[str], criterion: str) -> None:
    """Say which groups the target forced out of being kept whole: more calibration images would help."""
    if starved:
        progress.warn("the target needs groups the refit has too few calibration rows for ("
                      f"{'; '.join(starved.values())}); they were pruned and refit on those rows anyway")
    if doubtful:
        progress.warn(f"the target needs groups {criterion} scored on too few calibration rows "
                      f"({', '.join(sorted(doubtful))}); they were pruned on those scores; more calibration "
                      "images would judge them better")


def prune_oneshot(job: Job, latency_table=None) -> tuple[nn.Module, PruneReport]:
    """Prune ``job.model`` in place to ``job.target``; returns (model, report). With ``latency_table`` the
    allocator weighs channels by the table's milliseconds (a ``{"latency": R}`` target, unmeasured)."""
    model, example, crit, target, repair = job.model, job.example, job.criterion, job.target, job.repair
    model.eval()
    t0 = time.perf_counter()
    progress.stage("building the channel graph")
    graph = PruningGraph(model, example, ignore=job.selection.ignore)
    before = Snapshot.take(model, example, graph)
    cost = CostModel(graph.groups, before.cost) if latency_table is None else \
        latency_table.cost_model(graph.groups, before.cost)
    t_graph = time.perf_counter()
    protected = [g.root for g in graph.groups if not g.compensable] if repair.protect_uncompensable else []
    starved = starved_for_the_refit(graph, example, job.calibration, repair.refit) if repair.refit else {}
    alloc, result, t_score = job.selection.select(graph, crit, target, cost, job.calibration, protected,
                                                  preferred=list(starved))
    if not alloc.preferred_kept:
        warn_preferred_released(starved, set(getattr(result, "doubtful", ())) - set(starved), crit.name)
        starved = {}
    t_alloc = time.perf_counter()
    if repair.fold and result.fold is None:
        raise SimpruneError(f"criterion {crit.name!r} has no compensation; pass compensate=False")
    original = copy.deepcopy(model) if repair.needs_original else None  # what the refit reproduces
    done = repair.apply(original, model, Removal(graph, alloc.remove, result, crit.name), job.calibration,
                        job.held_aside)
    setattr(model, INPUT_ATTR, list(example.shape[1:]))  # what save records for load
    refit = done["reconstructed"]
    after = Snapshot.take(model, example, graph)
    return model, prune_report(
        model_name=(getattr(model, SOURCE_ATTR, None) or {}).get("model") or type(model).__name__,
        criterion=crit.name, target=target, schedule={"name": "oneshot"}, before=before, after=after,
        removed=alloc.remove, protected=protected, repaired=done,
        decision_fingerprint_per_rank=alloc.fingerprints, round_to=alloc.round_to,
        target_met=target_met(target, before.cost, after.cost), reconstructed=refit, recovered=done["recovered"],
        batchnorm_choice=done["batchnorm"],
        criterion_notes=dict(getattr(result, "notes", {}) or {}), left_whole_for_the_refit=starved,
        seconds={"graph": t_graph - t0, "scores": t_score - t_graph, "allocation": t_alloc - t_score,
                 "removal": done["removed_at"] - t_alloc, "reconstruction": refit["seconds"] if refit else 0.0,
                 "total": time.perf_counter() - t0})
