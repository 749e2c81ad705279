"""Pruning criteria: each turns a model's channel groups (and, if it needs them,
calibration statistics) into an importance score per channel; higher keeps.

A criterion knows nothing about FLOPs or targets: the allocator does that.
Register new ones with :func:`register`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from simprune.errors import SimpruneError


@dataclass
class CriterionResult:
    """Importance per channel of each group (keyed by group root); optional twins for compensation."""

    scores: dict[str, torch.Tensor]
    twins: dict[str, dict[int, int]] = field(default_factory=dict)  # removed channel -> kept twin
    normalization: str = "mean"  # how the allocator makes groups comparable
    compensator: Callable | None = None  # (graph, remove) -> None: fold removed channels into consumers
    similarity: dict[str, torch.Tensor] = field(default_factory=dict)  # root -> (C, C) matrix, for reports


_CRITERIA: dict[str, tuple[type, str]] = {}


def register(name: str, description: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.name = name
        _CRITERIA[name] = (cls, description)
        return cls
    return wrap


def available_criteria() -> dict[str, str]:
    _load_builtin()
    return {n: d for n, (_, d) in sorted(_CRITERIA.items())}


def get_criterion(name: str, **options):
    """Instantiate a criterion by name with its options (e.g. ``similarity="pearson"``)."""
    _load_builtin()
    if name not in _CRITERIA:
        raise SimpruneError(f"unknown criterion {name!r}; choose one of {', '.join(sorted(_CRITERIA))}")
    cls = _CRITERIA[name][0]
    try:
        return cls(**options)
    except TypeError as exc:
        raise SimpruneError(f"criterion {name!r} does not take these options: {exc}") from exc


class ScoreCache:
    """Wraps a criterion and keeps its last result (``.result``, e.g. for a report's heat maps).

    With ``reuse`` every later call returns that first result: the scores of one unpruned model then
    serve several targets without a second calibration pass (only valid when every call sees the
    same model, as in a comparison across targets; iterative schedules need ``reuse=False``).
    """

    def __init__(self, criterion, reuse: bool = False):
        self.criterion, self.reuse, self.result = criterion, reuse, None

    def __getattr__(self, name: str):  # name, needs_data, compensate_by_default, ...
        if name == "criterion":
            raise AttributeError(name)
        return getattr(self.criterion, name)

    def score(self, graph, calibration=None) -> CriterionResult:
        if self.result is None or not self.reuse:
            crit = self.criterion
            self.result = crit.score(graph, calibration) if getattr(crit, "needs_data", False) else crit.score(graph)
        return self.result


def _load_builtin() -> None:
    from simprune.criteria import refit_error, weights  # noqa: F401, PLC0415
    try:
        from simprune.criteria import features  # noqa: F401, PLC0415
    except ImportError:
        pass
