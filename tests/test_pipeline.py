"""The pipeline as typed steps: the one calibration/device path, the stage options, the repair stage,
the report, and the allocator's ranking against hand-set numbers."""
import warnings

import pytest
import torch
from torch import nn

import simprune
from simprune import distributed
from simprune.allocation.allocator import CostModel, Guards, allocate, normalize
from simprune.calibrate.batches import Calibration
from simprune.calibrate.consumer_inputs import consumer_grams
from simprune.criteria import get_criterion, set_calib_precision
from simprune.errors import SimpruneError
from simprune.graph.counting import count
from simprune.graph.groups import PruningGraph
from simprune.models import build_model
from simprune.repair.refit import RefitOptions, reconstruct, refit_targets
from simprune.repair.stage import Repair

EX = torch.zeros(1, 3, 32, 32)


class Chain(nn.Module):
    """Two prunable groups (conv1 -> 8, conv2 -> 8) read by a 1 x 1 conv and a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.conv3, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def _batches(n=2, size=8, labels=True):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(size, 3, 32, 32, generator=g) for _ in range(n)]
    return [(x, torch.zeros(size, dtype=torch.long)) for x in xs] if labels else xs


# --- Calibration: one device, one precision, one forward ------------------------------------------------------

def test_calibration_keeps_a_one_shot_iterator_and_counts_and_checks_shape():
    calib = Calibration(iter(_batches(3)), EX)
    assert calib.count() == 24 and calib.count() == 24  # read twice: kept
    assert [x.shape[0] for x in calib.images()] == [8, 8, 8]
    with pytest.raises(simprune.SimpruneError, match="calibration images are 3x32x32 but the model's input is 1x32x32"):
        Calibration(_batches(), torch.zeros(1, 1, 32, 32))
    with pytest.raises(simprune.SimpruneError, match="holds no batches"):
        Calibration([], EX)


@pytest.mark.parametrize("labels", [True, False])
def test_batches_reach_the_model_on_its_device_and_dtype_and_modes_come_back(labels):
    model = Chain().train()
    model.conv2.eval()  # a mixed state must come back as it was
    seen = []
    hook = model.conv1.register_forward_pre_hook(lambda m, i: seen.append((i[0].device, i[0].dtype, m.training)))
    n = Calibration(_batches(labels=labels)).forward(model, hooks=[hook], progress=False)
    assert n == 16 and seen == [(distributed.model_device(model), torch.float32, False)] * 2
    assert model.training and model.conv1.training and not model.conv2.training
    assert not model.conv1._forward_pre_hooks  # the hooks were removed


@pytest.mark.parametrize("device,precision,tf32", [("cpu", "bf16", True), ("cpu", "fp32", True),
                                                   ("cuda", "bf16", True), ("cuda", "fp32", False)])
def test_autocast_follows_the_device_type_and_fp32_turns_tf32_off(monkeypatch, device, precision, tf32):
    calls = []

    class Spy:
        def __init__(self, device_type, dtype=None, enabled=True):
            calls.append((device_type, dtype, enabled))

        def __enter__(self):
            calls.append(torch.backends.cuda.matmul.allow_tf32)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(distributed.torch, "autocast", Spy)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with distributed.forward_precision(device, precision):
            pass
        assert calls == [(device, torch.bfloat16, precision == "bf16"), tf32]
        assert torch.backends.cuda.matmul.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_the_refit_and_the_gram_pass_send_batches_to_the_models_device(monkeypatch):
    asked = []
    original = Calibration.images

    def images(self, device=None):
        asked.append(device)
        return original(self, device)

    monkeypatch.setattr(Calibration, "images", images)
    model = Chain().eval()
    reference = Chain().eval()
    reference.load_state_dict(model.state_dict())
    graph = PruningGraph(model, EX)
    remove = {graph.groups[0].root: [0, 1]}
    targets = refit_targets(graph, remove)
    from simprune.graph.removal import remove_channels
    remove_channels(graph, remove)
    reconstruct(reference, model, targets, _batches(), RefitOptions())
    assert asked and set(asked) == {distributed.model_device(model)}
    sums = dict(consumer_grams(model, {"conv3": model.conv3}, _batches()))
    assert sums["conv3"].gram.device.type == "cpu"  # the sums come back for the CPU solve


# --- options and the legacy keywords ------------------------------------------------------------------------

@pytest.mark.parametrize("fold,calib,want", [
    (None, True, dict(refit=True, fold=False, protect_uncompensable=True, recalibrate_bn="if-closer")),
    (None, False, dict(refit=False, fold=True, protect_uncompensable=True, recalibrate_bn=False)),
    ("twin", True, dict(refit=False, fold="twin", protect_uncompensable=True, recalibrate_bn=True)),
    (False, False, dict(refit=False, fold=False, protect_uncompensable=False, recalibrate_bn=False)),
])
def test_repair_auto_resolves_as_the_old_defaults(fold, calib, want):
    class Crit:
        compensate_by_default = True

    got = Repair(fold=fold).resolve(Crit(), _batches() if calib else None)
    assert {k: bool(getattr(got, k)) if k == "refit" else getattr(got, k) for k in want} == want


def test_legacy_keywords_warn_once_each_and_give_the_typed_decision():
    model = build_model("resnet20").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, old = simprune.prune(model, EX, "l1", {"flops": 0.4}, guards=Guards(round_to=1), device="cpu")
    assert [str(w.message).split("(")[1] for w in caught if w.category is DeprecationWarning] == \
        ["guards=) is deprecated; use selection=Selection", "device=) is deprecated; use schedule=OneShot"]
    _, new = simprune.prune(model, EX, "l1", {"macs": 0.4}, selection=simprune.Selection(guards=Guards(round_to=1)),
                            schedule=simprune.OneShot(device="cpu"))
    assert new["decision_fingerprint"] == old["decision_fingerprint"]
    assert new["schema_version"] == 2 and new["options"]["selection"]["guards"]["round_to"] == 1
    assert new["recovered"] is False and new["target"] == {"flops": 0.4}


def test_a_recovery_step_runs_after_the_refit_and_is_reported():
    class Recovery:
        def run(self, original, pruned, calibration, held_aside):
            return {"images": calibration.count(), "same": original is not pruned, "held": held_aside}

    _, report = simprune.prune(build_model("resnet20").eval(), EX, "l1", {"flops": 0.3}, calibration=_batches(4),
                               repair=Repair(recover=Recovery()), schedule=simprune.OneShot(device="cpu"))
    assert report["recovered"] == {"images": 32, "same": True, "held": None}
    assert report["batchnorm_choice"]["judged_on"] == "calibration"  # the BatchNorm choice ran before it


def test_the_recovery_s_held_aside_images_are_kept_from_scores_refit_and_batchnorm():
    seen = {}

    class Recovery:
        holdout, seed = 0.25, 0

        def run(self, original, pruned, calibration, held_aside):
            seen.update(fit=torch.cat([x for x, _ in calibration]), held=held_aside)
            return {}

    batches = _batches(4)
    simprune.prune(build_model("resnet20").eval(), EX, "refit-error", {"flops": 0.3}, calibration=batches,
                   repair=Repair(recover=Recovery()), schedule=simprune.OneShot(device="cpu"))
    every = torch.cat([x for x, _ in batches])
    assert len(seen["held"]) == 8 and len(seen["fit"]) == 24
    assert not any((seen["fit"] == h).flatten(1).all(1).any() for h in seen["held"])  # disjoint
    assert sorted(map(tuple, torch.cat([seen["fit"], seen["held"]]).flatten(1)[:, :4].tolist())) == \
        sorted(map(tuple, every.flatten(1)[:, :4].tolist()))  # and together all of them


def test_holding_images_aside_keeps_labels_batch_size_and_is_seeded():
    x, y = torch.randn(20, 3, 4, 4), torch.arange(20)
    cal = Calibration([(x[i:i + 6], y[i:i + 6]) for i in range(0, 20, 6)])
    rest, held = cal.hold_aside(0.25, seed=1)
    again = cal.hold_aside(0.25, seed=1)[1]
    assert torch.equal(held, again) and len(held) == 8  # at least 8 held aside
    labels = torch.cat([b[1] for b in rest])
    assert [len(b[0]) for b in rest] == [6, 6] and torch.equal(torch.cat([b[0] for b in rest]), x[labels])


def test_recovery_runs_last_under_the_re_estimated_batchnorm_statistics():
    seen = {}

    class Recovery:
        def run(self, original, pruned, calibration, held_aside):
            seen["mean"] = pruned.bn1.running_mean.clone()
            return {}

    model = build_model("resnet20").eval()
    pruned, _ = simprune.prune(model, EX, "l1", {"flops": 0.3}, calibration=_batches(4),
                               repair=Repair(recover=Recovery()), schedule=simprune.OneShot(device="cpu"))
    assert not torch.equal(model.bn1.running_mean[: len(seen["mean"])], seen["mean"])  # re-estimated before
    assert torch.equal(pruned.bn1.running_mean, seen["mean"])  # and not touched after


def test_recovery_without_calibration_is_one_line_naming_the_fix():
    with pytest.raises(SimpruneError, match="recovery needs calibration images; pass calibration="):
        simprune.prune(build_model("resnet20").eval(), EX, "l1", {"flops": 0.3}, repair=Repair(recover=True))


def test_calib_precision_is_one_name_on_refit_error_too():
    crit = get_criterion("refit-error")
    set_calib_precision(crit, "bf16")
    assert crit.calib_precision == "bf16"
    assert get_criterion("refit-error", precision="bf16").calib_precision == "bf16"  # the old name


def test_prune_group_keeps_member_indices_true():
    model, ex = build_model("mobilenetv2").eval(), torch.zeros(1, 3, 32, 32)
    graph = PruningGraph(model, ex)
    for group in graph.groups:
        if group.size > 8:
            graph.prune_group(group, [0, 3, 5])
    fresh = {g.root: sorted((m.name, m.dim, m.idxs) for m in g.members) for g in PruningGraph(model, ex).groups}
    assert {g.root: sorted((m.name, m.dim, m.idxs) for m in g.members) for g in graph.groups} == fresh


# --- the allocator against hand-set numbers -------------------------------------------------------------------

def test_normalize_against_hand_computed_values():
    s = torch.tensor([1.0, -2.0, 3.0, 2.0])
    assert normalize(s, "none").tolist() == [1.0, -2.0, 3.0, 2.0]
    assert torch.allclose(normalize(s, "mean"), torch.tensor([0.5, -1.0, 1.5, 1.0], dtype=torch.float64))
    assert torch.allclose(normalize(s, "max"), torch.tensor([1 / 3, -2 / 3, 1.0, 2 / 3], dtype=torch.float64))
    assert normalize(s, "rank").tolist() == [0.5, 0.25, 1.0, 0.75]
    with pytest.raises(simprune.SimpruneError, match="unknown normalisation"):
        normalize(s, "z")


def _chain_allocation(scores, target, normalization="none", cost_weight=0.0):
    model = Chain().eval()
    graph = PruningGraph(model, EX)
    cost = CostModel(graph.groups, count(model, EX))
    alloc = allocate(graph.groups, dict(zip(ROOTS, scores)), cost, target,
                     Guards(min_channels=1, max_layer_ratio=0.9, round_to=1), normalization, cost_weight)
    return alloc.remove


ROOTS = ("conv1", "conv2")  # conv3 (read by the classifier) gets no score: left whole


def _share(kind: str, conv1: int, conv2: int) -> float:
    """The fraction of MACs ("flops") or params that removing that many channels of each group saves."""
    model = Chain().eval()
    graph = PruningGraph(model, EX)
    cost = CostModel(graph.groups, count(model, EX))
    k = 0 if kind == "flops" else 1
    removed = [{"conv1": conv1, "conv2": conv2}.get(g.root, 0) for g in graph.groups]
    return 1 - cost.totals(removed)[k] / cost.totals([0] * len(graph.groups))[k]


def test_the_allocator_ranks_channels_across_groups_by_their_scores():
    a = torch.tensor([0.10, 0.90, 0.20, 0.80, 0.30, 0.70, 0.40, 0.60])
    b = a + 0.05  # interleaved with a's: the global order is a0 b0 a2 b2 a4 ...
    target = {"params": _share("params", 2, 2)}  # exactly the four lowest channels' parameters
    assert _chain_allocation([a, b], target) == {"conv1": [0, 2], "conv2": [0, 2]}
    # group b's scores x 10 outrank all of a's unnormalised, but rank like a's once max-normalised
    assert "conv2" not in _chain_allocation([a, 10 * a], {"params": _share("params", 3, 0)})
    assert _chain_allocation([a, 10 * a], target, "max") == {"conv1": [0, 2], "conv2": [0, 2]}


def test_cost_weight_prefers_the_costlier_group_outside_the_latency_case():
    ones = torch.ones(8)
    target = {"flops": _share("flops", 1, 0)}  # one conv1 channel: its MACs outweigh a conv2 channel's
    assert _share("flops", 1, 0) > _share("flops", 0, 1)
    assert sorted(_chain_allocation([ones, 0.9 * ones], target)) == ["conv2"]  # by importance alone
    assert _chain_allocation([ones, 0.9 * ones], target, cost_weight=1.0) == {"conv1": [0]}
