"""Session 11 experiment: BatchNorm re-estimation vs. correction toward the unpruned model's statistics.

Plain re-estimation sets each BN's statistics to the pruned model's on the calibration images, which is right
only when the stored statistics match those images. The correction keeps the stored statistics and moves them
by the change pruning made on the same images: mean_new = m_p - s_new*(m_u - mu_s)/s_s, s_new^2 = v_p*s_s^2/v_u
(s = sqrt(var + eps)); it equals re-estimation when stored == measured, and cancels the images' sampling noise.
Decided on agreement with the unpruned model on 100 held-aside calibration images (no labels); the evaluation
split only measures. python wip/experiments/session11/bn_correction.py [--criterion l1] [--target 0.35]"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import simprune  # noqa: E402
from simprune import Repair  # noqa: E402
from simprune.io.imagenet import load_pretrained  # noqa: E402
from simprune.io.images import calibration_images, manifest_dataset, torchvision_preprocess  # noqa: E402
from simprune.repair.batchnorm import recalibrate_batchnorm  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[4] / "shared" / "imagenet-sample"


def bns(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@torch.no_grad()
def input_stats(model, batches):
    """Per-BN per-channel mean and variance of its input, eval mode (the model as it runs)."""
    sums = {}
    def hook(name):
        def f(m, args):
            x = args[0].double()
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += x.numel() // x.shape[1]
            s[1] = s[1] + x.sum((0, 2, 3))
            s[2] = s[2] + (x * x).sum((0, 2, 3))
        return f
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in bns(model).items()]
    model.eval()
    for x in batches:
        model(x)
    for h in handles:
        h.remove()
    return {n: (s1 / c, s2 / c - (s1 / c) ** 2) for n, (c, s1, s2) in sums.items()}


def kept_indices(original, pruned):
    """Which original channel each pruned BN channel is (matched by its gamma: unique in trained nets)."""
    out = {}
    ob = bns(original)
    for n, m in bns(pruned).items():
        g = ob[n].weight.detach()
        idx = [int((g == v).nonzero()[0]) for v in m.weight.detach()]
        out[n] = torch.tensor(idx)
    return out


@torch.no_grad()
def correct(original, pruned, batches, passes=3, plain=False):
    teacher = input_stats(original, batches)
    kept = kept_indices(original, pruned)
    ob = bns(original)
    for _ in range(passes):
        student = input_stats(pruned, batches)
        for n, m in bns(pruned).items():
            k = kept[n]
            m_u, v_u = teacher[n][0][k], teacher[n][1][k]
            m_p, v_p = student[n]
            if plain:
                mean, var = m_p, v_p
            else:
                mu_s, var_s = ob[n].running_mean.double()[k], ob[n].running_var.double()[k]
                s_s = (var_s + m.eps).sqrt()
                s2 = v_p * s_s ** 2 / v_u.clamp_min(1e-12)
                mean = m_p - s2.sqrt() * (m_u - mu_s) / s_s
                var = (s2 - m.eps).clamp_min(0)
            flat = v_p < m.eps  # as recalibrate_batchnorm: nearly constant channels keep their statistics
            m.running_mean.copy_(torch.where(flat, ob[n].running_mean.double()[k], mean).float())
            m.running_var.copy_(torch.where(flat, ob[n].running_var.double()[k], var).float())


def _batch_stats(x):
    x = x.double()
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


@torch.no_grad()
def correct_batchwise(original, pruned, batches, plain=False):
    """One pass, consistent like train-mode re-estimation: per batch, the teacher's BN inputs are measured
    first, then each student BN (in order, through a pre-hook) is set from this batch's statistics so its
    output matches the teacher's; the final statistics are the average over batches."""
    kept = kept_indices(original, pruned)
    ob, sb = bns(original), bns(pruned)
    stored = {n: (ob[n].running_mean.double()[kept[n]], ob[n].running_var.double()[kept[n]]) for n in sb}
    teacher, total = {}, {n: [0.0, 0.0, 0] for n in sb}

    def record(name):
        return lambda m, args: teacher.__setitem__(name, _batch_stats(args[0]))

    def set_from_batch(name):
        def f(m, args):
            m_p, v_p = _batch_stats(args[0])
            if plain:
                mean, var = m_p, v_p
            else:
                k = kept[name]
                m_u, v_u = teacher[name][0][k], teacher[name][1][k]
                mu_s, var_s = stored[name]
                s_s = (var_s + m.eps).sqrt()
                s2 = v_p * s_s ** 2 / v_u.clamp_min(1e-20)
                mean, var = m_p - s2.sqrt() * (m_u - mu_s) / s_s, (s2 - m.eps).clamp_min(0)
            flat = v_p < m.eps
            mean, var = torch.where(flat, stored[name][0], mean), torch.where(flat, stored[name][1], var)
            m.running_mean.copy_(mean.float())
            m.running_var.copy_(var.float())
            t = total[name]
            t[0], t[1], t[2] = t[0] + mean, t[1] + var, t[2] + 1
        return f
    hooks = [m.register_forward_pre_hook(record(n)) for n, m in ob.items()]
    hooks += [m.register_forward_pre_hook(set_from_batch(n)) for n, m in sb.items()]
    original.eval(), pruned.eval()
    for x in batches:
        original(x)
        pruned(x)
    for h in hooks:
        h.remove()
    for n, m in sb.items():
        m.running_mean.copy_((total[n][0] / total[n][2]).float())
        m.running_var.copy_((total[n][1] / total[n][2]).float())


