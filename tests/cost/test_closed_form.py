"""Closed-form answers of the cost model on tiny models, worked out by hand in the comments."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from _toys import TanhNet
from torch import nn

from budgetsearch import CostModel, LayerGraph, LayerUpdate, Plan, load_profile
from budgetsearch.errors import CostError, PlanError


def _profile(**changes):
    base = load_profile("stm32f746")
    defaults = dict(activation_bytes=1, weight_bytes=1, bias_bytes=4, gradient_bytes=4,
                    optimizer_state_bytes=4, mask_bits=1, frozen_weights_in="flash",
                    in_place_update=False, default_batch_size=1, default_optimizer="sgd")
    defaults.update(changes)
    return dataclasses.replace(base, **defaults)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.fixture(scope="module")
def mlp_graph() -> LayerGraph:
    return LayerGraph.from_model(_mlp(), input_size=2, in_channels=1)


def test_mlp_full_update_device_timeline(mlp_graph):
    # Ops: 0 input (4 elems), 1 flatten (view of 0), 2 linear1 (3), 3 relu (3), 4 linear2 (2).
    # Positions: forward 0..4, loss 5, backward of op i at 10 - i.
    # Saved: linear1 input 4 B [2, 8]; relu mask ceil(3/8) = 1 B [3, 7]; linear2 input 3 B [4, 6];
    # loss softmax 2 x 4 B [5, 5]. Activation gradients (fp32): logits 8 B [5, 6], relu 12 B
    # [6, 7], linear1 out 12 B [7, 8]. Parameter gradients: linear2 (6 + 2) x 4 = 32 B [6, 10],
    # linear1 (12 + 3) x 4 = 60 B [8, 10]. Live activations: input 4 B [0, 2], linear1 out 3 B
    # [2, 3], relu out 3 B [3, 4], logits 2 B [4, 5].
    # Position 8: 4 + 12 + 32 + 60 = 108 B, the maximum. Weights in RAM (frozen ones in flash):
    # linear1 12 x 1 + 3 x 4 = 24 B, linear2 6 x 1 + 2 x 4 = 14 B.
    cm = CostModel(mlp_graph, _profile())
    cost = cm.evaluate(Plan.full(mlp_graph))
    t = cost.total()
    assert t["forward_macs"] == 12 + 6
    assert t["grad_input_macs"] == 6  # linear2 only: linear1's input needs no gradient
    assert t["grad_weight_macs"] == 12 + 6
    assert t["grad_bias_macs"] == 3 + 2
    assert t["saved_activation_bytes"] == 4 + 1 + 3 + 8
    assert t["weight_bytes"] == 24 + 14
    assert t["peak_memory_bytes"] == 108 + 38
    assert cost.peak_phase == "backward"
    assert cost.peak_op == mlp_graph.nodes[2].name
    assert t["trainable_params"] == 12 + 3 + 6 + 2
    assert t["gradient_bytes"] == 60 + 32


def test_mlp_pytorch_accounting_dedupes_storages(mlp_graph):
    # linear1 saves its input (the flatten view of the input, 4 x 4 B); ReLU (out of place) saves
    # its result (3 x 4 B), which linear2 saves too: counted once. Loss: log-softmax 2 x 4 B,
    # int64 label 8 B, a 4 B scalar.
    cm = CostModel(mlp_graph, _profile(), accounting="pytorch")
    cost = cm.evaluate(Plan.full(mlp_graph))
    assert cost.saved_activation_bytes == 16 + 12 + (8 + 8 + 4)


def test_mlp_last_layer_only(mlp_graph):
    cm = CostModel(mlp_graph, _profile())
    plan = Plan.from_layers(mlp_graph, {"3": LayerUpdate("weight")})
    t = cm.evaluate(plan).total()
    assert t["grad_input_macs"] == 0  # nothing upstream is trained
    assert t["grad_weight_macs"] == 6
    assert t["saved_activation_bytes"] == 3 + 8  # linear2's input and the loss
    bias = cm.evaluate(Plan.from_layers(mlp_graph, {"3": LayerUpdate("bias")})).total()
    assert bias["saved_activation_bytes"] == 8  # a bias gradient needs no stored input
    assert bias["grad_weight_macs"] == 0 and bias["grad_bias_macs"] == 2


class _Tiny(nn.Module):
    """conv 3->4 (3x3) BN ReLU, depthwise 4 (3x3) BN ReLU6, pointwise 4->6, pool, linear 6->5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu2 = nn.ReLU6(inplace=True)
        self.pw = nn.Conv2d(4, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.dw(x)))
        return self.fc(torch.flatten(self.pool(self.pw(x)), 1))


