import json

import pytest
import torch

from simprune.errors import SimpruneError
from simprune.graph.counting import count, parse_input_shape
from simprune.models import build_model


@pytest.mark.parametrize("name,macs_m,params_m", [
    ("resnet56", 125.5, 0.85),
    ("vgg16", 313.7, 14.98),
])
def test_published_sizes_within_one_percent(name, macs_m, params_m):
    cost = count(build_model(name), torch.zeros(1, 3, 32, 32))
    assert abs(cost.macs / 1e6 - macs_m) / macs_m < 0.01
    assert abs(cost.params / 1e6 - params_m) / params_m < 0.01


def test_per_layer_sums_to_total_and_conv_macs_by_hand():
    model = build_model("resnet20")
    cost = count(model, torch.zeros(1, 3, 32, 32))
    assert sum(v["macs"] for v in cost.per_layer.values()) == cost.macs
    # stem: 16 filters of 3x3x3 at 32x32 positions
    assert cost.per_layer["conv1"]["macs"] == 16 * 27 * 32 * 32
    assert cost.per_layer["fc"] == {"macs": 64 * 10, "params": 64 * 10 + 10}


def test_count_is_per_image_regardless_of_batch():
    model = build_model("resnet20")
    assert count(model, torch.zeros(4, 3, 32, 32)).macs == count(model, torch.zeros(1, 3, 32, 32)).macs


def test_info_cli_json(cli):
    code, out, _ = cli("info", "--model", "resnet56", "--input", "3x32x32", "--json")
    assert code == 0
    data = json.loads(out)
    assert abs(data["macs"] - 125.5e6) / 125.5e6 < 0.01 and abs(data["params"] - 0.85e6) / 0.85e6 < 0.01


@pytest.mark.parametrize("text", ["3x32", "axbxc", "0x32x32", ""])
def test_bad_input_shape(text):
    with pytest.raises(SimpruneError, match="CxHxW"):
        parse_input_shape(text)


def test_grouped_conv_macs_by_hand():
    """A grouped conv reads in/G channels per output: out * (in/G) * k*k * H*W MACs."""
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False))
    assert count(model, torch.zeros(1, 16, 8, 8)).macs == 32 * (16 // 4) * 9 * 8 * 8
