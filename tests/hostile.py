"""Hostile and broken inputs for simprune's file readers: valid seed files, mutations, verdicts.

Shared by ``tests/test_fuzz_files.py`` (hypothesis picks the cases) and ``bench/robustness.py``
(fixed seeds, more cases). One case writes a valid file set, damages one file with a named
mutation (tests/mutations.py), runs simprune's own reader under a time and memory limit, and classifies the result:

  refused    a one-line SimpruneError (ours)
  identical  loaded, equal to what the undamaged files give (the damage was immaterial)
  accepted   loaded exactly what the damaged file validly holds: a hostile writer's self-consistent
             file, or (data sets) pixel bytes, which IDX, CIFAR and JPEG carry no checksum for

Anything else fails: ``traceback`` (an exception not ours), ``multiline`` (our error, but not one
line), ``wrong`` (loaded something the file does not hold), ``hang``, ``memory``, and ``code-ran``
(a pickle's payload executed).
"""
from __future__ import annotations

import contextlib
import gzip
import pickle
import random
import resource
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load as st_load
from torch import nn

from simprune.errors import SimpruneError
from tests.mutations import (
    BYTES,
    CIFAR,
    IDX,
    IMAGES,
    JSONS,
    SAFETENSORS,
    VALID_CONTENT,
    _cifar_entry,
    _idx,
    gz_bomb,
    gz_concat,
    gz_header,
    ts_metadata,
)

OK = ("refused", "identical", "accepted")
SENTINEL = "PAYLOAD-RAN"  # a pickle payload creates this file next to the case's files
TIME_LIMIT_S = 30
MEMORY_LIMIT_MIB = 1536  # above the process's size at the start of the case


@dataclass
class Outcome:
    target: str
    mutation: str
    seed: int
    verdict: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict in OK

    def __str__(self) -> str:
        return f"{self.target} / {self.mutation} / seed {self.seed}: {self.verdict} {self.detail}"


# ---- targets --------------------------------------------------------------------------------

@dataclass
class Target:
    """A reader under test: ``make`` writes valid files into a folder and returns what loading them
    gives; ``files`` lists the files a mutation may hit; ``load`` runs simprune's reader;
    ``same`` compares two results; ``content`` (optional) is what a damaged file validly holds."""

    name: str
    make: Callable[[Path], Any]
    files: Callable[[Path], list[Path]]
    load: Callable[[Path], Any]
    same: Callable[[Any, Any], bool]
    mutations: dict[str, Callable]
    valid_content: set[str]
    content: Callable[[Path, Any], Any] | None = None  # (folder, loaded) -> True when loaded == file content
    pre: Callable[[bytes], bytes] | None = None  # e.g. gunzip before a format-aware mutation
    post: Callable[[bytes], bytes] | None = None


def _model_desc():
    return {"model": "resnet20", "model_args": {"num_classes": 10, "in_channels": 1}, "input_shape": [1, 32, 32],
            "data": {"name": "fashion-mnist", "pad_to": 32}, "command": "fuzz"}


X = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def _make_model(folder: Path):
    import simprune
    from simprune.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1)
    with torch.no_grad():  # non-trivial BN statistics, so that every tensor matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    pruned, _ = simprune.prune(model, torch.zeros(1, 1, 32, 32), "l1", {"flops": 0.3})
    simprune.save(folder, pruned, _model_desc(), overwrite=True)
    return _load_model(folder)


def _load_model(folder: Path):
    from simprune.io.files import load_model

    model, _ = load_model(folder)
    with torch.no_grad():
        return {"out": model(X), "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _same_model(a, b) -> bool:
    return (a["state"].keys() == b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
            and torch.equal(a["out"], b["out"]))


def _model_content(folder: Path, loaded) -> bool:
    """The loaded state holds exactly the file's tensors (floats converted to the model's dtype)."""
    tensors = st_load((folder / "model.safetensors").read_bytes())
    state = loaded["state"]
    return tensors.keys() == state.keys() and all(
        tensors[k].shape == state[k].shape and torch.equal(tensors[k].to(state[k].dtype), state[k]) for k in state)


class _Tiny(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def _make_state(folder: Path):
    from simprune.train.loop import TrainConfig, make_optimizer, save_train_state

    torch.manual_seed(0)
    model = _Tiny()
    cfg = TrainConfig(epochs=3, batch_size=4)
    opt = make_optimizer(model, cfg)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 1, 6, 6)).square().mean().backward()
        opt.step()
    history = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}]
    save_train_state(folder, model, opt, 2, history, cfg)
    return _load_state(folder)


def _load_state(folder: Path):
    from simprune.train.loop import TrainConfig, load_train_state, make_optimizer

    model = _Tiny()
    opt = make_optimizer(model, TrainConfig())
    epoch, history = load_train_state(folder, model, opt)[:2]
    names = {id(p): n for n, p in model.named_parameters()}
    momentum = {names[id(p)]: s["momentum_buffer"].clone() for p, s in opt.state.items() if "momentum_buffer" in s}
    if not (isinstance(epoch, int) and isinstance(history, list)):
        raise WrongResult(f"load_train_state returned {type(epoch).__name__}, {type(history).__name__}")
    return {"epoch": epoch, "history": history, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "momentum": momentum}


