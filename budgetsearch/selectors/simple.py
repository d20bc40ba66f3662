"""Reference methods: ``full``, ``tinytl`` (bias-only) and ``last-k`` (the last k layers or blocks).

- ``full``: every layer's weight and bias; ignores the budget and records whether it fits
  (``provenance["fits"]``).
- ``tinytl``: TinyTL without lite residuals: the classifier (see ``head``) plus the biases of the
  last ``n_bias`` other layers. Without ``n_bias``, the largest number that fits (every bias when it
  fits: TinyTL proper; ``details["complete"]`` says which).
- ``last-k``: the last k trainable layers (classifier included) fully updated, or with
  ``blocks=True`` the classifier plus the last k blocks, their convs gradient-filtered with
  ``patch_size``. Without ``k``, the largest k that fits.
"""

from __future__ import annotations

from ..errors import PlanError
from ..plan import LayerUpdate, Plan
from .base import Selection, SelectionContext, Updates, register_method

__all__ = ["full", "last_k", "tinytl"]


@register_method("full", enforces_budget=False, summary="every weight and bias (reference)")
def full(ctx: SelectionContext) -> Selection:
    """Every layer's weight and bias updated, whatever the budget."""
    updates = dict(Plan.full(ctx.graph).updates)
    return Selection(updates, {"fits": ctx.fits(updates)})


@register_method("tinytl", summary="classifier + biases of the last layers (TinyTL)")
def tinytl(ctx: SelectionContext, *, n_bias: int | None = None, head: str = "auto") -> Selection:
    """The classifier plus the biases of the last ``n_bias`` other layers.

    Args:
        ctx: The selection context.
        n_bias: Number of body layers (forward order, from the end) whose bias is updated; None
            for the largest number that fits.
        head: How the classifier is updated (``auto``, ``weight``, ``bias``).
    """
    base, head_mode = ctx.start_with_head(head)
    with_bias = [n for n in ctx.body if ctx.graph.layers[n].bias_param is not None]

    def build(n: int) -> Updates:
        chosen = with_bias[len(with_bias) - n:] if n else []
        return {**base, **{name: LayerUpdate("bias") for name in chosen}}

    if n_bias is not None:
        if not 0 <= n_bias <= len(with_bias):
            raise PlanError(f"n_bias must be between 0 and {len(with_bias)}; got {n_bias}")
        updates = build(n_bias)
        if not ctx.fits(updates):
            raise ctx.infeasible(updates, f"the classifier and the last {n_bias} biases")
        n = n_bias
    else:  # scan every depth: the cost need not be monotone in the depth
        n = max(m for m in range(len(with_bias) + 1) if ctx.fits(build(m)))
        updates = build(n)
    return Selection(updates, {"n_bias": n, "head": head_mode,
                               "complete": n == len(with_bias)})


@register_method("last-k", summary="the last k layers or blocks fully updated")
def last_k(
    ctx: SelectionContext, *, k: int | None = None, blocks: bool = False, patch_size: int = 1
) -> Selection:
    """The last k layers (or the classifier plus the last k blocks) fully updated.

    Args:
        ctx: The selection context.
        k: Number of layers (classifier included) or of blocks before the classifier; None for
            the largest that fits.
        blocks: Count blocks instead of layers.
        patch_size: Gradient-filter patch size of the updated convs (1 = none; the classifier
            is never filtered).
    """
    graph = ctx.graph
    if blocks:
        low, high = 0, len(graph.blocks()) - 1
        make = Plan.last_k_blocks
        unit = "blocks"
    else:
        low, high = 1, len(graph.layers)
        make = Plan.last_k_layers
        unit = "layers"

    def build(m: int) -> Updates:
        return dict(make(graph, m, patch_size=patch_size).updates)

    if k is not None:
        if not low <= k <= high:
            raise PlanError(f"k must be between {low} and {high} {unit}; got {k}")
        updates = build(k)
        if not ctx.fits(updates):
            raise ctx.infeasible(updates, f"the last {k} {unit}")
        chosen = k
    else:
        fitting = [m for m in range(low, high + 1) if ctx.fits(build(m))]
        if not fitting:
            what = "the classifier" if blocks else "the last layer (the classifier)"
            raise ctx.infeasible(build(low), what)
        chosen = max(fitting)
    return Selection(build(chosen), {"k": chosen, "unit": unit, "patch_size": patch_size})
