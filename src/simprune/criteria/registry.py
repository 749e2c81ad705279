"""The criteria registry: names to classes. Built-in families are imported by the package itself,
so an error inside one surfaces as that error, never as "unknown criterion"."""
from __future__ import annotations

from typing import Callable

from simprune.calibrate.calibration import check_precision
from simprune.criteria.base import Criterion, CriterionResult
from simprune.errors import SimpruneError

_CRITERIA: dict[str, tuple[type, str]] = {}


def register(name: str, description: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`Criterion` subclass available as ``name``."""
    def wrap(cls: type) -> type:
        if not issubclass(cls, Criterion):
            raise TypeError(f"criterion {name!r} must subclass simprune.criteria.Criterion")
        cls.name = name
        _CRITERIA[name] = (cls, description)
        return cls
    return wrap


def available_criteria() -> dict[str, str]:
    return {n: d for n, (_, d) in sorted(_CRITERIA.items())}


def default_criterion(with_data: bool) -> str:
    """The criterion used when none is named: "auto" when calibration images are there (refit-error and
    tp:l2 each prune a trial copy and the held-aside images choose, :mod:`simprune.schedules.choice`: neither
    wins everywhere, l1 + refit lost 8 points on ResNet-56 at 47 % where refit-error lost 0.3, and tp:l2 +
    refit kept 8 more points of MobileNetV2's ImageNet top-1 at 35 %), else l1."""
    return "auto" if with_data else "l1"


def get_criterion(name: str, **options) -> Criterion:
    """Instantiate a criterion by name with its options (e.g. ``similarity="pearson"``)."""
    if name not in _CRITERIA:
        raise SimpruneError(f"unknown criterion {name!r}; choose one of {', '.join(sorted(_CRITERIA))}")
    cls = _CRITERIA[name][0]
    try:
        return cls(**options)
    except TypeError as exc:
        raise SimpruneError(f"criterion {name!r} does not take these options: {exc}") from exc


def set_calib_precision(criterion, precision: str, keyword: str = "calib_precision") -> None:
    """Set the calibration forward precision of a data criterion (through a :class:`ScoreCache`);
    a weight-only criterion reads no images, so asking is refused rather than ignored."""
    inner = criterion.criterion if isinstance(criterion, ScoreCache) else criterion
    if not getattr(inner, "needs_data", False) or not hasattr(inner, "calib_precision"):  # one name on every one
        raise SimpruneError(f"{keyword} applies to data criteria; {getattr(inner, 'name', inner)!r} reads no "
                            "calibration images")
    inner.calib_precision = check_precision(precision, keyword)


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
