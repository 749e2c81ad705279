"""`simprune demo`: the mission in one command on the committed Fashion-MNIST ResNet-56.

Prunes about half the MACs with QSFM (no fine-tuning), compares with L1 and random
on the same model, data, target and allocator settings (the same protected groups, BN
statistics re-estimated on the same calibration images), and writes a JSON report. Needs the Fashion-MNIST
files (``apt-get install dataset-fashion-mnist``) until the package ships a sample.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from .errors import SimpruneError

ZOO = Path(__file__).resolve().parents[2] / "zoo"
CRITERIA = [("qsfm", {"similarity": "ssim", "progress": False}), ("l1", {}), ("random", {})]


def run_demo(out: Path, target: float = 0.5, eval_images: int | None = None, checkpoint: Path | None = None,
             overwrite: bool = False) -> dict:
    from . import api  # noqa: PLC0415
    from .calibration import calibration_loader  # noqa: PLC0415
    from .data import load_dataset  # noqa: PLC0415
    from .files import atomic_output_dir, atomic_write_json  # noqa: PLC0415
    from .training import evaluate  # noqa: PLC0415

    checkpoint = checkpoint or ZOO / "resnet56-fashion-mnist"
    if not (Path(checkpoint) / "model.safetensors").exists():
        raise SimpruneError(f"demo model {checkpoint} not found; run from a simprune checkout (zoo/) "
                            "or pass --checkpoint")
    model, desc = api.load_model(checkpoint)
    data, pad_to = desc["data"]["name"], desc["data"]["pad_to"]
    test = load_dataset(data, "test", pad_to=pad_to)
    if eval_images:
        test = Subset(test, range(min(eval_images, len(test))))
    calib = calibration_loader(data, 640, pad_to=pad_to, seed=0)
    example = torch.zeros(1, *desc["input_shape"])
    rows = [{"criterion": "unpruned", "top1": evaluate(model, test)["top1"], "macs": None, "params": None}]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for name, options in CRITERIA:
            t0 = time.perf_counter()
            pruned, report = api.prune(model, example, name, {"flops": target}, calibration=calib,
                                       criterion_options=options, protect_uncompensable=True)
            top1 = evaluate(pruned, test)["top1"]
            rows.append({"criterion": name, "top1": top1, "macs": report["macs"]["after"],
                         "params": report["params"]["after"], "flops_removed": report["reduction"]["flops"],
                         "params_removed": report["reduction"]["params"], "seconds": time.perf_counter() - t0})
            if name == "qsfm":
                api.save(tmp / "qsfm-model", pruned, {**{k: desc[k] for k in ("model", "model_args", "data")},
                                                      "input_shape": desc["input_shape"]}, report)
        summary = {"checkpoint": str(checkpoint), "target_flops": target, "test_images": len(test), "rows": rows}
        atomic_write_json(tmp / "report.json", summary)
    return summary


def print_summary(summary: dict) -> None:
    base = summary["rows"][0]["top1"]
    print(f"{'criterion':10s} {'top-1 %':>8s} {'change':>7s} {'MACs removed':>13s} {'params removed':>15s}")
    for r in summary["rows"]:
        if r["macs"] is None:
            print(f"{r['criterion']:10s} {r['top1']:8.2f} {'':>7s} {'':>13s} {'':>15s}")
        else:
            print(f"{r['criterion']:10s} {r['top1']:8.2f} {r['top1'] - base:+7.2f} {r['flops_removed']:13.1%} "
                  f"{r['params_removed']:15.1%}")
