"""recalibrate_bn="if-closer": BatchNorm statistics are re-estimated and kept only when they bring the pruned
model's outputs closer to the unpruned model's. Two constructed cases where the right answer is known: the
stored statistics are the unpruned model's own (keep them), and the stored statistics were corrupted
(re-estimate)."""
import copy

import pytest
import torch
from torch import nn

import simprune
from simprune import Repair
from simprune.repair.batchnorm import recalibrate_if_closer


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5)).eval()


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(16, 3, 8, 8, generator=g) * 3 + 1 for _ in range(4)]  # far from the stored 0/1


def test_stored_statistics_that_give_the_unpruned_outputs_are_kept_exactly():
    original = _net()
    with torch.no_grad():  # "trained" statistics that do not match these images
        original[1].running_mean.uniform_(-1, 1)
        original[1].running_var.uniform_(0.5, 2)
    pruned = copy.deepcopy(original)  # as a refit that reproduced the unpruned pre-BatchNorm outputs
    choice = recalibrate_if_closer(original, pruned, _images())
    assert choice["kept"] == "stored" and choice["output_change"]["stored"] == 0.0
    assert choice["output_change"]["re-estimated"] > 0  # re-estimating on these images would move the outputs
    assert torch.equal(pruned[1].running_mean, original[1].running_mean)
    assert torch.equal(pruned[1].running_var, original[1].running_var)


def test_corrupted_statistics_are_re_estimated_back_to_the_datas():
    original = _net()
    simprune.repair.batchnorm.recalibrate_batchnorm(original, _images())  # statistics of these very images
    pruned = copy.deepcopy(original)
    with torch.no_grad():
        pruned[1].running_mean.add_(5.0)
    choice = recalibrate_if_closer(original, pruned, _images(), held_aside=torch.cat(_images())[:8])
    assert choice["kept"] == "re-estimated" and choice["judged_on"] == "held-aside"
    assert choice["judged_images"] == 8
    assert choice["output_change"]["re-estimated"] < 1e-6 < choice["output_change"]["stored"]
    assert torch.allclose(pruned[1].running_mean, original[1].running_mean, atol=1e-5)


def test_the_default_after_a_refit_is_if_closer_and_the_report_says_what_was_kept():
    model = _net()
    pruned, report = simprune.prune(model, torch.zeros(1, 3, 8, 8), "l1", {"flops": 0.3}, calibration=_images())
    assert report["reconstructed"] and report["batchnorm_choice"]["kept"] in ("stored", "re-estimated")
    assert report["bn_recalibrated"] == (report["batchnorm_choice"]["kept"] == "re-estimated")
    assert report["batchnorm_choice"]["judged_images"] == 64
    plain = simprune.prune(_net(), torch.zeros(1, 3, 8, 8), "l1", {"flops": 0.3}, calibration=_images(),
                           repair=Repair(refit=False))[1]
    assert plain["bn_recalibrated"] and plain.get("batchnorm_choice") is None  # no refit: re-estimated always


def test_an_unknown_recalibrate_bn_is_refused_naming_the_values():
    with pytest.raises(simprune.SimpruneError, match="recalibrate_bn='maybe': pass True, False or 'if-closer'"):
        Repair(recalibrate_bn="maybe")
