"""Error-aware selection: a channel's importance is what the next layers cannot rebuild without it.

For every layer that reads a group's channels, the centered Gram of its unfolded input (all k x k taps)
on the calibration images says how well the kept channels can stand in for a removed one: removing
channel j costs the error of the best least-squares refit without it (a Schur complement), relative to
the layer's output energy. Channels are removed greedily by that cost, jointly over all the group's
readers; a channel's score is the cumulative relative error at the step it goes, so scores are
comparable across groups (normalisation "none"): the allocator removes where the refit loses least.
Groups that a parameter-free layer also reads (the option-A shortcut) get no score and stay whole: no
refit can repair what that layer passes on. Groups read by a layer with fewer calibration rows than
:data:`~simprune.calibrate.consumer_inputs.MIN_ROWS_PER_COLUMN` times its input columns (a classifier reading 1280 pooled features from 500 images)
are scored but marked doubtful: their Gram is rank-deficient, so most channels look free to remove on the
fitted images and are not on others; the allocation keeps them whole unless the target cannot be met without.
The math is in :mod:`simprune.stats.refit`; this is beyond the papers (ThiNet / He et al. 2017 style).
"""
from __future__ import annotations

import torch

from simprune.calibrate.batches import Calibration, check_precision
from simprune.calibrate.consumer_inputs import (
    consumer_grams,
    positions_per_image,
    refit_support,
    starved,
    taps,
    weight_matrix,
)
from simprune.calibrate.sensitivity import output_gains
from simprune.criteria.base import Criterion, CriterionResult
from simprune.criteria.registry import register
from simprune.graph.groups import ChannelGroup, Member, PruningGraph
from simprune.stats.refit import centered_gram, greedy_removal


def channel_blocks(member: Member, group_size: int) -> torch.Tensor:
    """(channels x columns) table: the consumer's input columns that carry each group channel."""
    idx = torch.as_tensor(member.idxs, dtype=torch.long).reshape(group_size, -1)
    k = taps(member.module)
    return (idx.unsqueeze(-1) * k + torch.arange(k)).reshape(group_size, -1)


def readers(group: ChannelGroup) -> list[Member]:
    """The group's consumers whose weights a refit can change (conv and linear, not grouped)."""
    return [m for m in group.consumers if refit_support(m.module) is None]


@register("refit-error", "channels whose loss the next layers' least-squares refit absorbs best go first "
                         "(error-aware; beyond the papers)")
class RefitError(Criterion):
    needs_data = True
    compensate_by_default = False
    normalization = "none"

    def __init__(self, ridge: float = 1e-4, calib_precision: str = "fp32", max_gram_mib: int = 1024,
                 max_positions: int | None = 128, progress: bool = False, precision: str | None = None,
                 weigh_by_gain: bool = False, gain_images: int = 64):
        """``calib_precision`` (``precision`` is its old name): the forward pass that gathers the Grams, "fp32"
        or "bf16" autocast (faster, but its rounding depends on the batch composition enough to change the
        greedy order: measured on ResNet-20, 7 of 10 groups ordered differently for one batch of 128 images vs
        two of 64; fp32: none); the products are float32 and the sums float64 either way. ``max_gram_mib``
        bounds the Grams held at once; ``max_positions``: conv output positions read per image (a fixed random
        set, raised with fewer than 64 images: :func:`positions_per_image`; None: all). ``weigh_by_gain``: each reader's relative error is weighed by its layer gain (the
        output change per unit of relative error, :mod:`simprune.calibrate.sensitivity`, on ``gain_images``
        calibration images), so groups are compared by what their removal does to the model's output."""
        self.calib_precision = check_precision(precision or calib_precision)
        self.ridge, self.max_gram_mib, self.progress = ridge, max_gram_mib, progress
        self.max_positions = max_positions
        self.weigh_by_gain, self.gain_images = weigh_by_gain, gain_images
        self.gains: dict[str, float] = {}

    def score(self, graph: PruningGraph, calibration) -> CriterionResult:
        groups = {g.root: g for g in graph.groups if g.compensable and readers(g)}
        layers = {m.name: m.module for g in groups.values() for m in readers(g)}
        waiting = {root: {m.name for m in readers(g)} for root, g in groups.items()}
        self.gains = output_gains(graph.model, layers, calibration, self.gain_images) if self.weigh_by_gain else {}
        grams, scores, short = {}, {}, {}
        images = Calibration.of(calibration).count()
        for name, sums in consumer_grams(graph.model, layers, calibration, self.calib_precision,
                                         self.max_gram_mib << 20, positions_per_image(self.max_positions, images)):
            grams[name] = centered_gram(sums.gram, sums.total, float(sums.n))
            if starved(grams[name].shape[0], float(sums.n)):
                short[name] = f"{name} ({int(sums.n)} rows for {grams[name].shape[0]} inputs)"
            for root in [r for r, names in waiting.items() if names <= grams.keys()]:
                scores[root] = self._group_scores(groups[root], grams)
                del waiting[root]
                needed = set().union(*waiting.values()) if waiting else set()
                grams = {n: g for n, g in grams.items() if n in needed}
        result = CriterionResult(scores, normalization=self.normalization)
        unscored = ", ".join(g.root for g in graph.groups if g.root not in groups)
        if unscored:
            result.notes["unscored_groups"] = unscored
        result.doubtful = {root for root in scores if any(m.name in short for m in readers(groups[root]))}
        if short:
            result.notes["too_few_rows"] = ("read with too few calibration rows to judge, so kept whole unless the "
                                            "target needs them (more images let them be judged): "
                                            + ", ".join(short.values()))
        return result

    def _group_scores(self, group: ChannelGroup, grams: dict[str, torch.Tensor]) -> torch.Tensor:
        members = readers(group)
        order, cumulative = greedy_removal([grams[m.name] for m in members],
                                           [weight_matrix(m.module).cpu() for m in members],
                                           [channel_blocks(m, group.size) for m in members],
                                           group.size - 1, self.ridge,
                                           [self.gains.get(m.name, 1.0) for m in members])
        scores = torch.empty(group.size, dtype=torch.float64)
        scores[order] = torch.tensor(cumulative, dtype=torch.float64)
        last = sorted(set(range(group.size)) - set(order))
        scores[last] = 2 * cumulative[-1] + 1.0 if cumulative else 1.0  # the channel greedy never removes
        return scores
