"""Model registry: a name maps to a builder taking ``num_classes`` and ``in_channels``.

``simprune models`` lists the registry; any ``torchvision:<name>`` classification
model is accepted too.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from simprune.errors import SimpruneError
from simprune.models import cifar_resnet
from simprune.models.cifar_mobilenetv2 import CifarMobileNetV2
from simprune.models.cifar_resnet import CifarResNet, ZeroPadShortcut
from simprune.models.cifar_vgg import CifarVGG
from simprune.models.torchvision_models import build_torchvision

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str]] = {}

# Torch-Pruning pruners of every family's parameter-free channel maps (module type -> pruner)
CUSTOM_PRUNERS = {**cifar_resnet.CUSTOM_PRUNERS}


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


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a model by registry name or ``torchvision:<name>``."""
    if name.startswith("torchvision:"):
        return build_torchvision(name.split(":", 1)[1], num_classes=num_classes, in_channels=in_channels, **kwargs)
    if name not in _REGISTRY:
        raise SimpruneError(f"unknown model {name!r}; run `simprune models` to list the names "
                            "(or use torchvision:<name>)")
    if kwargs:
        hint = "; --weights applies to torchvision:<name> models only" if "weights" in kwargs else ""
        raise SimpruneError(f"model {name!r} takes no options {sorted(kwargs)}{hint}")
    return _REGISTRY[name][0](num_classes=num_classes, in_channels=in_channels)


__all__ = ["available_models", "build_model", "register", "CifarResNet", "CifarVGG", "CifarMobileNetV2",
           "ZeroPadShortcut"]
