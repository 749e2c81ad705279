"""The channel fold, a repair step: removed channels folded into the kept ones at every consumer, from
the statistics a data criterion returns (:class:`simprune.criteria.base.FoldData`).

mode "twin" (the QSFM method): W[:, i] += a W[:, j] for each removed j and its surviving twin i,
a fitted by least squares on the calibration maps. mode "lstsq" (beyond the method): x_removed ~
A x_kept jointly by least squares, W_kept += W_removed A. With ``affine`` both also fit an offset,
folded into the consumer's bias (so every consumer needs one). A consumer reads a channel through
one column (conv, Linear after pooling) or k columns (Linear after flatten: the k positions, in
channel-major order); the same coefficients apply at every position, fitted over all of them.
"""
from __future__ import annotations

import math

import torch

from simprune.calibrate.calibration import Probe
from simprune.criteria.base import COMPENSATIONS, CriterionResult, check_compensation
from simprune.errors import SimpruneError
from simprune.graph.groups import Member, PruningGraph, is_depthwise
from simprune.stats.channel_stats import fit_compensation

__all__ = ["COMPENSATIONS", "affine_lstsq_coefficients", "channel_columns", "fold_channels", "lstsq_coefficients",
           "resolve_twin"]


def resolve_twin(j: int, twin: dict[int, int], removed: set[int]) -> int | None:
    """Follow j's twin chain to a channel that survives (None when the chain ends in removed ones)."""
    seen = set()
    i = twin.get(j, -1)
    while i in removed and i not in seen and i >= 0:
        seen.add(i)
        i = twin.get(i, -1)
    return None if i < 0 or i in removed else i


def channel_columns(member: Member, channels: int) -> torch.Tensor:
    """(C, k) input columns through which a consumer reads each of the group's C channels."""
    idxs = torch.as_tensor(member.idxs)
    if len(idxs) % channels:
        raise SimpruneError(f"{member.name} reads {len(idxs)} inputs of a {channels}-channel group; cannot fold")
    return idxs.reshape(channels, -1)


def lstsq_coefficients(gram: torch.Tensor, removed: list[int], kept: list[int], ridge: float = 1e-6) -> torch.Tensor:
    """A (|removed| x |kept|) minimising sum ||x_r - A x_k||^2 over the calibration pixels (ridge-damped)."""
    g = gram.double()
    g_kk = g[kept][:, kept]
    damp = ridge * g_kk.diagonal().mean().clamp(min=1e-12)
    lhs = g_kk + damp * torch.eye(len(kept), dtype=g.dtype)
    return torch.linalg.solve(lhs, g[kept][:, removed]).T


def affine_lstsq_coefficients(gram: torch.Tensor, sums: torch.Tensor, count: int, removed: list[int],
                              kept: list[int], ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, b) minimising sum ||x_r - A x_k - b||^2 over ``count`` pixels with channel ``sums``: A from the
    centred Gram, b = mean_r - A mean_k."""
    s = sums.double()
    A = lstsq_coefficients(gram.double() - torch.outer(s, s) / count, removed, kept, ridge)
    return A, (s[removed] - A @ s[kept]) / count


def _fold_lstsq(layer, cols: torch.Tensor, probe: Probe, removed: list[int], affine: bool) -> None:
    w = layer.weight.data
    kept = [c for c in range(cols.shape[0]) if c not in set(removed)]
    stats = probe.stats
    if affine:
        A, b = affine_lstsq_coefficients(stats.gram(), stats.channel_sum(), stats.pixels, removed, kept)
    else:
        A, b = lstsq_coefficients(stats.gram(), removed, kept), None
    w_removed = w[:, cols[removed]]  # (out, R, k, ...)
    w[:, cols[kept]] += torch.einsum("or...,rk->ok...", w_removed, A.to(w))
    if affine:
        layer.bias.data += w_removed.flatten(2).sum(2) @ b.to(w)  # the offset reaches every tap


def _fold_twins(layer, cols: torch.Tensor, probe: Probe, chans: list[int], twins: dict[int, int],
                affine: bool) -> None:
    w = layer.weight.data
    removed = set(chans)
    for j in chans:
        i = resolve_twin(j, twins, removed)
        if i is None:
            continue
        a, b = fit_compensation(probe.stats, i, j, affine=affine)
        if not math.isfinite(a):
            continue
        w[:, cols[i]] += a * w[:, cols[j]]
        if affine and b:
            layer.bias.data += b * w[:, cols[j]].reshape(w.shape[0], -1).sum(1)


def fold_channels(graph: PruningGraph, result: CriterionResult, remove: dict[str, list[int]],
                  mode: str | None = None) -> None:
    """Fold every group's removed channels into the kept ones at each dense consumer (depthwise readers have
    no other channel to fold into), before the removal: ``mode`` "lstsq" or "twin" (None: the criterion's)."""
    data = result.fold
    mode = check_compensation(mode or data.mode)
    for root, chans in remove.items():
        dense = [p for p in data.probes.get(root, []) if not is_depthwise(p.member.module)]
        layers = [graph.model.get_submodule(p.member.name) for p in dense]  # by name: works on a copy too
        if data.affine:
            no_bias = [p.member.name for p, layer in zip(dense, layers) if getattr(layer, "bias", None) is None]
            if no_bias:
                raise SimpruneError(f"affine compensation folds an offset into each consumer's bias, but "
                                    f"{no_bias[0]} has none; drop affine=True")
        for probe, layer in zip(dense, layers):
            cols = channel_columns(probe.member, probe.stats.channels)
            if mode == "lstsq":
                _fold_lstsq(layer, cols, probe, sorted(chans), data.affine)
            else:
                _fold_twins(layer, cols, probe, chans, result.twins.get(root, {}), data.affine)
