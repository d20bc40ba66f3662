"""Per-operator cost rules: one registry of pure functions, extensible by users.

Each rule takes an :class:`OpContext` (the op's geometry, the batch size, which of its inputs need a
gradient, what of its parameters is updated, and the accounting) and returns an :class:`OpCost`:
forward MACs, backward MACs split into grad-input, grad-weight and grad-bias, and the tensors it
saves for backward. Rules follow docs/cost-model.md ('MACs', 'Saved activations') and
docs/gradient-filtering.md ('Costs'). One MAC is one multiply-add; grad-bias counts additions.
Elementwise ops cost no MACs (their time is memory traffic, which the latency model counts).

Saved tensors are ``(key, bytes)`` pairs. A key ``("t", storage)`` names a tensor of the graph (by
the node that allocated its storage) and is counted once however many ops save it, as PyTorch holds
one storage; any other key is private to the op (a 1-bit mask, a pooled copy, batch-norm
statistics).

Three accountings (see :class:`Accounting`): ``pytorch`` states what stock PyTorch autograd keeps
when a plan is applied by ``requires_grad`` freezing (fp32; channel subsets and gradient filters
cannot be expressed that way, so such layers cost as fully updated ones); ``ops`` what
budgetsearch's own operators keep (fp32, channel subsets and filters as planned); ``device`` what
a minimal on-device engine keeps (the profile's data types, 1-bit ReLU masks, batch norm folded
into the conv, only the kept input channels of a channel-sparse layer, pooled inputs of filtered
convs).

Every rule is registered by :func:`register_rule`, used as a decorator on its definition (as
PyTorch registers its FLOP formulas with ``register_flop_formula``); registering an op kind twice
raises. A rule for a new op kind is registered the same way; to use another rule in one cost model
only, pass it to that model (``CostModel(..., rules={kind: rule})`` or
:meth:`~budgetsearch.cost.CostModel.set_rule`) rather than replacing the global one. An op kind
without a rule is counted by :func:`unknown_rule` (it saves all its inputs) and reported by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import overload

from .._registry import Registry
from ..choices import ENGINES, Engine
from ..errors import CostError
from ..graph import OpNode

__all__ = [
    "RULES",
    "Accounting",
    "OpContext",
    "OpCost",
    "Rule",
    "conv_geometry",
    "register_rule",
    "unknown_rule",
]


@dataclass(frozen=True, kw_only=True)
class Accounting:
    """Byte sizes and engine behaviour an accounting assumes, built from keyword arguments; the
    byte sizes default to stock PyTorch's (fp32).

    Example:
        >>> from budgetsearch.cost import Accounting
        >>> acc = Accounting(name="int8-engine", engine="device", activation_bytes=1,
        ...                  weight_bytes=1, mask_bits=1, fold_batchnorm=True)
        >>> acc.stock_autograd, acc.realises_plan, acc.gradient_bytes
        (False, True, 4)

    Attributes:
        name: The accounting's name (``pytorch``, ``ops`` and ``device`` are built by
            :func:`~budgetsearch.cost.accounting_for`).
        engine: What runs the step (:data:`~budgetsearch.choices.ENGINES`): ``autograd``, stock
            PyTorch autograd, keeping tensors as it keeps them (fp32 storages, deduplicated),
            with a plan applied by ``requires_grad`` freezing; ``ops``, budgetsearch's operators
            (``budgetsearch.trainer``'s ``apply_plan``) under autograd: channel subsets and
            gradient filters are realised, frozen layers on the backward path keep no input,
            frozen batch norm keeps nothing, ReLU-like ops keep a bool mask; ``device``, a
            minimal on-device engine keeping only what each backward needs, at the byte sizes
            given here.
        activation_bytes: Bytes per activation element (live or saved).
        weight_bytes: Bytes per weight element.
        bias_bytes: Bytes per bias element.
        gradient_bytes: Bytes per gradient element (activation and parameter gradients).
        optimizer_state_bytes: Bytes per optimizer state element.
        mask_bits: Bits per element of a saved ReLU mask.
        frozen_weights_in_ram: Whether frozen weights occupy the training memory (not flash).
        fold_batchnorm: Whether frozen batch norm is folded into the preceding conv.
        in_place_update: Whether each weight is updated as its gradient is computed (a fused
            update, as the MIT engine does): one output channel's gradient row is held at a time,
            and only during that layer's backward.

    Raises:
        CostError: For an unknown engine.
    """

    name: str
    engine: Engine
    activation_bytes: float = 4
    weight_bytes: float = 4
    bias_bytes: float = 4
    gradient_bytes: float = 4
    optimizer_state_bytes: float = 4
    mask_bits: int = 8
    frozen_weights_in_ram: bool = True
    fold_batchnorm: bool = False
    in_place_update: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise CostError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")

    @property
    def stock_autograd(self) -> bool:
        """Whether tensors are kept as PyTorch autograd keeps them (engines ``autograd`` and
        ``ops``), for every op that ``planned_ops`` does not replace."""
        return self.engine != "device"

    @property
    def planned_ops(self) -> bool:
        """Whether the plan runs on budgetsearch's operators (engine ``ops``)."""
        return self.engine == "ops"

    @property
    def realises_plan(self) -> bool:
        """Whether channel subsets and gradient filters change what is computed and stored (every
        engine but stock ``autograd``)."""
        return self.engine != "autograd"


@dataclass(frozen=True)
class OpContext:
    """What a rule sees of one op under one plan.

    Attributes:
        node: The op (shapes are for a batch of one).
        inputs: The nodes producing its tensor inputs.
        batch: Batch size.
        acc: The accounting.
        input_grad: Whether each tensor input requires a gradient.
        weight_fraction: Fraction of the weight's elements that are updated (0 = frozen).
        in_fraction: Fraction of input channels whose activation is stored for grad-weight.
        bias: Whether the bias this op holds is updated.
        patch_size: Gradient-filter patch size (1 = none).
        training: Whether dropout and stochastic depth are active.
        bn_train: Whether batch norm uses batch statistics (else frozen running statistics).
    """

    node: OpNode
    inputs: tuple[OpNode, ...]
    batch: int
    acc: Accounting
    input_grad: tuple[bool, ...]
    weight_fraction: float = 0.0
    in_fraction: float = 1.0
    bias: bool = False
    patch_size: int = 1
    training: bool = True
    bn_train: bool = False

    @property
    def any_grad(self) -> bool:
        """Whether autograd records the op at all (some input or parameter needs a gradient)."""
        return any(self.input_grad) or self.weight_fraction > 0 or self.bias

    def tensor(self, node: OpNode) -> tuple[Hashable, int]:
        """The saved-tensor entry for a graph tensor (its whole storage), under this accounting."""
        per_elem = node.itemsize if self.acc.stock_autograd else self.acc.activation_bytes
        return ("t", node.storage), math.ceil(node.storage_numel * self.batch * per_elem)

    def private(self, tag: str, numel: float, bytes_per: float) -> tuple[Hashable, int]:
        """A saved-tensor entry private to this op."""
        return ("p", self.node.index, tag), math.ceil(numel * bytes_per)


@dataclass(frozen=True)
class OpCost:
    """Cost of one op under one plan. MACs are for the whole batch; saved bytes too."""

    forward_macs: int = 0
    grad_input_macs: int = 0
    grad_weight_macs: int = 0
    grad_bias_macs: int = 0
    saved: tuple[tuple[Hashable, int], ...] = ()

    @property
    def backward_macs(self) -> int:
        """grad-input + grad-weight + grad-bias."""
        return self.grad_input_macs + self.grad_weight_macs + self.grad_bias_macs


Rule = Callable[[OpContext], OpCost]

#: The rule registry, by op kind (the graph's ``OpNode.kind``). Extend with :func:`register_rule`.
RULES: Registry[Rule] = Registry("cost rule", error=CostError)


@overload
def register_rule(
    kinds: str | Iterable[str], rule: None = None, *, replace: bool = False
) -> Callable[[Rule], Rule]: ...


@overload
def register_rule(kinds: str | Iterable[str], rule: Rule, *, replace: bool = False) -> Rule: ...


def register_rule(
    kinds: str | Iterable[str], rule: Rule | None = None, *, replace: bool = False
) -> Callable[[Rule], Rule] | Rule:
    """Register a cost rule for one or more op kinds (the graph's ``OpNode.kind``).

    Used as a decorator, ``@register_rule("conv2d")`` or ``@register_rule(["relu6", "gelu"])``
    above a function from :class:`OpContext` to :class:`OpCost`; or called with the rule,
    ``register_rule("my_op", my_rule)``.

    Args:
        kinds: The op kind, or several, e.g. a module class name the graph does not map.
        rule: The rule; without it a decorator is returned.
        replace: Replace the rule registered for a kind (for every cost model built after).
            To use another rule in one cost model only, give it to that model instead
            (``CostModel(..., rules=...)`` or :meth:`~budgetsearch.cost.CostModel.set_rule`).

    Returns:
        The rule, or the decorator registering what it decorates.

    Raises:
        CostError: If a rule is registered for a kind and ``replace`` is false.
    """
    names = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    decorate = RULES.register(*names, replace=replace)
    return decorate if rule is None else decorate(rule)


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of a conv or linear op for a batch of one."""

    c_in: int
    c_out: int
    groups: int
    kernel: int  # kh * kw
    out_positions: int  # H_out * W_out (1 for linear)
    in_positions: int
    out_hw: tuple[int, int]

    @property
    def macs_per_sample(self) -> int:
        """Forward MACs for one sample."""
        return self.c_out * (self.c_in // self.groups) * self.kernel * self.out_positions


def conv_geometry(node: OpNode, inp: OpNode) -> ConvGeometry:
    """Geometry of a conv2d or linear node (a linear layer is a 1×1 conv over its positions)."""
    a = node.attrs
    if "in_channels" not in a or "out_channels" not in a:
        raise CostError(f"op {node.name} ({node.kind}): its channels were not recorded (a "
                        f"functional {node.kind} call, not an nn.Conv2d / nn.Linear module?); "
                        "the cost model needs the layer as a module")
    c_in, c_out = int(a["in_channels"]), int(a["out_channels"])
    kh, kw = a.get("kernel_size", (1, 1))
    if node.kind == "linear":
        out_positions = node.numel // c_out
        in_positions = inp.numel // c_in
        hw = (out_positions, 1)
    else:
        hw = (node.shape[2], node.shape[3])
        out_positions = hw[0] * hw[1]
        in_positions = inp.shape[2] * inp.shape[3]
    return ConvGeometry(c_in, c_out, int(a.get("groups", 1)), kh * kw, out_positions,
                        in_positions, hw)


@register_rule(["conv2d", "linear"])
def _conv(ctx: OpContext) -> OpCost:
    n, inp = ctx.batch, ctx.inputs[0]
    g = conv_geometry(ctx.node, inp)
    fwd = n * g.macs_per_sample
    r = ctx.patch_size
    if r > 1:
        patches = math.ceil(g.out_hw[0] / r) * math.ceil(g.out_hw[1] / r)
        dense_grad = n * g.c_in * g.c_out * patches // g.groups
    else:
        patches, dense_grad = g.out_positions, fwd
    gi = dense_grad if ctx.input_grad and ctx.input_grad[0] else 0
    gw = round(dense_grad * ctx.weight_fraction)
    gb = n * g.c_out * g.out_positions if ctx.bias else 0
    saved: list[tuple[Hashable, int]] = []
    if ctx.acc.planned_ops:
        saved.extend(_planned_conv_saved(ctx, g, patches))
    elif ctx.acc.stock_autograd:
        # convolution saves its input and weight whenever it is recorded; a linear layer (addmm)
        # saves its input only when its weight needs a gradient.
        if (ctx.node.kind == "conv2d" and ctx.any_grad) or ctx.weight_fraction > 0:
            saved.append(ctx.tensor(inp))
    elif ctx.weight_fraction > 0:
        positions = patches if r > 1 else g.in_positions
        numel = n * g.c_in * ctx.in_fraction * positions
        saved.append(ctx.private("input", numel, ctx.acc.activation_bytes))
    return OpCost(fwd, gi, gw, gb, tuple(saved))


def _planned_conv_saved(ctx: OpContext, g: ConvGeometry, patches: int) -> list:
    """What budgetsearch's planned conv / linear keeps (fp32): nothing for a frozen or bias-only
    layer; with a weight update, the input (shared with its producer) or, for an input-channel
    subset, a copy of the kept channels; with a gradient filter, the sum-pooled input of the kept
    channels (the kernel sums are formed in the backward from the weight, which is not an
    activation)."""
    if ctx.weight_fraction <= 0:
        return []
    inp, n, item = ctx.inputs[0], ctx.batch, ctx.inputs[0].itemsize
    if ctx.patch_size > 1:
        return [ctx.private("x_sum", n * g.c_in * ctx.in_fraction * patches, item)]
    if ctx.in_fraction < 1:
        return [ctx.private("input", n * g.c_in * ctx.in_fraction * g.in_positions, item)]
    return [ctx.tensor(inp)]


@register_rule("batch_norm")
def _batch_norm(ctx: OpContext) -> OpCost:
    channels = int(ctx.node.attrs.get("channels", ctx.node.shape[1]))
    gb = ctx.batch * ctx.node.numel if ctx.bias else 0
    saved: list[tuple[Hashable, int]] = []
    if ctx.acc.planned_ops and not ctx.bn_train:
        pass  # frozen batch norm as an affine op: the gradient needs only the scale
    elif ctx.acc.stock_autograd and ctx.any_grad:
        saved.append(ctx.tensor(ctx.inputs[0]))
        if ctx.bn_train:  # the batch mean and inverse std
            saved.append(ctx.private("stats", 2 * channels, ctx.node.itemsize))
    elif ctx.any_grad and (not ctx.acc.fold_batchnorm or ctx.bn_train):
        # folded into the conv only when frozen: on batch statistics it is an op of its own
        saved.append(ctx.private("input", ctx.batch * ctx.inputs[0].numel,
                                 ctx.acc.activation_bytes))
        if ctx.bn_train:  # the batch mean and inverse std
            saved.append(ctx.private("stats", 2 * channels, ctx.node.itemsize))
    return OpCost(grad_bias_macs=gb, saved=tuple(saved))


def _stock_saved(ctx: OpContext, saves: str) -> OpCost:
    """What autograd keeps for an elementwise op whose backward needs its input or its result."""
    src = ctx.node if saves == "result" else ctx.inputs[0]
    if saves == "input" and ctx.node.storage == src.storage:
        # In place: autograd keeps a copy of the input before overwriting it (relu_ needs only
        # the result, but hardtanh_ / relu6_ / hardswish_ need the input).
        return OpCost(saved=(ctx.private("input", ctx.batch * src.numel, src.itemsize),))
    return OpCost(saved=(ctx.tensor(src),))


def _mask_or(ctx: OpContext, saves: str) -> OpCost:
    """ReLU-like ops: a 1-bit mask on a device; in PyTorch the input or the result."""
    if not (ctx.input_grad and ctx.input_grad[0]):
        return OpCost()
    if ctx.acc.planned_ops:  # a bool mask, one byte per element
        return OpCost(saved=(ctx.private("mask", ctx.batch * ctx.node.numel, 1),))
    if ctx.acc.stock_autograd:
        return _stock_saved(ctx, saves)
    bits = ctx.acc.mask_bits / 8
    return OpCost(saved=(ctx.private("mask", ctx.batch * ctx.node.numel, bits),))


@register_rule("relu")
def _relu(ctx: OpContext) -> OpCost:
    """ReLU: a mask; stock autograd keeps its result."""
    return _mask_or(ctx, "result")


@register_rule(["hardtanh", "clamp"])
def _clamp(ctx: OpContext) -> OpCost:
    """Hardtanh (ReLU6) and clamp: a mask; stock autograd keeps their input."""
    return _mask_or(ctx, "input")


def _full(ctx: OpContext, saves: str) -> OpCost:
    """Ops whose backward needs a full tensor: their input or their result."""
    if not (ctx.input_grad and ctx.input_grad[0]):
        return OpCost()
    if ctx.acc.stock_autograd:
        return _stock_saved(ctx, saves)
    src = ctx.node if saves == "result" else ctx.inputs[0]
    return OpCost(saved=(ctx.private(saves, ctx.batch * src.numel, ctx.acc.activation_bytes),))


@register_rule(["hardswish", "hardsigmoid", "silu"])
def _full_input(ctx: OpContext) -> OpCost:
    """h-swish, h-sigmoid, SiLU: the backward needs the input."""
    return _full(ctx, "input")


@register_rule("sigmoid")
def _sigmoid(ctx: OpContext) -> OpCost:
    """Sigmoid: the backward needs the result."""
    return _full(ctx, "result")


@register_rule("mul")
def _mul(ctx: OpContext) -> OpCost:
    saved = []
    ins, grads = ctx.inputs, ctx.input_grad
    if len(ins) == 1:
        if ctx.node.attrs.get("graph_operands", 2) < 2:
            # x * a number or a constant tensor: x's gradient needs only the constant. Autograd
            # keeps a tensor made in the forward pass (not a buffer of the model's) for it.
            made = int(ctx.node.attrs.get("constant_bytes", 0))
            if made and grads[0] and ctx.acc.stock_autograd:
                return OpCost(saved=(ctx.private("constant", made, 1),))
            return OpCost()
        ins, grads = ins * 2, grads * 2  # x * x
    # x *= y overwrites x: autograd keeps a copy of it for y's gradient
    in_place = len(ctx.inputs) == 2 and ctx.node.storage == ctx.inputs[0].storage
    for i, other in ((0, 1), (1, 0)):
        if grads[i]:  # the gradient of one operand needs the other
            if ctx.acc.stock_autograd and in_place and other == 0:
                saved.append(ctx.private("original", ctx.batch * ins[0].numel, ins[0].itemsize))
            elif ctx.acc.stock_autograd:
                saved.append(ctx.tensor(ins[other]))
            else:
                saved.append(ctx.private(f"operand{other}", ctx.batch * ins[other].numel,
                                         ctx.acc.activation_bytes))
    return OpCost(saved=tuple(dict(saved).items()))


@register_rule(["input", "add", "cat", "view", "mean"])
def _nothing(ctx: OpContext) -> OpCost:
    """Ops whose backward needs only shapes: add, cat, views, global average pooling."""
    return OpCost()


@register_rule(["adaptive_avg_pool2d", "avg_pool2d"])
def _pool(ctx: OpContext) -> OpCost:
    """Average pooling other than global: PyTorch keeps the input; a device needs only shapes."""
    if not (ctx.input_grad and ctx.input_grad[0]):
        return OpCost()
    if ctx.node.kind == "adaptive_avg_pool2d" and ctx.node.attrs.get("global"):
        return OpCost()
    if ctx.acc.stock_autograd:
        return OpCost(saved=(ctx.tensor(ctx.inputs[0]),))
    return OpCost()


@register_rule("max_pool2d")
def _max_pool(ctx: OpContext) -> OpCost:
    if not (ctx.input_grad and ctx.input_grad[0]):
        return OpCost()
    out = ctx.batch * ctx.node.numel
    if ctx.acc.stock_autograd:  # the input and int64 argmax indices
        return OpCost(saved=(ctx.tensor(ctx.inputs[0]), ctx.private("indices", out, 8)))
    return OpCost(saved=(ctx.private("indices", out, 1),))  # index within the window


@register_rule("dropout")
def _dropout(ctx: OpContext) -> OpCost:
    if not (ctx.training and ctx.node.attrs.get("p", 0) > 0 and ctx.input_grad[0]):
        return OpCost()
    numel = ctx.batch * ctx.node.numel
    if ctx.acc.stock_autograd:  # on the CPU the mask is kept at the input's dtype
        return OpCost(saved=(ctx.private("mask", numel, ctx.node.itemsize),))
    return OpCost(saved=(ctx.private("mask", numel, ctx.acc.mask_bits / 8),))


@register_rule("stochastic_depth")
def _stochastic_depth(ctx: OpContext) -> OpCost:
    if not (ctx.training and ctx.node.attrs.get("p", 0) > 0 and ctx.input_grad[0]):
        return OpCost()
    per_row = ctx.node.attrs.get("mode", "row") == "row"
    numel = ctx.batch if per_row else ctx.batch * ctx.node.numel
    size = ctx.node.itemsize if ctx.acc.stock_autograd else ctx.acc.mask_bits / 8
    return OpCost(saved=(ctx.private("noise", numel, size),))


def unknown_rule(ctx: OpContext) -> OpCost:
    """Fallback for op kinds without a rule: counted as saving all its inputs when recorded."""
    if not ctx.any_grad:
        return OpCost()
    if ctx.acc.stock_autograd:
        return OpCost(saved=tuple(dict(ctx.tensor(i) for i in ctx.inputs).items()))
    return OpCost(saved=tuple(
        ctx.private(f"input{k}", ctx.batch * i.numel, ctx.acc.activation_bytes)
        for k, i in enumerate(ctx.inputs)
    ))
