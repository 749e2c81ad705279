"""Hostile and broken files: every damaged model, training state or data file ends in a one-line error
of ours or loads exactly what it holds; never a traceback, a hang, a memory blow-up, a wrong model,
or a pickle's code running. The cases live in tests/hostile.py (bench/robustness.py runs more)."""
import json
import pickle
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from simprune.errors import SimpruneError
from simprune.io.files import DIGEST_KEY, load_model, read_safetensors, tensors_bytes
from tests import hostile
from tests.hostile import TARGETS, Context, Fuzzer

PAIRS = [(t, m) for t, target in TARGETS.items() for m in target.mutations]


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    return Fuzzer(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("target,mutation", PAIRS, ids=[f"{t}-{m}" for t, m in PAIRS])
def test_every_mutation_is_refused_in_one_line_or_harmless(fuzzer, target, mutation):
    for seed in range(2):
        outcome = fuzzer.run(target, mutation, seed)
        assert outcome.ok, str(outcome)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(PAIRS), seed=st.integers(0, 2**32 - 1))
def test_random_damage_never_fails(fuzzer, case, seed):
    outcome = fuzzer.run(*case, seed)
    assert outcome.ok, str(outcome)


def test_every_target_sees_refusals_and_harmless_cases(fuzzer):
    """The mutations are not all trivially rejected: each target also gets damage it must tolerate."""
    for name in TARGETS:
        verdicts = {fuzzer.run(name, m, s).verdict for m in TARGETS[name].mutations for s in range(2)}
        assert "refused" in verdicts and verdicts & {"identical", "accepted"}, (name, verdicts)


@pytest.mark.parametrize("target", ["model.safetensors", "train_state.safetensors", "model.json", "CIFAR batch",
                                    "imagefolder image"])
def test_pickle_with_code_is_never_run(fuzzer, target, tmp_path):
    mutation = "cifar_payload" if target == "CIFAR batch" else "pickle_payload"
    # the payload is live: plain pickle would create the file
    live = tmp_path / "live"
    pickle.loads(TARGETS[target].mutations[mutation](b"", __import__("random").Random(0), Context(live)))
    assert live.exists()
    for seed in range(4):
        outcome = fuzzer.run(target, mutation, seed)
        assert outcome.verdict == "refused", str(outcome)


def test_torch_save_archive_is_refused_as_a_pickle(fuzzer):
    outcome = fuzzer.run("model.safetensors", "torch_save_payload", 0)
    assert outcome.verdict == "refused" and "never unpickles" in outcome.detail


def test_saved_files_carry_a_digest_and_damage_is_named(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(3)}
    data = tensors_bytes(tensors, {"epoch": "2"})
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    loaded, meta = read_safetensors(path)
    assert meta["epoch"] == "2" and len(meta[DIGEST_KEY]) == 64
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    raw = bytearray(data)
    raw[-1] ^= 0x01  # one bit of the last value
    path.write_bytes(bytes(raw))
    with pytest.raises(SimpruneError, match="damaged: its content no longer matches the sha256"):
        read_safetensors(path)
    meta_changed = data.replace(b'"epoch":"2"', b'"epoch":"3"')
    assert meta_changed != data
    path.write_bytes(meta_changed)
    with pytest.raises(SimpruneError, match="damaged"):
        read_safetensors(path)


def test_files_without_a_digest_still_load(tmp_path):
    """Files written before digests existed (or by other tools) are read as before."""
    path = tmp_path / "old.safetensors"
    path.write_bytes(st_save({"w": torch.ones(2)}))
    tensors, meta = read_safetensors(path)
    assert torch.equal(tensors["w"], torch.ones(2)) and meta == {}


def test_training_state_whose_digest_key_is_damaged_is_refused(fuzzer):
    """A bit flip in the digest's own key ('simprune.shA256') would switch the check off; a training
    state only simprune writes must carry it, so other flips in the same header (history) are caught."""
    folder = fuzzer.workdir / "digest-key"
    folder.mkdir()
    hostile._make_state(folder)
    path = folder / "train_state.safetensors"
    data = path.read_bytes()
    path.write_bytes(data.replace(b"simprune.sha256", b"simprune.shA256").replace(b"train_loss", b"train_doss"))
    outcome_detail = fuzzer._judge(hostile.TARGETS["train_state.safetensors"], "flip_head_bits", folder, None)
    assert outcome_detail[0] == "refused" and "lacks the sha256" in outcome_detail[1]


def test_oracle_catches_a_reader_that_loads_damaged_weights(fuzzer, monkeypatch):
    """Without the digest check a flipped bit loads silently: the harness must call that 'wrong'."""
    import simprune.io.files as files

    real = files.tensor_digest
    monkeypatch.setattr(files, "tensor_digest", lambda t, m=None: (m or {}).get(DIGEST_KEY) or real(t, m))
    verdicts = {fuzzer.run("model.safetensors", "flip_bits", s).verdict for s in range(6)}
    assert "wrong" in verdicts


def test_limits_turn_hangs_and_huge_allocations_into_verdicts(fuzzer, monkeypatch):
    target = TARGETS["IDX"]
    monkeypatch.setattr(hostile, "TIME_LIMIT_S", 1)
    monkeypatch.setattr(target, "load", lambda folder: time.sleep(5))
    assert fuzzer.run("IDX", "truncate", 0).verdict == "hang"
    monkeypatch.setattr(target, "load", lambda folder: bytearray(8 * 2**30))
    assert fuzzer.run("IDX", "truncate", 0).verdict == "memory"


def test_input_shape_too_large_for_one_image_is_refused(fuzzer, tmp_path):
    import json
    import shutil

    files, _ = fuzzer.pristine(TARGETS["model.json"])
    for rel, data in files.items():
        (tmp_path / rel).write_bytes(data)
    desc = json.loads((tmp_path / "model.json").read_text())
    desc["input_shape"] = [3, 100000, 100000]
    (tmp_path / "model.json").write_text(json.dumps(desc))
    with pytest.raises(SimpruneError, match=r"input_shape must be \[C, H, W\]"):
        load_model(tmp_path)
    shutil.rmtree(tmp_path)


def test_model_whose_digest_key_is_damaged_is_refused_through_model_json(fuzzer):
    """model.json records the weights' sha256, so a flip in the weights file's own digest key no longer
    switches the check off: the weights below are changed too, and the load is refused."""
    folder = fuzzer.workdir / "model-digest-key"
    folder.mkdir()
    hostile._make_model(folder)
    assert len(json.loads((folder / "model.json").read_text())["weights_sha256"]) == 64
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes().replace(b"simprune.sha256", b"simprune.shA256"))
    data[-3] ^= 0x10  # one bit of the last weight
    path.write_bytes(bytes(data))
    verdict, detail = fuzzer._judge(hostile.TARGETS["model.safetensors"], "flip_bits", folder, None)
    assert verdict == "refused" and "does not carry the sha256 model.json recorded" in detail
