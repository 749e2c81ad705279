"""Accuracy without fine-tuning: every criterion, with and without the consumer refit, on the committed
Fashion-MNIST ResNets.

Every run prunes the same model to the same MACs target on the same footing: the same allocator, groups
read by the parameter-free option-A shortcut left whole for all, the same 640 seeded calibration images,
BatchNorm statistics re-estimated on them, kept channel counts as the allocator ranks them (``round_to=1``;
the "aligned" row keeps the library's default alignment to the CPU's vector block), no fine-tuning. "refit"
rows run the reconstruction (``simprune.prune(..., reconstruct=True)``: the conv and linear layers are refit
by least squares to reproduce the unpruned model's outputs, in network order); the other rows use the
criterion's own
repair (qsfm and feature-stats: the least-squares channel fold) or none. Torch-Pruning's importances run
through Torch-Pruning's own classes (``tp:*``). Top-1 on the 10,000-image test set. A criterion's scores
are computed once per model and reused for every target. Rows are written to the JSON as they finish;
a rerun keeps the rows already measured and runs only the missing ones (``--fresh`` starts over;
``--redo`` measures the selected rows again).

The timing line prunes once more from scratch (refit-error + refit at 48 %) and divides its CPU time by
that of a bare forward over the same 640 images (fp32, the refit's precision; and bf16 autocast).

    python bench/quality.py                                  # ResNet-56 table + bench/results/quality.json
    python bench/quality.py --checkpoint zoo/resnet20-fashion-mnist   # the same table for ResNet-20
    python bench/quality.py --targets 0.48 --criteria refit-error qsfm-ssim   # a subset
    python bench/quality.py --ablations                      # what each part of the refit adds
    python bench/quality.py --criteria refit-error --targets 0.48 --recover   # refit vs refit + recovery: recovery.json
    python bench/readme.py                                   # the README tables from the JSON
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import simprune  # noqa: E402
from common import RESULTS, print_table, write_json  # noqa: E402
from simprune import Recovery, Repair, Selection  # noqa: E402
from simprune.allocation.allocator import Guards  # noqa: E402
from simprune.calibrate.calibration import calibration_loader  # noqa: E402
from simprune.criteria import ScoreCache, get_criterion  # noqa: E402
from simprune.io.data import load_dataset  # noqa: E402
from simprune.io.files import load_model  # noqa: E402
from simprune.train.loop import evaluate  # noqa: E402
from tp_importances import IMPORTANCES, tp_criterion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CRITERIA = {  # label -> (registry name, options)
    "auto": ("auto", {}),  # the library's default: refit-error or tp:l2, chosen on held-aside calibration images
    "refit-error": ("refit-error", {}),
    "qsfm-ssim": ("qsfm", {"similarity": "ssim"}),
    "qsfm-psnr": ("qsfm", {"similarity": "psnr"}),
    "feature-stats": ("feature-stats", {}),
    "hrank": ("hrank", {}),
    "filter-similarity": ("filter-similarity", {}),
    "l1": ("l1", {}),
    "fpgm": ("fpgm", {}),
    "random": ("random", {}),
    **{name: (name, {}) for name in IMPORTANCES},
    "refit-error aligned": ("refit-error", {}),
}
ALIGNED = {"refit-error aligned"}  # these rows keep the default Guards(round_to=None): vector-block multiples
REFIT_ONLY = ALIGNED | {"auto"}  # rows measured with the refit alone
TARGETS = [0.30, 0.48, 0.62, 0.70]
ABLATIONS = {  # what each part of the refit adds: refit-error selection, the refit with one part changed
    "as is": ({}, True),
    "only the layers that lost inputs": ({"scope": "readers"}, True),
    "no residual cancellation": ({"residual": False}, True),
    "all layers at once, not in order": ({"sequential": False}, True),
    "no BatchNorm re-estimation": ({}, False),
}


def make_criterion(label: str):
    """The criterion of a row, scoring once for every target ("auto" prunes trial copies per target: by name)."""
    name, options = CRITERIA[label]
    if name == "auto":
        return name
    crit = tp_criterion(name) if name.startswith("tp:") else get_criterion(name, **options)
    if hasattr(crit, "progress"):
        crit.progress = False
    return ScoreCache(crit, reuse=True)


def prune_row(model, example, crit, label: str, target: float, refit: bool, calib, test, base: float,
              model_name: str, recover: bool = False) -> dict:
    """One pruned model, evaluated: the row of the table. ``recover``: the refit, then the label-free recovery
    (trained on the calibration images against the unpruned model, labels never read)."""
    guards = Guards() if label in ALIGNED else Guards(round_to=1)
    repair = Repair(protect_uncompensable=True, refit=refit, recalibrate_bn=True, recover=Recovery() if recover else None)
    pruned, report = simprune.prune(model, example, crit, {"flops": target}, calibration=calib,
                                    selection=Selection(guards=guards), repair=repair)
    top1 = evaluate(pruned, test)["top1"]
    refit_info = report.get("reconstructed") or {}
    recovered = report.get("recovered") or {}
    return {"model": model_name, "criterion": label, "chosen": report["criterion"], "reconstructed": refit, "recovered": bool(recovered),
            "recovery": {k: recovered[k] for k in ("images", "held_aside", "epochs", "steps_run", "stopped", "seconds",
                                                   "held_out_agreement")} if recovered else None,
            "repair": "refit + recovery" if recovered else "refit" if refit else (
                report["compensated"] if isinstance(report["compensated"], str)
                else ("lstsq fold" if report["compensated"] else "none")),
            "target": target, "flops_removed_%": 100 * report["reduction"]["flops"],
            "params_removed_%": 100 * report["reduction"]["params"], "top1": top1, "change": top1 - base,
            "refit_relative_error": (refit_info.get("relative_error") or {}).get("after"),
            "seconds": report["seconds"]}


def _key(row: dict) -> tuple:
    return row["criterion"], row["reconstructed"], row["target"], row.get("recovered", False)


def bare_forward(model, calib, bf16: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward over the calibration batches, no hooks."""
    model.eval()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x, _ in calib:
            model(x)
    return time.perf_counter() - t0, time.process_time() - c0


