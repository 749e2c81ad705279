"""Defects of the scores found in issue 13, each pinned by a test that failed before its fix."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import simprune
from simprune.allocation.allocator import normalize
from simprune.calibrate import batches as calibration_batches
from simprune.calibrate.calibration import calibration_loader, collect_statistics
from simprune.criteria import get_criterion
from simprune.graph.groups import PruningGraph
from simprune.io.files import load_model
from simprune.models import build_model
from simprune.repair.batchnorm import recalibrate_batchnorm
from tests.conftest import ZOO


def _loader(x: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch_size)


def test_resnet20_last_stage_is_not_cut_to_a_handful_by_the_pooled_probe():
    """The stage read by the classifier after global pooling: 64 -> 7 channels before the fix."""
    model, desc = load_model(ZOO / "resnet20-fashion-mnist")
    calib = calibration_loader("fashion-mnist-sample", 256, pad_to=32)
    _, report = simprune.prune(model, torch.zeros(1, *desc["input_shape"]), "qsfm", {"flops": 0.5},
                               calibration=calib, criterion_options={"progress": False})
    last = {g["root"]: g["channels_after"] for g in report["groups"]}["layer3.0.conv2"]
    assert last >= 16


# --- one-shot iterables --------------------------------------------------------------------------

def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


@pytest.mark.parametrize("criterion", ["qsfm", "l1"])
def test_a_generator_works_like_a_list(criterion):
    model = build_model("resnet20", in_channels=1).eval()
    batches = [(torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(i)), torch.zeros(16))
               for i in range(3)]
    opts = {"progress": False, "calib_precision": "fp32"} if criterion == "qsfm" else {}
    example = torch.zeros(1, 1, 32, 32)
    from_list, rep_list = simprune.prune(model, example, criterion, {"flops": 0.4}, calibration=batches,
                                         criterion_options=opts)
    from_gen, rep_gen = simprune.prune(model, example, criterion, {"flops": 0.4}, calibration=(b for b in batches),
                                       criterion_options=opts)
    assert rep_gen["groups"] == rep_list["groups"] and rep_gen["batchnorm_choice"] == rep_list["batchnorm_choice"]
    for k, v in _bn_state(from_list).items():
        assert torch.allclose(v, _bn_state(from_gen)[k], atol=1e-6), k


def test_iterative_schedule_reads_a_generator_at_every_step():
    model = build_model("resnet20", in_channels=1).eval()
    batches = [(torch.randn(8, 1, 32, 32), torch.zeros(8)) for _ in range(2)]
    _, report = simprune.prune(model, torch.zeros(1, 1, 32, 32), "qsfm", {"flops": 0.3}, calibration=iter(batches),
                               schedule="iterative", steps=2, criterion_options={"progress": False})
    assert abs(report["reduction"]["flops"] - 0.3) < 0.02


def test_bn_reestimation_that_sees_nothing_says_so_and_keeps_the_trained_statistics():
    model = build_model("resnet20", in_channels=1).eval()
    before = _bn_state(model)
    with pytest.raises(simprune.SimpruneError, match="saw no calibration images"):
        recalibrate_batchnorm(model, iter([]))
    for k, v in _bn_state(model).items():
        assert torch.equal(v, before[k]), k


def test_an_empty_calibration_is_refused_before_any_work():
    with pytest.raises(simprune.SimpruneError, match="calibration= holds no batches"):
        simprune.prune(build_model("resnet20", in_channels=1), torch.zeros(1, 1, 32, 32), "l1", {"flops": 0.3},
                       calibration=(b for b in []), recalibrate_bn=True)


def test_a_huge_one_shot_iterator_is_refused_naming_the_keyword(monkeypatch):
    monkeypatch.setattr(calibration_batches, "MAX_MATERIALISED_BYTES", 10_000)
    gen = ((torch.zeros(4, 1, 32, 32), torch.zeros(4)) for _ in range(5))
    with pytest.raises(simprune.SimpruneError, match=r"calibration= is a one-shot iterator"):
        simprune.prune(build_model("resnet20", in_channels=1), torch.zeros(1, 1, 32, 32), "l1", {"flops": 0.3},
                       calibration=gen)


def test_a_non_iterable_calibration_is_refused():
    with pytest.raises(simprune.SimpruneError, match="calibration= must be an iterable"):
        simprune.prune(build_model("resnet20", in_channels=1), torch.zeros(1, 1, 32, 32), "l1", {"flops": 0.3},
                       calibration=3)


# --- scores comparable across layers --------------------------------------------------------------

class TwoSizes(nn.Module):
    """Two groups of 32 independent channels (identity 1x1 convs over independent noise): one read at
    16x16, one at 2x2. Nothing is redundant in either, so neither should look more redundant."""

    def __init__(self):
        super().__init__()
        self.big, self.small = nn.Conv2d(32, 32, 1, bias=False), nn.Conv2d(32, 32, 1, bias=False)
        self.read_big, self.read_small = nn.Conv2d(32, 8, 1), nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.big.weight.copy_(torch.eye(32)[:, :, None, None])
            self.small.weight.copy_(torch.eye(32)[:, :, None, None])

    def forward(self, x):
        a = self.read_big(torch.relu(self.big(x))).mean((2, 3))
        b = self.read_small(torch.relu(self.small(nn.functional.adaptive_avg_pool2d(x, 2)))).mean((2, 3))
        return self.fc(a + b)


@pytest.mark.parametrize("criterion,images", [("qsfm", 16), ("feature-stats", 128)])
def test_unrelated_maps_score_alike_at_2x2_and_16x16(criterion, images):
    """Raw medians differed by 0.17 (qsfm, 16 images) and 0.09 (feature-stats' SFS, 128 images). The
    DFS part (M-std / group median) stays noisier on 2x2 maps with few images, hence 128 there."""
    model = TwoSizes().eval()
    graph = PruningGraph(model, torch.zeros(1, 32, 16, 16))
    result = get_criterion(criterion, progress=False).score(graph, _loader(torch.randn(images, 32, 16, 16)))
    medians = [float(normalize(result.scores[g], result.normalization).median()) for g in ("big", "small")]
    assert abs(medians[0] - medians[1]) < 0.05, medians


def test_unrelated_filters_score_alike_at_fan_in_27_and_4608():
    wide = nn.Sequential(nn.Conv2d(3, 512, 1), nn.ReLU(), nn.Conv2d(512, 64, 3, padding=1), nn.Flatten(),
                         nn.Linear(64 * 16, 2))
    narrow = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Flatten(), nn.Linear(64 * 16, 2))
    for conv in (wide[2], narrow[0]):  # fan-in 512 * 9 = 4608 and 3 * 9 = 27, independent Gaussian filters
        nn.init.normal_(conv.weight)
    crit = get_criterion("filter-similarity", chance_corrected=True)  # an option: see criteria/filter_similarity.py
    big = crit.score(PruningGraph(wide, torch.zeros(1, 3, 4, 4))).scores["2"]
    small = crit.score(PruningGraph(narrow, torch.zeros(1, 3, 4, 4))).scores["0"]
    assert abs(float(big.median()) - float(small.median())) < 0.05


# --- precision and affine ------------------------------------------------------------------------

def test_calib_precision_fp32_reads_fp32_maps_and_bf16_does_not():
    model = build_model("resnet20", in_channels=1).eval()
    graph = PruningGraph(model, torch.zeros(1, 1, 32, 32))
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        ref = torch.relu(model.bn1(model.conv1(x)))
    flat = ref.transpose(0, 1).reshape(16, -1).double()
    gram = {p: collect_statistics(model, graph, _loader(x), {"gram"}, precision=p, progress=False)["conv1"][0]
            for p in ("fp32", "bf16")}
    want = flat @ flat.T
    assert torch.allclose(gram["fp32"].stats.gram(), want, rtol=1e-5)
    assert not torch.allclose(gram["bf16"].stats.gram(), want, rtol=1e-4)


def test_calib_precision_keyword_and_its_refusals():
    model, example = build_model("resnet20", in_channels=1), torch.zeros(1, 1, 32, 32)
    calib = _loader(torch.randn(16, 1, 32, 32))
    _, report = simprune.prune(model, example, "qsfm", {"flops": 0.3}, calibration=calib, calib_precision="fp32",
                               criterion_options={"progress": False})
    assert report["reduction"]["flops"] >= 0.29
    with pytest.raises(simprune.SimpruneError, match="calib_precision must be one of fp32, bf16"):
        simprune.prune(model, example, "qsfm", {"flops": 0.3}, calibration=calib, calib_precision="fp16")
    with pytest.raises(simprune.SimpruneError, match="calib_precision applies to data criteria"):
        simprune.prune(model, example, "l1", {"flops": 0.3}, calib_precision="fp32")


class OffsetNet(nn.Module):
    """conv + BN (no ReLU) read by a Linear after flatten: channel 5 = 2 x channel 2 + 0.5 exactly."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 16, 6, bias=bias), nn.Linear(6, 2)
        with torch.no_grad():
            self.bn.running_mean.zero_()
            self.bn.running_var.fill_(1 - self.bn.eps)
            self.conv.weight[5] = 2 * self.conv.weight[2]
            self.bn.weight[5] = self.bn.weight[2]
            self.bn.bias[5] = 2 * self.bn.bias[2] + 0.5

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.bn(self.conv(x)).flatten(1))))


