"""Where an interrupted run can continue from, told without importing torch.

A Ctrl-C can land while torch is still importing; importing it again in the handler would crash
the interpreter, so the message is built from the checkpoint's safetensors header alone.
"""
from __future__ import annotations

import json
from pathlib import Path

STATE_FILE = "train_state.safetensors"
MARKER = "INCOMPLETE.json"  # an unfinished run's directory holds this until it completes


def checkpoint_epoch(path: Path) -> str | None:
    """The ``epoch`` recorded in a training state's header, or None when the header is unreadable."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 100 * 2**20:
                return None
            meta = json.loads(f.read(n)).get("__metadata__") or {}
        return str(meta["epoch"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
        return None


def last_checkpoint(out_dir: Path | str | None) -> str:
    """In words, for the message on SIGINT/SIGTERM: what ``out_dir`` holds and how to continue."""
    out = Path(out_dir) if out_dir else None
    if out is None or not out.is_dir() or not any(out.iterdir()):
        return f"nothing was written to {out_dir}; rerun the same command"
    if (out / "model.json").exists() and not (out / MARKER).exists():
        return f"{out} is complete"
    path = out / STATE_FILE
    if not path.exists():
        return "no checkpoint was written yet; rerun with --overwrite to start again"
    epoch = checkpoint_epoch(path)
    if epoch is None:
        return f"{path} is damaged; rerun with --overwrite to start again"
    return f"the last good checkpoint is {path} (epoch {epoch}); rerun the same command with --resume to continue"
