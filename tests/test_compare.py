"""`simprune compare`: criteria x targets on one model, tables that agree with each other, the plot, errors."""
import csv
import json

import pytest
import torch

import simprune
from simprune import api
from simprune.criteria import ScoreCache, get_criterion
from simprune.errors import SimpruneError
from simprune.models import build_model
from simprune.verify.compare import parse_fractions, parse_specs, schedule_options
from simprune.verify.tables import pivot_table
from tests.conftest import ZOO


def test_compare_on_a_small_trained_model(cli, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = cli("compare", "--checkpoint", ZOO / "resnet20-fashion-mnist", "--data", "fashion-mnist-sample",
                            "--criteria", "qsfm,l1,random", "--targets", "0.5,0.3", "--eval-images", "300",
                            "--calib-images", "64", "--out", out)
    assert code == 0, err
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert [(r["label"], r["target"]) for r in rows] == \
        [(f"{c} + refit", t) for c in ("qsfm", "l1", "random") for t in (0.3, 0.5)]  # the refit is the default
    assert all(r["reconstructed"] and r["compensated"] is False for r in rows)
    assert data["baseline_top1"] > 90 and data["test_images"] == 300 and data["calibration"]["images"] == 64
    for r in rows:
        assert abs(r["flops_removed"] - r["target"]) <= 0.02, r
        assert r["change"] == pytest.approx(r["top1"] - data["baseline_top1"])
    # qsfm's statistics were computed once and reused for the second target
    qsfm = [r for r in rows if r["criterion"] == "qsfm"]
    assert qsfm[0]["score_s"] == qsfm[1]["score_s"] > 0

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(t["label"], float(t["target"]), float(t["top1"])) for t in table] == \
        [(r["label"], r["target"], r["top1"]) for r in rows]
    md = (out / "results.md").read_text()
    assert "| criterion | 30 % MACs: top-1 (change) | 50 % MACs: top-1 (change) |" in md
    for name in ("qsfm + refit", "l1 + refit", "random + refit"):
        cells = [f"{r['top1']:.2f} ({r['change']:+.2f})" for r in rows if r["label"] == name]
        assert f"| {name} | {cells[0]} | {cells[1]} |" in md and f"| {name} | {cells[0]} | {cells[1]} |" in stdout
    assert (out / "accuracy_vs_flops.png").read_bytes().startswith(b"\x89PNG")
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # accuracy plot and channels per layer
    assert f"{data['baseline_top1']:.2f} %" in page


def test_compare_iterative_schedule_and_errors(cli, tmp_path):
    out = tmp_path / "it"
    code, _, err = cli("compare", "--model", "resnet20", "--data", "fashion-mnist-sample", "--pad-to", "32",
                       "--criteria", "l1", "--targets", "0.4", "--schedules", "oneshot,iterative:2",
                       "--eval-images", "32", "--calib-images", "32", "--no-reconstruct", "--out", out, "--quiet")
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["l1", "l1 / iterative:2"]  # --no-reconstruct: no refit, no suffix
    assert not any(r["reconstructed"] for r in rows)
    assert all(abs(r["flops_removed"] - 0.4) <= 0.02 for r in rows)
    assert rows[0]["params"] != rows[1]["params"]  # re-scored after the first step: another structure
    assert [r["model_dir"] for r in rows] == ["models/l1-0.4", "models/l1-iterative-2-0.4"]
    kept = simprune.load(out / "models" / "l1-iterative-2-0.4")  # every pruned model is kept, loadable
    assert sum(p.numel() for p in kept.parameters()) == rows[1]["params"]

    code, _, err = cli("compare", "--model", "resnet20", "--data", "fashion-mnist-sample", "--out", out)
    assert code == 2 and "already exists" in err
    for argv, message in ((["--criteria", "l1,nope"], "unknown criterion 'nope'"),
                          (["--targets", "0.5,1.2"], "fractions to remove in (0, 1)"),
                          (["--schedules", "soft"], "trains while it prunes"),
                          (["--compensate", "lstsq,maybe"], "choose from default, lstsq, twin, none")):
        code, _, err = cli("compare", "--model", "resnet20", "--data", "fashion-mnist-sample", "--out",
                           tmp_path / "bad", *argv)
        assert code == 2 and message in err, (argv, err)
        assert not (tmp_path / "bad").exists()


