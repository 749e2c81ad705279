"""Which channels go: constructed networks where the answer is known.

Every BatchNorm is made the affine map gamma * z + beta (running mean 0, variance 1 - eps), so a
channel can be planted exactly: a duplicate (filter and beta scaled by k: after ReLU the map is k
times another channel's), a dead channel (zero filter, negative beta: always 0), a filter at the
centroid of the others (FPGM's geometric median). Consumers: a conv (spatial maps), a Linear after
global pooling (pooled), a Linear after flatten, and a residual stream read by three layers.
"""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import simprune
from simprune.criteria import get_criterion
from simprune.graph.groups import PruningGraph

DATA = ("qsfm", "feature-stats", "hrank")


def _affine_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1 - bn.eps)
        bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
        bn.bias.fill_(0.1)


def _plant(conv: nn.Conv2d, bn: nn.BatchNorm2d, kind: str, a: int, b: int = 0, k: float = 2.5) -> None:
    """kind "dup": channel a = k x channel b after BN + ReLU; "dead": channel a always 0."""
    with torch.no_grad():
        if kind == "dup":
            conv.weight[a] = k * conv.weight[b]
            bn.weight[a] = bn.weight[b]
            bn.bias[a] = k * bn.bias[b]
        else:
            conv.weight[a] = 0.0
            bn.bias[a] = -1.0


class Chain(nn.Module):
    """conv1 -> conv2 -> head; head "pool" (Linear after global pooling) or "flatten" (Linear over 2x2 x C)."""

    def __init__(self, head: str = "pool", seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2)):
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / 3)
            _affine_bn(bn, gen)
        self.head = head
        self.pool = nn.AdaptiveAvgPool2d(1 if head == "pool" else 2)
        self.fc1 = nn.Linear(8 if head == "pool" else 32, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(self.pool(x).flatten(1))))


