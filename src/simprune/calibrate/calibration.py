"""Calibration: feed images through the model once and accumulate per-group feature statistics.

A group's feature maps are read where they are consumed: the input of each layer
that reads the group's channels (a conv or linear "probe"), i.e. the root output
after BN and activation (and after any residual sum). Residual groups have one
probe per consumer; depthwise-separable groups are probed at the projection
input. Statistics are sums (``ChannelStats``), accumulated batch by batch under
no_grad in bounded memory, and all-reduced across processes when distributed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from simprune import distributed
from simprune.errors import SimpruneError
from simprune.graph.groups import ChannelGroup, Member, PruningGraph, is_depthwise
from simprune.io.data import load_dataset
from simprune.progress import bar as progress_bar
from simprune.stats.channel_stats import ChannelStats


@dataclass
class Probe:
    """One consumer of a group's channels and the statistics of what it reads."""

    member: Member
    stats: ChannelStats


def calibration_subset(ds: Dataset, n_images: int, seed: int = 0) -> Subset:
    """A seeded random subset of ``n_images`` from ``ds`` (the whole set when it is smaller)."""
    if len(ds) == 0:
        raise SimpruneError("the calibration data set is empty")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n_images].tolist()
    return Subset(ds, sorted(idx))


def calibration_loader(name: str, n_images: int = 640, data_dir: str | None = None, pad_to: int | None = None,
                       seed: int = 0, batch_size: int = 128, split: str = "train") -> DataLoader:
    """Calibration batches from a named data set's training split (no augmentation).

    Under torchrun each rank gets its own shard of the same seeded subset."""
    ds = load_dataset(name, split, data_dir, pad_to, augment=False)
    subset = calibration_subset(ds, n_images, seed)
    if distributed.active():
        subset = Subset(subset.dataset, distributed.shard(list(subset.indices)))
    return DataLoader(subset, batch_size=batch_size, shuffle=False)


def probe_members(group: ChannelGroup) -> list[Member]:
    """Layers whose input carries the group's channels: dense consumers first, depthwise only as a fallback."""
    dense = [m for m in group.consumers if not is_depthwise(m.module)]
    return dense or [m for m in group.members if is_depthwise(m.module)]


def _maps_for(member: Member, x: torch.Tensor, channels: int) -> torch.Tensor:
    """The group's channels out of a consumer's input, as (B, C, H, W)."""
    idx = torch.as_tensor(member.idxs, device=x.device)
    if x.ndim == 4:
        return x.index_select(1, idx)
    if x.ndim == 2:  # a Linear after pooling (1 value per channel) or flatten (k values per channel)
        sel = x.index_select(1, idx)
        return sel.reshape(x.shape[0], channels, -1, 1)
    raise SimpruneError(f"cannot read feature maps of shape {tuple(x.shape)} at {member.name}")


def collect_statistics(model: nn.Module, graph: PruningGraph, batches, metrics: set[str],
                       bf16: bool = True, progress: bool = True, window: int = 7,
                       reduce=None) -> dict[str, list[Probe]]:
    """One pass over ``batches`` of (images, labels); returns per-group probes with their statistics.

    ``reduce`` (e.g. an all-reduce) is applied to every statistics tensor at the end; by default
    the sums are all-reduced across torchrun ranks, so every rank sees the statistics of all images.
    """
    if reduce is None and distributed.active():
        reduce = distributed.all_reduce_sum
    probes: dict[str, list[Probe]] = {}
    hooks = []

    def make_hook(probe: Probe, channels: int):
        def hook(module, inputs):
            probe.stats.update(_maps_for(probe.member, inputs[0].detach().float(), channels))
        return hook

    for group in graph.groups:
        for member in probe_members(group):
            probe = Probe(member, ChannelStats(group.size, metrics, window=window))
            probes.setdefault(group.root, []).append(probe)
            hooks.append(member.module.register_forward_pre_hook(make_hook(probe, group.size)))
    was_training = model.training
    model.eval()
    seen = varied = 0
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for batch in progress_bar(batches, "calibration statistics", unit="batches", enabled=progress):
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                _forward(model, x)
                seen += x.shape[0]
                flat = x.flatten(1)
                varied += int((flat.amax(1) > flat.amin(1)).sum()) if flat.shape[1] else 0
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if reduce is not None:
        seen, varied = (int(v) for v in reduce(torch.tensor([float(seen), float(varied)], dtype=torch.float64)))
    if seen == 0:
        raise SimpruneError("no calibration images were seen; pass calibration= batches of images")
    if varied == 0:
        raise SimpruneError(f"all {seen} calibration images are constant (no pixel differs), so every feature-map "
                            "similarity ties; calibrate on real images")
    if reduce is not None:
        for plist in probes.values():
            for p in plist:
                p.stats = ChannelStats.from_tensors({k: reduce(v) for k, v in p.stats.tensors().items()},
                                                    channels=p.stats.channels, **p.stats.options)
    return probes


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
    except RuntimeError as exc:  # wrong channel count or size: torch's own message, in one line
        raise SimpruneError(f"the model cannot read calibration images of shape {tuple(x.shape[1:])} "
                            f"({str(exc).splitlines()[0][:120]}); give calibration= images of the model's input "
                            "shape (pad_to=)") from exc


def mean_similarity(probes: list[Probe], metric: str) -> torch.Tensor:
    """A group's similarity matrix: the mean over its probes (residual channels share one decision)."""
    return torch.stack([p.stats.similarity(metric) for p in probes]).mean(0)


def check_calibration(batches, example_input: torch.Tensor) -> None:
    """The calibration images must have the model's input shape (C, H, W): statistics taken at another
    resolution or channel count would silently describe another model."""
    for batch in batches:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if tuple(x.shape[1:]) != tuple(example_input.shape[1:]):
            want, got = "x".join(map(str, example_input.shape[1:])), "x".join(map(str, x.shape[1:]))
            raise SimpruneError(f"calibration images are {got} but the model's input is {want}; "
                                "give calibration= images of that shape (pad_to=) or another example_input=")
        return


def recalibrate_batchnorm(model: nn.Module, batches, bf16: bool = False) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (cumulative average).

    After structural removal the activations feeding later BNs shift a little; a forward pass
    over the calibration images restores their statistics without touching any weight. A channel
    that the images leave (nearly) constant, variance below the layer's eps, keeps its trained
    statistics: a zero variance would divide later, varying inputs by sqrt(eps)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    trained = {m: (m.running_mean.clone(), m.running_var.clone()) for m in bns if m.running_var is not None}
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        m.train()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for batch in progress_bar(batches, "BatchNorm re-estimation", unit="batches"):
                _forward(model, batch[0] if isinstance(batch, (list, tuple)) else batch)
        distributed.average_buffers(model)  # each rank saw its own shard
        for m, (mean, var) in trained.items():
            flat = m.running_var < m.eps
            m.running_mean[flat] = mean[flat]
            m.running_var[flat] = var[flat]
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return model
