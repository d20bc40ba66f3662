"""A planned model's training step as an ExecuTorch program (``budgetsearch export --format
executorch``), for phones and other devices that run ExecuTorch rather than PyTorch.

What :func:`to_executorch` writes into ``out_dir``:

- ``training.pte``: the training step of ExecuTorch's (experimental) training API,
  :mod:`executorch.extension.training`: method ``forward`` takes the input batch (or the frozen
  prefix's outputs, below) and the labels and returns the cross-entropy loss, the gradients of
  the plan's trainable tensors, and those tensors; the runtime's SGD
  (``executorch::extension::training::optimizer::SGD``, ``get_sgd_optimizer`` in Python) updates
  them in place. Only the plan's trainable tensors have gradients: the model is planned with
  :func:`~budgetsearch.trainer.apply_plan` (frozen weights become buffers, every other parameter
  is frozen) before ``torch.export``, so frozen tensors are constants of the program.
- ``prefix.pte`` (``prefix="xnnpack"``, when the plan leaves a frozen prefix): the layers in
  front of the first trained one, an inference program delegated to XNNPACK; its outputs are the
  training program's first inputs. Only the frozen part is delegated: trained layers run on
  ExecuTorch's portable kernels (XNNPACK-delegated training layers gave NaN losses from the
  second step when this was tried).
- ``manifest.json``: the programs (with each file's SHA-256), their inputs (batch size and
  input size of the plan), the optimizer settings, and for each of the plan's layers the names
  of its tensors in the program (``model.<layer>.weight``, ``model.<layer>.weight_slice`` for a
  channel subset, or the bias of the batch norm that holds the layer's bias). It is written
  last, after both programs are built; :class:`ExecuTorchTrainer` refuses a program file whose
  digest is not the manifest's (a folder holding parts of two exports).

How the operators get there: budgetsearch's training operators are PyTorch custom ops with their
own backward (:mod:`budgetsearch.ops._library`); non-strict ``torch.export`` keeps each as one
node, and the joint forward-backward trace of ``torch.export.experimental`` writes out the
operator's backward in plain ATen operators. ExecuTorch has no kernel for the operators' own
forward node, so a graph pass replaces each by its plain forward (:data:`IMPLS`), and tensor
constants the backward creates (channel indices) are lifted into program constants. The result
runs on ExecuTorch's portable kernels; :class:`ExecuTorchTrainer` runs it from Python.

The export needs the ``executorch`` extra (``pip install 'budgetsearch[executorch]'``); the rest
of budgetsearch does not.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._io import atomic_write_bytes, atomic_write_text
from ..errors import ExportError
from ..graph import LayerGraph
from ..ops._library import IMPLS, NAMESPACE
from ..plan import Plan

__all__ = [
    "EXECUTORCH_EXTRA",
    "EXECUTORCH_FORMAT",
    "PREFIX_MODES",
    "ExecuTorchExport",
    "ExecuTorchTrainer",
    "executorch_available",
    "to_executorch",
]

#: The ``format`` field of the manifest.
EXECUTORCH_FORMAT = "budgetsearch-executorch-training/1"
#: The extra that installs ExecuTorch.
EXECUTORCH_EXTRA = "executorch"
#: How the frozen prefix runs: ``xnnpack`` (its own XNNPACK inference program) or ``none`` (in
#: the training program, on portable kernels).
PREFIX_MODES = ("xnnpack", "none")
PrefixMode = Literal["xnnpack", "none"]

MANIFEST = "manifest.json"
TRAINING_FILE = "training.pte"
PREFIX_FILE = "prefix.pte"
_ROOT = "model"  # the planned model's attribute in the exported loss module: names are model.*


def executorch_available() -> bool:
    """Whether the ``executorch`` package is installed."""
    return importlib.util.find_spec("executorch") is not None


def _require_executorch() -> None:
    if not executorch_available():
        raise ExportError(
            "--format executorch needs the ExecuTorch package, which is not installed: "
            f"pip install 'budgetsearch[{EXECUTORCH_EXTRA}]'")


# ----------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class ExecuTorchExport:
    """What :func:`to_executorch` wrote.

    Attributes:
        out_dir: The folder.
        training: Path of the training program.
        prefix: Path of the frozen prefix's inference program, or None.
        manifest: The manifest (also written as ``manifest.json``).
    """

    out_dir: Path
    training: Path
    prefix: Path | None
    manifest: dict[str, Any] = field(repr=False)


# -------------------------------------------------------------------------------- modules
class _Loss(nn.Module):
    """``cross_entropy(model(*inputs), labels)``: the program's loss (mean over the batch)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Tensor) -> Tensor:
        *inputs, labels = args
        return F.cross_entropy(self.model(*inputs), labels)


