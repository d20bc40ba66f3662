"""Modules apply_plan puts on the backward path so that autograd keeps only what a device would.

- :class:`FrozenBatchNorm` replaces a batch norm frozen by the plan. It computes
  ``y = x·scale + shift`` from the running statistics and the affine parameters, with a custom
  backward that **saves nothing** for the backward pass: ``grad_x = g·scale``, and ``scale`` is a
  (non-persistent) buffer, not an activation. When the plan updates the bias of the layer the batch
  norm follows (the batch norm's ``bias`` is that conv's bias in a plan), ``grad_beta = Σ g`` over
  every dim but the channels; the batch norm's ``weight`` (gamma) and its running statistics never
  change. ``state_dict`` keys are those of the batch norm.
- :class:`MaskedActivation` replaces ``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh`` and the MCU models'
  ``Clamp``: the same forward (in place or not, as the original), but the backward keeps only a
  **bool mask** of the positions where the gradient passes, one byte per element (a device packs it
  to one bit; PyTorch has no 1-bit dtype). Stock PyTorch keeps a float tensor instead: ReLU and
  in-place ReLU6 their output, Hardtanh, ReLU6 and ``torch.clamp`` their input. The mask is the
  one stock autograd uses (torch 2.14): strictly inside the bounds, ``x > 0`` for ReLU and
  ``lo < x < hi`` for Hardtanh/ReLU6/``clamp``. Where no gradient is needed (no grad mode, or an
  input that does not require grad) both modules run the plain op and save nothing.

After a gradient-filtered conv, :func:`~budgetsearch.trainer.apply_plan` fuses both into the conv
(:mod:`budgetsearch.ops.epilogue`): they then pass the conv's output through, since it already
includes them, refuse any other input, and run as above while the epilogue is suspended.

Both run as custom ops with their own backward (:mod:`budgetsearch.ops._library`),
``torch.ops.budgetsearch.frozen_batch_norm`` and ``torch.ops.budgetsearch.masked_clamp``, so that
``torch.export`` keeps their backward and ``torch.compile`` traces them without a graph break. An
in-place activation stays in place in eager mode through a ``torch.autograd.Function`` (a custom
op cannot both write into its input and have a backward); under ``torch.compile`` and
``torch.export``, which functionalise in-place writes anyway, it runs the out-of-place op.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PlanError
from ..models.mcu import Clamp
from ..ops._library import define
from ..ops.epilogue import clamp_mask, masked

__all__ = ["FrozenBatchNorm", "MaskedActivation", "masked_activation_for"]


def _frozen_bn_impl(x: Tensor, scale: Tensor, shift: Tensor, beta: Tensor | None) -> Tensor:
    view = (1, -1) + (1,) * (x.dim() - 2)
    offset = shift if beta is None else shift + beta
    return torch.addcmul(offset.view(view), x, scale.view(view))


def _frozen_bn_setup(ctx, inputs: tuple, output: Tensor) -> None:
    """Saves only ``scale``, a buffer (and only if the input gradient is needed)."""
    x, scale = inputs[:2]
    ctx.view = (1, -1) + (1,) * (x.dim() - 2)
    ctx.save_for_backward(scale if ctx.needs_input_grad[0] else None)


def _frozen_bn_backward(ctx, g: Tensor) -> tuple[Tensor | None, None, None, Tensor | None]:
    (scale,) = ctx.saved_tensors
    gx = g * scale.view(ctx.view) if ctx.needs_input_grad[0] else None
    gbeta = None
    if ctx.needs_input_grad[3]:
        dims = [d for d in range(g.dim()) if d != 1]
        gbeta = g.sum(dims)
    return gx, None, None, gbeta


#: ``torch.ops.budgetsearch.frozen_batch_norm``: y = x·scale + shift (+ beta).
_frozen_bn_op = define(
    "frozen_batch_norm",
    "(Tensor x, Tensor scale, Tensor shift, Tensor? beta) -> Tensor",
    _frozen_bn_impl,
    setup_context=_frozen_bn_setup,
    backward=_frozen_bn_backward,
)


class FrozenBatchNorm(nn.Module):
    """A batch norm frozen on its running statistics, whose backward saves nothing.

    Built from an ``nn.BatchNorm1d/2d/3d`` with :meth:`from_bn`; it shares the batch norm's tensors
    (a trained ``bias`` is the batch norm's own parameter object, so an optimizer updates the
    original), so :meth:`~budgetsearch.trainer.PlanHandle.remove` only has to put the original
    module back. ``scale = weight / sqrt(running_var + eps)`` and ``shift = -running_mean·scale``
    (+ the frozen bias) are non-persistent buffers, recomputed when a state dict is loaded.

    Args:
        bn: The batch norm to freeze.
        bias_grad: Whether its bias (beta) is trained.

    Raises:
        PlanError: If the batch norm keeps no running statistics, or ``bias_grad`` is asked of an
            affine-free batch norm.
    """

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor
    running_var: Tensor
    scale: Tensor
    shift: Tensor

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, *, bias_grad: bool = False) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise PlanError(
                f"{type(bn).__name__} has no running statistics (track_running_stats=False), so "
                "it cannot be frozen; use bn='train'"
            )
        if bias_grad and bn.bias is None:
            raise PlanError("bias_grad=True but the batch norm has no bias (affine=False)")
        self.num_features, self.eps = bn.num_features, float(bn.eps)
        self.bias_grad = bias_grad
        self.register_buffer("weight", None if bn.weight is None else bn.weight.detach())
        if bn.bias is not None and bias_grad:
            bn.bias.requires_grad_(True)
            self.bias = bn.bias
        else:
            self.register_buffer("bias", None if bn.bias is None else bn.bias.detach())
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.register_buffer("scale", torch.empty(0), persistent=False)
        self.register_buffer("shift", torch.empty(0), persistent=False)
        self.fused_into: str | None = None  # see PlannedConv2d.fuse_epilogue
        self.fused_conv: tuple[Any, ...] = ()
        self.refresh()

    @classmethod
    def from_bn(
        cls, bn: nn.modules.batchnorm._BatchNorm, *, bias_grad: bool = False
    ) -> FrozenBatchNorm:
        """Freeze a batch norm; see the class."""
        return cls(bn, bias_grad=bias_grad)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute ``scale`` and ``shift`` from the running statistics and affine parameters."""
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None and not self.bias_grad:
            shift = shift + self.bias
        self.scale, self.shift = scale, shift

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.refresh()

    def forward(self, x: Tensor) -> Tensor:
        """The frozen batch norm (the input itself when fused into the conv before it)."""
        if already_applied(self, x):
            return x
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"FrozenBatchNorm: expected {self.num_features} channels in dim 1, got shape "
                f"{tuple(x.shape)}"
            )
        beta = self.bias if self.bias_grad else None
        if not torch.is_grad_enabled() or not (x.requires_grad or self.bias_grad):
            view = (1, -1) + (1,) * (x.dim() - 2)
            offset = self.shift if beta is None else self.shift + beta.detach()
            return torch.addcmul(offset.view(view), x, self.scale.view(view))
        return _frozen_bn_op(x, self.scale, self.shift, beta)

    def extra_repr(self) -> str:
        fused = "" if self.fused_into is None else f", fused_into={self.fused_into!r}"
        return f"{self.num_features}, eps={self.eps}, bias_grad={self.bias_grad}{fused}"


