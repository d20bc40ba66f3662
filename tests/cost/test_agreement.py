"""The cost model against PyTorch itself: saved bytes (saved_tensors_hooks), MACs
(FlopCounterMode, corrected for its grouped-conv grad-weight overcount) and forward MACs (fvcore).

For each model, 30 random plans (layers, modes, channel subsets, patch sizes; seeded) at batch
sizes 1 and 3, one with batch norm on batch statistics. The ``pytorch`` accounting describes stock
autograd with ``requires_grad`` freezing, where channel subsets and filters cannot be expressed,
so it must agree exactly for every plan.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from budgetsearch import CostModel, LayerGraph, LayerUpdate, Plan, load_model, load_profile
from budgetsearch.cost.measure import count_macs, measure_saved_bytes

# Small inputs keep the suite fast; what autograd saves does not depend on the input size.
MODELS = {"mobilenet_v2": 32, "resnet18": 32, "mobilenet_v3_small": 32, "mcunet-5fps": 64}
N_PLANS = 30


def random_plan(graph: LayerGraph, rng: random.Random) -> Plan:
    names = list(graph.layers)
    k = rng.choice([1, 2, 3, 5, 10, len(names)])
    updates = {}
    for name in rng.sample(names, k):
        layer = graph.layers[name]
        mode = rng.choice(["bias", "weight"]) if layer.bias_param else "weight"
        channels, axis = None, "out"
        if mode == "weight" and rng.random() < 0.4:
            axis = rng.choice(["out", "in"])
            count = layer.out_channels if axis == "out" else layer.in_channels
            channels = tuple(rng.sample(range(count), max(1, count // 4)))
        r = rng.choice([1, 1, 2, 4]) if len(layer.weight_shape) == 4 and mode == "weight" else 1
        updates[name] = LayerUpdate(mode, channels=channels, axis=axis, patch_size=r)
    return Plan.from_layers(graph, updates)


@pytest.fixture(scope="module", params=list(MODELS))
def traced(request):
    torch.manual_seed(0)
    name = request.param
    model = load_model(name, weights="random", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=MODELS[name], model_name=name)
    return name, model, graph


@pytest.mark.parametrize("batch_size,bn_train", [(1, False), (3, False), (2, True)])
def test_saved_bytes_equal_autograd(traced, batch_size, bn_train):
    name, model, graph = traced
    cm = CostModel(graph, load_profile("rpi4"), accounting="pytorch", batch_size=batch_size,
                   bn_train=bn_train)
    rng = random.Random(f"{name}-{batch_size}-{bn_train}")
    n_plans = N_PLANS if batch_size == 1 else 10
    for _ in range(n_plans):
        plan = random_plan(graph, rng)
        predicted = cm.evaluate(plan).saved_activation_bytes
        measured = measure_saved_bytes(model, graph, plan, batch_size=batch_size,
                                       bn_train=bn_train)
        assert predicted == measured, (plan.to_dict()["updates"], predicted, measured)


def test_macs_equal_flop_counter(traced):
    name, model, graph = traced
    cm = CostModel(graph, load_profile("rpi4"), accounting="pytorch", batch_size=2)
    rng = random.Random(f"macs-{name}")
    for _ in range(N_PLANS):
        plan = random_plan(graph, rng)
        cost = cm.evaluate(plan)
        counted = count_macs(model, graph, plan, batch_size=2)
        assert counted.forward_macs == cost.forward_macs
        # FlopCounterMode counts conv and matmul only: grad-bias additions are not in it
        assert counted.backward_macs == cost.grad_input_macs + cost.grad_weight_macs, (
            plan.to_dict()["updates"])


def test_depthwise_overcount_of_flop_counter_is_as_documented():
    # docs/cost-model.md, 'Measuring against PyTorch'.
    # A depthwise 3x3 conv, 64 channels, 32x32, batch 1: FlopCounterMode counts 38.3 M MACs of
    # backward; the true figure is 1.18 M (grad-input 0.59 M + grad-weight 0.59 M).
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1, groups=64),
                                torch.nn.Flatten(), torch.nn.Linear(64 * 32 * 32, 2))
    graph = LayerGraph.from_model(model, input_size=32, in_channels=64)
    plan = Plan.from_layers(graph, {"0": LayerUpdate("weight")})
    counted = count_macs(model, graph, plan)
    cost = CostModel(graph, load_profile("rpi4"), accounting="pytorch",
                     batch_size=1).evaluate(plan)
    linear = 64 * 32 * 32 * 2  # the head's grad-input
    assert cost.layer("0").grad_weight_macs == 64 * 9 * 1024
    # here the conv's input needs no gradient, so FlopCounterMode's 38.3 M less the 0.59 M
    # grad-input remain: exactly G = 64 times the true grad-weight
    assert counted.backward_macs_uncorrected - linear == 64 * (64 * 9 * 1024)
    assert counted.backward_macs_uncorrected - linear + 64 * 9 * 1024 == pytest.approx(
        38.3e6, rel=0.01)
    assert counted.backward_macs == cost.grad_input_macs + cost.grad_weight_macs


def test_forward_macs_agree_with_fvcore(traced):
    fvcore = pytest.importorskip("fvcore.nn")
    _name, model, graph = traced
    x = torch.randn(1, *graph.input_shape)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = fvcore.FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_module = analysis.by_module()
    cost = CostModel(graph, load_profile("rpi4"), accounting="pytorch", batch_size=1).evaluate(
        Plan.full(graph))
    ours = {r.module: r.forward_macs for r in cost.ops if r.kind in ("conv2d", "linear")}
    assert ours, "no conv or linear ops"
    for module, macs in ours.items():
        assert by_module[module] == macs, module


class _Scaled(torch.nn.Module):
    """A conv whose output is multiplied (by a number, a buffer, itself, or in place) before
    the next conv."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 2)
        self.register_buffer("scale", torch.full((1, 4, 1, 1), 0.5))
        self.register_buffer("flat", torch.full((4,), 0.5))

    def forward(self, x):
        x = self.c1(x)
        if self.how == "number":
            x = x * 0.5
        elif self.how == "number-left":
            x = 0.5 * x
        elif self.how == "method":
            x = x.mul(0.5)
        elif self.how == "buffer":
            x = x * self.scale
        elif self.how == "buffer-view":
            x = x * self.flat.view(1, -1, 1, 1)
        elif self.how == "made-in-forward":  # not the model's: autograd keeps it
            x = x * torch.full((1, 4, 1, 1), 0.5)
        elif self.how == "square":
            x = x * x
        elif self.how == "keyword-square":
            x = torch.mul(input=x, other=x)
        elif self.how == "product":
            x = x * torch.sigmoid(x)
        elif self.how == "in-place-product":  # autograd keeps a copy of x + 1 for y's gradient
            y = torch.sigmoid(x)
            x = x + 1
            x *= y
        x = self.c2(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("tracer", ["fx", "hooks"])
@pytest.mark.parametrize("how", ["number", "number-left", "method", "buffer", "buffer-view",
                                 "made-in-forward",
                                 "square", "keyword-square", "product", "in-place-product"])
def test_products_keep_what_autograd_keeps(how, tracer):
    """Autograd keeps neither operand of ``x * 0.5`` (nor of ``x * buffer``: the buffer is the
    model's own), keeps ``x`` for ``x * x``, and a copy of ``x`` for ``x *= y``: the pytorch
    accounting agrees in every case, with both tracers."""
    torch.manual_seed(0)
    model = _Scaled(how)
    graph = LayerGraph.from_model(model, input_size=8, tracer=tracer)
    assert sum(n.kind == "mul" for n in graph.nodes) == 1
    cm = CostModel(graph, load_profile("rpi4"), accounting="pytorch", batch_size=2)
    for plan in (Plan.full(graph), Plan.from_layers(graph, {"c2": LayerUpdate("bias")})):
        assert cm.evaluate(plan).saved_activation_bytes == measure_saved_bytes(
            model, graph, plan, batch_size=2), (how, plan.to_dict()["updates"])
