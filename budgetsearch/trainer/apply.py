"""``apply_plan``: put a plan's operators into a model, for any training loop, and take them out.

What :func:`apply_plan` does to the model (in place; state-dict keys never change):

1. Traces a :class:`~budgetsearch.graph.LayerGraph` at the plan's input size (or uses the one
   given) and validates the plan against it (another model's plan: :class:`PlanError` naming the
   differing layers).
2. Replaces every conv / linear layer that lies on the backward path (the plan's updated layers and
   everything downstream of them, ``graph.backward_nodes``) by a
   :class:`~budgetsearch.ops.PlannedConv2d` / :class:`~budgetsearch.ops.PlannedLinear` under the
   same qualified name: updated layers with the plan's weight channels, axis and patch size (mode
   ``weight``) or their bias only (mode ``bias``); frozen layers on the path with
   ``weight_grad=False, bias_grad=False``, because a stock conv saves its input even when frozen.
   Layers off the path stay stock (no gradient reaches them, autograd records nothing).
3. Batch norm, ``bn="frozen"`` (the default): every batch norm is replaced by a
   :class:`~budgetsearch.trainer.layers.FrozenBatchNorm` (running statistics, saves nothing; its
   bias trained when the plan updates the layer whose bias it is), so a later ``model.train()``
   cannot unfreeze it. ``bn="train"``: batch norms stay stock and run in train mode (batch
   statistics, running statistics updated), their bias trained as the plan says, gamma frozen.
4. ReLU / ReLU6 / Hardtanh / ``Clamp`` modules on the backward path, and those the graph does not
   show (custom modules the tracer traced through), are replaced by
   :class:`~budgetsearch.trainer.layers.MaskedActivation` (a bool mask for backward; where no
   gradient flows it saves nothing, like the stock op). Activations called as functions
   (``F.relu(x)`` in a ``forward``) cannot be replaced and stay stock.
5. Sets ``requires_grad`` exactly as the plan says (every other parameter frozen) and puts the model
   in training mode.
6. ``fuse=True`` (the default): a gradient-filtered conv whose output only a frozen batch norm
   reads, and/or whose (batch norm's) output only a masked activation reads, runs them inside
   its own autograd node (:meth:`~budgetsearch.ops.PlannedConv2d.fuse_epilogue`): the same
   values, gradients and saved tensors (the mask, now saved by the conv), with one masked block
   sum over the output gradient instead of a mask product, a scale, a bias sum and a block sum
   (:mod:`budgetsearch.ops.epilogue`). The fused modules stay in place (same ``state_dict``) and
   pass the conv's output through; any other input is an error (a forward hook on the conv that
   returns a new tensor, ``nn.DataParallel`` replicas: use ``fuse=False``), except under
   :func:`~budgetsearch.ops.suspended_epilogues`, where they run on their own. Not fused:
   modules called more than once per forward pass (a ReLU shared by two places), outputs the
   model also returns, and graphs from the hooks tracer.

What each module keeps for the backward pass (beyond parameters and buffers, which it references):

====================================  ========================================================
module                                 saved activation
====================================  ========================================================
conv / linear, weight, all channels    its input (stock ``F.conv2d``/``F.linear``: the same storage
                                       as the previous op's output)
conv / linear, output-channel subset   the input channels feeding those rows: the whole input
                                       (same storage) for G = 1 or when every group has a chosen
                                       row; otherwise (grouped / depthwise conv) a copy of the
                                       input channels of the k groups touched, N·k·(C_in/G)·H·W
conv / linear, input-channel subset    a copy of only the kept input channels
conv, filter r (any of the above)      ``x_sum`` N·C·⌈H_out/r⌉·⌈W_out/r⌉ (C = the channels the
                                       rows above would keep); the kernel sums are formed in the
                                       backward from the weight, kept by reference
conv / linear, bias only or frozen     nothing
FrozenBatchNorm                        nothing
MaskedActivation                       a bool mask, N·C·H·W bytes (saved by the conv when fused)
anything else                          what stock PyTorch saves
====================================  ========================================================

:meth:`PlanHandle.remove` (or :func:`remove_plan`) puts the original module objects back with the
trained weights merged into them, and restores every ``requires_grad`` flag and training mode.
"""

