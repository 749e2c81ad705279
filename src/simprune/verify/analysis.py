"""Redundancy analysis without pruning: how many channels of each layer can go, and at what cost.

One calibration pass gives every group's mean similarity matrix S, M-std and the Gram matrix of its
maps. The actionable figure is linear redundancy: channels are removed greedily, each time the one
the other kept channels reproduce best by least squares (what ``--compensate lstsq`` folds into the
next layer), and the cost is the share of the maps' energy the kept channels cannot reproduce; per
group and for the network we count the channels that can go within each error level, and the MACs
that removing them saves. Near-copies (twins: max over k != j of S_jk above a threshold) are still
counted; well-trained networks rarely have any. ``analyze`` is pure computation; the ``simprune
analyze`` command adds the JSON report and the plots.
"""
from __future__ import annotations

import torch
from torch import nn

from simprune.allocation.allocator import CostModel
from simprune.calibrate.calibration import collect_statistics, mean_similarity
from simprune.distributed import model_device, resolve_device
from simprune.errors import SimpruneError
from simprune.graph.counting import count
from simprune.graph.groups import PruningGraph
from simprune.stats.similarity import SIMILARITIES, twin_selection

DEFAULT_THRESHOLDS = {"psnr": (20.0, 30.0, 40.0)}  # dB; every other metric lives in [-1, 1]
DEAD_MSTD = 1e-6
ERROR_LEVELS = (0.01, 0.05, 0.10)  # share of a layer's map energy the kept channels may fail to reproduce
STEPS_PER_GROUP = 64  # removal steps of the greedy curve (wide groups remove several channels a step)


def default_thresholds(similarity: str) -> tuple[float, ...]:
    """Twin thresholds that make sense for a metric's scale (PSNR is in dB)."""
    return DEFAULT_THRESHOLDS.get(similarity, (0.9, 0.95, 0.99))


def _key(t: float) -> str:
    """JSON key of a threshold: 0.9 -> "0.9", 30.0 -> "30"."""
    return f"{t:g}"


def max_offdiag(S: torch.Tensor) -> torch.Tensor:
    """(C,) max over k != j of S_jk (float64); -inf for a single channel."""
    m = S.detach().to(torch.float64).clone()
    m.fill_diagonal_(float("-inf"))
    return m.nan_to_num(nan=float("-inf")).amax(dim=1)


def _mstd_summary(mstd: torch.Tensor) -> dict[str, float | None]:
    """min / median / max and coefficient of variation (std / mean; None when the mean is 0)."""
    mean = float(mstd.mean())
    cv = float(mstd.std(correction=0)) / mean if mean > 0 else None
    return {"min": float(mstd.min()), "median": float(mstd.median()), "max": float(mstd.max()), "cv": cv}


def _quantiles(values: torch.Tensor) -> dict[str, float] | None:
    """min / q1 / median / q3 / max of a 1-D tensor (None when empty): the box of a box plot."""
    if values.numel() == 0:
        return None
    q = torch.quantile(values, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=values.dtype))
    return dict(zip(("min", "q1", "median", "q3", "max"), (float(v) for v in q)))


def _module_order(model: nn.Module) -> dict[str, int]:
    return {name: i for i, (name, _) in enumerate(model.named_modules())}


