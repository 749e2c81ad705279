"""report.md + self-contained report.html for prune, analyze, compare and demo."""
import base64
import json
import re

import pytest

from simprune.errors import SimpruneError
from simprune.verify.reports import (
    environment_versions,
    refresh_prune_report,
    write_report,
)

LAYERS = [{"name": "conv1", "channels_before": 16, "channels_after": 16},
          {"name": "layer1.0.conv1", "channels_before": 16, "channels_after": 7},
          {"name": "fc", "channels_before": 10, "channels_after": 10}]


def prune_report(**extra):
    return {"model": "resnet20", "criterion": "qsfm", "target": {"flops": 0.5},
            "macs": {"before": 40_000_000, "after": 20_000_000}, "params": {"before": 270_000, "after": 150_000},
            "reduction": {"flops": 0.5, "params": 1 - 150_000 / 270_000}, "layers": LAYERS, "groups": [{}] * 12,
            "accuracy": {"before": 92.5, "after": 90.25}, "protected_groups": ["conv1"], "bn_recalibrated": True,
            "compensated": True, "seconds": {"graph": 0.1}, "command": "simprune prune --out x", **extra}


LATENCY = {"latency_ms": {"before": 4.0, "after": 2.5},
           "speedup": {"measured": 1.6, "macs": 2.0, "ratio": 0.8},
           "latency": {"threads": 2, "runs": 30, "machine": "test CPU, 2 cores", "load_average": 3.4,
                       "rows": [{"engine": "onnxruntime", "batch": 1, "before_ms": 4.0, "after_ms": 2.5,
                                 "before_spread_ms": 0.1, "after_spread_ms": 0.1, "speedup": 1.6}]}}


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_prune_report_numbers_and_self_contained_html(tmp_path):
    paths = write_report(tmp_path, "prune", prune_report(**LATENCY), {"versions": {"simprune": "9.9", "torch": "1"}})
    assert paths == [tmp_path / "report.md", tmp_path / "report.html"]
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "| MACs | 40.00 M | 20.00 M | -50.0 % |" in md
    assert "| parameters | 0.270 M | 0.150 M | -44.4 % |" in md
    assert "| top-1 | 92.50 % | 90.25 % | -2.25 points |" in md
    assert "| latency (onnxruntime, batch 1) | 4.00 ms | 2.50 ms | 1.60x faster |" in md
    assert "onnxruntime at batch 1: 1.60x faster for 2.00x fewer MACs (ratio 0.80)" in md
    assert "2 thread(s), 30 runs each, test CPU, 2 cores, load average 3.4 while timing" in md
    assert "```\nsimprune prune --out x\n```" in md and "| simprune | 9.9 |" in md
    assert "![channels](channels.png)" in md and (tmp_path / "channels.png").exists()
    # one file: no external stylesheet, script, image or link
    assert not re.search(r"<(link|script)|src=\"(?!data:)|href=", page)
    pngs = embedded_pngs(page)
    assert len(pngs) == 1 and pngs[0] == (tmp_path / "channels.png").read_bytes()
    assert "<td class=\"num\">90.25 %</td>" in page


def test_prune_report_without_accuracy_or_latency_skips_them(tmp_path):
    write_report(tmp_path, "prune", prune_report(accuracy=None))
    md = (tmp_path / "report.md").read_text()
    assert "top-1" not in md and "## Latency" not in md and "faster" not in md and " ms" not in md
    assert "## Channel similarity" not in md  # no heat map in the folder
    assert "| torch |" in md  # versions of the current environment


def test_refresh_adds_latency_measured_after_the_save(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"input_shape": [1, 32, 32], "data": {"name": "fashion-mnist"},
                                                     "pruning": {"source": "zoo/x"}}))
    (tmp_path / "report.json").write_text(json.dumps(prune_report()))
    refresh_prune_report(tmp_path)
    assert "Latency" not in (tmp_path / "report.md").read_text()
    (tmp_path / "report.json").write_text(json.dumps(prune_report(**LATENCY)))
    refresh_prune_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Latency" in md and "| pruned from | zoo/x |" in md and "| input | 1x32x32 |" in md


def test_text_is_escaped(tmp_path):
    write_report(tmp_path, "prune", prune_report(model="<b>x|y</b>", command="simprune prune --out 'a&b'"))
    page, md = (tmp_path / "report.html").read_text(), (tmp_path / "report.md").read_text()
    assert "<b>x|y</b>" not in page and "&lt;b&gt;x|y&lt;/b&gt;" in page and "a&amp;b" in page
    assert "| model | <b>x\\|y</b> |" in md


def test_unknown_kind_and_versions():
    with pytest.raises(SimpruneError, match="unknown report kind"):
        write_report(".", "train", {})
    versions = environment_versions()
    assert set(versions) >= {"python", "simprune", "torch", "torchvision", "torch-pruning", "onnxruntime"}
    assert versions["simprune"] != "-"


def test_analyze_writes_a_report_with_its_numbers(cli, tmp_path):
    out = tmp_path / "an"
    code, stdout, err = cli("analyze", "--model", "resnet20", "--calib-data", "fashion-mnist-sample", "--pad-to", "32",
                            "--calib-images", "32", "--out", out)
    assert code == 0, err
    data = json.loads((out / "analysis.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    net = data["network"]
    for key, n in net["twins"].items():
        assert f"| > {key} | {n} | {100 * net['twin_share'][key]:.1f} % | {net['removable'][key]} |" in md
    figures = re.findall(r"\]\((\w+\.png)\)", md)
    assert figures[0] == "redundancy.png" and "similarity.png" in figures
    assert len(embedded_pngs(page)) == len(figures)
    assert "report.html" in stdout


def test_prune_writes_report_with_heat_maps(cli, tmp_path):
    out = tmp_path / "p"
    code, _, err = cli("prune", "--model", "resnet20", "--input", "1x32x32", "--criterion", "qsfm",
                       "--calib-data", "fashion-mnist-sample", "--calib-images", "32", "--pad-to", "32",
                       "--target-flops", "0.4", "--data", "fashion-mnist-sample", "--eval-images", "64",
                       "--no-latency", "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    acc = report["accuracy"]
    assert f"| top-1 | {acc['before']:.2f} % | {acc['after']:.2f} % |" in md
    assert f"{report['macs']['after'] / 1e6:.2f} M" in md
    assert re.findall(r"\]\((\w+\.png)\)", md) == ["channels.png", "similarity.png"]
    assert len(embedded_pngs(page)) == 2
    assert sorted(p.name for p in out.iterdir()) == ["channels.png", "model.json", "model.safetensors",
                                                     "report.html", "report.json", "report.md", "similarity.png"]
