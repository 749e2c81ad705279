"""The ``simprune`` entry point: Ctrl-C/SIGTERM handling around the commands of :mod:`simprune.cli.commands`.

This module imports neither torch nor the library at import time: they are imported inside
:func:`main` with SIGINT/SIGTERM held back, so an interrupt during start-up stops cleanly.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from pathlib import Path

from simprune.cli.vocabulary import cli_wording  # never imports torch
from simprune.errors import SimpruneError
from simprune.io.checkpoints import last_checkpoint  # never imports torch


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # the same clean stop as Ctrl-C: temporaries removed, checkpoint named


def _import_held(name: str, hold_signals: bool):
    """Import module ``name`` (torch and the library behind it) with SIGINT/SIGTERM held back: a C extension
    interrupted halfway through its initialisation cannot be imported again (later imports crash). A
    signal that arrived meanwhile takes effect right after."""
    pending = []
    held = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
            for s in (signal.SIGINT, signal.SIGTERM)} if hold_signals else {}
    try:
        module = importlib.import_module(name)
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
    if pending:
        raise KeyboardInterrupt
    return module


def _where(argv: list[str]) -> str:
    """After Ctrl-C/SIGTERM, whenever it came: what --out holds and how to go on (the last checkpoint)."""
    outs = [a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            for i, a in enumerate(argv) if a == "--out" or a.startswith("--out=")]
    if not outs or not outs[-1]:
        return "nothing was written"
    return last_checkpoint(Path(outs[-1]))


def _stderr(text: str) -> None:
    print(text.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout replaced by one without a file descriptor (tests)
        pass


def _unexpected(exc: BaseException) -> str:
    """One line for an exception simprune did not foresee: its type, first line, and where it was raised."""
    text = str(exc).strip().splitlines()
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" in {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb is not None else ""
    return f"{type(exc).__name__}{where}: {text[0][:200] if text else ''}".rstrip(": ")


def main(argv: list[str] | None = None) -> int:
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    args = None
    try:
        commands = _import_held("simprune.cli.commands", hold_signals=in_main)
        args = commands.build_parser().parse_args(argv)
        commands.start_processes(args)  # --device; the process group only when launched by torchrun
        # the library's stages, bars and warnings -> stderr; the builder --model names is trusted for the whole command
        with commands.reporting(commands.reporter(args)), commands.trusted_builders(getattr(args, "model", None)):
            return args.fn(args)
    except SimpruneError as exc:
        if args is not None and args.debug:
            raise
        _stderr(f"error: {cli_wording(str(exc))}")
        return 2
    except BrokenPipeError:  # `simprune models --torchvision | head`: the reader left; stop quietly as Unix tools do
        _silence_stdout()
        return 141
    except KeyboardInterrupt as exc:
        _stderr(f"interrupted; {str(exc) or _where(argv if argv is not None else sys.argv[1:])}")
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - anything unforeseen: one line, the traceback behind --debug
        if args is not None and args.debug:
            raise
        _stderr(f"error: {_unexpected(exc)} (--debug for the traceback)")
        return 2
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
