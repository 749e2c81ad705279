"""Redundancy analysis without pruning: how many channels of each group have a near-copy (a twin).

One calibration pass gives every group's mean similarity matrix S and M-std; a channel j is a
twin at threshold t when max over k != j of S_jk exceeds t. ``analyze`` is pure computation; the
``simprune analyze`` command (``cmd_analyze``) adds the JSON report and the plots.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from simprune.errors import SimpruneError
from simprune.stats.similarity import SIMILARITIES, twin_selection

DEFAULT_THRESHOLDS = {"psnr": (20.0, 30.0, 40.0)}  # dB; every other metric lives in [-1, 1]
DEAD_MSTD = 1e-6


def default_thresholds(similarity: str) -> tuple[float, ...]:
    """Twin thresholds that make sense for a metric's scale (PSNR is in dB)."""
    return DEFAULT_THRESHOLDS.get(similarity, (0.9, 0.95, 0.99))


def _key(t: float) -> str:
    """JSON key of a threshold: 0.9 -> "0.9", 30.0 -> "30"."""
    return f"{t:g}"


def max_offdiag(S: torch.Tensor) -> torch.Tensor:
    """(C,) max over k != j of S_jk (float64); -inf for a single channel."""
    m = S.detach().to(torch.float64).clone()
    m.fill_diagonal_(float("-inf"))
    return m.nan_to_num(nan=float("-inf")).amax(dim=1)


def _mstd_summary(mstd: torch.Tensor) -> dict[str, float | None]:
    """min / median / max and coefficient of variation (std / mean; None when the mean is 0)."""
    mean = float(mstd.mean())
    cv = float(mstd.std(correction=0)) / mean if mean > 0 else None
    return {"min": float(mstd.min()), "median": float(mstd.median()), "max": float(mstd.max()), "cv": cv}


def _quantiles(values: torch.Tensor) -> dict[str, float] | None:
    """min / q1 / median / q3 / max of a 1-D tensor (None when empty): the box of a box plot."""
    if values.numel() == 0:
        return None
    q = torch.quantile(values, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=values.dtype))
    return dict(zip(("min", "q1", "median", "q3", "max"), (float(v) for v in q)))


def _module_order(model: nn.Module) -> dict[str, int]:
    return {name: i for i, (name, _) in enumerate(model.named_modules())}


def group_report(group, S: torch.Tensor, mstd: torch.Tensor, thresholds) -> dict:
    """One group's entry of the report (``group`` is a graph.ChannelGroup)."""
    best = max_offdiag(S)
    layers = list(dict.fromkeys(m.name for m in group.members if isinstance(m.module, nn.Conv2d)))
    producers = {m.name for m in group.producers}
    finite = best[torch.isfinite(best)]
    return {
        "group": group.root,
        "layers": layers,
        "channels": int(S.shape[0]),
        "residual": len(producers) > 1,
        "twins": {_key(t): int((best > t).sum()) for t in thresholds},
        "removable": {_key(t): len(twin_selection(S, t)) for t in thresholds},
        "mean_max_similarity": float(finite.mean()) if finite.numel() else None,
        "max_similarity": _quantiles(finite),
        "mstd": _mstd_summary(mstd),
        "dead_channels": int((mstd < DEAD_MSTD).sum()),
    }


def analyze(model: nn.Module, example_input: torch.Tensor, calibration_batches, similarity: str = "ssim",
            thresholds=None, progress: bool = False, bf16: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Per-group twin counts and M-std over one calibration pass.

    Returns ``(summary, matrices)``: the JSON-ready summary {"network": ..., "groups": [...]} in
    network order, and each group's (C, C) mean similarity matrix keyed by group root.
    """
    from simprune.calibrate.calibration import collect_statistics, mean_similarity  # noqa: PLC0415
    from simprune.graph.groups import PruningGraph  # noqa: PLC0415

    if similarity not in SIMILARITIES:
        raise SimpruneError(f"unknown similarity {similarity!r}; choose from {', '.join(SIMILARITIES)}")
    thresholds = tuple(float(t) for t in (thresholds or default_thresholds(similarity)))
    if len({_key(t) for t in thresholds}) != len(thresholds):
        raise SimpruneError(f"thresholds must be distinct, got {list(thresholds)}")
    graph = PruningGraph(model, example_input)
    probes = collect_statistics(model, graph, calibration_batches, {similarity, "mstd"},
                                precision="bf16" if bf16 else "fp32",
                                progress=progress)
    order = _module_order(model)
    groups, matrices, images = [], {}, 0
    for group in sorted(graph.groups, key=lambda g: order.get(g.root, len(order))):
        plist = probes[group.root]
        S = mean_similarity(plist, similarity)
        mstd = torch.stack([p.stats.mstd() for p in plist]).mean(0)
        groups.append(group_report(group, S, mstd, thresholds))
        matrices[group.root] = S.float()
        images = plist[0].stats.images
    channels = sum(g["channels"] for g in groups)
    twins = {_key(t): sum(g["twins"][_key(t)] for g in groups) for t in thresholds}
    network = {
        "similarity": similarity,
        "images": images,
        "groups": len(groups),
        "channels": channels,
        "thresholds": list(thresholds),
        "twins": twins,
        "twin_share": {k: v / channels for k, v in twins.items()},
        "removable": {_key(t): sum(g["removable"][_key(t)] for g in groups) for t in thresholds},
        "dead_channels": sum(g["dead_channels"] for g in groups),
    }
    return {"network": network, "groups": groups}, matrices


# ---- command line ---------------------------------------------------------------------------

def add_analyze_parser(sub) -> None:
    """Register ``simprune analyze`` on the CLI's sub-parsers."""
    from simprune.cli.main import _data_options, _model_options, _positive  # noqa: PLC0415 - cli imports this module

    p = sub.add_parser("analyze", help="report channel redundancy (twins, M-std) without pruning")
    _model_options(p, required=False)
    p.add_argument("--checkpoint", help="trained model directory; without it --model gets random weights")
    p.add_argument("--calib-data", default=None, help="calibration data set (default: the checkpoint's)")
    p.add_argument("--calib-images", type=_positive, default=640)
    _data_options(p, required=False)
    p.add_argument("--similarity", default="ssim", choices=sorted(SIMILARITIES))
    p.add_argument("--input", default=None, help="input shape CxHxW (default: the checkpoint's, else the data's)")
    p.add_argument("--max-heatmaps", type=_positive, default=None,
                   help="plot only the N groups with the highest mean max similarity")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_analyze)


