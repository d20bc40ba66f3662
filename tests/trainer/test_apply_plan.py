"""apply_plan wiring: gradients of every plan kind, exact remove(), bad plans refused, and the
fusion of frozen batch norms and activations into filtered convs."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from _toys import conv_pool_linear
from torch import nn

from budgetsearch.errors import PlanError
from budgetsearch.graph import LayerGraph
from budgetsearch.models.mcu import Clamp
from budgetsearch.ops import PlannedConv2d, PlannedLinear, filtered_conv2d, suspended_epilogues
from budgetsearch.plan import LayerUpdate, Plan
from budgetsearch.trainer import (
    FrozenBatchNorm,
    MaskedActivation,
    SavedTensorMeter,
    active_plan,
    apply_plan,
    remove_plan,
)
from budgetsearch.trainer.dynamic import _layer_outputs

torch.set_num_threads(1)
DT = torch.float64
SIZE = 10


class Toy(nn.Module):
    """Conv-BN-ReLU6, depthwise, a conv with its own bias + Clamp, a residual add, a grouped conv
    with Hardtanh, global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
                                nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Conv2d(8, 8, 1)
        self.act = Clamp(-1.0, 1.0)
        self.grp = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1, groups=2, bias=False),
                                 nn.BatchNorm2d(12), nn.Hardtanh(-2.0, 2.0))
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.act(self.pw(self.dw(x)))
        x = self.grp(x)
        return self.head(x.mean((2, 3)))


def make_toy(seed: int = 0) -> tuple[Toy, LayerGraph]:
    torch.manual_seed(seed)
    model = Toy()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    graph = LayerGraph.from_model(model, input_size=SIZE, model_name="toy")
    return model.to(DT), graph


def plans(graph: LayerGraph) -> dict[str, Plan]:
    def p(updates: dict) -> Plan:
        return Plan.from_layers(graph, updates)

    W = LayerUpdate
    return {
        "bias-only": Plan.bias_only(graph),
        "weight-all": Plan.full(graph),
        "out-subset": p({"dw.0": W("weight", channels=(1, 4, 6)),
                         "grp.0": W("weight", channels=(0, 5, 11)), "head": W("weight")}),
        "in-subset": p({"pw": W("weight", channels=(0, 3, 7), axis="in"),
                        "grp.0": W("weight", channels=(2, 5), axis="in"),
                        "head": W("weight", channels=(1, 2), axis="in")}),
        "filtered-r2": p({"stem.0": W("bias"), "pw": W("weight", patch_size=2),
                          "grp.0": W("weight", patch_size=2), "head": W("weight")}),
        "filtered-r4": p({"stem.0": W("weight", patch_size=4), "dw.0": W("weight", patch_size=4),
                          "head": W("bias")}),
        "filtered-subset": p({"stem.0": W("bias"),
                              "pw": W("weight", channels=(1, 2), axis="in", patch_size=2),
                              "grp.0": W("weight", channels=(0, 7), patch_size=2),
                              "head": W("weight", channels=(3,))}),
    }


class RefFiltered(nn.Module):
    """The filtered operator on the full weight: the reference for a filtered layer's wiring."""

    def __init__(self, conv: nn.Conv2d, r: int, mode: str) -> None:
        super().__init__()
        self.conv, self.r, self.mode = conv, r, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return filtered_conv2d(x, c.weight, c.bias, stride=c.stride, padding=c.padding,
                               dilation=c.dilation, groups=c.groups, patch_size=self.r,
                               mode=self.mode)


