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


def test_readme_tables_match_the_benchmark_json():
    text = (ROOT / "README.md").read_text()
    assert _readme_tool().rendered_readme(text) == text, "run python bench/readme.py"


def test_every_bench_block_has_its_json():
    text = (ROOT / "README.md").read_text()
    for name in re.findall(r"<!-- bench:(\w+) -->", text):
        if name == "zoo":
            continue
        assert (ROOT / "bench" / "results" / f"{name}.json").exists(), name


def test_readme_gives_the_two_commands():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen
