"""Fine-tuning after pruning, the soft schedule, and the ``simprune finetune`` command.

A fine-tuning run works inside its output directory, marked unfinished by ``INCOMPLETE.json``
until the final model is written; each epoch leaves an atomic ``train_state.safetensors`` so
``--resume`` continues exactly where a killed run stopped. Optional knowledge distillation
uses the unpruned model (``--distill``). Under ``torchrun`` only rank 0 writes.
"""
from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from simprune import distributed
from simprune.errors import SimpruneError
from simprune.io.files import atomic_write_json, load_model, read_json
from simprune.train.loop import STATE_FILE, TrainConfig, TrainHooks, evaluate, train

MARKER = "INCOMPLETE.json"


@dataclass
class FineTune:
    """What fine-tuning needs besides the model: data, schedule, teacher, where to checkpoint."""

    train_ds: Dataset
    cfg: TrainConfig
    test_ds: Dataset | None = None
    teacher: nn.Module | None = None
    out_dir: Path | None = None
    description: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    log: Callable[[str], None] = print
    progress: bool = True

    def run(self, model: nn.Module, hooks: TrainHooks | None = None, epochs: int | None = None,
            checkpoint: bool = True) -> list[dict]:
        """Train ``model`` in place (``epochs`` overrides the config; no checkpoints without ``checkpoint``)."""
        cfg = self.cfg if epochs is None else TrainConfig(**{**self.cfg.__dict__, "epochs": epochs})
        return train(model, self.train_ds, cfg, self.out_dir if checkpoint else None, self.test_ds,
                     self.description, resume=self.resume and checkpoint, teacher=self.teacher, log=self.log,
                     progress=self.progress, hooks=hooks)


def mark_incomplete(out: Path, phase: str, command: str) -> None:
    """Create ``out`` (empty, or cleared with overwrite by the caller) with its unfinished-run marker."""
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MARKER, {"phase": phase, "command": command,
                                         "resume": "rerun the same command with --resume"})
    distributed.barrier()


def check_output(out: Path, resume: bool, overwrite: bool) -> dict | None:
    """Refuse a used directory unless resuming (returns its marker) or overwriting (clears it)."""
    marker = out / MARKER
    if resume:
        if not marker.exists() or not (out / STATE_FILE).exists():
            raise SimpruneError(f"--resume: {out} holds no unfinished run ({MARKER} and {STATE_FILE}); "
                                "drop --resume to start a new one")
        return read_json(marker)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            hint = " (an unfinished run: add --resume to continue it)" if marker.exists() else ""
            raise SimpruneError(f"output directory {out} already exists and is not empty{hint}; "
                                "pass --overwrite or pick another")
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(out)
        distributed.barrier()
    return None


def finish(out: Path) -> None:
    """Called after the final model is written: the run is complete, drop the marker and the state."""
    if distributed.is_main():
        (out / MARKER).unlink(missing_ok=True)
        (out / STATE_FILE).unlink(missing_ok=True)


def load_teacher(desc: dict, teacher_dir: str | None) -> nn.Module:
    """The unpruned model for distillation: --teacher, else the checkpoint the model was pruned from."""
    source = teacher_dir or (desc.get("pruning") or {}).get("source") or (desc.get("finetune") or {}).get("teacher")
    if not source:
        raise SimpruneError("--distill needs the unpruned model and this model records none; pass --teacher DIR")
    teacher, _ = load_model(source)
    return teacher.eval()


