"""Consumer-output refit and error-aware selection: hand-computed math, constructed networks where the
answer is known, and the sequential refit on a small ResNet."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import simprune
from simprune.calibrate.consumer_inputs import design_rows, refit_support
from simprune.criteria import get_criterion
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph
from simprune.graph.removal import remove_channels
from simprune.models import build_model
from simprune.repair.refit import RefitOptions, reconstruct, refit_targets
from simprune.repair.segments import find_chain, plan_segments, trace_calls
from simprune.stats.refit import greedy_removal, refit_error, removal_costs, ridge_refit
from tests.conftest import ZOO, require_fashion_mnist

G2 = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)  # Gram of two input columns
W2 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)  # one output: y = x0 + 2 x1


# ---- pure math, against values worked out by hand ------------------------------------------------

def test_ridge_refit_solves_the_normal_equations():
    cross = G2 @ torch.tensor([[1.0], [1.0]], dtype=torch.float64)  # the target is x0 + x1
    w = ridge_refit(G2, cross, torch.zeros(1, 2, dtype=torch.float64), ridge=0.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0]], dtype=torch.float64))


def test_removal_cost_is_the_schur_complement_by_hand():
    # G^-1 = [[3, -2], [-2, 4]] / 8. Removing x0 costs w0^2 / (G^-1)_00 = 1 / (3/8) = 8/3: the best refit
    # 8/3 x1 leaves x0 - 2/3 x1, of energy 4 - 4/3 * 2 + 4/9 * 3 = 8/3. Removing x1 costs 4 / (4/8) = 8.
    costs = removal_costs(torch.linalg.inv(G2), W2, torch.tensor([[0], [1]]))
    torch.testing.assert_close(costs, torch.tensor([8 / 3, 8.0], dtype=torch.float64))


def test_greedy_removal_order_and_relative_cost_by_hand():
    order, cumulative = greedy_removal([G2], [W2], [torch.tensor([[0], [1]])], 1, ridge=0.0)
    energy = 24.0  # w G w^T = 4 + 2 * 2 * 2 + 4 * 3
    assert order == [0]
    assert cumulative == pytest.approx([8 / 3 / energy])


def test_greedy_removal_follows_each_removal_and_sums_over_readers():
    # three columns, x2 = x0 + x1 exactly: x2 (or x0/x1) goes first at no cost; a second reader counts too
    x = torch.randn(500, 2, dtype=torch.float64)
    x = torch.cat([x, x.sum(1, keepdim=True)], 1)
    gram = x.T @ x
    w = torch.tensor([[1.0, -1.0, 3.0]], dtype=torch.float64)
    blocks = torch.tensor([[0], [1], [2]])
    order, cumulative = greedy_removal([gram], [w], [blocks], 2, ridge=1e-9)
    assert cumulative[0] == pytest.approx(0.0, abs=1e-6)
    last = ({0, 1, 2} - set(order)).pop()
    # the error of keeping one column alone, relative to the output energy, checked by least squares
    y = x @ w.T
    coef = torch.linalg.lstsq(x[:, [last]], y).solution
    direct = float(((y - x[:, [last]] @ coef) ** 2).sum() / (y ** 2).sum())
    assert cumulative[1] == pytest.approx(direct, rel=1e-5)
    two, _ = greedy_removal([gram, gram], [w, 2 * w], [blocks, blocks], 2, ridge=1e-9)
    assert sorted(two) == sorted(order)  # a second, scaled reader: same relative costs, same choice


def test_refit_error_from_sums_equals_the_direct_error():
    x, w_true, w = torch.randn(300, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), \
        torch.randn(3, 4, dtype=torch.float64)
    y = x @ w_true.T + 0.1 * torch.randn(300, 3, dtype=torch.float64)
    err = refit_error(x.T @ x, x.T @ y, float((y ** 2).sum()), w)
    assert err == pytest.approx(float(((y - x @ w.T) ** 2).sum()), rel=1e-9)


def test_ridge_refit_never_does_worse_than_the_weights_it_starts_from():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(40, 12, generator=g, dtype=torch.float64)
        y = torch.randn(40, 5, generator=g, dtype=torch.float64)
        w0 = torch.randn(5, 12, generator=g, dtype=torch.float64)
        args = (x.T @ x, x.T @ y, float((y ** 2).sum()))
        for ridge in (0.0, 1e-4, 1.0, 100.0):
            assert refit_error(*args, ridge_refit(args[0], args[1], w0, ridge)) <= refit_error(*args, w0) + 1e-9


# ---- a layer's input as rows -----------------------------------------------------------------------

@pytest.mark.parametrize("conv", [nn.Conv2d(5, 3, 3, 2, 1), nn.Conv2d(5, 3, 3, 1, 2, dilation=2),
                                  nn.Conv2d(5, 3, (3, 1), 1, (1, 0), padding_mode="reflect"),
                                  nn.Conv2d(5, 3, 1)])
def test_design_rows_times_the_weights_is_the_layer_output(conv):
    x = torch.randn(3, 5, 9, 9)
    y = conv(x).detach()
    pairs = list(design_rows(conv, x, y - conv.bias.detach()[:, None, None]))
    rows, target = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    torch.testing.assert_close(rows @ conv.weight.detach().reshape(3, -1).T, target, rtol=1e-4, atol=1e-4)
    if conv.padding_mode == "zeros":
        ref = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        torch.testing.assert_close(rows, ref.transpose(1, 2).reshape(-1, ref.shape[1]))
    sub = list(design_rows(conv, x, y, max_positions=5, seed=0))
    rows, target = torch.cat([p[0] for p in sub]), torch.cat([p[1] for p in sub])
    assert rows.shape[0] == 3 * min(5, y[0, 0].numel())  # a few positions per image, targets alongside
    torch.testing.assert_close(rows @ conv.weight.detach().reshape(3, -1).T + conv.bias.detach(), target,
                               rtol=1e-4, atol=1e-4)


def test_grouped_convolutions_are_skipped_with_a_reason():
    assert "grouped" in refit_support(nn.Conv2d(4, 4, 3, groups=2))
    assert refit_support(nn.Conv2d(4, 4, 3)) is None and refit_support(nn.Linear(3, 2)) is None
    assert "Conv1d" in refit_support(nn.Conv1d(4, 4, 3))


# ---- constructed networks where the answer is known ------------------------------------------------

class Tiny(nn.Module):
    """conv1 (4 channels) -> BN -> conv2 -> BN -> ReLU -> pool -> fc. No nonlinearity between conv1 and conv2,
    so a channel built as a combination of others stays one where conv2 reads it."""

    def __init__(self, k2: int = 3, bias2: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, k2, padding=k2 // 2, bias=bias2)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)
        for bn in (self.bn1, self.bn2):
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
        self.bn2.running_mean.uniform_(-1, 1)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 2, 8, 8, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(n)]


def _prune_and_refit(model, channel, **options):
    reference = copy.deepcopy(model).eval()
    graph = PruningGraph(model.eval(), torch.zeros(1, 2, 8, 8))
    remove = {"conv1": [channel]}
    options = RefitOptions(**{"scope": "readers", **options})
    targets = refit_targets(graph, remove, options.scope)
    remove_channels(graph, remove)
    summary = reconstruct(reference, model, targets, _batches(), options)
    return reference, model, summary


def _combination_net(**kw):
    torch.manual_seed(0)
    model = Tiny(**kw)
    with torch.no_grad():  # channel 3 = 0.5 * channel 0 - 2 * channel 1, exactly, after BN too (no offsets)
        model.conv1.weight[3] = 0.5 * model.conv1.weight[0] - 2 * model.conv1.weight[1]
        model.conv1.bias[3] = 0.5 * model.conv1.bias[0] - 2 * model.conv1.bias[1]
        model.bn1.running_var[3] = 1.0 - model.bn1.eps
        model.bn1.weight[:] = 1.0
        model.bn1.running_var[:] = 1.0 - model.bn1.eps
    return model


def test_a_channel_that_is_a_combination_of_others_is_rebuilt_exactly():
    reference, model, summary = _prune_and_refit(_combination_net(), 3, ridge=1e-9, max_positions=None)
    x = torch.randn(8, 2, 8, 8)  # new images: the relation holds everywhere, not only on the calibration set
    with torch.no_grad():
        torch.testing.assert_close(model.conv2(model.bn1(model.conv1(x))),
                                   reference.conv2(reference.bn1(reference.conv1(x))), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    assert summary["layers"] == 1 and summary["relative_error"]["after"] < 1e-6  # float32 products: rounding only
    assert summary["relative_error"]["before"] > 0.01  # without the refit the channel's share is simply lost


def test_an_intercept_is_folded_into_the_batchnorm_of_a_bias_free_layer():
    torch.manual_seed(0)
    model = Tiny(k2=1, bias2=False)
    with torch.no_grad():  # channel 3 is a constant: only an intercept can stand in for it
        model.conv1.weight[3] = 0.0
        model.conv1.bias[3] = 1.5
    mean_before = model.bn2.running_mean.clone()
    reference, model, summary = _prune_and_refit(model, 3, ridge=1e-9)
    assert not torch.equal(model.bn2.running_mean, mean_before)
    x = torch.randn(8, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_refit_never_increases_a_layers_calibration_error():
    torch.manual_seed(1)
    for channel in range(4):
        reference, model, summary = _prune_and_refit(Tiny(), channel)
        err = summary["relative_error"]["per_layer"]["conv2"]
        assert err["after"] <= err["before"]
        direct = sum(float(((model.conv2(model.bn1(model.conv1(x))) -
                             reference.conv2(reference.bn1(reference.conv1(x)))) ** 2).sum())
                     for x, _ in _batches())
        unrefit = copy.deepcopy(reference)
        graph = PruningGraph(unrefit, torch.zeros(1, 2, 8, 8))
        remove_channels(graph, {"conv1": [channel]})
        plain = sum(float(((unrefit.conv2(unrefit.bn1(unrefit.conv1(x))) -
                            reference.conv2(reference.bn1(reference.conv1(x)))) ** 2).sum())
                    for x, _ in _batches())
        assert direct <= plain + 1e-6


def test_refit_error_removes_the_redundant_channel_first():
    model = _combination_net()
    graph = PruningGraph(model.eval(), torch.zeros(1, 2, 8, 8))
    scores = get_criterion("refit-error", precision="fp32", ridge=1e-9).score(graph, _batches()).scores["conv1"]
    first = int(torch.argmin(scores))
    assert first in (0, 1, 3) and float(scores[first]) < 1e-5  # any of the three rebuilds from the other two
    assert float(scores[2]) > 1e-3  # channel 2 is independent: losing it costs
    with torch.no_grad():
        model.conv1.weight[2] = 0.0  # a dead channel: it alone is free, and goes first
        model.conv1.bias[2] = 0.0
        model.conv1.weight[3] = torch.randn_like(model.conv1.weight[3])
    graph = PruningGraph(model, torch.zeros(1, 2, 8, 8))
    scores = get_criterion("refit-error", precision="fp32", ridge=1e-9).score(graph, _batches()).scores["conv1"]
    assert int(torch.argmin(scores)) == 2 and float(scores[2]) < 1e-6


# ---- the sequential refit on ResNets ----------------------------------------------------------------

def test_the_chain_runs_block_by_block_through_the_flatten_into_the_classifier():
    model = build_model("resnet20", num_classes=10).eval()
    calls = trace_calls(model, torch.randn(2, 3, 32, 32))
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    chain = [c.name for c in find_chain(calls, layers)]
    assert chain == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["pool", "fc"]
    plan = plan_segments(model, torch.randn(2, 3, 32, 32), layers, 1 << 30, images=64)
    assert [s.module for s in plan.segments][:1] == [None]  # the stem conv reads the images: a model pass
    assert plan.segments[-1].module == "fc" and plan.segments[-1].flatten
    assert plan.bn_after["layer1.0.conv2"] == "layer1.0.bn2"
    residual = {s.module: s.residual for s in plan.segments}  # what each block adds to its last BN's output
    assert residual["layer1.1"] == "" and residual["layer2.0"] == "layer2.0.shortcut" and residual["fc"] is None
    small = plan_segments(model, torch.randn(2, 3, 32, 32), layers, 1, images=64)  # no room to store inputs
    assert all(s.module is None for s in small.segments) and len(small.segments) == len(layers)


def _random_resnet20():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _images(n_batches=3, size=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g),) for _ in range(n_batches)]


def test_block_by_block_and_whole_model_passes_give_the_same_refit():
    results = []
    for frontier in (1024, 0):
        model = _random_resnet20()
        reference = copy.deepcopy(model)
        graph = PruningGraph(model, torch.zeros(1, 3, 32, 32))
        remove = {g.root: list(range(0, g.size, 3)) for g in graph.groups if g.compensable}
        targets = refit_targets(graph, remove)
        remove_channels(graph, remove)
        summary = reconstruct(reference, model, targets, _images(),
                              RefitOptions(max_frontier_mib=frontier, max_positions=64, residual=False))
        results.append((model, summary))
    (chain_model, chain), (pass_model, passes) = results
    assert chain["blocks"] > 0 and passes["blocks"] == 0 and chain["layers"] == passes["layers"] > 0
    for (name, a), b in zip(chain_model.state_dict().items(), pass_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def _output_error(scope_options, reference, images):
    model = copy.deepcopy(reference)
    pruned, report = simprune.prune(model, torch.zeros(1, 3, 32, 32), "l1", {"flops": 0.5}, calibration=images,
                                    recalibrate_bn=False, reconstruct_options=scope_options)
    test = torch.cat([x for (x,) in _images(2, 32, seed=4)])  # held-out images
    with torch.no_grad():
        return float(((pruned(test) - reference(test)) ** 2).mean()), report


def test_sequential_refit_beats_refitting_every_layer_on_the_unrepaired_network():
    reference, images = _random_resnet20(), _images()
    sequential, report = _output_error({"sequential": True}, reference, images)
    at_once, _ = _output_error({"sequential": False}, reference, images)
    plain = copy.deepcopy(reference)
    pruned, _ = simprune.prune(plain, torch.zeros(1, 3, 32, 32), "l1", {"flops": 0.5}, reconstruct=False)
    test = torch.cat([x for (x,) in _images(2, 32, seed=4)])
    with torch.no_grad():
        unrepaired = float(((pruned(test) - reference(test)) ** 2).mean())
    assert report["reconstructed"]["layers"] > 0 and report["compensated"] is False
    assert sequential < at_once and sequential < 0.2 * unrepaired, (sequential, at_once, unrepaired)


def test_iterators_are_kept_and_missing_data_refused_in_one_line():
    model = _random_resnet20()  # simprune.prune keeps a one-shot iterator (it is read several times)
    _, report = simprune.prune(model, torch.zeros(1, 3, 32, 32), "l1", {"flops": 0.3}, calibration=iter(_images()),
                               recalibrate_bn=False)
    assert report["reconstructed"]
    with pytest.raises(SimpruneError, match="reconstruct=False"):
        simprune.prune(model, torch.zeros(1, 3, 32, 32), "l1", {"flops": 0.3}, reconstruct=True)
    with pytest.raises(SimpruneError, match="reconstruct_options"):
        simprune.prune(model, torch.zeros(1, 3, 32, 32), "l1", {"flops": 0.3}, calibration=_images(),
                       reconstruct_options={"ridges": 1})


@pytest.mark.slow
def test_torchrun_ranks_refit_the_same_weights_as_one_process(tmp_path):
    require_fashion_mnist()
    common = ["prune", "--checkpoint", str(ZOO / "resnet20-fashion-mnist"), "--criterion", "refit-error",
              "--calib-data", "fashion-mnist", "--calib-images", "128", "--target-flops", "0.4", "--no-latency"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([str(Path(sys.executable).parent / "simprune"), *common, "--out", str(one)], check=True, env=env,
                   capture_output=True)
    res = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--master_port=29531",
                          "-m", "simprune.cli", *common, "--out", str(two)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert set(r2["decision_fingerprint_per_rank"]) == {r1["decision_fingerprint"]}  # same channels everywhere
    per_rank = r2["reconstructed"]["weights_fingerprint_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]  # the same refit weights on every rank
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    refit = [f"{n}.weight" for n in r1["reconstructed"]["relative_error"]["per_layer"]]
    for name in refit:  # statistics summed over the two halves equal those of all images at once (up to rounding)
        assert float((w2[name] - w1[name]).norm() / w1[name].norm()) < 1e-3, name


class Flat(nn.Module):
    """A conv read through a flatten by a linear layer: each channel is four columns of fc1's input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16, 6)
        self.fc2 = nn.Linear(6, 3)
        with torch.no_grad():  # channel 3 duplicates channel 0
            self.conv.weight[3], self.conv.bias[3] = self.conv.weight[0], self.conv.bias[0]

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.conv(x).flatten(1))))


