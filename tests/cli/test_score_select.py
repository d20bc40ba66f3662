"""``budgetsearch score`` and ``budgetsearch select`` end to end, through ``cli.main``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from budgetsearch import load_model
from budgetsearch.cli import main
from budgetsearch.criteria import Scores
from budgetsearch.plan import load_plan
from budgetsearch.selectors import list_methods

torch.set_num_threads(1)

MCU = ["--model", "mcunet-5fps", "--num-classes", "2"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of eight 24×24 images each."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir()
        for i in range(8):
            pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_score_without_data(tmp_path, image_folder, capsys, criterion):
    out = tmp_path / "s.npz"
    code = main(["score", *MCU, "--criterion", criterion, "--data", str(image_folder),
                 "--seed", "4", "--out", str(out)])
    assert code == 0
    scores = Scores.load(out, model=load_model("mcunet-5fps", num_classes=2))
    assert scores.criterion == criterion
    assert "wrote" in capsys.readouterr().out


def test_score_fisher_then_select_tinytrain(tmp_path, image_folder, capsys):
    scores_path = tmp_path / "fisher.npz"
    code = main(["score", *MCU, "--input-size", "64", "--criterion", "fisher", "--data",
                 str(image_folder), "--samples", "8", "--micro-batch", "4", "--no-progress",
                 "--out", str(scores_path)])
    assert code == 0, capsys.readouterr().err
    scores = Scores.load(scores_path)
    assert scores.criterion == "fisher" and scores.metadata["samples"] == 8
    assert scores.metadata["normalization"] == "mcu"
    plan_path = tmp_path / "plan.json"
    code = main(["select", "--method", "tinytrain", *MCU, "--input-size", "64", "--device",
                 "stm32f746", "--budget", "300KB", "--scores", str(scores_path), "--out",
                 str(plan_path)])
    assert code == 0, capsys.readouterr().err
    plan = load_plan(plan_path)
    assert plan.provenance["method"] == "tinytrain"
    assert plan.predicted["peak_memory_bytes"] <= 300 * 1024
    out = capsys.readouterr().out
    assert "tinytrain" in out and "fits" in out and "backward" in out


def test_score_neq_needs_snapshots(tmp_path, image_folder, capsys):
    code = main(["score", *MCU, "--criterion", "neq", "--data", str(image_folder), "--out",
                 str(tmp_path / "n.npz")])
    assert code == 2
    err = capsys.readouterr().err
    assert "snapshots" in err and "--snapshots A B C" in err


def test_score_neq_from_snapshots(tmp_path, image_folder, capsys):
    torch.manual_seed(0)
    model = load_model("mcunet-5fps", num_classes=2)
    paths = []
    for epoch in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        paths.append(str(tmp_path / f"e{epoch}.pt"))
        torch.save(model.state_dict(), paths[-1])
    out = tmp_path / "neq.npz"
    code = main(["score", *MCU, "--input-size", "32", "--criterion", "neq", "--data",
                 str(image_folder), "--samples", "4", "--no-progress", "--snapshots", *paths,
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert Scores.load(out).criterion == "neq"


def test_select_writes_a_valid_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["select", "--method", "mit-scheme", "--model", "mcunet-5fps", "--device",
                 "stm32f746", "--budget", "600KB", "--label", "49KB", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    plan = load_plan(out)
    assert plan.device == "stm32f746" and plan.memory_budget_bytes == 600 * 1024
    assert plan.provenance["details"]["mit_memory_kib"] == 49
    text = capsys.readouterr().out
    assert "mit-scheme" in text and "600.0 KB" in text


def test_select_last_k_and_random(tmp_path, capsys):
    for extra in (["--method", "last-k", "--blocks", "--patch-size", "2"],
                  ["--method", "random", "--seed", "3"]):
        out = tmp_path / "p.json"
        code = main(["select", *extra, *MCU, "--device", "stm32f746", "--budget", "100KB",
                     "--memory-measure", "training", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        assert load_plan(out).provenance["method"] == extra[1]


def test_select_bad_method_lists_methods(tmp_path, capsys):
    code = main(["select", "--method", "bogus", *MCU, "--device", "stm32f746", "--out",
                 str(tmp_path / "p.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert all(name in err for name in list_methods())
    assert not (tmp_path / "p.json").exists()


def test_select_errors(tmp_path, capsys):
    base = [*MCU, "--device", "stm32f746", "--out", str(tmp_path / "p.json")]
    assert main(["select", "--method", "neq", *base]) == 2
    assert "needs --scores" in capsys.readouterr().err
    assert main(["select", "--method", "tinytl", "--k", "3", *base]) == 2
    assert "does not take --k" in capsys.readouterr().err
    assert main(["select", "--method", "tinytl", "--budget", "1KB", *base]) == 2
    assert "minimum feasible memory budget" in capsys.readouterr().err
    other = tmp_path / "other.npz"
    assert main(["score", "--model", "mbv2-w0.35", "--criterion", "magnitude", "--out",
                 str(other)]) == 0
    assert main(["select", "--method", "neq", "--scores", str(other), *base]) == 2
    assert "another model" in capsys.readouterr().err
    # a file that cannot be written is a one-line error naming it, not a traceback
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["select", "--method", "tinytl", *MCU, "--device", "stm32f746", "--budget",
                 "1MB", "--out", str(blocker / "p.json")]) == 2
    err = capsys.readouterr().err
    assert (f"budgetsearch select: error: --out {blocker / 'p.json'}: {blocker} is not a "
            "directory") in err and "Traceback" not in err
    # an output that is a directory: refused before the work, naming the option
    assert main(["select", "--method", "tinytl", *MCU, "--device", "stm32f746", "--budget",
                 "1MB", "--out", str(tmp_path)]) == 2
    assert f"error: --out {tmp_path}: is a directory; give a file name" in \
        capsys.readouterr().err


def test_plan_checks_its_outputs_before_any_work(tmp_path, capsys, monkeypatch):
    """plan refuses --out and --front-dir it could not write before it scores or searches."""
    import budgetsearch.cli.plan as cli_plan

    def never(args):
        raise AssertionError("the plan was made before its outputs were checked")

    monkeypatch.setattr(cli_plan, "_run_plan", never)
    base = ["plan", *MCU, "--device", "stm32f746", "--budget", "100KB", "--effort", "quick"]
    assert main([*base, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: is a directory" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*base, "--out", str(tmp_path / "p.json"), "--front-dir", str(blocker)]) == 2
    assert f"--front-dir {blocker}: exists and is not a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_reading_commands_create_no_database(tmp_path, capsys):
    """front and worker read a study: a mistyped SQLite path is an error, not a new file."""
    url = f"sqlite:///{tmp_path}/nosuch.db"
    assert main(["front", "--storage", url, "--study", "x", "--out", str(tmp_path / "fr")]) == 2
    assert f"no such file {tmp_path}/nosuch.db" in capsys.readouterr().err
    assert main(["worker", "--storage", url, "--study", "x"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
