"""CostModel.evaluate gives the full Cost, CostModel.summarize the CostSummary; the Cost's totals
are typed and computed once; evaluate(detail=...) still works, with a DeprecationWarning."""

from __future__ import annotations

import dataclasses

import pytest

from budgetsearch import CostModel, load_profile
from budgetsearch.choices import ACCOUNTINGS
from budgetsearch.cost import Cost, CostSummary, CostTotals
from budgetsearch.plan import LayerUpdate, Plan


def _plans(graph) -> list[Plan]:
    head = graph.layer_names[-1]
    return [Plan.full(graph), Plan.last_k_blocks(graph, 2), Plan.bias_only(graph),
            Plan.from_layers(graph, {head: LayerUpdate("weight")}), Plan.from_layers(graph, {})]


@pytest.mark.parametrize("accounting", ACCOUNTINGS)
def test_summarize_is_the_summary_of_evaluate_exactly(mcunet, accounting):
    graph = mcunet["graph"]
    cm = CostModel(graph, load_profile("stm32f746"), accounting=accounting, optimizer="adam")
    for plan in _plans(graph):
        cost, summary = cm.evaluate(plan), cm.summarize(plan)
        assert type(cost) is Cost and type(summary) is CostSummary
        assert cost.summary() == summary  # exact, floats included
        for name, value in dataclasses.asdict(summary).items():
            assert getattr(cost, name) == value, name


def test_totals_are_typed_fields_computed_once(mcunet):
    cost = mcunet["cm"].evaluate(Plan.last_k_blocks(mcunet["graph"], 2))
    assert "totals" not in vars(cost)
    totals = cost.totals
    assert type(totals) is CostTotals and cost.totals is totals  # cached on first use
    assert cost.total() == dataclasses.asdict(totals)
    assert list(cost.total()) == [f.name for f in dataclasses.fields(CostTotals)]
    for name, value in cost.total().items():  # every total reads as an attribute
        assert getattr(cost, name) == value, name
    assert totals.backward_macs == (totals.grad_input_macs + totals.grad_weight_macs
                                    + totals.grad_bias_macs)
    assert totals.training_memory_bytes == cost.peak_memory_bytes - cost.inference_peak_bytes
    assert "__getattr__" not in vars(Cost)
    with pytest.raises(AttributeError):
        _ = cost.no_such_total
    with pytest.raises(dataclasses.FrozenInstanceError):
        cost.latency_ms = 0.0  # type: ignore[misc]
    assert cost.layers() == cost.layers() and cost.layers() is not cost.layers()
    assert cost.layer("classifier") is cost.layer("classifier")


def test_detail_is_a_deprecated_alias(mcunet):
    cm, plan = mcunet["cm"], Plan.full(mcunet["graph"])
    with pytest.warns(DeprecationWarning, match=r"use evaluate\(plan\).*summarize\(plan\)"):
        summary = cm.evaluate(plan, detail=False)
    assert summary == cm.summarize(plan)
    with pytest.warns(DeprecationWarning):
        full = cm.evaluate(plan, detail=True)
    assert full.to_dict() == cm.evaluate(plan).to_dict()