@pytest.mark.parametrize("mode", ["lstsq", "twin"])
def test_affine_compensation_is_honoured_in_both_modes(mode):
    model = OffsetNet().eval()
    x = torch.randn(32, 3, 4, 4)
    outs = {}
    for affine in (True, False):
        pruned, _ = simprune.prune(model, torch.zeros(1, 3, 4, 4), "qsfm", {"flops": 0.005}, calibration=_loader(x),
                                   ignore=["fc1"], compensate=mode, recalibrate_bn=False,
                                   criterion_options={"progress": False, "calib_precision": "fp32", "affine": affine})
        assert pruned.conv.out_channels == 7
        with torch.no_grad():
            outs[affine] = (model(x) - pruned(x)).abs().max().item()
    assert outs[True] < 1e-4 < outs[False]


def test_affine_compensation_without_a_bias_is_refused():
    with pytest.raises(simprune.SimpruneError, match="fc1 has none; drop affine=True"):
        simprune.prune(OffsetNet(bias=False).eval(), torch.zeros(1, 3, 4, 4), "qsfm", {"flops": 0.005},
                       calibration=_loader(torch.randn(32, 3, 4, 4)), ignore=["fc1"], recalibrate_bn=False,
                       compensate="lstsq",
                       criterion_options={"progress": False, "affine": True})
