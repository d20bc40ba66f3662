"""The race: successive halving on validation accuracy, resumable and shared by workers."""

from __future__ import annotations

import json
import math
import os

import pytest

from budgetsearch.contrib import SharedTable, TableError
from budgetsearch.errors import PlanError
from budgetsearch.plan import LayerUpdate
from budgetsearch.planner import Candidate, RaceSettings, race, race_key
from budgetsearch.planner.race import pooled_mean
from budgetsearch.recipe import Recipe


class FakeRunner:
    """Validation accuracy as a closed-form function of (plan, lr, epochs, seed)."""

    def __init__(self, quality: dict[str, float], best_lr: dict[str, float]) -> None:
        self.quality, self.best_lr = quality, best_lr
        self.calls: list[tuple[str, float, int, int]] = []

    def run(self, updates, recipe):
        (layer,) = [k for k in updates if k != "head"] or ["head"]
        self.calls.append((layer, recipe.lr, recipe.epochs, recipe.seed))
        miss = abs(math.log(recipe.lr / self.best_lr[layer]))
        acc = self.quality[layer] * (1 - 0.5 ** recipe.epochs) - 0.05 * miss + 0.001 * recipe.seed
        return {"val_accuracy": acc, "val_loss": 1 - acc, "train_loss": 1.0, "seconds": 0.0}


def cand(name: str, layer: str, memory: int = 100) -> Candidate:
    updates = {"head": LayerUpdate("weight")}
    if layer != "head":
        updates[layer] = LayerUpdate("bias")
    return Candidate(name=name, source="baseline" if name.startswith("b") else "search",
                     updates=updates, memory_bytes=memory, latency_ms=1.0, backward_macs=1.0)


QUALITY = {"head": 0.5, "l1": 0.7, "l2": 0.9, "l3": 0.6, "l4": 0.8, "l5": 0.4}
BEST_LR = {"head": 0.02, "l1": 0.02, "l2": 0.00667, "l3": 0.06, "l4": 0.02, "l5": 0.02}


def pool() -> list[Candidate]:
    return [cand("s1", "l1"), cand("s2", "l2"), cand("b3", "l3"), cand("b4", "l4"),
            cand("b5", "l5"), cand("bh", "head")]


def test_successive_halving_keeps_the_best_third_and_picks_the_best_arm():
    runner = FakeRunner(QUALITY, BEST_LR)
    settings = RaceSettings(rungs=(1, 2, 4), lrs=(0.00667, 0.02, 0.06))
    result = race(runner, pool(), recipe=Recipe(optimizer="sgd"), settings=settings,
                  progress=False)
    # 18 arms at 1 epoch, ceil(18 / 3) = 6 at 2 epochs, 2 at 4 epochs
    assert [len(r["arms"]) for r in result.rungs] == [18, 6, 2]
    assert [c[2] for c in runner.calls].count(1) == 18 and len(runner.calls) == 26
    assert result.winner.name == "s2" and result.recipe.lr == 0.00667
    assert result.recipe.epochs == 4 and result.recipe.optimizer == "sgd"
    # every rung keeps exactly its top arms, ranked by validation accuracy
    for rung in result.rungs:
        accs = [a["val_accuracy"] for a in rung["arms"]]
        assert accs == sorted(accs, reverse=True)
    assert [a["kept"] for a in result.rungs[0]["arms"]] == [True] * 6 + [False] * 12
    assert settings.epochs_total(18) == 18 * 1 + 6 * 2 + 2 * 4
    best = result.best()
    assert best["s2"]["rung"] == 2 and best["b5"]["rung"] == 0


class ThreadedRunner(FakeRunner):
    """A FakeRunner that reports a thread count per learning rate, as workers on machines
    with different counts would."""

    def run(self, updates, recipe):
        return {**super().run(updates, recipe), "threads": 1 if recipe.lr < 0.05 else 4,
                "kernels": f"aten=AVX{2 if recipe.lr < 0.05 else 512} onednn=auto",
                "train_seconds": 0.0}


