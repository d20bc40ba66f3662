"""Selectors: which layers and channels to train so that a step fits a device's budget.

``select(method, cost_model=..., budget_bytes=..., scores=..., **options)`` returns a
:class:`~budgetsearch.plan.Plan` that fits the memory (and latency) budget as measured by the cost
model. Methods (:func:`list_methods`):

- ``tinytrain``: TinyTrain's Fisher-potential layer ranking with top-K channels (:mod:`.tinytrain`);
- ``neq``: Quelennec et al.'s budgeted NEq, channels by score per parameter (:mod:`.neq`);
- ``mit``: MIT-style sparse update by greedy search (:mod:`.mit`);
- ``mit-scheme``: the 15 published MIT schemes (:mod:`.mit_scheme`, with :func:`mit_memory_bytes`);
- ``tinytl``, ``last-k``, ``full`` (:mod:`.simple`), ``random`` (:mod:`.neq`).
"""

from __future__ import annotations

from . import mit, neq, simple, tinytrain  # noqa: F401  (registers the methods)
from .base import (
    HEAD_MODES,
    MEMORY_MEASURES,
    MethodSpec,
    Selection,
    SelectionContext,
    channel_params,
    get_method,
    layer_macs,
    list_methods,
    register_method,
    select,
)
from .mit_scheme import MIT_SCHEMES, mit_memory_bytes, ratio_update, scheme_updates

__all__ = [
    "HEAD_MODES",
    "MEMORY_MEASURES",
    "MIT_SCHEMES",
    "MethodSpec",
    "Selection",
    "SelectionContext",
    "channel_params",
    "get_method",
    "layer_macs",
    "list_methods",
    "mit_memory_bytes",
    "ratio_update",
    "register_method",
    "scheme_updates",
    "select",
]
