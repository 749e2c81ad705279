"""Static int8 quantization with onnxruntime's own tools, kept only when it agrees with float32.

The model is exported to float32 ONNX (verified, :func:`simprune.export.onnx.export_onnx`),
pre-processed as onnxruntime recommends (``quant_pre_process``: symbolic shape inference and
graph optimisation) and quantized by ``quantize_static``: QDQ format, int8 weights per output
channel, uint8 activations (onnxruntime's U8S8 kernels on x86; with int8 activations ResNet-56
ran 2.5x slower than float32 on this project's Xeon) whose ranges are the 99.99th percentile of
their values on the calibration images, collected one batch at a time (MobileNetV2's int8 file
agreed with float32 on 88 % of the photographs where min/max ranges gave 80 %; ResNet-56 on
Fashion-MNIST lost under 0.1 point either way). The int8 file then runs beside the float32 one
in onnxruntime on evaluation images; it is written (atomically) only when its top-1 is within
``max_drop`` points of float32's or, for images without labels, when it picks float32's class
on at least ``min_agreement`` % of them. A model with other outputs (a detector's boxes and scores, a
segmenter's maps) is checked without labels: the int8 outputs' squared error relative to the part of the
float32 outputs that varies from image to image, channel by channel, must stay within ``max_output_error``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from simprune.calibrate.batches import Calibration, batch_images
from simprune.errors import SimpruneError
from simprune.export.latency import ort_session
from simprune.export.onnx import _quiet, export_onnx, require
from simprune.io.files import atomic_write_bytes

INT8_FILE = "model.int8.onnx"
MAX_DROP = 1.0  # top-1 points the int8 file may lose against float32 on labelled images
MIN_AGREEMENT = 90.0  # % of unlabelled images on which int8 must pick float32's class
PERCENTILE = 99.99  # activation range: this percentile of |values| over the calibration images
MAX_OUTPUT_ERROR = 0.05  # non-classifiers: int8's squared error / float32's image-to-image spread, per channel
EVAL_BATCH = 256


class BatchReader:
    """onnxruntime's CalibrationDataReader protocol (``get_next``, ``set_range``, ``len``) over image batches.

    ``set_range`` lets ``quantize_static`` (option ``CalibStridedMinMax``) reduce the activation ranges
    one batch at a time, so calibration memory does not grow with the number of images."""

    def __init__(self, batches: Iterable, input_name: str):
        self.arrays = [x.numpy().astype(np.float32) for x in Calibration.of(batches).images("cpu")]
        self.input_name = input_name
        self.images = sum(len(a) for a in self.arrays)
        self.set_range(0, len(self.arrays))

    def __len__(self) -> int:
        return len(self.arrays)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._todo = iter(self.arrays[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._todo, None)
        return None if x is None else {self.input_name: x}


def _labels(batch) -> torch.Tensor | None:
    return batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 and batch[1] is not None else None


def top1_side_by_side(sessions: list, evaluation: Iterable) -> dict[str, Any]:
    """Run every session on every batch; top-1 % of each (None without labels) and % agreeing with the first."""
    name = sessions[0].get_inputs()[0].name
    picks: list[list[np.ndarray]] = [[] for _ in sessions]
    labels: list[np.ndarray] | None = []
    for batch in evaluation:
        x = batch_images(batch).numpy().astype(np.float32)
        for out, s in zip(picks, sessions):
            out.append(np.asarray(s.run(None, {name: x})[0]).argmax(1))
        y = _labels(batch)
        labels = None if labels is None or y is None else labels + [np.asarray(y)]
    if not picks[0]:
        raise SimpruneError("no evaluation images to check the int8 model on")
    preds = [np.concatenate(p) for p in picks]
    truth = None if labels is None else np.concatenate(labels)
    return {"images": int(len(preds[0])),
            "top1": [None if truth is None else float((p == truth).mean() * 100) for p in preds],
            "agreement": [float((p == preds[0]).mean() * 100) for p in preds]}


def is_classifier_session(session) -> bool:
    """One output shaped (batch, classes): checked by top-1; anything else by :func:`outputs_side_by_side`."""
    outputs = session.get_outputs()
    return len(outputs) == 1 and len(outputs[0].shape) == 2


class _Spread:
    """Streaming sums over images of one reference output, per channel (dimension 1): its image-to-image
    spread and the squared error of another output against it, without keeping the outputs (a detector's
    are megabytes per image)."""

    def __init__(self):
        self.n, self.total, self.squares, self.error = 0, 0.0, 0.0, 0.0

    def add(self, reference: np.ndarray, other: np.ndarray) -> None:
        channels = reference.shape[1] if reference.ndim > 1 else 1
        r = reference.astype(np.float64).reshape(reference.shape[0], channels, -1)  # (images, channels, rest)
        o = other.astype(np.float64).reshape(r.shape)
        self.n += r.shape[0]
        self.total = self.total + r.sum(0)
        self.squares = self.squares + (r * r).sum(0)
        self.error = self.error + ((o - r) ** 2).sum((0, 2))

    def ratios(self) -> np.ndarray:
        """Per channel: squared error over the squared deviation from the mean image (floored at 1e-6 of
        the output's mean channel spread, so a constant channel cannot divide by zero)."""
        energy = (self.squares - self.total ** 2 / max(self.n, 1)).sum(1)
        return self.error / np.maximum(energy, 1e-6 * max(float(energy.mean()), 1e-30))


def outputs_side_by_side(sessions: list, evaluation: Iterable) -> dict[str, Any]:
    """Run every session on every batch; for each, the squared error of its outputs against the first
    session's relative to their spread over the images, channel by channel (a detector's class scores
    count beside its pixel boxes), averaged over every channel of every output (0 for the first session;
    labels, if any, unused)."""
    name = sessions[0].get_inputs()[0].name
    spreads: list[list[_Spread]] = [[] for _ in sessions]
    images = 0
    for batch in evaluation:
        x = batch_images(batch).numpy().astype(np.float32)
        reference = sessions[0].run(None, {name: x})
        images += len(x)
        for per, s in zip(spreads, sessions):
            outs = reference if s is sessions[0] else s.run(None, {name: x})
            if not per:
                per.extend(_Spread() for _ in outs)
            for acc, r, o in zip(per, reference, outs):
                acc.add(np.asarray(r), np.asarray(o))
    if images < 2:
        raise SimpruneError(f"checking a model with several outputs needs at least 2 evaluation images, got {images}")
    return {"images": images,
            "output_error": [float(np.concatenate([a.ratios() for a in per]).mean()) for per in spreads]}


def int8_verdict(fp32_top1: float | None, int8_top1: float | None, agreement: float | None,
                 max_drop: float = MAX_DROP, min_agreement: float = MIN_AGREEMENT, output_error: float | None = None,
                 max_output_error: float = MAX_OUTPUT_ERROR) -> str | None:
    """Why the int8 model is refused (one line), or None when it is within tolerance.

    With labels the test is the top-1 drop in points; without, the share of images on which int8
    and float32 pick the same class; for a model that is not a classifier, ``output_error``."""
    if output_error is not None:
        if not output_error <= max_output_error:
            return (f"int8 outputs differ from float32's by {output_error:.4f} of their image-to-image spread "
                    f"(squared, mean over channels; tolerance {max_output_error:g})")
        return None
    if fp32_top1 is not None and int8_top1 is not None:
        drop = fp32_top1 - int8_top1
        if not drop <= max_drop:
            return (f"int8 top-1 {int8_top1:.2f} % is {abs(drop):.2f} points {'below' if drop >= 0 else 'above'} "
                    f"float32's {fp32_top1:.2f} % "
                    f"(tolerance {max_drop:.1f} points)")
        return None
    if not agreement >= min_agreement:
        return (f"int8 picks float32's class on {agreement:.1f} % of the images (tolerance: at least "
                f"{min_agreement:g} %)")
    return None


RANGES = {"percentile": f"{PERCENTILE}th percentile",
          "minmax": "min/max: the percentile histogram could not bin a nearly constant activation"}


def _quantize(fp32_path: Path, reader: BatchReader, work: Path) -> tuple[bytes, str]:
    """quant_pre_process then quantize_static (QDQ, per-channel int8 weights, uint8 activations, percentile
    ranges; min/max where onnxruntime's histogram cannot bin an activation's range). Returns the file and
    how its ranges were set (a :data:`RANGES` value)."""
    # onnxruntime.quantization is imported here, not at the top: it is a heavy optional dependency
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static  # noqa: PLC0415
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    pre, out = work / "pre.onnx", work / "int8.onnx"
    methods = {"percentile": (CalibrationMethod.Percentile, {"CalibPercentile": PERCENTILE}),
               "minmax": (CalibrationMethod.MinMax, {})}
    try:
        with _quiet(), contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrator prints progress
            _pre_process(quant_pre_process, fp32_path, pre)
            for name, (method, extra) in methods.items():
                reader.set_range(0, len(reader))
                try:
                    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                    nodes_to_exclude=output_tail(str(pre)),
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    calibrate_method=method, extra_options={**extra, "CalibStridedMinMax": 1})
                    return out.read_bytes(), RANGES[name]
                except ValueError as exc:  # "Too many bins for data range": a range below float resolution
                    if name != "percentile" or "bins" not in str(exc):
                        raise
    except Exception as exc:  # onnxruntime's tools raise many types; one line names the step
        text = str(exc).strip().splitlines()
        raise SimpruneError(f"onnxruntime quantization failed ({text[0][:200] if text else type(exc).__name__}); "
                            "int8 file not written") from exc
    raise AssertionError("unreachable: the last method returns or raises")


WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def output_tail(onnx_path: str) -> list[str]:
    """Names of the nodes after the last weighted layer on every path to the outputs: a detector's box
    decoding, sigmoid and final concat. They stay float32: quantized, a concat of pixel coordinates (0-640)
    and class scores (0-1) shares one uint8 scale and the scores round to nothing (measured on YOLOv8n:
    squared error 2.0 of the scores' spread); ultralytics' own int8 exports keep that part float too. A
    classifier's tail is empty (its logits are the last Gemm's)."""
    (onnx,) = require("onnx")
    graph = onnx.load(onnx_path).graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    feeds_weighted: dict[int, bool] = {}

    def reaches_weighted(node) -> bool:  # memoised depth-first search downstream (graphs are acyclic)
        key = id(node)
        if key not in feeds_weighted:
            feeds_weighted[key] = False
            feeds_weighted[key] = any(r.op_type in WEIGHTED_OPS or reaches_weighted(r)
                                      for out in node.output for r in readers.get(out, []))
        return feeds_weighted[key]
    return [n.name for n in graph.node if n.op_type not in WEIGHTED_OPS and n.name and not reaches_weighted(n)]


def _pre_process(quant_pre_process, fp32_path: Path, pre: Path) -> None:
    """onnxruntime's pre-processing; where its symbolic shape inference cannot finish (YOLO's Detect head:
    "Incomplete symbolic shape inference"), again with conflicting dimensions merged, then without it (the
    ONNX shape inference and graph optimisation still run), as onnxruntime's quantization guide advises."""
    attempts = ({}, {"auto_merge": True}, {"skip_symbolic_shape": True})
    for i, extra in enumerate(attempts):
        try:
            with contextlib.chdir(pre.parent):  # a failed inference saves sym_shape_infer_temp.onnx in the cwd
                quant_pre_process(str(fp32_path.resolve()), str(pre.resolve()), **extra)
            return
        except Exception:  # noqa: BLE001 -- onnxruntime raises plain Exception here; the last one propagates
            if i == len(attempts) - 1:
                raise


