"""`simprune demo` as `make demo` runs it, measured for the README's first screen.

Runs the demo (the default pipeline against the seeds' methods and the l1 / random floors on the shipped
Fashion-MNIST ResNet-56 at half its MACs; the full test set when Debian's dataset-fashion-mnist is
installed, else the shipped sample) into a temporary folder and writes its report, less the per-layer
widths, to bench/results/demo.json with the wall time of the whole command.

    python bench/demo.py        # then python bench/readme.py renders the README caption
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402
from simprune.cli.demo import run_demo  # noqa: E402

KEPT = ("model", "data", "test_images", "calibration", "target_flops", "round_to", "baseline_top1", "rows", "kept",
        "chosen", "int8", "latency_ms", "speedup", "seconds")


def main() -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_demo(Path(tmp) / "demo")
    wall = time.perf_counter() - t0
    print_table(summary["rows"], ["label", "top1", "change", "flops_removed", "seconds"])
    write_json("demo", {**{k: summary.get(k) for k in KEPT}, "wall_s": wall})


if __name__ == "__main__":
    main()
