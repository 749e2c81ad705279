"""The one pruning report: what every schedule (one-shot, iterative, soft) records about a prune."""
from __future__ import annotations

from typing import Any

from simprune import distributed
from simprune.graph.counting import Cost
from simprune.graph.groups import ChannelGroup


def prune_report(*, model_name: str, criterion: str, target: dict[str, float], schedule: dict[str, Any],
                 before: Cost, after: Cost, layers_before: dict[str, int], layers_after: dict[str, int],
                 groups: list[ChannelGroup], groups_before: dict[str, int], removed: dict[str, list[int]],
                 protected: list[str], compensated: bool | str, bn_recalibrated: bool,
                 **extra: Any) -> dict[str, Any]:
    """The report dict of one prune: costs before/after, widths per layer and group, the decision's
    fingerprint, and what was done after removal. ``extra`` keys (seconds, finetune, ...) are added as given."""
    report = {
        "schedule": dict(schedule),
        "model": model_name,
        "criterion": criterion,
        "target": dict(target),
        "macs": {"before": before.macs, "after": after.macs},
        "params": {"before": before.params, "after": after.params},
        "reduction": {"flops": 1 - after.macs / before.macs, "params": 1 - after.params / before.params},
        "layers": [{"name": n, "channels_before": c, "channels_after": layers_after.get(n, 0)}
                   for n, c in layers_before.items()],
        "groups": [{"root": g.root, "channels_before": groups_before.get(g.root, g.size), "channels_after": g.size}
                   for g in groups],
        "accuracy": None,
        "protected_groups": list(protected),
        "bn_recalibrated": bool(bn_recalibrated),
        "decision_fingerprint": distributed.fingerprint(removed),
        "compensated": compensated,
    }
    report.update(extra)
    return report


MISS_TOLERANCE = 0.02  # achieved vs asked reduction beyond which a target counts as missed


def target_met(target: dict[str, float], before: Cost, after: Cost) -> bool | None:
    """Whether a MACs/params target was reached within :data:`MISS_TOLERANCE` (None for a latency target,
    which is measured elsewhere); :mod:`simprune.schedules.checks` warns when it was not."""
    kind, ratio = next(iter(target.items()))
    if kind not in ("flops", "params"):
        return None
    achieved = 1 - (after.macs / before.macs if kind == "flops" else after.params / before.params)
    return abs(achieved - ratio) <= MISS_TOLERANCE


def merge_steps(reports: list[dict], base: Cost, after: Cost, target: dict[str, float]) -> dict:
    """One report for an iterative run: the last step's, with the first step's 'before' widths and costs."""
    first, final = reports[0], dict(reports[-1])
    final["macs"] = {"before": base.macs, "after": after.macs}
    final["params"] = {"before": base.params, "after": after.params}
    final["reduction"] = {"flops": 1 - after.macs / base.macs, "params": 1 - after.params / base.params}
    final["target"] = dict(target)
    final["schedule"] = {"name": "iterative", "steps": [
        {"step": r["step"], "cumulative_target": r["cumulative_target"], "macs_after": r["macs"]["after"],
         "params_after": r["params"]["after"], "decision_fingerprint": r.get("decision_fingerprint")}
        for r in reports]}
    groups_before = {g["root"]: g["channels_before"] for g in first["groups"]}
    final["groups"] = [{**g, "channels_before": groups_before.get(g["root"], g["channels_before"])}
                       for g in final["groups"]]
    layers_before = {g["name"]: g["channels_before"] for g in first["layers"]}
    final["layers"] = [{**g, "channels_before": layers_before.get(g["name"], g["channels_before"])}
                       for g in final["layers"]]
    return final
