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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._threads import cpu_kernels
from ..errors import DataError, PlanError
from ..graph import LayerGraph
from ..plan import Plan
from ..recipe import Recipe
from .prefix import Cut, PrefixSplit
from .table import ContributionTable, keep_claim, open_shared
from .units import Unit, build_units

__all__ = [
    "FoldRunner",
    "PlanRunner",
    "analysis_key",
    "candidate_layers",
    "load_tensors",
    "measure_contributions",
    "relative_gradient_norms",
    "weights_digest",
]


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


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A digest of a state dict's names and values (the model's initial weights, head
    included)."""
    weights = hashlib.sha256()
    for name in sorted(state):
        weights.update(name.encode())
        weights.update(state[name].detach().contiguous().cpu().numpy().tobytes())
    return weights.hexdigest()[:16]


def analysis_key(
    *, graph: LayerGraph, state: dict[str, torch.Tensor], train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor], recipe: Recipe, scores_digest: str,
) -> dict[str, Any]:
    """What a contribution table's numbers depend on."""
    return {
        "model": graph.model_name,
        "model_fingerprint": graph.fingerprint,
        "initial_weights": weights_digest(state),
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
    modes = {m: m.training for m in model.modules()}
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
        for module, mode in modes.items():
            module.training = mode
    return {n: float(sums[n].norm() / len(labels) / weights[n].detach().norm().clamp_min(1e-12))
            for n in weights}


def candidate_layers(
    spec: str, *, model: nn.Module, graph: LayerGraph,
    train: tuple[torch.Tensor, torch.Tensor],
) -> list[str] | None:
    """The layers whose weight units are measured.

    Args:
        spec: ``all`` (None is returned: every layer before the classifier), ``last:K`` (the last
            K before the classifier), ``top:K`` (of the second half of the network, the K of
            largest relative gradient norm on up to 256 training images), or comma-separated
            layer names.
        model: The model (its new head in place).
        graph: Its layer graph.
        train: Training images and labels.

    Raises:
        PlanError: A malformed spec or names that are not layers before the classifier.
    """
    head = graph.layer_names[-1]
    body = graph.layer_names[:-1]
    if spec == "all":
        return None
    if spec.startswith(("top:", "last:")):
        kind, _, count = spec.partition(":")
        k = int(count) if count.isdigit() else 0
        if k < 1:
            raise PlanError(f"candidates {spec}: K must be a positive integer")
        if kind == "last":
            return body[-k:]
        # The second half only: over all layers the gradient norm ranks the earliest first,
        # whose units cost a backward pass through the whole network; on MCUNet-5fps (1,000
        # CIFAR-10 images, 128 px, the default recipe) the 56 units of the three it picked
        # first reached 0.14-0.50 validation accuracy against 0.60 for the classifier alone.
        late = set(body[len(body) // 2:])
        n = min(256, len(train[1]))
        norms = relative_gradient_norms(model, graph, train[0][:n], train[1][:n])
        return sorted((x for x in norms if x in late), key=lambda x: -norms[x])[:k]
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [x for x in names if x not in graph.layers or x == head]
    if unknown or not names:
        shown = ", ".join(unknown) if unknown else repr(spec)
        raise PlanError(f"candidates {shown}: not trainable layers before the "
                        f"classifier (e.g. {', '.join(body[-2:])})")
    return names


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
    storage: str | None = None,
    max_units: int | None = None,
    progress: bool = True,
    poll_seconds: float = 2.0,
) -> ContributionTable:
    """Measure units (see :mod:`budgetsearch.contrib`) and return the table.

    With a shared table, a call returns only when every unit is measured: when the units left
    are all claimed by other live workers, it waits for their results (polling every
    ``poll_seconds``, and taking over the claim of a worker that died), so that every worker
    plans from the same complete table.

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
        storage: A database URL instead (``sqlite:///...``, ``postgresql://...``): the table
            is shared by workers on every machine that reaches it (:class:`.StoreTable`).
        max_units: Stop after measuring this many units in this call (the table may then be
            incomplete).
        progress: Show a progress bar.
        poll_seconds: How often to look for results of units other workers are measuring.

    Returns:
        The table; ``table.stats`` says how this call's time split (cache, train, evaluation).

    Raises:
        TableError: If ``path`` holds a table made with another key.
    """
    units = list(units) if units is not None else build_units(graph)
    by_key = {u.key: u for u in units}
    if "head" not in by_key:
        by_key = {"head": Unit("head"), **by_key}
    runner = PlanRunner(model, graph=graph, train=train, val=val)
    key = analysis_key(graph=graph, state=runner.state, train=train, val=val, recipe=recipe,
                       scores_digest=scores_digest)
    cuts = {k: runner.cut_for(list(u.updates(graph, channels)), recipe)
            for k, u in by_key.items()}
    # head first (every gain is measured against it), then from the earliest cut on, so that
    # each cut's tensors are computed from the previous cut's: one pass over the network in all
    order = sorted(by_key, key=lambda k: (k != "head", cuts[k].position, k))
    shared = open_shared(key, path=path, storage=storage)
    memory: dict[str, dict[str, Any]] = {}
    done = shared.done() if shared is not None else set()
    todo = [k for k in order if k not in done]
    if max_units is not None:
        todo = todo[:max_units]
    bar = _bar(len(todo), progress)
    measured = 0
    try:
        while max_units is None or measured < max_units:
            if shared is not None:
                unit_key = shared.claim(order)
            else:
                unit_key = next((k for k in order if k not in memory), None)
            if unit_key is None:
                if shared is None or max_units is not None or set(order) <= shared.done():
                    break
                time.sleep(poll_seconds)  # other workers are measuring the rest
                continue
            try:
                with keep_claim(shared, unit_key):
                    result = runner.run(by_key[unit_key].updates(graph, channels), recipe)
            except BaseException:
                if shared is not None:
                    shared.release(unit_key)
                raise
            measured += 1
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
        runner.restore()
    table = shared.table() if shared is not None else ContributionTable(key, memory)
    table.stats = {**runner.stats, "measured": measured}
    return table


class PlanRunner:
    """Trains plans of one model from one initial state, on cached frozen-prefix tensors.

    Every :meth:`run` starts from the model's state at construction (its weights and new head),
    applies the plan with budgetsearch's operators, trains with the recipe's seed and so the same
    batch order, scores on the validation data (and on any ``extra`` data, e.g. a test split
    that is only reported), and restores the state. With frozen batch norm the tensors at the
    cut before the earliest updated layer are computed once and reused by later runs (from the
    previous cut when it lies before, else from the input).

    Args:
        model: The model with its new head, in its initial state.
        graph: Its layer graph at the training input size.
        train: Training images and labels (tensors, see :func:`load_tensors`).
        val: Validation images and labels.
        extra: More data to score every run on, by name (never used for a choice here).
    """

    def __init__(
        self, model: nn.Module, *, graph: LayerGraph, train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        extra: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.model, self.graph = model, graph
        self.data = {"train": train, "val": val, **(extra or {})}
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.split = PrefixSplit(model)
        self._cut: Cut = self.split.cuts[0]
        self._features = {name: x for name, (x, _y) in self.data.items()}
        self.stats = {"cache_seconds": 0.0, "train_seconds": 0.0, "eval_seconds": 0.0}
        self._pooled_at: torch.Tensor | None = None  # training + validation features at the cut
        self._pooled_labels = torch.cat([train[1], val[1]])  # their labels (folds deal these)

    def cut_for(self, layers: Sequence[str], recipe: Recipe) -> Cut:
        """Where the cached prefix ends for a plan updating ``layers``."""
        if recipe.bn != "frozen":  # batch statistics: the prefix changes with every batch
            return self.split.cuts[0]
        return self.split.cut_before(layers)

    def _move_to(self, cut: Cut) -> None:
        if cut == self._cut:
            return
        t0 = time.perf_counter()
        if cut.position < self._cut.position:  # behind us: start again from the input
            self._cut = self.split.cuts[0]
            self._features = {name: x for name, (x, _y) in self.data.items()}
        start, self._features, self._pooled_at = self._features, {}, None
        for name in list(start):
            self._features[name] = self.split.features(self.model, self._cut, cut, start.pop(name))
        self._cut = cut
        self.stats["cache_seconds"] += time.perf_counter() - t0

    def restore(self) -> None:
        """Put the initial state back into the model."""
        self.model.load_state_dict(self.state)

    def run(self, updates: Mapping[str, Any], recipe: Recipe) -> dict[str, Any]:
        """Train one plan and score it.

        Args:
            updates: The plan's layer updates.
            recipe: How to train it.

        Returns:
            ``val_accuracy``, ``val_loss`` (None when not finite), ``val_images``,
            ``train_loss`` (mean of the last epoch, None when not finite), the same for every
            extra data set (``<name>_accuracy``, ``<name>_loss``), ``train_seconds``,
            ``eval_seconds``, ``seconds``, ``cut``, ``layers``, ``threads`` (torch's
            intra-op threads it trained with: a plan of several layers does not train
            bit-for-bit alike at another count, ``benchmarks/thread_reproducibility.py``)
            and ``kernels`` (the CPU kernels, :func:`budgetsearch._threads.cpu_kernels`:
            nor does it on other vector kernels).
        """
        return self._run(updates, recipe, rows=None)

    def folds(self, folds: int, *, seed: int) -> list[FoldRunner]:
        """Cross-validation views of this runner: the training and validation data pooled
        (training first) and dealt into ``folds`` stratified folds
        (:func:`~budgetsearch.data.stratified_folds`). The j-th view trains on every fold but
        the j-th and scores ``val_*`` on the j-th, so over the views every pooled image is
        validated on once. Extra data sets are scored by every view as by :meth:`run`. The
        views share this runner's frozen-prefix cache.

        Args:
            folds: Number of folds, 2..the pooled images.
            seed: Seed of the deal.

        Raises:
            DataError: Too few images for ``folds``.
        """
        from ..data import stratified_folds

        parts = stratified_folds(self._pooled_labels.numpy(), folds, seed=seed)
        every = np.arange(len(self._pooled_labels))
        return [FoldRunner(self, index=j, folds=folds,
                           train_rows=torch.from_numpy(np.setdiff1d(every, part)),
                           val_rows=torch.from_numpy(part))
                for j, part in enumerate(parts)]

    def _pooled(self) -> torch.Tensor:
        """The training and validation features at the current cut, concatenated (kept until
        the cut moves)."""
        if self._pooled_at is None:
            self._pooled_at = torch.cat([self._features["train"], self._features["val"]])
        return self._pooled_at

    def _run(self, updates: Mapping[str, Any], recipe: Recipe,
             rows: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
        """:meth:`run`, or with ``rows`` (positions in the pooled training and validation
        data) a fold's run: train on ``rows[0]``, score ``val_*`` on ``rows[1]``."""
        from ..trainer import apply_plan
        from ..trainer.loop import build_optimizer

        plan = Plan.from_layers(self.graph, dict(updates), batch_size=recipe.batch_size,
                                optimizer=recipe.optimizer, filter_mode=recipe.filter_mode)
        cut = self.cut_for(list(plan.updates), recipe)
        self._move_to(cut)
        model, feats = self.model, self._features
        if rows is None:
            x_train, y_train = feats["train"], self.data["train"][1]
            scored = {name: (feats[name], y) for name, (_x, y) in self.data.items()
                      if name != "train"}
        else:
            pooled, labels = self._pooled(), self._pooled_labels
            x_train, y_train = pooled[rows[0]], labels[rows[0]]
            scored = {name: (feats[name], y) for name, (_x, y) in self.data.items()
                      if name not in ("train", "val")}
            scored = {"val": (pooled[rows[1]], labels[rows[1]]), **scored}
        model.load_state_dict(self.state)
        torch.manual_seed(recipe.seed)  # dropout
        handle = apply_plan(model, plan, bn=recipe.bn, graph=self.graph)
        scores: dict[str, Any] = {}
        try:
            net = self.split.suffix(model, cut)
            opt = build_optimizer(recipe.optimizer, handle.param_groups(), lr=recipe.lr,
                                  momentum=recipe.momentum, weight_decay=recipe.weight_decay)
            order = torch.Generator().manual_seed(recipe.seed)
            t0 = time.perf_counter()
            losses: list[float] = []
            n = len(y_train)
            for _ in range(recipe.epochs):
                perm = torch.randperm(n, generator=order)
                losses = []
                for i in range(0, n, recipe.batch_size):
                    idx = perm[i:i + recipe.batch_size]
                    loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                    losses.append(float(loss.detach()))
            t1 = time.perf_counter()
            model.eval()
            with torch.no_grad():
                for name, (x, y) in scored.items():
                    correct, total = 0, 0.0
                    for i in range(0, len(y), 256):
                        # a copy: an in-place op after the cut must not change the cache
                        logits = net(x[i:i + 256].clone())
                        total += float(F.cross_entropy(logits, y[i:i + 256], reduction="sum"))
                        correct += int((logits.argmax(1) == y[i:i + 256]).sum())
                    mean = total / len(y)
                    scores[f"{name}_accuracy"] = correct / len(y)
                    scores[f"{name}_loss"] = mean if math.isfinite(mean) else None
            t2 = time.perf_counter()
        finally:
            handle.remove()
            model.load_state_dict(self.state)
        self.stats["train_seconds"] += t1 - t0
        self.stats["eval_seconds"] += t2 - t1
        train_loss = float(np.mean(losses)) if losses else None
        return {
            **scores,
            "val_images": len(scored["val"][1]),
            "train_loss": train_loss if train_loss is not None and math.isfinite(train_loss)
            else None,
            "train_seconds": t1 - t0,
            "eval_seconds": t2 - t1,
            "seconds": t2 - t0,
            "cut": cut.name,
            "layers": len(plan.updates),
            "threads": torch.get_num_threads(),
            "kernels": cpu_kernels(),
        }


class FoldRunner:
    """One fold of a :class:`PlanRunner`'s cross-validation (:meth:`PlanRunner.folds`): trains
    on every other fold, scores ``val_*`` on its own.

    Attributes:
        runner: The runner it is a view of.
        index: Its fold's number, from 0.
        folds: How many folds there are.
        train_rows: Positions of its training images in the pooled data.
        val_rows: Positions of its validation images.
    """

    def __init__(self, runner: PlanRunner, *, index: int, folds: int,
                 train_rows: torch.Tensor, val_rows: torch.Tensor) -> None:
        self.runner, self.index, self.folds = runner, index, folds
        self.train_rows, self.val_rows = train_rows, val_rows

    def run(self, updates: Mapping[str, Any], recipe: Recipe) -> dict[str, Any]:
        """Train one plan on the other folds and score it on this one (the results of
        :meth:`PlanRunner.run`)."""
        return self.runner._run(updates, recipe, rows=(self.train_rows, self.val_rows))


def _bar(total: int, progress: bool) -> Any:
    if not progress or total == 0:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc="contributions", unit="unit", file=sys.stderr)
