"""Consumer-output refit: after channels are removed, the layers that read them get new weights.

Each layer that lost input channels (by default every conv and linear layer, so that those after a pruned
one absorb the errors in what they read too) is refit, all k x k taps of its kept input channels plus an
intercept, by ridge-damped least squares so that, on the calibration images, it reproduces the ORIGINAL
model's output of that layer from the inputs the PRUNED network now gives it. Layers are refit in network
order, each on the inputs of the network already repaired before it, so errors do not compound (ThiNet;
He et al. 2017); the last layer of a residual block also cancels the error its shortcut carries in.

Statistics per layer: the Gram of its unfolded input rows and their cross-correlation with the original
output, float32 products summed in float64 batch by batch, all-reduced over torchrun ranks; one layer's
Gram at a time, freed once it is refit. Blocks of the network run alone on stored inputs (see
:mod:`simprune.repair.segments`), so the whole refit costs a few forwards, not one per layer.

Intercept: a layer with a bias refits it; a bias-free layer read by a BatchNorm gets its intercept folded
into that BatchNorm's running mean (exact in eval mode). BatchNorm re-estimation, if asked for, runs
after this and sees the refit network.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from simprune import distributed
from simprune.calibrate.batches import Calibration
from simprune.calibrate.consumer_inputs import (
    RowSums,
    design_rows,
    positions_per_image,
    refit_support,
    set_weight_matrix,
    starved,
    weight_matrix,
)
from simprune.errors import SimpruneError
from simprune.graph.groups import PARAM_LAYERS, PruningGraph, is_depthwise
from simprune.repair.segments import Plan, plan_segments
from simprune.stats.refit import choose_ridge, refit_error, ridge_refit

PRECISIONS = ("fp32", "bf16")


@dataclass
class RefitOptions:
    """How the refit runs. Defaults measured on the Fashion-MNIST ResNet-56 (bench/quality.py).

    - ``ridge``: damping toward the current weights, relative to the Gram's mean diagonal. 0.03, chosen on
      calibration images held aside from the refit (MobileNetV2 at 35 % fewer MACs, 400 images refit, 100
      held aside, labels never read; held-aside KL to the unpruned model 1.59 at 0.01, 1.54 at 0.03, 1.61 at
      0.1, 1.93 at 0.3; docs/results.md). "auto" chooses it per layer from :data:`RIDGE_CHOICES`: the one
      whose refit on the even calibration batches best reproduces the odd ones and the other way round (the
      report's ``ridges``; measured 1.71 there, so not the default);
    - ``precision``: the forward passes, "fp32" or "bf16" autocast (faster, measured less accurate: the
      refit then fits rounded inputs); products are float32 and sums float64 either way;
    - ``max_frontier_mib``: the stored block inputs of both models may take this much, else every layer
      gets whole-model passes (same result, slower);
    - ``max_positions``: conv output positions read per image (a random set drawn with ``seed``, the same for
      every image), raised with fewer than 64 images so a layer still gets 8192 rows
      (:func:`~simprune.calibrate.consumer_inputs.positions_per_image`); None: all;
    - ``scope``: "all" refits every conv and linear layer, so layers after a pruned one absorb the errors
      in what they read too; "readers" only those that lost input channels (see :func:`refit_targets`);
    - ``views``: the selection, the refit and BatchNorm re-estimation read each calibration image as itself
      and ``views - 1`` augmented views (random resized crop of 25-100 % of the area, flip; seeded with
      ``seed``), so a few hundred images give more varied rows. 1 (none) by default: on MobileNetV2 at 35 %
      two views lowered the held-aside KL from 1.54 to 1.46 and raised ImageNet top-1 from 55.4 to 58.6 %,
      but on the Fashion-MNIST ResNet-56 at 48 % they lowered top-1 from 93.87 to 93.33 (crops of small
      padded images are not like its images); docs/results.md;
    - ``sequential``: each layer is refit on the inputs of the network already refit before it; False
      takes every layer's statistics first (the comparison that shows what the order buys);
    - ``residual``: the last layer of a residual block also cancels the error its shortcut carries in (its
      target is the original output plus (shortcut_original - shortcut_pruned) / BN scale).
    """

    ridge: float | str = 0.03
    precision: str = "fp32"
    max_frontier_mib: int = 2048
    max_positions: int | None = 128
    seed: int = 0
    views: int = 1
    scope: str = "all"
    sequential: bool = True
    residual: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise SimpruneError(f"reconstruction precision must be fp32 or bf16, got {self.precision!r}")
        if self.ridge != "auto" and not (isinstance(self.ridge, (int, float)) and self.ridge >= 0):
            raise SimpruneError(f"reconstruction ridge must be >= 0 or \"auto\", got {self.ridge!r}")
        if not (isinstance(self.views, int) and self.views >= 1):
            raise SimpruneError(f"reconstruction views must be an integer >= 1, got {self.views!r}")
        if self.scope not in SCOPES:
            raise SimpruneError(f"reconstruction scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")


SCOPES = ("readers", "all")
RIDGE_CHOICES = (1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0)  # what ridge="auto" chooses from, per layer
FALLBACK_RIDGE = 0.03  # ridge="auto" with a single calibration batch


def refit_targets(graph: PruningGraph, remove: dict[str, list[int]],
                  scope: str = "all") -> dict[str, list[int] | None]:
    """Layers (by name) to refit under ``remove`` -> the original output channels each keeps (None: all).

    ``scope="readers"``: the layers that lose input channels; ``"all"``: every conv and linear layer, so
    that layers after a pruned one also absorb the small errors in what they read. Call before the
    removal: the indices are the original ones."""
    readers, out_removed = set(), {}
    for group in graph.groups:
        chans = remove.get(group.root) or []
        for m in group.members if chans else []:
            if not isinstance(m.module, PARAM_LAYERS):
                continue
            if m.dim == "in":
                readers.add(m.name)
            elif not is_depthwise(m.module):
                per = len(m.idxs) // group.size
                out_removed.setdefault(m.name, set()).update(m.idxs[c * per + k] for c in chans for k in range(per))
    if scope == "all":
        readers |= {n for n, m in graph.model.named_modules() if isinstance(m, PARAM_LAYERS) and not is_depthwise(m)}
    targets = {}
    for name in sorted(readers):
        layer = graph.model.get_submodule(name)
        gone = out_removed.get(name, set())
        targets[name] = [i for i in range(layer.weight.shape[0]) if i not in gone] if gone else None
    return targets


class _Stop(Exception):
    """Ends a forward early once the wanted tensor is captured."""


def _run(module: nn.Module, x, grab_in: nn.Module | None = None, grab_out: nn.Module | None = None,
         stop: bool = True):
    """``module(x)``; returns (output, or None when stopped early; the captured input; the captured output)."""
    got, hooks = {}, []

    def pre(_m, inputs):
        got["in"] = inputs[0]
        if stop:
            raise _Stop

    def post(_m, _inputs, output):
        got["out"] = output
        if stop:
            raise _Stop

    if grab_in is not None:
        hooks.append(grab_in.register_forward_pre_hook(pre))
    if grab_out is not None:
        hooks.append(grab_out.register_forward_hook(post))
    try:
        out = module(x)
    except _Stop:
        out = None
    finally:
        for h in hooks:
            h.remove()
    return out, got.get("in"), got.get("out")


def _check_reusable(calibration) -> None:
    if calibration is None:
        raise SimpruneError("reconstruction needs calibration data; pass calibration= or reconstruct=False")
    if iter(calibration) is calibration:
        raise SimpruneError("reconstruction reads the calibration data several times; pass a DataLoader or a "
                            "list of batches, not an iterator, or reconstruct=False")


class _Refitter:
    """Walks the segments of a :class:`Plan`, holding each chain block's stored inputs for both models."""

    def __init__(self, original: nn.Module, pruned: nn.Module, targets: dict[str, list[int] | None],
                 calibration: Calibration, plan: Plan, options: RefitOptions):
        self.original, self.pruned, self.targets, self.calibration = original, pruned, targets, calibration
        self.device = distributed.model_device(pruned)  # every batch goes where the models are
        self.plan, self.options = plan, options
        self.positions = positions_per_image(options.max_positions, calibration.count())
        self.frontier: list[list] | None = None  # per batch: [original input, pruned input] of the current block
        self.errors: dict[str, list[float]] = {}
        self.largest_gram = 0
        self.deferred: list = []
        self.skipped: dict[str, str] = {}  # layers the statistics showed a refit could not be trusted on
        self.ridges: dict[str, float] = {}  # layer -> the ridge chosen for it (ridge="auto")

    def run(self) -> None:
        started = False
        for seg in self.plan.segments:
            if seg.module is not None and not started:
                self._capture(seg.module)
                started = True
            elif seg.flatten:
                self.frontier = [[t.flatten(1) for t in pair] for pair in self.frontier]
            for name in seg.layers:
                self._refit_layer(seg, name)
            if seg.module is not None:
                self._advance(seg)

    def _sources(self, seg):
        if seg.module is None:
            return ((x, x) for x in self.calibration.images(self.device))
        return iter(self.frontier)

    def _capture(self, first: str) -> None:
        """Store the first chain block's input of both models for every calibration batch."""
        self.frontier = []
        for x in self.calibration.images(self.device):
            _, xo, _ = _run(self.original, x, grab_in=self.original.get_submodule(first))
            _, xp, _ = _run(self.pruned, x, grab_in=self.pruned.get_submodule(first))
            self.frontier.append([xo, xp])

    def _advance(self, seg) -> None:
        """Replace the stored inputs by the block's outputs (the original's already, when it was run fully)."""
        mo, mp = self.original.get_submodule(seg.module), self.pruned.get_submodule(seg.module)
        for pair in self.frontier:
            if not seg.layers:
                pair[0] = mo(pair[0])
            pair[1] = mp(pair[1])

    def _refit_layer(self, seg, name: str) -> None:
        lo, lp = self.original.get_submodule(name), self.pruned.get_submodule(name)
        keep = self.targets[name]
        last_in_block = seg.module is not None and name == seg.layers[-1]
        mo = self.original if seg.module is None else self.original.get_submodule(seg.module)
        mp = self.pruned if seg.module is None else self.pruned.get_submodule(seg.module)
        outputs = lp.weight.shape[0]
        halves = [RowSums(weight_matrix(lp).shape[1], outputs, device=self.device)
                  for _ in range(2 if self.options.ridge == "auto" else 1)]
        for b, (xo, xp) in enumerate(self._sources(seg)):
            out, _, y = _run(mo, xo, grab_out=lo, stop=not last_in_block)
            if last_in_block:
                self.frontier[b][0] = out
            _, x_in, _ = _run(mp, xp, grab_in=lp)
            y = y[:, keep] if keep is not None else y
            if last_in_block and seg.residual is not None and self.options.residual:
                y = y + self._stream_error(seg, name, xo, xp, keep)
            if y.shape[1] != outputs:
                raise SimpruneError(f"layer {name}: {y.shape[1]} original outputs kept but the pruned layer has "
                                    f"{outputs}; the pruned model does not match the original")
            for rows, target in design_rows(lp, x_in, y, self.positions, self.options.seed):
                halves[b % len(halves)].update(rows, target)  # ridge="auto": even and odd batches apart
        for h in halves:
            h.all_reduce().check(name).to("cpu")
        sums = halves[0].merged(halves[1]) if len(halves) == 2 else halves[0]
        self.largest_gram = max(self.largest_gram, (2 * len(halves) - 1) * sums.gram.numel() * 8)
        columns = weight_matrix(lp).shape[1]
        if starved(columns, float(sums.n)) and columns == weight_matrix(lo).shape[1]:
            self.skipped[name] = (f"too few calibration rows ({int(sums.n)} for {columns} inputs) and no input lost: "
                                  "left as it was")
            return
        ridge = self._ridge(name, lp, halves)
        if self.options.sequential:
            self.errors[name] = refit_layer(lp, sums, self._bn_after(name), ridge)
        else:
            self.deferred.append((name, lp, sums, ridge))

    def _ridge(self, name: str, layer: nn.Module, halves: list[RowSums]) -> float:
        """The options' ridge; for ``ridge="auto"`` the choice whose refit on one half of the batches
        reproduces the other half best (each way round, errors summed), recorded in ``self.ridges``."""
        if self.options.ridge != "auto":
            return float(self.options.ridge)
        if float(halves[1].n) == 0:  # one batch: nothing to judge on
            self.ridges[name] = FALLBACK_RIDGE
            return FALLBACK_RIDGE
        bn = self._bn_after(name)
        designs = [layer_design(layer, h, bn) for h in halves]
        totals = [0.0] * len(RIDGE_CHOICES)
        for fit, check in ((designs[0], designs[1]), (designs[1], designs[0])):
            _, errors = choose_ridge(fit[:2], check[:3], fit[3], RIDGE_CHOICES)
            totals = [t + e for t, e in zip(totals, errors)]
        self.ridges[name] = RIDGE_CHOICES[min(range(len(totals)), key=totals.__getitem__)]
        return self.ridges[name]

    def finish(self) -> None:
        """Apply the refits held back by ``sequential=False``."""
        for name, layer, sums, ridge in self.deferred:
            self.errors[name] = refit_layer(layer, sums, self._bn_after(name), ridge)
        self.deferred = []

    def _stream_error(self, seg, name: str, xo, xp, keep) -> torch.Tensor:
        """(shortcut_original - shortcut_pruned) / BN scale: what the layer adds so that the block's sum
        matches the original one (channels whose BN scale is ~0 are left alone)."""
        so = xo if not seg.residual else self.original.get_submodule(seg.residual)(xo)
        sp = xp if not seg.residual else self.pruned.get_submodule(seg.residual)(xp)
        so = so[:, keep] if keep is not None else so
        bn = self._bn_after(name)
        scale = (bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)) / \
            torch.sqrt(bn.running_var + bn.eps)
        inverse = torch.where(scale.abs() > 1e-6 * scale.abs().max(), 1.0 / scale, torch.zeros_like(scale))
        return (so.float() - sp.float()) * inverse.reshape(1, -1, *([1] * (so.dim() - 2)))

    def _bn_after(self, name: str) -> nn.Module | None:
        bn = self.plan.bn_after.get(name)
        return None if bn is None else self.pruned.get_submodule(bn)


