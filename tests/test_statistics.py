import pytest
import torch

from simprune import distributed
from simprune.errors import SimpruneError
from simprune.stats.channel_stats import METRICS, NULL_BLOCK, ChannelStats, fit_compensation, is_maximum
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
        if not name.startswith("null"):  # halves not cut at a block of 8 pair other images: (8, 7), not (6, 5)
            assert torch.allclose(merged.tensors()[name], t, atol=1e-10), name
    assert merged.tensors()["null_images"] == whole.tensors()["null_images"] == 8
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


def test_accumulated_statistics_have_no_nan_for_constant_and_zero_maps():
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


def _realistic_maps(n=24, c=12, h=9, w=9, dtype=torch.float32):
    """ReLU maps sharing spatial structure (as real ones do), with a near-duplicate and a scaled copy."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, 6, h, w, generator=g)
    mix = torch.randn(6, c, generator=g)
    maps = torch.relu(torch.einsum("nkhw,kc->nchw", base, mix) + 0.5 * torch.randn(n, c, h, w, generator=g) + 0.5)
    maps[:, 5] = 2.5 * maps[:, 2]
    maps[:, 7] = maps[:, 1] + 1e-3 * torch.rand(n, h, w, generator=g)
    return maps.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_statistics_equal_the_per_image_float64_reference(dtype):
    """The moment path (float32 products, float64 sums) against the per-map float64 definitions;
    decisions (the redundancy order) are the same."""
    from simprune.stats.similarity import redundancy_order

    maps = _realistic_maps(dtype=dtype)
    stats = batched(maps, [10, 14], metrics={"ssim", "psnr", "cosine", "mstd", "gram"})
    ref = maps.double()
    for metric, atol in (("ssim", 1e-5), ("cosine", 1e-5), ("psnr", 2e-3)):
        want = SIMILARITIES[metric](ref).mean(0)
        got = stats.similarity(metric)
        close = torch.isclose(got, want, atol=atol, rtol=1e-5)
        if metric == "psnr":  # identical maps sit at the cap either way; near-identical ones above 60 dB
            close |= (got > 60) & (want > 60)
        assert close.all(), (metric, (got - want).abs().max())
        (r_got, t_got), (r_want, t_want) = redundancy_order(got), redundancy_order(want)
        assert torch.equal(t_got, t_want), metric
        same = torch.isclose(r_got, r_want, atol=atol, rtol=1e-5) | ((r_got > 60) & (r_want > 60))
        assert same.all(), metric
    assert torch.allclose(stats.mstd(), spatial_std(ref).mean(0), rtol=1e-5)
    flat = ref.permute(1, 0, 2, 3).reshape(12, -1)
    assert torch.allclose(stats.gram(), flat @ flat.T, rtol=1e-5)


def test_pooled_statistics_are_those_of_the_vectors_over_images():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(40, 4, generator=g)
    v[:, 3] = 3 * v[:, 1] + 1  # an affine copy across images: SSIM 1 after min-max scaling
    stats = ChannelStats(4, {"ssim", "cosine", "mstd", "null"}, pooled=True)
    stats.update(v[:25, :, None, None])
    stats.update(v[25:])
    as_map = v.T[None, :, :, None].double()  # one "image" whose map is each channel's 40 values
    assert torch.allclose(stats.similarity("ssim"), SIMILARITIES["ssim"](as_map)[0], atol=1e-10)
    assert stats.similarity("ssim")[1, 3].item() == pytest.approx(1.0)
    assert torch.allclose(stats.similarity("cosine"), SIMILARITIES["cosine"](as_map)[0], atol=1e-10)
    assert torch.allclose(stats.mstd(), v.double().std(0, correction=0))
    # the chance level pairs channel i on image n with channel j on image n-1 inside blocks of 8 images:
    # the mean product over the pairs, over the root mean squares of all images
    v64 = v.double()
    after = [n for n in range(1, 40) if n % 8]
    pairs = v64[after, 0] * v64[[n - 1 for n in after], 2]
    want = pairs.mean() / ((v64[:, 0] ** 2).mean() * (v64[:, 2] ** 2).mean()).sqrt()
    assert stats.null_similarity("cosine")[0, 2].item() == pytest.approx(want.item(), abs=1e-9)


def test_null_similarity_pairs_each_image_with_the_one_before_inside_blocks_of_8():
    """Image n with image n-1, whatever the batches (a pair may straddle two), never across a block."""
    maps = _realistic_maps(n=11)
    stats = batched(maps, [3, 5, 3], metrics={"cosine", "null"})
    pairs = [SIMILARITIES["cosine"](torch.cat([maps[n:n + 1], maps[n - 1:n]], 1).double())[0, :12, 12:]
             for n in (1, 2, 3, 4, 5, 6, 7, 9, 10)]
    want = torch.stack(pairs).mean(0)
    got = stats.null_similarity("cosine")
    upper = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)
    assert torch.allclose(got[upper], want[upper], atol=1e-5)
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("pooled", [False, True])
def test_null_level_does_not_depend_on_batching_or_on_shards_of_whole_pairs(pooled, monkeypatch):
    """Under torchrun each rank streams its own shard; with shards of whole pairs (block=2) the summed
    statistics, null included, equal one process's, so the qsfm decision is the same on 1 or 2 ranks."""
    assert NULL_BLOCK == 8
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(19, 5, *(() if pooled else (6, 6)), generator=g)
    metrics = {"ssim", "psnr", "cosine", "null"} | (set() if pooled else {"ssim-windowed"})

    def stream(x, sizes):
        stats, at = ChannelStats(5, metrics, pooled=pooled), 0
        for n in sizes:
            stats.update(x[at:at + n])
            at += n
        return stats

    whole = stream(maps, [19])
    assert torch.allclose(stream(maps, [3, 1, 5, 2, 8]).null_similarity("ssim"), whole.null_similarity("ssim"))
    shards = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        shards.append(distributed.shard(list(range(19)), block=NULL_BLOCK))
    assert shards == [[*range(8), *range(16, 19)], list(range(8, 16))]
    merged = stream(maps[shards[0]], [6, 5]).merge(stream(maps[shards[1]], [1, 7]))
    assert merged.tensors()["null_images"] == whole.tensors()["null_images"] == 16
    for metric in metrics - {"null"}:
        if not (pooled and metric == "ssim-windowed"):
            assert torch.allclose(merged.null_similarity(metric), whole.null_similarity(metric), atol=1e-9), metric


