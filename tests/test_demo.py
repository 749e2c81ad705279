"""`simprune demo` on the committed Fashion-MNIST ResNet-56 (real data: slow)."""
import json

import pytest

import simprune
from tests.conftest import ZOO, require_fashion_mnist


@pytest.mark.slow
def test_demo_prunes_half_the_macs_and_qsfm_beats_random(cli, tmp_path):
    require_fashion_mnist()
    out = tmp_path / "demo"
    code, stdout, err = cli("demo", "--out", out, "--eval-images", "1000")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    rows = {r["criterion"]: r for r in report["rows"]}
    assert set(rows) == {"unpruned", "qsfm", "l1", "random"}
    for name in ("qsfm", "l1", "random"):
        assert abs(rows[name]["flops_removed"] - 0.5) <= 0.01
    assert rows["unpruned"]["top1"] > 90
    assert rows["qsfm"]["top1"] > rows["random"]["top1"]
    model = simprune.load(out / "qsfm-model")
    assert sum(p.numel() for p in model.parameters()) == rows["qsfm"]["params"]
    assert "qsfm" in stdout


def test_committed_baselines_are_loadable_safetensors():
    for name, floor in (("resnet56-fashion-mnist", 94.0), ("resnet20-fashion-mnist", 93.0)):
        desc = json.loads((ZOO / name / "model.json").read_text())
        assert desc["history"][-1]["test_top1"] >= floor, name
        assert desc["command"].startswith("simprune train")
        assert (ZOO / name / "train.log").read_text().startswith("# simprune train")
        model = simprune.load(ZOO / name)
        assert model.conv1.in_channels == 1
