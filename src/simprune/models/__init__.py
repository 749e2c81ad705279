"""Model registry: a name maps to a builder taking ``num_classes`` and ``in_channels``.

``simprune models`` lists the registry; ``torchvision:<name>`` (classification and
segmentation), ``timm:<name>`` and a user's own ``pkg.module:factory`` are accepted too.
A built model remembers its name and arguments (``simprune_source``), so that
:func:`simprune.save` records what :func:`simprune.load` needs.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from simprune.errors import SimpruneError
from simprune.models import adapters, cifar_resnet
from simprune.models.cifar_mobilenetv2 import CifarMobileNetV2
from simprune.models.cifar_resnet import CifarResNet, ZeroPadShortcut
from simprune.models.cifar_vgg import CifarVGG
from simprune.models.external import build_from_builder, build_timm, is_builder_spec
from simprune.models.torchvision_models import build_torchvision
from simprune.models.ultralytics_models import build_ultralytics

SOURCE_ATTR = "simprune_source"  # {"model": name, "model_args": {...}} on every model build_model made

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str]] = {}

# Torch-Pruning pruners of every family's parameter-free channel maps (module type -> pruner)
CUSTOM_PRUNERS = {**cifar_resnet.CUSTOM_PRUNERS, **adapters.CUSTOM_PRUNERS}


def register(name: str, description: str):
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = (fn, description)
        return fn
    return wrap


for _depth in (20, 32, 56, 110):
    for _opt in ("A", "B"):
        _name = f"resnet{_depth}" + ("" if _opt == "A" else "_b")
        register(_name, f"CIFAR ResNet-{_depth}, option-{_opt} shortcut "
                 + ("(zero padding)" if _opt == "A" else "(1x1 conv)"))(
            lambda num_classes=10, in_channels=3, _d=_depth, _o=_opt: CifarResNet(_d, num_classes, in_channels, _o))
register("vgg16", "CIFAR VGG-16 with BatchNorm")(lambda num_classes=10, in_channels=3: CifarVGG(num_classes, in_channels))
register("mobilenetv2", "MobileNetV2 for 32x32 inputs")(
    lambda num_classes=10, in_channels=3: CifarMobileNetV2(num_classes, in_channels))


def available_models() -> dict[str, str]:
    """Registered names and one-line descriptions (torchvision models come on top)."""
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def build_model(name: str, num_classes: int | None = None, in_channels: int | None = None, **kwargs) -> nn.Module:
    """Build a model by registry name, ``torchvision:<name>``, ``timm:<name>``, ``ultralytics:<yaml>`` or
    ``pkg.module:factory``.

    ``num_classes``/``in_channels`` default to the architecture's own (registry models: 10 and 3);
    other keyword arguments go to the builder (``weights`` loads pretrained torchvision/timm weights).
    """
    weights = kwargs.pop("weights", None)
    args = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if v is not None}
    if weights and not name.startswith(("torchvision:", "timm:", "ultralytics:")):
        raise SimpruneError(f"model {name!r}: weights= applies to torchvision:<name>, timm:<name> and "
                            "ultralytics:<yaml> models only")
    if name.startswith("ultralytics:"):
        model = build_ultralytics(name.split(":", 1)[1], num_classes, in_channels, weights, **kwargs)
    elif name.startswith("torchvision:"):
        model = build_torchvision(name.split(":", 1)[1], num_classes, in_channels, weights, **kwargs)
    elif name.startswith("timm:"):
        model = build_timm(name.split(":", 1)[1], num_classes, in_channels, weights, **kwargs)
    elif is_builder_spec(name):
        model = build_from_builder(name, **args, **kwargs)
    elif name not in _REGISTRY:
        raise SimpruneError(f"unknown model {name!r}; run `simprune models` to list the names "
                            "(or use torchvision:<name>, timm:<name>, pkg.module:factory)")
    elif kwargs:
        raise SimpruneError(f"model {name!r} takes no options {sorted(kwargs)}")
    else:
        args = {"num_classes": 10, "in_channels": 3, **args}
        model = _REGISTRY[name][0](**args)
    setattr(model, SOURCE_ATTR, {"model": name, "model_args": {**args, **kwargs}})
    return model


__all__ = ["available_models", "build_model", "SOURCE_ATTR", "register", "CifarResNet", "CifarVGG", "CifarMobileNetV2",
           "ZeroPadShortcut"]
