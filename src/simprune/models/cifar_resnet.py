"""CIFAR-style ResNets (He et al. 2016, sec. 4.2): ResNet-20/32/56/110.

Two shortcut options for the blocks that change width:
- ``"A"``: parameter-free; subsample by the stride and zero-pad the new channels.
  This is the one the pruning papers (HRank, FPGM, CHIP, QSFM) use.
- ``"B"``: 1x1 conv + BN projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: ``out[:, dst[k]] = x[:, src[k], ::stride, ::stride]``, other channels zero.

    Unpruned, input channel k lands on output channel ``k + (out - in) // 2``
    (the usual symmetric zero pad). ``src``/``dst`` are buffers so pruning can
    drop either side (Torch-Pruning alone would treat the pad as one-to-one;
    see ``simprune.graph``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        offset = (out_channels - in_channels) // 2
        self.register_buffer("src", torch.arange(in_channels), persistent=True)
        self.register_buffer("dst", torch.arange(in_channels) + offset, persistent=True)

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.src.tolist(), self.dst.tolist()))

    def set_mapping(self, pairs: list[tuple[int, int]], in_channels: int) -> None:
        """Replace the (input channel -> output channel) map; used by the pruner."""
        self.in_channels = in_channels
        self.src = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        self.dst = torch.tensor([p[1] for p in pairs], dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros(x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, out={self.out_channels}, stride={self.stride}, routed={self.src.numel()}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, option: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = ZeroPadShortcut(in_planes, planes, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, option: str = "A"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if option not in ("A", "B"):
            raise ValueError(f"shortcut option must be 'A' or 'B', got {option!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, option))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ZeroPadShortcutPruner(tp.pruner.BasePruningFunc):
    """Prunes the index map of :class:`ZeroPadShortcut` (no weights)."""

    TARGET_MODULES = ZeroPadShortcut

    def prune_out_channels(self, layer: ZeroPadShortcut, idxs):
        removed = set(int(i) for i in idxs)
        keep = [c for c in range(layer.out_channels) if c not in removed]
        new_pos = {old: new for new, old in enumerate(keep)}
        # an input channel whose target was removed no longer reaches the output
        pairs = [(s, new_pos[d]) for s, d in layer.pairs() if d in new_pos]
        layer.out_channels = len(keep)
        layer.set_mapping(pairs, in_channels=layer.in_channels)
        return layer

    def prune_in_channels(self, layer: ZeroPadShortcut, idxs):
        removed = set(int(i) for i in idxs)
        keep = [c for c in range(layer.in_channels) if c not in removed]
        new_src = {old: new for new, old in enumerate(keep)}
        pairs = [(new_src[s], d) for s, d in layer.pairs() if s in new_src]
        layer.set_mapping(pairs, in_channels=len(keep))
        return layer

    def get_out_channels(self, layer: ZeroPadShortcut):
        return layer.out_channels

    def get_in_channels(self, layer: ZeroPadShortcut):
        return layer.in_channels


# parameter-free channel maps of this family, for Torch-Pruning's DependencyGraph
CUSTOM_PRUNERS = {ZeroPadShortcut: ZeroPadShortcutPruner()}
