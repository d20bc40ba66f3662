"""The contribution analysis in one call: data split, units, measurement (for the CLI's
``contrib`` and ``plan`` commands and for scripts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..graph import LayerGraph
from ..recipe import Recipe
from .measure import candidate_layers, load_tensors, measure_contributions
from .table import ContributionTable
from .units import DEFAULT_RATIOS, Unit, build_units

__all__ = ["analyse", "split_tensors"]

Tensors = tuple[torch.Tensor, torch.Tensor]


def split_tensors(
    data: str, *, graph: LayerGraph, normalization: str, samples: int, val_fraction: float,
    seed: int, split: str = "train", val_data: str | None = None, up_to: bool = False,
) -> tuple[Tensors, Tensors]:
    """Training and validation tensors for an analysis: a class-balanced draw of ``samples``
    images of ``data``'s ``split``, of which a stratified ``val_fraction`` is the validation
    split (or ``val_data``'s ``split`` as the validation data). The test split is never read.
    With ``up_to``, a source with fewer than ``samples`` images is used whole.

    Raises:
        DataError: A source that cannot be loaded, is too small, or whose classes are not the
            classifier's outputs (:func:`~budgetsearch.trainer.checks.check_classes`).
    """
    from ..data import load_dataset, split_validation
    from ..trainer.checks import check_classes

    kw = {"image_size": int(graph.input_shape[-1]), "normalization": normalization,
          "seed": seed, "up_to": up_to}
    if val_data is None:
        pool = load_dataset(data, split=split, limit=samples, **kw)
        train_set, val_set = split_validation(pool, fraction=val_fraction, seed=seed)
    else:
        train_set = load_dataset(data, split=split, limit=samples, **kw)
        val_set = load_dataset(val_data, split=split, **kw)
    check_classes(train_set, val_set, graph)
    return load_tensors(train_set), load_tensors(val_set)


def analyse(
    model: nn.Module,
    *,
    graph: LayerGraph,
    train: Tensors,
    val: Tensors,
    recipe: Recipe,
    scores: Any = None,
    candidates: str = "top:6",
    units: Sequence[Unit] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    axes: Sequence[str] = ("out", "in"),
    filters: bool = True,
    bias_depths: Sequence[int] | None = None,
    path: str | None = None,
    storage: str | None = None,
    max_units: int | None = None,
    progress: bool = True,
) -> ContributionTable:
    """Measure the contribution table of a model (see :mod:`budgetsearch.contrib`).

    Args:
        model: The model with its new head, in its initial state.
        graph: Its layer graph.
        train: Training tensors.
        val: Validation tensors.
        recipe: How every unit is trained.
        scores: Channel scores choosing the kept channels (default: weight magnitude).
        candidates: Layers with weight units (:func:`~.measure.candidate_layers`).
        units: Exactly these units instead of the grid.
        ratios: Channel ratios of the grid.
        axes: Channel axes of the grid.
        filters: Measure gradient-filtered units too.
        bias_depths: Bias depths of the grid (default 1, 2, 4, ... and all).
        path: The table file (resumed, shared with other workers), or None.
        storage: A database URL to keep the table in instead (shared across machines).
        max_units: Stop after this many units.
        progress: Show a progress bar.

    Raises:
        PlanError: Bad candidates, ratios or units.
        TableError: A table file made for something else.
    """
    from ..criteria import magnitude_scores
    from ..search import ProxyModel, scores_digest

    scores = scores if scores is not None else magnitude_scores(model)
    proxy = ProxyModel(graph, scores)
    if units is None:
        names = candidate_layers(candidates, model=model, graph=graph, train=train)
        units = build_units(graph, candidates=names, ratios=ratios, axes=axes, filters=filters,
                            bias_depths=bias_depths)
    return measure_contributions(
        model, graph=graph, train=train, val=val, recipe=recipe, channels=proxy.channels,
        scores_digest=scores_digest(scores), units=units, path=path, storage=storage,
        max_units=max_units, progress=progress)
