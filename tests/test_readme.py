"""The README's result tables are rendered from bench/results/*.json, not typed."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_tool():
    spec = importlib.util.spec_from_file_location("bench_readme", ROOT / "bench" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_and_docs_tables_match_the_benchmark_json():
    tool = _readme_tool()
    for page in tool.pages():
        text = page.read_text()
        assert tool.rendered_readme(text) == text, f"{page.name}: run python bench/readme.py"


def test_every_bench_block_has_its_json():
    blocks = [name for page in _readme_tool().pages() for name in re.findall(r"<!-- bench:(\w+) -->", page.read_text())]
    assert {"quality", "latency", "robustness"} <= set(blocks)
    for name in blocks:
        if name == "zoo":
            continue
        source = _readme_tool().SOURCES.get(name, name)
        assert (ROOT / "bench" / "results" / f"{source}.json").exists(), name


def test_readme_gives_the_two_commands():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen
