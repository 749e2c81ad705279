"""Render the benchmark JSON files into the result tables of README.md and docs/*.md (never typed by hand).

    python bench/readme.py          # rewrite the <!-- bench:NAME --> blocks of README.md and docs/*.md
    python bench/readme.py --check  # exit 1 if a page differs from what the JSON files give
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"


def pages() -> list[Path]:
    """Every page that may hold rendered blocks: the README and the docs."""
    return [README] + sorted((ROOT / "docs").glob("*.md"))


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _machine(data: dict) -> str:
    m = data["machine"]
    return f"Measured on {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), torch {m['torch']}."


def render_engine(data: dict) -> str:
    rows = [[r["model"], r["input"], r["groups"], r["channels"], f"{r['graph_s']:.2f}", f"{r['allocate_s']:.3f}",
             f"{100 * r['reduction']:.1f}"] for r in data["rows"]]
    return _table(["model", "input", "groups", "channels", "graph s", "allocation s", "MACs removed %"], rows) + \
        f"\n\n{_machine(data)} `python bench/engine.py` (target {data['target_flops']})."


def render_calibration(data: dict) -> str:
    rows = [[r["criterion"], r["images"], f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}",
             "" if "peak_growth_vs_smallest_%" not in r else f"{r['peak_growth_vs_smallest_%']:+.1f}"]
            for r in data["rows"]]
    return _table(["statistics for", "images", "seconds", "peak MiB", "peak growth %"], rows) + \
        f"\n\n{_machine(data)} `python bench/calibration.py` (ResNet-56, one statistics pass)."


def render_scale(data: dict) -> str:
    rows = [[r["sweep"], r["model"].replace("torchvision:", ""), r["resolution"], r["images"], r.get("batch", ""),
             f"{r['stats_s']:.1f}", f"{r['forward_s']:.1f}", f"{r['ratio']:.1f}", f"{r['stats_growth_mib']:.0f}",
             f"{r['forward_growth_mib']:.0f}"] for r in data["rows"]]
    text = _table(["sweep", "model", "px", "images", "batch", "statistics s", "bare forward s", "ratio",
                   "statistics peak growth MiB", "forward peak growth MiB"], rows)
    if data.get("torchrun"):
        text += "\n\n" + _table(["torchrun processes", "images", "px", "statistics wall s", "speed-up"],
                                 [[r["processes"], r["images"], r["resolution"], f"{r['stats_s']:.1f}",
                                   f"{r['speedup']:.2f}"] for r in data["torchrun"]])
    text += f"\n\n{_machine(data)} `OMP_NUM_THREADS=1 python bench/scale.py` (qsfm statistics in the calibration " \
        "loader's batches, random weights and images; torchrun rows: `--images --keep --torchrun 1 2`)."
    return text + (_render_stages(data["stages"]) if data.get("stages") else "")


def _render_stages(stages: list[dict]) -> str:
    """The stage table of ``bench/scale.py --stages``: seconds per stage, the statistics against a forward."""
    names = ("statistics", "scoring", "allocation", "removal", "refit", "bn", "recovery", "export")
    rows = []
    for r in sorted(stages, key=lambda r: (r["model"], r["precision"], r["resolution"], r["images"])):
        if "error" in r:
            rows.append([r["model"].replace("torchvision:", ""), r["resolution"], r["images"], r["precision"],
                         f"failed: {r['error'][:80]}"] + [""] * (len(names) + 3))
            continue
        rows.append([r["model"].replace("torchvision:", ""), r["resolution"], r["images"], r["precision"],
                     f"{r['forward_s']:.1f}"] + [f"{r[f'{n}_s']:.1f}" for n in names[:-2]] +
                    [f"{r['recovery_s']:.0f} ({r['recovery_s_per_step']:.1f}/step)", f"{r['export_s']:.1f}"] +
                    [f"{r['total_s']:.0f}", f"{r['statistics_x']:.1f}", f"{r['peak_growth_mib']:.0f}"])
    first = stages[0]
    return "\n\n" + _table(["model", "px", "images", "precision", "bare forward s", *(f"{n} s" for n in names),
                              "total s", "statistics / forward", "peak growth MiB"], rows) + \
        f"\n\nStage rows: {first.get('threads', 2)} torch threads, criterion {first.get('criterion', 'qsfm')}, 30 % of " \
        f"the MACs, refit + BatchNorm, recovery cut to {first.get('recovery_steps')} steps (the default runs 600: " \
        "multiply the recovery's seconds per step), ONNX export with its check; `python bench/scale.py --images " \
        "--keep --stages`."


def _quality_table(m: dict) -> str:
    """One model: a line per (criterion, repair), a column per MACs target."""
    by: dict[tuple[str, str], dict] = {}
    for r in m["rows"]:
        by.setdefault((r["criterion"], r["repair"]), {})[r["target"]] = r
    order = list(dict.fromkeys(r["criterion"] for r in m["rows"]))
    keys = sorted(by, key=lambda k: (order.index(k[0]), k[1] == "refit"))
    targets = sorted({r["target"] for r in m["rows"]})
    header = ["criterion", "reconstruction"] + [f"{100 * t:.0f} % MACs: top-1 (change)" for t in targets]
    rows = [[crit, repair] + [f"{by[(crit, repair)][t]['top1']:.2f} ({by[(crit, repair)][t]['change']:+.2f})"
                              if t in by[(crit, repair)] else "" for t in targets] for crit, repair in keys]
    best = []
    for t in targets:
        ours = [r for r in m["rows"] if r["target"] == t and not r["criterion"].startswith("tp:")]
        peers = [r for r in m["rows"] if r["target"] == t and r["criterion"].startswith("tp:")]
        if ours:
            top = max(ours, key=lambda r: r["top1"])
            line = f"{100 * t:.0f} %: {top['criterion']} + {top['repair']} {top['top1']:.2f}"
            bare = [r for r in peers if not r["reconstructed"]]
            refit = [r for r in peers if r["reconstructed"]]
            if bare:
                peer = max(bare, key=lambda r: r["top1"])
                line += f" (best Torch-Pruning importance as it comes: {peer['criterion']} {peer['top1']:.2f}"
                if refit:
                    peer = max(refit, key=lambda r: r["top1"])
                    line += f"; given our refit: {peer['criterion']} {peer['top1']:.2f}"
                line += ")"
            best.append(line)
    text = (f"**{m['model']}** (`{m['checkpoint']}`, baseline top-1 {m['baseline_top1']:.2f} % on "
            f"{m['eval_images']} test images, {m['calib_images']} calibration images):\n\n" + _table(header, rows) +
            "\n\nBest simprune row per target: " + "; ".join(best) + ".")
    sp = m.get("speed")
    if sp:
        text += (f" The whole prune with reconstruction at {100 * sp['target']:.0f} % ({sp['criterion']}, from "
                 f"scratch) took {sp['prune_cpu_s']:.1f} s of CPU time: {sp['ratio_fp32']:.1f}x a bare fp32 forward "
                 f"over the same images ({sp['bare_forward_fp32_cpu_s']:.1f} s), {sp['ratio_bf16']:.1f}x a bf16 "
                 f"autocast one ({sp['bare_forward_bf16_cpu_s']:.1f} s); {sp['layers_refit']} layers refit in "
                 f"{sp['blocks']} blocks, largest Gram {sp['largest_gram_mib']:.1f} MiB, stored block inputs "
                 f"{sp['frontier_mib']:.0f} MiB.")
    text += " Commands: " + ", ".join(f"`{c}`" for c in m.get("commands") or [m["command"].strip()]) + "."
    if m.get("ablations"):
        targets = sorted({r["target"] for r in m["ablations"]})
        cells = {(r["variant"], r["target"]): r for r in m["ablations"]}
        variants = list(dict.fromkeys(r["variant"] for r in m["ablations"]))
        text += (f"\n\nWhat each part of the refit adds (refit-error selection; `{m['ablations_command'].strip()}`):\n\n" + _table(["refit", *[f"{100 * t:.0f} % MACs: top-1 (change)" for t in targets]],
                                                [[v, *[f"{cells[(v, t)]['top1']:.2f} ({cells[(v, t)]['change']:+.2f})"
                                                       if (v, t) in cells else "" for t in targets]] for v in variants]))
    return text


def render_quality(data: dict) -> str:
    return "\n\n".join(_quality_table(m) for m in data["models"]) + f"\n\nNo fine-tuning. {_machine(data)}"


def render_recovery(data: dict) -> str:
    return ("\n\n".join(_quality_table(m) for m in data["models"]) + "\n\n'refit + recovery' rows train the pruned "
            "model on the unlabelled calibration images against the unpruned one (label-free recovery, 20 % of the "
            "images held aside from every step for its early stopping, so its refit reads 80 %); 'refit' rows do "
            f"not train. {_machine(data)}")


IMAGENET_CRITERIA = ("auto", "refit-error", "qsfm", "feature-stats", "filter-similarity", "l1", "tp:l2")
IMAGENET_REPAIRS = ("none", "refit", "refit + recovery")


def _imagenet_order(row: dict) -> tuple:
    """Criteria in bench/imagenet.py's order, then target, then repair."""
    c = row["criterion"]
    return (IMAGENET_CRITERIA.index(c) if c in IMAGENET_CRITERIA else len(IMAGENET_CRITERIA), c, row["target"],
            IMAGENET_REPAIRS.index(row["repair"]) if row["repair"] in IMAGENET_REPAIRS else 9)


