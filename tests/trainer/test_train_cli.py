"""``budgetsearch train`` end to end on a tiny registered model and a synthetic image folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _toys import small_cnn
from PIL import Image
from torch import nn

from budgetsearch.cli import main
from budgetsearch.graph import LayerGraph
from budgetsearch.models import register_model
from budgetsearch.plan import LayerUpdate, Plan

torch.set_num_threads(1)
NAME = "tiny-train-cli"


def build() -> nn.Module:
    return small_cnn(1000, seed=None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    register_model(NAME, build, replace=True)
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b")):
        (root / "flat" / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.full((12, 12, 3), 40, dtype=np.uint8)
            pixels[..., c] = 200
            noisy = np.clip(pixels + rng.normal(0, 30, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / "flat" / name / f"{i}.png")
    model = build()
    model[-1] = nn.Linear(8, 2)
    graph = LayerGraph.from_model(model, input_size=12, model_name=NAME)
    plan = Plan.from_layers(graph, {"3": LayerUpdate("weight", channels=(0, 2)),
                                    "7": LayerUpdate("weight")}, batch_size=4)
    plan.save(root / "plan.json")
    return root


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_then_resume_for_more_epochs(setup, capsys):
    root = setup
    args = ["train", "--model", NAME, "--plan", str(root / "plan.json"), "--data",
            str(root / "flat"), "--lr", "0.05", "--seed", "1", "--threads", "1",
            "--no-progress", "--out", str(root / "run")]
    code, out, err = run(capsys, *args, "--epochs", "1")
    assert code == 0, err
    assert "on 16 images of 2 classes, validating on 4" in out and "final val accuracy" in out
    code, out, err = run(capsys, *args, "--epochs", "2")
    assert code == 2 and "already holds checkpoints" in err
    code, out, err = run(capsys, *args, "--epochs", "2", "--resume")
    assert code == 0, err
    doc = json.loads((root / "run" / "metrics.json").read_text())
    assert doc["status"] == "completed" and [r["epoch"] for r in doc["epochs"]] == [1, 2]


def test_head_mismatch_is_a_clear_error(setup, capsys):
    root = setup
    code, _, err = run(capsys, "train", "--model", NAME, "--num-classes", "5", "--plan",
                       str(root / "plan.json"), "--data", str(root / "flat"), "--epochs", "1",
                       "--no-progress", "--out", str(root / "bad"))
    assert code == 2
    assert "error:" in err and ("another model" in err or "num_classes=2" in err)
    assert "Traceback" not in err


def test_the_plans_recipe_is_used_unless_told_otherwise(setup, capsys):
    from budgetsearch.plan import load_plan
    from budgetsearch.recipe import Recipe

    root = setup
    plan = load_plan(root / "plan.json")
    with_recipe = plan.with_(recipe=Recipe(optimizer="sgd", lr=0.03, epochs=2, batch_size=4,
                                           seed=5))
    with_recipe.save(root / "recipe-plan.json")
    assert load_plan(root / "recipe-plan.json").recipe == with_recipe.recipe
    args = ["train", "--model", NAME, "--plan", str(root / "recipe-plan.json"), "--data",
            str(root / "flat"), "--threads", "1", "--no-progress"]
    code, out, err = run(capsys, *args, "--out", str(root / "recipe-run"))
    assert code == 0, err
    assert "sgd lr 0.03" in out and "from the plan's recipe: " in out
    doc = json.loads((root / "recipe-run" / "metrics.json").read_text())
    assert len(doc["epochs"]) == 2 and doc["config"]["seed"] == 5
    code, out, err = run(capsys, *args, "--lr", "0.01", "--epochs", "1",
                         "--out", str(root / "recipe-run2"))
    assert code == 0, err
    assert "sgd lr 0.01" in out
    assert json.loads((root / "recipe-run2" / "metrics.json").read_text())["config"]["lr"] == 0.01
    code, _, err = run(capsys, "train", "--model", NAME, "--plan", str(root / "plan.json"),
                       "--data", str(root / "flat"), "--no-progress", "--out",
                       str(root / "norecipe"))
    assert code == 2 and "carries no recipe: give --epochs" in err


def test_a_bad_recipe_in_a_plan_file_is_named(setup, tmp_path):
    from budgetsearch.errors import PlanError
    from budgetsearch.plan import load_plan

    doc = json.loads((setup / "plan.json").read_text())
    doc["recipe"] = {"lr": 0.1, "warmup": 3}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=r"field recipe: Additional properties .*'warmup'"):
        load_plan(tmp_path / "p.json")
    doc["recipe"] = {"lr": -1}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=r"field recipe\.lr"):
        load_plan(tmp_path / "p.json")
    # a seed the batch-order generator overflows on (it crashed the first epoch)
    doc["recipe"] = {"lr": 0.1, "seed": 2**50}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=r"field recipe\.seed"):
        load_plan(tmp_path / "p.json")
    from budgetsearch.recipe import MAX_SEED, Recipe

    with pytest.raises(PlanError, match=rf"seed.* from 0 to {MAX_SEED}"):
        Recipe(seed=MAX_SEED + 1)
    assert Recipe(seed=MAX_SEED).seed == MAX_SEED


def test_lrs_trains_once_per_rate_and_keeps_the_best_on_validation(setup, capsys):
    from budgetsearch.trainer.metrics import validation_key

    root = setup
    args = ["train", "--model", NAME, "--plan", str(root / "plan.json"), "--data",
            str(root / "flat"), "--epochs", "1", "--seed", "1", "--threads", "1",
            "--no-progress"]
    code, out, err = run(capsys, *args, "--lrs", "0.001", "0.3", "--out", str(root / "lrs"))
    assert code == 0, err
    assert "sgd lr 0.001, 0.3" in out
    docs = {lr: json.loads((root / "lrs" / f"lr-{lr}" / "metrics.json").read_text())
            for lr in ("0.001", "0.3")}
    assert {d["config"]["lr"] for d in docs.values()} == {0.001, 0.3}
    # the same head and batch order for every rate: a rate alone sets them apart
    single = ["--lr", "0.3", "--out", str(root / "lrs-single")]
    assert run(capsys, *args, *single)[0] == 0
    alone = json.loads((root / "lrs-single" / "metrics.json").read_text())
    assert alone["epochs"][0]["val_loss"] == docs["0.3"]["epochs"][0]["val_loss"]
    summary = json.loads((root / "lrs" / "lrs.json").read_text())
    assert validation_key(docs["0.001"]) != validation_key(docs["0.3"])  # a real choice
    best = max(docs, key=lambda lr: (*validation_key(docs[lr]), -float(lr)))
    assert summary["chosen"] == {"lr": float(best), "dir": f"lr-{best}"}
    assert set(summary["runs"]) == {"0.001", "0.3"}
    assert f"kept lr {best}" in out
    # both at once, or a rate twice, is refused before anything trains
    code, _, err = run(capsys, *args, "--lr", "0.1", "--lrs", "0.1", "0.2", "--out",
                       str(root / "bad-lrs"))
    assert code == 2 and "give --lr or --lrs, not both" in err
    code, _, err = run(capsys, *args, "--lrs", "0.1", "0.1", "--out", str(root / "bad-lrs"))
    assert code == 2 and "each rate once" in err
    assert not (root / "bad-lrs").exists()


def test_validation_key_ranks_accuracy_then_loss():
    from budgetsearch.trainer.metrics import validation_key

    trainer_doc = {"best_val_accuracy": 0.5, "best_epoch": 2,
                   "epochs": [{"epoch": 1, "val_loss": 0.1}, {"epoch": 2, "val_loss": 0.7}]}
    runner_doc = {"best_accuracy": 0.5, "val_loss": 0.6}
    assert validation_key(trainer_doc) == (0.5, -0.7)  # the best epoch's loss
    assert validation_key(runner_doc) > validation_key(trainer_doc)
    assert validation_key({"best_accuracy": 0.6, "val_loss": float("nan")}) > validation_key(
        runner_doc)
    assert validation_key({"best_accuracy": 0.6, "val_loss": float("nan")})[1] == float("-inf")
    assert validation_key({}) == (-1.0, float("-inf"))


def test_lrs_leaves_out_a_rate_that_diverges(setup, capsys, monkeypatch):
    from budgetsearch.errors import TrainingError
    from budgetsearch.trainer import Trainer

    fit = Trainer.fit

    def diverging(self, **kwargs):
        if self.lr == 0.3:
            raise TrainingError("the training loss became nan", epoch=1, step=2)
        return fit(self, **kwargs)

    monkeypatch.setattr(Trainer, "fit", diverging)
    root = setup
    args = ["train", "--model", NAME, "--plan", str(root / "plan.json"), "--data",
            str(root / "flat"), "--epochs", "1", "--threads", "1", "--no-progress"]
    code, out, err = run(capsys, *args, "--lrs", "0.3", "0.01", "--out", str(root / "div"))
    assert code == 0, err
    summary = json.loads((root / "div" / "lrs.json").read_text())
    assert summary["chosen"]["lr"] == 0.01 and set(summary["runs"]) == {"0.01"}
    assert "loss became nan" in summary["diverged"]["0.3"]
    assert "lr 0.3: not kept" in out
    code, _, err = run(capsys, *args, "--lrs", "0.3", "--out", str(root / "div-all"))
    assert code == 2 and "every rate of --lrs diverged" in err
    # a run directory in the way is not a divergence: it stops the command
    code, _, err = run(capsys, *args, "--lrs", "0.3", "0.01", "--out", str(root / "div"))
    assert code == 2 and "already holds checkpoints" in err


def test_lrs_without_rates_takes_the_rates_the_plans_race_tried(setup, capsys, tmp_path):
    from budgetsearch.plan import load_plan

    root = setup
    plan = load_plan(root / "plan.json")
    raced = plan.with_(provenance={**plan.provenance, "race": {
        "winner": "last-k", "lr": 0.3, "winner_lrs": [0.3, 0.001]}})
    raced.save(tmp_path / "raced.json")
    args = ["train", "--model", NAME, "--data", str(root / "flat"), "--epochs", "1",
            "--threads", "1", "--no-progress"]
    code, out, err = run(capsys, *args, "--plan", str(tmp_path / "raced.json"), "--lrs",
                         "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "sgd lr 0.3, 0.001" in out
    assert set(json.loads((tmp_path / "run" / "lrs.json").read_text())["runs"]) == {
        "0.3", "0.001"}
    # a plan that was not raced, or whose record is malformed, is named with what to give
    code, _, err = run(capsys, *args, "--plan", str(root / "plan.json"), "--lrs",
                       "--out", str(tmp_path / "none"))
    assert code == 2 and "plan.json: --lrs without rates" in err and "not raced" in err
    assert "e.g. --lrs 0.00667 0.02 0.06" in err
    for bad in ([], [0.1, 0.1], [0.1, -1], ["0.1"], 0.1):
        plan.with_(provenance={**plan.provenance, "race": {"winner_lrs": bad}}).save(
            tmp_path / "bad.json")
        code, _, err = run(capsys, *args, "--plan", str(tmp_path / "bad.json"), "--lrs",
                           "--out", str(tmp_path / "bad"))
        assert code == 2 and "bad.json: provenance.race.winner_lrs must be" in err, bad
    assert not (tmp_path / "none").exists() and not (tmp_path / "bad").exists()
