"""One entry point for the schedules that need no training: one-shot and iterative."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from simprune import progress
from simprune.calibrate.calibration import check_calibration
from simprune.criteria import set_calib_precision
from simprune.distributed import model_device, resolve_device
from simprune.errors import SimpruneError
from simprune.schedules.checks import check_result
from simprune.schedules.iterative import iterative
from simprune.schedules.oneshot import prune_oneshot, resolve_criterion


def run_schedule(model: nn.Module, example_input: torch.Tensor, criterion: str | Any, target: dict[str, float], *,
                 schedule: str = "oneshot", steps: int = 1, between: Callable[[nn.Module, int], None] | None = None,
                 inplace: bool = False, criterion_options: dict | None = None, latency_table=None,
                 calib_precision: str | None = None, device: str | torch.device | None = None,
                 **options) -> tuple[nn.Module, dict]:
    """Prune a copy of ``model`` (``model`` itself when ``inplace``) with the one-shot or iterative schedule;
    ``options`` go to :func:`simprune.schedules.oneshot.prune_oneshot`. The work runs on ``device``
    (None: CUDA when available, else CPU); the pruned model comes back on ``model``'s own device."""
    device = resolve_device(device)
    crit = resolve_criterion(criterion, criterion_options, options.get("calibration"))
    if calib_precision is not None:
        set_calib_precision(crit, calib_precision)
    if options.get("calibration") is not None:  # any iterable: a one-shot one is kept, it is read several times
        options["calibration"] = check_calibration(options["calibration"], example_input)
    if not inplace:
        model = copy.deepcopy(model)
    home = model_device(model)
    model.to(device)
    example_input = example_input.to(device)
    if schedule == "oneshot":
        model, report = prune_oneshot(model, example_input, crit, target, latency_table=latency_table, **options)
    elif schedule == "iterative":
        model, report = iterative(model, example_input, crit, target, steps, between, **options)
    else:
        raise SimpruneError(f"schedule={schedule!r} is not one-shot pruning; use 'oneshot' or 'iterative' "
                            "here and simprune.schedules.soft.soft_prune for 'soft'")
    progress.stage("checking the result")
    report = check_result(model, example_input, report, calibration=options.get("calibration"),
                          ignore=options.get("ignore", ()))
    report["device"] = str(device)
    return model.to(home), report
