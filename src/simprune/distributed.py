"""Multi-process runs under ``torchrun``: process group, sharding, all-reduce, rank-0 writes.

Everything here is a no-op on one process, so the same code runs unchanged with or without
``torchrun``. Backend: gloo on CPU, nccl when CUDA is available. Each rank calibrates on its own
shard of the calibration images; the statistics are summed across ranks, so every rank scores,
allocates and prunes identically (checked by :func:`check_agree`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
import torch.distributed as dist

from simprune.errors import SimpruneError


def init_from_env() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); return True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
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


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (float64 stays float64); ``t`` itself on one process."""
    if not active():
        return t
    out = t.clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def shard(indices: list[int]) -> list[int]:
    """This rank's share of ``indices`` (strided, so shards differ by at most one item)."""
    return indices[rank()::world_size()]


def barrier() -> None:
    if active():
        dist.barrier()


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object or of tensors (for cross-rank agreement checks)."""
    h = hashlib.sha256()
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in sorted(obj):
            h.update(k.encode())
            h.update(obj[k].detach().float().contiguous().numpy().tobytes())
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
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world_size())


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
