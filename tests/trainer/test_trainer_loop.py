"""The Trainer on a tiny synthetic ImageFolder: files, determinism, resume, NaN, bad input."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from budgetsearch._threads import cpu_kernels
from budgetsearch.budget import Budget
from budgetsearch.cost import CostModel
from budgetsearch.data import load_dataset
from budgetsearch.errors import BudgetError, DataError, PlanError
from budgetsearch.graph import LayerGraph
from budgetsearch.plan import LayerUpdate, Plan
from budgetsearch.profiles import load_profile
from budgetsearch.search import replan
from budgetsearch.trainer import Trainer, TrainingError, active_plan, list_checkpoints

torch.set_num_threads(1)
SIZE, CLASSES = 16, ("cat", "dog", "fox")
TIMING = {"images_per_s", "epoch_s", "step_ms", "forward_ms", "backward_ms"}


class Tiny(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
            nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        )
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x).mean((2, 3))))


def tiny(num_classes: int = 3) -> tuple[Tiny, LayerGraph]:
    torch.manual_seed(0)
    model = Tiny(num_classes)
    return model, LayerGraph.from_model(model, input_size=SIZE, model_name="tiny")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("val", 4)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                base = np.zeros((SIZE, SIZE, 3))
                base[..., c] = 160
                pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def splits(folder):
    kw = {"image_size": SIZE, "normalization": "imagenet"}
    return load_dataset(folder, split="train", **kw), load_dataset(folder, split="val", **kw)


def sparse_plan(graph: LayerGraph, **kw) -> Plan:
    return Plan.from_layers(graph, {"features.3": LayerUpdate("bias"),
                                    "features.6": LayerUpdate("weight", channels=(0, 3, 5, 9)),
                                    "head": LayerUpdate("weight")}, **kw)


def trainer(splits, out, *, model=None, plan=None, epochs=2, **kw) -> Trainer:
    if model is None:
        model, graph = tiny()
        plan = plan or sparse_plan(graph)
    train, val = splits
    kw.setdefault("lr", 0.05)
    kw.setdefault("seed", 3)
    kw.setdefault("threads", 1)
    return Trainer(model, plan, train_data=train, val_data=val, epochs=epochs, batch_size=8,
                   optimizer="momentum", out_dir=out, progress=False, **kw)


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_two_epochs_write_metrics_checkpoints_and_weights(splits, tmp_path):
    doc = trainer(splits, tmp_path).fit()
    assert doc["status"] == "completed" and len(doc["epochs"]) == 2
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["status"] == "completed"
    for key in ("best_val_accuracy", "best_epoch", "final_val_accuracy", "images_per_s",
                "saved_activation_bytes", "backward_ms"):
        assert saved[key] is not None, key
    row = saved["epochs"][-1]
    assert 0.0 <= row["val_accuracy"] <= 1.0 and row["train_loss"] > 0
    assert row["saved_activation_bytes"] > 0 and row["backward_ms"] > 0
    assert row["trainable_params"] == 4 * 8 + 16 + 8 + 16 * 3 + 3
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"] and "val_accuracy" in rows[0]
    assert list_checkpoints(tmp_path / "checkpoints") == [1, 2]
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "plan.json").is_file()


def test_same_seed_gives_identical_metrics(splits, tmp_path):
    a = trainer(splits, tmp_path / "a").fit()
    b = trainer(splits, tmp_path / "b").fit()
    assert strip(a["epochs"]) == strip(b["epochs"])
    c = trainer(splits, tmp_path / "c", seed=4).fit()
    assert strip(c["epochs"]) != strip(a["epochs"])


def test_resume_after_a_kill_continues_from_the_checkpoint(splits, tmp_path):
    full = trainer(splits, tmp_path / "full", epochs=3).fit()
    model, graph = tiny()
    calls = {"n": 0}

    def kill(module, args, out):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 2 * 4 + 2:  # 4 steps per epoch: in the middle of epoch 3
                raise KeyboardInterrupt

    hook = model.register_forward_hook(kill)
    run = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        trainer(splits, run, model=model, plan=sparse_plan(graph), epochs=3).fit()
    hook.remove()
    assert active_plan(model) is None and isinstance(model.head, nn.Linear)
    assert list_checkpoints(run / "checkpoints") == [1, 2]
    assert json.loads((run / "metrics.json").read_text())["status"] == "running"
    fresh, graph = tiny()
    with torch.no_grad():
        fresh.head.weight.add_(1.0)  # the checkpoint's weights must replace these
    resumed = trainer(splits, run, model=fresh, plan=sparse_plan(graph), epochs=3).fit(
        resume=True)
    assert resumed["status"] == "completed"
    assert strip(resumed["epochs"]) == strip(full["epochs"])


def test_a_resume_past_a_damaged_checkpoint_sets_it_aside_and_keeps_its_own(splits, tmp_path):
    full = trainer(splits, tmp_path / "full", epochs=3).fit()
    run = tmp_path / "run"
    trainer(splits, run, epochs=2).fit()
    (run / "checkpoints" / "epoch-0002.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"set aside the damaged checkpoint .*epoch-0002\.json"):
        resumed = trainer(splits, run, epochs=3).fit(resume=True)
    assert strip(resumed["epochs"]) == strip(full["epochs"])  # from epoch 1, as if unbroken
    assert list_checkpoints(run / "checkpoints") == [2, 3]
    assert (run / "checkpoints" / "epoch-0002.json.set-aside").exists()


def test_epochs_record_their_threads_and_kernels_and_a_resume_under_others_warns(
        splits, tmp_path):
    first = trainer(splits, tmp_path, epochs=1).fit()
    assert [(r["threads"], r["kernels"]) for r in first["epochs"]] == [(1, cpu_kernels())]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same configuration: no warning
        same = trainer(splits, tmp_path, epochs=2).fit(resume=True)
    assert [r["threads"] for r in same["epochs"]] == [1, 1]
    with pytest.warns(UserWarning, match=(
            r"resuming a run whose epoch\(s\) 1, 2 trained with 1 thread\(s\) on "
            r"aten=.*; this process trains with 2 thread\(s\)")):
        mixed = trainer(splits, tmp_path, epochs=3, threads=2).fit(resume=True)
    assert [r["threads"] for r in mixed["epochs"]] == [1, 1, 2]
    assert torch.get_num_threads() == 1  # the trainer put the caller's count back


def test_an_error_in_training_is_recorded_as_failed_and_the_model_restored(splits, tmp_path):
    """An exception other than an interrupt or a divergence leaves metrics.json saying
    ``failed`` and why (an interrupt leaves ``running``: the run resumes), and the plan removed."""
    model, graph = tiny()

    def broken(module, args, out):
        if module.training:
            raise ValueError("a broken batch")

    hook = model.register_forward_hook(broken)
    with pytest.raises(ValueError, match="a broken batch"):
        trainer(splits, tmp_path, model=model, plan=sparse_plan(graph)).fit()
    hook.remove()
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["status"] == "failed" and doc["reason"] == "ValueError: a broken batch"
    assert active_plan(model) is None and isinstance(model.head, nn.Linear)


def test_a_resume_refuses_other_settings_and_takes_a_new_rate(splits, folder, tmp_path):
    """A resumed run must train as its checkpoint did: another optimizer, seed or plan is a
    named error (nothing trained); a new learning rate is allowed (a diverged run resumes at a
    lower one), said in a warning, used by the optimizer and recorded in each epoch row."""
    trainer(splits, tmp_path, epochs=1).fit()
    with pytest.raises(TrainingError, match=r"epoch-0001\.json: the checkpoint was trained with "
                                            r"optimizer 'momentum' \(this run: 'adam'\); seed 3 "
                                            r"\(this run: 4\); resume with the same settings"):
        model, graph = tiny()
        Trainer(model, sparse_plan(graph), train_data=splits[0], val_data=splits[1], epochs=2,
                batch_size=8, optimizer="adam", lr=0.05, seed=4, threads=1, out_dir=tmp_path,
                progress=False).fit(resume=True)
    larger = tuple(load_dataset(folder, split=split, image_size=24, normalization="imagenet")
                   for split in ("train", "val"))  # a gradient filter planned at 16 px, say
    with pytest.raises(TrainingError, match=r"input_size \[16, 16\] \(this run: \[24, 24\]\)"):
        trainer(larger, tmp_path, epochs=2).fit(resume=True)
    model, graph = tiny()
    other = Plan.from_layers(graph, {"head": LayerUpdate("weight")})
    with pytest.raises(TrainingError, match="another plan"):
        trainer(splits, tmp_path, model=model, plan=other, epochs=2).fit(resume=True)
    assert list_checkpoints(tmp_path / "checkpoints") == [1]  # nothing trained meanwhile
    seen = []
    real_step = torch.optim.SGD.step

    def step(self, *args, **kw):
        seen.append({g["lr"] for g in self.param_groups})
        return real_step(self, *args, **kw)

    torch.optim.SGD.step = step
    try:
        with pytest.warns(UserWarning, match="resuming a run trained at lr 0.05 at lr 0.01"):
            doc = trainer(splits, tmp_path, epochs=2, lr=0.01).fit(resume=True)
    finally:
        torch.optim.SGD.step = real_step
    assert [r["lr"] for r in doc["epochs"]] == [0.05, 0.01] and doc["config"]["lr"] == 0.01
    assert seen and all(rates == {0.01} for rates in seen)


def _strip_epoch_configurations(run) -> dict:
    """Strip the epoch rows of the run's first checkpoint, as written before epochs recorded their
    threads and kernels; returns the checkpoint's state, to be edited and written back."""
    path = run / "checkpoints" / "epoch-0001.json"
    state = json.loads(path.read_text())
    for row in state["epochs"]:
        row.pop("threads"), row.pop("kernels")
    return state


