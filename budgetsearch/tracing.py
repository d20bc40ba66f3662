"""Tracing a model's forward pass into records of tensor operators.

Two tracers give the same records: :func:`trace_fx` runs a :mod:`torch.fx` trace of the model
through an interpreter, and :func:`trace_hooks` runs the model itself, recording leaf-module calls
with forward hooks and the torch functions between them with a :class:`TorchFunctionMode` (for
models fx cannot trace). Each record names the op, its kind (the key of the cost rule table), its
tensor inputs, its output tensor and kind-specific attributes. :mod:`budgetsearch.graph` turns
records into a :class:`~budgetsearch.graph.LayerGraph`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torchvision.ops import StochasticDepth

from .models.mcu import Clamp

__all__ = ["Record", "trace_fx", "trace_hooks"]

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
    (Clamp, "clamp"),  # the kind of torch.clamp, which it calls
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
class Record:
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


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, with every module type of ``_MODULE_KINDS`` kept as one call (as the
    hooks tracer records it) instead of traced through: custom ones such as the MCU ``Clamp``
    then appear under their module name."""

    leaves = tuple(cls for cls, _ in _MODULE_KINDS)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def trace_fx(model: nn.Module, example: torch.Tensor) -> list[Record]:
    gm = fx.GraphModule(model, _LeafTracer().trace(model))
    modules = dict(gm.named_modules())
    owned = _owned_storages(model)
    records: list[Record] = []
    index_of: dict[fx.Node, int] = {}
    passthrough: dict[fx.Node, list[fx.Node]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            args = []
            for a in n.all_input_nodes:  # a tuple-valued node (chunk, split) passes its inputs on
                args.extend([a] if a in index_of else passthrough.get(a, []))
            if n.op == "output":  # what the model returns: marked, for rewrites that need it
                for a in args:
                    records[index_of[a]].attrs["model_output"] = True
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
                if kind == "mul":
                    values, kw_values = self.fetch_args_kwargs_from_env(n)
                    graph = [isinstance(a, fx.Node) and a in index_of
                             for a in _operands(n.args, n.kwargs)]
                    attrs.update(_product_attrs(graph, _operands(values, kw_values), owned))
            index_of[n] = len(records)
            records.append(
                Record(n.name, kind, target, module, module_name,
                        [index_of[a] for a in args], value, attrs)
            )
            return value

    Recorder(gm, garbage_collect_values=False).run(example)
    return records


def _owned_storages(model: nn.Module) -> set[int]:
    """The storages of a model's parameters and buffers (its own tensors, not activations)."""
    return {t.untyped_storage().data_ptr()
            for t in (*model.parameters(), *model.buffers())}


def _product_attrs(graph: list[bool], values: list[Any], owned: set[int]) -> dict[str, int]:
    """A product's ``graph_operands`` (operands that are graph tensors) and ``constant_bytes``
    (tensor operands made in the forward pass, neither graph tensors nor the model's own, which
    autograd keeps for the other operand's gradient)."""
    constant = sum(v.numel() * v.element_size() for is_graph, v in zip(graph, values,
                                                                       strict=True)
                   if not is_graph and isinstance(v, torch.Tensor)
                   and v.untyped_storage().data_ptr() not in owned)
    return {"graph_operands": sum(graph), "constant_bytes": int(constant)}


def _operands(args: Any, kwargs: dict) -> list[Any]:
    """The two operands of a binary op (``x * y``, ``torch.mul(x, other=y)``, ``x.mul(y)``)."""
    return [*tuple(args)[:2], *(kwargs[k] for k in ("input", "other") if k in kwargs)]


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


def trace_hooks(model: nn.Module, example: torch.Tensor) -> list[Record]:
    records: list[Record] = [
        Record("input", "input", "input", None, None, [], example, {})
    ]
    producer: dict[int, int] = {id(example): 0}
    keep: list[torch.Tensor] = [example]  # keep tensors alive so ids stay unique
    owned = _owned_storages(model)
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
            records.append(Record(name, kind, target, module, module_name, srcs, t, attrs))

    recorder = _FunctionRecorder(None)

    def on_call(func, args, kwargs, out):
        name = _function_name(func)
        if name in _NON_TENSOR or not tensors_in(out):
            return
        if not any(id(t) in producer for t in tensors_in([args, kwargs])):
            return  # made from constants alone (a view of a buffer, torch.full): no activation
        kind = _FUNCTION_KINDS.get(name, name)
        attrs = _function_attrs(name, tuple(args), kwargs)
        if kind == "mul":
            operands = _operands(args, kwargs)
            graph = [isinstance(a, torch.Tensor) and id(a) in producer for a in operands]
            attrs.update(_product_attrs(graph, operands, owned))
        add(f"{name}_{len(records)}", kind, name, None, None, [args, kwargs], out, attrs)

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
    outputs = [producer[id(t)] for t in tensors_in(out) if id(t) in producer]
    for i in outputs:
        records[i].attrs["model_output"] = True
    return _live_records(records, outputs)


def _live_records(records: list[Record], outputs: list[int]) -> list[Record]:
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
