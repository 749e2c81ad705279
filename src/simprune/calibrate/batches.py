"""The calibration images, wrapped once: every statistics, refit, BatchNorm and quantization pass reads
them through :class:`Calibration`.

It keeps a one-shot iterable (generator, ``iter(...)``) as a list, since every pass reads the batches
again; takes the images out of ``(images, labels)`` batches (labels are never read); counts them; checks
their shape against the model's input; moves each batch to the model's device; and runs the forward
passes in eval mode, under no_grad and the asked precision (:func:`simprune.distributed.forward_precision`),
restoring the model's modes and removing its hooks afterwards.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from simprune.calibrate.views import augment
from simprune.distributed import forward_precision, model_device
from simprune.errors import SimpruneError
from simprune.progress import bar as progress_bar

PRECISIONS = ("fp32", "bf16")
MAX_MATERIALISED_BYTES = 2 * 2**30  # a one-shot iterator of calibration batches is kept in memory up to this


def check_precision(precision: str, keyword: str = "calib_precision") -> str:
    """``precision`` when it is one of :data:`PRECISIONS`, else a one-line error naming ``keyword``."""
    if precision not in PRECISIONS:
        raise SimpruneError(f"{keyword} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def batch_images(batch) -> torch.Tensor:
    """The images of a batch: ``(images, labels)`` or the images alone."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def batch_labels(batch) -> torch.Tensor | None:
    """The labels of an ``(images, labels)`` batch; None for images alone."""
    if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    return None


def _batch_bytes(batch) -> int:
    items = batch if isinstance(batch, (list, tuple)) else [batch]
    return sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))


def reusable(batches, keyword: str = "calibration"):
    """Calibration is read several times (shape check, statistics, BatchNorm re-estimation). A
    collection (DataLoader, list, ...) starts afresh at every ``iter()`` and passes through; a one-shot
    iterator (generator, ``iter(...)``, ``map``) is materialised into a list, up to
    MAX_MATERIALISED_BYTES, so that no pass sees a half-consumed stream."""
    if batches is None:
        return None
    if isinstance(batches, Calibration):
        return batches.batches
    try:
        it = iter(batches)
    except TypeError:
        raise SimpruneError(f"{keyword}= must be an iterable of image batches (a DataLoader or a list of "
                            f"(images, labels)), got {type(batches).__name__}") from None
    if it is not batches:
        return batches
    kept, size = [], 0
    for batch in it:
        size += _batch_bytes(batch)
        if size > MAX_MATERIALISED_BYTES:
            raise SimpruneError(f"{keyword}= is a one-shot iterator of more than {MAX_MATERIALISED_BYTES >> 30} GiB "
                                "of images, which simprune reads several times; pass a DataLoader or a list")
        kept.append(batch)
    return kept


