"""What a consumer layer (conv or linear) reads, as rows of a least-squares problem.

A conv's output at one pixel is its weights times the unfolded input patch (every input channel's
k x k taps), so its input becomes rows of ``C*k*k`` columns; a linear layer's input is already rows.
:class:`RowSums` accumulates the Gram of those rows (and optionally their cross-correlation with a
target output) batch by batch: float32 products summed in float64, never the rows themselves.
:func:`consumer_grams` runs one calibration pass that gathers it for many layers at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simprune import distributed
from simprune.calibrate.batches import Calibration
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph

ROW_CHUNK_BYTES = 64 << 20  # unfold at most this much of a batch at a time


def refit_support(layer: nn.Module) -> str | None:
    """None when the layer's weights can be refit from its input rows, else the reason they cannot."""
    if isinstance(layer, nn.Linear):
        return None
    if type(layer) is not nn.Conv2d:
        return f"{type(layer).__name__} layers are not refit (only Conv2d and Linear)"
    if layer.groups != 1:
        return f"grouped convolution (groups={layer.groups}): its input channels are not shared by every output"
    if isinstance(layer.padding, str) and layer.padding != "valid":
        return f"padding={layer.padding!r} is not unfolded; give explicit padding"
    return None


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weights as (outputs, columns), columns ordered as :func:`design_rows` orders them."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)


def set_weight_matrix(layer: nn.Module, w: torch.Tensor) -> None:
    layer.weight.data.copy_(w.reshape(layer.weight.shape).to(layer.weight.dtype))


def taps(layer: nn.Module) -> int:
    """Columns per input channel: k*k for a conv, 1 for a linear layer."""
    return 1 if isinstance(layer, nn.Linear) else layer.weight[0, 0].numel()


def _padded(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    ph, pw = (0, 0) if isinstance(layer.padding, str) else layer.padding
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, (pw, pw, ph, ph), mode=mode) if ph or pw else x


