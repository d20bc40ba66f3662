"""The one registry style: decorators, duplicates refused, unknown names listed; cost rules
overridden per cost model, never in the global table."""

from __future__ import annotations

import doctest
import warnings

import pytest
from _toys import TanhNet, conv_pool_linear, small_cnn
from torch import nn

import budgetsearch._registry
import budgetsearch.criteria.base
import budgetsearch.models.zoo
import budgetsearch.selectors.base
from budgetsearch import CostModel, LayerGraph, Plan, load_profile
from budgetsearch._registry import Registry
from budgetsearch.cost import RULES, OpContext, OpCost, register_rule
from budgetsearch.criteria import (
    Criterion,
    MagnitudeCriterion,
    get_criterion,
    list_criteria,
    register_criterion,
)
from budgetsearch.errors import CostError, ModelError, PlanError, ProfileError, ScoresError
from budgetsearch.models import list_models, load_model, register_model
from budgetsearch.profiles import load_profile as load
from budgetsearch.selectors import get_method, list_methods, register_method


@pytest.fixture
def scratch_registries(monkeypatch):
    """The model, criterion and method registries as they are, restored after the test (other
    tests run every registered method)."""
    for registry in (budgetsearch.models.zoo._REGISTRY, budgetsearch.criteria.base._CRITERIA,
                     budgetsearch.selectors.base._METHODS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))


def test_module_example_runs():
    results = doctest.testmod(budgetsearch._registry)
    assert results.attempted >= 5 and results.failed == 0


def test_registry_is_a_read_only_mapping():
    reg: Registry[int] = Registry("number", error=PlanError, normalize=str.lower)
    assert reg.add("One", 1) == 1
    reg.register("two", "deux")(2)
    assert reg["ONE"] == 1 and "DEUX" in reg and reg.get("three") is None
    assert list(reg) == ["one", "two", "deux"] and reg.names() == ["deux", "one", "two"]
    assert dict(reg) == {"one": 1, "two": 2, "deux": 2} and len(reg) == 3
    with pytest.raises(TypeError):
        reg["three"] = 3  # type: ignore[index]
    with pytest.raises(PlanError, match="number 'two' is already registered; pass replace=True"):
        reg.add("TWO", 22)
    reg.add("two", 22, replace=True)
    assert reg["two"] == 22
    with pytest.raises(PlanError, match=r"unknown number 'tow' \(did you mean 'two'\?\); "
                                        "known: deux, one, two"):
        reg["tow"]
    with pytest.raises(PlanError, match="unknown number 3"):
        reg[3]  # type: ignore[index]
    with pytest.raises(PlanError, match="non-empty string"):
        reg.add(" ", 0)


# ------------------------------------------------------------------------------------ cost rules
def _saves_output(ctx: OpContext) -> OpCost:
    """A rule for tanh: its backward needs its result (4 bytes a value here)."""
    return OpCost(saved=(ctx.private("result", ctx.batch * ctx.node.numel, 4),))


def test_duplicate_cost_rule_raises_and_the_table_is_not_mutable():
    with pytest.raises(CostError, match="cost rule 'relu' is already registered"):
        register_rule("relu", _saves_output)
    with pytest.raises(CostError, match="cost rule 'conv2d' is already registered"):

        @register_rule(["tanh_twin", "conv2d"])
        def _rule(ctx: OpContext) -> OpCost:
            return OpCost()

    with pytest.raises(TypeError):
        RULES["tanh"] = _saves_output  # type: ignore[index]
    assert "tanh" not in RULES
    with pytest.raises(CostError, match=r"unknown cost rule 'rleu' \(did you mean 'relu'\?\)"):
        RULES["rleu"]