def test_the_race_keeps_each_arms_thread_count_and_the_provenance_lists_them():
    settings = RaceSettings(rungs=(1, 2), lrs=(0.02, 0.06))
    result = race(ThreadedRunner(QUALITY, BEST_LR), pool(), recipe=Recipe(optimizer="sgd"),
                  settings=settings, progress=False)
    assert {r["threads"] for r in result.results.values()} == {1, 4}
    assert all("train_seconds" not in r for r in result.results.values())  # not kept
    assert result.threads() == [1, 4] and result.provenance()["threads"] == [1, 4]
    kernels = ["aten=AVX2 onednn=auto", "aten=AVX512 onednn=auto"]
    assert result.kernels() == kernels and result.provenance()["kernels"] == kernels
    # arms recorded without a count (older race files, other runners) say nothing
    plain = race(FakeRunner(QUALITY, BEST_LR), pool(), recipe=Recipe(optimizer="sgd"),
                 settings=settings, progress=False)
    assert plain.threads() == [] and plain.provenance()["threads"] == []
    assert plain.kernels() == [] and plain.provenance()["kernels"] == []


def test_the_winners_rates_put_the_rate_it_won_with_first():
    class Drifting(FakeRunner):
        """The best rate is 0.06 after 1 epoch and 0.00667 after 2."""

        def run(self, updates, recipe):
            self.best_lr = {"l1": 0.06 if recipe.epochs == 1 else 0.00667, "l2": 0.02}
            return super().run(updates, recipe)

    result = race(Drifting({"l1": 0.9, "l2": 0.5}, {}), [cand("s1", "l1"), cand("b2", "l2")],
                  recipe=Recipe(optimizer="sgd"),
                  settings=RaceSettings(rungs=(1, 2), lrs=(0.00667, 0.02, 0.06), keep=0.5),
                  progress=False)
    first = [a["lr"] for a in result.rungs[0]["arms"] if a["candidate"] == "s1"]
    assert first == [0.06, 0.02, 0.00667]  # the first rung's order for the winner
    assert result.winner.name == "s1" and result.recipe.lr == 0.00667
    assert result.winner_lrs() == [0.00667, 0.06, 0.02]
    assert result.provenance()["winner_lrs"] == [0.00667, 0.06, 0.02]


def test_ties_go_to_less_memory_and_duplicates_race_once():
    runner = FakeRunner({"l1": 0.7}, {"l1": 0.02})
    a = cand("s-big", "l1", memory=500)
    b = Candidate(name="s-small", source="search", updates={"x": LayerUpdate("bias")},
                  memory_bytes=200, latency_ms=1, backward_macs=1)
    same_as_a = cand("b-copy", "l1", memory=500)

    class Same(FakeRunner):
        def run(self, updates, recipe):
            return {"val_accuracy": 0.5, "val_loss": 1.0}

    result = race(Same({}, {}), [a, b, same_as_a], recipe=Recipe(),
                  settings=RaceSettings(rungs=(1,), lrs=(0.01,)), progress=False)
    assert result.winner.name == "s-small"
    assert result.candidates["s-big"].aliases == ("b-copy",) and "b-copy" not in result.candidates
    del runner


def test_final_rung_averages_seeds():
    runner = FakeRunner(QUALITY, BEST_LR)
    result = race(runner, pool()[:2], recipe=Recipe(seed=5),
                  settings=RaceSettings(rungs=(1, 3), lrs=(0.02,), keep=0.5, final_seeds=2),
                  progress=False)
    finals = [c for c in runner.calls if c[2] == 3]
    assert sorted(c[3] for c in finals) == [5, 6]
    assert result.rungs[-1]["seeds"] == [5, 6]


FOLD_SCORES = {("l1", 0): 0.9, ("l2", 0): 0.5, ("l1", 1): 0.0, ("l2", 1): 1.0}


class FoldedRunner:
    """Two folds of 10 and 2 validation images; on fold 0 candidate ``a`` is right on 9 of 10
    and ``b`` on 5, on fold 1 ``a`` on none of 2 and ``b`` on both."""

    def __init__(self) -> None:
        self.dealt: list[tuple[int, int]] = []
        self.seeds: list[tuple[str, int, int, int]] = []  # (layer, epochs, fold, seed)

    @property
    def calls(self) -> list[tuple[str, int]]:
        """(layer, fold) of every training."""
        return [(layer, fold) for layer, _epochs, fold, _seed in self.seeds]

    def folds(self, k, *, seed):
        self.dealt.append((k, seed))
        return [self.View(self, j, 10 if j == 0 else 2) for j in range(k)]

    class View:
        def __init__(self, parent, index, size) -> None:
            self.parent, self.index, self.val_rows = parent, index, list(range(size))

        def run(self, updates, recipe):
            (layer,) = [k for k in updates if k != "head"]
            self.parent.seeds.append((layer, recipe.epochs, self.index, recipe.seed))
            acc = FOLD_SCORES[(layer, self.index)]
            return {"val_accuracy": acc, "val_loss": 1 - acc, "seconds": 0.0,
                    "val_images": len(self.val_rows), "train_loss": 0.1}


