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
on at least ``min_agreement`` % of them.
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


def int8_verdict(fp32_top1: float | None, int8_top1: float | None, agreement: float, max_drop: float = MAX_DROP,
                 min_agreement: float = MIN_AGREEMENT) -> str | None:
    """Why the int8 model is refused (one line), or None when it is within tolerance.

    With labels the test is the top-1 drop in points; without, the share of images on which int8
    and float32 pick the same class."""
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


def _quantize(fp32_path: Path, reader: BatchReader, work: Path) -> bytes:
    """quant_pre_process then quantize_static (QDQ, per-channel int8 weights, uint8 activations, percentile)."""
    # onnxruntime.quantization is imported here, not at the top: it is a heavy optional dependency
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static  # noqa: PLC0415
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    pre, out = work / "pre.onnx", work / "int8.onnx"
    try:
        with _quiet(), contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrator prints progress
            quant_pre_process(str(fp32_path), str(pre))
            quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.Percentile,
                            extra_options={"CalibPercentile": PERCENTILE, "CalibStridedMinMax": 1})
    except Exception as exc:  # onnxruntime's tools raise many types; one line names the step
        text = str(exc).strip().splitlines()
        raise SimpruneError(f"onnxruntime quantization failed ({text[0][:200] if text else type(exc).__name__}); "
                            "int8 file not written") from exc
    return out.read_bytes()


def _quantized_nodes(data: bytes) -> int:
    (onnx,) = require("onnx")
    return sum(n.op_type == "QuantizeLinear" for n in onnx.load_from_string(data).graph.node)


def quantize_int8(model: nn.Module, example_input: torch.Tensor, calibration: Iterable, evaluation: Iterable,
                  path: str | Path, *, threads: int = 1, max_drop: float = MAX_DROP,
                  min_agreement: float = MIN_AGREEMENT, original: nn.Module | None = None) -> dict[str, Any]:
    """Write ``path``: ``model`` statically quantized to int8 by onnxruntime, verified against float32.

    ``calibration`` and ``evaluation`` yield image batches, or (images, labels) batches: with
    labels the check is top-1 within ``max_drop`` points of float32, without it is top-1 agreement
    with float32 of at least ``min_agreement`` %. Both files run in onnxruntime with ``threads``
    threads. Returns the check's numbers, the file's size and how it was made; with ``original``
    (the unpruned model) also its float32 top-1 in onnxruntime on the same images (``original_top1``).
    """
    require("onnx", "onnxruntime")
    start, path = time.perf_counter(), Path(path)
    with tempfile.TemporaryDirectory(prefix="simprune-int8-") as tmp:
        work = Path(tmp)
        fp32 = export_onnx(model, example_input, work / "fp32.onnx")
        reader = BatchReader(calibration, "input")
        if reader.images == 0:
            raise SimpruneError("no calibration images for int8 quantization")
        data = _quantize(work / "fp32.onnx", reader, work)
        quantized = _quantized_nodes(data)
        if not quantized:
            raise SimpruneError(f"onnxruntime quantized no tensor of this model; {path} not written")
        sessions = [ort_session(work / "fp32.onnx", threads), ort_session(data, threads)]
        if original is not None:
            export_onnx(original, example_input, work / "original.onnx")
            sessions.append(ort_session(work / "original.onnx", threads))
        check = top1_side_by_side(sessions, evaluation)
    (fp32_top1, int8_top1), agreement = check["top1"][:2], check["agreement"][1]
    refused = int8_verdict(fp32_top1, int8_top1, agreement, max_drop, min_agreement)
    if refused:
        raise SimpruneError(f"{refused} on {check['images']} images; {path} not written")
    atomic_write_bytes(path, data)
    return {"path": str(path), "bytes": len(data), "fp32_bytes": fp32["bytes"], "images": check["images"],
            "fp32_top1": fp32_top1, "int8_top1": int8_top1, "agreement": agreement,
            "original_top1": check["top1"][2] if original is not None else None,
            "tolerance": {"max_drop": max_drop} if int8_top1 is not None else {"min_agreement": min_agreement},
            "calibration_images": reader.images, "quantized_tensors": quantized,
            "method": f"onnxruntime quantize_static: QDQ, int8 weights per channel, uint8 activations "
                      f"({PERCENTILE}th percentile)",
            "onnxruntime": importlib.metadata.version("onnxruntime"), "seconds": time.perf_counter() - start}
