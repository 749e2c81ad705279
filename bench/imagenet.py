"""MobileNetV2 with its real ImageNet weights, pruned without labels, measured on real ImageNet images.

Calibration: the ``calibration`` split of ``--imagenet-sample`` (500 images of the even classes; their
labels are never read). Measured on the ``evaluation`` split (500 images of the odd classes, which the
calibration never saw): top-1, top-1 agreement with the unpruned model, onnxruntime speed-up at batch 1
and one thread (every model timed interleaved with the original; ratio of medians), seconds per prune.
Rows: criterion x MACs target x repair, where repair is
- ``none``: removal only (no refit, no BatchNorm re-estimation);
- ``refit``: the library's default repair with calibration data (consumer refit + BatchNorm re-estimation);
- ``refit + recovery``: that, then the label-free recovery stage (repair/recovery.py).
Each criterion scores the unpruned model once (its scores serve every target and repair). Rows are
written to the JSON as they finish; ``--resume`` keeps the rows already there.

    python bench/imagenet.py                                   # the defaults at every target
    python bench/imagenet.py --criteria refit-error l1 --targets 0.35 --repairs none refit "refit + recovery"
    python bench/imagenet.py --imagenet-sample /data/imagenet-val-subset   # any manifest folder
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import simprune  # noqa: E402
from common import RESULTS, print_table, write_json  # noqa: E402
from simprune import Recovery, Repair  # noqa: E402
from simprune.criteria import ScoreCache, get_criterion  # noqa: E402
from simprune.io.imagenet import load_pretrained  # noqa: E402
from simprune.io.images import calibration_images, manifest_dataset, torchvision_preprocess  # noqa: E402

PAPER = {"method": "QSFM (paper), fine-tuned on all of ImageNet", "speedup": 1.53, "top1_change": -1.23}
CRITERIA = ("auto", "refit-error", "qsfm", "feature-stats", "filter-similarity", "l1", "tp:l2")
REPAIRS = ("none", "refit", "refit + recovery")
TARGETS = (0.20, 0.30, 0.35, 0.42)
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "imagenet-sample"
COLUMNS = ["criterion", "chosen", "target", "repair", "macs_removed_%", "top1", "top1_change", "agreement_%", "speedup",
           "mac_speedup", "seconds", "recovery"]


def repair_stage(repair: str) -> Repair:
    """The repair stage of one column: nothing, the default (refit + BN), or that and the recovery."""
    if repair == "none":
        return Repair.none()
    return Repair(recover=Recovery()) if repair == "refit + recovery" else Repair.auto()


@torch.no_grad()
def predictions(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    top, labels = [], []
    for x, y in loader:
        top.append(model(x).argmax(1))
        labels.append(y)
    return torch.cat(top), torch.cat(labels)


def measure_speed(models: list, runs: int) -> list[float]:
    """onnxruntime batch-1 one-thread median ms of each model (the first is the reference)."""
    from simprune.export.latency import measure_onnx_many
    from simprune.export.onnx import export_onnx

    x = torch.zeros(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / f"{i}.onnx" for i in range(len(models))]
        for m, f in zip(models, files):
            export_onnx(m, x, f)
        return [t["median_ms"] for t in measure_onnx_many(files, (3, 224, 224), 1, 1, runs)]


def prune_row(model, crit, target: float, repair: str, calib) -> tuple[torch.nn.Module, dict, float]:
    t0 = time.perf_counter()
    pruned, report = simprune.prune(model, torch.zeros(1, 3, 224, 224), crit, {"flops": target},
                                    calibration=calib, repair=repair_stage(repair))
    return pruned, report, time.perf_counter() - t0


def run(args) -> list[dict]:
    path = RESULTS / "imagenet.json"
    done = json.loads(path.read_text())["rows"] if args.resume and path.exists() else []
    key = lambda r: (r["criterion"], r["target"], r["repair"])  # noqa: E731
    if args.redo:  # the selected rows are measured again and replace the ones there
        done = [r for r in done if not (r["criterion"] in args.criteria and r["target"] in args.targets
                                        and r["repair"] in args.repairs)]
    have = {key(r) for r in done}
    model = load_pretrained("mobilenet_v2", "IMAGENET1K_V1")
    pre = torchvision_preprocess("mobilenet_v2", "IMAGENET1K_V1")
    sample = Path(args.imagenet_sample)
    calib = calibration_images(f"{sample}/manifest.csv:calibration", pre, n_images=args.calib_images)
    evaluation = torch.utils.data.DataLoader(manifest_dataset(f"{sample}/manifest.csv:evaluation", pre),
                                             batch_size=50)
    ref_top, labels = predictions(model, evaluation)
    base = float((ref_top == labels).double().mean() * 100)
    rows = list(done)
    for name in args.criteria:
        crit = name if name == "auto" else scored_once(name)
        for target in args.targets:
            for repair in args.repairs:
                if (name, target, repair) in have:
                    continue
                pruned, report, seconds = prune_row(model, crit, target, repair, calib)
                top, _ = predictions(pruned, evaluation)
                ms_ref, ms = measure_speed([model, pruned], args.runs)
                top1 = float((top == labels).double().mean() * 100)
                rows.append({"criterion": name, "chosen": report["criterion"],
                             "choice": report.get("criterion_choice"), "target": target, "repair": repair,
                             "macs_removed_%": 100 * report["reduction"]["flops"], "top1": top1,
                             "top1_change": top1 - base, "agreement_%": float((top == ref_top).double().mean() * 100),
                             "speedup": ms_ref / ms, "mac_speedup": report["macs"]["before"] / report["macs"]["after"],
                             "seconds": seconds, "recovery": _recovery_text(report.get("recovered")),
                             "refit_views": _refit_views(report),
                             "batchnorm": (report.get("batchnorm_choice") or {}).get("kept")})
                print_table(rows[-1:], COLUMNS)
                _write(args, base, rows, rows[len(done):])
    return rows


def scored_once(name: str) -> ScoreCache:
    """Criterion ``name`` scoring the unpruned model once for every target and repair ("auto" prunes trial
    copies per target, so it is passed by name)."""
    crit = get_criterion(name)
    if hasattr(crit, "progress"):
        crit.progress = False
    return ScoreCache(crit, reuse=True)


def _refit_views(report: dict) -> int | None:
    """The refit's views per calibration image (None without a refit)."""
    refit = ((report.get("options") or {}).get("repair") or {}).get("refit")
    return refit.get("views", 1) if isinstance(refit, dict) else None


