"""Options and helpers shared by the command modules (argparse lives here and in cli/ only)."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Subset

from simprune import distributed, progress
from simprune.errors import SimpruneError
from simprune.graph.counting import parse_input_shape
from simprune.io.data import load_dataset
from simprune.io.files import load_model, read_json, resolve_model_path
from simprune.io.images import Preprocess, timm_preprocess, torchvision_preprocess, ultralytics_preprocess
from simprune.models import build_model
from simprune.models.external import builder_takes, is_builder_spec
from simprune.schedules.checks import calibration_images
from simprune.train.finetune import FineTune, load_teacher
from simprune.train.loop import TrainConfig


def command_line() -> str:
    return "simprune " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def builder_option(p: argparse.ArgumentParser) -> None:
    """--model for commands that read a saved folder: the builder that made it (your code runs when you name it)."""
    p.add_argument("--model", default=None, help="the builder that made DIR (pkg.module:factory, file.py:factory or "
                                                 "ultralytics:FILE.yaml): run for this command; needed for folders "
                                                 "saved through the API from your own model")


def model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="registry name (see `simprune models`), torchvision:<name>, "
                                                      "timm:<name>, or your builder pkg.module:factory / file.py:factory")
    p.add_argument("--num-classes", type=int, default=None,
                   help="default: from the data set, else the architecture's own (registry models: 10)")
    p.add_argument("--in-channels", type=int, default=None, help="default: from the data set, else 3")
    p.add_argument("--weights", default=None, help="torchvision:/timm: models only: pretrained weights, e.g. "
                                                   "IMAGENET1K_V1 (the library's cache, else its download)")


def data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="labelled images: fashion-mnist, mnist, cifar10, cifar100, "
                                                     "imagefolder:PATH, a DIR of CLASS/*.jpg folders or PATH.csv:SPLIT")
    p.add_argument("--data-dir", default=None, help="where the data set files are (else $SIMPRUNE_DATA, system, cache)")
    p.add_argument("--pad-to", type=int, default=None, help="zero-pad images to this size (32 for 28x28 sets)")


def preprocess_options(p: argparse.ArgumentParser) -> None:
    """--resize/--crop/--mean/--std: how one's own images (--calib-data DIR, --data DIR or PATH.csv:SPLIT) are read."""
    g = p.add_argument_group("your own images (--calib-data DIR, --data DIR or PATH.csv:SPLIT)",
                             "default: the preprocessing of the model's weights (torchvision transforms(), timm's "
                             "data config), else resize 256, crop 224, ImageNet mean/std")
    g.add_argument("--resize", type=positive, default=None, help="short side before the centre crop")
    g.add_argument("--crop", type=positive, default=None, help="centre crop, also the input size (--input 3xCxC)")
    g.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"))
    g.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"))


def model_preprocess(model: str | None, weights: str | None, input_shape: str | None = None) -> Preprocess | None:
    """The preprocessing the model's own weights were trained with, when simprune can read it (a YOLO's
    at the --input size, 640 without it)."""
    if model and model.startswith("ultralytics:"):
        return ultralytics_preprocess(parse_input_shape(input_shape)[-1] if input_shape else 640)
    if model and model.startswith("torchvision:") and weights:
        return torchvision_preprocess(model.split(":", 1)[1], weights)
    if model and model.startswith("timm:"):
        return timm_preprocess(model.split(":", 1)[1])
    return None


