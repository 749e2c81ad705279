"""Wall-clock inference latency of a PyTorch model or an ONNX file on the CPU.

Each measurement is the distribution of at least 30 timed forward passes
(``time.perf_counter``) after a warm-up, at a fixed batch size and thread count,
summarised by median and spread so that before/after comparisons are honest.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import SimpruneError
from .export import require

MIN_RUNS = 30


def _check(input_shape: Sequence[int], batch: int, threads: int, runs: int, warmup: int) -> tuple[int, ...]:
    """Validate the common arguments; return the full input shape (batch first)."""
    if runs < MIN_RUNS:
        raise SimpruneError(f"runs must be at least {MIN_RUNS} for a meaningful median, got {runs}")
    if warmup < 0:
        raise SimpruneError(f"warmup must be 0 or more, got {warmup}")
    if batch < 1 or threads < 1:
        raise SimpruneError(f"batch and threads must be positive, got batch={batch}, threads={threads}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise SimpruneError(f"input shape {input_shape!r} must be positive sizes without the batch, e.g. (3, 32, 32)")
    return (batch, *shape)


def _time(fn: Callable[[], Any], runs: int, warmup: int) -> dict[str, Any]:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed; summarise in milliseconds."""
    for _ in range(warmup):
        fn()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    p10, p25, median, p75, p90 = np.percentile(times * 1e3, [10, 25, 50, 75, 90])
    return {"median_ms": float(median), "p10_ms": float(p10), "p90_ms": float(p90), "iqr_ms": float(p75 - p25),
            "runs": runs}


def measure_torch(model: nn.Module, input_shape: Sequence[int], batch: int, threads: int, runs: int = 30,
                  warmup: int = 5) -> dict[str, Any]:
    """Latency of ``model`` in eval mode under ``torch.inference_mode`` with ``threads`` intra-op threads.

    The previous thread count and the model's train/eval mode are restored afterwards.
    """
    shape = _check(input_shape, batch, threads, runs, warmup)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    previous, was_training = torch.get_num_threads(), model.training
    model.eval()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            stats = _time(lambda: model(x), runs, warmup)
    finally:
        torch.set_num_threads(previous)
        model.train(was_training)
    return {**stats, "batch": batch, "threads": threads}


def measure_onnx(path: str | Path, input_shape: Sequence[int], batch: int, threads: int, runs: int = 30,
                 warmup: int = 5) -> dict[str, Any]:
    """Latency of an ONNX file in onnxruntime on the CPU.

    Uses ``threads`` intra-op threads, one inter-op thread and all graph optimizations.
    """
    shape = _check(input_shape, batch, threads, runs, warmup)
    (ort,) = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise SimpruneError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0][:160]}") from exc
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).numpy()
    feed = {session.get_inputs()[0].name: x}
    try:
        stats = _time(lambda: session.run(None, feed), runs, warmup)
    except Exception as exc:
        raise SimpruneError(f"onnxruntime failed on input {shape}: {str(exc).splitlines()[0][:160]}") from exc
    return {**stats, "batch": batch, "threads": threads}


def compare_latency(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Speedup of ``after`` over ``before`` (ratio of medians; > 1 means faster), refusing unlike settings."""
    for key in ("batch", "threads"):
        if before.get(key) != after.get(key):
            raise SimpruneError(f"latencies measured with different {key} ({before.get(key)} vs {after.get(key)}) "
                                "cannot be compared; measure both with the same settings")
    if not after["median_ms"] > 0:
        raise SimpruneError(f"after median is {after['median_ms']} ms; cannot compute a speedup")
    return {"before_ms": before["median_ms"], "after_ms": after["median_ms"],
            "speedup": before["median_ms"] / after["median_ms"], "batch": before.get("batch"),
            "threads": before.get("threads")}
