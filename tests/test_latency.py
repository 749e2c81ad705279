import sys

import pytest
import torch
from torch import nn

from simprune.errors import SimpruneError
from simprune.latency import compare_latency, measure_onnx, measure_torch

FIELDS = {"median_ms", "p10_ms", "p90_ms", "iqr_ms", "runs", "batch", "threads"}


def tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def _check_stats(stats, runs, batch, threads):
    assert set(stats) == FIELDS
    assert (stats["runs"], stats["batch"], stats["threads"]) == (runs, batch, threads)
    assert 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert stats["iqr_ms"] >= 0


def test_measure_torch_fields_and_thread_restore():
    before = torch.get_num_threads()
    model = tiny().train()
    stats = measure_torch(model, (1, 8, 8), batch=2, threads=1, runs=30, warmup=1)
    _check_stats(stats, 30, 2, 1)
    assert torch.get_num_threads() == before and model.training


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from simprune.export import export_onnx

    path = tmp_path_factory.mktemp("lat") / "tiny.onnx"
    export_onnx(tiny(), torch.randn(1, 1, 8, 8), path, opset=18)
    return path


def test_measure_onnx_fields(onnx_file):
    stats = measure_onnx(onnx_file, (1, 8, 8), batch=3, threads=1, runs=31, warmup=1)
    _check_stats(stats, 31, 3, 1)


@pytest.mark.parametrize("runs", [0, 29])
def test_runs_at_least_30(onnx_file, runs):
    with pytest.raises(SimpruneError, match="at least 30"):
        measure_torch(tiny(), (1, 8, 8), batch=1, threads=1, runs=runs)
    with pytest.raises(SimpruneError, match="at least 30"):
        measure_onnx(onnx_file, (1, 8, 8), batch=1, threads=1, runs=runs)


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(SimpruneError, match="batch and threads"):
        measure_torch(tiny(), (1, 8, 8), batch=0, threads=1)
    with pytest.raises(SimpruneError, match="cannot load ONNX model"):
        measure_onnx(tmp_path / "missing.onnx", (1, 8, 8), batch=1, threads=1)


def test_measure_onnx_without_onnxruntime(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SimpruneError, match=r"pip install 'simprune\[onnx\]'"):
        measure_onnx(tmp_path / "m.onnx", (1, 8, 8), batch=1, threads=1)


def test_compare_latency_uses_medians():
    before = {"median_ms": 10.0, "p10_ms": 1.0, "p90_ms": 50.0, "iqr_ms": 3.0, "runs": 30, "batch": 1, "threads": 1}
    after = {**before, "median_ms": 4.0, "p10_ms": 3.9, "p90_ms": 4.1}
    result = compare_latency(before, after)
    assert result["speedup"] == pytest.approx(2.5)
    assert (result["before_ms"], result["after_ms"]) == (10.0, 4.0)
    with pytest.raises(SimpruneError, match="different threads"):
        compare_latency(before, {**after, "threads": 2})


def test_compare_real_measurements():
    small, big = nn.Conv2d(1, 1, 1), nn.Sequential(*[nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)])
    before = measure_torch(big, (1, 16, 16), batch=1, threads=1, runs=30, warmup=1)
    after = measure_torch(small, (1, 16, 16), batch=1, threads=1, runs=30, warmup=1)
    result = compare_latency(before, after)
    assert result["speedup"] == pytest.approx(before["median_ms"] / after["median_ms"]) and result["speedup"] > 0
