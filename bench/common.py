"""Shared helpers for the benchmark scripts: machine description, table printing, JSON output."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    from simprune.export.latency import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |")
    print("|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|")
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) + " |")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return "" if v is None else str(v)


def write_json(name: str, payload: dict) -> Path:
    from simprune.io.files import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, {"machine": machine(), "command": " ".join([Path(sys.executable).name] + sys.argv),
                             **payload})
    return path
