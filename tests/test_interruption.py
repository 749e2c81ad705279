"""Interruption: a run stopped at any point (SIGINT, SIGTERM, SIGKILL, or a crash before any write)
leaves its output absent, marked incomplete, or complete; --resume then gives the uninterrupted
run's weights bit for bit; Ctrl-C names the last good checkpoint; a second run into the same
directory refuses. The subprocess harness is tests/interrupt.py (bench/robustness.py runs more)."""
import json
import os
import subprocess
import time

import pytest
import torch

import simprune
from simprune.errors import SimpruneError
from simprune.io import files
from simprune.io.data import DatasetInfo, ImageTensorDataset
from simprune.io.files import atomic_output_dir, read_safetensors
from simprune.models import build_model
from simprune.train.loop import STATE_FILE, TrainConfig, train
from tests import interrupt
from tests.interrupt import (
    ENV,
    prune_scenario,
    train_scenario,
    write_checkpoint,
    write_tiny_mnist,
)


class Crash(BaseException):
    """Stands for a kill: nothing after it runs in the writer (but its own cleanup of the temp file)."""


def _crash_at(monkeypatch, n: int, name: str = "replace") -> list[int]:
    """Make the n-th os.replace/os.rename in simprune.io.files raise before renaming anything."""
    calls, real = [0], getattr(os, name)

    def fake(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(files.os, name, fake)
    return calls


def _tiny_train():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 1, 16, 16), generator=g, dtype=torch.uint8)
    ds = ImageTensorDataset(images, torch.arange(24) % 10, DatasetInfo(10, 1, (0.5,), (0.25,)))
    cfg = TrainConfig(epochs=2, batch_size=8, limit_batches=2, lr=0.02, bf16=False, channels_last=False)
    desc = {"model": "resnet20", "model_args": {"num_classes": 10, "in_channels": 1}, "input_shape": [1, 16, 16]}
    return ds, cfg, desc


def _fresh():
    torch.manual_seed(3)
    return build_model("resnet20", num_classes=10, in_channels=1)


def test_training_cut_before_every_write_resumes_to_the_same_weights(tmp_path, monkeypatch):
    ds, cfg, desc = _tiny_train()
    reference = _fresh()
    calls = _crash_at(monkeypatch, 0)
    train(reference, ds, cfg, tmp_path / "ref", description=desc, progress=False, log=lambda s: None)
    writes = calls[0]
    monkeypatch.undo()
    assert writes == 2 * 3  # per epoch: training state, weights, description
    for n in range(1, writes + 1):
        out = tmp_path / f"cut{n}"
        _crash_at(monkeypatch, n)
        with pytest.raises(Crash):
            train(_fresh(), ds, cfg, out, description=desc, progress=False, log=lambda s: None)
        monkeypatch.undo()
        for f in out.glob("*.safetensors"):  # whatever exists is whole
            read_safetensors(f)
        assert not list(out.glob(".*")), "no temporary file may stay behind"
        resumed = _fresh()
        history = train(resumed, ds, cfg, out, description=desc, resume=(out / STATE_FILE).exists(),
                        progress=False, log=lambda s: None)
        assert [h["epoch"] for h in history] == [1, 2]
        for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), (n, k)
        saved = read_safetensors(out / "model.safetensors")[0]  # the files too, not only the model in memory
        assert all(torch.equal(v, saved[k]) for k, v in reference.state_dict().items()), n
        assert [h["epoch"] for h in json.loads((out / "model.json").read_text())["history"]] == [1, 2], n


def test_saving_a_pruned_model_cut_at_any_rename_leaves_no_output(tmp_path, monkeypatch):
    model = build_model("resnet20", num_classes=10, in_channels=1)
    desc = {"model": "resnet20", "model_args": {"num_classes": 10, "in_channels": 1}, "input_shape": [1, 32, 32]}
    for name in ("replace", "rename"):
        for n in (1, 2, 3):
            out = tmp_path / f"{name}{n}"
            _crash_at(monkeypatch, n, name)
            try:
                simprune.save(out, model, desc, {"report": 1})
            except Crash:
                assert not out.exists()
            else:
                assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "report.json"]
            monkeypatch.undo()
            assert not list(tmp_path.glob(f".{out.name}.*"))


