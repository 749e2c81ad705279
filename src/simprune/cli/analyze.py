"""`simprune analyze`: redundancy per channel group before pruning, with figures and a report."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from simprune import progress
from simprune.calibrate import calibration
from simprune.cli.common import (
    command_line,
    data_options,
    device_option,
    load_or_build,
    model_options,
    positive,
    warn_if_random,
)
from simprune.errors import SimpruneError
from simprune.io.files import (
    atomic_output_dir,
    atomic_write_json,
    read_json,
    resolve_model_path,
)
from simprune.stats.similarity import SIMILARITIES
from simprune.verify.analysis import DEAD_MSTD, ERROR_LEVELS, analyze
from simprune.verify.plots import redundancy_bars, similarity_heatmaps
from simprune.verify.reports import write_report


def add_analyze_parser(sub) -> None:
    """Register ``simprune analyze`` on the CLI's sub-parsers."""

    p = sub.add_parser("analyze", help="how many channels of each layer can go, and at what error, without pruning")

    device_option(p)
    model_options(p, required=False)
    p.add_argument("--checkpoint", help="trained model directory; without it --model gets random weights")
    p.add_argument("--calib-data", default=None, help="calibration data set (default: the checkpoint's)")
    p.add_argument("--calib-images", type=positive, default=640)
    data_options(p, required=False)
    p.add_argument("--similarity", default="ssim", choices=sorted(SIMILARITIES))
    p.add_argument("--input", default=None, help="input shape CxHxW (default: the checkpoint's, else the data's)")
    p.add_argument("--errors", type=fractions, default=ERROR_LEVELS, metavar="E1,E2,...",
                   help="error levels: count the channels the others reproduce within this share of each layer's "
                        f"map energy (default {','.join(f'{e:g}' for e in ERROR_LEVELS)})")
    p.add_argument("--max-heatmaps", type=positive, default=None,
                   help="plot only the N groups with the highest mean max similarity")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_analyze)


def _print_summary(summary: dict, title: str, source: str) -> None:
    """What can go: channels and MACs per error level, the layers with the most, a command to try."""
    net = summary["network"]
    print(f"{title}: {net['groups']} groups, {net['channels']} channels, {net['images']} calibration images")
    print("channels the other channels of their layer reproduce by least squares (what --compensate lstsq folds "
          "into the next layer):")
    for key, n in net["removable_within"].items():
        print(f"  within {float(key):4.0%} of the layer's map energy: {n:5d} channels ({n / net['channels']:5.1%}), "
              f"{net['macs_removed_within'][key]:5.1%} of the MACs")
    mid = list(net["removable_within"])[len(net["removable_within"]) // 2]
    top = sorted(summary["groups"], key=lambda g: -g["removable_within"][mid] / g["channels"])[:5]
    print(f"  most removable within {float(mid):.0%}: " + ", ".join(
        f"{g['group']} {g['removable_within'][mid]}/{g['channels']}" for g in top))
    low = list(net["twins"])[0]
    print(f"near-copies ({net['similarity']} > {low}): {net['twins'][low]} channels; dead channels (M-std < "
          f"{DEAD_MSTD:g}): {net['dead_channels']}")
    share = net["macs_removed_within"][mid]
    if share >= 0.05 and source:
        print(f"try: simprune prune {source} --criterion qsfm --compensate lstsq --target-flops {share:.2f} "
              f"--calib-data {summary.get('calib_data', 'NAME')} --data {summary.get('calib_data', 'NAME')} --out OUT")


def fractions(text: str) -> tuple[float, ...]:
    """``0.01,0.05`` -> (0.01, 0.05): distinct fractions within (0, 1)."""
    try:
        values = tuple(sorted({float(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        values = ()
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"give fractions within (0, 1) separated by commas, e.g. 0.01,0.05; got {text!r}")
    return values


def cmd_analyze(args) -> int:
    """``simprune analyze``: analysis.json, redundancy.png and similarity*.png, written atomically."""

    if args.similarity not in SIMILARITIES:
        raise SimpruneError(f"unknown similarity {args.similarity!r}; choose from {', '.join(SIMILARITIES)}")
    ckpt_desc = {}
    if args.checkpoint:
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
        model, desc, shape = load_or_build(args, shape_text)
        if tuple(shape) != image_shape:
            raise SimpruneError(f"{calib_data} images are {'x'.join(map(str, image_shape))} but the model takes "
                                f"{'x'.join(map(str, shape))}; pass --pad-to / --input or other --calib-data")
        summary, matrices = analyze(model, torch.zeros(1, *shape), loader, args.similarity, progress=True, device=args.device,
                                    error_levels=args.errors)
        weights = "checkpoint" if args.checkpoint else "random"
        report = {"model": desc.get("model"), "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                  "weights": weights, "input_shape": list(shape),
                  "calibration": {"data": calib_data, "images": summary["network"]["images"], "pad_to": pad_to,
                                  "seed": args.seed},
                  **summary, "command": command_line()}
        atomic_write_json(tmp / "analysis.json", report)
        progress.stage("drawing the figures and the report")
        redundancy_bars(summary, tmp / "redundancy.png")
        pngs = similarity_heatmaps(matrices, tmp / "similarity.png", max_layers=args.max_heatmaps,
                                   label=args.similarity,
                                   residual={g["group"]: g["residual"] for g in summary["groups"]})
        write_report(tmp, "analyze", report)
    title = f"{desc.get('model')} ({'random weights' if weights == 'random' else args.checkpoint})"
    source = f"--checkpoint {args.checkpoint}" if args.checkpoint else ""
    _print_summary({**summary, "calib_data": calib_data}, title, source)
    warn_if_random(args, "the redundancy figures")
    print(f"wrote {args.out}/report.html, report.md, analysis.json, redundancy.png, " + ", ".join(p.name for p in pngs))
    return 0
