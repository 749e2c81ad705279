"""Hardware-aligned channel counts: how many channels one removal unit takes from a group.

onnxruntime's CPU conv kernels (NCHWc) pad channel counts up to their vector block, so pruning
that does not cross a block boundary saves MACs but no time. By default every group keeps a
multiple of the block (``round_to=None``); the allocator relaxes it (halving) only where the
target cannot otherwise be met within a point. A grouped conv's G channel groups lose the
same positions, so one unit removes G channels (or a multiple keeping the count aligned).
"""
from __future__ import annotations

import math
from pathlib import Path


def vector_block() -> int:
    """Channels per vector block of onnxruntime's CPU conv kernels (NCHWc): 16 with AVX-512, else 8."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


def relaxations(round_to: int | None) -> list[int]:
    """Roundings to try in order: an explicit ``round_to`` alone; by default the vector block, then halves."""
    if round_to is not None:
        return [round_to]
    out, block = [], vector_block()
    while block > 1:
        out.append(block)
        block //= 2
    return out + [1]


def removable_positions(size: int, channel_groups: int, min_channels: int, max_layer_ratio: float,
                        round_to: int) -> tuple[int, int]:
    """(positions that may go, positions per unit) for a group of ``size`` channels in ``channel_groups``
    equal groups; a position is one channel in each group. The kept channel count stays at least
    ``min_channels`` (or the group), at least ``1 - max_layer_ratio`` of it, and a multiple of
    ``round_to`` unless the whole group is kept."""
    positions = size // channel_groups
    floor = max(1, min(size, min_channels), math.ceil(size * (1 - max_layer_ratio)))
    step = max(1, round_to) // math.gcd(max(1, round_to), channel_groups)
    kept = min(positions, math.ceil(math.ceil(floor / channel_groups) / step) * step)
    return max(0, positions - kept), step
