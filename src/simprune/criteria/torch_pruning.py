"""Torch-Pruning's own importances as criteria (``tp:*``): the peer a user would pick instead,
run through Torch-Pruning's classes on Torch-Pruning's own groups, on the same allocator.

Each importance already normalises a group's scores (its ``normalizer``: "mean" for the magnitude,
BN-scale, FPGM and Taylor importances, LAMP's own for LAMP), as Torch-Pruning's global pruning
uses them, so the allocator compares them as they are ("none").

``tp:taylor`` needs gradients: one backward pass over the calibration images of the cross-entropy
against the labels the batches carry (``targets="labels"``, the default; batches without labels
fall back to predictions) or against the model's own predictions (``targets="predictions"``);
the result's ``notes["taylor_targets"]`` says which was used.
"""
from __future__ import annotations

import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from simprune import distributed
from simprune.calibrate.batches import Calibration, check_precision
from simprune.criteria.base import Criterion, CriterionResult
from simprune.criteria.registry import register
from simprune.errors import SimpruneError
from simprune.graph.groups import ChannelGroup, PruningGraph


def tp_group(graph: PruningGraph, group: ChannelGroup):
    """Torch-Pruning's own group for all channels of ``group`` (rooted at its producing layer)."""
    root = group.members[0]
    handler = graph.dg.get_pruner_of_module(root.module).prune_out_channels
    return graph.dg.get_pruning_group(root.module, handler, list(range(group.size)))


class TorchPruningImportance(Criterion):
    """Scores every group with a ``tp.importance`` object made by :meth:`importance`."""

    normalization = "none"

    def importance(self):
        raise NotImplementedError

    def score(self, graph: PruningGraph, calibration=None) -> CriterionResult:
        imp, scores = self.importance(), {}
        for group in graph.groups:
            s = imp(tp_group(graph, group))
            if s is not None:
                scores[group.root] = s.detach().double().nan_to_num(nan=0.0).cpu()
        return CriterionResult(scores, normalization=self.normalization)


@register("tp:l1", "Torch-Pruning GroupMagnitudeImportance, p=1 (group L1 norm, mean-normalised)")
class TPL1(TorchPruningImportance):
    def importance(self):
        return tp.importance.GroupMagnitudeImportance(p=1)


@register("tp:l2", "Torch-Pruning GroupMagnitudeImportance, p=2 (group L2 norm, mean-normalised)")
class TPL2(TorchPruningImportance):
    def importance(self):
        return tp.importance.GroupMagnitudeImportance(p=2)


@register("tp:lamp", "Torch-Pruning LAMPImportance (layer-adaptive magnitude, Lee et al. 2021)")
class TPLAMP(TorchPruningImportance):
    def importance(self):
        return tp.importance.LAMPImportance()


@register("tp:bnscale", "Torch-Pruning BNScaleImportance (|BatchNorm gamma|, network slimming)")
class TPBNScale(TorchPruningImportance):
    def importance(self):
        return tp.importance.BNScaleImportance()


@register("tp:fpgm", "Torch-Pruning FPGMImportance (geometric median, mean-normalised)")
class TPFPGM(TorchPruningImportance):
    def importance(self):
        return tp.importance.FPGMImportance()


@register("tp:taylor", "Torch-Pruning GroupTaylorImportance |w * dL/dw| (gradients on the calibration images)")
class TPTaylor(TorchPruningImportance):
    needs_data = True
    TARGETS = ("labels", "predictions")

    def __init__(self, targets: str = "labels", calib_precision: str = "fp32", progress: bool = False):
        """``calib_precision`` defaults to fp32: a backward pass under bf16 autocast rounds the gradients,
        and their product with the weights is what is ranked."""
        if targets not in self.TARGETS:
            raise SimpruneError(f"tp:taylor targets must be one of {', '.join(self.TARGETS)}, got {targets!r}")
        self.targets, self.calib_precision, self.progress = targets, check_precision(calib_precision), progress

    def importance(self):
        return tp.importance.GroupTaylorImportance()

    def score(self, graph: PruningGraph, calibration=None) -> CriterionResult:
        if calibration is None:
            raise SimpruneError("criterion 'tp:taylor' needs calibration data; pass calibration=")
        model = graph.model
        params = list(model.parameters())
        saved = [(p.requires_grad, p.grad) for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            used = self._gradients(model, calibration)
            result = super().score(graph)
        finally:
            for p, (req, grad) in zip(params, saved):
                p.requires_grad_(req)
                p.grad = grad
        result.notes["taylor_targets"] = used
        return result

    def _gradients(self, model: nn.Module, calibration) -> str:
        """Sum of the cross-entropy gradients over all calibration images; returns what the targets were."""
        used, seen = set(), 0
        # eval mode: BatchNorm uses its running statistics and does not update them
        with Calibration.running(model, precision=self.calib_precision, grad=True) as device:
            for x, labels in Calibration.of(calibration).labelled(device):
                out = model(x).float()
                if self.targets == "labels" and labels is not None and labels.shape == out.shape[:1]:
                    target = labels.long()
                    used.add("labels")
                else:
                    target = out.detach().argmax(1)
                    used.add("model predictions")
                F.cross_entropy(out, target, reduction="sum").backward()
                seen += x.shape[0]
        if distributed.active():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.copy_(distributed.all_reduce_sum(p.grad))
        if not seen:
            raise SimpruneError("tp:taylor saw no calibration images; pass calibration= as a DataLoader or a list")
        return " and ".join(sorted(used))
