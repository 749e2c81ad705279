"""Similarity criteria: QSFM (feature maps), filter similarity (weights), DFS+SFS (feature
statistics) and HRank (feature-map rank). See shared methods.md for the sources.

Each turns statistics into an importance per channel (higher keeps) that the global
allocator ranks; where channels are removed as twins of kept ones, the result also
carries a compensator that folds them into the next layers (least squares on the
calibration maps).
"""
from __future__ import annotations

import math

import torch

from simprune.calibrate.calibration import Probe, collect_statistics, mean_similarity
from simprune.criteria import CriterionResult, register
from simprune.criteria.weights import producer_filters
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph
from simprune.stats.channel_stats import fit_compensation
from simprune.stats.similarity import (
    FILTER_METRICS,
    SIMILARITIES,
    filter_similarity_matrix,
    redundancy_order,
)

PSNR_CAP = 100.0


def _similarity_ceiling(metric: str) -> float:
    """The largest value a similarity can take: importance = ceiling - redundancy stays >= 0."""
    return PSNR_CAP if metric == "psnr" else 1.0


def resolve_twin(j: int, twin: dict[int, int], removed: set[int]) -> int | None:
    """Follow j's twin chain to a channel that survives (None when the chain ends in removed ones)."""
    seen = set()
    i = twin.get(j, -1)
    while i in removed and i not in seen and i >= 0:
        seen.add(i)
        i = twin.get(i, -1)
    return None if i < 0 or i in removed else i


def lstsq_coefficients(gram: torch.Tensor, removed: list[int], kept: list[int], ridge: float = 1e-6) -> torch.Tensor:
    """A (|removed| x |kept|) minimising sum ||x_r - A x_k||^2 over the calibration pixels (ridge-damped)."""
    g_kk = gram[kept][:, kept]
    damp = ridge * g_kk.diagonal().mean().clamp(min=1e-12)
    lhs = g_kk + damp * torch.eye(len(kept), dtype=gram.dtype)
    return torch.linalg.solve(lhs, gram[kept][:, removed]).T


COMPENSATIONS = ("lstsq", "twin")


def make_compensator(probes: dict[str, list[Probe]], twins: dict[str, dict[int, int]], default: str = "lstsq",
                     affine: bool = False):
    """Fold removed channels into the kept ones at every consumer of the group.

    mode "twin" (the method): W[:, i] += a W[:, j] for each removed j and its surviving twin i.
    mode "lstsq" (beyond the method): x_removed ~ A x_kept jointly by least squares, W_kept += W_removed A.
    """
    _check_compensation(default)

    def compensate(graph: PruningGraph, remove: dict[str, list[int]], mode: str | None = None) -> None:
        mode = _check_compensation(mode or default)
        for root, chans in remove.items():
            removed = set(chans)
            for probe in probes.get(root, []):
                layer = graph.model.get_submodule(probe.member.name)  # by name: works on a copy too
                w = layer.weight.data
                idxs = probe.member.idxs
                if mode == "lstsq":
                    kept = [c for c in range(len(idxs)) if c not in removed]
                    A = lstsq_coefficients(probe.stats.gram(), sorted(removed), kept).to(w.dtype)
                    col_k, col_r = torch.as_tensor([idxs[c] for c in kept]), torch.as_tensor(
                        [idxs[c] for c in sorted(removed)])
                    w[:, col_k] += torch.einsum("or...,rk->ok...", w[:, col_r], A)
                    continue
                for j in chans:
                    i = resolve_twin(j, twins.get(root, {}), removed)
                    if i is None:
                        continue
                    a, b = fit_compensation(probe.stats, i, j, affine=affine)
                    if not math.isfinite(a):
                        continue
                    ci, cj = idxs[i], idxs[j]
                    w[:, ci] += a * w[:, cj]
                    if affine and b and getattr(layer, "bias", None) is not None:
                        layer.bias.data += b * w[:, cj].reshape(w.shape[0], -1).sum(1)
    return compensate


def _check_compensation(mode: str) -> str:
    if mode not in COMPENSATIONS:
        raise SimpruneError(f"unknown compensation {mode!r}; use {' or '.join(COMPENSATIONS)}")
    return mode


class DataCriterion:
    needs_data = True
    compensate_by_default = False
    metrics: set[str] = set()

    def __init__(self, bf16: bool = True, progress: bool = True, reduce=None, window: int = 7):
        self.bf16, self.progress, self.reduce, self.window = bf16, progress, reduce, window

    def statistics(self, graph: PruningGraph, calibration) -> dict[str, list[Probe]]:
        return collect_statistics(graph.model, graph, calibration, self.metrics, bf16=self.bf16,
                                  progress=self.progress, window=self.window, reduce=self.reduce)


