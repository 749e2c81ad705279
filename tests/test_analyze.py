"""`simprune analyze`: twin counts on a constructed duplicate, JSON fields, PNGs, atomic output."""
import json
import struct

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from simprune.analysis import analyze
from simprune.files import save_model
from simprune.models import build_model
from tests.conftest import require_fashion_mnist


def _batches(n=32):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 32, 32, generator=g), torch.zeros(n, dtype=torch.long)),
                      batch_size=16)


def _model_with_duplicate():
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1).eval()
    block = model.layer1[0]
    with torch.no_grad():
        block.conv1.weight[5] = block.conv1.weight[2]
        block.bn1.weight[5], block.bn1.bias[5] = block.bn1.weight[2], block.bn1.bias[2]
    return model


def test_constructed_twin_is_counted_at_every_threshold():
    summary, matrices = analyze(_model_with_duplicate(), torch.zeros(1, 1, 32, 32), _batches(), "ssim")
    group = next(g for g in summary["groups"] if g["group"] == "layer1.0.conv1")
    assert group["twins"]["0.99"] >= 2  # channel 2 and channel 5 are each other's twin
    assert group["removable"]["0.99"] >= 1
    assert matrices["layer1.0.conv1"][2, 5] == pytest.approx(1.0, abs=1e-6)
    assert summary["network"]["images"] == 32
    assert summary["network"]["channels"] == sum(g["channels"] for g in summary["groups"])
    assert set(group["mstd"]) == {"min", "median", "max", "cv"}


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_cli_writes_json_and_pngs(cli, tmp_path):
    require_fashion_mnist()
    save_model(tmp_path / "m", _model_with_duplicate(), {"model": "resnet20", "model_args": {
        "num_classes": 10, "in_channels": 1}, "input_shape": [1, 32, 32],
        "data": {"name": "fashion-mnist", "pad_to": 32}})
    out = tmp_path / "analysis"
    code, stdout, err = cli("analyze", "--checkpoint", tmp_path / "m", "--calib-images", "64", "--out", out)
    assert code == 0, err
    report = json.loads((out / "analysis.json").read_text())
    assert report["weights"] == "checkpoint" and report["calibration"]["images"] == 64
    assert {"network", "groups"} <= set(report)
    for png in [out / "redundancy.png"] + sorted(out.glob("similarity*.png")):
        w, h = _png_size(png)
        assert w >= 600 and h >= 300
    assert "twin channels" in stdout


def test_cli_failure_leaves_no_output(cli, tmp_path):
    out = tmp_path / "analysis"
    code, _, err = cli("analyze", "--model", "resnet20", "--calib-data", "svhn", "--out", out)
    assert code == 2 and "unknown data set" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
