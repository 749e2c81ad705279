"""Honest warnings about a finished prune: results that hold but may not mean what the user expects.

Each check returns warning texts (in the API's keyword vocabulary); :func:`check_result` stores them in
``report["warnings"]`` and reports them through :func:`simprune.progress.warn` (the CLI prints them).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from simprune import progress
from simprune.calibrate.batches import Calibration
from simprune.graph.groups import PruningGraph
from simprune.schedules.report import MISS_TOLERANCE

MIN_BN_IMAGES = 64  # fewer images than this give BatchNorm statistics noisier than the trained ones

FANOUT = 4  # a group cut to under 1/FANOUT of its width, read by a layer with FANOUT x more outputs
MAX_SOFT_STEP = 0.10  # soft pruning should zero at most this much more of the cost per epoch


def calibration_images(calibration) -> int | None:
    """How many images ``calibration`` holds (a Calibration, a DataLoader or a list of batches); None when unknown."""
    if isinstance(calibration, Calibration):
        calibration = (calibration.plain or calibration).batches  # the user's images, not their views
    dataset = getattr(calibration, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    if isinstance(calibration, (list, tuple)):
        return sum(len(b[0] if isinstance(b, (list, tuple)) else b) for b in calibration)
    return None


def tiny_calibration(calibration, bn_recalibrated: bool) -> list[str]:
    """BatchNorm statistics re-estimated on fewer than :data:`MIN_BN_IMAGES` images."""
    n = calibration_images(calibration) if bn_recalibrated else None
    if n is None or n >= MIN_BN_IMAGES:
        return []
    return [f"BatchNorm statistics were re-estimated on only {n} calibration images (under {MIN_BN_IMAGES}), which "
            f"can cost more accuracy than it restores; calibrate on {MIN_BN_IMAGES} or more images or pass "
            "recalibrate_bn=False"]


def target_missed(report: dict[str, Any]) -> list[str]:
    """A MAC or parameter target missed by more than :data:`MISS_TOLERANCE` (either way)."""
    out = []
    for kind, ratio in (report.get("target") or {}).items():
        reached = (report.get("reduction") or {}).get(kind)
        if reached is None or abs(reached - ratio) <= MISS_TOLERANCE:
            continue
        what = "MACs" if kind == "flops" else "parameters"
        how = "short of" if reached < ratio else "beyond"
        out.append(f"the target was {ratio:.1%} of {what} removed but {reached:.1%} were, "
                   f"{100 * abs(reached - ratio):.1f} points {how} it (the guards min_channels=, max_layer_ratio=, "
                   "round_to= or groups left whole decide how close it can get)")
    return out


def narrow_layers(model: nn.Module, example: torch.Tensor, report: dict[str, Any], ignore=()) -> list[str]:
    """Groups cut to under 1/:data:`FANOUT` of their width that feed a layer with over FANOUT x more outputs:
    a bottleneck that accuracy rarely recovers from (MobileNetV2's 1280 channels cut to 128 before 1000 classes)."""
    before = {g["root"]: g["channels_before"] for g in report.get("groups") or []}
    narrow = []
    for group in PruningGraph(model, example, ignore=ignore).groups:
        kept, was = group.size, before.get(group.root, group.size)
        if kept * FANOUT > was:
            continue
        for reader in group.consumers:
            width = getattr(reader.module, "out_channels", None) or getattr(reader.module, "out_features", 0)
            if kept * FANOUT < width:
                narrow.append(f"{group.root} {was} -> {kept} (read by {reader.name}, {width} outputs)")
                break
    if not narrow:
        return []
    shown = "; ".join(narrow[:3]) + (f"; and {len(narrow) - 3} more" if len(narrow) > 3 else "")
    return [f"{len(narrow)} layer(s) keep under 1/{FANOUT} of their channels and feed over {FANOUT}x as many "
            f"outputs, a bottleneck accuracy may not recover from: {shown}; cap the cut with "
            f"max_layer_ratio={1 - 1 / FANOUT:g} or leave them whole with ignore="]


def soft_epochs(ratio: float, epochs: int, hold: int = 0) -> list[str]:
    """A soft schedule whose zeroed share rises by more than :data:`MAX_SOFT_STEP` per epoch."""
    needed = math.ceil(ratio / MAX_SOFT_STEP - 1e-9) + hold
    if epochs >= needed:
        return []
    step = ratio / max(1, epochs - hold)
    return [f"soft pruning over {epochs} epoch(s) zeroes {step:.0%} more of the target each epoch; zeroed filters "
            f"get too little training to recover below {needed} epochs for a {ratio:.0%} target (the papers "
            "train for tens of epochs)"]


def check_result(model: nn.Module, example: torch.Tensor, report: dict[str, Any], *, calibration=None,
                 ignore=()) -> dict[str, Any]:
    """Add ``report["warnings"]`` (tiny calibration set, missed target, narrow layers) and report each."""
    found = list(report.get("warnings") or [])
    found += tiny_calibration(calibration, bool(report.get("bn_recalibrated")))
    if "latency" not in (report.get("target") or {}):
        found += target_missed(report)
    found += narrow_layers(model, example[:1], report, ignore)
    for text in found[len(report.get("warnings") or []):]:
        progress.warn(text)
    report["warnings"] = found
    return report
