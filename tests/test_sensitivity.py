"""Layer gains (how far the output moves per unit of relative error at a layer), the gain-weighted greedy
removal, and the refit-error criterion's refusal to judge readers with too few calibration rows."""
import copy

import pytest
import torch
from torch import nn

from simprune.calibrate.sensitivity import output_change, output_gains, output_tensors
from simprune.criteria import get_criterion
from simprune.graph.groups import PruningGraph
from simprune.graph.removal import remove_channels
from simprune.repair.refit import RIDGE_CHOICES, RefitOptions, reconstruct, refit_targets
from simprune.stats.refit import greedy_removal
from tests.test_reconstruct import Tiny


class TwoBranch(nn.Module):
    """``head`` makes the output; ``dead`` is computed and multiplied by zero, so nothing it does shows."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 1)
        self.dead = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.head(h) + 0.0 * self.dead(h)


def _images(n=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 2, 6, 6, generator=g),) for _ in range(n)]


def test_noise_at_the_output_layer_moves_the_output_by_its_relative_energy_and_a_dead_layer_not_at_all():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    gains = output_gains(model, {"head": model.head, "dead": model.dead}, _images(), images=256)
    # noise of relative energy epsilon on the output itself changes it by epsilon of its energy: gain 1
    assert gains["head"] == pytest.approx(1.0, rel=0.15)
    assert gains["dead"] == 0.0


def test_a_classifier_gain_is_the_logit_kl_per_unit_of_relative_error():
    reference = [torch.tensor([[2.0, 0.0], [0.0, 2.0]])]
    same = output_change(reference, [reference[0].clone()])
    moved = output_change(reference, [torch.tensor([[0.0, 2.0], [0.0, 2.0]])])
    p = torch.tensor([2.0, 0.0]).softmax(0)  # the first image's KL from swapping its logits, by hand
    assert same == 0.0
    assert moved == pytest.approx(float((p * (p.log() - p.flip(0).log())).sum()) / 2, rel=1e-5)
    assert len(output_tensors({"a": torch.zeros(2), "b": (torch.ones(1), torch.zeros(1, dtype=torch.long))})) == 2


def test_layer_weights_decide_which_reader_is_spared():
    # two readers of the same two channels (Gram I): A needs channel 1 (weights 1, 3), B channel 0 (3, 1)
    eye = torch.eye(2, dtype=torch.float64)
    wa, wb = torch.tensor([[1.0, 3.0]], dtype=torch.float64), torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    blocks = [torch.tensor([[0], [1]])] * 2
    order, cumulative = greedy_removal([eye, eye], [wa, wb], blocks, 1, 0.0, [1.0, 3.0])
    assert order == [1] and cumulative == pytest.approx([9 / 10 + 3 * 1 / 10])  # B weighs more: keep its 0
    order, cumulative = greedy_removal([eye, eye], [wa, wb], blocks, 1, 0.0, [3.0, 1.0])
    assert order == [0] and cumulative == pytest.approx([3 * 1 / 10 + 9 / 10])


def _criterion(**options):
    return get_criterion("refit-error", precision="fp32", ridge=1e-9, **options)


def test_a_group_read_with_too_few_rows_for_its_columns_is_marked_doubtful_and_said_so():
    torch.manual_seed(0)
    model = Tiny().eval()  # fc reads conv2's 5 pooled channels: one row per image
    graph = PruningGraph(model, torch.zeros(1, 2, 8, 8))
    few = [(torch.randn(12, 2, 8, 8),)]  # 12 rows < 4 x 5 columns
    result = _criterion().score(graph, few)
    assert {"conv1", "conv2"} <= result.scores.keys() and result.doubtful == {"conv2"}
    assert "fc (12 rows for 5 inputs)" in result.notes["too_few_rows"]
    enough = [(torch.randn(16, 2, 8, 8),) for _ in range(2)]
    assert _criterion().score(graph, enough).doubtful == set()


def test_a_doubtful_group_is_kept_whole_unless_the_target_needs_it(recwarn):
    import simprune
    torch.manual_seed(0)
    few = [(torch.randn(12, 2, 8, 8),)]
    loose = simprune.Selection(guards=simprune.Guards(min_channels=1, round_to=1, max_layer_ratio=1.0),
                               criterion_options={"precision": "fp32"})
    bare = simprune.Repair(refit=False, recalibrate_bn=False)  # only the criterion's doubt keeps conv2 whole
    pruned, _ = simprune.prune(Tiny().eval(), torch.zeros(1, 2, 8, 8), "refit-error", {"params": 0.05},
                               calibration=few, selection=loose, repair=bare)
    assert pruned.conv2.out_channels == 5 and pruned.conv1.out_channels < 4
    pruned, _ = simprune.prune(Tiny().eval(), torch.zeros(1, 2, 8, 8), "refit-error", {"params": 0.05},
                               calibration=few, selection=loose.replace(ignore=("conv1",)), repair=bare)
    assert pruned.conv2.out_channels < 5 and pruned.conv1.out_channels == 4  # only conv2 can meet it
    assert any("refit-error scored on too few calibration rows (conv2)" in str(w.message) for w in recwarn)


def test_gain_weighting_scales_a_groups_scores_by_its_readers_gain():
    torch.manual_seed(0)
    model = Tiny().eval()
    graph = PruningGraph(model, torch.zeros(1, 2, 8, 8))
    data = [(torch.randn(32, 2, 8, 8),) for _ in range(2)]
    plain = _criterion().score(graph, data).scores
    crit = _criterion(weigh_by_gain=True)
    weighted = crit.score(graph, data).scores
    assert set(crit.gains) == {"conv2", "fc"}
    for root, reader in (("conv1", "conv2"), ("conv2", "fc")):
        greedy = plain[root] < plain[root].max()  # the channel greedy never removes gets a sentinel score
        torch.testing.assert_close(weighted[root][greedy], plain[root][greedy] * crit.gains[reader], rtol=1e-6,
                                   atol=1e-12)


def _refit_tiny(data, options: RefitOptions):
    """Tiny with conv1's channel 1 removed and refit on ``data``: (reference, pruned, refit summary)."""
    torch.manual_seed(0)
    model = Tiny().eval()
    reference = copy.deepcopy(model)
    graph = PruningGraph(model, torch.zeros(1, 2, 8, 8))
    targets = refit_targets(graph, {"conv1": [1]}, options.scope)
    remove_channels(graph, {"conv1": [1]})
    return reference, model, reconstruct(reference, model, targets, data, options)


