import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from simprune.errors import SimpruneError
from simprune.io.data import load_dataset, pad_images, read_cifar_batch, read_idx
from tests.conftest import require_fashion_mnist


def test_fashion_mnist_real_files():
    require_fashion_mnist()
    train = load_dataset("fashion-mnist", "train", pad_to=32)
    test = load_dataset("fashion-mnist", "test", pad_to=32)
    assert len(train) == 60000 and len(test) == 10000
    x, y = test[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert int(test.labels.min()) == 0 and int(test.labels.max()) == 9
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # padding is a 2-pixel zero border around the original 28x28 image
    assert test.images[:, :, :2].sum() == 0 and test.images[:, :, :, -2:].sum() == 0
    assert abs(float(train.images.float().mean() / 255) - 0.2860 * (28 * 28) / (32 * 32)) < 0.002


def test_augmentation_keeps_shape_and_changes_pixels():
    require_fashion_mnist()
    ds = load_dataset("fashion-mnist", "test", pad_to=32, augment=True)
    torch.manual_seed(1)
    views = [ds[5][0] for _ in range(8)]
    assert all(v.shape == (1, 32, 32) for v in views)
    assert any(not torch.equal(views[0], v) for v in views[1:])


def write_cifar_batch(path: Path, n: int, seed: int, label_key: str = "labels", classes: int = 10):
    """A file in the exact CIFAR python format (dict of bytes keys, N x 3072 uint8, list labels)."""
    rng = np.random.default_rng(seed)
    entry = {b"batch_label": b"testing batch", label_key.encode(): rng.integers(0, classes, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    return entry


def test_cifar10_reader_on_generated_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    entries = [write_cifar_batch(folder / f"data_batch_{i}", 6, seed=i) for i in range(1, 6)]
    test_entry = write_cifar_batch(folder / "test_batch", 4, seed=9)
    train = load_dataset("cifar10", "train", data_dir=str(tmp_path))
    test = load_dataset("cifar10", "test", data_dir=str(tmp_path))
    assert len(train) == 30 and len(test) == 4
    assert train.images.shape == (30, 3, 32, 32)
    # channel-major rows: first 1024 bytes are the red plane
    assert torch.equal(test.images[0, 0].flatten(), torch.from_numpy(test_entry[b"data"][0, :1024].copy()))
    assert train.labels.tolist()[:6] == entries[0][b"labels"]


def test_cifar100_reader_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    entry = write_cifar_batch(folder / "test", 5, seed=3, label_key="fine_labels", classes=100)
    write_cifar_batch(folder / "train", 5, seed=4, label_key="fine_labels", classes=100)
    ds = load_dataset("cifar100", "test", data_dir=str(tmp_path))
    assert ds.labels.tolist() == entry[b"fine_labels"] and ds.num_classes == 100


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/simprune-pwned",))


def test_cifar_reader_refuses_code(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Payload()}))
    marker = Path("/tmp/simprune-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(SimpruneError, match="refusing"):
        read_cifar_batch(path)
    assert not marker.exists()


def test_idx_truncated_file_is_reported(tmp_path):
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(100))
    with pytest.raises(SimpruneError, match="truncated"):
        read_idx(path)


def test_wrong_data_dir_names_the_problem(tmp_path):
    (tmp_path / "readme.txt").write_text("not a data set")
    with pytest.raises(SimpruneError, match="holds no fashion-mnist IDX files"):
        load_dataset("fashion-mnist", "test", data_dir=str(tmp_path))
    with pytest.raises(SimpruneError, match="holds no cifar10 python batches"):
        load_dataset("cifar10", "test", data_dir=str(tmp_path))


def test_unknown_dataset_and_small_pad():
    with pytest.raises(SimpruneError, match="unknown data set 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(SimpruneError, match="smaller than the images"):
        pad_images(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), 24)


def test_imagefolder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 30), color=(10, 20, 30)).save(tmp_path / cls / "a.png")
    ds = load_dataset(f"imagefolder:{tmp_path}", "test", image_size=32)
    assert len(ds) == 2 and ds.num_classes == 2 and ds[0][0].shape == (3, 32, 32)
