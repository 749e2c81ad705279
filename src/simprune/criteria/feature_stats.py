"""Feature statistics: DFS (diversity) then SFS (similarity), see shared methods.md, section C.

One knob walks both thresholds: channel c goes once lambda > min(DFS_c, SFS_c), with
DFS_c = M-std_c / the group's median M-std (flat maps go first; the median makes the DFS threshold
comparable across layers) and SFS_c = (1 - r_c) / sfs_scale, r_c the cosine threshold at which SFS
drops c (of a similar pair the lower M-std goes). ``sfs_scale`` sets how fast the SFS threshold
falls relative to the DFS one (reconstructed choice: 1).

Normalisation: r_c is chance-corrected like QSFM's (raw maps after ReLU are non-negative, so
unrelated maps already have cosine 0.3-0.5, depending on sparsity and map size); both parts are
then comparable across groups and the allocator uses the scores as they are ("none").
"""
from __future__ import annotations

import torch

from simprune.calibrate.calibration import mean_null_similarity, mean_similarity
from simprune.criteria.base import CriterionResult, DataCriterion, FoldData
from simprune.criteria.registry import register
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph
from simprune.stats.chance import chance_corrected, null_level
from simprune.stats.similarity import redundancy_order


@register("feature-stats", "DFS (low M-std maps go) then SFS (of similar maps, the lower M-std goes)")
class FeatureStats(DataCriterion):
    """Importance = min(DFS, SFS) per channel; twins (SFS pairs) feed the compensation."""

    compensate_by_default = True
    normalization = "none"

    def __init__(self, sfs_scale: float = 1.0, compensation: str = "lstsq", affine: bool = False,
                 chance_corrected: bool = True, **kw):
        super().__init__(**kw)
        if sfs_scale <= 0:
            raise SimpruneError("feature-stats sfs_scale must be > 0")
        self.sfs_scale, self.compensation, self.affine = sfs_scale, compensation, affine
        self.chance_corrected = chance_corrected
        self.metrics = frozenset({"mstd", "cosine", "gram"} | ({"null"} if chance_corrected else set()))

    def score(self, graph: PruningGraph, calibration) -> CriterionResult:
        probes = self.statistics(graph, calibration)
        scores, twins = {}, {}
        for root, plist in probes.items():
            mstd = torch.stack([p.stats.mstd() for p in plist]).mean(0)
            dfs = mstd / mstd.median().clamp(min=1e-12)
            redundancy, twin = redundancy_order(mean_similarity(plist, "cosine"), keep_priority=mstd)
            if self.chance_corrected:
                r = chance_corrected(redundancy, null_level(mean_null_similarity(plist, "cosine")), 1.0)
            else:
                r = redundancy.clamp(min=-1.0)
            sfs = (1 - r) / self.sfs_scale
            scores[root] = torch.minimum(dfs, sfs).float()
            twins[root] = {j: int(i) for j, i in enumerate(twin.tolist()) if i >= 0}
        return CriterionResult(scores, twins, normalization=self.normalization,
                               fold=FoldData(probes, self.compensation, self.affine))
