"""Training, fine-tuning and evaluation loops.

SGD + momentum with a per-step cosine schedule after a linear warm-up, bf16
autocast and channels_last on CPU, tqdm progress, and a checkpoint written
atomically after every epoch (``train_state.safetensors``: weights, momentum
buffers, epoch) so ``resume`` continues exactly where a run stopped: each epoch
reseeds its shuffling and augmentation from ``seed + epoch``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import SimpruneError
from .files import atomic_write_bytes, read_tensors, save_model

STATE_FILE = "train_state.safetensors"


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    bf16: bool = True
    channels_last: bool = True
    label_smoothing: float = 0.0
    distill_alpha: float = 0.0  # weight of the KL term when a teacher is given
    distill_temperature: float = 4.0
    limit_batches: int | None = None  # for smoke tests: stop each epoch after this many batches

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise SimpruneError("epochs and batch size must be >= 1 and lr > 0")


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then cosine to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def _optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"optim.{names[id(p)]}"] = buf.detach().contiguous().clone()
    return out


def save_train_state(out_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int,
                     history: list[dict], cfg: TrainConfig) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tensors.update(_optimizer_tensors(model, opt))
    meta = {"epoch": str(epoch), "history": json.dumps(history), "config": json.dumps(asdict(cfg))}
    atomic_write_bytes(out_dir / STATE_FILE, st_save(tensors, metadata=meta))


def load_train_state(out_dir: Path, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Restore weights and momentum; return (epochs done, history)."""
    from safetensors import safe_open  # noqa: PLC0415

    path = out_dir / STATE_FILE
    if not path.exists():
        raise SimpruneError(f"--resume: {path} does not exist; nothing to resume, drop --resume")
    tensors = read_tensors(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        epoch, history = int(meta["epoch"]), json.loads(meta["history"])
    except (KeyError, ValueError) as exc:
        raise SimpruneError(f"{path} lacks its epoch/history metadata; it is not a simprune training state") from exc
    from .files import load_weights_into  # noqa: PLC0415

    load_weights_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    params = dict(model.named_parameters())
    for key, buf in tensors.items():
        if key.startswith("optim."):
            p = params.get(key[6:])
            if p is None or p.shape != buf.shape:
                raise SimpruneError(f"{path}: optimizer state {key} does not match the model")
            opt.state[p]["momentum_buffer"] = buf.clone()
    return epoch, history


def _loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int, sampler=None) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=g, num_workers=0, drop_last=False)


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 512, bf16: bool = True,
             progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy over ``ds``."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = n = 0
    loss_sum = 0.0
    for x, y in tqdm(_loader(ds, batch_size, False, 0), desc=desc, leave=False, disable=not progress):
        with autocast(bf16):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        n += len(y)
    model.train(was_training)
    if n == 0:
        raise SimpruneError("evaluation data set is empty")
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": n}


def train(model: nn.Module, train_ds: Dataset, cfg: TrainConfig, out_dir: Path | None = None,
          test_ds: Dataset | None = None, description: dict[str, Any] | None = None, resume: bool = False,
          teacher: nn.Module | None = None, log: Callable[[str], None] = print,
          progress: bool = True, on_step: Callable[[nn.Module], None] | None = None) -> list[dict]:
    """Train ``model`` in place; return per-epoch history. Writes checkpoints to ``out_dir`` if given.

    ``on_step`` runs after every optimizer step (soft pruning uses it to keep filters zeroed).
    """
    cfg.validate()
    out_dir = Path(out_dir) if out_dir else None
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    start_epoch, history = 0, []
    if resume and out_dir is not None:
        start_epoch, history = load_train_state(out_dir, model, opt)
        log(f"resuming from epoch {start_epoch} of {cfg.epochs} ({out_dir / STATE_FILE})")
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    if cfg.limit_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.limit_batches)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    if teacher is not None:
        teacher.eval()
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        model.train()
        t0, loss_sum, seen, correct = time.time(), 0.0, 0, 0
        loader = _loader(train_ds, cfg.batch_size, True, cfg.seed * 100_003 + epoch)
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not progress)
        for step, (x, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + step, total, warmup, cfg.lr)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(cfg.bf16):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                if teacher is not None and cfg.distill_alpha > 0:
                    with torch.no_grad():
                        t_logits = teacher(x).float()
                    T = cfg.distill_temperature
                    kd = F.kl_div(F.log_softmax(logits.float() / T, 1), F.softmax(t_logits / T, 1),
                                  reduction="batchmean") * T * T
                    loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(model)
            if not torch.isfinite(loss):
                raise SimpruneError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower --lr")
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_top1": 100 * correct / max(seen, 1),
                  "seconds": round(time.time() - t0, 1)}
        if test_ds is not None:
            metrics = evaluate(model, test_ds, bf16=cfg.bf16)
            record.update(test_top1=metrics["top1"], test_top5=metrics["top5"], test_loss=metrics["loss"])
        history.append(record)
        if out_dir is not None:
            save_train_state(out_dir, model, opt, epoch + 1, history, cfg)
            save_model(out_dir, model.to(memory_format=torch.contiguous_format),
                       {**(description or {}), "history": history, "train_config": asdict(cfg)})
            if cfg.channels_last:
                model.to(memory_format=torch.channels_last)
        log(json.dumps(record))
    model.to(memory_format=torch.contiguous_format)
    return history