def test_the_refit_leaves_a_layer_alone_when_it_has_too_few_rows_and_lost_no_input():
    few = [(torch.randn(12, 2, 8, 8),)]  # fc: 12 rows for 5 inputs, and it lost none
    reference, model, summary = _refit_tiny(few, RefitOptions(ridge=1e-6))
    assert "too few calibration rows (12 for 5 inputs)" in summary["skipped"]["fc"]
    torch.testing.assert_close(model.fc.weight, reference.fc.weight)
    assert "conv2" not in summary["skipped"]  # it lost an input: refit on its 12 x 64 rows
    assert not torch.equal(model.conv2.weight, reference.conv2.weight[:, [0, 2, 3]])


def test_the_ridge_is_chosen_on_rows_the_fit_did_not_see():
    from simprune.stats.refit import choose_ridge
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g, dtype=torch.float64)
    clean = x[:, :1]  # the target is x0; the starting weights [1, 0] are already right
    noisy = clean + 0.5 * x[:, 1:]  # the fit rows' target also leans on x1: memorising them is wrong
    fit, check = (x.T @ x, x.T @ noisy), (x.T @ x, x.T @ clean, float((clean ** 2).sum()))
    right = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    ridge, errors = choose_ridge(fit, check, right, (0.0, 0.1, 100.0))
    assert ridge == 100.0 and errors[0] > errors[1] > errors[2]  # the most damping keeps [1, 0]
    wrong = torch.zeros(1, 2, dtype=torch.float64)  # start far off, fit rows as clean as the checked ones
    ridge, errors = choose_ridge((x.T @ x, x.T @ clean), check, wrong, (0.0, 0.1, 100.0))
    assert ridge == 0.0 and errors[0] == pytest.approx(0.0, abs=1e-9)


