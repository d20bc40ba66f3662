"""Fisher potential (TinyTrain, after Theis et al. 2018), computed streaming.

For a layer with output activation ``a`` (N samples × C channels × D positions) and gradient
``g = ∂L/∂a``, channel o has ``Δ_o = (1/2N) Σ_n (Σ_d a[n,o,d] · g[n,o,d])²`` and the layer has
the potential ``P_l = Σ_o Δ_o`` (docs/criteria.md, 'Fisher potential').

Choices made here, and why:

- **Activation point**: ``a`` is the layer's own output, the tensor ``nn.Conv2d`` or ``nn.Linear``
  returns, i.e. a conv's output *before* the batch norm that follows it. That is the tensor a
  channel mask on the layer would act on, and it does not depend on how (or whether) the batch
  norm is folded.
- **Loss reduction**: the loss is the *sum* of the per-sample losses (cross-entropy by default),
  so ``g[n]`` is the gradient of sample n's own loss, independent of how the samples are cut into
  micro-batches; with a mean the gradients would shrink with the micro-batch size.
- **Mode**: the pass runs the model in eval mode (batch norm on its running statistics, dropout
  off), so every sample's term is independent of the rest of its batch and the streamed result
  equals the whole-batch result. Parameters are frozen during the pass (no weight gradient is
  computed or stored); the input is made to require a gradient instead, so every activation gets
  one. ``inplace`` flags (``ReLU(inplace=True)``...) are switched off so hooked outputs keep their
  values. All of this is restored afterwards.
- **Input channels**: Δ of a layer's input channel c is computed the same way on the tensor that
  feeds the layer (its input, with the gradient autograd delivers for it). Where that tensor is a
  producer layer's output (no op in between), it equals the producer's output-channel Δ
  (docs/criteria.md, 'Input-channel potential'). It is ``None`` for a layer fed by the model
  input itself, and for a layer whose input carries no gradient.
- **Streaming**: per micro-batch, forward hooks keep a reference to each hooked tensor and
  register a tensor hook on it; when its gradient arrives the per-sample, per-channel sums
  ``Σ_d a·g`` are formed and the reference dropped. Squares are accumulated in float64. Memory is
  bounded by one micro-batch whatever the number of samples.
- **Layer called twice** (shared weights): its per-sample sums are added over the calls before
  squaring (one mask acting on every call).
- **Under a gradient filter** (conv outputs only, patch sizes :data:`FILTER_PATCHES`): a filtered
  weight update sees g replaced by its mean over r×r patches (docs/gradient-filtering.md), so the
  channel's gate gradient ``γ = Σ_d a·g`` becomes ``γ̂ = Σ_cells (Σ_{d∈cell} a)(mean_{d∈cell} g)``.
  The first-order gain of a step along the filtered direction, relative to the exact one, is
  ``E[γ·γ̂] / E[γ²]``, so the channel's potential under the filter is
  ``Δ_o^(r) = (1/2N) Σ_n γ[n,o]·γ̂[n,o]``, clipped to ``[0, Δ_o]`` (a filter never adds
  information). It is kept in ``LayerScores.filtered[r]``; the search's proxy uses it for filtered
  updates. It measures the filter's loss on the layer's own gradient only: the approximation a
  filtered layer passes on to the layers before it (its input gradient) is not in it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, ScoresError
from .base import (
    Batches,
    Criterion,
    model_dtype_device,
    preserved_state,
    register_criterion,
    take_samples,
)
from .base import trainable_layers as _layers
from .memory import MemoryMeter
from .scores import LayerScores, Scores, input_channels

__all__ = [
    "FILTER_PATCHES",
    "FisherCriterion",
    "LossFn",
    "cross_entropy_sum",
    "fisher_bruteforce",
    "fisher_potential",
    "tinytrain_layer_scores",
]

#: Patch sizes of the gradient filter whose channel potentials the pass measures (the search's).
FILTER_PATCHES = (2, 4, 8)

#: ``loss(logits, labels)``: per-sample losses (shape N) or their sum; never their mean.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the samples (the default Fisher loss)."""
    return F.cross_entropy(logits, labels.long(), reduction="sum")


#: A tensor kept whole by the brute-force pass: layer, "in"/"out", channel dim, tensor, version.
_Kept = tuple[str, str, int, torch.Tensor, int]


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Conv2d) else -1


