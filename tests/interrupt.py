"""Kill a simprune command at a random moment, check what it leaves, finish the job, compare.

Shared by tests/test_interruption.py and bench/robustness.py. A :class:`Scenario` is any command
that writes an output directory: how to start it, how to finish an interrupted one, what its
directory looks like (absent, incomplete or complete; anything else is broken), what must equal
an uninterrupted run, and which checkpoint a Ctrl-C must name. ``train_scenario`` and
``prune_scenario`` came first; ``finetune_scenario`` and ``export_scenario`` plug in the same way.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT_S = 300


class Broken(Exception):
    """An output directory that is neither absent, incomplete (marked so) nor complete."""


@dataclass
class Scenario:
    name: str
    start: Callable[[Path], list[str]]  # argv of a fresh run into OUT
    resume: Callable[[Path], list[str] | None]  # argv that finishes an interrupted OUT, None when complete
    state: Callable[[Path], str]  # "absent" | "incomplete" | "complete"; raises Broken otherwise
    result: Callable[[Path], dict[str, torch.Tensor]]  # must equal the uninterrupted run's, bit for bit
    checkpoint: Callable[[Path], str | None] = lambda out: None  # what a Ctrl-C message must name
    busy: Callable[[Path], bool] = lambda out: True  # true once the run is in its risky part (writing)


@dataclass
class Trial:
    scenario: str
    signal: str
    delay_s: float
    when: str = "start"  # the delay counts from the start, or from the moment the run is busy
    sent: bool = False  # False when the run had ended before the moment came
    rc: int | None = None
    after_kill: str = ""
    message_ok: bool = True
    resumed: bool = False
    identical: bool = False
    leftovers: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.after_kill in ("absent", "incomplete", "complete") and self.message_ok and self.identical \
            and not self.leftovers

    def __str__(self) -> str:
        return (f"{self.scenario} {self.signal} {self.delay_s:.3f}s after {self.when}"
                f"{'' if self.sent else ' (never sent: the run had ended)'}: rc {self.rc}, left {self.after_kill}, "
                f"message {'ok' if self.message_ok else 'MISSING'}, resumed {self.resumed}, identical "
                f"{self.identical}, leftovers {self.leftovers} {self.detail}")


def simprune(*args) -> list[str]:
    return [sys.executable, "-m", "simprune.cli", *map(str, args)]


def _default_signals() -> None:
    """In the child: SIGINT/SIGTERM back to their defaults (a job started in the background by a
    non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S)


def run_and_signal(argv: list[str], sig: str, delay: float, ready: Callable[[], bool] | None = None
                   ) -> tuple[int, str, bool]:
    """Start ``argv``; once ``ready()`` holds (polled every 2 ms; at once without it) wait ``delay``
    seconds and send ``sig``. Returns (exit code, stderr, whether the signal was sent)."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=_default_signals)
    stderr: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: stderr.append(p.stderr.read()), daemon=True)
    reader.start()  # drain stderr while waiting, so a chatty run never blocks on a full pipe
    while ready is not None and p.poll() is None and not ready():
        time.sleep(0.002)
    try:
        p.wait(timeout=delay)
        sent = False
    except subprocess.TimeoutExpired:
        p.send_signal(SIGNALS[sig])
        sent = True
    p.wait(timeout=TIMEOUT_S)
    reader.join(timeout=TIMEOUT_S)
    return p.returncode, "".join(stderr), sent


def leftovers(out: Path) -> list[str]:
    """Hidden temporaries in or next to ``out`` (an atomic write or output directory that was cut short)."""
    names = [p.name for p in out.glob(".*")] if out.is_dir() else []
    names += [p.name for p in out.parent.glob(f".{out.name}.*")]
    return sorted(names)


def reference(scenario: Scenario, workdir: Path) -> tuple[dict[str, torch.Tensor], float, float]:
    """The uninterrupted run: its result, its duration and how long it stayed busy (writing)."""
    out = workdir / f"{scenario.name}-reference"
    t0, busy_at, busy_end = time.time(), None, None
    p = subprocess.Popen(scenario.start(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    while p.poll() is None:
        busy = scenario.busy(out)
        if busy and busy_at is None:
            busy_at = time.time()
        elif not busy and busy_at is not None and busy_end is None:
            busy_end = time.time()
        time.sleep(0.002)
    seconds = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"uninterrupted {scenario.name} failed: {p.stderr.read()[-2000:]}")
    busy_at = busy_at or time.time()
    return scenario.result(out), seconds, (busy_end or time.time()) - busy_at


def trial(scenario: Scenario, workdir: Path, sig: str, delay: float, ref: dict[str, torch.Tensor],
          when: str = "start") -> Trial:
    """One kill ``delay`` seconds after the start (or after the run got busy, ``when="busy"``), the
    checks on what is left, the resume, the comparison."""
    out = workdir / f"{scenario.name}-{sig}-{when}-{delay:.3f}"
    t = Trial(scenario.name, sig, delay, when)
    t.rc, err, sent = run_and_signal(scenario.start(out), sig, delay,
                                     (lambda: scenario.busy(out)) if when == "busy" else None)
    t.sent = sent
    try:
        t.after_kill = scenario.state(out)
    except Broken as exc:
        t.after_kill, t.detail = "broken", str(exc)
        return t
    lines = err.strip().splitlines()
    if t.after_kill == "complete" and t.rc in (0, 130, -SIGNALS[sig]):
        pass  # the signal came after the work was done (e.g. while the interpreter shut down)
    elif sent and sig != "SIGKILL":
        expected = scenario.checkpoint(out)
        t.message_ok = t.rc == 130 and bool(lines) and lines[-1].startswith("interrupted") and (
            expected is None or expected in lines[-1]) and "Traceback" not in err
        if not t.message_ok:
            t.detail = f"stderr: {err[-400:]!r}"
    elif t.rc not in (0, -signal.SIGKILL):
        t.message_ok, t.detail = False, f"exit {t.rc}: {err[-400:]!r}"
    argv = scenario.resume(out)
    if argv is not None:
        done = run(argv)
        t.resumed = True
        if done.returncode != 0:
            t.detail += f" resume failed: {done.stderr[-400:]!r}"
            return t
    try:
        final = scenario.state(out)
    except Broken as exc:
        t.detail += f" after resume: {exc}"
        return t
    if final != "complete":
        t.detail += f" after resume the output is {final}"
        return t
    got = scenario.result(out)
    t.identical = got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    t.leftovers = leftovers(out)
    return t


def delays(seed: int, n: int, longest: float, shortest: float = 0.3) -> list[float]:
    """``n`` seeded moments spread over the uninterrupted run's duration."""
    rng = random.Random(seed)
    return [round(rng.uniform(shortest, longest), 2) for _ in range(n)]


# ---- simprune train ---------------------------------------------------------------------------

def write_tiny_mnist(folder: Path, n_train: int = 64, n_test: int = 16, seed: int = 0) -> Path:
    """MNIST-format IDX files (28x28, 10 classes) small enough for epochs of a fraction of a second."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 64, (n, 28, 28), dtype=np.uint8) + labels[:, None, None] * 19
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            head = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + arr.tobytes(), mtime=0))
    return folder


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from simprune.io.files import read_safetensors

    return read_safetensors(path)[0]


def train_scenario(data: Path, epochs: int = 3, limit_batches: int = 4) -> Scenario:
    """``simprune train`` on tiny IDX data; resume with --resume (or start over when no checkpoint was written)."""
    from simprune.io.files import read_json
    from simprune.train.loop import STATE_FILE

    args = ["train", "--model", "resnet20", "--data", "mnist", "--data-dir", data, "--epochs", epochs,
            "--batch-size", 16, "--limit-batches", limit_batches, "--lr", 0.05, "--seed", 0, "--quiet"]

    def start(out):
        return simprune(*args, "--out", out)

    def resume(out):
        if state(out) == "complete":
            return None
        return simprune(*args, "--out", out, "--resume" if (out / STATE_FILE).exists() else "--overwrite")

    def state(out):
        if not out.exists() or not (out / STATE_FILE).exists() and not (out / "model.json").exists():
            return "absent"  # at most train.log and the marker: nothing to keep
        try:
            epoch = int(_meta(out / STATE_FILE).get("epoch", "0")) if (out / STATE_FILE).exists() else 0
            desc = read_json(out / "model.json") if (out / "model.json").exists() else {}
            if (out / "model.safetensors").exists():
                _tensors(out / "model.safetensors")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the failure looked for
            raise Broken(f"{type(exc).__name__}: {exc}") from exc
        done = epoch == epochs and len(desc.get("history", [])) == epochs
        marked = (out / "INCOMPLETE.json").exists()
        if done and not marked:
            return "complete"
        if marked:
            return "incomplete"
        raise Broken("an unfinished training run without its INCOMPLETE.json marker")

    def result(out):
        weights = _tensors(out / "model.safetensors")
        state_ = _tensors(out / STATE_FILE)
        history = [{k: v for k, v in h.items() if k != "seconds"} for h in read_json(out / "model.json")["history"]]
        return {**{f"model.{k}": v for k, v in weights.items()}, **{f"state.{k}": v for k, v in state_.items()},
                "history": torch.tensor([v for h in history for v in h.values()], dtype=torch.float64)}

    return Scenario("train", start, resume, state, result, named_checkpoint(state),
                    busy=lambda out: (out / STATE_FILE).exists())


def named_checkpoint(state: Callable[[Path], str]) -> Callable[[Path], str]:
    """What Ctrl-C must name for a training run (train, finetune): its state file, or that there is none."""
    from simprune.train.loop import STATE_FILE

    def checkpoint(out):
        if state(out) == "complete":
            return "is complete"
        if (out / STATE_FILE).exists():
            return str(out / STATE_FILE)
        return "no checkpoint was written yet" if out.exists() and any(out.iterdir()) else "nothing was written"
    return checkpoint


def _meta(path: Path) -> dict:
    from simprune.io.files import read_safetensors

    return read_safetensors(path)[1]


def rerun_unless_complete(start: Callable, state: Callable) -> Callable[[Path], list[str] | None]:
    """The resume of a one-shot command: run it again unless its output is complete."""
    return lambda out: None if state(out) == "complete" else start(out)


# ---- simprune prune ---------------------------------------------------------------------------

def write_checkpoint(folder: Path) -> Path:
    """A seeded 1-channel ResNet-20 model directory to prune."""
    import simprune

    torch.manual_seed(0)
    model = simprune.build_model("resnet20", num_classes=10, in_channels=1)
    return simprune.save(folder, model, {"model": "resnet20", "model_args": {"num_classes": 10, "in_channels": 1},
                                         "input_shape": [1, 32, 32]}, overwrite=True)


def prune_scenario(checkpoint: Path, extra: tuple = ()) -> Scenario:
    """One-shot ``simprune prune``: its output directory appears whole or not at all; rerun to finish."""
    args = ["prune", "--checkpoint", checkpoint, "--criterion", "l1", "--target-flops", 0.5, "--no-latency", *extra]

    def start(out):
        return simprune(*args, "--out", out)

    def state(out):
        if not out.exists():
            return "absent"
        names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if not {"model.json", "model.safetensors", "report.json"} <= set(names):
            raise Broken(f"{out} holds only {names}")
        try:
            from simprune.io.files import load_model

            load_model(out)
            json.loads((out / "report.json").read_text())
        except Exception as exc:  # noqa: BLE001
            raise Broken(f"{type(exc).__name__}: {exc}") from exc
        return "complete"

    def result(out):
        return {k: v for k, v in _tensors(out / "model.safetensors").items()}

    def busy(out):  # writing the scratch directory that becomes OUT
        return any(out.parent.glob(f".{out.name}.partial-*"))

    def checkpoint(out):
        return "is complete" if state(out) == "complete" else "nothing was written"

    return Scenario("prune", start, rerun_unless_complete(start, state), state, result, checkpoint, busy)


# ---- simprune finetune ------------------------------------------------------------------------

def finetune_scenario(source: Path, data_args: tuple = ("--data", "fashion-mnist"), epochs: int = 3,
                      limit_batches: int = 2, eval_images: int = 200) -> Scenario:
    """``simprune finetune`` of a pruned model directory; resume with --resume when a checkpoint and the
    marker are there, else start over with --overwrite."""
    from simprune.train.finetune import MARKER
    from simprune.train.loop import STATE_FILE

    args = ["finetune", source, *data_args, "--epochs", epochs, "--limit-batches", limit_batches,
            "--eval-images", eval_images, "--batch-size", 32, "--seed", 0, "--quiet"]

    def start(out):
        return simprune(*args, "--out", out)

    def state(out):
        if not out.exists() or not any(out.iterdir()):
            return "absent"
        try:
            if (out / MARKER).exists():
                if (out / STATE_FILE).exists():
                    _tensors(out / STATE_FILE)
                return "incomplete"
            from simprune.io.files import load_model

            load_model(out)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the failure looked for
            raise Broken(f"{type(exc).__name__}: {exc}") from exc
        return "complete"

    def resume(out):
        if state(out) == "complete":
            return None
        go_on = (out / MARKER).exists() and (out / STATE_FILE).exists()
        return simprune(*args, "--out", out, "--resume" if go_on else "--overwrite")

    def result(out):
        return _tensors(out / "model.safetensors")

    return Scenario("finetune", start, resume, state, result, named_checkpoint(state),
                    busy=lambda out: (out / STATE_FILE).exists())


# ---- simprune export --------------------------------------------------------------------------

def export_scenario(source: Path) -> Scenario:
    """``simprune export DIR --onnx``: OUT is a copy of the model directory ``source``, and the output is
    OUT/model.onnx, there whole (checked, loads in onnxruntime) or not at all; a killed export is rerun.
    The exporter is deterministic, so the result is the file's bytes."""
    def start(out):
        if not out.exists():
            shutil.copytree(source, out)
        return simprune("export", out, "--onnx")

    def state(out):
        path = out / "model.onnx"
        if not path.exists():
            return "absent"
        try:
            import onnx
            import onnxruntime as ort

            onnx.checker.check_model(onnx.load(str(path)))
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise Broken(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        return "complete"

    def result(out):
        return {"model.onnx": torch.frombuffer(bytearray((out / "model.onnx").read_bytes()), dtype=torch.uint8)}

    def busy(out):  # the atomic write's hidden temporary next to the output
        return any(out.glob(".model.onnx.*.tmp"))

    return Scenario("export", start, rerun_unless_complete(start, state), state, result,
                    lambda out: "nothing was written", busy)


def clean(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
