"""The library's error messages speak the API (keyword names: ``calibration=``, ``overwrite=True``);
the command line speaks flags. :func:`cli_wording` turns one into the other when the CLI prints an error.

Library messages name a keyword as ``name=`` followed by a value or nothing (``steps=``,
``overwrite=True``, ``recalibrate_bn=False``, ``pad_to=40``). Only the names below are translated,
so a message stays readable in both vocabularies. Imports nothing heavy (``main`` uses it before torch).
"""
from __future__ import annotations

import re

# keyword -> (flag, placeholder for a keyword named without a value)
API_FLAGS: dict[str, tuple[str, str]] = {
    "calibration": ("--calib-data", "NAME"),
    "overwrite": ("--overwrite", ""),
    "resume": ("--resume", ""),
    "recalibrate_bn": ("--recalibrate-bn", ""),
    "compensate": ("--compensate", ""),
    "protect_uncompensable": ("--protect-uncompensable", ""),
    "steps": ("--steps", "K"),
    "hold": ("--soft-hold", "N"),
    "ignore": ("--ignore", ""),
    "example_input": ("--input", "CxHxW"),
    "pad_to": ("--pad-to", "N"),
    "data_dir": ("--data-dir", "DIR"),
    "out_dir": ("--out", "DIR"),
    "lr": ("--lr", "LR"),
    "teacher": ("--teacher", "DIR"),
    "weights": ("--weights", ""),
    "min_channels": ("--min-channels", "N"),
    "max_layer_ratio": ("--max-layer-ratio", "R"),
    "round_to": ("--round-to", "N"),
    "model": ("--model", "NAME"),
    "reconstruct": ("--reconstruct", ""),
    "builder": ("--model", "pkg.module:factory"),
    "num_classes": ("--num-classes", "N"),
    "in_channels": ("--in-channels", "N"),
}
# whole API phrases with a flag of their own
API_PHRASES: dict[str, str] = {
    "repair=Repair(recover=None)": "--no-recover",
    "Preprocess(resize=, crop=, mean=, std=)": "--resize/--crop/--mean/--std",
}
_TOKEN = re.compile(r"(?<![\w-])(" + "|".join(sorted(API_FLAGS, key=len, reverse=True)) + r")=([^\s,;]*)")


def _flag(match: re.Match) -> str:
    name, value = match.group(1), match.group(2)
    flag, placeholder = API_FLAGS[name]
    if value == "True":
        return flag
    if value == "False":
        return "--no-" + flag[2:]
    value = value.strip("'\"")
    return f"{flag} {value or placeholder}".rstrip()


def cli_wording(message: str) -> str:
    """``"pass calibration= or recalibrate_bn=False"`` -> ``"pass --calib-data NAME or --no-recalibrate-bn"``."""
    for phrase, flag in API_PHRASES.items():
        message = message.replace(phrase, flag)
    return _TOKEN.sub(_flag, message)