def slice_of(full, *, groups, out_channels=None, in_channels=None):
    """The trained part of a full gradient (independent of the library's layout code)."""
    if out_channels is not None:
        return full[list(out_channels)]
    c_out, cpg = full.shape[:2]
    m = c_out // groups
    return torch.stack([full[(c // cpg) * m:(c // cpg + 1) * m, c % cpg] for c in in_channels], 1)


def reference_grads(model: Toy, plan: Plan, x, y, mode: str, bn_train: bool = False) -> Toy:
    ref = copy.deepcopy(model)
    for name, update in plan.updates.items():
        if update.patch_size > 1:
            parent, _, child = name.rpartition(".")
            holder = ref.get_submodule(parent) if parent else ref
            setattr(holder, child, RefFiltered(ref.get_submodule(name), update.patch_size, mode))
    ref.train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d) and not bn_train:
            m.eval()
    for p in ref.parameters():
        p.requires_grad_(True)
    F.cross_entropy(ref(x), y).backward()
    return ref


def ref_param(ref: nn.Module, name: str) -> nn.Parameter:
    for prefix in (name, name.replace("pw.", "pw.conv.").replace("grp.0.", "grp.0.conv.")
                   .replace("stem.0.", "stem.0.conv.").replace("dw.0.", "dw.0.conv.")):
        try:
            return ref.get_parameter(prefix)
        except AttributeError:
            continue
    raise AssertionError(name)


def data(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, SIZE, SIZE, generator=gen, dtype=DT),
            torch.randint(0, 5, (4,), generator=gen))


KINDS = list(plans(make_toy()[1]))
CASES = [(k, "normalized") for k in KINDS] + [(k, "paper") for k in KINDS if "filtered" in k]


@pytest.mark.parametrize(("kind", "mode"), CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_gradients_equal_dense_on_updated_slice(kind, mode):
    model, graph = make_toy()
    plan = plans(graph)[kind]
    x, y = data()
    ref = reference_grads(model, plan, x, y, mode)
    planned = copy.deepcopy(model)
    handle = apply_plan(planned, plan, graph=graph, filter_mode=mode)
    out = planned(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)
    F.cross_entropy(out, y).backward()
    expected_names = set()
    for name, update in plan.updates.items():
        layer = graph.layers[name]
        if update.mode == "weight":
            expected_names.add(f"{name}.weight" if update.channels is None
                               else f"{name}.weight_slice")
        expected_names.add(layer.bias_param)
    assert {n for n, _ in handle.named_parameters()} == expected_names
    for name, param in handle.named_parameters():
        assert param.grad is not None, name
        if name.endswith(".weight_slice"):
            layer = name[: -len(".weight_slice")]
            update = plan.updates[layer]
            full = ref_param(ref, f"{layer}.weight").grad
            kw = {"out_channels" if update.axis == "out" else "in_channels": update.channels}
            want = slice_of(full, groups=graph.layers[layer].groups, **kw)
        else:
            want = ref_param(ref, name).grad
        torch.testing.assert_close(param.grad, want, rtol=1e-10, atol=1e-12, msg=name)
    trained = {id(p) for p in handle.parameters()}
    for name, p in planned.named_parameters():
        if id(p) not in trained:
            assert p.grad is None and not p.requires_grad, name
    handle.remove()


@pytest.mark.parametrize("kind", ["out-subset", "filtered-subset"])
def test_batch_norm_in_train_mode(kind):
    model, graph = make_toy()
    plan = plans(graph)[kind]
    x, y = data()
    ref = reference_grads(model, plan, x, y, "normalized", bn_train=True)
    planned = copy.deepcopy(model)
    with apply_plan(planned, plan, graph=graph, bn="train") as handle:
        F.cross_entropy(planned(x), y).backward()
        for name, param in handle.named_parameters():
            if name.endswith(".bias"):
                torch.testing.assert_close(param.grad, ref_param(ref, name).grad, rtol=1e-10,
                                           atol=1e-12, msg=name)
        torch.testing.assert_close(planned.grp[1].running_mean, ref.grp[1].running_mean)
        assert not torch.equal(planned.grp[1].running_mean, model.grp[1].running_mean)


def test_modules_replaced_as_documented():
    model, graph = make_toy()
    plan = Plan.from_layers(graph, {"grp.0": LayerUpdate("weight", channels=(1, 2)),
                                    "head": LayerUpdate("weight")})
    with apply_plan(model, plan, graph=graph) as handle:
        assert isinstance(model.grp[0], PlannedConv2d) and model.grp[0].weight_slice is not None
        assert isinstance(model.head, PlannedLinear)
        assert isinstance(model.grp[1], FrozenBatchNorm) and model.grp[1].bias_grad  # grp.0's bias
        assert isinstance(model.stem[1], FrozenBatchNorm)  # every BN frozen, on the path or not
        assert not model.stem[1].bias_grad
        assert isinstance(model.grp[2], MaskedActivation)  # on the backward path
        assert isinstance(model.stem[2], nn.ReLU6)  # upstream of every updated layer: stock
        assert isinstance(model.stem[0], nn.Conv2d) and isinstance(model.pw, nn.Conv2d)
        assert active_plan(model) is handle
        groups = handle.param_groups()
        assert groups[0]["param_names"] == ["grp.0.weight_slice", "grp.1.bias", "head.weight",
                                            "head.bias"]
        assert sorted(model.state_dict()) == sorted(make_toy()[0].state_dict())
    assert active_plan(model) is None
    with apply_plan(model, plan, graph=graph, bn="train"):
        assert isinstance(model.grp[1], nn.BatchNorm2d) and model.grp[1].training
        assert model.grp[1].bias.requires_grad and not model.grp[1].weight.requires_grad


@pytest.mark.parametrize("kind", ["out-subset", "in-subset", "filtered-subset", "weight-all"])
def test_remove_restores_exactly_with_updates_merged(kind):
    model, graph = make_toy()
    model.eval()
    model.pw.bias.requires_grad_(False)  # an arbitrary flag pattern to restore
    plan = plans(graph)[kind]
    x, y = data()
    originals = dict(model.named_modules())
    lr = 0.1
    ref = reference_grads(model, plan, x, y, "normalized")
    expected = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for name, update in plan.updates.items():
            layer = graph.layers[name]
            if update.mode == "weight":
                grad = ref_param(ref, f"{name}.weight").grad
                w = expected[f"{name}.weight"]
                if update.channels is None:
                    w -= lr * grad
                elif update.axis == "out":
                    idx = list(update.channels)
                    w[idx] -= lr * grad[idx]
                else:
                    cpg, groups = w.shape[1], layer.groups
                    m = w.shape[0] // groups
                    for c in update.channels:
                        rows = slice((c // cpg) * m, (c // cpg + 1) * m)
                        w[rows, c % cpg] -= lr * grad[rows, c % cpg]
            expected[layer.bias_param] -= lr * ref_param(ref, layer.bias_param).grad
    handle = apply_plan(model, plan, graph=graph)
    opt = torch.optim.SGD(handle.param_groups(), lr=lr)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    remove_plan(model)
    assert not handle.active
    got = model.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12, msg=key)
    assert dict(model.named_modules()).keys() == originals.keys()
    assert all(model.get_submodule(n) is m for n, m in originals.items() if n)
    assert not model.training and not any(m.training for m in model.modules())
    assert not model.pw.bias.requires_grad and model.pw.weight.requires_grad
    handle.remove()  # idempotent


@pytest.mark.parametrize("kind", ["bias-only", "weight-all", "out-subset"])
def test_a_model_moved_while_the_plan_is_applied_comes_back_whole(kind):
    """model.to(dtype) (or a device) while the plan is applied moves the replacements, not the
    originals kept aside: remove() puts every original back in the model's new dtype, with the
    trained values merged, and the model runs."""
    model, graph = make_toy()
    model.float()
    plan = plans(graph)[kind]
    handle = apply_plan(model, plan, graph=graph)
    model.double()
    x, y = data()
    opt = torch.optim.SGD(handle.param_groups(), lr=0.1)
    F.cross_entropy(model(x.double()), y).backward()
    opt.step()
    head = model.head.merged_weight().detach().clone(), model.head.bias.detach().clone()
    remove_plan(model)
    torch.testing.assert_close((model.head.weight, model.head.bias), head, rtol=0, atol=0)
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float64, name
    assert model(x.double()).dtype == torch.float64  # no mixed dtypes left
    with apply_plan(model, plan, graph=graph):  # and the plan applies again
        assert model(x.double()).dtype == torch.float64


def test_bad_plans_are_refused_and_leave_the_model_untouched():
    model, graph = make_toy()
    other = conv_pool_linear(2)
    other_graph = LayerGraph.from_model(other, input_size=SIZE)
    with pytest.raises(PlanError, match="another model"):
        apply_plan(model, Plan.full(other_graph), graph=graph)
    with pytest.raises(PlanError, match="another model"):
        apply_plan(other, Plan.full(graph))
    with pytest.raises(PlanError, match="head: a gradient filter"):  # refused by the plan
        Plan.from_layers(graph, {"head": LayerUpdate("weight", patch_size=2)})
    # a plan file built elsewhere that slipped past: apply_plan refuses it untouched too
    bad = Plan.from_layers(graph, {"head": LayerUpdate("weight")})
    object.__setattr__(bad.updates["head"], "patch_size", 2)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(PlanError, match="head: a gradient filter"):
        apply_plan(model, bad, graph=graph)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert isinstance(model.stem[1], nn.BatchNorm2d) and active_plan(model) is None
    with (apply_plan(model, Plan.full(graph), graph=graph),
          pytest.raises(PlanError, match="already applied")):
        apply_plan(model, Plan.full(graph), graph=graph)
    with pytest.raises(PlanError, match="bn must be"):
        apply_plan(model, Plan.full(graph), graph=graph, bn="sometimes")
    model.dw[1] = nn.BatchNorm2d(8, track_running_stats=False)  # nothing to freeze it with
    with pytest.raises(PlanError, match=r"layer dw\.1: BatchNorm2d has no running statistics"):
        apply_plan(model, Plan.full(graph), graph=graph)
    assert isinstance(model.dw[1], nn.BatchNorm2d) and active_plan(model) is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


class StdConv2d(nn.Conv2d):
    """Weight standardisation: a conv whose forward is not nn.Conv2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class CosineHead(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1), self.bias)


class TrainBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def _with(module_name: str, new: nn.Module) -> tuple[nn.Module, LayerGraph]:
    model, _ = make_toy()
    parent, _, leaf = module_name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, leaf, new)
    graph = LayerGraph.from_model(model.float(), input_size=SIZE, model_name="toy")
    return model.to(DT), graph


@pytest.mark.parametrize(("where", "make", "why"), [
    ("pw", lambda: StdConv2d(8, 8, 1), "its class overrides Conv2d's forward"),
    ("head", lambda: CosineHead(12, 5), "its class overrides Linear's forward"),
    ("dw.1", lambda: TrainBN(8), "its class overrides _BatchNorm's forward"),
    ("pw", lambda: nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 1)),
     r"it is parametrized \(e.g. weight_norm"),
])
@pytest.mark.parametrize("trained", [True, False])
def test_a_module_whose_computation_the_plan_would_not_repeat_is_refused(where, make, why,
                                                                          trained):
    """Replacing a subclass with its own forward by a plain planned layer (or a frozen batch
    norm) changes the model's function, even for a layer only frozen on the backward path;
    a parametrized weight would be read as a constant and never trained."""
    torch.manual_seed(0)
    model, graph = _with(where, make())
    model.eval()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=DT)
    before = model(x)
    head_only = {"head": LayerUpdate("weight")} if where != "head" else {
        "grp.0": LayerUpdate("weight")}
    plan = Plan.full(graph) if trained else Plan.from_layers(graph, {**head_only,
                                                                   "stem.0": LayerUpdate("weight")})
    layer = where if where != "dw.1" else "dw\\.1"
    with pytest.raises(PlanError, match=rf"layer {layer} is a .*: {why}"):
        apply_plan(model, plan, graph=graph)
    assert active_plan(model) is None and torch.equal(model(x), before)


# ------------------------------------------------------------------------------ fusion
FILTERED = ["filtered-r2", "filtered-r4", "filtered-subset"]


def test_which_modules_are_fused():
    model, graph = make_toy()
    with apply_plan(model, plans(graph)["filtered-r4"], graph=graph):
        assert model.stem[0].fused == (model.stem[1], model.stem[2])
        assert model.dw[0].fused == (model.dw[1], model.dw[2])
        assert model.stem[1].fused_into == "stem.0" and model.dw[2].fused_into == "dw.0"
        assert "epilogue=(FrozenBatchNorm, MaskedActivation)" in repr(model.stem[0])
        assert not model.grp[0].fused  # frozen on the path: an ordinary conv, nothing fused
    with apply_plan(model, plans(graph)["filtered-r2"], graph=graph):
        # pw has its own bias and no batch norm: only the Clamp after it is fused
        assert model.pw.fused == (model.act,) and model.act.fused_into == "pw"
        assert model.grp[0].fused == (model.grp[1], model.grp[2])
        assert model.stem[1].fused_into is None  # stem.0 trains its bias only: not filtered
    with apply_plan(model, plans(graph)["filtered-r4"], graph=graph, fuse=False):
        assert all(not m.fused for m in model.modules() if isinstance(m, PlannedConv2d))


def step(model, plan, graph, *, fuse):
    x, y = data()
    with apply_plan(model, plan, graph=graph, fuse=fuse) as handle:
        with SavedTensorMeter.for_model(model) as meter:
            out = model(x)
        F.cross_entropy(out, y).backward()
        grads = {n: p.grad.clone() for n, p in handle.named_parameters()}
        keys = sorted(model.state_dict())
    return out.detach(), grads, meter.bytes, keys


@pytest.mark.parametrize("kind", FILTERED)
def test_fused_equals_unfused(kind):
    model, graph = make_toy()
    plan = plans(graph)[kind]
    out_f, grads_f, saved_f, keys_f = step(copy.deepcopy(model), plan, graph, fuse=True)
    out_u, grads_u, saved_u, keys_u = step(copy.deepcopy(model), plan, graph, fuse=False)
    torch.testing.assert_close(out_f, out_u, rtol=1e-12, atol=1e-12)
    assert grads_f.keys() == grads_u.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-10, atol=1e-12,
                                   msg=name)
    assert saved_f == saved_u  # the mask moves from the activation into the conv's node
    assert keys_f == keys_u == sorted(model.state_dict())


def test_fused_modules_refuse_other_inputs_and_run_alone_when_suspended():
    model, graph = make_toy()
    reference = copy.deepcopy(model).eval()
    x, _ = data()
    with apply_plan(model, plans(graph)["filtered-r4"], graph=graph):
        t = torch.randn(2, 8, 5, 5, dtype=DT)
        with pytest.raises(PlanError, match=r"inside the conv 'stem\.0'.*fuse=False"):
            model.stem[1](t)
        with pytest.raises(PlanError, match=r"inside the conv 'dw\.0'"):
            model.dw[2](t)
        seen = []
        hook = model.stem[0].register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            fused_out = model(x)
            with suspended_epilogues(model):
                plain_out = model(x)
                torch.testing.assert_close(model.stem[1](t), reference.stem[1](t))
            assert not model.stem[0].suspended
        finally:
            hook.remove()
        torch.testing.assert_close(plain_out, fused_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(seen[1], reference.stem[0](x))  # suspended: the conv's own
        torch.testing.assert_close(seen[0], reference.stem(x))  # fused: after BN and ReLU6
        hook = model.stem[0].register_forward_hook(lambda _m, _a, out: out.clone())
        try:
            with pytest.raises(PlanError, match="forward hook"):
                model(x)
        finally:
            hook.remove()


class TwoConvs(nn.Module):
    """conv1-bn1-relu, conv2-bn2, a residual add and the same ReLU module again (as ResNet's
    BasicBlock does: it must not be fused); with ``features`` the model also returns conv1's
    output (then conv1's batch norm must not be fused either)."""

    def __init__(self, *, features: bool = False) -> None:
        super().__init__()
        self.features = features
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        f = self.conv1(x)
        x = self.relu(self.bn1(f))
        x = self.relu(self.bn2(self.conv2(x)) + x)
        logits = self.head(x.mean((2, 3)))
        return (logits, f) if self.features else logits


def two_convs(*, features: bool) -> tuple[TwoConvs, LayerGraph, Plan, torch.Tensor, TwoConvs]:
    """The model, its graph, a plan filtering both convs, an input, and a copy of the model."""
    torch.manual_seed(0)
    model = TwoConvs(features=features)
    graph = LayerGraph.from_model(model, input_size=8)
    model = model.to(DT)
    plan = Plan.from_layers(graph, {"conv1": LayerUpdate("weight", patch_size=2),
                                    "conv2": LayerUpdate("weight", patch_size=2),
                                    "head": LayerUpdate("weight")})
    return model, graph, plan, torch.randn(2, 3, 8, 8, dtype=DT), copy.deepcopy(model)


def test_an_output_the_model_returns_is_not_fused():
    model, graph, plan, x, _ = two_convs(features=True)
    with apply_plan(model, plan, graph=graph):
        assert not model.conv1.fused and model.bn1.fused_into is None
        torch.testing.assert_close(model(x)[1], F.conv2d(x, model.conv1.weight, padding=1))


def test_layer_outputs_for_neq_are_the_layers_own_with_a_fused_plan():
    model, graph = make_toy()
    probe, _ = data(3)
    plain = _layer_outputs(copy.deepcopy(model), graph, probe)
    with apply_plan(model, plans(graph)["filtered-r4"], graph=graph):
        planned = _layer_outputs(model, graph, probe)
    assert plain.keys() == planned.keys()
    for name in plain:
        torch.testing.assert_close(planned[name], plain[name], rtol=1e-12, atol=1e-12, msg=name)


def test_a_shared_activation_is_not_fused_but_the_batch_norm_is():
    model, graph, plan, x, unfused = two_convs(features=False)
    with apply_plan(unfused, plan, graph=graph, fuse=False):
        want = unfused(x)
    with apply_plan(model, plan, graph=graph):
        assert isinstance(model.bn1, FrozenBatchNorm) and model.conv1.fused == (model.bn1,)
        assert model.conv2.fused == (model.bn2,)  # bn2's output goes to the add, not the ReLU
        assert isinstance(model.relu, MaskedActivation) and model.relu.fused_into is None
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
