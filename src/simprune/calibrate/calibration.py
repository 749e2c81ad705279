"""Calibration: feed images through the model once and accumulate per-group feature statistics.

A group's feature maps are read where they are consumed: the input of each layer
that reads the group's channels (a conv or linear "probe"), i.e. the root output
after BN and activation (and after any residual sum). Residual groups have one
probe per consumer; depthwise-separable groups are probed at the projection
input. A reader after global pooling sees one value per channel and image: its probe is
*pooled*, the map of a channel being its vector of values over the calibration images (a 1 x 1
map would min-max scale to 0 and make every pair identical). A reader after flatten sees C x k
values: the k positions are the map. Statistics are sums (``ChannelStats``), accumulated batch by
batch under no_grad in bounded memory, and all-reduced across processes when distributed.
Calibration batches are read several times, so a one-shot iterator is kept (:func:`reusable`).

Devices: every batch goes to the device of the model's weights (``distributed.model_device``), and
the float64 sums stay on that device while the batches come (no host round trip per probe and batch;
the sums are (C, C), small next to the maps, and nccl reduces device tensors); once reduced they move
to the CPU, so scoring and selection run the same code on every device. The decision then differs
from a CPU run only by the forward pass's rounding (other kernels; bf16 products, or TF32 if allowed,
which the fp32 statistics pass turns off): near-ties may flip, nothing else.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from simprune import distributed
from simprune.calibrate.batches import PRECISIONS, Calibration, check_calibration, check_precision, reusable
from simprune.errors import SimpruneError
from simprune.graph.groups import ChannelGroup, Member, PruningGraph, is_depthwise
from simprune.io.data import load_dataset
from simprune.io.images import Preprocess, image_folder, is_image_source
from simprune.stats.channel_stats import NULL_BLOCK, ChannelStats, is_maximum

__all__ = ["PRECISIONS", "Calibration", "Probe", "calibration_loader", "check_calibration", "check_precision",
           "collect_statistics", "mean_null_similarity", "mean_similarity", "reusable"]


DATASET_BATCH = 128  # calibration batch of a named data set's small images
FOLDER_BATCH = 50  # of one's own photos, decoded at full size: a batch's memory stays small


@dataclass
class Probe:
    """One consumer of a group's channels and the statistics of what it reads (made at its first batch)."""

    member: Member
    stats: ChannelStats | None = None
    reads_as: Probe | None = None  # another consumer that reads the very same tensor: its statistics are shared


class _SameInputs:
    """Consumers of a group that read the very same tensor in a forward (a ResNet stage's first conv and
    its downsample): the later one shares the first one's statistics instead of computing them again."""

    def __init__(self):
        self._seen: dict[tuple, tuple] = {}  # (id of the tensor, channels read) -> (weak reference, probe)

    def first_reader(self, probe: Probe, x: torch.Tensor) -> Probe | None:
        """The probe that read ``x`` (the same object, still alive) earlier in this forward, if another."""
        key = (id(x), tuple(probe.member.idxs))
        seen = self._seen.get(key)
        if seen is not None and seen[0]() is x and seen[1] is not probe:
            return seen[1]
        self._seen[key] = (weakref.ref(x), probe)
        return None

    def next_batch(self) -> None:
        self._seen.clear()


def calibration_subset(ds: Dataset, n_images: int, seed: int = 0) -> Subset:
    """A seeded random subset of ``n_images`` from ``ds`` (the whole set when it is smaller)."""
    if len(ds) == 0:
        raise SimpruneError("the calibration data set is empty")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n_images].tolist()
    return Subset(ds, sorted(idx))


def calibration_loader(name: str, n_images: int = 640, data_dir: str | None = None, pad_to: int | None = None,
                       seed: int = 0, batch_size: int = DATASET_BATCH, split: str = "train",
                       preprocess: Preprocess | None = None) -> DataLoader:
    """Calibration batches from a named data set's training split (no augmentation), or from one's own
    images when ``name`` is a folder or a manifest ``PATH.csv[:SPLIT]`` (read with ``preprocess``, labels
    never read).

    Under torchrun each rank gets its own shard of the same seeded subset, in whole blocks of images so
    that the null pairs of the statistics (stats/channel_stats.py) are the same as in one process."""
    if is_image_source(name):
        subset = image_folder(name, preprocess or Preprocess(), n_images, seed)
        batch_size = min(batch_size, FOLDER_BATCH)
        if distributed.active():
            subset = Subset(subset, distributed.shard(list(range(len(subset))), block=NULL_BLOCK))
        return DataLoader(subset, batch_size=batch_size, shuffle=False)
    ds = load_dataset(name, split, data_dir, pad_to, augment=False)
    subset = calibration_subset(ds, n_images, seed)
    if distributed.active():
        subset = Subset(subset.dataset, distributed.shard(list(subset.indices), block=NULL_BLOCK))
    return DataLoader(subset, batch_size=batch_size, shuffle=False)


def probe_members(group: ChannelGroup) -> list[Member]:
    """Layers whose input carries the group's channels: dense consumers first, depthwise only as a fallback."""
    dense = [m for m in group.consumers if not is_depthwise(m.module)]
    return dense or [m for m in group.members if is_depthwise(m.module)]


