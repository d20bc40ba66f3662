"""Selection criteria: which layers and channels are worth updating.

Every criterion implements :class:`Criterion` and returns :class:`Scores`. Get one by name with
:func:`get_criterion` (``fisher``, ``neq``, ``magnitude``, ``random``).
"""

from __future__ import annotations

from typing import Any

from ..errors import ScoresError
from .base import Batches, Criterion, trainable_layers
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
    "tinytrain_layer_scores",
    "trainable_layers",
]

_REGISTRY: dict[str, type[Criterion]] = {
    cls.name: cls for cls in (FisherCriterion, NEqCriterion, MagnitudeCriterion, RandomCriterion)
}


def list_criteria() -> list[str]:
    """Names of the registered criteria, sorted."""
    return sorted(_REGISTRY)


def get_criterion(name: str, **options: Any) -> Criterion:
    """Build a criterion by name.

    Args:
        name: One of :func:`list_criteria` (case-insensitive).
        **options: Keyword options of that criterion (e.g. ``samples=128`` for ``fisher``,
            ``seed=0`` for ``random``).

    Raises:
        ScoresError: If the name is unknown (listing the known ones) or an option is not
            accepted by that criterion.
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ScoresError(f"unknown criterion {name!r}; known: {', '.join(list_criteria())}")
    try:
        return _REGISTRY[key](**options)
    except TypeError as exc:
        raise ScoresError(f"criterion {key!r}: bad options {sorted(options)} ({exc})") from exc
