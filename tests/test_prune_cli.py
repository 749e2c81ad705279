"""`simprune prune` end to end, its report, and every bad input it must refuse in one line."""
import json
import pickle
import re

import pytest
import torch

import simprune
from simprune.errors import SimpruneError
from simprune.io.files import save_model
from simprune.models import build_model


def _error(result, pattern):
    code, _, err = result
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not re.match(r"^\[ *\d+\.\d+s\] ", line)]  # stages
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], err


def test_prune_writes_model_json_and_report(cli, tmp_path):
    out = tmp_path / "pruned"
    code, stdout, _ = cli("prune", "--model", "resnet20", "--criterion", "l1", "--target-flops", "0.5",
                          "--input", "3x32x32", "--no-latency", "--out", out)  # latency: tests/test_latency.py
    assert code == 0 and "removed" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["channels.png", "model.json", "model.safetensors", "report.html",
                                                     "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"model", "criterion", "target", "macs", "params", "layers", "accuracy"}
    assert report["target"] == {"flops": 0.5} and report["accuracy"] is None
    assert abs(1 - report["macs"]["after"] / report["macs"]["before"] - 0.5) <= 0.01
    assert all(set(layer) == {"name", "channels_before", "channels_after"} for layer in report["layers"])
    desc = json.loads((out / "model.json").read_text())
    assert desc["structure"]["groups"] and desc["input_shape"] == [3, 32, 32] and "torch" in desc["versions"]
    model = simprune.load(out)
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"]


def test_prune_from_checkpoint_keeps_its_input_shape(cli, tmp_path):
    save_model(tmp_path / "ckpt", build_model("resnet20", in_channels=1),
               {"model": "resnet20", "model_args": {"num_classes": 10, "in_channels": 1}, "input_shape": [1, 32, 32]})
    code, _, err = cli("prune", "--checkpoint", tmp_path / "ckpt", "--criterion", "fpgm", "--target-params", "0.3",
                       "--no-latency", "--out", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "model.json").read_text())["input_shape"] == [1, 32, 32]


@pytest.mark.parametrize("args,pattern", [
    (["--target-flops", "1.5"], "outside (0, 1)"),
    (["--target-flops", "0"], "outside (0, 1)"),
    ([], "give exactly one of --target-flops"),
    (["--target-flops", "0.5", "--target-params", "0.5"], "give exactly one of"),
    (["--target-flops", "0.5", "--criterion", "l7"], "unknown criterion 'l7'"),
    (["--target-flops", "0.5", "--ignore", "nothing.*"], "matches no conv/linear layer"),
    (["--target-flops", "0.99"], "largest reachable"),
    (["--target-flops", "0.5", "--criterion", "qsfm"], "needs calibration images"),
    (["--target-flops", "0.5", "--calib-precision", "fp32"], "--calib-precision applies to data criteria"),
    (["--target-flops", "0.5", "--criterion", "auto", "--similarity", "cosine"],
     "--similarity applies to a named criterion"),
])
def test_bad_prune_input_leaves_no_output(cli, tmp_path, args, pattern):
    out = tmp_path / "out"
    _error(cli("prune", "--model", "resnet20", *args, "--out", out), pattern)
    assert not out.exists()
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


def _saved_pruned(tmp_path):
    model, _ = simprune.prune(build_model("resnet20"), torch.zeros(1, 3, 32, 32), "l1", {"flops": 0.4})
    simprune.save(tmp_path / "m", model, {"model": "resnet20", "model_args": {"num_classes": 10, "in_channels": 3},
                                          "input_shape": [3, 32, 32]})
    return tmp_path / "m"


def test_truncated_weights(tmp_path):
    d = _saved_pruned(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SimpruneError, match="not a valid safetensors file"):
        simprune.load(d)


def test_json_shapes_that_disagree_with_weights(tmp_path):
    d = _saved_pruned(tmp_path)
    desc = json.loads((d / "model.json").read_text())
    root, entry = next((r, e) for r, e in desc["structure"]["groups"].items() if len(e["keep"]) < e["size"])
    entry["keep"] = list(range(entry["size"]))  # claims nothing was pruned there
    (d / "model.json").write_text(json.dumps(desc))
    with pytest.raises(SimpruneError, match="has shape .* but the model expects"):
        simprune.load(d)


def test_malformed_structure(tmp_path):
    d = _saved_pruned(tmp_path)
    desc = json.loads((d / "model.json").read_text())
    desc["structure"]["groups"] = {"conv1": {"size": "many", "keep": "all"}}
    (d / "model.json").write_text(json.dumps(desc))
    with pytest.raises(SimpruneError, match="'structure' is malformed"):
        simprune.load(d)


def test_pickle_handed_to_load_is_never_run(tmp_path):
    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {tmp_path}/ran",))

    d = tmp_path / "evil"
    d.mkdir()
    (d / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    (d / "model.json").write_text("{}")
    with pytest.raises(SimpruneError, match="never unpickles"):
        simprune.load(d)
    assert not (tmp_path / "ran").exists()


def test_load_into_a_caller_model(tmp_path):
    d = _saved_pruned(tmp_path)
    fresh = build_model("resnet20")
    model = simprune.load(d, model=fresh)
    assert model is fresh and model.layer1[0].conv1.out_channels <= 16


def test_outputs_have_ordinary_permissions(tmp_path):
    import os
    import stat

    d = _saved_pruned(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((d / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_prune_with_calib_precision_and_a_torch_pruning_criterion(cli, tmp_path):
    for criterion, extra in (("qsfm", ["--calib-precision", "fp32"]), ("tp:lamp", [])):
        out = tmp_path / criterion.replace(":", "-")
        code, _, err = cli("prune", "--model", "resnet20", "--input", "1x32x32", "--criterion", criterion, *extra,
                           "--calib-data", "fashion-mnist-sample", "--calib-images", "32", "--pad-to", "32",
                           "--target-flops", "0.3", "--no-latency", "--out", out)
        assert code == 0, err
        assert json.loads((out / "report.json").read_text())["criterion"] == criterion


def test_criterion_auto_tries_each_candidate_and_records_the_one_it_chose(cli, tmp_path):
    out = tmp_path / "auto"
    code, _, err = cli("prune", "--model", "resnet20", "--input", "1x32x32", "--criterion", "auto",
                       "--calib-data", "fashion-mnist-sample", "--calib-images", "100", "--pad-to", "32",
                       "--target-flops", "0.3", "--no-latency", "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    choice = report["criterion_choice"]
    assert set(choice["tried"]) == set(simprune.Choose().candidates) and choice["held_aside_images"] == 20
    assert report["criterion"] == choice["chosen"] == min(choice["tried"], key=choice["tried"].get)
    assert json.loads((out / "model.json").read_text())["pruning"]["criterion"] == choice["chosen"]
    assert f"criterion chosen by auto | {choice['chosen']}: KL of the logits on 20 held-aside" in \
        (out / "report.md").read_text()
