"""The schedules as objects: how a prune proceeds (and where it runs). ``simprune.prune(...,
schedule=...)`` takes any of them; each ``run(job)`` returns (pruned model, report)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from simprune.schedules.iterative import iterative
from simprune.schedules.latency import prune_to_latency
from simprune.schedules.oneshot import Job, prune_oneshot
from simprune.schedules.soft import soft_prune


@dataclass(frozen=True)
class OneShot:
    """Score once, allocate, remove, repair. ``device``: where the work runs (None: CUDA when available, else
    CPU); ``latency_table``: allocate a ``{"latency": R}`` target on the table's predictions, unmeasured."""

    device: str | torch.device | None = None
    latency_table: Any = None
    name = "oneshot"
    trains = False

    def run(self, job: Job):
        return prune_oneshot(job, latency_table=self.latency_table)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "device": None if self.device is None else str(self.device),
                "latency_table": self.latency_table is not None}


@dataclass(frozen=True)
class Iterative:
    """``steps`` re-scored one-shot steps toward the target; ``between(model, k)`` (e.g. a fine-tuning
    epoch) after each but the last."""

    steps: int = 5
    between: Callable[[nn.Module, int], None] | None = None
    device: str | torch.device | None = None
    name = "iterative"
    trains = False

    def run(self, job: Job):
        return iterative(job, self.steps, self.between)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "device": None if self.device is None else str(self.device)}


@dataclass(frozen=True)
class Soft:
    """Zero, train, re-select each epoch of ``finetune`` (a :class:`simprune.train.finetune.FineTune`), the
    last ``hold`` epochs frozen; then remove for good. It trains: no repair stage runs."""

    finetune: Any
    hold: int = 0
    name = "soft"
    trains = True
    device = None

    def run(self, job: Job):
        return soft_prune(job, self.finetune, self.hold)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "epochs": self.finetune.cfg.epochs, "hold": self.hold}


@dataclass(frozen=True)
class ToLatency:
    """Prune to a measured onnxruntime batch-1 latency reduction (the ``{"latency": R}`` target) within
    ``tolerance``, re-aiming the allocator with real measurements; ``table`` (None: built first)."""

    table: Any = None
    tolerance: float = 0.02
    threads: int = 1
    max_iterations: int = 6
    runs: int = 50
    log: Callable[[str], None] | None = None
    name = "latency"
    trains = False
    device = None

    def run(self, job: Job):
        kind, ratio = next(iter(job.target.items()))
        return prune_to_latency(job, ratio, threads=self.threads, tolerance=self.tolerance,
                                max_iterations=self.max_iterations, runs=self.runs, table=self.table, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tolerance": self.tolerance, "threads": self.threads,
                "max_iterations": self.max_iterations, "runs": self.runs, "table": self.table is not None}


SCHEDULES = (OneShot, Iterative, Soft, ToLatency)
