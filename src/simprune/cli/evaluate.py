"""`simprune evaluate`: top-1/top-5 accuracy of a saved model."""
from __future__ import annotations

from pathlib import Path

from simprune.cli.common import builder_option, check_compatible, data_options, load_saved, positive
from simprune.io.data import load_dataset
from simprune.io.files import atomic_write_json
from simprune.train.loop import evaluate


def cmd_evaluate(args) -> int:
    model, desc = load_saved(args.checkpoint, args.model)
    pad_to = args.pad_to if args.pad_to is not None else (desc.get("data") or {}).get("pad_to")
    ds = load_dataset(args.data, args.split, args.data_dir, pad_to)
    check_compatible(model, desc, ds)
    metrics = evaluate(model, ds, batch_size=args.batch_size, progress=not args.quiet, bf16=not args.fp32)
    result = {"checkpoint": str(args.checkpoint), "data": args.data, "split": args.split, **metrics}
    print(f"top-1 {metrics['top1']:.2f} %  top-5 {metrics['top5']:.2f} %  ({metrics['n']} images, {args.data} {args.split})")
    if args.json:
        atomic_write_json(Path(args.json), result)
    return 0


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1/top-5 accuracy of a saved model")
    p.add_argument("--checkpoint", required=True, help="model directory or its model.safetensors")
    data_options(p)
    builder_option(p)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--batch-size", type=positive, default=512)
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_evaluate)
