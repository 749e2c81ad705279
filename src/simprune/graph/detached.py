"""Layers Torch-Pruning's trace does not connect to the layers that feed them (a ``.detach()`` in the
forward, or a head the trace from the outputs never reaches, e.g. YOLOv10's one-to-one head).

Torch-Pruning follows channels through autograd from the model's outputs, so such a reader is cut off
from its producer: pruning the producer would leave the reader expecting the old width and break the
forward. One forward pass with gradients records what each conv/linear layer reads and, through the
tensor's storage and the autograd graph behind it, which conv/linear layers produced it; the pruning
graph keeps the producers of every reader its trace left unconnected whole.
"""
from __future__ import annotations

import torch
from torch import nn

from simprune.errors import SimpruneError

PARAM_LAYERS = (nn.Conv2d, nn.Linear)


def input_producers(model: nn.Module, example_input: torch.Tensor) -> dict[str, list[str]]:
    """{layer: the conv/linear layers whose outputs it reads} for every conv/linear layer that runs (empty for
    a layer reading the model's input through parameter-free operations)."""
    produced_by: dict = {}  # grad_fn of a param layer's output -> layer name
    outputs: dict = {}  # (data_ptr, shape) -> a leaf module's output that has a history
    read: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            handles.append(module.register_forward_hook(_keep_output(name, module, produced_by, outputs)))
            if isinstance(module, PARAM_LAYERS):
                handles.append(module.register_forward_pre_hook(_note_input(name, read)))
    x = example_input.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad(), _RecordOutputs(outputs):
            model(x)
    except Exception:  # noqa: BLE001 - tracing reports the model's own failure in its words
        return {}
    finally:
        for h in handles:
            h.remove()
    return {name: _producers(name, t, outputs, produced_by) for name, t in read.items()}


class _RecordOutputs(torch.overrides.TorchFunctionMode):
    """Keeps every tensor with an autograd history an operation returns, by storage: what a later
    ``.detach()`` shares its storage with (functional ops such as ``torch.relu`` have no module to hook)."""

    def __init__(self, outputs: dict):
        super().__init__()
        self.outputs = outputs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            self.outputs.setdefault((out.data_ptr(), tuple(out.shape)), out)
        return out


def _keep_output(name: str, module: nn.Module, produced_by: dict, outputs: dict):
    def hook(_module, _inputs, out):
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            outputs.setdefault((out.data_ptr(), tuple(out.shape)), out)
            if isinstance(module, PARAM_LAYERS):
                produced_by[out.grad_fn] = name
    return hook


def _note_input(name: str, read: dict):
    def hook(_module, inputs):
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            read.setdefault(name, x)
    return hook


def _producers(reader: str, tensor: torch.Tensor, outputs: dict, produced_by: dict) -> list[str]:
    """The param layers whose outputs reach ``tensor``: a walk back through its autograd graph (through the
    undetached original for a detached tensor), stopping at each param layer."""
    if tensor.grad_fn is None and not tensor.requires_grad:  # detached: the original shares its storage
        original = outputs.get((tensor.data_ptr(), tuple(tensor.shape)))
        if original is None:
            raise SimpruneError(f"layer {reader!r} reads a detached tensor whose producer simprune cannot find, "
                                f"so its input channels cannot be followed; leave it whole with ignore={reader}")
        tensor = original
    found, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in produced_by:
            found.append(produced_by[fn])
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return sorted(found)


def untraced_readers(dg, model: nn.Module, producers: dict[str, list[str]]) -> dict[str, list[str]]:
    """The layers of ``producers`` that read other layers' outputs but whose node in Torch-Pruning's graph
    ``dg`` reaches none of those producers, with their producers."""
    modules = dict(model.named_modules())
    out = {}
    for reader, ps in producers.items():
        node = dg.module2node.get(modules[reader])
        if ps and (node is None or not _reaches(node, {modules[p] for p in ps})):
            out[reader] = ps
    return out


def _reaches(node, producers: set) -> bool:
    """Whether a walk back from ``node`` through the graph's inputs meets one of ``producers`` before any
    other conv/linear layer."""
    seen, stack = set(), list(node.inputs)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.module in producers:
            return True
        if not isinstance(n.module, PARAM_LAYERS):
            stack.extend(n.inputs)
    return False