@pytest.fixture(scope="module")
def tiny_graph() -> LayerGraph:
    torch.manual_seed(0)
    return LayerGraph.from_model(_Tiny(), input_size=8)


def test_tiny_bias_of_bn_and_layers(tiny_graph):
    assert list(tiny_graph.layers) == ["conv1", "dw", "pw", "fc"]
    assert tiny_graph.layers["conv1"].bias_param == "bn1.bias"
    assert tiny_graph.layers["dw"].bias_param == "bn2.bias"
    assert tiny_graph.layers["pw"].bias_param == "pw.bias"


def test_tiny_depthwise_channel_subset_and_filter(tiny_graph):
    n, hw = 2, 64
    cm = CostModel(tiny_graph, _profile(), batch_size=n)
    # dw weight on 2 of its 4 input channels: stores those channels of its input (int8), computes
    # half of the grad-weight, and the grad-input of everything downstream of it.
    plan = Plan.from_layers(tiny_graph, {"dw": LayerUpdate("weight", channels=(0, 3), axis="in")})
    cost = cm.evaluate(plan)
    dw = cost.layer("dw")
    assert dw.grad_weight_macs == n * 4 * 9 * hw // 2
    assert dw.grad_input_macs == 0
    assert dw.grad_bias_macs == n * 4 * hw  # bn2's bias, the dw layer's bias
    # saved under "dw": its input (2 ch x 64 x 1 B x 2) + ReLU6 mask (4 x 64 bits x 2)
    assert dw.saved_activation_bytes == n * 2 * hw + math.ceil(n * 4 * hw / 8)
    pw = cost.layer("pw")
    assert pw.grad_input_macs == n * 6 * 4 * hw and pw.grad_weight_macs == 0
    # gradient filter r = 2 on dw: P = 4 x 4 patches; grad-weight N*C_in*C_out*P/G (all channels)
    filt = Plan.from_layers(tiny_graph, {"dw": LayerUpdate("weight", patch_size=2)})
    f = cm.evaluate(filt).layer("dw")
    assert f.grad_weight_macs == n * 4 * 4 * 16 // 4
    assert f.saved_activation_bytes == n * 4 * 16 + math.ceil(n * 4 * hw / 8)


def test_tiny_bias_only_first_layer_saves_masks_not_inputs(tiny_graph):
    cm = CostModel(tiny_graph, _profile())
    cost = cm.evaluate(Plan.from_layers(tiny_graph, {"conv1": LayerUpdate("bias")}))
    t = cost.total()
    # masks of relu1 and relu2 (4 x 64 bits each), nothing for convs with frozen weights, the
    # loss softmax 5 x 4 B.
    assert t["saved_activation_bytes"] == 32 + 32 + 20
    assert t["grad_weight_macs"] == 0
    # grad-input through fc, pw and dw (not conv1, whose input needs no gradient)
    assert t["grad_input_macs"] == 6 * 5 + 4 * 6 * 64 + 4 * 9 * 64
    # pytorch: every op on the path keeps its input (conv, batch norm) or a copy (in-place ReLU6)
    pt = CostModel(tiny_graph, _profile(), accounting="pytorch").evaluate(
        Plan.from_layers(tiny_graph, {"conv1": LayerUpdate("bias")}))
    # bn1 input 256 x 4, relu1 result (its storage is bn1's output) 256 x 4 (also dw's input),
    # bn2 input 1024 B, relu6 input copy 1024 B, pw input = relu6 result (bn2 output) 1024 B,
    # pool: global, nothing; fc frozen: nothing; loss 5 x 4 + 8 + 4.
    assert pt.saved_activation_bytes == 1024 * 5 + 32