def removal_curve(gram: torch.Tensor, max_error: float = max(ERROR_LEVELS), ridge: float = 1e-8
                  ) -> list[tuple[int, float]]:
    """Greedy linear redundancy of one group from its (C, C) Gram matrix (sums of x x^T over pixels).

    Each step removes the kept channel least unique given the other kept ones (smallest 1 / [G_KK^-1]_jj,
    the energy least squares cannot predict) and records (channels removed, error): the removed maps'
    energy the kept ones cannot reproduce, tr(G_RR - G_RK G_KK^-1 G_KR), over the total energy tr(G).
    Stops past ``max_error``; one channel is always kept."""
    G = gram.to(torch.float64)
    C = G.shape[0]
    total = float(torch.trace(G))
    if C < 2 or total <= 0:
        return [(0, 0.0)]
    damp = ridge * total / C * torch.eye(C, dtype=torch.float64)
    kept, removed, curve = list(range(C)), [], [(0, 0.0)]
    chunk = max(1, C // STEPS_PER_GROUP)
    while len(kept) > 1:
        inv = torch.linalg.inv(G[kept][:, kept] + damp[:len(kept), :len(kept)])
        unique = 1.0 / torch.diagonal(inv)
        drop = [kept[i] for i in torch.argsort(unique)[:min(chunk, len(kept) - 1)].tolist()]
        removed += drop
        kept = [c for c in kept if c not in set(drop)]
        Gkk, Gkr = G[kept][:, kept] + damp[:len(kept), :len(kept)], G[kept][:, removed]
        residual = float(torch.trace(G[removed][:, removed]) - (Gkr * torch.linalg.solve(Gkk, Gkr)).sum())
        curve.append((len(removed), max(0.0, residual) / total))
        if curve[-1][1] > max_error:
            break
    return curve


def removable_within(curve: list[tuple[int, float]], level: float) -> int:
    """Most channels the curve removes with an error of at most ``level``."""
    return max(n for n, err in curve if err <= level)


def group_report(group, S: torch.Tensor, mstd: torch.Tensor, thresholds, curve=None, levels=ERROR_LEVELS) -> dict:
    """One group's entry of the report (``group`` is a graph.ChannelGroup)."""
    best = max_offdiag(S)
    layers = list(dict.fromkeys(m.name for m in group.members if isinstance(m.module, nn.Conv2d)))
    producers = {m.name for m in group.producers}
    finite = best[torch.isfinite(best)]
    return {
        "group": group.root,
        "layers": layers,
        "channels": int(S.shape[0]),
        "residual": len(producers) > 1,
        "twins": {_key(t): int((best > t).sum()) for t in thresholds},
        "removable": {_key(t): len(twin_selection(S, t)) for t in thresholds},
        "mean_max_similarity": float(finite.mean()) if finite.numel() else None,
        "max_similarity": _quantiles(finite),
        "mstd": _mstd_summary(mstd),
        "dead_channels": int((mstd < DEAD_MSTD).sum()),
        "removable_within": {_key(e): removable_within(curve or [(0, 0.0)], e) for e in levels},
    }


def analyze(model: nn.Module, example_input: torch.Tensor, calibration_batches, similarity: str = "ssim",
            thresholds=None, progress: bool = False, bf16: bool = True, error_levels=ERROR_LEVELS,
            device: str | torch.device | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Per-group twin counts and M-std over one calibration pass, on ``device`` (None: CUDA when
    available, else CPU; the model goes back to its own device afterwards).

    Returns ``(summary, matrices)``: the JSON-ready summary {"network": ..., "groups": [...]} in
    network order, and each group's (C, C) mean similarity matrix keyed by group root.
    """
    if similarity not in SIMILARITIES:
        raise SimpruneError(f"unknown similarity {similarity!r}; choose from {', '.join(SIMILARITIES)}")
    thresholds = tuple(float(t) for t in (thresholds or default_thresholds(similarity)))
    if len({_key(t) for t in thresholds}) != len(thresholds):
        raise SimpruneError(f"thresholds must be distinct, got {list(thresholds)}")
    levels = tuple(sorted({float(e) for e in error_levels}))
    if not levels or not all(0 < e < 1 for e in levels):
        raise SimpruneError(f"error_levels must be fractions within (0, 1), e.g. (0.01, 0.05), got {list(error_levels)}")
    home, device = model_device(model), resolve_device(device)
    example_input = example_input.to(device)
    graph = PruningGraph(model.to(device), example_input)
    try:
        probes = collect_statistics(model, graph, calibration_batches, {similarity, "mstd", "gram"},
                                    precision="bf16" if bf16 else "fp32", progress=progress)
    finally:
        model.to(home)
    example_input = example_input.to(home)
    order = _module_order(model)
    groups, matrices, images = [], {}, 0
    for group in sorted(graph.groups, key=lambda g: order.get(g.root, len(order))):
        plist = probes[group.root]
        S = mean_similarity(plist, similarity)
        mstd = torch.stack([p.stats.mstd() for p in plist]).mean(0)
        curve = removal_curve(torch.stack([p.stats.gram() / max(1, p.stats.pixels) for p in plist]).mean(0),
                              max(levels))
        groups.append(group_report(group, S, mstd, thresholds, curve, levels))
        matrices[group.root] = S.float()
        images = plist[0].stats.images
    channels = sum(g["channels"] for g in groups)
    twins = {_key(t): sum(g["twins"][_key(t)] for g in groups) for t in thresholds}
    network = {
        "similarity": similarity,
        "images": images,
        "groups": len(groups),
        "channels": channels,
        "thresholds": list(thresholds),
        "twins": twins,
        "twin_share": {k: v / channels for k, v in twins.items()},
        "removable": {_key(t): sum(g["removable"][_key(t)] for g in groups) for t in thresholds},
        "dead_channels": sum(g["dead_channels"] for g in groups),
        "error_levels": list(levels),
        "removable_within": {_key(e): sum(g["removable_within"][_key(e)] for g in groups) for e in levels},
        "macs_removed_within": _macs_removed(model, example_input, graph, groups, levels),
    }
    return {"network": network, "groups": groups}, matrices


def _macs_removed(model: nn.Module, example_input: torch.Tensor, graph: PruningGraph, groups: list[dict],
                  levels) -> dict[str, float]:
    """Share of the model's MACs saved by removing, in every group, the channels removable within each level."""
    by_root = {g["group"]: g for g in groups}
    cost = CostModel(graph.groups, count(model, example_input))
    base = cost.base("flops")
    out = {}
    for e in levels:
        removed = [by_root[g.root]["removable_within"][_key(e)] if g.root in by_root else 0 for g in graph.groups]
        out[_key(e)] = 1 - cost.total(removed)[0] / base
    return out

