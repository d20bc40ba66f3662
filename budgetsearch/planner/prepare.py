"""What the planner measures before it searches: the contribution table (measured, or an existing
one checked against the model), the Fisher scores of the baselines, and the key of the data a race
is trained on.

:func:`~.entry.plan_for` (which ``budgetsearch plan`` and the studies' ``search`` method call) and
the benchmarks prepare a raced plan through these functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contrib import (
    ContributionTable,
    analyse,
    analysis_key,
    default_table_path,
    weights_digest,
)
from ..criteria import Scores, fisher_potential, magnitude_scores
from ..errors import DataError
from ..graph import LayerGraph
from ..recipe import Recipe

__all__ = ["contribution_table", "fisher_scores", "load_contributions", "race_data_key"]

Tensors = tuple[torch.Tensor, torch.Tensor]


def contribution_table(
    model: nn.Module,
    *,
    graph: LayerGraph,
    train: Tensors,
    val: Tensors,
    seed: int,
    candidates: str,
    scores: Scores | None = None,
    path: str | os.PathLike[str] | None = None,
    storage: str | None = None,
    progress: bool = True,
) -> ContributionTable:
    """The contribution table of a model on a split, measured or resumed.

    The units are trained with the default :class:`~budgetsearch.recipe.Recipe` at ``seed``.
    Where it is kept: ``storage`` (a database URL shared by machines), else ``path``, else the
    user cache (``$BUDGETSEARCH_CACHE/contrib/``, one file per model, data, recipe, channel
    scores and candidates, found again by later plans).

    Args:
        model: The model with its new head, in its initial state.
        graph: Its layer graph.
        train: Training tensors.
        val: Validation tensors.
        seed: Seed of the units' recipe.
        candidates: Layers with weight units (``top:6``, ``last:K``, ``all`` or names).
        scores: Scores choosing the kept channels (default: weight magnitude).
        path: The table file.
        storage: A database URL instead of a file.
        progress: Show a progress bar.
    """
    from ..search import scores_digest

    recipe = Recipe(seed=seed)
    scores = scores if scores is not None else magnitude_scores(model)
    if path is None and storage is None:
        key = analysis_key(graph=graph, state=model.state_dict(), train=train, val=val,
                           recipe=recipe, scores_digest=scores_digest(scores))
        path = default_table_path(key, candidates=candidates)
    return analyse(model, graph=graph, train=train, val=val, recipe=recipe, scores=scores,
                   candidates=candidates, path=None if storage else str(path), storage=storage,
                   progress=progress)


def load_contributions(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    graph: LayerGraph,
    scores: Scores,
) -> ContributionTable:
    """An existing contribution table, after checking it was made for this model and with the
    scores that choose the channels here.

    Args:
        path: The table file (``budgetsearch contrib``).
        model: The model with its new head, in its initial state.
        graph: Its layer graph.
        scores: The scores choosing the kept channels (weight magnitude unless others are given).

    Raises:
        DataError: A missing or unreadable table, one made for another model, input size, set
            of initial weights or channel choice (naming the field), or one without its ``head``
            measurement.
    """
    from ..search import scores_digest

    if not Path(path).exists():
        raise DataError(f"{path}: no such contribution table; give --data to measure it")
    table = ContributionTable.load(path)
    key = table.key
    checks = (("model_fingerprint", graph.fingerprint, "model"),
              ("input_size", list(graph.input_shape[1:]), "input size"),
              ("initial_weights", weights_digest(model.state_dict()),
               "set of initial weights (--weights, and --seed, which initialises the new head)"),
              ("channel_scores", scores_digest(scores),
               "channel scores (run contrib with the same --scores)"))
    for field, here, what in checks:
        if key.get(field) != here:
            raise DataError(f"{path}: made for another {what}: {field} is {key.get(field)!r} "
                            f"there, {here!r} here")
    if "head" not in table.results:
        raise DataError(f"{path}: no 'head' measurement yet; finish `budgetsearch contrib` "
                        "first")
    return table


def fisher_scores(model: nn.Module, train: Tensors, *, samples: int, micro_batch: int,
                  seed: int) -> Scores:
    """Fisher potential on a seeded draw of ``samples`` training tensors (the scores TinyTrain
    and NEq rank channels by)."""
    n = min(int(samples), len(train[1]))
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(seed))[:n]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train[0][order], train[1][order]), batch_size=micro_batch)
    return fisher_potential(model, loader, samples=n, micro_batch=micro_batch)


def race_data_key(*, graph: LayerGraph, model: nn.Module, train: Tensors,
                  val: Tensors) -> dict[str, Any]:
    """What a race's results depend on besides its recipe and candidates: the model, its
    initial weights and the training and validation data."""
    key = analysis_key(graph=graph, state=model.state_dict(), train=train, val=val,
                       recipe=Recipe(), scores_digest="")
    return {k: v for k, v in key.items() if k not in ("recipe", "channel_scores")}
