"""Criteria side by side on the committed Fashion-MNIST ResNet-56, without fine-tuning.

Every criterion prunes the same model to the same FLOPs targets under the same allocator
settings: groups that cannot be compensated (read by the option-A shortcut) are left whole
for all, and every pruned model gets its BatchNorm statistics re-estimated on the same 640
calibration images (seeded). Data-driven criteria are evaluated with least-squares
compensation, the twin fold of the method, and none. Top-1 on the 10,000-image test set.

    python bench/quality.py                      # table + bench/results/quality.json
    python bench/quality.py --targets 0.48 --criteria l1 qsfm-ssim   # a subset
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

import simprune  # noqa: E402
from simprune.calibration import calibration_loader  # noqa: E402
from simprune.criteria import get_criterion  # noqa: E402
from simprune.data import load_dataset  # noqa: E402
from simprune.graph import PruningGraph  # noqa: E402
from simprune.training import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CRITERIA = {  # label -> (criterion, options)
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
}


DATA_CRITERIA = {"qsfm", "feature-stats", "hrank"}


class Cached:
    """A criterion whose scores were computed once (statistics are shared across targets)."""

    def __init__(self, crit, result):
        self.name, self.needs_data = crit.name, False
        self.compensate_by_default = getattr(crit, "compensate_by_default", False)
        self.result = result

    def score(self, graph, calibration=None):
        return self.result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default=str(ROOT / "zoo" / "resnet56-fashion-mnist"))
    ap.add_argument("--targets", nargs="+", type=float, default=[0.30, 0.48, 0.70])
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    ap.add_argument("--calib-images", type=int, default=640)
    ap.add_argument("--eval-images", type=int, default=None, help="default: the whole test set")
    ap.add_argument("--cost-weight", type=float, default=0.0)
    args = ap.parse_args()

    model, desc = simprune.api.load_model(args.checkpoint)
    shape = tuple(desc["input_shape"])
    pad_to = desc["data"]["pad_to"]
    test = load_dataset(desc["data"]["name"], "test", pad_to=pad_to)
    if args.eval_images:
        test = torch.utils.data.Subset(test, range(args.eval_images))
    calib = calibration_loader(desc["data"]["name"], args.calib_images, pad_to=pad_to, seed=0)
    base_top1 = evaluate(model, test)["top1"]
    print(f"baseline top-1 {base_top1:.2f} %", file=sys.stderr)
    example = torch.zeros(1, *shape)
    rows = []
    for label in args.criteria:
        name, options = CRITERIA[label]
        crit = get_criterion(name, **options, **({"progress": False} if name in DATA_CRITERIA else {}))
        t0 = time.perf_counter()
        graph = PruningGraph(model, example)
        result = crit.score(graph, calib) if crit.needs_data else crit.score(graph)
        score_s = time.perf_counter() - t0
        cached = Cached(crit, result)
        for target in args.targets:
            for comp in (["lstsq", "twin", False] if result.compensator else [False]):
                pruned, report = simprune.prune(model, example, cached, {"flops": target}, compensate=comp,
                                                cost_weight=args.cost_weight, calibration=calib,
                                                protect_uncompensable=True, recalibrate_bn=True)
                top1 = evaluate(pruned, test)["top1"]
                rows.append({"criterion": label, "compensated": comp, "target": target,
                             "flops_removed_%": 100 * report["reduction"]["flops"],
                             "params_removed_%": 100 * report["reduction"]["params"],
                             "top1": top1, "change": top1 - base_top1, "score_s": score_s})
                print(f"{label} {target} comp={comp}: {top1:.2f}", file=sys.stderr)
    print_table(rows, ["criterion", "compensated", "target", "flops_removed_%", "params_removed_%", "top1",
                       "change"])
    out = write_json("quality", {"checkpoint": args.checkpoint, "baseline_top1": base_top1,
                                 "calib_images": args.calib_images, "cost_weight": args.cost_weight,
                                 "eval_images": len(test), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
