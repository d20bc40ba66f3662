"""What a gradient-filtered conv can run on its output inside its own autograd function.

A filtered conv's backward needs only the block sums of its output gradient (and their total for
the bias). When a frozen batch norm and a clamp-like activation follow the conv, run as separate
autograd nodes they turn the incoming gradient into full N x C x H x W tensors three times (the
mask product, the scale product, the batch norm's bias sum) before the conv sums it over blocks.
Fused into the conv as an *epilogue*, ``y = clamp(conv(x)·scale + shift + beta, lo, hi)``, the same
gradients take one masked product and one block sum. When the incoming gradient is constant over
each map (a stride-0 tensor, which is what the input gradient of a whole-map filtered conv
downstream is) and the conv's own grid is the whole map too, no pass over float maps is left:
the block sums are the mask's counts times that constant.

What the epilogue saves for backward is what the modules it replaces save: nothing for the affine
(``scale`` is a buffer), a bool mask for the clamp (one byte per element, as
:class:`~budgetsearch.trainer.layers.MaskedActivation`). The mask is the one stock autograd uses:
strictly inside the bounds. The filtered conv op computes it from its clamped output (in its
``setup_context``): a value strictly inside the bounds is left as it is and one outside becomes a
bound, so the clamp's output is strictly inside exactly where its input was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PlanError
from ._library import is_eager

__all__ = ["Epilogue", "clamp_mask", "run_epilogue"]


@dataclass(frozen=True)
class Epilogue:
    """A per-channel affine and/or a clamp, run on a filtered conv's output.

    Attributes:
        scale: Per-output-channel factor (C_out,), or None for no affine; not trained.
        shift: Per-output-channel offset (C_out,) added after the scale (with ``scale``).
        lo: Lower clamp bound, or None.
        hi: Upper clamp bound, or None.
        clamp: Whether a clamp runs at all (``lo``/``hi`` may both be None only if False).
    """

    scale: Tensor | None = None
    shift: Tensor | None = None
    lo: float | None = None
    hi: float | None = None
    clamp: bool = False

    def __post_init__(self) -> None:
        if (self.scale is None) != (self.shift is None):
            raise PlanError("an epilogue needs both scale and shift, or neither")
        for name in ("scale", "shift"):
            t = getattr(self, name)
            if t is not None and (t.dim() != 1 or t.requires_grad):
                raise PlanError(f"epilogue {name} must be a 1-D tensor that does not require "
                                f"grad (a buffer), got shape {tuple(t.shape)}, requires_grad="
                                f"{t.requires_grad}")
        if self.clamp and self.lo is None and self.hi is None:
            raise PlanError("an epilogue clamp needs lo or hi")
        if self.lo is not None and self.hi is not None and not self.lo < self.hi:
            raise PlanError(f"an epilogue clamp needs lo < hi, got lo={self.lo}, hi={self.hi}")

    def check(self, channels: int) -> None:
        """Raise :class:`PlanError` unless the affine has ``channels`` entries."""
        if self.scale is not None and (self.scale.numel() != channels
                                       or self.shift.numel() != channels):  # type: ignore[union-attr]
            raise PlanError(f"epilogue scale/shift have {self.scale.numel()} channels, the conv "
                            f"has {channels} output channels")

    def forward(self, y: Tensor, beta: Tensor | None, *, mask: bool = True
                ) -> tuple[Tensor, Tensor | None]:
        """(output, clamp mask or None) for the conv output ``y`` (written in place by the clamp);
        ``mask=False`` skips the mask (no backward to come)."""
        y = run_epilogue(y, self.scale, self.shift, beta, None, None, clamp=False)
        if not self.clamp:
            return y, None
        kept = clamp_mask(y, self.lo, self.hi, inclusive=False) if mask else None
        return y.clamp_(self.lo, self.hi), kept


def run_epilogue(y: Tensor, scale: Tensor | None, shift: Tensor | None, beta: Tensor | None,
                 lo: float | None, hi: float | None, *, clamp: bool) -> Tensor:
    """``clamp(y·scale + shift + beta, lo, hi)``, each part only if given (the clamp only if
    ``clamp``); the clamp writes in place into the affine's result, or into ``y`` without one.

    Args:
        y: The conv output (N, C, H, W).
        scale: Per-channel factor, or None (then ``shift`` is None too).
        shift: Per-channel offset added with the scale.
        beta: Per-channel offset added last, or None.
        lo: Lower clamp bound, or None.
        hi: Upper clamp bound, or None.
        clamp: Whether to clamp.

    Returns:
        The epilogue's output.
    """
    if scale is not None:
        view = (1, -1, 1, 1)
        offset = shift if beta is None else shift + beta  # type: ignore[operator]
        y = torch.addcmul(offset.view(view), y, scale.view(view))  # type: ignore[union-attr]
    elif beta is not None:
        y = y + beta.view(1, -1, 1, 1)
    if not clamp:
        return y
    return y.clamp_(lo, hi) if is_eager(y) else y.clamp(lo, hi)  # a trace keeps no in-place op


def clamp_mask(x: Tensor, lo: float | None, hi: float | None, *, inclusive: bool) -> Tensor:
    """Where ``clamp(x, lo, hi)`` passes the gradient: inside the bounds (strictly unless
    ``inclusive``); all True without bounds."""
    above, below = (torch.ge, torch.le) if inclusive else (torch.gt, torch.lt)
    if lo is not None and hi is not None:
        inside = above(x, lo)
        # in place in eager mode; out of place while tracing (see filtered._block_sums)
        return (inside.logical_and_ if is_eager(x) else inside.logical_and)(below(x, hi))
    if lo is not None:
        return above(x, lo)
    if hi is not None:
        return below(x, hi)
    return torch.ones_like(x, dtype=torch.bool)


def masked(g: Tensor, mask: Tensor) -> Tensor:
    """g where the mask is set, else 0, as a new tensor: the mask as 0/1 in g's dtype (a uint8
    view converts faster than bool), times g in place; on the CPU this beats ``g * mask`` and
    ``g.masked_fill(~mask, 0)`` (the backward times of ``benchmarks/training_step.py``)."""
    if not is_eager(g):  # the same product; a trace for ExecuTorch has no dtype view kernel
        return mask.to(g.dtype) * g
    return mask.view(torch.uint8).to(g.dtype).mul_(g)


def map_sums(t: Tensor) -> Tensor:
    """(N, C, 1, 1): ``t`` (N, C, H, W) summed over each H x W map, for a contiguous ``t`` as a
    matrix-vector product with ones (cheaper on the CPU than ``sum`` over the last two dims for
    the small maps of filtered layers)."""
    n, c, h, w = t.shape
    if not t.is_contiguous():
        return t.sum((2, 3), keepdim=True)
    return torch.mv(t.view(n * c, h * w), t.new_ones(h * w)).view(n, c, 1, 1)


def mask_counts(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """How many positions of each map are set: (N, C, 1, 1) in ``dtype``, from a bool mask
    (N, C, H, W)."""
    return map_sums(mask.view(torch.uint8).to(dtype))


def constant_maps(g: Tensor) -> bool:
    """Whether ``g`` (N, C, H, W) is constant over each map because it is stored that way
    (stride 0 in H and W, e.g. an expanded per-map value)."""
    return g.dim() == 4 and g.stride(2) == 0 and g.stride(3) == 0
