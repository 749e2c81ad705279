"""Training, fine-tuning and evaluation loops.

SGD + momentum with a per-step cosine schedule after a linear warm-up, bf16
autocast and channels_last, on ``device`` (CUDA when available, else CPU), tqdm progress, and a checkpoint written
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
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from simprune import distributed
from simprune.errors import SimpruneError
from simprune.io.checkpoints import STATE_FILE
from simprune.io.files import (
    atomic_write_bytes,
    load_weights_into,
    read_safetensors,
    save_model,
    tensors_bytes,
)
from simprune.progress import bar as progress_bar


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


def autocast(enabled: bool, device: torch.device | str = "cpu"):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


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
                out[f"optim.{names[id(p)]}"] = buf.detach().to("cpu", copy=True).contiguous()
    return out


def save_train_state(out_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int,
                     history: list[dict], cfg: TrainConfig, hook_state: dict | None = None) -> None:
    tensors = {f"model.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    tensors.update(_optimizer_tensors(model, opt))
    meta = {"epoch": str(epoch), "history": json.dumps(history), "config": json.dumps(asdict(cfg)),
            "hooks": json.dumps(hook_state or {})}
    atomic_write_bytes(out_dir / STATE_FILE, tensors_bytes(tensors, meta))


def load_train_state(out_dir: Path, model: nn.Module,
                     opt: torch.optim.Optimizer) -> tuple[int, list[dict], dict]:
    """Restore weights and momentum; return (epochs done, history, the hooks' state).

    Everything is checked before anything is restored: the digest, the metadata's types (epoch a
    count, one history record per epoch), names, shapes and finite values."""
    path = out_dir / STATE_FILE
    if not path.exists():
        raise SimpruneError(f"resume=True but {path} does not exist; nothing to resume, drop resume=True")
    tensors, meta = read_safetensors(path, require_digest=True)
    try:
        text = meta["epoch"]
        if not (text.isascii() and text.isdigit() and len(text) <= 7):
            raise ValueError("epoch is not a count")
        epoch, history = int(text), json.loads(meta["history"])
        hook_state = json.loads(meta.get("hooks", "{}"))
        if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)
                and len(history) == epoch and isinstance(hook_state, dict)):
            raise ValueError("unexpected types")
    except (KeyError, ValueError, RecursionError) as exc:
        raise SimpruneError(f"{path} lacks valid epoch/history metadata; it is not a simprune training state, "
                            "start again with overwrite=True") from exc
    unknown = sorted(k for k in tensors if not k.startswith(("model.", "optim.")))
    if unknown:
        raise SimpruneError(f"{path}: unexpected entries {unknown[:3]}; it is not a simprune training state")
    params = dict(model.named_parameters())
    momentum = {}
    for key, buf in tensors.items():
        if key.startswith("optim."):
            p = params.get(key[6:])
            if p is None or p.shape != buf.shape or not buf.is_floating_point():
                raise SimpruneError(f"{path}: optimizer state {key} does not match the model")
            buf = buf.to(p)
            if not torch.isfinite(buf).all():
                raise SimpruneError(f"{path}: optimizer state {key} contains NaN or inf; the file is corrupt")
            momentum[p] = buf
    load_weights_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    for p, buf in momentum.items():
        opt.state[p]["momentum_buffer"] = buf.clone()
    return epoch, history, hook_state


def _loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int, sampler=None) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=g, num_workers=0, drop_last=False)


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 512, bf16: bool = True,
             progress: bool = False, desc: str = "eval", device: str | torch.device | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy over ``ds`` (sharded across torchrun ranks),
    on ``device`` (None: where the model already is; the model goes back where it was)."""
    was_training, home = model.training, distributed.model_device(model)
    device = home if device is None else distributed.resolve_device(device)
    model.to(device).eval()
    if distributed.active():
        ds = Subset(ds, distributed.shard(list(range(len(ds)))))
    sums = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss, n
    for x, y in progress_bar(_loader(ds, batch_size, False, 0), desc, unit="batches", enabled=progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(bf16, device):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.tensor([(top[:, 0] == y).sum().item(), (top == y[:, None]).any(dim=1).sum().item(),
                              F.cross_entropy(logits, y, reduction="sum").item(), len(y)], dtype=torch.float64)
    model.train(was_training).to(home)
    correct1, correct5, loss_sum, n = distributed.all_reduce_sum(sums).tolist()
    if n == 0:
        raise SimpruneError("evaluation data set is empty")
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": int(n)}


class TrainHooks:
    """Callbacks that schedules (soft pruning) plug into the loop; all optional.

    ``state``/``load_state`` carry the hook's own JSON state in the checkpoint, so resume is exact."""

    def on_step(self, model: nn.Module) -> None: ...

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None: ...

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None: ...


def _distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits / T, 1), F.softmax(teacher_logits / T, 1), reduction="batchmean") * T * T


def _epoch_loader(train_ds: Dataset, cfg: TrainConfig, epoch: int, batch: int) -> DataLoader:
    """This epoch's shuffled loader: seeded by (seed, epoch); under torchrun each rank reads its shard."""
    seed = cfg.seed * 100_003 + epoch
    torch.manual_seed(seed + 7919 * distributed.rank())
    sampler = None
    if distributed.world_size() > 1:
        sampler = DistributedSampler(train_ds, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                     shuffle=True, seed=cfg.seed * 100_003)
        sampler.set_epoch(epoch)
    return _loader(train_ds, batch, True, seed, sampler)


