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
    training/validation data (one table for the study), the race, the winner trained."""
    data = _image_folder(tmp_path / "images", per_class={"train": 10, "test": 4})
    spec = tmp_path / "raced.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "raced",
        "data": {"name": "img", "source": str(data), "train_split": "train"},
        "input_size": 32,
        "models": [{"name": "mcunet-5fps", "weights": "imagenet"}],
        "devices": [{"name": "stm32f746", "budgets": ["40KB"]}],
        "methods": [{"method": "search", "options": {"effort": "standard"}}],
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
    assert plan["objective"]["name"] == "predicted_accuracy"  # the measured objective
    assert len(list((res / "contrib").glob("mcunet-5fps-*.json"))) == 1
    assert 0 <= rec["metrics"]["test_accuracy"] <= 1
    bad = yaml.safe_load(spec.read_text())
    bad["methods"] = [{"method": "search", "options": {"effort": "heroic"}}]
    spec.write_text(yaml.safe_dump(bad))
    assert main(["study", "run", str(spec), "--no-progress"]) == 2
    assert "options.effort: unknown value 'heroic'; allowed: quick, standard, thorough" in (
        capsys.readouterr().err)
