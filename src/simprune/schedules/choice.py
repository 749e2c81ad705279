"""``criterion="auto"``: choose the criterion on the user's own model and images, not on ours.

No one criterion is best on every network: refit-error was 0.3 points from the unpruned Fashion-MNIST
ResNet-56 at 47 % where l1 + refit lost 8, while on the ImageNet MobileNetV2 tp:l2 + refit kept 63 % top-1
at 35 % where refit-error kept 55. So each candidate prunes a copy of the model on most of the calibration
images (repair included, recovery left out), the copy that moves the model's output least on the images
held aside wins (KL of the logits for a classifier, relative squared error of every output otherwise:
:func:`simprune.calibrate.sensitivity.output_change`), and the real prune then runs with the winner on all
the images. The report's ``criterion_choice`` records every candidate's change.

Two candidates, because each costs a whole trial prune. On MobileNetV2 at 35 % (held-aside KL, 100
calibration images) tp:fpgm scored 0.70, tp:l2 0.79, l1 1.30, refit-error 1.30, tp:lamp 3.48 and
tp:bnscale 3.93; adding tp:fpgm cost 220 s more for an 11 % lower KL (and 61.8 % evaluation top-1
against tp:l2's 63.2), so it is left to ``Choose(candidates=...)``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from simprune import distributed, progress
from simprune.calibrate.batches import Calibration, run_model
from simprune.calibrate.sensitivity import output_change, output_tensors
from simprune.errors import SimpruneError
from simprune.repair.stage import Repair
from simprune.schedules.oneshot import Job, prune_oneshot

AUTO = "auto"


@dataclass(frozen=True)
class Choose:
    """How ``criterion="auto"`` chooses: ``candidates`` each prune on all but a seeded ``share`` of the
    calibration images; with fewer than ``min_images`` (too few to hold a fair share aside), or a schedule
    that trains or measures latency, ``fallback`` is used without trials."""

    candidates: tuple = ("refit-error", "tp:l2")  # registry names or criterion objects (see the module doc)
    share: float = 0.2
    min_images: int = 100
    seed: int = 0
    fallback: str = "refit-error"

    def __post_init__(self):
        if not self.candidates:
            raise SimpruneError("Choose(candidates=...) needs at least one criterion name")
        if not 0 < self.share < 1:
            raise SimpruneError(f"Choose(share=...) must lie between 0 and 1, got {self.share}")

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": [_name(c) for c in self.candidates], "share": self.share, "min_images": self.min_images,
                "seed": self.seed, "fallback": self.fallback}


def wants_choice(criterion) -> bool:
    return isinstance(criterion, Choose) or criterion == AUTO


def choose_criterion(choose: Choose, model: nn.Module, example: torch.Tensor, target: dict[str, float],
                     calibration, selection, repair: Repair, schedule) -> tuple[Any, dict[str, Any]]:
    """(the winning candidate, the record of the choice) for pruning ``model`` to ``target``."""
    calibration = Calibration.of(calibration, example)
    if calibration is None:
        return "l1", {"chosen": "l1", "tried": {}, "why": "no calibration images: the weight-only default"}
    images = _sum_over_ranks(calibration.count())  # every rank decides on all the images, or ranks disagree
    why_not = _why_no_trials(choose, images, schedule)
    if why_not:
        return choose.fallback, {"chosen": choose.fallback, "tried": {}, "why": why_not}
    t0 = time.perf_counter()
    fit, held = calibration.hold_aside(choose.share, choose.seed)
    size = int(calibration.first_images().shape[0])
    reference = _outputs(model, held, size)
    trial_repair = repair.replace(recover=None)  # the choice compares criteria, the recovery comes after
    changes, failures, by_name = {}, {}, {_name(c): c for c in choose.candidates}
    for k, (name, candidate) in enumerate(by_name.items(), 1):
        progress.stage(f"choosing the criterion: pruning with {name} ({k}/{len(choose.candidates)}) on "
                       f"{calibration.count() - len(held)} images, {len(held)} held aside (this process)")
        try:
            pruned = _trial(candidate, model, example, target, fit, selection, trial_repair)
        except SimpruneError as exc:  # e.g. the target is out of this criterion's reach
            failures[name] = str(exc)
            continue
        changes[name] = distributed.mean_over_ranks(sum(output_change(r, p) * len(x) for r, p, x in
                                             zip(reference, _outputs(pruned, held, size), held.split(size))), len(held))
        progress.note(f"{name}: output change {changes[name]:.4g} on {len(held)} held-aside images")
    if not changes:
        raise SimpruneError("criterion='auto': no candidate could prune to this target ("
                            + "; ".join(f"{n}: {e}" for n, e in failures.items()) + ")")
    chosen = min(changes, key=changes.get)
    return by_name[chosen], {"chosen": chosen, "tried": changes, "failed": failures, "held_aside_images": len(held),
                    "measure": _measure_name(reference), "seconds": time.perf_counter() - t0,
                    "options": choose.to_dict()}


def _why_no_trials(choose: Choose, images: int, schedule) -> str | None:
    if len(choose.candidates) == 1:
        return "one candidate"
    if schedule.trains or schedule.name == "latency":
        return f"the {schedule.name} schedule is not tried per candidate"
    if images < choose.min_images:
        return (f"{images} calibration images; choosing holds {choose.share:.0%} aside and needs at least "
                f"{choose.min_images}")
    return None


def _sum_over_ranks(count: int) -> int:
    """``count`` summed over the torchrun ranks (each holds a shard of the calibration images)."""
    if not distributed.active():
        return count
    return int(distributed.all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64))[0])


def _name(candidate) -> str:
    return candidate if isinstance(candidate, str) else candidate.name


def _trial(candidate, model: nn.Module, example, target, fit: Calibration, selection, repair):
    """A copy of ``model`` pruned one-shot with ``candidate`` (a criterion or its name) on ``fit``."""
    pruned, _ = prune_oneshot(Job(copy.deepcopy(model), example, candidate, dict(target), fit, selection, repair))
    return pruned


def _outputs(model: nn.Module, images: torch.Tensor, size: int) -> list[list[torch.Tensor]]:
    """The model's output tensors for ``images``, batch by batch of ``size``."""
    with Calibration.running(model) as device:
        return [[t.cpu() for t in output_tensors(run_model(model, x.to(device)))] for x in images.split(size)]


def _measure_name(reference: list[list[torch.Tensor]]) -> str:
    first = reference[0]
    return "KL of the logits" if len(first) == 1 and first[0].dim() == 2 else "relative squared output error"
