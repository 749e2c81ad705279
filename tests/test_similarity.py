import math

import numpy as np
import pytest
import torch

from simprune.errors import SimpruneError
from simprune.stats.similarity import (
    C1,
    C2,
    SIMILARITIES,
    cosine_matrix,
    filter_similarity_matrix,
    global_ssim_matrix,
    map_rank,
    minmax_scale,
    psnr_matrix,
    redundancy_order,
    spatial_std,
    twin_selection,
    windowed_ssim_matrix,
)

# Two 2x2 maps already in [0, 1]: x = [[0, 1], [1, 0]], y = [[0, 1], [0.5, 1]].
X = [[0.0, 1.0], [1.0, 0.0]]
Y = [[0.0, 1.0], [0.5, 1.0]]


def pair(a, b):
    return torch.tensor([[a, b]], dtype=torch.float32)  # (1, 2, H, W)


def test_minmax_scale_range_and_constant_map():
    maps = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]], [[3.0, 3.0], [3.0, 3.0]]]])
    out = minmax_scale(maps)
    assert torch.equal(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(out[0, 1], torch.zeros(2, 2))


def test_ssim_identical_maps_is_one():
    m = torch.rand(2, 1, 5, 5)
    maps = torch.cat([m, m, torch.rand(2, 1, 5, 5)], dim=1)
    for fn in (global_ssim_matrix, windowed_ssim_matrix):
        s = fn(maps)
        assert torch.all(s.diagonal(dim1=1, dim2=2) == 1.0)
        assert torch.allclose(s[:, 0, 1], torch.ones(2, dtype=s.dtype), atol=1e-12)
        assert s.max() <= 1.0


def test_global_ssim_hand_worked_2x2():
    # mx = 0.5, my = 0.625, sx^2 = 0.25, sy^2 = 0.5625 - 0.390625 = 0.171875,
    # sxy = E[xy] - mx my = 0.375 - 0.3125 = 0.0625
    want = ((2 * 0.5 * 0.625 + C1) * (2 * 0.0625 + C2)) / ((0.25 + 0.390625 + C1) * (0.25 + 0.171875 + C2))
    s = global_ssim_matrix(pair(X, Y))
    assert s[0, 0, 1].item() == pytest.approx(want, abs=1e-12)
    assert s[0, 1, 0].item() == pytest.approx(want, abs=1e-12)
    # min-max scaling makes SSIM invariant to a positive affine change of either map
    s2 = global_ssim_matrix(pair([[3 * v + 2 for v in r] for r in X], [[7 * v - 1 for v in r] for r in Y]))
    assert s2[0, 0, 1].item() == pytest.approx(want, abs=1e-6)


def test_global_ssim_equals_naive_pair_loop():
    maps = torch.rand(3, 6, 4, 5) * 3 - 1
    got = global_ssim_matrix(maps)
    x = minmax_scale(maps.double()).flatten(2)
    for b in range(3):
        for i in range(6):
            for j in range(6):
                xi, xj = x[b, i], x[b, j]
                mi, mj = xi.mean(), xj.mean()
                vi, vj = ((xi - mi) ** 2).mean(), ((xj - mj) ** 2).mean()
                cij = ((xi - mi) * (xj - mj)).mean()
                want = ((2 * mi * mj + C1) * (2 * cij + C2)) / ((mi**2 + mj**2 + C1) * (vi + vj + C2))
                assert got[b, i, j].item() == pytest.approx(want.item(), abs=1e-12)


def test_windowed_ssim_equals_global_when_window_covers_map():
    maps = torch.rand(2, 5, 4, 4)
    g = global_ssim_matrix(maps)
    assert torch.allclose(windowed_ssim_matrix(maps, window=7), g, atol=1e-12)
    assert torch.allclose(windowed_ssim_matrix(maps, window=4), g, atol=1e-12)


def test_windowed_ssim_chunking_matches_unchunked_and_naive():
    maps = torch.rand(3, 7, 6, 5)
    full = windowed_ssim_matrix(maps, window=3)
    tiny = windowed_ssim_matrix(maps, window=3, max_elements=1)  # one row, one image at a time
    assert torch.allclose(full, tiny, atol=1e-13)
    assert torch.allclose(full, full.transpose(1, 2))
    # naive: mean over the 4x3 valid windows of the global SSIM of each 3x3 patch
    x = minmax_scale(maps.double())
    b, i, j = 1, 2, 5
    vals = []
    for r in range(4):
        for c in range(3):
            patch = torch.stack([x[b, i, r : r + 3, c : c + 3], x[b, j, r : r + 3, c : c + 3]]).flatten(1)
            mi, mj = patch.mean(1)
            vi, vj = patch.var(1, correction=0)
            cij = ((patch[0] - mi) * (patch[1] - mj)).mean()
            vals.append(((2 * mi * mj + C1) * (2 * cij + C2)) / ((mi**2 + mj**2 + C1) * (vi + vj + C2)))
    assert full[b, i, j].item() == pytest.approx(torch.stack(vals).mean().item(), abs=1e-12)


def test_psnr_identical_is_cap_and_hand_case():
    maps = pair(X, Y)
    p = psnr_matrix(maps, cap=100.0)
    assert p[0, 0, 0].item() == 100.0 and p[0, 1, 1].item() == 100.0
    # squared differences 0, 0, 0.25, 1 -> MSE = 0.3125 -> 10 log10(3.2) dB
    assert p[0, 0, 1].item() == pytest.approx(10 * math.log10(3.2), abs=1e-12)
    same = torch.cat([maps[:, :1], maps[:, :1] * 5 + 1], dim=1)  # identical after scaling
    assert psnr_matrix(same, cap=42.0)[0, 0, 1].item() == 42.0


def test_cosine_hand_values_and_zero_rules():
    maps = torch.tensor(
        [[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]],
          [[0.0, 0.0], [0.0, 0.0]], [[-1.0, 0.0], [0.0, 0.0]]]]
    )
    c = cosine_matrix(maps)[0]
    assert c[0, 1].item() == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert c[0, 4].item() == -1.0
    assert c[2, 3].item() == 1.0 and c[2, 2].item() == 1.0  # zero with zero
    assert c[0, 2].item() == 0.0 and c[3, 1].item() == 0.0  # zero with nonzero
    assert torch.all(c.diagonal() == 1.0)


