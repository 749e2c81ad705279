import json
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import simprune
from simprune.cli.main import main
from simprune.errors import SimpruneError
from simprune.export.onnx import export_onnx
from simprune.models import build_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _files(directory):
    return sorted(p.name for p in directory.iterdir())


def _widths(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name, shape", [
    ("resnet20", (1, 32, 32)),              # option-A ZeroPadShortcut (index_copy) on a 1-channel input
    ("mobilenetv2", (3, 32, 32)),
    ("torchvision:resnet18", (3, 64, 64)),
])
def test_pruned_model_export_matches_onnxruntime(tmp_path, name, shape):
    original = build_model(name, num_classes=10, in_channels=shape[0])
    model, report = simprune.prune(original, torch.zeros(1, *shape), "l1", {"flops": 0.4})
    assert report["reduction"]["flops"] >= 0.39 and _widths(model) != _widths(original)  # really pruned
    path = tmp_path / "model.onnx"
    result = export_onnx(model, torch.randn(2, *shape), path, opset=18)

    assert set(result) >= {"path", "opset", "exporter", "max_abs_diff", "bytes"}
    assert result["exporter"] == "dynamo" and result["notice"] is None
    assert result["opset"] == 18 and result["path"] == str(path)
    assert 0 <= result["max_abs_diff"] <= 1e-4
    assert result["bytes"] == path.stat().st_size
    assert _files(tmp_path) == ["model.onnx"]  # self-contained: no external data, no temp file left

    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, *shape)  # a third batch size, read back from disk
    with torch.inference_mode():
        expected = model.eval()(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_opset_17_is_honoured_with_fallback_notice(tmp_path):
    """torch's dynamo exporter starts at opset 18, so opset 17 comes from the legacy exporter, with a notice."""
    model = build_model("resnet20", num_classes=10, in_channels=1).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_onnx(model, torch.randn(1, 1, 32, 32), tmp_path / "m.onnx", opset=17)
    assert result["opset"] == 17 and result["max_abs_diff"] <= 1e-4
    if result["exporter"] == "legacy":
        assert "legacy" in result["notice"]
        assert any(w.category is RuntimeWarning and "legacy" in str(w.message) for w in caught)
    else:
        assert result["notice"] is None
    assert model.training  # train/eval mode restored
    shape = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape
    assert shape.dim[0].dim_param  # batch axis is symbolic


class ExportsDifferently(nn.Module):
    """Eager is a 1x1 conv; the exported graph adds ``delta`` (an export that is not equivalent)."""

    def __init__(self, scale=1.0, delta=1.0):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.scale, self.delta = scale, delta

    def forward(self, x):
        y = self.conv(x) * self.scale
        return y + self.delta if torch.onnx.is_in_onnx_export() else y


@pytest.mark.parametrize("opset", [17, 18])
def test_mismatch_raises_and_writes_nothing(tmp_path, opset):
    with pytest.raises(SimpruneError, match="differs from PyTorch"):
        export_onnx(ExportsDifferently(), torch.randn(2, 1, 4, 4), tmp_path / "bad.onnx", opset=opset)
    assert _files(tmp_path) == []


def test_tolerance_is_relative_for_large_outputs(tmp_path):
    """Outputs near 1e5 carry float32 rounding near 1e-2: 1e-4 is then relative (but a real gap still fails)."""
    x = torch.ones(2, 1, 4, 4)
    big = ExportsDifferently(scale=1e5, delta=0.5)  # 0.5 off at outputs of ~1e5: 5e-6 relative
    with torch.no_grad():
        big.conv.weight.fill_(1.0)
    result = export_onnx(big, x, tmp_path / "big.onnx", opset=18)
    assert 0.4 < result["max_abs_diff"] < 0.6
    with pytest.raises(SimpruneError, match="output scale"):
        export_onnx(ExportsDifferently(scale=1e5, delta=1e3), x, tmp_path / "bad.onnx", opset=18)
    assert _files(tmp_path) == ["big.onnx"]


def test_static_batch(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    result = export_onnx(model, torch.randn(2, 1, 6, 6), tmp_path / "s.onnx", opset=18, dynamic_batch=False)
    dim0 = onnx.load(result["path"]).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 2 and not dim0.dim_param


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx"])
def test_missing_dependency_is_one_line(tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    with pytest.raises(SimpruneError) as info:
        export_onnx(nn.Conv2d(1, 1, 1), torch.randn(1, 1, 2, 2), tmp_path / "x.onnx")
    message = str(info.value)
    assert "\n" not in message and missing in message and "pip install 'simprune[onnx]'" in message
    assert _files(tmp_path) == []


# ---- simprune export DIR --onnx -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "r20"
    assert main(["prune", "--model", "resnet20", "--input", "1x32x32", "--criterion", "l1", "--target-flops", "0.3",
                 "--no-latency", "--out", str(out)]) == 0
    return out


def test_cli_export_writes_verified_onnx(pruned_dir, capsys):
    assert main(["export", str(pruned_dir), "--onnx"]) == 0
    out = capsys.readouterr().out
    assert "opset 18, dynamo exporter" in out and "model.onnx" in out
    model = simprune.load(pruned_dir)
    session = ort.InferenceSession(str(pruned_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 1, 32, 32)
    with torch.inference_mode():
        expected = model(x).numpy()
    assert np.abs(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] - expected).max() <= 1e-4


def test_cli_export_opset_17_prints_the_notice(pruned_dir, capsys):
    assert main(["export", str(pruned_dir), "--onnx", "--opset", "17"]) == 0
    out = capsys.readouterr().out
    assert "notice: dynamo ONNX exporter failed" in out and "opset 17, legacy exporter" in out
    assert onnx.load(str(pruned_dir / "model.onnx")).opset_import[0].version == 17


def test_cli_export_errors(pruned_dir, tmp_path, monkeypatch, capsys):
    assert main(["export", str(pruned_dir)]) == 2
    assert "error: choose an export format: --onnx" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--onnx"]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    before = sorted(p.name for p in pruned_dir.iterdir())
    assert main(["export", str(pruned_dir), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxruntime not installed" in err and "pip install 'simprune[onnx]'" in err
    assert sorted(p.name for p in pruned_dir.iterdir()) == before
    assert json.loads((pruned_dir / "report.json").read_text())["target"] == {"flops": 0.3}


class IllConditioned(nn.Module):
    """Two huge sums that cancel exactly, added up in different orders: float32 PyTorch itself is far off
    the exact result (0), by rounding alone."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(8, 64), nn.Linear(8, 64)
        with torch.no_grad():
            self.a.weight.normal_(0, 1e6)
            self.c.weight.copy_(self.a.weight.flip(0))
            self.c.bias.copy_(self.a.bias.flip(0))

    def forward(self, x):
        return self.a(x).sum(1, keepdim=True) - self.c(x).sum(1, keepdim=True)


def test_float32_noise_floor_allows_only_rounding(tmp_path):
    from simprune.export.onnx import NOISE_FACTOR, _float32_noise

    model, x = IllConditioned().eval(), torch.randn(2, 8)
    with torch.inference_mode():
        floor = _float32_noise(model, x, model(x).numpy())
    assert floor > 1e-4  # the model's own float32 error is above the plain tolerance
    result = export_onnx(model, x, tmp_path / "ill.onnx", opset=18)
    assert result["max_abs_diff"] <= NOISE_FACTOR * floor
    assert _float32_noise(nn.Linear(8, 1).eval(), x, nn.Linear(8, 1)(x).detach().numpy()) >= 0
