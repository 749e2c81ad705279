"""Soft pruning (SFP, and the filter-similarity paper's soft mode).

The network keeps its full width while it fine-tunes; after each epoch the selected filters are zeroed
and may recover in the next epoch, and the zeroed share rises linearly to the target. For the last
``hold`` epochs (beyond the papers, default 0) the final selection is frozen and kept fully zeroed
after every step. At the end the selected channels are zeroed everywhere they act (filters, norms,
readers' input weights) and then removed for good: the outputs before and after removal are identical.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from simprune import progress
from simprune.allocation.allocator import CostModel
from simprune.allocation.selection import Selection
from simprune.errors import SimpruneError
from simprune.graph.counting import count
from simprune.graph.groups import PARAM_LAYERS, ChannelGroup, PruningGraph
from simprune.graph.removal import remove_channels
from simprune.schedules.checks import soft_epochs
from simprune.schedules.oneshot import Job
from simprune.schedules.report import PruneReport, Snapshot, prune_report
from simprune.train.finetune import FineTune
from simprune.train.loop import TrainHooks

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def soft_shares(ratio: float, epochs: int, hold: int = 0) -> list[float]:
    """Zeroed share after each epoch: linear rise to ``ratio`` by epoch ``epochs - hold``, then flat."""
    if epochs < 1 or not 0 <= hold < epochs:
        raise SimpruneError(f"soft pruning needs at least 1 epoch and hold= below the epochs; got {epochs} "
                            f"epoch(s), hold={hold}")
    ramp = epochs - hold
    return [ratio * min(1.0, e / ramp) for e in range(1, epochs + 1)]


def _channel_slices(member, group_size: int, channels: list[int]) -> list[int]:
    """Module indices of group channels ``channels`` for one member (flatten readers map 1 -> k)."""
    per = max(1, len(member.idxs) // group_size)
    return [member.idxs[c * per + j] for c in channels for j in range(per)]


@torch.no_grad()
def zero_channels(group: ChannelGroup, channels: list[int], full: bool) -> None:
    """Zero ``channels`` of ``group`` in place. Filters (and biases) of the producers always; with
    ``full`` also the norms' affine parameters and the readers' input weights, which makes the
    channels inert everywhere, so removing them afterwards changes no output."""
    if not channels:
        return
    for m in group.members:
        idx = torch.as_tensor(_channel_slices(m, group.size, channels))
        mod = m.module
        if isinstance(mod, PARAM_LAYERS) and m.dim == "out":
            mod.weight.index_fill_(0, idx, 0.0)
            if mod.bias is not None:
                mod.bias.index_fill_(0, idx, 0.0)
        elif full and isinstance(mod, PARAM_LAYERS) and m.dim == "in":
            mod.weight.index_fill_(1, idx, 0.0)
        elif full and isinstance(mod, NORMS) and getattr(mod, "weight", None) is not None:
            mod.weight.index_fill_(0, idx, 0.0)
            mod.bias.index_fill_(0, idx, 0.0)


def zero_exact(group: ChannelGroup) -> bool:
    """False when a parameter-free layer both writes into and reads from the group (a CIFAR option-A
    shortcut between two stages): its channels carry values no zeroing can stop, so soft pruning
    would not be output-preserving there and leaves the group whole."""
    free = [m for m in group.members if not isinstance(m.module, PARAM_LAYERS + NORMS)
            and m.name != "?"]  # "?": Torch-Pruning's own element-wise/slice/reshape nodes
    return not ({m.dim for m in free} >= {"in", "out"})


class SoftPruning(TrainHooks):
    """Train-loop hooks for soft pruning: re-select and zero after each epoch, optionally hold at the end."""

    def __init__(self, graph: PruningGraph, select: Callable[[dict[str, float], list[str]], Any],
                 kind: str, ratio: float, epochs: int, hold: int = 0, log: Callable[[str], None] = print):
        self.graph, self.select, self.kind, self.log = graph, select, kind, log
        self.shares = soft_shares(ratio, epochs, hold)
        self.final_epoch = epochs - hold
        self.selected: dict[str, list[int]] = {}
        self.frozen = False
        self.protected = [g.root for g in graph.groups if not zero_exact(g)]
        self.by_root = {g.root: g for g in graph.groups}

    def _apply(self, full: bool) -> None:
        for root, chans in self.selected.items():
            zero_channels(self.by_root[root], chans, full)

    def on_step(self, model: nn.Module) -> None:
        if self.frozen:
            self._apply(full=True)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        if not self.frozen:
            share = self.shares[epoch - 1]
            alloc = self.select({self.kind: share}, self.protected)
            self.selected = {k: list(v) for k, v in alloc.remove.items()}
            self.frozen = epoch >= self.final_epoch
            self.log(f"soft pruning: epoch {epoch}, {share:.1%} {self.kind} zeroed"
                     f"{' (final selection)' if self.frozen else ''}")
        self._apply(full=self.frozen)

    def state(self) -> dict:
        return {"selected": self.selected, "frozen": self.frozen}

    def load_state(self, state: dict) -> None:
        selected, frozen = state.get("selected", {}), state.get("frozen", False)
        if not isinstance(selected, dict) or any(k not in self.by_root for k in selected):
            raise SimpruneError("the training state's soft-pruning selection does not match this model; "
                                "resume with the same model and command")
        self.selected = {k: [int(i) for i in v] for k, v in selected.items()}
        self.frozen = bool(frozen)


def finish_soft(hooks: SoftPruning) -> dict[str, list[int]]:
    """Make the final selection inert and remove it for good; returns what was removed."""
    if not hooks.frozen:
        raise SimpruneError("soft pruning ended before its final selection; resume the run with resume=True")
    hooks._apply(full=True)
    remove_channels(hooks.graph, hooks.selected)
    return hooks.selected


def soft_selector(graph: PruningGraph, crit: Any, example: torch.Tensor, calibration=None,
                  selection: Selection | None = None):
    """A ``select(target, protected)`` function over the full-width model for :class:`SoftPruning`."""
    cost = CostModel(graph.groups, count(graph.model, example))
    selection = selection or Selection()

    def select(target: dict[str, float], protected: list[str]):
        alloc, _, _ = selection.select(graph, crit, target, cost, calibration, protected)
        return alloc

    return select


def soft_prune(job: Job, finetune: FineTune, hold: int = 0) -> tuple[nn.Module, PruneReport]:
    """Soft pruning of ``job.model`` for ``finetune.cfg.epochs`` epochs, then removal for good (no repair:
    the training is the repair, and the zeroed channels are inert when they go).

    Returns (pruned model, report); the report's accuracy after removal equals the zeroed model's."""
    model, example, crit, target = job.model, job.example, job.criterion, job.target
    kind, ratio = next(iter(target.items()))
    graph = PruningGraph(model, example, ignore=job.selection.ignore)
    before = Snapshot.take(model, example, graph)
    select = soft_selector(graph, crit, example, job.calibration, job.selection)
    hooks = SoftPruning(graph, select, kind, ratio, finetune.cfg.epochs, hold, log=finetune.log)
    early = soft_epochs(ratio, finetune.cfg.epochs, hold)
    for text in early:
        progress.warn(text)
    history = finetune.run(model, hooks)
    removed = finish_soft(hooks)
    model.eval()
    return model, prune_report(
        model_name=getattr(model, "simprune_name", type(model).__name__), criterion=crit.name, target=target,
        schedule={"name": "soft", "epochs": finetune.cfg.epochs, "hold": hold, "shares": hooks.shares},
        before=before, after=Snapshot.take(model, example, graph), removed=removed, protected=hooks.protected,
        repaired={"compensated": False, "bn_recalibrated": False},
        finetune={"epochs": finetune.cfg.epochs, "history": history, "soft": True}, warnings=early)