def soft_prune(model: nn.Module, example: torch.Tensor, criterion: Any, target: dict[str, float],
               finetune: FineTune, *, hold: int = 0, calibration=None, guards=None, ignore=(),
               normalization: str | None = None, cost_weight: float = 0.0) -> tuple[nn.Module, dict]:
    """Soft pruning (see :mod:`simprune.schedules`) for ``finetune.cfg.epochs`` epochs, then removal for good.

    Returns (pruned model, report); the report's accuracy after removal equals the zeroed model's."""
    from simprune.api import _widths, resolve_criterion  # noqa: PLC0415
    from simprune.graph.counting import count  # noqa: PLC0415
    from simprune.graph.groups import PruningGraph  # noqa: PLC0415
    from simprune.schedules.soft import SoftPruning, finish_soft, soft_selector  # noqa: PLC0415

    crit = resolve_criterion(criterion, None, calibration)
    kind, ratio = next(iter(target.items()))
    before = count(model, example)
    graph = PruningGraph(model, example, ignore=ignore)
    select = soft_selector(graph, crit, example, calibration=calibration, guards=guards,
                           normalization=normalization, cost_weight=cost_weight)
    hooks = SoftPruning(graph, select, kind, ratio, finetune.cfg.epochs, hold, log=finetune.log)
    widths = {g.root: g.size for g in graph.groups}
    layers_before = _widths(model)
    history = finetune.run(model, hooks)
    removed = finish_soft(hooks)
    model.eval()
    after = count(model, example)
    layers_after = _widths(model)
    report = {
        "criterion": crit.name, "target": dict(target), "schedule": {"name": "soft", "epochs": finetune.cfg.epochs,
                                                                     "hold": hold, "shares": hooks.shares},
        "macs": {"before": before.macs, "after": after.macs}, "params": {"before": before.params, "after": after.params},
        "reduction": {"flops": 1 - after.macs / before.macs, "params": 1 - after.params / before.params},
        "groups": [{"root": g.root, "channels_before": widths[g.root], "channels_after": g.size} for g in graph.groups],
        "layers": [{"name": n, "channels_before": c, "channels_after": layers_after.get(n, 0)}
                   for n, c in layers_before.items()],
        "protected_groups": hooks.protected, "compensated": False, "bn_recalibrated": False, "accuracy": None,
        "decision_fingerprint": distributed.fingerprint(removed),
        "finetune": {"epochs": finetune.cfg.epochs, "history": history, "soft": True},
    }
    return model, report


def run_finetune(model: nn.Module, finetune: FineTune, report: dict) -> dict:
    """Fine-tune a pruned model and record the result in ``report["finetune"]``."""
    top1_before = evaluate(model, finetune.test_ds)["top1"] if finetune.test_ds is not None else None
    history = finetune.run(model)
    model.eval()
    weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    report["finetune"] = {"epochs": finetune.cfg.epochs, "lr": finetune.cfg.lr, "history": history,
                          "distill": finetune.teacher is not None, "top1_before_finetune": top1_before,
                          "top1_after": history[-1].get("test_top1") if history else None,
                          "ranks": distributed.world_size(),
                          "weights_fingerprint": distributed.check_agree(weights, "fine-tuned weights"),
                          "weights_fingerprint_per_rank": distributed.gather_fingerprints(weights)}
    return report


def prune_with_schedule(args, model: nn.Module, example: torch.Tensor, criterion: Any, target: dict, *,
                        calibration, guards, desc: dict, new_desc: dict, command: str,
                        prune_options: dict) -> tuple[nn.Module, dict, bool]:
    """`simprune prune` past one-shot: iterative/soft schedules, fine-tuning, resume.

    Returns (model, report, whether OUT was used as the working directory)."""
    from simprune import api  # noqa: PLC0415
    from simprune.io.files import save_model  # noqa: PLC0415
    from simprune.graph.removal import get_structure  # noqa: PLC0415

    out = Path(args.out)
    epochs = args.finetune_epochs or 0
    if args.schedule == "soft" and epochs < 1:
        raise SimpruneError("--schedule soft trains while it prunes; give --finetune-epochs N (N >= 1) and --data")
    if args.schedule != "iterative" and (args.steps != 1 or args.epochs_between):
        raise SimpruneError("--steps and --epochs-between belong to --schedule iterative")
    if not epochs and not args.epochs_between:  # nothing trains: plain pruning, saved atomically by the caller
        if args.resume:
            raise SimpruneError("--resume continues fine-tuning, and this run has none; drop --resume")
        pruned, report = api.prune(model, example, criterion, target, calibration=calibration, guards=guards,
                                   inplace=True, schedule=args.schedule, steps=args.steps, **prune_options)
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
        soft_opts = {k: prune_options[k] for k in ("ignore", "normalization", "cost_weight") if k in prune_options}
        pruned, report = soft_prune(model, example, criterion, target, ft, hold=args.soft_hold,
                                    calibration=calibration, guards=guards, **soft_opts)
        return pruned, report, True
    if marker is not None and marker.get("phase") == "finetune":  # pruning done: continue fine-tuning
        model, _ = load_model(out, allow_incomplete=True)
        report = read_json(out / "report.json")
    else:
        if marker is not None:
            raise SimpruneError(f"--resume: {out} was interrupted while pruning, before any checkpoint; "
                                "start again with --overwrite")
        ft.resume = False  # the between-steps epochs start fresh; only the final fine-tune checkpoints
        between = None
        if args.epochs_between:
            def between(m: nn.Module, k: int) -> None:
                ft.log(f"fine-tuning {args.epochs_between} epoch(s) after step {k}")
                ft.run(m, epochs=args.epochs_between, checkpoint=False)
        model, report = api.prune(model, example, criterion, target, calibration=calibration, guards=guards,
                                  inplace=True, schedule=args.schedule, steps=args.steps, between=between,
                                  **prune_options)
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


