"""Wall-clock inference latency of PyTorch models and ONNX files on the CPU.

Each measurement is the distribution of at least 30 timed forward passes
(``time.perf_counter``) after a warm-up, at a fixed batch size and thread count,
summarised by median and spread. Models compared with each other are timed
interleaved (one run of each in turn), so that load from other processes hits
them alike and before/after ratios stay honest on a busy machine. When the paired
ratios (run i of one model over run i of the other) still spread by more than
``MAX_RATIO_SPREAD``, more interleaved runs are timed, up to ``MAX_RUNS_FACTOR`` times
as many; a ratio that never settles is flagged ``stable: false`` and warned about.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from simprune import progress
from simprune.errors import SimpruneError
from simprune.export.onnx import export_onnx, require

MIN_RUNS = 30
MAX_RATIO_SPREAD = 0.10  # width of the speed-up's 95 % interval over the speed-up (about +-5 %)
MAX_RUNS_FACTOR = 8  # re-measure up to this many times the asked runs
ENGINES = ("onnxruntime", "torch")


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


def summarize(times_s: np.ndarray) -> dict[str, Any]:
    """Median, 10th/90th percentile and inter-quartile range of run times, in milliseconds."""
    p10, p25, median, p75, p90 = np.percentile(np.asarray(times_s) * 1e3, [10, 25, 50, 75, 90])
    return {"median_ms": float(median), "p10_ms": float(p10), "p90_ms": float(p90), "iqr_ms": float(p75 - p25),
            "runs": int(len(times_s))}


def time_calls(fns: Sequence[Callable[[], Any]], runs: int, warmup: int,
               clock: Callable[[], float] = time.perf_counter) -> list[np.ndarray]:
    """Warm each of ``fns`` up ``warmup`` times, then time ``runs`` rounds of one call each, in turn (seconds).

    ``clock=time.thread_time`` counts only the CPU time of the calling thread: for one-thread
    onnxruntime (which then runs on the caller) that is the latency without the time other
    processes held the core."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = np.empty((len(fns), runs))
    for i in range(runs):
        for j, fn in enumerate(fns):
            start = clock()
            fn()
            times[j, i] = clock() - start
    return list(times)


def paired_ratio(before_s: np.ndarray, after_s: np.ndarray) -> dict[str, Any]:
    """Speed-up of ``after`` over ``before`` from interleaved runs: the median of before_i / after_i and its
    distribution-free 95 % interval (order statistics n/2 -+ 0.98 sqrt(n)); ``spread`` is the interval's width
    over the median, ``stable`` whether it is within :data:`MAX_RATIO_SPREAD`. More runs narrow it."""
    ratios = np.sort(np.asarray(before_s) / np.asarray(after_s))
    n = len(ratios)
    half = 0.98 * np.sqrt(n)
    low, high = ratios[max(0, int(np.floor(n / 2 - half)))], ratios[min(n - 1, int(np.ceil(n / 2 + half)))]
    median = float(np.median(ratios))
    spread = float((high - low) / median)
    return {"speedup": median, "speedup_low": float(low), "speedup_high": float(high), "spread": spread,
            "stable": spread <= MAX_RATIO_SPREAD}


def _unstable(times: list[np.ndarray]) -> float:
    """The largest spread of any model's paired ratio against the first (0.0 for one model)."""
    return max((paired_ratio(times[0], t)["spread"] for t in times[1:]), default=0.0)


def time_until_stable(fns: Sequence[Callable[[], Any]], runs: int, warmup: int,
                      max_runs: int | None = None, clock: Callable[[], float] = time.perf_counter) -> list[np.ndarray]:
    """:func:`time_calls`, then more interleaved rounds (doubling the runs) while the paired ratios against
    the first function spread by more than :data:`MAX_RATIO_SPREAD`, up to ``max_runs`` runs in all."""
    max_runs = max_runs or MAX_RUNS_FACTOR * runs
    times = time_calls(fns, runs, warmup, clock)
    while len(fns) > 1 and len(times[0]) < max_runs:
        spread = _unstable(times)
        if spread <= MAX_RATIO_SPREAD:
            break
        more = min(len(times[0]), max_runs - len(times[0]))
        progress.stage(f"timings spread {spread:.0%}; timing {more} more interleaved runs of each model")
        times = [np.concatenate([t, n]) for t, n in zip(times, time_calls(fns, more, 0, clock))]
    return times


