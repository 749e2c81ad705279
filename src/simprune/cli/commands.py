"""The argument parser: every command module adds its own sub-command."""
from __future__ import annotations

import argparse

from simprune.cli.analyze import add_analyze_parser
from simprune.cli.compare import add_compare_parser
from simprune.cli.demo import add_demo_parser
from simprune.cli.deploy import add_bench_parser, add_export_parser
from simprune.cli.evaluate import add_evaluate_parser
from simprune.cli.finetune import add_finetune_parser
from simprune.cli.info import add_info_parsers
from simprune.cli.prune import add_prune_parser
from simprune.cli.train import add_train_parser
from simprune.distributed import init_from_env  # noqa: F401 - main() calls it after parsing


def build_parser() -> argparse.ArgumentParser:
    """``simprune COMMAND ...``: one sub-parser per command module."""
    parser = argparse.ArgumentParser(prog="simprune", description="Similarity-based structural filter pruning.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_info_parsers, add_train_parser, add_evaluate_parser, add_prune_parser, add_analyze_parser,
                add_export_parser, add_bench_parser, add_compare_parser, add_demo_parser, add_finetune_parser):
        add(sub)
    return parser
