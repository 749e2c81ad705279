"""ONNX export that is checked before it is kept.

The model is exported with the torch.export-based ("dynamo") exporter, or the legacy
TorchScript exporter when that fails, then validated with ``onnx.checker`` and run in
onnxruntime at two batch sizes against PyTorch eager. Only a file that matches is
written (atomically, as one self-contained file).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from simprune.errors import SimpruneError
from simprune.io.files import atomic_write_bytes

ATOL = 1e-4
NOISE_FACTOR = 4  # onnxruntime may be off the exact result as much as PyTorch is, each way, with margin
MAX_BYTES = 2**31 - 1  # protobuf's limit for one serialized ONNX file
_NOISY_LOGGERS = ("torch.onnx", "onnxscript")


def require(*modules: str) -> list[Any]:
    """Import optional ONNX dependencies, or raise a one-line install hint."""
    found, missing = [], []
    with _signals_held():  # a Ctrl-C inside an extension's init turns into ImportError ("not installed")
        for name in modules:
            try:
                found.append(importlib.import_module(name))
            except ImportError:
                missing.append(name)
    if missing:
        raise SimpruneError(f"{' and '.join(missing)} not installed (needed for ONNX export and latency); "
                            "pip install 'simprune[onnx]'")
    return found


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM (main thread only) until the block is done, then stop as Ctrl-C would."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
    if pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress logs and deprecation warnings (library code returns, never prints)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, in order: a tensor, or tuples, lists and dicts of them (ultralytics'
    ``(predictions, {...})``, Hugging Face's ``ModelOutput``); ``None`` entries are skipped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None:
        return []
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flatten_outputs(o)]
    raise SimpruneError(f"the model returns a {type(out).__name__}, which ONNX cannot carry; return tensors "
                        "(or tuples, lists, dicts of them)")


class FlatOutputs(nn.Module):
    """``model`` returning its output's tensors as one flat tuple (one tensor alone): what ONNX carries."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        out = flatten_outputs(self.model(x))
        return out[0] if len(out) == 1 else tuple(out)


def output_names(model: nn.Module, x: torch.Tensor) -> list[str]:
    """``["output"]`` for one output tensor, else ``output_0``, ``output_1``, ... (one forward pass to count)."""
    with torch.no_grad():  # not inference_mode: a head caching tensors (YOLO's anchors) is traced afterwards
        n = len(flatten_outputs(model(x)))
    if n == 0:
        raise SimpruneError("the model returns no tensor; nothing to export")
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _export_dynamo(model: nn.Module, x: torch.Tensor, opset: int, dynamic_batch: bool, names: list[str]) -> bytes:
    """Serialized model from the torch.export-based exporter (raises if it cannot honour ``opset``, or specialises
    the batch axis, e.g. a head caching its last input shape)."""
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with _quiet():
        program = torch.onnx.export(FlatOutputs(model), (x,), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                    input_names=["input"], output_names=names, verbose=False,
                                    external_data=False)
    proto = program.model_proto
    got = _opset_of(proto)
    if got != opset:
        raise RuntimeError(f"it produced opset {got}, not the requested {opset}")
    if dynamic_batch and not proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param:
        raise RuntimeError("it fixed the batch axis (the model branches on its input's shape)")
    return proto.SerializeToString()


def _export_legacy(model: nn.Module, x: torch.Tensor, opset: int, dynamic_batch: bool, names: list[str]) -> bytes:
    """Serialized model from the legacy TorchScript exporter."""
    axes = {n: {0: "batch"} for n in ["input", *names]} if dynamic_batch else None
    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(FlatOutputs(model), (x,), buf, dynamo=False, opset_version=opset, dynamic_axes=axes,
                          input_names=["input"], output_names=names, verbose=False)
    return buf.getvalue()


def _opset_of(proto: Any) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _max_abs_diff(expected: np.ndarray, got: np.ndarray) -> float:
    """Largest |expected - got|; NaN in only one of them counts as infinitely different."""
    if expected.shape != got.shape:
        return float("inf")
    diff = np.abs(expected.astype(np.float64) - got.astype(np.float64))
    diff[np.isnan(expected) & np.isnan(got)] = 0.0
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))


def _other_batch(x: torch.Tensor) -> torch.Tensor:
    """A deterministic input with a different batch size, to prove the batch axis is really dynamic."""
    gen = torch.Generator().manual_seed(0)
    shape = (x.shape[0] + 2, *x.shape[1:])
    return (torch.randn(shape, generator=gen) * x.std().clamp_min(1e-3) + x.mean()).to(x.dtype)