def _views(row: dict) -> str:
    """Views per calibration image the refit read (rows written before views existed read one)."""
    return "" if row["repair"] == "none" else str(row.get("refit_views") or 1)


def render_imagenet_line(data: dict) -> str:
    """One README line: the default pipeline on MobileNetV2 at 35 % and 20 % of MACs, with and without recovery."""
    rows = {(r["target"], r["repair"]): r for r in data["rows"] if r["criterion"] == "auto"}  # the default
    parts = []
    for target in (0.35, 0.2):
        refit, rec = rows.get((target, "refit")), rows.get((target, "refit + recovery"))
        if refit is None:
            continue
        how = "the default refit" if _views(refit) == "1" else f"the refit reading {_views(refit)} views of each image"
        text = (f"{100 * target:.0f} % fewer MACs ({refit['mac_speedup']:.2f}x): {refit['top1']:.1f} % with "
                f"{how} ({refit['seconds']:.0f} s; auto chose {refit['chosen']})")
        if rec is not None and _views(rec) == _views(refit):  # the same refit under both, or not comparable
            text += f", {rec['top1']:.1f} % with `--recover` ({rec['seconds']:.0f} s)"
        parts.append(text)
    return (f"*MobileNetV2 (torchvision IMAGENET1K_V1, {data['unpruned_top1']:.1f} % on 500 real ImageNet images of "
            "classes its 500 unlabelled calibration images never showed), pruned without labels: "
            + "; ".join(parts) + ". That is far from the 1-2 point drops methods fine-tuned on all of ImageNet "
            f"report: see docs/results.md, with the onnxruntime speed-ups. {_machine(data)}*")


