import sys

import pytest
import torch
from torch import nn

from simprune.errors import SimpruneError
from simprune.export.latency import compare_latency, measure_onnx, measure_torch

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
    from simprune.export.onnx import export_onnx

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


# ---- interleaved timing, the report keys, simprune bench, the prune step ----------------------------------

import json  # noqa: E402

from simprune.cli.main import main  # noqa: E402
from simprune.export.latency import (  # noqa: E402
    latency_report,
    measure_onnx_many,
    measure_torch_many,
    time_calls,
)

ROW_FIELDS = {"engine", "batch", "before_ms", "after_ms", "before_spread_ms", "after_spread_ms", "speedup"}
PAIRED_FIELDS = ROW_FIELDS | {"runs", "speedup_low", "speedup_high", "stable"}  # rows timed interleaved


def test_time_calls_interleaves_in_turn():
    order = []
    times = time_calls([lambda: order.append("a"), lambda: order.append("b")], runs=3, warmup=1)
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-up of each, then one of each per round
    assert [t.shape for t in times] == [(3,), (3,)]


def test_many_returns_one_summary_per_model(onnx_file):
    small, big = tiny(), nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1))
    eager = measure_torch_many([small, big], (1, 16, 16), batch=1, threads=1, runs=30, warmup=1)
    assert len(eager) == 2 and set(eager[0]) == FIELDS and set(eager[1]) == FIELDS | {"vs_first"}
    assert eager[1]["median_ms"] > eager[0]["median_ms"]  # ~100x the work
    ort_stats = measure_onnx_many([onnx_file, onnx_file], (1, 8, 8), batch=2, threads=1, runs=30, warmup=1)
    assert [s["batch"] for s in ort_stats] == [2, 2]


def test_latency_report_math():
    def stats(ms, iqr):
        return {"median_ms": ms, "iqr_ms": iqr}
    timings = {("onnxruntime", 1): [stats(10.0, 1.0), stats(5.0, 0.5)],
               ("onnxruntime", 8): [stats(60.0, 2.0), stats(40.0, 1.0)],
               ("torch", 1): [stats(20.0, 1.0), stats(16.0, 1.0)]}
    keys = latency_report(timings, macs_before=400, macs_after=100, threads=2, runs=30)
    assert keys["latency_ms"] == {"before": 10.0, "after": 5.0}  # onnxruntime batch 1 is the headline
    assert keys["speedup"] == {"measured": 2.0, "macs": 4.0, "ratio": 0.5}
    lat = keys["latency"]
    assert (lat["threads"], lat["runs"]) == (2, 30) and "cores" in lat["machine"]
    assert [r["speedup"] for r in lat["rows"]] == [2.0, 1.5, 1.25]
    assert all(set(r) == ROW_FIELDS for r in lat["rows"])
    assert lat["rows"][1] == {"engine": "onnxruntime", "batch": 8, "before_ms": 60.0, "after_ms": 40.0,
                              "before_spread_ms": 2.0, "after_spread_ms": 1.0, "speedup": 1.5}


def test_a_pruned_model_slower_than_the_original_is_warned_about(recwarn):
    def stats(ms, low=None, high=None):
        return {"median_ms": ms, "iqr_ms": 0.1, **({"vs_first": {"speedup_low": low, "speedup_high": high,
                                                                    "stable": True}, "runs": 30} if low else {})}
    latency_report({("onnxruntime", 1): [stats(10.0), stats(12.0, 0.8, 0.9)]}, 400, 200, threads=1, runs=30)
    (w,) = [w for w in recwarn if "slower than the original" in str(w.message)]
    assert "0.83x in onnxruntime at batch 1 for 2.00x fewer MACs" in str(w.message)
    recwarn.clear()
    latency_report({("onnxruntime", 1): [stats(10.0), stats(10.5, 0.9, 1.1)]}, 400, 200, threads=1, runs=30)
    latency_report({("onnxruntime", 1): [stats(10.0), stats(8.0, 1.2, 1.3)]}, 400, 200, threads=1, runs=30)
    assert not [w for w in recwarn if "slower" in str(w.message)]  # within noise of 1, or faster: no warning


def _check_latency_keys(report, macs, runs, threads, batch):
    assert report["latency_ms"]["before"] > 0 and report["latency_ms"]["after"] > 0
    s = report["speedup"]
    assert s["measured"] == pytest.approx(report["latency_ms"]["before"] / report["latency_ms"]["after"])
    assert s["macs"] == pytest.approx(macs["before"] / macs["after"])
    assert s["ratio"] == pytest.approx(s["measured"] / s["macs"])
    lat = report["latency"]
    assert (lat["threads"], lat["runs"]) == (threads, runs)
    assert {(r["engine"], r["batch"]) for r in lat["rows"]} == {(e, b) for e in ("onnxruntime", "torch")
                                                                for b in (1, batch)}
    for r in lat["rows"]:
        assert set(r) == PAIRED_FIELDS and r["speedup_low"] <= r["speedup_high"]
        assert r["speedup"] == pytest.approx(r["before_ms"] / r["after_ms"])


