"""--device / device=: the choice of device, its one-line refusal, and the CPU path's decision."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import simprune
from simprune import distributed
from simprune.cli.main import main
from simprune.errors import SimpruneError
from simprune.models import build_model


def _calibration():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 3, 32, 32, generator=g), torch.zeros(32, dtype=torch.long)) for _ in range(2)]


def _fake_cuda(monkeypatch, available: bool, count: int = 2) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)


def test_explicit_cpu_gives_the_default_decision():
    torch.manual_seed(0)
    model, cal = build_model("resnet20").eval(), _calibration()
    example = torch.zeros(1, 3, 32, 32)
    _, default = simprune.prune(model, example, "qsfm", {"flops": 0.3}, calibration=cal)
    pruned, on_cpu = simprune.prune(model, example, "qsfm", {"flops": 0.3}, calibration=cal, device="cpu")
    assert on_cpu["device"] == "cpu"
    assert on_cpu["decision_fingerprint_per_rank"] == default["decision_fingerprint_per_rank"]
    assert next(pruned.parameters()).device.type == "cpu"


def test_default_is_cuda_when_available(monkeypatch):
    _fake_cuda(monkeypatch, True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.resolve_device(None) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # one GPU per torchrun process
    assert distributed.resolve_device(None) == torch.device("cuda", 1)
    assert distributed.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    _fake_cuda(monkeypatch, False)
    assert distributed.resolve_device(None) == torch.device("cpu")


def test_cuda_absent_is_refused_in_one_line(monkeypatch):
    _fake_cuda(monkeypatch, False)
    with pytest.raises(SimpruneError) as err:
        simprune.prune(build_model("resnet20"), torch.zeros(1, 3, 32, 32), "l1", {"flops": 0.3}, device="cuda")
    assert "device=cuda" in str(err.value) and "device=cpu" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SimpruneError, match="device=tpu is not a device"):
        distributed.resolve_device("tpu")


def test_cli_device_cuda_absent_names_the_flag(monkeypatch, capsys, tmp_path):
    _fake_cuda(monkeypatch, False)
    rc = main(["prune", "--model", "resnet20", "--criterion", "l1", "--target-flops", "0.3",
               "--out", str(tmp_path / "out"), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--device cuda" in err and "--device cpu" in err


@pytest.mark.parametrize("cuda, backend", [(True, "nccl"), (False, "gloo")])
def test_process_group_backend_follows_the_device(monkeypatch, cuda, backend):
    _fake_cuda(monkeypatch, cuda)
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: seen.setdefault("backend", backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("gpu", torch.device(d)))
    assert distributed.init_from_env()
    assert seen["backend"] == backend
    assert seen.get("gpu") == (torch.device("cuda", 1) if cuda else None)


def test_statistics_come_back_on_the_cpu():
    from simprune.calibrate.calibration import collect_statistics
    from simprune.graph.groups import PruningGraph

    model = build_model("resnet20").eval()
    graph = PruningGraph(model, torch.zeros(1, 3, 32, 32))
    probes = collect_statistics(model, graph, _calibration()[:1], {"ssim", "gram"}, progress=False)
    assert all(p.stats.device.type == "cpu" for plist in probes.values() for p in plist)
