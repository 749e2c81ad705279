"""The Python API: ``prune``, ``save`` and ``load``. The CLI calls these.

Data flows one way: (calibration) -> criterion scores -> allocation under the
target -> structural removal -> count/verify -> files.
"""
from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from simprune import distributed
from simprune.allocation.allocator import CostModel, Guards, allocate
from simprune.calibrate.calibration import check_calibration, recalibrate_batchnorm
from simprune.graph.counting import count
from simprune.criteria import get_criterion
from simprune.errors import SimpruneError
from simprune.io.description import INPUT_ATTR, check_loadable, describe
from simprune.io.files import atomic_output_dir, atomic_write_json, load_model, save_model
from simprune.graph.groups import PruningGraph
from simprune.graph.removal import remove_channels
from simprune.models import SOURCE_ATTR


MISS_TOLERANCE = 0.02  # achieved vs asked reduction beyond which prune warns (the cost model is exact)


def _widths(model: nn.Module) -> dict[str, int]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def select_channels(graph: PruningGraph, crit, target: dict[str, float], cost: CostModel, *, calibration=None,
                    guards: Guards | None = None, normalization: str | None = None, cost_weight: float = 0.0,
                    protected: list[str] | tuple = ()):
    """Score every channel with ``crit`` and allocate removals under ``target``; returns
    (allocation, criterion result, time scoring ended). Groups in ``protected`` keep all channels."""
    result = crit.score(graph, calibration) if getattr(crit, "needs_data", False) else crit.score(graph)
    t_score = time.perf_counter()
    scores = {k: v for k, v in result.scores.items() if k not in set(protected)}
    alloc = allocate(graph.groups, scores, cost, target, guards or Guards(),
                     normalization or result.normalization, cost_weight)
    alloc.fingerprints = distributed.gather_fingerprints(alloc.remove)
    distributed.check_agree(alloc.remove, "pruning decision")
    return alloc, result, t_score


def resolve_criterion(criterion: str | Any, options: dict | None = None, calibration=None):
    crit = get_criterion(criterion, **(options or {})) if isinstance(criterion, str) else criterion
    if getattr(crit, "needs_data", False) and calibration is None:
        raise SimpruneError(f"criterion {crit.name!r} needs calibration data; pass --calib-data")
    return crit


