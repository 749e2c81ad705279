"""One's own images on the command line: `--calib-data DIR` (unlabelled, any layout) read with the model's
preprocessing or --resize/--crop/--mean/--std, `--data PATH.csv:SPLIT` or a CLASS/ tree for evaluation,
`--recover` reported as what it did, and the int8 export calibrating on the same recorded images."""
import argparse
import json
import re

import numpy as np
import pytest
from PIL import Image

from simprune.cli.common import image_preprocess
from simprune.io.images import labelled_images, timm_preprocess

NETS = '''
from torch import nn

def build(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
'''
OWN = ["--resize", "36", "--crop", "32", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]


def _photo(path, seed, size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not re.match(r"^\[ *\d+\.\d+s\] ", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def own(tmp_path, monkeypatch):
    (tmp_path / "nets.py").write_text(NETS)
    for i in range(24):
        _photo(tmp_path / "photos" / ("nested" if i % 3 else "") / f"p{i}.{'png' if i % 2 else 'jpg'}", i)
    rows = ["file,class_index,split"]
    for i in range(10):
        _photo(tmp_path / "val" / f"v{i}.png", 100 + i)
        rows.append(f"val/v{i}.png,{i},evaluation")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_prune_from_a_folder_with_recovery_records_preprocessing_and_says_what_ran(cli, own):
    pytest.importorskip("onnxruntime")
    code, out, err = cli("prune", "--model", "nets.py:build", "--calib-data", "photos", "--calib-images", "20",
                         *OWN, "--data", "manifest.csv:evaluation", "--target-flops", "0.3", "--recover",
                         "--recover-minutes", "0.05", "--out", "runs/own", "--no-latency")
    assert code == 0, err
    desc = json.loads((own / "runs/own/model.json").read_text())
    assert desc["input_shape"] == [3, 32, 32]  # from --crop, no --input
    assert desc["calibration"]["preprocess"] == {"resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
                                                 "interpolation": "bilinear"}
    assert desc["calibration"]["data"] == str((own / "photos").resolve())
    report = json.loads((own / "runs/own/report.json").read_text())
    assert report["recovered"]["images"] == 20 and report["recovered"]["held_aside"] == 8
    assert "recovered on 20 unlabelled calibration images" in out
    assert "recovered on 20 unlabelled" in (own / "runs/own/report.md").read_text()
    assert report["options"]["repair"]["recover"] == "Recovery"

    code, _, err = cli("export", "runs/own", "--int8", "--model", "nets.py:build")  # no labels to check on
    assert code == 2 and "pass --data DIR (CLASS/*.jpg folders) or --data PATH.csv:SPLIT" in _one_error_line(err)
    code, out, err = cli("export", "runs/own", "--int8", "--model", "nets.py:build", "--data", "manifest.csv:evaluation")
    assert code == 0, err
    assert json.loads((own / "runs/own/report.json").read_text())["int8"]["calibration_images"] == 20


def test_own_image_mistakes_are_one_line_naming_the_flag(cli, own):
    base = ["prune", "--model", "nets.py:build", "--target-flops", "0.3", "--no-latency"]
    code, _, err = cli(*base, "--calib-data", "empty", *OWN, "--out", "runs/a")
    assert code == 2 and "empty holds no .jpg/.png/.webp images" in _one_error_line(err)
    code, _, err = cli(*base, "--recover", "--out", "runs/b")
    assert code == 2 and "--recover trains on the calibration images; pass --calib-data" in _one_error_line(err)
    code, _, err = cli(*base, "--calib-data", "photos", *OWN, "--input", "3x28x28", "--out", "runs/c")
    assert code == 2 and "pass --crop 28 or --input 3x32x32" in _one_error_line(err)
    code, _, err = cli(*base, "--calib-data", "photos", "--resize", "20", "--crop", "32", "--out", "runs/d")
    assert code == 2 and "--resize/--crop/--mean/--std: " in _one_error_line(err)
    assert not (own / "runs").exists() or not any((own / "runs").iterdir())  # nothing half-written


def _args(**kw):
    return argparse.Namespace(**{"model": None, "weights": None, "resize": None, "crop": None, "mean": None,
                                 "std": None, **kw})


def test_the_model_s_own_preprocessing_is_the_default_and_flags_override_one_field_each():
    tv = image_preprocess(_args(model="torchvision:mobilenet_v2", weights="IMAGENET1K_V2"))
    assert (tv.resize, tv.crop) == (232, 224)  # the V2 weights' transforms(), not ImageNet's usual 256
    assert image_preprocess(_args(model="torchvision:mobilenet_v2", weights="IMAGENET1K_V2", crop=192)).resize == 232
    assert image_preprocess(_args(crop=288)).resize == 288  # a crop beyond the default resize takes it along
    with pytest.warns(UserWarning, match="resize 256, centre crop 224 and ImageNet mean/std"):
        assert image_preprocess(_args()).crop == 224


def test_timm_preprocessing_comes_from_its_pretrained_config_without_a_download():
    pytest.importorskip("timm")
    pre = timm_preprocess("resnet18")
    assert (pre.crop, pre.resize, pre.interpolation) == (224, round(224 / 0.95), "bicubic")


def test_a_labelled_tree_numbers_classes_in_sorted_folder_order(own):
    for name in ("n02", "n01"):
        _photo(own / "tree" / name / "x.png", 1)
    ds = labelled_images(own / "tree", image_preprocess(_args(resize=36, crop=32)))
    assert ds.classes == ["n01", "n02"] and [y for _, y in ds] == [0, 1] and ds.num_classes == 2
