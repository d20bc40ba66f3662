"""The frozen prefix of a model: split its forward pass where one tensor carries everything on.

When training touches only layers from some point on, and batch norm is frozen, everything before
that point computes the same tensors in every step and every run. :class:`PrefixSplit` finds the
*cuts* of a model's forward graph (points where exactly one tensor is live: everything after reads
only it) and builds, for a cut, the prefix (input → that tensor) and the suffix (that tensor →
output) as :class:`torch.fx.GraphModule`\\ s that call the model's own modules by name. So a suffix
built after :func:`~budgetsearch.trainer.apply_plan` runs the plan's operators, and the prefix's
output can be computed once and reused by every unit that trains behind it.

Models that :mod:`torch.fx` cannot trace have one cut, the input: nothing is cached, nothing breaks.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..tracing import _LeafTracer

__all__ = ["Cut", "PrefixSplit"]


@dataclass(frozen=True)
class Cut:
    """A point of the forward pass after which only one tensor is read.

    Attributes:
        position: Index of the node in the traced graph (0: the input itself).
        name: The node's name (``"input"`` for the input).
    """

    position: int
    name: str


class PrefixSplit:
    """A model's forward graph with its cuts.

    Args:
        model: The plain model (no plan applied), traced once.
    """

    def __init__(self, model: nn.Module) -> None:
        try:
            self.graph: fx.Graph | None = _LeafTracer().trace(model)
        except Exception:  # data-dependent control flow and the like: no cuts but the input
            self.graph = None
        self.nodes: list[fx.Node] = list(self.graph.nodes) if self.graph is not None else []
        self.cuts: list[Cut] = [Cut(0, "input")]
        if self.graph is not None:
            self.cuts = _find_cuts(self.nodes, dict(model.named_modules()))

    def cut_before(self, modules: Iterable[str]) -> Cut:
        """The latest cut before the first call of any of ``modules`` (qualified names).

        Returns the input cut when the graph is unknown or a module is not called by name.
        """
        wanted = set(modules)
        first = None
        for i, node in enumerate(self.nodes):
            if node.op == "call_module" and str(node.target) in wanted:
                first = i
                break
        if first is None:
            return self.cuts[0]
        return max((c for c in self.cuts if c.position < first), key=lambda c: c.position)

    def segment(self, root: nn.Module, start: Cut, end: Cut | None = None) -> nn.Module:
        """The module mapping ``start``'s tensor to ``end``'s (None: to the model's output),
        calling ``root``'s modules by name (those in place now: apply a plan to ``root`` first).

        Raises:
            ValueError: If ``end`` comes before ``start``.
        """
        if end is not None and end.position < start.position:
            raise ValueError(f"cut {end.name} comes before cut {start.name}")
        if self.graph is None or (start.position == 0 and end is None):
            return root
        if end is not None and end.position == start.position:
            return nn.Identity()
        graph = fx.Graph()
        first = self.nodes[start.position]
        env: dict[fx.Node, fx.Node] = {first: graph.placeholder("features")}

        def lookup(n: fx.Node) -> fx.Node:
            if n not in env:  # a parameter or buffer read before the start: read it again
                env[n] = graph.node_copy(n, lookup)
            return env[n]

        stop = len(self.nodes) if end is None else end.position + 1
        for node in self.nodes[start.position + 1: stop]:
            env[node] = graph.node_copy(node, lookup)
        if end is not None:
            graph.output(env[self.nodes[end.position]])
        return fx.GraphModule(root, graph)

    def suffix(self, root: nn.Module, cut: Cut) -> nn.Module:
        """The module computing the model's output from the cut's tensor (see :meth:`segment`)."""
        return self.segment(root, cut, None)

    @torch.no_grad()
    def features(
        self, root: nn.Module, start: Cut, end: Cut, x: torch.Tensor, *, batch_size: int = 64
    ) -> torch.Tensor:
        """``end``'s tensor for ``x``, the tensor at ``start`` (no autograd, ``root`` in eval
        mode for the call, then restored)."""
        if end.position == start.position:
            return x
        net = self.segment(root, start, end)
        modes = {m: m.training for m in root.modules()}
        root.eval()
        try:
            return torch.cat([net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        finally:
            for module, mode in modes.items():
                module.training = mode


def _stochastic(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a node draws random numbers in training (dropout, stochastic depth)."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return module.p > 0
        return type(module).__name__ == "StochasticDepth"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return "dropout" in name or name == "stochastic_depth"
    return False


def _find_cuts(nodes: list[fx.Node], modules: dict[str, nn.Module]) -> list[Cut]:
    """Positions after which exactly one tensor-valued node is read by later nodes.

    ``get_attr`` nodes (parameters and buffers) do not count: the suffix reads them again. A
    node that returns a tuple (read through ``getitem``, e.g. ``chunk``) is no cut, and nor is
    anything at or after the first dropout or stochastic-depth node: the prefix runs without
    them, and training must not.
    """
    last_use: dict[fx.Node, int] = {}
    position = {n: i for i, n in enumerate(nodes)}
    for i, node in enumerate(nodes):
        for src in node.all_input_nodes:
            last_use[src] = max(last_use.get(src, -1), i)
    cuts = [Cut(0, "input")]
    live: set[fx.Node] = set()
    for i, node in enumerate(nodes):
        if node.op == "output" or _stochastic(node, modules):
            break
        if node.op != "get_attr" and last_use.get(node, -1) > i:
            live.add(node)
        live = {n for n in live if last_use[n] > i}
        tuple_valued = any(u.op == "call_function" and u.target is operator.getitem
                           for u in node.users)
        if (i > 0 and live == {node} and not tuple_valued
                and node.op in ("call_module", "call_function", "call_method")):
            cuts.append(Cut(position[node], node.name))
    return cuts
