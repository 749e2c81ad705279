"""Detectors and models with several outputs: YOLO from ultralytics YAMLs (split halves, widths kept by the graph,
attention refused), group validation, and ONNX export of tuple/dict outputs with every output verified."""
import json
import time

import pytest
import torch
from torch import nn

import simprune
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph, validate_group

X64 = torch.zeros(1, 3, 64, 64)


def _yolo(name="yolov8n.yaml"):
    pytest.importorskip("ultralytics")
    return simprune.build_model(f"ultralytics:{name}")


def test_yolov8_halves_of_a_split_are_their_own_groups_and_the_head_keeps_its_width(tmp_path):
    model = _yolo()
    graph = PruningGraph(model, X64)
    roots = {g.root: g for g in graph.groups}
    first, second = roots["model.2.cv1.parts.0.conv"], graph.group("model.2.cv1.parts.1.conv")
    assert first.size == 16 and second.size == 16 and first is not second  # C2f's cv1 (32) cut in two
    # the second half feeds the bottleneck and the closing concat: one group, both readers
    assert {"model.2.m.0.cv1.conv", "model.2.cv2.conv"} <= {m.name for m in second.consumers}
    assert "model.2.m.0.cv1.conv" not in {m.name for m in first.consumers}
    for g in graph.groups:
        validate_group(g, graph.dg)
    kept = graph.kept_width
    assert {f"model.22.cv2.{i}.2" for i in range(3)} <= set(kept)  # box outputs: read by the frozen DFL conv
    assert "frozen layer model.22.dfl.conv" in kept["model.22.cv2.0.2"]
    assert all(kept[f"model.22.cv3.{i}.2"] == "reaches the model's output" for i in range(3))  # class scores


def test_yolov8_prunes_to_the_target_reloads_identically_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _yolo()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    pruned, report = simprune.prune(model, X64, "l1", {"flops": 0.5})
    assert abs(report["reduction"]["flops"] - 0.5) <= 0.015 and report["peak_memory_mib"] > 0
    assert "model.22.cv3.0.2" in report["kept_width"]
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # the input model is untouched
        out = pruned.eval()(x)
    assert out.shape == expected.shape  # (1, 4 + 80 classes, anchors): the head's outputs keep their width
    simprune.save(tmp_path / "m", pruned, report=report)
    back = simprune.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(x), out)
    from simprune.export.onnx import export_onnx
    result = export_onnx(back, x, tmp_path / "m.onnx")
    assert result["outputs"] == ["output"] and result["exporter"] == "dynamo"


def test_attention_of_convolutions_is_refused_quickly_naming_the_ignore_which_load_reuses(tmp_path):
    model = _yolo("yolo11n.yaml")
    start = time.perf_counter()
    with pytest.raises(SimpruneError, match=r"'model\.10\.m\.0\.attn' \(Attention\) is attention.*"
                                            r"ignore=model\.10\.m\.0\.attn\.\*"):
        simprune.prune(model, X64, "l1", {"flops": 0.5})
    assert time.perf_counter() - start < 5
    pruned, report = simprune.prune(model, X64, "l1", {"flops": 0.5}, ignore=["model.10.m.0.attn.*"])
    assert abs(report["reduction"]["flops"] - 0.5) <= 0.015
    simprune.save(tmp_path / "m", pruned)
    assert json.loads((tmp_path / "m/model.json").read_text())["structure"]["ignore"] == ["model.10.m.0.attn.*"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(simprune.load(tmp_path / "m")(x), pruned.eval()(x))


def test_ultralytics_pt_and_unknown_files_are_refused_in_one_line(tmp_path):
    pytest.importorskip("ultralytics")
    with pytest.raises(SimpruneError, match=r"pickled model objects.*weights_only=True.*never unpickles"):
        simprune.build_model("ultralytics:best.pt")
    with pytest.raises(SimpruneError, match="ultralytics cannot find nosuch.yaml"):
        simprune.build_model("ultralytics:nosuch.yaml")
    with pytest.raises(SimpruneError, match="must be an existing .safetensors"):
        simprune.build_model("ultralytics:yolov8n.yaml", weights="best.pt")


def test_trained_weights_come_from_a_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file
    model = _yolo()
    state = {k: v.clone() + 0.01 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "best.safetensors")
    loaded = simprune.build_model("ultralytics:yolov8n.yaml", weights=str(tmp_path / "best.safetensors"))
    assert torch.equal(loaded.state_dict()["model.0.conv.weight"], state["model.0.conv.weight"])


def test_the_cli_prunes_a_yolo_yaml_with_only_the_target(cli, tmp_path):
    pytest.importorskip("ultralytics")
    code, out, err = cli("prune", "--model", "ultralytics:yolov8n.yaml", "--input", "3x64x64", "--target-flops",
                         "0.5", "--criterion", "l1", "--no-latency", "--out", tmp_path / "y")
    assert code == 0, err
    report = json.loads((tmp_path / "y/report.json").read_text())
    assert abs(report["reduction"]["flops"] - 0.5) <= 0.015 and "model.22.cv3.0.2" in report["kept_width"]


def test_a_group_with_indices_past_its_layer_is_refused_naming_the_ignore():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2))
    graph = PruningGraph(net, torch.zeros(1, 3, 16, 16))
    group = graph.group("0")
    reader = next(m for m in group.members if m.name == "2" and m.dim == "in")
    reader.idxs = list(range(8, 16))  # what Torch-Pruning produced for C2f's cv1 before the split became two convs
    with pytest.raises(SimpruneError, match=r"channels of layer '0'.*up to 15 of '2' \(Conv2d, 8 inputs\).*ignore=0"):
        validate_group(group, graph.dg)


class TupleAndDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = torch.relu(self.a(x))
        y = self.b(f)
        return y.mean((2, 3)), {"features": [f, y], "none": None, "logits": y.flatten(1)}


def test_tuple_and_dict_outputs_export_with_every_output_verified(tmp_path):
    pytest.importorskip("onnxruntime")
    from simprune.export.onnx import export_onnx
    model = TupleAndDict().eval()
    result = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert result["outputs"] == ["output_0", "output_1", "output_2", "output_3"]
    import onnxruntime as ort
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": torch.ones(1, 3, 8, 8).numpy()})
    with torch.no_grad():
        mean, d = model(torch.ones(1, 3, 8, 8))
    assert torch.allclose(torch.from_numpy(got[2]), d["features"][1], atol=1e-5) and got[0].shape == mean.shape


def test_a_wrong_output_among_several_is_caught(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from simprune.export import onnx as eo
    model = TupleAndDict().eval()
    real = eo.flatten_outputs

    def off_by_one(out):  # PyTorch's third output differs from what was exported
        tensors = real(out)
        return tensors[:2] + [tensors[2] + 1] + tensors[3:] if len(tensors) == 4 and not torch.is_grad_enabled() \
            and not torch.compiler.is_compiling() else tensors

    monkeypatch.setattr(eo, "flatten_outputs", off_by_one)
    with pytest.raises(SimpruneError, match=r"ONNX output 2 differs"):
        eo._verify(eo._export_legacy(model, torch.randn(1, 3, 8, 8), 18, True, ["o0", "o1", "o2", "o3"]), model,
                   [torch.randn(1, 3, 8, 8)], 1e-4)


class _DetachedHead(torch.nn.Module):
    """A second head reads the trunk through .detach() (as YOLOv10's one-to-one head does in training)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.trunk = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.head = torch.nn.Conv2d(32, 8, 1)
        self.side = torch.nn.Conv2d(32, 8, 1)

    def forward(self, x):
        y = torch.relu(self.trunk(torch.relu(self.stem(x))))
        return self.head(y) + self.side(y.detach())


def test_a_layer_the_trace_cannot_connect_keeps_its_producer_whole_and_the_forward_works():
    model = _DetachedHead().eval()
    pruned, report = simprune.prune(model, torch.zeros(1, 3, 16, 16), "l1", {"macs": 0.3})
    assert pruned.trunk.out_channels == 32 and pruned.stem.out_channels < 16  # trunk kept whole, stem pruned
    assert "read by side" in report["kept_width"]["trunk"]
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 8, 16, 16)


def test_yolov10_prunes_with_its_one_to_one_head_kept_whole_and_still_runs():
    model = _yolo("yolov10n.yaml")
    pruned, report = simprune.prune(model, X64, "l1", {"macs": 0.5},
                                    selection=simprune.Selection(ignore=["model.10.attn.*"]))
    assert abs(report["reduction"]["flops"] - 0.5) < 0.02
    assert "trace does not connect" in report["kept_width"]["model.16.cv2.conv"]  # read by the one2one head
    out = pruned(torch.zeros(1, 3, 64, 64))
    assert out[0].shape == model(torch.zeros(1, 3, 64, 64))[0].shape


def test_a_yolos_calibration_photos_are_read_as_ultralytics_feeds_them():
    from simprune.cli.common import model_preprocess
    from simprune.io.images import Preprocess
    yolo = Preprocess(resize=640, crop=640, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert model_preprocess("ultralytics:yolov8n.yaml", None) == yolo  # 0-1 RGB, no mean/std, 640
    assert model_preprocess("ultralytics:yolov8n.yaml", None, "3x320x320") == yolo.__class__(
        resize=320, crop=320, mean=yolo.mean, std=yolo.std)
    with pytest.raises(SimpruneError, match="not CxHxW"):
        model_preprocess("ultralytics:yolov8n.yaml", None, "640")


def test_a_yolo_recovers_against_every_output_of_the_unpruned_model():
    from simprune import Repair
    from simprune.repair.batchnorm import recalibrate_batchnorm
    from simprune.repair.recovery import Recovery
    model = _yolo()
    photos = [torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    recalibrate_batchnorm(model, photos)  # normalised activations, as trained weights have (random init: ~1e-6)
    model.eval()
    recovery = Recovery(steps=40, batch_size=4, lr=0.01, checks=4, patience=4, bf16=False, time_budget_s=None)
    pruned, report = simprune.prune(model, X64, "l1", {"flops": 0.5}, calibration=photos,
                                    repair=Repair(refit=False, recalibrate_bn=False, recover=recovery))
    summary = report["recovered"]
    assert summary["measure"] == "relative squared error of the outputs" and summary["held_out_agreement"] is None
    assert summary["held_out_change"]["after"] < summary["held_out_change"]["before"]
    with torch.no_grad():
        assert pruned.eval()(photos[0][:1]).shape == model.eval()(photos[0][:1]).shape


def test_a_yolo_quantizes_with_its_box_decoding_kept_float_and_nothing_left_in_the_cwd(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from simprune.export.quantize import quantize_int8
    from simprune.repair.batchnorm import recalibrate_batchnorm
    model = _yolo()
    photos = [torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    recalibrate_batchnorm(model, photos)
    pruned, _ = simprune.prune(model.eval(), X64, "l1", {"flops": 0.5})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # onnxruntime's shape inference saves a temporary file in the cwd when it fails
    try:
        result = quantize_int8(pruned.eval(), X64, photos, photos, tmp_path / "m.int8.onnx", max_output_error=1e9)
    finally:
        assert list(cwd.iterdir()) == []
    assert result["output_error"] is not None and result["int8_top1"] is None  # checked without labels
    assert result["tolerance"] == {"max_output_error": 1e9} and (tmp_path / "m.int8.onnx").exists()
