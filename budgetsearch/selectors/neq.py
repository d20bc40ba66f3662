"""Channel-filling methods: ``neq`` (Quelennec et al.'s budgeted NEq) and ``random``.

Both rank the output channels of every layer but the classifier, then fill the budgets greedily
down the ranking:

- ``neq`` ranks by score / parameter count of the channel (``C_in/G · K²``, so ``K²`` for a
  depthwise conv; docs/selectors.md, 'neq and random'). The score is any per-output-channel
  score: NEq's ``|velocity|`` (criterion ``neq``), or Fisher, magnitude... Ties keep forward
  layer order, then channel index.
- ``random`` ranks by a random permutation drawn from the seed: the baseline at the same budget.

The classifier is always updated (``head`` option, see :mod:`.base`) and is not ranked. A chosen
channel updates that output row of the layer's weight (and the layer's bias); a layer whose every
channel is chosen is updated whole. The fill is cheap: the longest fitting prefix of the ranking
is found by bisection (the cost is monotone in the prefix length), about ``log2(channels)`` cost
evaluations rather than one per channel; the channel that stops it is skipped with the rest of its
layer (they cost the same, so none would fit later) and the bisection resumes, at most once per
layer (``skip=False``: stop at the first channel that does not fit). ``budget_params`` caps the
updated weight parameters of the ranked layers (the classifier excluded), as the paper's budgets
count them; the memory and latency budgets still apply.

Both are pure functions of (scores, budgets, seed): call :func:`~budgetsearch.selectors.select`
again every epoch with fresh velocities to re-select.
"""

from __future__ import annotations

import numpy as np

from ..errors import PlanError
from ..plan import LayerUpdate
from .base import Selection, SelectionContext, Updates, channel_params, register_method

__all__ = ["ChannelFill", "neq", "random_channels"]


class ChannelFill:
    """A ranked list of (layer, output channel) pairs and the plans of its prefixes.

    Args:
        ctx: The selection context.
        layer_ids: Index into ``names`` of each ranked channel, best first.
        channels: Output-channel index of each ranked channel.
        names: The ranked layers.
        base: Updates every plan includes (the classifier's).
    """

    def __init__(
        self,
        ctx: SelectionContext,
        layer_ids: np.ndarray,
        channels: np.ndarray,
        names: list[str],
        base: Updates,
    ) -> None:
        self.ctx = ctx
        self.layer_ids = np.asarray(layer_ids, dtype=np.int64)
        self.channels = np.asarray(channels, dtype=np.int64)
        self.names = names
        self.base = base
        self.widths = [ctx.graph.layers[n].out_channels for n in names]
        self.per_channel = np.array(
            [channel_params(ctx.graph.layers[n]) for n in names], dtype=np.int64)
        # each layer's channels in rank order: a prefix of the ranking holds the first few
        self._ranked = [self.channels[self.layer_ids == i] for i in range(len(names))]
        self._made: dict[tuple[int, int], LayerUpdate] = {}

    def _update(self, layer: int, count: int) -> LayerUpdate:
        """The update keeping the first ``count`` ranked channels of a layer (memoised)."""
        key = (layer, count)
        hit = self._made.get(key)
        if hit is None:
            if count == self.widths[layer]:
                hit = LayerUpdate("weight")
            else:
                hit = LayerUpdate("weight", channels=tuple(self._ranked[layer][:count].tolist()))
            self._made[key] = hit
        return hit

    def build(self, positions: np.ndarray) -> Updates:
        """The updates of the ranked channels at ``positions`` (plus the base).

        ``positions`` must hold, for each layer, its first channels in rank order (any prefix of
        the ranking with skipped layers' tails removed does).
        """
        updates = dict(self.base)
        counts = np.bincount(self.layer_ids[positions], minlength=len(self.names))
        for layer in np.flatnonzero(counts).tolist():
            updates[self.names[layer]] = self._update(layer, int(counts[layer]))
        return updates

    def fill(self, budget_params: int | None, *, skip: bool = True) -> tuple[Updates, dict]:
        """Take ranked channels while the budgets allow.

        Finds the longest fitting prefix by bisection. With ``skip``, the first channel that
        does not fit (or exceeds ``budget_params``) is skipped together with the rest of its
        layer's channels (they cost the same and the plan only grows, so none of them would fit
        later either), and the bisection resumes after it: the result is the greedy fill that
        skips what does not fit, in at most one bisection per layer. Without ``skip``, the fill
        stops at the first channel that does not fit.
        """
        if budget_params is not None and budget_params < 0:
            raise PlanError(f"budget_params cannot be negative; got {budget_params}")
        active = np.ones(len(self.layer_ids), dtype=bool)
        taken, skipped_layers = 0, []
        while True:
            idx = np.flatnonzero(active)
            limit = len(idx)
            if budget_params is not None:
                cum = np.cumsum(self.per_channel[self.layer_ids[idx]])
                limit = int(np.searchsorted(cum, budget_params, side="right"))
            taken = self.ctx.largest_fitting(limit, lambda m, idx=idx: self.build(idx[:m]),
                                             lo=taken, gallop=True)
            if taken == len(idx) or not skip:
                break
            blocked = self.layer_ids[idx[taken]]
            rest = idx[taken:]
            active[rest[self.layer_ids[rest] == blocked]] = False
            skipped_layers.append(self.names[int(blocked)])
        chosen = np.flatnonzero(active)[:taken]
        params = int(self.per_channel[self.layer_ids[chosen]].sum())
        return self.build(chosen), {
            "channels": int(taken),
            "channels_ranked": len(self.layer_ids),
            "weight_params": params,
            "budget_params": budget_params,
            "layers": len(set(self.layer_ids[chosen].tolist())),
            "layers_skipped": skipped_layers,
        }


