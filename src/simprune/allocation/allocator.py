"""Allocation under a global target: which channels to remove so MACs or params drop by R.

Per-channel importance scores (from any criterion) are made comparable across
groups (normalised), weighed by what a channel costs, and one global ranking
decides; removal stops as soon as the target holds. Costs come from an exact
analytic model of each layer's MACs/params as a function of the kept widths, so
no trial pruning is needed; a measured latency per layer (``latency_table``) can be
plugged in as a third cost. The allocator knows nothing about feature maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from simprune.allocation.rounding import relaxations, removable_positions
from simprune.errors import SimpruneError
from simprune.graph.counting import Cost
from simprune.graph.groups import PARAM_LAYERS, ChannelGroup, is_depthwise


@dataclass
class LayerCost:
    name: str
    macs: float
    weight_params: float  # scales with kept in x kept out (kept out only for depthwise)
    other_params: float  # bias, BN: scales with kept out
    out_ch: int
    in_ch: int
    depthwise: bool
    out_links: list[tuple[int, float]]  # (group index, channels of this layer per group channel)
    in_links: list[tuple[int, float]]
    latency: Callable[[float, float], float] | None = None  # ms at kept fractions (in, out)

    def fractions(self, removed: list[int]) -> tuple[float, float]:
        """Kept fraction of this layer's (input, output) channels."""
        f_out = 1.0 - sum(removed[g] * k for g, k in self.out_links) / self.out_ch if self.out_ch else 1.0
        f_in = 1.0 - sum(removed[g] * k for g, k in self.in_links) / self.in_ch if self.in_ch else 1.0
        return f_in, f_out

    def cost(self, removed: list[int]) -> tuple[float, float]:
        f_in, f_out = self.fractions(removed)
        f_w = f_out if self.depthwise else f_out * f_in
        return self.macs * f_w, self.weight_params * f_w + self.other_params * f_out

    def costs(self, removed: list[int]) -> tuple[float, float, float]:
        """(MACs, params, latency ms); latency is 0 without a latency table."""
        macs, params = self.cost(removed)
        return macs, params, self.latency(*self.fractions(removed)) if self.latency is not None else 0.0


def _dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
        n = getattr(module, "num_features", None) or getattr(module, "num_channels", None) or \
            module.normalized_shape[0]
        return n, 0
    return module.out_channels, module.in_channels


KINDS = ("flops", "params", "latency")  # index into the cost tuples


