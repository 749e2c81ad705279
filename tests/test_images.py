"""A folder of one's own images (io/images.py): discovery, skipping damaged files, preprocessing, manifests."""
import numpy as np
import pytest
import torch
from PIL import Image

from simprune.errors import SimpruneError
from simprune.io.images import (
    Preprocess,
    calibration_images,
    image_files,
    image_folder,
    manifest_dataset,
    torchvision_preprocess,
)


def _photo(path, value, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    _photo(tmp_path / "a.png", 10)
    _photo(tmp_path / "sub" / "b.jpg", 200)
    _photo(tmp_path / "sub" / "deeper" / "c.webp", 100)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return tmp_path


def test_images_are_found_flat_and_nested_and_damaged_ones_skipped_with_a_count(folder):
    assert [f.name for f in image_files(folder)] == ["a.png", "broken.jpg", "b.jpg", "c.webp"]
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file.*broken\.jpg"):
        ds = image_folder(folder, Preprocess(resize=16, crop=8, mean=(0, 0, 0), std=(1, 1, 1)))
    assert len(ds) == 3
    x = ds[0]
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.full_like(x, 10 / 255), atol=1e-6)


def test_calibration_batches_carry_images_only_with_the_normalisation(folder):
    pre = Preprocess(resize=16, crop=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with pytest.warns(UserWarning):
        batches = list(calibration_images(folder, pre, n_images=None, batch_size=2))
    assert [b.shape for b in batches] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    assert torch.allclose(batches[0][0], torch.full((3, 8, 8), (10 / 255 - 0.5) / 0.25), atol=1e-5)


def test_a_seeded_choice_of_images_is_the_same_every_time(folder):
    (folder / "broken.jpg").unlink()
    pre = Preprocess(resize=16, crop=8)
    a, b = image_folder(folder, pre, n_images=2, seed=3), image_folder(folder, pre, n_images=2, seed=3)
    assert a.files == b.files and len(a) == 2


def test_empty_or_missing_folders_are_one_line(tmp_path):
    with pytest.raises(SimpruneError, match="holds no .jpg/.png/.webp images"):
        image_files(tmp_path)
    with pytest.raises(SimpruneError, match="is not a folder"):
        image_files(tmp_path / "nope")
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(SimpruneError, match="none of the images"), pytest.warns(UserWarning):
        image_folder(tmp_path, Preprocess())


def test_torchvision_weights_give_their_own_preprocessing():
    pre = torchvision_preprocess("mobilenet_v2", "IMAGENET1K_V1")
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bilinear")
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.std == pytest.approx((0.229, 0.224, 0.225))
    with pytest.raises(SimpruneError, match="no weights"):
        torchvision_preprocess("mobilenet_v2", "NOPE")


def test_bad_preprocessing_is_refused():
    with pytest.raises(SimpruneError, match="crop <= resize"):
        Preprocess(resize=100, crop=224)
    with pytest.raises(SimpruneError, match="std > 0"):
        Preprocess(std=(0, 1, 1))


def test_a_manifest_gives_labels_and_one_split_and_calibration_ignores_its_labels(folder):
    (folder / "broken.jpg").unlink()
    (folder / "m.csv").write_text("file,wnid,class_index,split\na.png,n1,0,calibration\nsub/b.jpg,n2,1,evaluation\n"
                                  "sub/deeper/c.webp,n3,2,evaluation\n")
    pre = Preprocess(resize=16, crop=8)
    ev = manifest_dataset(f"{folder}/m.csv:evaluation", pre)
    assert [f.name for f in ev.files] == ["b.jpg", "c.webp"] and ev.labels == [1, 2] and ev.num_classes == 3
    assert ev[1][1] == 2 and ev[1][0].shape == (3, 8, 8)
    calib = image_folder(f"{folder}/m.csv:calibration", pre)
    assert [f.name for f in calib.files] == ["a.png"] and isinstance(calib[0], torch.Tensor)
    with pytest.raises(SimpruneError, match="lists no images in split 'test'"):
        manifest_dataset(f"{folder}/m.csv:test", pre)
    (folder / "bad.csv").write_text("path,label\na.png,0\n")
    with pytest.raises(SimpruneError, match="needs the columns file and class_index"):
        manifest_dataset(folder / "bad.csv", pre)
