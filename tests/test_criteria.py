"""Data-driven criteria through the engine: compensation, shared decisions, calibration pipeline."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import simprune
from simprune.allocation.allocator import Guards
from simprune.calibrate.calibration import collect_statistics, probe_members
from simprune.graph.groups import PruningGraph
from simprune.models import build_model
from simprune.stats.channel_stats import ChannelStats


def _batches(n=48, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 32, 32, generator=g)
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=16)


def _duplicate_channel(model, src=2, dst=5, factor=2.5):
    """Make layer1.0's inner channel ``dst`` exactly ``factor`` x channel ``src`` after BN + ReLU."""
    block = model.layer1[0]
    with torch.no_grad():
        block.conv1.weight[dst] = factor * block.conv1.weight[src]
        bn = block.bn1
        bn.running_mean.zero_()
        bn.running_var.fill_(1 - bn.eps)  # BN becomes gamma * z + beta
        bn.weight[dst] = bn.weight[src]
        bn.bias[dst] = factor * bn.bias[src]


@pytest.mark.parametrize("similarity,mode", [("ssim", "twin"), ("cosine", "twin"), ("psnr", "twin"),
                                             ("ssim", "lstsq")])
def test_twin_removal_with_compensation_is_exact(similarity, mode):
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1).eval()
    _duplicate_channel(model)
    x = next(iter(_batches()))[0]
    example = torch.zeros(1, 1, 32, 32)
    opts = {"similarity": similarity, "progress": False, "calib_precision": "fp32"}
    pruned, report = simprune.prune(model, example, "qsfm", {"flops": 0.005}, calibration=_batches(),
                                    criterion_options=opts, compensate=mode, recalibrate_bn=False,
                                    guards=Guards(round_to=1))  # as ranked: exactly one channel
    assert report["compensated"] == mode
    assert pruned.layer1[0].conv1.out_channels == 15  # exactly the duplicate went
    removed = [g for g in report["groups"] if g["channels_after"] < g["channels_before"]]
    assert len(removed) == 1
    with torch.no_grad():
        assert torch.allclose(model(x), pruned(x), atol=1e-5)
    plain, _ = simprune.prune(model, example, "qsfm", {"flops": 0.005}, calibration=_batches(),
                              criterion_options=opts, compensate=False, recalibrate_bn=False, guards=Guards(round_to=1))
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x), atol=1e-3)  # without the fold the output moves


def test_lstsq_coefficients_by_hand():
    from simprune.repair.fold import lstsq_coefficients

    # x2 = 2 x0 + 3 x1 exactly: Gram of three channels over four pixels
    x = torch.tensor([[1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 1.0, 3.0]], dtype=torch.float64)
    x = torch.cat([x, 2 * x[:1] + 3 * x[1:]])
    A = lstsq_coefficients(x @ x.T, removed=[2], kept=[0, 1], ridge=0.0)
    assert torch.allclose(A, torch.tensor([[2.0, 3.0]], dtype=torch.float64))


def test_uncompensable_groups_are_protected_when_compensating():
    model = build_model("resnet20", in_channels=1).eval()
    graph = PruningGraph(model, torch.zeros(1, 1, 32, 32))
    assert not graph.group("conv1").compensable and not graph.group("layer2.0.conv2").compensable
    assert graph.group("layer3.0.conv2").compensable and graph.group("layer1.0.conv1").compensable
    pruned, report = simprune.prune(model, torch.zeros(1, 1, 32, 32), "qsfm", {"flops": 0.4},
                                    calibration=_batches(), criterion_options={"progress": False})
    assert set(report["protected_groups"]) == {"conv1", "layer2.0.conv2"}
    assert pruned.conv1.out_channels == 16 and pruned.layer2[0].conv2.out_channels == 32
    assert report["bn_recalibrated"] == (report["batchnorm_choice"]["kept"] == "re-estimated")  # after the refit


def test_batchnorm_recalibration_matches_the_calibration_statistics():
    from simprune.repair.batchnorm import recalibrate_batchnorm

    model = build_model("resnet20", in_channels=1).eval()
    x = next(iter(_batches(16)))[0]
    recalibrate_batchnorm(model, [(x, None)])
    expected = model.conv1(x).transpose(0, 1).reshape(16, -1)
    assert torch.allclose(model.bn1.running_mean, expected.mean(1), atol=1e-5)
    assert torch.allclose(model.bn1.running_var, expected.var(1, correction=1), rtol=1e-4)
    assert model.bn1.momentum == 0.1 and not model.training


def test_residual_groups_have_one_probe_per_consumer_and_one_decision():
    model = build_model("resnet20", in_channels=1).eval()
    graph = PruningGraph(model, torch.zeros(1, 1, 32, 32))
    stage1 = graph.group("conv1")
    names = sorted(m.name for m in probe_members(stage1))
    assert names == ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1"]
    pruned, _ = simprune.prune(model, torch.zeros(1, 1, 32, 32), "qsfm", {"flops": 0.5}, calibration=_batches(),
                               criterion_options={"progress": False}, protect_uncompensable=False)
    widths = {b.conv2.out_channels for b in pruned.layer1} | {pruned.conv1.out_channels}
    assert len(widths) == 1  # every producer of the residual stage keeps the same channels


