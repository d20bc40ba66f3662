"""``mit``: sparse update in the style of Lin et al. (NeurIPS'22), found by a greedy search.

A plan is the classifier (``head`` option), the biases of the last ``k`` other layers, and weight
updates of some of those ``k`` layers, each at an input-channel ratio in ``ratios`` (default 1/8,
1/4, 1/2, 1) keeping the input channels with the largest scores ("magnitude+" with magnitude
scores: L2 norm per input channel, a depthwise conv's channel being its own kernel, of the int8
integer weights on the MCU models as MIT ranks them, of the float weights elsewhere).

MIT's contribution analysis (fine-tuning each option to measure its accuracy gain) and its
evolutionary search are unpublished; this replaces them with a gain computed from the scores,
assumed additive as MIT assumes its gains are, and a greedy search:

- **Gain.** Each layer has an importance ``I_l``: with Fisher scores (``gain="fisher"``, or
  ``"auto"`` with scores from criterion ``fisher``) its potential ``P_l`` over the largest
  potential; otherwise (``"magnitude"``) 1 for every layer, no data being used. Updating the
  weight at ratio r gains ``I_l · share_l(r)``, ``share_l(r)`` the fraction of the layer's
  input-channel score mass in the kept channels (squared norms for magnitudes, Δ for Fisher).
  Updating the bias gains ``I_l · C_out / (|W_l| + C_out)``, the bias's share of the layer's
  parameters.
- **Search.** First the memory of every single weight option (layer, ratio) is measured once with
  the cost model, over the shallowest bias suffix that reaches the layer. Then for each bias
  depth k in ``depths`` (default 0, N and 7 evenly spaced values between, N the number of layers
  before the classifier), weight options of the last k layers are added greedily by gain per
  byte of that standalone memory (a layer's 1/4 only after its 1/8, etc.), each accepted only if
  the whole plan still fits (cost model), a layer dropped at its first step that does not fit.
  The depth with the largest total gain wins (ties: less memory, then smaller k).
"""

from __future__ import annotations

import heapq

import numpy as np

from ..errors import PlanError
from ..plan import LayerUpdate
from .base import Selection, SelectionContext, Updates, register_method
from .mit_scheme import ratio_update

__all__ = ["mit"]

DEFAULT_RATIOS = (0.125, 0.25, 0.5, 1.0)


@register_method("mit", needs_scores=True,
                 summary="input-channel scores: magnitude (magnitude+) or Fisher")
def mit(
    ctx: SelectionContext,
    *,
    gain: str = "auto",
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    depths: tuple[int, ...] | None = None,
    head: str = "auto",
) -> Selection:
    """Bias depth and per-layer input-channel ratios chosen greedily (see the module docstring).

    Args:
        ctx: The selection context (its scores: magnitude, or Fisher with ``in_channel``).
        gain: ``auto``, ``magnitude`` or ``fisher``.
        ratios: Input-channel ratios a weight update may take, in (0, 1].
        depths: Bias depths to try (numbers of layers before the classifier, from the end).
        head: How the classifier is updated (``auto``, ``weight``, ``bias``).
    """
    scores = ctx.require_scores("input-channel scores")
    if gain not in ("auto", "magnitude", "fisher"):
        raise PlanError(f"gain must be auto, magnitude or fisher; got {gain!r}")
    steps = sorted({float(r) for r in ratios})
    if not steps or steps[0] <= 0 or steps[-1] > 1:
        raise PlanError(f"ratios must lie in (0, 1]; got {list(ratios)}")
    fisher = gain == "fisher" or (gain == "auto" and scores.criterion == "fisher")
    base, head_mode = ctx.start_with_head(head)
    n = len(ctx.body)
    if depths is None:
        depths = tuple(sorted({0, n, *(round(n * i / 8) for i in range(1, 8))}))
    bad = [d for d in depths if not 0 <= int(d) <= n]
    if bad:
        raise PlanError(f"depths must lie between 0 and {n}; got {bad}")
    model = _GainModel(ctx, fisher, steps)
    options = _standalone(ctx, model, base)
    best: tuple | None = None
    tried = []
    for depth in sorted({int(d) for d in depths}):
        result = _greedy(ctx, model, options, base, depth)
        if result is None:
            continue
        updates, total_gain, chosen = result
        memory = ctx.memory(ctx.cost(updates))
        tried.append({"depth": depth, "gain": total_gain, "memory_bytes": memory})
        key = (round(total_gain, 12), -memory, -depth)
        if best is None or key > best[0]:
            best = (key, updates, depth, total_gain, chosen)
    if best is None:  # the head alone fits, so depth 0 always yields a plan
        raise AssertionError("mit: no depth yielded a plan")
    _key, updates, depth, total_gain, chosen = best
    return Selection(updates, {
        "head": head_mode, "gain": "fisher" if fisher else "magnitude", "depth": depth,
        "total_gain": total_gain, "weights": [f"{name}@{r:g}" for name, r in chosen],
        "depths_tried": tried,
    })


