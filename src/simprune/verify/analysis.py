"""Redundancy analysis without pruning: how many channels of each group have a near-copy (a twin).

One calibration pass gives every group's mean similarity matrix S and M-std; a channel j is a
twin at threshold t when max over k != j of S_jk exceeds t. ``analyze`` is pure computation; the
``simprune analyze`` command (``cmd_analyze``) adds the JSON report and the plots.
"""
from __future__ import annotations

import torch
from torch import nn

from simprune.calibrate.calibration import collect_statistics, mean_similarity
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph
from simprune.stats.similarity import SIMILARITIES, twin_selection

DEFAULT_THRESHOLDS = {"psnr": (20.0, 30.0, 40.0)}  # dB; every other metric lives in [-1, 1]
DEAD_MSTD = 1e-6


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


def group_report(group, S: torch.Tensor, mstd: torch.Tensor, thresholds) -> dict:
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
    }


def analyze(model: nn.Module, example_input: torch.Tensor, calibration_batches, similarity: str = "ssim",
            thresholds=None, progress: bool = False, bf16: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Per-group twin counts and M-std over one calibration pass.

    Returns ``(summary, matrices)``: the JSON-ready summary {"network": ..., "groups": [...]} in
    network order, and each group's (C, C) mean similarity matrix keyed by group root.
    """
    if similarity not in SIMILARITIES:
        raise SimpruneError(f"unknown similarity {similarity!r}; choose from {', '.join(SIMILARITIES)}")
    thresholds = tuple(float(t) for t in (thresholds or default_thresholds(similarity)))
    if len({_key(t) for t in thresholds}) != len(thresholds):
        raise SimpruneError(f"thresholds must be distinct, got {list(thresholds)}")
    graph = PruningGraph(model, example_input)
    probes = collect_statistics(model, graph, calibration_batches, {similarity, "mstd"},
                                precision="bf16" if bf16 else "fp32",
                                progress=progress)
    order = _module_order(model)
    groups, matrices, images = [], {}, 0
    for group in sorted(graph.groups, key=lambda g: order.get(g.root, len(order))):
        plist = probes[group.root]
        S = mean_similarity(plist, similarity)
        mstd = torch.stack([p.stats.mstd() for p in plist]).mean(0)
        groups.append(group_report(group, S, mstd, thresholds))
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
    }
    return {"network": network, "groups": groups}, matrices


# ---- command line ---------------------------------------------------------------------------
