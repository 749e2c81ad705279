"""Weight-only criteria: L1/L2 filter norms (Li et al.), FPGM (geometric median), random.

A group's filters are the rows of its producing layers (conv/linear outputs);
depthwise convs count only when the group has no other producer. Scores of
several producers (residual groups) are summed.

Normalisation "mean" (each group divided by its mean): a norm grows with fan-in and with the
layer's weight scale, and FPGM's distance sum with fan-in and channel count, none of which says
how important a channel is; within a group the ranking is the paper's, and dividing by the group
mean makes random filters score a median of ~1 at any fan-in (bench/normalization.py).
"""
from __future__ import annotations

import torch

from simprune.criteria.base import Criterion, CriterionResult
from simprune.criteria.registry import register
from simprune.graph.groups import ChannelGroup, PruningGraph, is_depthwise


def producer_filters(group: ChannelGroup) -> list[torch.Tensor]:
    """Each producing layer's filters for this group's channels, flattened: (channels, fan-in)."""
    producers = [m for m in group.producers if not is_depthwise(m.module)] or group.producers
    out = []
    for m in producers:
        w = m.module.weight.detach().float()
        idx = torch.as_tensor(m.idxs)
        if len(idx) != group.size:  # e.g. conv channels flattened into a Linear: fold back per channel
            continue
        out.append(w[idx].reshape(group.size, -1))
    return out


class WeightCriterion(Criterion):
    """Score each producer's filters with :meth:`per_layer` and sum over producers."""

    normalization = "mean"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def per_layer(self, filters: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, graph: PruningGraph, calibration=None) -> CriterionResult:
        scores = {}
        for group in graph.groups:
            filters = producer_filters(group)
            if filters:
                scores[group.root] = sum(self.per_layer(f) for f in filters)
        return CriterionResult(scores, normalization=self.normalization)


@register("l1", "L1 norm of each filter (Li et al. 2017)")
class L1(WeightCriterion):
    def per_layer(self, filters):
        return filters.abs().sum(1)


@register("l2", "L2 norm of each filter")
class L2(WeightCriterion):
    def per_layer(self, filters):
        return filters.norm(dim=1)


@register("fpgm", "sum of Euclidean distances to the layer's other filters (FPGM, He et al. 2019)")
class FPGM(WeightCriterion):
    """Filters near the geometric median are replaceable: smallest distance sum goes first."""

    def per_layer(self, filters):
        return torch.cdist(filters.double(), filters.double()).sum(1).float()


@register("random", "uniformly random scores (seeded): the floor every criterion must beat")
class Random(WeightCriterion):
    """Normalisation "rank": random scores carry no scale, so every group is ranked uniformly."""

    normalization = "rank"

    def score(self, graph, calibration=None):
        g = torch.Generator().manual_seed(self.seed)
        return CriterionResult({grp.root: torch.rand(grp.size, generator=g) for grp in graph.groups},
                               normalization=self.normalization)
