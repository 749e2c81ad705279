"""YOLO detectors from ultralytics YAMLs (random weights: no pretrained YOLO weights here) pruned to 50 % of MACs
with l1 at 640 px, as a user types it: MACs before/after, params, peak memory and seconds of the prune (each model
in its own process), save + reload with identical outputs, ONNX verified in onnxruntime, and onnxruntime batch-1
one-thread latency at 320 and 640 px against the MAC speed-up.

    python bench/detection.py                       # prints a table, writes bench/results/detection.json
    python bench/detection.py --only yolov8n.yaml   # measures one model, keeps the others' rows

YOLO11n and YOLOv10n hold attention built from convolutions (C2PSA / PSA): simprune refuses them in one line
naming the --ignore that leaves the attention whole; the rows here pass that ignore (and record the refusal).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_json  # noqa: E402

MODELS = {"yolov8n.yaml": [], "yolov5nu.yaml": [], "yolo11n.yaml": ["model.10.m.0.attn.*"],
          "yolov10n.yaml": ["model.10.attn.*"]}
TARGET, SIZE, TIMED = 0.5, 640, (320, 640)


def _speedups(original, pruned, macs: tuple[float, float] | None, size: int, tmp: str) -> dict:
    from simprune.export.latency import export_for_timing, measure_onnx_many
    from simprune.graph.counting import count

    x = torch.zeros(1, 3, size, size)
    before, after = count(original, x).macs, count(pruned, x).macs
    files = export_for_timing([original, pruned], (3, size, size), Path(tmp) / f"t{size}")
    stats = measure_onnx_many(files, (3, size, size), 1, 1, 30, 3)
    measured = stats[0]["median_ms"] / stats[1]["median_ms"]
    return {"ms_before": stats[0]["median_ms"], "ms_after": stats[1]["median_ms"], "speedup": measured,
            "mac_speedup": before / after, "ratio": measured / (before / after),
            "stable": stats[1].get("vs_first", {}).get("stable")}


def one(name: str) -> dict:
    """Prune, save, reload, export and time one YOLO (run in a child process: its own peak memory)."""
    import simprune
    from simprune.errors import SimpruneError
    from simprune.export.onnx import export_onnx

    ignore = MODELS.get(name, [])
    row = {"model": f"ultralytics:{name}", "ignore": " ".join(ignore)}
    model = simprune.build_model(f"ultralytics:{name}")
    if ignore:
        try:
            simprune.prune(model, torch.zeros(1, 3, 64, 64), "l1", {"flops": TARGET})
        except SimpruneError as exc:
            row["refused_without_ignore"] = str(exc)
    start = time.perf_counter()
    pruned, report = simprune.prune(model, torch.zeros(1, 3, SIZE, SIZE), "l1", {"flops": TARGET},
                                    selection=simprune.Selection(ignore=ignore))
    row.update(seconds=time.perf_counter() - start, macs_before=report["macs"]["before"],
               macs_after=report["macs"]["after"], removed=report["reduction"]["flops"],
               params_before=report["params"]["before"], params_after=report["params"]["after"],
               peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, kept_width=report["kept_width"])
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        simprune.save(Path(tmp) / "m", pruned, report=report)
        back = simprune.load(Path(tmp) / "m")
        with torch.no_grad():
            row["reload_identical"] = bool(torch.equal(back(x), pruned.eval()(x)))
        row["onnx_verified"] = export_onnx(back, x, Path(tmp) / "m.onnx")["max_abs_diff"] is not None
        for size in TIMED:
            row[f"ort_{size}"] = _speedups(model.eval(), back, None, size, tmp)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(one(args.one)))
        return
    rows = []
    for name in args.only or list(MODELS):
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")), None)
        rows.append(json.loads(line[4:]) if line else {"model": f"ultralytics:{name}",
                                                      "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
    table = [{"model": r["model"], "MACs M": f"{r['macs_before'] / 1e6:.0f} -> {r['macs_after'] / 1e6:.0f}",
              "removed": r["removed"], "params M": f"{r['params_before'] / 1e6:.2f} -> {r['params_after'] / 1e6:.2f}",
              "peak MiB": r["peak_mib"], "s": r["seconds"], "reload": r["reload_identical"], "onnx": r["onnx_verified"],
              **{f"ort {s} px": f"{r[f'ort_{s}']['speedup']:.2f}x / {r[f'ort_{s}']['mac_speedup']:.2f}x "
                                f"({r[f'ort_{s}']['ratio']:.2f})" for s in TIMED}}
             if "error" not in r else {"model": r["model"], "MACs M": r["error"][:80]} for r in rows]
    print_table(table, ["model", "MACs M", "removed", "params M", "peak MiB", "s", "reload", "onnx",
                        *(f"ort {s} px" for s in TIMED)])
    if args.only:  # the other models' rows stay as the file has them
        rows = merged_rows(rows)
    print(f"write {write_json('detection', {'target': {'flops': TARGET}, 'size': SIZE, 'criterion': 'l1', 'rows': rows})}")


def merged_rows(measured: list[dict]) -> list[dict]:
    """The rows in bench/results/detection.json with ``measured`` put in place of the same models' rows,
    in MODELS order."""
    path = RESULTS / "detection.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    mine = {r["model"] for r in measured}
    rows = [r for r in old if r["model"] not in mine] + measured
    order = [f"ultralytics:{m}" for m in MODELS]
    return sorted(rows, key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))


if __name__ == "__main__":
    main()