def test_ridge_auto_picks_a_ridge_per_refit_layer_and_reports_it():
    data = [(torch.randn(16, 2, 8, 8),) for _ in range(4)]
    _, _, summary = _refit_tiny(data, RefitOptions(ridge="auto", scope="readers"))
    assert set(summary["ridges"]) == {"conv2"} and summary["ridges"]["conv2"] in RIDGE_CHOICES
    assert summary["relative_error"]["after"] < summary["relative_error"]["before"]
    with pytest.raises(Exception, match="ridge must be >= 0 or"):
        RefitOptions(ridge="big")


def test_with_a_refit_any_criterion_leaves_whole_a_group_whose_reader_would_be_refit_on_too_few_rows():
    import simprune
    torch.manual_seed(0)
    few = [(torch.randn(8, 2, 8, 8),)]  # fc would be refit on 8 rows for the 5 pooled channels of conv2
    loose = simprune.Selection(guards=simprune.Guards(min_channels=1, round_to=1))
    pruned, report = simprune.prune(Tiny().eval(), torch.zeros(1, 2, 8, 8), "l1", {"params": 0.2}, calibration=few,
                                    selection=loose)
    assert "conv2" not in report["protected_groups"] and pruned.fc.in_features == 5
    assert "fc would be refit on 8 rows for 5 inputs" in report["left_whole_for_the_refit"]["conv2"]
    _, report = simprune.prune(Tiny().eval(), torch.zeros(1, 2, 8, 8), "l1", {"params": 0.2}, calibration=few,
                               selection=loose, repair=simprune.Repair(refit=False))
    assert report["left_whole_for_the_refit"] == {}


def test_views_add_augmented_copies_once_and_keep_the_plain_images_for_the_recovery():
    from simprune.calibrate.batches import Calibration
    images = torch.randn(8, 2, 8, 8)
    cal = Calibration([(images[:4], torch.zeros(4)), (images[4:], torch.zeros(4))])
    viewed = cal.with_views(3, seed=0)
    assert viewed.count() == 24 and viewed.plain is cal
    assert torch.equal(next(iter(viewed.images())), images[:4])  # the images themselves come first
    extra = list(viewed.images())[2:]
    assert all(x.shape == (4, 2, 8, 8) for x in extra) and not torch.equal(extra[0], images[:4])
    assert viewed.with_views(3) is viewed and cal.with_views(1) is cal  # never twice; one view: as it is
    flat = Calibration([(torch.randn(4, 5),)])
    assert flat.with_views(2) is flat  # not images


def test_the_refit_reads_the_views_and_the_recovery_the_plain_images():
    import simprune
    torch.manual_seed(0)
    data = [(torch.randn(16, 2, 8, 8),) for _ in range(4)]
    repair = simprune.Repair(refit=RefitOptions(views=2),
                             recover=simprune.Recovery(steps=2, batch_size=8, bf16=False, time_budget_s=None))
    _, report = simprune.prune(Tiny().eval(), torch.zeros(1, 2, 8, 8), "l1", {"params": 0.2}, calibration=data,
                               selection=simprune.Selection(guards=simprune.Guards(min_channels=1, round_to=1)),
                               repair=repair)
    assert report["reconstructed"]["images"] == 2 * (64 - report["recovered"]["held_aside"])
    assert report["recovered"]["images"] == 64  # trained on the 51 plain images, 13 held aside


def test_few_images_are_read_at_more_positions_so_a_layer_keeps_its_row_budget():
    from simprune.calibrate.consumer_inputs import ROW_BUDGET, positions_per_image
    assert ROW_BUDGET == 64 * 128
    assert positions_per_image(128, 8) == 1024 and positions_per_image(128, 3) == 2731  # ceil(8192 / 3)
    assert positions_per_image(128, 64) == 128 and positions_per_image(128, 500) == 128  # unchanged from 64 on
    assert positions_per_image(None, 8) is None and positions_per_image(512, 8) == 1024