def _optimizer(plan: Plan, *, optimizer: str | None, lr: float | None,
               momentum: float | None, weight_decay: float | None) -> dict[str, Any]:
    recipe = plan.recipe
    name = optimizer or (recipe.optimizer if recipe is not None else plan.optimizer)
    if name not in ("sgd", "momentum"):
        raise ExportError(
            f"optimizer {name!r}: ExecuTorch's training runtime has SGD only; allowed: sgd, "
            "momentum (pass --optimizer sgd or momentum to export this plan)")
    if lr is None:
        lr = recipe.lr if recipe is not None else 0.01
    if momentum is None:
        momentum = (recipe.momentum if recipe is not None else 0.9) if name == "momentum" else 0.0
    if weight_decay is None:
        weight_decay = recipe.weight_decay if recipe is not None else 0.0
    for key, value, ok, allowed in (("lr", lr, lr > 0, "> 0"),
                                    ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
                                    ("weight_decay", weight_decay, weight_decay >= 0, ">= 0")):
        if not ok:
            raise ExportError(f"optimizer field {key!r} must be {allowed}; got {value!r}")
    return {"name": "sgd", "lr": float(lr), "momentum": float(momentum), "dampening": 0.0,
            "weight_decay": float(weight_decay), "nesterov": False}


def _in_channels(plan: Plan) -> int:
    first = next(iter(plan.layer_shapes.values()), None)
    return int(first[1]) if first is not None and len(first) == 4 else 3


def _head_classes(model: nn.Module, inputs: Tensor) -> int:
    with torch.no_grad():
        out = model(inputs[:1])
    if out.dim() != 2:
        raise ExportError(f"the model's output has shape {tuple(out.shape)}; the training step "
                          "needs class scores of shape (batch, classes) for its cross-entropy "
                          "loss")
    return int(out.shape[1])


