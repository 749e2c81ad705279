"""The keywords ``simprune.prune`` took before the typed stage options, mapped onto them.

Each old keyword still works and warns once per call with one line naming its replacement."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from simprune.allocation.selection import Selection
from simprune.errors import SimpruneError
from simprune.repair.refit import RefitOptions
from simprune.repair.stage import Repair, refit_options
from simprune.schedules.kinds import Iterative, OneShot

SELECTION = {"guards": "guards", "ignore": "ignore", "normalization": "normalization", "cost_weight": "cost_weight",
             "criterion_options": "criterion_options", "calib_precision": "calib_precision"}
REPAIR = {"compensate": "fold", "protect_uncompensable": "protect_uncompensable", "recalibrate_bn": "recalibrate_bn"}
SCHEDULE = ("schedule", "steps", "between", "latency_table", "device")
REFIT = ("reconstruct", "reconstruct_options")


def _warn(key: str, new: str) -> None:
    warnings.warn(f"simprune.prune({key}=) is deprecated; use {new}", DeprecationWarning, stacklevel=4)


def from_keywords(selection: Selection, repair: Repair, schedule, calibration, legacy: dict[str, Any]):
    """(selection, repair, schedule) with the old keywords in ``legacy`` folded in; unknown ones refused."""
    unknown = sorted(set(legacy) - set(SELECTION) - set(REPAIR) - set(SCHEDULE) - set(REFIT))
    if unknown:
        raise TypeError(f"prune() got an unexpected keyword argument {unknown[0]!r}")
    changes = {SELECTION[k]: legacy[k] for k in SELECTION if k in legacy}
    for k in changes:
        _warn(k, f"selection=Selection({k}=...)")
    if changes:
        selection = dataclasses.replace(selection, **changes)
    fixes = {REPAIR[k]: legacy[k] for k in REPAIR if k in legacy}
    for k in (k for k in REPAIR if k in legacy):
        _warn(k, f"repair=Repair({REPAIR[k]}=...)")
    if any(k in legacy for k in REFIT):
        for k in (k for k in REFIT if k in legacy):
            _warn(k, "repair=Repair(refit=RefitOptions(...) or False)")
        fixes["refit"] = _refit(legacy.get("reconstruct"), legacy.get("reconstruct_options"), calibration,
                                fixes.get("fold", repair.fold))
    if fixes:
        repair = dataclasses.replace(repair, **fixes)
    return selection, repair, _schedule(schedule, legacy)


def _refit(reconstruct: bool | None, options, calibration, fold) -> RefitOptions | bool | None:
    """``reconstruct`` (None: on with calibration and no fold) with its ``reconstruct_options``."""
    if reconstruct is False:
        return False
    if options is None:
        return reconstruct
    if reconstruct is None and (calibration is None or fold):
        return None
    return refit_options(options if isinstance(options, RefitOptions) else dict(options))


def _schedule(schedule, legacy: dict[str, Any]):
    """A schedule object from ``schedule="oneshot"|"iterative"``, ``steps``, ``between``, ``latency_table``
    and ``device``, or the object given with ``device`` set."""
    for k in (k for k in SCHEDULE if k in legacy):
        _warn(k, "schedule=OneShot(device=..., latency_table=...) or Iterative(steps, between, device=...)")
    name = legacy.get("schedule", schedule if isinstance(schedule, str) else None)
    device = legacy.get("device")
    if name is None:
        if "device" in legacy and isinstance(schedule, (OneShot, Iterative)):
            schedule = dataclasses.replace(schedule, device=device)
        if "latency_table" in legacy and isinstance(schedule, OneShot):
            schedule = dataclasses.replace(schedule, latency_table=legacy["latency_table"])
        return schedule
    if name == "oneshot":
        return OneShot(device=device, latency_table=legacy.get("latency_table"))
    if name == "iterative":
        return Iterative(legacy.get("steps", 1), legacy.get("between"), device=device)
    raise SimpruneError(f"schedule={name!r} is not one-shot pruning; use 'oneshot' or 'iterative' here and "
                        "schedule=Soft(finetune) for 'soft'")