def _criterion_text(row: dict) -> str:
    """The row's criterion; for "auto", the one it chose too."""
    chosen = row.get("chosen")
    return f"{row['criterion']} -> {chosen}" if chosen and chosen != row["criterion"] else row["criterion"]


def render_imagenet(data: dict) -> str:
    data = {**data, "rows": sorted(data["rows"], key=_imagenet_order)}
    bn = {"stored": " (BN kept)", "re-estimated": " (BN re-estimated)"}
    rows = [[_criterion_text(r), f"{100 * r['target']:.0f}", r["repair"] + bn.get(r.get("batchnorm"), ""),
             f"{r['macs_removed_%']:.1f}",
             f"{r['top1']:.1f} ({r['top1_change']:+.1f})", f"{r['agreement_%']:.1f}", f"{r['speedup']:.2f}x",
             f"{r['seconds']:.0f}", _views(r), r.get("recovery") or ""] for r in data["rows"]]
    trained = any(r["repair"] == "refit + recovery" for r in data["rows"])
    rows.insert(0, ["unpruned", "", "", "0.0", f"{data['unpruned_top1']:.1f}", "100.0", "1.00x", "", "", ""])
    paper = data["paper"]
    rows.append([paper["method"], "", "", "", f"({paper['top1_change']:+.2f})", "", f"{paper['speedup']:.2f}x", "", "",
                 ""])
    return (_table(["criterion", "target %", "repair", "MACs removed %", "top-1 % (change)", "agreement %",
                    "onnxruntime speed-up", "prune s", "refit views", "recovery"], rows) +
            f"\n\n{data['model']}, unpruned top-1 {data['unpruned_top1']:.1f} % on the {data['evaluation']}. "
            f"Calibration: {data['calibration']}. 'none': removal only; 'refit': least-squares refit + BatchNorm "
            "re-estimation (the default with calibration images, no training; rows marked 'BN kept' / 'BN "
            "re-estimated' ran the default since session 11, which re-estimates after the refit and keeps the "
            "statistics closer to the unpruned outputs; unmarked rows re-estimated always)"
            + ("; 'refit + recovery': that, then the label-free recovery (trains on the calibration images against "
               "the unpruned model; 20 % of them held aside from every step for its early stopping)" if trained else "")
            + f". Speed-up: onnxruntime, batch 1, {data['onnxruntime']['threads']} thread, interleaved with the "
            f"original. {_machine(data)} (the torch threads of the last run to write; see docs/results.md for each run's "
            "command).")