def test_a_cross_validated_race_scores_an_arm_over_every_folds_images(tmp_path):
    """a: 9 + 0 of 12 images (0.75); b: 5 + 2 of 12 (0.583). The mean of the folds' accuracies
    would rank them the other way (0.45 against 0.75): the score weighs each fold by its
    images. Every arm is trained once per fold, keyed by its fold; the file resumes."""
    a, b = cand("a", "l1"), cand("b", "l2")
    settings = RaceSettings(rungs=(1, 2), lrs=(0.02,), keep=0.5, folds=2)
    key = race_key(data_key={"model": "fake"}, recipe=Recipe(seed=3), settings=settings,
                   candidates=[a, b])
    path = tmp_path / "race.json"
    runner = FoldedRunner()
    result = race(runner, [a, b], recipe=Recipe(seed=3), settings=settings, path=path, key=key,
                  progress=False)
    assert runner.dealt == [(2, 3)]  # dealt once, by the recipe's seed
    assert result.winner.name == "a" and result.folds == 2
    first = result.rungs[0]["arms"]
    assert [(x["candidate"], x["val_accuracy"]) for x in first] == [
        ("a", pytest.approx(0.75)), ("b", pytest.approx(7 / 12))]
    assert first[0]["val_loss"] == pytest.approx(0.25)
    # rung 1: both arms on both folds; rung 2: a on both folds
    assert sorted(runner.calls) == sorted([("l1", 0), ("l1", 1), ("l2", 0), ("l2", 1),
                                           ("l1", 0), ("l1", 1)])
    assert sorted(result.final_arms()) == ["s3:f0", "s3:f1"]
    assert result.stats["val_images"] == 12
    assert result.provenance()["folds"] == 2 and result.provenance()["val_images"] == 12
    assert {k.rsplit(":", 1)[1] for k in json.loads(path.read_text())["results"]} == {"f0",
                                                                                       "f1"}
    again = FoldedRunner()
    race(again, [a, b], recipe=Recipe(seed=3), settings=settings, path=path, key=key,
         progress=False)
    assert again.calls == []
    assert settings.epochs_total(2) == (2 * 1 + 1 * 2) * 2
    # the key: folds only above 1, so files made before folds existed are continued
    one = race_key(data_key={}, recipe=Recipe(), settings=RaceSettings(), candidates=[a])
    assert "folds" not in one["settings"] and key["settings"]["folds"] == 2
    with pytest.raises(PlanError, match="a race on 2 folds needs a runner that deals folds"):
        race(FakeRunner(QUALITY, BEST_LR), [a, b], recipe=Recipe(), settings=settings,
             progress=False)
    for bad in (0, 21, True, 2.5):
        with pytest.raises(PlanError, match=r"race folds must be an integer from 1"):
            RaceSettings(folds=bad)


def test_each_fold_trains_with_its_own_batch_order(tmp_path):
    """Fold j trains with the arm's seed + j * FOLD_SEED_STRIDE: fold 0 as an uncrossed race
    would, the others with batch orders of their own, and no two (seed, fold) pairs of the last
    rung's seeds share one. The stride is part of a cross-validated race's key (a race whose
    folds all used the arm's seed is refused, not continued), and only of such a race's."""
    from budgetsearch.planner.race import FOLD_SEED_STRIDE, fold_seed

    runner = FoldedRunner()
    settings = RaceSettings(rungs=(1, 2), lrs=(0.02,), keep=0.5, final_seeds=2, folds=2)
    race(runner, [cand("a", "l1"), cand("b", "l2")], recipe=Recipe(seed=7), settings=settings,
         progress=False)
    s = FOLD_SEED_STRIDE
    assert sorted(runner.seeds) == sorted([
        ("l1", 1, 0, 7), ("l1", 1, 1, 7 + s), ("l2", 1, 0, 7), ("l2", 1, 1, 7 + s),
        ("l1", 2, 0, 7), ("l1", 2, 1, 7 + s), ("l1", 2, 0, 8), ("l1", 2, 1, 8 + s)])
    assert fold_seed(7, None) == 7 and fold_seed(7, 3) == 7 + 3 * s
    key = race_key(data_key={}, recipe=Recipe(), settings=settings, candidates=[cand("a", "l1")])
    assert key["settings"]["fold_seed_stride"] == s
    plain = race_key(data_key={}, recipe=Recipe(), settings=RaceSettings(),
                     candidates=[cand("a", "l1")])
    assert "fold_seed_stride" not in plain["settings"]
    # a file of a race whose folds all trained with the arm's seed (its key has no stride)
    old = {**key, "settings": {k: v for k, v in key["settings"].items()
                               if k != "fold_seed_stride"}}
    SharedTable(tmp_path / "race.json", old)
    with pytest.raises(TableError, match="settings"):
        race(FoldedRunner(), [cand("a", "l1")], recipe=Recipe(), settings=settings,
             path=tmp_path / "race.json", key=key, progress=False)
    with pytest.raises(PlanError, match="at most 1000 final_seeds"):
        RaceSettings(folds=2, final_seeds=s + 1)
    with pytest.raises(PlanError, match="at most 1000 final_seeds"):  # the final's folds too
        RaceSettings(final_candidates=2, final_seeds=s + 1)
    assert RaceSettings(folds=1, final_seeds=s + 1).final_seeds == s + 1


