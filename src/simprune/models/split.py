"""A conv whose output a block cuts in two (``cv1(x).chunk(2, 1)``) becomes two equivalent convs.

Torch-Pruning follows a channel split only by the order its consumers were traced in, which is
wrong when one half feeds several layers (YOLO's C2f/C3k2 feed the second half to the bottlenecks
and both to the closing concat): its group for ``cv1`` then holds indices far past the layer's
channels. Each half computed by its own conv is exact (the same rows of the same weights), and
the graph follows each one to the layers that read it: one decision per real channel set, the two
halves pruned independently. The halves are not folded back after pruning: they may now differ
in width, and one model form serves pruning, saving, loading and repair alike (state dict keys
``cv1.parts.0.*``/``cv1.parts.1.*`` instead of ``cv1.*``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# ultralytics blocks whose forward cuts ``self.cv1(x)`` into two halves with .chunk(2, 1) / .split((c, c), 1)
ULTRALYTICS_SPLIT_BLOCKS = frozenset({"C2", "C2f", "C3k2", "C2fCIB", "C2fPSA", "C2fAttn", "RepNCSPELAN4", "ELAN1",
                                      "C2PSA", "PSA"})


class Parts(list):
    """A conv output already cut into its parts: what the block's ``chunk``/``split`` along channels returns."""

    def chunk(self, chunks: int, dim: int = 1) -> list[torch.Tensor]:
        if chunks != len(self) or dim not in (1, -3):
            raise ValueError(f"this output is cut into {len(self)} parts along channels, not {chunks} along {dim}")
        return list(self)

    def split(self, sizes, dim: int = 1) -> list[torch.Tensor]:
        if isinstance(sizes, int) or len(sizes) != len(self) or dim not in (1, -3):
            raise ValueError(f"this output is cut into {len(self)} parts along channels")
        return list(self)


class SplitConv(nn.Module):
    """Several convs reading the same input, standing for one conv whose output is cut into these parts."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> Parts:
        return Parts(part(x) for part in self.parts)


def _rows(block: nn.Module, lo: int, hi: int) -> nn.Module:
    """A copy of a conv(+BN)(+activation) block computing output channels ``lo:hi`` only."""
    part = copy.deepcopy(block)
    conv, bn = part.conv, getattr(part, "bn", None)
    conv.weight = nn.Parameter(conv.weight.detach()[lo:hi].clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[lo:hi].clone())
    conv.out_channels = hi - lo
    if isinstance(bn, nn.BatchNorm2d):
        for name in ("weight", "bias"):
            if getattr(bn, name) is not None:
                setattr(bn, name, nn.Parameter(getattr(bn, name).detach()[lo:hi].clone()))
        for name in ("running_mean", "running_var"):
            if getattr(bn, name) is not None:
                setattr(bn, name, getattr(bn, name)[lo:hi].clone())
        bn.num_features = hi - lo
    return part


def _splittable(module: nn.Module) -> bool:
    cls = type(module)
    cv1 = getattr(module, "cv1", None)
    conv = getattr(cv1, "conv", None)
    return (cls.__module__.startswith("ultralytics.") and cls.__name__ in ULTRALYTICS_SPLIT_BLOCKS
            and isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.out_channels % 2 == 0
            and isinstance(getattr(cv1, "bn", None), (nn.BatchNorm2d, type(None))))


def split_halves(model: nn.Module) -> nn.Module:
    """Give every known block that cuts its ``cv1`` output in two a :class:`SplitConv` (in place; idempotent)."""
    for module in list(model.modules()):
        if _splittable(module) and not isinstance(module.cv1, SplitConv):
            c = module.cv1.conv.out_channels // 2
            module.cv1 = SplitConv([_rows(module.cv1, 0, c), _rows(module.cv1, c, 2 * c)])
    return model