def layer_design(layer: nn.Module, sums: RowSums, bn: nn.Module | None):
    """(Gram, cross, target energy, starting weights, has intercept) of ``layer``'s refit from ``sums``: one
    more column of ones (the intercept) when the layer has a bias or ``bn`` can take its offset."""
    w0 = weight_matrix(layer).double().cpu()  # the solve runs on the CPU, as the sums
    gram, cross = sums.gram, sums.cross
    bias = getattr(layer, "bias", None)
    fold = bias is None and bn is not None and bn.running_mean is not None and bn.num_features == w0.shape[0]
    if bias is not None or fold:
        gram = torch.cat([torch.cat([gram, sums.total[:, None]], 1),
                          torch.cat([sums.total, sums.n.reshape(1)])[None]], 0)
        cross = torch.cat([cross, sums.target_total[None]], 0)
        b0 = bias.detach().double().cpu() if bias is not None else torch.zeros(w0.shape[0], dtype=torch.float64)
        w0 = torch.cat([w0, b0[:, None]], 1)
    return gram, cross, float(sums.target_energy), w0, bias is not None or fold


def refit_layer(layer: nn.Module, sums: RowSums, bn: nn.Module | None, ridge: float) -> list[float]:
    """Refit ``layer`` from its statistics (intercept into its bias, else into ``bn``'s running mean);
    returns its error before and after, relative to the centered energy of the original output."""
    gram, cross, target_energy, w0, intercept = layer_design(layer, sums, bn)
    n = float(sums.n)
    energy = target_energy - float((sums.target_total ** 2).sum()) / max(n, 1.0)
    w = ridge_refit(gram, cross, w0, ridge)
    before, after = (refit_error(gram, cross, target_energy, m) for m in (w0, w))
    if not (after <= before and torch.isfinite(w).all()):  # rounding can only make it worse: keep the old
        w = w0
        after = before
    p = weight_matrix(layer).shape[1]
    set_weight_matrix(layer, w[:, :p])
    bias = getattr(layer, "bias", None)
    if bias is not None:
        bias.data.copy_(w[:, p].to(bias.dtype))
    elif intercept:
        bn.running_mean.sub_(w[:, p].to(bn.running_mean))
    scale = max(energy, 1e-30)
    return [max(before, 0.0) / scale, max(after, 0.0) / scale]