def image_preprocess(args, desc: dict | None = None) -> Preprocess:
    """How --calib-data DIR and --data DIR are read: the model's own preprocessing (from --model/--weights or
    the checkpoint's record), each field overridden by --resize/--crop/--mean/--std; a notice when neither
    says anything and ImageNet's 256/224 is assumed."""
    desc = desc or {}
    recorded = (desc.get("calibration") or {}).get("preprocess")
    base = Preprocess.from_dict(recorded) if recorded else \
        model_preprocess(getattr(args, "model", None) or desc.get("model"),
                         getattr(args, "weights", None), getattr(args, "input", None))
    given = {k: getattr(args, k, None) for k in ("resize", "crop", "mean", "std")}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    if base is None and not given:
        progress.warn("reading your images with resize 256, centre crop 224 and ImageNet mean/std; pass "
                      "--resize/--crop/--mean/--std if your model was trained otherwise")
    if "crop" in given and "resize" not in given and given["crop"] > (base or Preprocess()).resize:
        given["resize"] = given["crop"]
    try:
        return dataclasses.replace(base or Preprocess(), **given)
    except SimpruneError as exc:
        raise SimpruneError(f"--resize/--crop/--mean/--std: {exc}") from None


def device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu: where statistics, BatchNorm re-estimation "
                                                  "and fine-tuning run (default: CUDA when available, else CPU; "
                                                  "under torchrun cuda:LOCAL_RANK)")


def start_processes(args) -> None:
    """Resolve --device into a torch device string (one-line error when CUDA is asked for but absent) and
    join the torchrun process group on it (no-op without torchrun)."""
    if hasattr(args, "device"):
        args.device = str(distributed.resolve_device(args.device, "--device "))
    distributed.init_from_env(getattr(args, "device", None))


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
    if hasattr(ds, "num_classes") and args.get("num_classes", ds.num_classes) < ds.num_classes:
        raise SimpruneError(f"the model predicts {args.get('num_classes')} classes but the data set has "
                            f"{ds.num_classes}")


CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA: what a channel-last shape ends with


def input_shape(text: str | None, channels: int | None, recorded: tuple[int, ...] = (), where: str = "the model"
                ) -> tuple[int, int, int]:
    """--input CxHxW checked against the channels the model (or data) takes; ``recorded`` is the checkpoint's
    shape, used when --input is absent. A channel-last shape (32x32x3) is refused unless the model agrees."""
    if not text:
        if len(recorded) == 3:
            return tuple(recorded)
        text = f"{channels or 3}x32x32"
    try:
        shape = parse_input_shape(text)
    except SimpruneError as exc:
        raise SimpruneError(f"--input {text!r} is not CxHxW with positive sizes, e.g. 3x32x32") from exc
    c, h, w = shape
    flipped = f"{w}x{c}x{h}"
    if c != channels and w in CHANNEL_COUNTS and c not in CHANNEL_COUNTS and (channels is None or w == channels):
        raise SimpruneError(f"--input {text} looks like height x width x channels; simprune takes channels first: "
                            f"--input {flipped}" + ("" if channels else f" (or pass --in-channels {c} if the "
                                                                        f"model really reads {c} channels)"))
    if channels is not None and c != channels:
        hint = f"--input {'x'.join(map(str, recorded))} or drop --input" if len(recorded) == 3 else \
            f"--input {channels}x{h}x{w}"
        raise SimpruneError(f"--input {text} has {c} channel(s) but {where} takes {channels}-channel images; "
                            f"pass {hint}")
    return shape


