"""Pruning the architectures users bring: grouped convs, channel shuffle, fed-back concats (GhostNet),
segmentation heads, their own models and builders; saving and loading them; aligned widths."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import simprune
from simprune.allocation.allocator import CostModel, Guards
from simprune.allocation.rounding import vector_block
from simprune.errors import SimpruneError
from simprune.graph.counting import count
from simprune.graph.groups import PruningGraph
from simprune.graph.removal import remove_channels
from simprune.models import build_model

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_models", ROOT / "bench" / "models.py")
bench_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_models)


class Grouped(nn.Module):
    """stem -> grouped 3x3 (4 groups) -> 1x1 -> head: the ResNeXt pattern."""

    def __init__(self, width: int = 16, groups: int = 4, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 1)
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(width)
        self.proj = nn.Conv2d(width, width, 1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.grouped(x)))
        return self.fc(self.proj(x).mean((2, 3)))


class FedBack(nn.Module):
    """A GhostNet module in a residual: cat(x1, depthwise(x1)) added to the stem, so stem channels k and
    k+4 go only together."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.primary = nn.Conv2d(8, 4, 1)
        self.cheap = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        s = self.stem(x)
        p = self.primary(s)
        x = s + torch.cat([p, self.cheap(p)], 1)
        return self.fc(self.head(x).mean((2, 3)))


def test_grouped_conv_channels_go_in_the_same_positions_of_every_group():
    graph = PruningGraph(Grouped(), torch.zeros(1, 3, 8, 8))
    group = graph.group("stem")  # read by the grouped conv
    assert group.channel_groups == 4 and group.classes[1] == [1, 5, 9, 13]
    pruned, report = simprune.prune(Grouped(), torch.zeros(1, 3, 8, 8), "l1", {"flops": 0.4},
                                    guards=Guards(round_to=1))
    assert pruned.grouped.in_channels % 4 == 0 and pruned.grouped.out_channels % 4 == 0
    assert pruned.grouped.in_channels < 16 and abs(report["reduction"]["flops"] - 0.4) < 0.015
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_fed_back_channels_are_tied_and_the_cost_model_is_exact():
    model, x = FedBack().eval(), torch.zeros(1, 3, 8, 8)
    graph = PruningGraph(model, x)
    group = graph.group("stem")
    assert group.classes == [[0, 4], [1, 5], [2, 6], [3, 7]]
    before = count(model, x)
    cost = CostModel(graph.groups, before)
    removed = [2 if g is group else 0 for g in graph.groups]  # one class: two stem channels
    predicted = cost.total(removed)[0]
    remove_channels(graph, {"stem": [1, 5]})
    assert model.stem.out_channels == 6 and model.primary.out_channels == 3
    assert predicted == count(model, x).macs


def test_torchvision_keeps_its_head_unless_num_classes():
    assert build_model("torchvision:resnet18").fc.out_features == 1000
    assert build_model("torchvision:resnet18", num_classes=7).fc.out_features == 7
    assert build_model("torchvision:lraspp_mobilenet_v3_large").classifier.high_classifier.out_channels == 21
    assert build_model("resnet20").fc.out_features == 10


def test_timm_by_name_keeps_its_head():
    model = build_model("timm:resnet18")
    assert model.fc.out_features == 1000 and model.simprune_source == {"model": "timm:resnet18", "model_args": {}}
    with pytest.raises(SimpruneError, match="unknown timm model"):
        build_model("timm:no_such_net")


def test_attention_is_refused_naming_the_layer():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)
            return self.attn(t, t, t)[0]

    with pytest.raises(SimpruneError, match=r"layer 'attn' \(MultiheadAttention\)"):
        PruningGraph(Attn(), torch.zeros(1, 3, 4, 4))


def test_trace_failure_names_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    with pytest.raises(SimpruneError, match=r"layer '2' \(Linear\)"):
        PruningGraph(model, torch.zeros(1, 3, 16, 16))  # the Linear expects 8x8 inputs


