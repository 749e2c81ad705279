"""Human-readable reports: ``report.md`` and a self-contained ``report.html`` beside each command's JSON.

A report is a list of sections built from the dict that ``prune``, ``analyze``, ``compare`` or ``demo``
writes as JSON; it is rendered twice: Markdown that links the PNG files in the same folder, and
one HTML file with inline CSS and every PNG embedded (base64), which opens anywhere on its own.
Each file is written atomically; the commands write them inside their atomic output folders.
"""
from __future__ import annotations

import importlib.metadata
import platform
import re
from pathlib import Path

from simprune.errors import SimpruneError
from simprune.io.files import atomic_write_bytes, read_json
from simprune.verify.render import render_html, render_markdown
from simprune.verify.tables import pivot_table

KINDS = ("prune", "analyze", "compare", "demo")
PACKAGES = ("simprune", "torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "numpy")
Block = tuple  # ("p", text) | ("cards", [(value, label)]) | ("table", header, rows) | ("img", file, caption) | ("code", text)


def environment_versions() -> dict[str, str]:
    """Python and the versions of the packages a result depends on ("-" when not installed)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out


# ---- number formatting ----------------------------------------------------------------------

def _millions(n: float, digits: int = 2) -> str:
    return f"{n / 1e6:.{digits}f} M"


def _pct(frac: float) -> str:
    return f"{100 * frac:.1f} %"


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.2f} ms"


def _title_target(target: dict) -> str:
    kind, ratio = next(iter(target.items()))
    return f"{100 * ratio:.0f} % of {'MACs' if kind == 'flops' else 'parameters'} removed"


# ---- sections shared by the kinds -----------------------------------------------------------

def _latency_blocks(data: dict) -> list[Block]:
    """The deployment keys (latency_ms, speedup, latency.rows), when a command measured them."""
    lat = data.get("latency") or {}
    blocks: list[Block] = []
    if lat.get("rows"):
        int8 = any("int8_ms" in r for r in lat["rows"])
        rows = [[r["engine"], r["batch"], _ms(r["before_ms"]), _ms(r["after_ms"]), f"{r['speedup']:.2f}x"]
                + ([_ms(r.get("int8_ms")), f"{r['int8_speedup']:.2f}x" if "int8_speedup" in r else ""] if int8 else [])
                for r in lat["rows"]]
        blocks.append(("table", ["engine", "batch", "before (median)", "after (median)", "speedup"]
                       + (["int8 (median)", "int8 speedup"] if int8 else []), rows))
    speed = data.get("speedup") or {}
    if speed.get("measured") is not None:
        head = "onnxruntime at batch 1" if any(r["engine"] == "onnxruntime" and r["batch"] == 1
                                               for r in lat.get("rows", [])) else "Measured"
        text = f"{head}: {speed['measured']:.2f}x faster"
        if speed.get("macs"):
            text += f" for {speed['macs']:.2f}x fewer MACs (ratio {speed['measured'] / speed['macs']:.2f})"
        where = ", ".join(s for s in (f"{lat['threads']} thread(s)" if lat.get("threads") else "",
                                      f"{lat['runs']} runs each" if lat.get("runs") else "",
                                      lat.get("machine") or "",
                                      f"load average {lat['load_average']:.1f} while timing (other processes "
                                      "share the cores)" if lat.get("load_average", 0) >= 1 else "") if s)
        blocks.append(("p", text + (f"; {where}." if where else ".")))
    return blocks


def _int8_blocks(data: dict, original_top1: float | None) -> list[Block]:
    """Original float32, pruned float32 and pruned int8 side by side: top-1, onnxruntime batch-1 latency, MiB."""
    int8, lat, size = data.get("int8") or {}, data.get("latency_ms") or {}, data.get("size_mib") or {}
    if not int8 and "int8" not in lat:
        return []

    def top1(v):
        return "" if v is None else f"{v:.2f} %"

    rows = [[name, top1(acc), _ms(lat.get(key)), "" if size.get(file) is None else f"{size[file]:.2f} MiB"]
            for name, acc, key, file in (("original float32", int8.get("original_top1") or original_top1, "before",
                                          "original"),
                                         ("pruned float32", int8.get("fp32_top1"), "after", "pruned"),
                                         ("pruned int8", int8.get("int8_top1"), "int8", "int8"))]
    text = "Latency: onnxruntime, batch 1, median of the interleaved runs above; size: the ONNX file."
    if int8 and int8.get("output_error") is not None:
        text = (f"The int8 outputs against float32's in onnxruntime on {int8.get('images')} images of "
                f"{int8.get('data')}: squared error {int8['output_error']:.4f} of their image-to-image spread, "
                f"mean over channels (kept: at most {(int8.get('tolerance') or {}).get('max_output_error', 0):g}). "
                f"The int8 file: {int8.get('method')}, {int8.get('calibration_images')} calibration images. " + text)
    elif int8:
        tol = int8.get("tolerance") or {}
        text = (f"Top-1 in onnxruntime on {int8.get('images')} test images of {int8.get('data')}; int8 picks "
                f"float32's class on {int8.get('agreement', 0):.1f} % of them ("
                + (f"kept: within {tol['max_drop']:.1f} points of float32" if "max_drop" in tol else
                   f"kept: at least {tol.get('min_agreement', 0):g} % agreement")
                + f"). The int8 file: {int8.get('method')}, {int8.get('calibration_images')} calibration images. "
                + ("" if int8.get("original_top1") is not None else "Original: top-1 measured when pruning. ") + text)
    return [("table", ["", "top-1", "latency", "size"], rows), ("p", text)]


def _provenance(data: dict, versions: dict | None) -> tuple[str, list[Block]]:
    blocks: list[Block] = []
    if data.get("command"):
        blocks.append(("code", data["command"]))
    versions = versions or data.get("versions") or environment_versions()
    blocks.append(("table", ["package", "version"], [[k, v] for k, v in versions.items()]))
    return "Reproduce", blocks


def network_order(matrices: dict) -> dict:
    """Group matrices sorted by layer name, numbers numerically (layer2.10 after layer2.9)."""
    return dict(sorted(matrices.items(), key=lambda kv: _natural(kv[0])))


def _figures(directory: Path, pattern: str, caption: str) -> list[Block]:
    return [("img", p.name, caption) for p in sorted(directory.glob(pattern), key=lambda p: _natural(p.name))]


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# ---- prune ----------------------------------------------------------------------------------

def _prune_sections(data: dict, directory: Path, context: dict) -> tuple[str, list]:
    desc = context.get("desc") or {}
    acc, lat = data.get("accuracy"), data.get("latency_ms")
    red = data["reduction"]
    title = f"Pruning report: {data.get('model')} with {data['criterion']}, {_title_target(data['target'])}"
    cards = [(f"-{_pct(red['flops'])}", "MACs"), (f"-{_pct(red['params'])}", "parameters")]
    if acc:
        cards.append((f"{acc['after'] - acc['before']:+.2f}", "top-1 points"))
    if lat and lat.get("after"):
        cards.append((f"{lat['before'] / lat['after']:.2f}x", "faster (onnxruntime, batch 1)"))
    rows = [["MACs", _millions(data["macs"]["before"]), _millions(data["macs"]["after"]), f"-{_pct(red['flops'])}"],
            ["parameters", _millions(data["params"]["before"], 3), _millions(data["params"]["after"], 3),
             f"-{_pct(red['params'])}"]]
    if acc:
        rows.append(["top-1", f"{acc['before']:.2f} %", f"{acc['after']:.2f} %",
                     f"{acc['after'] - acc['before']:+.2f} points"])
    ft = data.get("finetune") or {}
    if ft.get("top1_before_finetune") is not None:
        rows.append(["top-1 before fine-tuning", "", f"{ft['top1_before_finetune']:.2f} %", ""])
    if lat and lat.get("after"):
        rows.append(["latency (onnxruntime, batch 1)", _ms(lat["before"]), _ms(lat["after"]),
                     f"{lat['before'] / lat['after']:.2f}x faster"])
    origin = data.get("provenance") or {}
    model_rows = [["model", data.get("model")],
                  ["pruned from", (desc.get("pruning") or {}).get("source") or "the architecture (no checkpoint)"],
                  ["weights", origin.get("weights") or "not recorded"],
                  ["calibration", origin.get("calibration") or "not recorded"],
                  ["input", "x".join(map(str, desc.get("input_shape") or [])) or "not recorded"],
                  ["trained on", (desc.get("data") or {}).get("name") or "not recorded"],
                  ["prunable groups", len(data.get("groups", []))]]
    sections = [("Summary", [("cards", cards), ("table", ["", "before", "after", "change"], rows)]),
                ("Model", [("table", ["", ""], model_rows)])]
    if data.get("warnings"):
        sections.insert(1, ("Warnings", [("p", text) for text in data["warnings"]]))
    if data.get("latency"):
        sections.append(("Latency", _latency_blocks(data)))
    sections.append(("Float32 and int8", _int8_blocks(data, (acc or {}).get("before"))))
    if data.get("layers"):
        sections.append(("Channels per layer", [("img", "channels.png",
                                                 "output channels of every conv/linear layer before (grey) and after")]))
    heat = _figures(directory, "similarity*.png", "similarity of every pair of channels in each group, "
                    "measured on the unpruned model (the criterion's own statistics)")
    if heat:
        sections.append(("Channel similarity", heat))
    sections.append(("Settings", [("table", ["", ""], _settings_rows(data))]))
    return title, sections


def _settings_rows(data: dict) -> list[list]:
    """The report's Settings table: how the channels were chosen, repaired and trained, and the seconds."""
    ft = data.get("finetune") or {}
    settings = [["criterion", data["criterion"]], *choice_rows(data.get("criterion_choice")),
                ["target", _title_target(data["target"])],
                ["compensation", data.get("compensated") or "none"],
                ["groups left whole (uncompensable)", len(data.get("protected_groups") or [])],
                ["reconstruction (layer refit)", _refit_summary(data.get("reconstructed"))],
                ["BatchNorm re-estimated", _batchnorm_summary(data)],
                ["label-free recovery", recovery_summary(data.get("recovered")) or "no"]]
    for root, text in (data.get("left_whole_for_the_refit") or {}).items():
        settings.append([f"left whole: {root}", text])
    for key, text in (data.get("criterion_notes") or {}).items():
        settings.append([f"criterion: {key.replace('_', ' ')}", text])
    if data.get("schedule"):
        settings.append(["schedule", ", ".join(f"{k}={v}" for k, v in data["schedule"].items())])
    if ft.get("epochs") is not None:
        settings.append(["fine-tuning epochs", ft["epochs"]])
    seconds = data.get("seconds") or {}
    if seconds:
        settings.append(["seconds", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())])
    return settings


