"""Model files without pickle: ``model.safetensors`` + ``model.json``; atomic writes.

A model directory holds the weights (safetensors) and a JSON description (registry
name and arguments, input shape, the pruned structure, provenance). Loading builds
the model from the registry and never executes anything from the files.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .errors import SimpruneError

FORMAT = "simprune-model/1"
PICKLE_MAGIC = (b"\x80",)  # protocol 2+ pickles start with PROTO
ZIP_MAGIC = b"PK\x03\x04"  # torch.save archives
MAX_JSON_BYTES = 16 * 2**20


def versions() -> dict[str, str]:
    import torch_pruning  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415

    return {"simprune": __version__, "torch": torch.__version__, "torch_pruning": torch_pruning.__version__,
            "python": platform.python_version()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``out`` only if the block finishes.

    A failed or interrupted run leaves no ``out`` (only a hidden ``.out.partial-*``
    that is removed on the way out when possible).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SimpruneError(f"output directory {out} already exists and is not empty; pass --overwrite or pick another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual directory mode
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def state_dict_bytes(model: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return st_save(tensors, metadata=metadata)


def save_model(out_dir: Path, model: nn.Module, description: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``model.json`` (weights first, JSON last, each atomically)."""
    out_dir = Path(out_dir)
    desc = {"format": FORMAT, **description, "versions": versions()}
    atomic_write_bytes(out_dir / "model.safetensors", state_dict_bytes(model))
    atomic_write_json(out_dir / "model.json", desc)


def resolve_model_path(path: str | Path) -> tuple[Path, Path]:
    """Accept a model directory or its ``.safetensors`` file; return (weights, json)."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise SimpruneError(f"checkpoint {path} does not exist; give a model directory or its .safetensors file")
    return p, p.with_suffix(".json")


def refuse_pickle(path: Path, head: bytes) -> None:
    """Refuse pickles and torch.save archives. A safetensors file is an 8-byte length then '{'
    (its first byte may well be 0x80, pickle's PROTO opcode, so check that first)."""
    if head[8:9] == b"{":
        return
    if head.startswith(ZIP_MAGIC) or head[:1] in PICKLE_MAGIC:
        raise SimpruneError(f"{path} is a pickle/torch.save file; simprune never unpickles model files. "
                            "Convert it once with safetensors.torch.save_file(torch.load(f, weights_only=True), "
                            "'model.safetensors') in a trusted session")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, refusing pickles and reporting corruption in one line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SimpruneError(f"cannot read {path}: {exc.strerror}") from exc
    refuse_pickle(path, data[:9])
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise SimpruneError(f"{path} is not a valid safetensors file ({str(exc).splitlines()[0][:120]}); "
                            "it is truncated or corrupt, re-create it") from exc


def read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise SimpruneError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB; not a simprune model.json")
        obj = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SimpruneError(f"{path} is missing; a model needs model.safetensors and model.json side by side") from exc
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SimpruneError(f"{path} is not valid JSON ({type(exc).__name__}); re-create the model directory") from exc
    if not isinstance(obj, dict):
        raise SimpruneError(f"{path} must hold a JSON object, found {type(obj).__name__}")
    return obj


def load_weights_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> nn.Module:
    """Copy ``tensors`` into ``model`` requiring the exact same keys, shapes and finite values."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise SimpruneError(f"{source} does not match the model ({what}); check --model and its arguments")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise SimpruneError(f"{source}: {key} has shape {tuple(value.shape)} but the model expects "
                                f"{tuple(own[key].shape)}; the weights belong to another model or structure")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise SimpruneError(f"{source}: {key} contains NaN or inf; the weights are corrupt")
        if value.dtype != own[key].dtype and not (value.is_floating_point() and own[key].is_floating_point()):
            raise SimpruneError(f"{source}: {key} has dtype {value.dtype}, expected {own[key].dtype}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=True)
    return model


def _model_args(desc: dict[str, Any], source: Path) -> tuple[str, dict[str, int]]:
    name, args = desc.get("model"), desc.get("model_args", {})
    if not isinstance(name, str) or not isinstance(args, dict):
        raise SimpruneError(f"{source}: 'model' must be a string and 'model_args' an object")
    for key in ("num_classes", "in_channels"):
        if key in args and (not isinstance(args[key], int) or isinstance(args[key], bool) or not 0 < args[key] <= 100_000):
            raise SimpruneError(f"{source}: model_args.{key} must be a positive integer, got {args[key]!r}")
    unknown = set(args) - {"num_classes", "in_channels"}
    if unknown:
        raise SimpruneError(f"{source}: unexpected model_args {sorted(unknown)}")
    return name, args


def load_model(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model (from the registry, or into ``model``) and load its weights.

    Returns ``(model, description)``; the model is in eval mode.
    """
    from .models import build_model  # noqa: PLC0415
    from .pruning import apply_structure  # noqa: PLC0415

    weights_path, json_path = resolve_model_path(path)
    tensors = read_tensors(weights_path)
    desc = read_json(json_path)
    if desc.get("format") != FORMAT:
        raise SimpruneError(f"{json_path} is not a simprune model description (format {desc.get('format')!r})")
    name, args = _model_args(desc, json_path)
    if model is None:
        model = build_model(name, **args)
    if desc.get("structure"):
        apply_structure(model, desc["structure"], json_path, desc.get("input_shape"))
    load_weights_into(model, tensors, weights_path)
    return model.eval(), desc
