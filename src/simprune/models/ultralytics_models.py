"""``ultralytics:FILE.yaml``: a YOLO built from any ultralytics model YAML (``pip install 'simprune[ultralytics]'``).

The head is put in ultralytics' export mode: the model returns its predictions (boxes and class scores per
anchor), not also the head's input feature maps, which would be outputs whose width must stay.

Built from the YAML with random weights; trained weights come from a ``.safetensors`` state dict
(``weights=``). Ultralytics' ``.pt`` checkpoints are pickles of the whole model object (a
``DetectionModel`` instance, its training arguments, the EMA): ``torch.load(weights_only=True)``
refuses them because they hold classes outside torch's allow-list, so reading one means executing
pickled code. simprune never does that; it says how to turn one into a state dict once, in your environment.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from simprune.errors import SimpruneError

INSTALL = "pip install 'simprune[ultralytics]'"
PT_HINT = ("ultralytics .pt checkpoints are pickled model objects that torch.load(weights_only=True) cannot read, "
           "and simprune never unpickles a file; convert it once where you trust it: python -c \"from ultralytics "
           "import YOLO; from safetensors.torch import save_file; save_file(YOLO('best.pt').model.float()"
           ".state_dict(), 'best.safetensors')\", then pass model=ultralytics:<its yaml> weights=best.safetensors")
TASK_CLASSES = {"detect": "DetectionModel", "segment": "SegmentationModel", "pose": "PoseModel", "obb": "OBBModel",
                "classify": "ClassificationModel"}


def _tasks():
    try:
        from ultralytics.nn import tasks  # noqa: PLC0415 - optional: pip install 'simprune[ultralytics]'
    except ImportError as exc:
        raise SimpruneError(f"ultralytics:FILE models need ultralytics; {INSTALL}") from exc
    return tasks


def _load_weights(model: nn.Module, weights: str, spec: str) -> None:
    from safetensors.torch import load_file  # noqa: PLC0415 - only with weights=

    if not str(weights).endswith(".safetensors") or not Path(weights).is_file():
        raise SimpruneError(f"weights={weights} for ultralytics:{spec} must be an existing .safetensors state dict "
                            "(ultralytics .pt files are pickles: " + PT_HINT.split(";", 1)[1].strip() + ")")
    state = load_file(weights)
    own = model.state_dict()
    bad = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise SimpruneError(f"weights={weights} do not match ultralytics:{spec} ({bad[0]} differs); name the YAML "
                            "the weights were trained with, and num_classes= if it is not the YAML's")
    model.load_state_dict(state)


def build_ultralytics(spec: str, num_classes: int | None = None, in_channels: int | None = None,
                      weights: str | None = None) -> nn.Module:
    """``ultralytics:yolov8n.yaml`` (any name ultralytics resolves, or a path to your YAML) in eval mode."""
    if spec.endswith((".pt", ".pth")):
        raise SimpruneError(f"model=ultralytics:{spec}: {PT_HINT}")
    if not spec.endswith((".yaml", ".yml")):
        raise SimpruneError(f"model=ultralytics:{spec} names no YAML file; give e.g. ultralytics:yolov8n.yaml or "
                            "ultralytics:path/to/model.yaml")
    tasks = _tasks()
    try:
        cfg = tasks.yaml_model_load(spec)
    except (FileNotFoundError, OSError) as exc:
        raise SimpruneError(f"ultralytics cannot find {spec} (its model YAMLs are named like yolov8n.yaml, "
                            "yolo11n.yaml, yolov5nu.yaml, yolov10n.yaml; or give a path)") from exc
    task = tasks.guess_model_task(cfg)
    if task not in TASK_CLASSES:
        raise SimpruneError(f"ultralytics:{spec} is a {task!r} model; simprune builds {sorted(TASK_CLASSES)} models")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same random weights every build (a folder rebuilds the model it was pruned from)
        model = getattr(tasks, TASK_CLASSES[task])(cfg, ch=in_channels or 3, nc=num_classes, verbose=False)
    if weights:
        _load_weights(model, weights, spec)
    head = model.model[-1]
    if hasattr(head, "export"):  # the deployed output (predictions only), as ultralytics' own export does; in
        head.export = True       # eval its head also returns its input feature maps, whose widths would then be fixed
    if hasattr(head, "dynamic"):  # anchors from the input's shape each pass (not cached): ONNX keeps a dynamic batch
        head.dynamic = True
    return model.eval()
