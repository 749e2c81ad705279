"""The structural pruning engine: groups, allocation under a global target, removal, files."""
import json

import pytest
import torch
from torch import nn

import simprune
from simprune.allocation.allocator import Guards
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph
from simprune.graph.removal import remove_channels
from simprune.models import build_model

CIFAR = ["resnet20", "resnet56", "resnet20_b", "resnet56_b", "vgg16", "mobilenetv2"]
TORCHVISION = ["torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2",
               "torchvision:vgg16_bn", "torchvision:densenet121"]


def _example(name):
    return torch.zeros(1, 3, 64, 64) if name.startswith("torchvision:") else torch.zeros(1, 3, 32, 32)


def _build(name):
    return build_model(name, num_classes=10).eval()


@pytest.mark.parametrize("name", CIFAR + TORCHVISION)
def test_prune_hits_each_target_and_keeps_output_shape(name):
    model = _build(name)
    x = torch.randn(2, *_example(name).shape[1:])
    for ratio in (0.3, 0.5, 0.7):
        pruned, report = simprune.prune(model, _example(name), "l1", {"flops": ratio})
        assert abs(report["reduction"]["flops"] - ratio) <= 0.01, (name, ratio, report["reduction"])
        assert report["macs"]["after"] < report["macs"]["before"]
        with torch.no_grad():
            assert pruned(x).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == report["params"]["before"]  # original untouched


@pytest.mark.parametrize("name", CIFAR + ["torchvision:resnet18", "torchvision:mobilenet_v2",
                                          "torchvision:densenet121"])
def test_save_load_reproduces_outputs_exactly(name, tmp_path):
    pruned, report = simprune.prune(_build(name), _example(name), "fpgm", {"flops": 0.5})
    desc = {"model": name, "model_args": {"num_classes": 10, "in_channels": 3},
            "input_shape": list(_example(name).shape[1:])}
    simprune.save(tmp_path / "out", pruned, desc, report)
    loaded = simprune.load(tmp_path / "out")
    x = torch.randn(2, *_example(name).shape[1:])
    with torch.no_grad():
        assert torch.equal(pruned(x), loaded(x))
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["macs"] == report["macs"]


def test_params_target():
    _, report = simprune.prune(_build("vgg16"), _example("vgg16"), "l2", {"params": 0.6})
    assert abs(report["reduction"]["params"] - 0.6) <= 0.01


def test_classifier_outputs_are_never_pruned():
    graph = PruningGraph(_build("resnet20"), _example("resnet20"))
    assert all(not (m.name == "fc" and m.dim == "out") for g in graph.groups for m in g.members)


def test_option_a_shortcut_is_its_own_coupling():
    graph = PruningGraph(_build("resnet20"), _example("resnet20"))
    stage2 = graph.group("layer2.0.conv2")
    names = {(m.name, m.dim) for m in stage2.members}
    assert ("layer2.0.shortcut", "out") in names and ("layer3.0.shortcut", "in") in names
    assert stage2.size == 32 and graph.group("conv1").size == 16  # not merged across the pad


def _prune_exact(model, example, remove):
    graph = PruningGraph(model, example)
    remove_channels(graph, remove)
    return model