def test_depthwise_separable_blocks_share_one_decision():
    model = build_model("mobilenetv2", in_channels=1).eval()
    pruned, _ = simprune.prune(model, torch.zeros(1, 1, 32, 32), "feature-stats", {"flops": 0.4},
                               calibration=_batches(24), criterion_options={"progress": False})
    for block in pruned.features[1:-1]:
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        if len(convs) == 3:
            expand, dw, project = convs
            assert expand.out_channels == dw.in_channels == dw.out_channels == dw.groups == project.in_channels


def test_statistics_pass_equals_all_at_once():
    model = build_model("resnet20", in_channels=1).eval()
    graph = PruningGraph(model, torch.zeros(1, 1, 32, 32))
    batched = collect_statistics(model, graph, _batches(48), {"ssim", "mstd"}, precision="fp32", progress=False)
    whole = collect_statistics(model, graph, DataLoader(_batches(48).dataset, batch_size=48), {"ssim", "mstd"},
                               precision="fp32", progress=False)
    for root, probes in batched.items():
        for a, b in zip(probes, whole[root]):
            assert a.stats.images == 48
            # float32 sums within a batch, float64 across: batching moves only the last float32 digits
            assert torch.allclose(a.stats.similarity("ssim"), b.stats.similarity("ssim"), atol=1e-6)
            assert torch.allclose(a.stats.mstd(), b.stats.mstd(), rtol=1e-6)
            assert isinstance(a.stats, ChannelStats)


@pytest.mark.parametrize("criterion,options", [
    ("qsfm", {"similarity": "ssim-windowed"}), ("hrank", {}), ("feature-stats", {}),
    ("filter-similarity", {"similarity": "pearson"}), ("filter-similarity", {"similarity": "euclidean"}),
])
def test_every_criterion_meets_the_target(criterion, options):
    model = build_model("resnet20", in_channels=1).eval()
    needs = criterion != "filter-similarity"
    opts = dict(options, **({"progress": False} if needs else {}))
    _, report = simprune.prune(model, torch.zeros(1, 1, 32, 32), criterion, {"flops": 0.5},
                               calibration=_batches(16) if needs else None, criterion_options=opts)
    assert abs(report["reduction"]["flops"] - 0.5) <= 0.01


def test_data_criterion_without_data_is_refused():
    with pytest.raises(simprune.SimpruneError, match="needs calibration data"):
        simprune.prune(build_model("resnet20"), torch.zeros(1, 3, 32, 32), "qsfm", {"flops": 0.5})


def test_affine_lstsq_coefficients_by_hand():
    from simprune.repair.fold import affine_lstsq_coefficients

    # x2 = 2 x0 - x1 + 0.5 exactly, over five pixels
    x = torch.tensor([[1.0, 0.0, 2.0, 1.0, 3.0], [0.0, 1.0, 1.0, 3.0, -1.0]], dtype=torch.float64)
    x = torch.cat([x, 2 * x[:1] - x[1:] + 0.5])
    A, b = affine_lstsq_coefficients(x @ x.T, x.sum(1), 5, removed=[2], kept=[0, 1], ridge=0.0)
    assert torch.allclose(A, torch.tensor([[2.0, -1.0]], dtype=torch.float64)) and b.item() == pytest.approx(0.5)


class _TwoReaders(nn.Module):
    """conv0's output is read by conv_a and conv_b (as a ResNet stage's first conv and its downsample),
    and conv_c reads a different tensor carrying the same channels."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv_a, self.conv_b = nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.conv_c = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv0(x))
        return self.conv_a(y) + self.conv_b(y) + self.conv_c(y * 2.0)


def test_consumers_reading_the_same_tensor_share_one_statistics_pass():
    torch.manual_seed(0)
    model = _TwoReaders().eval()
    graph = PruningGraph(model, torch.zeros(1, 1, 32, 32))
    probes = collect_statistics(model, graph, _batches(24), {"ssim", "null", "gram"}, precision="fp32",
                                progress=False)["conv0"]
    by_name = {p.member.name: p for p in probes}
    a, b, c = by_name["conv_a"], by_name["conv_b"], by_name["conv_c"]
    assert {a.stats is b.stats, a.stats is c.stats} == {True, False}  # a and b share; c reads its own
    assert a.reads_as is None and b.reads_as is a and c.reads_as is None  # conv_a runs first
    assert a.stats.images == c.stats.images == 24
    own = ChannelStats(6, {"ssim", "null", "gram"})
    with torch.no_grad():
        for x, _ in _batches(24):
            own.update(torch.relu(model.conv0(x)))
    assert torch.equal(a.stats.similarity("ssim"), own.similarity("ssim"))
    assert torch.allclose(c.stats.gram(), 4.0 * own.gram())
