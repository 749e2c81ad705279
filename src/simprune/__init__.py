"""simprune: similarity-based structural filter pruning for convolutional networks.

    import simprune
    pruned, report = simprune.prune(model, torch.zeros(1, 3, 32, 32), criterion="l1", target={"flops": 0.5})
    simprune.save("out/", pruned, {"model": "resnet56", "model_args": {...}, "input_shape": [3, 32, 32]})
    model = simprune.load("out/")
"""
__version__ = "0.1.0"

from .api import load, prune, save  # noqa: E402
from .errors import SimpruneError  # noqa: E402
from .models import build_model  # noqa: E402

__all__ = ["prune", "save", "load", "build_model", "SimpruneError", "__version__"]
