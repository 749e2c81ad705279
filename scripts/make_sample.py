"""Build the Fashion-MNIST sample shipped inside the package (``src/simprune/data/fashion_mnist_sample.npz``).

A seeded, class-balanced selection from the original IDX files (Debian package
``dataset-fashion-mnist``): 300 test images per class for evaluation and 100 training images
per class for calibration, uint8 28x28, with their indices into the source files and the
source files' sha256, so anyone can check the sample is the real data set.

    python scripts/make_sample.py                       # from /usr/share/datasets/fashion-mnist
    python scripts/make_sample.py --source DIR --out PATH
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
PER_CLASS = {"test": 300, "train": 100}
SEED = 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of every class, drawn without replacement, in source order."""
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def build_sample(source: Path, seed: int = SEED) -> dict[str, np.ndarray]:
    """The sample's arrays (images, labels, source indices per split, plus a JSON ``meta`` string)."""
    from simprune.io.data import read_idx  # noqa: PLC0415 - checked IDX reader

    rng = np.random.default_rng(seed)
    arrays, meta = {}, {"source": "Fashion-MNIST (Xiao et al. 2017), Debian dataset-fashion-mnist", "seed": seed,
                        "per_class": PER_CLASS, "sha256": {}}
    for split in ("test", "train"):
        image_file, label_file = (source / f for f in FILES[split])
        images, labels = read_idx(image_file), read_idx(label_file)
        idx = balanced_indices(labels, PER_CLASS[split], rng)
        arrays[f"{split}_images"] = images[idx].astype(np.uint8)
        arrays[f"{split}_labels"] = labels[idx].astype(np.uint8)
        arrays[f"{split}_index"] = idx.astype(np.int32)
        for f in (image_file, label_file):
            meta["sha256"][f.name] = sha256(f)
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    return arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "simprune" / "data" / "fashion_mnist_sample.npz")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()

    from simprune.io.files import atomic_write_bytes  # noqa: PLC0415

    arrays = build_sample(args.source, args.seed)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(args.out, buf.getvalue())
    counts = {s: len(arrays[f"{s}_labels"]) for s in ("test", "train")}
    print(f"wrote {args.out} ({len(buf.getvalue()) / 2**20:.2f} MiB): {counts['test']} test and "
          f"{counts['train']} training images")


if __name__ == "__main__":
    main()