def test_a_flatten_consumer_rebuilds_a_duplicate_channel_and_scores_it_free():
    torch.manual_seed(0)
    model = Flat().eval()
    batches = [(torch.randn(32, 2, 4, 4),) for _ in range(3)]
    graph = PruningGraph(model, torch.zeros(1, 2, 4, 4))
    scores = get_criterion("refit-error", precision="fp32", ridge=1e-9).score(graph, batches).scores["conv"]
    assert int(torch.argmin(scores)) in (0, 3) and float(scores.min()) < 1e-6 and float(scores[1]) > 1e-3
    reference = copy.deepcopy(model)
    targets = refit_targets(graph, {"conv": [3]}, "readers")
    remove_channels(graph, {"conv": [3]})
    assert model.fc1.in_features == 12
    reconstruct(reference, model, targets, batches, RefitOptions(ridge=1e-9, scope="readers"))
    x = torch.randn(8, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mobilenetv2", pytest.param("vgg16", marks=pytest.mark.slow)])
def test_refit_runs_on_depthwise_and_plain_chains_and_lowers_the_output_error(name):
    torch.manual_seed(0)
    reference = build_model(name, num_classes=10).eval()
    images = [(torch.randn(8, 3, 32, 32),) for _ in range(2)]
    test = torch.randn(8, 3, 32, 32)
    errors = {}
    for refit in (False, True):
        pruned, report = simprune.prune(reference, torch.zeros(1, 3, 32, 32), "l1", {"flops": 0.3},
                                        calibration=images, reconstruct=refit, recalibrate_bn=False)
        with torch.no_grad():
            errors[refit] = float(((pruned(test) - reference(test)) ** 2).mean())
    refit_info = report["reconstructed"]
    assert refit_info["layers"] > 0 and refit_info["blocks"] > 0
    assert errors[True] < errors[False]


def test_in_place_operations_do_not_link_blocks():
    # torchvision's BasicBlock runs ReLU(inplace=True) between bn1 and conv2 and `out += identity` after bn2:
    # the same tensor object, changed in between, must not chain bn1 -> conv2
    model = build_model("torchvision:resnet18", num_classes=10).eval()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    plan = plan_segments(model, torch.randn(1, 3, 64, 64), layers, 1 << 30, images=64)
    blocks = [s.module for s in plan.segments if s.module]
    assert "layer1.0" in blocks and not any(b.startswith("layer1.0.") for b in blocks)
    residual = {s.module: s.residual for s in plan.segments}
    assert residual["layer1.0"] == ""  # relu(bn2 + block input), verified on the traced values


@pytest.mark.slow
def test_prune_cli_refits_by_default_with_calibration_data_and_says_so(cli, tmp_path):
    common = ["prune", "--checkpoint", ZOO / "resnet20-fashion-mnist", "--criterion", "l1", "--calib-data",
              "fashion-mnist-sample", "--calib-images", "64", "--target-flops", "0.3", "--no-latency"]
    code, _, err = cli(*common, "--out", tmp_path / "refit")
    assert code == 0, err
    report = json.loads((tmp_path / "refit" / "report.json").read_text())
    assert report["reconstructed"]["layers"] > 0 and report["compensated"] is False
    assert report["batchnorm_choice"]["kept"] in ("stored", "re-estimated")  # BatchNorm: the closer statistics
    assert "layers refit in network order" in (tmp_path / "refit" / "report.md").read_text()
    code, _, err = cli(*common, "--no-reconstruct", "--out", tmp_path / "plain")
    assert code == 0, err
    assert json.loads((tmp_path / "plain" / "report.json").read_text())["reconstructed"] is False
    code, _, err = cli(*common, "--schedule", "soft", "--reconstruct", "--finetune-epochs", "1", "--data",
                       "fashion-mnist-sample", "--out", tmp_path / "soft")
    assert code == 2 and "--schedule soft trains instead" in err and not (tmp_path / "soft").exists()


def _expanding_block() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 32, 1), nn.ReLU(), nn.Conv2d(32, 4, 1))  # an inner map 8x the block's


