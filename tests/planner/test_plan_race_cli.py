"""``budgetsearch plan --effort standard``: contributions, search, race; the plan carries the
recipe it won with and ``train --plan`` uses it, checking the budget at the device's batch."""

from __future__ import annotations

import json

import pytest
import torch

from budgetsearch._threads import cpu_kernels
from budgetsearch.cli import main
from budgetsearch.plan import load_plan

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _plan(images, out, *extra, folds="1"):
    """The plan command on the 20 test images (16 training, 4 validation); the race on the
    validation split as it is unless ``folds`` is None (the default rule: cross-validated)."""
    return ["plan", "--model", "mcunet-5fps", "--num-classes", "2", "--input-size", "32",
            "--device", "stm32h743", "--data", str(images), "--candidates", "last:2",
            "--budget", "64KB", "--memory-measure", "training", "--trials", "40",
            "--population", "16", "--lrs", "0.01,0.05", "--no-progress", "--out", str(out),
            *(() if folds is None else ("--race-folds", folds)), *extra]


def test_standard_effort_races_and_the_plan_carries_its_recipe(images, tmp_path, capsys):
    """The race on the validation split without its cross-validated final first (the final
    is tested at the end, continuing the same race file)."""
    out = tmp_path / "plan.json"
    assert main(_plan(images, out, "--race-final", "0")) == 0
    printed = capsys.readouterr().out
    plan = load_plan(out)
    race = plan.provenance["race"]
    assert plan.provenance["effort"] == "standard"
    # the data set has 20 images: all of them, 4 held out for validation
    assert "validation accuracy on 4 held-out images" in printed
    # the shipped profiles carry no measured latency model, and plan says which one it used
    assert "latency model: analytic" in printed
    assert plan.predicted["latency_model"].startswith("analytic")
    # the grid, and the rates beyond its edges the leaders' best rates led to (the effort's
    # bound: 2 steps each side; every added rate recorded with its reason)
    ext = race["lr_extension"]
    assert ext["grid"] == [0.01, 0.05] and ext["max_steps"] == 2
    assert race["rungs"][0]["extended"] == ext["added"]
    raced = {0.01, 0.05} | {a["lr"] for a in ext["added"]}
    assert {a["lr"] for a in race["rungs"][0]["arms"]} == raced
    assert raced <= {0.0004, 0.002, 0.01, 0.05, 0.25, 1.25}
    assert ("beyond the rate grid" in printed) == bool(ext["added"])
    assert plan.recipe is not None and plan.recipe.lr in raced
    assert plan.recipe.epochs == 4 and plan.recipe.batch_size == 32
    assert plan.recipe.optimizer == plan.optimizer
    # the winner is the best arm of the last rung, and the plan is the winner's updates
    final = race["rungs"][-1]["arms"]
    assert final[0]["candidate"] == race["winner"] and final[0]["lr"] == plan.recipe.lr
    assert final[0]["val_accuracy"] == max(a["val_accuracy"] for a in final)
    names = {c["name"] for c in race["candidates"]}
    aliases = {a for c in race["candidates"] for a in c["aliases"]}
    assert {"classifier", "tinytl", "mit-scheme 49KB"} <= names | aliases
    assert any(n.startswith("search#") for n in names)
    winner = next(c for c in race["candidates"] if c["name"] == race["winner"])
    assert winner["memory_bytes"] <= 64 * 1024 and plan.provenance["memory_bytes"] <= 64 * 1024
    assert plan.provenance["method"] == ("search" if winner["source"] == "search"
                                         else winner["name"])
    assert race["margin"]["baseline"] in names
    sep = race["separation"]
    assert sep["val_images"] == 4 and sep["runner_up"] in names
    assert ("the race could not separate" in printed) == (not sep["clear"])
    assert "val acc" in printed and ("beat the best baseline" in printed
                                     or "a baseline won the race" in printed)
    # the rates to train it at: the one it won with first, then its other raced rates
    lrs = race["winner_lrs"]
    assert lrs[0] == plan.recipe.lr and len(set(lrs)) == len(lrs)
    assert set(lrs) == {a["lr"] for a in race["rungs"][0]["arms"]
                        if a["candidate"] == race["winner"]}
    (hint,) = [line for line in printed.splitlines() if line.startswith("train it once")]
    assert "(" + ", ".join(f"{x:g}" for x in lrs) + ")" in hint
    command = hint.split(": budgetsearch ", 1)[1].split()
    first_arms = race["arms_trained"]
    assert first_arms == sum(len(r["arms"]) for r in race["rungs"])
    # every arm trained here, at this process's thread count; the summary line says it
    threads = torch.get_num_threads()
    assert race["threads"] == [threads] and race["kernels"] == [cpu_kernels()]
    (line,) = [x for x in printed.splitlines() if x.startswith("race: ")]
    assert f" s, {threads} thread" in line and f", {cpu_kernels()})" in line

    # the same command again: the study and the race are found, nothing is retrained
    assert main(_plan(images, out, "--race-final", "0")) == 0
    again = load_plan(out)
    assert again.provenance["race"]["arms_trained"] == 0
    assert again.updates == plan.updates and again.recipe == plan.recipe

    # train --plan uses the recipe; the budget is checked at the plan's batch size
    code = main(["train", "--plan", str(out), "--model", "mcunet-5fps", "--num-classes", "2",
                 "--data", str(images), "--out", str(tmp_path / "run"), "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"lr {plan.recipe.lr:g}" in printed.out and "from the plan's recipe" in printed.out
    assert "at the plan's batch size 1 (the device's; the recipe trains at 32 here)" in (
        printed.out)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == plan.recipe.epochs
    # the command plan printed trains it at each of those rates and keeps one
    command[command.index("DIR")] = str(tmp_path / "lrs")
    assert main([*command, "--epochs", "1", "--no-progress"]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "lrs" / "lrs.json").read_text())
    assert set(summary["runs"]) | set(summary["diverged"]) == {f"{x:g}" for x in lrs}
    # without the extension: the same race file (the bound is not part of its key), only the
    # grid's rates raced, nothing of the first rung retrained
    assert main(_plan(images, out, "--lr-extensions", "0", "--race-final", "0")) == 0
    grid_only = load_plan(out).provenance["race"]
    assert grid_only["lr_extension"]["added"] == [] and "extended" not in grid_only["rungs"][0]
    assert {a["lr"] for a in grid_only["rungs"][0]["arms"]} == {0.01, 0.05}
    assert grid_only["arms_trained"] <= len(grid_only["rungs"][1]["arms"])
    capsys.readouterr()

    # the default: the same race (its file continued) and then the cross-validated final, the
    # best arm of each of the last rung's 4 best candidates on 5 folds of the 20 images
    assert main(_plan(images, out)) == 0
    printed = capsys.readouterr().out
    with_final = load_plan(out).provenance["race"]
    last, final = with_final["rungs"][-2], with_final["rungs"][-1]
    assert final["final"] and final["folds"] == 5 and final["val_images"] == 20
    # the last rung as it was, but for which arms went on
    assert [{**a, "kept": None} for a in last["arms"]] == [
        {**a, "kept": None} for a in race["rungs"][-1]["arms"]]
    best_arms: list[tuple[str, float]] = []
    for a in last["arms"]:
        if a["candidate"] not in {c for c, _lr in best_arms}:
            best_arms.append((a["candidate"], a["lr"]))
    assert {(a["candidate"], a["lr"]) for a in final["arms"]} == set(best_arms[:4])
    assert [(a["candidate"], a["lr"]) for a in last["arms"] if a["kept"]] == best_arms[:4]
    assert with_final["arms_trained"] == 5 * len(final["arms"])  # only the final trained
    assert final["arms"][0]["kept"] and final["arms"][0]["candidate"] == with_final["winner"]
    assert with_final["separation"]["val_images"] == 20
    assert "the final cross-validated the 4 best candidates" in printed
    assert load_plan(out).recipe.lr == final["arms"][0]["lr"]
    with pytest.raises(SystemExit):
        main(_plan(images, tmp_path / "bad.json", "--race-final", "1"))
    assert "--race-final: must be 0 (no final) or an integer from 2 to 20" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(_plan(images, tmp_path / "bad.json", "--lr-extensions", "9"))
    assert "--lr-extensions: must be a non-negative integer from 0 to 8" in (
        capsys.readouterr().err)


def test_a_small_validation_split_is_cross_validated_by_default(images, tmp_path, capsys):
    """4 validation images (< 200): the race deals the 20 images into folds of 4 (5 folds),
    trains every arm once per fold and scores it on all 20; the files remember every fold, so
    the same command again trains nothing. The first run trains at another thread count
    (``--threads``, restored after), which the race file keeps for the run that reads it."""
    out = tmp_path / "plan.json"
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    assert main(_plan(images, out, "--lr-extensions", "0", "--threads", str(other),
                      folds=None)) == 0
    assert torch.get_num_threads() == before
    printed = capsys.readouterr().out
    race = load_plan(out).provenance["race"]
    assert race["threads"] == [other]
    assert f" s, {other} thread{'s' * (other != 1)}, {cpu_kernels()}); study" in printed
    assert race["folds"] == 5 and race["val_images"] == 20
    assert race["separation"]["val_images"] == 20
    arms = sum(len(r["arms"]) for r in race["rungs"])
    assert race["arms_trained"] == 5 * arms
    assert "validation accuracy on 20 images, 5-fold cross-validated" in printed
    assert "the race cross-validated every arm on 5 folds" in printed
    assert f"{arms} arms x 5 folds over" in printed
    assert main(_plan(images, out, "--lr-extensions", "0", folds=None)) == 0
    again = load_plan(out).provenance["race"]
    assert again["arms_trained"] == 0 and again["threads"] == [other]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(_plan(images, tmp_path / "bad.json", "--threads", "0"))
    assert "--threads: must be a positive integer from 1 to 1,024, got 0" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(_plan(images, tmp_path / "bad.json", folds="0"))
    assert "--race-folds: must be" in capsys.readouterr().err


def test_effort_rules_are_named_errors(images, tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = ["plan", "--model", "mcunet-5fps", "--num-classes", "2", "--input-size", "32",
            "--device", "stm32h743", "--budget", "64KB", "--out", str(out), "--no-progress"]
    assert main([*argv, "--scores", "none.npz", "--effort", "standard"]) == 2
    assert "--effort standard trains the candidate plans on --data" in capsys.readouterr().err
    assert main([*argv, "--data", str(images), "--lrs", "0.1,x"]) == 2
    assert "--lrs 0.1,x: give distinct learning rates" in capsys.readouterr().err
    assert not out.exists()


def test_with_a_database_storage_contributions_and_race_live_in_it(images, tmp_path, capsys):
    """`plan --storage URL` on several machines: the study, the contribution table and the
    race all live in that database, so a second process with the same arguments trains
    nothing again."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    out = tmp_path / "plan.json"
    assert main(_plan(images, out, "--storage", url)) == 0
    first = load_plan(out)
    assert first.provenance["race"]["file"] is None
    assert first.provenance["race"]["arms_trained"] > 0
    rows = sa.create_engine(url).connect().execute(sa.text(
        "select study, count(*) from budgetsearch_study_cells group by study")).all()
    kinds = sorted(name.split(":")[0] for name, _n in rows)
    assert kinds == ["contrib", "race"]
    assert not (tmp_path / "cache" / "contrib").exists()  # nothing in the user cache
    other = tmp_path / "elsewhere.json"
    assert main(_plan(images, other, "--storage", url)) == 0
    again = load_plan(other)
    assert again.provenance["race"]["arms_trained"] == 0 and again.updates == first.updates
    capsys.readouterr()
