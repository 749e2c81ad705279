"""Label-free recovery: the pruned model learns to reproduce the unpruned one on the calibration images.

Few-shot pruning literature (MiR, CVPR 2022; PRACTISE, CVPR 2023) recovers a pruned network end to end
against the unpruned one on a few hundred *unlabelled* images. This stage does that after removal and
refit: the loss is the KL divergence of the logits (for a model with any other outputs -- a detector's
tuple, a dict, a ModelOutput -- the squared error of every output tensor relative to the part of it that
varies from image to image) plus the normalised
squared error of the features before pooling (the last 4-D activation both models share in shape), on augmented views of the
calibration images (random resized crops, flips and CutMix: the teacher labels each mixed view itself,
so mixing makes new inputs without any label). A slice of the calibration images is held aside;
training stops when its output change from the teacher stops falling, and the best state on it is kept.
BatchNorm statistics are frozen during training (eval mode), so small batches cannot disturb them;
their affine parameters train. Labels are never read.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from simprune import progress
from simprune.calibrate.sensitivity import centered, is_logits, output_tensors
from simprune.calibrate.views import augment
from simprune.distributed import forward_precision
from simprune.errors import SimpruneError

GRAD_CLIP = 5.0  # gradient norm at most, per step
REFERENCE_PIXELS = 224 * 224  # batch_size counts images of this size; larger images make smaller batches
HOLDOUT_MIN = 8  # images: fewer held aside cannot tell a better model from a worse one


@dataclass(frozen=True)
class Recovery:
    """How the label-free recovery trains. ``lr`` and ``patience`` were chosen on the calibration split of
    the ImageNet sample (MobileNetV2 refit to 35 % fewer MACs on 400 images, 300 steps, KL on 100 images
    held aside from refit and recovery; labels never read): lr 0.01 diverged, 0.003 took the held-aside
    KL from 2.49 to 2.43, 0.001 to 2.27; at 0.001 the KL first rises for ~100 steps, hence a patience of
    6 checks. See docs/results.md.

    - ``steps``: optimiser steps at most (None: ``epochs`` passes over the training images);
    - ``epochs``: passes over the training images when ``steps`` is None;
    - ``batch_size``, ``lr`` (SGD, Nesterov momentum 0.9, cosine decay after a short warm-up); the batch is
      ``batch_size`` images of 224x224 or as many pixels in larger images (at least 2), so training memory
      stays bounded at any resolution (a YOLO at 640 px: 4 images a step, not 32);
    - ``holdout``: share of the calibration images held aside for early stopping (at least 8 images);
    - ``feature_weight``: weight of the pre-pooling feature error beside the logit KL;
    - ``temperature``: of the KL (1: the teacher's own probabilities);
    - ``min_scale``: smallest crop area of the random resized crops; ``cutmix``: share of mixed batches;
    - ``checks``: held-aside evaluations over the run; ``patience``: evaluations without improvement
      before stopping;
    - ``time_budget_s``: training stops once this much time has passed (None: no limit);
    - ``bf16``: autocast the forward passes to bfloat16 (weights and optimiser stay float32);
    - ``train_head``: False keeps the layers after the feature layer that are shaped as in the unpruned model
      (its classifier, when pruning left its input whole) as they are, so the pruned features are trained to
      feed the unpruned head (MiR) and the classes the calibration images do not show keep their weights
      (measured: MobileNetV2 at 35 %, 600 steps, head kept: held-aside KL 1.54 -> 1.41, evaluation top-1
      51.8 -> 54.4; with the head trained, session 6 saw evaluation top-1 fall).
    """

    steps: int | None = 600
    epochs: int = 60
    batch_size: int = 32
    lr: float = 0.001
    holdout: float = 0.2
    feature_weight: float = 1.0
    temperature: float = 1.0
    min_scale: float = 0.25
    cutmix: float = 0.5
    checks: int = 12
    patience: int = 6
    time_budget_s: float | None = 1200.0
    bf16: bool = True
    train_head: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.steps is not None and self.steps < 1 or self.epochs < 1 or self.batch_size < 1:
            raise SimpruneError("recover: steps, epochs and batch_size must be >= 1")
        if not (self.lr > 0 and 0 < self.holdout < 1 and 0 < self.min_scale <= 1 and 0 <= self.cutmix <= 1):
            raise SimpruneError("recover: lr must be > 0, holdout within (0, 1), min_scale within (0, 1], "
                                "cutmix within [0, 1]")

    @property
    def precision(self) -> str:
        """The forward precision, in :func:`simprune.distributed.forward_precision`'s words."""
        return "bf16" if self.bf16 else "fp32"

    def run(self, original: nn.Module, pruned: nn.Module, calibration, held_aside=None) -> dict:
        """Train ``pruned`` in place towards ``original`` on ``calibration``, early-stopping on ``held_aside``
        images (None: a ``holdout`` share of ``calibration``); returns the report's summary."""
        return recover(original, pruned, calibration, self, held_aside)


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch  # labels, if any, are never read


def split_images(calibration, holdout: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All calibration images on the CPU, split by a seeded permutation into (train, held aside)."""
    images = torch.cat([_images(b).detach().float().cpu() for b in calibration])
    if len(images) < 2 * HOLDOUT_MIN:
        raise SimpruneError(f"recovery needs at least {2 * HOLDOUT_MIN} calibration images, got {len(images)}; "
                            "pass more images or recover=False")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    held = max(HOLDOUT_MIN, round(holdout * len(images)))
    return images[order[held:]], images[order[:held]]


def _leaf_outputs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, tuple]]:
    """(name, output shape) of every leaf module that returns a tensor, in execution order."""
    seen: list[tuple[str, tuple]] = []
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.append((name, tuple(out.shape)))
                                       if isinstance(out, torch.Tensor) else None)
               for name, m in model.named_modules() if name and not list(m.children())]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return seen


def feature_layer(teacher: nn.Module, student: nn.Module, example: torch.Tensor) -> str | None:
    """The last module (by execution order) whose output is a 4-D map of the same shape in both models:
    the features before pooling that the head reads (MiR). None when no such module exists."""
    student_shapes = dict(_leaf_outputs(student, example))
    shared = [(name, shape) for name, shape in _leaf_outputs(teacher, example)
              if len(shape) == 4 and student_shapes.get(name) == shape]
    spatial = [name for name, shape in shared if shape[2] * shape[3] > 1]  # before pooling, not its 1x1 output
    return spatial[-1] if spatial else (shared[-1][0] if shared else None)


def head_layers(teacher: nn.Module, student: nn.Module, layer: str | None, example: torch.Tensor) -> list[str]:
    """The modules with parameters that run after ``layer`` in the student and are shaped as in the teacher:
    the teacher's head, which the student reuses as it is (MiR) when the head is not trained."""
    if layer is None:
        return []
    order = [name for name, _ in _leaf_outputs(student, example)]
    after = order[len(order) - order[::-1].index(layer):] if layer in order else []
    teacher_modules = dict(teacher.named_modules())
    head = []
    for name in dict.fromkeys(after):
        params = dict(student.get_submodule(name).named_parameters(recurse=False))
        twin = teacher_modules.get(name)
        if params and twin is not None and all(
                getattr(twin, k, None) is not None and getattr(twin, k).shape == p.shape for k, p in params.items()):
            head.append(name)
    return head


class _Capture:
    """Keeps the output of one named module of a model during each forward."""

    def __init__(self, model: nn.Module, name: str | None):
        self.value = None
        self.handle = None if name is None else model.get_submodule(name).register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output):
        self.value = output

    def close(self):
        if self.handle is not None:
            self.handle.remove()


def spread_energy(t: torch.Tensor) -> torch.Tensor:
    """Mean squared deviation of ``t`` from its mean over the images (dimension 0): the part of an output
    that depends on the image. A detector's decoded boxes carry the anchor grid, the same for every image,
    which would otherwise swamp any change. One image: deviation from each channel's mean instead."""
    t = t.float()
    spread = t - t.mean(0, keepdim=True) if t.shape[0] > 1 else centered(t)
    return spread.pow(2).mean().clamp_min(1e-12)


def output_loss(student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], temperature: float,
                scales: list[torch.Tensor] | None = None) -> torch.Tensor:
    """KL(teacher || student) of the logits at ``temperature`` (times T^2) for a classifier; otherwise the sum
    over output tensors of the squared error relative to ``scales`` (None: the teacher's :func:`spread_energy`
    on these images; the recovery fixes them once on the held-aside images, as a batch of a few is noisy)."""
    if is_logits(teacher_out):
        t = temperature
        return F.kl_div(F.log_softmax(student_out[0].float() / t, 1), F.log_softmax(teacher_out[0].float() / t, 1),
                        log_target=True, reduction="batchmean") * t * t
    if len(student_out) != len(teacher_out) or any(s.shape != t.shape for s, t in zip(student_out, teacher_out)):
        raise SimpruneError("recovery: the pruned model's outputs are not shaped as the unpruned model's; "
                            "pass repair=Repair(recover=None)")
    loss = student_out[0].new_zeros((), dtype=torch.float32)
    scales = scales or [spread_energy(t) for t in teacher_out]
    for s, t, scale in zip(student_out, teacher_out, scales):
        loss = loss + F.mse_loss(s.float(), t.float()) / scale
    return loss


