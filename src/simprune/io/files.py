"""Model files without pickle: ``model.safetensors`` + ``model.json``; atomic writes.

A model directory holds the weights (safetensors) and a JSON description (registry
name and arguments, input shape, the pruned structure, provenance). Loading builds
the model from the registry and never executes anything from the files.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
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

from simprune.errors import SimpruneError
from simprune.graph.removal import apply_structure
from simprune.io.description import _check_names, _input_shape, _model_args, _precheck_names, _trusted, build_described
from simprune.models.adapters import adapt_for_pruning
from simprune.models.external import is_builder_spec

FORMAT = "simprune-model/1"
PICKLE_MAGIC = (b"\x80",)  # protocol 2+ pickles start with PROTO
ZIP_MAGIC = b"PK\x03\x04"  # torch.save archives
MAX_JSON_BYTES = 16 * 2**20
DIGEST_KEY = "simprune.sha256"  # safetensors metadata: sha256 of the tensors and the other metadata


def versions() -> dict[str, str]:
    import torch_pruning  # noqa: PLC0415

    from simprune import __version__  # noqa: PLC0415

    return {"simprune": __version__, "torch": torch.__version__, "torch_pruning": torch_pruning.__version__,
            "python": platform.python_version()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path, prefix: str) -> None:
    """Delete ``prefix<pid>-*`` temporaries (files or folders) left by killed processes (SIGKILL skips cleanup)."""
    with contextlib.suppress(OSError):
        for p in Path(folder).glob(f"{glob.escape(prefix)}*"):
            pid = p.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()


def remove_replaced(out: Path) -> None:
    """Delete what a killed process left beside the output folder ``out`` while replacing it (its previous
    contents, ``.out.old-PID-*``, between publishing the new folder and removing the old one): a SIGKILL
    in that window leaves ``out`` complete, so no later write into it would clean up; the next read does."""
    remove_stale(Path(out).parent, f".{Path(out).name}.old-")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
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

    A failed or interrupted run leaves no ``out`` (only a hidden ``.out.partial-PID-*``, removed
    on the way out, or by the next run when the process was killed). Without ``overwrite``, an
    ``out`` that another run wrote meanwhile is never replaced.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SimpruneError(f"output {out} is a file, not a directory; pick another out_dir=")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SimpruneError(f"output directory {out} already exists and is not empty; pass overwrite=True or pick "
                            "another")
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("partial", "old"):
        remove_stale(out.parent, f".{out.name}.{kind}-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual directory mode
    try:
        yield tmp
        _publish(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out`` (atomic when ``out`` is absent or empty)."""
    try:
        os.rename(tmp, out)  # replaces an empty directory, fails on a non-empty one
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise SimpruneError(f"cannot create {out}: {exc.strerror}") from exc
    if not overwrite:
        raise SimpruneError(f"output directory {out} was written by another run meanwhile; kept it and discarded "
                            "this run's result (pass overwrite=True to replace it)")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rename(out, old / "out")
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def lock_for_writing(f, folder: Path) -> None:
    """Hold an exclusive lock on the open file ``f`` while it stays open (the kernel drops it when the
    process ends, even on SIGKILL): a second run writing into the same ``folder`` is refused."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # not on POSIX: no lock
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise SimpruneError(f"another simprune run is writing to {folder}; wait for it to finish or pick "
                            "another out_dir=") from exc


def tensor_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes and the metadata (but the digest itself)."""
    h = hashlib.sha256()
    for key, value in sorted((metadata or {}).items()):
        if key != DIGEST_KEY:
            h.update(json.dumps([key, value]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def digested_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[bytes, str]:
    """safetensors bytes carrying their own digest, so that any later damage is refused on reading; and
    that digest."""
    meta = {k: v for k, v in (metadata or {}).items() if k != DIGEST_KEY}
    meta[DIGEST_KEY] = tensor_digest(tensors, meta)
    return st_save(tensors, metadata=meta), meta[DIGEST_KEY]


def tensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return digested_bytes(tensors, metadata)[0]


def save_model(out_dir: Path, model: nn.Module, description: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``model.json`` (weights first, JSON last, each atomically); the JSON
    records the weights' sha256, so damage to the digest inside the weights file is caught too."""
    out_dir = Path(out_dir)
    adapt_for_pruning(model)  # the form load rebuilds (exact; e.g. split halves as two convs)
    data, digest = digested_bytes({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    desc = {"format": FORMAT, **description, "weights_sha256": digest, "versions": versions()}
    atomic_write_bytes(out_dir / "model.safetensors", data)
    atomic_write_json(out_dir / "model.json", desc)


def resolve_model_path(path: str | Path) -> tuple[Path, Path]:
    """Accept a model directory or its ``.safetensors`` file; return (weights, json)."""
    p = Path(path)
    if not p.exists():
        raise SimpruneError(f"checkpoint {path} does not exist; give a model directory or its .safetensors file")
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file() or p.suffix != ".safetensors":
        what = "folder holds no model.safetensors" if Path(path).is_dir() else "file is not a .safetensors file"
        raise SimpruneError(f"{path} is not a simprune model (the {what}); give a directory that simprune train, "
                            "prune or save() wrote")
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


def read_safetensors(path: Path, require_digest: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; refuses pickles, and damage wherever the file
    carries a digest (every file simprune writes does). ``require_digest`` is for files only simprune
    writes: a missing digest there means its key was damaged, so nothing else can be trusted."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SimpruneError(f"cannot read {path}: {exc.strerror}") from exc
    refuse_pickle(path, data[:9])
    try:
        tensors = st_load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # already validated by st_load
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise SimpruneError(f"{path} is not a valid safetensors file ({str(exc).splitlines()[0][:120]}); "
                            "it is truncated or corrupt, re-create it") from exc
    meta = header.get("__metadata__") or {}
    if require_digest and DIGEST_KEY not in meta:
        raise SimpruneError(f"{path} is damaged or not written by simprune: it lacks the sha256 simprune saves "
                            "with it; re-create it or restore a good copy")
    if DIGEST_KEY in meta and meta[DIGEST_KEY] != tensor_digest(tensors, meta):
        raise SimpruneError(f"{path} is damaged: its content no longer matches the sha256 it was saved with; "
                            "re-create it or restore a good copy")
    return tensors, meta


def read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise SimpruneError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB; not a simprune model.json")
        obj = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SimpruneError(f"{path} is missing; a model needs model.safetensors and model.json side by side") from exc
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SimpruneError(f"{path} is not valid JSON ({type(exc).__name__}); re-create the model directory") from exc
    if not isinstance(obj, dict):
        raise SimpruneError(f"{path} must hold a JSON object, found {type(obj).__name__}")
    return obj


def load_weights_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> nn.Module:
    """Copy ``tensors`` into ``model`` requiring the exact same keys, shapes, kinds and finite values
    (floats are converted to the model's dtype, and must stay finite there)."""
    own = model.state_dict()
    _check_names(own, tensors, source)
    converted = {}
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise SimpruneError(f"{source}: {key} has shape {tuple(value.shape)} but the model expects "
                                f"{tuple(own[key].shape)}; the weights belong to another model or structure")
        if value.is_floating_point() != own[key].is_floating_point() or (
                not value.is_floating_point() and value.dtype != own[key].dtype):
            raise SimpruneError(f"{source}: {key} has dtype {value.dtype}, expected {own[key].dtype}")
        if value.is_floating_point():
            value = value.to(own[key].dtype)
            if not torch.isfinite(value).all():
                raise SimpruneError(f"{source}: {key} contains NaN or inf (as {own[key].dtype}); the weights are corrupt")
        converted[key] = value
    state = type(own)(converted)
    state._metadata = getattr(own, "_metadata", None)  # module versions (MNASNet refuses a state without them)
    model.load_state_dict(state, strict=True)
    return model


def check_runs(model: nn.Module, shape: tuple[int, ...], source: Path) -> None:
    """One forward pass on a zero image: corrupt index buffers or statistics fail here, in one line."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape))
    except Exception as exc:  # noqa: BLE001 - whatever the corruption makes the model raise
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise SimpruneError(f"{source}: the model does not run on its input shape {list(shape)} "
                            f"({type(exc).__name__}: {first}); the files are corrupt") from exc
    if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
        raise SimpruneError(f"{source}: the model gives NaN or inf on a zero image; its weights or statistics "
                            "are corrupt")


def load_model(path: str | Path, model: nn.Module | None = None, allow_incomplete: bool = False,
               builder: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model (from the registry, or into ``model``) and load its weights.

    Returns ``(model, description)``; the model is in eval mode. A directory of an unfinished run
    (``INCOMPLETE.json``) is refused unless ``allow_incomplete`` (resuming it).
    """

    weights_path, json_path = resolve_model_path(path)
    remove_replaced(weights_path.parent)
    if not allow_incomplete and (weights_path.parent / "INCOMPLETE.json").exists():
        raise SimpruneError(f"{weights_path.parent} is an unfinished run (INCOMPLETE.json); finish it by rerunning "
                            "the command that wrote it with resume=True, or start again with overwrite=True")
    tensors, meta = read_safetensors(weights_path)
    desc = read_json(json_path)
    if desc.get("format") != FORMAT:
        raise SimpruneError(f"{json_path} is not a simprune model description (format {desc.get('format')!r})")
    if "weights_sha256" in desc and meta.get(DIGEST_KEY) != desc["weights_sha256"]:
        raise SimpruneError(f"{weights_path} does not carry the sha256 {json_path.name} recorded when it was saved: "
                            "it is damaged or comes from another save; re-create it or restore a good copy")
    name, args = _model_args(desc, json_path)
    shape = _input_shape(desc, json_path)
    if model is None:
    
        if name is not None and (not is_builder_spec(name) or _trusted(name, builder)):
            _precheck_names(name, args, tensors, weights_path)
        model = build_described(name, args, json_path, builder, desc.get("architecture"))
    adapt_for_pruning(model)
    if desc.get("structure"):
        apply_structure(model, desc["structure"], json_path, desc.get("input_shape"))
    load_weights_into(model, tensors, weights_path)
    if shape is not None:
        check_runs(model.eval(), shape, weights_path)
    return model.eval(), desc
