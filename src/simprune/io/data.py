"""Named data sets with real loaders: fashion-mnist, mnist, cifar10, cifar100, imagefolder:PATH,
and fashion-mnist-sample (a small real sample shipped inside the package, for offline demos).

Small-image sets are held in memory as uint8 tensors (fast on a 2-core CPU);
augmentation is the standard random crop (pad 4) + horizontal flip. ``pad_to``
zero-pads 28x28 images to 32x32 so CIFAR architectures keep their published MACs.
Nothing here unpickles freely: CIFAR's python batches go through an unpickler
that only admits numpy arrays and plain containers.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from simprune import progress
from simprune.compat import import_torchvision
from simprune.errors import SimpruneError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MAX_IDX_BYTES = 2**32  # largest IDX body read (MNIST's training images are 47 MB)
MAX_CIFAR_BYTES = 2**30  # largest CIFAR batch file read (CIFAR-100's training batch is 155 MB)
MAX_PAD = 4096
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "simprune"


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


INFO = {
    "fashion-mnist": DatasetInfo(10, 1, (0.2860,), (0.3530,)),
    "mnist": DatasetInfo(10, 1, (0.1307,), (0.3081,)),
    "cifar10": DatasetInfo(10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
SAMPLE = "fashion-mnist-sample"
SAMPLE_FILE = Path(__file__).resolve().parents[1] / "data" / "fashion_mnist_sample.npz"
INFO[SAMPLE] = INFO["fashion-mnist"]
IMAGENET = DatasetInfo(1000, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class ImageTensorDataset(Dataset):
    """In-memory uint8 images (N, C, H, W) + int64 labels; normalises and augments per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, augment: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise SimpruneError("images must be uint8 (N, C, H, W) with one label each")
        self.images, self.labels, self.info, self.augment = images, labels.long(), info, augment
        self.num_classes, self.in_channels = info.num_classes, info.in_channels
        self._mean = torch.tensor(info.mean).view(-1, 1, 1)
        self._std = torch.tensor(info.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.augment:
            h, w = img.shape[1:]
            padded = F.pad(img, (4, 4, 4, 4))
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            img = padded[:, dy:dy + h, dx:dx + w]
            if torch.rand(()) < 0.5:
                img = img.flip(2)
        x = (img.float() / 255.0 - self._mean) / self._std
        return x, int(self.labels[i])


def pad_images(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Zero-pad (N, C, H, W) images centrally to ``size`` x ``size``."""
    if size is None:
        return images
    if not 0 < size <= MAX_PAD:
        raise SimpruneError(f"pad_to={size} is outside 1..{MAX_PAD}; give the image size to pad to, e.g. pad_to=32")
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise SimpruneError(f"pad_to={size} is smaller than the images ({h}x{w}); use pad_to={max(h, w)} or more")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


# ---- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------

def _read_at_most(f, n: int, chunk: int = 2**22) -> bytes:
    """Up to ``n`` bytes in chunks: memory follows what the file holds, not what a header claims."""
    parts, left = [], n
    while left > 0:
        part = f.read(min(chunk, left))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz) into a numpy array, checking its header. Never reads more
    than the header declares plus one byte, so a damaged or hostile .gz cannot inflate without bound."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise SimpruneError(f"{path} is not an unsigned-byte IDX file; point data_dir= at the original files")
            ndim = head[3]
            raw_dims = f.read(4 * ndim)
            if not 1 <= ndim <= 4 or len(raw_dims) < 4 * ndim:
                raise SimpruneError(f"{path} has a broken IDX header; re-download the data set")
            dims = tuple(int.from_bytes(raw_dims[4 * k: 4 * k + 4], "big") for k in range(ndim))
            expected = math.prod(dims)
            if expected > MAX_IDX_BYTES:
                raise SimpruneError(f"{path} declares {dims}, over {MAX_IDX_BYTES >> 30} GiB; the header is corrupt")
            body = _read_at_most(f, expected + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise SimpruneError(f"cannot read IDX file {path} ({type(exc).__name__}: {str(exc)[:80]}); "
                            "re-download or reinstall the data set") from exc
    if len(body) != expected:
        raise SimpruneError(f"{path} holds {'more' if len(body) > expected else len(body)} bytes but its header "
                            f"declares {expected}; the file is truncated or corrupt, re-download it")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find_idx_dir(name: str, data_dir: str | None) -> Path | None:
    if data_dir:
        roots = [Path(data_dir)]
    else:
        roots = [Path(p) for p in (os.environ.get("SIMPRUNE_DATA"),) if p]
        if name == "fashion-mnist":
            roots.append(DEBIAN_FASHION_MNIST)
        roots.append(CACHE / name)
    tv_name = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[name]
    for root in roots:
        for cand in (root, root / name, root / tv_name / "raw"):
            if any((cand / f"t10k-images-idx3-ubyte{ext}").exists() for ext in ("", ".gz")):
                return cand
    if data_dir:
        raise SimpruneError(f"data_dir={data_dir} holds no {name} IDX files (t10k-images-idx3-ubyte[.gz]); "
                            "point it at the folder with the four IDX files")
    return None


def _idx_file(folder: Path, stem: str) -> Path:
    for ext in (".gz", ""):
        if (folder / (stem + ext)).exists():
            return folder / (stem + ext)
    raise SimpruneError(f"{folder} lacks {stem}[.gz]; the data set folder is incomplete")


def _download_idx(name: str) -> Path:
    tv = import_torchvision()
    cls = {"fashion-mnist": tv.datasets.FashionMNIST, "mnist": tv.datasets.MNIST}[name]
    root = CACHE / name
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - any network failure means "offline"
        hint = ("install it (`apt-get install dataset-fashion-mnist`) or put its four IDX files in a folder and pass "
                "data_dir=" if name == "fashion-mnist" else
                "put the four MNIST IDX files (train/t10k images/labels, .gz or not) in a folder and pass data_dir=")
        raise SimpruneError(f"{name} is not on this machine and downloading it failed ({type(exc).__name__}); "
                            f"{hint}") from exc
    return root / cls.__name__ / "raw"


def load_idx_dataset(name: str, split: str, data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    folder = _find_idx_dir(name, data_dir) or _download_idx(name)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise SimpruneError(f"{folder}: images {images.shape} and labels {labels.shape} do not match; "
                            "re-download the data set")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_sample(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The Fashion-MNIST sample shipped with the package (built by scripts/make_sample.py): a seeded,
    class-balanced 3,000 test and 1,000 training images of the original files, read without pickle."""
    try:
        with np.load(SAMPLE_FILE, allow_pickle=False) as f:
            images, labels = f[f"{split}_images"], f[f"{split}_labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise SimpruneError(f"the shipped sample {SAMPLE_FILE} is missing or damaged ({type(exc).__name__}); "
                            "reinstall simprune") from exc
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != images.shape[:1]:
        raise SimpruneError(f"the shipped sample {SAMPLE_FILE} has unexpected arrays; reinstall simprune")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def has_local_files(name: str) -> bool:
    """Whether an IDX data set (fashion-mnist, mnist) is on disk already, so loading it needs no network."""
    return _find_idx_dir(name, None) is not None


# ---- CIFAR python batches ------------------------------------------------------------------

class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR batches contain: numpy arrays and dtypes, plain containers."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise SimpruneError(f"CIFAR batch refers to {module}.{name}, which a CIFAR file never does; "
                                "refusing to load it (use the original CIFAR python batches)")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch -> (N, 3, 32, 32) uint8 images and int64 labels.

    Checked before any conversion: uint8 pixels (a cast would wrap or round silently) and labels
    that are plain non-negative integers, one per image."""
    try:
        if path.stat().st_size > MAX_CIFAR_BYTES:
            raise SimpruneError(f"{path} is larger than {MAX_CIFAR_BYTES >> 20} MiB; not a CIFAR python batch")
        with open(path, "rb") as f:
            entry = _CifarUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except SimpruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise SimpruneError(f"{path} is not a CIFAR python batch ({type(exc).__name__}); "
                            "use the files from cifar-10-python.tar.gz / cifar-100-python.tar.gz") from exc
    entry = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in entry.items()} \
        if isinstance(entry, dict) else {}
    data = entry.get("data")
    labels = entry.get("labels", entry.get("fine_labels"))
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels_ok = not labels.size or int(labels.min()) >= 0
    else:
        labels_ok = isinstance(labels, list) and all(type(v) is int and 0 <= v < 2**31 for v in labels)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or not labels_ok or len(labels) != len(data):
        raise SimpruneError(f"{path} lacks CIFAR 'data' (N x 3072 uint8) and 'labels' (one non-negative integer per "
                            "image); use the original CIFAR batches")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _cifar_files(name: str, split: str) -> tuple[str, list[str]]:
    if name == "cifar10":
        return "cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"])
    return "cifar-100-python", ["train" if split == "train" else "test"]


def load_cifar(name: str, split: str, data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    sub, files = _cifar_files(name, split)
    roots = [Path(data_dir)] if data_dir else [Path(p) for p in (os.environ.get("SIMPRUNE_DATA"),) if p] + [CACHE / name]
    folder = next((c for r in roots for c in (r, r / sub) if (c / files[0]).exists()), None)
    if folder is None and data_dir:
        raise SimpruneError(f"data_dir={data_dir} holds no {name} python batches ({sub}/{files[0]}); "
                            f"extract {_cifar_archive(name)} there")
    if folder is None:
        folder = _download_cifar(name, sub)
    parts = [read_cifar_batch(folder / f) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _cifar_archive(name: str) -> str:
    return {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[name]


def _download_cifar(name: str, sub: str) -> Path:
    import_torchvision()  # first: it makes torchvision importable on CPU-only torch (see simprune.compat)
    from torchvision.datasets.utils import download_and_extract_archive  # noqa: PLC0415
    url = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
           "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}[name]
    try:
        download_and_extract_archive(url, str(CACHE / name))
    except Exception as exc:  # noqa: BLE001
        raise SimpruneError(f"{name} is not on this machine and downloading it failed ({type(exc).__name__}); "
                            f"download {_cifar_archive(name)}, extract it and pass data_dir= (the folder holding "
                            f"{sub}/)") from exc
    return CACHE / name / sub


# ---- entry point ---------------------------------------------------------------------------

def dataset_names() -> list[str]:
    return sorted(INFO) + ["imagefolder:PATH"]


def load_dataset(name: str, split: str = "train", data_dir: str | None = None, pad_to: int | None = None,
                 augment: bool = False, image_size: int = 224) -> Dataset:
    """Build a named data set's ``split`` ("train" or "test"). Returns a Dataset of (image, label)."""
    if split not in ("train", "test"):
        raise SimpruneError(f"split must be 'train' or 'test', got {split!r}")
    progress.stage(f"loading {name} ({split} split)")
    if name.startswith("imagefolder:"):
        return load_imagefolder(name.split(":", 1)[1], split, augment, image_size)
    if name not in INFO:
        raise SimpruneError(f"unknown data set {name!r}; choose one of {', '.join(dataset_names())}")
    if name == SAMPLE:
        images, labels = load_sample(split)
    elif name in ("fashion-mnist", "mnist"):
        images, labels = load_idx_dataset(name, split, data_dir)
    else:
        images, labels = load_cifar(name, split, data_dir)
    info = INFO[name]
    if labels.numel() and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise SimpruneError(f"{name} labels outside 0..{info.num_classes - 1}; the files are corrupt")
    return ImageTensorDataset(pad_images(images, pad_to), labels, info, augment)


def load_imagefolder(path: str, split: str, augment: bool, image_size: int = 224) -> Dataset:
    """ImageNet layout: PATH/{train,val}/CLASS/*.jpg, or PATH/CLASS/*.jpg for a single split.

    The validation split uses the training split's class list, so a class missing from val keeps
    every other label where training put it (ImageFolder alone would renumber them)."""
    tv = import_torchvision()
    root = Path(path)
    sub = root / ("train" if split == "train" else "val")
    folder = sub if sub.is_dir() else root
    if not folder.is_dir():
        raise SimpruneError(f"imagefolder path {path} is not a directory; give PATH with CLASS/ image folders")
    classes = None
    if folder.name == "val" and (root / "train").is_dir():
        classes = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
        extra = sorted({e.name for e in os.scandir(folder) if e.is_dir()} - set(classes))
        if extra:
            raise SimpruneError(f"{folder} has classes {extra[:3]} that {root / 'train'} lacks; the two splits "
                                "must share their class folders")
    T = tv.transforms
    norm = T.Normalize(IMAGENET.mean, IMAGENET.std)
    if augment:
        tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    else:
        tf = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), norm])
    cls = tv.datasets.ImageFolder if classes is None else _with_classes(tv.datasets.ImageFolder, classes)
    try:
        ds = cls(str(folder), transform=tf, loader=load_image, allow_empty=classes is not None)
    except (FileNotFoundError, RuntimeError) as exc:
        raise SimpruneError(f"{folder} is not an image folder ({str(exc).splitlines()[0]}); "
                            "expected CLASS/*.jpg sub-folders") from exc
    ds.num_classes, ds.in_channels = len(ds.classes), 3
    return ds


def _with_classes(base: type, classes: list[str]) -> type:
    class FixedClasses(base):
        def find_classes(self, directory):
            return classes, {c: i for i, c in enumerate(classes)}
    return FixedClasses


def load_image(path: str):
    """One image file as RGB; a damaged file or a decompression bomb is a one-line error naming it."""
    from PIL import Image  # noqa: PLC0415

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types on damaged files
        first = str(exc).splitlines()[0][:100] if str(exc) else ""
        raise SimpruneError(f"cannot read image {path} ({type(exc).__name__}: {first}); "
                            "remove or replace the file") from exc