@pytest.mark.parametrize(("recorded", "warns"), [
    ({"threads": 1, "kernels": None}, False),  # nothing recorded: nothing to compare
    ({"threads": None, "kernels": "__here__"}, False),  # the same kernels, threads not set
    ({"threads": 1, "kernels": "aten=DEFAULT onednn=auto"}, True),  # other kernels, no cpu=
    ({"threads": 2, "kernels": "__here__"}, True),  # the same kernels, another thread count
])
def test_resuming_a_checkpoint_from_before_epochs_recorded_them_reads_its_config(
        splits, tmp_path, recorded, warns):
    trainer(splits, tmp_path, epochs=1).fit()
    state = _strip_epoch_configurations(tmp_path)
    here = cpu_kernels()
    kernels = recorded["kernels"]
    if kernels == "__here__":
        kernels = here
    state["config"].update(threads=recorded["threads"], kernels=kernels)
    (tmp_path / "checkpoints" / "epoch-0001.json").write_text(json.dumps(state))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doc = trainer(splits, tmp_path, epochs=2, threads=1).fit(resume=True)
    said = [str(w.message) for w in caught if "resuming a run whose" in str(w.message)]
    assert bool(said) is warns, said
    if warns:
        assert (f"epoch(s) 1 trained with {recorded['threads']} thread(s) on "
                f"{kernels}" in said[0])
    assert "kernels" not in doc["epochs"][0] and doc["epochs"][1]["kernels"] == here