def reconstruct(original: nn.Module, pruned: nn.Module, targets: dict[str, list[int] | None], calibration,
                options: RefitOptions | None = None) -> dict:
    """Refit every layer in ``targets`` (name -> original output channels it keeps, None for all) of
    ``pruned`` so it reproduces ``original``'s output of that layer; returns what was done, for the report.

    ``original`` is the model before removal (left unchanged), ``pruned`` is changed in place."""
    options = options or RefitOptions()
    _check_reusable(calibration)
    calibration = Calibration.of(calibration)
    t0 = time.perf_counter()
    skipped = {n: r for n in targets if (r := refit_support(pruned.get_submodule(n))) is not None}
    wanted = {n: keep for n, keep in targets.items() if n not in skipped}
    example = calibration.first_images()[:1].to(distributed.model_device(pruned))
    plan = plan_segments(pruned, example, list(wanted), options.max_frontier_mib << 20, calibration.count())
    for n in list(wanted):
        if plan.calls[n] != 1:
            skipped[n] = f"called {plan.calls[n]} times per forward (shared weights)"
            del wanted[n]
    for seg in plan.segments:
        seg.layers = [n for n in seg.layers if n in wanted]
    refitter = _Refitter(original, pruned, wanted, calibration, plan, options)
    try:
        with Calibration.running(pruned, original, precision=options.precision):
            refitter.run()
            refitter.finish()
    finally:
        refitter.frontier = None
    return _summary(refitter, skipped | refitter.skipped, options, calibration.count()) | {"seconds": time.perf_counter() - t0}


