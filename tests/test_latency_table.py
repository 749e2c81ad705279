"""The latency cost model: table interpolation, the allocator with latency as its cost, the table
built from real timings, and pruning to a measured latency target."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import simprune
from simprune.allocation.allocator import CostModel, Guards, allocate
from simprune.cli.main import main
from simprune.criteria import get_criterion
from simprune.graph.counting import count
from simprune.graph.groups import PruningGraph
from simprune.models import build_model
from simprune.schedules.latency import (
    LatencyTable,
    LayerLatency,
    build_latency_table,
    monotone,
    next_guess,
    widths,
)


def test_widths_are_multiples_of_8_ending_at_the_layer_width():
    assert widths(16) == [8, 16]
    assert widths(64) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert widths(512) == [64, 128, 192, 256, 320, 384, 448, 512]
    assert widths(100) == [16, 32, 48, 64, 80, 96, 100]
    assert widths(3) == [3]
    assert all(w % 12 == 0 for w in widths(96, multiple=12))


def test_interpolation_is_bilinear_and_clamped():
    layer = LayerLatency([0.5, 1.0], [0.25, 1.0], [[1.0, 4.0], [2.0, 8.0]])
    assert layer(1.0, 1.0) == 8.0 and layer(0.5, 0.25) == 1.0
    assert layer(0.75, 1.0) == pytest.approx(6.0)
    assert layer(1.0, 0.625) == pytest.approx(5.0)
    assert layer(0.75, 0.625) == pytest.approx((2.5 + 5.0) / 2)
    assert layer(0.1, 0.1) == 1.0  # below the grid: the smallest width timed
    grid = monotone(np.array([[3.0, 2.0], [1.0, 5.0]]))
    assert grid.tolist() == [[3.0, 3.0], [3.0, 5.0]]  # fewer channels never cost more


def _proportional_table(model, x, ms_per_mac=1e-6):
    """A table whose latency is exactly proportional to MACs: latency allocation must equal MAC allocation."""
    groups = PruningGraph(copy.deepcopy(model), x).groups
    base = count(model, x)
    cost = CostModel(groups, base)
    layers = {}
    for layer in cost.layers:
        if layer.macs:
            dw = layer.depthwise
            layers[layer.name] = (lambda fi, fo, m=layer.macs, dw=dw: ms_per_mac * m * (fo if dw else fi * fo))
    return LatencyTable(layers, base.macs * ms_per_mac, threads=1), groups, base


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_latency_allocation_equals_mac_allocation_when_latency_is_macs(name):
    model = build_model(name)
    x = torch.zeros(1, 3, 32, 32)
    table, groups, base = _proportional_table(model, x)
    scores = get_criterion("l1").score(PruningGraph(copy.deepcopy(model), x)).scores
    by_macs = allocate(groups, scores, CostModel(groups, base), {"flops": 0.4}, Guards())
    by_latency = allocate(groups, scores, table.cost_model(groups, base), {"latency": 0.4}, Guards())
    assert by_latency.remove == by_macs.remove and by_latency.macs == by_macs.macs
    assert by_latency.reduction == pytest.approx(by_macs.reduction)
    removed = {root: len(ch) for root, ch in by_latency.remove.items()}
    assert table.predict(groups, base, removed) == pytest.approx(base.macs * 1e-6 * (1 - by_latency.reduction))
    # the cost weight uses the latency per channel, which here is the MAC cost per channel
    weighted = allocate(groups, scores, table.cost_model(groups, base), {"latency": 0.4}, Guards(), cost_weight=1)
    assert weighted.remove == allocate(groups, scores, CostModel(groups, base), {"flops": 0.4}, Guards(),
                                       cost_weight=1).remove


def test_latency_cost_steers_the_allocator():
    """When one group's channels are free in time, a latency target cannot be met by removing them."""
    model = build_model("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    table, groups, base = _proportional_table(model, x)
    free = [layer for name, layer in table.layers.items() if name.startswith("layer3")]
    for name in [n for n in table.layers if n.startswith("layer3")]:
        table.layers[name] = lambda fi, fo: 0.0
    table.base_ms -= sum(f(1, 1) for f in free)
    scores = {g.root: torch.arange(g.size, dtype=torch.float) for g in groups}
    alloc = allocate(groups, scores, table.cost_model(groups, base), {"latency": 0.3}, Guards())
    removed = {root: len(ch) for root, ch in alloc.remove.items()}
    assert alloc.reduction >= 0.3 - 0.005
    assert 1 - table.predict(groups, base, removed) / table.base_ms == pytest.approx(alloc.reduction)


def test_next_guess_brackets_the_goal():
    assert next_guess([(0.3, 0.1)], 0.3) == pytest.approx(0.5)  # moves by the miss
    assert next_guess([(0.5, 0.45)], 0.3) == pytest.approx(0.35)
    # one short, one over: between them, by the secant
    assert next_guess([(0.3, 0.1), (0.5, 0.5)], 0.3) == pytest.approx(0.4)
    # a non-monotone measurement never sends it outside the bracket
    g = next_guess([(0.3, 0.1), (0.6, 0.4), (0.45, 0.05)], 0.3)
    assert 0.45 < g < 0.6
    assert next_guess([(0.9, 0.2)], 0.95) == 0.95  # clipped


def test_table_from_real_timings():
    pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10)).eval()
    x = torch.zeros(1, 3, 32, 32)
    groups = PruningGraph(copy.deepcopy(model), x).groups
    table = build_latency_table(model, x, groups, base_ms=1.0, threads=1, runs=3, warmup=1)
    assert set(table.layers) == {"0", "3", "5", "7", "11"}
    assert table.layers["3"] is table.layers["5"]  # one configuration, timed once
    assert table.configs == 4 and table.seconds > 0 and table.threads == 1
    first, classifier = table.layers["0"], table.layers["11"]
    assert first.f_in == [1.0] and first.f_out == [0.25, 0.5, 0.75, 1.0]  # the image's 3 channels never change
    assert classifier.f_out == [1.0] and classifier.f_in == [0.5, 1.0]
    assert table.points == 4 + 16 + 8 + 2
    for layer in table.layers.values():
        grid = np.array(layer.ms)
        assert (grid >= 0).all() and (np.diff(grid, axis=0) >= 0).all() and (np.diff(grid, axis=1) >= 0).all()
    assert table.layers["3"](1, 1) > 0
    json.dumps(table.summary())  # goes into the report