from __future__ import annotations

import itertools
import weakref
from types import TracebackType
from typing import Any

import torch
from torch import nn

from ..choices import BN_MODES, FILTER_MODES
from ..errors import PlanError
from ..graph import LayerGraph
from ..ops import PlannedConv2d, PlannedLinear, replace_module
from ..plan import Plan
from .layers import FrozenBatchNorm, MaskedActivation, masked_activation_for

__all__ = ["BN_MODES", "PlanHandle", "active_plan", "apply_plan", "describe", "remove_plan"]

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PlanHandle] = weakref.WeakKeyDictionary()


class PlanHandle:
    """A plan applied to a model: the parameters to optimise, and the way back.

    Use it as a context manager (the plan is removed on exit) or call :meth:`remove`.

    Attributes:
        model: The model the plan is applied to.
        plan: The plan.
        graph: The layer graph the plan was validated against.
        bn: ``"frozen"`` or ``"train"``.
        filter_mode: Gradient-filter variant in use (``normalized``, ``paper`` or
            ``corrected``).
        replaced: The modules put in, by qualified name (planned convs and linears, frozen batch
            norms, masked activations).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        plan: Plan,
        graph: LayerGraph,
        bn: str,
        filter_mode: str,
        swaps: list[tuple[str, nn.Module, nn.Module]],
        flags: dict[nn.Parameter, bool],
        modes: dict[nn.Module, bool],
    ) -> None:
        self.model, self.plan, self.graph = model, plan, graph
        self.bn, self.filter_mode = bn, filter_mode
        self._swaps, self._flags, self._modes = swaps, flags, modes
        self.replaced = {name: new for name, _old, new in swaps}
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.active = True

    # --------------------------------------------------------------------------- optimisation
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable tensors by qualified name, in module order: dense weights
        (``layer.weight``), channel slices (``layer.weight_slice``), biases (a conv's own, or
        ``bn.bias`` of the batch norm holding its bias)."""
        return list(self._named)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors (see :meth:`named_parameters`)."""
        return [p for _, p in self._named]

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for a ``torch.optim`` optimizer: one group with ``params`` and
        ``param_names`` (an empty list when the plan trains nothing)."""
        if not self._named:
            return []
        return [{"params": self.parameters(), "param_names": [n for n, _ in self._named]}]

    @property
    def trainable_params(self) -> int:
        """Number of trained parameter elements."""
        return int(sum(p.numel() for p in self.parameters()))

    # ------------------------------------------------------------------------------- removal
    def remove(self) -> nn.Module:
        """Put the original modules back with the trained weights merged in; restore every
        ``requires_grad`` flag and training mode. Idempotent. Returns the model."""
        if not self.active:
            return self.model
        try:
            _undo(self.model, self._swaps)
        finally:
            for param, flag in self._flags.items():
                param.requires_grad_(flag)
            for module, mode in self._modes.items():
                module.training = mode
            self.active = False
            if _ACTIVE.get(self.model) is self:
                del _ACTIVE[self.model]
        return self.model

    def __enter__(self) -> PlanHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (f"PlanHandle({self.plan.model or 'model'}, {len(self.plan.updates)} updated "
                f"layers, {self.trainable_params} trainable parameters, bn={self.bn}, {state})")


def active_plan(model: nn.Module) -> PlanHandle | None:
    """The handle of the plan applied to ``model``, or None."""
    return _ACTIVE.get(model)


