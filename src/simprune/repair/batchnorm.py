"""BatchNorm re-estimation: the last repair step, a forward over the calibration images in BN-train mode.

After a refit, which reproduces the unpruned model's pre-BatchNorm outputs, the stored statistics can be
the better ones; :func:`recalibrate_if_closer` re-estimates and keeps whichever set brings the outputs
closer to the unpruned model's (the default then)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from simprune import distributed
from simprune.calibrate.batches import Calibration, run_model
from simprune.calibrate.sensitivity import output_change, output_tensors
from simprune.errors import SimpruneError

JUDGED_IMAGES = 256  # calibration images the choice compares outputs on when none are held aside


def recalibrate_batchnorm(model: nn.Module, batches, bf16: bool = False) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (cumulative average); returns the
    number of images seen (over all ranks).

    After structural removal the activations feeding later BNs shift a little; a forward pass
    over the calibration images restores their statistics without touching any weight. A channel
    that the images leave (nearly) constant, variance below the layer's eps, keeps its trained
    statistics: a zero variance would divide later, varying inputs by sqrt(eps). When no image comes
    (an empty or exhausted iterator) every BN keeps its trained statistics and this raises."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    trained = {m: (m.running_mean.clone(), m.running_var.clone()) for m in bns if m.running_var is not None}
    calibration = Calibration.of(batches)
    try:
        with Calibration.running(model, precision="bf16" if bf16 else "fp32") as device:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average over all batches
                m.train()
            seen = sum(_bn_forward(model, x) for x in calibration.images(device))
            if distributed.active():
                seen = int(distributed.all_reduce_sum(torch.tensor(float(seen), dtype=torch.float64)))
            if seen:
                distributed.average_buffers(model)  # each rank saw its own shard
            _keep_trained_where_flat(trained, seen)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
    if not seen:
        raise SimpruneError("BatchNorm re-estimation saw no calibration images (empty or already consumed); "
                            "pass calibration= as a DataLoader or a list of batches")
    return seen


def _bn_forward(model: nn.Module, x: torch.Tensor) -> int:
    run_model(model, x)
    return int(x.shape[0])


def _keep_trained_where_flat(trained: dict, seen: int) -> None:
    """Channels left (nearly) constant, variance under eps, or every channel when no image came, get
    their trained statistics back."""
    for m, (mean, var) in trained.items():
        flat = m.running_var < m.eps if seen else torch.ones_like(m.running_var, dtype=torch.bool)
        m.running_mean[flat] = mean[flat]
        m.running_var[flat] = var[flat]


def recalibrate_if_closer(original: nn.Module, pruned: nn.Module, batches, held_aside=None) -> dict:
    """Re-estimate ``pruned``'s BatchNorm statistics on ``batches`` and keep them only if they bring its
    outputs closer to ``original``'s (the choice's measure: KL of the logits, else relative squared error)
    on ``held_aside`` images, else on the first :data:`JUDGED_IMAGES` calibration images; otherwise the
    stored statistics come back. Returns what was kept and both measures (equal over torchrun ranks)."""
    calibration = Calibration.of(batches)
    judged = _judged_batches(calibration, held_aside)
    estimated = copy.deepcopy(pruned)
    seen = recalibrate_batchnorm(estimated, calibration)
    stored_change, estimated_change = _output_changes(original, [pruned, estimated], judged)
    kept = estimated_change < stored_change
    if kept:
        for mine, theirs in zip(_batchnorms(pruned), _batchnorms(estimated)):
            mine.running_mean.copy_(theirs.running_mean)
            mine.running_var.copy_(theirs.running_var)
    return {"kept": "re-estimated" if kept else "stored", "images": seen, "judged_on": "held-aside"
            if held_aside is not None else "calibration", "judged_images": sum(len(x) for x in judged),
            "output_change": {"stored": stored_change, "re-estimated": estimated_change}}


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and
            m.running_var is not None]


def _judged_batches(calibration: Calibration, held_aside) -> list[torch.Tensor]:
    """The images the choice is judged on: the held-aside ones in the calibration's batch size, else the
    first :data:`JUDGED_IMAGES` calibration images."""
    if held_aside is not None:
        return list(held_aside.split(int(calibration.first_images().shape[0])))
    judged, count = [], 0
    for x in calibration.images():
        judged.append(x[:JUDGED_IMAGES - count])
        count += len(judged[-1])
        if count >= JUDGED_IMAGES:
            break
    return judged


def _output_changes(original: nn.Module, models: list[nn.Module], judged: list[torch.Tensor]) -> list[float]:
    """Mean over ``judged``'s images (and ranks) of :func:`output_change` from ``original`` to each of
    ``models``, in one pass: the unpruned outputs are computed once per batch and never kept."""
    totals = [0.0] * len(models)
    with Calibration.running(original, *models) as device:
        for x in judged:
            x = x.to(device)
            reference = output_tensors(run_model(original, x))
            for k, model in enumerate(models):
                totals[k] += output_change(reference, output_tensors(run_model(model, x))) * len(x)
    images = sum(len(x) for x in judged)
    return [distributed.mean_over_ranks(total, images) for total in totals]
