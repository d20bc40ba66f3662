"""Processes: a study killed mid-run and re-run completes without losing trials; worker
processes sharing one study (SQLite here, PostgreSQL when a server is given) write disjoint
trials, none lost, none duplicated."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid

import optuna
import pytest
import torch
from optuna.trial import TrialState

from budgetsearch import load_model
from budgetsearch.cli import main
from budgetsearch.criteria import magnitude_scores
from budgetsearch.search import open_storage

torch.set_num_threads(1)
PG_ENV = "BUDGETSEARCH_TEST_POSTGRES_URL"


@pytest.fixture(scope="module")
def scores_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("scores") / "magnitude.npz"
    magnitude_scores(load_model("mcunet-5fps", num_classes=10)).save(path)
    return str(path)


def _plan(scores: str, out, storage: str, study: str, trials: int, *extra: str) -> list[str]:
    return ["plan", "--model", "mcunet-5fps", "--num-classes", "10", "--device", "stm32h743",
            "--scores", scores, "--budget", "99KB", "--memory-measure", "training",
            "--population", "20", "--no-progress", "--storage", storage, "--study", study,
            "--trials", str(trials), "--out", str(out), *extra]


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "budgetsearch", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _count(db) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("select count(*) from trials where state='COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_killed_run_resumes_without_losing_trials(tmp_path, scores_file) -> None:
    db = tmp_path / "k.db"
    url = f"sqlite:///{db}"
    args = _plan(scores_file, tmp_path / "p.json", url, "k", 5000, "--flush-seconds", "0.2")
    proc = subprocess.Popen(_cli(args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while _count(db) < 40:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the search wrote no trials in time"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    study = optuna.load_study(study_name="k", storage=url)
    before = {t.number: (t.params, t.values) for t in _complete(study)}
    assert len(before) >= 40
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials())  # no half trial
    assert sorted(before) == list(range(len(before)))
    target = len(before) + 30
    assert main(_plan(scores_file, tmp_path / "p.json", url, "k", target)) == 0
    after = _complete(optuna.load_study(study_name="k", storage=url))
    assert [t.number for t in after] == list(range(target))
    for t in after[: len(before)]:
        assert (t.params, t.values) == before[t.number]


def _run_workers(storage: str, study: str, n: int, trials: int) -> list[str]:
    procs = [subprocess.Popen(_cli(["worker", "--study", study, "--storage", storage,
                                    "--trials", str(trials), "--seed", str(100 + i),
                                    "--flush-seconds", "0.3", "--no-progress"]),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
        outs.append(out.decode())
    return outs


def _check_shared(storage_obj, study_name: str, start: int, n: int, trials: int) -> None:
    study = optuna.load_study(study_name=study_name, storage=storage_obj)
    done = _complete(study)
    assert len(study.get_trials()) == len(done) == start + n * trials  # none lost, no extra
    assert [t.number for t in done] == list(range(start + n * trials))  # unique, contiguous
    assert len({t._trial_id for t in done}) == len(done)
    tags = [t.user_attrs.get("worker") for t in done[start:]]
    assert len(set(tags)) == n and all(tags.count(tag) == trials for tag in set(tags))
    assert all(t.user_attrs.get("worker") is None for t in done[:start])


def test_two_workers_share_one_sqlite_study(tmp_path, scores_file) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    assert main(_plan(scores_file, tmp_path / "p.json", url, "w", 30)) == 0
    outs = _run_workers(url, "w", 2, 25)
    assert all("added 25 trials" in o for o in outs)
    _check_shared(url, "w", 30, 2, 25)


@pytest.mark.skipif(not os.environ.get(PG_ENV),
                    reason=f"no PostgreSQL server: set {PG_ENV}=postgresql://user@127.0.0.1:PORT/"
                           "db (scripts/start_postgres.sh starts one and prints the URL)")
def test_four_workers_share_one_postgresql_study(tmp_path, scores_file) -> None:
    url = os.environ[PG_ENV]
    name = f"pg-{uuid.uuid4().hex[:8]}"
    assert main(_plan(scores_file, tmp_path / "p.json", url, name, 30)) == 0
    _run_workers(url, name, 4, 30)
    _check_shared(open_storage(url), name, 30, 4, 30)
    optuna.delete_study(study_name=name, storage=url)