def _same_state(a, b) -> bool:
    return (a["epoch"] == b["epoch"] and a["history"] == b["history"] and a["momentum"].keys() == b["momentum"].keys()
            and all(torch.equal(a["momentum"][k], b["momentum"][k]) for k in a["momentum"])
            and a["state"].keys() == b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]))


def _state_content(folder: Path, loaded) -> bool:
    tensors = st_load((folder / "train_state.safetensors").read_bytes())
    own = {f"model.{k}": v for k, v in loaded["state"].items()} | {f"optim.{k}": v for k, v in loaded["momentum"].items()}
    return tensors.keys() == own.keys() and all(
        tensors[k].shape == own[k].shape and torch.equal(tensors[k].to(own[k].dtype), own[k]) for k in own)


IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _make_idx(gz: bool):
    def make(folder: Path):
        rng = np.random.default_rng(0)
        for stem in IDX_STEMS:
            n = 12 if stem.startswith("train") else 6
            if "images" in stem:
                raw = _idx((n, 28, 28), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes())
            else:
                raw = _idx((n,), (np.arange(n) % 10).astype(np.uint8).tobytes())
            (folder / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
        return _load_data("fashion-mnist")(folder)
    return make


def _load_data(name: str, **kw):
    def load(folder: Path):
        from simprune.io.data import load_dataset

        out = []
        for split in ("train", "test"):
            ds = load_dataset(name, split, data_dir=str(folder), **kw)
            if not (ds.images.dtype == torch.uint8 and ds.images.ndim == 4 and len(ds.labels) == len(ds.images)
                    and ds.labels.dtype == torch.int64 and int(ds.labels.min()) >= 0
                    and int(ds.labels.max()) < ds.num_classes):
                raise WrongResult(f"{name} {split} loaded in an invalid form")
            out.append((ds.images.clone(), ds.labels.clone()))
        return out
    return load


def _same_data(a, b) -> bool:
    return all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def _valid_data(folder, loaded) -> bool:
    return True  # the loader's own checks above ran: uint8 images, labels in range, counts agree


def _make_cifar(folder: Path):
    rng = random.Random(0)
    sub = folder / "cifar-10-batches-py"
    sub.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (sub / name).write_bytes(pickle.dumps(_cifar_entry(2, rng), protocol=2))
    return _load_data("cifar10")(folder)


def _make_images(folder: Path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        d = folder / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for i, fmt in enumerate(("PNG", "JPEG")):
            img = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
            img.save(d / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}", format=fmt)
    return _load_images(folder)


def _load_images(folder: Path):
    from simprune.io.data import load_dataset

    ds = load_dataset(f"imagefolder:{folder}", "train", image_size=8)
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([i[0] for i in items])
    if x.shape != (4, 3, 8, 8) or not torch.isfinite(x).all():
        raise WrongResult(f"imagefolder gave {tuple(x.shape)} images")
    return x, [i[1] for i in items]


def _same_images(a, b) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1]


def _gunzip(data: bytes) -> bytes:
    return gzip.decompress(data)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _only(folder: Path, name: str) -> list[Path]:
    return [folder / name]


TARGETS = {
    "model.safetensors": Target("model.safetensors", _make_model, lambda f: _only(f, "model.safetensors"),
                                _load_model, _same_model, {**BYTES, **SAFETENSORS}, VALID_CONTENT, _model_content),
    "model.json": Target("model.json", _make_model, lambda f: _only(f, "model.json"), _load_model, _same_model,
                         {**{k: BYTES[k] for k in ("truncate", "flip_bits", "overwrite_run", "insert_bytes",
                                                   "delete_range", "empty_file", "random_file", "pickle_payload")},
                          **JSONS}, set()),
    "train_state.safetensors": Target("train_state.safetensors", _make_state,
                                      lambda f: _only(f, "train_state.safetensors"), _load_state, _same_state,
                                      {**BYTES, **SAFETENSORS, "ts_metadata": ts_metadata},
                                      VALID_CONTENT, _state_content),
    "IDX": Target("IDX", _make_idx(False), lambda f: [f / s for s in IDX_STEMS], _load_data("fashion-mnist"),
                  _same_data, {**{k: BYTES[k] for k in ("truncate", "flip_bits", "flip_head_bits", "overwrite_run",
                                                        "insert_bytes", "delete_range", "append_junk", "empty_file",
                                                        "random_file")}, **IDX},
                  {"flip_bits", "flip_head_bits", "overwrite_run"}, _valid_data),
    "IDX.gz": Target("IDX.gz", _make_idx(True), lambda f: [f / (s + ".gz") for s in IDX_STEMS],
                     _load_data("fashion-mnist"), _same_data,
                     {**{k: BYTES[k] for k in ("truncate", "flip_bits", "flip_head_bits", "overwrite_run",
                                               "insert_bytes", "append_junk", "empty_file", "random_file")},
                      "gz_bomb": gz_bomb, "gz_header": gz_header, "gz_concat": gz_concat, **IDX},
                     set(), _valid_data, pre=_gunzip, post=_gzip),
    "CIFAR batch": Target("CIFAR batch", _make_cifar,
                          lambda f: sorted((f / "cifar-10-batches-py").iterdir()), _load_data("cifar10"), _same_data,
                          {**{k: BYTES[k] for k in ("truncate", "flip_bits", "flip_head_bits", "overwrite_run",
                                                    "insert_bytes", "delete_range", "append_junk", "empty_file",
                                                    "random_file", "pickle_payload")}, **CIFAR},
                          {"flip_bits", "flip_head_bits", "overwrite_run", "insert_bytes", "delete_range",
                           "cifar_fields"}, _valid_data),
    "imagefolder image": Target("imagefolder image", _make_images,
                                lambda f: sorted(f.glob("train/*/*")), _load_images, _same_images,
                                {**{k: BYTES[k] for k in ("truncate", "flip_bits", "flip_head_bits", "overwrite_run",
                                                          "insert_bytes", "delete_range", "append_junk", "empty_file",
                                                          "random_file", "pickle_payload")}, **IMAGES},
                                {"flip_bits", "overwrite_run", "insert_bytes", "delete_range", "append_junk",
                                 "truncate", "flip_head_bits", "image_modes"}, lambda f, x: True),
}
FORMAT_AWARE = {"IDX": set(IDX), "IDX.gz": set(IDX)}  # these mutate the decompressed bytes


# ---- running a case ---------------------------------------------------------------------------

class _Limit(Exception):
    pass


class WrongResult(Exception):
    """A reader returned something invalid (raised by the targets' own checks)."""


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def limits(seconds: int | None = None, extra_mib: int | None = None):
    """Raise _Limit after ``seconds``; make allocations fail beyond ``extra_mib`` more address space."""
    seconds, extra_mib = seconds or TIME_LIMIT_S, extra_mib or MEMORY_LIMIT_MIB

    def on_alarm(signum, frame):
        raise _Limit("hang")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_bytes() + extra_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old_handler)