@pytest.mark.slow
def test_cli_target_latency_is_met_within_2_points(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "vgg"
    assert main(["prune", "--model", "vgg16", "--input", "3x32x32", "--criterion", "l1", "--target-latency", "0.3",
                 "--no-latency", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "latency table:" in printed and "iteration 1:" in printed  # widths are aligned by default: no notice
    report = json.loads((out / "report.json").read_text())
    t = report["latency_target"]
    assert report["target"] == {"latency": 0.3}
    # measured latency: within 2 points on an idle machine (bench/latency.py), loosely here so a busy CI core
    # cannot fail the mechanism's test; `met` must say whether the 2-point band was reached
    assert abs(t["achieved"] - 0.3) <= 0.1 and t["met"] == (abs(t["achieved"] - 0.3) <= t["tolerance"]), t["iterations"]
    last = t["iterations"][-1]
    assert t["achieved"] in [i["measured"] for i in t["iterations"]]
    assert last["measured"] == pytest.approx(1 - last["after_ms"] / last["before_ms"])
    assert t["table"]["seconds"] > 0 and t["table"]["layers"] == 15  # 13 convs, 2 linear
    kept = [g["channels_after"] for g in report["groups"]]
    assert all(k % 16 == 0 or k % 8 == 0 for k in kept)  # whole vector blocks
    assert json.loads((out / "model.json").read_text())["pruning"]["target"] == {"latency": 0.3}
    simprune.load(out)


def test_target_latency_errors(tmp_path, capsys):
    base = ["prune", "--model", "resnet20", "--criterion", "l1", "--out", str(tmp_path / "x")]
    assert main(base + ["--target-latency", "1.5"]) == 2
    assert "outside (0, 1)" in capsys.readouterr().err
    assert main(base + ["--target-latency", "0.3", "--target-flops", "0.3"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(base + ["--target-latency", "0.3", "--schedule", "iterative", "--steps", "2"]) == 2
    assert "--target-latency prunes one-shot" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
