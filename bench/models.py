"""Every torchvision CNN (classification and segmentation), the timm families, ultralytics' YOLO detectors
(from their YAML files) and Hugging Face transformers CNNs (from their configs), as a user holds them: prune
to 50 % MACs with the defaults, check the MACs, save, reload (from the folder alone; a transformers model
into a fresh instance of its class) with identical outputs, export to ONNX with every output verified.
A model refused for a layer simprune cannot prune (YOLO11's and YOLOv10's attention) is pruned again with
the ``ignore`` the refusal names, recorded in its row.

    python bench/models.py                 # all; prints a table, writes bench/results/models.json
    python bench/models.py --only torchvision:resnext50_32x4d timm:ghostnet_100
    python bench/models.py --family timm   # timm only (torchvision, timm, ultralytics, transformers)
    python bench/models.py --resume        # keep the rows already in the JSON, run the others

Vision transformers (vit, swin, maxvit) are not convolutional networks and are not tried; simprune
refuses them in one line. Small inputs (64x64; Inception-v3 at 299) keep the run short: the architecture is
the same at any size.
"""
from __future__ import annotations

import argparse
import json
import re
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
YOLO = ["yolov8n.yaml", "yolov5nu.yaml", "yolo11n.yaml", "yolov10n.yaml", "yolov8s-seg.yaml"]
HF = {"resnet-50": ("ResNetConfig", "ResNetForImageClassification"),  # the configs' defaults: ResNet-50,
      "convnext-tiny": ("ConvNextConfig", "ConvNextForImageClassification")}  # ConvNeXt-T
FAMILIES = ("torchvision", "timm", "ultralytics", "transformers")
TARGET, WITHIN = 0.5, 0.015


def input_size(name: str) -> int:
    return 299 if "inception" in name else 64


def model_names(family: str | None = None) -> list[str]:
    names = {"torchvision": [f"torchvision:{n}" for n in classification_model_names() + segmentation_model_names()
                             if not n.startswith(TRANSFORMERS)],
             "timm": [f"timm:{n}" for n in TIMM], "ultralytics": [f"ultralytics:{n}" for n in YOLO],
             "transformers": [f"transformers:{n}" for n in HF]}
    return names[family] if family else [n for f in FAMILIES for n in names[f]]


def builder(name: str):
    """A function returning a fresh, seeded instance of ``name`` (transformers: from its config's defaults;
    simprune has no transformers registry, a user passes the instance)."""
    if name.startswith("transformers:"):
        import transformers  # noqa: PLC0415 - optional (the test extra)
        config, cls = HF[name.partition(":")[2]]
        return lambda: (torch.manual_seed(0), getattr(transformers, cls)(getattr(transformers, config)()).eval())[1]
    return lambda: (torch.manual_seed(0), simprune.build_model(name).eval())[1]


def check_model(name: str, size: int | None = None, target: float = TARGET, export: bool = True) -> dict:
    """Prune ``name`` to ``target`` MACs removed and check it end to end; returns a result row."""
    from simprune.export.onnx import flatten_outputs  # noqa: PLC0415

    size = size or input_size(name)
    row = {"model": name, "input": size}
    t0 = time.perf_counter()
    build = builder(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        pruned, report = simprune.prune(build(), x, "l1", {"flops": target})
    except simprune.SimpruneError as exc:  # a refused layer: follow the one line's advice, as a user would
        suggested = re.search(r"ignore=(\S+)", str(exc))
        if not suggested:
            raise
        row["ignore"] = suggested.group(1)
        pruned, report = simprune.prune(build(), x, "l1", {"flops": target},
                                        selection=simprune.Selection(ignore=(row["ignore"],)))
    row.update(removed=report["reduction"]["flops"], round_to=report["round_to"],
               outputs=len(flatten_outputs(pruned.eval()(x))))
    assert abs(row["removed"] - target) <= WITHIN, f"removed {row['removed']:.3f} of MACs, asked {target}"
    with tempfile.TemporaryDirectory() as tmp:
        simprune.save(Path(tmp) / "m", pruned)
        back = simprune.load(Path(tmp) / "m", build() if name.startswith("transformers:") else None)
        with torch.no_grad():
            same = all(torch.equal(a, b) for a, b in zip(flatten_outputs(back.eval()(x)),
                                                         flatten_outputs(pruned(x)), strict=True))
        assert same, "reloaded model gives other outputs"
        if export:
            from simprune.export.onnx import export_onnx  # noqa: PLC0415 - needs onnx/onnxruntime

            info = export_onnx(back, x, Path(tmp) / "m.onnx")
            row["onnx_diff"] = info["max_abs_diff"]
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="these models only")
    ap.add_argument("--family", choices=FAMILIES, default=None)
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
    print_table(rows, ["model", "input", "removed", "round_to", "outputs", "ignore", "onnx_diff", "outcome", "seconds"])
    print(f"{ok}/{len(rows)} pruned to {TARGET:.0%} MACs within {WITHIN * 100:.1f} points, reloaded identical"
          f"{'' if args.no_export else ', exported to ONNX'}")


if __name__ == "__main__":
    main()
