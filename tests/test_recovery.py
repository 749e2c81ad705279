"""Label-free recovery (repair/recovery.py) on constructed networks where the answer is known."""
import copy

import pytest
import torch
from torch import nn

from simprune.errors import SimpruneError
from simprune.repair.recovery import (
    Recovery,
    augment,
    distill_loss,
    feature_layer,
    head_layers,
    output_loss,
    recover,
    split_images,
    step_batch,
)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).eval()
    with torch.no_grad():  # decisive logits: a random head alone gives near-uniform probabilities
        net[7].weight.mul_(30.0)
    return net


class Poison:
    """A label that fails on any use: recovery must never read labels."""

    def __getattribute__(self, name):
        raise AssertionError(f"a label was read ({name})")


def _calibration(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g)
    return [(x[i:i + 16], Poison()) for i in range(0, n, 16)]


FAST = Recovery(steps=150, batch_size=16, lr=0.05, checks=10, patience=10, bf16=False, cutmix=0.0,
                time_budget_s=None)


def test_recovery_brings_a_damaged_copy_back_to_the_teacher_on_held_aside_images():
    teacher = _net()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # damage the copy: the last layer's weights scaled and shuffled
        student[7].weight.mul_(0.2)
        student[3].weight.add_(0.5 * torch.randn_like(student[3].weight))
    summary = recover(teacher, student, _calibration(), Recovery(**{**FAST.__dict__, "train_head": True}))
    kl = summary["held_out_change"]
    assert kl["after"] < 0.3 * kl["before"]
    assert summary["held_out_agreement"]["after"] >= summary["held_out_agreement"]["before"]
    assert summary["images"] == 64 and summary["held_aside"] == 13
    assert summary["steps"] <= 150 and summary["epochs"] > 0
    # fresh inputs never seen: the student now predicts what the teacher predicts
    x = torch.randn(200, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (student(x).argmax(1) == teacher(x).argmax(1)).float().mean() > 0.85


def test_recovery_keeps_batchnorm_statistics_frozen_and_the_model_mode():
    teacher, student = _net(), _net(1)
    mean = student[1].running_mean.clone()
    student.train()
    recover(teacher, student, _calibration(), Recovery(steps=5, batch_size=8, bf16=False, time_budget_s=None))
    assert torch.equal(student[1].running_mean, mean) and student.training and not teacher.training


def test_an_identical_student_is_left_as_it_is():
    teacher = _net()
    student = copy.deepcopy(teacher)
    summary = recover(teacher, student, _calibration(), Recovery(steps=20, batch_size=8, bf16=False, checks=2,
                                                                  patience=1, time_budget_s=None))
    assert summary["held_out_change"]["before"] == pytest.approx(0.0, abs=1e-6)
    for a, b in zip(teacher.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)  # the best held-aside state is the starting one


def test_the_feature_layer_is_the_last_map_both_models_share():
    teacher = _net()
    student = copy.deepcopy(teacher)
    assert feature_layer(teacher, student, torch.randn(1, 3, 12, 12)) == "4"  # the ReLU before pooling
    student[3] = nn.Conv2d(8, 6, 3, padding=1)  # a pruned last conv: its map no longer matches
    student[7] = nn.Linear(6, 5)
    assert feature_layer(teacher, student, torch.randn(1, 3, 12, 12)) == "2"


def test_loss_is_zero_for_identical_outputs_and_features_count():
    logits, feat = torch.randn(4, 5), torch.randn(4, 3, 2, 2)
    opts = Recovery(feature_weight=1.0)
    assert float(distill_loss(logits, logits, feat, feat, opts)) == pytest.approx(0.0, abs=1e-6)
    # features off by their own size: relative squared error 1 -> loss 1 (KL is 0)
    assert float(distill_loss(logits, logits, torch.zeros_like(feat), feat, opts)) == pytest.approx(1.0, rel=1e-5)


def test_split_and_augment_are_seeded_and_keep_shapes():
    train, held = split_images(_calibration(), 0.25)
    assert len(train) == 48 and len(held) == 16
    again = split_images(_calibration(), 0.25)
    assert torch.equal(train, again[0])
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    a = augment(x, torch.Generator().manual_seed(0), 0.5, 1.0)
    b = augment(x, torch.Generator().manual_seed(0), 0.5, 1.0)
    assert a.shape == x.shape and torch.equal(a, b)
    flat = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])  # crops of a flat image stay flat
    assert torch.allclose(augment(flat, torch.Generator().manual_seed(0), 0.3, 0.0), flat)
    mixed = augment(flat, torch.Generator().manual_seed(0), 0.3, 1.0)  # CutMix pastes 30-70 % of the other
    assert all(0.2 <= float((mixed[i] != flat[i]).float().mean()) <= 0.8 for i in range(2))


