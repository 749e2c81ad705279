"""YOLO detectors from ultralytics YAMLs (random weights: no pretrained YOLO weights here) pruned to 50 % of MACs
at 640 px, as a user types it, two ways: l1 with no data (removal only), and the library's defaults with 8
real photographs as calibration (``--calib-data DIR``: criterion, refit and BatchNorm re-estimation chosen by
simprune). Per row: MACs before/after, params, peak memory and seconds of the prune (each run in its own
process), save + reload with identical outputs, ONNX verified in onnxruntime, onnxruntime batch-1 one-thread
latency at 320 and 640 px against the MAC speed-up, and how far the feature maps the Detect head reads move
from the unpruned model's on 6 other photographs (relative L2 error).

    python bench/detection.py                       # prints a table, writes bench/results/detection.json
    python bench/detection.py --only yolov8n.yaml   # measures one model, keeps the others' rows
    python bench/detection.py --calib-data DIR      # your photos for the default pipeline (default: 8 of
                                                    # scikit-image's, written to a temporary folder)

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
PIPELINES = ("l1", "default")  # l1 without data; the defaults with the calibration photos
CALIBRATION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field",
                      "stereo_motorcycle")
HELD_OUT_PHOTOS = ("immunohistochemistry", "retina", "moon", "gravel", "brick", "grass")


def _photo(name: str):
    """A scikit-image photograph as an HxWx3 uint8 array (the stereo pair's left image)."""
    import numpy as np
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img[0] if isinstance(img, tuple) else img
    return np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]