def test_widths_are_aligned_to_the_vector_block_by_default_and_round_to_1_opts_out():
    model, x = build_model("torchvision:resnet18"), torch.zeros(1, 3, 32, 32)
    pruned, report = simprune.prune(model, x, "l1", {"flops": 0.5})
    block = report["round_to"]
    assert block in (vector_block(), vector_block() // 2)
    widths = {g["root"]: g["channels_after"] for g in report["groups"]}
    assert all(w % block == 0 for w in widths.values())
    _, plain = simprune.prune(model, x, "l1", {"flops": 0.5}, guards=Guards(round_to=1))
    assert plain["round_to"] == 1 and any(g["channels_after"] % block for g in plain["groups"])


def test_own_model_saves_with_nothing_and_loads_into_a_fresh_instance(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    pruned, _ = simprune.prune(Grouped(width=32), x, "l1", {"flops": 0.3})
    simprune.save(tmp_path / "m", pruned, {})
    back = simprune.load(tmp_path / "m", Grouped(width=32))
    assert torch.equal(back(x), pruned.eval()(x))
    with pytest.raises(SimpruneError, match=r"your own model \(.*Grouped\).*simprune.load\(dir, MyNet\(\)\)"):
        simprune.load(tmp_path / "m")
    with pytest.raises(SimpruneError, match="cannot save: model 'Grouped'"):
        simprune.save(tmp_path / "n", pruned, {"model": "Grouped"})


BUILDER = '''
import torch
from torch import nn

def build(width=8, num_classes=10, in_channels=3, act="relu"):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''


def test_builder_by_path_records_its_arguments_and_runs_only_when_named(tmp_path, monkeypatch):
    (tmp_path / "nets.py").write_text(BUILDER)
    spec = f"{tmp_path / 'nets.py'}:build"
    model = build_model(spec, num_classes=4, width=32, act="relu")
    x = torch.randn(1, 3, 12, 12)
    pruned, _ = simprune.prune(model, x, "l1", {"flops": 0.4})
    simprune.save(tmp_path / "m", pruned)
    with pytest.raises(SimpruneError, match=r"your code.*builder=.*nets.py:build"):
        simprune.load(tmp_path / "m")
    back = simprune.load(tmp_path / "m", spec)
    assert torch.equal(back(x), pruned.eval()(x)) and back[-1].out_features == 4
    monkeypatch.setenv("SIMPRUNE_TRUSTED_BUILDERS", spec)
    assert torch.equal(simprune.load(tmp_path / "m")(x), back(x))


def test_cli_prunes_a_torchvision_model_and_info_reads_the_folder(cli, tmp_path):
    code, out, err = cli("prune", "--model", "torchvision:shufflenet_v2_x0_5", "--input", "3x64x64",
                         "--target-flops", "0.3", "--out", tmp_path / "p")
    assert code == 0, err
    assert '"num_classes"' not in (tmp_path / "p" / "model.json").read_text()  # its own 1000-class head
    code, out, err = cli("info", "--checkpoint", tmp_path / "p", "--input", "3x64x64", "--json")
    assert code == 0, err


def test_grouped_regnet_prunes_and_reloads():
    row = bench_models.check_model("torchvision:regnet_x_400mf", size=32, export=False)
    assert abs(row["removed"] - 0.5) <= 0.015


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision:regnet_x_400mf", "timm:ghostnet_100"])
def test_architectures_prune_reload_and_export(name):
    row = bench_models.check_model(name)
    assert abs(row["removed"] - 0.5) <= 0.015 and row["onnx_diff"] < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision:resnext50_32x4d", "torchvision:shufflenet_v2_x1_0",
                                  "torchvision:googlenet", "torchvision:densenet121", "torchvision:convnext_tiny",
                                  "torchvision:fcn_resnet50", "timm:efficientnet_b0"])
def test_more_architectures_prune_reload_and_export(name):
    row = bench_models.check_model(name)
    assert abs(row["removed"] - 0.5) <= 0.015


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_torchvision_and_timm_import_before_and_after_simprune():
    """In the venv `make` builds, a user's own script imports torchvision/timm first (the .pth hook)."""
    first = _python("import torchvision, timm; print(torchvision.models.resnet18().fc.out_features)")
    assert first.returncode == 0 and first.stdout.strip() == "1000", first.stderr[-400:]
    after = _python("import simprune, torchvision; print(torchvision.__name__)")
    assert after.returncode == 0, after.stderr[-400:]


@pytest.mark.slow
def test_the_sweep_follows_a_refusals_ignore_and_reloads_a_transformers_model_into_its_class():
    pytest.importorskip("ultralytics")
    pytest.importorskip("transformers")
    row = bench_models.check_model("ultralytics:yolo11n.yaml", export=False)
    assert row["ignore"] == "model.10.m.0.attn.*" and abs(row["removed"] - 0.5) <= 0.015
    row = bench_models.check_model("transformers:convnext-tiny", export=False)
    assert "ignore" not in row and row["outputs"] == 1 and abs(row["removed"] - 0.5) <= 0.015