def speed(model, example, calib) -> dict:
    """The whole prune with reconstruction at 48 % from scratch, against a bare forward over the same images.

    CPU time is the figure to read (one thread; the machine's cores are shared, so wall time also counts
    the neighbours); the refit runs its forwards in fp32, so the fp32 forward is the like-for-like one."""
    fp32 = min((bare_forward(model, calib, False) for _ in range(2)), key=lambda t: t[1])
    bf16 = min((bare_forward(model, calib, True) for _ in range(2)), key=lambda t: t[1])
    t0, c0 = time.perf_counter(), time.process_time()
    _, report = simprune.prune(model, example, make_criterion("refit-error"), {"flops": 0.48}, calibration=calib,
                               guards=Guards(round_to=1))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    refit = report["reconstructed"]
    return {"criterion": "refit-error", "target": 0.48, "prune_s": wall, "prune_cpu_s": cpu,
            "bare_forward_fp32_s": fp32[0], "bare_forward_fp32_cpu_s": fp32[1],
            "bare_forward_bf16_s": bf16[0], "bare_forward_bf16_cpu_s": bf16[1],
            "ratio_fp32": cpu / fp32[1], "ratio_bf16": cpu / bf16[1], "wall_ratio_fp32": wall / fp32[0],
            "breakdown_s": report["seconds"], "layers_refit": refit["layers"], "blocks": refit["blocks"],
            "largest_gram_mib": refit["largest_gram_mib"], "frontier_mib": refit["frontier_mib"]}


