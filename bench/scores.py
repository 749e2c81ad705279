"""What the score definitions do to accuracy: chance-corrected vs raw similarity, on the committed
Fashion-MNIST ResNets, one FLOPs target, 640 calibration images, BatchNorm re-estimated, no
fine-tuning (top-1 on the 10,000-image test set). Default allocator settings of ``simprune prune``,
without the consumer refit (``reconstruct=False``: the scores alone, with each criterion's own fold).

    python bench/scores.py                          # table + bench/results/scores.json
    python bench/scores.py --models resnet20 --criteria qsfm qsfm-raw
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import simprune  # noqa: E402
from common import print_table, write_json  # noqa: E402
from simprune.calibrate.calibration import calibration_loader  # noqa: E402
from simprune.io.data import load_dataset  # noqa: E402
from simprune.io.files import load_model  # noqa: E402
from simprune.train.loop import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"resnet20": (ROOT / "zoo" / "resnet20-fashion-mnist", 0.50),
          "resnet56": (ROOT / "zoo" / "resnet56-fashion-mnist", 0.48)}
CRITERIA = {
    "qsfm": ("qsfm", {}), "qsfm-raw": ("qsfm", {"chance_corrected": False}),
    "feature-stats": ("feature-stats", {}), "feature-stats-raw": ("feature-stats", {"chance_corrected": False}),
    "filter-similarity": ("filter-similarity", {}),
    "filter-similarity-raw": ("filter-similarity", {"chance_corrected": False}),
    "hrank": ("hrank", {}), "l1": ("l1", {}),
}


def run(model_name: str, label: str, calib_images: int, eval_images: int | None) -> dict:
    path, target = MODELS[model_name]
    model, desc = load_model(path)
    pad_to = desc["data"]["pad_to"]
    test = load_dataset(desc["data"]["name"], "test", pad_to=pad_to)
    if eval_images:
        test = torch.utils.data.Subset(test, range(eval_images))
    calib = calibration_loader(desc["data"]["name"], calib_images, pad_to=pad_to, seed=0)
    name, options = CRITERIA[label]
    opts = dict(options, progress=False) if name in ("qsfm", "feature-stats", "hrank") else options
    t0 = time.perf_counter()
    pruned, report = simprune.prune(model, torch.zeros(1, *desc["input_shape"]), name, {"flops": target},
                                    calibration=calib, criterion_options=opts, reconstruct=False)
    seconds = time.perf_counter() - t0
    groups = {g["root"]: g["channels_after"] for g in report["groups"]}
    return {"model": model_name, "criterion": label, "target": target,
            "flops_removed_%": 100 * report["reduction"]["flops"], "top1": evaluate(pruned, test)["top1"],
            "base_top1": evaluate(model, test)["top1"], "seconds": seconds,
            "last_stage": groups.get("layer3.0.conv2"), "groups": groups}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    ap.add_argument("--calib-images", type=int, default=640)
    ap.add_argument("--eval-images", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for model_name in args.models:
        for label in args.criteria:
            rows.append(run(model_name, label, args.calib_images, args.eval_images))
            print(f"{model_name} {label}: {rows[-1]['top1']:.2f}", file=sys.stderr)
            write_json("scores", {"rows": rows})
    print_table(rows, ["model", "criterion", "target", "flops_removed_%", "base_top1", "top1", "last_stage"])


if __name__ == "__main__":
    main()
