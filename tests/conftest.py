import os
from pathlib import Path

import pytest
import torch

from simprune.io.data import DEBIAN_FASHION_MNIST

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "zoo"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require_fashion_mnist():
    """Skip locally without the Debian data set; in CI (CI=true) its absence is a failure."""
    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install dataset-fashion-mnist (.ci/run does)")
        pytest.skip("apt-get install dataset-fashion-mnist to run real-data tests")


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from simprune.cli.main import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
