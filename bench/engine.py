"""Time graph building (Torch-Pruning DependencyGraph) and global allocation on the model zoo.

    python bench/engine.py            # prints a table, writes bench/results/engine.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402
from simprune.allocation.allocator import CostModel, Guards, allocate  # noqa: E402
from simprune.criteria import get_criterion  # noqa: E402
from simprune.graph.counting import count  # noqa: E402
from simprune.graph.groups import PruningGraph  # noqa: E402
from simprune.models import build_model  # noqa: E402

MODELS = [("resnet20", 32), ("resnet56", 32), ("resnet56_b", 32), ("resnet110", 32), ("vgg16", 32),
          ("mobilenetv2", 32), ("torchvision:resnet18", 224), ("torchvision:resnet50", 224),
          ("torchvision:mobilenet_v2", 224), ("torchvision:vgg16_bn", 224), ("torchvision:densenet121", 224)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", type=float, default=0.5)
    args = ap.parse_args()
    rows = []
    for name, size in MODELS:
        model = build_model(name).eval()
        x = torch.zeros(1, 3, size, size)
        t0 = time.perf_counter()
        base = count(model, x)
        t1 = time.perf_counter()
        graph = PruningGraph(model, x)
        t2 = time.perf_counter()
        cost = CostModel(graph.groups, base)
        scores = get_criterion("l1").score(graph).scores
        t3 = time.perf_counter()
        alloc = allocate(graph.groups, scores, cost, {"flops": args.target}, Guards())
        t4 = time.perf_counter()
        rows.append({"model": name, "input": f"3x{size}x{size}", "groups": len(graph.groups),
                     "channels": sum(g.size for g in graph.groups), "count_s": t1 - t0, "graph_s": t2 - t1,
                     "score_s": t3 - t2, "allocate_s": t4 - t3, "total_s": t4 - t0,
                     "reduction": round(alloc.reduction, 4)})
        print(f"{name}: {rows[-1]['total_s']:.2f} s", file=sys.stderr)
    print_table(rows, ["model", "input", "groups", "channels", "count_s", "graph_s", "score_s", "allocate_s",
                       "total_s", "reduction"])
    print(f"wrote {write_json('engine', {'target_flops': args.target, 'rows': rows})}")


if __name__ == "__main__":
    main()