def _summaries(times: list[np.ndarray], batch: int, threads: int) -> list[dict[str, Any]]:
    """One summary per model; every model after the first also gets its paired ratio against the first."""
    out = []
    for i, t in enumerate(times):
        entry = {**summarize(t), "batch": batch, "threads": threads}
        if i:
            entry["vs_first"] = paired_ratio(times[0], t)
        out.append(entry)
    return out


def _input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def measure_torch_many(models: Sequence[nn.Module], input_shape: Sequence[int], batch: int, threads: int,
                       runs: int = 30, warmup: int = 5) -> list[dict[str, Any]]:
    """Latency of each model (interleaved, until the ratios settle) in eval mode under ``torch.inference_mode``
    with ``threads`` threads. The previous thread count and the models' train/eval modes are restored."""
    shape = _check(input_shape, batch, threads, runs, warmup)
    x = _input(shape)
    previous, modes = torch.get_num_threads(), [m.training for m in models]
    try:
        torch.set_num_threads(threads)
        for m in models:
            m.eval()
        with torch.inference_mode():
            times = time_until_stable([lambda m=m: m(x) for m in models], runs, warmup)
    finally:
        torch.set_num_threads(previous)
        for m, was_training in zip(models, modes):
            m.train(was_training)
    return _summaries(times, batch, threads)


def measure_torch(model: nn.Module, input_shape: Sequence[int], batch: int, threads: int, runs: int = 30,
                  warmup: int = 5) -> dict[str, Any]:
    """Latency of one model in PyTorch eager (see :func:`measure_torch_many`)."""
    return measure_torch_many([model], input_shape, batch, threads, runs, warmup)[0]


