"""HRank: the mean matrix rank of each channel's feature map (low rank goes; Lin et al. 2020).

Normalisation: the rank of an H x W map is at most min(H, W), so a raw mean rank says more about
the map size than about the channel; the score is the mean rank as a fraction of min(H, W)
(random maps score 1 at every size) and the allocator compares it as it is ("none"). Pooled
probes (one value per image, e.g. a Linear after global pooling) have no spatial rank; they count
only for groups without a spatial reader, where a channel that is always zero scores 0.
"""
from __future__ import annotations

import torch

from simprune.criteria.base import CriterionResult, DataCriterion
from simprune.criteria.registry import register
from simprune.graph.groups import PruningGraph


@register("hrank", "HRank: mean matrix rank of each channel's feature map (low rank goes)")
class HRank(DataCriterion):
    metrics = frozenset({"rank"})
    normalization = "none"

    def score(self, graph: PruningGraph, calibration) -> CriterionResult:
        probes = self.statistics(graph, calibration)
        scores = {}
        for root, plist in probes.items():
            spatial = [p for p in plist if not p.stats.pooled] or plist
            scores[root] = torch.stack([p.stats.rank_fraction() for p in spatial]).mean(0).float()
        return CriterionResult(scores, normalization=self.normalization)
