"""Cut a model into segments that can run one after another on stored inputs.

A sequential refit needs, for each layer in turn, the inputs of the network already repaired up to
it. Running the whole network again for every layer costs a forward per layer; instead, one forward
on a couple of images records which module calls feed each other: a *chain* is a run of modules
(blocks) each called once on exactly the tensor the previous one returned. Given the chain's first
input for every calibration batch (the *frontier*), each block runs alone on the stored frontier and
its output becomes the next frontier. A block may also read the previous one's output reshaped (a
flatten in the model's forward before the classifier): the stored tensor is reshaped the same way.
Layers outside the chain run in whole-model passes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Call:
    """One module call of the traced forward: its position and the tensors in and out."""

    name: str
    start: int
    end: int = -1
    in_id: int | None = None
    out_id: int | None = None
    out_bytes_per_image: int = 0
    in_version: int = -1  # the tensors' in-place version counters when seen
    out_version: int = -1
    inp: torch.Tensor | None = field(default=None, repr=False)
    out: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class Segment:
    """Layers refit from one source of inputs: ``module`` run on the frontier, or (None) the whole model
    run on the calibration images."""

    module: str | None
    layers: list[str] = field(default_factory=list)
    flatten: bool = False  # the stored input is flattened to (batch, features) before this block
    residual: str | None = None  # the block adds its input ("") or this module's output to its last layer's BN


@dataclass
class Plan:
    segments: list[Segment]
    frontier_bytes_per_image: int  # the largest stored input of a chain block, per image and model
    bn_after: dict[str, str]  # layer -> the BatchNorm that reads its output directly
    calls: Counter  # module name -> calls per forward


def trace_calls(model: nn.Module, x: torch.Tensor) -> list[Call]:
    """Every module call of one forward on ``x``, in order of entry. Tensors are kept alive so their ids
    stay unique, and their values are copied when seen, so a later in-place op (ReLU(inplace=True),
    ``out += identity``) cannot make two different tensors look equal."""
    names = {m: n for n, m in model.named_modules()}
    calls, open_calls, clock, alive = [], {}, [0], []

    def pre(module, inputs):
        call = Call(names[module], clock[0])
        clock[0] += 1
        if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
            call.in_id, call.inp, call.in_version = id(inputs[0]), inputs[0].detach().clone(), inputs[0]._version
            alive.append(inputs[0])
        calls.append(call)
        open_calls.setdefault(module, []).append(call)

    def post(module, inputs, output):
        call = open_calls[module].pop()
        call.end = clock[0]
        clock[0] += 1
        if isinstance(output, torch.Tensor):
            call.out_id, call.out, call.out_version = id(output), output.detach().clone(), output._version
            call.out_bytes_per_image = output[:1].numel() * 4
            alive.append(output)

    hooks = [h for m in names for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return calls


def _feeds(a: Call, b: Call, produced: set[int]) -> bool:
    """True when ``b`` runs after ``a`` on ``a``'s output: the same tensor, or a flatten of it made outside
    any module (same values, two dimensions: the flatten between the features and the classifier)."""
    if b.start <= a.end:
        return False
    if b.in_id == a.out_id:
        return b.in_version == a.out_version  # not changed in place in between (ReLU(inplace=True), +=)
    return (b.in_id not in produced and b.inp.dim() == 2 and b.inp.numel() == a.out.numel()
            and b.inp.dtype == a.out.dtype and torch.equal(b.inp.reshape(-1), a.out.reshape(-1)))


def find_chain(calls: list[Call], layers: list[str], max_bytes_per_image: int | None = None) -> list[Call]:
    """The chain of single-call modules, each fed the previous one's output, that holds the most of
    ``layers`` (ties: the most blocks, so the finest cut). With ``max_bytes_per_image``, only modules whose
    output fits it are blocks: a coarser cut (a whole inverted-residual block, not its expanded inner maps)
    whose stored outputs fit in memory beats a finer one that would not."""
    count = Counter(c.name for c in calls)
    made = {c.out_id: c.out_bytes_per_image for c in calls if c.out_id is not None}
    limit = float("inf") if max_bytes_per_image is None else max_bytes_per_image
    blocks = [c for c in calls if c.name and count[c.name] == 1 and c.in_id is not None and c.out_id is not None
              and c.out_bytes_per_image <= limit and made.get(c.in_id, 0) <= limit]
    produced = {c.out_id for c in calls if c.out_id is not None}
    wanted = [c for c in calls if c.name in set(layers)]
    best: dict[int, tuple[tuple[int, int], list[Call]]] = {}  # call start -> ((held, blocks), chain from it)
    for a in sorted(blocks, key=lambda c: -c.start):  # successors start later: solved first
        held = sum(1 for w in wanted if a.start <= w.start and w.end <= a.end)
        tails = [best[b.start] for b in blocks if b.start in best and _feeds(a, b, produced)]
        (t_held, t_len), t_chain = max(tails, key=lambda t: t[0]) if tails else ((0, 0), [])
        best[a.start] = ((held + t_held, 1 + t_len), [a] + t_chain)
    chains = [v for v in best.values() if v[0][1] > 1]  # one block holding every layer is a whole-model pass
    return max(chains, key=lambda t: t[0])[1] if chains else []


def plan_segments(model: nn.Module, x: torch.Tensor, layers: list[str], max_frontier_bytes: int,
                  images: int) -> Plan:
    """Segments for refitting ``layers`` in execution order: head passes, the chain blocks, tail passes.

    Without a chain, or when storing its frontier for ``images`` images (two models) would take more than
    ``max_frontier_bytes``, every layer gets its own whole-model pass."""
    calls = trace_calls(model, x)
    by_name = {c.name: c for c in calls}
    order = sorted((n for n in layers if n in by_name), key=lambda n: by_name[n].start)
    bn_after = {}
    for c in calls:
        if isinstance(model.get_submodule(c.name), nn.modules.batchnorm._BatchNorm):
            src = [p for p in calls if p.out_id == c.in_id and p.out_version == c.in_version and p.name in set(order)]
            if src:
                bn_after[src[0].name] = c.name
    chain = find_chain(calls, order, max_frontier_bytes // max(1, 2 * images))
    per_image = max([_in_bytes(calls, chain[0]) or x[:1].numel() * 4] + [b.out_bytes_per_image for b in chain]) \
        if chain else 0
    counts = Counter(c.name for c in calls)
    if not chain or 2 * per_image * images > max_frontier_bytes:
        return Plan([Segment(None, [n]) for n in order], 0, bn_after, counts)
    inside = {b.name: [n for n in order if b.start <= by_name[n].start and by_name[n].end <= b.end] for b in chain}
    held = {n for names in inside.values() for n in names}
    head = [n for n in order if n not in held and by_name[n].start < chain[0].start]
    tail = [n for n in order if n not in held and n not in head]
    segments = [Segment(None, [n]) for n in head]
    for prev, b in zip([None] + chain[:-1], chain):
        seg = Segment(b.name, inside[b.name], prev is not None and b.in_id != prev.out_id)
        if seg.layers and seg.layers[-1] in bn_after:
            seg.residual = residual_addend(calls, b, by_name[bn_after[seg.layers[-1]]])
        segments.append(seg)
    return Plan(segments + [Segment(None, [n]) for n in tail], per_image, bn_after, counts)


def _in_bytes(calls: list[Call], block: Call) -> int:
    """Bytes per image of the tensor a block reads (the output of whichever call produced it, else 0)."""
    for c in calls:
        if c.out_id == block.in_id:
            return c.out_bytes_per_image
    return 0


def residual_addend(calls: list[Call], block: Call, bn: Call) -> str | None:
    """What ``block`` adds to ``bn``'s output before returning (with or without a final ReLU): its own input
    (""), the output of a module that reads that input (its name), or None when neither is verified."""
    out, v = block.out, bn.out
    if out is None or v is None:
        return None
    inner = [c for c in calls if block.start < c.start and c.end < block.end and c is not bn
             and c.in_id == block.in_id and c.in_version == block.in_version and c.out is not None]
    for name, cand in [("", block.inp)] + [(c.name, c.out) for c in inner]:
        if cand is not None and cand.shape == v.shape and adds_up(v, cand, out):
            return name
    return None


def adds_up(v: torch.Tensor, addend: torch.Tensor, out: torch.Tensor, rtol: float = 1e-5) -> bool:
    """``out`` is ``v + addend`` (or its ReLU) to ``rtol`` of ``out``'s largest value, with an addend that
    matters (over 1e-3 of it). Relative, because a randomly initialised deep net (a YOLO built from its
    YAML) has activations of 1e-6 deep down, where any absolute tolerance says every sum matches."""
    scale = float(out.abs().max())
    if scale == 0.0 or float(addend.abs().max()) <= 1e-3 * scale:
        return False
    total = v + addend
    return any(float((t - out).abs().max()) <= rtol * scale for t in (total, torch.relu(total)))
