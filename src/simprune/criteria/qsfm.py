"""QSFM: quantified similarity of feature maps (see shared methods.md, section A).

A channel whose map duplicates a kept channel's adds little: visiting channels by descending
similarity, channel j is dropped as the twin of a kept i; its redundancy is the similarity at which
that happens (``redundancy_order``, the nested rule), so one threshold across the network gives
each layer its own rate.

Normalisation (the default, ``chance_corrected=True``): redundancy r is a maximum over partners,
so unrelated maps already look similar where similarities are noisy or biased (small maps, few
images, non-negative maps under cosine); r is rescaled to (r - r0) / (ceiling - r0), r0 the
median redundancy of maps of different images (stats/chance.py), and the allocator compares the
scores 1 - r* as they are ("none"). ``chance_corrected=False`` gives the raw ceiling - r.
A channel constant over every calibration pixel (dead after ReLU) carries nothing: it goes first.
"""
from __future__ import annotations

import torch

from simprune.calibrate.calibration import Probe, mean_null_similarity, mean_similarity
from simprune.criteria.base import CriterionResult, DataCriterion, FoldData
from simprune.criteria.registry import register
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph
from simprune.stats.chance import chance_corrected, null_level
from simprune.stats.similarity import SIMILARITIES, redundancy_order

PSNR_CAP = 100.0


def similarity_ceiling(metric: str) -> float:
    """The largest value a similarity can take: identical maps."""
    return PSNR_CAP if metric == "psnr" else 1.0


def constant_channels(probes: list[Probe]) -> torch.Tensor:
    """(C,) True where a channel is constant at every probe of its group."""
    return torch.stack([p.stats.constant_channels() for p in probes]).all(0)


def group_redundancy(probes: list[Probe], metric: str, chance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(redundancy in [-1, 1] (1: a duplicate or constant channel), twin per channel) of one group.
    Chance-corrected, or the raw similarity divided by its ceiling."""
    ceiling = similarity_ceiling(metric)
    redundancy, twin = redundancy_order(mean_similarity(probes, metric))
    if chance:
        r = chance_corrected(redundancy, null_level(mean_null_similarity(probes, metric)), ceiling)
    else:
        r = redundancy.clamp(min=-ceiling) / ceiling
    r[constant_channels(probes)] = 1.0
    return r, twin


@register("qsfm", "QSFM: channels whose feature maps duplicate a kept channel's (SSIM/PSNR/cosine) go first")
class QSFM(DataCriterion):
    """Importance = 1 - redundancy (chance-corrected by default); twins feed the compensation."""

    compensate_by_default = True
    normalization = "none"

    def __init__(self, similarity: str = "ssim", compensation: str = "lstsq", affine: bool = False,
                 chance_corrected: bool = True, **kw):
        super().__init__(**kw)
        if similarity not in SIMILARITIES:
            raise SimpruneError(f"unknown similarity {similarity!r} for qsfm; choose {', '.join(SIMILARITIES)}")
        self.similarity, self.compensation, self.affine = similarity, compensation, affine
        self.chance_corrected = chance_corrected
        self.metrics = frozenset({similarity, "gram"} | ({"null"} if chance_corrected else set()))

    def score(self, graph: PruningGraph, calibration) -> CriterionResult:
        probes = self.statistics(graph, calibration)
        ceiling = similarity_ceiling(self.similarity)
        scores, twins, matrices = {}, {}, {}
        for root, plist in probes.items():
            matrices[root] = mean_similarity(plist, self.similarity)
            r, twin = group_redundancy(plist, self.similarity, self.chance_corrected)
            scores[root] = ((1.0 - r) if self.chance_corrected else ceiling * (1.0 - r)).float()
            twins[root] = {j: int(i) for j, i in enumerate(twin.tolist()) if i >= 0}
        return CriterionResult(scores, twins, normalization=self.normalization, similarity=matrices,
                               fold=FoldData(probes, self.compensation, self.affine))