@pytest.mark.slow
def test_prune_then_bench_writes_the_latency_keys(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["prune", "--model", "resnet20", "--input", "1x32x32", "--criterion", "l1", "--target-flops", "0.1",
                 "--no-latency", "--out", str(ckpt)]) == 0
    # the latency step at the end of prune, on by default; the original is the recorded --checkpoint
    assert main(["prune", "--checkpoint", str(ckpt), "--criterion", "l1", "--target-flops", "0.4",
                 "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured speed-up" in printed and "onnxruntime      1" in printed
    report = json.loads((out / "report.json").read_text())
    _check_latency_keys(report, report["macs"], runs=30, threads=1, batch=8)  # against the checkpoint
    assert report["criterion"] == "l1" and report["target"] == {"flops": 0.4}  # the rest is kept
    detail = json.loads((out / "latency.json").read_text())
    assert detail["original"] == f"checkpoint {ckpt}" and detail["input_shape"] == [1, 32, 32]
    assert detail["macs"] == report["macs"] and detail["latency"] == report["latency"]
    assert {t["engine"] for t in detail["timings"]} == {"onnxruntime", "torch"}

    # simprune bench DIR again, other settings; without the source the unpruned architecture is the original
    import shutil
    shutil.rmtree(ckpt)
    assert main(["bench", str(out), "--batch", "2", "--runs", "31", "--threads", "1"]) == 0
    report, detail = json.loads((out / "report.json").read_text()), json.loads((out / "latency.json").read_text())
    assert detail["original"].startswith("unpruned resnet20") and report["accuracy"] is None
    assert detail["macs"]["before"] > report["macs"]["before"]  # the full architecture, not the 10 % checkpoint
    _check_latency_keys(report, detail["macs"], runs=31, threads=1, batch=2)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes left no temp file


def test_prune_no_latency_and_bench_errors(tmp_path, monkeypatch, capsys):
    out = tmp_path / "p"
    assert main(["prune", "--model", "resnet20", "--criterion", "l1", "--target-flops", "0.2", "--no-latency",
                 "--out", str(out)]) == 0
    assert "latency_ms" not in json.loads((out / "report.json").read_text())
    assert main(["bench", str(out), "--runs", "29"]) == 2
    assert "at least 30" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["bench", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'simprune[onnx]'" in err
    # the prune step without onnxruntime: a notice, no latency keys, still a good model directory
    out2 = tmp_path / "q"
    assert main(["prune", "--model", "resnet20", "--criterion", "l1", "--target-flops", "0.2", "--out", str(out2)]) == 0
    assert "onnxruntime not installed, latency not measured" in capsys.readouterr().out
    assert "latency_ms" not in json.loads((out2 / "report.json").read_text())
    assert main(["prune", "--model", "resnet20", "--criterion", "l1", "--target-flops", "0.2", "--latency",
                 "--out", str(tmp_path / "r")]) == 2
    assert "onnxruntime not installed" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before pruning


# ---- noise: the paired ratio, re-measuring until it settles, the warning ------------------------------------

import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from simprune import progress  # noqa: E402
from simprune.export.latency import paired_ratio, time_until_stable  # noqa: E402


def test_paired_ratio_interval_narrows_with_runs_and_flags_noise():
    rng = np.random.default_rng(0)
    quiet = paired_ratio(np.full(30, 2.0), np.full(30, 1.0))
    assert quiet["speedup"] == 2.0 and quiet["spread"] == 0.0 and quiet["stable"]
    before, after = 2.0 * rng.lognormal(0, 0.5, 1000), rng.lognormal(0, 0.5, 1000)  # busy: ratios vary 2x
    few, many = paired_ratio(before[:30], after[:30]), paired_ratio(before, after)
    assert not few["stable"] and many["spread"] < few["spread"]  # more runs narrow the interval
    assert many["speedup_low"] < 2.0 < many["speedup_high"]


def test_time_until_stable_measures_again_until_the_cap():
    noisy = iter(np.random.default_rng(1).lognormal(0, 1.0, 10_000))
    calls = []

    def slow():
        calls.append(1)
        time.sleep(next(noisy) * 1e-4)

    times = time_until_stable([slow, slow], runs=30, warmup=0, max_runs=120)
    assert [len(t) for t in times] in ([30, 30], [60, 60], [120, 120])
    steady = time_until_stable([lambda: None, lambda: None], runs=30, warmup=0, max_runs=120)
    assert len(steady[0]) >= 30


def test_latency_report_warns_when_the_ratio_is_not_stable():
    def stats(ms, stable):
        pair = {"speedup": 1.0, "speedup_low": 0.5, "speedup_high": 2.0, "spread": 1.5, "stable": stable}
        return [{"median_ms": ms, "iqr_ms": 1.0, "runs": 240},
                {"median_ms": ms, "iqr_ms": 1.0, "runs": 240, "vs_first": pair}]
    seen = []

    class Collect(progress.Reporter):
        def warn(self, text):
            seen.append(text)

    def report(stable, load):
        seen.clear()
        with progress.reporting(Collect()), pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "getloadavg", lambda: (load, load, load))
            return latency_report({("onnxruntime", 1): stats(2.0, stable)}, 200, 100, 1, 30)

    keys = report(stable=False, load=0.1)
    assert keys["latency"]["stable"] is False and keys["latency"]["load_average"] == 0.1
    assert len(seen) == 1 and "0.50x to 2.00x" in seen[0] and "load average" in seen[0]
    assert report(stable=True, load=0.1)["latency"]["stable"] and seen == []
    report(stable=True, load=8.0 * (os.cpu_count() or 1))
    assert len(seen) == 1 and "may be inflated" in seen[0]  # a busy machine is named even when ratios settle