def _quantized_nodes(data: bytes) -> int:
    (onnx,) = require("onnx")
    return sum(n.op_type == "QuantizeLinear" for n in onnx.load_from_string(data).graph.node)


def quantize_int8(model: nn.Module, example_input: torch.Tensor, calibration: Iterable, evaluation: Iterable,
                  path: str | Path, *, threads: int = 1, max_drop: float = MAX_DROP,
                  min_agreement: float = MIN_AGREEMENT, original: nn.Module | None = None,
                  max_output_error: float = MAX_OUTPUT_ERROR) -> dict[str, Any]:
    """Write ``path``: ``model`` statically quantized to int8 by onnxruntime, verified against float32.

    ``calibration`` and ``evaluation`` yield image batches, or (images, labels) batches: with
    labels the check is top-1 within ``max_drop`` points of float32, without it is top-1 agreement
    with float32 of at least ``min_agreement`` %; a model that is not a classifier (several outputs, or one
    not shaped (batch, classes)) is checked by :func:`outputs_side_by_side` within ``max_output_error``.
    Both files run in onnxruntime with ``threads`` threads. Returns the check's numbers, the file's size and
    how it was made; with ``original`` (the unpruned model) also its float32 top-1 in onnxruntime on the same
    images (``original_top1``).
    """
    require("onnx", "onnxruntime")
    start, path = time.perf_counter(), Path(path)
    with tempfile.TemporaryDirectory(prefix="simprune-int8-") as tmp:
        work = Path(tmp)
        fp32 = export_onnx(model, example_input, work / "fp32.onnx")
        reader = BatchReader(calibration, "input")
        if reader.images == 0:
            raise SimpruneError("no calibration images for int8 quantization")
        data, ranges = _quantize(work / "fp32.onnx", reader, work)
        quantized = _quantized_nodes(data)
        if not quantized:
            raise SimpruneError(f"onnxruntime quantized no tensor of this model; {path} not written")
        sessions = [ort_session(work / "fp32.onnx", threads), ort_session(data, threads)]
        if original is not None:
            export_onnx(original, example_input, work / "original.onnx")
            sessions.append(ort_session(work / "original.onnx", threads))
        classifier = is_classifier_session(sessions[0])
        check = top1_side_by_side(sessions, evaluation) if classifier else outputs_side_by_side(sessions[:2], evaluation)
    if classifier:
        (fp32_top1, int8_top1), agreement, error = check["top1"][:2], check["agreement"][1], None
        tolerance = {"max_drop": max_drop} if int8_top1 is not None else {"min_agreement": min_agreement}
    else:
        fp32_top1 = int8_top1 = agreement = None
        error, tolerance = check["output_error"][1], {"max_output_error": max_output_error}
    refused = int8_verdict(fp32_top1, int8_top1, agreement, max_drop, min_agreement, error, max_output_error)
    if refused:
        raise SimpruneError(f"{refused} on {check['images']} images; {path} not written")
    atomic_write_bytes(path, data)
    return {"path": str(path), "bytes": len(data), "fp32_bytes": fp32["bytes"], "images": check["images"],
            "fp32_top1": fp32_top1, "int8_top1": int8_top1, "agreement": agreement, "output_error": error,
            "original_top1": check["top1"][2] if original is not None and classifier else None,
            "tolerance": tolerance,
            "calibration_images": reader.images, "quantized_tensors": quantized,
            "method": f"onnxruntime quantize_static: QDQ, int8 weights per channel, uint8 activations "
                      f"({ranges})",
            "onnxruntime": importlib.metadata.version("onnxruntime"), "seconds": time.perf_counter() - start}