def _maps_for(member: Member, x: torch.Tensor, channels: int) -> tuple[torch.Tensor, bool]:
    """The group's channels out of a consumer's input and whether the probe is pooled.

    A 4-D input gives (B, C, H, W) maps. A 2-D input is a Linear after flatten, C * k values per
    image in channel-major order: k > 1 gives (B, C, k, 1) maps (the k positions are the map);
    k == 1 is a Linear after global pooling, one value per channel and image, and also a 1 x 1 map:
    these are *pooled* probes, whose map is the vector of values over the calibration images."""
    idxs = member.idxs
    full = len(idxs) == x.shape[1] and idxs == list(range(len(idxs)))
    sel = x if full else x.index_select(1, torch.as_tensor(idxs, device=x.device))
    if x.ndim == 4:
        return sel, sel.shape[2] * sel.shape[3] == 1
    if x.ndim == 2:
        k = sel.shape[1] // channels
        return (sel, True) if k == 1 else (sel.reshape(x.shape[0], channels, k, 1), False)
    raise SimpruneError(f"cannot read feature maps of shape {tuple(x.shape)} at {member.name}")


def collect_statistics(model: nn.Module, graph: PruningGraph, batches, metrics: set[str],
                       precision: str = "bf16", progress: bool = True, window: int = 7,
                       reduce=None) -> dict[str, list[Probe]]:
    """One pass over ``batches`` of (images, labels); returns per-group probes with their statistics.

    ``precision`` is the model's forward pass during calibration: "bf16" (autocast) or "fp32";
    statistics are always float32 products summed in float64. ``reduce`` (e.g. an all-reduce) is
    applied to every statistics tensor at the end; by default the sums are all-reduced across
    torchrun ranks, so every rank sees the statistics of all images.
    """
    check_precision(precision)
    if reduce is None and distributed.active():
        reduce = distributed.all_reduce_sum
    same = _SameInputs()
    probes, hooks = {}, []

    def new_stats(channels: int, pooled: bool, device) -> ChannelStats:
        return ChannelStats(channels, metrics, window=window, pooled=pooled, device=device)

    for group in graph.groups:
        for member in probe_members(group):
            probe = Probe(member)
            probes.setdefault(group.root, []).append(probe)
            hooks.append(member.module.register_forward_pre_hook(_statistics_hook(probe, group.size, same, new_stats)))
    varied = 0

    def count_varied(x: torch.Tensor) -> None:
        nonlocal varied
        same.next_batch()
        flat = x.flatten(1)
        varied += int((flat.amax(1) > flat.amin(1)).sum()) if flat.shape[1] else 0

    calibration = Calibration.of(batches)
    seen = calibration.forward(model, hooks=hooks, precision=precision, progress=progress,
                               label="calibration statistics", each=count_varied)
    if reduce is not None:
        seen, varied = (int(v) for v in reduce(torch.tensor([float(seen), float(varied)], dtype=torch.float64)))
    if seen == 0:
        raise SimpruneError("no calibration images were seen; pass calibration= batches of images")
    if varied == 0:
        given = calibration.plain.count() if calibration.plain is not None and reduce is None else seen
        raise SimpruneError(f"all {given} calibration images are constant (no pixel differs), so every feature-map "
                            "similarity ties; calibrate on real images")
    _finish(probes, reduce)
    return probes


def _statistics_hook(probe: Probe, channels: int, same: _SameInputs, new_stats):
    """The forward pre-hook that feeds ``probe``'s statistics (made by ``new_stats(channels, pooled, device)``
    at the first batch), or shares those of a probe that read the very same tensor."""
    def hook(module, inputs):
        first = same.first_reader(probe, inputs[0])
        if probe.stats is None and first is not None:
            probe.reads_as = first
        if probe.reads_as is not None:
            if first is not probe.reads_as:
                raise SimpruneError(f"layers {probe.reads_as.member.name} and {probe.member.name} read the "
                                    "same tensor on the first calibration batch but not on a later one; "
                                    "models whose data flow changes between batches cannot be scored")
            probe.stats = first.stats
            return
        maps, pooled = _maps_for(probe.member, inputs[0].detach(), channels)
        if probe.stats is None:
            probe.stats = new_stats(channels, pooled, maps.device)
        probe.stats.update(maps)
    return hook


def _finish(probes: dict[str, list[Probe]], reduce) -> None:
    """Every probe's statistics reduced across ranks (once per shared set) and moved to the CPU."""
    every = [p for plist in probes.values() for p in plist]
    for p in every:
        if p.stats is None:
            raise SimpruneError(f"layer {p.member.name} never ran on the calibration images; it cannot be scored")
    for p in (p for p in every if p.reads_as is None):
        if reduce is not None:
            p.stats = _reduced(p.stats, reduce)
        p.stats.to("cpu")  # scores and decisions are computed on the CPU, whatever the device
    for p in (p for p in every if p.reads_as is not None):
        p.stats = p.reads_as.stats  # reduced and moved once, with the probe it shares them with


def _reduced(stats: ChannelStats, reduce) -> ChannelStats:
    """Statistics combined across processes: sums by ``reduce``, maxima by a sum of one slot per rank."""
    out = {}
    for name, t in stats.tensors().items():
        if is_maximum(name):
            slots = torch.zeros((distributed.world_size(), *t.shape), dtype=t.dtype, device=t.device)
            slots[distributed.rank()] = t
            out[name] = reduce(slots).amax(0)
        else:
            out[name] = reduce(t)
    return ChannelStats.from_tensors(out, channels=stats.channels, metrics=stats.metrics,
                                     device=stats.device, **stats.options)


def mean_similarity(probes: list[Probe], metric: str) -> torch.Tensor:
    """A group's similarity matrix: the mean over its probes (residual channels share one decision)."""
    return torch.stack([p.stats.similarity(metric) for p in probes]).mean(0)


def mean_null_similarity(probes: list[Probe], metric: str) -> torch.Tensor:
    """The chance level of :func:`mean_similarity`: the same mean over unrelated (shifted-image) pairs."""
    return torch.stack([p.stats.null_similarity(metric) for p in probes]).mean(0)