def _channel_dot(a: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-sample, per-channel ``Σ_d a·g`` as an (N, C) float64 tensor."""
    spec = "nc...,nc...->nc" if dim == 1 else "n...c,n...c->nc"
    return torch.einsum(spec, a, g).double()


def _filtered_dots(a: torch.Tensor, g: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per patch size r: per-sample, per-channel ``Σ_cells (Σ_cell a)(mean_cell g)`` (N, C)."""
    from ..ops.filtered import _avg_pool, _sum_pool, filter_geometry

    hw = tuple(a.shape[-2:])
    out = {}
    for r in FILTER_PATCHES:
        geo = filter_geometry(in_hw=hw, out_hw=hw, stride=1, patch_size=r)
        out[r] = _channel_dot(_sum_pool(a, geo), _avg_pool(g, geo), 1)
    return out


class _Pass:
    """State of one Fisher pass: hooks, per-sample sums of the current micro-batch, totals."""

    def __init__(self, model: nn.Module, meter: MemoryMeter) -> None:
        self.layers = _layers(model)
        self.meter = meter
        self.squares: dict[tuple[str, str], torch.Tensor] = {}
        #: Σ_n γ·γ̂_r per output channel, by (conv layer, r).
        self.cross: dict[tuple[str, int], torch.Tensor] = {}
        for name, module in self.layers.items():
            self.squares[(name, "out")] = torch.zeros(module.weight.shape[0], dtype=torch.float64)
            self.squares[(name, "in")] = torch.zeros(input_channels(module), dtype=torch.float64)
            if isinstance(module, nn.Conv2d):
                for r in FILTER_PATCHES:
                    self.cross[(name, r)] = torch.zeros(module.weight.shape[0],
                                                        dtype=torch.float64)
        self.filtered_sums: dict[tuple[str, int], torch.Tensor] = {}
        self.in_undefined: set[str] = set()
        self.ran: set[str] = set()
        self.got_gradient: set[str] = set()
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.pending: list[list[Any]] = []
        self.bad: list[str] = []
        self.model_input: torch.Tensor | None = None

    def hook_layers(self, *, keep: list[_Kept] | None = None) -> list:
        """Register forward hooks; with ``keep`` tensors are collected instead of streamed."""

        def make(name: str, module: nn.Module) -> Callable[..., None]:
            dim = _channel_dim(module)

            def forward_hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                self.ran.add(name)
                inp = args[0] if args else None
                if isinstance(output, torch.Tensor) and output.requires_grad:
                    self._watch(name, "out", output, dim, keep)
                is_model_input = inp is self.model_input
                if isinstance(inp, torch.Tensor) and inp.requires_grad and not is_model_input:
                    self._watch(name, "in", inp, dim, keep)
                else:
                    self.in_undefined.add(name)

            return forward_hook

        return [m.register_forward_hook(make(n, m)) for n, m in self.layers.items()]

    def _watch(self, name: str, role: str, tensor: torch.Tensor, dim: int, keep: list | None):
        if keep is not None:
            self.meter.hold(tensor)
            keep.append((name, role, dim, tensor, tensor._version))
            return
        holder: list[Any] = [tensor.detach(), tensor._version, self.meter.hold(tensor)]
        self.pending.append(holder)

        def on_grad(grad: torch.Tensor) -> None:
            if not holder:
                return
            held, version, key = holder
            holder.clear()
            self.meter.release(key)
            if held._version != version:
                self.bad.append(f"{name} ({role}put modified in place after the layer ran)")
                return
            self.add(name, role, _channel_dot(held, grad, dim))
            if role == "out":
                self.add_filtered(name, held, grad)

        tensor.register_hook(on_grad)

    def add(self, name: str, role: str, sums: torch.Tensor) -> None:
        """Add one call's per-sample, per-channel sums of ``a·g`` to the micro-batch's."""
        if not torch.isfinite(sums).all():
            self.bad.append(f"{name} ({role}put gradient)")
        self.got_gradient.add(name)
        key = (name, role)
        self.sums[key] = self.sums[key] + sums if key in self.sums else sums

    def add_filtered(self, name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        """Add one call's filtered gate gradients of a conv's output (no-op for other layers)."""
        if (name, FILTER_PATCHES[0]) not in self.cross or a.dim() != 4:
            return
        for r, sums in _filtered_dots(a, g).items():
            key = (name, r)
            self.filtered_sums[key] = (self.filtered_sums[key] + sums
                                       if key in self.filtered_sums else sums)

    def release_pending(self) -> None:
        """Drop the tensors whose gradient never came (not on the path to the loss)."""
        for holder in self.pending:
            if holder:
                self.meter.release(holder[2])
                holder.clear()
        self.pending.clear()

    def end_micro_batch(self, where: str) -> None:
        """Square and accumulate the micro-batch's sums; release whatever is still held."""
        self.release_pending()
        if self.bad:
            raise ScoresError(
                f"Fisher pass: non-finite gradient on {where}, first at layer {self.bad[0]}"
                + (f" ({len(self.bad)} tensors affected)" if len(self.bad) > 1 else "")
            )
        for key, sums in self.sums.items():
            self.squares[key] += (sums**2).sum(dim=0)
        for (name, r), filtered in self.filtered_sums.items():
            self.cross[(name, r)] += (self.sums[(name, "out")] * filtered).sum(dim=0)
        self.sums.clear()
        self.filtered_sums.clear()

    def scores(self, model: nn.Module, n_samples: int, metadata: dict[str, Any]) -> Scores:
        layers: dict[str, LayerScores] = {}
        for name in self.layers:
            out = (self.squares[(name, "out")] / (2 * n_samples)).numpy()
            inp = None
            if name in self.ran and name not in self.in_undefined:
                inp = (self.squares[(name, "in")] / (2 * n_samples)).numpy()
            filtered = {}
            if name in self.got_gradient:
                for r in FILTER_PATCHES:
                    if (name, r) in self.cross:
                        cross = (self.cross[(name, r)] / (2 * n_samples)).numpy()
                        filtered[r] = np.clip(cross, 0.0, out)
            layers[name] = LayerScores(out_channel=out, in_channel=inp, layer=float(out.sum()),
                                       filtered=filtered)
        metadata = {
            **metadata,
            "samples": n_samples,
            "seed": metadata.get("seed"),
            "peak_memory_bytes": int(self.meter.peak_bytes),
            "activation": "layer output (a conv's output before its batch norm)",
            "loss_reduction": "sum",
            "layers_not_run": [n for n in self.layers if n not in self.ran],
            "layers_without_gradient": [
                n for n in self.layers if n in self.ran and n not in self.got_gradient
            ],
        }
        return Scores.for_model(model, criterion="fisher", layers=layers, metadata=metadata)


def _prepare(model: nn.Module, x: torch.Tensor, where: str) -> torch.Tensor:
    dtype, device = model_dtype_device(model)
    x = torch.as_tensor(x)
    x = x.detach().to(device=device, dtype=dtype if x.is_floating_point() else None, copy=True)
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise DataError(f"Fisher pass: the inputs of {where} contain NaN or inf")
    return x.requires_grad_(x.is_floating_point())


def _total_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: LossFn, where: str):
    logits = model(x)
    if not isinstance(logits, torch.Tensor):
        raise ScoresError(f"Fisher pass: the model returned {type(logits).__name__}, not logits")
    if (logits.dim() == 2 and not y.is_floating_point() and y.numel()
            and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1])):
        raise DataError(f"Fisher pass: the labels of {where} run from {int(y.min())} to "
                        f"{int(y.max())}; the model has {logits.shape[1]} classes "
                        f"(0 to {logits.shape[1] - 1})")
    total = loss(logits, y.to(logits.device))
    total = total.sum() if total.dim() > 0 else total
    if not total.requires_grad:
        raise ScoresError("Fisher pass: the loss does not depend on the input differentiably")
    if not torch.isfinite(total):
        raise ScoresError(f"Fisher pass: the loss is {total.item()} on {where}")
    return total


