"""``tinytrain``: TinyTrain's layer ranking by Fisher potential per cost, with top-K channels.

Layers (all but the classifier) are ranked by TinyTrain's multi-objective score
``s_l = P_l / [(|W_l| / max|W|) · (M_l / max M)]`` (docs/selectors.md, 'tinytrain';
:func:`~budgetsearch.criteria.tinytrain_layer_scores`), ``P_l`` the layer's Fisher potential,
``|W_l|`` its parameter count (weight and bias), ``M_l`` its forward MACs. Ties go to the later
layer (a shorter backward path). Layers are then added greedily in that order.

**The K rule** (TinyTrain does not publish one): for each layer in rank order, try keeping the
top ``K = ceil(ratio · C)`` channels by Fisher ``Δ`` for ratio in ``ratios`` (default 1, 1/2,
1/4, 1/8, largest first) and take the first (largest) that fits together with what is already
chosen, measured with the cost model; if none fits, skip the layer and go on with the next one (a
cheaper later layer may still fit). Layers with zero potential are skipped. Channels are output
channels (``axis="out"``, Δ_o, as in the paper); ``axis="in"`` ranks input channels by the Δ of the
tensor feeding the layer instead (only those input channels' activations are then stored; layers
without input-channel scores can only be taken whole).

The classifier is always updated (``head`` option, :mod:`.base`): the task's new head must be
trained, and it is what every compared method also updates. Updated layers' biases are updated too.
"""

from __future__ import annotations

import math

import numpy as np

from ..criteria import tinytrain_layer_scores
from ..errors import PlanError
from ..plan import LayerUpdate
from .base import Selection, SelectionContext, layer_macs, register_method

__all__ = ["tinytrain"]

DEFAULT_RATIOS = (1.0, 0.5, 0.25, 0.125)


@register_method("tinytrain", needs_scores=True,
                 summary="Fisher potential scores (criterion fisher)")
def tinytrain(
    ctx: SelectionContext,
    *,
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    axis: str = "out",
    head: str = "auto",
) -> Selection:
    """Layers by Fisher potential per normalised cost, each at the largest channel ratio that fits.

    Args:
        ctx: The selection context (its scores: Fisher potential; any criterion is accepted).
        ratios: Channel ratios tried per layer, in (0, 1]; tried largest first.
        axis: ``out`` (output channels by Δ_o) or ``in`` (input channels by the input's Δ).
        head: How the classifier is updated (``auto``, ``weight``, ``bias``).
    """
    scores = ctx.require_scores("Fisher potential")
    if axis not in ("out", "in"):
        raise PlanError(f"axis must be out or in; got {axis!r}")
    tried = sorted({float(r) for r in ratios}, reverse=True)
    if not tried or tried[-1] <= 0 or tried[0] > 1:
        raise PlanError(f"ratios must lie in (0, 1]; got {list(ratios)}")
    updates, head_mode = ctx.start_with_head(head)
    graph = ctx.graph
    if not ctx.body:
        return Selection(updates, {"head": head_mode, "chosen": [], "skipped": []})
    potential = {n: max(scores[n].layer, 0.0) for n in ctx.body}
    params = {n: graph.layers[n].weight_numel + graph.layers[n].bias_numel for n in ctx.body}
    macs = {n: layer_macs(graph, graph.layers[n]) for n in ctx.body}
    s = tinytrain_layer_scores(potential, params=params, macs=macs)
    order = sorted(ctx.body, key=lambda n: (-s[n], -graph.layers[n].index))
    chosen, skipped = [], []
    for name in order:
        if potential[name] <= 0:
            skipped.append(name)
            continue
        for ratio, update in _options(ctx, name, tried, axis):
            trial = {**updates, name: update}
            if ctx.fits(trial):
                updates = trial
                width = (graph.layers[name].out_channels if axis == "out"
                         else graph.layers[name].in_channels)
                kept = width if update.channels is None else len(update.channels)
                chosen.append({"layer": name, "ratio": ratio, "channels": kept,
                               "score": s[name]})
                break
        else:
            skipped.append(name)
    return Selection(updates, {"head": head_mode, "axis": axis, "chosen": chosen,
                               "skipped": skipped})


def _options(ctx: SelectionContext, name: str, ratios: list[float], axis: str):
    """(ratio, update) pairs of one layer, largest ratio first, without duplicates."""
    layer = ctx.graph.layers[name]
    ls = ctx.scores[name] if ctx.scores is not None else None
    delta = None if ls is None else (ls.out_channel if axis == "out" else ls.in_channel)
    width = layer.out_channels if axis == "out" else layer.in_channels
    seen: set[int] = set()
    for ratio in ratios:
        k = min(width, max(1, math.ceil(round(ratio * width, 9))))  # 0.07 * 100 is 7
        if k in seen:
            continue
        seen.add(k)
        if k == width:
            yield ratio, LayerUpdate("weight")
        elif delta is not None:
            top = np.lexsort((np.arange(width), -np.asarray(delta)))[:k]
            yield ratio, LayerUpdate("weight", channels=tuple(int(c) for c in top), axis=axis)
