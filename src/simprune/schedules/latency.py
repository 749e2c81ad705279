"""Measured latency per layer at a few widths, and pruning to a latency target with it.

MACs are only a proxy for speed. For ``--target-latency`` every prunable conv/linear
layer is rebuilt as a one-node ONNX graph (Conv+Relu, or Gemm) at its real input size
and timed in onnxruntime at batch 1 on a grid of kept input/output widths (multiples of
8 channels, at most 8 per axis, so the vector-block steps of the CPU kernels show);
layers with the same configuration are timed once. Between grid points the latency is
interpolated bilinearly (made monotone: fewer channels never cost more). The whole
model's measured latency is spread over the layers in proportion to their timed
latency: what one-layer timing misses (activations, additions, pooling, memory traffic,
and on a busy machine the preemption that hits long runs harder) grows with the layers'
work too. The allocator then weighs channels by these milliseconds instead
of MACs, and :func:`prune_to_latency` corrects its prediction with real measurements
of the exported pruned model until the target holds within the tolerance.
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from simprune.allocation.allocator import CostModel
from simprune.criteria import ScoreCache
from simprune.errors import SimpruneError
from simprune.export.latency import measure_onnx_many, ort_session, time_calls
from simprune.export.onnx import export_onnx, require
from simprune.graph.counting import Cost, count
from simprune.graph.groups import ChannelGroup, PruningGraph, is_depthwise
from simprune.schedules.oneshot import Job, prune_oneshot
from simprune.schedules.report import PruneReport

POINTS = 8  # widths timed per channel axis
OPSET, IR_VERSION = 17, 8


@dataclass
class LayerLatency:
    """Latency (ms) of one layer on a grid of kept input fractions x kept output fractions."""

    f_in: list[float]
    f_out: list[float]
    ms: list[list[float]]  # [len(f_in)][len(f_out)]

    def __call__(self, f_in: float, f_out: float) -> float:
        grid = np.asarray(self.ms, dtype=float)
        along_out = [np.interp(f_out, self.f_out, row) for row in grid]  # np.interp clamps outside the grid
        return float(np.interp(f_in, self.f_in, along_out))


@dataclass
class LatencyTable:
    """Per-layer latencies (by layer name), the whole model's latency, and how the table was made."""

    layers: dict[str, LayerLatency]
    base_ms: float
    threads: int
    seconds: float = 0.0
    configs: int = 0
    points: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        """Whole-model latency over the sum of the layers' timed latencies (each layer counted once)."""
        total = sum(layer(1.0, 1.0) for layer in self.layers.values())
        return self.base_ms / total if total > 0 else 1.0

    def cost_model(self, groups: list[ChannelGroup], base: Cost) -> CostModel:
        """The allocator's cost model with latency as a third cost (layers scaled to the whole model)."""
        k = self.scale
        scaled = {name: (lambda fi, fo, f=layer: k * f(fi, fo)) for name, layer in self.layers.items()}
        return CostModel(groups, base, latency=scaled, base_latency_ms=self.base_ms)

    def predict(self, groups: list[ChannelGroup], base: Cost, removed: dict[str, int]) -> float:
        """Predicted whole-model latency (ms) with ``removed[root]`` channels gone from each group."""
        cost = self.cost_model(groups, base)
        return cost.totals([removed.get(g.root, 0) for g in groups])[2]

    def summary(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "configs": self.configs, "points": self.points,
                "seconds": self.seconds, "threads": self.threads, "base_ms": self.base_ms,
                "layers_ms": self.base_ms / self.scale, "skipped": self.skipped}


def monotone(ms: np.ndarray) -> np.ndarray:
    """Running maximum along both axes (fractions ascending): fewer channels never cost more."""
    return np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1)


