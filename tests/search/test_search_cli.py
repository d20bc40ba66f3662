"""The ``plan`` and ``front`` commands: plan file and provenance, resume, front files, bad input,
and one run with a real Fisher pass on a handful of synthetic images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from budgetsearch import load_model
from budgetsearch.cli import main
from budgetsearch.criteria import magnitude_scores
from budgetsearch.plan import load_plan

torch.set_num_threads(1)
BASELINES = ("tinytrain", "neq", "mit", "tinytl", "last-k", "last-k-filtered")


@pytest.fixture(scope="module")
def scores_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("scores") / "magnitude.npz"
    magnitude_scores(load_model("mcunet-5fps", num_classes=10)).save(path)
    return str(path)


def _plan_args(out, scores: str, *extra: str) -> list[str]:
    return ["plan", "--model", "mcunet-5fps", "--num-classes", "10", "--device", "stm32h743",
            "--scores", scores, "--budget", "99KB", "--memory-measure", "training",
            "--population", "20", "--no-progress", "--out", str(out), *extra]


def test_plan_writes_the_plan_and_resumes(tmp_path, scores_file, capsys) -> None:
    out = tmp_path / "run" / "plan.json"
    assert main(_plan_args(out, scores_file, "--trials", "50")) == 0
    text = capsys.readouterr().out
    for name in ("search (chosen)", *BASELINES):
        assert name in text
    plan = load_plan(out)
    prov = plan.provenance
    for key in ("study", "storage", "trial", "objectives", "sampler", "seed",
                "budgetsearch_version", "baselines", "proxy", "space"):
        assert key in prov, key
    assert prov["method"] == "search" and prov["sampler"] == "nsga2" and prov["trials"] == 50
    assert set(prov["objectives"]) == {"proxy", "training_memory_bytes", "latency_ms"}
    assert plan.predicted["training_memory_bytes"] <= 99 * 1024
    assert plan.memory_budget_bytes == 99 * 1024 and plan.device == "stm32h743"
    db = tmp_path / "run" / "plan.study.db"
    assert db.is_file() and prov["storage"] == f"sqlite:///{db}"
    # the same command continues the study
    assert main(_plan_args(out, scores_file, "--trials", "70")) == 0
    captured = capsys.readouterr()
    assert "continuing study" in captured.err
    assert load_plan(out).provenance["trials"] == 70
    # front files from the stored study
    front_dir = tmp_path / "front"
    assert main(["front", "--study", prov["study"], "--storage", prov["storage"],
                 "--out", str(front_dir)]) == 0
    rows = list(csv.DictReader((front_dir / "front.csv").open()))
    assert rows and all(r["feasible"] == "1" for r in rows)
    assert len(list(csv.DictReader((front_dir / "trials.csv").open()))) == 70
    assert (front_dir / "front.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_refused_with_a_named_error(tmp_path, scores_file, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(_plan_args(out, scores_file, "--budget", "10B", "--trials", "20")) == 2
    err = capsys.readouterr().err
    assert "minimum feasible memory budget is" in err and "Traceback" not in err
    assert main(_plan_args(out, scores_file, "--storage", "mongodb://x/y")) == 2
    assert "unknown storage URL" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(_plan_args(out, scores_file, "--storage", url, "--study", "mine",
                           "--trials", "25")) == 0
    capsys.readouterr()
    assert main(_plan_args(tmp_path / "b.json", scores_file, "--storage", url, "--study", "mine",
                           "--trials", "25", "--budget", "148KB")) == 2
    assert "memory budget (bytes): the study has 101376, this run 151552" in \
        capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
    assert main(["front", "--study", "nope", "--storage", url, "--out", str(tmp_path)]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    # bad data: an error naming it, and no empty database left next to the plan
    fresh = tmp_path / "fresh"
    code = main(["plan", "--model", "mcunet-5fps", "--device", "stm32h743", "--data",
                 str(tmp_path / "no-such-dir"), "--objective", "fisher", "--budget", "99KB",
                 "--memory-measure",
                 "training", "--no-progress", "--out", str(fresh / "p.json")])
    assert code == 2 and "no-such-dir" in capsys.readouterr().err
    assert not fresh.exists() or list(fresh.iterdir()) == []


def test_plan_with_a_real_fisher_pass_on_synthetic_images(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.png")
    out = tmp_path / "plan.json"
    code = main(["plan", "--model", "mcunet-5fps", "--num-classes", "2", "--input-size", "96",
                 "--device", "stm32h743", "--data", str(tmp_path / "data"), "--samples", "8",
                 "--objective", "fisher",
                 "--micro-batch", "4", "--budget", "64KB", "--memory-measure", "training",
                 "--trials", "40", "--population", "16", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    prov = json.loads(out.read_text())["provenance"]
    assert prov["scores"]["criterion"] == "fisher" and prov["scores"]["samples"] == 8
    assert "fisher on" in prov["scores"]["source"]
    assert prov["objectives"]["training_memory_bytes"] <= 64 * 1024
    assert prov["effort"] == "quick" and "race" not in prov  # the Fisher proxy alone: fast
