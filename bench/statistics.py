"""Cost of the statistics pass against a bare forward pass over the same images (1 thread).

The statistics of qsfm (SSIM + Gram + chance level) and feature-stats (M-std + cosine + Gram +
chance level) are gathered by hooks during one forward pass; goal (issue 13): <= 2x the bare
forward at the same precision, measured in process CPU time (the dev machine's two cores are
shared, so wall time mostly measures the neighbours; it is reported too). Each row runs in a fresh process so its peak RSS is its own:
``peak_mib`` is the process's peak, ``pass_growth_mib`` what the pass added to it. Most of that
growth is glibc keeping freed temporaries in its heap (with MALLOC_MMAP_THRESHOLD_=131072 the
ResNet-56 qsfm pass grows by 0 MiB, at a cost in speed); what the statistics themselves hold is a
few float64 C x C sums per probe (ResNet-50: about 0.5 GiB over its 2048- and 1024-channel probes).

Models: the committed ResNet-56 (32x32, 640 Fashion-MNIST images) and torchvision ResNet-50 with
random weights (224x224, 64 random images; speed only).

    python bench/statistics.py                        # table + bench/results/statistics.json
    python bench/statistics.py --models resnet56 --precisions bf16
    python bench/statistics.py --worker resnet56 bf16 qsfm   # one measurement (used internally)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"forward": None, "qsfm": {"ssim", "gram", "null"}, "feature-stats": {"mstd", "cosine", "gram", "null"},
           "qsfm-no-null": {"ssim", "gram"}}


def _model_and_batches(name: str):
    import torch

    if name == "resnet56":
        from simprune.calibrate.calibration import calibration_loader
        from simprune.io.files import load_model

        model, _ = load_model(ROOT / "zoo" / "resnet56-fashion-mnist")
        batches = [b for b in calibration_loader("fashion-mnist", 640, pad_to=32, batch_size=128)]
        return model.eval(), batches, (1, 32, 32)
    from simprune.models import build_model

    torch.manual_seed(0)
    model = build_model("torchvision:resnet50", num_classes=1000).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 224, 224, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    return model, batches, (3, 224, 224)


def worker(model_name: str, precision: str, what: str) -> dict:
    import torch

    from simprune.calibrate.calibration import collect_statistics
    from simprune.graph.groups import PruningGraph

    torch.set_num_threads(1)
    model, batches, shape = _model_and_batches(model_name)
    graph = PruningGraph(model, torch.zeros(1, *shape))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(batches[0][0][:8])  # warm-up: kernels chosen, memory pools filled
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    if what == "forward":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            for x, _ in batches:
                model(x)
    else:
        collect_statistics(model, graph, batches, METRICS[what], precision=precision, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": model_name, "precision": precision, "pass": what, "images": sum(len(b[0]) for b in batches),
            "seconds": seconds, "cpu_seconds": cpu, "peak_mib": rss1 / 1024, "pass_growth_mib": (rss1 - rss0) / 1024,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "PRECISION", "PASS"))
    ap.add_argument("--models", nargs="+", default=["resnet56", "resnet50"], choices=["resnet56", "resnet50"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--passes", nargs="+", default=list(METRICS), choices=list(METRICS))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = []
    for model_name in args.models:
        for precision in args.precisions:
            forward = None
            for what in ["forward"] + [p for p in args.passes if p != "forward"]:
                out = subprocess.run([sys.executable, __file__, "--worker", model_name, precision, what],
                                     capture_output=True, text=True, check=True, env=env)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                forward = row["cpu_seconds"] if what == "forward" else forward
                row["ratio_to_forward"] = row["cpu_seconds"] / forward
                rows.append(row)
                print(f"{model_name} {precision} {what}: {row['seconds']:.2f} s", file=sys.stderr)
    print_table(rows, ["model", "precision", "pass", "images", "seconds", "cpu_seconds", "ratio_to_forward", "peak_mib",
                       "pass_growth_mib"])
    print(f"wrote {write_json('statistics', {'rows': rows})}")


if __name__ == "__main__":
    main()
