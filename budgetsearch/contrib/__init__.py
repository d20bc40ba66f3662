"""Measured contributions: what updating each part of a network adds to accuracy on your data.

The MIT sparse update (Lin et al., NeurIPS'22) chooses what to train from measured gains: the
accuracy that updating the biases of the last K layers, or the weight of one layer at a channel
ratio, adds over training the classifier alone. This package measures such *units*
(:mod:`.units`) on a validation split carved from the user's training data, each trained from the
same state with the same recipe and budgetsearch's own operators (:mod:`.measure`), with the
frozen prefix of the network computed once (:mod:`.prefix`), into a keyed, resumable table that
several workers can fill together (:mod:`.table`).
"""

from __future__ import annotations

from .analysis import analyse, split_tensors
from .measure import (
    FoldRunner,
    PlanRunner,
    analysis_key,
    candidate_layers,
    load_tensors,
    measure_contributions,
    relative_gradient_norms,
    weights_digest,
)
from .prefix import Cut, PrefixSplit
from .table import (
    ContributionTable,
    SharedTable,
    StoreTable,
    TableError,
    default_table_path,
    discard_stale,
    keep_claim,
    open_shared,
)
from .units import DEFAULT_RATIOS, Unit, bias_layers, build_units, parse_unit

__all__ = [
    "DEFAULT_RATIOS",
    "ContributionTable",
    "Cut",
    "FoldRunner",
    "PlanRunner",
    "PrefixSplit",
    "SharedTable",
    "StoreTable",
    "TableError",
    "Unit",
    "analyse",
    "analysis_key",
    "bias_layers",
    "build_units",
    "candidate_layers",
    "default_table_path",
    "discard_stale",
    "keep_claim",
    "load_tensors",
    "measure_contributions",
    "open_shared",
    "parse_unit",
    "relative_gradient_norms",
    "split_tensors",
    "weights_digest",
]
