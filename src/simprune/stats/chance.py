"""Chance correction: make similarity-based redundancy comparable across layers.

The redundancy of a channel (the similarity at which it is dropped as a twin, see
``redundancy_order``) is a maximum over its partners, so unrelated channels already score high
where similarities are noisy or biased: small maps, few images, small filters, non-negative maps
under cosine. Random filters of fan-in 27 score a median redundancy of 0.36, of fan-in 4608 0.03.

The correction is kappa-like (Cohen): r* = (r - r0) / (ceiling - r0), where r0 is the median
redundancy that the same statistic gives to channels of the same layer that are unrelated by
construction (a permutation null: maps of different images paired, or each filter's weights
shuffled). Unrelated channels then score r* ~ 0 in every layer, identical ones 1, and the scale
between stays in units of the similarity itself (not of its significance).
"""
from __future__ import annotations

import torch

from simprune.stats.similarity import redundancy_order


def null_level(null_similarity: torch.Tensor) -> float:
    """Median redundancy of channels unrelated by construction, from the null similarity matrix."""
    r0, _ = redundancy_order(null_similarity)
    finite = r0[torch.isfinite(r0)]
    return float(finite.median()) if finite.numel() else 0.0


def chance_corrected(redundancy: torch.Tensor, r0: float, ceiling: float) -> torch.Tensor:
    """(r - r0) / (ceiling - r0), clamped to [-1, 1]; -inf (the channel never dropped) gives -1."""
    r0 = min(r0, ceiling * (1 - 1e-6)) if ceiling > 0 else r0
    out = (redundancy.double() - r0) / (ceiling - r0)
    return out.nan_to_num(nan=-1.0, neginf=-1.0, posinf=1.0).clamp(-1.0, 1.0)


def permuted_rows(weights: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each row's entries shuffled independently (seeded): the filters' value distributions kept,
    any alignment between filters destroyed. The null for weight similarities."""
    w = weights.reshape(weights.shape[0], -1)
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(w.shape, generator=g), dim=1)
    return torch.gather(w, 1, order.to(w.device))