def render_finetune(data: dict) -> str:
    rows = [[r["run"], r["schedule"], r["epochs"], f"{r['flops_removed_pct']:.1f}", f"{r['params_removed_pct']:.1f}",
             f"{r['top1_baseline']:.2f}",
             "" if r["top1_before_finetune"] is None else f"{r['top1_before_finetune']:.2f}",
             f"{r['top1_after']:.2f}", f"{r['change']:+.2f}", f"{r['minutes']:.0f}"] for r in data["rows"]]
    return _table(["run", "schedule", "epochs", "MACs removed %", "params removed %", "baseline top-1",
                   "top-1 before fine-tune", "top-1 after", "change", "minutes"], rows) + (
        f"\n\nResNet-56 (Fashion-MNIST, padded to 32x32), target {100 * data['target']:.0f} % MACs, "
        f"{data['epochs']} fine-tuning epoch(s) at lr {data['lr']} (cosine; a row naming its lr used that), top-1 on the "
        f"10,000 test images. "
        f"For the soft schedule the epochs are the soft-pruning epochs themselves (the model trains at full "
        f"width, zeroed filters may recover). {_machine(data)} `python bench/finetune.py`.")


def render_latency(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        agree = "" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.1f}"
        rounding = "as ranked" if r["round_to"] == 1 else f"x{r['round_to']}"
        rows.append([r["model"], r["pruning"], rounding, f"{100 * r['flops_removed']:.1f}",
                     f"{r['macs_before'] / 1e6:.1f} → {r['macs_after'] / 1e6:.1f}",
                     f"{r['params_before'] / 1e6:.2f} → {r['params_after'] / 1e6:.2f}",
                     f"{r['ort_before_ms']:.2f}", f"{r['ort_after_ms']:.2f}", f"{r['speedup']:.2f}x",
                     f"{r['mac_speedup']:.2f}x", f"{r['ratio']:.2f}", agree])
    tables = ", ".join(f"{t['model']} {t['seconds']:.1f} s ({t['configs']} distinct layers, {t['points']} widths)"
                       for t in data["latency_tables"])
    goal = data["edge_speedup_goal"]
    edge = sorted((r for r in data["rows"] if r["model"] == "MobileNetV2" and r["speedup"] >= goal),
                  key=lambda r: r["flops_removed"])
    reached = (f" MobileNetV2 first reaches {goal}x at {100 * edge[0]['flops_removed']:.1f} % of MACs removed "
               f"({edge[0]['pruning']}, {edge[0]['speedup']:.2f}x, top-1 agreement "
               f"{edge[0]['top1_agreement']:.1f} %)." if edge else f" MobileNetV2 never reaches {goal}x here.")
    load = f"1-minute load average {data['load_average_at_start']:.2f} at the start"
    busy = (f" Another process kept one of the two cores busy during the measurement ({load}), so the ~10 ms "
            "MobileNetV2 runs are the noisiest figures here." if data["background_busy"] else
            f" The machine was otherwise idle ({load}).")
    return _table(["model", "pruning", "kept channels", "MACs removed %", "MACs (M)", "params (M)",
                   "ORT b1 before ms", "ORT b1 after ms", "speed-up", "MAC speed-up", "ratio",
                   "top-1 agreement %"], rows) + (
        f"\n\nonnxruntime {data.get('onnxruntime', '')} CPU, batch 1, {data['threads']} thread(s), median of "
        f"{data['runs']} runs, each model of a block timed in turn with the others. \"as ranked\": kept channel "
        f"counts as the allocator leaves them; \"x{data['vector_block']}\": rounded to onnxruntime's vector block "
        f"on this CPU. Top-1 agreement: share of the {data['agreement_images']} crops (ten per photograph) of "
        f"scikit-image's photographs on which the pruned model's top-1 class equals the unpruned one's, no "
        f"fine-tuning.{reached} Building the latency table took {tables}.{busy} {_machine(data)} "
        "`python bench/latency.py`.")


