"""`simprune demo` on the embedded default: the shipped ResNet-56 and Fashion-MNIST sample."""
import base64
import hashlib
import importlib.util
import json
import re
import tomllib

import numpy as np
import pytest
import torch

import simprune
from simprune.cli import demo
from simprune.io.data import (
    DEBIAN_FASHION_MNIST,
    SAMPLE,
    SAMPLE_FILE,
    load_dataset,
    read_idx,
)
from tests.conftest import ROOT, ZOO, require_fashion_mnist


@pytest.mark.slow
def test_demo_on_the_shipped_sample(cli, tmp_path):
    out = tmp_path / "demo"
    code, stdout, err = cli("demo", "--data", SAMPLE, "--out", out, "--eval-images", "600", "--calib-images", "256",
                            "--threads", "1", "--latency-runs", "30", "--quiet")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "demo" and report["data"] == SAMPLE and report["test_images"] == 600
    assert report["calibration"]["images"] == 256
    rows = {r["criterion"]: r for r in report["rows"]}
    assert list(rows) == ["unpruned", "default", "qsfm", "filter-similarity", "feature-stats", "l1", "random"]
    assert all(r["reconstructed"] for r in report["rows"][1:])  # every row under the default repair
    assert report["chosen"] in simprune.Choose().candidates and rows["default"]["chosen"] == report["chosen"]
    kept = max(report["rows"][1:], key=lambda r: r["top1"])
    assert report["kept"] == kept["label"]
    for name in list(rows)[1:]:
        assert abs(rows[name]["flops_removed"] - 0.5) <= 0.01, name
        assert rows[name]["macs"] == pytest.approx(rows["unpruned"]["macs"] * (1 - rows[name]["flops_removed"]))
        assert rows[name]["change"] == pytest.approx(rows[name]["top1"] - rows["unpruned"]["top1"])
    assert rows["unpruned"]["top1"] > 90
    assert rows["default"]["top1"] > rows["random"]["top1"] and rows["default"]["top1"] > rows["unpruned"]["top1"] - 3

    # latency keys of the shared report schema, for the exported model (the most accurate row)
    assert report["latency_ms"]["before"] > 0 and report["latency_ms"]["after"] > 0
    assert report["speedup"]["macs"] == pytest.approx(rows["unpruned"]["macs"] / kept["macs"])
    assert report["speedup"]["measured"] == pytest.approx(report["latency_ms"]["before"] / report["latency_ms"]["after"])
    assert [(r["engine"], r["batch"]) for r in report["latency"]["rows"]] == [("onnxruntime", 1)]
    int8 = report["int8"]  # the int8 row: checked on the same 600 images, timed with the two float32 files
    assert int8["images"] == 600 and abs(int8["fp32_top1"] - int8["int8_top1"]) <= 1.0
    assert report["latency_ms"]["int8"] > 0 and report["size_mib"]["int8"] < report["size_mib"]["pruned"]
    assert (out / "pruned-model" / "model.int8.onnx").stat().st_size == int8["bytes"]

    # the pruned model: loadable without pickle, and its ONNX file computes the same outputs
    model = simprune.load(out / "pruned-model")
    assert sum(p.numel() for p in model.parameters()) == kept["params"]
    assert report["round_to"] == 8  # widths onnxruntime's blocked CPU kernels can use
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    import onnxruntime as ort

    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(out / "pruned-model" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)

    # the human-readable report carries the same numbers and embeds its figures
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for r in rows.values():
        assert f"{r['top1']:.2f}" in md and f"{r['top1']:.2f}" in page
    assert f"{report['latency_ms']['before']:.2f} ms" in md
    assert set(re.findall(r"\]\((\w+\.png)\)", md)) == {"channels.png", "similarity.png"}
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "default + refit" in stdout and "faster" in stdout and f"{kept['label']} int8" in stdout
    assert "| pruned int8 |" in md