def test_resuming_with_nothing_left_to_train_does_not_warn(splits, tmp_path):
    trainer(splits, tmp_path, epochs=1).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        doc = trainer(splits, tmp_path, epochs=1, threads=2).fit(resume=True)
    assert [r["threads"] for r in doc["epochs"]] == [1]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(splits, tmp_path):
    model, graph = tiny()
    calls = {"n": 0}

    def poison(module, args, out):
        if module.training:
            calls["n"] += 1
            if calls["n"] > 4 + 1:  # from the second step of epoch 2 on
                return out * float("nan")
        return None

    model.register_forward_hook(poison)
    with pytest.raises(TrainingError, match="became nan at epoch 2, step 2") as info:
        trainer(splits, tmp_path, model=model, plan=sparse_plan(graph)).fit()
    assert info.value.checkpoint is not None and info.value.checkpoint.name == "epoch-0001.json"
    assert list_checkpoints(tmp_path / "checkpoints") == [1]
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["status"] == "diverged" and "last good checkpoint" in doc["reason"]
    assert len(doc["epochs"]) == 1


def test_huge_learning_rate_diverges_with_a_named_error(splits, tmp_path):
    with pytest.raises(TrainingError, match="training loss became"):
        trainer(splits, tmp_path, lr=1e38, epochs=3).fit()


