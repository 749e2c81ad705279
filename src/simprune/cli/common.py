"""Options and helpers shared by the command modules (argparse lives here and in cli/ only)."""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path
from typing import Callable

from torch import nn
from torch.utils.data import Subset

from simprune import distributed
from simprune.errors import SimpruneError
from simprune.graph.counting import parse_input_shape
from simprune.io.data import load_dataset
from simprune.io.files import load_model
from simprune.models import build_model
from simprune.train.finetune import FineTune, load_teacher
from simprune.train.loop import TrainConfig


def command_line() -> str:
    return "simprune " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="registry name (see `simprune models`) or torchvision:<name>")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the data set, else 10")
    p.add_argument("--in-channels", type=int, default=None, help="default: from the data set, else 3")
    p.add_argument("--weights", default=None, help="torchvision:<name> only: pretrained weights, e.g. "
                                                   "IMAGENET1K_V1 (torchvision's cache, else its download)")


def data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="fashion-mnist, mnist, cifar10, cifar100 or imagefolder:PATH")
    p.add_argument("--data-dir", default=None, help="where the data set files are (else $SIMPRUNE_DATA, system, cache)")
    p.add_argument("--pad-to", type=int, default=None, help="zero-pad images to this size (32 for 28x28 sets)")


def weights_kwargs(args) -> dict:
    """``weights=`` for build_model when --weights was given (torchvision models only)."""
    return {"weights": args.weights} if getattr(args, "weights", None) else {}


def positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def dataset_defaults(args, ds) -> None:
    if args.num_classes is None:
        args.num_classes = getattr(ds, "num_classes", 10)
    if args.in_channels is None:
        args.in_channels = getattr(ds, "in_channels", 3)


def check_compatible(model, desc, ds) -> None:
    args = desc.get("model_args", {})
    if hasattr(ds, "in_channels") and args.get("in_channels", 3) != ds.in_channels:
        raise SimpruneError(f"the model takes {args.get('in_channels', 3)}-channel images but the data set has "
                            f"{ds.in_channels}; use matching data or a model trained for it")
    if hasattr(ds, "num_classes") and args.get("num_classes", 10) < ds.num_classes:
        raise SimpruneError(f"the model predicts {args.get('num_classes')} classes but the data set has "
                            f"{ds.num_classes}")


def load_or_build(args, shape_text: str | None):
    """Model from --checkpoint (its JSON names the architecture) or a fresh --model; plus the input shape."""

    if args.checkpoint:
        model, desc = load_model(args.checkpoint)
        if args.model and args.model != desc.get("model"):
            raise SimpruneError(f"--model {args.model} but {args.checkpoint} holds a {desc.get('model')}; "
                                "drop --model or pass the matching checkpoint")
        shape = parse_input_shape(shape_text) if shape_text else tuple(desc.get("input_shape") or ())
        if len(shape) != 3:
            raise SimpruneError("the checkpoint records no input shape; pass --input CxHxW")
        return model, desc, shape
    if not args.model:
        raise SimpruneError("give --model NAME (and optionally --checkpoint DIR)")
    shape = parse_input_shape(shape_text or "3x32x32")
    in_ch = args.in_channels or shape[0]
    extra = weights_kwargs(args)
    default_classes = 1000 if extra else 10
    model = build_model(args.model, num_classes=args.num_classes or default_classes, in_channels=in_ch, **extra)
    desc = {"model": args.model, "model_args": {"num_classes": args.num_classes or default_classes,
                                                "in_channels": in_ch}}
    return model.eval(), desc, shape


def add_training_options(p, lr: float = 0.01) -> None:
    """Options shared by `finetune` and `prune --finetune-epochs`."""
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (split across torchrun ranks)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--distill", action="store_true", help="distil from the unpruned model (KL on soft logits)")
    p.add_argument("--teacher", default=None, help="unpruned model directory for --distill "
                                                  "(default: the checkpoint the model was pruned from)")
    p.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term")
    p.add_argument("--limit-batches", type=int, default=None, help="batches per epoch (smoke tests)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out exactly")
    p.add_argument("--fp32", action="store_true", help="disable bf16 autocast and channels_last")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def train_config(args, epochs: int) -> TrainConfig:
    if epochs < 1 or args.batch_size < 1 or args.lr <= 0 or (args.limit_batches is not None and args.limit_batches < 1):
        raise SimpruneError("epochs, --batch-size and --limit-batches must be >= 1 and --lr > 0")
    if not 0 <= args.distill_alpha <= 1:
        raise SimpruneError(f"--distill-alpha must be within [0, 1], got {args.distill_alpha}")
    return TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_epochs=args.warmup_epochs, seed=args.seed, bf16=not args.fp32,
                       channels_last=not args.fp32, limit_batches=args.limit_batches,
                       distill_alpha=args.distill_alpha if args.distill else 0.0)


def make_finetune(args, desc: dict, out: Path, epochs: int, log: Callable[[str], None],
                  teacher: nn.Module | None = None) -> FineTune:
    """Data, config and teacher (given, or loaded for --distill) for a fine-tuning run from CLI arguments."""

    if not getattr(args, "data", None):
        raise SimpruneError("fine-tuning needs training data; pass --data NAME")
    pad_to = args.pad_to if args.pad_to is not None else (desc.get("data") or {}).get("pad_to")
    train_ds = load_dataset(args.data, "train", args.data_dir, pad_to, augment=True)
    test_ds = load_dataset(args.data, "test", args.data_dir, pad_to)
    if getattr(args, "eval_images", None):
        test_ds = Subset(test_ds, range(min(args.eval_images, len(test_ds))))
    if args.distill and teacher is None:
        teacher = load_teacher(desc, args.teacher)
    return FineTune(train_ds, train_config(args, epochs), test_ds, teacher, out, resume=args.resume, log=log,
                    progress=not args.quiet)


def run_log(out: Path) -> Callable[[str], None]:
    """Print and append to ``out/train.log`` (rank 0 only)."""
    def log(line: str) -> None:
        if distributed.is_main():
            print(line)
            with open(out / "train.log", "a") as f:
                f.write(line + "\n")
    return log


def keep_log(out: Path) -> Callable[[Path], None]:
    def extra(tmp: Path) -> None:
        if (out / "train.log").exists():
            shutil.copy2(out / "train.log", tmp / "train.log")
    return extra
