"""One-shot pruning: score once, allocate under the target, remove, repair (compensation, BN).

Data flows one way: (calibration) -> criterion scores -> allocation under the target ->
structural removal -> repair -> the report. The iterative and soft schedules reuse these steps.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from simprune import distributed, progress
from simprune.allocation.allocator import CostModel, Guards, allocate
from simprune.calibrate.calibration import check_calibration, recalibrate_batchnorm
from simprune.criteria import get_criterion
from simprune.engine.reconstruct import RefitOptions, refit_targets
from simprune.engine.reconstruct import reconstruct as refit_network
from simprune.errors import SimpruneError
from simprune.graph.counting import count, layer_widths
from simprune.graph.groups import PruningGraph
from simprune.graph.removal import remove_channels
from simprune.io.description import INPUT_ATTR
from simprune.models import SOURCE_ATTR
from simprune.schedules.report import prune_report, target_met


def resolve_criterion(criterion: str | Any, options: dict | None = None, calibration=None):
    """A criterion object from its registry name (or the object itself); refuses data criteria without data."""
    crit = get_criterion(criterion, **(options or {})) if isinstance(criterion, str) else criterion
    if getattr(crit, "needs_data", False) and calibration is None:
        raise SimpruneError(f"criterion {crit.name!r} needs calibration data; pass calibration=")
    return crit


def select_channels(graph: PruningGraph, crit, target: dict[str, float], cost: CostModel, *, calibration=None,
                    guards: Guards | None = None, normalization: str | None = None, cost_weight: float = 0.0,
                    protected: list[str] | tuple = ()):
    """Score every channel with ``crit`` and allocate removals under ``target``; returns
    (allocation, criterion result, time scoring ended). Groups in ``protected`` keep all channels."""
    progress.stage(f"scoring channels ({crit.name})")
    result = crit.score(graph, calibration) if getattr(crit, "needs_data", False) else crit.score(graph)
    t_score = time.perf_counter()
    progress.stage(f"allocating the target over {len(graph.groups)} channel groups")
    scores = {k: v for k, v in result.scores.items() if k not in set(protected)}
    alloc = allocate(graph.groups, scores, cost, target, guards or Guards(),
                     normalization or result.normalization, cost_weight)
    alloc.fingerprints = distributed.gather_fingerprints(alloc.remove)
    distributed.check_agree(alloc.remove, "pruning decision")
    return alloc, result, t_score


def _repair_options(crit, compensate, protect_uncompensable, recalibrate_bn, calibration, refit):
    """Resolve the defaults: the refit when calibration data is given and no channel fold was asked for;
    then the criterion's own fold only without the refit; protection when folding or refitting; BN
    re-estimation when calibration data is given."""
    if refit is None:
        refit = calibration is not None and not compensate
    if refit and calibration is None:
        raise SimpruneError("reconstruction needs calibration data; pass calibration= "
                            "or reconstruct=False")
    if compensate is None:
        compensate = False if refit else getattr(crit, "compensate_by_default", False)
    if protect_uncompensable is None:
        protect_uncompensable = bool(compensate) or bool(refit)
    if recalibrate_bn is None:
        recalibrate_bn = calibration is not None
    if recalibrate_bn and calibration is None:
        raise SimpruneError("BatchNorm re-estimation needs calibration images; pass calibration= "
                            "or recalibrate_bn=False")
    return compensate, protect_uncompensable, recalibrate_bn, bool(refit)


def prune_oneshot(model: nn.Module, example_input: torch.Tensor, crit, target: dict[str, float], *,
                  calibration=None, guards: Guards | None = None, ignore=(), normalization: str | None = None,
                  cost_weight: float = 0.0, compensate: bool | str | None = None,
                  protect_uncompensable: bool | None = None, recalibrate_bn: bool | None = None,
                  reconstruct: bool | None = None, reconstruct_options: RefitOptions | dict | None = None,
                  latency_table=None) -> tuple[nn.Module, dict]:
    """Prune ``model`` in place to ``target`` with ``crit`` (a criterion or its name); returns (model, report).

    ``reconstruct`` (default: on when ``calibration`` is given and no channel fold was asked for with
    ``compensate``) refits the layers so they reproduce the unpruned model's outputs
    (:mod:`simprune.engine.reconstruct`), before BatchNorm re-estimation; ``reconstruct_options`` (a
    RefitOptions or its fields) tunes it."""
    crit = resolve_criterion(crit, None, calibration)
    model.eval()
    if calibration is not None:
        calibration = check_calibration(calibration, example_input)
    t0 = time.perf_counter()
    progress.stage("building the channel graph")
    before, widths_before = count(model, example_input), layer_widths(model)
    graph = PruningGraph(model, example_input, ignore=ignore)
    groups_before = {g.root: g.size for g in graph.groups}
    cost = CostModel(graph.groups, before) if latency_table is None else latency_table.cost_model(graph.groups, before)
    t_graph = time.perf_counter()
    compensate, protect_uncompensable, recalibrate_bn, refit = _repair_options(
        crit, compensate, protect_uncompensable, recalibrate_bn, calibration, reconstruct)
    protected = [g.root for g in graph.groups if not g.compensable] if protect_uncompensable else []
    alloc, result, t_score = select_channels(graph, crit, target, cost, calibration=calibration, guards=guards,
                                             normalization=normalization, cost_weight=cost_weight,
                                             protected=protected)
    t_alloc = time.perf_counter()
    if compensate and result.compensator is None:
        raise SimpruneError(f"criterion {crit.name!r} has no compensation; pass compensate=False")
    reference = copy.deepcopy(model) if refit else None  # the unpruned model: what the refit reproduces
    options = refit_options(reconstruct_options) if refit else None
    targets = refit_targets(graph, alloc.remove, options.scope) if refit else {}
    progress.stage(f"removing {sum(map(len, alloc.remove.values()))} channels" + (", compensating" if compensate else ""))
    if compensate:
        result.compensator(graph, alloc.remove, compensate if isinstance(compensate, str) else None)
    remove_channels(graph, alloc.remove)
    setattr(model, INPUT_ATTR, list(example_input.shape[1:]))  # what save records for load
    t_removal = time.perf_counter()
    if refit:
        progress.stage(f"reconstructing {len(targets)} layers from the kept channels")
    refit_summary = refit_network(reference, model, targets, calibration, options) if refit else False
    if recalibrate_bn:
        recalibrate_batchnorm(model, calibration)
    after = count(model, example_input)
    report = prune_report(
        model_name=(getattr(model, SOURCE_ATTR, None) or {}).get("model") or type(model).__name__,
        criterion=crit.name, target=target, schedule={"name": "oneshot"}, before=before, after=after,
        layers_before=widths_before, layers_after=layer_widths(model), groups=graph.groups,
        groups_before=groups_before, removed=alloc.remove, protected=protected,
        compensated=(compensate if isinstance(compensate, str) else bool(compensate)) if compensate else False,
        bn_recalibrated=recalibrate_bn, decision_fingerprint_per_rank=alloc.fingerprints,
        round_to=alloc.round_to, target_met=target_met(target, before, after),
        reconstructed=refit_summary,
        seconds={"graph": t_graph - t0, "scores": t_score - t_graph, "allocation": t_alloc - t_score,
                 "removal": t_removal - t_alloc, "reconstruction": refit_summary["seconds"] if refit else 0.0,
                 "total": time.perf_counter() - t0})
    return model, report


def refit_options(options: RefitOptions | dict | None) -> RefitOptions:
    """``reconstruct_options`` as given: a RefitOptions, a dict of its fields, or None for the defaults."""
    if options is None or isinstance(options, RefitOptions):
        return options or RefitOptions()
    try:
        return RefitOptions(**options)
    except TypeError as exc:
        raise SimpruneError(f"reconstruct_options: {exc}; use the fields of "
                            "simprune.engine.reconstruct.RefitOptions") from exc
