"""Storage: URL checks, resume, mismatch refusal, batched writes, journal files, workers'
rebuild from the study's stored configuration."""

from __future__ import annotations

import threading
import time
import warnings

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
from budgetsearch.search._config import COMPLETE_KEY, CONFIG_KEY

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
    with pytest.raises(SearchError, match="does not exist") as missing:
        open_storage(f"sqlite:///{tmp_path}/missing/dir/s.db")
    assert not missing.value.transient  # a mistake: trying again will not help
    with pytest.raises(SearchError, match="does not exist"):
        open_storage(f"journal:///{tmp_path}/missing/s.log")
    with pytest.raises(SearchError) as info:  # nobody listens on port 1; or no driver
        open_storage("postgresql://user:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    # a server that did not answer may answer later; a driver not installed will not appear
    assert info.value.transient == ("not installed" not in str(info.value))
    assert list(tmp_path.iterdir()) == []
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database " * 20)
    with pytest.raises(SearchError, match=r"cannot open storage .*not a database") as bad:
        open_storage(f"sqlite:///{garbage}")
    assert not bad.value.transient


def test_only_a_database_down_or_busy_is_worth_trying_again() -> None:
    from sqlalchemy.exc import DatabaseError, OperationalError

    from budgetsearch.search._storage import _may_pass

    def op(text: str) -> OperationalError:
        return OperationalError("SELECT 1", {}, Exception(text))

    assert _may_pass(op("database is locked"))
    assert _may_pass(op('connection to server at "db" (10.0.0.2), port 5432 failed: '
                        "Connection refused"))
    assert _may_pass(op("could not connect to server: Connection timed out"))
    assert not _may_pass(op('connection to server failed: FATAL: password authentication '
                            'failed for user "u"'))
    assert not _may_pass(op('FATAL: database "nope" does not exist'))
    assert not _may_pass(op("unable to open database file"))  # a folder it cannot write
    assert not _may_pass(DatabaseError("SELECT 1", {}, Exception("file is not a database")))
    assert not _may_pass(RuntimeError("database is locked"))  # not a database error at all


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


def test_write_trials_numbers_are_the_storages_when_another_worker_adds_trials(
        mcu: dict, tmp_path, monkeypatch) -> None:
    """On a journal file another worker adds a trial while this one writes its batch: each
    trial gets back the number the storage gave it (they were counted from the length before)."""
    result = _search(mcu).run(n_trials=6)
    url = f"journal:///{tmp_path}/w.log"
    mine = optuna.create_study(storage=open_storage(url), study_name="s",
                               directions=["maximize", "minimize", "minimize"])
    other = optuna.load_study(study_name="s", storage=open_storage(url))
    storage = mine._storage
    create = storage.create_new_trial
    calls = []

    def racing(study_id, template_trial=None):
        if not calls:  # the other worker's trial lands first
            other.add_trial(result.trials[5])
        calls.append(1)
        return create(study_id, template_trial=template_trial)

    monkeypatch.setattr(storage, "create_new_trial", racing)
    numbers = write_trials(mine, result.trials[:3])
    stored = {t.number: t.params for t in optuna.load_study(
        study_name="s", storage=open_storage(url)).get_trials()}
    assert numbers == [1, 2, 3]
    assert [stored[n] for n in numbers] == [t.params for t in result.trials[:3]]


def test_a_batch_whose_write_is_interrupted_is_written_at_the_end(
        mcu: dict, tmp_path, monkeypatch) -> None:
    """Ctrl-C during a batched write: the batch stays pending, the run's final write stores it,
    and the interrupt (not a KeyError of the lost batch) reaches the caller."""
    from budgetsearch.search import _loop

    real = _loop.write_trials
    calls: list[int] = []

    def interrupted(study, trials, **kw):
        calls.append(len(trials))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if SIGINT landed inside the write
        return real(study, trials, **kw)

    monkeypatch.setattr(_loop, "write_trials", interrupted)
    url = f"sqlite:///{tmp_path}/c.db"
    with pytest.raises(KeyboardInterrupt):
        _search(mcu).run(n_trials=400, storage=url, study_name="c", flush_seconds=0.0)
    assert len(calls) == 3 and calls[2] >= calls[1]  # the interrupted batch written at the end
    stored = optuna.load_study(study_name="c", storage=open_storage(url)).get_trials(
        states=(TrialState.COMPLETE,))
    assert len(stored) == calls[0] + calls[2]


def test_a_journal_write_stopped_midway_writes_the_rest_once(mcu: dict, tmp_path,
                                                             monkeypatch) -> None:
    """A journal file stores a batch one trial at a time: Ctrl-C after 9 of a batch of 30
    leaves those 9 stored, and the run's final write adds the other 21, not all 30 again."""
    from optuna.storages import JournalStorage

    create = JournalStorage.create_new_trial
    calls: list[int] = []

    def stopped(self, study_id, template_trial=None):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return create(self, study_id, template_trial=template_trial)

    monkeypatch.setattr(JournalStorage, "create_new_trial", stopped)
    url = f"journal:///{tmp_path}/j.log"
    with pytest.raises(KeyboardInterrupt):
        _search(mcu).run(n_trials=30, storage=url, study_name="j", flush_seconds=3600.0)
    monkeypatch.setattr(JournalStorage, "create_new_trial", create)
    stored = optuna.load_study(study_name="j", storage=open_storage(url)).get_trials()
    assert len(stored) == 30 and [t.number for t in stored] == list(range(30))


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
    with pytest.raises(SearchError, match=r"not created by budgetsearch \(it has no stored "
                                          r"configuration \(nothing more was written in 0.5 s"):
        read_config(optuna.load_study(study_name="foreign", storage=url), wait_s=0.5)
    with pytest.raises(SearchError, match=r"incomplete: its creation was interrupted "
                                          r"\(nothing more was written in 0.5 s\)"):
        read_config(optuna.load_study(study_name="half", storage=url), wait_s=0.5)
    # a study with trials is not being created: refused at once
    with_trials = optuna.create_study(storage=url, study_name="used")
    with_trials.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    start = time.monotonic()
    with pytest.raises(SearchError, match=r"not created by budgetsearch \(it has no stored "
                                          r"configuration\)"):
        read_config(optuna.load_study(study_name="used", storage=url))
    assert time.monotonic() - start < 5


def test_a_study_whose_creator_was_killed_is_made_anew(mcu: dict, tmp_path, monkeypatch) -> None:
    """Killed between creating a study and writing its configuration's last part: after the
    wait for its creator, a run that creates studies makes it anew instead of failing on it
    for good; another program's empty study of that name is never deleted."""
    from budgetsearch.search import _config

    monkeypatch.setattr(_config, "CREATION_WAIT_S", 0.5)
    url = f"sqlite:///{tmp_path}/k.db"
    half = optuna.create_study(storage=url, study_name="half",
                               directions=["maximize", "minimize", "minimize"])
    half.set_user_attr(CONFIG_KEY, {"model": "x"})  # no COMPLETE_KEY: the creator died here
    result = _search(mcu).run(n_trials=20, storage=url, study_name="half")
    assert len(result.trials) == 20
    assert COMPLETE_KEY in optuna.load_study(study_name="half", storage=url).user_attrs
    with pytest.raises(SearchError, match="incomplete"):  # a worker that only joins: refused
        half = optuna.create_study(storage=url, study_name="half2")
        half.set_user_attr(CONFIG_KEY, {"model": "x"})
        _search(mcu).run(n_trials=20, storage=url, study_name="half2", create=False)
    optuna.create_study(storage=url, study_name="theirs")
    with pytest.raises(SearchError, match="not created by budgetsearch"):
        _search(mcu).run(n_trials=20, storage=url, study_name="theirs")
    assert "theirs" in optuna.get_all_study_names(url)


def test_a_study_another_process_is_creating_is_waited_for(mcu: dict, tmp_path) -> None:
    """A second process that opens a study while its creator is still writing the
    configuration waits for it, instead of calling the study interrupted."""
    url = f"sqlite:///{tmp_path}/c.db"
    _search(mcu).run(n_trials=2, storage=url, study_name="made")
    attrs = optuna.load_study(study_name="made", storage=url).user_attrs
    creating = optuna.create_study(storage=url, study_name="creating",
                                   directions=["maximize", "minimize", "minimize"])

    def finish() -> None:  # the creator, a little later, writing the completion mark last
        time.sleep(1.0)
        for key in sorted(attrs, key=lambda k: k == COMPLETE_KEY):
            creating.set_user_attr(key, attrs[key])

    writer = threading.Thread(target=finish)
    writer.start()
    try:
        config, scores, _ = read_config(optuna.load_study(study_name="creating", storage=url),
                                        wait_s=30)
    finally:
        writer.join()
    assert config == attrs[CONFIG_KEY]
    assert scores_digest(scores) == scores_digest(mcu["scores"])


def _open_and_create(url: str) -> str:
    """In a worker process: open the storage and make a study in it."""
    try:
        storage = open_storage(url)
        optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
        return "ok"
    except Exception as exc:  # reported to the parent, which names it
        return f"{type(exc).__name__}: {exc}"


def test_processes_opening_one_new_sqlite_file_take_turns(tmp_path) -> None:
    """Optuna creates a new database's schema unguarded: without the lock beside the file,
    four processes opening a fresh file at once failed in 7 of 10 rounds here ("table studies
    already exists", "UNIQUE constraint failed: alembic_version")."""
    import multiprocessing

    # spawn, not fork: a child forked while torch's or another test's threads hold a lock can
    # hang for ever (it did once here, under load)
    pool_ctx = multiprocessing.get_context("spawn")
    with pool_ctx.Pool(4) as pool:
        for i in range(5):
            url = f"sqlite:///{tmp_path / f'race{i}.db'}"
            assert pool.map(_open_and_create, [url] * 4) == ["ok"] * 4
            assert (tmp_path / f"race{i}.db.lock").exists()
            assert len(optuna.get_all_study_summaries(open_storage(url))) == 1


def test_a_server_schema_created_concurrently_is_opened_again(monkeypatch) -> None:
    """On a database server the lock file cannot help: an error saying the schema's table or
    row already exists (another process was creating it) is tried again; any other error is
    not."""
    from budgetsearch.search import _storage

    calls: list[str] = []

    class Flaky:
        def __init__(self, url: str, engine_kwargs: dict) -> None:
            calls.append(url)
            if len(calls) == 1:
                raise RuntimeError('relation "studies" already exists')

    monkeypatch.setattr(_storage, "RDBStorage", Flaky)
    monkeypatch.setattr(_storage.time, "sleep", lambda s: None)
    assert isinstance(_storage._rdb_storage("postgresql://h/db", {}), Flaky)
    assert len(calls) == 2

    class Down:
        def __init__(self, url: str, engine_kwargs: dict) -> None:
            calls.append(url)
            raise RuntimeError("could not connect to server")

    calls.clear()
    monkeypatch.setattr(_storage, "RDBStorage", Down)
    with pytest.raises(RuntimeError, match="could not connect"):
        _storage._rdb_storage("postgresql://h/db", {})
    assert len(calls) == 1  # not retried

    class Always:
        def __init__(self, url: str, engine_kwargs: dict) -> None:
            calls.append(url)
            raise RuntimeError("duplicate key value violates unique constraint")

    calls.clear()
    monkeypatch.setattr(_storage, "RDBStorage", Always)
    with pytest.raises(RuntimeError, match="duplicate key"):
        _storage._rdb_storage("postgresql://h/db", {}, attempts=3)
    assert len(calls) == 3  # bounded


def test_a_moved_contribution_table_is_the_same_objective() -> None:
    """A study's measured objective names its table by digest and by path: a study copied or
    moved with its table (another path, the same digest) goes on; another table does not."""
    from budgetsearch.search._config import diff_config

    objective = {"objective": "measured", "decay": 0.2, "table_digest": "74b74201387e2693",
                 "table_source": "studies/results/s/contrib/m.json", "units": 260}
    moved = {**objective, "table_source": "/tmp/copy/s/contrib/m.json"}
    assert diff_config({"objective": objective}, {"objective": moved}) == []
    other = {**moved, "table_digest": "0000000000000000"}
    (phrase,) = diff_config({"objective": objective}, {"objective": other})
    assert phrase.startswith("accuracy objective: the study has") and "0000000000000000" in phrase
    assert diff_config({"model": "a"}, {"model": "b"}) == [
        "model: the study has a, this run b"]


def test_the_lock_is_beside_the_file_sqlalchemy_opens(tmp_path, monkeypatch) -> None:
    """A relative URL with a query string locks the database file itself (resolved), so every
    spelling of one file shares one lock."""
    monkeypatch.chdir(tmp_path)
    open_storage("sqlite:///sub/../a.db?timeout=5")
    assert (tmp_path / "a.db").exists() and (tmp_path / "a.db.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.db", "a.db.lock"]


def test_an_in_memory_sqlite_url_is_an_in_memory_storage() -> None:
    """sqlite:///:memory: (or sqlite://) would lose its tables when the tuned engine drops its
    connection: it opens as Optuna's in-memory storage, which a study can use."""
    from optuna.storages import InMemoryStorage

    from budgetsearch.search._storage import storage_kind

    for url in ("sqlite:///:memory:", "sqlite://", "memory"):
        assert storage_kind(url) == "memory"
        storage = open_storage(url)
        assert isinstance(storage, InMemoryStorage)
        optuna.create_study(storage=storage, study_name="x").optimize(
            lambda t: t.suggest_float("a", 0, 1), n_trials=2)


def test_a_worker_rebuilding_a_timed_profile_checks_where_it_was_timed(mcu: dict,
                                                                       tmp_path) -> None:
    """The study stores the profile; a worker that rebuilds it warns, as loading the file
    does, when its latency model was timed at another thread count than the worker's."""
    from pathlib import Path

    import yaml

    from budgetsearch.latency import LatencyModelWarning
    from budgetsearch.profiles import profile_from_dict

    here = Path(__file__).resolve().parents[2] / "studies/results/latency_model/this-host.yaml"
    data = yaml.safe_load(here.read_text())
    data["latency"]["threads"] = 97
    cm = CostModel(mcu["graph"], profile_from_dict(data, source="a test"))
    url = f"journal:///{tmp_path}/t.log"
    Search(cost_model=cm, scores=mcu["scores"], budget_bytes=99 * KB,
           memory_measure="training", population_size=4,
           model={"name": "mcunet-5fps", "num_classes": 10}).run(
        n_trials=8, storage=url, study_name="t")
    with pytest.warns(LatencyModelWarning, match="97"):
        Search.from_study(storage=url, study_name="t")


def test_a_resumed_study_draws_new_points_not_the_first_runs_again(mcu: dict, tmp_path) -> None:
    """Resuming rebuilds the sampler: seeded as the first run was, it replayed its draws and
    spent trials on duplicates (14 of 30 with the random sampler). The run's seed now mixes in
    the trials the study holds; a new study still draws from the seed itself."""
    from budgetsearch.search._study import run_seed

    url = f"journal:///{tmp_path}/r.log"
    _search(mcu, sampler="random", local_search=False).run(n_trials=30, storage=url,
                                                           study_name="r")
    more = _search(mcu, sampler="random", local_search=False).run(n_trials=60, storage=url,
                                                                  study_name="r")
    key = [tuple(sorted(t.params.items())) for t in sorted(more.trials, key=lambda t: t.number)]
    repeats = sum(k in set(key[:30]) for k in key[30:])
    assert len(key) == 60 and repeats <= 2, repeats
    assert run_seed(5, 0) == 5 and run_seed(5, 30) != run_seed(5, 31) != 5
    assert run_seed(5, 30, "host:1") != run_seed(5, 30, "host:2")


def test_a_study_deleted_while_it_was_awaited_is_a_named_transient_error(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/d.db"
    optuna.create_study(storage=url, study_name="c")
    study = optuna.load_study(study_name="c", storage=url)
    remover = threading.Timer(0.5, optuna.delete_study, kwargs={"study_name": "c",
                                                                 "storage": url})
    remover.start()
    try:
        with pytest.raises(SearchError, match="study 'c' was deleted while it was being "
                                              "created") as info:
            read_config(study, wait_s=20)
    finally:
        remover.join()
    assert info.value.transient


def test_continuing_a_study_with_another_sampler_says_so(mcu: dict, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    _search(mcu).run(n_trials=2, storage=url, study_name="s")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: nothing to say
        _search(mcu).run(n_trials=3, storage=url, study_name="s")
    with pytest.warns(UserWarning, match=r"study 's' was made with sampler nsga2, population "
                                         r"20; this run continues it with sampler random, "
                                         r"population 8"):
        result = Search(cost_model=mcu["cm"], scores=mcu["scores"], budget_bytes=99 * KB,
                        memory_measure="training", population_size=8, sampler="random",
                        model={"name": "mcunet-5fps", "num_classes": 10}).run(
            n_trials=5, storage=url, study_name="s")
    assert len(result.trials) == 5


def test_a_process_joining_a_study_another_created_draws_its_own_points(mcu: dict,
                                                                       tmp_path) -> None:
    """Two processes started together on one new study: the one that finds it created (and
    still empty) draws other points than the creator's seed gives, not the same ones again."""
    alone = _search(mcu).run(n_trials=40, storage=f"sqlite:///{tmp_path}/a.db",
                             study_name="s")
    url = f"sqlite:///{tmp_path}/b.db"
    creator = _search(mcu)
    _study, _baselines, created = creator._open(open_storage(url), "s",
                                                creator.config(n_trials=40), True, url)
    assert created
    joined = _search(mcu).run(n_trials=40, storage=url, study_name="s")
    def sampled(trials):  # the warm start's points (enqueued) are the same for both
        return {tuple(sorted(t.params.items())) for t in trials
                if "fixed_params" not in t.system_attrs}

    drawn, again = sampled(alone.trials), sampled(joined.trials)
    assert len(drawn) >= 10 and not drawn & again  # the same seed drew them all again before
    # a fresh study made alone is as reproducible as ever: its creator draws from the seed
    repeat = _search(mcu).run(n_trials=40, storage=f"sqlite:///{tmp_path}/c.db",
                              study_name="s")
    assert [t.params for t in repeat.trials] == [t.params for t in alone.trials]
    # and so is a study whose creator was killed before its first write: run again, it draws
    # what its creator would have
    import socket
    import subprocess
    import sys

    from budgetsearch.search._config import CREATOR_KEY

    url = f"sqlite:///{tmp_path}/d.db"
    creator._open(open_storage(url), "s", creator.config(n_trials=40), True, url)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    optuna.load_study(study_name="s", storage=url).set_user_attr(
        CREATOR_KEY, f"{socket.gethostname()}:{gone.pid}:00000000")
    rerun = _search(mcu).run(n_trials=40, storage=url, study_name="s")
    assert sampled(rerun.trials) == drawn