def test_no_nan_for_constant_and_zero_maps():
    maps = torch.zeros(2, 4, 3, 3)
    maps[:, 1] = 5.0
    maps[:, 2] = torch.rand(2, 3, 3)
    for name, fn in SIMILARITIES.items():
        out = fn(maps)
        assert out.shape == (2, 4, 4) and torch.isfinite(out).all(), name
    # two constant maps are identical after scaling (both all-zero)
    assert global_ssim_matrix(maps)[0, 0, 1].item() == 1.0
    assert psnr_matrix(maps)[0, 0, 1].item() == 100.0
    assert torch.isfinite(spatial_std(maps)).all() and torch.isfinite(map_rank(maps)).all()


def test_spatial_std_and_rank():
    maps = torch.tensor([[[[1.0, 3.0], [1.0, 3.0]], [[2.0, 2.0], [2.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    assert torch.allclose(spatial_std(maps)[0], torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    assert map_rank(maps)[0].tolist() == [1.0, 1.0, 2.0]
    assert map_rank(torch.zeros(1, 1, 3, 3)).item() == 0.0


def test_filter_similarity_metrics_and_zero_filters():
    w = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    w = w.view(5, 3, 1, 1)
    cos = filter_similarity_matrix(w, "cosine")
    assert cos[0, 1].item() == pytest.approx(1 / math.sqrt(2))
    assert cos[2, 3].item() == 1.0 and cos[0, 2].item() == 0.0
    pear = filter_similarity_matrix(w, "pearson")
    # centred rows: [2, -1, -1]/3 and [1, 1, -2]/3 -> (2 - 1 + 2) / (sqrt(6) sqrt(6)) = 0.5
    assert pear[0, 1].item() == pytest.approx(0.5)
    assert pear[4, 4].item() == 1.0 and pear[4, 0].item() == 0.0 and pear[2, 4].item() == 0.0
    euc = filter_similarity_matrix(w, "euclidean")
    assert euc[0, 1].item() == pytest.approx(0.5)  # distance 1
    assert euc[0, 2].item() == pytest.approx(0.5) and euc[2, 3].item() == 1.0
    assert euc[1, 4].item() == pytest.approx(1 / (1 + math.sqrt(1 + 1 + 4)))
    for m in (cos, pear, euc):
        assert torch.isfinite(m).all() and torch.all(m.diagonal() == 1.0)
    with pytest.raises(SimpruneError):
        filter_similarity_matrix(w, "manhattan")


def constructed_S():
    # channels 0..4; max_k S_jk: 0 -> 0.9, 1 -> 0.9, 2 -> 0.8, 3 -> 0.8, 4 -> 0.3
    S = torch.tensor(
        [
            [1.0, 0.9, 0.7, 0.1, 0.2],
            [0.9, 1.0, 0.6, 0.2, 0.1],
            [0.7, 0.6, 1.0, 0.8, 0.3],
            [0.1, 0.2, 0.8, 1.0, 0.0],
            [0.2, 0.1, 0.3, 0.0, 1.0],
        ]
    )
    return S


def test_twin_selection_constructed():
    S = constructed_S()
    # order 0, 1, 2, 3, 4. t = 0.75: keep 0; drop 1 (0.9 with 0); keep 2 (0.7 <= 0.75);
    # drop 3 (0.8 with 2); keep 4.
    assert twin_selection(S, 0.75) == {1: 0, 3: 2}
    # t = 0.65: 2 goes too (0.7 with 0), so 3 (only 0.1 with 0) is kept; the twin of 2 is the
    # finally kept channel most similar to it: 3 (0.8), not 0 (0.7) that triggered the drop
    assert twin_selection(S, 0.65) == {1: 0, 2: 3}
    assert twin_selection(S, 0.95) == {}
    # threshold below everything: all but the first visited channel go, twins are kept channel 0
    assert twin_selection(S, -1.0) == {1: 0, 2: 0, 3: 0, 4: 0}
    assert twin_selection(torch.ones(1, 1), 0.0) == {}


def test_twin_is_best_kept_channel():
    S = torch.tensor([[1.0, 0.9, 0.5], [0.9, 1.0, 0.95], [0.5, 0.95, 1.0]])
    # order 1, 2, 0 (max 0.95, 0.95, 0.9): keep 1, drop 2, drop 0 -> both twin to 1
    assert twin_selection(S, 0.6) == {2: 1, 0: 1}


def test_greedy_rule_is_not_nested_in_threshold():
    # documents why redundancy_order matches the "nested" rule: the paper's greedy rule drops
    # channel 3 at t = 0.75 but keeps it at the lower t = 0.65
    S = constructed_S()
    assert 3 in twin_selection(S, 0.75) and 3 not in twin_selection(S, 0.65)


def test_redundancy_order_agrees_with_nested_selection():
    torch.manual_seed(1)
    A = torch.rand(9, 9)
    for S in (constructed_S(), (A + A.T) / 2):
        score, twin = redundancy_order(S)
        assert (score == float("-inf")).sum() == 1 and (twin == -1).sum() == 1
        values = sorted(set(S.flatten().tolist()))
        thresholds = [-1.0, 2.0] + values + [(a + b) / 2 for a, b in zip(values, values[1:])]
        for t in thresholds:
            dropped = {int(j) for j in torch.nonzero(score > t).flatten()}
            assert set(twin_selection(S, t, rule="nested")) == dropped, t


def test_redundancy_order_constructed_values_and_greedy_agreement_when_nested():
    score, twin = redundancy_order(constructed_S())
    # sweep: (0,1)=0.9 drops 1 -> 0; (2,3)=0.8 drops 3 -> 2; (0,2)=0.7 drops 2 -> 0;
    # (2,4)=0.3 skipped (2 gone); (0,4)=0.2 drops 4 -> 0
    assert score.tolist() == pytest.approx([float("-inf"), 0.9, 0.7, 0.8, 0.2])
    assert twin.tolist() == [-1, 0, 0, 2, 0]
    # block-structured S (two tight clusters): greedy drop sets are nested, so the rules agree
    S = torch.full((6, 6), 0.1)
    S[:3, :3] = torch.tensor([[1.0, 0.9, 0.8], [0.9, 1.0, 0.85], [0.8, 0.85, 1.0]])
    S[3:, 3:] = torch.tensor([[1.0, 0.7, 0.6], [0.7, 1.0, 0.65], [0.6, 0.65, 1.0]])
    score, _ = redundancy_order(S)
    for t in (0.95, 0.87, 0.82, 0.75, 0.68, 0.62, 0.5, 0.05):
        dropped = {int(j) for j in torch.nonzero(score > t).flatten()}
        assert set(twin_selection(S, t)) == dropped, t


def _redundancy_by_edge(S, keep_priority=None):
    """redundancy_order's sweep one edge at a time, as first written: the reference of the windowed scan."""
    from simprune.stats.similarity import _offdiag, _visit_order

    m = _offdiag(S)
    C = m.shape[0]
    order = _visit_order(m) if keep_priority is None else np.argsort(-keep_priority.numpy(), kind="stable")
    p = m[np.ix_(order, order)]
    a_idx, b_idx = np.triu_indices(C, 1)
    w = p[a_idx, b_idx]
    score, twin, kept = np.full(C, -np.inf), np.full(C, -1, dtype=np.int64), np.ones(C, dtype=bool)
    for e in np.argsort(-w, kind="stable"):
        if kept.sum() == 1 or w[e] == -np.inf:
            break
        if kept[a_idx[e]] and kept[b_idx[e]]:
            kept[b_idx[e]] = False
            score[order[b_idx[e]]], twin[order[b_idx[e]]] = w[e], order[a_idx[e]]
    return torch.from_numpy(score), torch.from_numpy(twin)


@pytest.mark.parametrize("channels", [1, 2, 5, 40, 300])
@pytest.mark.parametrize("kind", ["distinct", "ties", "nan rows"])
def test_redundancy_order_scan_equals_the_edge_by_edge_sweep(channels, kind):
    g = torch.Generator().manual_seed(channels)
    S = torch.rand(channels, channels, generator=g, dtype=torch.float64)
    if kind == "ties":
        S = (S * 4).round() / 4  # many equal similarities: the stable order decides
    S = (S + S.T) / 2
    if kind == "nan rows" and channels > 2:
        S[0, :] = S[:, 0] = float("nan")
    for priority in (None, torch.rand(channels, generator=g, dtype=torch.float64)):
        got, want = redundancy_order(S, priority), _redundancy_by_edge(S, priority)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