def _batchnorm_summary(data: dict) -> str:
    """yes/no, and for the if-closer choice both output changes and on which images."""
    done = "yes" if data.get("bn_recalibrated") else "no"
    choice = data.get("batchnorm_choice")
    if not choice:
        return done
    change = choice["output_change"]
    return (f"{done}: output change {change['re-estimated']:.4g} re-estimated vs {change['stored']:.4g} with the "
            f"stored statistics, on {choice['judged_images']} {choice['judged_on']} images")


def choice_rows(choice: dict | None) -> list[list[str]]:
    """The settings row of ``criterion="auto"``: each candidate's output change on the held-aside images."""
    if not choice:
        return []
    if not choice.get("tried"):
        return [["criterion chosen by auto", f"{choice['chosen']}, without trials: {choice.get('why', '')}"]]
    tried = ", ".join(f"{name} {change:.4g}" for name, change in sorted(choice["tried"].items(), key=lambda t: t[1]))
    failed = "".join(f"; {name} failed: {why}" for name, why in (choice.get("failed") or {}).items())
    return [["criterion chosen by auto", f"{choice['chosen']}: {choice['measure']} on {choice['held_aside_images']} "
             f"held-aside images, {tried}{failed} ({choice['seconds']:.0f} s)"]]


def recovery_summary(recovered: dict | None) -> str | None:
    """One line on the label-free recovery (None when it did not run): images, epochs, time, held-aside agreement."""
    if not recovered:
        return None
    line = (f"recovered on {recovered['images']} unlabelled calibration images ({recovered['held_aside']} held aside), "
            f"{recovered['epochs']:.1f} epochs, {recovered['seconds']:.0f} s")
    agree = recovered.get("held_out_agreement")
    if agree:
        line += f"; held-aside agreement with the unpruned model {agree['before']:.1f} -> {agree['after']:.1f} %"
    return line


