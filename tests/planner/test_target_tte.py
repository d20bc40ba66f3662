"""``plan --target tte``: the search space and the race keep to plans MIT's Tiny Training Engine
can express, so every plan the planner hands out exports with ``export --format tte``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _toys import small_cnn

from budgetsearch import Budget, CostModel, LayerGraph, load_model, load_profile, plan_for
from budgetsearch.cli import main
from budgetsearch.criteria import magnitude_scores
from budgetsearch.errors import ExportError, PlanError, SearchError
from budgetsearch.export import to_tte
from budgetsearch.plan import LayerUpdate, Plan
from budgetsearch.planner import race_candidates
from budgetsearch.search import RATIOS, Search, SearchSpace, SpaceOptions
from budgetsearch.search._local import neighbour
from budgetsearch.search._space import layer_kind
from budgetsearch.search._warmstart import _moves, sparse_points

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TTE = SpaceOptions(target="tte")


@pytest.fixture(scope="module")
def mcu() -> dict:
    """MCUNet-5fps (10 classes, 128 px) on the STM32F746 at batch 1, magnitude scores."""
    torch.manual_seed(0)
    model = load_model("mcunet-5fps", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=128, model_name="mcunet-5fps")
    return {"model": model, "graph": graph, "scores": magnitude_scores(model),
            "cm": CostModel(graph, load_profile("stm32f746"), batch_size=1)}


def _export(graph: LayerGraph, updates) -> dict:
    return to_tte(Plan.from_layers(graph, dict(updates), batch_size=1))


def _search(mcu: dict, kb: int, **kw) -> Search:
    return Search(cost_model=mcu["cm"], scores=mcu["scores"], budget_bytes=kb * 1024,
                  memory_measure="training", population_size=12, **kw)


def test_the_tte_space_offers_only_what_the_engine_expresses(mcu):
    graph = mcu["graph"]
    space = SearchSpace(graph, TTE)
    assert space.options.filters is False and not any(p.startswith("p:") for p in
                                                      space.param_names)
    head = graph.layer_names[-1]
    assert head not in space.bias_layers and len(space.bias_layers) == len(graph.layers) - 1
    for unit in space.units:
        (name,) = unit.layers
        dist = space.distributions[f"r:{unit.name}"]
        assert space.distributions[f"a:{unit.name}"].choices == ("in",)
        whole = name == head or layer_kind(graph, name) == "conv"
        assert unit.ratios == ((0, len(RATIOS) - 1) if whole else tuple(range(len(RATIOS))))
        assert [v for v in range(len(RATIOS)) if dist._contains(v)] == list(unit.ratios)
    assert {layer_kind(graph, n) for n in graph.layers} == {"conv", "pointwise", "depthwise"}
    # the option is stored only when set: the studies made before it keep their configuration
    assert "target" not in SpaceOptions().to_dict() and TTE.to_dict()["target"] == "tte"
    assert SpaceOptions.from_dict(TTE.to_dict()) == TTE
    with pytest.raises(SearchError, match=r"target must be one of pytorch, tte; got 'onnx'"):
        SpaceOptions(target="onnx")


def test_every_point_the_search_can_propose_decodes_to_an_exportable_plan(mcu):
    graph = mcu["graph"]
    search = _search(mcu, 96, space=TTE)
    space, ev = search.space, search.evaluator
    points = sparse_points(space, 40, seed=1)
    rng = np.random.default_rng(0)
    points += [neighbour(space, p, rng, steps=2) for p in points for _ in range(3)]
    points += [m for p in points[:10] for down in (True, False) for m in _moves(space, p,
                                                                                down=down)]
    # the baselines' plans (a filter, a bias-only classifier, gaps...) encoded into the space
    from budgetsearch.search import baseline_plans

    base = [b.updates for b in baseline_plans(evaluator=ev, cost_model=mcu["cm"],
                                              scores=mcu["scores"]) if b.updates]
    points += [space.encode(u, rounding=r) for u in base for r in ("nearest", "up", "down")]
    updated = 0
    for params in points:
        for name, value in params.items():
            assert space.distributions[name]._contains(
                space.distributions[name].to_internal_repr(value)), (name, value)
        updates = ev.updates(params)
        if updates:
            updated += 1
            _export(graph, updates)  # raises ExportError if the engine cannot take it
    assert updated > 100
    # without the target the same kind of points are often not exportable
    free = SearchSpace(graph)
    refused = 0
    for params in sparse_points(free, 40, seed=1):
        try:
            _export(graph, search.accuracy.decode(free.choices(params)))
        except ExportError:
            refused += 1
    assert refused > 30


@pytest.mark.parametrize("kb", [16, 48, 128, 256])
def test_plan_for_with_target_tte_hands_out_plans_the_export_takes(mcu, kb):
    budget = Budget(memory_bytes=kb * 1024, measure="training")
    common = dict(model=mcu["model"], cost_model=mcu["cm"], budget=budget, effort="quick",
                  scores=mcu["scores"], trials=60, search_options={"population_size": 12},
                  progress=False)
    outcome = plan_for(**common, target="tte")
    plan = outcome.plan
    doc = to_tte(plan)
    assert plan.provenance["target"] == "tte" and plan.provenance["space"]["target"] == "tte"
    assert plan.predicted["training_memory_bytes"] <= kb * 1024
    assert doc["backward_config"]["n_bias_update"] + (1 - doc["backward_config"]["freeze_fc"])
    # every front point, not only the chosen one (the same scores decode the same plans)
    search = _search(mcu, kb, space=TTE)
    for t in outcome.search.front:
        _export(mcu["graph"], search.evaluator.updates(t.params))
    assert len(outcome.search.front) >= 3


def test_without_the_target_the_search_picks_plans_the_engine_refuses(mcu):
    """What the target changes: at these budgets the unconstrained search's plans use filters,
    output channels or gaps the engine does not have."""
    refused = 0
    for kb in (48, 128, 256):
        outcome = plan_for(model=mcu["model"], cost_model=mcu["cm"],
                           budget=Budget(memory_bytes=kb * 1024, measure="training"),
                           effort="quick", scores=mcu["scores"], trials=60,
                           search_options={"population_size": 12}, progress=False)
        assert "target" not in outcome.plan.provenance
        try:
            to_tte(outcome.plan)
        except ExportError:
            refused += 1
    assert refused >= 2


def test_the_race_keeps_only_candidates_the_engine_takes(mcu):
    search = _search(mcu, 128, space=TTE)
    result = search.run(n_trials=48)
    candidates, skipped = race_candidates(search, result, front=4, model=mcu["model"],
                                          target="tte")
    for c in candidates:
        _export(mcu["graph"], c.updates)
    names = {c.name for c in candidates}
    assert {"mit-scheme 124KB", "classifier", "tinytl"} <= names
    assert sum(c.source == "search" for c in candidates) == 4
    # TinyTrain and NEq (output channels, gaps in the run) are left out with the exporter's
    # reason; nothing else is
    assert set(skipped) == {"tinytrain", "neq"}
    assert all(why.startswith("target tte: ") and ("output channels" in why or "not one run"
                                                   in why) for why in skipped.values())
    # without the target they race
    free = _search(mcu, 128)
    free_candidates, free_skipped = race_candidates(free, free.run(n_trials=24), front=0,
                                                    model=mcu["model"])
    assert {"tinytrain", "neq"} <= {c.name for c in free_candidates} and not free_skipped


def test_target_errors_name_the_argument_and_the_allowed_values(mcu):
    common = dict(model=mcu["model"], budget=Budget(memory_bytes=64 * 1024, measure="training"),
                  effort="quick", scores=mcu["scores"], trials=4, progress=False)
    with pytest.raises(PlanError, match=r"unknown target 'onnx'; known: pytorch, tte"):
        plan_for(cost_model=mcu["cm"], target="onnx", **common)
    with pytest.raises(PlanError, match="target tte: the engine trains at batch 1; the cost "
                                        "model's batch size is 8"):
        plan_for(cost_model=CostModel(mcu["graph"], load_profile("stm32f746"), batch_size=8),
                 target="tte", **common)
    with pytest.raises(PlanError, match="contradicts the search space's target 'tte'"):
        plan_for(cost_model=mcu["cm"], target="pytorch", **common,
                 search_options={"space": TTE})
    toy = small_cnn()
    graph = LayerGraph.from_model(toy, input_size=16)
    with pytest.raises(PlanError, match="target tte: model None is not an MCU model"):
        plan_for(model=toy, cost_model=CostModel(graph, load_profile("stm32f746"),
                                                 batch_size=1),
                 budget=Budget(memory_bytes=1 << 20), scores=magnitude_scores(toy),
                 effort="quick", target="tte", trials=4, progress=False)


def test_the_exports_refusals_name_the_option(mcu):
    plan = Plan.from_layers(mcu["graph"], {mcu["graph"].layer_names[-2]: LayerUpdate(
        "weight", patch_size=2)}, batch_size=1)
    with pytest.raises(ExportError, match=r"plan with `--target tte` \(plan_for\(target="
                                          r"\"tte\"\)\)"):
        to_tte(plan)


def test_cli_target_tte(images, tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", "--model", "mcunet-5fps", "--num-classes", "2", "--input-size", "32",
            "--device", "stm32f746", "--data", str(images), "--effort", "quick",
            "--objective", "fisher", "--samples", "8", "--budget", "48KB", "--memory-measure",
            "training", "--trials", "40", "--population", "12", "--no-progress"]
    assert main([*argv, "--target", "tte", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target tte:" in printed and "--format tte" in printed
    plan = json.loads(out.read_text())
    assert plan["batch_size"] == 1 and plan["provenance"]["target"] == "tte"
    tte = tmp_path / "tte.json"
    assert main(["export", "--plan", str(out), "--format", "tte", "--out", str(tte)]) == 0
    assert json.loads(tte.read_text())["format"] == "budgetsearch-tte-sparse-update/1"
    capsys.readouterr()
    assert main([*argv, "--target", "tte", "--batch-size", "4", "--out", str(out)]) == 2
    assert "--target tte: the engine trains at batch 1; --batch-size is 4" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main([*argv, "--target", "onnx", "--out", str(out)])
    err = capsys.readouterr().err
    assert "--target: invalid choice: 'onnx'" in err and "'pytorch', 'tte'" in err


def test_a_studys_search_option_target_is_checked():
    from budgetsearch.studies.spec import RUN_OPTIONS, StudyError
    from budgetsearch.studies.validate import _effort

    assert "target" in RUN_OPTIONS  # passed to plan_for, not to the search
    _effort({"target": "tte"}, "study s: search")
    with pytest.raises(StudyError, match=r"search\.target: unknown value 'onnx'; allowed: "
                                         r"pytorch, tte"):
        _effort({"target": "onnx"}, "study s: search")
