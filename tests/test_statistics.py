import pytest
import torch

from simprune.errors import SimpruneError
from simprune.stats.channel_stats import METRICS, ChannelStats, fit_compensation, is_maximum
from simprune.stats.similarity import SIMILARITIES, map_rank, spatial_std


def calibration_maps(n=10, c=4, h=5, w=5):
    maps = torch.relu(torch.randn(n, c, h, w))
    maps[:3, 1] = 0.0  # an all-zero map on some images
    maps[5, 2] = 7.0  # a constant map
    return maps


def batched(maps, sizes, metrics=METRICS, **options):
    stats = ChannelStats(maps.shape[1], set(metrics), **options)
    start = 0
    for size in sizes:
        stats.update(maps[start : start + size])
        start += size
    return stats


def test_batches_equal_one_pass_for_every_metric():
    maps = calibration_maps()
    one = batched(maps, [10], window=3)
    many = batched(maps, [3, 4, 1, 2], window=3)
    assert (many.images, many.pixels) == (10, 10 * 25)
    for name in SIMILARITIES:
        assert torch.allclose(many.similarity(name), one.similarity(name), atol=1e-12), name
        assert torch.isfinite(many.similarity(name)).all(), name
    windowed = SIMILARITIES["ssim-windowed"](maps, window=3).mean(0)
    assert torch.allclose(many.similarity("ssim-windowed"), windowed)
    assert torch.allclose(many.similarity("psnr"), SIMILARITIES["psnr"](maps).mean(0))
    assert torch.allclose(many.mstd(), spatial_std(maps).mean(0))
    assert torch.allclose(many.mstd(), one.mstd(), atol=1e-12)
    assert torch.equal(many.mean_rank(), map_rank(maps).mean(0))
    flat = maps.double().permute(1, 0, 2, 3).reshape(4, -1)
    assert torch.allclose(many.gram(), flat @ flat.T, atol=1e-10)
    assert torch.allclose(many.channel_sum(), flat.sum(1), atol=1e-10)


def test_mean_similarity_hand_value_over_two_images():
    # cosine of [1,0,0,0] vs [1,1,0,0] is 1/sqrt2 on image 1, of identical maps 1 on image 2
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    stats = ChannelStats(2, {"cosine"})
    stats.update(torch.stack([a, b])[None])
    stats.update(torch.stack([a, a])[None])
    assert stats.similarity("cosine")[0, 1].item() == pytest.approx((2**-0.5 + 1) / 2)


def test_merge_of_halves_equals_one_pass_and_tensor_roundtrip():
    maps = calibration_maps()
    whole = batched(maps, [10])
    first, second = batched(maps[:6], [6]), batched(maps[6:], [2, 2])
    merged = first.merge(second)
    assert merged.images == 10
    for name, t in whole.tensors().items():
        if not name.startswith("null"):  # a split loses the pair (first image of the second half, last of the first)
            assert torch.allclose(merged.tensors()[name], t, atol=1e-10), name
    assert merged.tensors()["null_images"] == whole.tensors()["null_images"] - 1
    # an all-reduce is a sum of tensors(): rebuild from summed dicts
    a, b = batched(maps[:5], [5]).tensors(), batched(maps[5:], [5]).tensors()
    summed = ChannelStats.from_tensors({k: torch.maximum(a[k], b[k]) if is_maximum(k) else a[k] + b[k] for k in a})
    assert summed.metrics == frozenset(METRICS) and summed.channels == 4
    assert torch.allclose(summed.similarity("ssim"), whole.similarity("ssim"), atol=1e-12)
    assert torch.allclose(summed.gram(), whole.gram(), atol=1e-10)
    with pytest.raises(SimpruneError):
        whole.merge(ChannelStats(4, {"cosine"}))


def test_fit_compensation_scale_and_affine():
    base = torch.rand(6, 1, 4, 4) + 0.1
    noise = torch.rand(6, 1, 4, 4)
    maps = torch.cat([base, 2.5 * base, 1.5 * base - 0.75, noise], dim=1)
    stats = batched(maps, [2, 4], metrics={"gram"})
    a, b = fit_compensation(stats, 0, 1)
    assert (a, b) == (pytest.approx(2.5, abs=1e-6), 0.0)
    a, b = fit_compensation(stats, 0, 2, affine=True)
    assert a == pytest.approx(1.5, abs=1e-5) and b == pytest.approx(-0.75, abs=1e-5)
    # plain least squares through the origin, checked against torch.linalg.lstsq
    xi, xj = maps[:, 0].double().flatten(), maps[:, 3].double().flatten()
    want = torch.linalg.lstsq(xi[:, None], xj[:, None]).solution.item()
    assert fit_compensation(stats, 0, 3)[0] == pytest.approx(want, rel=1e-6)  # float32 products, float64 sums


def test_fit_compensation_zero_energy_and_constant_source():
    maps = torch.zeros(2, 3, 2, 2)
    maps[:, 1] = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # mean 3
    maps[:, 2] = 4.0
    stats = batched(maps, [1, 1], metrics={"gram"})
    assert fit_compensation(stats, 0, 1) == (0.0, 0.0)
    assert fit_compensation(stats, 0, 1, affine=True) == (0.0, pytest.approx(3.0))
    assert fit_compensation(stats, 2, 1, affine=True) == (0.0, pytest.approx(3.0))
    assert fit_compensation(stats, 2, 1) == (pytest.approx(0.75), 0.0)  # sum(4 x) / sum(16)


def test_no_nan_for_constant_and_zero_maps():
    maps = torch.zeros(3, 3, 4, 4)
    maps[:, 1] = 2.0
    stats = batched(maps, [1, 2], window=2)
    for name in SIMILARITIES:
        assert torch.isfinite(stats.similarity(name)).all(), name
    assert torch.equal(stats.mstd(), torch.zeros(3, dtype=torch.float64))
    assert stats.mean_rank().tolist() == [0.0, 1.0, 0.0]


def test_errors_are_clear():
    with pytest.raises(SimpruneError, match="unknown statistic"):
        ChannelStats(3, {"ssim", "entropy"})
    stats = ChannelStats(3, {"mstd"})
    with pytest.raises(SimpruneError, match="no calibration images"):
        stats.mstd()
    with pytest.raises(SimpruneError, match="not tracked"):
        stats.similarity("ssim")
    with pytest.raises(SimpruneError, match="expected feature maps"):
        stats.update(torch.zeros(1, 4, 2, 2))
    with pytest.raises(SimpruneError, match="NaN"):
        stats.update(torch.full((1, 3, 2, 2), float("nan")))
