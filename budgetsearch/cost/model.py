"""The training cost model: what one training step of a plan costs on a device.

:class:`CostModel` is built once per (layer graph, device profile, accounting, batch size) and then
evaluates plans quickly: per-op rule results are memoised by the op's flags, and the memory peak is
a sweep over a fixed timeline (forward ops, the loss, backward ops in reverse) done with numpy.

The timeline model (docs/cost-model.md, 'Timeline and peak'): a tensor lives from the op that
allocates it to its last forward use; a tensor saved for backward lives until the backward of the
earliest op that saved it; the gradient of an activation lives from the backward of its last
consumer to the backward of its producer; a parameter gradient lives from its layer's backward to
the optimizer step (or only during that backward when the profile updates weights in place).
Weights in RAM and optimizer state are held throughout. The peak is the largest total over the
timeline, reported with the op where it occurs.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from ..choices import (
    ACCOUNTINGS,
    MEMORY_MEASURES,
    OPTIMIZERS,
    AccountingName,
    Optimizer,
)
from ..errors import CostError, PlanError
from ..graph import LayerGraph
from ..plan import LayerUpdate, Plan
from .result import Cost, CostSummary, OpRow
from .rules import RULES, Accounting, OpContext, OpCost, Rule, unknown_rule

if TYPE_CHECKING:
    from ..profiles import DeviceProfile

__all__ = ["ACCOUNTINGS", "MEMORY_MEASURES", "OPTIMIZER_STATES", "CostModel", "CostSummary",
           "accounting_for"]

#: State tensors per parameter of each optimizer.
OPTIMIZER_STATES: dict[Optimizer, int] = {"sgd": 0, "momentum": 1, "adam": 2}
_NO_COST = OpCost()


def accounting_for(profile: DeviceProfile, name: AccountingName) -> Accounting:
    """The accounting ``name`` on a profile: ``pytorch`` (stock autograd with ``requires_grad``
    freezing, fp32), ``ops`` (budgetsearch's operators in PyTorch, fp32) or ``device`` (the
    profile's engine and data types).

    Raises:
        CostError: For an unknown accounting name.
    """
    if name == "pytorch":
        return Accounting(name="pytorch", engine="autograd")
    if name == "ops":
        return Accounting(name="ops", engine="ops")
    if name == "device":
        return Accounting(
            name="device",
            engine="device",
            activation_bytes=profile.activation_bytes,
            weight_bytes=profile.weight_bytes,
            bias_bytes=profile.bias_bytes,
            gradient_bytes=profile.gradient_bytes,
            optimizer_state_bytes=profile.optimizer_state_bytes,
            mask_bits=profile.mask_bits,
            frozen_weights_in_ram=profile.frozen_weights_in == "ram",
            fold_batchnorm=True,
            in_place_update=profile.in_place_update,
        )
    raise CostError(f"accounting must be one of {', '.join(ACCOUNTINGS)}; got {name!r}")


class CostModel:
    """Costs of training steps of one traced model on one device.

    :meth:`evaluate` gives the full, queryable :class:`~budgetsearch.cost.Cost` of a plan (per
    op, per layer, by kind, in total); :meth:`summarize` only its totals as a
    :class:`~budgetsearch.cost.CostSummary`, several times faster (what a search needs).

    Args:
        graph: The traced model.
        profile: The device profile.
        accounting: ``device`` (the profile's engine), ``pytorch`` (stock autograd, fp32),
            ``ops`` (budgetsearch's operators, fp32), or an :class:`~budgetsearch.cost.Accounting`.
        batch_size: Batch size; the profile's default when None.
        optimizer: ``sgd``, ``momentum`` or ``adam``; the profile's default when None.
        training: Whether dropout and stochastic depth are active (model in train mode).
        bn_train: Whether batch norm runs on batch statistics (else frozen, the default).
        strict: Raise :class:`CostError` on op kinds without a cost rule instead of warning.
        rules: Cost rules of this model only, by op kind: they are used instead of the globally
            registered rules of these kinds (or for kinds without one), which stay unchanged
            for every other cost model (as fvcore's ``FlopCountAnalysis.set_op_handle``). See
            also :meth:`set_rule`.

    Example:
        One training step of MCUNet on an STM32F746 (the profile's batch size and optimizer),
        training every layer or only the last two blocks; neither fits the device's 256 KB:

        >>> from budgetsearch import CostModel, LayerGraph, Plan, load_model, load_profile
        >>> model = load_model("mcunet-5fps", num_classes=10)
        >>> graph = LayerGraph.from_model(model, input_size=128)
        >>> cost_model = CostModel(graph, load_profile("stm32f746"))
        >>> full = cost_model.evaluate(Plan.full(graph))
        >>> last = cost_model.evaluate(Plan.last_k_blocks(graph, 2))
        >>> full.peak_memory_bytes, last.peak_memory_bytes, cost_model.profile.memory_bytes
        (1787320, 508456, 262144)
        >>> print(last.format_table(all_layers=False))  # doctest: +ELLIPSIS
        layer                        update            fwd MMAC  bwd MMAC      saved    params
        ...
        blocks.13.pointwise2         weight                1.47      2.95     9.3 KB    92,320
        classifier                   weight                0.00      0.00      160 B     1,610
        ...
        peak memory               496.5 KB  (at blocks_1_act1, forward)
        ...
    """

    def __init__(
        self,
        graph: LayerGraph,
        profile: DeviceProfile,
        *,
        accounting: AccountingName | Accounting = "device",
        batch_size: int | None = None,
        optimizer: Optimizer | None = None,
        training: bool = True,
        bn_train: bool = False,
        strict: bool = False,
        rules: Mapping[str, Rule] | None = None,
    ) -> None:
        self.graph = graph
        self.profile = profile
        self.acc = (accounting if isinstance(accounting, Accounting)
                    else accounting_for(profile, accounting))
        # 0 is refused below, not taken for "the profile's default"
        self.batch = int(profile.default_batch_size if batch_size is None else batch_size)
        self.optimizer: Optimizer = optimizer or profile.default_optimizer
        if self.optimizer not in OPTIMIZERS:
            raise CostError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}"
            )
        if self.batch < 1:
            raise CostError(f"batch size must be >= 1; got {self.batch}")
        self.training, self.bn_train = training, bn_train
        self._rules: dict[str, Rule] = dict(RULES)
        for kind, rule in (rules or {}).items():
            self._rules[kind] = _check_rule(kind, rule)
        self.unknown_ops = self._unknown_ops()
        if self.unknown_ops:
            msg = (
                "no cost rule for op kinds " + ", ".join(self.unknown_ops) + "; they are counted "
                "as saving all their inputs, with 0 MACs and no time of their own (register a "
                "rule with budgetsearch.cost.register_rule, "
                "or give this cost model one with rules= or set_rule)"
            )
            if strict:
                raise CostError(msg)
            warnings.warn(msg, stacklevel=2)
        self._prepare()

    # ----------------------------------------------------------------------------------- rules
    @property
    def rules(self) -> Mapping[str, Rule]:
        """The cost rules this model applies, by op kind (read-only: the registered rules and
        this model's own)."""
        return MappingProxyType(self._rules)

    def set_rule(self, kind: str, rule: Rule) -> CostModel:
        """Use ``rule`` for op kind ``kind`` in this cost model only; the registered rule and
        every other cost model are unchanged (as fvcore's
        ``FlopCountAnalysis.set_op_handle``).

        Args:
            kind: The op kind (the graph's ``OpNode.kind``).
            rule: A pure function from :class:`~budgetsearch.cost.OpContext` to
                :class:`~budgetsearch.cost.OpCost`.

        Returns:
            This cost model, for chaining.

        Raises:
            CostError: If ``rule`` is not callable.
        """
        checked = _check_rule(kind, rule)
        previous = self._rules.get(kind)
        self._rules[kind] = checked
        try:  # the rule's forward MACs and times, all computed before any is kept
            nodes = [node for node in self._nodes if node.kind == kind]
            macs = {node.index: self._rule_forward_macs(node) for node in nodes}
        except BaseException:
            if previous is None:
                del self._rules[kind]
            else:
                self._rules[kind] = previous
            raise
        for i, value in macs.items():
            self._memo[i].clear()
            self._fwd_macs_node[i] = value
        for i in macs:
            self._fwd_time[i] = self._forward_ms(self._nodes[i])
        self._forward_macs = int(sum(self._fwd_macs_node))
        self._forward_ms_total = float(sum(self._fwd_time))
        self.unknown_ops = self._unknown_ops()
        return self

    def _unknown_ops(self) -> list[str]:
        return sorted({n.kind for n in self.graph.nodes if n.kind not in self._rules})

    # ----------------------------------------------------------------------------- preparation
    def _prepare(self) -> None:
        g, nodes = self.graph, self.graph.nodes
        n = len(nodes)
        self.n = n
        self._inputs = [tuple(nodes[i] for i in node.inputs) for node in nodes]
        users: list[list[int]] = [[] for _ in nodes]
        for node in nodes:
            for src in node.inputs:
                users[src].append(node.index)
        self._users = users
        # Storage roots: dropout in training mode allocates a new tensor (traced in eval mode it
        # is an alias); views follow their source.
        # A frozen batch norm the accounting folds is computed inside its conv, into the conv's
        # output: it allocates nothing.
        folded = [node.index for node in nodes if self._folded(node, users)]
        #: folded batch norm -> its conv: the conv's backward forms the batch norm's gradients
        self._fold_into = {i: nodes[i].inputs[0] for i in folded}
        storage: list[int] = []
        for node in nodes:
            fresh = (node.kind in ("dropout", "stochastic_depth") and self.training
                     and node.attrs.get("p", 0) > 0)
            if node.index in folded:
                storage.append(storage[node.inputs[0]])
            elif fresh or node.storage == node.index:
                storage.append(node.index)
            elif node.inputs and nodes[node.inputs[0]].storage == node.storage:
                storage.append(storage[node.inputs[0]])
            else:
                storage.append(storage[node.storage])
        numel = {
            r: (nodes[r].storage_numel if nodes[r].storage == r else nodes[r].numel)
            for r in set(storage)
        }
        self._nodes = [
            _replace_storage(node, storage[node.index], numel[storage[node.index]])
            for node in nodes
        ]
        # Forward liveness of each storage: allocated by its root, dead after its last use.
        last_use = {}
        for node in self._nodes:
            end = max(users[node.index], default=n)  # the model output is used by the loss
            root = node.storage
            last_use[root] = max(last_use.get(root, 0), end)
        self._live_roots = np.array(sorted(last_use), dtype=np.int64)
        self._live_end = np.array([last_use[r] for r in sorted(last_use)], dtype=np.int64)
        per = 4 if self.acc.stock_autograd else self.acc.activation_bytes
        self._live_bytes = np.array(
            [math.ceil(numel[r] * self.batch * per) for r in sorted(last_use)], dtype=np.int64
        )
        # Persistent weights and per-layer parameter sizes.
        self._layer_at = {layer.node: layer for layer in g.layers.values()}
        self._bias_at = {layer.bias_node: layer for layer in g.layers.values()
                         if layer.bias_node is not None}
        self._memo: list[dict[tuple, OpCost]] = [{} for _ in nodes]
        self._filter_ok: set[tuple[str, int]] = set()
        self._input_index = [node.inputs for node in self._nodes]
        self._latency = getattr(self.profile, "latency", None)
        # forward MACs are the rules' (a frozen op, nothing needing a gradient): a rule given
        # for a kind of one's own counts them too
        self._fwd_macs_node = [self._rule_forward_macs(node) for node in self._nodes]
        self._fwd_time = [self._forward_ms(node) for node in self._nodes]
        self._latency_model = self.latency_model
        self._step_fixed_ms = (self._latency.predict_ms({"step.calls": 1.0})
                               if self._latency is not None else 0.0)
        self._forward_ms_total = float(sum(self._fwd_time))
        self._forward_macs = int(sum(self._fwd_macs_node))
        # activation-gradient intervals: from the backward of the last consumer to the producer's
        grad_per = 4 if self.acc.stock_autograd else self.acc.gradient_bytes
        self._grad_start = np.array(
            [2 * n - max(users[i]) if users[i] else n for i in range(n)], dtype=np.int64)
        self._grad_end = np.array([2 * n - i for i in range(n)], dtype=np.int64)
        self._grad_bytes = np.array(
            [math.ceil(node.numel * self.batch * grad_per) for node in self._nodes],
            dtype=np.int64)
        for i, src in self._fold_into.items():  # one gradient buffer: the conv's output
            self._grad_end[i] = self._grad_end[src]  # gradient is the batch norm's, scaled in
            self._grad_bytes[src] = 0  # place (held when the batch norm's is: a trained bias)
        self.n_positions = 2 * n + 1  # forward 0..n-1, loss n, backward of node i at 2n - i
        self._frozen_weight_bytes = self._weight_bytes_all()
        inference = np.zeros(self.n_positions + 1, dtype=np.int64)
        np.add.at(inference, self._live_roots, self._live_bytes)
        np.add.at(inference, self._live_end + 1, -self._live_bytes)
        frozen_ram = self._frozen_weight_bytes if self.acc.frozen_weights_in_ram else 0
        #: Peak memory of one forward pass without training (live activations, weights in RAM).
        self.inference_peak_bytes = int(np.cumsum(inference).max()) + frozen_ram
        classes = nodes[-1].numel
        if self.acc.stock_autograd:  # log-softmax output (fp32), int64 labels, total weight
            self._loss_saved_bytes = self.batch * (classes * 4 + 8) + 4
        else:  # softmax probabilities for the loss gradient
            self._loss_saved_bytes = math.ceil(self.batch * classes * self.acc.gradient_bytes)

    def _rule_forward_macs(self, node) -> int:
        """The forward MACs the op's rule gives (for the whole batch)."""
        inputs = self._inputs[node.index]
        ctx = OpContext(node, inputs, self.batch, self.acc, tuple(False for _ in inputs),
                        training=self.training, bn_train=self.bn_train)
        macs = self._rules.get(node.kind, unknown_rule)(ctx).forward_macs
        if isinstance(macs, bool) or not isinstance(macs, numbers.Integral) or macs < 0:
            raise CostError(f"the cost rule for {node.kind!r} gave forward_macs {macs!r} for op "
                            f"{node.name}: expected a non-negative integer")
        return int(macs)

    def _folded(self, node, users: list[list[int]]) -> bool:
        """Whether ``node`` is a frozen batch norm this accounting folds into the conv before it
        (the conv's output is its only input and it is that output's only user)."""
        if node.kind != "batch_norm" or not self.acc.fold_batchnorm or self.bn_train:
            return False
        if len(node.inputs) != 1:
            return False
        src = self.graph.nodes[node.inputs[0]]
        return src.kind == "conv2d" and users[src.index] == [node.index]

    def _weight_bytes_all(self) -> int:
        """Bytes of all weights if held in RAM under this accounting (frozen or not)."""
        total = 0
        for layer in self.graph.layers.values():
            total += layer.weight_numel * self.acc.weight_bytes
            total += layer.out_channels * self.acc.bias_bytes if layer.bias_param else 0
        if not self.acc.fold_batchnorm:  # batch norm weight, running mean and variance
            for node in self._nodes:
                if node.kind == "batch_norm":
                    ch = int(node.attrs.get("channels", node.shape[1]))
                    total += ch * 4 * (3 if node.bias_of else 4)
        return int(total)

    # ------------------------------------------------------------------------------ evaluation
    def _flags(self, plan: Plan | Mapping[str, LayerUpdate]) -> tuple[dict, dict]:
        if isinstance(plan, Plan):
            plan.validate(self.graph)
            updates = plan.updates
        else:
            updates = plan
        weight: dict[int, tuple[float, float, int, LayerUpdate]] = {}
        bias: dict[int, bool] = {}
        for name, update in updates.items():
            layer = self.graph.layers.get(name)
            if layer is None:
                raise PlanError(f"the model has no trainable layer {name!r}")
            if update.channels is not None:  # a Plan checks this itself; a mapping may not
                n_axis = layer.out_channels if update.axis == "out" else layer.in_channels
                bad = [c for c in update.channels if not 0 <= c < n_axis]
                if bad or len(set(update.channels)) != len(update.channels):
                    raise PlanError(f"layer {name}: channels must be distinct indices in "
                                    f"0..{n_axis - 1} of its {update.axis} axis; got "
                                    f"{bad[:5] or 'a repeated index'}")
            if update.mode == "weight":
                wf, inf = 1.0, 1.0
                if update.channels is not None and self.acc.realises_plan:
                    n_axis = layer.out_channels if update.axis == "out" else layer.in_channels
                    frac = len(update.channels) / n_axis
                    wf = frac
                    if update.axis == "in":
                        inf = frac
                    elif layer.groups > 1:  # only the groups of the kept rows need their input
                        rows_per_group = layer.out_channels // layer.groups
                        groups = {c // rows_per_group for c in update.channels}
                        inf = len(groups) / layer.groups
                if update.patch_size > 1:
                    self._check_filter(layer, update.patch_size)
                r = update.patch_size if self.acc.realises_plan else 1
                weight[layer.node] = (wf, inf, r, update)
            if layer.bias_node is not None:
                bias[layer.bias_node] = True
        return weight, bias

    def _check_filter(self, layer, patch_size: int) -> None:
        """Refuse, at planning time, a gradient filter the operator cannot apply to this layer."""
        key = (layer.name, patch_size)
        if key in self._filter_ok:
            return
        node = self._nodes[layer.node]
        reason = None
        if node.kind != "conv2d":
            reason = "gradient filters apply to 2-D convolutions only"
        else:
            from ..ops.filtered import check_filterable

            a, inp = node.attrs, self._inputs[layer.node][0]
            reason = check_filterable(
                in_hw=tuple(inp.shape[2:4]), out_hw=tuple(node.shape[2:4]),
                kernel_size=a["kernel_size"], stride=a["stride"], padding=a["padding"],
                dilation=a["dilation"], groups=a["groups"], patch_size=patch_size)
        if reason:
            raise PlanError(f"layer {layer.name}: a gradient filter with patch size {patch_size} "
                            f"cannot be used here: {reason}")
        self._filter_ok.add(key)

    def _op_cost(self, i: int, key: tuple) -> tuple[OpCost, float]:
        """The rule's result for op ``i`` under the given flags and its backward time, memoised."""
        memo = self._memo[i]
        hit = memo.get(key)
        if hit is None:
            input_grad, wf, inf, bias, r = key
            node = self._nodes[i]
            ctx = OpContext(node, self._inputs[i], self.batch, self.acc, input_grad, wf, inf,
                            bias, r, self.training, self.bn_train)
            cost = self._rules.get(node.kind, unknown_rule)(ctx)
            hit = memo[key] = (cost, self._backward_ms(node, cost, key))
        return hit

    @overload
    def evaluate(self, plan: Plan | Mapping[str, LayerUpdate]) -> Cost: ...

    @overload
    def evaluate(
        self, plan: Plan | Mapping[str, LayerUpdate], *, detail: Literal[True]
    ) -> Cost: ...

    @overload
    def evaluate(
        self, plan: Plan | Mapping[str, LayerUpdate], *, detail: Literal[False]
    ) -> CostSummary: ...

    def evaluate(
        self, plan: Plan | Mapping[str, LayerUpdate], *, detail: bool | None = None
    ) -> Cost | CostSummary:
        """The full cost of one training step under a plan: per op, per layer, by kind and in
        total.

        Args:
            plan: A :class:`Plan`, or a mapping of layer names to :class:`LayerUpdate`.
            detail: Deprecated: ``detail=False`` is :meth:`summarize` and ``detail=True`` the
                default; passing either warns.

        Returns:
            The :class:`~budgetsearch.cost.Cost` (a :class:`~budgetsearch.cost.CostSummary`
            with the deprecated ``detail=False``).
        """
        if detail is not None:
            warnings.warn(
                "CostModel.evaluate(detail=...) is deprecated: use evaluate(plan) for the full "
                "Cost and summarize(plan) for the CostSummary", DeprecationWarning, stacklevel=2)
            if not detail:
                return self.summarize(plan)
        s = self._step(plan, per_op=True)
        s.parts["weight_bytes"] = self._persistent_weight_bytes(s.weight, s.bias)
        return self._detail(plan, s.costs, s.rg, s.saved_first, s.saved_bytes, s.peak, s.peak_pos,
                            s.parts, s.trainable, s.latency_ms, s.op_ms)

    def summarize(self, plan: Plan | Mapping[str, LayerUpdate]) -> CostSummary:
        """The totals of one training step under a plan, without the per-op table: several
        times faster than :meth:`evaluate`, and equal to ``evaluate(plan).summary()``.

        Args:
            plan: A :class:`Plan`, or a mapping of layer names to :class:`LayerUpdate`.
        """
        s = self._step(plan, per_op=False)
        return CostSummary(
            peak_memory_bytes=s.peak,
            training_memory_bytes=s.peak - self.inference_peak_bytes,
            saved_activation_bytes=int(sum(s.saved_bytes.values())),
            forward_macs=self._forward_macs,
            backward_macs=s.backward_macs,
            latency_ms=s.latency_ms,
            trainable_params=int(s.trainable["params"]),
            backward_ms=s.backward_ms,
            latency_model=self._latency_model,
        )

    def _step(self, plan: Plan | Mapping[str, LayerUpdate], *, per_op: bool) -> _Step:
        """Run the plan's step through the rules and the timeline (per-op times if ``per_op``)."""
        weight, bias = self._flags(plan)
        n = self.n
        rg = [False] * n
        costs: dict[int, OpCost] = {}
        saved_first: dict[Any, int] = {}
        saved_bytes: dict[Any, int] = {}
        bwd_macs = 0
        bwd_ms = 0.0
        op_ms: dict[int, float] = {}
        for i, inputs in enumerate(self._input_index):
            w = weight.get(i)
            b = i in bias
            input_grad = tuple([rg[j] for j in inputs])
            if w is None and not b and True not in input_grad:
                continue  # no backward here: the forward cost is plan-independent
            rg[i] = True
            key = _flags_key(input_grad, w, b)
            cost, ms = self._op_cost(i, key)
            costs[i] = cost
            bwd_macs += cost.backward_macs
            bwd_ms += ms
            if per_op:
                op_ms[i] = ms
            for k, nbytes in cost.saved:
                if k not in saved_first:
                    saved_first[k] = i
                    saved_bytes[k] = nbytes
        if rg[n - 1]:  # the loss keeps its softmax output, the labels and a scalar
            saved_first[("loss",)] = n
            saved_bytes[("loss",)] = self._loss_saved_bytes
        trainable = self._trainable(weight, bias)
        peak, peak_pos, parts = self._peak(rg, saved_first, saved_bytes, weight, bias, trainable)
        latency = (self._forward_ms_total + bwd_ms + self._optimizer_ms(trainable)
                   + self._step_fixed_ms)
        return _Step(weight, bias, rg, costs, saved_first, saved_bytes, int(bwd_macs), bwd_ms,
                     op_ms, trainable, int(peak), peak_pos, parts, latency)

    # ---------------------------------------------------------------------------- components
    def _trainable(self, weight: dict, bias: dict) -> dict[str, Any]:
        """Updated parameter elements and their gradient buffers, per layer node."""
        acc = self.acc
        per_node: dict[int, tuple[float, float]] = {}  # node -> (param elems, grad bytes)
        params = 0.0
        for i, (wf, _inf, _r, _u) in weight.items():
            layer = self._layer_at[i]
            elems = layer.weight_numel * wf
            params += elems
            # A fused in-place update applies each output channel's gradient as soon as it is
            # computed, so only one row of the weight gradient is held at a time.
            held = layer.weight_numel / layer.out_channels if acc.in_place_update else elems
            per_node[i] = (elems, held * acc.gradient_bytes)
        for i in bias:
            layer = self._bias_at[i]
            params += layer.out_channels
            at = self._fold_into.get(i, i)  # a folded batch norm's bias is its conv's
            old = per_node.get(at, (0.0, 0.0))
            per_node[at] = (old[0] + layer.out_channels,
                            old[1] + layer.out_channels * acc.gradient_bytes)
        state = OPTIMIZER_STATES[self.optimizer]
        return {"params": round(params), "per_node": per_node,
                "optimizer_bytes": int(params * state * acc.optimizer_state_bytes)}

    def _persistent_weight_bytes(self, weight: dict, bias: dict) -> int:
        if self.acc.frozen_weights_in_ram:
            return self._frozen_weight_bytes
        total = 0.0  # only the updated parameters live in RAM
        for i, (wf, *_rest) in weight.items():
            total += self._layer_at[i].weight_numel * wf * self.acc.weight_bytes
        for i in bias:
            total += self._bias_at[i].out_channels * self.acc.bias_bytes
        return math.ceil(total)

    def _peak(self, rg, saved_first, saved_bytes, weight, bias, trainable):
        n, P = self.n, self.n_positions
        diff = np.zeros(P + 1, dtype=np.int64)
        # live forward tensors, extended when saved
        ends = self._live_end.copy()
        root_pos = {int(r): k for k, r in enumerate(self._live_roots)}
        private_start, private_end, private_bytes = [], [], []
        for key, i in saved_first.items():
            bwd = 2 * n - i
            if key[0] == "loss":
                private_start.append(n)
                private_end.append(n)
                private_bytes.append(saved_bytes[key])
            elif key[0] == "t" and key[1] in root_pos:
                k = root_pos[key[1]]
                ends[k] = max(ends[k], bwd)
            else:
                private_start.append(i)
                private_end.append(bwd)
                private_bytes.append(saved_bytes[key])
        np.add.at(diff, self._live_roots, self._live_bytes)
        np.add.at(diff, ends + 1, -self._live_bytes)
        if private_bytes:
            pb = np.array(private_bytes, dtype=np.int64)
            np.add.at(diff, np.array(private_start), pb)
            np.add.at(diff, np.array(private_end) + 1, -pb)
        # activation gradients
        on = np.flatnonzero(np.array(rg, dtype=bool))
        np.add.at(diff, self._grad_start[on], self._grad_bytes[on])
        np.add.at(diff, self._grad_end[on] + 1, -self._grad_bytes[on])
        g_start, g_end, g_bytes = [], [], []
        # parameter gradients
        for i, (_elems, gbytes) in trainable["per_node"].items():
            g_start.append(2 * n - i)
            g_end.append(2 * n - i if self.acc.in_place_update else P - 1)
            g_bytes.append(math.ceil(gbytes))
        if g_bytes:
            gb = np.array(g_bytes, dtype=np.int64)
            np.add.at(diff, np.array(g_start), gb)
            np.add.at(diff, np.array(g_end) + 1, -gb)
        timeline = np.cumsum(diff[:P])
        pos = int(np.argmax(timeline))
        persistent = self._persistent_weight_bytes(weight, bias) + trainable["optimizer_bytes"]
        return int(timeline[pos]) + persistent, pos, {
            "persistent_bytes": persistent, "timeline": timeline,
        }

    def _rate(self, node, backward: bool) -> float:
        measured = getattr(self.profile, "measured", None) or {}
        group = self._group(node)
        rate = measured.get(group) if group != "elementwise" else None
        if rate is not None:
            return float(rate.backward_macs_per_s if backward else rate.forward_macs_per_s)
        return float(self.profile.peak_macs_per_s)

    @property
    def latency_model(self) -> str:
        """Where this cost model's times come from: the profile's measured predictor
        (``budgetsearch profile-device``), or the analytic roofline over the profile's compute
        figures (MAC rates, memory bandwidth, a fixed cost per operator)."""
        if self._latency is not None:
            return self._latency.describe()
        return "analytic (roofline over the profile's MAC rates and memory bandwidth)"

    def _group(self, node) -> str:
        if node.kind == "linear":
            return "linear"
        if node.kind == "conv2d":
            g = int(node.attrs.get("groups", 1))
            return "depthwise" if g > 1 and g == int(node.attrs.get("in_channels", 0)) else "conv"
        return "elementwise"

    def _forward_features(self, node) -> dict[str, float]:
        """The measured predictor's features of one op's forward (fp32, as timed)."""
        if node.kind == "input":
            return {}
        g = self._group(node)
        nbytes = 4.0 * self.batch * (node.numel + sum(self.graph.nodes[j].numel
                                                      for j in node.inputs))
        out = {f"forward.{g}.calls": 1.0}
        if g != "elementwise":
            out[f"forward.{g}.macs"] = float(self._fwd_macs_node[node.index])
            layer = self.graph.layers.get(node.layer) if node.layer else None
            if layer is not None:
                nbytes += 4.0 * layer.weight_numel
        out[f"forward.{g}.bytes"] = nbytes
        return out

    def _backward_features(self, node, cost: OpCost, key: tuple) -> dict[str, float]:
        """The measured predictor's features of one op's backward under the flags ``key``."""
        g = self._group(node)
        _input_grad, wf, inf, _bias, r = key
        saved = float(sum(b for _k, b in cost.saved))
        out = {f"backward.{g}.calls": 1.0,
               f"backward.{g}.bytes": 4.0 * self.batch * node.numel * (1 + len(node.inputs))
               + saved}
        if g != "elementwise":
            out[f"backward.{g}.grad_input_macs"] = float(cost.grad_input_macs)
            out[f"backward.{g}.grad_weight_macs"] = float(cost.grad_weight_macs)
            if wf > 0 and r > 1:
                out["backward.filtered.calls"] = 1.0
                out["backward.filtered.bytes"] = 4.0 * self.batch * node.numel
            layer = self.graph.layers.get(node.layer) if node.layer else None
            if wf > 0 and (wf < 1 or inf < 1) and layer is not None:
                out["backward.sparse.calls"] = 1.0
                out["backward.sparse.bytes"] = 4.0 * layer.weight_numel
        return out

    def _optimizer_features(self, trainable) -> dict[str, float]:
        state = OPTIMIZER_STATES[self.optimizer]
        return {"optimizer.bytes": 4.0 * trainable["params"] * (2 + 2 * state)}

    def latency_features(self, plan: Plan | Mapping[str, LayerUpdate]) -> dict[str, float]:
        """The features of the measured latency predictor summed over one training step of a
        plan (see :mod:`budgetsearch.latency`): the predictor's step time is their dot product
        with its coefficients. Used to fit the predictor on timed steps.

        Args:
            plan: A :class:`Plan`, or a mapping of layer names to :class:`LayerUpdate`.
        """
        total: dict[str, float] = {"step.calls": 1.0}

        def add(features: Mapping[str, float]) -> None:
            for k, v in features.items():
                total[k] = total.get(k, 0.0) + v

        for node in self._nodes:
            add(self._forward_features(node))
        s = self._step(plan, per_op=False)
        for i, cost in s.costs.items():
            w = s.weight.get(i)
            input_grad = tuple(s.rg[j] for j in self._input_index[i])
            b = i in s.bias
            add(self._backward_features(self._nodes[i], cost, _flags_key(input_grad, w, b)))
        add(self._optimizer_features(s.trainable))
        return total

    def _forward_ms(self, node) -> float:
        if self._latency is not None:
            return self._latency.predict_ms(self._forward_features(node))
        if node.kind == "input":
            return 0.0
        macs = self._fwd_macs_node[node.index]
        per = 4 if self.acc.stock_autograd else self.acc.activation_bytes
        elems = node.numel + sum(self.graph.nodes[j].numel for j in node.inputs)
        traffic = elems * self.batch * per
        layer = self.graph.layers.get(node.layer) if node.layer else None
        if layer is not None:
            traffic += layer.weight_numel * (4 if self.acc.stock_autograd else
                                             self.acc.weight_bytes)
        t = max(macs / self._rate(node, False), traffic / self.profile.memory_bandwidth_bytes_per_s)
        return 1e3 * t + self.profile.op_overhead_us * 1e-3

    def _backward_ms(self, node, cost: OpCost, key: tuple) -> float:
        if self._latency is not None:
            return self._latency.predict_ms(self._backward_features(node, cost, key))
        bw = self.profile.memory_bandwidth_bytes_per_s
        grad_per = 4 if self.acc.stock_autograd else self.acc.gradient_bytes
        traffic = (node.numel * self.batch * grad_per * (1 + len(node.inputs))
                   + sum(b for _k, b in cost.saved))
        t = max(cost.backward_macs / self._rate(node, True), traffic / bw)
        return 1e3 * t + self.profile.op_overhead_us * 1e-3

    def _optimizer_ms(self, trainable) -> float:
        """Optimizer step: per parameter, the weight and gradient move once each (the weight is
        updated in place) and each state tensor is read and written: (2 + 2 x states) accesses."""
        if self._latency is not None:
            return self._latency.predict_ms(self._optimizer_features(trainable))
        state = OPTIMIZER_STATES[self.optimizer]
        per = 4 if self.acc.stock_autograd else self.acc.weight_bytes
        bw = self.profile.memory_bandwidth_bytes_per_s
        return 1e3 * trainable["params"] * per * (2 + 2 * state) / bw

    def _detail(self, plan, costs, rg, saved_first, saved_bytes, peak, peak_pos, parts,
                trainable, latency, op_ms) -> Cost:
        n = self.n
        saved_by_node: dict[int, int] = {}
        for key, i in saved_first.items():
            saved_by_node[i] = saved_by_node.get(i, 0) + saved_bytes[key]
        rows = []
        for node in self._nodes:
            i = node.index
            c = costs.get(i, _NO_COST)
            on = rg[i]
            rows.append(OpRow(
                index=i, name=node.name, kind=node.kind, module=node.module,
                layer=_owner_layer(self.graph, i),
                forward_macs=self._fwd_macs_node[i],
                grad_input_macs=c.grad_input_macs if on else 0,
                grad_weight_macs=c.grad_weight_macs if on else 0,
                grad_bias_macs=c.grad_bias_macs if on else 0,
                saved_activation_bytes=saved_by_node.get(i, 0),
                trainable_params=round(trainable["per_node"].get(i, (0, 0))[0]),
                gradient_bytes=math.ceil(trainable["per_node"].get(i, (0, 0))[1]),
                backward=on,
                forward_ms=self._fwd_time[i],
                backward_ms=op_ms.get(i, 0.0),
            ))
        phase, at = ("forward", peak_pos) if peak_pos < n else (
            ("loss", n) if peak_pos == n else ("backward", 2 * n - peak_pos))
        peak_op = "loss" if phase == "loss" else self._nodes[at].name
        updates = plan.updates if isinstance(plan, Plan) else plan
        return Cost(
            ops=rows,
            accounting=self.acc.name,
            device=self.profile.name,
            batch_size=self.batch,
            optimizer=self.optimizer,
            peak_memory_bytes=int(peak),
            inference_peak_bytes=self.inference_peak_bytes,
            peak_phase=phase,
            peak_op=peak_op,
            persistent_bytes=int(parts["persistent_bytes"]),
            weight_bytes=int(parts["weight_bytes"]),
            optimizer_bytes=int(trainable["optimizer_bytes"]),
            latency_ms=latency,
            unknown_ops=list(self.unknown_ops),
            loss_saved_bytes=int(saved_bytes.get(("loss",), 0)),
            updates={k: v.to_dict() for k, v in updates.items()},
            latency_model=self._latency_model,
        )


def _flags_key(input_grad: tuple[bool, ...], weight: tuple | None, bias: bool) -> tuple:
    """An op's flags as the rules see them: (input grads, weight fraction, input-channel
    fraction, bias trained, patch size); ``weight`` is the plan's (fraction, in-fraction, r)."""
    if weight is None:
        return (input_grad, 0.0, 1.0, bias, 1)
    return (input_grad, weight[0], weight[1], bias, weight[2])


@dataclass
class _Step:
    """What one evaluation of a plan computed, before it is shaped into a result."""

    weight: dict
    bias: dict
    rg: list[bool]
    costs: dict[int, OpCost]
    saved_first: dict[Any, int]
    saved_bytes: dict[Any, int]
    backward_macs: int
    backward_ms: float
    op_ms: dict[int, float]
    trainable: dict[str, Any]
    peak: int
    peak_pos: int
    parts: dict[str, Any]
    latency_ms: float


def _check_rule(kind: str, rule: Any) -> Rule:
    if not callable(rule):
        raise CostError(f"the cost rule for {kind!r} must be a function of an OpContext; got "
                        f"{rule!r}")
    return rule


def _replace_storage(node, storage: int, numel: int):
    from dataclasses import replace

    return replace(node, storage=storage, storage_numel=numel)


def _owner_layer(graph: LayerGraph, index: int) -> str:
    """The trainable layer an op is listed under: the last layer at or before it."""
    owner = "(input)"
    for layer in graph.layers.values():
        if layer.node <= index:
            owner = layer.name
        else:
            break
    return owner