def test_parsers():
    specs = parse_specs("qsfm, qsfm:cosine,l1,auto")
    assert [(s.label, s.name, s.options) for s in specs] == [
        ("qsfm", "qsfm", {}), ("qsfm:cosine", "qsfm", {"similarity": "cosine"}), ("l1", "l1", {}),
        ("auto", "auto", {})]
    with pytest.raises(SimpruneError, match="distinct"):
        parse_specs("l1,l1")
    with pytest.raises(SimpruneError, match="unknown similarity"):
        parse_specs("qsfm:nope")
    assert parse_fractions("0.7,0.3,0.3", "--targets") == [0.3, 0.7]
    with pytest.raises(SimpruneError, match="comma-separated fractions"):
        parse_fractions("half", "--targets")
    assert schedule_options("oneshot") == {}
    assert schedule_options("iterative") == {"schedule": "iterative", "steps": 5}
    assert schedule_options("iterative:3") == {"schedule": "iterative", "steps": 3}
    for bad in ("iterative:0", "iterative:x", "gradual"):
        with pytest.raises(SimpruneError):
            schedule_options(bad)


def test_pivot_table_labels_compensation_and_schedule():
    rows = [{"criterion": "qsfm", "compensated": "twin", "schedule": "oneshot", "target": 0.3, "top1": 90.0,
             "change": -4.0},
            {"criterion": "qsfm", "compensated": True, "schedule": "oneshot", "target": 0.7, "top1": 60.5,
             "change": -33.5},
            {"criterion": "l1", "compensated": False, "schedule": "iterative:2", "target": 0.3, "top1": 80.0,
             "change": -14.0}]
    header, body = pivot_table(rows)
    assert header == ["criterion", "30 % MACs: top-1 (change)", "70 % MACs: top-1 (change)"]
    assert body == [["qsfm + twin", "90.00 (-4.00)", ""], ["qsfm", "", "60.50 (-33.50)"],
                    ["l1 / iterative:2", "80.00 (-14.00)", ""]]
    assert pivot_table(rows, "params")[0][1] == "30 % params: top-1 (change)"


class Counting:
    """A weight criterion that counts how often it is asked for scores."""

    def __init__(self):
        self.inner, self.calls = get_criterion("l1"), 0
        self.name, self.needs_data = "l1", False

    def score(self, graph, calibration=None):
        self.calls += 1
        return self.inner.score(graph)


@pytest.mark.parametrize("reuse, calls", [(True, 1), (False, 2)])
def test_score_cache_reuses_scores_across_targets(reuse, calls):
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    inner = Counting()
    cache = ScoreCache(inner, reuse=reuse)
    x = torch.zeros(1, 1, 32, 32)
    small, _ = api.prune(model, x, cache, {"flops": 0.3})
    large, _ = api.prune(model, x, cache, {"flops": 0.6})
    assert inner.calls == calls and cache.result is not None and cache.name == "l1"
    uncached, _ = api.prune(model, x, "l1", {"flops": 0.6})
    assert [p.shape for p in large.parameters()] == [p.shape for p in uncached.parameters()]
    assert sum(p.numel() for p in small.parameters()) > sum(p.numel() for p in large.parameters())


@pytest.mark.slow
def test_compare_times_every_kept_model(cli, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "lat"
    code, stdout, err = cli("compare", "--model", "resnet20", "--data", "fashion-mnist-sample", "--pad-to", "32",
                            "--criteria", "l1,random", "--targets", "0.5", "--eval-images", "32",
                            "--calib-images", "32", "--latency", "--out", out)
    assert code == 0, err
    data = json.loads((out / "results.json").read_text())
    assert data["baseline_latency_ms"] > 0
    for r in data["rows"]:
        assert r["latency_ms"] > 0 and r["speedup"] > 0 and isinstance(r["speedup_stable"], bool)
        assert (out / r["model_dir"] / "model.safetensors").exists()
    assert "onnxruntime batch 1" in stdout and "| l1 + refit | 0.5 |" in stdout  # calibration data: refit by default


def test_compare_runs_the_default_auto_and_says_what_it_chose(cli, tmp_path):
    out = tmp_path / "auto"
    code, _, err = cli("compare", "--checkpoint", ZOO / "resnet20-fashion-mnist", "--data", "fashion-mnist-sample",
                       "--criteria", "auto", "--targets", "0.3", "--eval-images", "100", "--calib-images", "100",
                       "--out", out, "--quiet")
    assert code == 0, err
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["label"] == "auto + refit" and row["chosen"] in simprune.Choose().candidates
    assert f"| auto + refit (chose {row['chosen']}) | 0.3 |" in (out / "results.md").read_text()
