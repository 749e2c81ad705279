"""Hard iterative pruning: K re-scored one-shot steps toward the target.

Step k removes channels until ``1 - (1 - R)^(k/K)`` of the original cost is gone (the same share of
what is left each time); an optional callback (e.g. a fine-tuning epoch) runs between steps.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from simprune import progress
from simprune.errors import SimpruneError
from simprune.graph.counting import count
from simprune.schedules.oneshot import Job, prune_oneshot
from simprune.schedules.report import PruneReport, merge_steps


def step_targets(ratio: float, steps: int) -> list[float]:
    """Cumulative reductions after each of ``steps`` steps: equal shares of what is left each time."""
    if steps < 1:
        raise SimpruneError(f"steps={steps} must be 1 or more")
    return [1 - (1 - ratio) ** (k / steps) for k in range(1, steps + 1)]


def iterative(job: Job, steps: int, between: Callable[[nn.Module, int], None] | None = None
              ) -> tuple[nn.Module, PruneReport]:
    """``steps`` one-shot prunes of ``job.model`` (in place) toward the cumulative targets, re-scoring each
    time; ``between(model, k)`` runs after every step but the last."""
    model, example = job.model, job.example
    kind, ratio = next(iter(job.target.items()))
    key = "macs" if kind == "flops" else "params"
    base = count(model, example)
    reports = []
    for k, cumulative in enumerate(step_targets(ratio, steps), start=1):
        step_ratio = 1 - getattr(base, key) * (1 - cumulative) / getattr(count(model, example), key)
        if step_ratio <= 0:
            continue
        model, rep = prune_oneshot(job.replace(model=model, target={kind: step_ratio}))
        rep["step"], rep["cumulative_target"] = k, cumulative
        reports.append(rep)
        now = getattr(count(model, example), key)
        progress.note(f"step {k}/{steps}: {'MACs' if key == 'macs' else 'params'} {getattr(base, key) / 1e6:.2f} M "
                      f"-> {now / 1e6:.2f} M ({1 - now / getattr(base, key):.1%} removed, step target "
                      f"{cumulative:.1%})")
        if between is not None and k < steps:
            between(model, k)
    if not reports:
        raise SimpruneError("iterative pruning removed nothing; raise the target")
    return model, merge_steps(reports, base, count(model, example), job.target)