def test_bad_input_is_refused_before_training(splits, tmp_path):
    model, graph = tiny(num_classes=5)
    with pytest.raises(DataError, match=r"3 classes \(cat, dog, fox\).*5 outputs.*num_classes=3"):
        trainer(splits, tmp_path, model=model, plan=sparse_plan(graph))
    other, _ = tiny()
    with pytest.raises(PlanError, match="another model"):
        trainer(splits, tmp_path, model=other, plan=sparse_plan(graph))
    trainer(splits, tmp_path / "run", epochs=1).fit()
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        trainer(splits, tmp_path / "run", epochs=1).fit()


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("momentum", -0.5, r"momentum must be a finite number in \[0, 1\); got -0.5"),
    ("momentum", 1.0, r"momentum must be a finite number in \[0, 1\); got 1.0"),
    ("weight_decay", -1.0, r"weight_decay must be a finite number >= 0; got -1.0"),
    ("weight_decay", "x", r"weight_decay must be a finite number >= 0; got 'x'"),
    ("weight_decay", float("nan"), r"weight_decay must be a finite number >= 0; got nan"),
    ("filter_mode", "fast", r"filter_mode must be None \(the plan's\) or one of normalized, "),
])
def test_bad_settings_are_refused_before_the_plan_is_applied(splits, tmp_path, setting, value,
                                                             message):
    model, graph = tiny()
    with pytest.raises(PlanError, match=message):
        trainer(splits, tmp_path, model=model, plan=sparse_plan(graph), **{setting: value})
    assert active_plan(model) is None and not (tmp_path / "metrics.json").exists()


def test_the_budget_check_uses_the_accounting_the_plan_was_costed_with(splits, tmp_path):
    model, graph = tiny()
    plan = sparse_plan(graph, device="stm32h743", provenance={"accounting": "pytorch"})
    assert trainer(splits, tmp_path / "a", model=model, plan=plan).cost_model.acc.name == \
        "pytorch"
    model, graph = tiny()
    told = trainer(splits, tmp_path / "b", model=model, plan=plan, accounting="device")
    assert told.cost_model.acc.name == "device"
    model, graph = tiny()  # a plan from before the record: the device accounting
    assert trainer(splits, tmp_path / "c", model=model,
                   plan=sparse_plan(graph, device="stm32h743")).cost_model.acc.name == "device"


def test_plan_budget_exceeded_by_the_batch_size(splits, tmp_path):
    model, graph = tiny()
    plan = sparse_plan(graph, device="stm32h743", batch_size=1)
    need = CostModel(graph, load_profile("stm32h743"), batch_size=1, optimizer="momentum") \
        .summarize(dict(plan.updates)).peak_memory_bytes
    plan = plan.with_(memory_budget_bytes=int(need))
    with pytest.raises(BudgetError, match=r"batch size 8.*made for batch size 1"):
        trainer(splits, tmp_path, model=model, plan=plan)
    trainer(splits, tmp_path, model=model, plan=plan, check_budget=False)


DYNAMIC = [("neq", "selector"), ("fisher", "selector"), ("neq", "search"), ("fisher", "search")]


@pytest.mark.parametrize(("kind", "method"), DYNAMIC, ids=[f"{k}-{m}" for k, m in DYNAMIC])
def test_dynamic_modes_replan_under_the_budget(splits, tmp_path, kind, method):
    model, graph = tiny()
    plan = sparse_plan(graph, device="rpi4", batch_size=8, optimizer="momentum")
    need = CostModel(graph, load_profile("rpi4"), batch_size=8, optimizer="momentum") \
        .summarize(dict(plan.updates)).peak_memory_bytes
    plan = plan.with_(memory_budget_bytes=int(need * 1.02))
    doc = trainer(splits, tmp_path, model=model, plan=plan, epochs=4, dynamic=kind,
                  neq_probe_samples=6, fisher_samples=12, replan_method=method,
                  search_trials=20, search_replan=replan if method == "search" else None).fit()
    assert doc["config"]["replan_method"] == method
    assert doc["status"] == "completed"
    replanned = [r["epoch"] for r in doc["epochs"] if r["replanned"]]
    if kind == "neq":  # velocities exist after 3 records: before training, epochs 1 and 2
        assert [h["action"] for h in doc["dynamic"]][:1] == ["kept"]
        assert replanned == [2, 3]
    else:
        assert replanned == [1, 2, 3]
    final = Plan.from_json((tmp_path / "plan.json").read_text())
    assert final.provenance["dynamic"] == kind
    need = CostModel(graph, load_profile("rpi4"), batch_size=8, optimizer="momentum") \
        .summarize(dict(final.updates)).peak_memory_bytes
    assert need <= plan.memory_budget_bytes


