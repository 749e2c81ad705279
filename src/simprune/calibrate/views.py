"""Augmented views of calibration images: a random resized crop and flip of each image (and, for training,
CutMix). The refit and the recovery both read them, so that a few hundred images give more varied rows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, gen: torch.Generator, min_scale: float, cutmix: float) -> torch.Tensor:
    """A random resized crop (area ``min_scale``..1, aspect 3/4..4/3) and a random flip of each image,
    resized back to its size; with probability ``cutmix`` a rectangle of another image is pasted in."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        area = h * w * float(torch.empty(1).uniform_(min_scale, 1.0, generator=gen))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
        ch, cw = min(h, round(math.sqrt(area / ratio))), min(w, round(math.sqrt(area * ratio)))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = F.interpolate(x[i:i + 1, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                             align_corners=False, antialias=ch > h or cw > w)
        out[i] = crop[0].flip(-1) if torch.rand(1, generator=gen) < 0.5 else crop[0]
    if n > 1 and torch.rand(1, generator=gen) < cutmix:
        lam = float(torch.empty(1).uniform_(0.3, 0.7, generator=gen))
        ch, cw = round(h * math.sqrt(lam)), round(w * math.sqrt(lam))
        top, left = int(torch.randint(0, h - ch + 1, (1,), generator=gen)), int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        donor = out.roll(1, 0)
        out[:, :, top:top + ch, left:left + cw] = donor[:, :, top:top + ch, left:left + cw]
    return out
