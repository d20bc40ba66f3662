"""The planner's flow: effort levels, race candidates, make_plan's choice and its record."""

from __future__ import annotations

import pytest

from budgetsearch.criteria import magnitude_scores
from budgetsearch.errors import PlanError
from budgetsearch.plan import LayerUpdate
from budgetsearch.planner import (
    EFFORTS,
    Candidate,
    PlanOutcome,
    RaceResult,
    get_effort,
    lr_grid,
    make_plan,
    race_candidates,
)
from budgetsearch.recipe import Recipe
from budgetsearch.search import Search


def test_effort_levels_and_learning_rate_grids():
    assert lr_grid("sgd", (1 / 3, 1.0, 3.0)) == (0.00667, 0.02, 0.06)
    assert lr_grid("adam", (0.5, 2.0)) == (0.0005, 0.002)
    assert not EFFORTS["quick"].race and EFFORTS["standard"].rungs == (2, 4)
    thorough = EFFORTS["thorough"].settings("momentum")
    assert thorough.final_seeds == 2 and len(thorough.lrs) == 5 and thorough.rungs[-1] == 8
    assert EFFORTS["standard"].settings("sgd", lrs=(0.1,)).lrs == (0.1,)
    with pytest.raises(PlanError, match="unknown effort 'fast'; known: quick, standard"):
        get_effort("fast")
    with pytest.raises(PlanError, match="unknown optimizer 'rmsprop'"):
        lr_grid("rmsprop", (1.0,))


@pytest.fixture(scope="module")
def search(mcunet):
    return Search(cost_model=mcunet["cm"], scores=magnitude_scores(mcunet["model"]),
                  budget_bytes=100 * 1024, memory_measure="training", seed=0)


class HeadFirst:
    """A runner under which the classifier alone trains best, and more layers train worse."""

    def __init__(self) -> None:
        self.runs = 0

    def run(self, updates, recipe):
        self.runs += 1
        acc = 0.9 - 0.01 * (len(updates) - 1) - 0.001 * abs(recipe.lr - 0.02)
        return {"val_accuracy": acc, "val_loss": 1 - acc}


def test_candidates_are_every_fitting_baseline_then_distinct_front_points(search, mcunet):
    result = search.run(n_trials=60)
    cands, skipped = race_candidates(search, result, front=3, model=mcunet["model"])
    names = [c.name for c in cands]
    head = mcunet["graph"].layer_names[-1]
    # baselines first: the warm-start selectors, the MIT scheme within the budget, the classifier
    assert names[0] == "tinytrain" and "mit-scheme 99KB" in names and "classifier" in names
    assert [c.source for c in cands].count("search") == 3
    assert all(c.memory_bytes <= 100 * 1024 for c in cands)
    # a search point equal to a baseline, or to a better front point, is left out (two
    # baselines may coincide: the race runs them once)
    base = {c.digest() for c in cands if c.source == "baseline"}
    front = [c.digest() for c in cands if c.source == "search"]
    assert len(set(front)) == len(front) and not base & set(front)
    classifier = next(c for c in cands if c.name == "classifier")
    assert dict(classifier.updates) == {head: LayerUpdate("weight")}
    assert not skipped
    tight, why = race_candidates(search, result, front=0, model=mcunet["model"])
    assert all(c.source == "baseline" for c in tight)
    del why


