"""`simprune prune`: load or build a model, prune it to a target (any schedule, optional fine-tuning),
measure and write the pruned model with its report. A thin shell over :func:`simprune.prune`."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from simprune import api, distributed, progress
from simprune.allocation.allocator import Guards
from simprune.allocation.selection import Selection
from simprune.calibrate.calibration import calibration_loader
from simprune.cli.common import (
    add_training_options,
    check_compatible,
    command_line,
    data_options,
    device_option,
    image_preprocess,
    keep_log,
    load_or_build,
    make_finetune,
    model_options,
    positive,
    preprocess_options,
    provenance,
    run_log,
    train_config,
    warn_if_random,
)
from simprune.cli.deploy import (
    add_prune_latency_options,
    calibration_record,
    check_latency_options,
    int8_step,
    latency_step,
    prune_latency_target,
)
from simprune.cli.vocabulary import cli_wording
from simprune.criteria import ScoreCache, default_criterion, get_criterion, set_calib_precision
from simprune.errors import SimpruneError
from simprune.graph.removal import get_structure
from simprune.io.data import load_dataset
from simprune.io.files import atomic_write_json, load_model, read_json, save_model
from simprune.io.images import Preprocess, is_image_source, labelled_images
from simprune.repair.recovery import Recovery
from simprune.repair.stage import Repair
from simprune.schedules.choice import Choose
from simprune.schedules.kinds import Iterative, OneShot, Soft
from simprune.train.finetune import (
    MARKER,
    check_output,
    finish,
    mark_incomplete,
    run_finetune,
)
from simprune.train.loop import evaluate
from simprune.verify.reports import prune_report_writer, recovery_summary, refresh_prune_report


def _target(args) -> dict[str, float]:
    given = {k: v for k, v in (("flops", args.target_flops), ("params", args.target_params),
                               ("latency", getattr(args, "target_latency", None))) if v is not None}
    if len(given) != 1:
        raise SimpruneError("give exactly one of --target-flops R, --target-params R or --target-latency R "
                            "(fraction removed, 0 < R < 1)")
    kind, ratio = next(iter(given.items()))
    if not 0 < ratio < 1:
        raise SimpruneError(f"--target-{kind} {ratio} is outside (0, 1); give the fraction to remove, e.g. 0.5")
    return given


def _calibration(args, criterion, desc: dict, preprocess: Preprocess | None):
    """The calibration loader the flags ask for (None without --calib-data) and its padding."""
    if getattr(criterion, "needs_data", False) and not args.calib_data:
        raise SimpruneError(f"criterion {args.criterion!r} needs calibration images; pass --calib-data NAME or DIR")
    calib_pad = args.pad_to if args.pad_to is not None else (desc.get("data") or {}).get("pad_to")
    if not args.calib_data:
        return None, calib_pad
    return calibration_loader(args.calib_data, args.calib_images, data_dir=args.data_dir, pad_to=calib_pad,
                              seed=args.seed, preprocess=preprocess), calib_pad


def _own_images(args) -> tuple[Preprocess | None, str | None]:
    """The preprocessing of one's own images (--calib-data DIR, --data DIR or PATH.csv:SPLIT) and the input
    shape it implies when --input is absent (a fresh --model only: a checkpoint records its own)."""
    if not (is_image_source(args.calib_data) or is_image_source(args.data)):
        return None, args.input
    pre = image_preprocess(args)
    if args.input or args.checkpoint:
        return pre, args.input
    return pre, f"3x{pre.crop}x{pre.crop}"


def _check_crop(pre: Preprocess | None, shape) -> None:
    if pre is not None and tuple(shape[1:]) != (pre.crop, pre.crop):
        raise SimpruneError(f"your images are centre-cropped to {pre.crop}x{pre.crop} but the model input is "
                            f"{'x'.join(map(str, shape))}; pass --crop {shape[-1]} or --input 3x{pre.crop}x{pre.crop}")


def _print_outcome(report: dict, out: Path) -> None:
    red = report["reduction"]
    print(f"MACs {report['macs']['before'] / 1e6:.2f} M -> {report['macs']['after'] / 1e6:.2f} M "
          f"({red['flops']:.1%} removed), params {report['params']['before'] / 1e6:.3f} M -> "
          f"{report['params']['after'] / 1e6:.3f} M ({red['params']:.1%} removed)")
    if report["accuracy"]:
        how = (f"after {report['finetune']['epochs']} fine-tuning epochs" if report.get("finetune")
               else recovery_summary(report.get("recovered")) or "no fine-tuning")
        print(f"top-1 {report['accuracy']['before']:.2f} % -> {report['accuracy']['after']:.2f} % ({how})")
    print(f"wrote {out}/model.safetensors, model.json, report.json, report.md, report.html")


def _criterion_name(args) -> str:
    """--criterion as given, else the library's default for the data given; l1 for the soft schedule,
    which re-scores every epoch and has no refit."""
    if args.criterion:
        return args.criterion
    return "l1" if args.schedule == "soft" else default_criterion(bool(args.calib_data))


def _criterion(args):
    """The criterion object for --criterion (a ScoreCache keeps its scores for the report's heat maps), or
    the choice for --criterion auto, which takes no criterion options."""
    if args.criterion == "auto":
        for flag, value in (("--similarity", args.similarity), ("--calib-precision", args.calib_precision)):
            if value:
                raise SimpruneError(f"{flag} applies to a named criterion; drop it or pass --criterion NAME "
                                    "instead of auto")
        return Choose()
    options = {"similarity": args.similarity} if args.similarity else {}
    criterion = ScoreCache(get_criterion(args.criterion, **options))
    if args.calib_precision:
        set_calib_precision(criterion, args.calib_precision, "--calib-precision")
    return criterion


def cmd_prune(args) -> int:
    args.criterion = _criterion_name(args)
    target = _target(args)

    check_latency_options(args)  # before any work: onnxruntime is there when latency was asked for
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise SimpruneError(f"output directory {out} already exists and is not empty; pass --overwrite or pick another")
    criterion = _criterion(args)
    preprocess, shape_text = _own_images(args)
    model, desc, shape = load_or_build(args, shape_text)
    _check_crop(preprocess, shape)
    example = torch.zeros(1, *shape)
    calibration, calib_pad = _calibration(args, criterion, desc, preprocess)
    selection = Selection(guards=Guards(min_channels=args.min_channels, max_layer_ratio=args.max_layer_ratio,
                                        round_to=args.round_to),
                          ignore=args.ignore or (), normalization=args.normalization, cost_weight=args.cost_weight)
    repair = Repair(fold=args.compensate, protect_uncompensable=args.protect_uncompensable,
                    refit=args.reconstruct, recalibrate_bn=args.recalibrate_bn, recover=_recovery(args))
    eval_ds = _eval_dataset(args, desc, preprocess)
    acc_before = _accuracy(model, eval_ds, "top-1 before pruning", args.device)
    new_desc = {**{k: v for k, v in desc.items() if k in ("model", "model_args", "data")},
                "input_shape": list(shape), "command": command_line(),
                "pruning": {"criterion": args.criterion, "target": target, "schedule": args.schedule,
                            "source": str(args.checkpoint or "")}}
    if args.calib_data:  # so that `simprune export --int8` calibrates on the same images
        new_desc["calibration"] = calibration_record(args.calib_data, args.calib_images, args.seed, calib_pad,
                                                     args.data_dir, preprocess)
    stages = {"calibration": calibration, "selection": selection, "repair": repair}
    if "latency" in target:
        pruned, report = prune_latency_target(args, model, example, criterion, target["latency"], **stages)
        worked_in_out = False
    else:
        pruned, report, worked_in_out = prune_with_schedule(
            args, model, example, criterion, target, stages=stages, desc=desc, new_desc=new_desc,
            command=command_line(), eval_ds=eval_ds)
    report["model"] = desc.get("model")
    new_desc["pruning"]["criterion"] = report["criterion"]  # the one chosen when --criterion auto
    report["accuracy"] = None if eval_ds is None else {"before": acc_before,
                                                       "after": _accuracy(pruned, eval_ds, "top-1 after pruning", args.device)}
    report["provenance"] = provenance(desc, calibration, args)
    report["warnings"] = [cli_wording(w) for w in report.get("warnings") or []] + warn_if_random(args)
    report["command"] = command_line()
    if distributed.is_main():
        api.save(out, pruned, new_desc, report, overwrite=args.overwrite or worked_in_out,
                 extra=prune_report_writer(report, new_desc, criterion, also=keep_log(out) if worked_in_out else None))
        finish(out)
    if not distributed.is_main():
        return 0
    _print_outcome(report, out)
    int8_step(args, out)
    latency_step(args, out)
    refresh_prune_report(out)  # again, now with the latency keys
    return 0


def _eval_dataset(args, desc, preprocess: Preprocess | None = None):
    if not getattr(args, "data", None):
        return None
    if is_image_source(args.data):
        ds = labelled_images(args.data, preprocess or Preprocess())
    else:
        pad_to = args.pad_to if args.pad_to is not None else (desc.get("data") or {}).get("pad_to")
        ds = load_dataset(args.data, "test", args.data_dir, pad_to)
    check_compatible(None, desc, ds)
    if args.eval_images:
        ds = Subset(ds, range(min(args.eval_images, len(ds))))
    return ds


def _recovery(args) -> Recovery | None:
    """--recover: the label-free recovery after the refit (off by default), needing --calib-data."""
    if not args.recover:
        return None
    if not args.calib_data:
        raise SimpruneError("--recover trains on the calibration images; pass --calib-data DIR or NAME")
    if args.schedule == "soft":
        raise SimpruneError("--recover repairs a one-shot or iterative prune; --schedule soft trains instead")
    return Recovery(time_budget_s=args.recover_minutes * 60) if args.recover_minutes else Recovery()


def _accuracy(model, ds, desc: str = "top-1", device=None) -> float | None:
    if ds is None:
        return None

    return evaluate(model, ds, progress=True, desc=desc, device=device)["top1"]


def _step_accuracy(eval_ds, steps: int, then=None):
    """`between` for --schedule iterative: optional fine-tuning (``then``), then the step's top-1 as a line."""
    def between(model: nn.Module, k: int) -> None:
        if then is not None:
            then(model, k)
        if eval_ds is not None:
            progress.note(f"step {k}/{steps}: top-1 {_accuracy(model, eval_ds, f'top-1 after step {k}'):.2f} %")
    return between


COMPENSATE_MODES = ("lstsq", "twin")


def compensation_mode(text: str) -> str:
    """--compensate MODE: one of :data:`COMPENSATE_MODES` (a bare --compensate means the criterion's default)."""
    if text not in COMPENSATE_MODES:
        raise argparse.ArgumentTypeError(f"choose {' or '.join(COMPENSATE_MODES)}, got {text!r}")
    return text


def add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model to a FLOPs or parameter target")
    device_option(p)
    model_options(p, required=False)
    p.add_argument("--checkpoint", help="trained model directory (its JSON names the architecture)")
    p.add_argument("--criterion", default=None,
                   help="see `simprune criteria` (default: auto with --calib-data: refit-error and tp:l2 each "
                        "prune a trial copy and held-aside calibration images choose; l1 without data or with "
                        "--schedule soft)")
    p.add_argument("--similarity", default=None, help="similarity metric for qsfm / filter-similarity")
    p.add_argument("--target-flops", type=float, default=None, help="fraction of MACs to remove, e.g. 0.5")
    p.add_argument("--target-params", type=float, default=None, help="fraction of parameters to remove")

    add_prune_latency_options(p)
    p.add_argument("--input", default=None, help="input shape CxHxW (default: the checkpoint's, else 3x32x32)")
    p.add_argument("--min-channels", type=positive, default=4, help="never keep fewer channels in a group")
    p.add_argument("--max-layer-ratio", type=float, default=0.9, help="never remove more than this share of a group")
    p.add_argument("--round-to", type=positive, default=None,
                   help="keep channel counts multiples of this (default: the CPU's vector block, 16 with AVX-512, "
                        "relaxed where the target needs it; 1: as ranked)")
    p.add_argument("--ignore", action="append", metavar="LAYER_PATTERN", help="glob of layers never pruned")
    p.add_argument("--normalization", choices=["none", "mean", "max", "rank"], default=None,
                   help="how scores are made comparable across layers (default: the criterion's)")
    p.add_argument("--cost-weight", type=float, default=0.0,
                   help="rank by importance / cost^W (0: importance alone; 1: most MACs saved per importance lost)")
    p.add_argument("--compensate", nargs="?", const=True, default=None, type=compensation_mode, metavar="MODE",
                   help="fold removed channels into the next layer: lstsq (default) or twin; "
                        "on by default for qsfm and feature-stats")
    p.add_argument("--no-compensate", dest="compensate", action="store_false")
    p.add_argument("--protect-uncompensable", action=argparse.BooleanOptionalAction, default=None,
                   help="leave groups read by parameter-free layers (option-A shortcut) whole "
                        "(default: on when compensating)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="after removal, refit the conv and linear layers (all k x k taps, least squares on the "
                        "calibration images) so each reproduces the unpruned model's output, in network order; "
                        "any criterion (default: on with --calib-data unless --compensate asks for the criterion's "
                        "channel fold; with the refit the fold defaults to off)")
    p.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="re-estimate BatchNorm statistics on the calibration images after pruning "
                        "(default with --calib-data: on; after the refit, kept only if the outputs come closer "
                        "to the unpruned model's)")
    p.add_argument("--recover", action=argparse.BooleanOptionalAction, default=False,
                   help="after the refit and BatchNorm re-estimation, train the pruned model to reproduce the "
                        "unpruned one on augmented views of the calibration images (labels never read; 20 %% held "
                        "aside for early stopping); off by default")
    p.add_argument("--recover-minutes", type=float, default=None,
                   help="with --recover: its time budget (default: the Recovery default, 20 minutes)")
    p.add_argument("--calib-data", default=None,
                   help="calibration images: a data set name (fashion-mnist, ...), a folder of your own .jpg/.png/"
                        ".webp images (flat or nested, no labels), or a manifest PATH.csv:SPLIT")
    p.add_argument("--calib-images", type=positive, default=640)
    p.add_argument("--calib-precision", choices=["fp32", "bf16"], default=None,
                   help="forward pass of a data criterion's calibration (default: the criterion's, bf16)")
    data_options(p, required=False)
    preprocess_options(p)
    p.add_argument("--eval-images", type=positive, default=None, help="evaluate on the first N test images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", choices=["oneshot", "iterative", "soft"], default="oneshot",
                   help="oneshot (default); iterative: --steps K re-scored steps; soft: zero, train, re-select "
                        "each epoch for --finetune-epochs, then remove")
    p.add_argument("--steps", type=positive, default=1, help="steps of --schedule iterative")
    p.add_argument("--epochs-between", type=int, default=0, help="fine-tuning epochs between iterative steps")
    p.add_argument("--soft-hold", type=int, default=0,
                   help="soft: last N epochs train with the final selection frozen and zeroed (beyond the papers)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune N epochs on --data after pruning")

    add_training_options(p)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_prune)


