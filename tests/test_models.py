import pytest
import torch
import torch.nn.functional as F

from simprune.errors import SimpruneError
from simprune.models import available_models, build_model
from simprune.models.cifar_resnet import ZeroPadShortcut

CIFAR_NAMES = ["resnet20", "resnet32", "resnet56", "resnet110", "resnet20_b", "resnet56_b", "vgg16", "mobilenetv2"]


def test_registry_lists_the_zoo():
    names = set(available_models())
    assert set(CIFAR_NAMES) <= names


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_models_take_channels_and_classes(name):
    model = build_model(name, num_classes=7, in_channels=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_by_name(name):
    model = build_model(f"torchvision:{name}", num_classes=5, in_channels=1).eval()
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_option_a_shortcut_is_subsample_and_zero_pad():
    x = torch.randn(2, 16, 8, 8)
    expected = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(ZeroPadShortcut(16, 32, 2)(x), expected)


def test_option_a_has_no_shortcut_parameters_and_b_has_projections():
    a, b = build_model("resnet20"), build_model("resnet20_b")
    assert sum(p.numel() for p in b.parameters()) - sum(p.numel() for p in a.parameters()) == \
        (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_unknown_models_are_named():
    with pytest.raises(SimpruneError, match="unknown model 'resnet57'.*simprune models"):
        build_model("resnet57")
    with pytest.raises(SimpruneError, match="unknown torchvision model 'nonet'"):
        build_model("torchvision:nonet")
