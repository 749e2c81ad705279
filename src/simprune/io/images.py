"""A user's own images: a folder of unlabelled photos for calibration, a labelled tree or manifest CSV for
evaluation, each read with the model's own preprocessing.

- :func:`image_files` finds .jpg/.jpeg/.png/.webp files in a folder, flat or nested (sorted, so a seed
  picks the same images everywhere); :func:`image_folder` keeps the readable ones and counts the rest.
- :class:`Preprocess` is resize -> centre crop -> normalise, taken from torchvision weights'
  ``transforms()`` (:func:`torchvision_preprocess`), from timm's data config (:func:`timm_preprocess`), or
  from ultralytics' predictor for YOLO (:func:`ultralytics_preprocess`), or given explicitly
  (``--resize/--crop/--mean/--std``).
- :func:`manifest_dataset` reads ``file,class_index[,split]`` rows (the layout of
  ``shared/imagenet-sample/manifest.csv``); a source ``PATH.csv:SPLIT`` keeps one split;
  :func:`labelled_images` reads that or an ImageNet-style ``DIR/CLASS/*.jpg`` tree.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from simprune import progress
from simprune.compat import import_torchvision
from simprune.errors import SimpruneError
from simprune.io.data import load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to ``resize``, centre-crop ``crop``, scale to [0, 1], normalise by mean/std."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.resize < 1 or self.crop < 1 or self.crop > self.resize:
            raise SimpruneError(f"resize={self.resize} and crop={self.crop} must be >= 1 with crop <= resize")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise SimpruneError("mean and std need one value per channel, std > 0")

    def transform(self):
        """The torchvision transform (PIL image -> normalised float tensor)."""
        T = import_torchvision().transforms
        mode = getattr(T.InterpolationMode, self.interpolation.upper(), None)
        if mode is None:
            raise SimpruneError(f"interpolation {self.interpolation!r} is not one of bilinear, bicubic, nearest")
        return T.Compose([T.Resize(self.resize, interpolation=mode, antialias=True), T.CenterCrop(self.crop),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])

    @classmethod
    def from_dict(cls, record: dict) -> Preprocess:
        """The Preprocess :meth:`describe` wrote (model.json's calibration record)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})

    def describe(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}


def torchvision_preprocess(model: str, weights: str) -> Preprocess:
    """The preprocessing torchvision's ``weights.transforms()`` applies for ``model`` with ``weights``."""
    tv = import_torchvision()
    try:
        entry = tv.models.get_model_weights(model)[weights]
    except (KeyError, ValueError) as exc:
        raise SimpruneError(f"torchvision has no weights {weights!r} for {model!r}") from exc
    tf = entry.transforms()
    return Preprocess(resize=_first(tf.resize_size), crop=_first(tf.crop_size), mean=tuple(tf.mean),
                      std=tuple(tf.std), interpolation=tf.interpolation.value)


def timm_preprocess(model) -> Preprocess:
    """The preprocessing timm's data config gives for a timm model: a built one or its name
    (``resolve_data_config`` on the model's pretrained config; nothing is downloaded)."""
    try:
        import timm  # noqa: PLC0415 - timm is an optional extra
        from timm.data import resolve_data_config  # noqa: PLC0415
    except ImportError as exc:
        raise SimpruneError("timm is not installed; pip install 'simprune[timm]'") from exc
    if isinstance(model, str):
        pretrained = timm.get_pretrained_cfg(model)
        if pretrained is None:
            raise SimpruneError(f"timm has no pretrained config for {model!r}; give Preprocess(resize=, crop=, mean=, std=)")
        cfg = resolve_data_config({}, pretrained_cfg=pretrained.to_dict())
    else:
        cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    return Preprocess(resize=int(round(crop / cfg.get("crop_pct", 0.875))), crop=crop, mean=tuple(cfg["mean"]),
                      std=tuple(cfg["std"]), interpolation=cfg.get("interpolation", "bilinear"))


def ultralytics_preprocess(size: int = 640) -> Preprocess:
    """What ultralytics' predictor feeds a YOLO: RGB scaled to [0, 1], no mean/std, at its image size
    (640 unless the model was trained otherwise). Its letterbox pads to a square; a centre crop of the
    short side keeps calibration images free of grey bars, which only lower the statistics' contrast."""
    return Preprocess(resize=size, crop=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _first(v) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def image_files(folder: str | Path) -> list[Path]:
    """The image files (.jpg, .jpeg, .png, .webp) under ``folder``, flat or nested, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SimpruneError(f"{folder} is not a folder; give a folder of .jpg/.png/.webp images")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise SimpruneError(f"{folder} holds no .jpg/.png/.webp images")
    return files


def readable(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(files PIL can decode, files it cannot): a damaged photo is skipped, not fatal."""
    good, bad = [], []
    for f in files:
        try:
            load_image(str(f))
            good.append(f)
        except SimpruneError:
            bad.append(f)
    return good, bad


class UnlabelledImages(Dataset):
    """Image files read with a transform; items are image tensors only (there are no labels)."""

    def __init__(self, files: list[Path], preprocess: Preprocess):
        self.files, self.preprocess, self._tf = list(files), preprocess, preprocess.transform()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._tf(load_image(str(self.files[i])))


def select_files(files: list[Path], n_images: int | None, seed: int = 0) -> list[Path]:
    """At most ``n_images`` of ``files``, a seeded random choice kept in file order."""
    if n_images is None or n_images >= len(files):
        return files
    idx = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n_images]
    return [files[i] for i in sorted(idx.tolist())]


def image_folder(source: str | Path, preprocess: Preprocess, n_images: int | None = None,
                 seed: int = 0) -> UnlabelledImages:
    """Unlabelled calibration images from a folder (or a manifest ``PATH.csv[:SPLIT]``, labels ignored):
    at most ``n_images`` chosen with ``seed``; unreadable files are skipped and counted in one warning."""
    files = manifest_files(source)[0] if _is_manifest(source) else image_files(source)
    files, bad = readable(select_files(files, n_images, seed))
    if bad:
        progress.warn(f"skipped {len(bad)} unreadable image file(s) in {source} (first: {bad[0].name})")
    if not files:
        raise SimpruneError(f"none of the images in {source} can be read; give a folder of .jpg/.png/.webp images")
    return UnlabelledImages(files, preprocess)


def calibration_images(source: str | Path, preprocess: Preprocess, n_images: int | None = 500, seed: int = 0,
                       batch_size: int = 50) -> DataLoader:
    """Calibration batches (image tensors, no labels) from a folder of one's own images: the public loader
    behind ``--calib-data DIR``."""
    return DataLoader(image_folder(source, preprocess, n_images, seed), batch_size=batch_size, shuffle=False)


def _is_manifest(source: str | Path) -> bool:
    return str(source).split(":")[0].lower().endswith(".csv") or ".csv:" in str(source).lower()


def is_image_source(source: str | Path | None) -> bool:
    """Whether ``source`` names one's own images (a folder, or a manifest ``PATH.csv[:SPLIT]``) rather than
    a named data set such as fashion-mnist."""
    return source is not None and (_is_manifest(source) or Path(source).is_dir())


def manifest_files(source: str | Path) -> tuple[list[Path], list[int]]:
    """Files and class indices of a manifest CSV (columns ``file`` and ``class_index``; an optional ``split``
    column is filtered by ``PATH.csv:SPLIT``); paths are relative to the CSV's folder."""
    text = str(source)
    path, _, split = text.partition(".csv:") if ".csv:" in text else (text[:-4], "", "")
    path = Path(path + ".csv")
    if not path.is_file():
        raise SimpruneError(f"manifest {path} does not exist; give PATH.csv with file,class_index[,split] columns")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"file", "class_index"} <= set(rows[0]):
        raise SimpruneError(f"{path} needs the columns file and class_index (it has {', '.join(rows[0])})")
    if split:
        rows = [r for r in rows if r.get("split") == split]
    if not rows:
        raise SimpruneError(f"{path} lists no images" + (f" in split {split!r}" if split else ""))
    try:
        labels = [int(r["class_index"]) for r in rows]
    except ValueError as exc:
        raise SimpruneError(f"{path}: class_index must be an integer ({exc})") from exc
    return [path.parent / r["file"] for r in rows], labels


