"""Storage: URL checks, resume, mismatch refusal, batched writes, journal files, workers'
rebuild from the study's stored configuration."""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch.criteria import random_scores
from budgetsearch.errors import SearchError
from budgetsearch.search import (
    Search,
    open_storage,
    read_config,
    scores_digest,
    stored_scores,
    write_trials,
)
from budgetsearch.search._config import CONFIG_KEY

torch.set_num_threads(1)
KB = 1024


@pytest.fixture(scope="module")
def mcu(mcunet: dict) -> dict:
    return {**mcunet, "scores": random_scores(mcunet["model"], seed=0)}


def _search(mcu: dict, budget: int = 99 * KB, **kw) -> Search:
    return Search(cost_model=mcu["cm"], scores=mcu["scores"], budget_bytes=budget,
                  memory_measure="training", population_size=20,
                  model={"name": "mcunet-5fps", "num_classes": 10}, **kw)


def test_bad_urls_are_refused_before_anything_is_written(tmp_path) -> None:
    with pytest.raises(SearchError, match="unknown storage URL"):
        open_storage("redis://localhost/0")
    with pytest.raises(SearchError, match="unknown storage URL"):
        open_storage(str(tmp_path / "plain.db"))
    with pytest.raises(SearchError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path}/missing/dir/s.db")
    with pytest.raises(SearchError, match="does not exist"):
        open_storage(f"journal:///{tmp_path}/missing/s.log")
    with pytest.raises(SearchError) as info:  # nobody listens on port 1; or no driver
        open_storage("postgresql://user:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_resume_continues_the_study_without_losing_trials(mcu: dict, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    first = _search(mcu).run(n_trials=50, storage=url, study_name="s", flush_seconds=0.02)
    assert len(first.trials) == 50 and first.stats["written"] == 50
    again = _search(mcu).run(n_trials=80, storage=url, study_name="s")
    assert [t.number for t in again.trials] == list(range(80))
    assert again.stats["new_trials"] == 30
    for a, b in zip(first.trials, again.trials[:50], strict=True):
        assert (a.number, a.params, a.values) == (b.number, b.params, b.values)
    same = _search(mcu).run(n_trials=80, storage=url, study_name="s")
    assert same.stats["new_trials"] == 0 and len(same.trials) == 80
    # the persisted study agrees with what the run returned, and opens with plain Optuna
    study = optuna.load_study(study_name="s", storage=url)
    stored = study.get_trials(states=(TrialState.COMPLETE,))
    assert [(t.number, t.params, t.values) for t in stored] == [
        (t.number, t.params, t.values) for t in again.trials]
    assert study.metric_names == ["proxy", "training_memory_bytes", "latency_ms"]
    assert sum("baseline" in t.user_attrs for t in stored) >= 5
    assert all("BaseGASampler:generation" in t.system_attrs or any(
        k.endswith(":generation") for k in t.system_attrs) for t in stored)
    assert again.plan.provenance["trial"] == again.trial.number
    assert again.plan.provenance["storage"] == url


def test_a_study_made_for_something_else_is_refused(mcu: dict, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    _search(mcu).run(n_trials=25, storage=url, study_name="s")
    # what a continuing run (budgetsearch plan) checks first
    scores, finished = stored_scores(url, "s", config=_search(mcu).config())
    assert finished == 25 and scores_digest(scores) == scores_digest(mcu["scores"])
    assert stored_scores(open_storage(url), "other", config={}) is None
    with pytest.raises(SearchError, match=r"made for something else.*memory budget \(bytes\)"):
        stored_scores(url, "s", config=_search(mcu, budget=148 * KB).config())
    with pytest.raises(SearchError, match=r"memory budget \(bytes\): the study has 101376"):
        _search(mcu, budget=148 * KB).run(n_trials=30, storage=url, study_name="s")
    other = load_model("mcunet-5fps", num_classes=7)
    graph = LayerGraph.from_model(other, input_size=112, model_name="mcunet-5fps")
    s = Search(cost_model=CostModel(graph, load_profile("stm32f746")),
               scores=random_scores(other), budget_bytes=99 * KB, memory_measure="training",
               model={"name": "mcunet-5fps", "num_classes": 7})
    with pytest.raises(SearchError) as info:
        s.run(n_trials=30, storage=url, study_name="s")
    text = str(info.value)
    for phrase in ("number of classes", "input size", "device profile: the study has "
                   "stm32h743, this run stm32f746"):
        assert phrase in text
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 25


def test_write_trials_is_atomic_and_numbers_are_contiguous(mcu: dict, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    result = _search(mcu).run(n_trials=30)
    study = optuna.create_study(storage=url, study_name="copy",
                                directions=["maximize", "minimize", "minimize"])
    assert write_trials(study, result.trials[:10]) == list(range(10))
    running = optuna.trial.create_trial(state=TrialState.RUNNING, params={}, distributions={})
    with pytest.raises(SearchError, match="not finished"):
        write_trials(study, [*result.trials[10:20], running])
    assert len(study.get_trials()) == 10
    assert write_trials(study, result.trials[10:30]) == list(range(10, 30))
    fresh = optuna.load_study(study_name="copy", storage=url).get_trials()
    assert [(t.params, t.values, t.constraints) for t in fresh] == [
        (t.params, t.values, t.constraints) for t in result.trials]


def test_journal_storage_and_worker_rebuild(mcu: dict, tmp_path) -> None:
    url = f"journal:///{tmp_path}/j.log"
    first = _search(mcu).run(n_trials=30, storage=url, study_name="j")
    config, scores, baselines = read_config(optuna.load_study(study_name="j",
                                                              storage=open_storage(url)))
    assert config["model"] == "mcunet-5fps" and config["budget_bytes"] == 99 * KB
    assert scores is not None and scores.fingerprint == mcu["graph"].fingerprint
    assert set(baselines) == {"tinytrain", "neq", "mit", "tinytl", "last-k", "last-k-filtered"}
    worker = Search.from_study(storage=url, study_name="j", seed=7)
    assert worker.space.param_names == _search(mcu).space.param_names
    assert worker.proxy.total == pytest.approx(first.plan.provenance["proxy"]["normalised_by"])
    more = worker.run(n_trials=10**9, max_new=15, storage=url, study_name="j", create=False,
                      warm_start=False, tag="w1")
    assert len(more.trials) == 45 and more.stats["written"] == 15
    assert sum(t.user_attrs.get("worker") == "w1" for t in more.trials) == 15
    assert more.plan.provenance["seed"] == 7
    with pytest.raises(SearchError, match="no study 'nope'"):
        Search.from_study(storage=url, study_name="nope")


def test_incomplete_or_foreign_studies_are_named(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/f.db"
    optuna.create_study(storage=url, study_name="foreign")
    half = optuna.create_study(storage=url, study_name="half")
    half.set_user_attr(CONFIG_KEY, {"model": "x"})
    with pytest.raises(SearchError, match="not created by budgetsearch"):
        read_config(optuna.load_study(study_name="foreign", storage=url))
    with pytest.raises(SearchError, match="incomplete"):
        read_config(optuna.load_study(study_name="half", storage=url))
