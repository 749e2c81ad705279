"""Pruning criteria: each turns a model's channel groups (and, if it needs them, calibration
statistics) into an importance score per channel; higher keeps.

One module per family: ``weights`` (L1, L2, FPGM, random), ``qsfm``, ``feature_stats``,
``filter_similarity``, ``hrank`` and ``torch_pruning`` (Torch-Pruning's own importances as
``tp:*``). A criterion knows nothing about FLOPs or targets: the allocator does that. Subclass
:class:`Criterion` and decorate with :func:`register` to add one.
"""
# The built-in families register themselves on import; an error in one is raised here, as itself.
from simprune.criteria import feature_stats, filter_similarity, hrank, qsfm, refit_error, torch_pruning, weights  # noqa: E402, F401, I001
from simprune.criteria.base import Criterion, CriterionResult, DataCriterion
from simprune.criteria.registry import (
    ScoreCache,
    available_criteria,
    default_criterion,
    get_criterion,
    register,
    set_calib_precision,
)

__all__ = ["Criterion", "CriterionResult", "DataCriterion", "ScoreCache", "available_criteria", "default_criterion",
           "get_criterion",
           "register", "set_calib_precision"]