def check_input(model: nn.Module, shape: tuple[int, ...], where: str) -> None:
    """One forward pass at ``shape``: a model that cannot read it fails here in one line, not deep in pruning."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    except (RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0][:150] if str(exc) else type(exc).__name__
        raise SimpruneError(f"{where} cannot read --input {'x'.join(map(str, shape))} ({first}); "
                            "pass the input shape it was built for") from exc


def weights_provenance(args, desc: dict | None = None) -> str:
    """Where the weights come from, in words for reports: a checkpoint, named pretrained weights, or random."""
    if getattr(args, "checkpoint", None):
        source = (desc or {}).get("weights") or ""
        return f"checkpoint {args.checkpoint}" + (f" ({source})" if source else "")
    if getattr(args, "weights", None):
        return f"{args.model} {args.weights}"
    return f"random (built from --model {args.model}, no --checkpoint)"


def warn_if_random(args, what: str = "accuracy figures") -> list[str]:
    """A model built from --model without --checkpoint or --weights has random weights: say so (call it once the
    work is done, so that an error stays the only line); returns the warning for the report."""
    if getattr(args, "checkpoint", None) or getattr(args, "weights", None):
        return []
    hint = "--weights NAME or --checkpoint DIR" if str(args.model).startswith("torchvision:") else "--checkpoint DIR"
    text = f"--model {args.model} without {hint} has random weights; {what} say nothing about a trained network"
    progress.warn(text)
    return [text]


def provenance(desc: dict, calibration, args) -> dict[str, str]:
    """Where the weights and the calibration images came from, in words for the report."""
    if calibration is None:
        calib = "none (the criterion reads the weights only)"
    else:
        calib = (f"{calibration_images(calibration)} images of {args.calib_data} (training split, seed "
                 f"{getattr(args, 'seed', 0)})")
    return {"weights": desc.get("weights") or weights_provenance(args, desc), "calibration": calib}


def builder_arguments(args, shape: tuple[int, ...]) -> dict[str, int]:
    """num_classes/in_channels for build_model: as given; in_channels from --input unless your builder
    (pkg.module:factory) has no such parameter (a ``def yolov8n():`` gets no argument it never asked for)."""
    kwargs = {"num_classes": args.num_classes, "in_channels": args.in_channels or shape[0]}
    if is_builder_spec(args.model) and args.in_channels is None and not builder_takes(args.model, "in_channels"):
        del kwargs["in_channels"]
    return {k: v for k, v in kwargs.items() if v is not None}


def load_or_build(args, shape_text: str | None):
    """Model from --checkpoint (its JSON names the architecture) or a fresh --model; plus the input shape,
    checked against the model (channels first, the channels it takes, one forward pass)."""

    if args.checkpoint:
        progress.stage(f"loading {args.checkpoint}")
        model, desc = load_model(args.checkpoint, builder=args.model)
        if args.model and args.model != desc.get("model"):
            raise SimpruneError(f"--model {args.model} but {args.checkpoint} holds a {desc.get('model')}; "
                                "drop --model or pass the matching checkpoint")
        recorded = tuple(desc.get("input_shape") or ())
        channels = (desc.get("model_args") or {}).get("in_channels") or (recorded[0] if len(recorded) == 3 else None)
        if not shape_text and len(recorded) != 3:
            raise SimpruneError("the checkpoint records no input shape; pass --input CxHxW")
        shape = input_shape(shape_text, channels, recorded, where=str(args.checkpoint))
        check_input(model, shape, str(args.checkpoint))
        return model, {**desc, "weights": weights_provenance(args, desc)}, shape
    if not args.model:
        raise SimpruneError("give --model NAME (and optionally --checkpoint DIR)")
    shape = input_shape(shape_text, args.in_channels, where=f"--in-channels {args.in_channels}")
    progress.stage(f"building {args.model}")
    model = build_model(args.model, **builder_arguments(args, shape), **weights_kwargs(args))
    check_input(model, shape, f"--model {args.model}")
    desc = {**model.simprune_source, "weights": weights_provenance(args)}  # as build_model recorded them
    return model.eval(), desc, shape


def load_saved(directory, model: str | None = None) -> tuple[nn.Module, dict]:
    """A saved model directory, its architecture built by ``model`` (--model) when given: the builder that made
    it (trusted for this command), or the one to rebuild a folder saved from your own instance."""
    if model:
        desc = read_json(resolve_model_path(directory)[1])
        recorded = desc.get("model")
        if recorded is None:
            return load_model(directory, build_model(model, **(desc.get("model_args") or {})))
        if recorded != model:
            raise SimpruneError(f"--model {model} but {directory} holds a {recorded}; drop --model or name {recorded}")
    return load_model(directory, builder=model)


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
                    progress=not args.quiet, device=getattr(args, "device", None))


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