SPLIT_SCORES = {"l1": 0.7, "l2": 0.8, "l3": 0.5}


class SplitThenFolds(FoldedRunner):
    """On the validation split ``b`` (l2) leads ``a`` (l1), and ``c`` (l3) trails; on the
    folds ``a`` is right on 9 of 12 images and ``b`` on 7 (FOLD_SCORES)."""

    def run(self, updates, recipe):
        (layer,) = [k for k in updates if k != "head"]
        self.seeds.append((layer, recipe.epochs, -1, recipe.seed))
        acc = SPLIT_SCORES[layer] - (0.05 if recipe.lr != 0.02 else 0.0)
        return {"val_accuracy": acc, "val_loss": 1 - acc, "seconds": 0.0, "val_images": 50}


def test_the_cross_validated_final_decides_among_the_last_rungs_best_candidates(tmp_path):
    """Rungs on the split keep b@0.02, a@0.02 and b@0.01 (0.8, 0.7, 0.75 ranked 0.8, 0.75,
    0.7); the final takes each of the 2 best candidates' best arm (b@0.02, a@0.02), trains them
    on 2 folds of the pooled images, and a wins there (0.75 against 0.583 of 12 images). A race
    file made without a final has the same key and is continued: only the final trains."""
    cands = [cand("a", "l1"), cand("b", "l2"), cand("c", "l3")]
    plain = RaceSettings(rungs=(1, 2), lrs=(0.01, 0.02), keep=0.5)
    settings = RaceSettings(rungs=(1, 2), lrs=(0.01, 0.02), keep=0.5, final_candidates=2,
                            final_folds=2)
    key = race_key(data_key={"model": "fake"}, recipe=Recipe(seed=3), settings=settings,
                   candidates=cands)
    assert key == race_key(data_key={"model": "fake"}, recipe=Recipe(seed=3), settings=plain,
                           candidates=cands)
    path = tmp_path / "race.json"
    before = race(SplitThenFolds(), cands, recipe=Recipe(seed=3), settings=plain, path=path,
                  key=key, progress=False)
    assert before.winner.name == "b" and before.final() is None
    runner = SplitThenFolds()
    result = race(runner, cands, recipe=Recipe(seed=3), settings=settings, path=path, key=key,
                  progress=False)
    assert sorted(runner.calls) == [("l1", 0), ("l1", 1), ("l2", 0), ("l2", 1)]
    assert runner.dealt == [(2, 3)]
    assert result.winner.name == "a" and result.recipe.lr == 0.02 and result.recipe.epochs == 2
    last, final = result.rungs[-2], result.final()
    assert final is result.rungs[-1] and final["folds"] == 2 and final["val_images"] == 12
    assert [(a["candidate"], a["lr"], a["kept"]) for a in last["arms"]] == [
        ("b", 0.02, True), ("b", 0.01, False), ("a", 0.02, True)]
    assert [(a["candidate"], a["val_accuracy"], a["kept"]) for a in final["arms"]] == [
        ("a", pytest.approx(0.75), True), ("b", pytest.approx(7 / 12), False)]
    assert sorted(result.final_arms()) == ["s3:f0", "s3:f1"]
    assert result.final_arms()["s3:f0"]["val_images"] == 10
    assert result.winner_lrs() == [0.02, 0.01]
    keys = json.loads(path.read_text())["results"]
    assert "r2:e2:s3:a@lr0.02:f1of2" in keys and "r2:e2:s3:b@lr0.02:f0of2" in keys
    from budgetsearch.planner.race import arm_scores

    assert arm_scores(keys)[(2, "a", 0.02)] == pytest.approx(0.75)
    assert settings.epochs_total(6) == 6 * 1 + 3 * 2 + 2 * 2 * 2
    # again: nothing trains
    again = SplitThenFolds()
    assert race(again, cands, recipe=Recipe(seed=3), settings=settings, path=path, key=key,
                progress=False).winner.name == "a" and again.calls == []