def test_unknown_op_is_reported_and_strict_fails():
    graph = LayerGraph.from_model(TanhNet(), input_size=8)
    with pytest.warns(UserWarning, match="tanh"):
        cm = CostModel(graph, _profile())
    cost = cm.evaluate(Plan.full(graph))
    assert cost.unknown_ops == ["tanh"]
    # the unknown op is counted (its input saved), not silently zero
    tanh_row = next(r for r in cost.ops if r.kind == "tanh")
    assert tanh_row.saved_activation_bytes == 4 * 36
    with pytest.raises(CostError, match="tanh"):
        CostModel(graph, _profile(), strict=True)


def test_a_rules_forward_macs_count_in_the_totals_and_the_time():
    """A rule given for an op kind of one's own counts its forward MACs: tanh over the conv's
    output (4 channels x 6 x 6 = 144 elements) at a made-up 3 MACs per element, batch 2, is
    864 MACs beside the conv's 2 x 4 x 3 x 9 x 36 = 7,776 and the linear's 2 x 4 x 2 = 16.
    The analytic forward time of the op is its MACs at the profile's MAC rate, or its memory
    traffic if that takes longer. A rule's bad count is a named error."""
    from budgetsearch.cost import OpCost

    graph = LayerGraph.from_model(TanhNet(), input_size=8)
    profile = _profile(peak_macs_per_s=1e3, memory_bandwidth_bytes_per_s=1e12,
                       op_overhead_us=0)

    def tanh(ctx):
        return OpCost(forward_macs=3 * ctx.batch * ctx.node.numel)

    cm = CostModel(graph, profile, batch_size=2, rules={"tanh": tanh})
    cost = cm.evaluate(Plan.full(graph))
    assert cost.unknown_ops == []
    assert cost.forward_macs == 7776 + 864 + 16
    row = next(r for r in cost.ops if r.kind == "tanh")
    assert row.forward_macs == 864
    assert row.forward_ms == pytest.approx(1e3 * 864 / 1e3)
    assert cm.summarize(Plan.full(graph)).forward_macs == cost.forward_macs
    # set_rule on a built cost model counts the new rule's MACs and time
    cm.set_rule("tanh", lambda ctx: OpCost(forward_macs=ctx.batch * ctx.node.numel))
    again = cm.evaluate(Plan.full(graph))
    assert again.forward_macs == 7776 + 288 + 16
    assert again.latency_ms == pytest.approx(cost.latency_ms - 1e3 * (864 - 288) / 1e3)
    # a rule refused by set_rule leaves the cost model as it was
    with pytest.raises(CostError, match=r"gave forward_macs 1\.5"):
        cm.set_rule("tanh", lambda ctx: OpCost(forward_macs=1.5, saved=((("p", 0), 10**6),)))
    assert cm.evaluate(Plan.full(graph)).total() == again.total()
    with pytest.raises(CostError, match=r"rule for 'tanh' gave forward_macs -1 for op tanh"):
        CostModel(graph, profile, rules={"tanh": lambda ctx: OpCost(forward_macs=-1)})


def test_result_is_queryable_and_json(tiny_graph):
    cost = CostModel(tiny_graph, _profile(), accounting="pytorch").evaluate(Plan.full(tiny_graph))
    t = cost.total()
    assert cost.backward_macs == t["backward_macs"]
    kinds = cost.by_kind()
    assert kinds["memory_bytes"]["activations"] == t["saved_activation_bytes"]
    assert kinds["macs"]["backward"] == sum(r.backward_macs for r in cost.layers())
    doc = json.loads(json.dumps(cost.to_dict()))
    assert doc["peak_memory_bytes"] == t["peak_memory_bytes"]
    assert [row["name"] for row in doc["layers"]] == ["(input)", "conv1", "dw", "pw", "fc"]
    assert "peak memory" in cost.format_table()
    with pytest.raises(KeyError, match="conv1"):
        cost.layer("nope")