def test_dynamic_neq_resumes_identically(splits, tmp_path):
    def run(out, *, kill_at=None, resume=False):
        model, graph = tiny()
        plan = sparse_plan(graph, device="rpi4", batch_size=8, optimizer="momentum")
        need = CostModel(graph, load_profile("rpi4"), batch_size=8, optimizer="momentum") \
            .summarize(dict(plan.updates)).peak_memory_bytes
        plan = plan.with_(memory_budget_bytes=int(need * 1.02))
        calls = {"n": 0}

        def kill(module, args, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == kill_at:
                    raise KeyboardInterrupt

        if kill_at:
            model.register_forward_hook(kill)
        t = trainer(splits, out, model=model, plan=plan, epochs=4, dynamic="neq",
                    neq_probe_samples=6, replan_method="selector")
        return t.fit(resume=resume)

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", kill_at=3 * 4 + 2)  # in epoch 4, after two re-plans
    resumed = run(tmp_path / "cut", resume=True)
    assert strip(resumed["epochs"]) == strip(full["epochs"])
    assert resumed["dynamic"] == full["dynamic"]


def test_test_data_is_reported_and_never_chooses_the_epoch(splits, tmp_path):
    from budgetsearch.data import split_validation
    from budgetsearch.trainer.metrics import summarize

    train, test = splits
    train, val = split_validation(train, fraction=0.3, seed=0)
    doc = trainer((train, val), tmp_path, epochs=3, test_data=test).fit()
    rows = doc["epochs"]
    assert all(0 <= r["test_accuracy"] <= 1 and r["test_loss"] > 0 for r in rows)
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["epoch"]))
    assert doc["best_epoch"] == best["epoch"]
    assert doc["test_accuracy_at_best_epoch"] == best["test_accuracy"]
    assert doc["final_test_accuracy"] == rows[-1]["test_accuracy"]
    assert doc["config"]["test_samples"] == len(test)
    # the best epoch follows validation even where test disagrees
    made = [{"epoch": 1, "val_accuracy": 0.5, "test_accuracy": 0.9},
            {"epoch": 2, "val_accuracy": 0.7, "test_accuracy": 0.1},
            {"epoch": 3, "val_accuracy": 0.7, "test_accuracy": 0.8}]
    s = summarize(made)
    assert (s["best_epoch"], s["test_accuracy_at_best_epoch"], s["final_test_accuracy"]) == (
        2, 0.1, 0.8)


def test_the_trainer_never_imports_the_search():
    """Data flows search -> plan -> trainer: re-planning by search is a function handed in."""
    import ast
    from pathlib import Path

    import budgetsearch.trainer as trainer_pkg
    from budgetsearch.trainer.dynamic import Replanner

    for path in Path(trainer_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert not target.startswith(("..search", "..planner", "budgetsearch.search")), (
                    f"{path.name} imports {target}")
    _model, graph = tiny()
    cm = CostModel(graph, load_profile("rpi4"))
    with pytest.raises(PlanError, match=r"pass search_replan=budgetsearch\.search\.replan"):
        Replanner("fisher", cost_model=cm, budget=Budget(memory_bytes=10**6), method="search",
                  fisher_batches=[(torch.zeros(1, 3, 8, 8), torch.zeros(1).long())])
    auto = Replanner("fisher", cost_model=cm, budget=Budget(memory_bytes=10**6),
                     fisher_batches=[(torch.zeros(1, 3, 8, 8), torch.zeros(1).long())])
    assert auto.method == "selector"
    batches = [(torch.zeros(1, 3, 8, 8), torch.zeros(1).long())]
    assert Replanner("fisher", cost_model=cm, budget=Budget(memory_bytes=10**6),
                     search_replan=replan, fisher_batches=batches).method == "search"
    with pytest.warns(DeprecationWarning, match="budget="):
        old = Replanner("fisher", cost_model=cm, budget_bytes=10**6, memory_measure="training",
                        fisher_batches=batches)
    assert old.budget == Budget(memory_bytes=10**6, measure="training")
    assert (old.budget_bytes, old.memory_measure) == (10**6, "training")
    with pytest.raises(PlanError, match="needs a memory budget"):
        Replanner("fisher", cost_model=cm, budget=Budget(latency_ms=5.0), fisher_batches=batches)
