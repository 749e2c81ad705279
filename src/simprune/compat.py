"""torchvision on CPU-only torch builds, from any import order.

Some torchvision wheels (e.g. 0.28.0 from PyPI, built against CUDA torch) cannot load their
compiled ops next to a CPU-only torch, and ``import torchvision`` then fails on the missing
``torchvision::nms`` schema. simprune never calls those detection ops; models, transforms and
data sets are pure Python. When the compiled library does not load, the two op schemas are
declared before torchvision's import, so the rest of it loads; when it loads, nothing is declared.

:func:`install_import_hook` arranges that on the first ``import torchvision`` of the process,
without importing torch earlier: ``import simprune`` installs it, and so does the
``simprune_torchvision.pth`` file installed next to the package (a user's own ``import
torchvision`` or ``import timm`` works before simprune is imported). Tested in a subprocess
(tests/test_models.py).
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: the schemas vanish when the Library object dies
_prepared = False


def _compiled_ops_load() -> bool:
    """Whether torchvision's compiled ops library loads next to this torch (tried without torchvision)."""
    import torch  # noqa: PLC0415 - only when torchvision is about to be imported anyway

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        return True  # torchvision absent: its own ImportError says so
    for lib in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")) + glob.glob(
            os.path.join(os.path.dirname(spec.origin), "_C*.pyd")):
        try:
            torch.ops.load_library(lib)
            return True
        except (OSError, RuntimeError):
            return False
    return False


def prepare_torchvision() -> None:
    """Declare torchvision's op schemas unless its compiled ops load (idempotent)."""
    global _library, _prepared
    if _prepared:
        return
    _prepared = True
    if "torchvision" in sys.modules or _compiled_ops_load():
        return
    import torch  # noqa: PLC0415

    try:
        torch.ops.torchvision.nms  # noqa: B018 - registered by someone else already
        return
    except (AttributeError, RuntimeError):
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)


class _TorchvisionHook:
    """A meta-path finder that only prepares torchvision on its first import, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            uninstall_import_hook()
            try:
                prepare_torchvision()
            except Exception:  # noqa: BLE001 - never break an import; torchvision's own error follows
                pass
        return None


_HOOK = _TorchvisionHook()


def install_import_hook() -> None:
    """Prepare torchvision on its first import in this process (no torch import until then)."""
    if "torchvision" not in sys.modules and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall_import_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def import_torchvision():
    """Return the ``torchvision`` module, importable on CPU-only torch."""
    prepare_torchvision()
    return importlib.import_module("torchvision")