def _verify(data: bytes, model: nn.Module, inputs: list[torch.Tensor], atol: float) -> tuple[float, int | None]:
    """Check the ONNX model and compare onnxruntime with eager PyTorch; return (worst difference, opset)."""
    onnx, ort = require("onnx", "onnxruntime")
    try:
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnx/ort raise their own exception types
        raise SimpruneError(f"exported ONNX model is invalid ({_first_line(exc)}); file not written") from exc
    name = session.get_inputs()[0].name
    worst = 0.0
    for x in inputs:
        with torch.inference_mode():
            outs = [t.cpu().numpy() for t in flatten_outputs(model(x))]
        try:
            gots = session.run(None, {name: x.cpu().numpy()})
        except Exception as exc:
            raise SimpruneError(f"onnxruntime failed at batch {x.shape[0]} ({_first_line(exc)}); "
                                "file not written") from exc
        if len(gots) != len(outs):
            raise SimpruneError(f"the ONNX model has {len(gots)} outputs, PyTorch {len(outs)}; file not written")
        for i, (expected, got) in enumerate(zip(outs, gots)):
            worst = max(worst, _check_output(model, x, expected, got, atol, i if len(outs) > 1 else None))
    return worst, _opset_of(proto)


def _check_output(model: nn.Module, x: torch.Tensor, expected: np.ndarray, got: np.ndarray, atol: float,
                  index: int | None) -> float:
    """The difference of one output (``index``: which of several), refused beyond ``atol`` x scale and the noise."""
    diff = _max_abs_diff(expected, got)
    scale = max(1.0, float(np.nan_to_num(np.abs(expected), posinf=0.0).max(initial=0.0)))
    if not diff <= atol * scale:
        floor = _float32_noise(model, x, expected, index or 0)
        if not diff <= NOISE_FACTOR * floor:
            which = "" if index is None else f" {index}"
            raise SimpruneError(f"ONNX output{which} differs from PyTorch by {diff:.3g} (> {atol:g}"
                                f"{f' x output scale {scale:.3g}' if scale > 1 else ''}; PyTorch's own float32 "
                                f"rounding is {floor:.2g}) at batch {x.shape[0]}; the export is not equivalent, "
                                "file not written")
    return diff


def _float32_noise(model: nn.Module, x: torch.Tensor, expected: np.ndarray, index: int = 0) -> float:
    """How far float32 PyTorch itself is from float64 PyTorch on ``x``: the rounding floor that no correct
    export can be asked to beat (large for ill-conditioned weights, e.g. after aggressive compensation)."""
    try:
        m64 = copy.deepcopy(model).double()
        with torch.inference_mode():
            exact = flatten_outputs(m64(x.double()))[index].cpu().numpy()
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 gets no allowance
        return 0.0
    return _max_abs_diff(exact, expected)


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, opset: int = 18,
                dynamic_batch: bool = True, atol: float = ATOL) -> dict[str, Any]:
    """Export ``model`` to one self-contained ONNX file, kept only if onnxruntime matches eager within ``atol``.

    ``atol`` is absolute for outputs up to 1 in size and relative to the largest output beyond
    (float32 rounding grows with the values: random-weight ResNets reach 1e4). A model whose own
    float32 result is further than that from its float64 result is held to ``NOISE_FACTOR`` times
    that rounding floor instead: a difference PyTorch itself cannot resolve is not an export error.

    Tries the dynamo exporter, falling back to the legacy one (``notice`` says why, also as a warning).
    """
    require("onnx", "onnxruntime")
    path = Path(path)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size >= MAX_BYTES:
        raise SimpruneError(f"model weights are {size / 2**30:.1f} GiB; single-file ONNX export needs under 2 GiB")
    was_training = model.training
    model.eval()
    try:
        notice, exporter, names = None, "dynamo", output_names(model, example_input)
        try:
            data = _export_dynamo(model, example_input, opset, dynamic_batch, names)
        except Exception as exc:  # any exporter failure means: try the other exporter
            notice, exporter = f"dynamo ONNX exporter failed ({_first_line(exc)}); used the legacy exporter", "legacy"
            try:
                data = _export_legacy(model, example_input, opset, dynamic_batch, names)
            except Exception as exc2:
                raise SimpruneError(f"ONNX export failed with both exporters (dynamo: {_first_line(exc)}; "
                                    f"legacy: {_first_line(exc2)})") from exc2
            warnings.warn(notice, RuntimeWarning, stacklevel=2)
        if len(data) >= MAX_BYTES:
            raise SimpruneError("exported ONNX model is over 2 GiB; single-file export is not possible")
        inputs = [example_input] + ([_other_batch(example_input)] if dynamic_batch else [])
        model.eval()  # the legacy exporter may leave it in training mode
        diff, got_opset = _verify(data, model, inputs, atol)
    finally:
        model.train(was_training)
    atomic_write_bytes(path, data)
    return {"path": str(path), "opset": got_opset, "exporter": exporter, "max_abs_diff": diff, "bytes": len(data),
            "notice": notice, "outputs": names}
