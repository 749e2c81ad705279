"""int8 files: onnxruntime static quantization, the float32 check that gates the file, and the CLI."""
import json
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from simprune.cli.main import main
from simprune.errors import SimpruneError
from simprune.export.latency import latency_report
from simprune.export.quantize import (
    INT8_FILE,
    BatchReader,
    int8_verdict,
    output_tail,
    outputs_side_by_side,
    quantize_int8,
    top1_side_by_side,
)
from simprune.io.data import SAMPLE, load_dataset
from simprune.io.files import load_model
from tests.conftest import ZOO

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

R20 = ZOO / "resnet20-fashion-mnist"


# ---- pure parts ----------------------------------------------------------------------------------

def test_verdict_with_labels_is_the_top1_drop():
    assert int8_verdict(90.0, 89.1, agreement=50.0, max_drop=1.0) is None  # 0.9 points: kept (agreement ignored)
    assert int8_verdict(90.0, 91.0, agreement=50.0, max_drop=0.0) is None  # int8 better: kept
    refused = int8_verdict(90.0, 88.8, agreement=99.0, max_drop=1.0)
    assert refused == "int8 top-1 88.80 % is 1.20 points below float32's 90.00 % (tolerance 1.0 points)"
    assert "0.50 points above" in int8_verdict(90.0, 90.5, agreement=99.0, max_drop=-1.0)
    assert int8_verdict(90.0, float("nan"), agreement=99.0) is not None  # a NaN never passes


def test_verdict_without_labels_is_the_agreement():
    assert int8_verdict(None, None, agreement=90.0, min_agreement=90.0) is None
    assert int8_verdict(None, None, agreement=89.9, min_agreement=90.0) == \
        "int8 picks float32's class on 89.9 % of the images (tolerance: at least 90 %)"


class FakeSession:
    """An onnxruntime session stand-in that returns fixed logits batch after batch."""

    def __init__(self, logits):
        self.batches = iter(logits)

    def get_inputs(self):
        return [type("Input", (), {"name": "input"})()]

    def run(self, _, feeds):
        assert set(feeds) == {"input"} and feeds["input"].dtype == np.float32
        return [np.asarray(next(self.batches), dtype=np.float32)]


def _onehot(classes):
    return np.eye(3)[classes]


def test_side_by_side_top1_and_agreement_by_hand():
    fp32 = FakeSession([_onehot([0, 1]), _onehot([2, 2])])  # picks 0 1 2 2
    int8 = FakeSession([_onehot([0, 2]), _onehot([2, 0])])  # picks 0 2 2 0
    labels = [torch.tensor([0, 1]), torch.tensor([2, 1])]  # truth 0 1 2 1
    batches = [(torch.zeros(2, 1, 2, 2), y) for y in labels]
    out = top1_side_by_side([fp32, int8], batches)
    assert out == {"images": 4, "top1": [75.0, 50.0], "agreement": [100.0, 50.0]}
    # plain tensors: no labels, agreement only
    fp32, int8 = FakeSession([_onehot([0, 1])]), FakeSession([_onehot([0, 0])])
    assert top1_side_by_side([fp32, int8], [torch.zeros(2, 1, 2, 2)]) == \
        {"images": 2, "top1": [None, None], "agreement": [100.0, 50.0]}
    with pytest.raises(SimpruneError, match="no evaluation images"):
        top1_side_by_side([fp32], [])


class MultiSession(FakeSession):
    """A session stand-in with several outputs per batch."""

    def run(self, _, feeds):
        return [np.asarray(o, dtype=np.float32) for o in next(self.batches)]


def test_outputs_of_a_non_classifier_are_compared_relative_to_their_image_to_image_spread():
    grid = np.array([[0.0, 500.0]])  # the same for every image (an anchor grid): not part of the spread
    ref = [[np.array([[1.0, 1.0], [-1.0, -1.0]]) + grid, np.array([[2.0], [0.0]])]]  # 3 channels, spread 2 each
    off = [[ref[0][0] + 0.5, ref[0][1] + 1.0]]  # squared errors 0.5, 0.5 and 2 per channel
    out = outputs_side_by_side([MultiSession(ref), MultiSession(off)], [torch.zeros(2, 1, 2, 2)])
    assert out["images"] == 2 and out["output_error"][0] == 0.0
    assert out["output_error"][1] == pytest.approx((0.25 + 0.25 + 1.0) / 3)
    assert int8_verdict(None, None, None, output_error=0.04, max_output_error=0.05) is None
    assert "0.5000 of their image-to-image spread" in int8_verdict(None, None, None, output_error=0.5)
    with pytest.raises(SimpruneError, match="at least 2 evaluation images"):
        outputs_side_by_side([MultiSession(ref)], [torch.zeros(1, 1, 2, 2)])


