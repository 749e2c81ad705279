"""Markdown tables for reports and the compare results."""
from __future__ import annotations

from typing import Any


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list, rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows])


def run_label(row: dict) -> str:
    """"qsfm", "qsfm + twin" (an explicit compensation), "qsfm + refit" (the consumer refit),
    "l1 / iterative:5" (a schedule other than one-shot)."""
    comp, schedule = row.get("compensated"), row.get("schedule") or "oneshot"
    return row["criterion"] + (f" + {comp}" if isinstance(comp, str) else "") + \
        (" + refit" if row.get("reconstructed") else "") + (f" / {schedule}" if schedule != "oneshot" else "")


def pivot_table(rows: list[dict], kind: str = "flops") -> tuple[list[str], list[list[str]]]:
    """One line per criterion (+ compensation, + schedule), one column per target: "top-1 (change)"."""
    by: dict[str, dict[float, dict]] = {}
    for r in rows:
        by.setdefault(run_label(r), {})[r["target"]] = r
    targets = sorted({r["target"] for r in rows})
    unit = "MACs" if kind == "flops" else "params"
    header = ["criterion"] + [f"{100 * t:.0f} % {unit}: top-1 (change)" for t in targets]
    body = [[label] + [f"{cells[t]['top1']:.2f} ({cells[t]['change']:+.2f})" if t in cells else "" for t in targets]
            for label, cells in by.items()]
    return header, body
