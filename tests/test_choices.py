"""The named choices are defined once, in budgetsearch.choices, and re-exported elsewhere."""

from __future__ import annotations

from typing import get_args

import pytest

from budgetsearch import _profile_schema, choices, cost, plan, recipe, selectors, trainer
from budgetsearch.ops import filtered
from budgetsearch.search import _objectives as objectives
from budgetsearch.search import _space as space


@pytest.mark.parametrize(("alias", "name"), [
    (recipe.OPTIMIZERS, "OPTIMIZERS"),
    (plan.OPTIMIZERS, "OPTIMIZERS"),
    (_profile_schema.OPTIMIZERS, "OPTIMIZERS"),
    (recipe.BN_MODES, "BN_MODES"),
    (trainer.BN_MODES, "BN_MODES"),
    (plan.FILTER_MODES, "FILTER_MODES"),
    (filtered.MODES, "FILTER_MODES"),
    (cost.ACCOUNTINGS, "ACCOUNTINGS"),
    (cost.MEMORY_MEASURES, "MEMORY_MEASURES"),
    (selectors.MEMORY_MEASURES, "MEMORY_MEASURES"),
    (objectives.MEMORY_MEASURES, "MEMORY_MEASURES"),
    (objectives.THIRD_OBJECTIVES, "THIRD_OBJECTIVES"),
    (selectors.HEAD_MODES, "HEAD_MODES"),
    (plan.MODES, "UPDATE_MODES"),
    (plan.AXES, "AXES"),
    (space.AXES, "AXES"),
    (_profile_schema.OP_CLASSES, "OP_CLASSES"),
])
def test_constants_are_the_one_definition(alias, name):
    assert alias is getattr(choices, name)


def test_tuples_list_their_literal_types_values_as_plain_strings():
    pairs = {name: getattr(choices, name) for name in choices.__all__ if name.isupper()}
    assert len(pairs) == 15
    types = [getattr(choices, name) for name in choices.__all__ if not name.isupper()]
    assert sorted(get_args(t) for t in types) == sorted(pairs.values())
    for values in pairs.values():
        assert values and all(type(v) is str for v in values)
        assert len(set(values)) == len(values)


def test_plan_files_keep_the_plain_strings():
    p = plan.Plan(updates={"fc": plan.LayerUpdate("weight", axis="in")},
                  layer_shapes={"fc": [2, 3]}, optimizer="adam", filter_mode="paper")
    doc = p.to_dict()
    assert doc["optimizer"] == "adam" and doc["filter_mode"] == "paper"
    assert plan.Plan.from_json(p.to_json()).to_dict() == doc
