"""Pairwise similarity of channels: feature-map metrics (QSFM, DFS/SFS, HRank) and filter metrics.

Feature-map functions take ``maps`` of shape (B, C, H, W) and return one (C, C) matrix per
image, i.e. (B, C, C), computed in float64 so that identical maps score exactly 1 (or the
PSNR cap). Nothing here loops over channel pairs in Python except the greedy selections.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from simprune.errors import SimpruneError

C1 = 0.01**2  # SSIM stabilisers for data range 1 (Wang et al. 2004)
C2 = 0.03**2
FILTER_METRICS = ("cosine", "pearson", "euclidean")
SELECTION_RULES = ("greedy", "nested")


def _check_maps(maps: torch.Tensor) -> torch.Tensor:
    """Validate a (B, C, H, W) tensor and return it as float64 (the precision all metrics use)."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise SimpruneError(f"feature maps must be a (B, C, H, W) tensor, got {shape}")
    return maps.detach().to(torch.float64)


def _check_constants(c1: float, c2: float) -> None:
    """SSIM needs positive stabilisers, else constant maps divide 0 by 0."""
    if not (c1 > 0 and c2 > 0):
        raise SimpruneError(f"SSIM constants must be positive, got c1={c1}, c2={c2}")


def minmax_scale(maps: torch.Tensor) -> torch.Tensor:
    """Scale each image's channel map to [0, 1] (SSIM/PSNR assume data range 1); constant maps -> 0."""
    x = maps if maps.is_floating_point() else maps.float()
    flat = x.flatten(2)
    lo = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    return scaled.view_as(x)


