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

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import nn

from .errors import GraphError
from .fingerprint import TRAINABLE_LAYER_TYPES, fingerprint, layer_shapes
from .tracing import Record, trace_fx, trace_hooks

__all__ = ["Layer", "LayerGraph", "OpNode", "block_of"]

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
        attrs: Kind-specific attributes (kernel size, stride, groups, channels, probabilities...),
            and ``model_output`` (True) on the nodes whose tensors the model returns.
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
            GraphError: If the sizes are not positive integers, or the model cannot be traced or
                run on such an input.
        """
        if tracer not in ("auto", "fx", "hooks"):
            raise GraphError(f"tracer must be one of auto, fx, hooks; got {tracer!r}")
        pair = (tuple(input_size) if isinstance(input_size, (tuple, list))
                else (input_size, input_size))
        if len(pair) != 2 or not all(_positive_int(v) for v in pair):
            raise GraphError(f"input_size must be a positive integer (or a pair of them); got "
                             f"{input_size!r}")
        h, w = pair
        if not _positive_int(in_channels):
            raise GraphError(f"in_channels must be a positive integer; got {in_channels!r}")
        example = torch.randn(1, in_channels, int(h), int(w))
        modes = _modes(model)
        model.eval()
        try:
            with torch.no_grad():
                records, used = None, tracer
                if tracer in ("auto", "fx"):
                    try:
                        records = trace_fx(model, example)
                        used = "fx"
                    except Exception as exc:  # fx fails on data-dependent control flow
                        if tracer == "fx":
                            raise GraphError(f"torch.fx cannot trace the model: {exc}") from exc
                if records is None:
                    records = trace_hooks(model, example)
                    used = "hooks"
        except GraphError:
            raise
        except Exception as exc:
            raise GraphError(
                f"running the model on an input of shape {tuple(example.shape)} failed: {exc}"
            ) from exc
        finally:
            _restore_modes(modes)
        nodes = _build_nodes(records)
        if used == "fx":
            _storages_from_eager(model, example, nodes)
        layers = _find_layers(model, nodes)
        return cls(
            nodes=nodes,
            layers=layers,
            input_shape=tuple(example.shape[1:]),
            shapes=_forward_order(layer_shapes(model), layers),
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
        holds an updated parameter (docs/cost-model.md, 'Backward path'): backward runs on those
        nodes and nowhere else.
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


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Every module's training flag (``model.train(flag)`` would overwrite them all)."""
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, mode in modes.items():
        module.training = mode


def _storages_from_eager(model: nn.Module, example: torch.Tensor, nodes: list[OpNode]) -> None:
    """Take tensor storages from an eager run: fx turns an in-place ``x += y`` into an
    out-of-place add, but the model really adds in place. Only done when the eager trace has the
    same ops in the same order."""
    modes = _modes(model)
    model.eval()
    try:
        with torch.no_grad():
            eager = _build_nodes(trace_hooks(model, example))
    except Exception:  # the eager trace is a refinement; fx's storages stay
        return
    finally:
        _restore_modes(modes)
    if [(n.kind, n.inputs) for n in eager] != [(n.kind, n.inputs) for n in nodes]:
        return
    for node, truth in zip(nodes, eager, strict=True):
        node.storage, node.storage_numel = truth.storage, truth.storage_numel


def _build_nodes(records: list[Record]) -> list[OpNode]:
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


def _forward_order(shapes: dict[str, list[int]], layers: dict[str, Layer]) -> dict:
    """Layer shapes in forward order; layers the forward pass never runs come last."""
    ordered = {name: shapes[name] for name in layers if name in shapes}
    ordered.update((name, shape) for name, shape in shapes.items() if name not in ordered)
    return ordered


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


def _positive_int(value: Any) -> bool:
    """Whether ``value`` is a whole number >= 1 (an int, or a float or tensor holding one)."""
    if isinstance(value, bool):
        return False
    try:
        return int(value) == value and value >= 1
    except (TypeError, ValueError, OverflowError):
        return False
