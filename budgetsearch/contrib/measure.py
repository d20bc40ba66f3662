"""Measuring units: train each with the classifier for a short fixed recipe, score on validation.

Every unit starts from the same initial state (the same weights and the same new head), with the
same seed and so the same batch order, and is trained with budgetsearch's own operators
(:func:`~budgetsearch.trainer.apply_plan`), so a filtered or channel-sparse unit is measured as it
would train. With frozen batch norm, the layers before the earliest one a unit touches compute
the same tensors in every step: their output is computed once per cut and reused
(:mod:`.prefix`), so a unit in the last blocks trains at the speed of the last blocks.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..graph import LayerGraph
from ..plan import Plan
from ..recipe import Recipe
from .prefix import Cut, PrefixSplit
from .table import ContributionTable, SharedTable
from .units import Unit, bias_layers, build_units

__all__ = ["analysis_key", "load_tensors", "measure_contributions", "relative_gradient_norms"]


def load_tensors(data: Dataset, *, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of a data set as two tensors (the analysis keeps them in memory).

    Raises:
        DataError: If the data set is empty.
    """
    if len(data) == 0:
        raise DataError("the data set is empty")
    xs, ys = [], []
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys).long()


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def analysis_key(
    *, graph: LayerGraph, state: dict[str, torch.Tensor], train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor], recipe: Recipe, scores_digest: str,
) -> dict[str, Any]:
    """What a contribution table's numbers depend on."""
    weights = hashlib.sha256()
    for name in sorted(state):
        weights.update(name.encode())
        weights.update(state[name].detach().contiguous().cpu().numpy().tobytes())
    return {
        "model": graph.model_name,
        "model_fingerprint": graph.fingerprint,
        "initial_weights": weights.hexdigest()[:16],
        "input_size": list(graph.input_shape[1:]),
        "train_data": f"{_digest(*train)} ({len(train[1])} images)",
        "val_data": f"{_digest(*val)} ({len(val[1])} images)",
        "recipe": recipe.to_dict(),
        "channel_scores": scores_digest,
    }


def relative_gradient_norms(
    model: nn.Module, graph: LayerGraph, images: torch.Tensor, labels: torch.Tensor,
    *, batch_size: int = 32,
) -> dict[str, float]:
    """‖∂L/∂W‖ / ‖W‖ of every trainable layer's weight on some data (a cheap first-order rank
    of where training helps). The model's ``requires_grad`` flags and mode are restored."""
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in graph.layer_names}
    flags = {p: p.requires_grad for p in model.parameters()}
    was = model.training
    sums = {n: torch.zeros_like(w) for n, w in weights.items()}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for i in range(0, len(labels), batch_size):
            loss = F.cross_entropy(model(images[i:i + batch_size]), labels[i:i + batch_size],
                                   reduction="sum")
            grads = torch.autograd.grad(loss, list(weights.values()))
            for n, g in zip(weights, grads, strict=True):
                sums[n] += g
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was)
    return {n: float(sums[n].norm() / len(labels) / weights[n].detach().norm().clamp_min(1e-12))
            for n in weights}


