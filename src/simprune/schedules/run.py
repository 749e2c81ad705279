"""One entry point for every schedule: resolve the stage options once, run the schedule, check the result."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from simprune import progress
from simprune.allocation.selection import Selection
from simprune.calibrate.batches import Calibration
from simprune.distributed import model_device, resolve_device
from simprune.errors import SimpruneError
from simprune.repair.stage import Repair
from simprune.schedules.checks import check_result
from simprune.schedules.choice import Choose, choose_criterion, wants_choice
from simprune.schedules.kinds import Iterative, OneShot, ToLatency
from simprune.schedules.oneshot import Job
from simprune.schedules.report import PruneReport


def resolve_target(target: dict[str, float] | None) -> dict[str, float]:
    """The target with "macs" (its documented name) spelled "flops" as the allocator and report do;
    None: half the MACs."""
    if target is None:
        return {"flops": 0.5}
    if not isinstance(target, dict):
        raise SimpruneError("give exactly one target: {'macs': R} or {'params': R}")
    return {("flops" if k == "macs" else k): v for k, v in target.items()}


def run_schedule(model: nn.Module, example_input: torch.Tensor, criterion: str | Any, target: dict[str, float], *,
                 calibration=None, selection: Selection | None = None, repair: Repair | None = None,
                 schedule=None, inplace: bool = False) -> tuple[nn.Module, PruneReport]:
    """Prune a copy of ``model`` (``model`` itself when ``inplace``) with ``schedule`` (default
    :class:`OneShot`). One-shot and iterative work runs on ``schedule.device`` (None: CUDA when available,
    else CPU) and the pruned model comes back on ``model``'s own device."""
    schedule = schedule or OneShot()
    selection = selection or Selection()
    repair = Repair.none() if schedule.trains else (repair or Repair.auto())
    target = resolve_target(target)
    if isinstance(schedule, ToLatency) and "latency" not in target:
        raise SimpruneError("schedule=ToLatency() prunes to a {'latency': R} target")
    device = resolve_device(schedule.device) if isinstance(schedule, (OneShot, Iterative)) else None
    if not inplace:
        model = copy.deepcopy(model)
    home = model_device(model)
    if device is not None:
        model.to(device)
        example_input = example_input.to(device)
    choice = None
    if wants_choice(criterion):  # "auto": each candidate prunes a copy on most images, the rest judge
        calibration = Calibration.of(calibration, example_input)
        criterion, choice = choose_criterion(criterion if isinstance(criterion, Choose) else Choose(), model,
                                             example_input, target, calibration, selection, repair, schedule)
    job = Job(model, example_input, criterion, target, calibration, selection, repair)
    model, report = schedule.run(job)
    if choice is not None:
        report["criterion_choice"] = choice
    progress.stage("checking the result")
    report = check_result(model, example_input, report, calibration=job.calibration, ignore=selection.ignore)
    if device is not None:
        report["device"] = str(device)
    report.options = {"selection": selection.to_dict(), "repair": job.repair.to_dict(),
                      "schedule": schedule.to_dict()}
    return model.to(home), report