def test_output_written_by_another_run_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SimpruneError, match="written by another run meanwhile; kept it"):
        with atomic_output_dir(out) as tmp:
            (tmp / "mine").write_text("second")
            out.mkdir()
            (out / "theirs").write_text("first")
    assert [p.name for p in out.iterdir()] == ["theirs"] and not list(tmp_path.glob(".out.*"))
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "mine").write_text("second")
    assert [p.name for p in out.iterdir()] == ["mine"] and not list(tmp_path.glob(".out.*"))


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    proc = subprocess.Popen(["sleep", "0"])  # its pid is not running any more
    proc.wait()
    dead = proc.pid
    (tmp_path / f".model.json.{dead}-abc.tmp").write_text("half")
    (tmp_path / f".model.json.{os.getpid()}-xyz.tmp").write_text("mine, in progress")
    (tmp_path / f".out.partial-{dead}-q").mkdir()
    files.atomic_write_json(tmp_path / "model.json", {})
    with atomic_output_dir(tmp_path / "out") as scratch:
        (scratch / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.json", f".model.json.{os.getpid()}-xyz.tmp", "out"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("interrupt")


@pytest.mark.slow
@pytest.mark.parametrize("sig,delay", [("SIGINT", 0.15), ("SIGTERM", 0.4), ("SIGKILL", 0.25)])
def test_train_killed_while_training_resumes_bit_for_bit(workdir, sig, delay):
    scenario = train_scenario(write_tiny_mnist(workdir / "mnist"))
    if not hasattr(test_train_killed_while_training_resumes_bit_for_bit, "ref"):
        test_train_killed_while_training_resumes_bit_for_bit.ref = interrupt.reference(scenario, workdir)[0]
    t = interrupt.trial(scenario, workdir, sig, delay, test_train_killed_while_training_resumes_bit_for_bit.ref,
                        when="busy")
    assert t.ok, str(t)


@pytest.mark.slow
def test_ctrl_c_names_the_last_checkpoint_or_that_there_is_none(workdir, tmp_path):
    data = write_tiny_mnist(workdir / "mnist")
    scenario = train_scenario(data, epochs=20)
    out = tmp_path / "t"
    rc, err, sent = interrupt.run_and_signal(scenario.start(out), "SIGINT", 0.05, (out / "model.json").exists)
    epoch = read_safetensors(out / STATE_FILE)[1]["epoch"]
    assert sent and rc == 130 and err.strip().splitlines()[-1] == (
        f"interrupted; the last good checkpoint is {out / STATE_FILE} (epoch {epoch}); rerun the same command "
        "with --resume to continue")
    assert json.loads((out / "INCOMPLETE.json").read_text())["phase"] == "train"
    with pytest.raises(SimpruneError, match="unfinished run"):
        simprune.load(out)
    rc, err, sent = interrupt.run_and_signal(scenario.start(tmp_path / "u"), "SIGINT", 0.3)
    assert sent and rc == 130 and err.strip().splitlines()[-1] == (
        f"interrupted; nothing was written to {tmp_path / 'u'}; rerun the same command")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_prune_killed_while_writing_leaves_no_output_then_reruns_identically(workdir, sig):
    scenario = prune_scenario(write_checkpoint(workdir / "ckpt"))
    if not hasattr(test_prune_killed_while_writing_leaves_no_output_then_reruns_identically, "ref"):
        test_prune_killed_while_writing_leaves_no_output_then_reruns_identically.ref = \
            interrupt.reference(scenario, workdir)[0]
    t = interrupt.trial(scenario, workdir, sig, 0.0,
                        test_prune_killed_while_writing_leaves_no_output_then_reruns_identically.ref, when="busy")
    assert t.ok and t.after_kill in ("absent", "complete"), str(t)


@pytest.mark.slow
def test_second_run_into_the_same_directory_refuses(workdir, tmp_path):
    scenario = prune_scenario(write_checkpoint(workdir / "ckpt"))
    out = tmp_path / "p"
    assert interrupt.run(scenario.start(out)).returncode == 0
    again = interrupt.run(scenario.start(out))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: output directory {out} already exists and is not empty; pass --overwrite or pick another"]
    assert interrupt.run(scenario.start(out) + ["--overwrite"]).returncode == 0
    # training: while one run writes OUT, a second one is refused even with --overwrite
    train = train_scenario(write_tiny_mnist(workdir / "mnist"), epochs=40)
    t = tmp_path / "t"
    first = subprocess.Popen(train.start(t), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        while not train.busy(t) and first.poll() is None:
            time.sleep(0.01)
        second = interrupt.run(train.start(t) + ["--overwrite"])
        assert second.returncode == 2 and second.stderr.strip().splitlines()[-1] == (
            f"error: another simprune run is writing to {t}; wait for it to finish or pick another --out DIR")
        assert first.poll() is None, "the first run must go on"
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
@pytest.mark.parametrize("sig,delay", [("SIGINT", 0.1), ("SIGKILL", 0.3)])
def test_finetune_killed_while_training_resumes_bit_for_bit(workdir, sig, delay):
    data = ("--data", "mnist", "--data-dir", write_tiny_mnist(workdir / "mnist"))
    scenario = interrupt.finetune_scenario(write_checkpoint(workdir / "ckpt"), data, limit_batches=2, eval_images=16)
    test = test_finetune_killed_while_training_resumes_bit_for_bit
    if not hasattr(test, "ref"):
        test.ref = interrupt.reference(scenario, workdir)[0]
    t = interrupt.trial(scenario, workdir, sig, delay, test.ref, when="busy")
    assert t.ok and t.after_kill in ("incomplete", "complete"), str(t)


@pytest.mark.slow
def test_export_killed_leaves_no_onnx_file_then_reruns_to_the_same_bytes(workdir):
    scenario = interrupt.export_scenario(write_checkpoint(workdir / "ckpt"))
    ref = interrupt.reference(scenario, workdir)[0]
    t = interrupt.trial(scenario, workdir, "SIGTERM", 2.0, ref)
    assert t.ok and t.sent and t.after_kill == "absent" and t.resumed, str(t)


def test_what_a_killed_replacement_left_beside_a_complete_output_is_removed_by_the_next_load(tmp_path):
    import sys
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    simprune.save(tmp_path / "m", model)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended: its leftovers are stale
    stale = tmp_path / f".m.old-{pid}-abc123"
    (stale / "out").mkdir(parents=True)
    (stale / "out" / "model.safetensors").write_bytes(b"the replaced weights")
    live = tmp_path / f".m.old-{os.getpid()}-def456"  # this process's own: never touched
    live.mkdir()
    simprune.load(tmp_path / "m", torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
    assert not stale.exists() and live.exists()
