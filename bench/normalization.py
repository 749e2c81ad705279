"""Are scores comparable across layers? Median importance of unrelated channels at each layer shape.

Channels that are unrelated by construction (random ReLU maps, independent per image; random
Gaussian filters) should score alike whatever the map size or fan-in: otherwise the global
allocator strips the layers where chance looks like redundancy. For each criterion the table gives
the median importance, after the allocator's normalisation, of 64 such channels, with the
criterion's default (chance-corrected similarity, rank fraction, mean-normalised norms) and with
the raw score it replaced; ``spread`` is the largest minus the smallest median across shapes.
filter-similarity keeps the raw score by default (the correction is an option; see
criteria/filter_similarity.py for the accuracy it cost), hence the ``default`` column.

    python bench/normalization.py        # table + bench/results/normalization.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402
from simprune.allocation.allocator import normalize  # noqa: E402
from simprune.calibrate.calibration import Probe  # noqa: E402
from simprune.criteria.qsfm import group_redundancy, similarity_ceiling  # noqa: E402
from simprune.stats.chance import chance_corrected, null_level, permuted_rows  # noqa: E402
from simprune.stats.channel_stats import ChannelStats  # noqa: E402
from simprune.stats.similarity import filter_similarity_matrix, redundancy_order  # noqa: E402

CHANNELS = 64
DEFAULTS = {("qsfm-ssim", "chance-corrected"), ("qsfm-psnr", "chance-corrected"),
            ("qsfm-cosine / feature-stats SFS", "chance-corrected"), ("hrank", "rank fraction"),
            ("filter-similarity", "none (raw)"), ("l1", "mean"), ("fpgm", "mean")}
MAP_SIZES = (2, 4, 8, 16, 32)
FAN_INS = (27, 144, 576, 4608)


def random_probe(size: int, images: int, metrics: set[str], seed: int) -> Probe:
    """Statistics of CHANNELS independent ReLU(Gaussian) maps of size x size over ``images`` images."""
    g = torch.Generator().manual_seed(seed)
    stats = ChannelStats(CHANNELS, metrics)
    for b0 in range(0, images, 128):
        stats.update(torch.relu(torch.randn(min(128, images - b0), CHANNELS, size, size, generator=g)))
    return Probe(None, stats)


def map_rows(images: int) -> list[dict]:
    rows = {}
    for size in MAP_SIZES:
        probe = random_probe(size, images, {"ssim", "psnr", "cosine", "rank", "null"}, seed=size)
        for metric in ("ssim", "psnr", "cosine"):
            for chance in (True, False):
                r, _ = group_redundancy([probe], metric, chance)
                score = (1 - r) if chance else similarity_ceiling(metric) * (1 - r)
                label = f"qsfm-{metric}" if metric != "cosine" else "qsfm-cosine / feature-stats SFS"
                rows.setdefault((label, "chance-corrected" if chance else "none (raw)"), {})[size] = \
                    float(normalize(score, "none").median())
        rank = probe.stats
        rows.setdefault(("hrank", "rank fraction"), {})[size] = float(rank.rank_fraction().median())
        rows.setdefault(("hrank", "none (raw mean rank)"), {})[size] = float(rank.mean_rank().median())
    return [{"criterion": c, "normalisation": n, "default": "yes" if (c, n) in DEFAULTS else "",
             "images": images, **{f"{s}x{s}": v for s, v in m.items()},
             "spread": max(m.values()) - min(m.values())} for (c, n), m in rows.items()]


def filter_rows() -> list[dict]:
    rows = {}
    for d in FAN_INS:
        w = torch.randn(CHANNELS, d, generator=torch.Generator().manual_seed(d))
        redundancy, _ = redundancy_order(filter_similarity_matrix(w))
        r0 = null_level(filter_similarity_matrix(permuted_rows(w)))
        rows.setdefault(("filter-similarity", "chance-corrected"), {})[d] = \
            float((1 - chance_corrected(redundancy, r0, 1.0)).median())
        rows.setdefault(("filter-similarity", "none (raw)"), {})[d] = float((1 - redundancy.clamp(min=-1)).median())
        l1 = w.abs().sum(1)
        rows.setdefault(("l1", "mean"), {})[d] = float(normalize(l1, "mean").median())
        rows.setdefault(("l1", "none (raw)"), {})[d] = float(l1.median())
        fpgm = torch.cdist(w.double(), w.double()).sum(1)
        rows.setdefault(("fpgm", "mean"), {})[d] = float(normalize(fpgm, "mean").median())
    return [{"criterion": c, "normalisation": n, "default": "yes" if (c, n) in DEFAULTS else "",
             **{f"fan-in {d}": v for d, v in m.items()},
             "spread": max(m.values()) - min(m.values())} for (c, n), m in rows.items()]


def main() -> None:
    torch.set_num_threads(1)
    maps = map_rows(16) + map_rows(640)
    print_table(maps, ["criterion", "normalisation", "default", "images"] + [f"{s}x{s}" for s in MAP_SIZES] + ["spread"])
    print()
    filters = filter_rows()
    print_table(filters, ["criterion", "normalisation", "default"] + [f"fan-in {d}" for d in FAN_INS] + ["spread"])
    print(f"wrote {write_json('normalization', {'channels': CHANNELS, 'maps': maps, 'filters': filters})}")


if __name__ == "__main__":
    main()
