"""A plan as the sparse-update configuration of MIT's Tiny Training Engine.

The engine behind the published MCU schemes (Lin et al., NeurIPS'22; ``docs/references.md``)
takes, per model, a backward configuration: the number of convs whose bias is updated
(``n_bias_update``: always the *last* convs of the model, a contiguous run), the indices of the
convs whose weight is updated (``manual_weight_idx``, in the model's conv order, forward, the
classifier not counted: :func:`~budgetsearch.models.mcu_conv_names`) with each one's ratio of
input channels (``weight_update_ratio``), and whether the classifier is frozen. A
weight-updated conv lies inside the bias run. The engine trains the *first* ``int(ratio · C)``
input channels of a conv, at batch 1, with no gradient filter; partial ratios only on 1×1 and
depthwise convs.

:func:`to_tte` writes a plan in that form, with ``channel_orders``: for every conv trained on a
channel subset, the input-channel permutation that puts the plan's channels first (apply it to
the conv's input channels and its producer's output channels before compiling, so that the
engine's first channels are the plan's). It refuses, with an :class:`~budgetsearch.errors.
ExportError` naming the layer, whatever the engine cannot express, and says which plans it takes:
those of ``budgetsearch plan --target tte`` (``plan_for(target="tte")``: the search space and
the race keep to the engine), and of ``select --method mit-scheme`` and ``--method mit --head
weight`` at batch 1, which update the last convs contiguously on input channels and the whole
classifier.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from ..errors import BudgetSearchError, ExportError
from ..plan import LayerUpdate, Plan

__all__ = ["TTE_FORMAT", "TTE_RATIOS", "to_tte"]

#: The format tag written into every exported document.
TTE_FORMAT = "budgetsearch-tte-sparse-update/1"
#: The ratios the published schemes use; a channel count one of them gives is written as it.
TTE_RATIOS = (0.125, 0.25, 0.5, 1.0)

_TAKES = ("plans it takes: plan with `--target tte` (plan_for(target=\"tte\")), or select "
          "--method mit-scheme, or --method mit --head weight, at batch 1 (biases of the last "
          "convs, weights on input channels of 1x1 and depthwise convs, the whole classifier, "
          "no filter)")


def _ratio(k: int, width: int) -> float:
    """The ratio the engine turns back into ``k`` of ``width`` channels (``max(1, int(r·C))``):
    a published ratio when one gives exactly ``k`` (the largest such), else ``k / C`` rounded up
    at the sixth decimal (and up again where the float product falls just short), so that the
    engine's truncation lands on ``k``."""
    if k == width:
        return 1.0
    exact = [r for r in TTE_RATIOS if max(1, int(r * width)) == k]
    if exact:
        return max(exact)
    micro = math.ceil(k * 1_000_000 / width)
    while max(1, int(micro / 1e6 * width)) < k:  # float products may fall just short
        micro += 1
    return micro / 1e6


def _fmt(ratio: float) -> str:
    """A ratio as the engine's strings write it (at most six decimals, exact)."""
    return format(ratio, ".6f").rstrip("0").rstrip(".")


def _kind(shape: list[int]) -> str:
    """``pointwise``, ``depthwise``, ``conv`` (k×k, dense) or ``linear`` from a weight shape."""
    if len(shape) == 2:
        return "linear"
    if len(shape) == 4 and shape[1] == 1 and shape[0] > 1 and shape[2] * shape[3] > 1:
        return "depthwise"
    if len(shape) == 4 and shape[2] == shape[3] == 1:
        return "pointwise"
    return "conv"


def _channel_order(update: LayerUpdate, width: int) -> list[int]:
    chosen = list(update.channels or ())
    rest = sorted(set(range(width)) - set(chosen))
    return chosen + rest