def remove_plan(model: nn.Module) -> nn.Module:
    """Remove the plan applied to ``model`` (see :meth:`PlanHandle.remove`); a no-op if none."""
    handle = _ACTIVE.get(model)
    return handle.remove() if handle is not None else model


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    filter_mode: str | None = None,
    bn: str = "frozen",
    graph: LayerGraph | None = None,
    fuse: bool = True,
) -> PlanHandle:
    """Apply a plan to a model in place; see the module docstring for exactly what changes.

    Args:
        model: The model (float, any device).
        plan: The plan; it must have been made for this model.
        filter_mode: Gradient-filter variant (``normalized``, ``paper`` or ``corrected``); the
            plan's by default.
        bn: ``"frozen"`` (batch norm on running statistics, saving nothing) or ``"train"``.
        graph: The model's layer graph, if already traced (must be of this model).
        fuse: Fuse the frozen batch norm and clamp activation after each gradient-filtered conv
            into it (step 6 of the module docstring); False keeps them as separate modules.

    Returns:
        The handle: :meth:`PlanHandle.param_groups` for the optimizer, :meth:`PlanHandle.remove`.

    Raises:
        PlanError: The plan is for another model, an option is invalid, a plan is already applied
            to the model, or a layer cannot be trained as planned (e.g. a filter on a linear
            layer).

    Example:
        One SGD step of MCUNet training 40 output channels of its last conv (and that conv's
        bias) and its classifier; removing the plan puts the original modules back, trained:

        >>> import torch
        >>> from budgetsearch import LayerGraph, LayerUpdate, Plan, apply_plan, load_model
        >>> model = load_model("mcunet-5fps", num_classes=10)
        >>> graph = LayerGraph.from_model(model, input_size=128)
        >>> plan = Plan.from_layers(graph, {
        ...     "blocks.13.pointwise2": LayerUpdate("weight", channels=range(40)),
        ...     "classifier": LayerUpdate("weight")})
        >>> before = model.blocks[13].pointwise2.weight.detach().clone()
        >>> x, y = torch.randn(4, 3, 128, 128), torch.tensor([0, 1, 2, 3])
        >>> with apply_plan(model, plan, graph=graph) as handle:
        ...     optimizer = torch.optim.SGD(handle.param_groups(), lr=0.1)
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     optimizer.step()
        ...     print(type(model.blocks[13].pointwise2).__name__, handle.trainable_params)
        PlannedConv2d 24810
        >>> after = model.blocks[13].pointwise2
        >>> type(after).__name__, torch.equal(after.weight[40:], before[40:])
        ('Conv2d', True)
        >>> torch.equal(after.weight[:40], before[:40])
        False
    """
    if _ACTIVE.get(model) is not None:
        raise PlanError("a plan is already applied to this model; remove it first "
                        "(handle.remove() or remove_plan(model))")
    if bn not in BN_MODES:
        raise PlanError(f"bn must be one of {', '.join(BN_MODES)}; got {bn!r}")
    mode = filter_mode or plan.filter_mode
    if mode not in FILTER_MODES:
        raise PlanError(f"filter_mode must be one of {', '.join(FILTER_MODES)}; got {mode!r}")
    if graph is None:
        graph = LayerGraph.from_model(model, input_size=tuple(plan.input_size),
                                      in_channels=_in_channels(plan), model_name=plan.model)
    plan.validate(graph)
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    swaps: list[tuple[str, nn.Module, nn.Module]] = []
    try:
        for p in flags:
            p.requires_grad_(False)
        replacements = _replacements(model, plan, graph, bn, mode)
        if fuse:
            _fuse_epilogues(graph, replacements)
        for name, new in replacements:
            swaps.append((name, replace_module(model, name, new), new))
        model.train()
    except BaseException:
        _undo(model, swaps)
        for param, flag in flags.items():
            param.requires_grad_(flag)
        for module, was in modes.items():
            module.training = was
        raise
    handle = PlanHandle(model=model, plan=plan, graph=graph, bn=bn, filter_mode=mode,
                        swaps=swaps, flags=flags, modes=modes)
    _ACTIVE[model] = handle
    return handle


# ------------------------------------------------------------------------------------ internals
def _in_channels(plan: Plan) -> int:
    first = next(iter(plan.layer_shapes.values()), None)
    return int(first[1]) if first is not None and len(first) == 4 else 3