def write_photos(folder: Path, names=CALIBRATION_PHOTOS) -> Path:
    """The calibration photographs as PNG files: the folder a user would pass as --calib-data."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(_photo(name)).save(folder / f"{name}.png")
    return folder


def held_out_batch(tmp: str) -> torch.Tensor:
    """The held-out photographs read the way the calibration ones are (ultralytics' 0-1 input at SIZE)."""
    from simprune.io.images import calibration_images, ultralytics_preprocess

    folder = write_photos(Path(tmp) / "held-out", HELD_OUT_PHOTOS)
    return torch.cat(list(calibration_images(folder, ultralytics_preprocess(SIZE), n_images=None)))


def head_logit_layers(model) -> list[torch.nn.Module]:
    """The last conv of each of the Detect head's box and class branches (one-to-many and one-to-one):
    their outputs are the raw logits, fixed width, before the anchor decoding."""
    head = model.model[-1]
    branches = [getattr(head, n, None) for n in ("cv2", "cv3", "one2one_cv2", "one2one_cv3")]
    return [level[-1] for branch in branches if branch is not None for level in branch]


def varying_part(logits: torch.Tensor) -> torch.Tensor:
    """The logits less each channel's mean over the batch and positions, flattened."""
    return (logits - logits.mean(dim=(0, 2, 3), keepdim=True)).flatten()


def output_error(original, pruned, x: torch.Tensor) -> float:
    """||pruned - original|| / ||original|| of the part of the Detect head's raw box and class logits that
    varies with the photo (each channel less its mean over photos and positions). With random weights the
    logits are almost all bias (an l1 prune moved them by 2e-8 in all), so only what varies shows what the
    pruning and repair keep; the decoded predictions (anchor grid, sigmoid) and the pruned neck show less."""
    def logits(model) -> torch.Tensor:
        grabbed = []
        handles = [m.register_forward_hook(lambda m, args, out: grabbed.append(varying_part(out)))
                   for m in head_logit_layers(model)]
        with torch.no_grad():
            model.eval()(x)
        for h in handles:
            h.remove()
        return torch.cat(grabbed)

    a, b = logits(original), logits(pruned)
    return float((b - a).norm() / a.norm())


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


def _prune(model, pipeline: str, calib_dir: str | None, ignore: list[str]):
    """One prune to TARGET: l1 with no data, or the defaults with the photos in ``calib_dir``."""
    import simprune
    from simprune.io.images import calibration_images, ultralytics_preprocess

    selection = simprune.Selection(ignore=ignore)
    x = torch.zeros(1, 3, SIZE, SIZE)
    if pipeline == "l1":
        return simprune.prune(model, x, "l1", {"flops": TARGET}, selection=selection)
    calibration = calibration_images(calib_dir, ultralytics_preprocess(SIZE), n_images=None)
    return simprune.prune(model, x, None, {"flops": TARGET}, calibration=calibration, selection=selection)


def one(name: str, pipeline: str, calib_dir: str | None) -> dict:
    """Prune, save, reload, export and time one YOLO (run in a child process: its own peak memory)."""
    import simprune
    from simprune.errors import SimpruneError
    from simprune.export.onnx import export_onnx

    ignore = MODELS.get(name, [])
    row = {"model": f"ultralytics:{name}", "pipeline": pipeline, "ignore": " ".join(ignore)}
    model = simprune.build_model(f"ultralytics:{name}")
    if ignore and pipeline == "l1":
        try:
            simprune.prune(model, torch.zeros(1, 3, 64, 64), "l1", {"flops": TARGET})
        except SimpruneError as exc:
            row["refused_without_ignore"] = str(exc)
    start = time.perf_counter()
    pruned, report = _prune(model, pipeline, calib_dir, ignore)
    row.update(seconds=time.perf_counter() - start, macs_before=report["macs"]["before"],
               macs_after=report["macs"]["after"], removed=report["reduction"]["flops"],
               params_before=report["params"]["before"], params_after=report["params"]["after"],
               peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, kept_width=report["kept_width"],
               criterion=report["criterion"], refit=bool(report.get("reconstructed")),
               calibration_images=len(list(Path(calib_dir).iterdir())) if pipeline != "l1" else 0)
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        row["held_out_output_error"] = output_error(model, pruned, held_out_batch(tmp))
        simprune.save(Path(tmp) / "m", pruned, report=report)
        back = simprune.load(Path(tmp) / "m")
        with torch.no_grad():
            row["reload_identical"] = bool(torch.equal(back(x), pruned.eval()(x)))
        row["onnx_verified"] = export_onnx(back, x, Path(tmp) / "m.onnx")["max_abs_diff"] is not None
        for size in TIMED:
            row[f"ort_{size}"] = _speedups(model.eval(), back, None, size, tmp)
    return row


def _run_one(name: str, pipeline: str, calib_dir: str) -> dict:
    """``one`` in a child process (its own peak memory); an error row when it fails."""
    done = subprocess.run([sys.executable, __file__, "--one", name, "--pipeline", pipeline, "--calib-data", calib_dir],
                          capture_output=True, text=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")), None)
    return json.loads(line[4:]) if line else {"model": f"ultralytics:{name}", "pipeline": pipeline,
                                              "error": (done.stderr.strip().splitlines() or ["?"])[-1]}


def _table_row(r: dict) -> dict:
    if r.get("error"):
        return {"model": r["model"], "pipeline": r.get("pipeline", "l1"), "MACs M": r["error"][:80]}
    return {"model": r["model"], "pipeline": f"{r['pipeline']} ({r['criterion']})",
            "MACs M": f"{r['macs_before'] / 1e6:.0f} -> {r['macs_after'] / 1e6:.0f}", "removed": r["removed"],
            "params M": f"{r['params_before'] / 1e6:.2f} -> {r['params_after'] / 1e6:.2f}",
            "peak MiB": r["peak_mib"], "s": r["seconds"], "reload": r["reload_identical"], "onnx": r["onnx_verified"],
            "output error": r["held_out_output_error"],
            **{f"ort {s} px": f"{r[f'ort_{s}']['speedup']:.2f}x / {r[f'ort_{s}']['mac_speedup']:.2f}x "
                              f"({r[f'ort_{s}']['ratio']:.2f})" for s in TIMED}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None, help="YAML names to measure (default: all)")
    parser.add_argument("--pipelines", nargs="*", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--calib-data", default=None, help="a folder of photos (default: 8 of scikit-image's)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", default="l1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(one(args.one, args.pipeline, args.calib_data)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        calib_dir = args.calib_data or str(write_photos(Path(tmp) / "photos"))
        rows = [_run_one(name, p, calib_dir) for name in args.only or list(MODELS) for p in args.pipelines]
    print_table([_table_row(r) for r in rows], ["model", "pipeline", "MACs M", "removed", "params M", "peak MiB",
                                                "s", "reload", "onnx", "output error", *(f"ort {s} px" for s in TIMED)])
    if args.only or set(args.pipelines) != set(PIPELINES):  # the other rows stay as the file has them
        rows = merged_rows(rows)
    payload = {"target": {"flops": TARGET}, "size": SIZE, "pipelines": {
        "l1": "l1, no data: removal only", "default": "simprune's defaults with the calibration photos "
        f"({'--calib-data ' + args.calib_data if args.calib_data else 'scikit-image: ' + ', '.join(CALIBRATION_PHOTOS)})"},
        "held_out_photos": list(HELD_OUT_PHOTOS), "rows": rows}
    print(f"write {write_json('detection', payload)}")


def merged_rows(measured: list[dict]) -> list[dict]:
    """The rows in bench/results/detection.json with ``measured`` put in place of the same (model, pipeline)
    rows, in MODELS then PIPELINES order."""
    path = RESULTS / "detection.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    mine = {(r["model"], r.get("pipeline", "l1")) for r in measured}
    rows = [r for r in old if (r["model"], r.get("pipeline", "l1")) not in mine] + measured
    order = [(f"ultralytics:{m}", p) for m in MODELS for p in PIPELINES]
    key = (lambda r: order.index((r["model"], r.get("pipeline", "l1"))) if (r["model"], r.get("pipeline", "l1"))
           in order else len(order))
    return sorted(rows, key=key)


if __name__ == "__main__":
    main()
