"""Repair, one stage: after the selection, fold -> removal -> refit -> (recovery) -> BatchNorm, in one place.

:class:`Repair` holds the stage's options. ``Repair.auto()`` leaves each step to its default, resolved
against the criterion and the calibration data by :meth:`Repair.resolve` (the refit when calibration is
given and no fold was asked for; the criterion's fold only without the refit; groups a parameter-free
layer reads protected when folding or refitting; BatchNorm re-estimation when calibration is given, kept
after a refit only if it brings the outputs closer to the unpruned model's).
The label-free recovery (:class:`simprune.repair.recovery.Recovery`, or any object with
``run(original, pruned, calibration, held_aside) -> dict``) plugs in as ``recover`` and runs last, under the
re-estimated BatchNorm statistics it then keeps frozen.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from torch import nn

from simprune import progress
from simprune.errors import SimpruneError
from simprune.graph.groups import PruningGraph
from simprune.graph.removal import remove_channels
from simprune.repair.batchnorm import recalibrate_batchnorm, recalibrate_if_closer
from simprune.repair.fold import fold_channels
from simprune.repair.recovery import Recovery
from simprune.repair.refit import RefitOptions, refit_targets
from simprune.repair.refit import reconstruct as refit_network

IF_CLOSER = "if-closer"  # recalibrate_bn: re-estimate, keep only if the outputs come closer to the unpruned


@dataclass
class Removal:
    """The selection's outcome that the repair carries out: channels to remove per group of ``graph`` and
    the criterion's result (its data feeds the fold)."""

    graph: PruningGraph
    remove: dict[str, list[int]]
    result: Any
    criterion: str = ""

    @property
    def channels(self) -> int:
        return sum(map(len, self.remove.values()))


def refit_options(options: RefitOptions | dict | bool | None) -> RefitOptions | bool | None:
    """A refit setting as given: RefitOptions, a dict of its fields (on), True/False, or None (auto)."""
    if options is None or isinstance(options, (bool, RefitOptions)):
        return options
    try:
        return RefitOptions(**options)
    except TypeError as exc:
        raise SimpruneError(f"reconstruct_options: {exc}; use the fields of "
                            "simprune.repair.refit.RefitOptions") from exc