def fisher_potential(
    model: nn.Module,
    data: Batches | None,
    *,
    samples: int | None = None,
    micro_batch: int = 16,
    loss: LossFn | None = None,
) -> Scores:
    """Fisher potential of every channel and layer, streamed over micro-batches.

    Args:
        model: The model; returned unchanged (mode, ``requires_grad``, ``inplace`` flags).
        data: Batches of ``(inputs, labels)``.
        samples: Number of samples to use (the first ones of ``data``); ``None`` for all.
        micro_batch: Samples per forward/backward; bounds the pass's memory.
        loss: ``loss(logits, labels)`` giving per-sample losses or their sum (not their mean).

    Returns:
        Scores: Δ per output and input channel, ``P_l`` as the layer score; metadata with
        ``samples``, ``peak_memory_bytes`` (autograd's saved tensors plus hooked tensors, per
        storage) and ``seconds``.

    Raises:
        DataError: No data, fewer than ``samples`` samples, or non-finite inputs.
        ScoresError: Non-finite loss or gradients (naming the layer), or unusable model output.
    """
    if micro_batch < 1:
        raise ScoresError(f"Fisher pass: micro_batch must be at least 1, got {micro_batch}")
    loss = loss or cross_entropy_sum
    start = time.perf_counter()
    meter = MemoryMeter(exclude=[*model.parameters(), *model.buffers()])
    state = _Pass(model, meter)
    n_samples = 0
    with preserved_state(model, freeze=True, no_inplace=True):
        handles = state.hook_layers()
        try:
            chunks = take_samples(data, samples=samples, chunk=micro_batch, what="Fisher pass")
            for xb, yb in chunks:
                where = f"samples {n_samples}..{n_samples + xb.shape[0] - 1}"
                x = _prepare(model, xb, where)
                state.model_input = x
                with meter.saved_tensors():
                    total = _total_loss(model, x, yb, loss, where)
                torch.autograd.grad(total, [x])
                del total
                state.model_input = None
                state.end_micro_batch(where)
                n_samples += xb.shape[0]
        finally:
            for handle in handles:
                handle.remove()
            state.model_input = None
            state.release_pending()
    metadata = {
        "micro_batch": micro_batch,
        "loss": getattr(loss, "__name__", type(loss).__name__),
        "seconds": time.perf_counter() - start,
    }
    return state.scores(model, n_samples, metadata)


