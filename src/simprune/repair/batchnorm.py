"""BatchNorm re-estimation: the last repair step, a forward over the calibration images in BN-train mode."""
from __future__ import annotations

import torch
from torch import nn

from simprune import distributed
from simprune.calibrate.batches import Calibration, run_model
from simprune.errors import SimpruneError


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
