"""torchvision compatibility for CPU-only torch builds.

Some torchvision wheels (e.g. 0.28.0 built against CUDA) cannot load their
compiled ops next to a CPU-only torch, and ``import torchvision`` then fails on
the missing ``torchvision::nms`` schema. simprune never calls those detection
ops; it only needs models, transforms and datasets. Declaring the two op
schemas before the import lets the pure-Python parts load. When torchvision's
own ops load fine, this module does nothing.

Import torchvision only through :func:`import_torchvision`.
"""
from __future__ import annotations

import importlib

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # kept alive: the schemas vanish when the Library object dies


def _declare_missing_schemas() -> None:
    global _library
    import torch  # noqa: PLC0415 - torch only when torchvision is first needed

    try:
        torch.ops.torchvision.nms  # noqa: B018 - probe whether the op is registered
        return
    except (AttributeError, RuntimeError):
        pass
    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS.values():
            _library.define(schema)


def import_torchvision():
    """Return the ``torchvision`` module, importable on CPU-only torch."""
    _declare_missing_schemas()
    return importlib.import_module("torchvision")
