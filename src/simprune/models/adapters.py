"""Make third-party blocks traceable for channel pruning without changing what they compute.

torchvision's ShuffleNetV2 shuffles channels with a functional view/transpose/view, which
Torch-Pruning cannot follow (its reshape index mapping divides by zero). Its blocks are given
a :class:`ChannelShuffle` module instead; the pruning graph treats that module as a barrier:
channels that pass through a shuffle are kept whole, every other channel (the branches'
inner widths, the stem, the last 1x1 conv) is pruned as usual. State dict keys do not change.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from simprune.errors import SimpruneError
from simprune.models.split import split_halves


class ChannelShuffle(nn.Module):
    """``x.view(B, G, C/G, H, W).transpose(1, 2)`` flattened back: the ShuffleNet channel shuffle."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.channels, self.groups = channels, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"


def _shufflenet_forward(self, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``InvertedResidual.forward`` with the shuffle as a module."""
    if self.stride == 1:
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch2(x2)), dim=1)
    else:
        out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
    return self.shuffle(out)


_ADAPTED: dict[type, type] = {}


def _is_torchvision_shuffle_block(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "InvertedResidual" and cls.__module__ == "torchvision.models.shufflenetv2"


def adapt_for_pruning(model: nn.Module) -> nn.Module:
    """Give known blocks module-level channel operations (in place; idempotent); returns ``model``."""
    for module in model.modules():
        if _is_torchvision_shuffle_block(module):
            base = type(module)
            module.__class__ = _ADAPTED.setdefault(
                base, type(f"Shufflable{base.__name__}", (base,), {"forward": _shufflenet_forward}))
            channels = 2 * module.branch2[0].out_channels
            module.shuffle = ChannelShuffle(channels, 2)
    return split_halves(model)


class BarrierPruner(tp.pruner.BasePruningFunc):
    """A channel permutation Torch-Pruning cannot follow (:class:`ChannelShuffle`): its channels stay whole."""

    TARGET_MODULES = ChannelShuffle

    def prune_out_channels(self, layer, idxs):
        raise SimpruneError(f"channels through {type(layer).__name__} cannot be pruned")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return layer.channels

    get_in_channels = get_out_channels


# channel maps the pruning graph keeps whole, and their Torch-Pruning pruners
BARRIERS = (ChannelShuffle,)
CUSTOM_PRUNERS = {ChannelShuffle: BarrierPruner()}