def _summary(refitter: _Refitter, skipped: dict[str, str], options: RefitOptions, images: int) -> dict:
    """What the refit did, for the report; raises when torchrun ranks ended with different weights."""
    plan, pruned, errors = refitter.plan, refitter.pruned, refitter.errors
    weights = {f"{n}.{k}": v for n in errors for k, v in pruned.get_submodule(n).state_dict().items()}
    weights.update({f"{bn}.running_mean": pruned.get_submodule(bn).running_mean for n, bn in plan.bn_after.items()
                    if n in errors})
    per_rank = distributed.gather_fingerprints(weights)
    if len(set(per_rank)) != 1:
        raise SimpruneError(f"ranks disagree on the refit weights ({', '.join(per_rank)}); the processes saw "
                            "different models or data: check the seed, the checkpoint and the data path on every node")
    return {
        "layers": len(errors), "skipped": skipped,
        "blocks": sum(1 for s in plan.segments if s.module is not None),
        "residual_blocks": sum(1 for s in plan.segments if s.residual is not None and s.layers) if options.residual
        else 0,
        "whole_model_passes": sum(len(s.layers) for s in plan.segments if s.module is None),
        "frontier_mib": 2 * plan.frontier_bytes_per_image * images / 2 ** 20, "images": images,
        "largest_gram_mib": refitter.largest_gram / 2 ** 20,
        "relative_error": {"before": _mean(e[0] for e in errors.values()),
                           "after": _mean(e[1] for e in errors.values()),
                           "per_layer": {n: {"before": e[0], "after": e[1]} for n, e in errors.items()}},
        "ridge": options.ridge, "ridges": dict(refitter.ridges), "precision": options.precision, "sequential": options.sequential,
        "residual": options.residual, "scope": options.scope, "weights_fingerprint_per_rank": per_rank,
    }


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