def _recovery_text(summary) -> str:
    if not summary:
        return ""
    return (f"{summary['images']} images, {summary['epochs']:.1f} epochs, {summary['seconds']:.0f} s, "
            f"held-aside agreement {summary['held_out_agreement']['before']:.0f}->"
            f"{summary['held_out_agreement']['after']:.0f} %")


def _write(args, base: float, rows: list[dict], measured: list[dict]) -> None:
    """Write the rows: with --resume, the file's rows as they are now (another run may have written some
    meanwhile) with this run's ``measured`` rows put in; without, this run's ``rows`` alone."""
    path = RESULTS / "imagenet.json"
    if args.resume and path.exists():
        key = lambda r: (r["criterion"], r["target"], r["repair"])  # noqa: E731
        mine = {key(r) for r in measured}
        rows = [r for r in json.loads(path.read_text())["rows"] if key(r) not in mine] + measured
    write_json("imagenet", {"model": "torchvision mobilenet_v2 IMAGENET1K_V1", "unpruned_top1": base,
                            "calibration": f"{args.calib_images} images, calibration split (labels never read)",
                            "evaluation": "500 images, evaluation split (classes the calibration never saw)",
                            "onnxruntime": {"batch": 1, "threads": 1, "runs": args.runs},
                            "torch_threads": torch.get_num_threads(), "paper": PAPER, "rows": rows})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imagenet-sample", default=str(SAMPLE), help="folder with manifest.csv (file,wnid,"
                                                                   "class_index,split) and the images")
    ap.add_argument("--criteria", nargs="+", default=["auto"], choices=CRITERIA)
    ap.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    ap.add_argument("--repairs", nargs="+", default=["refit + recovery"], choices=REPAIRS)
    ap.add_argument("--calib-images", type=int, default=500)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for pruning (default: torch's)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in bench/results/imagenet.json")
    ap.add_argument("--redo", action="store_true", help="with --resume: measure the selected rows again")
    args = ap.parse_args()
    if not (Path(args.imagenet_sample) / "manifest.csv").is_file():
        print(f"skipped: {args.imagenet_sample}/manifest.csv not found (pass --imagenet-sample DIR)")
        return 0
    if args.runs < 30:
        ap.error("--runs must be at least 30 (onnxruntime medians of fewer runs are refused)")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = run(args)
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