# ----------------------------------------------------------------------------- graph passes
def _inline_forwards(gm: torch.fx.GraphModule) -> int:
    """Replace every ``budgetsearch::`` node by its plain forward (traced from :data:`IMPLS`
    on the node's fake tensors), in place; returns how many. Tensor constants of the forward
    become attributes of ``gm`` (to be lifted)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils import _pytree as pytree

    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not str(node.target).startswith(f"{NAMESPACE}."):
            continue
        impl = IMPLS[node.target._opname]  # type: ignore[union-attr]
        flat, spec = pytree.tree_flatten((node.args, node.kwargs))
        where = [i for i, a in enumerate(flat) if isinstance(a, torch.fx.Node)]

        def forward(*tensors: Tensor, flat: list = flat, where: list = where, spec: Any = spec,
                    impl: Callable[..., Tensor] = impl) -> Tensor:
            values = list(flat)
            for i, t in zip(where, tensors, strict=True):
                values[i] = t
            args, kwargs = pytree.tree_unflatten(values, spec)
            return impl(*args, **kwargs)

        sub = make_fx(forward, tracing_mode="fake")(*[flat[i].meta["val"] for i in where])
        mutating = [n for n in sub.graph.nodes
                    if n.op == "call_function" and getattr(n.target, "_schema", None) is not None
                    and n.target._schema.is_mutable]
        if mutating:  # the forwards run out of place while tracing (ops._library.is_eager)
            raise ExportError(f"the forward of {node.target} writes in place while traced "
                              f"({', '.join(str(n.target) for n in mutating)})")
        env = {ph: flat[i] for ph, i in zip(
            [n for n in sub.graph.nodes if n.op == "placeholder"], where, strict=True)}
        with graph.inserting_before(node):
            out = graph.graph_copy(sub.graph, env)
        for n in sub.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            new = env[n]
            if n.op == "get_attr":
                name = f"_{NAMESPACE}_constant_{len(list(gm.named_buffers()))}_{count}_{n.target}"
                setattr(gm, name, getattr(sub, n.target))
                new.target = name
            for key, value in node.meta.items():  # module stack, stack trace: the op's
                if key not in ("val", "tensor_meta"):
                    new.meta.setdefault(key, value)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    graph.lint()
    gm.recompile()
    return count


def _joint_program(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The forward-backward program of a loss program (output 0), with the operators' forwards
    inlined: ``torch.export.experimental._export_forward_backward``, whose verifier refuses the
    tensor constants that a custom op's backward creates before they can be lifted, with the
    inlining and lifting in between."""
    from torch._decomp import core_aten_decompositions
    from torch._export.passes.lift_constants_pass import ConstantAttrMap, lift_constants_pass
    from torch.export.experimental import _copy_graph_module_and_signature, _remove_detach_pass
    from torch.export.exported_program import (
        ExportedProgram,
        _decompose_and_get_gm_with_new_signature_constants,
        _get_updated_module_call_graph,
        _get_updated_range_constraints,
    )

    gm, signature, state_dict, constants = _decompose_and_get_gm_with_new_signature_constants(
        ep, cia_to_decomp={}, python_decomp_table=core_aten_decompositions(),
        joint_loss_index=0, decompose_custom_triton_ops=False)
    _inline_forwards(gm)
    constants = dict(constants)
    constants.update(lift_constants_pass(gm, signature, ConstantAttrMap()))
    call_graph = _get_updated_module_call_graph(ep.graph_module, ep.graph_signature, gm,
                                                signature, ep.module_call_graph)
    gm.meta.update(ep.graph_module.meta)
    joint = ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=signature, state_dict=state_dict,
        range_constraints=_get_updated_range_constraints(gm, ep.range_constraints),
        module_call_graph=call_graph, example_inputs=ep.example_inputs, constants=constants)
    gm, signature = _copy_graph_module_and_signature(joint)
    _remove_detach_pass(gm, signature)
    return joint._update(gm, signature)


def _own_attributes(split: torch.fx.GraphModule, call: torch.fx.Node,
                    sub: torch.fx.GraphModule) -> list[Any]:
    """Make the weights and buffers that ``split`` passes to the submodule ``sub`` (called by
    ``call``) attributes of ``sub`` under their qualified names; returns the other arguments
    (placeholder names, or the nodes of the top-level graph for other values)."""
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    rest: list[Any] = []
    for ph, arg in zip(placeholders, call.args, strict=True):
        if getattr(arg, "op", None) == "get_attr":
            _set_attr(sub, arg.target, _attr(split, arg.target))
            with sub.graph.inserting_before(ph):
                node = sub.graph.get_attr(arg.target)
            node.meta = dict(ph.meta)
            ph.replace_all_uses_with(node)
            sub.graph.erase_node(ph)
        else:
            rest.append(arg.target if getattr(arg, "op", None) == "placeholder" else arg)
    sub.recompile()
    return rest