class SmallSplit(HeadFirst):
    """HeadFirst with 16 training and 4 validation labels, and no folds(): the race cannot
    cross-validate on it, so the effort's rule keeps the split as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.data = {"train": (None, [0] * 16), "val": (None, [0] * 4)}


def test_a_baseline_that_wins_the_race_is_the_plan(search, mcunet, tmp_path):
    outcome = make_plan(search, effort=EFFORTS["standard"], n_trials=60, runner=SmallSplit(),
                        model=mcunet["model"], recipe=Recipe(optimizer="sgd", filter_mode="paper"),
                        lrs=(0.01, 0.02), race_path=tmp_path / "race.json", progress=False)
    plan = outcome.plan
    winner = outcome.race.winner  # the classifier alone (maybe under an equal baseline's name)
    assert "classifier" in (winner.name, *winner.aliases) and winner.source == "baseline"
    assert plan.provenance["method"] == winner.name and len(plan.updates) == 1
    assert plan.recipe == Recipe(optimizer="sgd", lr=0.02, epochs=4, filter_mode="paper")
    assert plan.filter_mode == "paper"  # the plan's own field agrees with its recipe's
    assert plan.provenance["race"]["margin"]["points"] == 0
    assert plan.provenance["effort"] == "standard"
    assert plan.device == "stm32h743" and plan.memory_budget_bytes == 100 * 1024
    assert outcome.race.folds == 1 and plan.provenance["race"]["val_images"] == 4


def test_a_race_without_the_datas_key_is_not_kept_in_the_cache(search, mcunet, tmp_path,
                                                                 monkeypatch):
    """make_plan finds its default race file by key; without the data's part of the key races
    on other data would share it, so the race stays in memory."""
    monkeypatch.setenv("BUDGETSEARCH_CACHE", str(tmp_path / "cache"))
    outcome = make_plan(search, effort=EFFORTS["standard"], n_trials=60, runner=SmallSplit(),
                        model=mcunet["model"], recipe=Recipe(optimizer="sgd"), lrs=(0.02,),
                        progress=False)
    assert outcome.plan.provenance["race"]["file"] is None
    assert not (tmp_path / "cache").exists()


def test_a_search_plan_that_wins_records_its_trial_and_margin(search, mcunet, tmp_path):
    cands, _ = race_candidates(search, search.run(n_trials=60), front=4, model=mcunet["model"])
    favourite = [c for c in cands if c.source == "search"][-1]

    class Favourite(HeadFirst):  # the last front point trains best, the classifier next
        def run(self, updates, recipe):
            mine = Candidate(name="x", source="search", updates=dict(updates), memory_bytes=0,
                             latency_ms=0.0, backward_macs=0.0)
            acc = 0.8 if mine.digest() == favourite.digest() else 0.7 - 0.01 * len(updates)
            return {"val_accuracy": acc, "val_loss": 1 - acc}

    outcome = make_plan(search, effort=EFFORTS["standard"], n_trials=60, runner=Favourite(),
                        model=mcunet["model"], recipe=Recipe(optimizer="sgd"), lrs=(0.02,),
                        race_path=tmp_path / "race.json", progress=False)
    winner, margin = outcome.race.winner, outcome.margin()
    assert winner.name == favourite.name and winner.source == "search"
    prov = outcome.plan.provenance
    assert prov["method"] == "search" and prov["trial"] == winner.trial
    assert dict(outcome.plan.updates) == dict(favourite.updates)
    assert margin["epochs"] == 4 and margin["points"] == pytest.approx(100 * (0.8 - 0.69))
    assert "classifier" in (margin["baseline"], *outcome.race.candidates[
        margin["baseline"]].aliases)


def test_quick_effort_is_the_search_pick_and_a_race_needs_a_runner(search):
    outcome = make_plan(search, effort=EFFORTS["quick"], n_trials=60, progress=False)
    assert outcome.race is None and outcome.plan.recipe is None
    assert outcome.plan.provenance["effort"] == "quick" and outcome.margin() is None
    with pytest.raises(PlanError, match="effort standard races plans: it needs training data"):
        make_plan(search, effort=EFFORTS["standard"], n_trials=60, progress=False)


def _cand(name, source):
    return Candidate(name=name, source=source, updates={name: LayerUpdate("bias")},
                     memory_bytes=1, latency_ms=1.0, backward_macs=1.0)


def test_margin_compares_at_the_furthest_rung_a_baseline_reached():
    cands = {"s": _cand("s", "search"), "b1": _cand("b1", "baseline"),
             "b2": _cand("b2", "baseline")}
    rungs = [{"epochs": 2, "seeds": [0], "arms": [
                 {"candidate": "b1", "lr": 0.1, "val_accuracy": 0.7},
                 {"candidate": "s", "lr": 0.1, "val_accuracy": 0.6},
                 {"candidate": "b2", "lr": 0.1, "val_accuracy": 0.5}]},
             {"epochs": 4, "seeds": [0], "arms": [
                 {"candidate": "s", "lr": 0.1, "val_accuracy": 0.8},
                 {"candidate": "b2", "lr": 0.1, "val_accuracy": 0.65}]}]
    rr = RaceResult(winner=cands["s"], recipe=Recipe(), rungs=rungs, candidates=cands)
    margin = PlanOutcome(plan=None, search=None, race=rr).margin()
    # b1 was better at rung 0 but only b2 reached rung 1: the comparison is at rung 1
    assert margin["baseline"] == "b2" and margin["epochs"] == 4
    assert margin["points"] == pytest.approx(15.0)



def test_separation_weighs_the_lead_against_the_split_size():
    """The winner's lead over the best other candidate at the furthest rung another reached,
    against one standard error of its accuracy on the validation split: 0.80 against 0.78 is
    2 of 100 images, less than 100·sqrt(p(1 − p)/100) = 4.04 points with p = 81/102; on
    10,000 images (0.40 points) it is clear; 4 of 4 right is not certain."""
    cands = {"s": _cand("s", "search"), "b": _cand("b", "baseline"), "t": _cand("t", "search")}
    rungs = [{"epochs": 2, "seeds": [0], "arms": [
                 {"candidate": "s", "lr": 0.1, "val_accuracy": 0.7},
                 {"candidate": "t", "lr": 0.1, "val_accuracy": 0.65},
                 {"candidate": "b", "lr": 0.1, "val_accuracy": 0.6}]},
             {"epochs": 4, "seeds": [0], "arms": [
                 {"candidate": "s", "lr": 0.1, "val_accuracy": 0.8},
                 {"candidate": "s", "lr": 0.3, "val_accuracy": 0.5},
                 {"candidate": "t", "lr": 0.1, "val_accuracy": 0.78}]},
             {"epochs": 8, "seeds": [0], "arms": [
                 {"candidate": "s", "lr": 0.1, "val_accuracy": 0.9}]}]
    rr = RaceResult(winner=cands["s"], recipe=Recipe(), rungs=rungs, candidates=cands)
    outcome = PlanOutcome(plan=None, search=None, race=rr)
    assert outcome.separation() is None  # the split's size unknown
    rr.stats["val_images"] = 100
    sep = outcome.separation()
    # the last rung holds the winner alone: the comparison is at the rung before
    assert sep["runner_up"] == "t" and sep["rung"] == 1 and sep["epochs"] == 4
    assert sep["lead_points"] == pytest.approx(2.0) and sep["lead_images"] == 2.0
    assert sep["standard_error_points"] == pytest.approx(100 * (81 * 21 / 102**2 / 100) ** 0.5)
    assert 4.0 < sep["standard_error_points"] < 4.1 and not sep["clear"]
    rr.stats["val_images"] = 10_000
    sep = outcome.separation()
    assert sep["standard_error_points"] == pytest.approx(0.4, abs=0.001) and sep["clear"]
    rungs[1]["arms"][0]["val_accuracy"] = 1.0  # 4 of 4 against 0.78: 22 points, se 18.6, not 0
    rr.stats["val_images"] = 4
    sep = outcome.separation()
    assert sep["standard_error_points"] == pytest.approx(100 * (5 / 36 / 4) ** 0.5)
    assert sep["lead_images"] == 0.9 and sep["clear"]
    assert PlanOutcome(plan=None, search=None).separation() is None
