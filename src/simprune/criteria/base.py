"""The criterion interface: a criterion turns a model's channel groups (and, when it needs them,
calibration images) into an importance per channel, higher keeps. It knows nothing about FLOPs or
targets; the allocator does that, after making groups comparable by the criterion's own
``normalization`` (each criterion states which and why)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from simprune.calibrate.calibration import Probe, check_precision, collect_statistics
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph

COMPENSATIONS = ("lstsq", "twin")  # the channel folds :mod:`simprune.repair.fold` knows


def check_compensation(mode: str) -> str:
    """``mode`` when it is a known channel fold, else a one-line error."""
    if mode not in COMPENSATIONS:
        raise SimpruneError(f"unknown compensation {mode!r}; use {' or '.join(COMPENSATIONS)}")
    return mode


@dataclass
class FoldData:
    """What the repair's channel fold needs from a data criterion: the statistics of each group's readers
    (``probes``, by root), the criterion's default fold ``mode`` and whether it also fits an offset."""

    probes: dict[str, list[Probe]]
    mode: str = "lstsq"
    affine: bool = False

    def __post_init__(self):
        check_compensation(self.mode)


@dataclass
class CriterionResult:
    """Importance per channel of each group (keyed by group root), and data, never closures, for the
    repair: twins and the statistics a channel fold consumes (None: the criterion has no fold)."""

    scores: dict[str, torch.Tensor]
    twins: dict[str, dict[int, int]] = field(default_factory=dict)  # removed channel -> kept twin
    normalization: str = "mean"  # how the allocator makes groups comparable
    fold: FoldData | None = None  # what simprune.repair.fold folds removed channels with
    similarity: dict[str, torch.Tensor] = field(default_factory=dict)  # root -> (C, C) matrix, for reports
    notes: dict[str, str] = field(default_factory=dict)  # what the criterion did that a report should say
    doubtful: set[str] = field(default_factory=set)  # roots scored on too little evidence: kept whole unless needed


class Criterion(ABC):
    """Base of every criterion. Subclasses set ``normalization`` (how the allocator compares groups)
    and, for data-driven ones, ``needs_data``; ``name`` comes from :func:`register`."""

    name: str = ""
    needs_data: bool = False
    compensate_by_default: bool = False
    normalization: str = "mean"

    @abstractmethod
    def score(self, graph: PruningGraph, calibration=None) -> CriterionResult:
        """Importance of every channel of every prunable group of ``graph``."""


class DataCriterion(Criterion):
    """A criterion computed from feature-map statistics of one calibration pass (``metrics``)."""

    needs_data = True
    metrics: frozenset[str] = frozenset()

    def __init__(self, calib_precision: str = "bf16", progress: bool = True, reduce=None, window: int = 7):
        """``calib_precision``: the forward pass that gathers statistics, "bf16" (autocast, fast on AMX)
        or "fp32"; statistics themselves are float32 products summed in float64 either way."""
        self.calib_precision = check_precision(calib_precision)
        self.progress, self.reduce, self.window = progress, reduce, window

    def statistics(self, graph: PruningGraph, calibration) -> dict[str, list[Probe]]:
        if calibration is None:
            raise SimpruneError(f"criterion {self.name!r} needs calibration data; pass calibration=")
        return collect_statistics(graph.model, graph, calibration, set(self.metrics), precision=self.calib_precision,
                                  progress=self.progress, window=self.window, reduce=self.reduce)