def test_wide_layers_split_into_row_blocks_give_the_full_statistics(monkeypatch):
    """A layer of SPLIT_FROM+ channels multiplies only the upper triangle, in row blocks (and rows of a
    block in smaller pieces): similarity, null and Gram equal the per-image float64 definitions."""
    from simprune.stats import channel_stats

    monkeypatch.setattr(channel_stats, "ROW_BLOCK_ELEMENTS", 2**11)  # several row pieces per product block
    c = channel_stats.SPLIT_FROM + 9
    assert len(channel_stats._row_blocks(c)) == channel_stats.PRODUCT_BLOCKS
    g = torch.Generator().manual_seed(1)
    maps = torch.relu(torch.randn(11, c, 4, 4, generator=g) + 0.3)
    maps[:, 40] = 2.0 * maps[:, 3]  # a duplicate across two row blocks
    stats = batched(maps, [3, 5, 3], metrics={"ssim", "cosine", "null", "gram"})
    ref = maps.double()
    assert torch.allclose(stats.similarity("ssim"), SIMILARITIES["ssim"](ref).mean(0), atol=1e-5)
    assert stats.similarity("ssim")[3, 40].item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(stats.similarity("cosine"), stats.similarity("cosine").T)
    pairs = [SIMILARITIES["cosine"](torch.cat([ref[n:n + 1], ref[n - 1:n]], 1))[0, :c, c:]
             for n in (1, 2, 3, 4, 5, 6, 7, 9, 10)]
    got, want = stats.null_similarity("cosine"), torch.stack(pairs).mean(0)
    upper = torch.triu(torch.ones(c, c, dtype=torch.bool))
    assert torch.allclose(got[upper], want[upper], atol=1e-5)
    flat = ref.permute(1, 0, 2, 3).reshape(c, -1)
    assert torch.allclose(stats.gram(), flat @ flat.T, rtol=1e-5)
