"""Selection criteria: which layers and channels are worth updating.

Every criterion implements :class:`Criterion` and returns :class:`Scores`. Get one by name with
:func:`get_criterion` (``fisher``, ``neq``, ``magnitude``, ``random``); register another with
:func:`register_criterion`, a decorator on its class.
"""

from __future__ import annotations

from .base import (
    Batches,
    Criterion,
    get_criterion,
    list_criteria,
    register_criterion,
    trainable_layers,
)
from .fisher import (
    FisherCriterion,
    cross_entropy_sum,
    fisher_bruteforce,
    fisher_potential,
    tinytrain_layer_scores,
)
from .magnitude import MagnitudeCriterion, magnitude_scores
from .memory import MemoryMeter
from .neq import NEqCriterion, NEqTracker, channel_param_counts, cosine_distance
from .random import RandomCriterion, random_scores
from .scores import LayerScores, Scores

__all__ = [
    "Batches",
    "Criterion",
    "FisherCriterion",
    "LayerScores",
    "MagnitudeCriterion",
    "MemoryMeter",
    "NEqCriterion",
    "NEqTracker",
    "RandomCriterion",
    "Scores",
    "channel_param_counts",
    "cosine_distance",
    "cross_entropy_sum",
    "fisher_bruteforce",
    "fisher_potential",
    "get_criterion",
    "list_criteria",
    "magnitude_scores",
    "random_scores",
    "register_criterion",
    "tinytrain_layer_scores",
    "trainable_layers",
]