class _MaskedClampFn(torch.autograd.Function):
    """clamp_(x, lo, hi) in place, whose backward keeps only a bool mask (eager mode; a custom op
    cannot both write into its input and have a backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: float | None, hi: float | None, inclusive: bool) -> Tensor:
        mask = clamp_mask(x, lo, hi, inclusive=inclusive)
        ctx.mark_dirty(x)
        y = x.clamp_(lo, hi)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None, None]:
        (mask,) = ctx.saved_tensors
        return masked(g, mask), None, None, None


def _masked_clamp_impl(x: Tensor, lo: float | None, hi: float | None, inclusive: bool) -> Tensor:
    return x.clamp(lo, hi)


def _masked_clamp_setup(ctx, inputs: tuple, output: Tensor) -> None:
    """Saves only the bool mask of where the gradient passes."""
    x, lo, hi, inclusive = inputs
    ctx.save_for_backward(clamp_mask(x, lo, hi, inclusive=inclusive))


def _masked_clamp_backward(ctx, g: Tensor) -> tuple[Tensor, None, None, None]:
    (mask,) = ctx.saved_tensors
    return masked(g, mask), None, None, None


#: ``torch.ops.budgetsearch.masked_clamp``: clamp(x, lo, hi), keeping a bool mask for backward.
_masked_clamp_op = define(
    "masked_clamp",
    "(Tensor x, float? lo, float? hi, bool inclusive) -> Tensor",
    _masked_clamp_impl,
    setup_context=_masked_clamp_setup,
    backward=_masked_clamp_backward,
)


def already_applied(module: nn.Module, x: Tensor) -> bool:
    """Whether ``module`` must pass ``x`` through: ``x`` is the output of the conv that ran
    ``module`` as its epilogue (see :meth:`~budgetsearch.ops.PlannedConv2d.fuse_epilogue`).

    False for a module that is not fused, or whose conv's epilogue is suspended (then it runs on
    its own). Any other input to a fused module is a :class:`PlanError`: running the module again
    or skipping it would both be silently wrong.
    """
    if module.fused_into is None:
        return False
    if any(m is module for m in getattr(x, "budgetsearch_fused", ())):
        return True
    if module.fused_conv[0].suspended:
        return False
    raise PlanError(
        f"{type(module).__name__} runs inside the conv {module.fused_into!r} (fused by "
        "apply_plan) but got a tensor that conv did not return: a forward hook on the conv that "
        "returns a new tensor, nn.DataParallel replicas, or a forward that calls the module "
        "elsewhere; apply the plan with fuse=False"
    )


class MaskedActivation(nn.Module):
    """A clamp-like activation (ReLU, ReLU6, Hardtanh, Clamp) whose backward keeps a bool mask.

    Args:
        lo: Lower bound (None: none).
        hi: Upper bound (None: none).
        inclusive: Whether the gradient also passes at the bounds; stock autograd passes it only
            strictly inside them (ReLU, Hardtanh, ``torch.clamp``), so replacements use False.
        inplace: Modify the input in place, as the original did.
        kind: Name of the replaced module type, for ``repr``.
    """

    def __init__(
        self,
        *,
        lo: float | None,
        hi: float | None,
        inclusive: bool,
        inplace: bool = False,
        kind: str = "clamp",
    ) -> None:
        super().__init__()
        if lo is not None and hi is not None and not lo < hi:
            raise PlanError(f"MaskedActivation needs lo < hi, got lo={lo}, hi={hi}")
        self.lo, self.hi, self.inclusive = lo, hi, inclusive
        self.inplace, self.kind = inplace, kind
        self.fused_into: str | None = None  # see PlannedConv2d.fuse_epilogue
        self.fused_conv: tuple[Any, ...] = ()

    def forward(self, x: Tensor) -> Tensor:
        """The activation; with a gradient to pass, the backward keeps only a bool mask. When
        fused into the conv before it, the input itself."""
        if already_applied(self, x):
            return x
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x.clamp_(self.lo, self.hi) if self.inplace else x.clamp(self.lo, self.hi)
        lo = None if self.lo is None else float(self.lo)
        hi = None if self.hi is None else float(self.hi)
        if self.inplace and not torch.compiler.is_compiling():
            return _MaskedClampFn.apply(x, lo, hi, self.inclusive)
        # the custom op (out of place: under torch.compile and torch.export, where in-place
        # writes are functionalised anyway)
        return _masked_clamp_op(x, lo, hi, self.inclusive)

    def extra_repr(self) -> str:
        fused = "" if self.fused_into is None else f", fused_into={self.fused_into!r}"
        return (f"kind={self.kind}, lo={self.lo}, hi={self.hi}, inclusive={self.inclusive}, "
                f"inplace={self.inplace}{fused}")


def masked_activation_for(module: nn.Module) -> MaskedActivation | None:
    """The mask-saving replacement of a ReLU / ReLU6 / Hardtanh / Clamp module, else None."""
    if type(module) is nn.ReLU:
        return MaskedActivation(lo=0.0, hi=None, inclusive=False, inplace=module.inplace,
                                kind="ReLU")
    if type(module) in (nn.ReLU6, nn.Hardtanh):
        lo, hi = float(module.min_val), float(module.max_val)
        return MaskedActivation(lo=_finite(lo), hi=_finite(hi), inclusive=False,
                                inplace=module.inplace, kind=type(module).__name__)
    if type(module) is Clamp:
        return MaskedActivation(lo=module.lo, hi=module.hi, inclusive=False, inplace=False,
                                kind="Clamp")
    return None


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None