def test_plan_for_other_model_refused(tiny_graph, mlp_graph):
    cm = CostModel(tiny_graph, _profile())
    with pytest.raises(PlanError, match="another model"):
        cm.evaluate(Plan.full(mlp_graph))


def test_optimizer_state_and_summary_match(tiny_graph):
    plan = Plan.full(tiny_graph)
    sgd = CostModel(tiny_graph, _profile(), optimizer="sgd")
    adam = CostModel(tiny_graph, _profile(), optimizer="adam")
    params = sgd.evaluate(plan).trainable_params
    assert adam.evaluate(plan).optimizer_bytes == params * 2 * 4
    summary = adam.summarize(plan)
    full = adam.evaluate(plan)
    assert summary.peak_memory_bytes == full.peak_memory_bytes
    assert summary.backward_macs == full.backward_macs
    assert summary.saved_activation_bytes == full.saved_activation_bytes
    assert summary.latency_ms == pytest.approx(full.latency_ms)


def test_filter_on_a_linear_layer_is_refused_when_costed(tiny_graph):
    cm = CostModel(tiny_graph, _profile())
    with pytest.raises(PlanError, match=r"layer fc: a gradient filter"):  # by the plan itself
        Plan.from_layers(tiny_graph, {"fc": LayerUpdate("weight", patch_size=2)})
    with pytest.raises(PlanError, match=r"fc.*2-D convolutions"):  # a plain mapping
        cm.evaluate({"fc": LayerUpdate("weight", patch_size=2)})


def test_depthwise_output_channel_subset_needs_only_those_input_channels(tiny_graph):
    # a depthwise conv's output channel c reads only input channel c: updating 1 of 4 rows keeps
    # a quarter of its input, in the device engine and in budgetsearch's operators alike
    plan = Plan.from_layers(tiny_graph, {"dw": LayerUpdate("weight", channels=(2,), axis="out")})
    dev = CostModel(tiny_graph, _profile()).evaluate(plan).layer("dw")
    assert dev.saved_activation_bytes == 1 * 64 + math.ceil(4 * 64 / 8)
    ops = CostModel(tiny_graph, _profile(), accounting="ops").evaluate(plan).layer("dw")
    assert ops.saved_activation_bytes == 1 * 64 * 4 + 4 * 64  # fp32 channel + bool mask


def test_latency_splits_into_forward_backward_and_optimizer(tiny_graph):
    plan = Plan.full(tiny_graph)
    profile = _profile()
    costs = {}
    for opt in ("sgd", "adam"):
        cm = CostModel(tiny_graph, profile, optimizer=opt)
        full, summary = cm.evaluate(plan), cm.summarize(plan)
        t = full.total()
        assert summary.backward_ms == pytest.approx(t["backward_ms"]) and t["backward_ms"] > 0
        assert t["backward_ms"] == pytest.approx(sum(r.backward_ms for r in full.ops))
        assert all(r.backward_ms == 0 for r in full.ops if not r.backward)
        costs[opt] = t
    # the optimizer step is all that differs: adam reads and writes 2 state tensors more
    # per parameter than sgd (4 bytes each under the device accounting of this profile)
    sgd, adam = costs["sgd"], costs["adam"]
    assert adam["forward_ms"] == pytest.approx(sgd["forward_ms"])
    assert adam["backward_ms"] == pytest.approx(sgd["backward_ms"])
    per = CostModel(tiny_graph, profile).acc.weight_bytes
    extra_ms = 1e3 * sgd["trainable_params"] * per * 4 / profile.memory_bandwidth_bytes_per_s
    assert adam["latency_ms"] - sgd["latency_ms"] == pytest.approx(extra_ms)
    assert sgd["latency_ms"] > sgd["forward_ms"] + sgd["backward_ms"]
    last = CostModel(tiny_graph, profile).evaluate(
        Plan.from_layers(tiny_graph, {"fc": LayerUpdate("weight")})).total()
    assert 0 < last["backward_ms"] < sgd["backward_ms"]
