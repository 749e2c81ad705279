"""Third-party model forms: Hugging Face transformers CNNs (their ModelOutput), a torchvision detector's
backbone + FPN (an OrderedDict of feature maps), and a plain model returning a dict: each prunes to its
target, reloads with identical outputs and exports to ONNX with every output verified, or is refused in
one line naming the layer."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

import simprune
from simprune.export.onnx import export_onnx, flatten_outputs


def _roundtrip(build, x, tmp_path, target=0.6, **kwargs):
    """Remove ``target`` of the MACs from ``build()``, save, load into a fresh ``build()``, export: the reloaded
    outputs equal the pruned ones."""
    pruned, report = simprune.prune(build(), x, "l1", {"flops": target}, **kwargs)
    assert abs(1 - report["macs"]["after"] / report["macs"]["before"] - target) < 0.06
    simprune.save(tmp_path / "m", pruned, report=report)
    back = simprune.load(tmp_path / "m", build())  # the user's own class: a fresh instance
    with torch.no_grad():
        for a, b in zip(flatten_outputs(pruned.eval()(x)), flatten_outputs(back.eval()(x)), strict=True):
            assert torch.equal(a, b)
    exported = export_onnx(back, x, tmp_path / "m.onnx")
    assert exported["max_abs_diff"] is not None and exported["max_abs_diff"] < 1e-3
    return pruned, report, exported


def _hf(kind):
    """A builder of a small transformers CNN (seeded: every call the same weights)."""
    transformers = pytest.importorskip("transformers")
    if kind == "resnet":
        config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                           layer_type="basic", num_labels=5)
        cls = transformers.ResNetForImageClassification
    else:
        config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)
        cls = transformers.ConvNextForImageClassification

    def build():
        torch.manual_seed(0)
        return cls(config).eval()
    return build


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_a_transformers_cnn_prunes_reloads_and_exports_its_model_output(kind, tmp_path):
    pytest.importorskip("onnxruntime")
    x = torch.randn(1, 3, 64, 64)
    pruned, _, exported = _roundtrip(_hf(kind), x, tmp_path)
    assert pruned(x).logits.shape == (1, 5)  # still a ModelOutput with every class
    assert len(exported["outputs"]) >= 1


def test_a_torchvision_detectors_backbone_and_fpn_prune_keeping_every_feature_maps_width(tmp_path):
    pytest.importorskip("onnxruntime")
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    def build():  # body (MobileNetV3) + FPN: returns an OrderedDict of maps
        torch.manual_seed(0)
        return fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).backbone.eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        before = build()(x)
    pruned, report, _ = _roundtrip(build, x, tmp_path, target=0.7)
    with torch.no_grad():
        after = pruned(x)
    assert isinstance(after, OrderedDict) and list(after) == list(before)
    assert all(after[k].shape == before[k].shape for k in before)  # the RPN and ROI heads read these widths


class DictNet(nn.Module):
    """Two heads returning a dict: what each reads is known, so their widths are."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.seg = nn.Conv2d(32, 4, 1)
        self.cls = nn.Linear(32, 3)

    def forward(self, x):
        f = self.body(self.stem(x))
        return {"masks": self.seg(f), "logits": self.cls(f.mean((2, 3)))}


def test_a_model_returning_a_dict_prunes_refits_on_every_output_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    def build():
        torch.manual_seed(0)
        return DictNet().eval()
    x = torch.randn(1, 3, 16, 16)
    calibration = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    pruned, report, exported = _roundtrip(build, x, tmp_path, target=0.6, calibration=calibration)
    assert report.get("reconstructed")  # the default refit ran with the calibration images
    assert len(exported["outputs"]) == 2
    out = pruned(x)
    assert set(out) == {"masks", "logits"} and out["masks"].shape == (1, 4, 16, 16)