def render_zoo(_: dict | None = None) -> str:
    rows = []
    for desc_path in sorted((ROOT / "zoo").glob("*/model.json")):
        desc = json.loads(desc_path.read_text())
        last = desc["history"][-1]
        rows.append([f"`zoo/{desc_path.parent.name}`", desc["model"], desc["data"]["name"], len(desc["history"]),
                     f"{last['test_top1']:.2f}", f"`{desc['command']}`"])
    return _table(["folder", "model", "data", "epochs", "test top-1 %", "command"], rows) + \
        "\n\nTop-1 on the 10,000-image test set after the last epoch, read from each `model.json`."


def render_robustness(data: dict) -> str:
    fuzz = _table(["file", "mutations", "inputs tried", "refused in one line", "loaded, identical",
                   "loaded, the file's own valid content", "failures"],
                  [[f"`{r['file']}`", r["mutations"], r["tried"], r["refused"], r["identical"], r["accepted"],
                    r["failed"]] for r in data["fuzz"]])
    kills = _table(["command", "kill trials (signal sent before the run ended)", "signals",
                    "left absent / incomplete / complete", "left broken", "Ctrl-C message right",
                    "finished identical to an uninterrupted run"],
                   [[f"`{r['command']}`", f"{r['trials']} ({r['sent']})", r["signals"],
                     f"{r['left absent']} / {r['left incomplete']} / {r['left complete']}", r["left broken"],
                     f"{r['messages ok']} of {r['trials']}", f"{r['identical']} of {r['trials']}"]
                    for r in data["interruption"]])
    alloc = data["allocator"]
    return (f"{fuzz}\n\n{kills}\n\nAllocator properties: {alloc['examples']} random networks (plain, residual and "
            f"depthwise blocks), random targets, guards and ignore patterns, {alloc['failures']} failures. "
            f"{data['per_mutation']} seeded cases per mutation. {_machine(data)} `python bench/robustness.py`.")


def _repo_relative(command: str) -> str:
    """A recorded command with the checkout's absolute path to zoo/ dropped (it differs per clone)."""
    return re.sub(r"\S*/(zoo/\S+)", r"\1", command)


