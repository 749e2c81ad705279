"""The Python API: ``prune``, ``save`` and ``load``. The CLI calls these.

Data flows one way: (calibration) -> criterion scores -> allocation under the
target -> structural removal -> count/verify -> files.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from simprune import progress
from simprune.allocation.allocator import Guards
from simprune.criteria import default_criterion
from simprune.errors import SimpruneError
from simprune.graph.groups import KEPT_WIDTH_ATTR, peak_memory_mib
from simprune.io.description import check_loadable, describe
from simprune.io.files import atomic_output_dir, atomic_write_json, load_model, save_model
from simprune.repair.recovery import Recovery, recover
from simprune.schedules.run import run_schedule


def prune(model: nn.Module, example_input: torch.Tensor, criterion: str | Any | None = None,
          target: dict[str, float] | None = None, *, calibration=None, guards: Guards | None = None,
          ignore: tuple[str, ...] | list[str] = (), normalization: str | None = None, cost_weight: float = 0.0,
          compensate: bool | str | None = None, protect_uncompensable: bool | None = None,
          recalibrate_bn: bool | None = None, reconstruct: bool | None = None,
          reconstruct_options: dict | None = None, inplace: bool = False,
          criterion_options: dict | None = None, schedule: str = "oneshot", steps: int = 1,
          between: Callable[[nn.Module, int], None] | None = None, latency_table=None,
          calib_precision: str | None = None, device: str | torch.device | None = None,
          recover: bool | Recovery = False) -> tuple[nn.Module, dict]:
    """Prune ``model`` to ``target`` (e.g. ``{"flops": 0.5}``: half the MACs removed) with ``criterion``
    (default: "refit-error" when ``calibration`` is given, the most accurate without fine-tuning; else "l1").

    Returns ``(pruned_model, report)``; the input model is left untouched unless ``inplace``.
    ``compensate`` folds removed channels into the next layers (data criteria): True for the
    criterion's default mode, "lstsq" or "twin", False for none; None: the criterion's default.
    ``protect_uncompensable`` (default: on when compensating) leaves groups whose channels reach a
    parameter-free reader (option-A shortcut) untouched. ``recalibrate_bn`` (default: on when
    ``calibration`` is given) re-estimates BatchNorm statistics on the calibration images afterwards.
    ``schedule="iterative"`` prunes in ``steps`` re-scored steps, calling ``between(model, k)`` (e.g. a
    fine-tuning epoch) after each but the last; the soft schedule trains, so it lives in
    :func:`simprune.schedules.soft.soft_prune`. A ``{"latency": R}`` target needs ``latency_table`` (a
    :class:`simprune.schedules.latency.LatencyTable`); :func:`simprune.schedules.latency.prune_to_latency` makes one.
    ``calibration`` may be any iterable of batches (a one-shot one is kept in memory: it is read several
    times); ``calib_precision`` ("fp32" or "bf16") sets a data criterion's calibration forward pass.
    ``device`` ("cuda", "cuda:N" or "cpu"; default CUDA when available, else CPU) runs statistics,
    compensation and BatchNorm re-estimation there, each calibration batch moved to it; the pruned
    model comes back on ``model``'s device. The decision is the CPU one up to floating-point ties.
    ``recover`` (True or a :class:`simprune.repair.recovery.Recovery`) then trains the pruned model to
    reproduce ``model`` on the calibration images, labels never read (off by default: not yet shown to
    help on every model, see docs/results.md); the report's "recovered" says what it did.
    """
    if criterion is None:
        criterion = default_criterion(calibration is not None)
    if recover and calibration is None:
        raise SimpruneError("recovery needs calibration images; pass calibration= or recover=False")
    pruned, report = run_schedule(model, example_input, criterion, target or {"flops": 0.5}, schedule=schedule, steps=steps,
                        between=between, inplace=inplace, criterion_options=criterion_options,
                        latency_table=latency_table, calibration=calibration, guards=guards, ignore=ignore,
                        normalization=normalization, cost_weight=cost_weight, compensate=compensate,
                        protect_uncompensable=protect_uncompensable, recalibrate_bn=recalibrate_bn,
                        calib_precision=calib_precision, device=device, reconstruct=reconstruct,
                        reconstruct_options=reconstruct_options)
    report["recovered"] = False
    if recover:
        options = recover if isinstance(recover, Recovery) else Recovery()
        report["recovered"] = _recover(model, pruned, calibration, options)
    report["kept_width"] = dict(getattr(pruned, KEPT_WIDTH_ATTR, {}))  # layers the graph keeps whole, and why
    report["peak_memory_mib"] = peak_memory_mib()
    return pruned, report


def _recover(original: nn.Module, pruned: nn.Module, calibration, options: Recovery) -> dict:
    """Label-free recovery of ``pruned`` towards ``original``, on the device ``pruned`` is on."""
    device = next(pruned.parameters()).device
    teacher = copy.deepcopy(original).to(device)
    progress.stage("label-free recovery on the calibration images")
    return recover(teacher, pruned, calibration, options)


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