def test_option_a_pruning_a_padded_stage_channel_equals_zeroing_it():
    torch.manual_seed(0)
    model = _build("resnet20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 3, 32, 32)
    chans = [1, 5, 26]  # stage-2 channels fed by the zero pad of layer2.0.shortcut
    masked = _build("resnet20")
    masked.load_state_dict(model.state_dict())
    for block in masked.layer2:
        block.bn2.weight.data[chans] = 0
        block.bn2.bias.data[chans] = 0
    with torch.no_grad():
        expected = masked(x)
        pruned = _prune_exact(model, _example("resnet20"), {"layer2.0.conv2": chans})
        assert pruned.layer2[0].conv2.out_channels == 29
        assert torch.allclose(pruned(x), expected, atol=1e-5)


def _set_bn_statistics(model, x):
    """Give BN real running statistics so a random deep net has unit-scale activations."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(x)
    model.eval()


def _zero_inputs(layer, chans):
    layer.weight.data[:, chans] = 0  # (advanced indexing on the left assigns in place)


@pytest.mark.parametrize("name,root,zero", [
    ("resnet56", "layer2.3.conv1", lambda m, c: _zero_inputs(m.layer2[3].conv2, c)),
    ("vgg16", "features.7", lambda m, c: _zero_inputs(m.features[10], c)),
    ("mobilenetv2", "features.3.conv.0.0", lambda m, c: _zero_inputs(m.features[3].conv[2][0], c)),
    ("resnet20", "layer3.0.conv2", lambda m, c: [_zero_inputs(layer, c) for layer in
                                                 [b.conv1 for b in m.layer3] + [m.fc]]),
])
def test_pruning_channels_with_zero_outgoing_weights_leaves_output_unchanged(name, root, zero):
    torch.manual_seed(1)
    model = _build(name)
    chans = [0, 3, 7]
    zero(model, chans)
    x = torch.randn(2, 3, 32, 32)
    _set_bn_statistics(model, torch.randn(16, 3, 32, 32))
    with torch.no_grad():
        before = model(x)
        graph = PruningGraph(model, _example(name))
        size = graph.group(root).size
        remove_channels(graph, {graph.group(root).root: chans})
        assert graph.group(root).size == size - 3
        after = model(x)
    scale = before.abs().max().clamp(min=1)
    assert ((before - after).abs().max() / scale) < 1e-5


def test_guards_min_channels_max_ratio_round_to_and_ignore():
    model = _build("resnet20")
    pruned, report = simprune.prune(model, _example("resnet20"), "l1", {"flops": 0.4},
                                    guards=Guards(min_channels=6, max_layer_ratio=0.6, round_to=2),
                                    ignore=["layer1.0.conv1"])
    for g in report["groups"]:
        kept, size = g["channels_after"], g["channels_before"]
        assert kept >= 6 and kept >= size * 0.4 - 1e-9 and (kept % 2 == 0 or kept == size)
    assert pruned.layer1[0].conv1.out_channels == 16


def test_unreachable_target_names_the_largest_reachable():
    with pytest.raises(SimpruneError, match=r"largest reachable is \d+\.\d%"):
        simprune.prune(_build("resnet20"), _example("resnet20"), "l1", {"flops": 0.9},
                       guards=Guards(max_layer_ratio=0.5))


@pytest.mark.parametrize("target,match", [({"flops": 1.2}, "strictly between 0 and 1"),
                                          ({"flops": 0.0}, "strictly between 0 and 1"),
                                          ({"latency": 0.5}, "needs a cost model with a latency table"),
                                          ({"energy": 0.5}, "unknown target")])
def test_bad_targets(target, match):
    with pytest.raises(SimpruneError, match=match):
        simprune.prune(_build("resnet20"), _example("resnet20"), "l1", target)


def test_unknown_criterion_and_ignore_pattern():
    with pytest.raises(SimpruneError, match="unknown criterion 'l3'"):
        simprune.prune(_build("resnet20"), _example("resnet20"), "l3", {"flops": 0.5})
    with pytest.raises(SimpruneError, match="matches no conv/linear layer"):
        simprune.prune(_build("resnet20"), _example("resnet20"), "l1", {"flops": 0.5}, ignore=["layer9.*"])


def test_model_without_prunable_layer():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(SimpruneError, match="no prunable channel group"):
        simprune.prune(model, torch.zeros(1, 3, 2, 2), "l1", {"flops": 0.5})


def test_random_criterion_is_seeded():
    def kept(seed):
        pruned, _ = simprune.prune(_build("resnet20"), _example("resnet20"), "random", {"flops": 0.5},
                                   criterion_options={"seed": seed})
        return pruned.simprune_structure["groups"]

    assert kept(0) == kept(0) and kept(0) != kept(1)


def test_fpgm_scores_by_hand():
    from simprune.criteria.weights import FPGM

    filters = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    # distances: 0-1: 5, 0-2: 10, 1-2: 5 -> sums 15, 10, 15: the middle filter is the geometric median
    assert FPGM().per_layer(filters).tolist() == [15.0, 10.0, 15.0]