@register("qsfm", "QSFM: channels whose feature maps duplicate a kept channel's (SSIM/PSNR/cosine) go first")
class QSFM(DataCriterion):
    """Redundancy of channel j = the similarity threshold at which j is dropped as a twin (nested rule)."""

    compensate_by_default = True

    def __init__(self, similarity: str = "ssim", compensation: str = "lstsq", affine: bool = False, **kw):
        super().__init__(**kw)
        if similarity not in SIMILARITIES:
            raise SimpruneError(f"unknown similarity {similarity!r} for qsfm; choose {', '.join(SIMILARITIES)}")
        self.similarity, self.compensation, self.affine = similarity, compensation, affine
        self.metrics = {similarity, "gram"}

    def score(self, graph: PruningGraph, calibration) -> CriterionResult:
        probes = self.statistics(graph, calibration)
        ceiling = _similarity_ceiling(self.similarity)
        scores, twins, matrices = {}, {}, {}
        for root, plist in probes.items():
            matrices[root] = mean_similarity(plist, self.similarity)
            redundancy, twin = redundancy_order(matrices[root])
            redundancy = redundancy.clamp(min=-ceiling)  # the never-dropped channel: least redundant
            scores[root] = (ceiling - redundancy).float()
            twins[root] = {j: int(i) for j, i in enumerate(twin.tolist()) if i >= 0}
        return CriterionResult(scores, twins, normalization="none", similarity=matrices,
                               compensator=make_compensator(probes, twins, self.compensation, self.affine))


@register("feature-stats", "DFS (low M-std maps go) then SFS (of similar maps, the lower M-std goes)")
class FeatureStats(DataCriterion):
    """One knob walks both thresholds: channel c goes once lambda > min(M-std_c / median, (1 - r_c) / sfs_scale).

    M-std is normalised by the group median so the DFS threshold is comparable across layers;
    r_c is the cosine threshold at which SFS drops c. ``sfs_scale`` sets how fast the SFS
    threshold falls relative to the DFS one (reconstructed choice: 1).
    """

    compensate_by_default = True
    metrics = {"mstd", "cosine", "gram"}

    def __init__(self, sfs_scale: float = 1.0, compensation: str = "lstsq", affine: bool = False, **kw):
        super().__init__(**kw)
        if sfs_scale <= 0:
            raise SimpruneError("feature-stats sfs_scale must be > 0")
        self.sfs_scale, self.compensation, self.affine = sfs_scale, compensation, affine

    def score(self, graph: PruningGraph, calibration) -> CriterionResult:
        probes = self.statistics(graph, calibration)
        scores, twins = {}, {}
        for root, plist in probes.items():
            mstd = torch.stack([p.stats.mstd() for p in plist]).mean(0)
            dfs = mstd / mstd.median().clamp(min=1e-12)
            redundancy, twin = redundancy_order(mean_similarity(plist, "cosine"), keep_priority=mstd)
            sfs = (1 - redundancy.clamp(min=-1.0)) / self.sfs_scale
            scores[root] = torch.minimum(dfs, sfs).float()
            twins[root] = {j: int(i) for j, i in enumerate(twin.tolist()) if i >= 0}
        return CriterionResult(scores, twins, normalization="none",
                               compensator=make_compensator(probes, twins, self.compensation, self.affine))


@register("hrank", "HRank: mean matrix rank of each channel's feature map (low rank goes)")
class HRank(DataCriterion):
    metrics = {"rank"}

    def score(self, graph: PruningGraph, calibration) -> CriterionResult:
        probes = self.statistics(graph, calibration)
        scores = {root: torch.stack([p.stats.mean_rank() for p in plist]).mean(0).float()
                  for root, plist in probes.items()}
        return CriterionResult(scores, normalization="max")


@register("filter-similarity", "filters similar to others in their layer go first (weights only)")
class FilterSimilarity:
    """Redundancy of filter j = the similarity at which it is dropped as a twin within its layer."""

    needs_data = False

    def __init__(self, similarity: str = "cosine"):
        if similarity not in FILTER_METRICS:
            raise SimpruneError(f"unknown similarity {similarity!r} for filter-similarity; "
                                f"choose {', '.join(FILTER_METRICS)}")
        self.similarity = similarity

    def score(self, graph: PruningGraph, calibration=None) -> CriterionResult:
        scores, matrices = {}, {}
        for group in graph.groups:
            filters = producer_filters(group)
            if not filters:
                continue
            S = torch.stack([filter_similarity_matrix(f, self.similarity) for f in filters]).mean(0)
            redundancy, _ = redundancy_order(S)
            scores[group.root] = (1.0 - redundancy.clamp(min=-1.0)).float()
            matrices[group.root] = S
        return CriterionResult(scores, normalization="none", similarity=matrices)