def test_rule_override_is_per_cost_model():
    graph = LayerGraph.from_model(TanhNet(), input_size=8)
    profile = load_profile("stm32f746")
    plan = Plan.full(graph)
    with pytest.warns(UserWarning, match="tanh"):
        plain = CostModel(graph, profile)
    before = plain.evaluate(plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rule is known: no warning
        given = CostModel(graph, profile, rules={"tanh": _saves_output})
    assert given.unknown_ops == [] and given.rules["tanh"] is _saves_output
    tanh = next(n for n in graph.nodes if n.kind == "tanh")
    row = next(r for r in given.evaluate(plan).ops if r.kind == "tanh")
    assert row.saved_activation_bytes == 4 * tanh.numel  # its result, not the rule of unknowns
    # the other model and the global table are unchanged
    assert "tanh" not in RULES and "tanh" not in plain.rules and plain.unknown_ops == ["tanh"]
    assert plain.evaluate(plan).peak_memory_bytes == before.peak_memory_bytes
    # set_rule on an existing model: memoised results of that kind are dropped
    assert plain.set_rule("tanh", _saves_output) is plain
    assert plain.unknown_ops == [] and plain.evaluate(plan).unknown_ops == []
    assert plain.summarize(plan) == given.summarize(plan)
    # an override of a registered rule, for one model only
    relu_graph = LayerGraph.from_model(small_cnn(), input_size=8)
    stock = CostModel(relu_graph, profile)
    free = CostModel(relu_graph, profile).set_rule("relu", lambda ctx: OpCost())
    relu_plan = Plan.full(relu_graph)
    assert free.summarize(relu_plan).saved_activation_bytes < stock.summarize(
        relu_plan).saved_activation_bytes
    assert RULES["relu"] is stock.rules["relu"] is not free.rules["relu"]
    with pytest.raises(CostError, match="must be a function"):
        stock.set_rule("relu", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        stock.rules["relu"] = _saves_output  # type: ignore[index]


# ----------------------------------------------------------------- models, criteria, selectors
def test_model_registry(scratch_registries):
    @register_model("tiny-registry", head="3", replace=True)
    def tiny() -> nn.Module:
        return conv_pool_linear(3, seed=None)

    assert "tiny-registry" in list_models()
    assert load_model("tiny-registry", num_classes=2)[3].out_features == 2
    with pytest.raises(ModelError, match="model 'tiny-registry' is already registered"):
        register_model("tiny-registry", tiny)
    with pytest.warns(DeprecationWarning, match="replace"):
        register_model("tiny-registry", tiny, overwrite=True)
    with pytest.raises(ModelError, match=r"unknown model 'resnet81' \(did you mean 'resnet18'"):
        load_model("resnet81")


def test_criterion_registry(scratch_registries):
    with pytest.raises(ScoresError, match="criterion 'magnitude' is already registered"):
        register_criterion("Magnitude")(MagnitudeCriterion)

    @register_criterion("ones-registry", replace=True)
    class Ones(Criterion):
        needs_data = False

        def score(self, model, data=None):
            raise NotImplementedError

    assert Ones.name == "ones-registry" and "ones-registry" in list_criteria()
    assert isinstance(get_criterion("ONES-registry"), Ones)
    with pytest.raises(ScoresError, match=r"unknown criterion 'fishr'.*fisher"):
        get_criterion("fishr")


def test_method_registry(scratch_registries):
    with pytest.raises(PlanError, match="selection method 'neq' is already registered"):
        register_method("NEQ")(lambda ctx: None)
    register_method("noop-registry", replace=True, summary="nothing")(lambda ctx: None)
    assert "noop-registry" in list_methods()
    assert get_method(" Noop-Registry ").summary == "nothing"
    with pytest.raises(PlanError, match=r"unknown selection method 'tinytrian' \(did you mean "
                                        "'tinytrain'"):
        get_method("tinytrian")


def test_unknown_profile_reads_like_a_registry():
    with pytest.raises(ProfileError, match=r"unknown device profile 'rpi5'.*known: .*rpi4.*"
                                           r"or pass a path"):
        load("rpi5")
