"""`simprune models`, `simprune info` and `simprune criteria`: what is there and what it costs."""
from __future__ import annotations

import json

import torch

from simprune.cli.common import load_or_build, model_options
from simprune.criteria import available_criteria
from simprune.errors import SimpruneError
from simprune.graph.counting import count
from simprune.models import available_models
from simprune.models.torchvision_models import classification_model_names, segmentation_model_names


def cmd_models(args) -> int:
    for name, desc in available_models().items():
        print(f"{name:14s} {desc}")
    if args.torchvision:
        for name in classification_model_names() + segmentation_model_names():
            print(f"torchvision:{name}")
    else:
        print("torchvision:<name>  any torchvision classification or segmentation model (list them with --torchvision)")
        print("timm:<name>         any timm model (pip install 'simprune[timm]')")
        print("pkg.module:factory  your own builder (or path/to/file.py:factory)")
    return 0


def cmd_info(args) -> int:
    if not args.checkpoint and not args.model:
        raise SimpruneError("give --model NAME or --checkpoint DIR")
    model, _, shape = load_or_build(args, args.input)
    cost = count(model, torch.zeros(1, *shape))
    if args.json:
        out = cost.as_dict()
        if args.per_layer:
            out["layers"] = cost.per_layer
        print(json.dumps(out))
    else:
        if args.per_layer:
            print(f"{'layer':40s} {'MACs':>14s} {'params':>10s}")
            for name, c in cost.per_layer.items():
                print(f"{name:40s} {c['macs']:14,d} {c['params']:10,d}")
        print(f"input  {'x'.join(map(str, shape)):>10s}\nMACs   {cost.macs / 1e6:10.2f} M\n"
              f"params {cost.params / 1e6:10.3f} M")
    return 0


def cmd_criteria(args) -> int:
    print(f"{'auto':18s} choose on your own images: refit-error and tp:l2 each prune a copy on 80 % of the "
          "calibration images, the one that moves the output least on the other 20 % is used")
    for name, desc in available_criteria().items():
        print(f"{name:18s} {desc}")
    return 0


def add_info_parsers(sub) -> None:
    p = sub.add_parser("models", help="list the model registry")
    p.add_argument("--torchvision", action="store_true", help="also list every torchvision classification model")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("info", help="MACs and parameters of a model")
    model_options(p, required=False)
    p.add_argument("--checkpoint", help="a saved model directory instead of --model")
    p.add_argument("--input", default=None, help="input shape CxHxW (default: the checkpoint's, else 3x32x32)")
    p.add_argument("--per-layer", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("criteria", help="list the pruning criteria")
    p.set_defaults(fn=cmd_criteria)
