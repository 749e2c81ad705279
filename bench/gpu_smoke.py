"""The default CLI-equivalent prune on CUDA, compared with the CPU decision and timed.

    python bench/gpu_smoke.py --device cuda    # prints a table, writes bench/results/gpu_smoke.json

Two cases: the zoo's ResNet-20 (Fashion-MNIST) with calibration images from fashion-mnist-sample (the
default pipeline: refit-error scores + refit + BatchNorm re-estimation), and torchvision MobileNetV2 at
224 x 224 (ImageNet weights when `make weights` installed them, else random) with l1. Each is pruned on
the CPU and on the device; the row says whether the decision fingerprints agree (near-ties may flip
between kernels) and how long each took. Without CUDA it says so in one line and exits.
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
from simprune.errors import SimpruneError  # noqa: E402
from simprune.io.files import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cases(calib_images: int):
    """(name, model, example input, criterion, calibration) of each case."""
    resnet, desc = load_model(ROOT / "zoo" / "resnet20-fashion-mnist")
    shape = tuple(desc["input_shape"])
    pad_to = (desc.get("data") or {}).get("pad_to")
    calib = calibration_loader("fashion-mnist-sample", calib_images, pad_to=pad_to, seed=0)
    yield "resnet20 + fashion-mnist-sample", resnet.eval(), torch.zeros(1, *shape), None, calib
    try:
        mobilenet, weights = simprune.build_model("torchvision:mobilenet_v2", weights="DEFAULT"), "ImageNet"
    except SimpruneError:
        mobilenet, weights = simprune.build_model("torchvision:mobilenet_v2", num_classes=1000), "random"
    yield f"mobilenet_v2 224 ({weights} weights)", mobilenet.eval(), torch.zeros(1, 3, 224, 224), "l1", None


def _timed(model, example, criterion, calibration, device: str) -> tuple[dict, float]:
    """The CLI's default prune (half the MACs, its guards) on ``device``; returns (report, seconds)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, report = simprune.prune(model, example, criterion, {"macs": 0.5}, calibration=calibration,
                               schedule=simprune.OneShot(device=device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return report, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--calib-images", type=int, default=640)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA here (torch {torch.__version__}); nothing to compare, run this on a GPU machine")
        return 0
    rows = []
    for name, model, example, criterion, calib in _cases(args.calib_images):
        cpu, cpu_s = _timed(model, example, criterion, calib, "cpu")
        dev, dev_s = _timed(model, example, criterion, calib, args.device)
        rows.append({"case": name, "criterion": cpu["criterion"], "cpu_fingerprint": cpu["decision_fingerprint"],
                     "device_fingerprint": dev["decision_fingerprint"],
                     "same_decision": cpu["decision_fingerprint"] == dev["decision_fingerprint"],
                     "macs_removed_cpu": cpu["reduction"]["flops"], "macs_removed_device": dev["reduction"]["flops"],
                     "cpu_s": cpu_s, "device_s": dev_s, "reconstructed": bool(dev.get("reconstructed"))})
    print_table(rows, ["case", "criterion", "same_decision", "macs_removed_cpu", "macs_removed_device", "cpu_s",
                       "device_s"])
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    write_json("gpu_smoke", {"command": "python bench/gpu_smoke.py --device " + args.device, "device": device_name,
                             "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
