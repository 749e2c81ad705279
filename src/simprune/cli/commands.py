"""The argument parser: every command module adds its own sub-command."""
from __future__ import annotations

import argparse

from simprune.cli.analyze import add_analyze_parser
from simprune.cli.common import start_processes  # noqa: F401 - main() calls it after parsing
from simprune.cli.compare import add_compare_parser
from simprune.cli.demo import add_demo_parser
from simprune.cli.deploy import add_bench_parser, add_export_parser
from simprune.cli.evaluate import add_evaluate_parser
from simprune.cli.finetune import add_finetune_parser
from simprune.cli.info import add_info_parsers
from simprune.cli.prune import add_prune_parser
from simprune.cli.train import add_train_parser
from simprune.cli.vocabulary import cli_wording
from simprune.distributed import is_main
from simprune.io.description import trusted_builders  # noqa: F401 - main() trusts the --model builder
from simprune.progress import StderrReporter, reporting  # noqa: F401 - main() installs the reporter


class ShortErrorParser(argparse.ArgumentParser):
    """An argument error in one line naming where the full usage is, instead of the whole usage text."""

    def error(self, message: str):
        words = self.prog.split()
        where = f"simprune {words[1]} --help" if len(words) > 1 else "simprune --help"
        self.exit(2, f"error: {message}; see `{where}`\n")

    def parse_args(self, args=None, namespace=None):
        """Unknown options are reported against the command they were given to (its --help, not the top one)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(parsed, "command", None)
            where = f"simprune {command} --help" if command else "simprune --help"
            self.exit(2, f"error: unrecognized arguments: {' '.join(extra)}; see `{where}`\n")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """``simprune COMMAND ...``: one sub-parser per command module (each a :class:`ShortErrorParser`)."""
    parser = ShortErrorParser(prog="simprune", description="Similarity-based structural filter pruning.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_info_parsers, add_train_parser, add_evaluate_parser, add_prune_parser, add_analyze_parser,
                add_export_parser, add_bench_parser, add_compare_parser, add_demo_parser, add_finetune_parser):
        add(sub)
    for command in sub.choices.values():
        if "--quiet" not in command._option_string_actions:  # commands with bars of their own define it
            command.add_argument("--quiet", action="store_true", help="no stage messages or progress bars")
    return parser


def reporter(args) -> StderrReporter:
    """Stage messages and bars on stderr; --quiet keeps only warnings, other torchrun ranks stay silent."""
    return StderrReporter(quiet=bool(getattr(args, "quiet", False)), mute=not is_main(), wording=cli_wording)
