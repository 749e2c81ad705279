"""A newcomer's error paths: one line naming the problem and the fix, exit code 2, no traceback, in the
vocabulary of the interface (CLI flags on the command line, keyword names in the Python API)."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import simprune
from simprune.cli.vocabulary import cli_wording
from simprune.errors import SimpruneError
from simprune.io import data
from simprune.models import build_model

ROOT = Path(__file__).resolve().parents[1]
R20 = ROOT / "zoo" / "resnet20-fashion-mnist"
R56 = ROOT / "zoo" / "resnet56-fashion-mnist"


STAGE = re.compile(r"^\[ *\d+\.\d+s\] ")  # "[   1.2s] loading ...": a stage that took over a second


def one_line(code, err, *fragments):
    """Exit code 2 and exactly one stderr line starting with ``error:`` holding every fragment (stage lines of
    steps that took over a second on a busy machine may precede it)."""
    lines = [line for line in err.strip().splitlines() if not STAGE.match(line)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run(*argv, env=None, **kwargs):
    """The installed console script in a subprocess: (exit code, stdout, stderr)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "simprune.cli", *map(str, argv)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=300, **kwargs)
    return proc.returncode, proc.stdout, proc.stderr


# ---- the model's input -------------------------------------------------------------------------------------------

def test_prune_with_the_wrong_channel_count_names_the_right_input(cli, tmp_path):
    code, _, err = cli("prune", "--checkpoint", R20, "--input", "3x32x32", "--target-flops", "0.3",
                       "--out", tmp_path / "o")
    one_line(code, err, "--input 3x32x32 has 3 channel(s)", "takes 1-channel images", "--input 1x32x32",
             "drop --input")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, fix", [
    (("info", "--model", "resnet20", "--input", "32x32x3"), "--input 3x32x32"),
    (("info", "--model", "torchvision:resnet18", "--input", "224x224x3"), "--input 3x224x224"),
    (("info", "--checkpoint", R56, "--input", "32x32x1"), "--input 1x32x32"),
])
def test_channel_last_input_is_refused(cli, argv, fix):
    one_line(*cli(*argv)[::2], "looks like height x width x channels", fix)


def test_channel_last_looking_input_is_accepted_when_the_model_agrees(cli):
    code, out, err = cli("info", "--model", "resnet20", "--in-channels", "32", "--input", "32x32x3")
    assert code == 0 and "32x32x3" in out, err


def test_info_uses_the_checkpoints_input_shape(cli):
    code, out, err = cli("info", "--checkpoint", R56)
    assert code == 0, err
    assert "1x32x32" in out and "125.19 M" in out  # before: 'model does not accept input 3x32x32'