def _check_schedule_flags(args, epochs: int) -> None:
    """Refuse flag combinations that belong to another schedule, before any work."""
    if args.schedule == "soft" and epochs < 1:
        raise SimpruneError("--schedule soft trains while it prunes; give --finetune-epochs N (N >= 1) and --data")
    if args.schedule != "iterative" and (args.steps != 1 or args.epochs_between):
        raise SimpruneError("--steps and --epochs-between belong to --schedule iterative")
    if args.resume and not epochs and not args.epochs_between:
        raise SimpruneError("--resume continues fine-tuning, and this run has none; drop --resume")
    if args.schedule == "soft" and args.reconstruct:
        raise SimpruneError("--reconstruct repairs a one-shot or iterative prune; --schedule soft trains instead, "
                            "drop --reconstruct")


def _between_steps(args, ft, eval_ds):
    """What runs after each iterative step: --epochs-between fine-tuning, then the step's accuracy."""
    between = None
    if args.epochs_between:
        def between(m: nn.Module, k: int) -> None:
            ft.log(f"fine-tuning {args.epochs_between} epoch(s) after step {k}")
            ft.run(m, epochs=args.epochs_between, checkpoint=False)
    return _step_accuracy(eval_ds, args.steps, between) if args.schedule == "iterative" else between


