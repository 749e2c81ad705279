"""Degenerate data: constant images, all-zero feature maps, tiny calibration sets, missing classes,
wrong channels or sizes. Each ends in a clear error or a defined, finite result; never a NaN."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import simprune
from simprune.calibrate.calibration import collect_statistics
from simprune.criteria import get_criterion
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph
from simprune.io.data import DatasetInfo, ImageTensorDataset, load_dataset
from simprune.repair.batchnorm import recalibrate_batchnorm
from simprune.stats.channel_stats import METRICS, ChannelStats
from simprune.stats.similarity import SIMILARITIES, map_rank, spatial_std
from simprune.train.loop import evaluate

DATA_CRITERIA = [("qsfm", {"similarity": s}) for s in SIMILARITIES] + [("feature-stats", {}), ("hrank", {})]


def _maps(kind: str) -> torch.Tensor:
    """(2 images, 4 channels, 5x5): channel 0 varies, 1 and 2 are the degenerate kind, 3 is all zero."""
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2, 4, 5, 5, generator=g)
    m[:, 3] = 0.0
    if kind == "zero":
        m[:, 1:3] = 0.0
    elif kind == "constant":
        m[:, 1], m[:, 2] = 5.0, -2.0
    elif kind == "one-pixel":
        m = m[:, :, :1, :1].clone()
    elif kind == "huge":
        m[:, 1:3] = 1e30
    return m


@pytest.mark.parametrize("kind", ["zero", "constant", "one-pixel", "huge"])
@pytest.mark.parametrize("metric", sorted(SIMILARITIES))
def test_similarities_are_finite_symmetric_and_bounded_on_degenerate_maps(metric, kind):
    s = SIMILARITIES[metric](_maps(kind))
    assert s.shape == (2, 4, 4) and torch.isfinite(s).all()
    assert torch.allclose(s, s.transpose(1, 2))
    hi = 100.0 if metric == "psnr" else 1.0
    assert torch.all(s.diagonal(dim1=1, dim2=2) == hi)
    assert s.max() <= hi and (metric == "psnr" or s.min() >= -1.0)


def test_defined_values_for_zero_variance_maps():
    m = _maps("constant")  # channels 1, 2 constant (5, -2), 3 all zero
    # min-max scaling maps every constant map to zero, so constant maps are identical to each other
    for metric in ("ssim", "ssim-windowed"):
        assert SIMILARITIES[metric](m)[0, 1, 2].item() == 1.0 and SIMILARITIES[metric](m)[0, 1, 3].item() == 1.0
    assert SIMILARITIES["psnr"](m)[0, 1, 2].item() == 100.0
    cos = SIMILARITIES["cosine"](m)  # raw maps: a constant pair is parallel (5 vs -2: opposite), zero is 0
    assert cos[0, 1, 2].item() == pytest.approx(-1.0) and cos[0, 1, 3].item() == 0.0
    assert torch.equal(spatial_std(m)[:, 1:], torch.zeros(2, 3, dtype=torch.float64))
    assert map_rank(m)[0].tolist()[1:] == [1.0, 1.0, 0.0]


def test_statistics_of_one_image_one_channel_one_pixel():
    stats = ChannelStats(1, set(METRICS))
    stats.update(torch.zeros(1, 1, 1, 1))
    for metric in SIMILARITIES:
        assert torch.isfinite(stats.similarity(metric)).all()
    assert stats.mstd().tolist() == [0.0] and stats.mean_rank().tolist() == [0.0]


class DeadNet(nn.Sequential):
    """conv-bn-relu x2 + classifier; conv1 channels 0..2 have zero weights, so their maps are all zero."""

    def __init__(self):
        super().__init__(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        with torch.no_grad():
            self[0].weight[:3] = 0.0


def _loader(x: torch.Tensor, batch_size: int = 128) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch_size)


@pytest.mark.parametrize("criterion,options", DATA_CRITERIA, ids=[f"{c}-{o.get('similarity', '')}"
                                                                    for c, o in DATA_CRITERIA])
def test_all_zero_feature_maps_score_finite_and_go_first(criterion, options):
    torch.manual_seed(0)
    model = DeadNet().eval()
    calib = _loader(torch.randn(6, 1, 8, 8))
    graph = PruningGraph(copy.deepcopy(model), torch.zeros(1, 1, 8, 8))
    result = get_criterion(criterion, progress=False, **options).score(graph, calib)
    scores = result.scores["0"]
    assert all(torch.isfinite(s).all() for s in result.scores.values())
    if criterion in ("hrank", "feature-stats"):  # zero rank / zero M-std: the least important channels
        assert set(torch.argsort(scores, stable=True)[:3].tolist()) == {0, 1, 2}
    pruned, report = simprune.prune(model, torch.zeros(1, 1, 8, 8), criterion, {"flops": 0.3}, calibration=calib,
                                    criterion_options={"progress": False, **options})
    assert report["reduction"]["flops"] >= 0.3
    assert torch.isfinite(pruned(torch.randn(4, 1, 8, 8))).all()


@pytest.mark.parametrize("value", [0.0, 0.5, 1e4])
def test_constant_calibration_images_are_refused(value):
    calib = _loader(torch.full((5, 1, 8, 8), value))
    with pytest.raises(SimpruneError, match="all 5 calibration images are constant"):
        simprune.prune(DeadNet().eval(), torch.zeros(1, 1, 8, 8), "qsfm", {"flops": 0.3}, calibration=calib,
                       criterion_options={"progress": False})


def test_bn_recalibration_keeps_trained_statistics_of_channels_the_images_leave_constant():
    torch.manual_seed(0)
    model = DeadNet()
    with torch.no_grad():
        model[1].running_mean.fill_(0.2)
        model[1].running_var.fill_(0.7)
    recalibrate_batchnorm(model, _loader(torch.randn(16, 1, 8, 8)))
    var = model[1].running_var
    assert var[:3].tolist() == pytest.approx([0.7] * 3) and model[1].running_mean[:3].tolist() == pytest.approx([0.2] * 3)
    assert torch.all(var[3:] != 0.7)  # the varying channels were re-estimated
    # l1 + constant calibration images: recalibration only, and the model stays finite on real inputs
    pruned, _ = simprune.prune(DeadNet().eval(), torch.zeros(1, 1, 8, 8), "l1", {"flops": 0.3},
                               calibration=_loader(torch.zeros(4, 1, 8, 8)))
    assert torch.isfinite(pruned(torch.randn(4, 1, 8, 8) * 10)).all()


def test_calibration_set_smaller_than_one_batch():
    torch.manual_seed(0)
    model = DeadNet().eval()
    calib = _loader(torch.randn(3, 1, 8, 8), batch_size=128)
    probes = collect_statistics(model, PruningGraph(model, torch.zeros(1, 1, 8, 8)), calib, {"ssim", "gram"},
                                progress=False)
    assert {p.stats.images for plist in probes.values() for p in plist} == {3}
    one = _loader(torch.randn(1, 1, 8, 8))
    pruned, report = simprune.prune(model, torch.zeros(1, 1, 8, 8), "qsfm", {"flops": 0.3}, calibration=one,
                                    criterion_options={"progress": False})
    assert report["reduction"]["flops"] >= 0.3 and torch.isfinite(pruned(torch.randn(2, 1, 8, 8))).all()


@pytest.mark.parametrize("shape,pattern", [((1, 10, 10), "calibration images are 1x10x10 but the model's input is "
                                                          "1x8x8"),
                                           ((3, 8, 8), "calibration images are 3x8x8")])
def test_calibration_images_of_another_shape_are_refused(shape, pattern):
    with pytest.raises(SimpruneError, match=pattern):
        simprune.prune(DeadNet().eval(), torch.zeros(1, 1, 8, 8), "qsfm", {"flops": 0.3},
                       calibration=_loader(torch.randn(4, *shape)), criterion_options={"progress": False})


def test_criterion_run_directly_on_wrong_channels_says_so():
    model = DeadNet().eval()
    crit = get_criterion("hrank", progress=False)
    with pytest.raises(SimpruneError, match=r"cannot read calibration images of shape \(3, 8, 8\)"):
        crit.score(PruningGraph(model, torch.zeros(1, 1, 8, 8)), _loader(torch.randn(2, 3, 8, 8)))


def test_evaluation_with_classes_missing_from_the_data_is_finite():
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    ds = ImageTensorDataset(images, torch.arange(20) % 2, DatasetInfo(3, 1, (0.5,), (0.25,)))  # class 2 absent
    metrics = evaluate(DeadNet().eval(), ds, bf16=False)
    assert metrics["n"] == 20 and all(np.isfinite(v) for v in metrics.values())


def _image_tree(root, splits):
    from PIL import Image

    for split, classes in splits.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((6, 6, 3), 40 * len(cls), dtype=np.uint8)).save(root / split / cls / "a.png")


def test_imagefolder_val_missing_a_class_keeps_training_labels(tmp_path):
    _image_tree(tmp_path, {"train": ["ant", "bee", "cat"], "val": ["bee", "cat"]})
    train = load_dataset(f"imagefolder:{tmp_path}", "train", image_size=4)
    val = load_dataset(f"imagefolder:{tmp_path}", "test", image_size=4)
    assert train.classes == val.classes == ["ant", "bee", "cat"] and val.num_classes == 3
    assert sorted(val.targets) == [1, 2]  # bee and cat keep their training indices


def test_imagefolder_val_with_an_unknown_class_or_an_empty_training_class_is_refused(tmp_path):
    _image_tree(tmp_path / "a", {"train": ["ant"], "val": ["ant", "dog"]})
    with pytest.raises(SimpruneError, match=r"has classes \['dog'\] that .* lacks"):
        load_dataset(f"imagefolder:{tmp_path / 'a'}", "test", image_size=4)
    _image_tree(tmp_path / "b", {"train": ["ant"]})
    (tmp_path / "b" / "train" / "bee").mkdir()
    with pytest.raises(SimpruneError, match="not an image folder .*bee"):
        load_dataset(f"imagefolder:{tmp_path / 'b'}", "train", image_size=4)


def test_cli_refuses_data_with_other_channels_than_the_model(cli, tmp_path):
    code, _, err = cli("train", "--model", "resnet20", "--data", "fashion-mnist-sample", "--pad-to", "32",
                       "--in-channels", "3", "--epochs", "1", "--out", tmp_path / "t")
    assert code == 2 and "--in-channels 3 but fashion-mnist-sample has 1-channel images" in err
    code, _, err = cli("prune", "--model", "resnet20", "--input", "3x32x32", "--target-flops", "0.3",
                       "--data", "fashion-mnist-sample", "--pad-to", "32", "--out", tmp_path / "p")
    assert code == 2 and "takes 3-channel images but the data set has 1" in err
    assert not (tmp_path / "p").exists()