def test_the_final_needs_two_candidates_a_split_race_and_a_runner_that_deals_folds():
    one = race(SplitThenFolds(), [cand("b", "l2")], recipe=Recipe(),
               settings=RaceSettings(rungs=(1,), lrs=(0.02, 0.01), final_candidates=4),
               progress=False)
    assert one.final() is None and one.winner.name == "b"  # one candidate: no final
    folded = RaceSettings(rungs=(1,), lrs=(0.02,), folds=2, final_candidates=4)
    assert not folded.has_final  # a cross-validated race needs no final
    assert race(FoldedRunner(), [cand("a", "l1"), cand("b", "l2")], recipe=Recipe(),
                settings=folded, progress=False).final() is None
    with pytest.raises(PlanError, match="a cross-validated final needs a runner that deals"):
        race(FakeRunner(QUALITY, BEST_LR), pool(), recipe=Recipe(),
             settings=RaceSettings(rungs=(1,), final_candidates=2), progress=False)
    for bad in (1, -1, 21, True, 2.0):
        with pytest.raises(PlanError, match=r"final_candidates must be 0 \(no final\) or"):
            RaceSettings(final_candidates=bad)
    for bad in (1, 21, False):
        with pytest.raises(PlanError, match="final_folds must be an integer from 2 to 20"):
            RaceSettings(final_folds=bad)


def test_an_arm_with_a_run_of_unknown_size_weighs_its_runs_equally():
    """A run recorded without ``val_images`` (a file from before it was recorded) cannot be
    weighed: the arm's runs then count equally, a = (0.9 + 0) / 2, b = (0.5 + 1) / 2."""

    class Unsized(FoldedRunner):
        def folds(self, k, *, seed):
            views = super().folds(k, seed=seed)
            plain = views[1].run
            views[1].run = lambda u, r: {k: v for k, v in plain(u, r).items()
                                         if k != "val_images"}
            return views

    result = race(Unsized(), [cand("a", "l1"), cand("b", "l2")], recipe=Recipe(),
                  settings=RaceSettings(rungs=(1,), lrs=(0.02,), folds=2), progress=False)
    assert [(x["candidate"], x["val_accuracy"]) for x in result.rungs[0]["arms"]] == [
        ("b", pytest.approx(0.75)), ("a", pytest.approx(0.45))]


def test_race_folds_rule():
    from budgetsearch.planner import race_folds

    assert race_folds(train_images=200, val_images=50, below=200) == 5
    assert race_folds(train_images=800, val_images=200, below=200) == 1
    assert race_folds(train_images=16, val_images=4, below=200) == 5
    assert race_folds(train_images=3, val_images=1, below=200) == 4
    assert race_folds(train_images=1000, val_images=2, below=200) == 20  # MAX_FOLDS
    assert race_folds(train_images=5, val_images=5, below=200) == 2
    assert race_folds(train_images=200, val_images=50, below=0) == 1


def test_final_folds_rule_and_the_efforts_finals():
    from budgetsearch.planner import EFFORTS, final_folds

    assert final_folds(train_images=800, val_images=200) == 5
    assert final_folds(train_images=16, val_images=4) == 5
    assert final_folds(train_images=600, val_images=400) == 2  # round(2.5) = 2
    assert final_folds(train_images=1000, val_images=2) == 20  # MAX_FOLDS
    assert final_folds(train_images=10, val_images=0) == 2
    assert {n: e.final for n, e in EFFORTS.items()} == {"quick": 0, "standard": 4,
                                                         "thorough": 6}
    s = EFFORTS["standard"].settings("sgd", final_folds=3)
    assert s.final_candidates == 4 and s.final_folds == 3 and s.has_final
    assert EFFORTS["standard"].settings("sgd", final=0).has_final is False
    assert not EFFORTS["standard"].settings("sgd", folds=5).has_final