def _schedule(args, between):
    """The schedule object --schedule asks for (soft is built where its fine-tuning is)."""
    if args.schedule == "iterative":
        return Iterative(args.steps, between, device=args.device)
    return OneShot(device=args.device)


def prune_with_schedule(args, model: nn.Module, example: torch.Tensor, criterion: Any, target: dict, *,
                        stages: dict, desc: dict, new_desc: dict, command: str,
                        eval_ds=None) -> tuple[nn.Module, dict, bool]:
    """`simprune prune` past one-shot: iterative/soft schedules, fine-tuning, resume. ``stages``: the
    calibration, selection and repair keywords of :func:`simprune.prune`.

    Returns (model, report, whether OUT was used as the working directory)."""
    out = Path(args.out)
    epochs = args.finetune_epochs or 0
    _check_schedule_flags(args, epochs)
    if not epochs and not args.epochs_between:  # nothing trains: plain pruning, saved atomically by the caller
        between = _step_accuracy(eval_ds, args.steps) if args.schedule == "iterative" else None
        pruned, report = api.prune(model, example, criterion, target, inplace=True,
                                   schedule=_schedule(args, between), **stages)
        return pruned, report, False
    marker = check_output(out, args.resume, args.overwrite)
    log = run_log(out)
    teacher = copy.deepcopy(model).eval() if args.distill and not args.teacher else None
    ft = make_finetune(args, desc, out, max(epochs, args.epochs_between or 0, 1), log, teacher)
    if marker is None:
        mark_incomplete(out, args.schedule if args.schedule == "soft" else "prune", command)
    log(f"# {command}")
    if args.schedule == "soft":
        if marker is not None and marker.get("phase") != "soft":
            raise SimpruneError(f"--resume: {out} is an unfinished {marker.get('phase')} run, not --schedule soft")
        ft.description = {**new_desc}
        pruned, report = api.prune(model, example, criterion, target, inplace=True,
                                   schedule=Soft(ft, args.soft_hold), **stages)
        return pruned, report, True
    if marker is not None and marker.get("phase") == "finetune":  # pruning done: continue fine-tuning
        model, _ = load_model(out, allow_incomplete=True)
        report = read_json(out / "report.json")
    else:
        if marker is not None:
            raise SimpruneError(f"--resume: {out} was interrupted while pruning, before any checkpoint; "
                                "start again with --overwrite")
        ft.resume = False  # the between-steps epochs start fresh; only the final fine-tune checkpoints
        between = _between_steps(args, ft, eval_ds)
        model, report = api.prune(model, example, criterion, target, inplace=True,
                                  schedule=_schedule(args, between), **stages)
        if not epochs:
            return model, report, True
        if distributed.is_main():
            save_model(out, model, {**new_desc, "structure": get_structure(model)})
            atomic_write_json(out / "report.json", report)
            atomic_write_json(out / MARKER, {"phase": "finetune", "command": command,
                                             "resume": "rerun the same command with --resume"})
        distributed.barrier()
    ft.cfg = train_config(args, epochs)
    ft.description = {**new_desc, "structure": get_structure(model)}
    ft.resume = marker is not None
    run_finetune(model, ft, report)
    return model, report, True
