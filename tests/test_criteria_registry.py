"""The criterion interface, the registry, and Torch-Pruning's importances as tp:* criteria."""
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import simprune
from simprune.criteria import Criterion, CriterionResult, available_criteria, get_criterion, register
from simprune.graph.groups import PruningGraph
from simprune.verify.compare import parse_specs
from tests.test_channel_choice import Chain

TP = ("tp:l1", "tp:l2", "tp:lamp", "tp:bnscale", "tp:fpgm", "tp:taylor")


def test_every_builtin_is_a_criterion_subclass_with_an_explicit_normalisation():
    assert {"l1", "l2", "fpgm", "random", "qsfm", "filter-similarity", "feature-stats", "hrank", *TP} <= \
        set(available_criteria())
    for name in available_criteria():
        crit = get_criterion(name)
        assert isinstance(crit, Criterion) and crit.name == name
        assert crit.normalization in ("none", "mean", "max", "rank")


def test_register_refuses_a_class_that_is_not_a_criterion():
    with pytest.raises(TypeError, match="must subclass"):
        register("not-a-criterion", "x")(object)


def test_a_broken_criterion_module_fails_as_itself_not_as_an_unknown_criterion(tmp_path):
    """Before: _load_builtin swallowed ImportError, so a broken family showed up as "unknown criterion"."""
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def fake(name, *a, **k):\n"
            "    if name.endswith('criteria.hrank') or (a and a[2] and 'hrank' in a[2]):\n"
            "        raise ImportError('planted')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = fake\n"
            "import simprune.criteria\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "planted" in out.stderr


def _zeroed(model: Chain, c: int) -> Chain:
    """Channel c of conv2's group: conv2 filter, BN gamma/beta and fc1 input columns all zero."""
    with torch.no_grad():
        model.conv2.weight[c] = 0
        model.bn2.weight[c] = 0
        model.bn2.bias[c] = 0
        model.fc1.weight[:, c] = 0
    return model


@pytest.mark.parametrize("name", [n for n in TP if n != "tp:fpgm"])
def test_torch_pruning_importances_put_an_all_zero_channel_first(name):
    model = _zeroed(Chain("pool").eval(), 3)
    calib = DataLoader(TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))), batch_size=16)
    result = get_criterion(name).score(PruningGraph(model, torch.zeros(1, 3, 8, 8)), calib)
    scores = result.scores["conv2"]
    assert scores.shape == (8,) and torch.isfinite(scores).all()
    assert int(torch.argmin(scores)) == 3
    if name == "tp:taylor":
        assert result.notes["taylor_targets"] == "labels"
        assert all(p.grad is None for p in model.parameters())  # the user's model keeps no gradients


def test_tp_fpgm_removes_the_channel_at_the_geometric_median_of_every_member():
    model = Chain("pool").eval()
    others = [c for c in range(8) if c != 4]
    with torch.no_grad():
        for w in (model.conv2.weight, model.bn2.weight, model.bn2.bias):
            w[4] = w[others].mean(0)
        model.fc1.weight[:, 4] = model.fc1.weight[:, others].mean(1)
    scores = get_criterion("tp:fpgm").score(PruningGraph(model, torch.zeros(1, 3, 8, 8))).scores["conv2"]
    assert int(torch.argmin(scores)) == 4


def test_taylor_without_labels_uses_the_model_predictions():
    model = Chain("pool").eval()
    calib = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    result = get_criterion("tp:taylor").score(PruningGraph(model, torch.zeros(1, 3, 8, 8)), calib)
    assert result.notes["taylor_targets"] == "model predictions"


@pytest.mark.parametrize("name", ["tp:lamp", "tp:taylor"])
def test_tp_criteria_prune_through_the_api_and_parse_in_compare(name):
    model = simprune.models.build_model("resnet20", in_channels=1).eval()
    calib = [(torch.randn(16, 1, 32, 32), torch.randint(0, 10, (16,)))]
    _, report = simprune.prune(model, torch.zeros(1, 1, 32, 32), name, {"flops": 0.4}, calibration=calib)
    assert abs(report["reduction"]["flops"] - 0.4) < 0.01 and report["criterion"] == name
    assert [(s.label, s.name, s.options) for s in parse_specs(f"{name},qsfm:cosine")] == \
        [(name, name, {}), ("qsfm:cosine", "qsfm", {"similarity": "cosine"})]


def test_a_criterion_defined_outside_the_package():
    @register("test:zeros-first", "test criterion")
    class ZerosFirst(Criterion):
        normalization = "none"

        def score(self, graph, calibration=None):
            return CriterionResult({g.root: torch.arange(g.size, dtype=torch.float32) for g in graph.groups},
                                   normalization=self.normalization)

    pruned, _ = simprune.prune(Chain("pool").eval(), torch.zeros(1, 3, 8, 8), "test:zeros-first", {"flops": 0.1},
                               ignore=["conv1", "fc1"])
    assert pruned.conv2.out_channels < 8
