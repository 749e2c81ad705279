"""Redundancy analysis: twin counts on a model with planted copies, the report, the PNGs, the command."""
import argparse
import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from simprune.calibrate import calibration
from simprune.cli.analyze import add_analyze_parser
from simprune.errors import SimpruneError
from simprune.io.files import save_model
from simprune.models import build_model
from simprune.verify.analysis import analyze, max_offdiag
from simprune.verify.plots import redundancy_bars, similarity_heatmaps, twin_order

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROUP = "layer1.0.conv1"  # a block's inner conv: its maps reach layer1.0.conv2 untouched by residual sums


def _batches(n=32, shape=(3, 16, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=g), torch.zeros(n, dtype=torch.long)),
                      batch_size=16)


def _model(copies=()):
    """resnet20 whose GROUP filters ``copies`` are exact copies of filter 0 (BN starts identical per channel)."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3).eval()
    with torch.no_grad():
        w = model.get_submodule(GROUP).weight
        for k in copies:
            w[k] = w[0]
    return model


def _analyze(model, **kw):
    return analyze(model, torch.zeros(1, 3, 16, 16), _batches(), **kw)


def _group(summary, root):
    return next(g for g in summary["groups"] if g["group"] == root)


@pytest.fixture(scope="module")
def planted():
    return _analyze(_model(copies=(5, 9)))


def test_planted_copies_are_counted_as_twins(planted):
    base = _group(_analyze(_model())[0], GROUP)
    assert base["twins"] == {"0.9": 0, "0.95": 0, "0.99": 0}  # nothing similar by chance
    summary, matrices = planted
    g = _group(summary, GROUP)
    assert g["twins"] == {"0.9": 3, "0.95": 3, "0.99": 3}  # channels 0, 5 and 9
    assert g["removable"] == {"0.9": 2, "0.95": 2, "0.99": 2}  # one of the three is kept
    S = matrices[GROUP]
    assert float(S[0, 5]) == pytest.approx(1.0, abs=1e-6) and float(S[5, 9]) == pytest.approx(1.0, abs=1e-6)
    assert set(torch.nonzero(max_offdiag(S) > 0.99).flatten().tolist()) == {0, 5, 9}


def test_report_fields_and_totals(planted):
    summary, matrices = planted
    json.dumps(summary, allow_nan=False)  # JSON-ready, no NaN or inf
    net, groups = summary["network"], summary["groups"]
    assert net["similarity"] == "ssim" and net["images"] == 32 and net["thresholds"] == [0.9, 0.95, 0.99]
    assert net["groups"] == len(groups) == len(matrices) == 12  # resnet20: 3 residual + 9 block groups
    assert net["channels"] == sum(g["channels"] for g in groups) == 16 * 4 + 32 * 4 + 64 * 4
    for key in ("0.9", "0.95", "0.99"):
        assert net["twins"][key] == sum(g["twins"][key] for g in groups)
        assert net["twin_share"][key] == pytest.approx(net["twins"][key] / net["channels"])
    assert groups[0]["group"] == "conv1" and groups[0]["residual"] and not _group(summary, GROUP)["residual"]
    g = _group(summary, GROUP)
    assert g["layers"] == [GROUP, "layer1.0.conv2"] and g["channels"] == 16
    assert set(g["mstd"]) == {"min", "median", "max", "cv"} and 0 < g["mstd"]["min"] <= g["mstd"]["max"]
    assert g["dead_channels"] == 0 and -1 <= g["mean_max_similarity"] <= 1
    assert g["max_similarity"]["max"] == pytest.approx(1.0, abs=1e-6)
    for root, S in matrices.items():
        assert S.shape == (_group(summary, root)["channels"],) * 2


def test_dead_channels_and_metric_thresholds():
    model = _model()
    with torch.no_grad():  # channel 3 of GROUP: zero filter and BN bias -> constant 0 map after ReLU
        model.get_submodule(GROUP).weight[3] = 0
        model.get_submodule("layer1.0.bn1").bias[3] = -1.0
    summary, _ = _analyze(model, similarity="psnr")
    assert summary["network"]["thresholds"] == [20.0, 30.0, 40.0]  # dB, not [-1, 1]
    g = _group(summary, GROUP)
    assert g["dead_channels"] == 1 and g["mstd"]["min"] < 1e-6 and set(g["twins"]) == {"20", "30", "40"}


def test_bad_arguments():
    with pytest.raises(SimpruneError, match="unknown similarity 'ssmi'"):
        _analyze(_model(), similarity="ssmi")
    with pytest.raises(SimpruneError, match="distinct"):
        _analyze(_model(), thresholds=(0.9, 0.90))


def _png_size(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_plots_are_pngs_of_sensible_size(planted, tmp_path):
    summary, matrices = planted
    w, h = _png_size(redundancy_bars(summary, tmp_path / "redundancy.png"))
    assert 700 <= w <= 4000 and 400 <= h <= 2000
    files = similarity_heatmaps(matrices, tmp_path / "similarity.png")
    assert files == [tmp_path / "similarity.png"]
    w, h = _png_size(files[0])
    assert 600 <= w <= 4000 and 300 <= h <= 4000
    paged = similarity_heatmaps(matrices, tmp_path / "paged" / "similarity.png", per_page=5)
    assert [p.name for p in paged] == ["similarity_1.png", "similarity_2.png", "similarity_3.png"]
    assert [_png_size(p)[0] > 300 for p in paged] == [True] * 3  # the last page holds 2 maps: narrower
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["paged", "redundancy.png", "similarity.png"] + [p.name for p in paged])  # no temp files left
    top = similarity_heatmaps(matrices, tmp_path / "top.png", max_layers=3)
    assert top == [tmp_path / "top.png"] and _png_size(top[0])[0] >= 500


def test_twin_order_puts_twins_next_to_each_other():
    S = torch.eye(5)
    S[1, 4] = S[4, 1] = 0.99
    S[0, 2] = S[2, 0] = 0.5
    order = twin_order(S.numpy()).tolist()
    assert sorted(order) == list(range(5)) and order[:2] in ([1, 4], [4, 1])


# ---- the command ------------------------------------------------------------------------------

def _args(*argv):
    parser = argparse.ArgumentParser()
    add_analyze_parser(parser.add_subparsers())
    return parser.parse_args(["analyze", *map(str, argv)])


@pytest.fixture
def fake_data(monkeypatch):
    """Replace the named data sets with 1x16x16 random images; records what was asked for."""
    asked = {}

    def loader(name, n_images, data_dir=None, pad_to=None, seed=0):
        asked.update(name=name, n_images=n_images, pad_to=pad_to, seed=seed)
        return _batches(n=min(n_images, 24), shape=(1, 16, 16))

    monkeypatch.setattr(calibration, "calibration_loader", loader)
    return asked


def test_command_writes_all_files(tmp_path, fake_data, capsys):
    out = tmp_path / "out"
    args = _args("--model", "resnet20", "--calib-data", "fashion-mnist", "--calib-images", 20, "--out", out)
    assert args.fn(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "redundancy.png", "report.html", "report.md",
                                                     "similarity.png"]
    report = json.loads((out / "analysis.json").read_text())
    assert report["weights"] == "random" and report["checkpoint"] is None and report["model"] == "resnet20"
    assert report["input_shape"] == [1, 16, 16]  # taken from the data when there is no checkpoint
    assert report["calibration"] == {"data": "fashion-mnist", "images": 20, "pad_to": None, "seed": 0}
    assert report["network"]["groups"] == len(report["groups"]) == 12
    for name in ("redundancy.png", "similarity.png"):
        assert _png_size(out / name)[0] >= 600
    text = capsys.readouterr().out
    assert "random weights" in text and "12 groups" in text and "wrote" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directory


def test_command_with_checkpoint_uses_its_data(tmp_path, fake_data):
    model = build_model("resnet20", num_classes=10, in_channels=1)
    save_model(tmp_path / "m", model, {"model": "resnet20", "model_args": {"num_classes": 10, "in_channels": 1},
                                       "input_shape": [1, 16, 16], "data": {"name": "mnist", "pad_to": 16}})
    args = _args("--checkpoint", tmp_path / "m", "--calib-images", 16, "--similarity", "cosine",
                 "--out", tmp_path / "out")
    assert args.fn(args) == 0
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert fake_data == {"name": "mnist", "n_images": 16, "pad_to": 16, "seed": 0}
    assert report["weights"] == "checkpoint" and report["network"]["similarity"] == "cosine"


@pytest.mark.parametrize("change, message", [
    ({"similarity": "bogus"}, "unknown similarity 'bogus'"),
    ({"input": "1x32x32"}, "images are 1x16x16 but the model takes 1x32x32"),  # fails after the output dir opened
    ({"calib_data": None}, "pass --calib-data"),
])
def test_command_failure_leaves_no_output(tmp_path, fake_data, change, message):
    args = _args("--model", "resnet20", "--calib-data", "mnist", "--out", tmp_path / "out")
    vars(args).update(change)
    with pytest.raises(SimpruneError, match=message):
        args.fn(args)
    assert list(tmp_path.iterdir()) == []


def test_command_refuses_a_full_output_dir(tmp_path, fake_data):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    args = _args("--model", "resnet20", "--calib-data", "mnist", "--out", tmp_path / "out")
    with pytest.raises(SimpruneError, match="overwrite=True"):  # the CLI's main() says --overwrite
        args.fn(args)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert fake_data == {}  # refused before loading anything
