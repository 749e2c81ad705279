"""The README's five-minute tour, run as written: every command parses, and the fast ones run without a
traceback (in a scratch folder that sees the repository's zoo/, so runs/ is not touched)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from simprune.cli.commands import build_parser

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = {"compare"}  # the slow one: a grid of prunes and evaluations (covered by tests/test_compare.py)


def tour_commands() -> list[str]:
    """The `simprune ...` lines of the first bash block under '## A five-minute tour', continuations joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## A five-minute tour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip().startswith("simprune ")]


def test_the_tour_is_short_and_every_command_parses():
    commands = tour_commands()
    assert 6 <= len(commands) <= 14
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[1:]
        assert "..." not in argv, command
        args = parser.parse_args(argv)
        for value in vars(args).values():  # every repository path it names exists
            if isinstance(value, str) and value.startswith("zoo/"):
                assert (ROOT / value).exists(), command


def test_the_readme_starts_with_what_it_is():
    lines = (ROOT / "README.md").read_text().splitlines()
    first_sentence = next(line for line in lines if line.startswith("**")).strip("*")
    assert len(first_sentence.split()) <= 20
    screen = "\n".join(lines[:25])
    for needed in ("make demo", "make test", "source .venv/bin/activate", "pip install .", "!["):
        assert needed in screen, needed
    assert (ROOT / re.search(r"!\[[^]]*\]\(([^)]+)\)", screen).group(1)).exists()
    text = "\n".join(lines)
    for remark in ("issue ", "other core", "background job"):
        assert remark not in text, remark


@pytest.mark.slow
def test_the_tour_runs_as_written(tmp_path):
    (tmp_path / "zoo").symlink_to(ROOT / "zoo")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in tour_commands():
        argv = shlex.split(command)
        if argv[1] in SKIPPED:
            continue
        proc = subprocess.run([sys.executable, "-m", "simprune.cli", *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        assert "Traceback" not in output, f"{command}\n{output[-3000:]}"
        assert proc.returncode == 0, f"{command}\n{output[-3000:]}"