@dataclass
class Context:
    sentinel: Path


class Fuzzer:
    """Builds each target's valid files once, then runs cases against fresh copies of them."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self._pristine: dict[str, tuple[dict[str, bytes], Any]] = {}

    def pristine(self, target: Target) -> tuple[dict[str, bytes], Any]:
        if target.name not in self._pristine:
            folder = self.workdir / f"pristine-{len(self._pristine)}"
            folder.mkdir(parents=True)
            reference = target.make(folder)
            files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
            self._pristine[target.name] = (files, reference)
        return self._pristine[target.name]

    def run(self, target_name: str, mutation: str, seed: int) -> Outcome:
        target = TARGETS[target_name]
        files, reference = self.pristine(target)
        folder = self.workdir / "case"
        if folder.exists():
            shutil.rmtree(folder)
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        rng = random.Random(seed)
        ctx = Context(folder / SENTINEL)
        victim = rng.choice(target.files(folder))
        if target_name.startswith("IDX") and mutation == "idx_labels" and "labels" not in victim.name:
            victim = victim.with_name(victim.name.replace("images-idx3", "labels-idx1"))
        fn = target.mutations[mutation]
        data = victim.read_bytes()
        if target.pre and mutation in FORMAT_AWARE.get(target_name, ()):
            data = target.post(fn(target.pre(data), rng, ctx))
        else:
            data = fn(data, rng, ctx)
        victim.write_bytes(data)
        verdict, detail = self._judge(target, mutation, folder, reference)
        if ctx.sentinel.exists():
            verdict, detail = "code-ran", "a pickle payload executed"
        return Outcome(target_name, mutation, seed, verdict, detail)

    @staticmethod
    def _judge(target: Target, mutation: str, folder: Path, reference) -> tuple[str, str]:
        try:
            with limits():
                loaded = target.load(folder)
        except SimpruneError as exc:
            msg = str(exc)
            if "\n" in msg or not msg.strip():
                return "multiline", repr(msg[:300])
            return "refused", msg[:300]
        except WrongResult as exc:
            return "wrong", str(exc)
        except _Limit:
            return "hang", f"no answer within {TIME_LIMIT_S} s"
        except MemoryError:
            return "memory", f"needed more than {MEMORY_LIMIT_MIB} MiB"
        except Exception as exc:  # noqa: BLE001 - anything not ours is the failure we look for
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            if "alloc" in text.lower() and "memory" in text.lower():
                return "memory", f"{type(exc).__name__}: {text}"
            return "traceback", f"{type(exc).__name__}: {text}"
        if target.same(loaded, reference):
            return "identical", ""
        if mutation in target.valid_content and target.content is not None and target.content(folder, loaded):
            return "accepted", ""
        return "wrong", "loaded, but not what the files hold"


def all_cases(per_mutation: int, seed0: int = 0):
    """Every (target, mutation) pair ``per_mutation`` times with fixed seeds."""
    for name, target in TARGETS.items():
        for mutation in target.mutations:
            for k in range(per_mutation):
                yield name, mutation, seed0 + k
