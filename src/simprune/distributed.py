"""Devices and multi-process runs under ``torchrun``: device choice, process group, sharding,
all-reduce, rank-0 writes.

Everything here is a no-op on one process, so the same code runs unchanged with or without
``torchrun``. Device: ``resolve_device`` (CUDA when available, else CPU; under torchrun with CUDA,
``cuda:LOCAL_RANK``). Backend: nccl when the device is CUDA, gloo on CPU. Each rank calibrates on
its own shard of the calibration images; the statistics are summed across ranks, so every rank
scores, allocates and prunes identically (checked by :func:`check_agree`).
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from simprune.errors import SimpruneError

DEVICE_TYPES = ("cuda", "cpu")


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str | torch.device | None = None, keyword: str = "device=") -> torch.device:
    """The device to compute on: ``None`` means CUDA when available, else CPU. "cuda" without an index
    is ``cuda:LOCAL_RANK`` (one GPU per torchrun process). ``keyword`` names the option in messages
    ("device=" for the API, "--device " for the CLI); CUDA asked for but absent is refused in one line."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise SimpruneError(f"{keyword}{device} is not a device simprune runs on; pass {keyword}cuda or {keyword}cpu")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SimpruneError(f"{keyword}{device} but CUDA is not available here (torch {torch.__version__}); "
                            f"pass {keyword}cpu, or omit it to use CUDA only when present")
    index = local_rank() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise SimpruneError(f"{keyword}{device}: GPU {index} does not exist ({torch.cuda.device_count()} visible); "
                            f"pass {keyword}cuda:0 or launch fewer torchrun processes per node")
    return torch.device("cuda", index)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights live (CPU for a model without any): calibration batches go there."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def forward_precision(device: torch.device | str, precision: str = "fp32"):
    """The one autocast of simprune: "bf16" autocast on ``device``'s type, or true "fp32" (autocast off,
    also inside a caller's; on CUDA TF32 off too, cuDNN's default would round to a 10-bit mantissa)."""
    device = torch.device(device)
    bf16 = precision == "bf16"
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda" and not bf16:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); return True if distributed.
    The backend follows ``device`` (see :func:`resolve_device`): nccl on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dev = resolve_device(device)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as exc:
            raise SimpruneError(f"cannot join the torchrun process group ({str(exc).splitlines()[0][:120]}); "
                                "launch with `torchrun --nproc_per_node=P simprune ...`") from exc
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Only rank 0 writes files and prints summaries."""
    return rank() == 0


def _group_device(t: torch.Tensor) -> torch.device:
    """Where the process group reduces: nccl only reduces CUDA tensors, gloo takes any."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (float64 stays float64), on ``t``'s device; ``t`` itself on one process.
    Under nccl a CPU tensor (a count, a loss sum) travels through the GPU and comes back."""
    if not active():
        return t
    out = t.to(_group_device(t), copy=True).contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def mean_over_ranks(total: float, count: int) -> float:
    """``total / count`` over every torchrun rank's shard (this process's alone without torchrun), so that
    decisions taken on it agree across ranks."""
    if active():
        both = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64))
        total, count = float(both[0]), int(both[1])
    return total / max(count, 1)


def shard(indices: list[int], block: int = 1) -> list[int]:
    """This rank's share of ``indices``: consecutive blocks of ``block`` items dealt in turn, so shards
    differ by at most one block and a block (e.g. a null pair of calibration images) stays whole."""
    blocks = [indices[i:i + block] for i in range(0, len(indices), block)]
    return [i for b in blocks[rank()::world_size()] for i in b]


def barrier() -> None:
    if active():
        dist.barrier()


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object or of tensors (for cross-rank agreement checks)."""
    h = hashlib.sha256()
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in sorted(obj):
            h.update(k.encode())
            h.update(obj[k].detach().float().cpu().contiguous().numpy().tobytes())
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def gather_fingerprints(obj: Any) -> list[str]:
    """Every rank's fingerprint of its own ``obj`` (one entry on one process)."""
    fp = fingerprint(obj)
    if not active():
        return [fp]
    got: list[str] = [""] * world_size()
    dist.all_gather_object(got, fp)
    return got


def check_agree(obj: Any, what: str) -> str:
    """Raise unless every rank holds the same ``obj``; return its fingerprint."""
    got = gather_fingerprints(obj)
    fp = got[0]
    if active():
        if len(set(got)) != 1:
            raise SimpruneError(f"ranks disagree on the {what} ({', '.join(got)}); the processes saw different "
                                "models or data: check the seed, the checkpoint and the data path on every node")
    return fp


def average_buffers(model: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm statistics) across ranks so every rank ends equal."""
    if not active():
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            buf.copy_(all_reduce_sum(buf)).div_(world_size())


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
