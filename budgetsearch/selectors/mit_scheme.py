"""The 15 published MIT sparse-update schemes as plans, and the MIT memory accounting.

``mit-scheme`` rebuilds a scheme of Lin et al. (NeurIPS'22) for one of the three MCU models
(``mcunet-5fps``, ``mbv2-w0.35``, ``proxyless-w0.3``; ``docs/references.md``): the biases of the
last ``n_bias`` convs (forward order, classifier excluded, as :func:`~budgetsearch.models.
mcu_conv_names` lists them), the listed weight updates at their input-channel ratio, channels kept
by "magnitude+" (largest L2 norm per input channel over all output channels and kernel taps; a
depthwise conv's channel is its own kernel; on the MCU models the norm of the int8 integer
weights, before the per-output-channel scales, as MIT ranks them: use magnitude scores, see
:mod:`budgetsearch.criteria.magnitude`), ratio 0 meaning bias only, and the classifier's weight and
bias (always updated).

:func:`mit_memory_bytes` counts a plan's memory the way MIT labels its schemes: batch 1, int8
activations and weights, int32 biases; per bias-updated conv a 1-bit mask per output element plus
its int32 bias; per weight-updated conv the int8 kept input channels of its input activation plus
its kept int8 weights (kept part only: counting all the weights reproduces none of the labels,
counting the kept part reproduces all 15); no momentum, gradient transients not counted. The
classifier's weight, bias and output mask are free, but its int8 input activation
(``in_features`` bytes at batch 1) is counted when its weight is updated, as MIT's count does.
``mit_memory_bytes(...) // 1024`` is the scheme's label for every published scheme.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import numpy as np

from ..errors import PlanError
from ..graph import LayerGraph
from ..plan import LayerUpdate, Plan
from .base import Selection, SelectionContext, Updates, register_method

__all__ = ["MIT_SCHEMES", "mit_memory_bytes", "mit_scheme", "ratio_update", "scheme_updates"]


def _parse(text: str) -> tuple[tuple[str, float], ...]:
    out = []
    for item in text.split(","):
        name, ratio = item.strip().split("@")
        out.append((name, float(ratio)))
    return tuple(out)


#: model -> label -> (n_bias, ((layer, input-channel ratio), ...)), from docs/references.md.
MIT_SCHEMES: dict[str, dict[str, tuple[int, tuple[tuple[str, float], ...]]]] = {
    "mbv2-w0.35": {
        "49KB": (16, _parse(
            "blocks.12.pointwise1@1, blocks.13.pointwise1@1, blocks.13.depthwise@0, "
            "blocks.13.pointwise2@0.25, blocks.14.pointwise1@0.125, blocks.15.pointwise1@0.125, "
            "blocks.16.pointwise1@0.125, blocks.16.depthwise@0.125")),
        "73KB": (20, _parse(
            "blocks.10.pointwise2@0.125, blocks.11.pointwise1@0.5, blocks.12.pointwise1@0.5, "
            "blocks.13.pointwise1@1, blocks.13.pointwise2@0.25, blocks.14.pointwise1@0.125, "
            "blocks.15.pointwise1@0.125, blocks.16.pointwise1@1")),
        "99KB": (25, _parse(
            "blocks.9.pointwise1@1, blocks.10.pointwise1@1, blocks.11.pointwise1@1, "
            "blocks.12.pointwise1@1, blocks.13.pointwise1@1, blocks.14.pointwise1@0.125, "
            "blocks.15.pointwise1@0.5, blocks.16.pointwise1@1")),
        "123KB": (31, _parse(
            "blocks.9.pointwise1@1, blocks.10.pointwise1@1, blocks.11.pointwise1@1, "
            "blocks.12.pointwise1@1, blocks.13.pointwise1@1, blocks.14.pointwise1@0.5, "
            "blocks.15.pointwise1@1, blocks.16.pointwise1@1")),
        "138KB": (34, _parse(
            "blocks.9.pointwise1@1, blocks.10.pointwise1@1, blocks.11.pointwise1@1, "
            "blocks.12.pointwise1@1, blocks.13.pointwise1@1, blocks.14.pointwise1@1, "
            "blocks.15.pointwise1@1, blocks.16.pointwise1@1")),
    },
    "mcunet-5fps": {
        "49KB": (20, _parse(
            "blocks.7.pointwise2@0, blocks.8.pointwise1@0.25, blocks.9.pointwise1@0.5, "
            "blocks.10.pointwise1@0.5, blocks.11.pointwise1@0, blocks.13.pointwise1@0")),
        "74KB": (21, _parse(
            "blocks.7.pointwise1@1, blocks.7.pointwise2@0, blocks.8.pointwise1@1, "
            "blocks.8.pointwise2@0, blocks.9.pointwise1@0.5, blocks.10.pointwise1@1")),
        "99KB": (22, _parse(
            "blocks.7.pointwise1@1, blocks.8.pointwise1@1, blocks.9.pointwise1@1, "
            "blocks.10.pointwise1@1, blocks.12.pointwise1@0.125, blocks.13.pointwise1@0.25")),
        "124KB": (24, _parse(
            "blocks.7.pointwise1@0.25, blocks.8.pointwise1@1, blocks.9.pointwise1@1, "
            "blocks.10.pointwise1@1, blocks.11.pointwise1@0.5, blocks.13.pointwise1@0.5")),
        "148KB": (23, _parse(
            "blocks.7.pointwise1@1, blocks.8.pointwise1@1, blocks.9.pointwise1@1, "
            "blocks.10.pointwise1@1, blocks.12.pointwise1@1, blocks.13.pointwise1@0.5")),
    },
    "proxyless-w0.3": {
        "49KB": (21, _parse(
            "blocks.13.pointwise1@0.25, blocks.14.pointwise1@1, blocks.14.pointwise2@0, "
            "blocks.15.pointwise1@1, blocks.16.pointwise2@0, blocks.17.pointwise1@0.125, "
            "blocks.18.pointwise1@0.25, blocks.19.pointwise1@0.25")),
        "74KB": (28, _parse(
            "blocks.11.pointwise1@0.5, blocks.12.pointwise1@0.25, blocks.13.pointwise1@1, "
            "blocks.14.pointwise1@1, blocks.15.pointwise1@1, blocks.17.pointwise1@0.5, "
            "blocks.18.pointwise1@0.25, blocks.19.pointwise1@0.5")),
        "98KB": (25, _parse(
            "blocks.12.pointwise1@1, blocks.13.pointwise1@0.5, blocks.14.pointwise1@1, "
            "blocks.15.pointwise1@1, blocks.16.pointwise1@0.25, blocks.17.pointwise1@0.5, "
            "blocks.18.pointwise1@1, blocks.19.pointwise1@1")),
        "120KB": (32, _parse(
            "blocks.12.pointwise1@1, blocks.13.pointwise1@1, blocks.14.pointwise1@1, "
            "blocks.15.pointwise1@1, blocks.16.pointwise1@0.5, blocks.17.pointwise1@1, "
            "blocks.18.pointwise1@1, blocks.19.pointwise1@1")),
        "148KB": (45, _parse(
            "blocks.12.pointwise1@1, blocks.13.pointwise1@1, blocks.14.pointwise1@1, "
            "blocks.15.pointwise1@1, blocks.16.pointwise1@1, blocks.17.pointwise1@1, "
            "blocks.18.pointwise1@1, blocks.19.pointwise1@1")),
    },
}


def normalize_label(label: str | int | float) -> str:
    """``49``, ``"49 KB"``, ``"49kb"``, ``"49KiB"`` -> ``"49KB"``.

    Raises:
        PlanError: If the label is not a number of KB.
    """
    match = re.fullmatch(r"\s*(\d+)\s*(k(i)?b)?\s*", str(label), flags=re.IGNORECASE)
    if match is None:
        raise PlanError(f"a scheme label is a number of KB such as 49KB; got {label!r}")
    return f"{int(match.group(1))}KB"


def ratio_update(
    graph: LayerGraph, name: str, ratio: float, in_scores: np.ndarray | None
) -> LayerUpdate:
    """A layer's update at an input-channel ratio: 0 -> bias only, 1 -> whole weight, else the
    ``max(1, int(ratio · C_in))`` input channels with the largest scores (ties: lower index).

    Raises:
        PlanError: For a ratio outside [0, 1], or a partial ratio without input-channel scores.
    """
    if not 0 <= ratio <= 1:
        raise PlanError(f"{name}: an input-channel ratio lies in [0, 1]; got {ratio}")
    if ratio == 0:
        return LayerUpdate("bias")
    width = graph.layers[name].in_channels
    k = min(width, max(1, int(round(ratio * width, 9))))  # 0.29 * 100 is 29
    if k == width:
        return LayerUpdate("weight")
    if in_scores is None:
        raise PlanError(f"{name}: no input-channel scores to keep {k} of {width} channels by")
    top = np.lexsort((np.arange(width), -np.asarray(in_scores, dtype=np.float64)))[:k]
    return LayerUpdate("weight", channels=tuple(int(c) for c in top), axis="in")


def scheme_updates(
    graph: LayerGraph,
    *,
    model: str,
    label: str | int,
    in_scores: Mapping[str, np.ndarray | None],
    conv_names: list[str],
) -> tuple[Updates, int, tuple[tuple[str, float], ...]]:
    """The updates of a published scheme, without the classifier.

    Args:
        graph: The traced MCU model.
        model: ``mcunet-5fps``, ``mbv2-w0.35`` or ``proxyless-w0.3``.
        label: The scheme's label (``"49KB"``).
        in_scores: Input-channel scores by layer (magnitudes for "magnitude+").
        conv_names: The model's convs in forward order, classifier excluded.

    Returns:
        The updates, ``n_bias`` and the weight updates as published.

    Raises:
        PlanError: Unknown model or label (listing the known ones), or layers the graph lacks.
    """
    if model not in MIT_SCHEMES:
        raise PlanError(f"no published MIT scheme for model {model!r}; models: "
                        f"{', '.join(MIT_SCHEMES)}")
    key = normalize_label(label)
    if key not in MIT_SCHEMES[model]:
        raise PlanError(f"no MIT scheme {label!r} for {model}; labels: "
                        f"{', '.join(MIT_SCHEMES[model])}")
    n_bias, weights = MIT_SCHEMES[model][key]
    missing = [n for n in conv_names if n not in graph.layers]
    if missing:
        raise PlanError(f"the traced model lacks the convs {missing[:5]} of {model}")
    updates: Updates = {n: LayerUpdate("bias") for n in conv_names[len(conv_names) - n_bias:]}
    for name, ratio in weights:
        updates[name] = ratio_update(graph, name, ratio, in_scores.get(name))
    return updates, n_bias, weights


def mit_memory_bytes(graph: LayerGraph, plan: Plan | Mapping[str, LayerUpdate]) -> int:
    """A plan's memory under MIT's accounting (see the module docstring), in bytes.

    Of the classifier (the last trainable layer) only its input activation is counted, when its
    weight is updated (its kept input channels for an input-channel subset); every other updated
    layer with a bias is a bias-updated conv; a conv's input and output sizes come from the
    traced graph (batch 1).

    Args:
        graph: The traced model (batch 1).
        plan: A plan, or its updates by layer name.

    Returns:
        The memory in bytes.
    """
    updates = plan.updates if isinstance(plan, Plan) else plan
    head = list(graph.layers)[-1]
    mask_bits, total = 0, 0
    for name, update in updates.items():
        layer = graph.layers[name]
        out = graph.nodes[layer.node]
        if name == head:
            if update.mode == "weight":
                in_elems = graph.nodes[out.inputs[0]].numel
                kept = in_elems
                if update.channels is not None and update.axis == "in":
                    kept = in_elems // layer.in_channels * len(update.channels)
                total += kept
            continue
        if layer.bias_param is not None:
            mask_bits += out.numel
            total += 4 * layer.out_channels
        if update.mode != "weight":
            continue
        in_elems = graph.nodes[out.inputs[0]].numel
        per_in_act = in_elems // layer.in_channels
        if update.channels is None:
            total += in_elems + layer.weight_numel
        elif update.axis == "in":
            k = len(update.channels)
            total += per_in_act * k + layer.weight_numel // layer.in_channels * k
        else:
            total += in_elems + layer.weight_numel // layer.out_channels * len(update.channels)
    return total + math.ceil(mask_bits / 8)


@register_method("mit-scheme", needs_scores=True,
                 summary="magnitude scores for magnitude+ input channels (criterion magnitude)")
def mit_scheme(
    ctx: SelectionContext,
    *,
    label: str | None = None,
    model: str | None = None,
    head: str = "weight",
    mcu_dir: str | os.PathLike[str] | None = None,
) -> Selection:
    """A published MIT scheme; it must fit the budgets like any other plan.

    Args:
        ctx: The selection context (its scores rank input channels: use magnitude scores).
        label: The scheme's label, e.g. ``"49KB"``.
        model: The MCU model's name; default the traced graph's.
        head: How the classifier is updated (``weight`` as published; ``auto``, ``bias``).
        mcu_dir: Folder of the MCU model files (for the conv list).
    """
    from ..models import mcu_conv_names

    scores = ctx.require_scores("input-channel magnitudes for magnitude+")
    model = model or ctx.graph.model_name
    if model not in MIT_SCHEMES:
        raise PlanError(f"no published MIT scheme for model {model!r}; models: "
                        f"{', '.join(MIT_SCHEMES)}")
    if label is None:
        raise PlanError(f"method mit-scheme needs a label; for {model}: "
                        f"{', '.join(MIT_SCHEMES[model])}")
    convs = mcu_conv_names(model, mcu_dir=mcu_dir)
    if convs != ctx.body:
        raise PlanError(f"the traced model's layers are not the convs of {model} "
                        f"({len(ctx.body)} layers before the classifier, {len(convs)} convs)")
    body, n_bias, weights = scheme_updates(
        ctx.graph, model=model, label=label, conv_names=convs,
        in_scores={n: scores[n].in_channel for n in convs},
    )
    candidates = [(what, {**body, **h}) for what, h in ctx.head_candidates(head)]
    fitting = [updates for _what, updates in candidates if ctx.fits(updates)]
    if not fitting:
        what, cheapest = candidates[-1]
        raise ctx.infeasible(cheapest, f"the MIT scheme {normalize_label(label)} with {what}")
    updates = fitting[0]
    mit_bytes = mit_memory_bytes(ctx.graph, updates)
    return Selection(updates, {
        "model": model, "label": normalize_label(label), "n_bias": n_bias,
        "weights": [f"{n}@{r:g}" for n, r in weights], "channel_criterion": scores.criterion,
        "mit_memory_bytes": mit_bytes, "mit_memory_kib": mit_bytes // 1024,
    })
