"""MobileNetV2 (torchvision's ImageNet weights) at the QSFM paper's 1.53x edge speed-up, no fine-tuning:
how much of the unpruned model's behaviour survives on photographs the calibration never saw.

Calibration: 128 seeded crops of the photographs scikit-image ships. Held out: the ten standard crops
of every photograph in ``--holdout`` (default: Debian's mate-backgrounds nature photos,
``apt install mate-backgrounds``); the ten crops of the calibration photos are shown beside them.
Each row prunes to a MACs target with the library's defaults for data given (kept widths aligned to
the CPU's vector block, the consumer refit, BatchNorm re-estimation), unless the row says otherwise;
"qsfm + lstsq (before)" is the configuration bench/latency.py used before the refit existed.
onnxruntime batch 1, one thread, every model timed interleaved with the original; the speed-up is
the ratio of medians. ImageNet itself is not available here, so agreement with the unpruned model's
top-1 class stands in for accuracy.

    python bench/edge_mobilenet.py              # table + bench/results/edge_mobilenet.json
    python bench/edge_mobilenet.py --targets 0.36 0.40 --rows refit-error
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import simprune  # noqa: E402
from common import print_table, write_json  # noqa: E402
from simprune.allocation.allocator import Guards  # noqa: E402
from simprune.criteria import ScoreCache, get_criterion  # noqa: E402
from simprune.export.latency import measure_onnx_many  # noqa: E402
from simprune.export.onnx import export_onnx  # noqa: E402
from simprune.io.imagenet import (  # noqa: E402
    PHOTOS,
    calibration_photos,
    evaluation_photos,
    load_pretrained,
    photo_files,
    top1_agreement,
)

EDGE_SPEEDUP = 1.53
HOLDOUT = "/usr/share/backgrounds/mate/nature"
ROWS = {  # label -> (criterion, criterion options, prune options)
    "refit-error + refit": ("refit-error", {}, {}),
    "qsfm-ssim + refit": ("qsfm", {"similarity": "ssim"}, {}),
    "qsfm + lstsq (before)": ("qsfm", {"similarity": "ssim"},
                              {"reconstruct": False, "normalization": "rank", "recalibrate_bn": False,
                               "guards": Guards(max_layer_ratio=0.5)}),
}


def prune_rows(model, x, calib, targets, labels) -> list[dict]:
    """Every (row, target): the pruned model and its report; one scoring pass per criterion."""
    out = []
    for label in labels:
        name, crit_options, options = ROWS[label]
        crit = ScoreCache(get_criterion(name, progress=False, **crit_options), reuse=True)
        for target in targets:
            t0 = time.perf_counter()
            pruned, report = simprune.prune(model, x, crit, {"flops": target}, calibration=calib, **options)
            out.append({"row": label, "target": target, "model": pruned, "report": report,
                        "seconds": time.perf_counter() - t0})
            print(f"{label} {target}: pruned in {out[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", type=float, default=[0.30, 0.34, 0.38, 0.42])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--holdout", default=HOLDOUT, help="a folder of .jpg/.png photographs never calibrated on")
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model = load_pretrained("mobilenet_v2", "IMAGENET1K_V1")
    x = torch.zeros(1, 3, 224, 224)
    calib = torch.utils.data.DataLoader(calibration_photos(args.calib_images, seed=0), batch_size=32)
    held = photo_files(args.holdout)
    holdout, seen = evaluation_photos(photos=held).tensors[0], evaluation_photos().tensors[0]
    variants = prune_rows(model, x, calib, sorted(args.targets), args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / "original.onnx"] + [Path(tmp) / f"{i}.onnx" for i in range(len(variants))]
        export_onnx(model, x, files[0])
        for v, f in zip(variants, files[1:]):
            export_onnx(v["model"], x, f)
        timings = measure_onnx_many(files, (3, 224, 224), 1, 1, args.runs)
    rows = []
    for v, t in zip(variants, timings[1:]):
        rep = v["report"]
        rows.append({"row": v["row"], "target": v["target"], "flops_removed_%": 100 * rep["reduction"]["flops"],
                     "speedup": timings[0]["median_ms"] / t["median_ms"], "ms": t["median_ms"],
                     "iqr_ms": t["iqr_ms"], "mac_speedup": rep["macs"]["before"] / rep["macs"]["after"],
                     "agreement_heldout_%": top1_agreement(model, v["model"], holdout),
                     "agreement_calibration_photos_%": top1_agreement(model, v["model"], seen),
                     "prune_seconds": v["seconds"]})
    print_table(rows, ["row", "target", "flops_removed_%", "mac_speedup", "speedup", "agreement_heldout_%",
                       "agreement_calibration_photos_%"])
    at_goal = [r for r in rows if r["speedup"] >= EDGE_SPEEDUP]
    best = max(at_goal, key=lambda r: r["agreement_heldout_%"]) if at_goal else None
    print(f"at >= {EDGE_SPEEDUP}x measured: " + (f"{best['row']} at {best['target']:.2f}: "
                                                 f"{best['agreement_heldout_%']:.1f} % held-out agreement"
                                                 if best else "no row reached it"))
    write_json("edge_mobilenet", {"original_ms": timings[0]["median_ms"], "original_iqr_ms": timings[0]["iqr_ms"],
                                  "runs": args.runs, "threads": 1, "calibration_images": args.calib_images,
                                  "calibration_photos": list(PHOTOS), "holdout_folder": args.holdout,
                                  "holdout_photos": [p.name for p in held], "holdout_images": len(holdout),
                                  "edge_speedup_goal": EDGE_SPEEDUP, "best_at_goal": best, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
