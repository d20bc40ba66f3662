"""The layer graph: a model traced into a graph of operators with tensor shapes and storages.

A :class:`LayerGraph` is built once per model and input size. It lists every tensor operator of one
forward pass in execution order (an :class:`OpNode` each), which tensors alias one storage (in-place
activations, views), and the model's trainable layers (convs and linears, a :class:`Layer` each)
with the node that holds each layer's bias (the conv's own, or the batch norm that follows it). The
cost model, the selectors and the search all read it; nothing in it depends on a plan.

Tracing uses :mod:`torch.fx` where it works and falls back to recording leaf-module calls and the
torch functions between them while the model runs (for models with data-dependent control flow).
Shapes are recorded for a batch of one; every activation scales linearly with the batch size.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torchvision.ops import StochasticDepth

from .errors import GraphError
from .fingerprint import TRAINABLE_LAYER_TYPES, fingerprint, layer_shapes
from .models.mcu import Clamp

__all__ = ["Layer", "LayerGraph", "OpNode", "block_of"]

# Module types mapped to operator kinds, checked in order with isinstance.
_MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv2d, "conv2d"),
    (nn.Linear, "linear"),
    (nn.BatchNorm2d, "batch_norm"),
    (nn.BatchNorm1d, "batch_norm"),
    (nn.ReLU6, "hardtanh"),
    (nn.Hardtanh, "hardtanh"),
    (nn.ReLU, "relu"),
    (nn.Hardswish, "hardswish"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.Sigmoid, "sigmoid"),
    (nn.SiLU, "silu"),
    (nn.Dropout, "dropout"),
    (nn.AdaptiveAvgPool2d, "adaptive_avg_pool2d"),
    (nn.AvgPool2d, "avg_pool2d"),
    (nn.MaxPool2d, "max_pool2d"),
    (nn.Flatten, "view"),
    (nn.Identity, "view"),
    (Clamp, "clamp"),  # what fx records for it (torch.clamp), so both tracers agree
    (StochasticDepth, "stochastic_depth"),
)

# Function and method names mapped to operator kinds.
_FUNCTION_KINDS: dict[str, str] = {
    "add": "add", "add_": "add", "iadd": "add", "sub": "add",
    "mul": "mul", "mul_": "mul", "imul": "mul",
    "cat": "cat", "concat": "cat",
    "relu": "relu", "relu_": "relu", "relu6": "hardtanh", "hardtanh": "hardtanh",
    "hardtanh_": "hardtanh", "clamp": "clamp", "clamp_": "clamp", "clip": "clamp",
    "hardswish": "hardswish", "hardsigmoid": "hardsigmoid", "sigmoid": "sigmoid",
    "silu": "silu",
    "dropout": "dropout", "stochastic_depth": "stochastic_depth",
    "adaptive_avg_pool2d": "adaptive_avg_pool2d", "avg_pool2d": "avg_pool2d",
    "max_pool2d": "max_pool2d", "mean": "mean",
    "flatten": "view", "view": "view", "reshape": "view", "squeeze": "view",
    "unsqueeze": "view", "transpose": "view", "permute": "view", "contiguous": "view",
    "getitem": "view", "chunk": "view", "split": "view", "detach": "view",
    "__add__": "add", "__radd__": "add", "__iadd__": "add", "__mul__": "mul", "__rmul__": "mul",
    "__imul__": "mul", "__getitem__": "view",
}

# Nodes whose output carries no tensor and which the graph skips.
_NON_TENSOR = {"size", "dim", "floordiv", "getattr", "numel", "shape", "__get__"}


@dataclass
class OpNode:
    """One tensor operator of the forward pass.

    Attributes:
        index: Position in execution order.
        name: Unique node name (the fx node name, or a generated one).
        kind: Operator kind, the key of the cost rule table (``conv2d``, ``batch_norm``, ...).
        target: What was called, for messages (module type or function name).
        module: Qualified name of the module that ran it, if it was a module call.
        inputs: Indices of the nodes whose outputs are this op's tensor inputs, in argument order.
        shape: Output shape for a batch of one.
        itemsize: Bytes per element of the output as traced (4 for float32).
        storage: Index of the node that allocated the output's storage (itself unless the output is
            a view or an in-place result of an earlier tensor).
        storage_numel: Elements of that storage for a batch of one.
        attrs: Kind-specific attributes (kernel size, stride, groups, channels, probabilities...).
        layer: Name of the trainable layer this op is (for convs and linears), else None.
        bias_of: Name of the trainable layer whose bias this op holds (a batch norm after a
            bias-free conv, or the conv itself), else None.
    """

    index: int
    name: str
    kind: str
    target: str
    module: str | None
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    itemsize: int
    storage: int
    storage_numel: int
    attrs: dict[str, Any] = field(default_factory=dict)
    layer: str | None = None
    bias_of: str | None = None

    @property
    def numel(self) -> int:
        """Output elements for a batch of one."""
        n = 1
        for d in self.shape[1:]:
            n *= int(d)
        return n


@dataclass
class Layer:
    """A trainable layer (conv or linear) as a plan addresses it.

    Attributes:
        name: Qualified module name.
        index: Position among the model's trainable layers, in forward order.
        node: Index of the op node that runs it.
        bias_node: Index of the node that holds its bias (itself, or the batch norm after it),
            or None when it has no bias anywhere.
        bias_param: Qualified name of that bias parameter, or None.
        weight_shape: Shape of the weight (out, in / groups, kh, kw) or (out, in).
        groups: Convolution groups (1 for linear).
        block: Name of the block that contains it (see :func:`block_of`).
    """

    name: str
    index: int
    node: int
    bias_node: int | None
    bias_param: str | None
    weight_shape: tuple[int, ...]
    groups: int
    block: str

    @property
    def out_channels(self) -> int:
        """Output channels."""
        return int(self.weight_shape[0])

    @property
    def in_channels(self) -> int:
        """Input channels of the real input tensor (weight's dim 1 times groups)."""
        return int(self.weight_shape[1]) * self.groups

    @property
    def weight_numel(self) -> int:
        """Elements of the weight."""
        n = 1
        for d in self.weight_shape:
            n *= int(d)
        return n

    @property
    def bias_numel(self) -> int:
        """Elements of the bias (the output channels), or 0 without a bias."""
        return self.out_channels if self.bias_param is not None else 0


def block_of(layer_name: str) -> str:
    """The block a layer belongs to: its name up to the first numeric component (and the next one
    if that is numeric too), e.g. ``features.3.conv.0.0`` -> ``features.3``, ``layer1.0.conv1`` ->
    ``layer1.0``, ``features.2.0.block.1.0`` -> ``features.2.0``; a name without a numeric
    component is its own block."""
    parts = layer_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            end = i + 2 if i + 1 < len(parts) and parts[i + 1].isdigit() else i + 1
            return ".".join(parts[:end])
    return layer_name


class LayerGraph:
    """A traced model: op nodes in execution order, their storages, and the trainable layers.

    Build it with :meth:`from_model`. Attributes: ``nodes`` (list of :class:`OpNode`), ``layers``
    (dict of :class:`Layer` by qualified name, in forward order), ``input_shape`` (C, H, W),
    ``graph`` (a :class:`networkx.DiGraph` over node indices), ``layer_shapes`` and
    ``fingerprint`` (see :mod:`budgetsearch.fingerprint`), ``tracer`` ("fx" or "hooks").
    """

    def __init__(
        self,
        *,
        nodes: list[OpNode],
        layers: dict[str, Layer],
        input_shape: tuple[int, ...],
        shapes: dict[str, list[int]],
        tracer: str,
        model_name: str | None = None,
    ) -> None:
        self.nodes = nodes
        self.layers = layers
        self.input_shape = tuple(input_shape)
        self.layer_shapes = shapes
        self.fingerprint = fingerprint(shapes)
        self.tracer = tracer
        self.model_name = model_name
        self.graph = nx.DiGraph()
        for node in nodes:
            self.graph.add_node(node.index, kind=node.kind, name=node.name, shape=node.shape)
            for src in node.inputs:
                self.graph.add_edge(src, node.index)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        input_size: int | tuple[int, int] = 128,
        in_channels: int = 3,
        model_name: str | None = None,
        tracer: str = "auto",
    ) -> LayerGraph:
        """Trace a model into a layer graph.

        Args:
            model: Any ``nn.Module`` taking one image batch.
            input_size: Input height and width (an int for square inputs).
            in_channels: Input channels.
            model_name: Registered name of the model, recorded for messages.
            tracer: ``"fx"``, ``"hooks"`` or ``"auto"`` (fx, falling back to hooks).

        Raises:
            GraphError: If the model cannot be traced or run on such an input.
        """
        if tracer not in ("auto", "fx", "hooks"):
            raise GraphError(f"tracer must be one of auto, fx, hooks; got {tracer!r}")
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        example = torch.randn(1, in_channels, int(h), int(w))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                records, used = None, tracer
                if tracer in ("auto", "fx"):
                    try:
                        records = _trace_fx(model, example)
                        used = "fx"
                    except Exception as exc:  # fx fails on data-dependent control flow
                        if tracer == "fx":
                            raise GraphError(f"torch.fx cannot trace the model: {exc}") from exc
                if records is None:
                    records = _trace_hooks(model, example)
                    used = "hooks"
        except GraphError:
            raise
        except Exception as exc:
            raise GraphError(
                f"running the model on an input of shape {tuple(example.shape)} failed: {exc}"
            ) from exc
        finally:
            model.train(was_training)
        nodes = _build_nodes(records)
        if used == "fx":
            _storages_from_eager(model, example, nodes)
        layers = _find_layers(model, nodes)
        return cls(
            nodes=nodes,
            layers=layers,
            input_shape=tuple(example.shape[1:]),
            shapes=layer_shapes(model),
            tracer=used,
            model_name=model_name,
        )

    # ---------------------------------------------------------------------------------- queries
    @property
    def layer_names(self) -> list[str]:
        """Trainable layer names in forward order."""
        return list(self.layers)

    def blocks(self) -> dict[str, list[str]]:
        """Trainable layers grouped by block, both in forward order."""
        out: dict[str, list[str]] = {}
        for layer in self.layers.values():
            out.setdefault(layer.block, []).append(layer.name)
        return out

    def requires_grad(self, trainable_nodes: Iterable[int]) -> list[bool]:
        """Whether each node's output requires grad when the given nodes hold trainable parameters.

        A node's output needs a gradient exactly when the node itself or some node upstream of it
        holds an updated parameter (methods.md §1): backward runs on those nodes and nowhere else.
        """
        trainable = set(trainable_nodes)
        out = [False] * len(self.nodes)
        for node in self.nodes:
            out[node.index] = node.index in trainable or any(out[i] for i in node.inputs)
        return out

    def backward_nodes(self, updated_layers: Iterable[str]) -> list[int]:
        """Indices of the nodes where backward runs when the given layers are updated (weights or
        biases)."""
        trainable = set()
        for name in updated_layers:
            layer = self._layer(name)
            trainable.add(layer.node)
            if layer.bias_node is not None:
                trainable.add(layer.bias_node)
        flags = self.requires_grad(trainable)
        return [i for i, flag in enumerate(flags) if flag]

    def _layer(self, name: str) -> Layer:
        try:
            return self.layers[name]
        except KeyError:
            raise GraphError(
                f"the model has no trainable layer {name!r}; layers are: "
                f"{', '.join(self.layers)}"
            ) from None

    def __repr__(self) -> str:
        return (
            f"LayerGraph({self.model_name or 'model'}, {len(self.nodes)} ops, "
            f"{len(self.layers)} trainable layers, input {self.input_shape}, tracer={self.tracer})"
        )


