"""PNG figures of the redundancy analysis: similarity heat maps and twin-share bars (matplotlib, Agg).

Figures are sized for networks with dozens of groups (ResNet-56 has 30, MobileNetV2 more): heat maps
go at most ``per_page`` to a file, bar labels are rotated and the width grows with the group count.
Every PNG is rendered to memory and written atomically.
"""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from simprune.errors import SimpruneError  # noqa: E402
from simprune.io.files import atomic_write_bytes  # noqa: E402

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


def _columns(n: int) -> int:
    """Grid width: at most 6 maps a row, rows balanced (8 maps are 2 x 4, not 6 + 2)."""
    return math.ceil(n / math.ceil(n / 6))


def _page(roots, mats, path: Path, vrange, label: str, page: str, residual: dict) -> Path:
    """One figure: a grid of heat maps sharing the colour scale, with one colour bar on the right."""
    cols = _columns(len(roots))
    rows = math.ceil(len(roots) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 1.1, 2.45 * rows + 0.9), squeeze=False,
                             layout="constrained")
    im = None
    for ax, root in zip(axes.flat, roots):
        S = mats[root]
        o = twin_order(S)
        im = ax.imshow(S[np.ix_(o, o)], cmap="viridis", vmin=vrange[0], vmax=vrange[1], interpolation="nearest")
        kind = ", residual" if residual.get(root) else ""
        ax.set_title(f"{root}\n{len(S)} channels{kind}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(roots):]:
        ax.axis("off")
    cbar = fig.colorbar(im, ax=axes, shrink=0.9 if rows == 1 else min(1.0, 0.35 + 0.15 * rows), aspect=30, pad=0.02)
    cbar.set_label(label, fontsize=10)
    width = max(20, int(fig.get_figwidth() * 9))  # characters that fit a line at 11 pt
    title = textwrap.fill(f"Channel similarity per group: {label}{page}", width)
    note = textwrap.fill("channels ordered by max similarity (twins adjacent); colours span the off-diagonal range", width)
    fig.suptitle(f"{title}\n{note}", fontsize=11)
    return _save(fig, path)


def similarity_heatmaps(matrices: dict, path, max_layers: int | None = None, per_page: int = 30,
                        label: str = "ssim", residual: dict | None = None) -> list[Path]:
    """Heat maps of each group's (C, C) similarity; ``path`` itself when they fit one page, else
    ``<stem>_1.png``, ``<stem>_2.png``...; returns the files written. ``residual``: root -> bool."""
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
        return [_page(pages[0], mats, path, vrange, label, "", residual or {})]
    return [_page(chunk, mats, path.with_name(f"{path.stem}_{i}{path.suffix}"), vrange, label,
                  f", page {i} of {len(pages)}", residual or {}) for i, chunk in enumerate(pages, 1)]


def _unit(metric: str) -> str:
    return " dB" if metric == "psnr" else ""


def _share_panel(ax, groups, net, keys, colors) -> None:
    """Top panel: grouped bars of the share of twin channels per group, one bar per threshold."""
    k, x, width = len(keys), np.arange(len(groups)), 0.8 / len(keys)
    unit = _unit(net["similarity"])
    for i, key in enumerate(keys):
        share = [100.0 * g["twins"][key] / g["channels"] for g in groups]
        ax.bar(x + (i - (k - 1) / 2) * width, share, width, color=colors[i],
               label=f"> {key}{unit}  (network {100 * net['twin_share'][key]:.1f} %)")
    top = max(100.0 * g["twins"][key] / g["channels"] for g in groups for key in keys)
    ax.set_ylim(0, min(105.0, max(10.0, 1.15 * top)))  # zoom in: a few % of twins must not look like 0
    ax.set_ylabel("channels with a twin (%)", fontsize=10)
    ax.legend(title="max similarity", fontsize=9, title_fontsize=9, loc="upper left", ncols=k)


def _spread_panel(ax, groups, net, keys, colors) -> None:
    """Bottom panel: per group, the spread of each channel's max similarity, with the thresholds."""
    boxes = [{**g["max_similarity"], "med": g["max_similarity"]["median"], "whislo": g["max_similarity"]["min"],
              "whishi": g["max_similarity"]["max"], "label": ""} if g.get("max_similarity") else
             {"med": np.nan, "q1": np.nan, "q3": np.nan, "whislo": np.nan, "whishi": np.nan, "label": ""}
             for g in groups]
    ax.bxp(boxes, positions=np.arange(len(groups)), widths=0.6, showfliers=False, patch_artist=True,
           boxprops={"facecolor": "0.85", "edgecolor": "0.3"}, medianprops={"color": "black"},
           whiskerprops={"color": "0.3"}, capprops={"color": "0.3"})
    unit = _unit(net["similarity"])
    for key, color, t in zip(keys, colors, net["thresholds"]):
        ax.axhline(t, color=color, lw=1.2, ls="--", zorder=0)
    vals = [b["whislo"] for b in boxes] + [b["whishi"] for b in boxes] + list(net["thresholds"])
    lo, hi = np.nanmin(vals), np.nanmax(vals)
    pad = 0.05 * (hi - lo) if hi > lo else 0.05
    ax.set_ylim(lo - pad, hi + pad)  # every threshold line stays inside the frame
    ax.set_ylabel(f"max {LABELS.get(net['similarity'], net['similarity'])}", fontsize=10)
    ax.set_title("each channel's highest similarity to another channel of its group (box: quartiles, "
                 f"whiskers: min to max, dashed: thresholds {', '.join(keys)}{unit})", fontsize=9, loc="left")


def redundancy_bars(summary: dict, path) -> Path:
    """Twin shares per group at each threshold (bars) over the spread of each channel's max
    similarity (boxes: min, quartiles, max; dashed lines: the thresholds), in network order."""
    groups, net = summary["groups"], summary["network"]
    if not groups:
        raise SimpruneError("no groups to plot")
    keys, n = list(net["twins"]), len(groups)
    any_twin = any(g["twins"][key] for g in groups for key in keys)
    width = max(7.0, 0.42 * n + 2.0)
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(keys)))
    if any_twin:
        fig, axes = plt.subplots(2, 1, sharex=True, figsize=(width, 8.0), layout="constrained")
        _share_panel(axes[0], groups, net, keys, colors)
    else:  # an empty bar panel says nothing: one panel, and the verdict in the title
        fig, ax = plt.subplots(figsize=(width, 5.5), layout="constrained")
        axes = [ax]
    bottom = axes[-1]
    _spread_panel(bottom, groups, net, keys, colors)
    for ax in axes:
        ax.set_axisbelow(True)
        ax.yaxis.grid(True, alpha=0.3)
    names = [g["group"] + (" (res)" if g.get("residual") else "") for g in groups]
    bottom.set_xticks(np.arange(n), names, rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
    bottom.set_xlim(-0.6, n - 0.4)
    metric = LABELS.get(net["similarity"], net["similarity"])
    fig.suptitle(f"Redundant channels per group: a twin is another channel with {metric} above the threshold "
                 f"({net['images']} calibration images)" + ("" if any_twin else "\nno channel has a twin at any threshold"),
                 fontsize=11)
    return _save(fig, path)


def channels_chart(layers: dict[str, list[dict]], path, title: str = "Channels per layer") -> Path:
    """Output channels of every layer before pruning (grey bars) and after it: filled bars for one
    model, one marked line per model when several are compared. ``layers``: label -> report
    ``layers`` entries ({name, channels_before, channels_after}), all of the same network."""
    if not layers or not next(iter(layers.values())):
        raise SimpruneError("no layers to plot")
    first = next(iter(layers.values()))
    names = [entry["name"] for entry in first]
    before = np.array([entry["channels_before"] for entry in first], dtype=float)
    n, x = len(names), np.arange(len(names))
    fig, ax = plt.subplots(figsize=(min(11.5, max(7.0, 0.16 * n + 2.5)), 5.0), layout="constrained")
    ax.bar(x, before, 0.8, color="0.88", edgecolor="0.7", linewidth=0.5, label=f"before ({int(before.sum())})")
    colors = plt.get_cmap("tab10").colors
    for i, (label, entries) in enumerate(layers.items()):
        kept = {entry["name"]: entry["channels_after"] for entry in entries}
        after = np.array([kept.get(name, 0) for name in names], dtype=float)
        text = f"{label}: {int(after.sum())} kept ({after.sum() / before.sum():.0%})"
        if len(layers) == 1:
            ax.bar(x, after, 0.55, color=colors[0], label=text)
        else:
            ax.plot(x, after, "-o", color=colors[i % 10], markersize=3, linewidth=1.2, label=text)
    ax.set_xticks(x, names, rotation=90, fontsize=7 if n > 40 else 8)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel("output channels", fontsize=10)
    ax.set_axisbelow(True)
    ax.yaxis.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="upper left")
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def accuracy_vs_flops(rows: list[dict], baseline: float | None, path, title: str = "Top-1 vs MACs removed") -> Path:
    """Top-1 against the share of MACs removed, one line per ``label`` (rows: label, flops_removed,
    top1), with the unpruned model's top-1 as a dashed line."""
    if not rows:
        raise SimpruneError("no results to plot")
    by_label: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append((100.0 * r["flops_removed"], r["top1"]))
    many = len(by_label) > 8
    fig, ax = plt.subplots(figsize=(10.0 if many else 8.0, 5.0), layout="constrained")
    cmap = plt.get_cmap("tab20" if len(by_label) > 10 else "tab10")
    markers = "osD^vP*X<>"
    for i, (label, points) in enumerate(by_label.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker=markers[i % len(markers)], color=cmap(i % cmap.N), markersize=5, linewidth=1.5,
                label=label)
    if baseline is not None:
        ax.axhline(baseline, color="0.3", ls="--", lw=1.2, label=f"unpruned ({baseline:.2f} %)")
    ax.set_xlabel("MACs removed (%)", fontsize=10)
    ax.set_ylabel("top-1 (%)", fontsize=10)
    ax.set_axisbelow(True)
    ax.grid(True, alpha=0.3)
    if many:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=9, loc="lower left")
    ax.set_title(title, fontsize=11)
    return _save(fig, path)