def _scaled_flat(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scaled maps, float64, flattened to (B, C, H*W)."""
    return minmax_scale(_check_maps(maps)).flatten(2)


def _set_diagonal(m: torch.Tensor, value: float) -> torch.Tensor:
    """Write ``value`` on the diagonal of every (C, C) slice, in place; returns ``m``."""
    m.diagonal(dim1=-2, dim2=-1).fill_(value)
    return m


def global_ssim_matrix(maps: torch.Tensor, c1: float = C1, c2: float = C2) -> torch.Tensor:
    """SSIM of every channel pair over the whole (min-max scaled) map, from one batched Gram product."""
    _check_constants(c1, c2)
    x = _scaled_flat(maps)
    mu = x.mean(dim=-1)  # (B, C)
    cov = x @ x.transpose(1, 2) / x.shape[-1] - mu.unsqueeze(2) * mu.unsqueeze(1)
    var = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    mu_i, mu_j = mu.unsqueeze(2), mu.unsqueeze(1)
    num = (2 * mu_i * mu_j + c1) * (2 * cov + c2)
    den = (mu_i**2 + mu_j**2 + c1) * (var.unsqueeze(2) + var.unsqueeze(1) + c2)
    return _set_diagonal((num / den).clamp(-1.0, 1.0), 1.0)


def _box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over every k x k window (stride 1, valid), as two separable 1-D average pools."""
    shape = x.shape
    y = x.reshape(-1, 1, shape[-2], shape[-1])
    y = F.avg_pool2d(F.avg_pool2d(y, (k, 1), stride=1), (1, k), stride=1)
    return y.reshape(*shape[:-2], *y.shape[-2:])


def windowed_ssim_matrix(
    maps: torch.Tensor, window: int = 7, c1: float = C1, c2: float = C2, max_elements: int = 2**24,
    other: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classic local SSIM (uniform window, population statistics) averaged over windows, per pair.

    With ``other`` (same shape), entry (i, j) compares ``maps`` channel i with ``other`` channel j
    (the chance level: maps of different images). Pairs are processed in chunks of images x rows so
    that no intermediate holds more than about ``max_elements`` values, whatever C is.
    """
    _check_constants(c1, c2)
    if window < 1:
        raise SimpruneError(f"SSIM window must be >= 1, got {window}")
    x = minmax_scale(_check_maps(maps))
    y = x if other is None else minmax_scale(_check_maps(other))
    B, C, H, W = x.shape
    k = min(window, H, W)
    mu_x, mu_y = _box_mean(x, k), _box_mean(y, k)  # (B, C, H', W')
    var_x = (_box_mean(x * x, k) - mu_x * mu_x).clamp_min(0.0)
    var_y = var_x if other is None else (_box_mean(y * y, k) - mu_y * mu_y).clamp_min(0.0)
    out = torch.empty(B, C, C, dtype=x.dtype, device=x.device)
    per_row = C * H * W
    rows = max(1, min(C, max_elements // per_row))
    nb = max(1, max_elements // (per_row * C)) if rows == C else 1
    for b0 in range(0, B, nb):
        b1 = b0 + nb
        for r0 in range(0, C, rows):
            r1, c0 = min(C, r0 + rows), (r0 if other is None else 0)
            xy = x[b0:b1, r0:r1, None] * y[b0:b1, None, c0:]  # (nb, r, C - c0, H, W)
            mi, mj = mu_x[b0:b1, r0:r1, None], mu_y[b0:b1, None, c0:]
            cov = _box_mean(xy, k) - mi * mj
            num = (2 * mi * mj + c1) * (2 * cov + c2)
            den = (mi * mi + mj * mj + c1) * (var_x[b0:b1, r0:r1, None] + var_y[b0:b1, None, c0:] + c2)
            block = (num / den).mean(dim=(-2, -1)).clamp(-1.0, 1.0)
            out[b0:b1, r0:r1, c0:] = block
            if other is None:
                out[b0:b1, r0:, r0:r1] = block.transpose(1, 2)
    return out if other is not None else _set_diagonal(out, 1.0)


def psnr_matrix(maps: torch.Tensor, cap: float = 100.0) -> torch.Tensor:
    """PSNR in dB (peak 1) of every pair of min-max scaled maps, MSE from the Gram matrix, capped."""
    x = _scaled_flat(maps)
    sq = (x * x).sum(dim=-1)
    mse = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * (x @ x.transpose(1, 2))) / x.shape[-1]
    psnr = -10.0 * torch.log10(mse.clamp_min(0.0))  # mse == 0 -> +inf, capped below
    return _set_diagonal(psnr.clamp(max=cap), cap)


def _cosine_rows(x: torch.Tensor, zero_pair: float = 1.0) -> torch.Tensor:
    """Cosine similarity of the rows of (..., C, D) float64; a zero row gives 0 with others and
    ``zero_pair`` with another zero row; the diagonal is 1."""
    norm = x.norm(dim=-1, keepdim=True)
    zero = norm.squeeze(-1) == 0
    unit = torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    cos = (unit @ unit.transpose(-2, -1)).clamp(-1.0, 1.0)
    both = zero.unsqueeze(-1) & zero.unsqueeze(-2)
    cos = torch.where(both, torch.full_like(cos, zero_pair), cos)
    return _set_diagonal(cos, 1.0)


def cosine_matrix(maps: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the raw flattened maps (SFS); zero-zero pairs -> 1, zero-nonzero -> 0."""
    return _cosine_rows(_check_maps(maps).flatten(2))


@dataclass(frozen=True)
class MapMoments:
    """Per-channel moments of feature maps over pixels, in raw units: mean, population variance, min and
    max-minus-min (``span``). Shapes (..., C). Every map metric below is a function of these and the
    covariance of two sets of maps, which is what lets statistics be gathered by matrix products."""

    mean: torch.Tensor
    var: torch.Tensor
    lo: torch.Tensor
    span: torch.Tensor

    def scaled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, var, 1/span) after min-max scaling to [0, 1]; a constant map scales to 0 (1/span = 0)."""
        flat = self.span > 0
        inv = torch.where(flat, 1.0 / self.span.clamp_min(torch.finfo(self.span.dtype).tiny), 0.0)
        return (self.mean - self.lo) * inv, self.var * inv * inv, inv

    def parts(self) -> MomentParts:
        """The raw mean and variance with the scaled moments, computed once (see :class:`MomentParts`)."""
        return MomentParts(self.mean, self.var, *self.scaled())


@dataclass(frozen=True)
class MomentParts:
    """What the moment similarities read: raw ``mean`` and ``var`` (cosine) and the min-max scaled mean
    ``u``, variance ``v`` and inverse span ``s`` (SSIM, PSNR). The statistics pass pairs the same maps
    many times (row blocks of the product, the null), so it scales them once and slices these."""

    mean: torch.Tensor
    var: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor

    def select(self, index) -> MomentParts:
        """Every part indexed by ``index`` (e.g. ``(..., slice(r0, r1))`` for channels r0:r1)."""
        return MomentParts(self.mean[index], self.var[index], self.u[index], self.v[index], self.s[index])


def _col(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(-1)


def _row(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(-2)


def similarity_from_moments(metric: str, a: MapMoments | MomentParts, b: MapMoments | MomentParts,
                            cov: torch.Tensor, *, c1: float = C1, c2: float = C2, cap: float = 100.0) -> torch.Tensor:
    """(..., C, C) similarity of maps a_i and b_j from their moments and raw covariance cov_ij.

    Equal to ``SIMILARITIES[metric]`` on the maps themselves (global SSIM and PSNR on min-max scaled
    maps, cosine on raw maps), without touching a pixel: min-max scaling is affine per map. It runs
    once per image and probe, so it is a few broadcast and in-place passes over the (C, C) result;
    SSIM is not clamped here (rounding may leave it 1e-7 outside [-1, 1]), PSNR is capped."""
    a, b = (m.parts() if isinstance(m, MapMoments) else m for m in (a, b))
    if metric == "cosine":
        na, nb = a.var + a.mean * a.mean, b.var + b.mean * b.mean
        tiny = torch.finfo(na.dtype).tiny
        cos = (_col(a.mean) * _row(b.mean)).add_(cov)
        cos.mul_(_col(na.clamp_min(tiny).rsqrt()) * _row(nb.clamp_min(tiny).rsqrt())).clamp_(-1.0, 1.0)
        za, zb = na <= 0, nb <= 0
        if bool(za.any()) or bool(zb.any()):  # zero maps: 0 with others, 1 with another zero map
            both = _col(za) & _row(zb)
            cos = torch.where(_col(za) | _row(zb), both.to(cos.dtype), cos)
        return cos
    ua, va, sa, ub, vb, sb = a.u, a.v, a.s, b.u, b.v, b.s
    cs = (_col(sa) * _row(sb)).mul_(cov)  # covariance of the min-max scaled maps
    if metric == "ssim":  # (2 ua ub + c1)(2 cov' + c2) / ((ua^2 + ub^2 + c1)(va + vb + c2))
        num = (_col(2 * ua) * _row(ub)).add_(c1).mul_(cs.mul_(2.0).add_(c2))
        den = (_col(ua * ua + c1) + _row(ub * ub)).mul_(_col(va + c2) + _row(vb))
        return num.div_(den)
    if metric == "psnr":  # mse = (va + ua^2) + (vb + ub^2) - 2 (ua ub + cov')
        cross = (_col(ua) * _row(ub)).add_(cs).mul_(-2.0)
        mse = cross.add_(_col(va + ua * ua)).add_(_row(vb + ub * ub)).clamp_min_(0.0)
        return mse.log10_().mul_(-10.0).clamp_(max=cap)
    raise SimpruneError(f"similarity {metric!r} has no moment form; choose ssim, psnr or cosine")


MOMENT_METRICS = ("ssim", "psnr", "cosine")


SIMILARITIES = {
    "ssim": global_ssim_matrix,
    "ssim-windowed": windowed_ssim_matrix,
    "psnr": psnr_matrix,
    "cosine": cosine_matrix,
}


def spatial_std(maps: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of each map over H*W, (B, C); its image mean is DFS's M-std."""
    return _check_maps(maps).flatten(2).std(dim=-1, correction=0)


def map_rank(maps: torch.Tensor) -> torch.Tensor:
    """Matrix rank of each H x W map, (B, C) as float64 (HRank), with torch's default tolerance.

    Computed in the maps' own precision (at least float32), as HRank does, because the rank
    tolerance scales with the machine epsilon of the dtype."""
    _check_maps(maps)
    x = maps.detach()
    x = x if x.dtype == torch.float64 else x.float()
    return torch.linalg.matrix_rank(x).to(torch.float64)


def filter_similarity_matrix(weights: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """(C, C) similarity of the flattened filters of one layer (filter-similarity pruning).

    cosine (zero filter: 0 with others, 1 with a zero filter), pearson (constant filter: 0 with
    others, 1 with itself) or inverse Euclidean 1 / (1 + distance)."""
    if metric not in FILTER_METRICS:
        raise SimpruneError(f"unknown filter similarity {metric!r}; choose from {', '.join(FILTER_METRICS)}")
    w = weights.detach().to(torch.float64).reshape(weights.shape[0], -1)
    if metric == "cosine":
        return _cosine_rows(w)
    if metric == "pearson":
        return _cosine_rows(w - w.mean(dim=1, keepdim=True), zero_pair=0.0)
    sq = (w * w).sum(dim=1)
    dist = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (w @ w.T)).clamp_min(0.0).sqrt()
    return _set_diagonal(1.0 / (1.0 + dist), 1.0)


def _offdiag(S: torch.Tensor) -> np.ndarray:
    """(C, C) similarity as float64 numpy with the diagonal (and any NaN) set to -inf."""
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise SimpruneError(f"similarity matrix must be square (C, C), got {tuple(S.shape)}")
    m = S.detach().to(torch.float64).cpu().numpy().copy()
    m[np.isnan(m)] = -np.inf
    np.fill_diagonal(m, -np.inf)
    return m


def _visit_order(m: np.ndarray) -> np.ndarray:
    """QSFM visiting order: descending max_k S_jk, ties by channel index."""
    return np.argsort(-m.max(axis=1, initial=-np.inf), kind="stable")


def twin_selection(S: torch.Tensor, threshold: float, rule: str = "greedy") -> dict[int, int]:
    """QSFM selection: {dropped channel j: kept twin i}; at least one channel is always kept.

    rule "greedy" (the paper): visit channels by descending max_k S_jk and drop j when a channel
    kept so far has S_ij > threshold. rule "nested": drop exactly the channels whose
    ``redundancy_order`` score exceeds the threshold (dropped sets shrink as it rises).
    Either way the twin is the finally kept channel i with the highest S_ij.
    """
    if rule not in SELECTION_RULES:
        raise SimpruneError(f"unknown selection rule {rule!r}; choose from {', '.join(SELECTION_RULES)}")
    m = _offdiag(S)
    C = m.shape[0]
    if rule == "nested":
        kept = ~(redundancy_order(S)[0].numpy() > threshold)
    else:
        kept = np.zeros(C, dtype=bool)
        best = np.full(C, -np.inf)  # best[j] = max over kept i of S_ij
        for j in _visit_order(m):
            if not best[j] > threshold:
                kept[j] = True
                best = np.maximum(best, m[j])
    kept_idx = np.flatnonzero(kept)
    dropped = np.flatnonzero(~kept)
    twins = kept_idx[np.argmax(m[np.ix_(kept_idx, dropped)], axis=0)] if dropped.size else []
    return {int(j): int(i) for j, i in zip(dropped, twins)}


def redundancy_order(S: torch.Tensor, keep_priority: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel redundancy score (higher = dropped earlier as the threshold falls) and twin.

    A threshold sweep over the pairs (i, j), i visited before j in the QSFM order, taken by
    descending S_ij: when both are still kept, j is dropped with score S_ij and twin i (kept at
    that moment; it may be dropped later). Never-dropped channels (one per run) score -inf and
    twin -1. So for every t, {score > t} is exactly twin_selection(S, t, rule="nested"); it equals
    the "greedy" rule's set whenever that set is nested in t, which greedy does not guarantee.
    With ``keep_priority`` (SFS: the M-std), of a similar pair the lower-priority channel is dropped.
    """
    m = _offdiag(S)
    C = m.shape[0]
    if keep_priority is None:
        order = _visit_order(m)
    else:
        order = np.argsort(-keep_priority.detach().double().cpu().numpy(), kind="stable")
    p = m[np.ix_(order, order)]  # p[a, b] = S[order[a], order[b]]
    a_idx, b_idx = np.triu_indices(C, 1)
    w = p[a_idx, b_idx]
    edges = np.argsort(-w, kind="stable")
    edges = edges[w[edges] > -np.inf]  # sorted descending: the -inf pairs (NaN, the diagonal) come last
    score = np.full(C, -np.inf)
    twin = np.full(C, -1, dtype=np.int64)
    for e in _first_live_edges(a_idx[edges], b_idx[edges], C):
        a, b = a_idx[edges[e]], b_idx[edges[e]]
        score[order[b]] = w[edges[e]]
        twin[order[b]] = order[a]
    return torch.from_numpy(score), torch.from_numpy(twin)


def _first_live_edges(a: np.ndarray, b: np.ndarray, channels: int) -> list[int]:
    """The sweep of :func:`redundancy_order`: in the given edge order, each edge whose two ends are still
    kept drops its ``b`` end, until one channel is left. Returns the positions of those edges. Scans
    windows of edges with numpy (one call per drop, not one Python step per edge: C^2 / 2 of them)."""
    kept = np.ones(channels, dtype=bool)
    taken, pos, window = [], 0, 256
    while len(taken) < channels - 1 and pos < len(a):
        end = min(len(a), pos + window)
        live = np.flatnonzero(kept[a[pos:end]] & kept[b[pos:end]])
        if live.size == 0:
            pos, window = end, window * 2
            continue
        e = pos + int(live[0])
        kept[b[e]] = False
        taken.append(e)
        pos, window = e + 1, max(256, window // 2)
    return taken