def measure_contributions(
    model: nn.Module,
    *,
    graph: LayerGraph,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    recipe: Recipe,
    channels: Callable[[str, int, str], tuple[int, ...] | None],
    scores_digest: str,
    units: Sequence[Unit] | None = None,
    path: str | None = None,
    max_units: int | None = None,
    progress: bool = True,
) -> ContributionTable:
    """Measure units (see :mod:`budgetsearch.contrib`) and return the table.

    Args:
        model: The model with its new head, in its initial state (restored on return).
        graph: Its layer graph at the training input size.
        train: Training images and labels (tensors, see :func:`load_tensors`).
        val: Validation images and labels.
        recipe: How every unit is trained.
        channels: The search's channel choice, ``(layer, ratio index, axis) -> channels``.
        scores_digest: Digest of the scores behind ``channels`` (part of the table's key).
        units: What to measure (default :func:`~budgetsearch.contrib.units.build_units`);
            ``head`` is always measured first.
        path: Table file, shared with other workers and resumed (None: in memory).
        max_units: Stop after measuring this many units in this call.
        progress: Show a progress bar.

    Returns:
        The table; ``table.stats`` says how this call's time split (cache, train, evaluation).

    Raises:
        TableError: If ``path`` holds a table made with another key.
    """
    units = list(units) if units is not None else build_units(graph)
    by_key = {u.key: u for u in units}
    if "head" not in by_key:
        by_key = {"head": Unit("head"), **by_key}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    key = analysis_key(graph=graph, state=state, train=train, val=val, recipe=recipe,
                       scores_digest=scores_digest)
    split = PrefixSplit(model)
    cuts = {k: _cut_of(u, graph, split, recipe) for k, u in by_key.items()}
    # head first (every gain is measured against it), then from the earliest cut on, so that
    # each cut's tensors are computed from the previous cut's: one pass over the network in all
    order = sorted(by_key, key=lambda k: (k != "head", cuts[k].position, k))
    shared = SharedTable(path, key) if path is not None else None
    memory: dict[str, dict[str, Any]] = {}
    done = shared.done() if shared is not None else set()
    todo = [k for k in order if k not in done]
    if max_units is not None:
        todo = todo[:max_units]
    stats = {"cache_seconds": 0.0, "train_seconds": 0.0, "eval_seconds": 0.0, "measured": 0}
    bar = _bar(len(todo), progress)
    cache: tuple[Cut, torch.Tensor, torch.Tensor] | None = None
    try:
        while True:
            if max_units is not None and stats["measured"] >= max_units:
                break
            if shared is not None:
                unit_key = shared.claim(order)
            else:
                unit_key = next((k for k in order if k not in memory), None)
            if unit_key is None:
                break
            cut = cuts[unit_key]
            try:
                if cache is None or cache[0] != cut:
                    t0 = time.perf_counter()
                    # from the cached cut when it lies before this one, else from the input
                    if cache is None or cache[0].position > cut.position:
                        cache = (split.cuts[0], train[0], val[0])
                    start, x_train, x_val = cache
                    cache = None
                    cache = (cut, split.features(model, start, cut, x_train),
                             split.features(model, start, cut, x_val))
                    del x_train, x_val
                    stats["cache_seconds"] += time.perf_counter() - t0
                result = _train_unit(model, graph, by_key[unit_key], split, cut, cache[1],
                                     train[1], cache[2], val[1], recipe, channels, state)
            except BaseException:
                if shared is not None:
                    shared.release(unit_key)
                raise
            stats["train_seconds"] += result["train_seconds"]
            stats["eval_seconds"] += result["eval_seconds"]
            stats["measured"] += 1
            if shared is not None:
                shared.record(unit_key, result)
            else:
                memory[unit_key] = result
            if bar is not None:
                bar.set_postfix_str(f"{unit_key[:40]} acc {result['val_accuracy']:.3f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.load_state_dict(state)
    table = shared.table() if shared is not None else ContributionTable(key, memory)
    table.stats = stats
    return table


def _bar(total: int, progress: bool) -> Any:
    if not progress or total == 0:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc="contributions", unit="unit", file=sys.stderr)


def _cut_of(unit: Unit, graph: LayerGraph, split: PrefixSplit, recipe: Recipe) -> Cut:
    if recipe.bn != "frozen":  # batch statistics: the prefix changes with every batch
        return split.cuts[0]
    if unit.kind == "weight":
        touched = [unit.layer]
    elif unit.kind == "bias":
        touched = bias_layers(graph)[-unit.depth:]
    else:
        touched = [graph.layer_names[-1]]
    return split.cut_before(touched)


def _train_unit(
    model: nn.Module, graph: LayerGraph, unit: Unit, split: PrefixSplit, cut: Cut,
    x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
    recipe: Recipe, channels: Callable[[str, int, str], tuple[int, ...] | None],
    state: dict[str, torch.Tensor],
) -> dict[str, Any]:
    from ..trainer import apply_plan
    from ..trainer.loop import build_optimizer

    plan = Plan.from_layers(graph, unit.updates(graph, channels), batch_size=recipe.batch_size,
                            optimizer=recipe.optimizer, filter_mode=recipe.filter_mode)
    model.load_state_dict(state)
    torch.manual_seed(recipe.seed)  # dropout
    handle = apply_plan(model, plan, bn=recipe.bn, graph=graph)
    try:
        net = split.suffix(model, cut)
        opt = build_optimizer(recipe.optimizer, handle.param_groups(), lr=recipe.lr,
                              momentum=recipe.momentum, weight_decay=recipe.weight_decay)
        order = torch.Generator().manual_seed(recipe.seed)
        t0 = time.perf_counter()
        losses = []
        n = len(y_train)
        for _ in range(recipe.epochs):
            perm = torch.randperm(n, generator=order)
            for i in range(0, n, recipe.batch_size):
                idx = perm[i:i + recipe.batch_size]
                loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        t1 = time.perf_counter()
        model.eval()
        correct, total_loss = 0, 0.0
        with torch.no_grad():
            for i in range(0, len(y_val), 256):
                logits = net(x_val[i:i + 256])
                total_loss += float(F.cross_entropy(logits, y_val[i:i + 256], reduction="sum"))
                correct += int((logits.argmax(1) == y_val[i:i + 256]).sum())
        t2 = time.perf_counter()
    finally:
        handle.remove()
        model.load_state_dict(state)
    val_loss = total_loss / len(y_val)
    last = losses[-max(1, len(losses) // max(1, recipe.epochs)):]
    return {
        "val_accuracy": correct / len(y_val),
        "val_loss": val_loss if math.isfinite(val_loss) else None,
        "train_loss": float(np.mean(last)) if all(map(math.isfinite, last)) else None,
        "train_seconds": t1 - t0,
        "eval_seconds": t2 - t1,
        "seconds": t2 - t0,
        "cut": cut.name,
        "layers": len(plan.updates),
    }
