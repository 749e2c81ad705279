"""Re-apply a saved pruned structure (layer widths) to a freshly built model.

Placeholder until the pruning engine lands: an unpruned model has no structure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .errors import SimpruneError


def apply_structure(model: nn.Module, structure: Any, source: Path) -> nn.Module:
    raise SimpruneError(f"{source} describes a pruned structure, which this simprune version cannot rebuild; upgrade")
