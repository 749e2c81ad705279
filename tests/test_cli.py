import json
import re
import subprocess
import sys

import pytest
import torch

from simprune.io.files import save_model
from simprune.models import build_model
from tests.conftest import require_fashion_mnist


def _one_line_error(code, err, pattern):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if not re.match(r"^\[ *\d+\.\d+s\] ", line)]  # stages
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern in lines[0]


def test_unknown_model(cli):
    _one_line_error(*cli("info", "--model", "resnet57")[::2], "unknown model 'resnet57'")


def test_unknown_data(cli, tmp_path):
    _one_line_error(*cli("train", "--model", "resnet20", "--data", "svhn", "--epochs", "1",
                         "--out", tmp_path / "o")[::2], "unknown data set 'svhn'")


def test_missing_checkpoint(cli, tmp_path):
    _one_line_error(*cli("evaluate", "--checkpoint", tmp_path / "nope", "--data", "fashion-mnist")[::2],
                    "does not exist")


def test_checkpoint_that_does_not_match_the_model(cli, tmp_path):
    model = build_model("resnet20", in_channels=1)
    save_model(tmp_path, model, {"model": "resnet56", "model_args": {"num_classes": 10, "in_channels": 1}})
    _one_line_error(*cli("evaluate", "--checkpoint", tmp_path, "--data", "fashion-mnist")[::2],
                    "does not match the model")


def test_wrong_data_dir(cli, tmp_path):
    model = build_model("resnet20", in_channels=1)
    save_model(tmp_path / "m", model, {"model": "resnet20", "model_args": {"num_classes": 10, "in_channels": 1}})
    (tmp_path / "data").mkdir()
    _one_line_error(*cli("evaluate", "--checkpoint", tmp_path / "m", "--data", "fashion-mnist",
                         "--data-dir", tmp_path / "data")[::2], "holds no fashion-mnist IDX files")


def test_pickle_as_checkpoint(cli, tmp_path):
    torch.save(build_model("resnet20").state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "model.json").write_text("{}")
    _one_line_error(*cli("evaluate", "--checkpoint", tmp_path, "--data", "fashion-mnist")[::2], "never unpickles")


def test_channel_mismatch_between_model_and_data(cli, tmp_path):
    require_fashion_mnist()
    save_model(tmp_path, build_model("resnet20"), {"model": "resnet20", "model_args": {"num_classes": 10, "in_channels": 3}})
    _one_line_error(*cli("evaluate", "--checkpoint", tmp_path, "--data", "fashion-mnist", "--pad-to", "32")[::2],
                    "3-channel images")


def test_console_script_prints_no_traceback_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simprune.cli", "info", "--model", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    debug = subprocess.run([sys.executable, "-m", "simprune.cli", "--debug", "info", "--model", "nope"],
                           capture_output=True, text=True)
    assert "Traceback" in debug.stderr


def test_train_refuses_non_empty_out_without_resume(cli, tmp_path):
    (tmp_path / "x").write_text("keep me")
    _one_line_error(*cli("train", "--model", "resnet20", "--data", "fashion-mnist", "--epochs", "1",
                         "--out", tmp_path)[::2], "--overwrite")
    assert (tmp_path / "x").read_text() == "keep me"


def test_weights_option_is_for_torchvision_models_only(cli):
    code, _, err = cli("info", "--model", "resnet20", "--weights", "IMAGENET1K_V1")
    assert code == 2 and "--weights applies to torchvision:<name>, timm:<name> and ultralytics:<yaml> models only" in err


def test_weights_option_builds_the_pretrained_1000_class_model(cli):
    from simprune.io.imagenet import weights_path

    if not weights_path("mobilenet_v2", "IMAGENET1K_V1").exists():
        pytest.skip("make weights puts torchvision's MobileNetV2 file into torch's hub cache")
    code, out, _ = cli("info", "--model", "torchvision:mobilenet_v2", "--weights", "IMAGENET1K_V1",
                       "--input", "3x224x224", "--json")
    assert code == 0 and json.loads(out)["params"] == 3_504_872