def to_tte(plan: Plan, *, mcu_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The plan as the Tiny Training Engine's sparse-update configuration.

    Args:
        plan: A plan for one of the MCU models (``mcunet-5fps``, ``mbv2-w0.35``,
            ``proxyless-w0.3``, or a model file of the same format).
        mcu_dir: The folder of the model's files, when not the shipped ones.

    Returns:
        ``format``, ``model``, ``backward_config`` (``enable_backward_config``,
        ``n_bias_update``, ``manual_weight_idx`` and ``weight_update_ratio`` as the engine's
        dash-separated strings, ``freeze_fc``), ``channel_orders`` (conv index → input-channel
        permutation, chosen channels first), ``layers`` (conv index → the plan's layer name)
        and ``batch_size``.

    Raises:
        ExportError: The plan has no MCU model, trains at batch > 1, uses a gradient filter,
            updates a layer that is not one of the model's convs or its classifier, leaves a
            gap in the run of last convs, trains a channel subset on a k×k conv or on output
            channels, or updates part of the classifier. The message names the layer.
    """
    from ..models import mcu_conv_names

    if not plan.model:
        raise ExportError("the plan names no model; the engine's configuration indexes the "
                          "convs of mcunet-5fps, mbv2-w0.35 or proxyless-w0.3")
    try:
        convs = mcu_conv_names(plan.model, mcu_dir=mcu_dir)
    except BudgetSearchError as exc:  # not a model file of the MCU format
        raise ExportError(f"model {plan.model!r} is not an MCU model the engine knows ({exc}); "
                          "models: mcunet-5fps, mbv2-w0.35, proxyless-w0.3") from exc
    if plan.batch_size != 1:
        raise ExportError(f"the plan is made for batch {plan.batch_size}; the engine trains at "
                          f"batch 1 ({_TAKES})")
    index = {name: i for i, name in enumerate(convs)}
    shapes: Mapping[str, list[int]] = plan.layer_shapes
    heads = [n for n in shapes if n not in index]
    head = heads[-1] if heads else None
    weight_idx: list[int] = []
    ratios: list[float] = []
    orders: dict[str, list[int]] = {}
    for name, update in plan.updates.items():
        if update.patch_size > 1:
            raise ExportError(f"layer {name}: a gradient filter (patch size {update.patch_size}) "
                              f"is not something the engine has ({_TAKES})")
        if name == head:
            if update.mode != "weight" or update.channels is not None:
                raise ExportError(f"layer {name} (the classifier): the engine updates all of "
                                  "it or none of it (freeze_fc); the plan updates "
                                  + ("its bias only" if update.mode != "weight"
                                     else f"{len(update.channels or ())} of its channels")
                                  + f" ({_TAKES})")
            continue
        if name not in index:
            raise ExportError(f"layer {name}: not one of the {len(convs)} convs of "
                              f"{plan.model} the engine indexes")
        if update.mode != "weight":
            continue
        shape = list(shapes[name])
        kind = _kind(shape)
        width = shape[0] if kind == "depthwise" else shape[1]
        if update.channels is not None:
            if kind == "conv":
                raise ExportError(f"layer {name}: a channel subset on a {shape[2]}x{shape[3]} "
                                  f"conv; the engine takes partial ratios on 1x1 and depthwise "
                                  f"convs only ({_TAKES})")
            if kind == "pointwise" and update.axis != "in":
                raise ExportError(f"layer {name}: the plan trains output channels; the engine "
                                  f"trains input channels ({_TAKES})")
        k = width if update.channels is None else len(update.channels)
        weight_idx.append(index[name])
        ratios.append(_ratio(k, width))
        if update.channels is not None:
            orders[str(index[name])] = _channel_order(update, width)
    updated = sorted(index[n] for n in plan.updates if n in index)
    n_bias = len(updated)
    if updated and updated != list(range(len(convs) - n_bias, len(convs))):
        gaps = [convs[i] for i in range(updated[0], len(convs)) if i not in set(updated)]
        raise ExportError(f"the plan's updated convs are not one run ending at the last conv: "
                          f"{', '.join(gaps[:4])}{' ...' if len(gaps) > 4 else ''} between "
                          f"{convs[updated[0]]} and {convs[-1]} are frozen; the engine updates "
                          f"the biases of the last n convs ({_TAKES})")
    pairs = sorted(zip(weight_idx, ratios, strict=True))
    return {
        "format": TTE_FORMAT,
        "model": plan.model,
        "batch_size": 1,
        "backward_config": {
            "enable_backward_config": 1,
            "n_bias_update": n_bias,
            "manual_weight_idx": "-".join(str(i) for i, _ in pairs) or None,
            "weight_update_ratio": "-".join(_fmt(r) for _, r in pairs) or None,
            "freeze_fc": int(head is None or head not in plan.updates),
        },
        "channel_orders": orders,
        "layers": {str(i): convs[i] for i in updated},
    }
