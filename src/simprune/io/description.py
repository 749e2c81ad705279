"""What a model directory's ``model.json`` says about its architecture, checked both ways.

Loading builds the described (unpruned) architecture, replays the pruned structure and loads the
weights; saving refuses a description that would not rebuild the very model being saved.
A user's own builder (``pkg.module:factory``) runs only when the caller names it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from simprune.errors import SimpruneError
from simprune.graph.removal import STRUCTURE_ATTR, apply_structure
from simprune.models import SOURCE_ATTR, build_model
from simprune.models.adapters import adapt_for_pruning
from simprune.models.external import is_builder_spec

MAX_INPUT_ELEMENTS = 3 * 1024 * 1024  # C*H*W of a recorded input shape (loading runs one image through)
INPUT_ATTR = "simprune_input_shape"  # [C, H, W] a prune saw, on the pruned model


def _check_names(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: Path) -> None:
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise SimpruneError(f"{source} does not match the model ({what}); check model= and its arguments")


def _precheck_names(name: str, args: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Compare the file's tensors with the architecture built on the meta device (no memory), so that a
    description naming a huge model next to small weights is refused before that model is built."""

    try:
        with torch.device("meta"):
            own = adapt_for_pruning(build_model(name, **args)).state_dict()
    except SimpruneError:
        raise
    except Exception:  # noqa: BLE001 - a builder that cannot run on meta: the full check follows anyway
        return
    _check_names(own, tensors, source)
    for key, value in tensors.items():  # a pruned model is never wider than the registry's
        if value.dim() != own[key].dim() or any(a > b for a, b in zip(value.shape, own[key].shape)):
            raise SimpruneError(f"{source}: {key} has shape {tuple(value.shape)}, larger than the model's "
                                f"{tuple(own[key].shape)}; the weights belong to another model")


def _input_shape(desc: dict[str, Any], source: Path) -> tuple[int, int, int] | None:
    shape = desc.get("input_shape")
    if shape is None:
        return None
    if not (isinstance(shape, list) and len(shape) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
            and math.prod(shape) <= MAX_INPUT_ELEMENTS):
        raise SimpruneError(f"{source}: input_shape must be [C, H, W], positive integers with C*H*W <= "
                            f"{MAX_INPUT_ELEMENTS}, got {json.dumps(shape)[:60]}")
    return tuple(shape)


TRUST_ENV = "SIMPRUNE_TRUSTED_BUILDERS"  # comma-separated pkg.module:factory names the user lets load() run
ARG_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _model_args(desc: dict[str, Any], source: Path) -> tuple[str | None, dict[str, Any]]:
    """The recorded architecture name (None: the user's own model, passed to load) and its arguments:
    num_classes/in_channels positive integers, others JSON scalars."""
    name, args = desc.get("model"), desc.get("model_args", {})
    if not (name is None or isinstance(name, str)) or not isinstance(args, dict):
        raise SimpruneError(f"{source}: 'model' must be a string and 'model_args' an object")
    for key in ("num_classes", "in_channels"):
        if key in args and (not isinstance(args[key], int) or isinstance(args[key], bool) or not 0 < args[key] <= 100_000):
            raise SimpruneError(f"{source}: model_args.{key} must be a positive integer, got {args[key]!r}")
    for key, value in args.items():
        if not (isinstance(key, str) and key and set(key) <= ARG_NAME_CHARS and not key.startswith("_")) or not (
                value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) < 256)):
            raise SimpruneError(f"{source}: model_args.{str(key)[:40]} must be a keyword name with a number, string, "
                                "true/false or null value")
    return name, args


_TRUSTED_NOW: list[str] = []  # builders the caller named for what runs inside trusted_builders()


@contextlib.contextmanager
def trusted_builders(*names: str | None) -> Iterator[None]:
    """Within the block, ``load`` may run the named builders (the CLI: the one ``--model`` names, for the whole
    command, so its later steps - latency, export, bench - load what it saved)."""
    added = [n for n in names if isinstance(n, str) and is_builder_spec(n)]
    _TRUSTED_NOW.extend(added)
    try:
        yield
    finally:
        for n in added:
            _TRUSTED_NOW.remove(n)


def _trusted(name: str, builder: str | None) -> bool:
    return name == builder or name in _TRUSTED_NOW or name in {
        s.strip() for s in os.environ.get(TRUST_ENV, "").split(",") if s.strip()}


def build_described(name: str | None, args: dict[str, Any], source: Path, builder: str | None = None,
                    architecture: str | None = None) -> nn.Module:
    """The unpruned model a description names. A user's builder (pkg.module:factory) runs only when the
    caller names it (``builder``, or $SIMPRUNE_TRUSTED_BUILDERS): a file never decides what code runs."""

    if name is None:
        raise SimpruneError(f"{source} holds your own model ({architecture or 'no builder recorded'}); "
                            "pass a freshly built, unpruned instance: simprune.load(dir, MyNet())")
    if is_builder_spec(name) and not _trusted(name, builder):
        raise SimpruneError(f"{source} was built by {name} (your code); simprune runs it only when you name it: "
                            f"builder={name} (or {TRUST_ENV}={name})")
    return build_model(name, **args)




def describe(model: nn.Module, description: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``load`` needs, from the model itself (its builder's name and arguments, the input shape its
    prune saw, its pruned structure), overridden by ``description``."""
    source = getattr(model, SOURCE_ATTR, None) or {}
    desc: dict[str, Any] = {"model": source.get("model"), "model_args": dict(source.get("model_args") or {}),
                            "architecture": f"{type(model).__module__}.{type(model).__qualname__}"}
    shape = getattr(model, INPUT_ATTR, None)
    if shape is not None:
        desc["input_shape"] = [int(v) for v in shape]
    desc.update(description or {})
    structure = getattr(model, STRUCTURE_ATTR, None)
    if structure:
        desc["structure"] = structure
    return desc


def check_loadable(model: nn.Module, desc: dict[str, Any]) -> None:
    """Refuse a description ``load`` could not turn back into ``model``: a name simprune cannot build, a
    pruned structure without an input shape, or an architecture whose tensors differ from the model's."""
    where = Path("the description")
    name, args = _model_args(desc, where)
    shape = _input_shape(desc, where)
    if desc.get("structure") and shape is None:
        raise SimpruneError("cannot save a pruned model without its input shape; pass description="
                            "{'input_shape': [C, H, W]} (prune records it when it made the model)")
    if name is None:
        return  # the user's own model: load(dir, MyNet()) rebuilds it
    try:
        fresh = adapt_for_pruning(build_described(name, args, where, builder=name))
        if desc.get("structure"):
            apply_structure(fresh, desc["structure"], where, shape)
    except SimpruneError as exc:
        raise SimpruneError(f"cannot save: model {name!r} with {args} would not load back ({exc}); fix "
                            "'model'/'model_args', or drop 'model' and load with simprune.load(dir, MyNet())") from exc
    own, back = model.state_dict(), fresh.state_dict()
    differ = sorted(set(own) ^ set(back)) or [k for k in own if own[k].shape != back[k].shape]
    if differ:
        raise SimpruneError(f"cannot save: model {name!r} with {args} builds a different network ({differ[0]} "
                            "differs); fix 'model'/'model_args', or drop 'model' and load with "
                            "simprune.load(dir, MyNet())")