def test_bad_settings_and_candidates_are_named_errors():
    for rungs in ((2, 1), (), (0, 2), (True, 2), (2.0, 4)):  # one rule with the study files'
        with pytest.raises(PlanError, match="rungs must be increasing"):
            RaceSettings(rungs=rungs)
    with pytest.raises(PlanError, match="learning rates must be distinct"):
        RaceSettings(lrs=(0.1, 0.1))
    with pytest.raises(PlanError, match="must differ within 6 significant digits"):
        RaceSettings(lrs=(0.02, 0.02000001))  # both arms would be keyed ...@lr0.02
    with pytest.raises(PlanError, match="keep share"):
        RaceSettings(keep=1.0)
    with pytest.raises(PlanError, match="no candidates"):
        race(FakeRunner({}, {}), [], recipe=Recipe(), progress=False)
    with pytest.raises(PlanError, match="repeated: s1"):
        race(FakeRunner({}, {}), [cand("s1", "l1"), cand("s1", "l2")], recipe=Recipe(),
             progress=False)


def test_a_killed_race_resumes_without_retraining_and_refuses_another_key(tmp_path):
    path = tmp_path / "race.json"
    settings = RaceSettings(rungs=(1, 2, 4), lrs=(0.00667, 0.02, 0.06))
    key = race_key(data_key={"model": "fake"}, recipe=Recipe(), settings=settings,
                   candidates=pool())
    first = FakeRunner(QUALITY, BEST_LR)
    with pytest.raises(PlanError, match="stopped after 20 arms"):
        race(first, pool(), recipe=Recipe(), settings=settings, path=path, key=key,
             progress=False, max_arms=20)
    doc = json.loads(path.read_text())
    assert len(doc["results"]) == 20 and doc["claims"] == {}
    second = FakeRunner(QUALITY, BEST_LR)
    result = race(second, pool(), recipe=Recipe(), settings=settings, path=path, key=key,
                  progress=False)
    assert len(second.calls) == 26 - 20 and result.stats["arms_trained"] == 6
    done = {(c[0], c[1], c[2]) for c in first.calls}
    assert not done & {(c[0], c[1], c[2]) for c in second.calls}
    reference = race(FakeRunner(QUALITY, BEST_LR), pool(), recipe=Recipe(), settings=settings,
                     progress=False)
    assert result.rungs == reference.rungs and result.winner == reference.winner
    other = race_key(data_key={"model": "fake"}, recipe=Recipe(lr=0.5), settings=settings,
                     candidates=pool())
    with pytest.raises(TableError, match="recipe"):
        race(second, pool(), recipe=Recipe(), settings=settings, path=path, key=other,
             progress=False)


def test_arms_claimed_by_a_live_worker_are_waited_for_not_retrained(tmp_path, monkeypatch):
    """A second worker's claim on an arm is respected: this process trains the rest of the
    rung, then waits; the claim's result arrives from the other worker and is used."""
    path = tmp_path / "race.json"
    settings = RaceSettings(rungs=(1,), lrs=(0.02,))
    cands = pool()[:3]
    key = race_key(data_key={"model": "fake"}, recipe=Recipe(), settings=settings,
                   candidates=cands)
    other = SharedTable(path, key)
    other.me = {"host": other.me["host"], "pid": os.getppid()}  # a live process, not us
    taken = other.claim(["r0:e1:s0:b3@lr0.02"])
    assert taken == "r0:e1:s0:b3@lr0.02"
    polls = []

    def finish_other(_seconds):  # stands in for time.sleep: the other worker records
        polls.append(1)
        other.record(taken, {"val_accuracy": 0.99, "val_loss": 0.01})

    import importlib

    race_module = importlib.import_module("budgetsearch.planner.race")
    runner = FakeRunner(QUALITY, BEST_LR)
    monkeypatch.setattr(race_module.time, "sleep", finish_other)
    result = race(runner, cands, recipe=Recipe(), settings=settings, path=path, key=key,
                  progress=False)
    assert polls and sorted(c[0] for c in runner.calls) == ["l1", "l2"]
    assert result.winner.name == "b3"  # the other worker's result decided it


