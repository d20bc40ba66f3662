"""Drop-in modules that train a layer as a plan says: sparse channels, frozen parts, filtering.

:class:`PlannedConv2d` and :class:`PlannedLinear` replace an ``nn.Conv2d`` / ``nn.Linear`` under the
same qualified name (see :func:`replace_module`) and keep its ``state_dict`` keys (``weight``,
``bias``), so checkpoints load both ways. How the weight is held:

- trained densely: ``weight`` is the original ``nn.Parameter``;
- frozen: ``weight`` is a buffer (no gradient buffer, not seen by optimisers);
- channel-sparse: ``weight`` is a frozen buffer and the trained part is the small parameter
  ``weight_slice`` (layout: :class:`~budgetsearch.ops.sparse.ChannelSelection`); the forward
  combines them without keeping a full copy for the backward. The buffer keeps the *initial*
  values of the slice's entries; :meth:`merged_weight`, ``state_dict()`` and ``to_conv()`` /
  ``to_linear()`` give the current weight.

The bias is a parameter if trained, else a buffer. A conv with ``patch_size`` >= 2 uses the
gradient-filtered backward (on the chosen channels only, when the update is sparse); with
``patch_size`` 1 it is an ordinary conv with a sparse or frozen weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PlanError
from .epilogue import Epilogue
from .filtered import MODES, filtered_conv2d
from .sparse import ChannelSelection, _pair, conv_args, sparse_conv2d, sparse_linear

__all__ = ["PlannedConv2d", "PlannedLinear", "replace_module", "suspended_epilogues"]


class _Planned(nn.Module):
    """Parameter bookkeeping shared by the planned layers."""

    weight: Tensor
    bias: Tensor | None
    weight_slice: nn.Parameter | None

    def _setup(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        *,
        groups: int,
        out_channels: Sequence[int] | Tensor | None,
        in_channels: Sequence[int] | Tensor | None,
        weight_grad: bool,
        bias_grad: bool,
    ) -> None:
        if (out_channels is not None or in_channels is not None) and not weight_grad:
            raise PlanError("a channel selection needs weight_grad=True")
        if bias_grad and bias is None:
            raise PlanError("bias_grad=True but the layer has no bias")
        c_out, cpg = weight.shape[:2]

        def canonical(idx: Sequence[int] | Tensor | None, n: int) -> list[int] | None:
            if idx is None:
                return None
            items = idx.tolist() if isinstance(idx, Tensor) else list(idx)
            return None if sorted(items) == list(range(n)) else sorted(items)

        outs = canonical(out_channels, c_out)
        ins = canonical(in_channels, cpg * groups)
        self.selection = ChannelSelection(
            weight.shape, groups=groups, out_channels=outs, in_channels=ins
        )
        self.trained_out_channels, self.trained_in_channels = outs, ins
        self.weight_grad, self.bias_grad = weight_grad, bias_grad
        if weight_grad and self.selection.kind == "all":
            weight.requires_grad_(True)
            self.weight = weight
            self.weight_slice = None
        else:
            self.register_buffer("weight", weight.detach())
            self.weight_slice = None
            if weight_grad:
                self.weight_slice = nn.Parameter(self.selection.gather(weight.detach()))
        if bias is None:
            self.bias = None
        elif bias_grad:
            bias.requires_grad_(True)
            self.bias = bias
        else:
            self.register_buffer("bias", bias.detach())

    def merged_weight(self) -> Tensor:
        """The current full weight (a detached tensor; a new one for a sparse layer)."""
        if self.weight_slice is None:
            return self.weight.detach()
        return self.selection.combine(self.weight.detach(), self.weight_slice.detach())

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Same keys, in the same order, as the plain layer: weight (merged), then bias.
        weight = destination.pop(prefix + "weight")
        bias = destination.pop(prefix + "bias", None)
        if destination.pop(prefix + "weight_slice", None) is not None:
            weight = self.merged_weight()
        destination[prefix + "weight"] = weight
        if bias is not None:
            destination[prefix + "bias"] = bias

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        if self.weight_slice is not None and prefix + "weight" in state_dict:
            full = state_dict[prefix + "weight"]
            state_dict[prefix + "weight_slice"] = self.selection.gather(full)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _plan_repr(self) -> str:
        parts = [f"weight_grad={self.weight_grad}", f"bias_grad={self.bias_grad}"]
        if self.trained_out_channels is not None:
            parts.append(f"trained_out_channels={len(self.trained_out_channels)}")
        if self.trained_in_channels is not None:
            parts.append(f"trained_in_channels={len(self.trained_in_channels)}")
        return ", ".join(parts)


class PlannedConv2d(_Planned):
    """An ``nn.Conv2d`` trained as planned: sparse channels, frozen parts, gradient filtering.

    Args:
        conv: The conv to take over; its parameters are reused (a frozen weight becomes a buffer
            sharing its storage).
        out_channels: Train only these output channels' weights.
        in_channels: Train only the weight columns of these input channels.
        weight_grad: Whether the weight is trained at all.
        bias_grad: Whether the bias is trained.
        patch_size: r for the gradient filter; 1 means no filtering.
        mode: Filter variant, ``"normalized"``, ``"paper"`` or ``"corrected"``
            (:mod:`budgetsearch.ops.filtered`).

    Raises:
        PlanError: If the conv or the plan cannot be used (non-zero ``padding_mode``, strided or
            asymmetric ``"same"`` padding, bad selection or patch size, trained bias missing).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        *,
        out_channels: Sequence[int] | Tensor | None = None,
        in_channels: Sequence[int] | Tensor | None = None,
        weight_grad: bool = True,
        bias_grad: bool = True,
        patch_size: int | tuple[int, int] = 1,
        mode: str = "normalized",
    ) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise PlanError(f"padding_mode {conv.padding_mode!r} is not supported, only 'zeros'")
        if mode not in MODES:
            raise PlanError(f"mode must be one of {MODES}, got {mode!r}")
        patch = _pair(patch_size, "patch_size")
        if min(patch) < 1:
            raise PlanError(f"patch_size must be >= 1, got {patch_size!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.groups = tuple(conv.kernel_size), conv.groups
        self.stride, self.dilation = tuple(conv.stride), tuple(conv.dilation)
        self.padding_spec = conv.padding
        self.padding = conv_args(
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=conv.padding,
            dilation=self.dilation,
            groups=self.groups,
        ).padding
        self.padding_mode = "zeros"
        self.patch_size = None if patch == (1, 1) else patch
        self.mode = mode
        self._matrix_product = (self.kernel_size == (1, 1) and self.groups == 1
                                and self.padding == (0, 0))
        # the batch norm and activation fused as an epilogue (fuse_epilogue), held in a tuple
        # so that nn.Module does not register them as submodules
        self._parts: tuple[Any, Any] = (None, None)
        self.suspended = False
        self._setup(
            conv.weight,
            conv.bias,
            groups=conv.groups,
            out_channels=out_channels,
            in_channels=in_channels,
            weight_grad=weight_grad,
            bias_grad=bias_grad,
        )

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        out_channels: Sequence[int] | Tensor | None = None,
        in_channels: Sequence[int] | Tensor | None = None,
        weight_grad: bool,
        bias_grad: bool,
        patch_size: int | tuple[int, int] = 1,
        mode: str = "normalized",
    ) -> PlannedConv2d:
        """Build from a conv; same arguments as the class, with explicit gradient choices."""
        return cls(
            conv,
            out_channels=out_channels,
            in_channels=in_channels,
            weight_grad=weight_grad,
            bias_grad=bias_grad,
            patch_size=patch_size,
            mode=mode,
        )

    def forward(self, x: Tensor) -> Tensor:
        """The conv; the backward follows the plan.

        Raises:
            PlanError: For an input that is not a batch ``(N, C, H, W)`` (a stock conv also
                takes one unbatched image; a planned one does not).
        """
        if x.dim() != 4:
            raise PlanError(f"a planned conv takes a batch of images (N, C, H, W); got an input "
                            f"of shape {tuple(x.shape)} (add the batch dimension: "
                            "x.unsqueeze(0))")
        kw = {
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
            "weight_grad": self.weight_grad,
            "bias_grad": self.bias_grad,
            "selection": self.selection,
        }
        if self.patch_size is not None:
            epilogue, beta = self._epilogue() if not self.suspended else (None, None)
            y = filtered_conv2d(
                x,
                self.weight,
                self.bias,
                self.weight_slice,
                patch_size=self.patch_size,
                mode=self.mode,
                epilogue=epilogue,
                epilogue_bias=beta,
                **kw,
            )
            if epilogue is not None:
                y.budgetsearch_fused = self.fused  # type: ignore[attr-defined]
            return y
        if self.weight_slice is None and self.weight_grad:
            if self._matrix_product and x.dim() == 4 and x.shape[-2:] == (1, 1):
                # a dense 1x1 conv on a 1x1 map (the MCU models' classifier) is a linear layer:
                # same values and saved tensors, and its backward is two matrix products, far
                # cheaper on the CPU than torch's convolution_backward for this shape
                y = F.linear(x.flatten(1), self.weight.flatten(1), self.bias)
                return y[:, :, None, None]
            return F.conv2d(
                x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
        return sparse_conv2d(x, self.weight, self.bias, self.weight_slice, **kw)

    def fuse_epilogue(self, *, norm: nn.Module | None = None,
                      activation: nn.Module | None = None, name: str = "conv") -> None:
        """Run the frozen batch norm and/or clamp activation that follow this conv inside its
        filtered autograd node (:mod:`budgetsearch.ops.epilogue`), so that their backward costs
        no pass of its own over the output gradient.

        The modules stay in the model (and in its ``state_dict``): this conv's output carries
        them in ``budgetsearch_fused``, and they pass such a tensor through (it already includes
        them); each gets ``fused_into`` (``name``) and ``fused_conv`` (a 1-tuple holding this
        conv) to tell other inputs apart. Forward hooks on this conv see its output after the
        epilogue, except under :func:`suspended_epilogues`.

        Args:
            norm: A frozen batch norm, with ``scale`` and ``shift`` buffers (read at every call),
                a ``bias`` and ``bias_grad`` (whether that bias is trained)
                (:class:`~budgetsearch.trainer.layers.FrozenBatchNorm`).
            activation: A clamp with ``lo``, ``hi`` and strict bounds (``inclusive`` False)
                (:class:`~budgetsearch.trainer.layers.MaskedActivation`).
            name: This conv's qualified name, for messages.

        Raises:
            PlanError: If the conv is not gradient-filtered, already has an epilogue, or a module
                does not fit.
        """
        if self.patch_size is None:
            raise PlanError("only a gradient-filtered conv (patch_size >= 2) fuses an epilogue")
        if self.fused:
            raise PlanError("this conv already has an epilogue")
        if norm is not None and getattr(norm, "num_features", None) != self.out_channels:
            raise PlanError(f"the batch norm has {getattr(norm, 'num_features', '?')} channels, "
                            f"the conv {self.out_channels}")
        if activation is not None and getattr(activation, "inclusive", True):
            raise PlanError("the activation must pass the gradient strictly inside its bounds")
        self._parts = (norm, activation)
        for m in self.fused:
            m.fused_into, m.fused_conv = name, (self,)

    @property
    def fused(self) -> tuple[nn.Module, ...]:
        """The modules fused as this conv's epilogue (batch norm, then activation), or ()."""
        return tuple(m for m in self._parts if m is not None)

    def _epilogue(self) -> tuple[Epilogue | None, Tensor | None]:
        norm, act = self._parts
        if norm is None and act is None:
            return None, None
        epilogue = Epilogue(
            scale=None if norm is None else norm.scale,
            shift=None if norm is None else norm.shift,
            lo=None if act is None else act.lo,
            hi=None if act is None else act.hi,
            clamp=act is not None,
        )
        return epilogue, norm.bias if norm is not None and norm.bias_grad else None

    def to_conv(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding copies of the current (merged) weight and bias."""
        w = self.weight
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding_spec,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.merged_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            + self._plan_repr()
        )
        if self.patch_size is not None:
            text += f", patch_size={self.patch_size}, mode={self.mode!r}"
        if self.fused:
            text += f", epilogue=({', '.join(type(m).__name__ for m in self.fused)})"
        return text


class PlannedLinear(_Planned):
    """An ``nn.Linear`` trained as planned: sparse features or frozen parts (no filtering).

    Args:
        linear: The layer to take over; its parameters are reused.
        out_channels: Train only these output features' rows.
        in_channels: Train only the columns of these input features.
        weight_grad: Whether the weight is trained at all.
        bias_grad: Whether the bias is trained.

    Raises:
        PlanError: If the plan cannot be used.
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        out_channels: Sequence[int] | Tensor | None = None,
        in_channels: Sequence[int] | Tensor | None = None,
        weight_grad: bool = True,
        bias_grad: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(
            linear.weight,
            linear.bias,
            groups=1,
            out_channels=out_channels,
            in_channels=in_channels,
            weight_grad=weight_grad,
            bias_grad=bias_grad,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        out_channels: Sequence[int] | Tensor | None = None,
        in_channels: Sequence[int] | Tensor | None = None,
        weight_grad: bool,
        bias_grad: bool,
    ) -> PlannedLinear:
        """Build from a linear layer, with explicit gradient choices."""
        return cls(
            linear,
            out_channels=out_channels,
            in_channels=in_channels,
            weight_grad=weight_grad,
            bias_grad=bias_grad,
        )

    def forward(self, x: Tensor) -> Tensor:
        """The linear map; the backward follows the plan."""
        if self.weight_slice is None and self.weight_grad:
            return F.linear(x, self.weight, self.bias)
        return sparse_linear(
            x,
            self.weight,
            self.bias,
            self.weight_slice,
            weight_grad=self.weight_grad,
            bias_grad=self.bias_grad,
            selection=self.selection,
        )

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding copies of the current (merged) weight and bias."""
        w = self.weight
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, " + self._plan_repr()


@contextlib.contextmanager
def suspended_epilogues(model: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`PlannedConv2d` in ``model`` returns its plain conv output
    and the modules fused into it run on their own: the same model outputs, with each layer's
    own output visible to forward hooks (what a layer-output criterion such as NEq reads)."""
    convs = [m for m in model.modules() if isinstance(m, PlannedConv2d) and not m.suspended]
    try:
        for m in convs:
            m.suspended = True
        yield
    finally:
        for m in convs:
            m.suspended = False


def replace_module(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the qualified ``name`` inside ``root`` and return what was there.

    Args:
        root: The model.
        name: Dotted path, e.g. ``"features.3.conv.0.0"``.
        module: The replacement.

    Returns:
        The replaced module.

    Raises:
        PlanError: If nothing lives at ``name``.
    """
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
        old = parent.get_submodule(child)
    except AttributeError as exc:
        raise PlanError(f"the model has no layer named {name!r}") from exc
    setattr(parent, child, module)
    return old
