"""Prune the committed Fashion-MNIST ResNet-56 past 61 % FLOPs and fine-tune: schedules side by side.

Each run is the real CLI (`simprune prune ... --finetune-epochs E`), so the numbers are what a user
gets: filter-similarity with the hard (iterative, re-scored) and soft schedules, qsfm one-shot
with compensation, and the defaults with calibration data (refit-error + the consumer refit) distilled
from the unpruned model. Top-1 on the full 10,000-image test set, against the unpruned baseline.
On a 2-core CPU an epoch of the pruned network takes minutes, so the default is a short fine-tune;
raise --epochs where you have the time (or a GPU).

    python bench/finetune.py                     # table + bench/results/finetune.json
    python bench/finetune.py --epochs 30 --runs qsfm
    python bench/finetune.py --merge --runs "refit-error + refit, distilled"   # one row, the others kept
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "zoo" / "resnet56-fashion-mnist"
RUNS = {  # label -> extra CLI arguments
    "filter-similarity hard": ["--criterion", "filter-similarity", "--schedule", "iterative", "--steps", "3"],
    "filter-similarity soft": ["--criterion", "filter-similarity", "--schedule", "soft", "--soft-hold", "1"],
    "qsfm": ["--criterion", "qsfm", "--similarity", "ssim", "--calib-data", "fashion-mnist"],
    # the defaults with calibration data (refit-error selection, the consumer refit), distilled from the
    # unpruned model while fine-tuning
    "refit-error + refit, distilled": ["--criterion", "refit-error", "--calib-data", "fashion-mnist", "--distill"],
    # the same from the refit's already good weights at half the learning rate
    "refit-error + refit, distilled, lr 0.01": ["--criterion", "refit-error", "--calib-data", "fashion-mnist",
                                                "--distill", "--lr", "0.01"],
}


def _plain(command: str) -> list[str]:
    """The arguments that decide the result (not how the output folder or latency step is handled)."""
    return [c for c in command.split() if c not in ("--resume", "--overwrite", "--no-latency")][2:]


def _finished_same(out: Path, cmd: list[str]) -> bool:
    """True when ``out`` already holds the finished result of this very command (reused, not rerun)."""
    report = out / "report.json"
    if (out / "INCOMPLETE.json").exists() or not report.exists():
        return False
    return _plain(json.loads(report.read_text()).get("command", "")) == _plain("simprune " + " ".join(cmd[1:]))


def run(label: str, extra: list[str], args, out: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "simprune"), "prune", "--checkpoint", str(BASELINE),
           "--target-flops", str(args.target), "--data", "fashion-mnist", "--finetune-epochs", str(args.epochs),
           "--lr", str(args.lr), "--quiet", "--out", str(out), *extra]
    t0 = time.time()
    if not _finished_same(out, cmd):
        # an interrupted run is continued (the product's --resume), anything else starts over
        cmd.append("--resume" if (out / "INCOMPLETE.json").exists() else "--overwrite")
        subprocess.run(cmd + ["--no-latency"], check=True)  # latency is bench/latency.py's job
    report = json.loads((out / "report.json").read_text())
    ft = report["finetune"]
    lr = float(extra[extra.index("--lr") + 1]) if "--lr" in extra else args.lr  # the last --lr wins
    return {"run": label, "schedule": report["schedule"]["name"], "epochs": args.epochs, "lr": lr,
            "flops_removed_pct": 100 * report["reduction"]["flops"],
            "params_removed_pct": 100 * report["reduction"]["params"],
            "top1_baseline": report["accuracy"]["before"],
            "top1_before_finetune": ft.get("top1_before_finetune"),
            "top1_after": report["accuracy"]["after"],
            "change": report["accuracy"]["after"] - report["accuracy"]["before"],
            "minutes": round(sum(h["seconds"] for h in ft["history"]) / 60, 1),
            "wall_minutes_this_call": round((time.time() - t0) / 60, 1),
            "command": "simprune prune " + " ".join(_plain("simprune " + " ".join(cmd[1:])))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=0.62)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--runs", nargs="*", default=list(RUNS), help=f"labels among {list(RUNS)}")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-finetune"))
    p.add_argument("--merge", action="store_true", help="keep rows of bench/results/finetune.json for other runs")
    args = p.parse_args()
    rows = []
    previous = RESULTS / "finetune.json"
    if args.merge and previous.exists():  # keep earlier rows of runs not repeated now
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["run"] not in args.runs]
    for label in args.runs:
        rows.append(run(label, RUNS[label], args, Path(args.out) / label.replace(" ", "-")))
        print_table(rows, ["run", "epochs", "flops_removed_pct", "params_removed_pct", "top1_baseline",
                           "top1_before_finetune", "top1_after", "change", "minutes"])
        path = write_json("finetune", {"target": args.target, "epochs": args.epochs, "lr": args.lr, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