# --------------------------------------------------------------------------------------- tracing
@dataclass
class _Record:
    name: str
    kind: str
    target: str
    module: nn.Module | None
    module_name: str | None
    inputs: list[int]  # indices into the record list
    value: torch.Tensor
    attrs: dict[str, Any]


def _kind_of_module(module: nn.Module) -> str:
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    return type(module).__name__


def _module_attrs(module: nn.Module) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if isinstance(module, nn.Conv2d):
        attrs.update(
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            groups=module.groups,
            has_bias=module.bias is not None,
        )
    elif isinstance(module, nn.Linear):
        attrs.update(
            in_channels=module.in_features,
            out_channels=module.out_features,
            kernel_size=(1, 1),
            groups=1,
            has_bias=module.bias is not None,
        )
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        attrs.update(channels=module.num_features, affine=module.affine)
    elif isinstance(module, nn.Dropout):
        attrs.update(p=module.p)
    elif isinstance(module, StochasticDepth):
        attrs.update(p=module.p, mode=module.mode)
    elif isinstance(module, nn.AdaptiveAvgPool2d):
        attrs.update(output_size=module.output_size)
    elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        attrs.update(kernel_size=module.kernel_size, stride=module.stride)
    return attrs


def _function_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def _trace_fx(model: nn.Module, example: torch.Tensor) -> list[_Record]:
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    records: list[_Record] = []
    index_of: dict[fx.Node, int] = {}
    passthrough: dict[fx.Node, list[fx.Node]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            args = []
            for a in n.all_input_nodes:  # a tuple-valued node (chunk, split) passes its inputs on
                args.extend([a] if a in index_of else passthrough.get(a, []))
            if n.op in ("output", "get_attr") or not isinstance(value, torch.Tensor):
                if isinstance(value, (tuple, list)):
                    passthrough[n] = args
                return value
            if n.op == "placeholder":
                kind, target, module, module_name, attrs = "input", "input", None, None, {}
            elif n.op == "call_module":
                module = modules[n.target]
                kind, target = _kind_of_module(module), type(module).__name__
                module_name, attrs = str(n.target), _module_attrs(module)
            else:
                name = _function_name(n.target)
                kind = _FUNCTION_KINDS.get(name, name)
                target, module, module_name = name, None, None
                attrs = _function_attrs(name, n.args, n.kwargs)
            index_of[n] = len(records)
            records.append(
                _Record(n.name, kind, target, module, module_name,
                        [index_of[a] for a in args], value, attrs)
            )
            return value

    _Recorder(gm, garbage_collect_values=False).run(example)
    return records


def _function_attrs(name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if name in ("dropout", "stochastic_depth"):
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        attrs["p"] = float(p) if isinstance(p, (int, float)) else 0.5
        if name == "stochastic_depth":
            attrs["mode"] = kwargs.get("mode", args[2] if len(args) > 2 else "row")
    if name == "adaptive_avg_pool2d":
        attrs["output_size"] = kwargs.get("output_size", args[1] if len(args) > 1 else None)
    return attrs


class _FunctionRecorder(TorchFunctionMode):
    """Records torch functions called outside leaf modules (the hook tracer's glue ops)."""

    def __init__(self, on_call: Any) -> None:
        super().__init__()
        self.on_call = on_call
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            self.on_call(func, args, kwargs, out)
        return out


def _trace_hooks(model: nn.Module, example: torch.Tensor) -> list[_Record]:
    records: list[_Record] = [
        _Record("input", "input", "input", None, None, [], example, {})
    ]
    producer: dict[int, int] = {id(example): 0}
    keep: list[torch.Tensor] = [example]  # keep tensors alive so ids stay unique
    leaves = {
        name: m for name, m in model.named_modules() if not list(m.children()) and name
    }

    def tensors_in(obj: Any) -> list[torch.Tensor]:
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, (list, tuple)):
            return [t for o in obj for t in tensors_in(o)]
        if isinstance(obj, dict):
            return [t for o in obj.values() for t in tensors_in(o)]
        return []

    def add(name, kind, target, module, module_name, inputs, out, attrs):
        srcs = [producer[id(t)] for t in tensors_in(inputs) if id(t) in producer]
        for t in tensors_in(out):
            producer[id(t)] = len(records)
            keep.append(t)
            records.append(_Record(name, kind, target, module, module_name, srcs, t, attrs))

    recorder = _FunctionRecorder(None)

    def on_call(func, args, kwargs, out):
        name = _function_name(func)
        if name in _NON_TENSOR or not tensors_in(out):
            return
        kind = _FUNCTION_KINDS.get(name, name)
        add(f"{name}_{len(records)}", kind, name, None, None, [args, kwargs], out,
            _function_attrs(name, tuple(args), kwargs))

    recorder.on_call = on_call
    handles = []

    def pre(module, args):
        recorder.depth += 1

    def make_post(name: str):
        def post(module, args, out):
            recorder.depth -= 1
            add(name.replace(".", "_"), _kind_of_module(module), type(module).__name__,
                module, name, args, out, _module_attrs(module))
        return post

    try:
        for name, module in leaves.items():
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(make_post(name)))
        with recorder:
            out = model(example)
    finally:
        for handle in handles:
            handle.remove()
    return _live_records(records, [producer[id(t)] for t in tensors_in(out) if id(t) in producer])


