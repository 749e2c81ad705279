"""The one pruning report: what every schedule (one-shot, iterative, soft, to a latency) records about a
prune, as a :class:`PruneReport` built by :func:`prune_report` and written with :meth:`PruneReport.to_dict`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from simprune import distributed
from simprune.graph.counting import Cost, count, layer_widths

SCHEMA_VERSION = 2  # 1: the untyped dict before report.json had a version; 2: + schema_version and options


@dataclass
class PruneReport:
    """A prune's report. The fixed fields are today's report.json keys; ``extra`` holds what a schedule
    or step adds (seconds, reconstructed, warnings, latency_target, ...), ``options`` the resolved stage
    options. Indexing (``report["reduction"]``) reads and writes fields and extras alike."""

    schedule: dict[str, Any]
    model: str | None
    criterion: str
    target: dict[str, float]
    macs: dict[str, float]
    params: dict[str, float]
    reduction: dict[str, float]
    layers: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    protected_groups: list[str]
    bn_recalibrated: bool
    decision_fingerprint: str
    compensated: bool | str
    accuracy: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    _ORDER = ("schedule", "model", "criterion", "target", "macs", "params", "reduction", "layers", "groups",
              "accuracy", "protected_groups", "bn_recalibrated", "decision_fingerprint", "compensated")

    def __getitem__(self, key: str) -> Any:
        if key in self._ORDER:
            return getattr(self, key)
        return self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self._ORDER:
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self._ORDER or key in self.extra

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def update(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self[k] = v

    def to_dict(self) -> dict[str, Any]:
        """The report.json dict: today's keys in today's order, the extras, the schema version, the options."""
        out = {k: getattr(self, k) for k in self._ORDER}
        out.update(self.extra)
        out["schema_version"] = self.schema_version
        if self.options:
            out["options"] = self.options
        return out


@dataclass
class Snapshot:
    """A model's costs, layer widths and group widths (by root) at one moment: before or after a prune."""

    cost: Cost
    layers: dict[str, int]
    groups: dict[str, int]

    @classmethod
    def take(cls, model, example, graph) -> Snapshot:
        return cls(count(model, example), layer_widths(model), {g.root: g.size for g in graph.groups})


def prune_report(*, model_name: str, criterion: str, target: dict[str, float], schedule: dict[str, Any],
                 before: Snapshot, after: Snapshot, removed: dict[str, list[int]], protected: list[str],
                 repaired: dict[str, Any], **extra: Any) -> PruneReport:
    """The report of one prune: costs before/after, widths per layer and group, the decision's
    fingerprint, and what the repair did (``repaired``: compensated, bn_recalibrated). ``extra`` keys
    (seconds, finetune, ...) are added as given."""
    b, a = before.cost, after.cost
    return PruneReport(
        schedule=dict(schedule), model=model_name, criterion=criterion, target=dict(target),
        macs={"before": b.macs, "after": a.macs}, params={"before": b.params, "after": a.params},
        reduction={"flops": 1 - a.macs / b.macs, "params": 1 - a.params / b.params},
        layers=[{"name": n, "channels_before": c, "channels_after": after.layers.get(n, 0)}
                for n, c in before.layers.items()],
        groups=[{"root": r, "channels_before": before.groups.get(r, size), "channels_after": size}
                for r, size in after.groups.items()],
        protected_groups=list(protected), bn_recalibrated=bool(repaired["bn_recalibrated"]),
        decision_fingerprint=distributed.fingerprint(removed), compensated=repaired["compensated"],
        extra=dict(extra))


MISS_TOLERANCE = 0.02  # achieved vs asked reduction beyond which a target counts as missed


def target_met(target: dict[str, float], before: Cost, after: Cost) -> bool | None:
    """Whether a MACs/params target was reached within :data:`MISS_TOLERANCE` (None for a latency target,
    which is measured elsewhere); :mod:`simprune.schedules.checks` warns when it was not."""
    kind, ratio = next(iter(target.items()))
    if kind not in ("flops", "params"):
        return None
    achieved = 1 - (after.macs / before.macs if kind == "flops" else after.params / before.params)
    return abs(achieved - ratio) <= MISS_TOLERANCE


def merge_steps(reports: list[PruneReport], base: Cost, after: Cost, target: dict[str, float]) -> PruneReport:
    """One report for an iterative run: the last step's, with the first step's 'before' widths and costs."""
    first, final = reports[0], reports[-1]
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
