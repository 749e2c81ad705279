"""Criteria side by side on the committed Fashion-MNIST ResNet-56, without fine-tuning.

Every criterion prunes the same model to the same FLOPs targets under the same allocator
settings (``simprune.verify.compare.run_grid``): groups that cannot be compensated (read by the option-A
shortcut) are left whole for all, and every pruned model gets its BatchNorm statistics
re-estimated on the same 640 calibration images (seeded). Data-driven criteria are evaluated with
least-squares compensation, the twin fold of the method, and none. Top-1 on the 10,000-image test
set. The same table comes from the command line:

    simprune compare --checkpoint zoo/resnet56-fashion-mnist --data fashion-mnist \\
        --criteria qsfm:ssim,qsfm:ssim-windowed,qsfm:psnr,qsfm:cosine,feature-stats,hrank,filter-similarity,l1,fpgm,random \\
        --compensate lstsq,twin,none --targets 0.3,0.48,0.7 --out runs/criteria

    python bench/quality.py                      # table + bench/results/quality.json
    python bench/quality.py --targets 0.48 --criteria l1 qsfm-ssim   # a subset
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402
from simprune.calibrate.calibration import calibration_loader  # noqa: E402
from simprune.io.data import load_dataset  # noqa: E402
from simprune.io.files import load_model  # noqa: E402
from simprune.train.loop import evaluate  # noqa: E402
from simprune.verify.compare import Spec, run_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CRITERIA = {label: Spec(label, name, options) for label, (name, options) in {
    "qsfm-ssim": ("qsfm", {"similarity": "ssim"}),
    "qsfm-ssim-windowed": ("qsfm", {"similarity": "ssim-windowed"}),
    "qsfm-psnr": ("qsfm", {"similarity": "psnr"}),
    "qsfm-cosine": ("qsfm", {"similarity": "cosine"}),
    "feature-stats": ("feature-stats", {}),
    "hrank": ("hrank", {}),
    "filter-similarity": ("filter-similarity", {}),
    "l1": ("l1", {}),
    "fpgm": ("fpgm", {}),
    "random": ("random", {}),
}.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "zoo" / "resnet56-fashion-mnist"))
    ap.add_argument("--targets", nargs="+", type=float, default=[0.30, 0.48, 0.70])
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    ap.add_argument("--calib-images", type=int, default=640)
    ap.add_argument("--eval-images", type=int, default=None, help="default: the whole test set")
    ap.add_argument("--cost-weight", type=float, default=0.0)
    ap.add_argument("--name", default="quality", help="write bench/results/NAME.json")
    args = ap.parse_args()

    model, desc = load_model(args.checkpoint)
    shape = tuple(desc["input_shape"])
    pad_to = desc["data"]["pad_to"]
    test = load_dataset(desc["data"]["name"], "test", pad_to=pad_to)
    if args.eval_images:
        test = torch.utils.data.Subset(test, range(args.eval_images))
    calib = calibration_loader(desc["data"]["name"], args.calib_images, pad_to=pad_to, seed=0)
    base_top1 = evaluate(model, test)["top1"]
    print(f"baseline top-1 {base_top1:.2f} %", file=sys.stderr)
    rows = []
    for run in run_grid(model, torch.zeros(1, *shape), [CRITERIA[c] for c in args.criteria], sorted(args.targets),
                        calibration=calib, test=test, base_top1=base_top1, compensations=("lstsq", "twin", "none"),
                        cost_weight=args.cost_weight):
        r = run["row"]
        rows.append({"criterion": r["criterion"], "compensated": r["compensated"], "target": r["target"],
                     "flops_removed_%": 100 * r["flops_removed"], "params_removed_%": 100 * r["params_removed"],
                     "top1": r["top1"], "change": r["change"], "score_s": r["score_s"]})
        print(f"{r['label']} {r['target']}: {r['top1']:.2f}", file=sys.stderr)
    print_table(rows, ["criterion", "compensated", "target", "flops_removed_%", "params_removed_%", "top1",
                       "change"])
    out = write_json(args.name, {"checkpoint": args.checkpoint, "baseline_top1": base_top1,
                                 "calib_images": args.calib_images, "cost_weight": args.cost_weight,
                                 "eval_images": len(test), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
