"""Stage messages, progress bars and warnings: the library reports through here, the application decides
where they go.

Library code calls :func:`stage` ("scoring channels"), :func:`bar` (around a long loop), :func:`note`
(a result worth a line, e.g. one iterative step) and :func:`warn`. Without a reporter installed
(library use) stages, bars and notes are silent and warnings go through :mod:`warnings`. The CLI
installs a :class:`StderrReporter` with :func:`reporting`: a stage is announced on stderr only once it
has run for a second, bars are tqdm bars on a terminal and a few plain lines when stderr is piped,
and ``--quiet`` silences all but warnings.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
import warnings
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
ANNOUNCE_AFTER_S = 1.0  # stages and bars shorter than this stay silent
PIPED_EVERY_S = 30.0  # without a terminal, a bar prints one line at most this often


class SimpruneWarning(UserWarning):
    """A result that holds but may not mean what the user expects (tiny calibration set, target missed, ...)."""


class Bar:
    """What :func:`bar` returns: iterate over it; ``set_postfix(loss=...)`` adds running figures to the display."""

    def __init__(self, iterable: Iterable[T]):
        self.iterable, self.postfix, self.tqdm = iterable, {}, None

    def __iter__(self) -> Iterator[T]:
        return iter(self.iterable)

    def set_postfix(self, **values) -> None:
        self.postfix = values
        if self.tqdm is not None:
            self.tqdm.set_postfix(**values)


class Reporter:
    """The silent reporter of library use: stages, bars and notes vanish, warnings go to :mod:`warnings`."""

    def stage(self, text: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def bar(self, iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Bar:
        return Bar(iterable)

    def warn(self, text: str) -> None:
        warnings.warn(text, SimpruneWarning, stacklevel=4)

    def close(self) -> None:
        pass


class StderrReporter(Reporter):
    """Stage lines, bars and warnings on stderr (the CLI's). ``quiet`` keeps only the warnings; ``mute``
    (the other ranks of a torchrun job) drops everything; ``wording`` rewrites warnings (the CLI's flags
    for the library's keyword names)."""

    def __init__(self, quiet: bool = False, mute: bool = False, wording: Callable[[str], str] = str):
        self.quiet, self.mute, self.wording = quiet or mute, mute, wording
        self.start = time.perf_counter()
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._warned: set[str] = set()  # each warning once (a compare grid repeats them per run)

    def _print(self, text: str) -> None:
        with self._lock:
            print(text, file=sys.stderr, flush=True)

    def _stamp(self, text: str) -> str:
        return f"[{time.perf_counter() - self.start:6.1f}s] {text}"

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stage(self, text: str) -> None:
        """Announce ``text`` if it is still the current stage after :data:`ANNOUNCE_AFTER_S`."""
        self._cancel()
        if self.quiet:
            return
        self._timer = threading.Timer(ANNOUNCE_AFTER_S, lambda: self._print(self._stamp(f"{text} ...")))
        self._timer.daemon = True
        self._timer.start()

    def note(self, text: str) -> None:
        self._cancel()
        if not self.quiet:
            self._print(self._stamp(text))

    def warn(self, text: str) -> None:
        self._cancel()
        if not self.mute and text not in self._warned:
            self._warned.add(text)
            self._print(f"warning: {self.wording(text)}")

    def bar(self, iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Bar:
        self._cancel()
        if self.quiet:
            return Bar(iterable)
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.stage(f"{desc}: {total or 'some'} {unit}")  # said after a second even if the first item is slow
        shown = Bar(iterable)
        make = self._terminal if sys.stderr.isatty() else self._piped
        shown.iterable = make(iterable, desc, total, unit, shown)
        return shown

    def _terminal(self, iterable: Iterable[T], desc: str, total: int | None, unit: str, shown: Bar) -> Iterator[T]:
        """A tqdm bar, shown once the loop has run for a second (the stage line covers a slow first item)."""
        first = True
        with tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, delay=ANNOUNCE_AFTER_S,
                  file=sys.stderr, dynamic_ncols=True) as shown.tqdm:
            for item in shown.tqdm:
                if first:
                    self._cancel()
                    first = False
                yield item

    def _piped(self, iterable: Iterable[T], desc: str, total: int | None, unit: str, display: Bar) -> Iterator[T]:
        """A bar for a log file: a line after a second, one every :data:`PIPED_EVERY_S`, and one at the end."""
        t0 = last = time.perf_counter()
        shown, done = False, 0
        of = f"/{total}" if total else ""
        for item in iterable:
            yield item
            done += 1
            now = time.perf_counter()
            if (not shown and now - t0 > ANNOUNCE_AFTER_S) or (shown and now - last > PIPED_EVERY_S):
                self._cancel()
                figures = "".join(f", {k} {v}" for k, v in display.postfix.items())
                self._print(self._stamp(f"{desc}: {done}{of} {unit} ({now - t0:.0f} s{figures})"))
                shown, last = True, now
        self._cancel()
        if shown or time.perf_counter() - t0 > ANNOUNCE_AFTER_S:
            figures = "".join(f", {k} {v}" for k, v in display.postfix.items())
            self._print(self._stamp(f"{desc}: {done}{of} {unit} done in {time.perf_counter() - t0:.1f} s{figures}"))

    def close(self) -> None:
        self._cancel()


_current: contextvars.ContextVar[Reporter] = contextvars.ContextVar("simprune_reporter", default=Reporter())


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Send the library's stages, bars, notes and warnings to ``reporter`` inside the block."""
    token = _current.set(reporter)
    try:
        yield reporter
    finally:
        reporter.close()
        _current.reset(token)


def stage(text: str) -> None:
    """A step is starting (announced by the CLI when it lasts over a second)."""
    _current.get().stage(text)


def note(text: str) -> None:
    """A line worth showing now (one iterative step's result)."""
    _current.get().note(text)


def warn(text: str) -> None:
    """A result that holds but may mislead: printed by the CLI as ``warning: ...``."""
    _current.get().warn(text)


def bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it", enabled: bool = True) -> Bar:
    """``iterable`` with a progress bar when a reporter shows bars and ``enabled``."""
    return _current.get().bar(iterable, desc, total, unit) if enabled else Bar(iterable)
