"""The race's learning-rate grid extends past its edge when a leading candidate's best rate lies
on it: bounded, recorded, deterministic, resumable and shared by workers like the rest of the
race."""

from __future__ import annotations

import json
import math

import pytest

from budgetsearch.errors import PlanError
from budgetsearch.plan import LayerUpdate
from budgetsearch.planner import EFFORTS, Candidate, RaceSettings, race, race_key
from budgetsearch.recipe import Recipe

GRID = (0.00667, 0.02, 0.06)


class Monotone:
    """Validation accuracy that rises as the rate falls (``slope`` < 0) or rises (> 0) without
    bound, or peaks at ``best``; plan quality separates the candidates."""

    def __init__(self, quality: dict[str, float], *, slope: float = 0.0,
                 best: float | None = None) -> None:
        self.quality, self.slope, self.best = quality, slope, best
        self.calls: list[tuple[str, float, int, int]] = []

    def run(self, updates, recipe):
        (layer,) = [k for k in updates if k != "head"]
        self.calls.append((layer, recipe.lr, recipe.epochs, recipe.seed))
        x = math.log(recipe.lr)
        shape = (-abs(x - math.log(self.best)) if self.best is not None else self.slope * x)
        acc = self.quality[layer] + 0.01 * shape + 0.001 * recipe.epochs
        return {"val_accuracy": acc, "val_loss": 1 - acc}


def cand(name: str, layer: str) -> Candidate:
    return Candidate(name=name, source="baseline" if name.startswith("b") else "search",
                     updates={"head": LayerUpdate("weight"), layer: LayerUpdate("bias")},
                     memory_bytes=100, latency_ms=1.0, backward_macs=1.0)


QUALITY = {"l1": 0.9, "l2": 0.8, "l3": 0.7, "l4": 0.6, "l5": 0.5, "l6": 0.4}


def pool() -> list[Candidate]:
    return [cand("s1", "l1"), cand("s2", "l2"), cand("b3", "l3"), cand("b4", "l4"),
            cand("b5", "l5"), cand("b6", "l6")]


def settings(extensions: int = 2, **kw) -> RaceSettings:
    return RaceSettings(rungs=(1, 2), lrs=GRID, lr_extensions=extensions, **kw)


def test_a_best_rate_on_the_low_edge_extends_the_grid_down_to_the_bound():
    runner = Monotone(QUALITY, slope=-1.0)  # the lower the rate, the better: never satisfied
    result = race(runner, pool(), recipe=Recipe(), settings=settings(), progress=False)
    first = result.rungs[0]
    # 18 grid arms keep ceil(18 / 3) = 6 places; the kept arms belong to s1 and s2 (the best
    # plans), each best at its lowest rate, so each goes 2 steps of /3 below the grid
    added = first["extended"]
    assert [(a["candidate"], a["lr"], a["edge"], a["step"]) for a in added] == [
        ("s1", 0.00222, "low", 1), ("s2", 0.00222, "low", 1),
        ("s1", 0.000742, "low", 2), ("s2", 0.000742, "low", 2)]
    assert added[0]["after"] == 0.00667 and "the lowest it was tried at" in added[0]["why"]
    assert len(first["arms"]) == 18 + 4
    assert sum(a["kept"] for a in first["arms"]) == 6  # the added arms compete for the places
    assert result.winner.name == "s1" and result.recipe.lr == 0.000742
    # no rate beyond the bound was trained, nor any extension for a candidate never in the lead
    assert min(c[1] for c in runner.calls) == 0.000742
    assert {c[0] for c in runner.calls if c[1] < GRID[0]} == {"l1", "l2"}
    assert len(runner.calls) == 22 + 6
    ext = result.lr_extension
    assert ext["grid"] == list(GRID) and ext["max_steps"] == 2 and ext["added"] == added
    assert ext["factors"][0] == pytest.approx(3, rel=1e-3)
    assert result.provenance()["lr_extension"] == ext


def test_the_high_edge_extends_up_and_the_bound_is_settable():
    runner = Monotone(QUALITY, slope=1.0)
    result = race(runner, pool(), recipe=Recipe(), settings=settings(1), progress=False)
    added = result.rungs[0]["extended"]
    assert [(a["candidate"], a["lr"], a["edge"]) for a in added] == [
        ("s1", 0.18, "high"), ("s2", 0.18, "high")]
    assert "the highest it was tried at" in added[0]["why"]
    assert result.recipe.lr == 0.18 and max(c[1] for c in runner.calls) == 0.18


def test_an_interior_best_rate_or_extension_off_leaves_the_grid_alone():
    interior = Monotone(QUALITY, best=0.02)
    result = race(interior, pool(), recipe=Recipe(), settings=settings(), progress=False)
    assert result.rungs[0]["extended"] == [] and result.lr_extension["added"] == []
    assert {c[1] for c in interior.calls} == set(GRID) and result.recipe.lr == 0.02
    off = Monotone(QUALITY, slope=-1.0)
    result = race(off, pool(), recipe=Recipe(), settings=settings(0), progress=False)
    assert "extended" not in result.rungs[0] and result.lr_extension["added"] == []
    assert {c[1] for c in off.calls} == set(GRID) and result.recipe.lr == 0.00667
    # a step past the edge that trains worse stops the extension there (one step, not two)
    peak = Monotone(QUALITY, best=0.004)
    result = race(peak, pool(), recipe=Recipe(), settings=settings(), progress=False)
    assert [a["lr"] for a in result.rungs[0]["extended"]] == [0.00222, 0.00222]
    assert result.recipe.lr == 0.00667
    # a one-rate grid has no step to take
    one = race(Monotone(QUALITY, slope=-1.0), pool(), recipe=Recipe(),
               settings=RaceSettings(rungs=(1,), lrs=(0.02,), lr_extensions=2), progress=False)
    assert one.rungs[0]["extended"] == [] and one.lr_extension["factors"] is None


