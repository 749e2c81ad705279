"""PNG figures of the redundancy analysis: similarity heat maps and twin-share bars (matplotlib, Agg).

Figures are sized for networks with dozens of groups (ResNet-56 has 30, MobileNetV2 more): heat maps
go at most ``per_page`` to a file, bar labels are rotated and the width grows with the group count.
Every PNG is rendered to memory and written atomically.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .errors import SimpruneError  # noqa: E402
from .files import atomic_write_bytes  # noqa: E402

LABELS = {"ssim": "SSIM", "ssim-windowed": "windowed SSIM", "psnr": "PSNR (dB)", "cosine": "cosine similarity"}


def _save(fig, path: Path, dpi: int = 100) -> Path:
    """Render ``fig`` to PNG bytes, write them atomically, close the figure."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def twin_order(S: np.ndarray) -> np.ndarray:
    """Channels by descending max similarity, each followed by its most similar unplaced channel,
    so that twin pairs sit next to each other in the top-left corner of the heat map."""
    m = S.astype(np.float64, copy=True)
    np.fill_diagonal(m, -np.inf)
    m[np.isnan(m)] = -np.inf
    placed = np.zeros(len(m), dtype=bool)
    order = []
    for j in np.argsort(-m.max(axis=1, initial=-np.inf), kind="stable"):
        if placed[j]:
            continue
        placed[j] = True
        order.append(j)
        partner = np.where(placed, -np.inf, m[j])
        k = int(np.argmax(partner))
        if not placed[k] and partner[k] > -np.inf:
            placed[k] = True
            order.append(k)
    return np.asarray(order, dtype=np.int64)


def _offdiag_range(mats: list[np.ndarray]) -> tuple[float, float]:
    """Shared colour range over all off-diagonal finite values (the diagonal is trivially maximal)."""
    vals = np.concatenate([m[~np.eye(len(m), dtype=bool)] for m in mats if len(m) > 1] or [np.zeros(1)])
    vals = vals[np.isfinite(vals)]
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _pick(matrices: dict, max_layers: int | None) -> list[str]:
    """Group roots to draw, in network order; with ``max_layers``, the ones with highest mean max similarity."""
    roots = list(matrices)
    if max_layers is None or max_layers >= len(roots):
        return roots
    def score(r):
        m = matrices[r].copy()
        np.fill_diagonal(m, -np.inf)
        return float(m.max(axis=1).mean()) if len(m) > 1 else -np.inf
    keep = set(sorted(roots, key=score, reverse=True)[:max_layers])
    return [r for r in roots if r in keep]


def _page(roots, mats, path: Path, vrange, label: str, page: str) -> Path:
    """One figure: a grid of heat maps sharing the colour scale, with one colour bar on the right."""
    cols = min(6, len(roots))
    rows = math.ceil(len(roots) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 1.1, 2.45 * rows + 0.7), squeeze=False,
                             layout="constrained")
    im = None
    for ax, root in zip(axes.flat, roots):
        S = mats[root]
        o = twin_order(S)
        im = ax.imshow(S[np.ix_(o, o)], cmap="viridis", vmin=vrange[0], vmax=vrange[1], interpolation="nearest")
        ax.set_title(f"{root}\n{len(S)} channels", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(roots):]:
        ax.axis("off")
    cbar = fig.colorbar(im, ax=axes, shrink=min(1.0, 0.35 + 0.15 * rows), aspect=30, pad=0.02)
    cbar.set_label(label, fontsize=10)
    fig.suptitle(f"Channel similarity per group ({label}; channels ordered by max similarity, "
                 f"twins adjacent){page}", fontsize=12)
    return _save(fig, path)


def similarity_heatmaps(matrices: dict, path, max_layers: int | None = None, per_page: int = 30,
                        label: str = "ssim") -> list[Path]:
    """Heat maps of each group's (C, C) similarity; ``path`` itself when they fit one page, else
    ``<stem>_1.png``, ``<stem>_2.png``...; returns the files written."""
    if not matrices:
        raise SimpruneError("no similarity matrices to plot")
    mats = {r: (m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, float))
            for r, m in matrices.items()}
    roots = _pick(mats, max_layers)
    vrange = _offdiag_range([mats[r] for r in roots])
    label = LABELS.get(label, label)
    path = Path(path)
    pages = [roots[i:i + per_page] for i in range(0, len(roots), per_page)]
    if len(pages) == 1:
        return [_page(pages[0], mats, path, vrange, label, "")]
    return [_page(chunk, mats, path.with_name(f"{path.stem}_{i}{path.suffix}"), vrange, label,
                  f" — page {i}/{len(pages)}") for i, chunk in enumerate(pages, 1)]


def redundancy_bars(summary: dict, path) -> Path:
    """Grouped bars: the share of twin channels of each group at each threshold, in network order."""
    groups, net = summary["groups"], summary["network"]
    if not groups:
        raise SimpruneError("no groups to plot")
    keys = list(net["twins"])
    n, k = len(groups), len(keys)
    x = np.arange(n)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(7.0, 0.42 * n + 2.0), 5.2), layout="constrained")
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, k))
    for i, key in enumerate(keys):
        share = [100.0 * g["twins"][key] / g["channels"] for g in groups]
        ax.bar(x + (i - (k - 1) / 2) * width, share, width, color=colors[i],
               label=f"> {key}  (network {100 * net['twin_share'][key]:.1f} %)")
    names = [g["group"] + (" (res)" if g.get("residual") else "") for g in groups]
    ax.set_xticks(x, names, rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 105)
    ax.set_ylabel("twin channels (% of the group)", fontsize=10)
    ax.yaxis.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    metric = LABELS.get(net["similarity"], net["similarity"])
    ax.set_title(f"Channels with a twin (max {metric} to another channel above the threshold), "
                 f"{net['images']} calibration images", fontsize=11)
    ax.legend(title=f"max {metric}", fontsize=9, title_fontsize=9, loc="upper left", ncols=k)
    return _save(fig, path)
