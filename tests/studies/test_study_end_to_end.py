"""End to end through the command line: real selectors, search and trainer on a tiny study."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from budgetsearch._threads import cpu_kernels
from budgetsearch.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _image_folder(root: Path, *, per_class: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 128, (24, 24, 3)) + 120 * c  # separable classes
                Image.fromarray(pixels.astype(np.uint8)).save(d / f"{i}.png")
    return root


def test_tiny_study_runs_and_reports_through_the_cli(tmp_path: Path, capsys) -> None:
    data = _image_folder(tmp_path / "images", per_class={"train": 8, "test": 4})
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tiny",
        "data": {"name": "img", "source": str(data), "train_split": "train",
                 "val_fraction": 0.25},
        "input_size": 32,
        "models": [{"name": "mcunet-5fps", "weights": "imagenet"}],
        "devices": [{"name": "stm32f746", "budgets": ["1KB", "40KB"]}],
        "methods": ["tinytl", "search"],
        "seeds": [0],
        "training": {"epochs": 1, "batch_size": 8, "lr": 0.01},
        "cost": {"memory_measure": "peak"},
        "scores": {"fisher_samples": 8, "micro_batch": 8},
        "search": {"trials": 12, "population_size": 6},
    }))
    assert main(["study", "run", str(spec), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "study tiny: ran 2, failed 2" in out
    cells = tmp_path / "results" / "tiny" / "cells"
    recs = {p.stem: json.loads(p.read_text()) for p in cells.glob("*.json")}
    done = {k: r for k, r in recs.items() if r["status"] == "done"}
    assert {r["key"]["budget"] for r in done.values()} == {"40KB"}
    for r in done.values():
        assert r["memory_bytes"] <= 40 * 1024
        m = r["metrics"]
        assert 0 <= m["best_accuracy"] <= 1 and m["train_seconds"] > 0
        # validation carved out of the 16 training images, the 8 test images only reported
        assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["final_test_accuracy"] <= 1
        assert m["measured_saved_bytes"] > 0 and r["predicted_ops"]["saved_activation_bytes"] > 0
        assert not (cells / r["cell_id"] / "checkpoints").exists()  # artifacts dropped
    tinytl = next(r for r in done.values() if r["key"]["method"] == "tinytl")
    # the ops accounting at the training batch predicts what autograd kept, byte for byte
    assert (tinytl["metrics"]["measured_saved_bytes"]
            == tinytl["predicted_ops"]["saved_activation_bytes"])
    search = next(r for r in done.values() if r["key"]["method"] == "search")
    assert search["proxy"] > 0 and (cells / search["cell_id"] / "front.csv").is_file()
    failed = [r for r in recs.values() if r["status"] == "failed"]
    assert all(r["error"]["type"] == "BudgetError" and r["error"]["permanent"] for r in failed)

    assert main(["study", "run", str(spec), "--no-progress"]) == 0  # resumed: nothing to do
    assert "ran 0, failed 0, skipped 4" in capsys.readouterr().out
    assert main(["study", "report", str(spec)]) == 0
    res = tmp_path / "results" / "tiny"
    with (res / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    md = (res / "report.md").read_text()
    assert "budgetsearch study run" in md and "| 40KB | search | 1/1 |" in md
    assert "Saved activations, measured / predicted" in md
    assert len(list(res.glob("*.png"))) == 3


@pytest.mark.slow
def test_smoke_study_on_cifar10(tmp_path: Path) -> None:
    """The shipped smoke study (CIFAR-10; a few minutes on a loaded 2-core machine)."""
    spec = tmp_path / "smoke.yaml"
    shutil.copy(ROOT / "studies" / "smoke.yaml", spec)
    assert main(["study", "run", str(spec), "--no-progress"]) == 0
    assert main(["study", "report", str(spec)]) == 0
    md = (tmp_path / "results" / "smoke" / "report.md").read_text()
    assert "6 cells: 6 done" in md


def test_each_cell_starts_from_a_head_set_by_its_seed_alone(tmp_path: Path) -> None:
    import torch

    from budgetsearch.studies import CellContext, context, spec_from_dict

    spec = spec_from_dict({
        "name": "h", "data": {"source": "cifar10"}, "models": ["mcunet-5fps"],
        "devices": [{"name": "stm32f746", "budgets": ["64KB"]}],
        "methods": ["tinytl", "last-k"], "seeds": [0, 1]}, path=tmp_path / "h.yaml")
    heads = {}
    for cell in spec.cells():
        torch.manual_seed(1234 + len(heads))  # whatever ran before in the process
        context._MODELS.clear()  # load each time: the head must not depend on the RNG state
        ctx = CellContext(cell, out_dir=tmp_path / cell.id)
        ctx.__dict__["train_data"] = type("Data", (), {"classes": list("abc")})()
        heads[(cell.method.name, cell.seed)] = ctx.model.classifier.weight.detach().clone()
    assert torch.equal(heads[("tinytl", 0)], heads[("last-k", 0)])
    assert not torch.equal(heads[("tinytl", 0)], heads[("tinytl", 1)])


def test_a_raced_search_in_a_study_goes_through_the_planner(tmp_path: Path, capsys) -> None:
    """Method ``search`` with ``effort: standard``: contributions measured on the cell's carved
    training/validation data (one table for the study), the race (its rungs the study's
    ``race_rungs``), the winner trained."""
    data = _image_folder(tmp_path / "images", per_class={"train": 10, "test": 4})
    spec = tmp_path / "raced.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "raced",
        "data": {"name": "img", "source": str(data), "train_split": "train"},
        "input_size": 32,
        "models": [{"name": "mcunet-5fps", "weights": "imagenet"}],
        "devices": [{"name": "stm32f746", "budgets": ["40KB"]}],
        "methods": [{"method": "search", "options": {"effort": "standard",
                                                      "race_rungs": [1, 2]}}],
        "seeds": [0],
        "training": {"epochs": 1, "batch_size": 8, "lr": 0.01},
        "cost": {"memory_measure": "training"},
        "scores": {"fisher_samples": 8, "micro_batch": 8},
        "search": {"trials": 20, "population_size": 8},
    }))
    assert main(["study", "run", str(spec), "--no-progress"]) == 0, capsys.readouterr().err
    res = tmp_path / "results" / "raced"
    (rec,) = [json.loads(p.read_text()) for p in (res / "cells").glob("*.json")]
    assert rec["status"] == "done", rec.get("error")
    plan = rec["provenance"]
    assert plan["effort"] == "standard" and plan["race"]["winner"]
    # race_rungs replaced the effort's (2, 4); the recipe's epochs are the last rung's
    assert [r["epochs"] for r in plan["race"]["rungs"] if not r.get("final")][:2] == [1, 2]
    assert plan["race"]["epochs"] == 2
    assert plan["objective"]["name"] == "predicted_accuracy"  # the measured objective
    assert len(list((res / "contrib").glob("mcunet-5fps-*.json"))) == 1
    assert 0 <= rec["metrics"]["test_accuracy"] <= 1
    import torch

    assert rec["metrics_raw"]["threads"] == torch.get_num_threads()  # the trainer's run
    assert rec["metrics_raw"]["kernels"] == cpu_kernels()
    # a validation split this small (under 200 images) is cross-validated by default
    assert rec["race"]["folds"] == plan["race"]["folds"] > 1
    # its file is named by its folds, beside (not over) a race on the split as it is
    k = plan["race"]["folds"]
    assert [p.name for p in res.rglob("race*.json")] == [f"race-{k}fold.json"]
    assert rec["race"]["separation"]["val_images"] == plan["race"]["val_images"]
    bad = yaml.safe_load(spec.read_text())
    bad["methods"] = [{"method": "search", "options": {"effort": "heroic"}}]
    spec.write_text(yaml.safe_dump(bad))
    assert main(["study", "run", str(spec), "--no-progress"]) == 2
    assert "options.effort: unknown value 'heroic'; allowed: quick, standard, thorough" in (
        capsys.readouterr().err)
    bad["methods"] = [{"method": "search", "options": {"effort": "standard", "race_folds": 0}}]
    spec.write_text(yaml.safe_dump(bad))
    assert main(["study", "run", str(spec), "--no-progress"]) == 2
    assert ("options.race_folds: expected an integer from 1 (the validation split as it is) "
            "to 20, got 0") in capsys.readouterr().err
    bad["methods"] = [{"method": "search", "options": {"effort": "standard", "race_final": 1}}]
    spec.write_text(yaml.safe_dump(bad))
    assert main(["study", "run", str(spec), "--no-progress"]) == 2
    assert ("options.race_final: expected 0 (no final) or an integer from 2 to 20, got 1") in (
        capsys.readouterr().err)
    for rungs in ([4, 2], [], [0, 2], 4, [2, True]):
        bad["methods"] = [{"method": "search", "options": {"effort": "thorough",
                                                          "race_rungs": rungs}}]
        spec.write_text(yaml.safe_dump(bad))
        assert main(["study", "run", str(spec), "--no-progress"]) == 2
        assert ("options.race_rungs: expected a list of increasing positive epoch counts "
                f"(e.g. [2, 4]), got {rungs!r}") in capsys.readouterr().err
    # rungs for an effort that does not race: the cell fails, naming the method and effort
    bad["methods"] = [{"name": "q", "method": "search",
                       "options": {"effort": "quick", "race_rungs": [2, 4]}}]
    spec.write_text(yaml.safe_dump(bad))
    main(["study", "run", str(spec), "--no-progress"])
    capsys.readouterr()
    (failed,) = [json.loads(p.read_text()) for p in (res / "cells").glob("*__q__*.json")]
    assert failed["status"] == "failed"
    assert ("method q: race_rungs needs an effort that races (standard or thorough), not "
            "quick") in failed["error"]["message"]


def test_a_tuned_study_chooses_each_cells_rate_on_validation(tmp_path: Path, capsys) -> None:
    """``training.lrs`` with the runner engine: every cell trains at each rate of the grid and
    keeps the run with the best validation accuracy; ``plan_seed`` makes every seed's search
    cell train the same plan; a killed cell resumes from its ``tuning.json``."""
    data = _image_folder(tmp_path / "images", per_class={"train": 10, "test": 4})
    spec = tmp_path / "tuned.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tuned",
        "data": {"name": "img", "source": str(data), "train_split": "train"},
        "input_size": 32,
        "models": [{"name": "mcunet-5fps", "weights": "imagenet"}],
        "devices": [{"name": "stm32f746", "budgets": ["40KB"]}],
        "methods": ["tinytl", {"method": "search", "options": {"plan_seed": 0}}],
        "seeds": [0, 1],
        "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "lrs": [0.0001, 0.05],
                     "engine": "runner"},
        "cost": {"memory_measure": "training"},
        "scores": {"fisher_samples": 8, "micro_batch": 8},
        "search": {"trials": 12, "population_size": 6},
    }))
    assert main(["study", "run", str(spec), "--no-progress"]) == 0, capsys.readouterr().err
    res = tmp_path / "results" / "tuned"
    recs = {p.stem: json.loads(p.read_text()) for p in (res / "cells").glob("*.json")}
    assert len(recs) == 4 and all(r["status"] == "done" for r in recs.values()), recs
    for r in recs.values():
        tuning = r["metrics_raw"]["tuning"]
        assert set(tuning) == {"0.0001", "0.05"} and r["lr"] in (0.0001, 0.05)
        best = max(t["val_accuracy"] for t in tuning.values())
        assert tuning[f"{r['lr']:g}"]["val_accuracy"] == best == r["metrics"]["best_accuracy"]
        assert r["metrics"]["test_accuracy"] == tuning[f"{r['lr']:g}"]["test_accuracy"]
        assert r["metrics_raw"]["engine"] == "runner"
        # each run's thread count is recorded (another count does not repeat bit for bit)
        assert all(isinstance(t["threads"], int) and t["threads"] >= 1
                   for t in tuning.values()), tuning
        assert all(t["kernels"] == cpu_kernels() for t in tuning.values()), tuning
    searches = [r for r in recs.values() if r["key"]["method"] == "search"]
    assert searches[0]["layers"] == searches[1]["layers"]  # one plan, trained by both seeds
    assert [p.name for p in (res / "plans").iterdir()] == [
        "img__mcunet-5fps__stm32f746__40KB__search__p0"]
    assert main(["study", "report", str(spec)]) == 0
    md = (res / "report.md").read_text()
    assert "lr chosen on validation per cell from {0.0001, 0.05}" in md
    assert "## Head-to-head: each search method against the best baseline" in md

    # a killed cell: its record gone, its tuning file kept (one rate doctored to win on
    # validation): the rerun trains nothing and takes the doctored rate
    cell_id = next(k for k, r in recs.items() if r["key"]["method"] == "tinytl")
    tuning_path = res / "cells" / cell_id / "tuning.json"
    runs = json.loads(tuning_path.read_text())
    runs["0.0001"].update(best_accuracy=1.0, final_accuracy=1.0, test_accuracy=0.125)
    tuning_path.write_text(json.dumps(runs))
    (res / "cells" / f"{cell_id}.json").unlink()
    assert main(["study", "run", str(spec), "--no-progress"]) == 0
    rec = json.loads((res / "cells" / f"{cell_id}.json").read_text())
    assert rec["lr"] == 0.0001 and rec["metrics"]["test_accuracy"] == 0.125


def test_a_changed_spec_remakes_a_shared_study_it_refuses(tmp_path: Path, capsys) -> None:
    """The seeds' shared search study is found by name: after a spec change that the study
    refuses (the proxy's alpha, part of its identity) it is made anew, where the cell had
    failed for good; an edit it does not refuse (more trials) continues it."""
    import optuna

    from budgetsearch.search import read_config

    data = _image_folder(tmp_path / "images", per_class={"train": 10, "test": 4})
    spec = tmp_path / "changes.yaml"
    doc = {"name": "changes", "data": {"name": "img", "source": str(data),
                                        "train_split": "train"},
           "input_size": 32, "models": [{"name": "mcunet-5fps", "weights": "imagenet"}],
           "devices": [{"name": "stm32f746", "budgets": ["40KB"]}],
           "methods": [{"method": "search", "options": {"plan_seed": 0}}], "seeds": [0],
           "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "engine": "runner"},
           "cost": {"memory_measure": "training"},
           "scores": {"fisher_samples": 8, "micro_batch": 8},
           "search": {"trials": 12, "population_size": 6}}
    res = tmp_path / "results" / "changes"
    home = res / "plans" / "img__mcunet-5fps__stm32f746__40KB__search__p0"

    def run() -> dict:
        spec.write_text(yaml.safe_dump(doc))
        assert main(["study", "run", str(spec), "--no-progress"]) == 0, capsys.readouterr().err
        (rec,) = [json.loads(p.read_text()) for p in (res / "cells").glob("*.json")]
        assert rec["status"] == "done", rec.get("error")
        study = optuna.load_study(study_name="changes:" + home.name,
                                  storage=f"sqlite:///{home / 'search.db'}")
        return {"config": read_config(study)[0], "trials": len(study.trials)}

    assert run()["config"]["alpha"] == 1.0
    doc["search"]["alpha"] = 2.0  # refused by the old study: it had failed the cell for good
    again = run()
    assert again["config"]["alpha"] == 2.0 and again["trials"] == 12
    doc["search"]["trials"] = 16  # not part of its identity: the study goes on to 16 trials
    assert run()["trials"] == 16


def test_only_what_an_earlier_configuration_left_and_is_refused_is_removed(tmp_path: Path,
                                                                          monkeypatch) -> None:
    from budgetsearch.contrib import SharedTable, TableError
    from budgetsearch.errors import SearchError
    from budgetsearch.studies import adapters

    home = tmp_path / "home"
    home.mkdir()
    race, elsewhere = home / "race.json", tmp_path / "contrib.json"
    SharedTable(race, {"k": 0})  # an earlier configuration's race
    SharedTable(elsewhere, {"k": 0})  # a table of another key, but not in the home
    deleted: list[str] = []
    monkeypatch.setattr(adapters, "_delete_study",
                        lambda storage, name, creator: deleted.append(name))
    errors = [TableError("race", stale_path=race, wanted_key={"k": 1}),
              SearchError("s", stale_study="st:home")]

    def make():
        if errors:
            raise errors.pop()
        return "plan"

    assert adapters._remaking_stale(make, home=home, storage="sqlite:///x.db",
                                    study_name="st:home") == "plan"
    assert deleted == ["st:home"] and not race.exists()

    def refused_elsewhere():
        raise TableError("contrib", stale_path=elsewhere, wanted_key={"k": 1})

    with pytest.raises(TableError):  # a table outside the plan's home is never removed
        adapters._remaking_stale(refused_elsewhere, home=home, storage="x", study_name="st")
    assert elsewhere.exists()
    # a race file of another key that a live worker is racing on: left, and the cell's error
    # is transient (run again later), not a failure for good
    busy = SharedTable(race, {"k": 0})
    assert busy.claim(["arm"]) == "arm"

    def refused_busy():
        raise TableError("race", stale_path=race, wanted_key={"k": 1})

    with pytest.raises(SearchError) as left:
        adapters._remaking_stale(refused_busy, home=home, storage="x", study_name="st")
    assert left.value.transient and race.exists()

    def always_stale():
        raise SearchError("s", stale_study="st:home")

    with pytest.raises(SearchError):  # removed once: refused again, the error stands
        adapters._remaking_stale(always_stale, home=home, storage="x", study_name="st:home")


def _pair_of_seeds(tmp_path: Path, options: dict, *, search: dict,
                   engine: str | None = None) -> Path:
    """A study file of one search method over seeds 0 and 1 on a tiny image folder."""
    data = _image_folder(tmp_path / "images", per_class={"train": 10, "test": 4})
    training = {"epochs": 1, "batch_size": 8, "lr": 0.01, **({"engine": engine} if engine
                                                                else {})}
    spec = tmp_path / "pair.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "pair", "data": {"name": "img", "source": str(data), "train_split": "train"},
        "input_size": 32, "models": [{"name": "mcunet-5fps", "weights": "imagenet"}],
        "devices": [{"name": "stm32f746", "budgets": ["40KB"]}],
        "methods": [{"method": "search", "options": options}], "seeds": [0, 1],
        "training": training, "cost": {"memory_measure": "training"},
        "scores": {"fisher_samples": 8, "micro_batch": 8}, "search": search}))
    return spec


def test_two_workers_make_a_shared_plan_once(tmp_path: Path, capsys) -> None:
    """Seeds 0 and 1 share one plan (plan_seed) and two workers take them together: the plan is
    made once (the second waits and reads it), not searched twice on the same seed."""
    import optuna

    spec = _pair_of_seeds(tmp_path, {"plan_seed": 0, "trials": 200}, engine="runner",
                          search={"population_size": 6})
    assert main(["study", "run", str(spec), "--workers", "2", "--no-progress"]) == 0, \
        capsys.readouterr().err
    res = tmp_path / "results" / "pair"
    recs = [json.loads(p.read_text()) for p in (res / "cells").glob("*.json")]
    assert len(recs) == 2 and all(r["status"] == "done" for r in recs)
    assert recs[0]["layers"] == recs[1]["layers"]
    home = res / "plans" / "img__mcunet-5fps__stm32f746__40KB__search__p0"
    study = optuna.load_study(study_name="pair:" + home.name,
                              storage=f"sqlite:///{home / 'search.db'}")
    assert len(study.trials) == 200  # two searches at once had made up to twice as many


def test_a_refused_study_is_deleted_only_if_still_the_one_refused(tmp_path: Path) -> None:
    """Two seeds refused the old study; the first deleted it and a third made it anew: the
    second's deletion, by the refused study's creator, leaves the new study alone."""
    import optuna

    from budgetsearch.search import CREATOR_KEY
    from budgetsearch.studies.adapters import _delete_study

    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="st", storage=url).set_user_attr(CREATOR_KEY, "h:1:new")
    _delete_study(url, "st", creator="h:2:old")
    assert optuna.get_all_study_names(url) == ["st"]
    _delete_study(url, "st", creator="h:1:new")
    assert optuna.get_all_study_names(url) == []
    _delete_study(url, "st", creator="h:1:new")  # gone already: nothing to do


def test_two_workers_share_one_raced_plan(tmp_path: Path, capsys) -> None:
    """Seeds 0 and 1 share one raced plan (plan_seed, effort standard) and two workers take
    them together: the search runs once under the home's lock, and the race is shared by its
    claims, every arm trained once in all, both cells handing out the same plan."""
    spec = _pair_of_seeds(tmp_path, {"plan_seed": 0, "effort": "standard",
                                     "race_rungs": [1, 2]},
                          search={"trials": 20, "population_size": 8})
    assert main(["study", "run", str(spec), "--workers", "2", "--no-progress"]) == 0, \
        capsys.readouterr().err
    res = tmp_path / "results" / "pair"
    recs = [json.loads(p.read_text()) for p in (res / "cells").glob("*.json")]
    assert len(recs) == 2 and all(r["status"] == "done" for r in recs), recs
    assert recs[0]["layers"] == recs[1]["layers"]
    races = [r["provenance"]["race"] for r in recs]
    assert races[0]["winner"] == races[1]["winner"] and races[0]["rungs"] == races[1]["rungs"]
    (race_file,) = (res / "plans").glob("*/race*.json")
    arms = len(json.loads(race_file.read_text())["results"])
    assert sum(r["arms_trained"] for r in races) == arms  # none trained twice