# ---- `simprune finetune DIR` ------------------------------------------------------------------

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
    from simprune.io.data import load_dataset  # noqa: PLC0415

    if not getattr(args, "data", None):
        raise SimpruneError("fine-tuning needs training data; pass --data NAME")
    pad_to = args.pad_to if args.pad_to is not None else (desc.get("data") or {}).get("pad_to")
    train_ds = load_dataset(args.data, "train", args.data_dir, pad_to, augment=True)
    test_ds = load_dataset(args.data, "test", args.data_dir, pad_to)
    if getattr(args, "eval_images", None):
        from torch.utils.data import Subset  # noqa: PLC0415

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


def cmd_finetune(args) -> int:
    from simprune import api  # noqa: PLC0415
    from simprune.cli.main import _command_line  # noqa: PLC0415

    src = Path(args.dir)
    out = Path(args.out) if args.out else src.with_name(src.name + "-ft")
    if out.resolve() == src.resolve():
        raise SimpruneError("--out must differ from the model directory; the source stays untouched")
    check_output(out, args.resume, args.overwrite)
    model, desc = load_model(src)
    log = run_log(out)
    ft = make_finetune(args, desc, out, args.epochs, log)
    if not args.resume:
        mark_incomplete(out, "finetune", _command_line())
    log(f"# {_command_line()}")
    ft.description = {k: v for k, v in desc.items() if k not in ("history", "train_config", "versions", "format")}
    old_report = src / "report.json"
    report = read_json(old_report) if old_report.exists() else {}
    run_finetune(model, ft, report)
    report["finetune"]["source"] = str(src)
    report["command"] = _command_line()
    if report.get("accuracy"):
        report["accuracy"]["after_finetune"] = report["finetune"]["top1_after"]
    new_desc = {**ft.description, "command": _command_line(),
                "finetune": {"source": str(src), "epochs": args.epochs,
                             "teacher": (desc.get("pruning") or {}).get("source")}}
    if distributed.is_main():
        api.save(out, model, new_desc, report, overwrite=True, extra=_keep_log(out))
    finish(out)
    if distributed.is_main():
        ftr = report["finetune"]
        print(f"top-1 {ftr['top1_before_finetune']:.2f} % -> {ftr['top1_after']:.2f} % after {args.epochs} "
              f"epochs -> {out}" if ftr["top1_before_finetune"] is not None else f"done -> {out}")
    return 0


def _keep_log(out: Path) -> Callable[[Path], None]:
    def extra(tmp: Path) -> None:
        if (out / "train.log").exists():
            shutil.copy2(out / "train.log", tmp / "train.log")
    return extra


def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a (pruned) model directory; resumable, torchrun-ready")
    p.add_argument("dir", help="model directory (e.g. the output of `simprune prune`)")
    p.add_argument("--data", required=True, help="training data set (its test split is evaluated each epoch)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--pad-to", type=int, default=None, help="default: what the model was trained with")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: DIR-ft)")
    p.add_argument("--overwrite", action="store_true")
    add_training_options(p)
    p.set_defaults(fn=cmd_finetune)

