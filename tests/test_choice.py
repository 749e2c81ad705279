"""criterion="auto": the candidate that moves the output least on held-aside images is chosen.

The network is the Chain of test_channel_choice with three dead channels planted in conv2 (zero filter,
negative BatchNorm bias: always 0 after the ReLU). l1 removes those first, so the output does not move;
a criterion ranking the other way round removes live channels. No refit and no BatchNorm re-estimation,
so the output change is the removal's alone.
"""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import simprune
from simprune import Choose, Guards, Repair, Selection
from simprune.criteria import Criterion, CriterionResult, get_criterion
from simprune.errors import SimpruneError
from tests.test_channel_choice import Chain, _plant

EXAMPLE = torch.zeros(1, 3, 8, 8)
KEEP_ONLY_CONV2 = Selection(guards=Guards(round_to=1), ignore=("conv1", "fc1"))
NO_REPAIR = Repair.none()


class Contrary(Criterion):
    """l1 upside down: the largest filters go first."""

    name = "contrary"

    def score(self, graph, calibration=None) -> CriterionResult:
        result = get_criterion("l1").score(graph)
        return CriterionResult({root: -s for root, s in result.scores.items()}, normalization="none")


class Unreachable(Criterion):
    name = "unreachable"

    def score(self, graph, calibration=None) -> CriterionResult:
        raise SimpruneError("this criterion cannot score this model")


def _model() -> Chain:
    model = Chain("pool").eval()
    for c in (5, 6, 7):
        _plant(model.conv2, model.bn2, "dead", c)
    return model


def _calibration(n: int = 60) -> DataLoader:
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=20)


def _prune(criterion, n_images: int = 60):
    return simprune.prune(_model(), EXAMPLE, criterion, {"flops": 0.09}, calibration=_calibration(n_images),
                          selection=KEEP_ONLY_CONV2, repair=NO_REPAIR)


def test_the_candidate_that_keeps_the_output_is_chosen_and_removes_the_dead_channels():
    pruned, report = _prune(Choose(candidates=(Contrary(), "l1"), min_images=40))
    choice = report["criterion_choice"]
    assert report["criterion"] == choice["chosen"] == "l1"
    assert choice["tried"]["l1"] < 1e-9 < choice["tried"]["contrary"]
    assert choice["held_aside_images"] == 12 and choice["measure"] == "KL of the logits"
    dead_left = sum(not w.any() for w in pruned.conv2.weight)
    assert pruned.conv2.out_channels == 7 and dead_left == 2  # one of the three dead channels went


def test_a_candidate_that_fails_is_recorded_and_the_others_still_compete():
    _, report = _prune(Choose(candidates=(Unreachable(), "l1"), min_images=40))
    assert report["criterion"] == "l1"
    assert "cannot score" in report["criterion_choice"]["failed"]["unreachable"]


def test_when_every_candidate_fails_one_line_names_each():
    with pytest.raises(SimpruneError, match="no candidate could prune.*unreachable: this criterion cannot"):
        _prune(Choose(candidates=(Unreachable(), Unreachable()), min_images=40))


def test_too_few_images_to_hold_a_share_aside_use_the_fallback_without_trials():
    _, report = _prune(Choose(candidates=(Contrary(), "l1"), min_images=100, fallback="l1"), n_images=60)
    choice = report["criterion_choice"]
    assert report["criterion"] == "l1" and choice["tried"] == {} and "60 calibration images" in choice["why"]


def test_auto_without_calibration_images_is_the_weight_only_default():
    _, report = simprune.prune(_model(), EXAMPLE, "auto", {"flops": 0.09}, selection=KEEP_ONLY_CONV2)
    assert report["criterion"] == "l1" and "no calibration images" in report["criterion_choice"]["why"]


def test_choose_refuses_a_share_that_leaves_nothing_to_fit_on():
    with pytest.raises(SimpruneError, match="share"):
        Choose(share=1.0)
