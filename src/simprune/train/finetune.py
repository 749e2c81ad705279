"""Fine-tuning after pruning, the soft schedule, and the ``simprune finetune`` command.

A fine-tuning run works inside its output directory, marked unfinished by ``INCOMPLETE.json``
until the final model is written; each epoch leaves an atomic ``train_state.safetensors`` so
``--resume`` continues exactly where a killed run stopped. Optional knowledge distillation
uses the unpruned model (``--distill``). Under ``torchrun`` only rank 0 writes.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from simprune import distributed
from simprune.errors import SimpruneError
from simprune.io.files import atomic_write_json, load_model, read_json
from simprune.train.loop import STATE_FILE, TrainConfig, TrainHooks, evaluate, train

MARKER = "INCOMPLETE.json"


@dataclass
class FineTune:
    """What fine-tuning needs besides the model: data, schedule, teacher, where to checkpoint."""

    train_ds: Dataset
    cfg: TrainConfig
    test_ds: Dataset | None = None
    teacher: nn.Module | None = None
    out_dir: Path | None = None
    description: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    log: Callable[[str], None] = print
    progress: bool = True
    device: str | None = None  # None: CUDA when available, else CPU

    def run(self, model: nn.Module, hooks: TrainHooks | None = None, epochs: int | None = None,
            checkpoint: bool = True) -> list[dict]:
        """Train ``model`` in place (``epochs`` overrides the config; no checkpoints without ``checkpoint``)."""
        cfg = self.cfg if epochs is None else TrainConfig(**{**self.cfg.__dict__, "epochs": epochs})
        return train(model, self.train_ds, cfg, self.out_dir if checkpoint else None, self.test_ds,
                     self.description, resume=self.resume and checkpoint, teacher=self.teacher, log=self.log,
                     progress=self.progress, hooks=hooks, device=self.device)


def mark_incomplete(out: Path, phase: str, command: str) -> None:
    """Create ``out`` (empty, or cleared with overwrite by the caller) with its unfinished-run marker."""
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MARKER, {"phase": phase, "command": command,
                                         "resume": "rerun the same command with --resume"})
    distributed.barrier()


def check_output(out: Path, resume: bool, overwrite: bool) -> dict | None:
    """Refuse a used directory unless resuming (returns its marker) or overwriting (clears it)."""
    marker = out / MARKER
    if resume:
        if not marker.exists() or not (out / STATE_FILE).exists():
            raise SimpruneError(f"resume=True but {out} holds no unfinished run ({MARKER} and {STATE_FILE}); "
                                "drop resume=True to start a new one")
        return read_json(marker)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            hint = " (an unfinished run: add resume=True to continue it)" if marker.exists() else ""
            raise SimpruneError(f"output directory {out} already exists and is not empty{hint}; "
                                "pass overwrite=True or pick another")
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(out)
        distributed.barrier()
    return None


def finish(out: Path) -> None:
    """Called after the final model is written: the run is complete, drop the marker and the state."""
    if distributed.is_main():
        (out / MARKER).unlink(missing_ok=True)
        (out / STATE_FILE).unlink(missing_ok=True)


def load_teacher(desc: dict, teacher_dir: str | None) -> nn.Module:
    """The unpruned model for distillation: --teacher, else the checkpoint the model was pruned from."""
    source = teacher_dir or (desc.get("pruning") or {}).get("source") or (desc.get("finetune") or {}).get("teacher")
    if not source:
        raise SimpruneError("distillation needs the unpruned model and this model records none; pass teacher=")
    teacher, _ = load_model(source)
    return teacher.eval()


def run_finetune(model: nn.Module, finetune: FineTune, report: dict) -> dict:
    """Fine-tune a pruned model and record the result in ``report["finetune"]``."""
    top1_before = evaluate(model, finetune.test_ds)["top1"] if finetune.test_ds is not None else None
    history = finetune.run(model)
    model.eval()
    weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    report["finetune"] = {"epochs": finetune.cfg.epochs, "lr": finetune.cfg.lr, "history": history,
                          "distill": finetune.teacher is not None, "top1_before_finetune": top1_before,
                          "top1_after": history[-1].get("test_top1") if history else None,
                          "ranks": distributed.world_size(),
                          "weights_fingerprint": distributed.check_agree(weights, "fine-tuned weights"),
                          "weights_fingerprint_per_rank": distributed.gather_fingerprints(weights)}
    return report


# ---- `simprune finetune DIR` ------------------------------------------------------------------