def ablations(model, example, calib, test, base: float, targets: list[float], entry: dict, save) -> None:
    """refit-error + refit with one part of the refit changed at a time (scores computed once); rows go to
    ``entry["ablations"]`` and are saved one by one, those already there are kept."""
    crit, rows = make_criterion("refit-error"), entry.setdefault("ablations", [])
    for label, (options, recalibrate) in ABLATIONS.items():
        for target in targets:
            if any((r["variant"], r["target"]) == (label, target) for r in rows):
                continue
            pruned, report = simprune.prune(model, example, crit, {"flops": target}, calibration=calib,
                                            reconstruct_options=options, recalibrate_bn=recalibrate,
                                            guards=Guards(round_to=1))
            top1 = evaluate(pruned, test)["top1"]
            rows.append({"variant": label, "target": target, "top1": top1, "change": top1 - base,
                         "refit_seconds": report["seconds"]["reconstruction"]})
            print(f"ablation {label} {target}: {top1:.2f}", file=sys.stderr)
            save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "zoo" / "resnet56-fashion-mnist"))
    ap.add_argument("--targets", nargs="+", type=float, default=TARGETS)
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    ap.add_argument("--calib-images", type=int, default=640)
    ap.add_argument("--eval-images", type=int, default=None, help="default: the whole test set")
    ap.add_argument("--no-speed", action="store_true", help="skip the timing line")
    ap.add_argument("--recover", action="store_true",
                    help="'refit' and 'refit + recovery' rows (the label-free recovery stage) per criterion and target, "
                         "measured together into bench/results/recovery.json")
    ap.add_argument("--fresh", action="store_true", help="drop the rows already in the JSON")
    ap.add_argument("--redo", action="store_true", help="measure the selected rows again even if present")
    ap.add_argument("--ablations", nargs="*", type=float, default=None, metavar="TARGET",
                    help="only the ablation rows of the refit, at these targets (default 0.48 0.7)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, desc = load_model(args.checkpoint)
    name, pad_to = desc["data"]["name"], desc["data"]["pad_to"]
    test = load_dataset(name, "test", pad_to=pad_to)
    if args.eval_images:
        test = torch.utils.data.Subset(test, range(args.eval_images))
    calib = calibration_loader(name, args.calib_images, pad_to=pad_to, seed=0)
    example = torch.zeros(1, *desc["input_shape"])
    base = evaluate(model, test)["top1"]
    print(f"{desc['model']}: baseline top-1 {base:.2f} %", file=sys.stderr)
    name_json = "recovery" if args.recover else "quality"  # recovery rows and their refit twins, measured together
    path = RESULTS / f"{name_json}.json"
    data = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    models = {m["model"]: m for m in data.get("models", [])}
    entry = models.setdefault(desc["model"], {"model": desc["model"], "rows": []})
    entry.update(checkpoint=str(Path(args.checkpoint).resolve().relative_to(ROOT)), baseline_top1=base,
                 calib_images=args.calib_images, eval_images=len(test))
    command = ("python bench/quality.py " + " ".join(sys.argv[1:])).strip()
    if args.ablations is not None:
        entry["ablations_command"] = command
    else:  # rows come from several runs (subsets, resumed): every command that wrote some is kept
        commands = [c for c in entry.get("commands", [entry.get("command")] if entry.get("command") else [])
                    if c != command and not args.fresh]
        entry["commands"] = [*commands, command]
        entry.pop("command", None)
    if args.ablations is not None:
        if args.redo:
            entry.pop("ablations", None)
        ablations(model, example, calib, test, base, args.ablations or [0.48, 0.70], entry,
                  lambda: write_json(name_json, {"models": list(models.values())}))
        print_table(entry["ablations"], ["variant", "target", "top1", "change", "refit_seconds"])
        return
    if not args.no_speed and (args.redo or "speed" not in entry):
        entry["speed"] = speed(model, example, calib)
        sp = entry["speed"]
        print(f"prune + refit at 48 %: {sp['prune_cpu_s']:.1f} CPU s = {sp['ratio_fp32']:.1f}x a bare fp32 forward "
              f"({sp['ratio_bf16']:.1f}x a bf16 one); wall {sp['prune_s']:.1f} s", file=sys.stderr)
    for label in args.criteria:
        crit = make_criterion(label)
        repairs = [(True, False)] if label in REFIT_ONLY else [(False, False), (True, False)]
        for refit, recover in [(True, False), (True, True)] if args.recover else repairs:
            for target in sorted(args.targets):
                key = (label, refit, target, recover)
                if not args.redo and any(_key(r) == key for r in entry["rows"]):
                    continue
                row = prune_row(model, example, crit, label, target, refit, calib, test, base, desc["model"], recover)
                entry["rows"] = [r for r in entry["rows"] if _key(r) != key]
                entry["rows"].append(row)
                print(f"{label} {row['repair']} {target}: {row['top1']:.2f}", file=sys.stderr)
                write_json(name_json, {"models": list(models.values())})
    print_table(entry["rows"], ["criterion", "repair", "target", "flops_removed_%", "params_removed_%", "top1",
                                "change"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