def test_demo_data_is_the_full_set_when_installed_else_the_sample(monkeypatch):

    monkeypatch.setattr(demo, "has_local_files", lambda name: True)
    assert demo.demo_data("auto", "fashion-mnist") == "fashion-mnist"
    monkeypatch.setattr(demo, "has_local_files", lambda name: False)
    assert demo.demo_data("auto", "fashion-mnist") == SAMPLE
    assert demo.demo_data("auto", "cifar10") == "cifar10"
    assert demo.demo_data(SAMPLE, "fashion-mnist") == SAMPLE


def test_demo_replaces_only_its_own_output(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    code, _, err = cli("demo", "--out", tmp_path)
    assert code == 2 and "not an earlier demo's" in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    code, _, err = cli("demo", "--out", tmp_path / "new", "--target", "1.5")
    assert code == 2 and "outside (0, 1)" in err


# ---- the embedded default: sample and model ------------------------------------------------

def test_shipped_sample_is_class_balanced_uint8():
    with np.load(SAMPLE_FILE, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    assert arrays["test_images"].shape == (3000, 28, 28) and arrays["train_images"].shape == (1000, 28, 28)
    assert arrays["test_images"].dtype == np.uint8
    assert np.bincount(arrays["test_labels"]).tolist() == [300] * 10
    assert np.bincount(arrays["train_labels"]).tolist() == [100] * 10
    meta = json.loads(str(arrays["meta"]))
    assert set(meta["sha256"]) == {"t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                                   "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"}
    test = load_dataset(SAMPLE, "test", pad_to=32)
    calib = load_dataset(SAMPLE, "train", pad_to=32)
    assert len(test) == 3000 and len(calib) == 1000 and test[0][0].shape == (1, 32, 32)
    assert torch.equal(test.labels, torch.from_numpy(arrays["test_labels"].astype(np.int64)))


def test_shipped_sample_is_generated_from_the_real_files():
    """The script rebuilds exactly the shipped arrays from the Debian files, whose sha256 it recorded."""
    require_fashion_mnist()
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "scripts" / "make_sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rebuilt = script.build_sample(DEBIAN_FASHION_MNIST)
    with np.load(SAMPLE_FILE, allow_pickle=False) as f:
        for key in f.files:
            assert np.array_equal(f[key], rebuilt[key]), key
        meta = json.loads(str(f["meta"]))
    for name, digest in meta["sha256"].items():
        assert hashlib.sha256((DEBIAN_FASHION_MNIST / name).read_bytes()).hexdigest() == digest
    source = read_idx(DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    assert np.array_equal(source[rebuilt["test_index"]], rebuilt["test_images"])


def test_shipped_model_is_the_committed_zoo_model_and_packaged():
    for name in ("model.safetensors", "model.json"):
        assert (demo.DEFAULT_CHECKPOINT / name).read_bytes() == (ZOO / "resnet56-fashion-mnist" / name).read_bytes()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["simprune"]
    package = ROOT / "src" / "simprune"
    shipped = {p.relative_to(package) for pattern in patterns for p in package.glob(pattern)}
    assert SAMPLE_FILE.relative_to(package) in shipped
    assert (demo.DEFAULT_CHECKPOINT / "model.safetensors").relative_to(package) in shipped


def test_committed_baselines_are_loadable_safetensors():
    for name, floor in (("resnet56-fashion-mnist", 94.0), ("resnet20-fashion-mnist", 93.0)):
        desc = json.loads((ZOO / name / "model.json").read_text())
        assert desc["history"][-1]["test_top1"] >= floor, name
        assert desc["command"].startswith("simprune train")
        assert (ZOO / name / "train.log").read_text().startswith("# simprune train")
        model = simprune.load(ZOO / name)
        assert model.conv1.in_channels == 1


def test_shipped_model_scores_on_the_shipped_sample():
    from simprune.train.loop import evaluate

    model = simprune.load(demo.DEFAULT_CHECKPOINT)
    sample = torch.utils.data.Subset(load_dataset(SAMPLE, "test", pad_to=32), range(0, 3000, 6))
    assert evaluate(model, sample)["top1"] > 90

