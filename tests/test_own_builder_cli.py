"""Your own builder on the command line: `--model nets.py:build` is trusted for the whole command (its latency
step, export, bench), gets only the arguments it takes, and an unexpected failure is one line."""
import json
import re

import pytest
import torch
from torch import nn

import simprune

NETS = '''
from torch import nn

def build(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

def broken():
    return 1 / 0
'''


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not re.match(r"^\[ *\d+\.\d+s\] ", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def nets(tmp_path, monkeypatch):
    (tmp_path / "nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_docs_example_runs_as_written_latency_included(cli, nets):
    pytest.importorskip("onnxruntime")
    code, out, err = cli("prune", "--model", "nets.py:build", "--num-classes", "10", "--input", "3x32x32",
                         "--target-flops", "0.5", "--out", "runs/mine", "--criterion", "l1")
    assert code == 0, err
    assert "measured speed-up" in out  # the latency step loaded what it saved, built by the named builder
    desc = json.loads((nets / "runs/mine/model.json").read_text())
    assert desc["model"] == "nets.py:build" and desc["model_args"] == {"num_classes": 10}  # no in_channels
    assert "latency" in json.loads((nets / "runs/mine/report.json").read_text())
    code, _, err = cli("export", "runs/mine", "--onnx")  # no --model: the file does not decide what code runs
    assert code == 2 and "--model nets.py:build" in _one_error_line(err)
    code, out, err = cli("export", "runs/mine", "--onnx", "--model", "nets.py:build")
    assert code == 0 and (nets / "runs/mine/model.onnx").exists(), err


def test_export_bench_evaluate_take_model_for_a_folder_saved_from_your_instance(cli, nets):
    pytest.importorskip("onnxruntime")
    import importlib.util
    spec = importlib.util.spec_from_file_location("nets_here", nets / "nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pruned, _ = simprune.prune(module.build(), torch.zeros(1, 3, 16, 16), "l1", {"flops": 0.4})
    simprune.save(nets / "api", pruned)  # your own instance: model.json names no builder
    assert json.loads((nets / "api/model.json").read_text())["model"] is None
    code, _, err = cli("bench", "api", "--runs", "30", "--warmup", "1", "--batch", "1", "--engine", "onnxruntime")
    assert code == 2 and "your own model" in _one_error_line(err), err
    code, out, err = cli("bench", "api", "--model", "nets.py:build", "--runs", "30", "--warmup", "1", "--batch", "1",
                         "--engine", "onnxruntime")
    assert code == 0 and "measured speed-up" in out, err
    code, out, err = cli("export", "api", "--onnx", "--model", "nets.py:build")
    assert code == 0 and (nets / "api/model.onnx").exists(), err
    code, _, err = cli("export", "api", "--onnx", "--model", "resnet20")
    assert code == 2 and "belongs to another model" in _one_error_line(err)


def test_builder_gets_in_channels_only_when_it_takes_it_or_is_given_it(cli, nets):
    code, _, err = cli("info", "--model", "nets.py:build", "--input", "3x16x16")
    assert code == 0, err
    code, _, err = cli("info", "--model", "nets.py:build", "--input", "3x16x16", "--in-channels", "3")
    assert code == 2 and "takes no argument(s) ['in_channels']" in _one_error_line(err)


def test_an_unexpected_exception_is_one_line_and_debug_shows_the_traceback(cli, nets):
    code, _, err = cli("info", "--model", "nets.py:broken", "--input", "3x16x16")
    line = _one_error_line(err)
    assert code == 2 and line.startswith("error: ZeroDivisionError") and line.endswith("(--debug for the traceback)")
    with pytest.raises(ZeroDivisionError):
        cli("--debug", "info", "--model", "nets.py:broken", "--input", "3x16x16")


def test_trusted_builders_is_scoped_to_the_block(tmp_path):
    from simprune.io.description import _trusted, trusted_builders
    assert not _trusted("nets.py:build", None)
    with trusted_builders("nets.py:build", None, "resnet20"):
        assert _trusted("nets.py:build", None) and not _trusted("other.py:x", None)
    assert not _trusted("nets.py:build", None)
    assert isinstance(nn.Module(), nn.Module)
