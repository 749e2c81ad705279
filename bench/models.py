"""Every torchvision CNN (classification and segmentation) and the timm families, as a user types them:
prune to 50 % MACs with the defaults, check the MACs, save, reload from the folder alone with identical
outputs, export to ONNX (verified by onnxruntime).

    python bench/models.py                 # all; prints a table, writes bench/results/models.json
    python bench/models.py --only torchvision:resnext50_32x4d timm:ghostnet_100
    python bench/models.py --family timm   # timm only (torchvision, timm)
    python bench/models.py --resume        # keep the rows already in the JSON, run the others

Transformers (vit, swin, maxvit) are not convolutional networks and are not tried; simprune refuses
them in one line. Small inputs (64x64; Inception-v3 at 299) keep the run short: the architecture is
the same at any size.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import simprune  # noqa: E402
from common import RESULTS, print_table, write_json  # noqa: E402
from simprune.models.torchvision_models import TRANSFORMERS, classification_model_names, segmentation_model_names  # noqa: E402

TIMM = ["resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_small_100", "mobilenetv3_large_100", "regnetx_002",
        "regnety_002", "convnext_atto", "ghostnet_100"]
TARGET, WITHIN = 0.5, 0.015


def input_size(name: str) -> int:
    return 299 if "inception" in name else 64


def model_names(family: str | None = None) -> list[str]:
    tv = [f"torchvision:{n}" for n in classification_model_names() + segmentation_model_names()
          if not n.startswith(TRANSFORMERS)]
    timm = [f"timm:{n}" for n in TIMM]
    return {"torchvision": tv, "timm": timm}.get(family, tv + timm)


def _main_output(out):
    return out["out"] if isinstance(out, dict) else out


class _MainOutput(torch.nn.Module):
    """Segmentation models return {"out": ...}; export and compare that tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return _main_output(self.model(x))


def check_model(name: str, size: int | None = None, target: float = TARGET, export: bool = True) -> dict:
    """Prune ``name`` to ``target`` MACs removed and check it end to end; returns a result row."""
    size = size or input_size(name)
    row = {"model": name, "input": size}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = simprune.build_model(name).eval()
    x = torch.randn(1, 3, size, size)
    pruned, report = simprune.prune(model, x, "l1", {"flops": target})
    row.update(removed=report["reduction"]["flops"], round_to=report["round_to"])
    assert abs(row["removed"] - target) <= WITHIN, f"removed {row['removed']:.3f} of MACs, asked {target}"
    with tempfile.TemporaryDirectory() as tmp:
        simprune.save(Path(tmp) / "m", pruned)
        back = simprune.load(Path(tmp) / "m")
        with torch.no_grad():
            same = torch.equal(_main_output(back(x)), _main_output(pruned(x)))
        assert same, "reloaded model gives other outputs"
        if export:
            from simprune.export.onnx import export_onnx  # noqa: PLC0415 - needs onnx/onnxruntime

            info = export_onnx(_MainOutput(back), x, Path(tmp) / "m.onnx")
            row["onnx_diff"] = info["max_abs_diff"]
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="these models only")
    ap.add_argument("--family", choices=["torchvision", "timm"], default=None)
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep the rows of bench/results/models.json, run the rest")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    if args.resume and (RESULTS / "models.json").exists():
        rows = json.loads((RESULTS / "models.json").read_text())["rows"]
    done = {r["model"] for r in rows}
    for name in [n for n in args.only or model_names(args.family) if n not in done]:
        t0 = time.perf_counter()
        try:
            row = {**check_model(name, export=not args.no_export), "outcome": "ok"}
        except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
            first = (str(exc).splitlines() or [""])[0][:160]
            row = {"model": name, "outcome": f"{type(exc).__name__}: {first}",
                   "seconds": time.perf_counter() - t0}
            if not isinstance(exc, (AssertionError, simprune.SimpruneError)):
                traceback.print_exc()
        rows.append(row)
        print(f"{name}: {row['outcome']} ({row['seconds']:.1f} s)", flush=True)
        ok = sum(r["outcome"] == "ok" for r in rows)
        write_json("models", {"target_flops": TARGET, "within": WITHIN, "onnx": not args.no_export, "ok": ok,
                              "tried": len(rows), "rows": rows})  # after every row: a long run keeps what it did
    ok = sum(r["outcome"] == "ok" for r in rows)
    print_table(rows, ["model", "input", "removed", "round_to", "onnx_diff", "outcome", "seconds"])
    print(f"{ok}/{len(rows)} pruned to {TARGET:.0%} MACs within {WITHIN * 100:.1f} points, reloaded identical"
          f"{'' if args.no_export else ', exported to ONNX'}")


if __name__ == "__main__":
    main()