def widths(channels: int, points: int = POINTS, multiple: int = 1) -> list[int]:
    """Channel counts to time on one axis: evenly spaced multiples of 8 (or of ``multiple`` for grouped
    convs), at most ``points`` of them, ending at ``channels``."""
    step = 8 * max(1, -(-channels // (8 * points)))
    step = -(-step // multiple) * multiple
    out = sorted({c for c in range(step, channels, step)} | {channels})
    return out[-points:]


# ---- one-layer ONNX graphs ----------------------------------------------------------------------

def _layer_graph(module: nn.Module, in_shape: tuple[int, ...], c_in: int, c_out: int) -> bytes:
    """A one-layer ONNX model (Conv+Relu or Gemm) with random weights, batch 1."""
    require("onnx")
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(0)
    if isinstance(module, nn.Linear):
        x_shape, y_shape = [1, c_in], [1, c_out]
        w = rng.standard_normal((c_out, c_in), dtype=np.float32)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    else:
        groups = c_in if is_depthwise(module) else module.groups
        h, wd = in_shape[-2:]
        kh, kw = module.kernel_size
        (sh, sw), (dh, dw), (ph, pw) = module.stride, module.dilation, module.padding
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        x_shape, y_shape = [1, c_in, h, wd], [1, c_out, oh, ow]
        w = rng.standard_normal((c_out, c_in // groups, kh, kw), dtype=np.float32)
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[kh, kw], strides=[sh, sw],
                                  dilations=[dh, dw], pads=[ph, pw, ph, pw], group=groups),
                 helper.make_node("Relu", ["c"], ["y"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(c_out, np.float32), "b")]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    return model.SerializeToString()


def _identity_graph(shape: list[int]) -> bytes:
    require("onnx")
    from onnx import TensorProto, helper  # noqa: PLC0415

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "overhead",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION).SerializeToString()


def _time_graph(data: bytes, x_shape: list[int], threads: int, runs: int, warmup: int) -> float:
    """Median ms of one ONNX graph at batch 1."""
    session = ort_session(data, threads)
    feed = {session.get_inputs()[0].name: np.random.default_rng(1).standard_normal(x_shape, dtype=np.float32)}
    return float(np.median(time_calls([lambda: session.run(None, feed)], runs, warmup)[0]) * 1e3)


# ---- the table -----------------------------------------------------------------------------------

def _timed_layers(model: nn.Module, example_input: torch.Tensor, groups: list[ChannelGroup]
                  ) -> dict[str, tuple[nn.Module, tuple[int, ...], bool, bool]]:
    """Each conv/linear in some group: (module, its input shape, input varies, output varies)."""
    varies: dict[str, list[bool]] = {}
    modules: dict[str, nn.Module] = {}
    for group in groups:
        for m in group.members:
            if isinstance(m.module, (nn.Conv2d, nn.Linear)):
                flags = varies.setdefault(m.name, [False, False])
                modules[m.name] = model.get_submodule(m.name)  # by name: groups may come from a copy
                if m.dim == "out":
                    flags[1] = True
                else:
                    flags[0] = True
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(_module, inputs) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))
        return record

    hooks = [mod.register_forward_pre_hook(hook(name)) for name, mod in modules.items()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {}
    for name, mod in modules.items():
        vin, vout = varies[name]
        if is_depthwise(mod):
            vin, vout = False, vin or vout  # one width: in = out = groups
        out[name] = (mod, shapes[name], vin, vout)
    return out


def build_latency_table(model: nn.Module, example_input: torch.Tensor, groups: list[ChannelGroup], base_ms: float,
                        *, threads: int = 1, points: int = POINTS, runs: int = 10, warmup: int = 2,
                        progress: Callable[[str], None] | None = None) -> LatencyTable:
    """Time every prunable layer of ``model`` at a few widths of its channels (see the module doc).

    ``base_ms`` is the measured onnxruntime latency of the whole model at batch 1 with ``threads``.
    """
    require("onnx", "onnxruntime")
    if points < 2 or runs < 1:
        raise SimpruneError(f"a latency table needs at least 2 widths per axis and 1 run, got {points}, {runs}")
    t0 = time.perf_counter()
    cache: dict[tuple, LayerLatency] = {}
    overheads: dict[tuple, float] = {}
    layers, skipped, timed = {}, [], 0
    for name, (mod, shape, vin, vout) in _timed_layers(model, example_input, groups).items():
        if isinstance(mod, nn.Conv2d) and (isinstance(mod.padding, str) or mod.padding_mode != "zeros"):
            skipped.append(name)
            continue
        in_ch = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
        out_ch = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        depthwise = is_depthwise(mod)
        mult = 1 if isinstance(mod, nn.Linear) or depthwise else mod.groups
        key = (type(mod).__name__, in_ch, out_ch, shape[1:], vin, vout, depthwise,
               *(() if isinstance(mod, nn.Linear) else (mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                                       mod.groups)))
        if key not in cache:
            c_ins = widths(in_ch, points, mult) if vin else [in_ch]
            c_outs = widths(out_ch, points, mult) if vout else [out_ch]
            grid = np.zeros((len(c_ins), len(c_outs)))
            for i, ci in enumerate(c_ins):
                for j, c_out in enumerate(c_outs):
                    c_in = c_out if depthwise else ci
                    x_shape = [1, c_in, *shape[2:]]
                    t = _time_graph(_layer_graph(mod, shape, c_in, c_out), x_shape, threads, runs, warmup)
                    if tuple(x_shape) not in overheads:  # session.run and copying the input, not the layer
                        overheads[tuple(x_shape)] = _time_graph(_identity_graph(x_shape), x_shape, threads, runs,
                                                                warmup)
                    grid[i, j] = max(0.0, t - overheads[tuple(x_shape)])
                    timed += 1
            cache[key] = LayerLatency([c / in_ch for c in c_ins], [c / out_ch for c in c_outs],
                                      monotone(grid).tolist())
            if progress:
                progress(f"{name}: {grid[-1, -1]:.3f} ms at full width")
        layers[name] = cache[key]
    return LatencyTable(layers, float(base_ms), threads, time.perf_counter() - t0, len(cache), timed, skipped)


# ---- pruning to a measured latency target -------------------------------------------------------------

def next_guess(history: list[tuple[float, float]], goal: float) -> float:
    """The next allocator target from (allocator target, measured reduction) pairs.

    Once one guess fell short and another overshot, the next lies between the closest two (secant,
    kept off the ends); before that, it moves by the miss. Measured reductions step with the CPU's
    vector blocks, so the map is not smooth and bracketing keeps the search from cycling.
    """
    short = [(r, m) for r, m in history if m < goal]
    over = [(r, m) for r, m in history if m >= goal]
    if short and over:
        hi, m_hi = min(over)
        below = [(r, m) for r, m in short if r < hi]
        if below:
            lo, m_lo = max(below)
            t = (goal - m_lo) / (m_hi - m_lo) if m_hi > m_lo else 0.5
            return float(lo + min(0.8, max(0.2, t)) * (hi - lo))
    r, m = history[-1]
    return float(np.clip(r + (goal - m), 0.01, 0.95))


@dataclass
class _Measurer:
    """Times pruned candidates against the original ONNX file and compares with the table's prediction."""

    x: torch.Tensor
    tmp: Path
    base_path: Path
    table: LatencyTable
    groups: list[ChannelGroup]
    base_cost: Cost
    threads: int
    runs: int

    def step(self, pruned: nn.Module, report, it: int, guess: float) -> dict[str, float]:
        """Export one candidate, time it against the original (interleaved), and predict it from the table."""
        cand = self.tmp / f"pruned{it}.onnx"
        export_onnx(pruned, self.x, cand)
        before, after = measure_onnx_many([self.base_path, cand], tuple(self.x.shape[1:]), 1, self.threads, self.runs)
        removed = {g["root"]: g["channels_before"] - g["channels_after"] for g in report["groups"]}
        predicted = 1 - self.table.predict(self.groups, self.base_cost, removed) / self.table.base_ms
        return {"allocator_target": guess, "predicted": predicted,
                "measured": 1 - after["median_ms"] / before["median_ms"], "before_ms": before["median_ms"],
                "after_ms": after["median_ms"], "flops_reduction": report["reduction"]["flops"]}


def prune_to_latency(job: Job, ratio: float, *, threads: int = 1, tolerance: float = 0.02, max_iterations: int = 6,
                     runs: int = 50, table: LatencyTable | None = None,
                     log: Callable[[str], None] | None = None) -> tuple[nn.Module, PruneReport]:
    """Prune ``job.model`` (a copy per try) so that its onnxruntime batch-1 latency drops by ``ratio``
    (within ``tolerance``).

    Builds the latency table (unless given), allocates with it, exports and measures the pruned
    model against the original (interleaved), and re-aims the allocator until the measured reduction
    is within ``tolerance``. Returns the closest pruned model and its report, whose ``latency_target``
    lists every iteration.
    """
    if not 0 < ratio < 1:
        raise SimpruneError(f"latency target {ratio} is outside (0, 1); give the fraction of latency to remove, e.g. 0.3")
    log = log or (lambda _line: None)
    model, x = job.model, job.example[:1]
    job = job.replace(criterion=ScoreCache(job.criterion, reuse=True), example=x)
    model.eval()
    groups = PruningGraph(copy.deepcopy(model), x, ignore=job.selection.ignore).groups
    base_cost = count(model, x)
    history: list[tuple[float, float]] = []
    iterations, best = [], None
    with tempfile.TemporaryDirectory(prefix="simprune-latency-") as tmp:
        base_path = Path(tmp) / "original.onnx"
        export_onnx(model, x, base_path)
        if table is None:
            (base_stats,) = measure_onnx_many([base_path], tuple(x.shape[1:]), 1, threads, runs)
            table = build_latency_table(model, x, groups, base_stats["median_ms"], threads=threads)
            log(f"latency table: {len(table.layers)} layers, {table.configs} distinct, {table.points} points, "
                f"{table.seconds:.1f} s")
        measurer = _Measurer(x, Path(tmp), base_path, table, groups, base_cost, threads, runs)
        guess = ratio
        for it in range(max_iterations):
            try:
                pruned, report = prune_oneshot(job.replace(model=copy.deepcopy(model), target={"latency": guess}),
                                               latency_table=table)
            except SimpruneError as exc:
                if not iterations:
                    raise
                log(f"iteration {it + 1}: allocator target {guess:.3f} not reachable ({exc}); stopping")
                break
            step = measurer.step(pruned, report, it, guess)
            iterations.append(step)
            measured = step["measured"]
            log(f"iteration {it + 1}: allocator target {guess:.3f} -> measured {measured:.3f} "
                f"({step['before_ms']:.3f} -> {step['after_ms']:.3f} ms, MACs -{report['reduction']['flops']:.1%})")
            if best is None or abs(measured - ratio) < abs(best[2]["measured"] - ratio):
                best = (pruned, report, step)
            if abs(measured - ratio) <= tolerance:
                break
            history.append((guess, measured))
            guess = next_guess(history, ratio)
    pruned, report, step = best
    report["target"] = {"latency": ratio}
    report["latency_target"] = {"ratio": ratio, "tolerance": tolerance, "achieved": step["measured"],
                                "met": abs(step["measured"] - ratio) <= tolerance, "iterations": iterations,
                                "table": table.summary()}
    return pruned, report
