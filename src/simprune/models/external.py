"""Models from outside the registry: ``timm:NAME`` and a user's own builder ``pkg.module:factory``
or ``path/to/file.py:factory``.

A builder is the user's code: simprune runs it only when the user names it (``--model``,
``build_model``, ``load(dir, builder=...)``), never because a model file mentions it.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

from torch import nn

from simprune.compat import import_torchvision
from simprune.errors import SimpruneError

BUILDER = re.compile(r"^(?P<module>[^:]+):(?P<attr>[A-Za-z_][A-Za-z0-9_.]*)$")


def is_builder_spec(name: str) -> bool:
    """``pkg.module:factory`` or ``path/file.py:factory`` (not ``torchvision:``/``timm:`` names)."""
    return bool(BUILDER.match(name)) and not name.startswith(("torchvision:", "timm:", "ultralytics:"))


def builder_takes(spec: str, argument: str) -> bool:
    """Whether the builder ``spec`` names has a parameter ``argument`` (or takes ``**kwargs``); imports its module."""
    params = inspect.signature(_resolve(spec)).parameters
    return argument in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_timm(name: str, num_classes: int | None = None, in_channels: int | None = None,
               weights: str | None = None, **options) -> nn.Module:
    """``timm.create_model(name)``: its own head unless ``num_classes``; ``weights`` = pretrained tag or 'DEFAULT'."""
    import_torchvision()  # timm imports torchvision
    try:
        import timm  # noqa: PLC0415 - optional: pip install 'simprune[timm]'
    except ImportError as exc:
        raise SimpruneError("timm:NAME models need timm; pip install 'simprune[timm]'") from exc
    if not timm.is_model(name):
        raise SimpruneError(f"unknown timm model {name!r}; list them with python -c \"import timm; "
                            "print(timm.list_models())\"")
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_channels)) if v is not None}
    kwargs.update(options)
    if weights and weights != "DEFAULT":
        name = f"{name}.{weights}"
    try:
        return timm.create_model(name, pretrained=bool(weights), **kwargs)
    except TypeError as exc:
        raise SimpruneError(f"timm:{name} does not take {sorted(options)}: {exc}") from exc
    except (OSError, RuntimeError) as exc:
        if not weights:
            raise
        raise SimpruneError(f"could not load timm weights for {name}: {str(exc).splitlines()[0][:150]}; "
                            "place them in the Hugging Face cache or drop weights=") from exc


def _import_module(spec: str):
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if not path.is_file():
            raise SimpruneError(f"model={spec}: no such Python file")
        module_name = f"simprune_user_{path.stem}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        loader.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise SimpruneError(f"cannot import {spec!r} ({exc}); put it on PYTHONPATH or give path/to/file.py:factory") \
            from exc


def _resolve(spec: str):
    """The callable ``module:factory`` names (its module imported: the user's code runs)."""
    match = BUILDER.match(spec)
    if not match:
        raise SimpruneError(f"model={spec} is not pkg.module:factory or path/to/file.py:factory")
    obj = _import_module(match["module"])
    for part in match["attr"].split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise SimpruneError(f"{match['module']} has no {match['attr']!r}; check the name after ':'")
    if not callable(obj):
        raise SimpruneError(f"{spec} is not callable; name a function or class that builds the model")
    return obj


def build_from_builder(spec: str, **model_args) -> nn.Module:
    """Call the user's ``factory(**model_args)`` named by ``module:factory``; it must return an nn.Module."""
    obj = _resolve(spec)
    params = inspect.signature(obj).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in model_args if k not in params and not accepts_any]
    if unknown:
        raise SimpruneError(f"{spec} takes no argument(s) {unknown}; drop them (e.g. num_classes=, "
                            "in_channels=) or add them to the builder")
    model = obj(**model_args)
    if not isinstance(model, nn.Module):
        raise SimpruneError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