def render_int8(data: dict) -> str:
    """Original float32, pruned float32 and pruned int8 of each model: accuracy, time and size."""
    text = []
    for m in data["results"]:
        if m.get("failed"):
            text.append(f"**{m['model']}**: the run failed ({m['failed']}): `{m['command']}`")
            continue
        resnet = m["model"] == "ResNet-56"
        rows = [[r["file"], f"{r['top1']:.2f} ({r['top1_change']:+.2f})" if resnet else f"{r['agreement']:.1f}",
                 f"{r['cpu_ms']:.2f}", f"{r['cpu_speedup']:.2f}x", f"{r['ms']:.2f}", f"{r['speedup']:.2f}x",
                 f"{r['MiB']:.2f}"] for r in m["rows"]]
        head = (f"**{m['model']}** ({m['criterion']}, {100 * m['macs_removed']:.1f} % of MACs removed"
                + (f"; `{_repo_relative(m['command'].split(' --out ')[0])}`" if resnet else "") + "):\n\n")
        acc = "top-1 % (change)" if resnet else "top-1 agreement %"
        body = _table(["file", acc, "CPU ms", "CPU speed-up", "wall ms", "wall speed-up", "MiB"], rows)
        if m.get("goals"):
            g = m["goals"]
            body += (f"\n\nGoals: int8 within {g['max_drop_points']} point of the unpruned float32 model (here "
                     f"{g['drop_points']:.2f} points lost), >= {g['min_speedup']}x faster by thread CPU time (here "
                     f"{g['speedup_cpu']:.2f}x): {'met' if g['met'] else 'not met'}.")
        text.append(head + body)
    return "\n\n".join(text) + (
        f"\n\nonnxruntime {data['onnxruntime']}, batch 1, 1 thread, the three files timed interleaved "
        f"({data['runs']} runs); CPU ms is the thread's CPU time (robust to other processes), wall ms the "
        f"median wall-clock time (1-minute load average {data['load_average_at_start']:.2f} at the start). "
        f"{_machine(data)} `python bench/int8.py` (the ResNet-56 row: `python bench/int8.py --models resnet56 "
        f"--merge`).")


def render_int8_profile(data: dict) -> str:
    """Where the int8 file's time goes (onnxruntime's profiler) and onnxruntime's quantization options."""
    prof = [[r["file"], r["nodes"], f"{r['run_ms']:.2f}", f"{r['conv_ms']:.2f}", f"{r['other_kernels_ms']:.2f}",
             f"{r['between_ms']:.2f}", f"{r['conv_share_%']:.0f} %", f"{r['floor_ms']:.2f}",
             f"{r['floor_speedup']:.2f}x", r["top_ops"]] for r in data["profiles"]]
    var = [[v["variant"], v["format"], v["weights"], v["activations"], v["optimisation"], f"{v['ms']:.3f}",
            f"{v['speedup']:.2f}x", "" if v["nodes"] is None else v["nodes"],
            "" if v["top1"] is None else f"{v['top1']:.2f}"] for v in data["variants"]]
    int8 = data["profiles"][-1]
    need = data["profiles"][0]["run_ms"] / 3
    return (f"ResNet-56 pruned by `{_repo_relative(data['command'].split(' --out ')[0])}` "
            f"({data['criterion']}, {100 * data['macs_removed']:.1f} % of MACs removed; top-1 "
            f"{data['original_top1']:.2f} -> {data['fp32_top1']:.2f} float32, {data['int8_top1']:.2f} int8).\n\n"
            "Profile (milliseconds per run under the profiler, which adds its own overhead; *floor*: the run "
            "without its convolution kernels, *floor speed-up*: the original's run over that floor):\n\n"
            + _table(["file", "nodes", "run ms", "conv ms", "other kernels ms", "between kernels ms", "conv share",
                      "floor ms", "floor speed-up", "most frequent ops"], prof)
            + f"\n\nFor 3x the int8 run must take {need:.2f} ms (profiled); {int8['floor_ms']:.2f} ms of it is not "
            f"convolution, so its convolutions would have to fall from {int8['conv_ms']:.2f} to "
            f"{max(0.0, need - int8['floor_ms']):.2f} ms.\n\n"
            f"Quantization options (the pruned float32 file quantized again on the same calibration images; "
            f"timed interleaved with the original float32 file, {data['original_ms']:.3f} ms unprofiled, "
            f"{data['runs']} runs or more; top-1 in onnxruntime on the 10,000 test images):\n\n"
            + _table(["variant", "format", "weights", "activations", "graph optimisation", "ms", "speed-up",
                      "nodes", "top-1 %"], var)
            + f"\n\nonnxruntime, batch 1, 1 thread. {_machine(data)} `python bench/int8_profile.py`.")


