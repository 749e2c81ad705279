"""MACs and parameters of a model, per layer and in total.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward
pass; MACs = FLOPs / 2, which is what pruning papers call "FLOPs".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from simprune.errors import SimpruneError
from simprune.models.adapters import adapt_for_pruning


@dataclass
class Cost:
    macs: int
    params: int
    per_layer: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"macs": self.macs, "params": self.params}


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` -> ``(3, 32, 32)``."""
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise SimpruneError(f"input shape {text!r} is not CxHxW with positive sizes, e.g. 3x32x32")
    return shape


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count(model: nn.Module, example_input: torch.Tensor) -> Cost:
    """Total and per-leaf-module MACs/params for one forward of ``example_input`` (batch 1 recommended); of the
    model in the form it is pruned in (:func:`adapt_for_pruning`, exact: the layer names the groups use)."""
    adapt_for_pruning(model)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        model(example_input)
    model.train(was_training)
    batch = example_input.shape[0]
    root = type(model).__name__
    flops = {k.removeprefix(root + "."): v for k, v in counter.get_flop_counts().items()}
    per_layer: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            layer_flops = sum(flops.get(name, {}).values())
            params = sum(p.numel() for p in module.parameters(recurse=False))
            if layer_flops or params:
                per_layer[name] = {"macs": int(layer_flops // 2 // batch), "params": params}
    total = sum(flops.get("Global", {}).values())
    return Cost(macs=int(total // 2 // batch), params=count_params(model), per_layer=per_layer)


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv and output features of every linear layer, by module name (of the model
    in the form it is pruned in)."""
    adapt_for_pruning(model)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out