class _GainModel:
    """Per-layer importances, channel rankings and gains of the options."""

    def __init__(self, ctx: SelectionContext, fisher: bool, steps: list[float]) -> None:
        graph, scores = ctx.graph, ctx.scores
        assert scores is not None
        self.steps = steps
        potential = np.array([max(scores[n].layer, 0.0) for n in ctx.body], dtype=np.float64)
        if fisher and len(potential) and potential.max() > 0:
            importance = potential / potential.max()
        else:
            importance = np.ones(len(ctx.body))
        self.importance = dict(zip(ctx.body, importance.tolist(), strict=True))
        self.bias_gain: dict[str, float] = {}
        self.weight_gain: dict[tuple[str, float], float] = {}
        self.update: dict[tuple[str, float], LayerUpdate] = {}
        for name in ctx.body:
            layer = graph.layers[name]
            imp = self.importance[name]
            self.bias_gain[name] = (
                imp * layer.out_channels / (layer.weight_numel + layer.out_channels)
                if layer.bias_param is not None else 0.0)
            values = scores[name].in_channel
            mass = None
            if values is not None:
                mass = np.asarray(values, dtype=np.float64)
                mass = mass if fisher else mass**2
            for ratio in steps:
                try:
                    upd = ratio_update(graph, name, ratio, values)
                except PlanError:  # no input-channel scores: only the whole weight
                    continue
                kept = layer.in_channels if upd.channels is None else len(upd.channels)
                if mass is None or mass.sum() <= 0:
                    share = kept / layer.in_channels
                else:
                    share = float(mass[list(upd.channels)].sum() / mass.sum()
                                  if upd.channels is not None else 1.0)
                self.update[(name, ratio)] = upd
                self.weight_gain[(name, ratio)] = imp * share


def _bias_suffix(ctx: SelectionContext, base: Updates, depth: int) -> Updates:
    """The base plus the biases of the last ``depth`` layers before the classifier."""
    updates = dict(base)
    for name in ctx.body[len(ctx.body) - depth:] if depth else []:
        if ctx.graph.layers[name].bias_param is not None:
            updates[name] = LayerUpdate("bias")
    return updates


def _standalone(
    ctx: SelectionContext, model: _GainModel, base: Updates
) -> dict[str, list[tuple[float, float, int]]]:
    """Per layer, its weight options as (ratio, gain, memory over the shallowest base reaching
    the layer), measured once for all depths; layers whose base does not fit are left out."""
    options: dict[str, list[tuple[float, float, int]]] = {}
    n = len(ctx.body)
    for i, name in enumerate(ctx.body):
        reach = _bias_suffix(ctx, base, n - i)
        if not ctx.fits(reach):
            continue
        base_mem = ctx.memory(ctx.cost(reach))
        chain = []
        for ratio in model.steps:
            upd = model.update.get((name, ratio))
            if upd is not None:
                mem = ctx.memory(ctx.cost({**reach, name: upd})) - base_mem
                chain.append((ratio, model.weight_gain[(name, ratio)], mem))
        if chain:
            options[name] = chain
    return options


def _greedy(
    ctx: SelectionContext,
    model: _GainModel,
    all_options: dict[str, list[tuple[float, float, int]]],
    base: Updates,
    depth: int,
):
    """The greedy search at one bias depth: (updates, total gain, [(layer, ratio)]) or None."""
    layers = ctx.body[len(ctx.body) - depth:] if depth else []
    updates = _bias_suffix(ctx, base, depth)
    if not ctx.fits(updates):
        return None
    total_gain = sum(model.bias_gain[name] for name in layers)
    options = {name: all_options[name] for name in layers if name in all_options}
    order = {name: i for i, name in enumerate(ctx.body)}
    heap: list[tuple[float, int, str, int]] = []

    def push(name: str, j: int) -> None:
        chain = options[name]
        if j >= len(chain):
            return
        prev_gain, prev_mem = (chain[j - 1][1], chain[j - 1][2]) if j else (0.0, 0)
        d_gain = chain[j][1] - prev_gain
        d_mem = max(chain[j][2] - prev_mem, 1)
        heapq.heappush(heap, (-d_gain / d_mem, -order[name], name, j))

    for name in options:
        push(name, 0)
    chosen: dict[str, float] = {}
    while heap:
        _ratio, _order, name, j = heapq.heappop(heap)
        ratio = options[name][j][0]
        trial = {**updates, name: model.update[(name, ratio)]}
        if not ctx.fits(trial):
            continue  # larger ratios of this layer cost more: drop the layer
        updates = trial
        chosen[name] = ratio
        push(name, j + 1)
    total_gain += sum(model.weight_gain[(n, r)] for n, r in chosen.items())
    picked = [(n, chosen[n]) for n in ctx.body if n in chosen]
    return updates, float(total_gain), picked