def _print_summary(summary: dict, title: str) -> None:
    """A few lines: network totals per threshold, dead channels, the most redundant groups."""
    net = summary["network"]
    print(f"{title}: {net['groups']} groups, {net['channels']} channels, {net['images']} images, "
          f"{net['similarity']}")
    for key, n in net["twins"].items():
        print(f"  max similarity > {key:>5s}: {n:5d} twin channels ({net['twin_share'][key]:6.1%}), "
              f"{net['removable'][key]} removable")
    print(f"  dead channels (M-std < {DEAD_MSTD:g}): {net['dead_channels']}")
    mid = list(net["twins"])[len(net["twins"]) // 2]
    if not net["twins"][mid]:
        return
    top = sorted(summary["groups"], key=lambda g: -g["twins"][mid] / g["channels"])[:3]
    print(f"  most twins at {mid}: " + ", ".join(f"{g['group']} {g['twins'][mid] / g['channels']:.0%}" for g in top))


def cmd_analyze(args) -> int:
    """``simprune analyze``: analysis.json, redundancy.png and similarity*.png, written atomically."""
    from simprune.calibrate import calibration  # noqa: PLC0415
    from simprune.cli.main import _command_line, _load_or_build  # noqa: PLC0415
    from simprune.io.files import atomic_output_dir, atomic_write_json  # noqa: PLC0415
    from simprune.verify.plots import redundancy_bars, similarity_heatmaps  # noqa: PLC0415
    from simprune.verify.reports import write_report  # noqa: PLC0415

    if args.similarity not in SIMILARITIES:
        raise SimpruneError(f"unknown similarity {args.similarity!r}; choose from {', '.join(SIMILARITIES)}")
    ckpt_desc = {}
    if args.checkpoint:
        from simprune.io.files import read_json, resolve_model_path  # noqa: PLC0415

        ckpt_desc = read_json(resolve_model_path(args.checkpoint)[1])
    data = ckpt_desc.get("data") or {}
    calib_data = args.calib_data or data.get("name")
    if not calib_data:
        raise SimpruneError("pass --calib-data NAME (the checkpoint records no training data set)")
    pad_to = args.pad_to if args.pad_to is not None else data.get("pad_to")
    with atomic_output_dir(Path(args.out), overwrite=args.overwrite) as tmp:
        loader = calibration.calibration_loader(calib_data, args.calib_images, data_dir=args.data_dir,
                                                pad_to=pad_to, seed=args.seed)
        image_shape = tuple(loader.dataset[0][0].shape)
        shape_text = args.input or (None if args.checkpoint else "x".join(map(str, image_shape)))
        torch.manual_seed(args.seed)  # random weights (no --checkpoint) are reproducible too
        model, desc, shape = _load_or_build(args, shape_text)
        if tuple(shape) != image_shape:
            raise SimpruneError(f"{calib_data} images are {'x'.join(map(str, image_shape))} but the model takes "
                                f"{'x'.join(map(str, shape))}; pass --pad-to / --input or other --calib-data")
        summary, matrices = analyze(model, torch.zeros(1, *shape), loader, args.similarity,
                                    progress=sys.stderr.isatty())
        weights = "checkpoint" if args.checkpoint else "random"
        report = {"model": desc.get("model"), "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                  "weights": weights, "input_shape": list(shape),
                  "calibration": {"data": calib_data, "images": summary["network"]["images"], "pad_to": pad_to,
                                  "seed": args.seed},
                  **summary, "command": _command_line()}
        atomic_write_json(tmp / "analysis.json", report)
        redundancy_bars(summary, tmp / "redundancy.png")
        pngs = similarity_heatmaps(matrices, tmp / "similarity.png", max_layers=args.max_heatmaps,
                                   label=args.similarity,
                                   residual={g["group"]: g["residual"] for g in summary["groups"]})
        write_report(tmp, "analyze", report)
    title = f"{desc.get('model')} ({'random weights' if weights == 'random' else args.checkpoint})"
    _print_summary(summary, title)
    if weights == "random":
        print("  note: no --checkpoint, so these are the similarities of an untrained network")
    print(f"wrote {args.out}/report.html, report.md, analysis.json, redundancy.png, " + ", ".join(p.name for p in pngs))
    return 0
