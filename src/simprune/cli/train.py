"""`simprune train`: train a model from scratch (the zoo baselines come from this command)."""
from __future__ import annotations

from pathlib import Path

import torch

from simprune.cli.common import (
    command_line,
    data_options,
    dataset_defaults,
    device_option,
    model_options,
    positive,
    weights_kwargs,
)
from simprune.errors import SimpruneError
from simprune.io.data import load_dataset
from simprune.io.files import lock_for_writing
from simprune.models import build_model
from simprune.train.finetune import MARKER, mark_incomplete
from simprune.train.loop import STATE_FILE, TrainConfig, train


def cmd_train(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise SimpruneError(f"{out} already holds files; pass --resume to continue or --overwrite to start over")
    if args.resume and not (out / STATE_FILE).exists():
        raise SimpruneError(f"--resume: {out / STATE_FILE} does not exist; drop --resume to start a new run")
    train_ds = load_dataset(args.data, "train", args.data_dir, args.pad_to, augment=True)
    test_ds = load_dataset(args.data, "test", args.data_dir, args.pad_to, augment=False)
    dataset_defaults(args, train_ds)
    if getattr(train_ds, "in_channels", args.in_channels) != args.in_channels:
        raise SimpruneError(f"--in-channels {args.in_channels} but {args.data} has {train_ds.in_channels}-channel "
                            "images; drop --in-channels")

    torch.manual_seed(args.seed)  # before building: --seed decides the initial weights too
    model = build_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels, **weights_kwargs(args))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_epochs=args.warmup_epochs, seed=args.seed, bf16=not args.fp32,
                      channels_last=not args.fp32, limit_batches=args.limit_batches)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train.log", "a")  # noqa: SIM115 - closed below
    try:
        lock_for_writing(log_file, out)
    except SimpruneError:
        log_file.close()
        raise
    if args.overwrite and not args.resume:  # start over: a later --resume must not find the old run's state
        for name in (STATE_FILE, "model.safetensors", "model.json"):
            (out / name).unlink(missing_ok=True)
    mark_incomplete(out, "train", command_line())

    def log(line: str) -> None:
        print(line)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"# {command_line()}")
    desc = {"model": args.model, "model_args": {"num_classes": args.num_classes, "in_channels": args.in_channels},
            "input_shape": list(train_ds.image_shape) if hasattr(train_ds, "image_shape") else None,
            "data": {"name": args.data, "pad_to": args.pad_to}, "command": command_line()}
    try:
        history = train(model, train_ds, cfg, out, test_ds, desc, resume=args.resume, log=log, progress=not args.quiet,
                        device=args.device)
        (out / MARKER).unlink(missing_ok=True)
    finally:
        log_file.close()
    last = history[-1] if history else {}
    print(f"done: top-1 {last.get('test_top1', float('nan')):.2f} % after {len(history)} epochs -> {out}")
    return 0


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from scratch")
    device_option(p)
    model_options(p)
    data_options(p)
    p.add_argument("--epochs", type=positive, default=30)
    p.add_argument("--batch-size", type=positive, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="disable bf16 autocast and channels_last")
    p.add_argument("--limit-batches", type=positive, default=None, help="batches per epoch (smoke tests)")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.safetensors")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_train)
