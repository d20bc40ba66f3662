"""Channel-sparse weight updates for convolutions and linear layers.

Only chosen output channels (weight rows) or input channels (weight columns) are trained; the
backward computes the gradient of that part only, with PyTorch's gradient primitives on the sliced
tensors (never a dense gradient masked afterwards). Saved for the backward, beyond parameters and
buffers: rows mode, the input channels feeding the chosen rows (all of them unless grouped);
columns mode, only the chosen input channels; no weight gradient, nothing of the input (the input
gradient needs only the weight). The trained part may live in its own small tensor
(``weight_slice``) so the full weight is a frozen buffer with no gradient buffer.

Both layers are custom ops, ``torch.ops.budgetsearch.sparse_conv2d`` and
``torch.ops.budgetsearch.sparse_linear`` (:mod:`budgetsearch.ops._library`): the selection
travels as the int lists ``out_channels`` / ``in_channels`` (at most one non-empty, both empty
for all channels), the conv arguments as int lists.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PlanError
from ._library import define, is_eager

__all__ = [
    "ChannelSelection",
    "ConvArgs",
    "conv2d_input_grad",
    "conv_args",
    "sparse_conv2d",
    "sparse_linear",
]

IntPair = int | tuple[int, int]
# A weight-gradient primitive: (x part, g part, groups, rows) -> gradient (rows, cols, ...).
WeightGradFn = Callable[[Tensor, Tensor, int, int], Tensor]


def _pair(value: IntPair, what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise PlanError(f"{what} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvArgs:
    """Normalised hyper-parameters of a 2-D convolution (all pairs are (height, width))."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def conv_args(
    *,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> ConvArgs:
    """Validate and normalise convolution hyper-parameters.

    Args:
        kernel_size: Kernel height and width.
        stride: Stride.
        padding: Zero padding per side, or ``"valid"`` / ``"same"`` as in ``F.conv2d``.
        dilation: Dilation.
        groups: Number of groups.

    Returns:
        The normalised arguments.

    Raises:
        PlanError: If a value is out of range, or ``"same"`` padding would be asymmetric or strided
            (the gradient primitives take one padding per side).
    """
    k, s = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    d = _pair(dilation, "dilation")
    if min(*k, *s, *d) < 1 or not isinstance(groups, int) or groups < 1:
        raise PlanError(
            f"kernel_size, stride, dilation and groups must be >= 1, got kernel_size={k}, "
            f"stride={s}, dilation={d}, groups={groups}"
        )
    if padding == "valid":
        p = (0, 0)
    elif padding == "same":
        total = [di * (ki - 1) for di, ki in zip(d, k, strict=True)]
        if s != (1, 1) or any(t % 2 for t in total):
            raise PlanError(
                f"padding='same' needs stride 1 and an even dilation*(kernel-1), got stride={s}, "
                f"kernel_size={k}, dilation={d}; give the padding as numbers instead"
            )
        p = (total[0] // 2, total[1] // 2)
    else:
        p = _pair(padding, "padding")  # type: ignore[arg-type]
        if min(p) < 0:
            raise PlanError(f"padding must be >= 0, got {p}")
    return ConvArgs(stride=s, padding=p, dilation=d, groups=groups)


def _index_list(values: Sequence[int] | Tensor, size: int, what: str) -> list[int]:
    raw = values.tolist() if isinstance(values, Tensor) else list(values)
    if not raw:
        raise PlanError(f"{what} is empty; freeze the weight instead (weight_grad=False)")
    not_int = [i for i in raw if isinstance(i, bool) or not hasattr(type(i), "__index__")]
    if not_int:  # NumPy integers are integers; bools and floats are not channels
        raise PlanError(f"{what} must hold integer channel indices; got {not_int}")
    items = [operator.index(i) for i in raw]
    if len(set(items)) != len(items):
        raise PlanError(f"{what} has repeated channels: {items}")
    bad = [i for i in items if not 0 <= i < size]
    if bad:
        raise PlanError(f"{what} has channels outside 0..{size - 1}: {bad}")
    return items


class _Index:
    """Channel positions: a list, and its index tensor made once per device.

    While tracing (fake or functional tensors) the tensor is made afresh, as a constant of the
    trace; a cached tensor is never a fake one.
    """

    __slots__ = ("_tensors", "values")

    def __init__(self, values: Sequence[int]) -> None:
        self.values = list(values)
        self._tensors: dict[torch.device, Tensor] = {}

    def __len__(self) -> int:
        return len(self.values)

    def on(self, like: Tensor) -> Tensor:
        """The index tensor on ``like``'s device."""
        if not is_eager(like):  # as_tensor: torch.tensor leaves a dead detach_ in a joint trace
            return torch.as_tensor(self.values, dtype=torch.long, device=like.device)
        t = self._tensors.get(like.device)
        if t is None:
            with torch.inference_mode(False):
                t = torch.tensor(self.values, dtype=torch.long, device=like.device)
            self._tensors[like.device] = t
        return t


@dataclass(frozen=True)
class _Bucket:
    """One grouped weight-gradient call covering equally shaped (rows x columns) blocks."""

    x_pos: _Index | None  # channels of the saved input, in call order (None: all, in order)
    g_rows: _Index | None  # channels of the output gradient, in call order (None: all)
    groups: int
    rows: int  # rows of the call's result
    place: _Index | None  # where the result goes in the slice (None: it is the whole gradient)


class ChannelSelection:
    """Which part of a weight is trained, and how to slice, combine and differentiate it.

    A weight of shape (C_out, C_in/G, ...) with G groups has m = C_out/G rows per group. The slice
    (the trainable part) has shape:

    - rows mode: (len(out_channels), C_in/G, ...), i.e. ``weight[out_channels]``;
    - columns mode: (m, len(in_channels), ...), where ``slice[:, j]`` is column ``c % (C_in/G)`` of
      the m rows of the group of input channel ``c = in_channels[j]``. For G = 1 this is
      ``weight[:, in_channels]``; for a depthwise conv, input channel c is its own output
      channel(s).

    Args:
        weight_shape: Shape of the full weight.
        groups: Number of groups of the layer.
        out_channels: Output channels whose rows are trained (in the slice's order).
        in_channels: Input channels whose columns are trained (in the slice's order).

    Raises:
        PlanError: If both selections are given, or a selection is empty, repeated or out of range.
    """

    def __init__(
        self,
        weight_shape: Sequence[int],
        *,
        groups: int = 1,
        out_channels: Sequence[int] | Tensor | None = None,
        in_channels: Sequence[int] | Tensor | None = None,
    ) -> None:
        c_out, cpg, *tail = (int(v) for v in weight_shape)
        if out_channels is not None and in_channels is not None:
            raise PlanError("give out_channels or in_channels, not both")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise PlanError(f"groups must be an integer >= 1; got {groups!r}")
        if c_out % groups:
            raise PlanError(f"{c_out} output channels do not split into {groups} groups")
        self.shape, self.tail, self.groups = (c_out, cpg, *tail), tuple(tail), groups
        self.cpg, self.m, self.c_in = cpg, c_out // groups, cpg * groups
        specs: list[tuple[list[int], list[int], int, list[int] | None]] = []
        if out_channels is not None:
            self.kind = "out"
            self.index = _index_list(out_channels, c_out, "out_channels")
            self.slice_shape = (len(self.index), cpg, *tail)
            rows_of: dict[int, list[tuple[int, int]]] = {}
            for pos, o in enumerate(self.index):
                rows_of.setdefault(o // self.m, []).append((pos, o))
            x_ch = [gr * cpg + c for gr in sorted(rows_of) for c in range(cpg)]
            where = {c: i for i, c in enumerate(x_ch)}
            for size in sorted({len(b) for b in rows_of.values()}):
                grs = [gr for gr in sorted(rows_of) if len(rows_of[gr]) == size]
                x_pos = [where[gr * cpg + c] for gr in grs for c in range(cpg)]
                g_rows = [o for gr in grs for _, o in rows_of[gr]]
                specs.append((x_pos, g_rows, len(grs), [p for gr in grs for p, _ in rows_of[gr]]))
        elif in_channels is not None:
            self.kind = "in"
            self.index = _index_list(in_channels, self.c_in, "in_channels")
            self.slice_shape = (self.m, len(self.index), *tail)
            cols_of: dict[int, list[int]] = {}
            for pos, c in enumerate(self.index):
                cols_of.setdefault(c // cpg, []).append(pos)
            x_ch = list(self.index)
            for size in sorted({len(b) for b in cols_of.values()}):
                grs = [gr for gr in sorted(cols_of) if len(cols_of[gr]) == size]
                pos = [p for gr in grs for p in cols_of[gr]]
                g_rows = [gr * self.m + i for gr in grs for i in range(self.m)]
                specs.append((pos, g_rows, len(grs), pos))
        else:
            self.kind, self.index, self.slice_shape = "all", [], self.shape
            x_ch = list(range(self.c_in))
            specs.append((x_ch, list(range(c_out)), groups, None))

        def as_index(v: list[int] | None, n: int) -> _Index | None:
            return None if v is None or v == list(range(n)) else _Index(v)

        self.buckets = [
            _Bucket(
                x_pos=as_index(x_pos, len(x_ch)),
                g_rows=as_index(g_rows, c_out),
                groups=n_groups,
                rows=len(g_rows),
                place=as_index(place, len(self.index)),
            )
            for x_pos, g_rows, n_groups, place in specs
        ]
        self.x_channels = None if x_ch == list(range(self.c_in)) else _Index(x_ch)
        self._t_index = _Index(self.index)
        self._t_group = _Index([c // cpg for c in self.index])
        self._t_col = _Index([c % cpg for c in self.index])

    def __repr__(self) -> str:
        return f"ChannelSelection(kind={self.kind!r}, index={self.index}, shape={self.shape})"

    @property
    def saved_channels(self) -> int:
        """Number of input channels the backward needs for the weight gradient."""
        return self.c_in if self.x_channels is None else len(self.x_channels)

    def saved_input(self, x: Tensor) -> Tensor:
        """The channels of ``x`` (dim 1) that the weight gradient needs; ``x`` itself if all."""
        if self.x_channels is None:
            return x
        return x.index_select(1, self.x_channels.on(x))

    def _view5(self, weight: Tensor) -> Tensor:
        return weight.view(self.groups, self.m, self.cpg, *self.tail)

    def gather(self, weight: Tensor) -> Tensor:
        """A copy of the trainable part of a full weight, in slice layout."""
        if self.kind == "all":
            return weight.clone()
        if self.kind == "out":
            return weight.index_select(0, self._t_index.on(weight))
        w5 = self._view5(weight)
        return w5[self._t_group.on(weight), :, self._t_col.on(weight)].transpose(0, 1)

    def combine(self, weight: Tensor, weight_slice: Tensor) -> Tensor:
        """A new full weight: ``weight`` with the trainable part replaced by ``weight_slice``."""
        if tuple(weight_slice.shape) != self.slice_shape:
            raise PlanError(
                f"weight slice has shape {tuple(weight_slice.shape)}, expected {self.slice_shape}"
            )
        if self.kind == "all":
            return weight_slice
        if self.kind == "out":
            return weight.index_copy(0, self._t_index.on(weight), weight_slice)
        if not is_eager(weight):  # the same values out of place (a trace keeps no in-place op)
            rows = torch.arange(self.m, device=weight.device)[None, :]
            cols5 = self._t_group.on(weight)[:, None], rows, self._t_col.on(weight)[:, None]
            return self._view5(weight).index_put(cols5, weight_slice.transpose(0, 1)).view(
                self.shape)
        full = weight.clone()
        cols = self._t_group.on(weight), slice(None), self._t_col.on(weight)
        self._view5(full)[cols] = weight_slice.transpose(0, 1)
        return full

    def scatter(self, slice_grad: Tensor) -> Tensor:
        """A full-shaped gradient that is zero outside the slice (only for a full-weight input)."""
        if self.kind == "all":
            return slice_grad
        return self.combine(slice_grad.new_zeros(self.shape), slice_grad)

    def weight_grad(self, x_saved: Tensor, g: Tensor, grad_fn: WeightGradFn) -> Tensor:
        """The slice's gradient from ``saved_input(x)`` and g: one ``grad_fn`` call per bucket."""
        out: Tensor | None = None
        for b in self.buckets:
            xb = x_saved if b.x_pos is None else x_saved.index_select(1, b.x_pos.on(x_saved))
            gb = g if b.g_rows is None else g.index_select(1, b.g_rows.on(g))
            res = grad_fn(xb, gb, b.groups, b.rows)
            if self.kind == "in":  # (groups*m, cols, ...) -> (m, groups*cols, ...)
                cols = res.shape[1]
                res = res.reshape(b.groups, self.m, cols, *self.tail).transpose(0, 1)
                res = res.reshape(self.m, b.groups * cols, *self.tail)
            if b.place is None:
                return res
            if out is None:
                out = res.new_empty(self.slice_shape)
            out.index_copy_(0 if self.kind == "out" else 1, b.place.on(out), res)
        assert out is not None
        return out


def conv2d_input_grad(x_shape: Sequence[int], weight: Tensor, g: Tensor, conv: ConvArgs) -> Tensor:
    """The gradient of a conv's input from its output gradient: the transposed convolution.

    The same values as ``torch.nn.grad.conv2d_input``, computed with ``F.conv_transpose2d``
    (``output_padding`` restores the rows and columns a strided conv drops): on the CPU, torch's
    input-only ``convolution_backward`` is 1.0-5.5x slower for the conv shapes of MobileNetV2 at
    128 px, batch 32, 1.5x over all its layers (``benchmarks/filtered_conv_backward.py
    --input-grad``).

    Args:
        x_shape: Shape of the conv input (N, C_in, H, W).
        weight: The weight used in the forward.
        g: Gradient of the conv output.
        conv: The conv's arguments.

    Returns:
        The input gradient, of shape ``x_shape``.
    """
    k = weight.shape[2:]
    extra = tuple(
        int(x_shape[2 + i])
        - ((g.shape[2 + i] - 1) * conv.stride[i] - 2 * conv.padding[i]
           + conv.dilation[i] * (k[i] - 1) + 1)
        for i in range(2)
    )
    return F.conv_transpose2d(g, weight, None, conv.stride, conv.padding, extra, conv.groups,
                              conv.dilation)


def selection_of(weight: Tensor, groups: int, out_channels: Sequence[int],
                 in_channels: Sequence[int]) -> ChannelSelection:
    """The :class:`ChannelSelection` an op's int lists describe (both empty: all channels), made
    once per weight shape and selection (the ops rebuild it from their arguments every call)."""
    shape = tuple(int(v) for v in weight.shape)
    return _cached_selection(shape, int(groups), tuple(int(c) for c in out_channels) or None,
                             tuple(int(c) for c in in_channels) or None)


@functools.lru_cache(maxsize=1024)
def _cached_selection(shape: tuple[int, ...], groups: int, out_channels: tuple[int, ...] | None,
                      in_channels: tuple[int, ...] | None) -> ChannelSelection:
    return ChannelSelection(shape, groups=groups, out_channels=out_channels,
                            in_channels=in_channels)


def selection_lists(sel: ChannelSelection) -> tuple[list[int], list[int]]:
    """``(out_channels, in_channels)`` of a selection as an op takes them."""
    return (sel.index if sel.kind == "out" else []), (sel.index if sel.kind == "in" else [])


def _wanted(ctx, *, weight_grad: bool, bias_grad: bool, has_slice: bool) -> None:
    """Record on ``ctx`` which of the weight (or slice) and bias gradients the backward computes
    (inputs 1, 2 and 3 of an op are the weight, bias and slice)."""
    need_w, need_b, need_s = ctx.needs_input_grad[1:4]
    ctx.want_w = weight_grad and (need_s if has_slice else need_w)
    ctx.want_b = bias_grad and need_b
    ctx.has_slice = has_slice


def _weight_outputs(ctx, sel: ChannelSelection, grad: Tensor | None) -> tuple:
    """(grad of weight, grad of weight_slice) from the slice gradient."""
    if grad is None:
        return None, None
    return (None, grad) if ctx.has_slice else (sel.scatter(grad), None)


def _effective_weight(weight: Tensor, weight_slice: Tensor | None,
                      sel: ChannelSelection) -> Tensor:
    return weight if weight_slice is None else sel.combine(weight, weight_slice)


# ---------------------------------------------------------------- budgetsearch::sparse_conv2d

def _sparse_conv2d_impl(x: Tensor, weight: Tensor, bias: Tensor | None,
                        weight_slice: Tensor | None, out_channels: list[int],
                        in_channels: list[int], stride: list[int], padding: list[int],
                        dilation: list[int], groups: int, weight_grad: bool,
                        bias_grad: bool) -> Tensor:
    sel = selection_of(weight, groups, out_channels, in_channels)
    return F.conv2d(x, _effective_weight(weight, weight_slice, sel), bias, stride, padding,
                    dilation, groups)


def _sparse_setup(ctx, inputs: tuple, output: Tensor) -> None:
    """Saved: the input channels the chosen part needs (if its gradient is wanted), and the
    weight and slice by reference (if the input gradient is)."""
    x, weight, _bias, weight_slice, outs, ins = inputs[:6]
    weight_grad, bias_grad = inputs[-2:]
    conv = None
    if len(inputs) == 12:  # the conv
        stride, padding, dilation, groups = inputs[6:10]
        conv = ConvArgs(tuple(stride), tuple(padding), tuple(dilation), groups)  # type: ignore[arg-type]
    sel = selection_of(weight, 1 if conv is None else conv.groups, outs, ins)
    _wanted(ctx, weight_grad=weight_grad, bias_grad=bias_grad, has_slice=weight_slice is not None)
    ctx.sel, ctx.conv, ctx.x_shape = sel, conv, x.shape
    x_keep = x if conv is not None else x.reshape(-1, x.shape[-1])
    need_x = ctx.needs_input_grad[0]
    ctx.save_for_backward(
        sel.saved_input(x_keep) if ctx.want_w else None,
        weight if need_x else None,
        weight_slice if need_x else None,
    )


def _sparse_backward(ctx, g: Tensor) -> tuple:
    x_saved, weight, weight_slice = ctx.saved_tensors
    sel, conv = ctx.sel, ctx.conv
    gx = gb = grad = None
    if conv is None:
        g = g.reshape(-1, g.shape[-1])
    if ctx.needs_input_grad[0]:
        w = _effective_weight(weight, weight_slice, sel)
        if conv is None:
            gx = (g @ w).reshape(ctx.x_shape)
        else:
            gx = conv2d_input_grad(ctx.x_shape, w, g, conv)
    if ctx.want_w and conv is None:
        grad = sel.weight_grad(x_saved, g, lambda xb, gb_, groups, rows: gb_.t() @ xb)
    elif ctx.want_w:
        s, p, d = conv.stride, conv.padding, conv.dilation

        def grad_fn(xb: Tensor, gb_: Tensor, groups: int, rows: int) -> Tensor:
            size = (rows, xb.shape[1] // groups, *sel.tail)
            return torch.nn.grad.conv2d_weight(xb, size, gb_, s, p, d, groups)

        grad = sel.weight_grad(x_saved, g, grad_fn)
    if ctx.want_b:
        gb = g.sum(0) if conv is None else g.sum((0, 2, 3))
    gw, gs = _weight_outputs(ctx, sel, grad)
    return (gx, gw, gb, gs) + (None,) * (8 if conv is not None else 4)


_sparse_conv2d_op = define(
    "sparse_conv2d",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? weight_slice, int[] out_channels, "
    "int[] in_channels, int[2] stride, int[2] padding, int[2] dilation, int groups, "
    "bool weight_grad, bool bias_grad) -> Tensor",
    _sparse_conv2d_impl,
    setup_context=_sparse_setup,
    backward=_sparse_backward,
)


# ---------------------------------------------------------------- budgetsearch::sparse_linear

def _sparse_linear_impl(x: Tensor, weight: Tensor, bias: Tensor | None,
                        weight_slice: Tensor | None, out_channels: list[int],
                        in_channels: list[int], weight_grad: bool, bias_grad: bool) -> Tensor:
    sel = selection_of(weight, 1, out_channels, in_channels)
    return F.linear(x, _effective_weight(weight, weight_slice, sel), bias)


_sparse_linear_op = define(
    "sparse_linear",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? weight_slice, int[] out_channels, "
    "int[] in_channels, bool weight_grad, bool bias_grad) -> Tensor",
    _sparse_linear_impl,
    setup_context=_sparse_setup,
    backward=_sparse_backward,
)


def _check_slice(weight_slice: Tensor | None, sel: ChannelSelection) -> None:
    if weight_slice is not None and sel.kind == "all":
        raise PlanError("weight_slice needs out_channels or in_channels")


def sparse_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    weight_slice: Tensor | None = None,
    *,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    out_channels: Sequence[int] | Tensor | None = None,
    in_channels: Sequence[int] | Tensor | None = None,
    bias_grad: bool = True,
    weight_grad: bool = True,
    selection: ChannelSelection | None = None,
) -> Tensor:
    """A 2-D convolution whose backward computes the weight gradient of chosen channels only.

    The output is ``F.conv2d`` with the effective weight. Saved for backward: the input channels
    the chosen part needs (see the module docstring), nothing of ``x`` if no weight gradient is
    wanted, and references to ``weight``/``weight_slice`` (parameters or buffers, no copies) if the
    input gradient is needed.

    Args:
        x: Input (N, C_in, H, W).
        weight: Full weight (C_out, C_in/G, kh, kw). With ``weight_slice`` it is the frozen base
            and never gets a gradient; without, it gets a full-shaped gradient that is zero outside
            the chosen channels (use ``weight_slice`` to avoid that dense buffer).
        bias: Bias (C_out) or None.
        weight_slice: Trainable part in :class:`ChannelSelection` slice layout, overriding the
            chosen part of ``weight``; it gets the gradient.
        stride: Stride.
        padding: Padding, as in ``F.conv2d``.
        dilation: Dilation.
        groups: Groups.
        out_channels: Train these output channels (weight rows).
        in_channels: Train the weight columns of these input channels.
        bias_grad: Whether to compute the bias gradient (if ``bias`` requires grad).
        weight_grad: Whether to compute any weight gradient.
        selection: A prebuilt selection, instead of ``out_channels``/``in_channels``.

    Returns:
        The convolution output.

    Raises:
        PlanError: If the selection or the conv arguments are invalid.
    """
    conv = conv_args(
        kernel_size=tuple(weight.shape[2:]),  # type: ignore[arg-type]
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    sel = selection or ChannelSelection(
        weight.shape, groups=groups, out_channels=out_channels, in_channels=in_channels
    )
    _check_slice(weight_slice, sel)
    return _sparse_conv2d_op(x, weight, bias, weight_slice, *selection_lists(sel),
                             list(conv.stride), list(conv.padding), list(conv.dilation),
                             conv.groups, weight_grad, bias_grad)


def sparse_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    weight_slice: Tensor | None = None,
    *,
    out_channels: Sequence[int] | Tensor | None = None,
    in_channels: Sequence[int] | Tensor | None = None,
    bias_grad: bool = True,
    weight_grad: bool = True,
    selection: ChannelSelection | None = None,
) -> Tensor:
    """A linear layer whose backward computes the weight gradient of chosen features only.

    Same contract as :func:`sparse_conv2d` (a linear layer is a 1x1 conv): rows mode saves the
    whole input, columns mode only the chosen input features, no weight gradient saves nothing of
    ``x``.

    Args:
        x: Input (..., in_features).
        weight: Full weight (out_features, in_features).
        bias: Bias or None.
        weight_slice: Trainable part: ``weight[out_channels]`` or ``weight[:, in_channels]``.
        out_channels: Train these output features (rows).
        in_channels: Train the columns of these input features.
        bias_grad: Whether to compute the bias gradient.
        weight_grad: Whether to compute any weight gradient.
        selection: A prebuilt selection.

    Returns:
        The layer output.

    Raises:
        PlanError: If the selection is invalid.
    """
    sel = selection or ChannelSelection(
        weight.shape, out_channels=out_channels, in_channels=in_channels
    )
    _check_slice(weight_slice, sel)
    return _sparse_linear_op(x, weight, bias, weight_slice, *selection_lists(sel), weight_grad,
                             bias_grad)