def ort_session(path: str | Path, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads, one inter-op thread, all graph optimizations."""
    (ort,) = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        source = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise SimpruneError(f"cannot load ONNX model {'<bytes>' if isinstance(path, bytes) else path}: "
                            f"{str(exc).splitlines()[0][:160]}") from exc


def measure_onnx_many(paths: Sequence[str | Path], input_shape: Sequence[int], batch: int, threads: int,
                      runs: int = 30, warmup: int = 5,
                      clock: Callable[[], float] = time.perf_counter) -> list[dict[str, Any]]:
    """Latency of each ONNX file (interleaved, until the ratios settle) in onnxruntime on the CPU
    (``clock``: see :func:`time_calls`)."""
    shape = _check(input_shape, batch, threads, runs, warmup)
    require("onnxruntime")
    sessions = [ort_session(p, threads) for p in paths]
    x = _input(shape).numpy()
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    try:
        times = time_until_stable([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)], runs,
                                  warmup, clock=clock)
    except Exception as exc:
        raise SimpruneError(f"onnxruntime failed on input {shape}: {str(exc).splitlines()[0][:160]}") from exc
    return _summaries(times, batch, threads)


def measure_onnx(path: str | Path, input_shape: Sequence[int], batch: int, threads: int, runs: int = 30,
                 warmup: int = 5) -> dict[str, Any]:
    """Latency of one ONNX file in onnxruntime (see :func:`measure_onnx_many`)."""
    return measure_onnx_many([path], input_shape, batch, threads, runs, warmup)[0]


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


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_name() -> str:
    """CPU model and core count, for saying which machine measured a latency."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


def export_for_timing(models: Sequence[nn.Module], input_shape: Sequence[int], folder: str | Path) -> list[Path]:
    """Each model exported (and verified) to ``folder/m<i>.onnx``, as onnxruntime will time it."""
    return [Path(export_onnx(m, _input((1, *input_shape)), Path(folder) / f"m{i}.onnx")["path"])
            for i, m in enumerate(models)]


def benchmark(models: Sequence[nn.Module], input_shape: Sequence[int], *, threads: int = 1,
              batches: Sequence[int] = (1, 8), runs: int = 30, warmup: int = 5,
              engines: Sequence[str] = ENGINES, onnx_files: Sequence[str | Path] | None = None
              ) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Time every model in every engine at every batch size, models interleaved within each setting.

    Returns ``{(engine, batch): [stats per model]}``. ONNX files are exported (and verified) into a
    temporary folder unless ``onnx_files`` are given, one per model and optionally more after them
    (e.g. an int8 file), which onnxruntime times too.
    """
    unknown = set(engines) - set(ENGINES)
    if unknown or not engines:
        raise SimpruneError(f"unknown engine(s) {sorted(unknown)}; use {' and/or '.join(ENGINES)}")
    shape = tuple(int(s) for s in input_shape)
    for b in batches:
        _check(shape, b, threads, runs, warmup)
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="simprune-bench-") as tmp:
        files = list(onnx_files or [])
        if "onnxruntime" in engines and not files:
            progress.stage(f"exporting {len(models)} models to ONNX for timing")
            files = export_for_timing(models, shape, tmp)
        for engine in engines:
            for b in batches:
                progress.stage(f"timing {engine} at batch {b}: {runs} interleaved runs of each model")
                if engine == "onnxruntime":
                    out[(engine, b)] = measure_onnx_many(files, shape, b, threads, runs, warmup)
                else:
                    out[(engine, b)] = measure_torch_many(models, shape, b, threads, runs, warmup)
    return out


def latency_report(timings: dict[tuple[str, int], list[dict[str, Any]]], macs_before: float, macs_after: float,
                   threads: int, runs: int, before: int = 0, after: int = 1, int8: int = 2) -> dict[str, Any]:
    """The report keys ``latency_ms``, ``speedup`` and ``latency`` from :func:`benchmark`'s timings.

    The headline is onnxruntime at batch 1 (torch eager at batch 1 when onnxruntime was not timed);
    ``speedup.ratio`` is the measured speed-up over the MAC speed-up (1.0: latency fell as MACs did).
    Settings that timed a model at index ``int8`` too (the pruned int8 file) get ``int8_*`` fields,
    and the headline ``latency_ms.int8`` and ``speedup.int8`` (over the original).
    """
    rows = []
    for (engine, batch), stats in timings.items():
        b, a = stats[before], stats[after]
        row = {"engine": engine, "batch": batch, "before_ms": b["median_ms"], "after_ms": a["median_ms"],
               "before_spread_ms": b["iqr_ms"], "after_spread_ms": a["iqr_ms"],
               "speedup": b["median_ms"] / a["median_ms"]}
        if before == 0 and a.get("vs_first"):
            pair = a["vs_first"]
            row.update({"runs": a["runs"], "speedup_low": pair["speedup_low"], "speedup_high": pair["speedup_high"],
                        "stable": pair["stable"]})
        if len(stats) > int8:
            q = stats[int8]
            row.update(int8_ms=q["median_ms"], int8_spread_ms=q["iqr_ms"], int8_speedup=b["median_ms"] / q["median_ms"])
        rows.append(row)
    head = next((r for r in rows if r["engine"] == "onnxruntime" and r["batch"] == 1), None) or \
        next((r for r in rows if r["batch"] == 1), rows[0])
    mac_speedup = macs_before / macs_after
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for r in rows:
        if r.get("stable") is False:
            progress.warn(f"{r['engine']} at batch {r['batch']}: after {r['runs']} interleaved runs the speed-up is "
                          f"still anywhere from {r['speedup_low']:.2f}x to {r['speedup_high']:.2f}x (95 % interval), so "
                          f"{r['speedup']:.2f}x means little on this machine now (1-minute load average "
                          f"{load if load is not None else float('nan'):.2f} on {os.cpu_count()} cores); time it "
                          "again when the machine is idle")
    if load is not None and load > (os.cpu_count() or 1):
        progress.warn(f"timed with a 1-minute load average of {load:.1f} on {os.cpu_count()} cores: other processes "
                      "compete for the CPU and slow the longer-running model more, so the speed-ups may be "
                      "inflated; time again on an idle machine before publishing them")
    if head["speedup"] < 1 and head.get("speedup_high", head["speedup"]) < 1:
        progress.warn(f"the pruned model is slower than the original: {head['speedup']:.2f}x in {head['engine']} at "
                      f"batch {head['batch']} for {mac_speedup:.2f}x fewer MACs. Kept widths off the runtime's vector "
                      "block are the usual cause: keep the default alignment (round_to=None, or leave out "
                      "--round-to 1), or prune to a latency target instead of MACs")
    keys = {"latency_ms": {"before": head["before_ms"], "after": head["after_ms"]},
            "speedup": {"measured": head["speedup"], "macs": mac_speedup, "ratio": head["speedup"] / mac_speedup},
            "latency": {"threads": threads, "runs": runs, "machine": machine_name(), "load_average": load,
                        "stable": all(r.get("stable", True) for r in rows), "rows": rows}}
    if "int8_ms" in head:
        keys["latency_ms"]["int8"] = head["int8_ms"]
        keys["speedup"]["int8"] = head["int8_speedup"]
    return keys