def test_a_folder_that_is_not_a_model(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    one_line(*cli("info", "--checkpoint", tmp_path)[::2], "is not a simprune model", "holds no model.safetensors")
    one_line(*cli("info", "--checkpoint", tmp_path / "notes.txt")[::2], "is not a .safetensors file")
    one_line(*cli("info", "--checkpoint", tmp_path / "missing")[::2], "does not exist")


# ---- data sets ---------------------------------------------------------------------------------------------------

def test_cifar10_without_the_data_is_one_line(tmp_path):
    """Offline: torchvision is imported through simprune's shim first, then the download fails in one line."""
    code, _, err = run("evaluate", "--checkpoint", R20, "--data", "cifar10",
                       env={"XDG_CACHE_HOME": str(tmp_path), "SIMPRUNE_DATA": str(tmp_path),
                            "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"})
    one_line(code, err, "cifar10 is not on this machine", "cifar-10-python.tar.gz", "--data-dir DIR")
    assert "nms" not in err


def test_mnist_hint_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(data, "_find_idx_dir", lambda name, data_dir: None)
    tv = data.import_torchvision()
    monkeypatch.setattr(tv.datasets, "MNIST", offline)
    with pytest.raises(SimpruneError) as info:
        data.load_dataset("mnist", "test")
    text = cli_wording(str(info.value))
    assert "run `download" not in text  # before: "run `download the MNIST IDX files`"
    assert "put the four MNIST IDX files" in text and text.endswith("pass --data-dir DIR")


# ---- the shell ---------------------------------------------------------------------------------------------------

def test_models_piped_into_head_ends_quietly():
    proc = subprocess.run(f"{sys.executable} -m simprune.cli models --torchvision | head -2", shell=True,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.count("\n") == 2 and proc.stderr == ""  # before: BrokenPipeError traceback


@pytest.mark.parametrize("argv, fragment, where", [
    (("prune", "--bogus", "--out", "x"), "unrecognized arguments: --bogus", "simprune prune --help"),
    (("frob",), "invalid choice: 'frob'", "simprune --help"),
    (("prune", "--compensate", "True", "--out", "x"), "choose lstsq or twin, got 'True'", "simprune prune --help"),
])
def test_argument_errors_in_the_console(argv, fragment, where):
    one_line(*run(*argv)[::2], fragment, f"see `{where}`")  # before: 28 lines of usage


def test_compensate_lists_its_modes_without_true():
    _, out, _ = run("prune", "--help")
    assert "--compensate [MODE]" in out and "True" not in out and "lstsq (default) or twin" in " ".join(out.split())


# ---- the two vocabularies ----------------------------------------------------------------------------------------

def test_api_errors_name_keywords(tmp_path):
    model = build_model("resnet20")
    with pytest.raises(SimpruneError, match="pass calibration=$"):
        simprune.prune(model, torch.zeros(1, 3, 32, 32), "qsfm", {"flops": 0.3})
    simprune.save(tmp_path / "m", model, {"model": "resnet20"})
    with pytest.raises(SimpruneError, match="pass overwrite=True or pick another") as info:
        simprune.save(tmp_path / "m", model, {"model": "resnet20"})
    assert "--" not in str(info.value)  # before: "pass --overwrite" for overwrite=True
    with pytest.raises(SimpruneError, match="steps=0 must be 1 or more"):
        simprune.prune(model, torch.zeros(1, 3, 32, 32), "l1", {"flops": 0.3}, schedule="iterative", steps=0)


def test_the_same_errors_name_flags_on_the_command_line(cli, tmp_path):
    one_line(*cli("prune", "--checkpoint", R20, "--criterion", "qsfm", "--target-flops", "0.3",
                  "--out", tmp_path / "o")[::2], "needs calibration images; pass --calib-data NAME")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    one_line(*cli("analyze", "--checkpoint", R20, "--out", tmp_path / "full")[::2], "pass --overwrite or pick another")


@pytest.mark.parametrize("api, cli_text", [
    ("pass calibration= or recalibrate_bn=False", "pass --calib-data NAME or --no-recalibrate-bn"),
    ("pass overwrite=True or pick another", "pass --overwrite or pick another"),
    ("pad_to=40 is smaller", "--pad-to 40 is smaller"),
    ("ignore='conv9*' matches no conv/linear layer", "--ignore conv9* matches no conv/linear layer"),
    ("lower min_channels=, raise max_layer_ratio=", "lower --min-channels N, raise --max-layer-ratio R"),
    ("steps=0 must be 1 or more", "--steps 0 must be 1 or more"),
    ("a criterion_options= dict", "a criterion_options= dict"),  # no flag for it: left alone
    ("--overwrite already a flag", "--overwrite already a flag"),
    ("pass repair=Repair(recover=None)", "pass --no-recover"),
    ("give Preprocess(resize=, crop=, mean=, std=)", "give --resize/--crop/--mean/--std"),
])
def test_cli_wording_translates_keywords_to_flags(api, cli_text):
    assert cli_wording(api) == cli_text


def _raised_messages(path: Path):
    """(line, text) of every SimpruneError raised in ``path``: the literal parts of its message."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                getattr(node.exc.func, "id", None) == "SimpruneError" and node.exc.args:
            parts = [n.value for n in ast.walk(node.exc.args[0]) if isinstance(n, ast.Constant)
                     and isinstance(n.value, str)]
            yield node.lineno, "".join(parts)


def test_library_messages_name_no_flags():
    """Errors raised below cli/ speak the API: a flag there is wrong for Python users (a `simprune ...`
    command in backticks is fine: it names a command to run)."""
    flagged = []
    for path in (ROOT / "src" / "simprune").rglob("*.py"):
        if "cli" in path.parts:
            continue
        for line, text in _raised_messages(path):
            if re.search(r"(^|[\s(])--[a-z]", re.sub(r"`[^`]*`", "", text)):
                flagged.append(f"{path.relative_to(ROOT)}:{line}: {text[:80]}")
    assert not flagged, "\n".join(flagged)
