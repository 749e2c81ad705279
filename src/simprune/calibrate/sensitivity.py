"""How far the model's output moves when one layer's output is disturbed: a gain per layer.

A removal's local refit error is relative to the layer's own output energy, but the same relative error
costs more in some layers than in others (an early layer feeds everything after it). The gain of a layer
is the change of the model's output when the layer's output is disturbed by relative energy ``epsilon``
(each image's channels scaled about their means by random factors), divided by ``epsilon``: output change
per unit of relative error. The change is the KL divergence of the logits for a classifier (one 2-D output)
and the relative squared error of every output tensor (each channel centered) otherwise (detectors, segmenters). A few calibration
images, no labels, one forward per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simprune.calibrate.batches import Calibration, run_model
from simprune.errors import SimpruneError


def output_tensors(output) -> list[torch.Tensor]:
    """Every float tensor in a model's output (a tensor, tuple, list or dict, nested), in order."""
    if isinstance(output, torch.Tensor):
        return [output.float()] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in output_tensors(item)]
    if hasattr(output, "to_tuple"):  # transformers' ModelOutput
        return output_tensors(output.to_tuple())
    return []


def is_logits(outputs: list[torch.Tensor]) -> bool:
    """One (N, classes) tensor: a classifier's logits, compared by KL; any other outputs by squared error."""
    return len(outputs) == 1 and outputs[0].dim() == 2


def output_change(reference: list[torch.Tensor], disturbed: list[torch.Tensor]) -> float:
    """KL(reference || disturbed) of the logits when the output is one (N, classes) tensor, else the summed
    squared change of every output relative to its energy about each channel's mean."""
    if is_logits(reference):
        ref, dis = reference[0].log_softmax(1), disturbed[0].log_softmax(1)
        return float(F.kl_div(dis, ref, log_target=True, reduction="batchmean"))
    change = 0.0
    for r, d in zip(reference, disturbed):
        change += float((d - r).pow(2).sum() / centered(r).pow(2).sum().clamp(min=1e-30))
    return change


def centered(t: torch.Tensor) -> torch.Tensor:
    """``t`` less each channel's mean (dimension 1; the whole mean for a 1-D tensor)."""
    dims = [d for d in range(t.dim()) if d != 1] if t.dim() > 1 else [0]
    return t - t.mean(dim=dims, keepdim=True)


def _noise_hook(epsilon: float, gen: torch.Generator):
    """A forward hook disturbing a layer's output by relative energy ``epsilon``: each image's channel is scaled
    about the channel's mean by a random factor (``1 + s``, ``s ~ N(0, epsilon)``). A removal's error is
    structured the same way, consistent over an image's positions, so pooling does not average it away
    as it would independent noise at every position."""
    def hook(_module, _inputs, out):
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            return out
        deviation = centered(out.float())
        scale = torch.randn(out.shape[:2], generator=gen, dtype=torch.float32).to(out.device) * epsilon ** 0.5
        return out + (deviation * scale.reshape(*scale.shape, *([1] * (out.dim() - 2)))).to(out.dtype)
    return hook


def gain_images(calibration, count: int) -> list[torch.Tensor]:
    """The first ``count`` calibration images (or all there are), batch by batch."""
    kept, seen = [], 0
    for x in Calibration.of(calibration).images():
        if seen >= count:
            break
        kept.append(x[:count - seen])
        seen += kept[-1].shape[0]
    if not kept:
        raise SimpruneError("calibration= holds no images to measure layer gains on")
    return kept


def output_gains(model: nn.Module, layers: dict[str, nn.Module], calibration, images: int = 64,
                 epsilon: float = 0.05, seed: int = 0) -> dict[str, float]:
    """Each layer's gain (see the module docstring) on the first ``images`` calibration images."""
    if not epsilon > 0:
        raise SimpruneError(f"layer gains need epsilon > 0, got {epsilon}")
    batches = gain_images(calibration, images)
    gains = {}
    with Calibration.running(model) as device:
        reference = [output_tensors(run_model(model, x.to(device))) for x in batches]
        for name, layer in layers.items():
            gen = torch.Generator().manual_seed(seed)
            handle = layer.register_forward_hook(_noise_hook(epsilon, gen))
            try:
                change = sum(output_change(ref, output_tensors(run_model(model, x.to(device)))) * x.shape[0]
                             for ref, x in zip(reference, batches))
            finally:
                handle.remove()
            gains[name] = change / sum(x.shape[0] for x in batches) / epsilon
    return gains
