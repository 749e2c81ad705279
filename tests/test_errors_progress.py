"""Stage messages, bars and honest warnings: what a newcomer sees while a command runs, and what the
library does not print."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import simprune
from simprune import progress
from simprune.models import build_model
from simprune.schedules import checks

STAGE = re.compile(r"^\[ *\d+\.\d+s\] ")
R20 = Path(__file__).resolve().parents[1] / "zoo" / "resnet20-fashion-mnist"


@pytest.fixture
def fast_announce(monkeypatch):
    monkeypatch.setattr(progress, "ANNOUNCE_AFTER_S", 0.05)


def test_a_stage_is_announced_only_when_it_lasts(capsys, fast_announce):
    with progress.reporting(progress.StderrReporter()):
        progress.stage("quick")
        progress.stage("slow")
        time.sleep(0.3)
        progress.stage("last")
    err = capsys.readouterr().err
    assert "quick" not in err and "last" not in err
    assert STAGE.match(err.splitlines()[0]) and err.splitlines()[0].endswith("slow ...")


def test_quiet_keeps_only_warnings_and_each_once(capsys, fast_announce):
    with progress.reporting(progress.StderrReporter(quiet=True, wording=str.upper)):
        progress.stage("slow")
        time.sleep(0.2)
        progress.note("a step")
        list(progress.bar(range(3), "loop"))
        progress.warn("careful")
        progress.warn("careful")
    assert capsys.readouterr().err == "warning: CAREFUL\n"


def test_piped_bar_prints_plain_lines_with_figures(capsys, fast_announce):
    def slow():
        for i in range(4):
            time.sleep(0.03)
            yield i

    with progress.reporting(progress.StderrReporter()):
        bar = progress.bar(slow(), "epoch 1/1", total=4, unit="batches")
        for _ in bar:
            bar.set_postfix(loss="0.123")
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: no carriage-return redraws
    last = err.strip().splitlines()[-1]
    assert "epoch 1/1: 4/4 batches done in" in last and "loss 0.123" in last


def test_the_library_prints_nothing_and_warns_through_warnings(capsys):
    model = build_model("resnet20", in_channels=1)
    calibration = [(torch.randn(8, 1, 32, 32), torch.zeros(8, dtype=torch.long))]
    with pytest.warns(progress.SimpruneWarning, match="only 8 calibration images"):
        _, report = simprune.prune(model, torch.zeros(1, 1, 32, 32), "qsfm", {"flops": 0.3},
                                   calibration=calibration, repair=simprune.Repair(recalibrate_bn=True))
    assert capsys.readouterr() == ("", "")
    assert any("recalibrate_bn=False" in w for w in report["warnings"])


# ---- the checks themselves --------------------------------------------------------------------------------------

def test_tiny_calibration_is_named_only_with_bn_reestimation():
    few = [(torch.zeros(13, 3, 8, 8), None)]
    assert checks.tiny_calibration(few, bn_recalibrated=False) == []
    assert "only 13 calibration images" in checks.tiny_calibration(few, bn_recalibrated=True)[0]
    assert checks.tiny_calibration([(torch.zeros(64, 3, 8, 8), None)], bn_recalibrated=True) == []


def test_target_missed_by_more_than_two_points():
    assert checks.target_missed({"target": {"flops": 0.5}, "reduction": {"flops": 0.49}}) == []
    (short,) = checks.target_missed({"target": {"flops": 0.5}, "reduction": {"flops": 0.45}})
    assert "5.0 points short of it" in short
    (beyond,) = checks.target_missed({"target": {"params": 0.3}, "reduction": {"params": 0.36}})
    assert "parameters" in beyond and "beyond" in beyond


def test_a_layer_cut_below_its_fan_out_is_named():
    """64 channels cut to 8 feeding a layer with 64 outputs is a bottleneck; cut to 32 it is not."""
    def net(width):
        return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, 64, 3), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    report = {"groups": [{"root": "0", "channels_before": 64}]}
    (text,) = checks.narrow_layers(net(8), torch.zeros(1, 3, 16, 16), report)
    assert "0 64 -> 8 (read by 2, 64 outputs)" in text and "max_layer_ratio=0.75" in text
    assert checks.narrow_layers(net(32), torch.zeros(1, 3, 16, 16), report) == []


def test_soft_schedule_with_too_few_epochs():
    (text,) = checks.soft_epochs(0.6, epochs=3)
    assert "below 6 epochs" in text
    assert checks.soft_epochs(0.6, epochs=6) == [] and checks.soft_epochs(0.3, epochs=4, hold=1) == []


# ---- on the command line ----------------------------------------------------------------------------------------

def test_iterative_prints_macs_and_accuracy_per_step_and_the_report_has_provenance(cli, tmp_path):
    out = tmp_path / "it"
    code, stdout, err = cli("prune", "--model", "resnet20", "--input", "1x32x32", "--criterion", "l1",
                            "--target-flops", "0.5", "--schedule", "iterative", "--steps", "2",
                            "--data", "fashion-mnist-sample", "--pad-to", "32", "--eval-images", "64",
                            "--no-latency", "--out", out)
    assert code == 0, err
    assert re.search(r"step 1/2: MACs .* M -> .* M \(\d+\.\d% removed", err)
    assert re.search(r"step 1/2: top-1 \d+\.\d\d %", err) and "step 2/2: MACs" in err
    assert "warning: --model resnet20 without --checkpoint DIR has random weights" in err
    report = json.loads((out / "report.json").read_text())
    assert report["provenance"] == {"weights": "random (built from --model resnet20, no --checkpoint)",
                                    "calibration": "none (the criterion reads the weights only)"}
    assert any("random weights" in w for w in report["warnings"])
    page = (out / "report.md").read_text()
    assert "| weights | random (built from --model resnet20, no --checkpoint) |" in page and "## Warnings" in page


def test_quiet_prune_prints_no_stage_lines(cli, tmp_path):
    code, _, err = cli("prune", "--model", "resnet20", "--input", "1x32x32", "--target-flops", "0.3",
                       "--no-latency", "--quiet", "--out", tmp_path / "q")
    assert code == 0 and not [line for line in err.splitlines() if STAGE.match(line)], err


def test_stage_lines_reach_a_log_file(tmp_path):
    """`simprune ... 2> log`: the stages of a prune that runs for seconds are in the log, without redraws."""
    log = tmp_path / "log"
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "simprune.cli", "prune", "--checkpoint", str(R20),
                               "--criterion", "qsfm", "--calib-data", "fashion-mnist-sample", "--calib-images", "256",
                               "--target-flops", "0.3", "--no-latency", "--out", str(tmp_path / "o")],
                              stdout=subprocess.DEVNULL, stderr=f, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=300)
    seconds, text = time.perf_counter() - start, log.read_text()
    assert proc.returncode == 0, text
    lines = text.strip().splitlines()
    assert "\r" not in text and all(STAGE.match(line) or line.startswith("warning: ") for line in lines), text
    if seconds > 8:  # a run that long has stages over a second (start-up alone is a few seconds)
        assert any(STAGE.match(line) for line in lines), text
