"""Any torchvision classification model by name, e.g. ``torchvision:resnet50``.

Pretrained weights are optional (``weights="DEFAULT"`` or an enum name); they are
fetched by torchvision into torch's hub cache, so an offline machine needs the
file placed there first.
"""
from __future__ import annotations

from torch import nn

from simprune.compat import import_torchvision
from simprune.errors import SimpruneError


def classification_model_names() -> list[str]:
    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def build_torchvision(name: str, num_classes: int = 1000, in_channels: int = 3, weights: str | None = None) -> nn.Module:
    tv = import_torchvision()
    names = classification_model_names()
    if name not in names:
        raise SimpruneError(f"unknown torchvision model {name!r}; choose one of `simprune models --torchvision`")
    kwargs = {}
    if weights:
        kwargs["weights"] = weights
    elif num_classes != 1000:
        kwargs["num_classes"] = num_classes
    try:
        model = tv.models.get_model(name, **kwargs)
    except (OSError, RuntimeError) as exc:  # urllib errors derive from OSError
        raise SimpruneError(
            f"could not load weights {weights!r} for {name}: {str(exc).splitlines()[0]}; "
            "place the file in torch's hub cache (torch.hub.get_dir()/checkpoints) or drop weights="
        ) from exc
    if weights and num_classes != 1000:
        _replace_classifier(model, num_classes)
    if in_channels != 3:
        _replace_stem(model, in_channels)
    return model


def _first_or_last(model: nn.Module, kind: type, last: bool) -> tuple[nn.Module, str, nn.Module] | None:
    found = None
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, kind):
                found = (parent, child_name, child)
                if not last:
                    return found
    return found


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    parent, attr, old = _first_or_last(model, nn.Linear, last=True)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    parent, attr, old = _first_or_last(model, nn.Conv2d, last=False)
    setattr(parent, attr, nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                    old.dilation, old.groups, old.bias is not None))
