"""Filter similarity (weights only): filters similar to others in their layer go first (methods.md, B).

Redundancy of filter j = the similarity at which it is dropped as a twin within its layer (cosine
by default; Pearson and inverse Euclidean as options), averaged over a residual group's producers.

Normalisation: by chance alone random filters of fan-in 27 reach a median redundancy of 0.36 and
those of fan-in 4608 0.03, so raw scores strip small layers first. ``chance_corrected=True``
rescales the redundancy to r* = (r - r0) / (1 - r0), r0 the median redundancy of the same filters
with each filter's weights shuffled (stats/chance.py), which makes random filters score alike at
every fan-in (bench/normalization.py). It is NOT the default: measured without fine-tuning
(bench/scores.py) it costs 10 points on ResNet-56 at 48 % MACs and 4 on ResNet-20 at 50 %. The
fan-in bias protects the wide late layers, whose channels save few MACs each, so comparable scores
make the allocator remove many more of them. The default is the method's raw 1 - r, compared as it
is ("none"), until the allocator weighs the damage of a removal. A zero filter goes first.
"""
from __future__ import annotations

import torch

from simprune.criteria.base import Criterion, CriterionResult
from simprune.criteria.registry import register
from simprune.criteria.weights import producer_filters
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph
from simprune.stats.chance import chance_corrected, null_level, permuted_rows
from simprune.stats.similarity import FILTER_METRICS, filter_similarity_matrix, redundancy_order


@register("filter-similarity", "filters similar to others in their layer go first (weights only)")
class FilterSimilarity(Criterion):
    normalization = "none"

    def __init__(self, similarity: str = "cosine", chance_corrected: bool = False, seed: int = 0):
        if similarity not in FILTER_METRICS:
            raise SimpruneError(f"unknown similarity {similarity!r} for filter-similarity; "
                                f"choose {', '.join(FILTER_METRICS)}")
        self.similarity, self.chance_corrected, self.seed = similarity, chance_corrected, seed

    def score(self, graph: PruningGraph, calibration=None) -> CriterionResult:
        scores, matrices = {}, {}
        for group in graph.groups:
            filters = producer_filters(group)
            if not filters:
                continue
            S = torch.stack([filter_similarity_matrix(f, self.similarity) for f in filters]).mean(0)
            redundancy, _ = redundancy_order(S)
            if self.chance_corrected:
                null = torch.stack([filter_similarity_matrix(permuted_rows(f, self.seed), self.similarity)
                                    for f in filters]).mean(0)
                r = chance_corrected(redundancy, null_level(null), 1.0)
            else:
                r = redundancy.clamp(min=-1.0)
            r[torch.stack([f.abs().amax(1) == 0 for f in filters]).all(0)] = 1.0
            scores[group.root] = (1.0 - r).float()
            matrices[group.root] = S
        return CriterionResult(scores, normalization=self.normalization, similarity=matrices)
