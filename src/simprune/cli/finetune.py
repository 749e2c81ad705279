"""`simprune finetune DIR`: fine-tune a (pruned) model directory; resumable, torchrun-ready."""
from __future__ import annotations

from pathlib import Path

from simprune import api, distributed
from simprune.cli.common import (
    add_training_options,
    command_line,
    device_option,
    keep_log,
    make_finetune,
    run_log,
)
from simprune.errors import SimpruneError
from simprune.io.files import load_model, read_json
from simprune.train.finetune import check_output, finish, mark_incomplete, run_finetune


def cmd_finetune(args) -> int:
    src = Path(args.dir)
    out = Path(args.out) if args.out else src.with_name(src.name + "-ft")
    if out.resolve() == src.resolve():
        raise SimpruneError("--out must differ from the model directory; the source stays untouched")
    check_output(out, args.resume, args.overwrite)
    model, desc = load_model(src)
    log = run_log(out)
    ft = make_finetune(args, desc, out, args.epochs, log)
    if not args.resume:
        mark_incomplete(out, "finetune", command_line())
    log(f"# {command_line()}")
    ft.description = {k: v for k, v in desc.items() if k not in ("history", "train_config", "versions", "format")}
    old_report = src / "report.json"
    report = read_json(old_report) if old_report.exists() else {}
    run_finetune(model, ft, report)
    report["finetune"]["source"] = str(src)
    report["command"] = command_line()
    if report.get("accuracy"):
        report["accuracy"]["after_finetune"] = report["finetune"]["top1_after"]
    new_desc = {**ft.description, "command": command_line(),
                "finetune": {"source": str(src), "epochs": args.epochs,
                             "teacher": (desc.get("pruning") or {}).get("source")}}
    if distributed.is_main():
        api.save(out, model, new_desc, report, overwrite=True, extra=keep_log(out))
    finish(out)
    if distributed.is_main():
        ftr = report["finetune"]
        print(f"top-1 {ftr['top1_before_finetune']:.2f} % -> {ftr['top1_after']:.2f} % after {args.epochs} "
              f"epochs -> {out}" if ftr["top1_before_finetune"] is not None else f"done -> {out}")
    return 0


def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a (pruned) model directory; resumable, torchrun-ready")
    device_option(p)
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
