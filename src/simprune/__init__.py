"""simprune: similarity-based structural filter pruning for convolutional networks.

    import simprune
    pruned, report = simprune.prune(model, torch.zeros(1, 3, 32, 32), criterion="l1", target={"macs": 0.5})
    simprune.save("out/", pruned, {"model": "resnet56", "model_args": {...}, "input_shape": [3, 32, 32]})
    model = simprune.load("out/")

The names below are imported on first use, so ``import simprune.cli`` does not load torch: the
command line reaches its Ctrl-C handling before the slow imports start.
"""
__version__ = "0.1.0"

from simprune.compat import install_import_hook as _install_import_hook  # noqa: E402 - no torch import

_install_import_hook()  # a later ``import torchvision`` (or timm) works on CPU-only torch

_OPTIONS = ("Calibration", "Selection", "Repair", "RefitOptions", "Recovery", "Guards", "OneShot", "Iterative", "Soft", "ToLatency", "Choose")
_LAZY = {"prune": "api", "save": "api", "load": "api", "build_model": "models", "SimpruneError": "errors",
         **{name: "api" for name in _OPTIONS}}
__all__ = ["prune", "save", "load", "build_model", "SimpruneError", "__version__", *_OPTIONS]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib  # noqa: PLC0415 - keeps `import simprune` free of torch (see above)

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'simprune' has no attribute {name!r}")
