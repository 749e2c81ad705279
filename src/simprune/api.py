"""The Python API: ``prune``, ``save`` and ``load``. The CLI calls these.

Data flows one way: (calibration) -> criterion scores -> allocation under the
target -> structural removal -> count/verify -> files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from simprune.allocation.allocator import Guards
from simprune.allocation.selection import Selection
from simprune.calibrate.batches import Calibration
from simprune.criteria import default_criterion
from simprune.graph.groups import KEPT_WIDTH_ATTR, peak_memory_mib
from simprune.io.description import check_loadable, describe
from simprune.io.files import atomic_output_dir, atomic_write_json, load_model, save_model
from simprune.repair.recovery import Recovery
from simprune.repair.refit import RefitOptions
from simprune.repair.stage import Repair
from simprune.schedules.choice import Choose
from simprune.schedules.kinds import Iterative, OneShot, Soft, ToLatency
from simprune.schedules.legacy import from_keywords
from simprune.schedules.run import run_schedule

__all__ = ["Calibration", "Choose", "Guards", "Iterative", "OneShot", "Recovery", "RefitOptions", "Repair", "Selection",
           "Soft", "ToLatency", "load", "prune", "save"]


def prune(model: nn.Module, example_input: torch.Tensor, criterion: str | Any | None = None,
          target: dict[str, float] | None = None, *, calibration=None, selection: Selection = Selection(),
          repair: Repair = Repair.auto(), schedule=OneShot(), inplace: bool = False,
          **legacy) -> tuple[nn.Module, dict]:
    """Prune ``model`` to ``target`` (e.g. ``{"macs": 0.5}``: half the MACs removed; "flops" is the old name)
    with ``criterion`` (default: "auto" when ``calibration`` is given: refit-error and tp:l2 each prune a
    trial copy on 80 % of the images and the one that moves the output least on the rest is used, see
    :class:`Choose`; else "l1"). Returns ``(pruned_model, report)``; ``model`` is left untouched unless ``inplace``.

    ``calibration``: any iterable of batches, or a :class:`Calibration` (a one-shot one is kept: it is read
    several times). ``selection`` (:class:`Selection`): guards, ignored layers, normalization, cost weight,
    criterion options, calibration precision. ``repair`` (:class:`Repair`): the channel fold, protection,
    refit, BatchNorm re-estimation and label-free recovery (``Repair(recover=Recovery(...))``) after
    removal (``Repair.auto()``: the defaults for the criterion and data). ``schedule``: :class:`OneShot` (``device=``: where the work runs, default CUDA when
    available), :class:`Iterative` (steps, between), :class:`Soft` (trains) or :class:`ToLatency` (a measured
    ``{"latency": R}`` target). The old keywords (``compensate=``, ``reconstruct=``, ``guards=``, ``steps=``,
    ``device=``, ...) still work with a DeprecationWarning (see :mod:`simprune.schedules.legacy`).
    """
    selection, repair, schedule = from_keywords(selection, repair, schedule, calibration, legacy)
    if criterion is None:
        criterion = default_criterion(calibration is not None)
    pruned, report = run_schedule(model, example_input, criterion, target, calibration=calibration,
                                  selection=selection, repair=repair, schedule=schedule, inplace=inplace)
    report["kept_width"] = dict(getattr(pruned, KEPT_WIDTH_ATTR, {}))  # layers the graph keeps whole, and why
    report["peak_memory_mib"] = peak_memory_mib()
    return pruned, report.to_dict()


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
