"""Coupled channel groups, from Torch-Pruning's DependencyGraph.

A group is every (layer, dimension) whose channel index is tied together: a conv's
output, its BN, the next layers' inputs, depthwise convs, residual sums, concat
slices. Removing channel k of a group removes it from all members at once.

Model families declare the custom Torch-Pruning pruners of their parameter-free channel maps
(``simprune.models.CUSTOM_PRUNERS``), e.g. the CIFAR option-A shortcut (subsample + zero-pad), whose
input and output channels are different index spaces.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from simprune.errors import SimpruneError
from simprune.models import CUSTOM_PRUNERS

PARAM_LAYERS = (nn.Conv2d, nn.Conv1d, nn.Linear)


@dataclass
class Member:
    """One (layer, dimension) of a group. ``dim`` is "out" or "in"; depthwise convs appear as "out"."""

    name: str
    module: nn.Module
    dim: str
    idxs: list[int]


@dataclass
class ChannelGroup:
    """Channels sharing one index across coupled layers; ``root`` names the producing layer."""

    root: str
    size: int
    members: list[Member] = field(default_factory=list)

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.dim == "out" and isinstance(m.module, PARAM_LAYERS)]

    @property
    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.dim == "in" and isinstance(m.module, PARAM_LAYERS)]

    @property
    def compensable(self) -> bool:
        """True when every reader of these channels is a conv/linear, so a removed channel can be folded
        into the kept ones; a parameter-free reader (the option-A zero-pad shortcut) passes it on unfixed."""
        readers = [m for m in self.members if m.dim == "in" and not isinstance(m.module, nn.BatchNorm2d)]
        return all(isinstance(m.module, PARAM_LAYERS) for m in readers)



def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def find_classifier(model: nn.Module) -> nn.Module | None:
    """The last Linear (or last conv when there is no Linear): its outputs are the classes, never pruned."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                last = m
    return last


class PruningGraph:
    """The model's dependency graph and its prunable channel groups."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignore: list[str] | tuple = ()):
        self.model = model
        names = {m: n for n, m in model.named_modules()}
        classifier = find_classifier(model)
        ignored_layers = [classifier] if classifier is not None else []
        for pattern in ignore:
            matched = [m for n, m in model.named_modules() if n and fnmatch.fnmatch(n, pattern)
                       and isinstance(m, PARAM_LAYERS)]
            if not matched:
                raise SimpruneError(f"--ignore {pattern!r} matches no conv/linear layer; "
                                    "use `simprune info --per-layer` to see the layer names")
            ignored_layers += matched
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                self.dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_input, customized_pruners=CUSTOM_PRUNERS, verbose=False)
        except Exception as exc:  # noqa: BLE001 - tracing failures come in many types
            raise SimpruneError(f"cannot trace the model for pruning ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); check --input") from exc
        finally:
            model.train(was_training)
        self.groups: list[ChannelGroup] = []
        for g in self.dg.get_all_groups(ignored_layers=ignored_layers, root_module_types=(nn.Conv2d, nn.Linear)):
            members = []
            for dep, idxs in g:
                mod = dep.target.module
                if not isinstance(mod, nn.Module):
                    continue
                dim = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
                members.append(Member(names.get(mod, "?"), mod, dim, list(idxs)))
            root = members[0]
            if len(root.idxs) > 1:
                self.groups.append(ChannelGroup(root.name, len(root.idxs), members))
        self.ignored = {names[m] for m in ignored_layers}
        if not self.groups:
            raise SimpruneError("the model has no prunable channel group (no conv/linear layer outside the "
                                "classifier and --ignore); nothing to prune")

    def group(self, layer: str) -> ChannelGroup:
        """The group rooted at ``layer``, else the group whose outputs ``layer`` produces."""
        for g in self.groups:
            if g.root == layer:
                return g
        for g in self.groups:
            if any(m.name == layer and m.dim == "out" for m in g.members):
                return g
        raise SimpruneError(f"no channel group produced by layer {layer!r}")

    def prune_group(self, group: ChannelGroup, remove: list[int]) -> None:
        """Physically remove channels ``remove`` (indices into the group's current numbering)."""
        if not remove:
            return
        root = group.members[0]
        handler = self.dg.get_pruner_of_module(root.module).prune_out_channels
        pg = self.dg.get_pruning_group(root.module, handler, sorted(int(i) for i in remove))
        pg.prune(record_history=False)
        group.size -= len(remove)
