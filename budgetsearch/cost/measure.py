"""Measurements that check the cost model against PyTorch itself.

* :func:`measure_saved_bytes` runs one real forward pass and loss with a plan applied by
  ``requires_grad`` freezing and counts the bytes autograd keeps for backward, through
  :func:`torch.autograd.graph.saved_tensors_hooks` (exact and independent of the allocator;
  docs/cost-model.md, 'Measuring against PyTorch'). Each storage is counted once; parameters
  and buffers are not activations and are left out.
* :func:`count_macs` counts the MACs of the same step with
  :class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per MAC), corrected for its grouped
  conv weight-gradient overcount: its formula ignores groups, so it counts G times the true
  grad-weight of a conv with G groups.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..graph import LayerGraph
from ..plan import LayerUpdate, Plan

__all__ = ["MacCount", "apply_requires_grad", "count_macs", "measure_saved_bytes"]


@contextmanager
def apply_requires_grad(
    model: nn.Module,
    graph: LayerGraph,
    plan: Plan | Mapping[str, LayerUpdate],
    *,
    bn_train: bool = False,
) -> Iterator[nn.Module]:
    """Apply a plan by ``requires_grad`` freezing (whole layers; channel subsets and gradient
    filters cannot be expressed this way), with batch norm frozen unless ``bn_train``; the model
    is put in training mode. Flags and modes are restored on exit."""
    updates = plan.updates if isinstance(plan, Plan) else plan
    params = dict(model.named_parameters())
    old_flags = {name: p.requires_grad for name, p in params.items()}
    old_modes = {name: m.training for name, m in model.named_modules()}
    try:
        for p in params.values():
            p.requires_grad_(False)
        for name, update in updates.items():
            layer = graph.layers[name]
            if update.mode == "weight":
                params[f"{name}.weight"].requires_grad_(True)
            if layer.bias_param is not None:
                params[layer.bias_param].requires_grad_(True)
        model.train()
        if not bn_train:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        yield model
    finally:
        for name, p in params.items():
            p.requires_grad_(old_flags[name])
        for name, m in model.named_modules():
            m.training = old_modes[name]


def _example(graph: LayerGraph, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *graph.input_shape, generator=gen)
    classes = graph.layers[list(graph.layers)[-1]].out_channels
    y = torch.randint(0, classes, (batch_size,), generator=gen)
    return x, y


def measure_saved_bytes(
    model: nn.Module,
    graph: LayerGraph,
    plan: Plan | Mapping[str, LayerUpdate],
    *,
    batch_size: int = 1,
    bn_train: bool = False,
    seed: int = 0,
) -> int:
    """Bytes autograd saves for backward in one training step (forward and cross-entropy loss).

    Args:
        model: The model the graph was traced from.
        graph: Its layer graph.
        plan: The plan, applied by ``requires_grad`` freezing.
        batch_size: Batch size of the step.
        bn_train: Run batch norm on batch statistics.
        seed: Seed of the random input and labels.
    """
    x, y = _example(graph, batch_size, seed)
    with apply_requires_grad(model, graph, plan, bn_train=bn_train):
        excluded = {t.untyped_storage().data_ptr() for t in model.parameters()}
        excluded |= {t.untyped_storage().data_ptr() for t in model.buffers()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in excluded:
                seen[ptr] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        del loss
    return sum(seen.values())


@dataclass(frozen=True)
class MacCount:
    """MACs of one training step counted by FlopCounterMode (conv and matmul ops only)."""

    forward_macs: int
    backward_macs: int
    backward_macs_uncorrected: int


def count_macs(
    model: nn.Module,
    graph: LayerGraph,
    plan: Plan | Mapping[str, LayerUpdate],
    *,
    batch_size: int = 1,
    seed: int = 0,
) -> MacCount:
    """Forward and backward MACs of one training step, counted by PyTorch's FlopCounterMode.

    The backward count is corrected for FlopCounterMode's grouped-conv grad-weight formula, which
    ignores groups: for every conv with G > 1 whose weight gradient is computed, (G - 1) / G of
    the grad-weight it counts is removed (docs/cost-model.md, 'Measuring against PyTorch').
    """
    from torch.utils.flop_counter import FlopCounterMode

    x, y = _example(graph, batch_size, seed)
    updates = plan.updates if isinstance(plan, Plan) else plan
    with apply_requires_grad(model, graph, plan):
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(x)
        forward = counter.get_total_flops() // 2
        loss = F.cross_entropy(out, y)
        counter = FlopCounterMode(display=False)
        with counter:
            loss.backward()
        counted = counter.get_total_flops() // 2
    overcount = 0
    for name, update in updates.items():
        layer = graph.layers[name]
        if update.mode != "weight" or layer.groups == 1:
            continue
        node = graph.nodes[layer.node]
        positions = node.shape[2] * node.shape[3]
        true_gw = batch_size * layer.weight_numel * positions
        overcount += (layer.groups - 1) * true_gw
    model.zero_grad(set_to_none=True)
    return MacCount(int(forward), int(counted - overcount), int(counted))
