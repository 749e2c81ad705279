"""The selection stage's options and its one step: score every channel, allocate removals under a target.

:class:`Selection` is resolved once per prune and travels whole (guards, normalization and cost weight
reach the allocator inside it, not as keywords handed down a chain of functions)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from simprune import distributed, progress
from simprune.allocation.allocator import Allocation, CostModel, Guards, allocate
from simprune.calibrate.batches import check_precision
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph


@dataclass(frozen=True)
class Selection:
    """How channels are chosen: the allocator's ``guards``, layer globs never pruned (``ignore``), how scores
    are made comparable across groups (``normalization``, None: the criterion's), the cost exponent
    (``cost_weight``), the options a criterion named by string is built with, and a data criterion's
    calibration forward precision (``calib_precision``, None: the criterion's own default)."""

    guards: Guards = field(default_factory=Guards)
    ignore: tuple[str, ...] = ()
    normalization: str | None = None
    cost_weight: float = 0.0
    criterion_options: dict[str, Any] | None = None
    calib_precision: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "ignore", tuple(self.ignore or ()))
        object.__setattr__(self, "guards", self.guards or Guards())
        if self.calib_precision is not None:
            check_precision(self.calib_precision)

    def replace(self, **changes) -> Selection:
        return dataclasses.replace(self, **changes)

    def select(self, graph: PruningGraph, crit, target: dict[str, float], cost: CostModel, calibration=None,
               protected: list[str] | tuple = (), preferred: list[str] | tuple = ()) -> tuple[Allocation, Any, float]:
        """Score every channel with ``crit`` and allocate removals under ``target``; returns
        (allocation, criterion result, time scoring ended). Groups in ``protected`` keep all channels; so do
        those in ``preferred`` and those the criterion scored on too little evidence (``result.doubtful``)
        unless the target cannot be reached without them (``alloc.preferred_kept`` says whether they were)."""
        progress.stage(f"scoring channels ({crit.name})")
        result = crit.score(graph, calibration) if getattr(crit, "needs_data", False) else crit.score(graph)
        t_score = time.perf_counter()
        preferred = [*preferred, *sorted(set(getattr(result, "doubtful", ())) - set(preferred))]
        progress.stage(f"allocating the target over {len(graph.groups)} channel groups")
        try:
            alloc = self._allocate(graph, result, target, cost, set(protected) | set(preferred))
            alloc.preferred_kept = True
        except SimpruneError:
            if not preferred:
                raise
            alloc = self._allocate(graph, result, target, cost, set(protected))
            alloc.preferred_kept = False
        alloc.fingerprints = distributed.gather_fingerprints(alloc.remove)
        distributed.check_agree(alloc.remove, "pruning decision")
        return alloc, result, t_score

    def _allocate(self, graph: PruningGraph, result, target: dict[str, float], cost: CostModel,
                  whole: set[str]) -> Allocation:
        scores = {k: v for k, v in result.scores.items() if k not in whole}
        return allocate(graph.groups, scores, cost, target, self.guards, self.normalization or result.normalization,
                        self.cost_weight)

    def to_dict(self) -> dict[str, Any]:
        """The resolved options, for the report."""
        return {"guards": dataclasses.asdict(self.guards), "ignore": list(self.ignore),
                "normalization": self.normalization, "cost_weight": self.cost_weight,
                "criterion_options": dict(self.criterion_options or {}), "calib_precision": self.calib_precision}
