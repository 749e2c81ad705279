"""Wall time and peak memory of each stage of a prune, read from the library's own stage messages.

A :class:`StageClock` is a ``simprune.progress`` reporter: every stage message ("scoring channels",
"reconstructing ...") closes the running stage and opens the next; the calibration statistics' progress
bar opens "statistics" and its end opens "scoring". Peak memory of a stage is the process's VmHWM at its
end minus its VmRSS at its start (the high-water mark is reset at every stage through
/proc/self/clear_refs, Linux >= 4.0).
"""
from __future__ import annotations

import time
from pathlib import Path

from simprune.progress import Bar, Reporter

STAGES = {  # the start of a library stage message -> the stage it opens
    "building the channel graph": "graph", "scoring channels": "scoring", "allocating": "allocation",
    "removing": "removal", "reconstructing": "refit", "BatchNorm": "bn", "label-free recovery": "recovery",
    "checking the result": "verify",
}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Make VmHWM restart from the current RSS, so only what follows counts."""
    Path("/proc/self/clear_refs").write_text("5")


class StageClock(Reporter):
    """Collects {stage: {"seconds", "growth_mib"}} (a stage seen twice adds its seconds, keeps the larger peak)."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}
        self._open: tuple[str, float, int] | None = None
        self.peak_kib = 0  # the largest VmHWM seen at the end of any stage

    def peak_growth_mib(self, rss0_kib: int) -> float:
        """The whole run's peak memory over ``rss0_kib`` (the RSS before it began)."""
        return (self.peak_kib - rss0_kib) / 1024

    def begin(self, name: str) -> None:
        self.end()
        reset_peak()
        self._open = (name, time.perf_counter(), status_kib("VmRSS"))

    def end(self) -> None:
        if self._open is None:
            return
        name, t0, rss0 = self._open
        got = self.stages.setdefault(name, {"seconds": 0.0, "growth_mib": 0.0})
        got["seconds"] += time.perf_counter() - t0
        hwm = status_kib("VmHWM")
        got["growth_mib"] = max(got["growth_mib"], (hwm - rss0) / 1024)
        self.peak_kib = max(self.peak_kib, hwm)
        self._open = None

    def stage(self, text: str) -> None:
        name = next((v for k, v in STAGES.items() if text.startswith(k)), None)
        if name is not None:
            self.begin(name)

    def bar(self, iterable, desc: str, total: int | None = None, unit: str = "it") -> Bar:
        if desc != "calibration statistics":
            return Bar(iterable)

        def timed():
            self.begin("statistics")
            yield from iterable
            self.begin("scoring")
        return Bar(timed())

    def warn(self, text: str) -> None:
        pass  # a bench on random images draws the library's warnings about them; they are not the measure
