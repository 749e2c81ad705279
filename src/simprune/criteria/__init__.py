"""Pruning criteria: each turns a model's channel groups (and, if it needs them,
calibration statistics) into an importance score per channel; higher keeps.

A criterion knows nothing about FLOPs or targets: the allocator does that.
Register new ones with :func:`register`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import SimpruneError


@dataclass
class CriterionResult:
    """Importance per channel of each group (keyed by group root); optional twins for compensation."""

    scores: dict[str, torch.Tensor]
    twins: dict[str, dict[int, int]] = field(default_factory=dict)  # removed channel -> kept twin
    normalization: str = "mean"  # how the allocator makes groups comparable
    compensator: Callable | None = None  # (graph, remove) -> None: fold removed channels into consumers


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


def _load_builtin() -> None:
    from . import weights  # noqa: F401, PLC0415
    try:
        from . import features  # noqa: F401, PLC0415
    except ImportError:
        pass
