"""Least-squares refit of a layer and the cost of removing its inputs: pure float64 matrix math.

A layer computes ``Y = X W^T`` from its (unfolded) input rows ``X`` (n x p). Everything here works
on sums over calibration rows only: the Gram ``G = X^T X`` (p x p), the cross-correlation
``R = X^T Y`` (p x o) and the target energy ``sum ||Y||^2``, so statistics stream batch by batch.

- :func:`ridge_refit`: new weights from the kept inputs, damped toward the current weights.
- :func:`choose_ridge`: the damping whose refit on some rows reproduces other rows best.
- :func:`removal_costs`: what the best refit cannot reproduce when one block of inputs (a channel's
  k x k taps) goes, from the inverse Gram (the Schur complement), for every channel at once.
- :func:`greedy_removal`: channels removed one at a time by that cost, jointly over every layer
  that reads them, with the optimal weights and inverse Gram updated after each removal.
"""
from __future__ import annotations

import torch

from simprune.errors import SimpruneError


def damping(gram: torch.Tensor, ridge: float) -> float:
    """The ridge ``lambda = ridge * mean(diag G)``: scale-free, so one setting fits every layer."""
    return float(ridge * gram.diagonal().mean().clamp(min=1e-30))


def ridge_refit(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """``argmin_W ||Y - X W^T||^2 + lambda ||W - w0||^2`` as a (o x p) float64 matrix.

    Damping toward the current weights ``w0`` (not toward zero) means the refit never does worse on
    the calibration rows than ``w0``: its objective at the optimum is at most the one at ``w0``."""
    g, r, w = gram.double(), cross.double(), w0.double()
    if g.shape[0] != g.shape[1] or r.shape[0] != g.shape[0] or w.shape != (r.shape[1], g.shape[0]):
        raise SimpruneError(f"refit shapes disagree: Gram {tuple(g.shape)}, cross {tuple(r.shape)}, "
                            f"weights {tuple(w.shape)}")
    lam = damping(g, ridge)
    lhs = g + lam * torch.eye(g.shape[0], dtype=g.dtype)
    factor, info = torch.linalg.cholesky_ex(lhs)
    rhs = r + lam * w.T
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor).T
    return torch.linalg.lstsq(lhs, rhs).solution.T  # not positive definite in floating point: least squares


def choose_ridge(fit: tuple[torch.Tensor, torch.Tensor], check: tuple[torch.Tensor, torch.Tensor, float],
                 w0: torch.Tensor, choices: tuple[float, ...]) -> tuple[float, list[float]]:
    """The ridge among ``choices`` whose refit on the ``fit`` rows (Gram, cross) reproduces the ``check``
    rows (Gram, cross, target energy) best, and each choice's error on them: the damping is judged on
    rows the fit did not see, so a refit that only memorises its rows loses."""
    if not choices:
        raise SimpruneError("choose_ridge needs at least one ridge to choose from")
    errors = [refit_error(*check, ridge_refit(*fit, w0, r)) for r in choices]
    return choices[min(range(len(choices)), key=errors.__getitem__)], errors


def refit_error(gram: torch.Tensor, cross: torch.Tensor, target_energy: float, w: torch.Tensor) -> float:
    """``sum ||Y - X W^T||^2`` over the calibration rows, from the sums alone."""
    w = w.double()
    return float(target_energy - 2 * (w * cross.double().T).sum() + (w @ gram.double() * w).sum())


def centered_gram(gram: torch.Tensor, total: torch.Tensor, n: float) -> torch.Tensor:
    """``sum (x - mean)(x - mean)^T`` from ``sum x x^T``, ``sum x`` and the row count ``n``."""
    return gram.double() - torch.outer(total.double(), total.double()) / max(float(n), 1.0)


def removal_costs(inv_gram: torch.Tensor, w: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Error increase of the best refit when each block of input columns goes (one at a time).

    ``inv_gram`` (p x p) is ``G^-1``, ``w`` (o x p) the current optimal weights, ``blocks`` (C x k) the
    column indices of each channel. Removing block J costs ``tr(W_J (G^-1)_JJ^-1 W_J^T)``: the Schur
    complement ``G_JJ - G_JK G_KK^-1 G_KJ`` is ``((G^-1)_JJ)^-1``."""
    h = inv_gram[blocks.unsqueeze(-1), blocks.unsqueeze(-2)]  # (C, k, k)
    wj = w[:, blocks].permute(1, 2, 0)  # (C, k, o)
    return (wj * torch.linalg.solve(h, wj)).sum(dim=(1, 2))


def remove_block(inv_gram: torch.Tensor, w: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal weights and inverse Gram of the remaining columns after block ``block`` goes.

    The removed columns come back zero in both (so later costs never pick them again)."""
    h_jj = inv_gram[block][:, block]
    h_j = inv_gram[block]  # (k, p)
    coef = torch.linalg.solve(h_jj, h_j)  # (k, p)
    w = w - w[:, block] @ coef
    inv_gram = inv_gram - h_j.T @ coef
    w[:, block] = 0
    inv_gram[block] = 0
    inv_gram[:, block] = 0
    return inv_gram, w


def greedy_removal(grams: list[torch.Tensor], weights: list[torch.Tensor], blocks: list[torch.Tensor],
                   n_remove: int, ridge: float = 1e-4,
                   layer_weights: list[float] | None = None) -> tuple[list[int], list[float]]:
    """Remove ``n_remove`` channels one at a time, each time the one whose removal costs least.

    Layer i has Gram ``grams[i]``, weights ``weights[i]`` (o_i x p_i) and channel blocks ``blocks[i]``
    (C x k_i: the columns of channel c). A channel's cost is the sum over layers of the error increase
    of each layer's best refit, divided by that layer's output energy ``tr(W G W^T)``, so a layer's
    scale does not matter, times ``layer_weights[i]`` (default 1: what a unit of layer i's relative error
    costs downstream). Returns the removal order and the cumulative weighted error after each step."""
    if not grams or not len(grams) == len(weights) == len(blocks):
        raise SimpruneError("greedy removal needs one Gram, weight matrix and block table per layer")
    channels = blocks[0].shape[0]
    if any(b.shape[0] != channels for b in blocks) or not 0 <= n_remove < channels:
        raise SimpruneError(f"cannot remove {n_remove} of {channels} channels (blocks disagree or too many)")
    state = []
    for g, w, b, scale in zip(grams, weights, blocks, layer_weights or [1.0] * len(grams)):
        g, w = g.double(), w.double()
        energy = float((w @ g * w).sum()) / max(scale, 1e-30)
        lhs = g + damping(g, ridge) * torch.eye(g.shape[0], dtype=g.dtype)
        state.append([torch.linalg.inv(lhs), w.clone(), b.long(), max(energy, 1e-30)])
    alive = torch.ones(channels, dtype=torch.bool)
    order, cumulative, total = [], [], 0.0
    for _ in range(n_remove):
        cost = torch.zeros(channels, dtype=torch.float64)
        for inv, w, b, energy in state:
            live = alive.nonzero().squeeze(1)
            cost[live] += removal_costs(inv, w, b[live]).clamp(min=0) / energy
        cost[~alive] = float("inf")
        c = int(torch.argmin(cost))
        total += float(cost[c])
        order.append(c)
        cumulative.append(total)
        alive[c] = False
        for entry in state:
            entry[0], entry[1] = remove_block(entry[0], entry[1], entry[2][c])
    return order, cumulative