def _refit_summary(refit: dict | None) -> str:
    """One line on the consumer refit: how many layers, how, and the error it left."""
    if not refit:
        return "no"
    err = refit.get("relative_error") or {}
    line = (f"{refit['layers']} layers refit {'in network order' if refit.get('sequential', True) else 'at once'} "
            f"({refit.get('blocks', 0)} blocks)")
    if err.get("before") is not None:
        line += f", mean relative error {err['before']:.4f} -> {err['after']:.4f}"
    if refit.get("skipped"):
        line += f", {len(refit['skipped'])} skipped: " + "; ".join(f"{k} ({v})" for k, v in refit["skipped"].items())
    return line


# ---- analyze --------------------------------------------------------------------------------

def _analyze_sections(data: dict, directory: Path, context: dict) -> tuple[str, list]:
    net = data["network"]
    cal = data.get("calibration") or {}
    weights = "random weights" if data.get("weights") == "random" else (data.get("checkpoint") or "checkpoint")
    title = f"Redundancy analysis: {data.get('model')} ({weights})"
    keys = list(net["twins"])
    levels = list(net.get("removable_within") or {})
    mid = levels[len(levels) // 2] if levels else None
    cards = ([(_pct(net["macs_removed_within"][mid]), f"of MACs in channels reproducible within {float(mid):.0%}")]
             if mid else []) + [(str(net["groups"]), "channel groups"), (str(net["channels"]), "channels"),
                                (str(net["dead_channels"]), "dead channels")]
    rows = [[f"> {k}", net["twins"][k], _pct(net["twin_share"][k]), net["removable"][k]] for k in keys]
    removable = [[f"{float(e):.0%}", net["removable_within"][e], _pct(net["removable_within"][e] / net["channels"]),
                  _pct(net["macs_removed_within"][e])] for e in levels]
    model_rows = [["model", data.get("model")], ["weights", weights],
                  ["input", "x".join(map(str, data.get("input_shape") or []))],
                  ["calibration", f"{cal.get('images')} images of {cal.get('data')} (seed {cal.get('seed')})"],
                  ["similarity", net["similarity"]]]
    top = sorted(data["groups"], key=lambda g: (-g["removable_within"][mid] / g["channels"]) if mid else
                 -(g.get("mean_max_similarity") or float("-inf")))[:10]
    top_rows = [[g["group"], g["channels"], "yes" if g["residual"] else ""]
                + [g["removable_within"][e] for e in levels]
                + ["" if g.get("mean_max_similarity") is None else f"{g['mean_max_similarity']:.3f}"]
                + [g["twins"][k] for k in keys] + [g["dead_channels"]] for g in top]
    what_can_go = [("table", ["error within", "channels that can go", "share", "MACs saved"], removable),
                   ("p", "Channels the other channels of their layer reproduce by least squares (what `--compensate "
                         "lstsq` folds into the next layer), removed greedily; the error is the share of the layer's "
                         "map energy the kept channels cannot reproduce.")] if levels else []
    sections = [
        ("Summary", [("cards", cards)] + what_can_go + [
            ("table", ["max similarity", "channels with a near-copy", "share", "removable as twins"], rows)]),
        ("Model", [("table", ["", ""], model_rows)]),
        ("Redundancy per group", _figures(directory, "redundancy.png", "share of channels with a twin per group "
                                          "(top) and the spread of each channel's highest similarity (bottom)")),
        ("Most redundant groups", [("table", ["group", "channels", "residual"]
                                   + [f"can go within {float(e):.0%}" for e in levels] + ["mean max similarity"]
                                   + [f"twins > {k}" for k in keys] + ["dead"], top_rows),
                                  ("p", "The ten groups with the largest share of channels that can go.")]),
        ("Channel similarity", _figures(directory, "similarity*.png", "similarity of every pair of channels in "
                                        "each group")),
    ]
    return title, sections


# ---- compare and demo -----------------------------------------------------------------------

def _results_table(rows: list[dict], baseline: float | None = None, target: bool = True) -> Block:
    """One line per run (the unpruned model first when ``baseline`` is given)."""
    out = [["unpruned"] + [""] * target + ["", "", f"{baseline:.2f}", ""]] if baseline is not None else []
    for r in rows:
        out.append([r["label"]] + [_pct(r["target"])] * target + [
            _pct(r["flops_removed"]), _pct(r["params_removed"]), f"{r['top1']:.2f}", f"{r['change']:+.2f}"])
    return ("table", ["criterion"] + ["target"] * target + ["MACs removed", "params removed", "top-1 %", "change"], out)


def _setup_rows(data: dict) -> list[list]:
    cal = data.get("calibration") or {}
    ckpt = data.get("checkpoint")
    if ckpt and Path(ckpt).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        ckpt = f"{Path(ckpt).name} (shipped with simprune)"
    return [["model", data.get("model")], ["checkpoint", ckpt or "random weights"],
            ["test data", f"{data.get('test_images')} images of {data.get('data')}"],
            ["calibration", f"{cal.get('images')} images of {cal.get('data')} (seed {cal.get('seed')})"],
            ["same footing", "uncompensable groups left whole, BatchNorm re-estimated on the calibration "
                             "images, no fine-tuning"]] + \
        ([["channel counts", f"multiples of {data['round_to']} (onnxruntime's CPU kernels work in blocks of 8)"]]
         if data.get("round_to", 1) > 1 else [])


def _compare_sections(data: dict, directory: Path, context: dict) -> tuple[str, list]:

    title = f"Criteria compared: {data.get('model')} on {data.get('data')}"
    header, rows = pivot_table(data["rows"], data.get("target_kind", "flops"))
    middle = min(data["targets"], key=lambda t: abs(t - 0.5))
    best = max((r for r in data["rows"] if r["target"] == middle), key=lambda r: r["top1"])
    cards = [(f"{data['baseline_top1']:.2f} %", "unpruned top-1"), (str(len(data["rows"])), "pruned models"),
             (best["label"], f"best at {_pct(middle)}: {best['top1']:.2f} % ({best['change']:+.2f})")]
    sections = [("Summary", [("cards", cards), ("table", header, rows),
                             ("p", f"Top-1 on {data.get('test_images')} test images (change against the unpruned "
                                   f"{data['baseline_top1']:.2f} %); targets are the share of "
                                   f"{'MACs' if data.get('target_kind', 'flops') == 'flops' else 'parameters'} removed.")]),
                ("Accuracy against MACs removed", [("img", "accuracy_vs_flops.png",
                                                    "one line per criterion; dashed: the unpruned model")]),
                ("Setup", [("table", ["", ""], _setup_rows(data))])]
    if data.get("layers"):
        sections.append(("Channels per layer", [("img", "channels.png", data.get("layers_caption", ""))]))
    sections.append(("All runs", [_results_table(data["rows"])]))
    return title, sections


def _demo_text(data: dict) -> str:
    """What the demo's rows are."""
    chosen = f" (here it chose {data['chosen']})" if data.get("chosen") else ""
    return ("Each criterion prunes the same trained model to the same MAC target in one shot, and every row gets "
            "the same repair: a least-squares refit of the layers to the unpruned model's outputs and BatchNorm "
            "re-estimation on the unlabelled calibration images, no fine-tuning. 'default' is what `simprune prune "
            "--calib-data` does: criterion auto, refit-error or tp:l2, chosen by which trial prune moves the "
            f"output least on held-aside calibration images{chosen}. qsfm removes channels whose feature maps "
            "duplicate a kept channel's (SSIM), filter-similarity filters that duplicate a kept filter, "
            "feature-stats channels chosen by diversity and similarity statistics; l1 removes the filters of "
            "smallest weight norm; random is the floor.")


def _demo_sections(data: dict, directory: Path, context: dict) -> tuple[str, list]:
    rows = [r for r in data["rows"] if r["criterion"] != "unpruned"]
    base = data["baseline_top1"]
    first = rows[0]
    title = f"simprune demo: {data.get('model')} on {data.get('data')}, {_title_target({'flops': data['target_flops']})}"
    cards = [(f"-{_pct(first['flops_removed'])}", "MACs"), (f"{first['change']:+.2f}", f"top-1 points ({first['label']})")]
    if rows[1:]:
        runner = max(rows[1:], key=lambda r: r["top1"])
        cards.append((f"{first['top1'] - runner['top1']:+.2f}", f"points ahead of the next best ({runner['label']})"))
    lat = data.get("latency_ms")
    if lat and lat.get("after"):
        cards.append((f"{lat['before'] / lat['after']:.2f}x", "faster (onnxruntime, batch 1)"))
    sections = [
        ("Summary", [("cards", cards), _results_table(rows, base, target=False),
                     ("p", _demo_text(data))]),
        ("Setup", [("table", ["", ""], _setup_rows(data))]),
    ]
    if data.get("latency"):
        onnx = data.get("onnx") or {}
        blocks = _latency_blocks(data)
        if onnx:
            blocks.append(("p", f"{data.get('kept', first['label'])} model exported to {onnx.get('path')} (opset {onnx.get('opset')}, "
                                f"{onnx.get('bytes', 0) / 2**20:.1f} MiB, verified in onnxruntime: max difference "
                                f"{onnx.get('max_abs_diff', 0):.1e})."))
        sections.append(("Latency", blocks))
    sections.append(("Float32 and int8", _int8_blocks(data, base)))
    sections.append(("Channels per layer", [("img", "channels.png", "output channels of every layer before "
                                             "(grey bars) and kept by each criterion (lines)")]))
    heat = _figures(directory, "similarity*.png", "similarity of every pair of channels in each group of the "
                    "unpruned model (qsfm's statistics)")
    if heat:
        sections.append(("Channel similarity", heat))
    return title, sections


BUILDERS = {"prune": _prune_sections, "analyze": _analyze_sections, "compare": _compare_sections,
            "demo": _demo_sections}


# ---- rendering ------------------------------------------------------------------------------



def write_report(directory: str | Path, kind: str, data: dict, context: dict | None = None) -> list[Path]:
    """Write ``report.md`` and ``report.html`` for a ``kind`` command's JSON ``data`` into ``directory``.

    Draws ``channels.png`` from the layer lists; embeds the PNGs already in the folder (heat maps,
    redundancy bars, accuracy plot). ``context``: {"desc": model.json of a pruned model,
    "versions": {...}}. Returns the two paths.
    """
    if kind not in BUILDERS:
        raise SimpruneError(f"unknown report kind {kind!r}; one of {', '.join(KINDS)}")
    from simprune.verify.plots import channels_chart  # noqa: PLC0415 - matplotlib only when a report is written

    directory, context = Path(directory), context or {}
    layers = data.get("layers")
    if kind == "prune" and layers:
        channels_chart({data["criterion"]: layers}, directory / "channels.png",
                       f"Channels per layer: {data.get('model')}, {data['criterion']}, {_title_target(data['target'])}")
    elif kind in ("compare", "demo") and layers:
        channels_chart(layers, directory / "channels.png", data.get("layers_title", "Channels per layer"))
    title, sections = BUILDERS[kind](data, directory, context)
    sections = [s for s in sections if s[1]] + [_provenance(data, context.get("versions"))]
    versions = context.get("versions") or data.get("versions") or environment_versions()
    subtitle = f"simprune {versions.get('simprune', '')} {kind} report"
    md = render_markdown(title, sections)
    page = render_html(title, sections, directory, subtitle)
    atomic_write_bytes(directory / "report.md", md.encode())
    atomic_write_bytes(directory / "report.html", page.encode())
    return [directory / "report.md", directory / "report.html"]


def write_prune_report(directory: Path, report: dict, desc: dict, criterion=None) -> list[Path]:
    """The ``simprune prune`` report; heat maps when ``criterion`` (a ScoreCache) kept similarity matrices."""
    result = getattr(criterion, "result", None)
    if result is not None and result.similarity:
        from simprune.verify.plots import similarity_heatmaps  # noqa: PLC0415

        similarity_heatmaps(network_order(result.similarity), Path(directory) / "similarity.png",
                            label=getattr(criterion, "similarity", None) or "similarity")
    return write_report(directory, "prune", report, {"desc": desc})


def prune_report_writer(report: dict, desc: dict, criterion=None, also=None):
    """An ``api.save(extra=...)`` callback: runs ``also`` (another callback), then writes the report
    into the temporary folder, so that it appears together with the model or not at all."""
    def extra(directory: Path) -> None:
        if also is not None:
            also(directory)
        write_prune_report(directory, report, desc, criterion)
    return extra


def refresh_prune_report(directory: str | Path) -> list[Path]:
    """Render a pruned model folder's report again from its report.json and model.json (e.g. after
    ``simprune bench`` added the latency keys); keeps the heat maps already there."""

    directory = Path(directory)
    return write_report(directory, "prune", read_json(directory / "report.json"),
                        {"desc": read_json(directory / "model.json")})
