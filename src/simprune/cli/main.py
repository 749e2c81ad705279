"""The ``simprune`` command line. Each sub-command is a thin shell over the Python API."""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
from pathlib import Path

from simprune.errors import SimpruneError


def _command_line() -> str:
    return "simprune " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="registry name (see `simprune models`), torchvision:<name>, "
                                                      "timm:<name>, or your builder pkg.module:factory / file.py:factory")
    p.add_argument("--num-classes", type=int, default=None,
                   help="default: from the data set, else the architecture's own (registry models: 10)")
    p.add_argument("--in-channels", type=int, default=None, help="default: from the data set, else 3")
    p.add_argument("--weights", default=None, help="torchvision:/timm: models only: pretrained weights, e.g. "
                                                   "IMAGENET1K_V1 (the library's cache, else its download)")


def _data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="fashion-mnist, mnist, cifar10, cifar100 or imagefolder:PATH")
    p.add_argument("--data-dir", default=None, help="where the data set files are (else $SIMPRUNE_DATA, system, cache)")
    p.add_argument("--pad-to", type=int, default=None, help="zero-pad images to this size (32 for 28x28 sets)")


def _weights(args) -> dict:
    """``weights=`` for build_model when --weights was given (torchvision models only)."""
    return {"weights": args.weights} if getattr(args, "weights", None) else {}


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


# ---- commands -----------------------------------------------------------------------------

def cmd_models(args) -> int:
    from simprune.models import available_models  # noqa: PLC0415
    from simprune.models.torchvision_models import classification_model_names, segmentation_model_names  # noqa: PLC0415

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
    import torch  # noqa: PLC0415

    from simprune.graph.counting import count, parse_input_shape  # noqa: PLC0415
    from simprune.models import build_model  # noqa: PLC0415

    shape = parse_input_shape(args.input)
    if args.checkpoint:
        from simprune.io.files import load_model  # noqa: PLC0415

        model, _ = load_model(args.checkpoint, builder=args.model)
    else:
        if not args.model:
            raise SimpruneError("give --model NAME or --checkpoint DIR")
        model = build_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels or shape[0],
                            **_weights(args))
    try:
        cost = count(model, torch.zeros(1, *shape))
    except RuntimeError as exc:
        raise SimpruneError(f"model does not accept input {args.input}: {str(exc).splitlines()[0][:150]}") from exc
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
        print(f"MACs   {cost.macs / 1e6:10.2f} M\nparams {cost.params / 1e6:10.3f} M")
    return 0


def _dataset_defaults(args, ds) -> None:
    if args.num_classes is None:
        args.num_classes = getattr(ds, "num_classes", 10)
    if args.in_channels is None:
        args.in_channels = getattr(ds, "in_channels", 3)


def cmd_train(args) -> int:
    from simprune.io.data import load_dataset  # noqa: PLC0415
    from simprune.models import build_model  # noqa: PLC0415
    from simprune.io.files import lock_for_writing  # noqa: PLC0415
    from simprune.train.finetune import MARKER, mark_incomplete  # noqa: PLC0415
    from simprune.train.loop import STATE_FILE, TrainConfig, train  # noqa: PLC0415

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise SimpruneError(f"{out} already holds files; pass --resume to continue or --overwrite to start over")
    if args.resume and not (out / STATE_FILE).exists():
        raise SimpruneError(f"--resume: {out / STATE_FILE} does not exist; drop --resume to start a new run")
    train_ds = load_dataset(args.data, "train", args.data_dir, args.pad_to, augment=True)
    test_ds = load_dataset(args.data, "test", args.data_dir, args.pad_to, augment=False)
    _dataset_defaults(args, train_ds)
    if getattr(train_ds, "in_channels", args.in_channels) != args.in_channels:
        raise SimpruneError(f"--in-channels {args.in_channels} but {args.data} has {train_ds.in_channels}-channel "
                            "images; drop --in-channels")
    import torch  # noqa: PLC0415

    torch.manual_seed(args.seed)  # before building: --seed decides the initial weights too
    model = build_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels, **_weights(args))
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
    mark_incomplete(out, "train", _command_line())

    def log(line: str) -> None:
        print(line)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"# {_command_line()}")
    desc = {"model": args.model, "model_args": {"num_classes": args.num_classes, "in_channels": args.in_channels},
            "input_shape": list(train_ds.image_shape) if hasattr(train_ds, "image_shape") else None,
            "data": {"name": args.data, "pad_to": args.pad_to}, "command": _command_line()}
    try:
        history = train(model, train_ds, cfg, out, test_ds, desc, resume=args.resume, log=log, progress=not args.quiet)
        (out / MARKER).unlink(missing_ok=True)
    finally:
        log_file.close()
    last = history[-1] if history else {}
    print(f"done: top-1 {last.get('test_top1', float('nan')):.2f} % after {len(history)} epochs -> {out}")
    return 0


def cmd_evaluate(args) -> int:
    from simprune.io.data import load_dataset  # noqa: PLC0415
    from simprune.io.files import atomic_write_json, load_model  # noqa: PLC0415
    from simprune.train.loop import evaluate  # noqa: PLC0415

    model, desc = load_model(args.checkpoint)
    pad_to = args.pad_to if args.pad_to is not None else (desc.get("data") or {}).get("pad_to")
    ds = load_dataset(args.data, args.split, args.data_dir, pad_to)
    _check_compatible(model, desc, ds)
    metrics = evaluate(model, ds, batch_size=args.batch_size, progress=not args.quiet, bf16=not args.fp32)
    result = {"checkpoint": str(args.checkpoint), "data": args.data, "split": args.split, **metrics}
    print(f"top-1 {metrics['top1']:.2f} %  top-5 {metrics['top5']:.2f} %  ({metrics['n']} images, {args.data} {args.split})")
    if args.json:
        atomic_write_json(Path(args.json), result)
    return 0


