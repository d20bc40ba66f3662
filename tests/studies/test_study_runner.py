"""The study runner with injected plan and train functions: resume, failures, claims, workers."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from budgetsearch.errors import BudgetError
from budgetsearch.graph import LayerGraph
from budgetsearch.plan import LayerUpdate, Plan
from budgetsearch.studies import (
    FileStore,
    SqlStore,
    cell_status,
    run_study,
    spec_from_dict,
)

LOG_ENV = "BUDGETSEARCH_TEST_STUDY_LOG"
_GRAPH: list[LayerGraph] = []


def _spec(tmp_path: Path, **changes):
    data = {
        "name": "fake",
        "data": {"source": "cifar10", "train_size": 8, "test_size": 8},
        "input_size": 8,
        "models": ["mcunet-5fps"],
        "devices": [{"name": "stm32f746", "budgets": ["64KB", "128KB"]}],
        "methods": [{"name": "a", "method": "tinytl"}, {"name": "b", "method": "last-k"},
                    {"name": "boom", "method": "random"}],
        "seeds": [0, 1],
    }
    data.update(changes)
    return spec_from_dict(data, path=tmp_path / "fake.yaml")


def _graph() -> LayerGraph:
    if not _GRAPH:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        _GRAPH.append(LayerGraph.from_model(net, input_size=8, model_name="tiny"))
    return _GRAPH[0]


def fake_plan(cell, ctx):
    """A real Plan on a tiny model; method ``boom`` is infeasible at the 64KB budget."""
    if cell.method.name == "boom" and cell.budget.label == "64KB":
        raise BudgetError("method random: no plan fits 64 KB", minimum_bytes=70000)
    budget = cell.budget.memory_bytes
    updates = {"6": LayerUpdate("weight")}
    if cell.method.name == "b":
        updates["2"] = LayerUpdate("weight", channels=(0, 1), axis="out")
    mem = int(budget * (0.8 if cell.method.name == "a" else 0.9))
    return Plan.from_layers(
        _graph(), updates, device=cell.device, memory_budget_bytes=budget,
        predicted={"peak_memory_bytes": mem, "training_memory_bytes": mem // 2,
                   "saved_activation_bytes": 1000, "forward_macs": 10, "backward_macs": 5,
                   "latency_ms": 1.0, "trainable_params": 10},
        provenance={"method": cell.method.method, "memory_bytes": mem, "fits": True})


def fake_train(cell, plan, ctx):
    """Logs the cell (to detect duplicates across processes) and returns trainer-like metrics."""
    log = os.environ.get(LOG_ENV)
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (cell.id + "\n").encode())
        finally:
            os.close(fd)
        time.sleep(0.05)
    acc = 0.5 + 0.1 * (cell.method.name == "b") + 0.01 * cell.seed
    return {"best_val_accuracy": acc, "final_val_accuracy": acc - 0.01,
            "saved_activation_bytes": 1000, "backward_ms": 2.0, "train_seconds": 0.1}


def _records(spec):
    return FileStore(spec.cells_dir).records()


def test_every_cell_recorded_and_a_failed_cell_does_not_stop_the_study(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    out = io.StringIO()
    summary = run_study(spec, plan_fn=fake_plan, train_fn=fake_train, progress=False, out=out)
    cells = spec.cells()
    assert len(summary.ran) == len(cells) - 2 and len(summary.failed) == 2
    recs = _records(spec)
    assert set(recs) == {c.id for c in cells}
    failed = [r for r in recs.values() if r["status"] == "failed"]
    assert {r["key"]["method"] for r in failed} == {"boom"}
    assert failed[0]["error"]["type"] == "BudgetError"
    assert failed[0]["error"]["permanent"] and failed[0]["error"]["minimum_bytes"] == 70000
    done = recs["default__mcunet-5fps__stm32f746__128KB__b__s1"]
    assert done["metrics"]["best_accuracy"] == pytest.approx(0.61)
    assert done["layers"] == {"0": None, "2": 0.5, "6": 1.0}
    assert (spec.cells_dir / done["plan_file"]).is_file()
    assert "failed default__mcunet-5fps__stm32f746__64KB__boom__s0: BudgetError" in out.getvalue()
    # permanent failures are not retried, unless asked
    again = run_study(spec, plan_fn=fake_plan, train_fn=fake_train, progress=False,
                      out=io.StringIO())
    assert not again.ran and not again.failed and len(again.skipped) == len(cells)
    retry = run_study(spec, plan_fn=fake_plan, train_fn=fake_train, progress=False,
                      out=io.StringIO(), retry_failed=True)
    assert len(retry.failed) == 2 and not retry.ran


class Killed(BaseException):
    """Stands for a kill: not an Exception, so the runner must not record it."""


def test_resume_after_a_kill_between_cells(tmp_path: Path) -> None:
    spec = _spec(tmp_path, methods=[{"name": "a", "method": "tinytl"}])
    calls = []

    def dying(cell, plan, ctx):
        if len(calls) == 2:
            raise Killed
        calls.append(cell.id)
        return fake_train(cell, plan, ctx)

    with pytest.raises(Killed):
        run_study(spec, plan_fn=fake_plan, train_fn=dying, progress=False, out=io.StringIO())
    assert set(_records(spec)) == set(calls) and len(calls) == 2
    assert not list(spec.cells_dir.glob("*.claim"))  # the interrupted cell's claim was released
    ran = []

    def counting(cell, plan, ctx):
        ran.append(cell.id)
        return fake_train(cell, plan, ctx)

    summary = run_study(spec, plan_fn=fake_plan, train_fn=counting, progress=False,
                        out=io.StringIO())
    assert sorted(summary.skipped) == sorted(calls)
    assert set(ran) == {c.id for c in spec.cells()} - set(calls)
    assert all(r["status"] == "done" for r in _records(spec).values())


def test_a_crash_is_retried_and_spec_changes_rerun_cells(tmp_path: Path) -> None:
    spec = _spec(tmp_path, methods=[{"name": "a", "method": "tinytl"}], seeds=[0])

    def crashing(cell, plan, ctx):
        raise RuntimeError("training: out of host memory")

    run_study(spec, plan_fn=fake_plan, train_fn=crashing, progress=False, out=io.StringIO())
    first = spec.cells()[0]
    rec = _records(spec)[first.id]
    assert rec["status"] == "failed" and not rec["error"]["permanent"]
    assert rec["error"]["type"] == "RuntimeError" and rec["error"]["traceback"]
    assert cell_status(first, rec) == "retry"
    # a storage that could not be opened now (a server down) is tried again, not given up on
    from budgetsearch.errors import SearchError

    def unreachable(cell, plan, ctx):
        raise SearchError("cannot open storage postgresql://db: connection refused",
                          transient=True)

    run_study(spec, plan_fn=fake_plan, train_fn=unreachable, progress=False, out=io.StringIO())
    rec = _records(spec)[first.id]
    assert rec["error"]["type"] == "SearchError" and not rec["error"]["permanent"]
    assert cell_status(first, rec) == "retry"
    summary = run_study(spec, plan_fn=fake_plan, train_fn=fake_train, progress=False,
                        out=io.StringIO())
    assert len(summary.ran) == 2
    changed = _spec(tmp_path, methods=[{"name": "a", "method": "tinytl"}], seeds=[0],
                    training={"epochs": 3})
    assert {cell_status(c, _records(changed).get(c.id)) for c in changed.cells()} == {"outdated"}
    assert len(run_study(changed, plan_fn=fake_plan, train_fn=fake_train, progress=False,
                         out=io.StringIO()).ran) == 2


def test_claims_live_and_stale(tmp_path: Path) -> None:
    spec = _spec(tmp_path, methods=[{"name": "a", "method": "tinytl"}], seeds=[0])
    store = FileStore(spec.cells_dir)
    live, dead = spec.cells()
    host = socket.gethostname()
    assert store.claim(live.id, f"{host}:{os.getpid()}:x")  # held by a live process
    dead_pid = _dead_pid()
    (spec.cells_dir / f"{dead.id}.claim").write_text(f"{host}:{dead_pid}:y\n")
    summary = run_study(spec, plan_fn=fake_plan, train_fn=fake_train, progress=False,
                        out=io.StringIO())
    assert summary.claimed_elsewhere == [live.id]
    assert summary.ran == [dead.id]  # the dead worker's claim was taken over
    other = FileStore(spec.cells_dir, stale_after=0.0)  # another host's claim goes stale too
    (spec.cells_dir / f"{live.id}.claim").write_text("elsewhere:1:z\n")
    time.sleep(0.01)
    assert other.claim(live.id, "me:2:w") and not store.claim(live.id, "you:3:v")


def test_takeover_never_moves_a_live_claim(tmp_path: Path, monkeypatch) -> None:
    """Worker B finds a dead worker's claim; before B takes it over, worker A does. B must then
    see A's live claim and back off, not move it away and claim the cell as well."""
    import budgetsearch.store as store_module

    cells = tmp_path / "cells"
    a, b = FileStore(cells), FileStore(cells)
    host = socket.gethostname()
    claim = cells / "c.claim"
    cells.mkdir()
    claim.write_text(f"{host}:{_dead_pid()}:old\n")
    real_locked = store_module.locked
    calls = []

    def a_first(path):  # B is about to take the claim over: A does it first
        if not calls:
            calls.append(path)
            assert a.claim("c", f"{host}:{os.getpid()}:A")
        return real_locked(path)

    monkeypatch.setattr(store_module, "locked", a_first)
    assert not b.claim("c", f"{host}:{os.getpid()}:B")
    assert calls and claim.read_text().strip().endswith(":A")
    assert len(list(cells.glob(".c.claim.stale-*"))) == 1  # only the dead claim was moved


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _run_in_process(spec_path: str, log: str, results: str, me: int) -> None:
    os.environ[LOG_ENV] = log
    from budgetsearch.studies import load_spec

    spec = load_spec(spec_path, results_dir=results)
    ready = Path(log).with_name(f"ready-{me}")
    ready.touch()
    deadline = time.time() + 60
    while len(list(ready.parent.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.01)  # both processes start their cells together
    run_study(spec, plan_fn=fake_plan, train_fn=fake_train, progress=False, out=io.StringIO())


def _write_spec(tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump({
        "name": "fake", "data": {"source": "cifar10"}, "input_size": 8,
        "models": ["mcunet-5fps"],
        "devices": [{"name": "stm32f746", "budgets": ["64KB", "96KB", "128KB"]}],
        "methods": [{"name": "a", "method": "tinytl"}, {"name": "b", "method": "last-k"}],
        "seeds": [0, 1]}))
    return path


def test_two_concurrent_runs_never_run_a_cell_twice(tmp_path: Path) -> None:
    path, log = _write_spec(tmp_path), tmp_path / "log.txt"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_run_in_process,
                         args=(str(path), str(log), str(tmp_path / "r"), i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    lines = log.read_text().split()
    assert len(lines) == len(set(lines)) == 12


def test_two_concurrent_runs_in_threads_share_the_cells(tmp_path: Path, monkeypatch) -> None:
    import threading

    from budgetsearch.studies import load_spec

    path, log = _write_spec(tmp_path), tmp_path / "log.txt"
    monkeypatch.setenv(LOG_ENV, str(log))
    spec = load_spec(path)
    barrier = threading.Barrier(2)
    summaries = []

    def run() -> None:
        barrier.wait()
        summaries.append(run_study(spec, plan_fn=fake_plan, train_fn=fake_train,
                                   progress=False, out=io.StringIO()))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    lines = log.read_text().split()
    assert len(lines) == len(set(lines)) == 12
    ran = [set(s.ran) for s in summaries]
    assert not ran[0] & ran[1] and len(ran[0] | ran[1]) == 12
    assert all(s.ran for s in summaries)  # both took part


def test_workers_run_cells_in_parallel_processes_once_each(tmp_path: Path, monkeypatch) -> None:
    path, log = _write_spec(tmp_path), tmp_path / "log.txt"
    monkeypatch.setenv(LOG_ENV, str(log))
    from budgetsearch.studies import load_spec

    spec = load_spec(path)
    summary = run_study(spec, workers=2, plan_fn=fake_plan, train_fn=fake_train,
                        progress=False, out=io.StringIO())
    lines = log.read_text().split()
    assert len(summary.ran) == 12 and sorted(lines) == sorted(summary.ran)
    assert len({json.loads(p.read_text())["worker"].split(":")[1]
                for p in spec.cells_dir.glob("*.json")}) >= 1


DYING = "default__mcunet-5fps__stm32f746__96KB__b__s1"


def dying_train(cell, plan, ctx):
    """fake_train, but the process running cell DYING dies (as if killed for memory)."""
    if cell.id == DYING:
        os._exit(9)
    return fake_train(cell, plan, ctx)


def test_a_dying_worker_fails_its_own_cell_only(tmp_path: Path, monkeypatch) -> None:
    """A worker process that dies breaks the pool; the cells it took down run again, each in a
    process of its own: only the one that kills its process too is recorded (as failed, not
    permanently), every other cell finishes."""
    path, log = _write_spec(tmp_path), tmp_path / "log.txt"
    monkeypatch.setenv(LOG_ENV, str(log))
    from budgetsearch.studies import load_spec

    spec = load_spec(path)
    summary = run_study(spec, workers=2, plan_fn=fake_plan, train_fn=dying_train,
                        progress=False, out=io.StringIO())
    assert summary.failed == [DYING] and len(summary.ran) == 11
    recs = _records(spec)
    assert len(recs) == 12 and recs[DYING]["status"] == "failed"
    assert recs[DYING]["error"]["type"] == "WorkerDied"
    assert not recs[DYING]["error"]["permanent"]  # a later run tries it again
    assert cell_status(next(c for c in spec.cells() if c.id == DYING), recs[DYING]) == "retry"
    assert not list(spec.cells_dir.glob("*.claim"))  # no claim left behind


def test_sql_store_shares_claims_and_records(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = _spec(tmp_path, methods=[{"name": "a", "method": "tinytl"}], seeds=[0])
    a = SqlStore(url, study="fake", cells_dir=tmp_path / "a")
    b = SqlStore(url, study="fake", cells_dir=tmp_path / "b")
    cid, done = spec.cells()[0].id, {"status": "done", "config_hash": spec.cells()[0].config_hash()}
    assert a.claim(cid, f"{socket.gethostname()}:{os.getpid()}:a")
    assert not b.claim(cid, "elsewhere:1:b")
    a.write(cid, {**done, "x": 1})
    a.release(cid, f"{socket.gethostname()}:{os.getpid()}:a")
    assert b.record(cid) == {**done, "x": 1}
    assert b.records() == {cid: {**done, "x": 1}}
    assert json.loads((tmp_path / "b" / f"{cid}.json").read_text())["x"] == 1  # mirrored
    summary = run_study(spec, storage=url, plan_fn=fake_plan, train_fn=fake_train,
                        progress=False, out=io.StringIO())
    assert summary.skipped == [cid] and len(summary.ran) == 1


def _fake_cifar_spec(tmp_path: Path, monkeypatch, *, name: str, budget: str, **fields):
    """A one-seed study of MCUNet-5fps (32 px) on the STM32F746 at ``budget`` over a stand-in
    CIFAR-10 archive (``BUDGETSEARCH_DATA`` set to it), ``fields`` added to the study file."""
    from _toys import fake_cifar10_archive

    monkeypatch.setenv("BUDGETSEARCH_DATA",
                       str(fake_cifar10_archive(tmp_path / "cifar10-jpeg.tar.gz")))
    return spec_from_dict({
        "name": name, "data": {"source": "cifar10", "train_size": 16, "test_size": 8},
        "input_size": 32, "models": [{"name": "mcunet-5fps", "weights": "imagenet"}],
        "devices": [{"name": "stm32f746", "budgets": [budget]}], "seeds": [0],
        "cost": {"memory_measure": "peak"}, **fields}, path=tmp_path / f"{name}.yaml")


def test_dynamic_methods_replan_during_training(tmp_path: Path, monkeypatch) -> None:
    """search-dynamic re-plans by the search on Fisher scores, neq-dynamic by the neq selector on
    velocities: both train for real and record each re-selection, under the cell's budget.
    (On a stand-in CIFAR-10 archive, so that the test needs neither ../shared nor a network.)"""
    from budgetsearch.studies import CellContext, cell_plan
    from budgetsearch.studies.adapters import _train

    spec = _fake_cifar_spec(
        tmp_path, monkeypatch, name="dyn", budget="40KB",
        methods=["search-dynamic", "neq-dynamic"],
        training={"epochs": 4, "batch_size": 8, "lr": 0.01,
                  "options": {"search_trials": 20, "fisher_samples": 8}},
        scores={"fisher_samples": 8, "micro_batch": 8},
        search={"trials": 20, "population_size": 6})
    history = {}
    for cell in spec.cells():
        assert (cell.method.dynamic, cell.method.replan_method) == {
            "search-dynamic": ("fisher", "search"), "neq-dynamic": ("neq", "selector")}[
            cell.method.name]
        ctx = CellContext(cell, out_dir=tmp_path / cell.id)
        plan = cell_plan(cell, ctx)
        doc = _train(cell, plan, ctx)
        assert doc["config"]["replan_method"] == cell.method.replan_method
        history[cell.method.name] = doc["dynamic"]
    search = history["search-dynamic"]  # re-plans after epochs 1, 2 and 3
    assert [h["epoch"] for h in search] == [1, 2, 3] and all(
        h["action"] == "replanned" and h["why"].startswith("search") for h in search)
    neq = history["neq-dynamic"]  # velocities exist from the third record (after epoch 2) on
    assert [h["action"] for h in neq] == ["kept", "replanned", "replanned"]
    assert all(h["why"].startswith("neq") for h in neq[1:])


def test_a_methods_filter_mode_is_recorded_in_its_plans(tmp_path: Path) -> None:
    seen = {}

    def train(cell, plan, ctx):
        seen[cell.method.name] = plan.filter_mode
        return fake_train(cell, plan, ctx)

    spec = _spec(tmp_path, methods=[{"name": "a", "method": "tinytl",
                                     "filter_mode": "corrected"},
                                    {"name": "b", "method": "last-k"}], seeds=[0])
    run_study(spec, plan_fn=fake_plan, train_fn=train, progress=False, out=io.StringIO())
    assert seen == {"a": "corrected", "b": "normalized"}
    for cell in spec.cells():
        saved = json.loads((spec.cells_dir / cell.id / "plan.json").read_text())
        assert saved["filter_mode"] == seen[cell.method.name]


def test_cell_plan_is_the_plan_run_cell_trains_filter_mode_included(tmp_path: Path,
                                                                     monkeypatch) -> None:
    from budgetsearch.studies import CellContext, cell_plan

    spec = _fake_cifar_spec(
        tmp_path, monkeypatch, name="modes", budget="400KB",
        methods=[{"name": "gf", "method": "last-k",
                  "options": {"k": 2, "blocks": True, "patch_size": 2},
                  "filter_mode": "corrected"},
                 {"name": "plain", "method": "last-k", "options": {"k": 2}}],
        training={"epochs": 1, "batch_size": 8, "lr": 0.01})
    for cell in spec.cells():
        plan = cell_plan(cell, CellContext(cell, out_dir=tmp_path / cell.id))
        assert plan.filter_mode == {"gf": "corrected", "plain": "normalized"}[cell.method.name]
        if cell.method.name == "gf":
            assert {u.patch_size for u in plan.updates.values()} - {1} == {2}