class CostModel:
    """MACs and params (and, with a latency table, latency) of the model as a function of how many
    channels each group loses.

    ``latency`` maps layer names to ``ms(f_in, f_out)`` at kept fractions and ``base_latency_ms`` is
    the measured latency of the whole unpruned model; what the layers do not explain is fixed.
    """

    def __init__(self, groups: list[ChannelGroup], base: Cost,
                 latency: dict[str, Callable[[float, float], float]] | None = None,
                 base_latency_ms: float | None = None):
        if (latency is None) != (base_latency_ms is None):
            raise SimpruneError("a latency cost needs both per-layer latencies and the whole model's latency")
        self.groups = groups
        layers: dict[str, LayerCost] = {}
        for gi, group in enumerate(groups):
            for m in group.members:
                if not isinstance(m.module, PARAM_LAYERS + (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm,
                                                            nn.GroupNorm)):
                    continue
                if m.name not in layers:
                    out_ch, in_ch = _dims(m.module)
                    c = base.per_layer.get(m.name, {"macs": 0, "params": 0})
                    w = getattr(m.module, "weight", None)
                    w_params = w.numel() if isinstance(m.module, PARAM_LAYERS) and w is not None else 0
                    layers[m.name] = LayerCost(m.name, c["macs"], w_params, c["params"] - w_params, out_ch, in_ch,
                                               is_depthwise(m.module), [], [])
                link = (gi, len(m.idxs) / group.size)
                (layers[m.name].out_links if m.dim == "out" else layers[m.name].in_links).append(link)
        self.layers = list(layers.values())
        self.by_group: list[list[int]] = [[] for _ in groups]
        for li, layer in enumerate(self.layers):
            for g, _ in layer.out_links + layer.in_links:
                if li not in self.by_group[g]:
                    self.by_group[g].append(li)
        for layer in self.layers:
            layer.latency = (latency or {}).get(layer.name)
        zero = [0] * len(groups)
        modeled = [layer.cost(zero) for layer in self.layers]
        self.fixed_macs = base.macs - sum(m for m, _ in modeled)
        self.fixed_params = base.params - sum(p for _, p in modeled)
        self.base_macs, self.base_params = base.macs, base.params
        self.has_latency = latency is not None
        self.base_latency = float(base_latency_ms or 0.0)
        self.fixed_latency = self.base_latency - sum(layer.costs(zero)[2] for layer in self.layers)

    def base(self, kind: str) -> float:
        return (self.base_macs, self.base_params, self.base_latency)[KINDS.index(kind)]

    def totals(self, removed: list[int]) -> tuple[float, float, float]:
        """(MACs, params, latency ms) of the model with ``removed[g]`` channels gone from group g."""
        out = [self.fixed_macs, self.fixed_params, self.fixed_latency]
        for layer in self.layers:
            for i, v in enumerate(layer.costs(removed)):
                out[i] += v
        return out[0], out[1], out[2]

    def total(self, removed: list[int]) -> tuple[float, float]:
        macs, params = self.fixed_macs, self.fixed_params
        for layer in self.layers:
            m, p = layer.cost(removed)
            macs, params = macs + m, params + p
        return macs, params

    def channel_cost(self, kind: str) -> list[float]:
        """What removing one channel of each group saves first (MACs, params or latency ms)."""
        zero = [0] * len(self.groups)
        k = KINDS.index(kind)
        out = []
        for gi in range(len(self.groups)):
            one = list(zero)
            one[gi] = 1
            before = [self.layers[li].costs(zero) for li in self.by_group[gi]]
            after = [self.layers[li].costs(one) for li in self.by_group[gi]]
            out.append(sum(b[k] - a[k] for b, a in zip(before, after)))
        return out


@dataclass
class Guards:
    """Limits per group. ``round_to=None``: kept counts in multiples of the CPU's vector block,
    relaxed where the target needs it (see :mod:`simprune.allocation.rounding`); 1 opts out."""

    min_channels: int = 4
    max_layer_ratio: float = 0.9
    round_to: int | None = None

    def max_removable(self, size: int, channel_groups: int = 1) -> int:
        """Channels that may go from a group of ``size`` (in ``channel_groups`` equal groups)."""
        positions, _ = removable_positions(size, channel_groups, self.min_channels, self.max_layer_ratio,
                                           self.round_to or 1)
        return positions * channel_groups

    def units(self, size: int, order: list[int], channel_groups: int = 1) -> list[list[int]]:
        """Removal units over positions in ``order`` (least important first), each a list of positions;
        the first is short when needed so that every kept count stays aligned."""
        n_remove, step = removable_positions(size, channel_groups, self.min_channels, self.max_layer_ratio,
                                             self.round_to or 1)
        first = n_remove % step or step
        cuts = [0] + list(range(first, n_remove + 1, step))
        return [order[a:b] for a, b in zip(cuts, cuts[1:])]