def test_a_race_in_a_database_resumes_like_one_in_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGETSEARCH_CACHE", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path / 'search.db'}"
    settings = RaceSettings(rungs=(1, 2, 4), lrs=(0.00667, 0.02, 0.06))
    key = race_key(data_key={"model": "fake"}, recipe=Recipe(), settings=settings,
                   candidates=pool())
    with pytest.raises(PlanError, match="stopped after 10 arms"):
        race(FakeRunner(QUALITY, BEST_LR), pool(), recipe=Recipe(), settings=settings,
             storage=url, key=key, progress=False, max_arms=10)
    second = FakeRunner(QUALITY, BEST_LR)
    result = race(second, pool(), recipe=Recipe(), settings=settings, storage=url, key=key,
                  progress=False)
    assert len(second.calls) == 26 - 10
    reference = race(FakeRunner(QUALITY, BEST_LR), pool(), recipe=Recipe(), settings=settings,
                     progress=False)
    assert result.rungs == reference.rungs and result.winner == reference.winner


def test_a_plan_files_updates_are_matched_to_the_race_files_candidate_by_digest(tmp_path):
    from _toys import small_cnn

    from budgetsearch.graph import LayerGraph
    from budgetsearch.plan import Plan, load_plan
    from budgetsearch.planner import updates_digest

    graph = LayerGraph.from_model(small_cnn(), input_size=(16, 16), model_name="toy")
    chosen = {"7": LayerUpdate("bias"), "0": LayerUpdate("weight", channels=(0, 1)),
              "3": LayerUpdate("weight", patch_size=2)}
    plan = Plan.from_layers(graph, chosen)
    plan.save(tmp_path / "plan.json")
    loaded = load_plan(tmp_path / "plan.json").updates
    c = Candidate(name="search#3", source="search", updates=chosen, memory_bytes=1,
                  latency_ms=1.0, backward_macs=1.0)
    key = race_key(data_key={}, recipe=Recipe(), settings=RaceSettings(), candidates=[c])
    # the key names the candidate by the digest of its updates, whatever their order
    assert key["candidates"] == {"search#3": c.digest()} == {"search#3": updates_digest(loaded)}
    assert updates_digest(dict(reversed(list(chosen.items())))) == c.digest()
    # and a different plan, even by one channel or one patch size, has another digest
    for other in ({**chosen, "0": LayerUpdate("weight", channels=(0, 2))},
                  {**chosen, "3": LayerUpdate("weight")}):
        assert updates_digest(other) != c.digest()


def test_the_digest_matches_the_committed_race_files():
    """The studies' race files name candidates by this digest: a change of its format would
    stop plan files being matched to them (``benchmarks/race_vs_test.py``)."""
    from pathlib import Path

    from budgetsearch.plan import load_plan
    from budgetsearch.planner import updates_digest

    root = Path(__file__).resolve().parents[2] / "studies" / "results" / "mcu_budgets_tuned"
    cell = "c10-250__mcunet-5fps__stm32f746__49KB"
    key = json.loads((root / "plans" / f"{cell}__search__p0" / "race-5fold.json").read_text())
    names = key["key"]["candidates"]
    for method, candidate in (("tinytl", "tinytl"), ("mit-scheme", "mit-scheme 49KB"),
                              ("classifier", "classifier")):
        plan = load_plan(root / "cells" / f"{cell}__{method}__s0" / "plan.json")
        assert updates_digest(plan.updates) == names[candidate], method
    assert names["tinytl"] != names["classifier"]


def test_arm_scores_rebuilds_the_races_pooled_scores_from_its_file(tmp_path):
    """Read back from the race file, every arm scores what the race scored it: folds weighed
    by their images (a: 0.75 over 12 images, not the folds' mean 0.45)."""
    from budgetsearch.planner.race import arm_scores

    a, b = cand("a", "l1"), cand("b", "l2")
    settings = RaceSettings(rungs=(1, 2), lrs=(0.02,), keep=0.5, folds=2)
    key = race_key(data_key={"model": "fake"}, recipe=Recipe(seed=3), settings=settings,
                   candidates=[a, b])
    result = race(FoldedRunner(), [a, b], recipe=Recipe(seed=3), settings=settings,
                  path=tmp_path / "race.json", key=key, progress=False)
    results = json.loads((tmp_path / "race.json").read_text())["results"]
    expected = {(i, x["candidate"], x["lr"]): x["val_accuracy"]
                for i, rung in enumerate(result.rungs) for x in rung["arms"]}
    assert arm_scores(results) == pytest.approx(expected)
    assert arm_scores(results)[(0, "a", 0.02)] == pytest.approx(0.75)
    # any recorded metric, pooled the same way: the race's own losses
    assert arm_scores(results, metric="val_loss") == pytest.approx(
        {(i, x["candidate"], x["lr"]): x["val_loss"]
         for i, rung in enumerate(result.rungs) for x in rung["arms"]})
    assert arm_scores(results, metric="val_loss")[(0, "a", 0.02)] == pytest.approx(0.25)
    # entries that are not arms, or have no accuracy, are left out
    assert arm_scores({**results, "note": {"val_accuracy": 1.0},
                       "r0:e1:s3:c@lr0.02": {"val_accuracy": None}}) == arm_scores(results)
    # a run without a loss makes its arm's loss infinite, as the race's tie-break takes it
    lossless = {**results, "r0:e1:s3:a@lr0.02:f9": {"val_accuracy": 0.5, "val_loss": None}}
    assert arm_scores(lossless, metric="val_loss")[(0, "a", 0.02)] == math.inf