def fisher_bruteforce(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: LossFn | None = None
) -> Scores:
    """Fisher potential the naive way: keep every activation and gradient of the whole batch.

    One forward over all of ``x``, ``torch.autograd.grad`` of the summed loss with respect to
    every hooked tensor at once, then the per-channel sums. Same conventions as
    :func:`fisher_potential` (which must agree with it); used to prove the streamed pass right
    and to show how much memory streaming saves (``metadata["peak_memory_bytes"]``).
    """
    loss = loss or cross_entropy_sum
    start = time.perf_counter()
    meter = MemoryMeter(exclude=[*model.parameters(), *model.buffers()])
    state = _Pass(model, meter)
    kept: list[_Kept] = []
    with preserved_state(model, freeze=True, no_inplace=True):
        handles = state.hook_layers(keep=kept)
        try:
            inputs = _prepare(model, x, "the batch")
            state.model_input = inputs
            with meter.saved_tensors():
                total = _total_loss(model, inputs, torch.as_tensor(y), loss, "the batch")
        finally:
            for handle in handles:
                handle.remove()
        unique: dict[int, torch.Tensor] = {id(t): t for _, _, _, t, _ in kept}
        grads = torch.autograd.grad(total, list(unique.values()), allow_unused=True)
        by_id = dict(zip(unique, grads, strict=True))
        for grad in grads:
            if grad is not None:
                meter.hold(grad)
        for name, role, dim, tensor, version in kept:
            grad = by_id[id(tensor)]
            if tensor._version != version:
                raise ScoresError(f"Fisher pass: {name}'s {role}put was modified in place")
            if grad is not None:
                state.add(name, role, _channel_dot(tensor.detach(), grad, dim))
                if role == "out":
                    state.add_filtered(name, tensor.detach(), grad)
        state.end_micro_batch("the batch")
    metadata = {"micro_batch": int(x.shape[0]), "seconds": time.perf_counter() - start}
    return state.scores(model, int(x.shape[0]), metadata)


def tinytrain_layer_scores(
    potential: Mapping[str, float], *, params: Mapping[str, int], macs: Mapping[str, float]
) -> dict[str, float]:
    """TinyTrain's multi-objective layer score ``s_l = P_l / [(|W_l|/max|W|)·(M_l/max M)]``.

    Args:
        potential: ``P_l`` by layer (``Scores.layer_scores()`` of a Fisher pass).
        params: Parameter count of each layer.
        macs: Forward MACs of each layer.

    Raises:
        ScoresError: If a layer lacks a cost, or a cost is not positive.
    """
    names = list(potential)
    missing = [n for n in names if n not in params or n not in macs]
    if missing:
        raise ScoresError(f"no parameter count or MACs for layers {missing[:8]}")
    w = np.array([float(params[n]) for n in names])
    m = np.array([float(macs[n]) for n in names])
    if (w <= 0).any() or (m <= 0).any():
        raise ScoresError("parameter counts and MACs must be positive for every layer")
    cost = (w / w.max()) * (m / m.max())
    return {n: float(potential[n]) / float(c) for n, c in zip(names, cost, strict=True)}


@register_criterion("fisher")
class FisherCriterion(Criterion):
    """Fisher potential criterion (see the module docstring for its conventions).

    Args:
        samples: Number of data samples used; ``None`` for all the data given.
        micro_batch: Samples per forward/backward pass.
        loss: Per-sample (or summed) loss; cross-entropy summed over samples by default.
    """

    def __init__(
        self, *, samples: int | None = 128, micro_batch: int = 16, loss: LossFn | None = None
    ) -> None:
        self.samples = samples
        self.micro_batch = micro_batch
        self.loss = loss

    def options(self) -> dict[str, Any]:
        return {"samples": self.samples, "micro_batch": self.micro_batch}

    def score(self, model: nn.Module, data: Batches | None = None) -> Scores:
        return fisher_potential(
            model, data, samples=self.samples, micro_batch=self.micro_batch, loss=self.loss
        )
