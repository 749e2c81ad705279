"""Structural removal: cut channels out of every coupled layer, and replay a saved structure.

The model remembers which original channels each group keeps
(``model.simprune_structure``), so repeated pruning composes and a saved model
can be rebuilt from a fresh registry model without pickle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph

STRUCTURE_ATTR = "simprune_structure"


def get_structure(model: nn.Module) -> dict[str, Any] | None:
    return getattr(model, STRUCTURE_ATTR, None)


def remove_channels(graph: PruningGraph, remove: dict[str, list[int]]) -> dict[str, Any]:
    """Prune ``remove[root]`` (current indices) from each group; update and return the model's structure."""
    model = graph.model
    structure = get_structure(model) or {"groups": {}}
    groups = structure["groups"]
    patterns = list(dict.fromkeys(structure.get("ignore", []) + graph.ignore_patterns))
    if patterns:  # load rebuilds the graph with the same layers left whole (ignore=)
        structure["ignore"] = patterns
    for group in graph.groups:
        idxs = sorted(set(int(i) for i in remove.get(group.root, [])))
        entry = groups.setdefault(group.root, {"size": group.size, "keep": list(range(group.size))})
        if len(entry["keep"]) != group.size:
            raise SimpruneError(f"model structure out of sync for group {group.root}; rebuild the model from its files")
        if not idxs:
            continue
        if idxs[-1] >= group.size or len(idxs) >= group.size:
            raise SimpruneError(f"cannot remove {len(idxs)} of {group.size} channels from {group.root}")
        graph.prune_group(group, idxs)
        drop = set(idxs)
        entry["keep"] = [orig for pos, orig in enumerate(entry["keep"]) if pos not in drop]
    setattr(model, STRUCTURE_ATTR, structure)
    return structure


def apply_structure(model: nn.Module, structure: Any, source: Path | str, input_shape: Any) -> nn.Module:
    """Rebuild a pruned structure on a freshly built (unpruned) model from its recorded kept channels."""
    try:
        groups, ignore = structure["groups"], structure.get("ignore", [])
        shape = tuple(int(v) for v in input_shape)
        assert isinstance(groups, dict) and len(shape) == 3 and all(0 < v <= 8192 for v in shape)
        assert isinstance(ignore, list) and all(isinstance(p, str) and 0 < len(p) < 256 for p in ignore)
        plan = {}
        for root, entry in groups.items():
            size, keep = int(entry["size"]), [int(k) for k in entry["keep"]]
            assert isinstance(root, str) and 0 < len(keep) <= size and keep == sorted(set(keep))
            assert keep[0] >= 0 and keep[-1] < size
            plan[root] = (size, keep)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise SimpruneError(f"{source}: 'structure' is malformed (needs groups -> size/keep lists, ignore -> layer "
                            "name patterns, and an input_shape); re-create the model directory") from exc
    graph = PruningGraph(model, torch.zeros(1, *shape), ignore=ignore)
    by_root = {g.root: g for g in graph.groups}
    remove = {}
    for root, (size, keep) in plan.items():
        group = by_root.get(root)
        if group is None or group.size != size:
            raise SimpruneError(f"{source}: group {root!r} of {size} channels does not exist in this model; "
                                "the structure belongs to another model")
        kept = set(keep)
        remove[root] = [c for c in range(size) if c not in kept]
    remove_channels(graph, remove)
    return model