def _patch_index(layer: nn.Conv2d, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into a padded (height x width) map: the top-left corner of every output position
    (positions,) and the offset of every tap from it (k*k,)."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ho, wo = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    corners = ((torch.arange(ho) * sh)[:, None] * width + torch.arange(wo) * sw).reshape(-1)
    offsets = ((torch.arange(kh) * dh)[:, None] * width + torch.arange(kw) * dw).reshape(-1)
    return corners, offsets


def output_size(layer: nn.Conv2d, x: torch.Tensor) -> int:
    """Output positions per image of ``layer`` on input ``x``."""
    ph, pw = (0, 0) if isinstance(layer.padding, str) else layer.padding
    return _patch_index(layer, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw)[0].numel()


def _patch_rows(layer: nn.Conv2d, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """(B*S, C*k*k) rows: the input patch at each of the S output ``positions`` (flat; None: all) of every
    image, columns ordered (channel, tap) as the flattened weights. One gather of whole channel vectors
    from a channels-last copy of the padded input."""
    xp = _padded(layer, x)
    corners, offsets = _patch_index(layer, xp.shape[2], xp.shape[3])
    if positions is not None:
        corners = corners[positions]
    corners, offsets = corners.to(x.device), offsets.to(x.device)
    channels_last = xp.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
    patches = channels_last[:, (corners[:, None] + offsets[None, :]).reshape(-1)]  # (B, S*k*k, C)
    return patches.reshape(x.shape[0], corners.numel(), offsets.numel(), x.shape[1]).transpose(2, 3) \
        .reshape(-1, x.shape[1] * offsets.numel())


def design_rows(layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
                max_positions: int | None = None, seed: int = 0):
    """Yield ``(rows, target rows)``: float32 blocks of the layer's input ``x`` as rows (a bounded slice of the
    batch at a time) and the matching rows of the layer's output ``target`` (None when not given).

    A conv with more than ``max_positions`` output positions per image is read at that many positions,
    the same for every image, drawn at random once per output size with ``seed``: the Gram of a hundred
    patches per image is already many times over-determined, the cost falls in proportion, and the sums
    do not depend on how the images are batched or sharded over torchrun ranks."""
    x = x.detach().float()
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        step = max(1, ROW_CHUNK_BYTES // (4 * rows.shape[1]))
        tgt = None if target is None else target.detach().float().reshape(-1, target.shape[-1])
        for k in range(0, rows.shape[0], step):
            yield rows[k:k + step], None if tgt is None else tgt[k:k + step]
        return
    total = output_size(layer, x)
    positions = None
    if max_positions and total > max_positions:
        positions = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_positions].sort().values
    per_image = 4 * weight_matrix(layer).shape[1] * (total if positions is None else positions.numel())
    step = max(1, ROW_CHUNK_BYTES // per_image)
    for k in range(0, x.shape[0], step):
        rows = _patch_rows(layer, x[k:k + step], positions)
        if target is None:
            yield rows, None
            continue
        y = target[k:k + step].detach().float().flatten(2)
        y = y if positions is None else y[:, :, positions.to(y.device)]
        yield rows, y.transpose(1, 2).reshape(-1, y.shape[1])


MIN_ROWS_PER_COLUMN = 4  # fewer rows than this per input column: a least-squares fit is not trusted
ROW_BUDGET = 8192  # rows a layer is read at when images are few: 64 images x 128 positions


def positions_per_image(max_positions: int | None, images: int) -> int | None:
    """``max_positions`` raised so that ``images`` calibration images (over all torchrun ranks) still give
    :data:`ROW_BUDGET` rows per layer: 8 photos of a 640 px detector are read at 1024 positions each, not
    128 (1024 rows cannot judge a 3x3 conv on 256 channels; 8192 can). From 64 images on it is unchanged."""
    if not max_positions:
        return max_positions
    if distributed.active():
        images = int(distributed.all_reduce_sum(torch.tensor([float(images)], dtype=torch.float64))[0])
    return max(max_positions, -(-ROW_BUDGET // max(images, 1)))


def starved(columns: int, rows: float, factor: int = MIN_ROWS_PER_COLUMN) -> bool:
    """True when ``rows`` calibration rows are too few to judge a least-squares fit on ``columns`` inputs
    (a classifier reading 1280 pooled features from 500 images): the Gram is rank-deficient, so the fit
    reproduces the fitted images and not others."""
    return rows < factor * columns


class RowSums:
    """Float64 sums over rows: count, sum, Gram, and with a target the cross-correlation and energy."""

    def __init__(self, columns: int, outputs: int = 0, device: torch.device | str = "cpu"):
        """Sums on ``device``, the rows' (the model's) device; :meth:`to` moves them for the solve."""
        zeros = dict(dtype=torch.float64, device=device)
        self.n = torch.zeros((), **zeros)
        self.total = torch.zeros(columns, **zeros)
        self.gram = torch.zeros(columns, columns, **zeros)
        self.cross = torch.zeros(columns, outputs, **zeros) if outputs else None
        self.target_total = torch.zeros(outputs, **zeros) if outputs else None
        self.target_energy = torch.zeros((), **zeros)

    @torch.no_grad()
    def update(self, rows: torch.Tensor, target: torch.Tensor | None = None) -> None:
        rows = rows.float()
        self.n += rows.shape[0]
        self.total += rows.sum(0).double()
        self.gram += (rows.T @ rows).double()
        if target is not None:
            target = target.float()
            self.cross += (rows.T @ target).double()
            self.target_total += target.sum(0).double()
            self.target_energy += (target * target).sum().double()

    def merged(self, other: RowSums) -> RowSums:
        """A new RowSums over the rows of both."""
        out = RowSums(0)
        for name, value in self.tensors().items():
            setattr(out, name, value + getattr(other, name))
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"n": self.n, "total": self.total, "gram": self.gram, "target_energy": self.target_energy}
        if self.cross is not None:
            out.update(cross=self.cross, target_total=self.target_total)
        return out

    def to(self, device: torch.device | str) -> RowSums:
        """Every sum moved to ``device``, in place (the solves and scores run on the CPU)."""
        for name, value in self.tensors().items():
            setattr(self, name, value.to(device))
        return self

    def all_reduce(self) -> RowSums:
        """Sum every tensor over torchrun ranks (a no-op on one process), in place."""
        if distributed.active():
            for name, value in self.tensors().items():
                setattr(self, name, distributed.all_reduce_sum(value))
        return self

    def check(self, name: str) -> RowSums:
        """Refuse statistics that saw NaN or inf (a broken model or broken images) in one line."""
        if not all(bool(torch.isfinite(t).all()) for t in self.tensors().values()):
            raise SimpruneError(f"the input or output of layer {name} contains NaN or inf on the calibration "
                                "images; check the model and the calibration data")
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def gram_bytes(layer: nn.Module) -> int:
    """Bytes of a float64 Gram of the layer's full input rows."""
    p = weight_matrix(layer).shape[1]
    return 8 * p * p


def consumer_grams(model: nn.Module, layers: dict[str, nn.Module], batches, precision: str = "fp32",
                   max_gram_bytes: int = 1 << 30, max_positions: int | None = 128, seed: int = 0):
    """Yield ``(name, RowSums)`` of every layer's input over ``batches``, summed over ranks.

    Layers are gathered in passes whose Grams together stay under ``max_gram_bytes``, so memory is
    bounded whatever the model; each pass is one forward over the calibration images."""
    names = list(layers)
    while names:
        chosen, size = [], 0
        for name in list(names):
            if chosen and size + gram_bytes(layers[name]) > max_gram_bytes:
                break
            chosen.append(name)
            size += gram_bytes(layers[name])
            names.remove(name)
        yield from _one_pass(model, {n: layers[n] for n in chosen}, batches, precision, max_positions,
                             seed).items()


def _one_pass(model: nn.Module, layers: dict[str, nn.Module], batches, precision: str, max_positions: int | None,
              seed: int) -> dict[str, RowSums]:
    device = distributed.model_device(model)
    sums = {name: RowSums(weight_matrix(layer).shape[1], device=device) for name, layer in layers.items()}

    def make_hook(name: str, layer: nn.Module):
        def hook(module, inputs):
            for rows, _ in design_rows(layer, inputs[0], max_positions=max_positions, seed=seed):
                sums[name].update(rows)
        return hook

    hooks = [layer.register_forward_pre_hook(make_hook(n, layer)) for n, layer in layers.items()]
    Calibration.of(batches).forward(model, hooks=hooks, precision=precision, progress=False)
    for name, s in sums.items():
        s.all_reduce().check(name).to("cpu")
    return sums


def rows_per_image(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor,
                   max_positions: int | None) -> dict[str, int]:
    """Calibration rows each layer's refit reads per image (a conv's output positions up to
    ``max_positions``, a linear layer's tokens), from one forward on ``example``'s first image."""
    seen: dict[str, int] = {}

    def hook(name, layer):
        def pre(_module, inputs):
            x = inputs[0]
            if isinstance(layer, nn.Linear):
                seen[name] = max(1, x[:1].numel() // x.shape[-1])
            else:
                total = output_size(layer, x[:1])
                seen[name] = min(total, max_positions) if max_positions else total
        return pre

    handles = [layer.register_forward_pre_hook(hook(n, layer)) for n, layer in layers.items()]
    with Calibration.running(model, hooks=handles):  # eval, no_grad; modes restored and hooks removed
        model(example[:1])
    return seen


def starved_groups(graph: PruningGraph, example: torch.Tensor, images: int,
                   max_positions: int | None) -> dict[str, str]:
    """Groups (root -> why) that a refit reader could not be refit for on ``images`` calibration images: too
    few rows for its input columns (see :func:`starved`). Such a group is best left whole."""
    readers = {m.name: m.module for g in graph.groups for m in g.consumers if refit_support(m.module) is None}
    rows = rows_per_image(graph.model, readers, example, max_positions)
    out = {}
    for group in graph.groups:
        for m in group.consumers:
            columns = weight_matrix(m.module).shape[1] if m.name in readers else 0
            if m.name in rows and starved(columns, rows[m.name] * images):
                out[group.root] = (f"{m.name} would be refit on {rows[m.name] * images} rows for {columns} inputs; "
                                   "more calibration images let this group be pruned")
                break
    return out