def _all_channels(ctx: SelectionContext) -> tuple[np.ndarray, np.ndarray]:
    ids, chans = [], []
    for i, name in enumerate(ctx.body):
        width = ctx.graph.layers[name].out_channels
        ids.append(np.full(width, i, dtype=np.int64))
        chans.append(np.arange(width, dtype=np.int64))
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(ids), np.concatenate(chans)


@register_method("neq", needs_scores=True,
                 summary="per-output-channel scores, e.g. NEq |velocity| (criterion neq)")
def neq(
    ctx: SelectionContext,
    *,
    budget_params: int | None = None,
    skip: bool = True,
    head: str = "auto",
) -> Selection:
    """Output channels ranked by score per parameter, filled until the budgets are met.

    Args:
        ctx: The selection context (its scores: any per-output-channel score).
        budget_params: Maximum updated weight parameters outside the classifier, or None.
        skip: Skip the layers whose next channel does not fit and go on down the ranking
            (greedy fill); False stops at the first channel that does not fit (strict prefix).
        head: How the classifier is updated (``auto``, ``weight``, ``bias``).
    """
    scores = ctx.require_scores("per-output-channel scores")
    base, head_mode = ctx.start_with_head(head)
    ids, chans = _all_channels(ctx)
    values = np.concatenate(
        [scores[n].out_channel / channel_params(ctx.graph.layers[n]) for n in ctx.body]
    ) if ctx.body else np.zeros(0)
    if not np.isfinite(values).all():
        raise PlanError("method neq: the scores contain NaN or infinite values")
    order = np.lexsort((np.arange(len(values)), -values))  # best first; ties in forward order
    fill = ChannelFill(ctx, ids[order], chans[order], ctx.body, base)
    updates, details = fill.fill(budget_params, skip=skip)
    return Selection(updates, {**details, "head": head_mode, "criterion": scores.criterion})


@register_method("random", summary="random output channels at the same budget (seeded)")
def random_channels(
    ctx: SelectionContext,
    *,
    budget_params: int | None = None,
    skip: bool = True,
    head: str = "auto",
) -> Selection:
    """Output channels in a random order drawn from the seed, filled until the budgets are met.

    Args:
        ctx: The selection context (its seed fixes the order).
        budget_params: Maximum updated weight parameters outside the classifier, or None.
        skip: Skip the layers whose next channel does not fit and go on down the ranking
            (greedy fill); False stops at the first channel that does not fit (strict prefix).
        head: How the classifier is updated (``auto``, ``weight``, ``bias``).
    """
    base, head_mode = ctx.start_with_head(head)
    ids, chans = _all_channels(ctx)
    order = np.random.default_rng(ctx.seed).permutation(len(ids))
    fill = ChannelFill(ctx, ids[order], chans[order], ctx.body, base)
    updates, details = fill.fill(budget_params, skip=skip)
    return Selection(updates, {**details, "head": head_mode})
