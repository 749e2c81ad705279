"""Torch-Pruning's own importances, run through its own classes, as criteria objects for the benchmark.

Used only while the library's ``tp:*`` criteria are not on this branch (they belong to the scores work):
:func:`tp_criterion` returns the registered ``tp:NAME`` criterion when it exists, else this adapter.
Each importance scores Torch-Pruning's own group for a simprune group with its default normaliser (as
Torch-Pruning's global pruning uses it), so the allocator compares the scores as they are ("none").
Taylor takes the cross-entropy gradients of the calibration images against their labels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp

from simprune.criteria import CriterionResult, available_criteria, get_criterion

IMPORTANCES = {
    "tp:l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "tp:l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "tp:lamp": lambda: tp.importance.LAMPImportance(),
    "tp:bnscale": lambda: tp.importance.BNScaleImportance(),
    "tp:fpgm": lambda: tp.importance.FPGMImportance(),
    "tp:taylor": lambda: tp.importance.GroupTaylorImportance(),
}


class TorchPruningImportance:
    """``score(graph[, calibration])`` from a ``tp.importance`` object on Torch-Pruning's group of each group."""

    compensate_by_default = False
    normalization = "none"

    def __init__(self, name: str):
        self.name, self.needs_data = name, name == "tp:taylor"

    def score(self, graph, calibration=None) -> CriterionResult:
        if self.needs_data:
            return self._with_gradients(graph, calibration)
        imp, scores = IMPORTANCES[self.name](), {}
        for group in graph.groups:
            root = group.members[0]
            handler = graph.dg.get_pruner_of_module(root.module).prune_out_channels
            s = imp(graph.dg.get_pruning_group(root.module, handler, list(range(group.size))))
            if s is not None:
                scores[group.root] = s.detach().double().nan_to_num(nan=0.0)
        return CriterionResult(scores, normalization=self.normalization)

    def _with_gradients(self, graph, calibration) -> CriterionResult:
        model, params = graph.model, list(graph.model.parameters())
        saved = [(p.requires_grad, p.grad) for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            with torch.enable_grad():
                for x, y in calibration:
                    F.cross_entropy(model(x), y, reduction="sum").backward()
            self.needs_data = False
            return self.score(graph)
        finally:
            self.needs_data = True
            for p, (req, grad) in zip(params, saved):
                p.requires_grad_(req)
                p.grad = grad


def tp_criterion(name: str):
    """The library's ``tp:NAME`` criterion when registered, else the adapter above."""
    return get_criterion(name) if name in available_criteria() else TorchPruningImportance(name)