def _check_compatible(model, desc, ds) -> None:
    args = desc.get("model_args", {})
    if hasattr(ds, "in_channels") and args.get("in_channels", 3) != ds.in_channels:
        raise SimpruneError(f"the model takes {args.get('in_channels', 3)}-channel images but the data set has "
                            f"{ds.in_channels}; use matching data or a model trained for it")
    if hasattr(ds, "num_classes") and args.get("num_classes", ds.num_classes) < ds.num_classes:
        raise SimpruneError(f"the model predicts {args.get('num_classes')} classes but the data set has "
                            f"{ds.num_classes}")


def _load_or_build(args, shape_text: str | None):
    """Model from --checkpoint (its JSON names the architecture) or a fresh --model; plus the input shape."""
    from simprune.graph.counting import parse_input_shape  # noqa: PLC0415
    from simprune.io.files import load_model  # noqa: PLC0415
    from simprune.models import build_model  # noqa: PLC0415

    if args.checkpoint:
        model, desc = load_model(args.checkpoint, builder=args.model)
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
    model = build_model(args.model, num_classes=args.num_classes, in_channels=in_ch, **_weights(args))
    desc = dict(model.simprune_source)  # name and arguments, as build_model recorded them
    return model.eval(), desc, shape


# ---- parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simprune", description="Similarity-based structural filter pruning.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the model registry")
    p.add_argument("--torchvision", action="store_true", help="also list every torchvision classification model")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("info", help="MACs and parameters of a model")
    _model_options(p, required=False)
    p.add_argument("--checkpoint", help="a saved model directory instead of --model")
    p.add_argument("--input", default="3x32x32", help="input shape CxHxW (default 3x32x32)")
    p.add_argument("--per-layer", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("train", help="train a model from scratch")
    _model_options(p)
    _data_options(p)
    p.add_argument("--epochs", type=_positive, default=30)
    p.add_argument("--batch-size", type=_positive, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="disable bf16 autocast and channels_last")
    p.add_argument("--limit-batches", type=_positive, default=None, help="batches per epoch (smoke tests)")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.safetensors")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="top-1/top-5 accuracy of a saved model")
    p.add_argument("--checkpoint", required=True, help="model directory or its model.safetensors")
    _data_options(p)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--batch-size", type=_positive, default=512)
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_evaluate)

    from simprune.verify.analysis import add_analyze_parser  # noqa: PLC0415
    from simprune.verify.compare import add_compare_parser  # noqa: PLC0415
    from simprune.cli.demo import add_demo_parser  # noqa: PLC0415
    from simprune.cli.deploy import add_bench_parser, add_export_parser  # noqa: PLC0415
    from simprune.train.finetune import add_finetune_parser  # noqa: PLC0415
    from simprune.cli.prune import add_prune_parser  # noqa: PLC0415

    add_prune_parser(sub)
    add_analyze_parser(sub)
    add_export_parser(sub)
    add_bench_parser(sub)
    add_compare_parser(sub)
    add_demo_parser(sub)
    add_finetune_parser(sub)

    p = sub.add_parser("criteria", help="list the pruning criteria")
    p.set_defaults(fn=cmd_criteria)
    return parser


def cmd_criteria(args) -> int:
    from simprune.criteria import available_criteria  # noqa: PLC0415

    for name, desc in available_criteria().items():
        print(f"{name:18s} {desc}")
    return 0


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # the same clean stop as Ctrl-C: temporaries removed, checkpoint named


def _import_torch(hold_signals: bool) -> None:
    """Import torch (and numpy) with SIGINT/SIGTERM held back: a C extension interrupted halfway through
    its initialisation cannot be imported again (later imports crash). A signal that arrived meanwhile
    takes effect right after."""
    pending = []
    held = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
            for s in (signal.SIGINT, signal.SIGTERM)} if hold_signals else {}
    try:
        import torch  # noqa: F401, PLC0415
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
    if pending:
        raise KeyboardInterrupt


def _where(argv: list[str]) -> str:
    """After Ctrl-C/SIGTERM, whenever it came: what --out holds and how to go on (the last checkpoint)."""
    outs = [a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            for i, a in enumerate(argv) if a == "--out" or a.startswith("--out=")]
    if not outs or not outs[-1]:
        return "nothing was written"
    from simprune.io.checkpoints import last_checkpoint  # noqa: PLC0415 - never imports torch

    return last_checkpoint(Path(outs[-1]))


def _stderr(text: str) -> None:
    print(text.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    args = None
    try:
        _import_torch(hold_signals=in_main)
        args = build_parser().parse_args(argv)
        from simprune.distributed import init_from_env  # noqa: PLC0415

        init_from_env()  # no-op unless launched by torchrun
        return args.fn(args)
    except SimpruneError as exc:
        if args is not None and args.debug:
            raise
        _stderr(f"error: {exc}")
        return 2
    except KeyboardInterrupt as exc:
        _stderr(f"interrupted; {str(exc) or _where(argv if argv is not None else sys.argv[1:])}")
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