def _replacements(
    model: nn.Module, plan: Plan, graph: LayerGraph, bn: str, mode: str
) -> list[tuple[str, nn.Module]]:
    """(qualified name, new module) for every module to swap, computed before any swap."""
    backward = set(graph.backward_nodes(plan.updated_layers))
    on_path = {graph.nodes[i].module for i in backward if graph.nodes[i].module}
    seen_in_graph = {n.module for n in graph.nodes if n.module}
    trained_bn = set()
    for name in plan.updates:
        bias = graph.layers[name].bias_param
        if bias is not None and bias != f"{name}.bias":
            trained_bn.add(bias.rpartition(".")[0])
    out: list[tuple[str, nn.Module]] = []
    made: dict[int, nn.Module] = {}  # one replacement per module object, even if registered twice
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        new = made.get(id(module))
        if new is None:
            new = _replacement(name, module, plan, graph, bn, mode, on_path, seen_in_graph,
                               trained_bn)
            if new is None:
                continue
            made[id(module)] = new
        out.append((name, new))
    return out


def _fuse_epilogues(graph: LayerGraph, replacements: list[tuple[str, nn.Module]]) -> None:
    """Fuse into each gradient-filtered conv the frozen batch norm that is its only consumer and
    the masked activation that is the only consumer of that (or of the conv), when each of those
    modules runs once per forward pass and neither the conv's nor the batch norm's output is
    returned by the model. Only on graphs traced by torch.fx, which sees every tensor op."""
    if graph.tracer != "fx":  # the hooks tracer drops glue (x.mean() > 0) that may read a conv
        return
    new = dict(replacements)
    runs: dict[int, int] = {}  # calls per module object (one object may have two names)
    for node in graph.nodes:
        if node.module in new:
            key = id(new[node.module])
            runs[key] = runs.get(key, 0) + 1

    def sole_user(index: int, kind: type) -> tuple[int, nn.Module] | None:
        users = list(graph.graph.successors(index))
        if len(users) != 1 or graph.nodes[index].attrs.get("model_output"):
            return None
        node = graph.nodes[users[0]]
        module = new.get(node.module) if node.module else None
        if isinstance(module, kind) and runs.get(id(module)) == 1:
            return node.index, module
        return None

    for layer in graph.layers.values():
        conv = new.get(layer.name)
        if not isinstance(conv, PlannedConv2d) or conv.patch_size is None:
            continue
        index, norm, act = layer.node, None, None
        found = sole_user(index, FrozenBatchNorm)
        if found is not None:
            index, norm = found
        found = sole_user(index, MaskedActivation)
        if found is not None and not found[1].inclusive:
            act = found[1]
        if norm is None and act is None:
            continue
        conv.fuse_epilogue(norm=norm, activation=act, name=layer.name)


def _replacement(
    name: str,
    module: nn.Module,
    plan: Plan,
    graph: LayerGraph,
    bn: str,
    mode: str,
    on_path: set[str],
    seen_in_graph: set[str],
    trained_bn: set[str],
) -> nn.Module | None:
    if name in graph.layers:
        update = plan.updates.get(name)
        if update is not None and update.mode == "bias" and graph.layers[name].bias_param is None:
            raise PlanError(f"layer {name}: the plan updates its bias, but it has none (neither "
                            "its own nor a batch norm's after it)")
        if name not in on_path:
            return None
        return _planned_layer(name, module, update, mode)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if bn == "frozen":
            _check_stock(name, module, nn.modules.batchnorm._BatchNorm)
            try:
                return FrozenBatchNorm.from_bn(module, bias_grad=name in trained_bn)
            except PlanError as exc:  # the layer's name, which the batch norm does not know
                raise PlanError(f"layer {name}: {exc}") from exc
        if name in trained_bn:
            module.bias.requires_grad_(True)
        return None
    if name in on_path or name not in seen_in_graph:
        return masked_activation_for(module)
    return None