@torch.no_grad()
def top(model, batches):
    model.eval()
    return torch.cat([model(x).argmax(1) for x in batches])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--criterion", default="l1")
    ap.add_argument("--target", type=float, default=0.35)
    ap.add_argument("--refit", action="store_true")
    ap.add_argument("--all", action="store_true", help="also the batchwise correction variants")
    a = ap.parse_args()
    pre = torchvision_preprocess("mobilenet_v2", "IMAGENET1K_V1")
    model = load_pretrained("mobilenet_v2", "IMAGENET1K_V1").eval()
    calib = list(calibration_images(f"{SAMPLE}/manifest.csv:calibration", pre, n_images=500))
    flat = torch.cat(calib)
    fit = list(flat[:400].split(50))
    held = list(flat[400:].split(50))
    ev = torch.utils.data.DataLoader(manifest_dataset(f"{SAMPLE}/manifest.csv:evaluation", pre), batch_size=50)
    ev_x, ev_y = zip(*ev)
    ev_x, ev_y = list(ev_x), torch.cat(ev_y)
    ref_held, ref_ev, ref_fit = top(model, held), top(model, ev_x), top(model, fit)
    t0 = time.time()
    repair = Repair(refit=True, recalibrate_bn=False) if a.refit else Repair.none()
    pruned, rep = simprune.prune(model, torch.zeros(1, 3, 224, 224), a.criterion, {"flops": a.target},
                                 calibration=fit, repair=repair)
    print(f"pruned {a.criterion} {a.target} refit={a.refit} in {time.time() - t0:.0f}s", flush=True)

    def show(label, m):
        h, e, f = top(m, held), top(m, ev_x), top(m, fit)
        print(f"{label:28s} fit-image agreement {100 * (f == ref_fit).double().mean():5.1f}  "
              f"held-aside agreement {100 * (h == ref_held).double().mean():5.1f}  "
              f"eval top1 {100 * (e == ev_y).double().mean():5.1f}  eval agreement {100 * (e == ref_ev).double().mean():5.1f}",
              flush=True)
    print(f"unpruned eval top1 {100 * (ref_ev == ev_y).double().mean():.1f}")
    show("no BN step", pruned)
    m = copy.deepcopy(pruned); recalibrate_batchnorm(m, fit); show("re-estimated (train mode)", m)
    if a.all:
        m = copy.deepcopy(pruned); correct_batchwise(model, m, fit, plain=True); show("re-estimated batchwise", m)
        m = copy.deepcopy(pruned); correct_batchwise(model, m, fit); show("corrected batchwise", m)
        m = copy.deepcopy(model); correct_batchwise(model, m, fit); show("unpruned, corrected (no-op?)", m)


if __name__ == "__main__":
    main()