def normalize(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Make one group's importance comparable with other groups'."""
    s = scores.double()
    if how == "none":
        return s
    if how == "mean":
        return s / (s.abs().mean() + 1e-12)
    if how == "max":
        return s / (s.abs().max() + 1e-12)
    if how == "rank":
        return (torch.argsort(torch.argsort(s)).double() + 1) / len(s)
    raise SimpruneError(f"unknown normalisation {how!r}; use none, mean, max or rank")


@dataclass
class Allocation:
    remove: dict[str, list[int]]  # group root -> channel indices to remove
    macs: float
    params: float
    reduction: float  # achieved fraction of the target quantity removed
    round_to: int = 1  # kept channel counts are multiples of this (or the whole group)


def _units(groups: list[ChannelGroup], scores: dict[str, torch.Tensor], unit_cost: list[float], guards: Guards,
           normalization: str, cost_weight: float) -> list[tuple[float, int, list[int]]]:
    """Removable units (priority, group index, channel indices), least important first: single channels
    (or tied classes of channels), in blocks that keep every kept count aligned to ``guards.round_to``."""
    mean_cost = sum(unit_cost) / max(1, len(unit_cost)) or 1.0
    units = []
    for gi, group in enumerate(groups):
        s = scores.get(group.root)
        if s is None:
            continue
        if len(s) != group.size or not torch.isfinite(s).all():
            raise SimpruneError(f"criterion gave {len(s)} scores (or non-finite ones) for group {group.root} "
                                f"of {group.size} channels")
        pri = normalize(s, normalization)
        if cost_weight and unit_cost[gi] > 0:
            pri = pri / (unit_cost[gi] / mean_cost) ** cost_weight
        classes = group.classes  # channels that go together (a grouped conv's groups, fed-back channels)
        cls_pri = torch.stack([pri[c].mean() for c in classes]) if group.tied is not None else pri
        order = torch.argsort(cls_pri, stable=True).tolist()
        for picked in guards.units(group.size, order, group.channel_groups):
            chunk = [ch for c in picked for ch in classes[c]]
            units.append((float(cls_pri[picked].max()), gi, chunk))
    units.sort(key=lambda u: u[0])
    return units


class _Ledger:
    """Channels removed so far and the resulting cost totals, updated one group's layers at a time."""

    def __init__(self, cost: CostModel, n_groups: int):
        self.cost = cost
        self.removed = [0] * n_groups
        self.chosen: dict[int, list[int]] = {}
        self.committed: dict[int, list[tuple[float, list[int]]]] = {}  # per group, in removal order
        self.per_layer = [layer.costs(self.removed) for layer in cost.layers]
        self.current = cost.totals(self.removed)

    def trial(self, gi: int, n: int) -> tuple[tuple[float, ...], dict[int, tuple[float, ...]]]:
        """Totals if ``n`` more channels of group ``gi`` went (negative: came back), and the changed layers."""
        self.removed[gi] += n
        new = {li: self.cost.layers[li].costs(self.removed) for li in self.cost.by_group[gi]}
        self.removed[gi] -= n
        totals = tuple(c + sum(v[i] - self.per_layer[li][i] for li, v in new.items())
                       for i, c in enumerate(self.current))
        return totals, new

    def commit(self, gi: int, chunk: list[int], trial, priority: float) -> None:
        self.removed[gi] += len(chunk)
        self.chosen.setdefault(gi, []).extend(chunk)
        self.committed.setdefault(gi, []).append((priority, chunk))
        self._apply(trial)

    def give_back(self, gi: int, trial) -> None:
        _, chunk = self.committed[gi].pop()
        self.removed[gi] -= len(chunk)
        self.chosen[gi] = self.chosen[gi][:-len(chunk)]
        self._apply(trial)

    def _apply(self, trial) -> None:
        totals, new = trial
        for li, v in new.items():
            self.per_layer[li] = v
        self.current = totals


def allocate(groups: list[ChannelGroup], scores: dict[str, torch.Tensor], cost: CostModel, target: dict[str, float],
             guards: Guards, normalization: str = "mean", cost_weight: float = 0.0,
             overshoot: float = 0.005, tolerance: float = 0.01) -> Allocation:
    """:func:`allocate_aligned` at ``guards.round_to``; by default (None) at the vector block, halved
    while the target is missed or overshot by more than ``tolerance`` (the closest result otherwise)."""
    tries = relaxations(guards.round_to)
    best, error = None, None
    for round_to in tries:
        g = Guards(guards.min_channels, guards.max_layer_ratio, round_to)
        try:
            alloc = allocate_aligned(groups, scores, cost, target, g, normalization, cost_weight, overshoot)
        except SimpruneError as exc:
            error = exc
            continue
        alloc.round_to = round_to
        gap = abs(alloc.reduction - next(iter(target.values())))
        if best is None or gap < abs(best.reduction - next(iter(target.values()))):
            best = alloc
        if gap <= tolerance:
            break
    if best is None:
        raise error
    return best


def allocate_aligned(groups: list[ChannelGroup], scores: dict[str, torch.Tensor], cost: CostModel,
                     target: dict[str, float], guards: Guards, normalization: str = "mean", cost_weight: float = 0.0,
                     overshoot: float = 0.005) -> Allocation:
    """Remove the globally least important units until the MAC/param (or latency) reduction reaches
    the target.

    A unit that would overshoot the target by more than ``overshoot`` (a fraction of the
    total) is passed over in favour of cheaper ones, so the result lands within the band. Where
    only a big unit could reach the target (coarse networks), removed units are given back, the
    most important first, for as long as the target still holds.
    A latency target needs a cost model built with a latency table; its costs are predicted ms.
    """
    kind, ratio = _check_target(target)
    if kind == "latency" and not cost.has_latency:
        raise SimpruneError("a latency target needs a cost model with a latency table; use schedule=ToLatency() "
                            "(simprune.schedules.latency.prune_to_latency), which builds one")
    k, base = KINDS.index(kind), cost.base(kind)
    goal, slack = base * (1 - ratio), base * overshoot
    ledger = _Ledger(cost, len(groups))
    skipped = []
    for unit in _units(groups, scores, cost.channel_cost(kind), guards, normalization, cost_weight):
        if ledger.current[k] <= goal:
            break
        priority, gi, chunk = unit
        trial = ledger.trial(gi, len(chunk))
        if trial[0][k] < goal - slack:  # this unit alone would overshoot the target: try cheaper ones first
            skipped.append(unit)
            continue
        ledger.commit(gi, chunk, trial, priority)
    if ledger.current[k] > goal and skipped:  # nothing cheaper was left: take the one that overshoots least
        trial, gi, chunk, priority = max(((ledger.trial(gi, len(c)), gi, c, p) for p, gi, c in skipped),
                                         key=lambda o: o[0][0][k])
        ledger.commit(gi, chunk, trial, priority)
    _give_back_overshoot(ledger, k, goal, slack)
    reduction = 1 - ledger.current[k] / base
    if ledger.current[k] > goal + 1e-9:
        raise SimpruneError(f"target {kind} reduction {ratio:.1%} cannot be reached under the guards; the largest "
                            f"reachable is {reduction:.1%}; lower the target or min_channels=, raise "
                            "max_layer_ratio=, or drop ignore= patterns")
    return Allocation({groups[g].root: sorted(ch) for g, ch in ledger.chosen.items() if ch}, ledger.current[0],
                      ledger.current[1], reduction)


def _give_back_overshoot(ledger: _Ledger, k: int, goal: float, slack: float) -> None:
    """Overshot the band: give back the most important removed unit that keeps the target, while any does."""
    while ledger.current[k] < goal - slack:
        backs = [(stack[-1][0], gi, ledger.trial(gi, -len(stack[-1][1])))
                 for gi, stack in ledger.committed.items() if stack]
        backs = [b for b in backs if b[2][0][k] <= goal]
        if not backs:
            break
        _, gi, trial = max(backs, key=lambda b: b[0])
        ledger.give_back(gi, trial)


def _check_target(target: dict[str, float]) -> tuple[str, float]:
    """(kind, ratio) of a one-key target; "macs" is the documented name of "flops" (kept)."""
    if not isinstance(target, dict) or len(target) != 1:
        raise SimpruneError("give exactly one target: {'macs': R} or {'params': R}")
    kind, ratio = next(iter(target.items()))
    kind = "flops" if kind == "macs" else kind
    if kind not in KINDS:
        raise SimpruneError(f"unknown target {kind!r}; use macs (or flops), params or latency")
    if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise SimpruneError(f"target {kind} must be a fraction removed strictly between 0 and 1, got {ratio}")
    return kind, float(ratio)