def render_edge_mobilenet(data: dict) -> str:
    """MobileNetV2 pruned without fine-tuning: measured speed-up and agreement on held-out photographs."""
    rows = [[r["row"], f"{r['flops_removed_%']:.1f}", f"{r['mac_speedup']:.2f}x", f"{r['speedup']:.2f}x",
             f"{r['agreement_heldout_%']:.1f}", f"{r['agreement_calibration_photos_%']:.1f}"] for r in data["rows"]]
    best = data.get("best_at_goal")
    goal = data["edge_speedup_goal"]
    line = (f"At >= {goal}x measured, the best held-out agreement is {best['agreement_heldout_%']:.1f} % "
            f"({best['row']}, {best['flops_removed_%']:.1f} % of MACs removed)." if best
            else f"No row reached {goal}x.")
    return _table(["row", "MACs removed %", "MAC speed-up", "measured speed-up", "agreement, held-out photos %",
                   "agreement, calibration photos %"], rows) + (
        f"\n\nCalibration: {data['calibration_images']} crops of scikit-image's {len(data['calibration_photos'])} "
        f"photographs. Held out: the ten crops of each of {len(data['holdout_photos'])} photographs in "
        f"`{data['holdout_folder']}` ({data['holdout_images']} images), never calibrated on. onnxruntime, batch 1, "
        f"1 thread, interleaved, original {data['original_ms']:.2f} ms. {line} {_machine(data)} "
        "`python bench/edge_mobilenet.py`.")


def render_models(data: dict) -> str:
    """The model sweep in one paragraph: the count and what each model went through."""
    failed = [r for r in data["rows"] if r["outcome"] != "ok"]
    def count(prefix):
        return sum(r["model"].startswith(prefix) for r in data["rows"])
    ignored = [f"{r['model']} (ignore={r['ignore']})" for r in data["rows"] if r.get("ignore")]
    return (f"{data['ok']}/{data['tried']} models ({count('torchvision:')} torchvision classification and "
            f"segmentation, {count('timm:')} timm, {count('ultralytics:')} ultralytics YOLO from their YAML files, "
            f"{count('transformers:')} Hugging Face transformers CNNs) pruned to {100 * data['target_flops']:.0f} % of MACs within "
            f"{100 * data['within']:.1f} points with the default options, reloaded from their folder with identical "
            f"outputs{' and exported to ONNX (verified in onnxruntime)' if data['onnx'] else ''}"
            + (": failed " + ", ".join(f"{r['model']} ({r['outcome']})" for r in failed) if failed else "")
            + ("; refused for attention and pruned with the ignore the refusal names: " + ", ".join(ignored)
               if ignored else "")
            + f". {_machine(data)} `python bench/models.py`.")


def _detection_row(r: dict) -> list:
    name = r["model"].replace("ultralytics:", "").replace(".yaml", "")
    name += f" (`--ignore '{r['ignore']}'`)" if r.get("ignore") else ""
    pipeline = "l1, no data" if r.get("pipeline", "l1") == "l1" else \
        f"defaults, {r['calibration_images']} photos ({r['criterion']}{' + refit' if r.get('refit') else ''})"
    if r.get("error"):
        return [name, pipeline, f"failed: {r['error'][:120]}"] + [""] * 8
    timed = [f"{r[k]['speedup']:.2f}x / {r[k]['mac_speedup']:.2f}x ({r[k]['ratio']:.2f})"
             for k in sorted((k for k in r if k.startswith("ort_")), key=lambda k: int(k[4:]))]
    return [name, pipeline, f"{r['macs_before'] / 1e6:.0f} -> {r['macs_after'] / 1e6:.0f}",
            f"{r['params_before'] / 1e6:.2f} -> {r['params_after'] / 1e6:.2f}", f"{r['peak_mib']:.0f} MiB",
            f"{r['seconds']:.1f} s", "identical" if r["reload_identical"] else "DIFFERS",
            "verified" if r["onnx_verified"] else "FAILED",
            f"{r['held_out_output_error']:.3f}" if "held_out_output_error" in r else "", *timed]