@dataclass(frozen=True)
class Repair:
    """What repairs the network after removal. ``None`` on a field: its default (see the module doc).

    - ``fold``: fold removed channels into the next layers: True (the criterion's mode), "lstsq", "twin", False;
    - ``protect_uncompensable``: leave groups a parameter-free reader (option-A shortcut) passes on whole;
    - ``refit``: RefitOptions (on, tuned), True (on, defaults), False (off);
    - ``recalibrate_bn``: re-estimate BatchNorm statistics on the calibration images: True, False, or
      "if-closer" (keep them only if the outputs come closer to the unpruned model's; the default after
      a refit, whose pre-BatchNorm outputs already match the stored statistics);
    - ``recover``: the label-free recovery run last, after BatchNorm: a Recovery, True (its defaults) or
      None/False (none).
    """

    fold: bool | str | None = None
    protect_uncompensable: bool | None = None
    refit: RefitOptions | bool | None = None
    recalibrate_bn: bool | str | None = None
    recover: Recovery | bool | None = None  # duck-typed: any run(original, pruned, calibration, held_aside)

    def __post_init__(self):
        object.__setattr__(self, "refit", refit_options(self.refit))
        if self.recalibrate_bn not in (None, True, False, IF_CLOSER):
            raise SimpruneError(f"recalibrate_bn={self.recalibrate_bn!r}: pass True, False or {IF_CLOSER!r}")
        if self.recover is True:
            object.__setattr__(self, "recover", Recovery())
        elif self.recover is False:
            object.__setattr__(self, "recover", None)

    @classmethod
    def auto(cls) -> Repair:
        """Every step at its default, resolved against the criterion and the data."""
        return cls()

    @classmethod
    def none(cls) -> Repair:
        """No repair at all: the channels are only removed."""
        return cls(fold=False, protect_uncompensable=False, refit=False, recalibrate_bn=False)

    def replace(self, **changes) -> Repair:
        return dataclasses.replace(self, **changes)

    def resolve(self, crit, calibration) -> Repair:
        """Every ``None`` replaced by its default for ``crit`` and ``calibration``; refuses steps that need
        calibration images when there are none."""
        refit = self.refit
        if refit is None:
            refit = calibration is not None and not self.fold
        if refit and calibration is None:
            raise SimpruneError("reconstruction needs calibration data; pass calibration= "
                                "or reconstruct=False")
        fold = self.fold
        if fold is None:
            fold = False if refit else getattr(crit, "compensate_by_default", False)
        protect = self.protect_uncompensable
        if protect is None:
            protect = bool(fold) or bool(refit)
        bn = self.recalibrate_bn
        if bn is None:
            bn = (IF_CLOSER if refit else True) if calibration is not None else False
        if bn and calibration is None:
            raise SimpruneError("BatchNorm re-estimation needs calibration images; pass calibration= "
                                "or recalibrate_bn=False")
        if self.recover is not None and calibration is None:
            raise SimpruneError("recovery needs calibration images; pass calibration= or "
                                "repair=Repair(recover=None)")
        refit = (refit if isinstance(refit, RefitOptions) else RefitOptions()) if refit else False
        return dataclasses.replace(self, fold=fold, protect_uncompensable=protect, refit=refit, recalibrate_bn=bn)

    @property
    def needs_original(self) -> bool:
        """Whether :meth:`apply` reads the unpruned model (the refit and recovery reproduce it)."""
        return bool(self.refit) or self.recover is not None or self.recalibrate_bn == IF_CLOSER

    def compensated(self) -> bool | str:
        """The report's ``compensated``: the fold mode asked for, True for the criterion's, or False."""
        return (self.fold if isinstance(self.fold, str) else bool(self.fold)) if self.fold else False

    def apply(self, original: nn.Module | None, pruned: nn.Module, removal: Removal, calibration,
              held_aside=None) -> dict[str, Any]:
        """Fold, carry out ``removal`` on ``pruned`` (in place), refit it to ``original`` (the unpruned copy,
        read only when :attr:`needs_original`), re-estimate BatchNorm (or keep the closer statistics), recover;
        returns what was done.

        The fold runs before the removal: it reads the removed channels' weights at their original indices.
        ``held_aside``: calibration images kept from every step before, for the recovery's early stopping."""
        if self.fold and removal.result.fold is None:
            raise SimpruneError(f"criterion {removal.criterion!r} has no compensation; pass compensate=False")
        targets = refit_targets(removal.graph, removal.remove, self.refit.scope) if self.refit else {}
        progress.stage(f"removing {removal.channels} channels" + (", compensating" if self.fold else ""))
        if self.fold:
            fold_channels(removal.graph, removal.result, removal.remove, self.fold if isinstance(self.fold, str)
                          else None)
        remove_channels(removal.graph, removal.remove)
        t_removal = time.perf_counter()
        if self.refit:
            progress.stage(f"reconstructing {len(targets)} layers from the kept channels")
        refit = refit_network(original, pruned, targets, calibration, self.refit) if self.refit else False
        batchnorm = None
        if self.recalibrate_bn == IF_CLOSER:
            progress.stage("BatchNorm: re-estimating, kept if closer to the unpruned outputs")
            batchnorm = recalibrate_if_closer(original, pruned, calibration, held_aside)
        elif self.recalibrate_bn:
            recalibrate_batchnorm(pruned, calibration)
        estimated = batchnorm["kept"] == "re-estimated" if batchnorm else bool(self.recalibrate_bn)
        if self.recover is not None:
            progress.stage("label-free recovery on the calibration images")
        plain = getattr(calibration, "plain", None) or calibration  # the recovery augments on its own
        recovered = self.recover.run(original, pruned, plain, held_aside) if self.recover is not None else False
        return {"compensated": self.compensated(), "reconstructed": refit, "recovered": recovered,
                "bn_recalibrated": estimated, "batchnorm": batchnorm, "removed_at": t_removal}

    def to_dict(self) -> dict[str, Any]:
        """The resolved options, for the report."""
        refit = dataclasses.asdict(self.refit) if isinstance(self.refit, RefitOptions) else self.refit
        return {"fold": self.fold, "protect_uncompensable": self.protect_uncompensable, "refit": refit,
                "recalibrate_bn": self.recalibrate_bn,
                "recover": None if self.recover is None else type(self.recover).__name__}