def test_best_arm_each_keeps_each_candidates_first_arm_in_rank_order():
    from budgetsearch.planner.race import best_arm_each

    ranked = [("a", 0.02), ("b", 0.06), ("a", 0.06), ("c", 0.00667), ("b", 0.02), ("d", 0.02)]
    assert best_arm_each(ranked, 3) == [("a", 0.02), ("b", 0.06), ("c", 0.00667)]
    assert best_arm_each(ranked, 10) == [("a", 0.02), ("b", 0.06), ("c", 0.00667),
                                         ("d", 0.02)]
    assert best_arm_each([], 4) == []


def test_arms_right_on_as_many_pooled_images_tie_and_less_memory_wins():
    """Right on 60 of 5 x 50 pooled images each, spread otherwise over the folds: a weighted
    sum of the fractions rounds the two apart (0.24000000000000002 and 0.24); pooled as counts
    they tie, and the tie goes to less memory as documented."""
    counts = {"l_big": [28, 7, 5, 5, 15], "l_small": [21, 14, 5, 5, 15]}

    class View:
        def __init__(self, j: int) -> None:
            self.j, self.val_rows = j, list(range(50))

        def run(self, updates, recipe):
            (layer,) = [k for k in updates if k != "head"]
            return {"val_accuracy": counts[layer][self.j] / 50, "val_loss": 1.0,
                    "val_images": 50}

    class Runner:
        def folds(self, k, *, seed):
            return [View(j) for j in range(k)]

    def arm(name: str, memory: int) -> Candidate:
        return Candidate(name=name, source="search", memory_bytes=memory, latency_ms=1.0,
                         backward_macs=1.0, updates={"head": LayerUpdate("weight"),
                                                     f"l_{name}": LayerUpdate("bias")})

    result = race(Runner(), [arm("big", 500), arm("small", 100)], recipe=Recipe(),
                  settings=RaceSettings(rungs=(1,), lrs=(0.02,), folds=5), progress=False)
    assert result.winner.name == "small"
    assert {a["val_accuracy"] for a in result.rungs[-1]["arms"]} == {0.24}
    assert sum(c / 50 * 50 for c in counts["l_big"]) / 250 != 0.24  # what was compared before
    assert pooled_mean([c / 50 for c in counts["l_big"]], [50] * 5, counts=True) == 0.24
    assert pooled_mean([1 / 200, 14 / 200], [200, 200], counts=True) == pooled_mean(
        [0.0, 15 / 200], [200, 200], counts=True)
    assert pooled_mean([0.5, 1.0], [None, 10], counts=True) == 0.75  # a count unknown: equal
    # only the validation accuracy is a fraction of the validation images: a test accuracy a
    # race records (on other images) is pooled as it is
    from budgetsearch.planner.race import arm_scores

    rows = {f"r0:e1:s0:a@lr0.02:f{j}": {"val_accuracy": 0.5, "test_accuracy": t,
                                        "val_images": 10} for j, t in enumerate((0.523, 0.525))}
    assert arm_scores(rows, metric="test_accuracy")[(0, "a", 0.02)] == pytest.approx(0.524)


def test_a_race_kept_in_a_file_or_database_needs_its_key(tmp_path):
    """Without a key, a second race on other data would have taken the first one's results."""
    with pytest.raises(PlanError, match=r"a race kept in a file or a database needs its key"):
        race(FakeRunner(QUALITY, BEST_LR), pool()[:2], recipe=Recipe(), path=tmp_path / "r.json",
             progress=False)
    with pytest.raises(PlanError, match=r"needs its key"):
        race(FakeRunner(QUALITY, BEST_LR), pool()[:2], recipe=Recipe(),
             storage=f"sqlite:///{tmp_path}/r.db", progress=False)
    assert list(tmp_path.iterdir()) == []