def test_the_bound_is_checked_and_the_efforts_set_it():
    for bad in (-1, 9, 1.5, True):
        with pytest.raises(PlanError, match="lr_extensions must be an integer from 0"):
            RaceSettings(lr_extensions=bad)
    assert EFFORTS["standard"].settings("sgd").lr_extensions == 2
    assert EFFORTS["thorough"].settings("sgd").lr_extensions == 2
    assert EFFORTS["standard"].settings("sgd", lr_extensions=0).lr_extensions == 0
    assert RaceSettings().lr_extensions == 0


def test_an_extended_race_resumes_without_retraining_and_gives_the_same_result(tmp_path):
    path = tmp_path / "race.json"
    s = settings()
    key = race_key(data_key={"model": "fake"}, recipe=Recipe(), settings=s, candidates=pool())
    reference = race(Monotone(QUALITY, slope=-1.0), pool(), recipe=Recipe(), settings=s,
                     progress=False)
    # killed after the grid's 18 arms and the first 2 added ones, then among the last rung's
    with pytest.raises(PlanError, match="stopped after 20 arms"):
        race(Monotone(QUALITY, slope=-1.0), pool(), recipe=Recipe(), settings=s, path=path,
             key=key, progress=False, max_arms=20)
    with pytest.raises(PlanError, match="stopped after 4 arms"):
        race(Monotone(QUALITY, slope=-1.0), pool(), recipe=Recipe(), settings=s, path=path,
             key=key, progress=False, max_arms=4)
    total = 18 + 4 + 6
    assert len(json.loads(path.read_text())["results"]) == 24
    last = Monotone(QUALITY, slope=-1.0)
    result = race(last, pool(), recipe=Recipe(), settings=s, path=path, key=key, progress=False)
    assert len(last.calls) == total - 24 and result.stats["arms_trained"] == total - 24
    assert result.rungs == reference.rungs and result.winner == reference.winner
    assert result.lr_extension == reference.lr_extension
    # the bound is not part of the key: a race file made without the extension continues
    assert race_key(data_key={"model": "fake"}, recipe=Recipe(), settings=settings(0),
                    candidates=pool()) == key


def test_workers_taking_turns_never_train_an_added_arm_twice(tmp_path):
    """Processes stopping and starting on one race file make the same extension decisions from
    the recorded results: every arm, added ones included, is trained once."""
    path = tmp_path / "race.json"
    s = settings()
    key = race_key(data_key={"model": "fake"}, recipe=Recipe(), settings=s, candidates=pool())
    a, b = Monotone(QUALITY, slope=-1.0), Monotone(QUALITY, slope=-1.0)
    with pytest.raises(PlanError, match="stopped after 19"):
        race(a, pool(), recipe=Recipe(), settings=s, path=path, key=key, progress=False,
             max_arms=19)
    with pytest.raises(PlanError, match="stopped after 2"):  # the first step's 2nd arm, then
        # the second step's first
        race(b, pool(), recipe=Recipe(), settings=s, path=path, key=key, progress=False,
             max_arms=2)
    result = race(a, pool(), recipe=Recipe(), settings=s, path=path, key=key, progress=False)
    trained = [(c[0], c[1], c[2]) for c in a.calls + b.calls]
    assert len(trained) == len(set(trained)) == 28
    assert result.winner.name == "s1" and result.recipe.lr == 0.000742


def test_a_studys_search_option_is_checked():
    from budgetsearch.studies.spec import RUN_OPTIONS, StudyError
    from budgetsearch.studies.validate import _effort

    assert "lr_extensions" in RUN_OPTIONS  # passed to plan_for, not to the search
    _effort({"effort": "standard", "lr_extensions": 0}, "study s: search")
    for bad in (-1, 9, "2", None):
        with pytest.raises(StudyError, match=r"search\.lr_extensions: expected an integer "
                                             r"from 0 \(the rate grid only\) to 8"):
            _effort({"lr_extensions": bad}, "study s: search")


def test_rates_stop_at_the_largest_learning_rate_the_trainer_takes():
    """A grid near the top extends no further than MAX_LR (train --lr and --lrs take rates in
    (0, 10]), and a grid past it is refused."""
    from budgetsearch.recipe import MAX_LR

    runner = Monotone(QUALITY, slope=1.0)  # the higher the rate, the better
    result = race(runner, pool()[:2], recipe=Recipe(),
                  settings=RaceSettings(rungs=(1,), lrs=(0.5, 2.0), lr_extensions=3),
                  progress=False)
    assert max(c[1] for c in runner.calls) == 8.0 <= MAX_LR  # 32 would be next
    assert result.recipe.lr == 8.0
    with pytest.raises(PlanError, match=r"race learning rates must be distinct numbers in "
                                        r"\(0, 10\]; got \(0.5, 20\)"):
        RaceSettings(lrs=(0.5, 20))