def test_bad_options_and_too_few_images_are_one_line():
    with pytest.raises(SimpruneError, match="holdout"):
        Recovery(holdout=1.5)
    with pytest.raises(SimpruneError, match="at least 16"):
        recover(_net(), _net(1), [torch.randn(10, 3, 12, 12)], FAST)


def test_a_head_the_pruning_left_whole_is_reused_as_it_is_when_not_trained():
    teacher = _net()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[3].weight.add_(0.5 * torch.randn_like(student[3].weight))
    assert head_layers(teacher, student, "4", torch.randn(1, 3, 12, 12)) == ["7"]
    options = Recovery(**{**FAST.__dict__, "train_head": False})
    summary = recover(teacher, student, _calibration(), options)
    assert summary["head_kept"] == ["7"]
    assert torch.equal(student[7].weight, teacher[7].weight)  # the head as it was
    assert not torch.equal(student[3].weight, teacher[3].weight)  # the features trained
    assert summary["held_out_change"]["after"] < summary["held_out_change"]["before"]
    pruned = copy.deepcopy(teacher)
    pruned[3], pruned[7] = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6, 5)  # a pruned head is not the teacher's
    assert head_layers(teacher, pruned, feature_layer(teacher, pruned, torch.randn(1, 3, 12, 12)),
                       torch.randn(1, 3, 12, 12)) == []


class _TwoOutputs(nn.Module):
    """A detector-like model: a dict of a dense map and pooled scores (not one tensor of logits)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.dense, self.score = nn.Conv2d(8, 4, 1), nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x)
        return {"map": self.dense(h), "score": self.score(h.mean((2, 3)))}


def test_output_loss_of_other_outputs_is_relative_to_their_image_to_image_spread():
    t = torch.tensor([[[1.0, 1.0]], [[-1.0, -1.0]]])  # (2 images, 1, 2): image mean 0, spread energy 1
    assert float(output_loss([torch.zeros_like(t)], [t], 1.0)) == pytest.approx(1.0)
    assert float(output_loss([t + 1.0, t], [t, t], 1.0)) == pytest.approx(1.0)  # a shift by the spread, one output
    grid = t + torch.tensor([0.0, 100.0])  # a part the same for every image (an anchor grid) does not count
    assert float(output_loss([grid + 1.0], [grid], 1.0)) == pytest.approx(1.0)
    one = torch.tensor([[[1.0, -1.0]]])  # one image: the spread about the channel's mean
    assert float(output_loss([one + 1.0], [one], 1.0)) == pytest.approx(1.0)
    with pytest.raises(SimpruneError, match="not shaped"):
        output_loss([t[:1]], [t], 1.0)


def test_recovery_matches_every_output_of_a_dict_model():
    torch.manual_seed(0)
    teacher = _TwoOutputs().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.body[3].weight.add_(0.5 * torch.randn_like(student.body[3].weight))
    damaged = copy.deepcopy(student)
    summary = recover(teacher, student, _calibration(), Recovery(**{**FAST.__dict__, "feature_weight": 0.0}))
    change = summary["held_out_change"]
    assert summary["measure"] == "relative squared error of the outputs" and summary["held_out_agreement"] is None
    assert change["after"] < 0.3 * change["before"]
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(7))  # fresh inputs
    with torch.no_grad():
        t, s, d = teacher(x), student(x), damaged(x)
    for key in ("map", "score"):  # each output came closer, not only their sum
        assert float(output_loss([s[key]], [t[key]], 1.0)) < 0.3 * float(output_loss([d[key]], [t[key]], 1.0))


def test_the_batch_holds_as_many_pixels_as_batch_size_images_of_224_and_at_least_two():
    assert step_batch(32, (224, 224)) == 32 and step_batch(32, (32, 32)) == 32
    assert step_batch(32, (640, 640)) == 3  # 32 * 224^2 / 640^2 = 3.9 images
    assert step_batch(32, (4000, 4000)) == 2 and step_batch(1, (640, 640)) == 1