def _check_stock(name: str, module: nn.Module, base: type[nn.Module]) -> None:
    """Refuse to replace a module whose computation its replacement would not repeat: a
    subclass with its own ``forward`` (weight standardisation, "same" padding computed per
    input, a cosine head), or a parametrized weight (``weight_norm``, spectral norm), which the
    replacement would read as a fixed tensor and never train.

    Raises:
        PlanError: Naming the layer, its class and why.
    """
    cls = type(module)
    why = None
    if cls.forward is not base.forward and cls is not nn.SyncBatchNorm:  # on running stats
        why = f"its class overrides {base.__name__}'s forward"
    elif nn.utils.parametrize.is_parametrized(module):
        why = "it is parametrized (e.g. weight_norm, spectral_norm)"
    elif getattr(module, "weight", None) is not None and not isinstance(module.weight,
                                                                          nn.Parameter):
        why = "its weight is computed, not a parameter (e.g. the old weight_norm)"
    if why is not None:
        raise PlanError(f"layer {name} is a {cls.__module__}.{cls.__qualname__}: {why}, so the "
                        f"plan's {base.__name__} would compute something else; use a stock "
                        f"{base.__name__} (or fold the difference into the model) to apply a plan")


def _planned_layer(name: str, module: nn.Module, update: Any, mode: str) -> nn.Module:
    bias_grad = update is not None and getattr(module, "bias", None) is not None
    weight = update is not None and update.mode == "weight"
    outs = update.channels if weight and update.axis == "out" else None
    ins = update.channels if weight and update.axis == "in" else None
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        _check_stock(name, module, nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear)
    try:
        if isinstance(module, nn.Conv2d):
            return PlannedConv2d.from_conv(
                module, out_channels=outs, in_channels=ins, weight_grad=weight,
                bias_grad=bias_grad, patch_size=update.patch_size if weight else 1, mode=mode)
        if isinstance(module, nn.Linear):
            if weight and update.patch_size != 1:
                raise PlanError("a gradient filter (patch_size > 1) applies to convs only")
            return PlannedLinear.from_linear(module, out_channels=outs, in_channels=ins,
                                             weight_grad=weight, bias_grad=bias_grad)
    except PlanError as exc:
        raise PlanError(f"layer {name}: {exc}") from None
    raise PlanError(f"layer {name} is a {type(module).__name__}; plans train Conv2d and Linear")


def _undo(model: nn.Module, swaps: list[tuple[str, nn.Module, nn.Module]]) -> None:
    """Merge trained values into the original modules and put them back, last swap first.
    Each original goes back on the device and in the dtype of its replacement: the model may have
    been moved (``model.to(...)``, ``.double()``) while the plan was applied, which moved the
    replacements' tensors and not the originals kept aside."""
    with torch.no_grad():
        for name, old, new in reversed(swaps):
            ref = next((t for t in itertools.chain(new.parameters(), new.buffers())
                        if t.is_floating_point()), None)
            if ref is not None:
                old.to(device=ref.device, dtype=ref.dtype)
            if isinstance(new, (PlannedConv2d, PlannedLinear)):
                merged = new.merged_weight()
                if merged.data_ptr() != old.weight.data_ptr():
                    old.weight.copy_(merged)
                if new.bias is not None and new.bias.data_ptr() != old.bias.data_ptr():
                    old.bias.copy_(new.bias)
            elif (isinstance(new, FrozenBatchNorm) and new.bias is not None
                  and new.bias.data_ptr() != old.bias.data_ptr()):
                old.bias.copy_(new.bias)
            replace_module(model, name, old)


def describe(handle: PlanHandle) -> dict[str, int]:
    """How many modules of each kind the plan replaced (for logs)."""
    counts: dict[str, int] = {}
    for module in handle.replaced.values():
        key = type(module).__name__
        if isinstance(module, (PlannedConv2d, PlannedLinear)):
            trained = module.weight_grad or module.bias_grad
            key += "(trained)" if trained else "(frozen)"
        if isinstance(module, MaskedActivation):
            key = f"MaskedActivation({module.kind})"
        if getattr(module, "fused_into", None) is not None:
            key += "(fused)"
        counts[key] = counts.get(key, 0) + 1
    return counts