class LabelledImages(UnlabelledImages):
    """Image files with class indices: items are (image tensor, label), for evaluation only."""

    def __init__(self, files: list[Path], labels: list[int], preprocess: Preprocess):
        super().__init__(files, preprocess)
        self.labels = list(labels)
        self.num_classes, self.in_channels = max(self.labels) + 1, 3

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return super().__getitem__(i), self.labels[i]


def manifest_dataset(source: str | Path, preprocess: Preprocess) -> LabelledImages:
    """Labelled images from a manifest ``PATH.csv[:SPLIT]`` (e.g. the evaluation split of the ImageNet sample)."""
    files, labels = manifest_files(source)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SimpruneError(f"{len(missing)} file(s) of {source} are missing (first: {missing[0]})")
    return LabelledImages(files, labels, preprocess)


def labelled_images(source: str | Path, preprocess: Preprocess) -> Dataset:
    """Labelled evaluation images: a manifest ``PATH.csv[:SPLIT]`` or an ImageNet-style tree ``DIR/CLASS/*.jpg``
    (classes numbered in sorted folder order, as torchvision's ImageFolder and ImageNet's wnids do)."""
    if _is_manifest(source):
        return manifest_dataset(source, preprocess)
    tv = import_torchvision()
    try:
        ds = tv.datasets.ImageFolder(str(source), transform=preprocess.transform(), loader=load_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise SimpruneError(f"{source} is not a labelled image tree ({str(exc).splitlines()[0]}); give DIR/CLASS/*.jpg "
                            "folders or a manifest PATH.csv:SPLIT") from exc
    ds.num_classes, ds.in_channels = len(ds.classes), 3
    return ds
