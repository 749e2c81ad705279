"""Fine-tuning from the CLI: reports, unfinished-run markers, exact resume after a kill, torchrun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import simprune
from tests.conftest import ZOO, require_fashion_mnist

SIMPRUNE = str(Path(sys.executable).parent / "simprune")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
R20 = ZOO / "resnet20-fashion-mnist"


@pytest.fixture(autouse=True)
def _data():
    require_fashion_mnist()


def _pruned(tmp_path, cli) -> Path:
    out = tmp_path / "pruned"
    code, _, err = cli("prune", "--checkpoint", R20, "--criterion", "l1", "--target-flops", "0.5", "--no-latency",
                       "--out", out)
    assert code == 0, err
    return out


def test_prune_with_finetune_writes_a_complete_report(tmp_path, cli):
    out = tmp_path / "ft"
    code, stdout, err = cli("prune", "--checkpoint", R20, "--criterion", "l1", "--target-flops", "0.5",
                            "--data", "fashion-mnist", "--eval-images", "300", "--finetune-epochs", "2",
                            "--limit-batches", "3", "--quiet", "--no-latency", "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    ft = report["finetune"]
    assert ft["epochs"] == 2 and len(ft["history"]) == 2 and ft["ranks"] == 1
    assert report["accuracy"]["after"] == pytest.approx(ft["top1_after"])
    assert abs(report["reduction"]["flops"] - 0.5) <= 0.01
    assert sorted(p.name for p in out.iterdir()) == ["channels.png", "model.json", "model.safetensors", "report.html",
                                                     "report.json", "report.md", "train.log"]
    assert "after 2 fine-tuning epochs" in stdout
    code, stdout, _ = cli("evaluate", "--checkpoint", out, "--data", "fashion-mnist", "--quiet", "--split", "test")
    assert code == 0


def test_distill_without_a_recorded_teacher_is_a_clear_error(tmp_path, cli):
    code, _, err = cli("finetune", R20, "--data", "fashion-mnist", "--epochs", "1", "--distill",
                       "--out", tmp_path / "x")
    assert code == 2 and "pass --teacher DIR" in err and not (tmp_path / "x").exists()


def test_unfinished_run_is_refused_by_load_and_by_a_second_run(tmp_path, cli):
    src = _pruned(tmp_path, cli)
    out = tmp_path / "ft"
    out.mkdir()
    (out / "INCOMPLETE.json").write_text('{"phase": "finetune"}')
    for name in ("model.safetensors", "model.json"):
        (out / name).write_bytes((src / name).read_bytes())
    code, _, err = cli("evaluate", "--checkpoint", out, "--data", "fashion-mnist")
    assert code == 2 and "unfinished run" in err
    code, _, err = cli("finetune", src, "--data", "fashion-mnist", "--epochs", "1", "--out", out)
    assert code == 2 and "add --resume" in err


def _finetune_cmd(src, out, *extra):
    return [SIMPRUNE, "finetune", str(src), "--data", "fashion-mnist", "--epochs", "3", "--limit-batches", "12",
            "--eval-images", "200", "--quiet", "--out", str(out), *extra]


@pytest.mark.slow
def test_killed_finetune_resumes_to_the_same_weights(tmp_path, cli):
    src = _pruned(tmp_path, cli)
    subprocess.run(_finetune_cmd(src, tmp_path / "straight"), check=True, env=ENV, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_finetune_cmd(src, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "train_state.safetensors"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "INCOMPLETE.json").exists() and state.exists()  # killed after epoch 1, before the end
    done = subprocess.run(_finetune_cmd(src, out, "--resume"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (out / "INCOMPLETE.json").exists()
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "straight", out))
    assert ra["finetune"]["top1_after"] == rb["finetune"]["top1_after"]


@pytest.mark.slow
def test_torchrun_two_ranks_agree_with_one_process(tmp_path):
    common = ["prune", "--checkpoint", str(R20), "--criterion", "refit-error", "--calib-data", "fashion-mnist",
              "--calib-images", "128", "--target-flops", "0.4", "--quiet"]
    one = tmp_path / "one"
    subprocess.run([SIMPRUNE, *common, "--out", str(one)], check=True, env=ENV, capture_output=True)
    two = tmp_path / "two"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    res = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29517", "-m", "simprune.cli", *common,
                          "--data", "fashion-mnist", "--eval-images", "200", "--finetune-epochs", "1",
                          "--limit-batches", "2", "--no-latency", "--out", str(two)],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert len(r2["decision_fingerprint_per_rank"]) == 2
    assert set(r2["decision_fingerprint_per_rank"]) == {r1["decision_fingerprint"]}  # same decision everywhere
    assert json.loads((one / "model.json").read_text())["structure"] == \
        json.loads((two / "model.json").read_text())["structure"]
    per_rank = r2["finetune"]["weights_fingerprint_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]  # fine-tuned weights identical across ranks


@pytest.mark.slow
def test_torchrun_qsfm_decision_matches_one_process(tmp_path):
    """qsfm's chance level pairs images inside fixed blocks and the calibration shards hold whole blocks,
    so 2 ranks make the one-process decision (it differed while pairs were consecutive images)."""
    common = ["prune", "--checkpoint", str(R20), "--criterion", "qsfm", "--calib-data", "fashion-mnist",
              "--calib-images", "128", "--target-flops", "0.4", "--quiet", "--no-latency"]
    subprocess.run([SIMPRUNE, *common, "--out", str(tmp_path / "one")], check=True, env=ENV, capture_output=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    res = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29523", "-m", "simprune.cli", *common,
                          "--out", str(tmp_path / "two")], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert r2["decision_fingerprint_per_rank"] == [r1["decision_fingerprint"]] * 2


@pytest.mark.slow
def test_torchrun_ranks_choose_the_same_criterion_under_auto(tmp_path):
    """Each rank holds aside its own shard's images; the output changes are summed over ranks before the
    choice, so every rank prunes with the same criterion and makes the same decision."""
    out = tmp_path / "two"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    res = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29533", "-m", "simprune.cli", "prune",
                          "--checkpoint", str(R20), "--criterion", "auto", "--calib-data", "fashion-mnist-sample",
                          "--calib-images", "200", "--target-flops", "0.3", "--quiet", "--no-latency",
                          "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["criterion_choice"]["tried"]) == set(simprune.Choose().candidates)
    per_rank = report["decision_fingerprint_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