def prune(model: nn.Module, example_input: torch.Tensor, criterion: str | Any = "l1",
          target: dict[str, float] | None = None, *, calibration=None, guards: Guards | None = None,
          ignore: tuple[str, ...] | list[str] = (), normalization: str | None = None, cost_weight: float = 0.0,
          compensate: bool | str | None = None, protect_uncompensable: bool | None = None,
          recalibrate_bn: bool | None = None, inplace: bool = False,
          criterion_options: dict | None = None, schedule: str = "oneshot", steps: int = 1,
          between: Callable[[nn.Module, int], None] | None = None, latency_table=None) -> tuple[nn.Module, dict]:
    """Prune ``model`` to ``target`` (e.g. ``{"flops": 0.5}``: half the MACs removed) with ``criterion``.

    Returns ``(pruned_model, report)``; the input model is left untouched unless ``inplace``.
    ``compensate`` folds removed channels into the next layers (data criteria): True for the
    criterion's default mode, "lstsq" or "twin", False for none; None: the criterion's default.
    ``protect_uncompensable`` (default: on when compensating) leaves groups whose channels reach a
    parameter-free reader (option-A shortcut) untouched. ``recalibrate_bn`` (default: on when
    ``calibration`` is given) re-estimates BatchNorm statistics on the calibration images afterwards.
    ``schedule="iterative"`` prunes in ``steps`` re-scored steps, calling ``between(model, k)`` (e.g. a
    fine-tuning epoch) after each but the last; the soft schedule trains, so it lives in
    :func:`simprune.finetuning.soft_prune`. A ``{"latency": R}`` target needs ``latency_table`` (a
    :class:`simprune.latency_table.LatencyTable`); :func:`simprune.latency_table.prune_to_latency` makes one.
    """
    target = target or {"flops": 0.5}
    crit = resolve_criterion(criterion, criterion_options, calibration)
    if not inplace:
        model = copy.deepcopy(model)
    if schedule != "oneshot":
        if schedule != "iterative":
            raise SimpruneError(f"schedule {schedule!r} is not one-shot pruning; use 'oneshot' or 'iterative' "
                                "here and simprune.finetuning.soft_prune for 'soft'")
        from simprune.schedules.soft import iterative  # noqa: PLC0415

        return iterative(model, example_input, crit, target, steps, prune, between, calibration=calibration,
                         guards=guards, ignore=ignore, normalization=normalization, cost_weight=cost_weight,
                         compensate=compensate, protect_uncompensable=protect_uncompensable,
                         recalibrate_bn=recalibrate_bn)
    model.eval()
    if calibration is not None:
        check_calibration(calibration, example_input)
    t0 = time.perf_counter()
    before = count(model, example_input)
    widths_before = _widths(model)
    graph = PruningGraph(model, example_input, ignore=ignore)
    cost = CostModel(graph.groups, before) if latency_table is None else latency_table.cost_model(graph.groups, before)
    t_graph = time.perf_counter()
    if compensate is None:
        compensate = getattr(crit, "compensate_by_default", False)
    if protect_uncompensable is None:
        protect_uncompensable = bool(compensate)
    protected = [g.root for g in graph.groups if not g.compensable] if protect_uncompensable else []
    alloc, result, t_score = select_channels(graph, crit, target, cost, calibration=calibration, guards=guards,
                                             normalization=normalization, cost_weight=cost_weight,
                                             protected=protected)
    t_alloc = time.perf_counter()
    if compensate and result.compensator is None:
        raise SimpruneError(f"criterion {crit.name!r} has no compensation; drop --compensate")
    if compensate:
        result.compensator(graph, alloc.remove, compensate if isinstance(compensate, str) else None)
    remove_channels(graph, alloc.remove)
    setattr(model, INPUT_ATTR, list(example_input.shape[1:]))  # what save records for load
    if recalibrate_bn is None:
        recalibrate_bn = calibration is not None
    if recalibrate_bn:
        if calibration is None:
            raise SimpruneError("BatchNorm recalibration needs calibration data; pass --calib-data")
        recalibrate_batchnorm(model, calibration)
    after = count(model, example_input)
    widths_after = _widths(model)
    kind, ratio = next(iter(target.items()))
    achieved = 1 - (after.macs / before.macs if kind == "flops" else after.params / before.params)
    if kind in ("flops", "params") and abs(achieved - ratio) > MISS_TOLERANCE:
        warnings.warn(f"target {kind} {ratio:.1%} missed: {achieved:.1%} removed (the cost model predicted "
                      f"{alloc.reduction:.1%}); please report the model", RuntimeWarning, stacklevel=2)
    report = {
        "schedule": {"name": "oneshot"},
        "model": (getattr(model, SOURCE_ATTR, None) or {}).get("model") or type(model).__name__,
        "criterion": crit.name,
        "target": {kind: ratio},
        "macs": {"before": before.macs, "after": after.macs},
        "params": {"before": before.params, "after": after.params},
        "reduction": {"flops": 1 - after.macs / before.macs, "params": 1 - after.params / before.params},
        "layers": [{"name": n, "channels_before": c, "channels_after": widths_after.get(n, 0)}
                   for n, c in widths_before.items()],
        "groups": [{"root": g.root, "channels_before": g.size + len(alloc.remove.get(g.root, [])),
                    "channels_after": g.size} for g in graph.groups],
        "accuracy": None,
        "round_to": alloc.round_to,
        "target_met": abs(achieved - ratio) <= MISS_TOLERANCE if kind in ("flops", "params") else None,
        "protected_groups": protected,
        "bn_recalibrated": bool(recalibrate_bn),
        "decision_fingerprint": distributed.fingerprint(alloc.remove),
        "decision_fingerprint_per_rank": alloc.fingerprints,
        "compensated": (compensate if isinstance(compensate, str) else bool(compensate)) if compensate else False,
        "seconds": {"graph": t_graph - t0, "scores": t_score - t_graph, "allocation": t_alloc - t_score,
                    "removal": time.perf_counter() - t_alloc},
    }
    return model, report


def save(out_dir: str | Path, model: nn.Module, description: dict[str, Any] | None = None,
         report: dict | None = None, overwrite: bool = False, extra: Callable[[Path], None] | None = None,
         verify: bool = True) -> Path:
    """Write ``model.safetensors`` + ``model.json`` (+ ``report.json``) into ``out_dir`` atomically.

    The description is taken from the model (what ``build_model`` built, the input shape ``prune``
    saw, the pruned structure); ``description`` adds or overrides keys. With ``verify`` the
    description is rebuilt first and one that would not load back is refused. Without a model
    name, load it with ``load(dir, MyNet())``.
    """
    desc = describe(model, description)
    if verify:
        check_loadable(model, desc)
    with atomic_output_dir(Path(out_dir), overwrite=overwrite) as tmp:
        save_model(tmp, model, desc)
        if report is not None:
            atomic_write_json(tmp / "report.json", report)
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


def load(path: str | Path, model: nn.Module | str | None = None, *, builder: str | None = None) -> nn.Module:
    """Rebuild a saved (pruned) model from its directory; never unpickles.

    ``model``: a freshly built, unpruned instance for your own architecture (``load(dir, MyNet())``),
    or the ``pkg.module:factory`` that built it (your code runs only when you name it, also as ``builder``).
    """
    if isinstance(model, str):
        model, builder = None, model
    loaded, desc = load_model(path, model, builder=builder)
    loaded.simprune_description = desc
    return loaded