def render_detection(data: dict) -> str:
    """bench/detection.py: each YOLO with l1 (no data) and with the defaults and the calibration photos."""
    sizes = sorted({int(k[4:]) for r in data["rows"] for k in r if k.startswith("ort_")})
    rows = [_detection_row(r) for r in data["rows"]]
    held = ", ".join(data.get("held_out_photos", []))
    return (f"Measured with `python bench/detection.py` (bench/results/detection.json): "
            f"{100 * data['target']['flops']:.0f} % of MACs at {data['size']} px. "
            f"{_machine(data)} onnxruntime batch 1, one thread; speed-up measured / MAC speed-up (ratio). "
            f"Pipelines: {'; '.join(f'{k}: {v}' for k, v in data.get('pipelines', {}).items())}. Output error: "
            "relative L2 distance from the unpruned model's of the part of the Detect head's raw box and class "
            f"logits that varies with the photo, on other photographs ({held}); the weights are random, so it "
            "shows what pruning and repair keep of the network's response, not detection accuracy.\n\n"
            + _table(["model", "pipeline", "MACs (M)", "params (M)", "peak memory", "prune", "reload", "ONNX",
                      "output error", *(f"{s} px" for s in sizes)], rows))


def render_demo_line(data: dict) -> str:
    """The README's first-screen caption: what `make demo` measured."""
    rows = [r for r in data["rows"] if r["criterion"] != "unpruned"]
    default = next(r for r in rows if r["criterion"] == "default")
    others = sorted((r for r in rows if r["criterion"] != "default"), key=lambda r: -r["top1"])
    speed = data.get("speedup") or {}
    int8 = data.get("int8") or {}
    timing = (f" Its most accurate model ({data['kept']}) runs {speed['measured']:.2f}x faster in onnxruntime "
              f"(batch 1, one thread) and {speed['int8']:.2f}x as int8 ({int8['int8_top1']:.2f} %)."
              if speed.get("measured") and speed.get("int8") and int8 else "")
    return (f"*`make demo` ({data['wall_s']:.0f} s once .venv exists, on "
            f"{_machine(data).removeprefix('Measured on ').rstrip('.')}; `python bench/demo.py`): "
            f"ResNet-56 (Fashion-MNIST, {data['baseline_top1']:.2f} % on {data['test_images']:,} test images) at "
            f"{100 * default['flops_removed']:.0f} % fewer MACs, no labels and no fine-tuning, keeps "
            f"{default['top1']:.2f} % ({default['change']:+.2f}) with the default pipeline (auto chose "
            f"{data['chosen']}, refit on {data['calibration']['images']} unlabelled images); under the same "
            "refit, " + ", ".join(f"{r['criterion']} {r['top1']:.2f}" for r in others) + f".{timing} "
            "Its report is `runs/demo/report.html`.*")


SOURCES = {"imagenet_line": "imagenet", "demo_line": "demo", "int8_profile": "int8-profile"}  # blocks rendered from another block's JSON
RENDERERS = {"demo_line": render_demo_line, "recovery": render_recovery, "imagenet": render_imagenet, "imagenet_line": render_imagenet_line, "engine": render_engine, "calibration": render_calibration,
             "scale": render_scale, "quality": render_quality, "zoo": render_zoo, "finetune": render_finetune, "latency": render_latency,
             "robustness": render_robustness, "int8": render_int8, "int8_profile": render_int8_profile, "edge_mobilenet": render_edge_mobilenet,
             "models": render_models, "detection": render_detection}


def rendered_readme(text: str) -> str:
    for name, fn in RENDERERS.items():
        path = RESULTS / f"{SOURCES.get(name, name)}.json"
        pattern = re.compile(rf"(<!-- bench:{name} -->).*?(<!-- /bench:{name} -->)", re.S)
        if (path.exists() or name == "zoo") and pattern.search(text):
            body = fn(json.loads(path.read_text()) if path.exists() else None)
            text = pattern.sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(2), text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    stale = []
    for page in pages():
        text = page.read_text()
        new = rendered_readme(text)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"{', '.join(map(str, stale))}: result tables differ from bench/results/*.json; run python bench/readme.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