class Calibration:
    """The user's calibration batches, re-iterable, with the one forward path every pass uses.

    Iterating gives the batches as given (labels included, for tp:taylor and int8 evaluation);
    :meth:`images` gives the images on a device; :meth:`forward` runs a model over all of them."""

    def __init__(self, batches: Iterable, example_input: torch.Tensor | None = None, *,
                 keyword: str = "calibration", plain: Calibration | None = None):
        self.batches = reusable(batches, keyword)
        self.plain = plain  # with_views: the calibration without its augmented views
        if example_input is not None:
            self.check_shape(example_input)

    @classmethod
    def of(cls, batches, example_input: torch.Tensor | None = None) -> Calibration | None:
        """``batches`` as a Calibration (None stays None; a Calibration is reused, its shape checked)."""
        if batches is None:
            return None
        if isinstance(batches, Calibration):
            if example_input is not None:
                batches.check_shape(example_input)
            return batches
        return cls(batches, example_input)

    def __iter__(self):
        return iter(self.batches)

    @property
    def dataset(self):
        """The DataLoader's data set when the batches come from one (None otherwise)."""
        return getattr(self.batches, "dataset", None)

    def hold_aside(self, share: float, seed: int = 0, minimum: int = 8) -> tuple[Calibration, torch.Tensor]:
        """(the rest, the held-aside images): a seeded ``share`` of the images (at least ``minimum``) taken out
        before any statistics or refit sees them, so that a check on them measures generalisation. The rest
        keeps its batch size and labels."""
        batches = list(self.batches)
        images = torch.cat([batch_images(b).detach().cpu() for b in batches])
        labels = [batch_labels(b) for b in batches]
        labels = torch.cat([y.cpu() for y in labels]) if all(y is not None for y in labels) else None
        if len(images) < 2 * minimum:
            raise SimpruneError(f"holding {minimum} images aside needs at least {2 * minimum} calibration images, "
                                f"got {len(images)}")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        held = max(minimum, round(share * len(images)))
        keep = order[held:].sort().values
        size = int(batch_images(batches[0]).shape[0])
        chunks = [keep[j:j + size] for j in range(0, len(keep), size)]
        rest = [(images[i], labels[i]) if labels is not None else images[i] for i in chunks]
        return Calibration(rest), images[order[:held]]

    def with_views(self, views: int, seed: int = 0, min_scale: float = 0.25) -> Calibration:
        """The batches, then ``views - 1`` augmented copies of each (random resized crop of ``min_scale``..1 of
        the area and a flip, seeded; labels dropped); ``plain`` keeps the original. Images that are not
        (N, C, H, W), one view, or a calibration that already has views come back as they are."""
        if views <= 1 or self.plain is not None or self.first_images().dim() != 4:
            return self
        gen = torch.Generator().manual_seed(seed)
        extra = [(augment(batch_images(b).detach().cpu().float(), gen, min_scale, 0.0).to(batch_images(b)),)
                 for _ in range(views - 1) for b in self.batches]
        return Calibration(list(self.batches) + extra, plain=self)

    def first_images(self) -> torch.Tensor:
        """The first batch's images; refuses calibration without any batch."""
        first = next(iter(self.batches), None)
        if first is None:
            raise SimpruneError("calibration= holds no batches; pass a DataLoader or a list of (images, labels)")
        return batch_images(first)

    def count(self) -> int:
        """How many images the batches hold (a DataLoader's data set length, else counted)."""
        dataset = self.dataset
        if dataset is not None and hasattr(dataset, "__len__"):
            return len(dataset)
        return sum(int(batch_images(b).shape[0]) for b in self.batches)

    def check_shape(self, example_input: torch.Tensor) -> None:
        """Refuse images of another (C, H, W) than the model's input: statistics taken at another
        resolution or channel count would silently describe another model."""
        x = self.first_images()
        if tuple(x.shape[1:]) != tuple(example_input.shape[1:]):
            want, got = "x".join(map(str, example_input.shape[1:])), "x".join(map(str, x.shape[1:]))
            raise SimpruneError(f"calibration images are {got} but the model's input is {want}; "
                                "give calibration= images of that shape (pad_to=) or another example_input=")

    def images(self, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
        """Each batch's images, moved to ``device`` (None: left where they are)."""
        for batch in self.batches:
            x = batch_images(batch)
            yield x if device is None else x.to(device, non_blocking=True)

    def labelled(self, device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each batch as (images, labels or None), both on ``device``."""
        for batch in self.batches:
            labels = batch_labels(batch)
            yield batch_images(batch).to(device), None if labels is None else labels.to(device)

    @staticmethod
    @contextmanager
    def running(*models: nn.Module, precision: str = "fp32", hooks=(), grad: bool = False):
        """Eval mode for ``models``, no_grad (unless ``grad``) and ``precision`` on the first model's device;
        yields that device and afterwards removes ``hooks`` and restores every model's modes."""
        check_precision(precision)
        modes = [(m, [(s, s.training) for s in m.modules()]) for m in models]
        device = model_device(models[0])
        try:
            with ExitStack() as stack:
                for m in models:
                    m.eval()
                stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
                stack.enter_context(forward_precision(device, precision))
                yield device
        finally:
            for h in hooks:
                h.remove()
            for _, saved in modes:
                for sub, training in saved:
                    sub.training = training

    def forward(self, model: nn.Module, *, hooks=(), precision: str = "fp32", label: str | None = None,
                progress: bool = True, each=None) -> int:
        """Run ``model`` over every batch (see :meth:`running`); ``each(x)`` sees each batch's images
        after its forward. Returns the images seen; out-of-memory and shape errors in one line."""
        seen = 0
        with self.running(model, precision=precision, hooks=hooks) as device:
            batches = progress_bar(self.batches, label, unit="batches", enabled=progress) if label else self.batches
            for batch in batches:
                x = batch_images(batch).to(device, non_blocking=True)
                run_model(model, x)
                if each is not None:
                    each(x)
                seen += x.shape[0]
        return seen


def run_model(model: nn.Module, x: torch.Tensor):
    """``model(x)`` with out-of-memory and input-shape errors as one-line SimpruneErrors."""
    try:
        return model(x)
    except torch.OutOfMemoryError as exc:
        raise SimpruneError(f"out of memory on {x.device} with calibration batches of {x.shape[0]} images; "
                            "use smaller batches, or device=cpu") from exc
    except RuntimeError as exc:  # wrong channel count or size: torch's own message, in one line
        raise SimpruneError(f"the model cannot read calibration images of shape {tuple(x.shape[1:])} "
                            f"({str(exc).splitlines()[0][:120]}); give calibration= images of the model's input "
                            "shape (pad_to=)") from exc


def check_calibration(batches, example_input: torch.Tensor) -> Calibration:
    """The calibration batches as a :class:`Calibration` (re-iterable, shape checked against
    ``example_input``)."""
    return Calibration.of(batches, example_input)