class BoxesAndScores(torch.nn.Module):
    """A detector-like head: pixel boxes (hundreds) and sigmoid scores (0-1) concatenated in one output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.box, self.score = torch.nn.Conv2d(8, 2, 1), torch.nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = self.body(x)
        return torch.cat([self.box(h) * 300 + 320, self.score(h).sigmoid()], 1).flatten(2)


def test_a_detector_like_tail_stays_float_and_its_int8_file_passes_the_output_check(tmp_path):
    from simprune.export.onnx import export_onnx
    model = BoxesAndScores().eval()
    export_onnx(model, torch.zeros(1, 3, 8, 8), tmp_path / "f.onnx")
    tail = {n.op_type for n in onnx.load(tmp_path / "f.onnx").graph.node if n.name in output_tail(str(tmp_path / "f.onnx"))}
    assert {"Sigmoid", "Concat", "Mul", "Add"} <= tail and "Conv" not in tail and "Relu" not in tail
    images = [torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result = quantize_int8(model, torch.zeros(1, 3, 8, 8), images, images, tmp_path / INT8_FILE)
    assert result["output_error"] < 0.05 and result["int8_top1"] is None and (tmp_path / INT8_FILE).exists()
    assert result["tolerance"] == {"max_output_error": 0.05}


def test_batch_reader_follows_onnxruntimes_strided_protocol():
    batches = [(torch.full((2, 1, 2, 2), float(i)), torch.zeros(2)) for i in range(3)]
    reader = BatchReader(batches, "input")
    assert len(reader) == 3 and reader.images == 6
    assert [float(reader.get_next()["input"][0, 0, 0, 0]) for _ in range(3)] == [0.0, 1.0, 2.0]
    assert reader.get_next() is None
    reader.set_range(1, 2)  # quantize_static's CalibStridedMinMax: one batch at a time
    assert float(reader.get_next()["input"].max()) == 1.0 and reader.get_next() is None


def test_thread_cpu_clock_leaves_out_time_off_the_core():
    """bench/int8.py times with ``clock=time.thread_time``: a call that waits (as when another process holds
    the core) costs wall time but no CPU time of the calling thread."""
    import time

    from simprune.export.latency import time_calls

    wait = lambda: time.sleep(0.01)  # noqa: E731
    (wall,) = time_calls([wait], runs=3, warmup=0)
    (cpu,) = time_calls([wait], runs=3, warmup=0, clock=time.thread_time)
    assert wall.min() >= 0.01 and cpu.max() < 0.002


def test_latency_report_int8_fields():
    stat = lambda ms: {"median_ms": ms, "iqr_ms": ms / 10}  # noqa: E731
    timings = {("onnxruntime", 1): [stat(4.0), stat(2.0), stat(1.0)], ("torch", 1): [stat(8.0), stat(4.0)]}
    keys = latency_report(timings, macs_before=400, macs_after=200, threads=1, runs=30)
    assert keys["latency_ms"] == {"before": 4.0, "after": 2.0, "int8": 1.0}
    assert keys["speedup"]["int8"] == 4.0 and keys["speedup"]["measured"] == 2.0
    ort_row, torch_row = keys["latency"]["rows"]
    assert ort_row["int8_ms"] == 1.0 and ort_row["int8_speedup"] == 4.0 and ort_row["int8_spread_ms"] == 0.1
    assert "int8_ms" not in torch_row  # eager PyTorch cannot run the int8 file


# ---- quantize_int8 on a trained model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def sample():
    """The trained ResNet-20 and the shipped Fashion-MNIST sample (calibration: train split, check: test split)."""
    model, _ = load_model(R20)
    calib = DataLoader(load_dataset(SAMPLE, "train", pad_to=32), batch_size=128)
    test = DataLoader(torch.utils.data.Subset(load_dataset(SAMPLE, "test", pad_to=32), range(1000)), batch_size=250)
    return model, calib, test


def test_int8_file_is_quantized_per_channel_and_scores_like_float32(sample, tmp_path):
    model, calib, test = sample
    path = tmp_path / "m.int8.onnx"
    result = quantize_int8(model, torch.zeros(1, 1, 32, 32), calib, test, path, original=model)
    assert result["calibration_images"] == 1000 and result["images"] == 1000
    assert result["original_top1"] == result["fp32_top1"] > 85  # the trained model, float32 in onnxruntime
    assert abs(result["fp32_top1"] - result["int8_top1"]) <= 1.0 and result["agreement"] >= 97
    assert result["bytes"] == path.stat().st_size and result["bytes"] < result["fp32_bytes"] / 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx"]  # no temporary file left

    graph = onnx.load(str(path)).graph
    consts = {t.name: t for t in graph.initializer}
    conv_weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts
                    and len(consts[n.input[0]].dims) == 4]
    assert len(conv_weights) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    for n in conv_weights:  # int8 weights, one scale per output channel
        assert consts[n.input[0]].data_type == onnx.TensorProto.INT8
        assert len(consts[n.input[1]].dims) == 1 and consts[n.input[1]].dims[0] == consts[n.input[0]].dims[0]
    activations = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert activations and all(consts[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in activations)
    assert result["quantized_tensors"] == len(activations)

    # the numbers returned are those of the file on disk
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    picks, truth = [], []
    for x, y in test:
        picks.append(session.run(None, {"input": x.numpy()})[0].argmax(1))
        truth.append(y.numpy())
    assert float((np.concatenate(picks) == np.concatenate(truth)).mean() * 100) == pytest.approx(result["int8_top1"])


def test_int8_outside_the_tolerance_is_not_written(sample, tmp_path):
    model, calib, test = sample
    path = tmp_path / "m.int8.onnx"
    with pytest.raises(SimpruneError, match=r"points (below|above) float32's .* \(tolerance -100.0 points\) on 1000 images; "
                                            r".*m\.int8\.onnx not written"):
        quantize_int8(model, torch.zeros(1, 1, 32, 32), calib, test, path, max_drop=-100)
    unlabelled = [x for x, _ in test]
    with pytest.raises(SimpruneError, match=r"tolerance: at least 101 %\) on 1000 images"):
        quantize_int8(model, torch.zeros(1, 1, 32, 32), calib, unlabelled, path, min_agreement=101)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SimpruneError, match="no calibration images"):
        quantize_int8(model, torch.zeros(1, 1, 32, 32), [], test, path)


# ---- the command line -----------------------------------------------------------------------------

def _report(directory):
    return json.loads((directory / "report.json").read_text())


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """ResNet-20 pruned with calibration images recorded in model.json, no int8 yet."""
    out = tmp_path_factory.mktemp("int8") / "r20"
    assert main(["prune", "--checkpoint", str(R20), "--criterion", "l1", "--target-flops", "0.2", "--round-to", "8",
                 "--calib-data", SAMPLE, "--calib-images", "256", "--seed", "3", "--no-latency",
                 "--out", str(out)]) == 0
    return out


def test_prune_records_the_calibration_images(pruned):
    desc = json.loads((pruned / "model.json").read_text())
    assert desc["calibration"] == {"data": SAMPLE, "images": 256, "seed": 3, "pad_to": 32}


def test_cli_export_int8_then_bench_three_ways(pruned, capsys):
    assert main(["export", str(pruned), "--int8", "--data", SAMPLE, "--eval-images", "600"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {pruned / INT8_FILE}" in printed and "256 calibration images of fashion-mnist-sample" in printed
    int8 = _report(pruned)["int8"]
    assert int8["calibration"]["seed"] == 3 and int8["images"] == 600 and int8["data"] == SAMPLE
    assert int8["original_top1"] is not None and int8["tolerance"] == {"max_drop": 1.0}
    assert "pruned int8" in (pruned / "report.md").read_text()

    assert main(["bench", str(pruned), "--runs", "30", "--batch", "1", "--engine", "onnxruntime"]) == 0
    printed = capsys.readouterr().out
    assert "int8 ms" in printed and "ONNX file size: original" in printed
    report = _report(pruned)
    assert set(report["latency_ms"]) == {"before", "after", "int8"}
    sizes = report["size_mib"]
    assert sizes["original"] > sizes["pruned"] > sizes["int8"] > 0
    assert sizes["int8"] == pytest.approx((pruned / INT8_FILE).stat().st_size / 2**20)
    assert report["int8"] == int8  # bench kept the int8 check
    md = (pruned / "report.md").read_text()
    assert f"{report['latency_ms']['int8']:.2f} ms" in md and f"{sizes['int8']:.2f} MiB" in md
    detail = json.loads((pruned / "latency.json").read_text())
    assert all("int8" in t for t in detail["timings"])

    assert main(["bench", str(pruned), "--runs", "30", "--batch", "1", "--engine", "onnxruntime", "--no-int8"]) == 0
    assert "int8" not in _report(pruned)["latency_ms"] and "int8 ms" not in capsys.readouterr().out


def test_cli_int8_refusals_are_one_line(pruned, tmp_path, capsys, monkeypatch):
    before = sorted(p.name for p in pruned.iterdir())
    assert main(["export", str(pruned), "--int8", "--data", SAMPLE, "--eval-images", "300",
                 "--int8-max-drop", "-100"]) == 2
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if line.startswith("error:"))
    assert err.count("error:") == 1 and "(tolerance -100.0 points) on 300 images" in err and "not written" in err
    assert sorted(p.name for p in pruned.iterdir()) == before

    bare = tmp_path / "bare"  # pruned without calibration images
    assert main(["prune", "--checkpoint", str(R20), "--target-flops", "0.2", "--no-latency", "--out", str(bare)]) == 0
    capsys.readouterr()
    assert main(["export", str(bare), "--int8"]) == 2
    assert "records no calibration images (pruned without --calib-data); pass --calib-data NAME" in \
        capsys.readouterr().err
    assert main(["bench", str(bare), "--int8"]) == 2
    assert f"run `simprune export {bare} --int8` first" in capsys.readouterr().err
    assert main(["export", str(bare)]) == 2
    assert "choose an export format: --onnx and/or --int8" in capsys.readouterr().err

    out = tmp_path / "never"
    assert main(["prune", "--checkpoint", str(R20), "--target-flops", "0.2", "--int8", "--out", str(out)]) == 2
    assert "--int8 calibrates on the pruning's calibration images; pass --calib-data NAME" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["prune", "--checkpoint", str(R20), "--target-flops", "0.2", "--int8", "--calib-data", SAMPLE,
                 "--out", str(out)]) == 2
    assert "onnxruntime not installed" in capsys.readouterr().err
    assert not out.exists()  # refused before pruning


@pytest.mark.slow
def test_cli_prune_int8_writes_and_times_the_int8_file(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", "--checkpoint", str(R20), "--target-flops", "0.3", "--round-to", "8", "--calib-data", SAMPLE,
                 "--calib-images", "256", "--data", SAMPLE, "--eval-images", "500", "--int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "int8 ms" in printed and f"wrote {out / INT8_FILE}" in printed
    report = _report(out)
    assert report["int8"]["images"] == 500 and "int8" in report["latency_ms"] and len(report["size_mib"]) == 3
    assert report["int8"]["original_top1"] == pytest.approx(report["accuracy"]["before"], abs=1.0)  # fp32 vs bf16
    assert "| pruned int8 |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_cli_prune_int8_refused_keeps_the_float32_model(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", "--checkpoint", str(R20), "--target-flops", "0.3", "--calib-data", SAMPLE,
                 "--calib-images", "128", "--data", SAMPLE, "--eval-images", "300", "--int8", "--int8-max-drop", "-100",
                 "--out", str(out)]) == 2
    lines = capsys.readouterr().err.splitlines()  # progress lines, then the error
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert "not written" in lines[-1] and lines[-1].endswith(f"(the pruned float32 model is in {out})")
    assert (out / "model.safetensors").exists() and not (out / INT8_FILE).exists()