def _attr(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _set_attr(module: nn.Module, target: str, value: Any) -> None:
    *path, name = target.split(".")
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(value, nn.Parameter):
        module.register_parameter(name, value)
    else:
        module.register_buffer(name, value)


def _split_prefix(gm: torch.fx.GraphModule, trainable: set[str]
                  ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, int] | None:
    """Split the loss module's graph (``ep.module()``, called as ``(batch, labels)``) into the
    frozen prefix (what depends on the batch through no trainable tensor) and the rest; None
    when the prefix holds no convolution or matrix product. Returns (prefix, rest, number of
    prefix outputs): the prefix maps the batch to its outputs, the rest maps them and the
    labels to the loss."""
    from torch.fx.passes.split_module import split_module

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 2:
        return None
    batch, labels = placeholders
    rest: set[torch.fx.Node] = {labels}
    reach: set[torch.fx.Node] = {batch}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in trainable:
            rest.add(node)
        elif node.op == "call_function":
            inputs = node.all_input_nodes
            if any(a in rest for a in inputs):
                rest.add(node)
            elif any(a in reach for a in inputs):
                reach.add(node)
    prefix = {n for n in reach if n.op == "call_function"}
    heavy = ("convolution", "conv2d", "linear", "addmm", ".mm.")
    if not any(any(h in str(n.target) for h in heavy) for n in prefix):
        return None
    # what reads neither the batch nor a trained tensor (a frozen weight reshaped, say) goes
    # with the prefix when the prefix reads it, so that the rest never feeds the prefix
    for node in reversed(gm.graph.nodes):
        if (node.op == "call_function" and node not in rest and node not in prefix
                and any(u in prefix for u in node.users)):
            prefix.add(node)
    split = split_module(gm, None, lambda n: 0 if n in prefix else 1, keep_original_order=True)
    calls = {n.target: n for n in split.graph.nodes if n.op == "call_module"}
    head_call, tail_call = calls["submod_0"], calls["submod_1"]
    head_args = _own_attributes(split, head_call, split.submod_0)
    if head_args != [batch.target]:
        raise ExportError(f"cannot split the frozen prefix: it reads {head_args}")
    tail_args = _own_attributes(split, tail_call, split.submod_1)
    outs = next(n for n in split.submod_0.graph.nodes if n.op == "output").args[0]
    count = len(outs) if isinstance(outs, (tuple, list)) else 1
    order: list[int | None] = []  # per input of the rest: a prefix output's index or labels
    for arg in tail_args:
        if arg is head_call:
            order.append(0)
        elif getattr(arg, "target", None) is operator.getitem and arg.args[0] is head_call:
            order.append(int(arg.args[1]))
        elif arg == labels.target:
            order.append(None)
        else:
            raise ExportError(f"cannot split the frozen prefix: the training part reads {arg}")
    head, tail = split.submod_0, split.submod_1
    if not isinstance(outs, (tuple, list)):  # the prefix returns a tuple in every case
        out_node = next(n for n in head.graph.nodes if n.op == "output")
        out_node.args = ((out_node.args[0],),)
        head.recompile()
    _reorder_inputs(tail, order, count)
    return head, tail, count


def _reorder_inputs(gm: torch.fx.GraphModule, order: list[int | None], count: int) -> None:
    """Make ``gm`` take ``(prefix output 0, ..., prefix output count-1, labels)``, where its
    i-th input is prefix output ``order[i]`` (None: the labels)."""
    old = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next(iter(gm.graph.nodes))
    with gm.graph.inserting_before(first):
        new = [gm.graph.placeholder(f"prefix_output_{i}") for i in range(count)]
        new.append(gm.graph.placeholder("labels"))
    for ph, i in zip(old, order, strict=True):
        target = new[-1] if i is None else new[i]
        target.meta = dict(ph.meta)
        ph.replace_all_uses_with(target)
        gm.graph.erase_node(ph)
    gm.graph.lint()
    gm.recompile()


# ---------------------------------------------------------------------------------- export
def to_executorch(
    plan: Plan,
    *,
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    graph: LayerGraph | None = None,
    prefix: PrefixMode = "xnnpack",
    optimizer: str | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    filter_mode: str | None = None,
    dropout: bool = True,
) -> ExecuTorchExport:
    """Export a planned model's training step as ExecuTorch programs (see the module docstring
    for the files).

    The model is copied and planned with :func:`~budgetsearch.trainer.apply_plan` (batch norm
    frozen, the plan's filter mode); ``model`` itself is not changed. The programs are traced at
    the plan's batch size and input size; the labels are class indices (int64).

    Args:
        plan: The plan; it must have been made for ``model``.
        model: The model with the weights to start training from.
        out_dir: Folder to write to (created; existing files of the same names are replaced).
        graph: The model's layer graph at the plan's input size, if already traced.
        prefix: ``"xnnpack"``: the frozen layers in front of the first trained one as their own
            XNNPACK inference program (when they hold a conv or matrix product); ``"none"``:
            everything in the training program.
        optimizer: ``"sgd"`` or ``"momentum"``; the plan's recipe's (or the plan's) by default.
        lr: Learning rate (default: the recipe's, else 0.01).
        momentum: Momentum of ``"momentum"`` (default: the recipe's, else 0.9).
        weight_decay: Weight decay (default: the recipe's, else 0).
        filter_mode: Gradient-filter variant (``normalized``, ``paper``, ``corrected``); the
            plan's by default.
        dropout: Keep the model's dropout layers in training mode (as ``budgetsearch train``
            does; the runtime draws its own random masks); False turns them off, which makes
            the step deterministic (the same losses as eager PyTorch with dropout off).

    Returns:
        The paths written and the manifest.

    Raises:
        ExportError: ExecuTorch is not installed (the message names the extra), the plan trains
            nothing, its optimizer is Adam (the runtime has SGD only), an option is out of
            range, or a program cannot be built.
        PlanError: The plan does not fit the model.

    Example:
        The classifier and the last conv's bias of MCUNet, exported and trained for one step
        through ExecuTorch's runtime (needs the ``executorch`` extra)::

            from budgetsearch import LayerGraph, LayerUpdate, Plan, load_model
            from budgetsearch.export import ExecuTorchTrainer, to_executorch

            model = load_model("mcunet-5fps", num_classes=10)
            graph = LayerGraph.from_model(model, input_size=64)
            plan = Plan.from_layers(graph, {"classifier": LayerUpdate("weight"),
                                            "blocks.13.pointwise2": LayerUpdate("bias")},
                                    batch_size=4)
            to_executorch(plan, model=model, out_dir="et", graph=graph)
            trainer = ExecuTorchTrainer("et")
            loss = trainer.step(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
    """
    _require_executorch()
    if prefix not in PREFIX_MODES:
        raise ExportError(f"prefix must be one of {', '.join(PREFIX_MODES)}; got {prefix!r}")
    if not plan.updates:
        raise ExportError("the plan trains no layer: there is no training step to export")
    opt = _optimizer(plan, optimizer=optimizer, lr=lr, momentum=momentum,
                     weight_decay=weight_decay)
    from ..trainer import apply_plan

    planned = copy.deepcopy(model).float().cpu()
    handle = apply_plan(planned, plan, graph=graph, filter_mode=filter_mode, bn="frozen")
    if not dropout:
        for m in planned.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
    out = Path(out_dir)
    height, width = (int(v) for v in plan.input_size)
    batch = torch.zeros(plan.batch_size, _in_channels(plan), height, width)
    classes = _head_classes(planned, batch)
    labels = torch.zeros(plan.batch_size, dtype=torch.long)
    trainable = {f"{_ROOT}.{name}" for name, _ in handle.named_parameters()}
    loss_module = _Loss(planned)
    try:
        ep = torch.export.export(loss_module, (batch, labels), strict=False)
    except Exception as exc:  # any tracing failure is the model's
        raise ExportError(f"torch.export of the planned model failed: {exc}") from exc
    split = _split_prefix(ep.module(), trainable) if prefix == "xnnpack" else None
    prefix_path: Path | None = None
    prefix_doc: dict[str, Any] | None = None
    if split is None:
        training_module, training_inputs = loss_module, (batch, labels)
        input_names = ["input", "labels"]
    else:
        head, training_module, count = split
        with torch.no_grad():
            prefix_outs = head(batch)
        prefix_bytes, prefix_planned = _prefix_program(head, batch)
        training_inputs = (*prefix_outs, labels)
        input_names = [f"prefix_output_{i}" for i in range(count)] + ["labels"]
        prefix_doc = {
            "file": PREFIX_FILE, "method": "forward", "backend": "XnnpackBackend",
            "bytes": len(prefix_bytes), "sha256": hashlib.sha256(prefix_bytes).hexdigest(),
            "planned_memory_bytes": prefix_planned,
            "inputs": [_tensor_doc("input", batch)],
            "outputs": [_tensor_doc(f"prefix_output_{i}", t) for i, t in enumerate(prefix_outs)],
        }
    program, fqns, planned_memory = _training_program(training_module, training_inputs)
    if set(fqns) != trainable:  # the program trains exactly the plan's tensors
        raise ExportError(
            "the training program's gradients do not match the plan's trainable tensors: "
            f"missing {sorted(trainable - set(fqns))}, extra {sorted(set(fqns) - trainable)}")
    manifest = {
        "format": EXECUTORCH_FORMAT,
        "model": plan.model,
        "plan_fingerprint": plan.fingerprint,
        "batch_size": plan.batch_size,
        "input_size": [height, width],
        "in_channels": int(batch.shape[1]),
        "num_classes": classes,
        "loss": "cross_entropy (mean over the batch)",
        "bn": "frozen",
        "dropout": dropout,
        "filter_mode": handle.filter_mode,
        "optimizer": opt,
        "programs": {
            "prefix": prefix_doc,
            "training": {
                "file": TRAINING_FILE, "method": "forward", "bytes": len(program),
                "sha256": hashlib.sha256(program).hexdigest(),
                "planned_memory_bytes": planned_memory,
                "inputs": [_tensor_doc(n, t) for n, t in zip(input_names, training_inputs,
                                                             strict=True)],
                "parameters": list(fqns),
            },
        },
        "layers": _layer_docs(plan, handle, trainable),
        "versions": _versions(),
    }
    handle.remove()
    # Every program is built before anything is written, and the manifest (written last)
    # records each file's digest: a folder whose files come from two exports (one killed
    # between its writes) is refused when loaded, not run.
    prefix_path = (None if split is None
                   else atomic_write_bytes(out / PREFIX_FILE, prefix_bytes))
    training_path = atomic_write_bytes(out / TRAINING_FILE, program)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return ExecuTorchExport(out_dir=out, training=training_path, prefix=prefix_path,
                            manifest=manifest)


def _tensor_doc(name: str, t: Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from .._version import __version__

    out = {"budgetsearch": __version__, "torch": torch.__version__}
    with contextlib.suppress(PackageNotFoundError):  # checked by _require_executorch
        out["executorch"] = version("executorch")
    return out


def _planned_bytes(program: Any) -> int:
    """Bytes of the memory-planned buffers (activations, gradients) of a program's methods."""
    return int(sum(sum(plan.non_const_buffer_sizes)
                   for plan in program.executorch_program.execution_plan))


def _training_program(module: nn.Module, inputs: tuple[Tensor, ...]
                      ) -> tuple[bytes, list[str], int]:
    """The .pte bytes of the training step, its trainable tensors' names (in order) and its
    memory-planned bytes."""
    from executorch.exir import EdgeCompileConfig, to_edge

    try:
        ep = torch.export.export(module, inputs, strict=False)
        joint = _joint_program(ep)
        edge = to_edge(joint, compile_config=EdgeCompileConfig(_check_ir_validity=False))
        program = edge.to_executorch()
    except ExportError:
        raise
    except Exception as exc:  # torch.export / ExecuTorch lowering
        raise ExportError(f"building the ExecuTorch training program failed: {exc}") from exc
    fqns = [spec.target for spec in joint.graph_signature.output_specs
            if spec.kind.name == "GRADIENT_TO_PARAMETER"]
    return program.buffer, fqns, _planned_bytes(program)


def _prefix_program(module: torch.fx.GraphModule, batch: Tensor) -> tuple[bytes, int]:
    """The .pte bytes of the frozen prefix, delegated to XNNPACK (its custom ops, if any,
    replaced by their plain forwards), and its memory-planned bytes (beside XNNPACK's own)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        _inline_forwards(module)
        with torch.no_grad():
            ep = torch.export.export(module, (batch,), strict=False)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        program = edge.to_executorch()
        return program.buffer, _planned_bytes(program)
    except Exception as exc:  # torch.export / ExecuTorch lowering
        raise ExportError(f"building the XNNPACK prefix program failed: {exc}") from exc


def _layer_docs(plan: Plan, handle: Any, names: set[str]) -> dict[str, Any]:
    layers: dict[str, Any] = {}
    for layer, update in plan.updates.items():
        doc = update.to_dict()
        tensors: dict[str, str] = {}
        info = handle.graph.layers[layer]
        for role, qual in (("weight", f"{layer}.weight"), ("weight_slice", f"{layer}.weight_slice"),
                           ("bias", info.bias_param)):
            if qual is not None and f"{_ROOT}.{qual}" in names:
                tensors[role] = f"{_ROOT}.{qual}"
        doc["tensors"] = tensors
        doc["weight_shape"] = list(plan.layer_shapes[layer])
        layers[layer] = doc
    return layers


def _check_digest(program: Path, expected: str, manifest: Path) -> None:
    """Refuse a program file whose contents are not the ones its manifest records."""
    try:
        actual = hashlib.sha256(program.read_bytes()).hexdigest()
    except OSError as exc:
        raise ExportError(f"{program}: cannot read the program {manifest} names ({exc})"
                          ) from exc
    if actual != expected:
        raise ExportError(f"{program}: its contents are not the ones {manifest} records "
                          f"(sha256 {actual[:12]}…, expected {expected[:12]}…): the folder holds "
                          "parts of two exports; export again")


# ---------------------------------------------------------------------------------- runtime
class ExecuTorchTrainer:
    """Runs an exported training step through ExecuTorch's Python runtime: the prefix program
    (if any), the training program's forward and backward, and the runtime's SGD update.

    Args:
        out_dir: The folder :func:`to_executorch` wrote.

    Raises:
        ExportError: ExecuTorch is not installed, or the folder holds no readable export.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        _require_executorch()
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import _load_for_executorch_for_training

        folder = Path(out_dir)
        path = folder / MANIFEST
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ExportError(f"{path}: cannot read the manifest ({exc})") from exc
        if self.manifest.get("format") != EXECUTORCH_FORMAT:
            raise ExportError(f"{path}: field 'format' is {self.manifest.get('format')!r}, "
                              f"expected {EXECUTORCH_FORMAT!r}")
        programs = self.manifest["programs"]
        for doc in (programs.get("prefix"), programs["training"]):
            if doc is not None and doc.get("sha256") is not None:
                _check_digest(folder / doc["file"], doc["sha256"], path)
        prefix = programs.get("prefix")
        self.prefix = (None if prefix is None
                       else _load_for_executorch(str(folder / prefix["file"])))
        self.training = _load_for_executorch_for_training(
            str(folder / programs["training"]["file"]))
        self._optimizer: Any = None

    def step(self, inputs: Tensor, labels: Tensor) -> float:
        """One training step on a batch; returns the loss (before the update)."""
        from executorch.extension.training import get_sgd_optimizer

        args: Sequence[Tensor] = (inputs,)
        if self.prefix is not None:
            args = tuple(self.prefix.forward((inputs,)))
        loss = self.training.forward_backward("forward", (*args, labels))[0]
        if self._optimizer is None:
            o = self.manifest["optimizer"]
            self._optimizer = get_sgd_optimizer(self.training.named_parameters(), o["lr"],
                                                o["momentum"], o["dampening"],
                                                o["weight_decay"], o["nesterov"])
        self._optimizer.step(self.training.named_gradients())
        return float(loss)

    def named_parameters(self) -> dict[str, Tensor]:
        """The trainable tensors by program name (after the first step: the runtime's own)."""
        return dict(self.training.named_parameters())