def _live_records(records: list[_Record], outputs: list[int]) -> list[_Record]:
    """The records the outputs depend on (and the input), renumbered: drops control-flow glue such
    as ``x.sum() > 0`` that the hooks tracer sees but that feeds no output."""
    if not outputs:
        return records
    live, stack = {0}, list(outputs)
    while stack:
        i = stack.pop()
        if i not in live:
            live.add(i)
            stack.extend(records[i].inputs)
    renumber = {old: new for new, old in enumerate(sorted(live))}
    kept = [records[i] for i in sorted(live)]
    for rec in kept:
        rec.inputs = [renumber[i] for i in rec.inputs]
    return kept


def _storages_from_eager(model: nn.Module, example: torch.Tensor, nodes: list[OpNode]) -> None:
    """Take tensor storages from an eager run: fx turns an in-place ``x += y`` into an
    out-of-place add, but the model really adds in place. Only done when the eager trace has the
    same ops in the same order."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            eager = _build_nodes(_trace_hooks(model, example))
    except Exception:  # the eager trace is a refinement; fx's storages stay
        return
    finally:
        model.train(was_training)
    if [(n.kind, n.inputs) for n in eager] != [(n.kind, n.inputs) for n in nodes]:
        return
    for node, truth in zip(nodes, eager, strict=True):
        node.storage, node.storage_numel = truth.storage, truth.storage_numel


def _build_nodes(records: list[_Record]) -> list[OpNode]:
    nodes: list[OpNode] = []
    owner: dict[int, int] = {}  # storage data_ptr -> index of the node that allocated it
    for i, rec in enumerate(records):
        t = rec.value
        if t.dim() == 0 or t.shape[0] != 1:
            raise GraphError(
                f"op {rec.name} ({rec.target}) gives a tensor of shape {tuple(t.shape)} without a "
                "leading batch dimension of 1; budgetsearch needs per-sample activations"
            )
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        root = owner.setdefault(ptr, i)
        root_numel = storage.nbytes() // t.element_size()
        attrs = dict(rec.attrs)
        if rec.kind == "adaptive_avg_pool2d" and rec.inputs:
            src = records[rec.inputs[0]].value
            attrs["global"] = tuple(t.shape[2:]) == (1, 1) and src.dim() == 4
        nodes.append(
            OpNode(
                index=i,
                name=rec.name,
                kind=rec.kind,
                target=rec.target,
                module=rec.module_name,
                inputs=tuple(rec.inputs),
                shape=tuple(int(d) for d in t.shape),
                itemsize=t.element_size(),
                storage=root,
                storage_numel=int(root_numel),
                attrs=attrs,
            )
        )
    return nodes


def _find_layers(model: nn.Module, nodes: list[OpNode]) -> dict[str, Layer]:
    modules = dict(model.named_modules())
    users: dict[int, list[int]] = {}
    for node in nodes:
        for src in node.inputs:
            users.setdefault(src, []).append(node.index)
    layers: dict[str, Layer] = {}
    for node in nodes:
        if node.kind not in ("conv2d", "linear") or node.module is None:
            continue
        module = modules[node.module]
        if not isinstance(module, TRAINABLE_LAYER_TYPES):
            continue
        if node.module in layers:
            raise GraphError(
                f"layer {node.module} runs more than once in a forward pass; budgetsearch plans "
                "need each trainable layer to run once"
            )
        bias_node, bias_param = None, None
        if getattr(module, "bias", None) is not None:
            bias_node, bias_param = node.index, f"{node.module}.bias"
        else:
            nxt = users.get(node.index, [])
            if len(nxt) == 1 and nodes[nxt[0]].kind == "batch_norm":
                bn = nodes[nxt[0]]
                bn_module = modules[bn.module] if bn.module else None
                if bn_module is not None and getattr(bn_module, "bias", None) is not None:
                    bias_node, bias_param = bn.index, f"{bn.module}.bias"
                    bn.bias_of = node.module
        node.layer = node.module
        if bias_node == node.index:
            node.bias_of = node.module
        groups = int(getattr(module, "groups", 1))
        layers[node.module] = Layer(
            name=node.module,
            index=len(layers),
            node=node.index,
            bias_node=bias_node,
            bias_param=bias_param,
            weight_shape=tuple(int(d) for d in module.weight.shape),
            groups=groups,
            block=block_of(node.module),
        )
    if not layers:
        raise GraphError("the model has no conv or linear layer that a plan could update")
    return layers
