"""Any torchvision classification or segmentation model by name, e.g. ``torchvision:resnet50``.

The architecture keeps its own head (1000 ImageNet classes, 21 for segmentation) unless
``num_classes`` is given. Pretrained weights are optional (``weights="DEFAULT"`` or an enum
name); torchvision fetches them into torch's hub cache, so an offline machine needs the file
placed there first. Segmentation models are built without their auxiliary head and without
backbone weights (nothing is downloaded); GoogLeNet and Inception-v3 without auxiliary heads.
"""
from __future__ import annotations

from torch import nn

from simprune.compat import import_torchvision
from simprune.errors import SimpruneError

TRANSFORMERS = ("vit_", "swin_", "maxvit")  # attention blocks: simprune prunes CNN channels only


def classification_model_names() -> list[str]:
    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def segmentation_model_names() -> list[str]:
    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models.segmentation))


def _arch_options(name: str, segmentation: bool) -> dict:
    if segmentation:
        return {"aux_loss": False, "weights_backbone": None}
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    return {}


def build_torchvision(name: str, num_classes: int | None = None, in_channels: int | None = None,
                      weights: str | None = None, **options) -> nn.Module:
    tv = import_torchvision()
    segmentation = name in segmentation_model_names()
    if not segmentation and name not in classification_model_names():
        raise SimpruneError(f"unknown torchvision model {name!r}; choose one of `simprune models --torchvision`")
    kwargs = {**_arch_options(name, segmentation), **options}
    if weights:
        kwargs["weights"] = weights
    elif num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = tv.models.get_model(name, **kwargs)
    except TypeError as exc:
        raise SimpruneError(f"torchvision:{name} does not take {sorted(options)}: {exc}") from exc
    except (OSError, RuntimeError) as exc:  # urllib errors derive from OSError
        if not weights:
            raise
        raise SimpruneError(
            f"could not load weights {weights!r} for {name}: {str(exc).splitlines()[0]}; "
            "place the file in torch's hub cache (torch.hub.get_dir()/checkpoints) or drop weights="
        ) from exc
    if weights and num_classes is not None and num_classes != _classes(model):
        _replace_classifier(model, num_classes)
    if in_channels is not None and in_channels != 3:
        _replace_stem(model, in_channels)
    return model


def _classes(model: nn.Module) -> int | None:
    found = _first_or_last(model, nn.Linear, last=True)
    return found[2].out_features if found else None


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
    found = _first_or_last(model, nn.Linear, last=True)
    if found is None:
        raise SimpruneError("this model has no Linear classifier to replace; drop weights= or num_classes=")
    parent, attr, old = found
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    parent, attr, old = _first_or_last(model, nn.Conv2d, last=False)
    setattr(parent, attr, nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                    old.dilation, old.groups, old.bias is not None))