def test_a_memory_limit_cuts_the_chain_at_blocks_whose_outputs_fit_not_at_their_expanded_inner_maps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(*[_expanding_block() for _ in range(3)])).eval()  # "0" wraps everything
    x = torch.randn(1, 4, 8, 8)
    calls = trace_calls(model, x)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    fine = [c.name for c in find_chain(calls, layers)]
    assert "0.0.0" in fine and "0.0.1" in fine  # unlimited: the finest cut, through the 32-channel maps
    block_bytes = 4 * 8 * 8 * 4
    assert [c.name for c in find_chain(calls, layers, block_bytes)] == ["0.0", "0.1", "0.2"]
    plan = plan_segments(model, x, layers, 2 * block_bytes * 10, 10)  # room for the blocks' maps only
    assert [s.module for s in plan.segments] == ["0.0", "0.1", "0.2"] and plan.frontier_bytes_per_image == block_bytes


def test_a_block_is_residual_only_when_its_sum_is_verified_relative_to_its_values():
    from simprune.repair.segments import adds_up
    v = torch.tensor([1e-6, -2e-6])
    assert adds_up(v, torch.tensor([3e-6, 1e-6]), v + torch.tensor([3e-6, 1e-6]))  # tiny, but it does add up
    assert not adds_up(v, torch.tensor([3e-6, 1e-6]), v)  # off by 3x its values: no, however small they are
    assert adds_up(v, torch.tensor([3e-6, -1e-6]), torch.relu(v + torch.tensor([3e-6, -1e-6])))
    assert not adds_up(v, torch.tensor([1e-12, 0.0]), v)  # an addend of nothing is no shortcut
    assert not adds_up(torch.zeros(2), torch.zeros(2), torch.zeros(2))