class Residual(nn.Module):
    """stem -> two residual blocks -> pooled Linear: one 8-channel stream read by block1.conv_a,
    block2.conv_a and the classifier, produced by the stem and both blocks' second convs."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(4))
        for conv, bn in zip([self.stem, *self.convs], [self.stem_bn, *self.bns]):
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / 3)
            _affine_bn(bn, gen)
        self.fc = nn.Linear(8, 4)

    def producers(self):
        return [(self.stem, self.stem_bn), (self.convs[1], self.bns[1]), (self.convs[3], self.bns[3])]

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        for i in (0, 2):
            inner = torch.relu(self.bns[i](self.convs[i](x)))
            x = torch.relu(self.bns[i + 1](self.convs[i + 1](inner)) + x)
        return self.fc(x.mean((2, 3)))


def _calibration(n: int = 64) -> DataLoader:
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=16)


def _scores(model: nn.Module, criterion: str, root: str, **options) -> torch.Tensor:
    crit = get_criterion(criterion, **(dict(options, progress=False) if criterion in DATA else options))
    graph = PruningGraph(model, torch.zeros(1, 3, 8, 8))
    return crit.score(graph, _calibration() if crit.needs_data else None).scores[root]


def _first(scores: torch.Tensor) -> int:
    return int(torch.argmin(scores))


@pytest.mark.parametrize("where", ["conv1", "conv2"])  # conv1: spatial reader; conv2: pooled reader
@pytest.mark.parametrize("criterion,expected", [("qsfm", {2, 5}), ("feature-stats", {2}),
                                                ("filter-similarity", {2, 5})])
def test_a_duplicated_channel_goes_first(where, criterion, expected):
    model = Chain("pool").eval()
    _plant(getattr(model, where), getattr(model, "bn" + where[-1]), "dup", 5, 2)
    # feature-stats: of a similar pair the lower M-std goes, and channel 5 is 2.5 x channel 2
    assert _first(_scores(model, criterion, where)) in expected


@pytest.mark.parametrize("where", ["conv1", "conv2"])
@pytest.mark.parametrize("criterion", ["qsfm", "feature-stats", "hrank", "filter-similarity", "l1", "l2"])
def test_a_dead_channel_goes_first(where, criterion):
    model = Chain("pool").eval()
    _plant(getattr(model, where), getattr(model, "bn" + where[-1]), "dead", 3)
    assert _first(_scores(model, criterion, where)) == 3


def test_fpgm_removes_the_filter_at_the_geometric_median():
    model = Chain("pool").eval()
    with torch.no_grad():
        others = [c for c in range(8) if c != 4]
        model.conv2.weight[4] = model.conv2.weight[others].mean(0)
    assert _first(_scores(model, "fpgm", "conv2")) == 4


def test_pooled_reader_scores_similarity_across_images_not_of_1x1_maps():
    """A 1x1 map min-max scales to 0, so before the fix every pair scored SSIM 1 and M-std 0."""
    model = Chain("pool").eval()
    _plant(model.conv2, model.bn2, "dup", 6, 4, k=2.0)
    scores = _scores(model, "qsfm", "conv2")
    assert _first(scores) in {4, 6} and len(set(scores.tolist())) > 2
    assert _first(_scores(model, "feature-stats", "conv2")) == 4


@pytest.mark.parametrize("mode", ["lstsq", "twin"])
def test_flatten_reader_duplicate_is_removed_and_folded_exactly(mode):
    model = Chain("flatten").eval()
    _plant(model.conv2, model.bn2, "dup", 6, 4, k=2.0)
    x = _calibration().dataset.tensors[0][:16]
    pruned, report = simprune.prune(model, torch.zeros(1, 3, 8, 8), "qsfm", {"flops": 0.005},
                                    calibration=_calibration(), ignore=["conv1", "fc1"], compensate=mode,
                                    recalibrate_bn=False, criterion_options={"progress": False,
                                                                            "calib_precision": "fp32"})
    assert pruned.conv2.out_channels == 7 and pruned.fc1.in_features == 28
    kept = [c for c in range(8) if any(torch.equal(model.conv2.weight[c], w) for w in pruned.conv2.weight)]
    assert set(range(8)) - set(kept) <= {4, 6}
    with torch.no_grad():
        assert torch.allclose(model(x), pruned(x), atol=1e-4)


@pytest.mark.parametrize("criterion,expected", [("qsfm", {1, 6}), ("feature-stats", {1}),
                                                ("filter-similarity", {1, 6})])
def test_residual_stream_duplicate_read_by_three_layers(criterion, expected):
    model = Residual().eval()
    for conv, bn in model.producers():
        _plant(conv, bn, "dup", 6, 1, k=2.0)
    assert _first(_scores(model, criterion, "stem")) in expected


@pytest.mark.parametrize("criterion", ["qsfm", "feature-stats", "hrank", "l1", "filter-similarity"])
def test_residual_stream_dead_channel_goes_first(criterion):
    model = Residual().eval()
    for conv, bn in model.producers():
        _plant(conv, bn, "dead", 3)
    assert _first(_scores(model, criterion, "stem")) == 3


def test_residual_duplicate_removed_from_every_producer_and_folded_into_every_reader():
    model = Residual().eval()
    for conv, bn in model.producers():
        _plant(conv, bn, "dup", 6, 1, k=2.0)
    x = _calibration().dataset.tensors[0][:16]
    pruned, _ = simprune.prune(model, torch.zeros(1, 3, 8, 8), "qsfm", {"flops": 0.005}, calibration=_calibration(),
                               ignore=["convs.0", "convs.2"], recalibrate_bn=False, compensate="lstsq",
                               criterion_options={"progress": False, "calib_precision": "fp32"})
    assert pruned.stem.out_channels == pruned.convs[1].out_channels == pruned.convs[3].out_channels == 7
    assert pruned.convs[0].in_channels == pruned.convs[2].in_channels == pruned.fc.in_features == 7
    with torch.no_grad():
        assert torch.allclose(model(x), pruned(x), atol=1e-4)
