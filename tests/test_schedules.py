"""Schedules: iterative targets, soft zeroing that removal leaves unchanged, the soft train loop."""
import pytest
import torch

import simprune
from simprune.allocation.allocator import Guards
from simprune.allocation.selection import Selection
from simprune.criteria import get_criterion
from simprune.graph.counting import count
from simprune.graph.groups import PruningGraph
from simprune.io.data import DatasetInfo, ImageTensorDataset
from simprune.models import build_model
from simprune.schedules.iterative import iterative, step_targets
from simprune.schedules.oneshot import Job
from simprune.schedules.soft import (
    SoftPruning,
    finish_soft,
    soft_selector,
    soft_shares,
    zero_exact,
)
from simprune.train.loop import TrainConfig, train


def test_step_targets_remove_equal_shares_of_what_is_left():
    t = step_targets(0.64, 2)
    assert t == pytest.approx([0.4, 0.64])  # 1 - 0.6, 1 - 0.36
    assert step_targets(0.5, 1) == [0.5]


def test_soft_shares_rise_linearly_then_hold():
    assert soft_shares(0.6, 3) == pytest.approx([0.2, 0.4, 0.6])
    assert soft_shares(0.6, 4, hold=2) == pytest.approx([0.3, 0.6, 0.6, 0.6])
    with pytest.raises(simprune.SimpruneError, match="hold="):  # the API names the keyword (the CLI says --soft-hold)
        soft_shares(0.6, 2, hold=2)


@pytest.mark.parametrize("name,shape", [("resnet20", (3, 32, 32)), ("resnet20_b", (3, 32, 32)),
                                        ("mobilenetv2", (3, 32, 32)), ("torchvision:resnet18", (3, 64, 64)),
                                        ("torchvision:densenet121", (3, 64, 64))])
def test_soft_zeroing_then_removal_leaves_outputs_unchanged(name, shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    # random BN statistics/affine so that zeroing must really neutralise the channel
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(3, *shape)
    graph = PruningGraph(model, torch.zeros(1, *shape))
    select = soft_selector(graph, get_criterion("filter-similarity"), torch.zeros(1, *shape))
    hooks = SoftPruning(graph, select, "flops", 0.5, epochs=2, log=lambda _: None)
    hooks.on_epoch_end(model, 1)  # 25 %: filters only
    hooks.on_epoch_end(model, 2)  # 50 %: final selection, fully zeroed
    assert hooks.frozen and sum(map(len, hooks.selected.values())) > 0
    with torch.no_grad():
        zeroed = model(x)
        finish_soft(hooks)
        removed = model(x)
    torch.testing.assert_close(removed, zeroed, rtol=1e-5, atol=1e-5)
    after = count(model, torch.zeros(1, *shape))
    before = count(build_model(name, num_classes=10), torch.zeros(1, *shape))
    assert abs((1 - after.macs / before.macs) - 0.5) <= 0.01


def test_option_a_middle_stage_is_left_whole_by_soft_pruning():
    graph = PruningGraph(build_model("resnet20"), torch.zeros(1, 3, 32, 32))
    unsafe = [g.root for g in graph.groups if not zero_exact(g)]
    assert len(unsafe) == 1  # stage 2: written by one zero-pad shortcut and read by the next


@pytest.mark.parametrize("ratio,steps", [(0.6, 3), (0.45, 2)])
def test_iterative_reaches_the_target_within_one_point(ratio, steps):
    model = build_model("resnet20").eval()
    calls = []
    job = Job(model, torch.zeros(1, 3, 32, 32), "filter-similarity", {"flops": ratio})
    pruned, report = iterative(job, steps, between=lambda m, k: calls.append(k))
    assert abs(report["reduction"]["flops"] - ratio) <= 0.01
    assert [s["step"] for s in report["schedule"]["steps"]] == list(range(1, steps + 1))
    assert calls == list(range(1, steps))  # fine-tuning between steps, not after the last
    macs = [s["macs_after"] for s in report["schedule"]["steps"]]
    assert macs == sorted(macs, reverse=True)
    assert report["macs"]["before"] == count(build_model("resnet20"), torch.zeros(1, 3, 32, 32)).macs


def test_api_prune_runs_the_iterative_schedule():
    model = build_model("resnet20").eval()
    _, report = simprune.prune(model, torch.zeros(1, 3, 32, 32), "l1", {"flops": 0.5}, schedule="iterative",
                               steps=2)
    assert abs(report["reduction"]["flops"] - 0.5) <= 0.01 and len(report["schedule"]["steps"]) == 2


def _tiny_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageTensorDataset(x, y, DatasetInfo(10, 1, (0.5,), (0.25,)))


def test_soft_training_loop_zeroes_then_removes_with_identical_outputs(tmp_path):
    model = build_model("resnet20", num_classes=10, in_channels=1)
    ex = torch.zeros(1, 1, 16, 16)
    graph = PruningGraph(model, ex)
    select = soft_selector(graph, get_criterion("filter-similarity"), ex, selection=Selection(guards=Guards()))
    hooks = SoftPruning(graph, select, "flops", 0.4, epochs=3, hold=1, log=lambda _: None)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, limit_batches=2)
    train(model, _tiny_data(), cfg, tmp_path, log=lambda _: None, progress=False, hooks=hooks)
    model.eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        zeroed = model(x)
        finish_soft(hooks)
        removed = model(x)
    torch.testing.assert_close(removed, zeroed, rtol=1e-5, atol=1e-5)
    assert abs(1 - count(model, ex).macs / count(build_model("resnet20", in_channels=1), ex).macs
               - 0.4) <= 0.01


def _soft_run(tmp_path, fail_at=None, resume=False):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1)
    ex = torch.zeros(1, 1, 16, 16)
    graph = PruningGraph(model, ex)
    hooks = SoftPruning(graph, soft_selector(graph, get_criterion("filter-similarity"), ex), "flops", 0.4,
                        epochs=3, hold=1, log=lambda _: None)
    if fail_at:
        original = hooks.on_epoch_end

        def on_epoch_end(m, epoch):
            if epoch == fail_at:
                raise KeyboardInterrupt
            original(m, epoch)
        hooks.on_epoch_end = on_epoch_end
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, limit_batches=2)
    train(model, _tiny_data(), cfg, tmp_path, log=lambda _: None, progress=False, hooks=hooks, resume=resume)
    finish_soft(hooks)
    return model


def test_soft_run_interrupted_then_resumed_equals_an_uninterrupted_one(tmp_path):
    straight = _soft_run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _soft_run(tmp_path / "b", fail_at=2)  # epoch 1's checkpoint (weights, momentum, selection) survives
    resumed = _soft_run(tmp_path / "b", resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