def _step_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
               teacher: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of one batch: cross-entropy, plus distillation from ``teacher`` when it is given."""
    with autocast(cfg.bf16, x.device):
        logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if teacher is not None and cfg.distill_alpha > 0:
            with torch.no_grad():
                t_logits = teacher(x).float()
            kd = _distillation_loss(logits.float(), t_logits, cfg.distill_temperature)
            loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
    return loss, logits


def _train_epoch(net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader,
                 cfg: TrainConfig, epoch: int, schedule: tuple[int, int, int], teacher: nn.Module | None,
                 hooks: TrainHooks, progress: bool) -> torch.Tensor:
    """One epoch of SGD; returns this rank's float64 sums (loss, correct, seen). ``schedule`` is
    (steps per epoch, total steps, warm-up steps) of the learning-rate curve."""
    steps_per_epoch, total, warmup = schedule
    sums = torch.zeros(3, dtype=torch.float64)
    bar = progress_bar(loader, f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, unit="batches",
                       enabled=progress)
    device = distributed.model_device(model)
    for step, (x, y) in enumerate(bar):
        if step >= steps_per_epoch:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch * steps_per_epoch + step, total, warmup, cfg.lr)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, logits = _step_loss(net, x, y, cfg, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hooks.on_step(model)
        if not torch.isfinite(loss):
            raise SimpruneError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower the learning "
                                "rate lr=")
        sums += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)],
                             dtype=torch.float64)
        bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{100 * sums[1] / sums[2]:.1f}")
    return sums


def _checkpoint(out_dir: Path, model: nn.Module, opt, epoch: int, history: list[dict], cfg: TrainConfig,
                hooks: TrainHooks, description: dict[str, Any] | None) -> None:
    """Rank 0: the model so far, then the resumable training state, each written atomically. The
    state goes last: it is the commit point, so a kill between the two leaves a state one epoch
    behind (resume redoes that epoch), never model files behind a state resume would skip past."""
    save_model(out_dir, model.to(memory_format=torch.contiguous_format),
               {**(description or {}), "history": history, "train_config": asdict(cfg)})
    save_train_state(out_dir, model, opt, epoch, history, cfg, hooks.state())
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)


def train(model: nn.Module, train_ds: Dataset, cfg: TrainConfig, out_dir: Path | None = None,
          test_ds: Dataset | None = None, description: dict[str, Any] | None = None, resume: bool = False,
          teacher: nn.Module | None = None, log: Callable[[str], None] = print,
          progress: bool = True, hooks: TrainHooks | None = None,
          device: str | torch.device | None = None) -> list[dict]:
    """Train ``model`` in place on ``device`` (None: CUDA when available, else CPU; the model stays
    there); return per-epoch history. Writes checkpoints to ``out_dir`` if given.

    Under torchrun the model is wrapped in DistributedDataParallel, each rank reads its shard
    (DistributedSampler; ``cfg.batch_size`` is the global batch) and only rank 0 writes files.
    """
    cfg.validate()
    device = distributed.resolve_device(device)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    hooks = hooks or TrainHooks()
    out_dir = Path(out_dir) if out_dir else None
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    start_epoch, history = 0, []
    if resume and out_dir is not None:
        start_epoch, history, hook_state = load_train_state(out_dir, model, opt)
        hooks.load_state(hook_state)
        log(f"resuming from epoch {start_epoch} of {cfg.epochs} ({out_dir / STATE_FILE})")
    world = distributed.world_size()
    ids = [device.index] if device.type == "cuda" else None
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids) if world > 1 else model
    batch = max(1, cfg.batch_size // world)
    steps_per_epoch = math.ceil(math.ceil(len(train_ds) / world) / batch)
    if cfg.limit_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.limit_batches)
    schedule = (steps_per_epoch, cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    if teacher is not None:
        teacher.eval()
    for epoch in range(start_epoch, cfg.epochs):
        loader = _epoch_loader(train_ds, cfg, epoch, batch)
        model.train()
        t0 = time.time()
        sums = _train_epoch(net, model, opt, loader, cfg, epoch, schedule, teacher, hooks, progress)
        loss_sum, correct, seen = distributed.all_reduce_sum(sums).tolist()
        distributed.average_buffers(model)  # each rank's last batches moved its BatchNorm statistics
        hooks.on_epoch_end(model, epoch + 1)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_top1": 100 * correct / max(seen, 1),
                  "seconds": round(time.time() - t0, 1)}
        if test_ds is not None:
            metrics = evaluate(model, test_ds, bf16=cfg.bf16)
            record.update(test_top1=metrics["top1"], test_top5=metrics["top5"], test_loss=metrics["loss"])
        history.append(record)
        if out_dir is not None and distributed.is_main():
            _checkpoint(out_dir, model, opt, epoch + 1, history, cfg, hooks, description)
        distributed.barrier()
        if distributed.is_main():
            log(json.dumps(record))
    model.to(memory_format=torch.contiguous_format)
    return history