def distill_loss(student_out, teacher_out, student_feat, teacher_feat, options: Recovery,
                 scales: list[torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`output_loss` of the outputs (a tensor or a list of them) plus ``feature_weight`` times the
    squared error of the pre-pooling features relative to the teacher's mean squared feature."""
    loss = output_loss(output_tensors(student_out), output_tensors(teacher_out), options.temperature, scales)
    if student_feat is not None and options.feature_weight > 0:
        tf = teacher_feat.float()
        loss = loss + options.feature_weight * F.mse_loss(student_feat.float(), tf) / tf.pow(2).mean().clamp_min(1e-12)
    return loss


@torch.no_grad()
def model_outputs(model: nn.Module, images: torch.Tensor, options: Recovery, batch: int = 64) -> list[torch.Tensor]:
    """Every float output tensor of ``model`` on ``images``, batch by batch, concatenated along the batch."""
    parts = []
    with forward_precision(images.device, options.precision):
        for i in range(0, len(images), batch):
            parts.append([t.float() for t in _outputs(model(images[i:i + batch]))])
    return [torch.cat(column) for column in zip(*parts)]


@torch.no_grad()
def held_out_change(teacher_out: list[torch.Tensor], student: nn.Module, images: torch.Tensor,
                    options: Recovery) -> tuple[float, float | None]:
    """(:func:`output_loss` at temperature 1 -- the KL of the logits, or the relative squared error of the
    outputs --, top-1 agreement % or None for a non-classifier) of ``student`` on the held-aside images."""
    s = model_outputs(student, images, options)
    agree = float((s[0].argmax(1) == teacher_out[0].argmax(1)).double().mean() * 100) \
        if is_logits(teacher_out) else None
    return float(output_loss(s, teacher_out, 1.0, [spread_energy(t) for t in teacher_out])), agree


def _outputs(output) -> list[torch.Tensor]:
    tensors = output_tensors(output)
    if not tensors:
        raise SimpruneError(f"recovery matches a model's float outputs, got none in a {type(output).__name__}; "
                            "pass repair=Repair(recover=None)")
    return tensors


def step_batch(batch_size: int, size) -> int:
    """Images per step: ``batch_size`` at 224x224 or below, as many pixels above (at least 2, for CutMix,
    unless ``batch_size`` is 1)."""
    pixels = int(size[0]) * int(size[1])
    return batch_size if pixels <= REFERENCE_PIXELS else min(batch_size, max(2, batch_size * REFERENCE_PIXELS // pixels))


def _schedule(step: int, total: int, lr: float) -> float:
    warm = max(1, total // 20)
    return lr * (step + 1) / warm if step < warm else lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def recover(teacher: nn.Module, student: nn.Module, calibration, options: Recovery | None = None,
            held_aside: torch.Tensor | None = None) -> dict:
    """Train ``student`` (the pruned model, changed in place) to reproduce ``teacher`` on the calibration
    images; returns {"images", "held_aside", "epochs", "steps", "seconds", "held_out_change", "measure", ...} for the report."""
    options = options or Recovery()
    t0 = time.perf_counter()
    device = next(student.parameters()).device
    if held_aside is None:
        train, held = split_images(calibration, options.holdout, options.seed)
    else:
        train, held = torch.cat([_images(b).detach().float().cpu() for b in calibration]), held_aside.float()
    train, held = train.to(device), held.to(device)
    teacher_mode, student_mode = teacher.training, student.training
    teacher.eval(), student.eval()  # BatchNorm statistics frozen; their affine parameters train
    total = options.steps or max(1, options.epochs * len(train) // step_batch(options.batch_size, train.shape[-2:]))
    teacher_held = model_outputs(teacher, held, options)
    layer = feature_layer(teacher, student, train[:1])
    frozen = [] if options.train_head else head_layers(teacher, student, layer, train[:1])
    try:
        summary = _train(teacher, student, train, held, teacher_held, layer, total, options, t0, frozen)
    finally:
        teacher.train(teacher_mode), student.train(student_mode)
    summary.update(images=len(train) + len(held), held_aside=len(held), feature_layer=layer, head_kept=frozen,
                   seconds=time.perf_counter() - t0, options=asdict(options))
    return summary


def _train(teacher, student, train, held, teacher_held, layer, total, options: Recovery, t0,
           frozen: list[str]) -> dict:
    """The training loop of :func:`recover`: SGD steps, held-aside checks, early stopping, best state kept;
    the parameters of the ``frozen`` modules are not trained."""
    gen = torch.Generator().manual_seed(options.seed)
    batch = step_batch(options.batch_size, train.shape[-2:])
    kept = {id(p) for name in frozen for p in student.get_submodule(name).parameters()}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in kept]
    opt = torch.optim.SGD(params, lr=options.lr, momentum=0.9, nesterov=True)
    cap_t, cap_s = _Capture(teacher, layer), _Capture(student, layer)
    scales = [spread_energy(t) for t in teacher_held]  # fixed normalisers of the non-classifier outputs
    start_kl, start_agree = held_out_change(teacher_held, student, held, options)
    best = (start_kl, start_agree, 0, copy.deepcopy(student.state_dict()))
    every, stale, step, stopped = max(1, total // options.checks), 0, 0, "steps"
    history = [{"step": 0, "held_out_change": start_kl, "agreement": start_agree}]
    try:
        for step in progress.bar(range(total), "label-free recovery", total=total, unit="steps"):
            for group in opt.param_groups:
                group["lr"] = _schedule(step, total, options.lr)
            idx = torch.randint(0, len(train), (batch,), generator=gen)
            x = augment(train[idx.to(train.device)], gen, options.min_scale, options.cutmix)
            with forward_precision(x.device, options.precision):
                with torch.no_grad():
                    t_out = _outputs(teacher(x))
                s_out = _outputs(student(x))
                loss = distill_loss(s_out, t_out, cap_s.value, cap_t.value, options, scales)
            if not torch.isfinite(loss):
                stopped = "non-finite loss"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)  # a far-off start must not blow the weights up
            opt.step()
            if (step + 1) % every == 0 or step + 1 == total:
                kl, agree = held_out_change(teacher_held, student, held, options)
                history.append({"step": step + 1, "held_out_change": kl, "agreement": agree, "loss": float(loss.detach())})
                if kl < best[0] * (1 - 1e-3) - 1e-7:  # a real improvement, not rounding
                    best, stale = (kl, agree, step + 1, copy.deepcopy(student.state_dict())), 0
                else:
                    stale += 1
                if stale >= options.patience:
                    stopped = "held-aside output change stopped falling"
                    break
            if options.time_budget_s is not None and time.perf_counter() - t0 > options.time_budget_s:
                stopped = "time budget"
                break
    finally:
        cap_t.close(), cap_s.close()
    student.load_state_dict(best[3])
    steps = best[2]
    return {"steps": steps, "steps_run": step + 1, "epochs": steps * batch / len(train), "batch": batch,
            "stopped": stopped, "measure": "KL of the logits" if is_logits(teacher_held) else
            "relative squared error of the outputs", "held_out_change": {"before": start_kl, "after": best[0]},
            "held_out_agreement": None if start_agree is None else {"before": start_agree, "after": best[1]},
            "history": history}
