"""The cost, devices, models and profile-host commands, run through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from budgetsearch import list_models, list_profiles
from budgetsearch.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cost_json_has_the_documented_fields(capsys):
    code, out, err = run(capsys, "cost", "--model", "mobilenet_v2", "--device", "stm32h743",
                         "--update", "last:4", "--input-size", "64", "--json")
    assert code == 0, err
    doc = json.loads(out)
    for key in ("forward_macs", "backward_macs", "peak_memory_bytes", "saved_activation_bytes",
                "trainable_params", "latency_ms", "layers"):
        assert key in doc
    updated = [row["name"] for row in doc["layers"] if row["update"] != "frozen"]
    assert updated == ["features.17.conv.1.0", "features.17.conv.2", "features.18.0",
                       "classifier.1"]
    assert doc["backward_macs"] == sum(row["backward_macs"] for row in doc["layers"])


def test_cost_table_and_plot(capsys, tmp_path):
    png = tmp_path / "cost.png"
    code, out, err = run(capsys, "cost", "--model", "mcunet-5fps", "--num-classes", "10",
                         "--device", "stm32f746", "--update", "blocks:1:r2", "--plot", str(png))
    assert code == 0, err
    assert "peak memory" in out and "blocks.13.pointwise2" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cost_with_plan_file_roundtrip(capsys, tmp_path):
    from budgetsearch import LayerGraph, Plan, load_model

    graph = LayerGraph.from_model(load_model("resnet18"), input_size=64)
    path = Plan.last_k_blocks(graph, 1).save(tmp_path / "plan.json")
    code, out, err = run(capsys, "cost", "--model", "resnet18", "--device", "rpi4", "--plan",
                         str(path), "--input-size", "64", "--accounting", "pytorch", "--json")
    assert code == 0, err
    assert json.loads(out)["accounting"] == "pytorch"
    # the same plan on another model is refused with the layers named, and no traceback
    code, out, err = run(capsys, "cost", "--model", "resnet34", "--device", "rpi4", "--plan",
                         str(path), "--input-size", "64")
    assert code == 2
    assert "another model" in err and "layer" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--model", "nope", "--device", "rpi4"], ["mobilenet_v2", "resnet18", "mcunet-5fps"]),
        (["--model", "resnet18", "--device", "nope"], ["stm32f746", "jetson-nano"]),
        (["--model", "resnet18", "--device", "rpi4", "--update", "last:x"], ["last:K"]),
        (["--model", "resnet18", "--device", "rpi4", "--plan", "/nonexistent.json"],
         ["/nonexistent.json"]),
    ],
)
def test_cost_bad_input_names_the_valid_values(capsys, argv, expected):
    code, _out, err = run(capsys, "cost", *argv)
    assert code == 2
    assert "Traceback" not in err
    for word in expected:
        assert word in err


def test_devices_and_models_list_everything(capsys):
    code, out, _ = run(capsys, "devices")
    assert code == 0
    for name in list_profiles():
        assert name in out
    code, out, _ = run(capsys, "devices", "--json")
    assert {row["name"] for row in json.loads(out)} == set(list_profiles())
    code, out, _ = run(capsys, "models")
    assert out.split() == list_models()


def test_profile_host_writes_a_loadable_profile(capsys, tmp_path):
    from budgetsearch import CostModel, LayerGraph, Plan, load_model, load_profile

    path = tmp_path / "myhost.yaml"
    code, _out, err = run(capsys, "profile-host", "--out", str(path), "--quick")
    assert code == 0, err
    profile = load_profile(path)
    assert profile.name == "myhost" and set(profile.measured) == {"conv", "depthwise", "linear"}
    graph = LayerGraph.from_model(load_model("mcunet-5fps"), input_size=64)
    # measured rates calibrate latency: a slower measured conv rate gives a longer step
    fast = CostModel(graph, profile).summarize(Plan.full(graph)).latency_ms
    import dataclasses

    slow_rates = {k: dataclasses.replace(v, forward_macs_per_s=v.forward_macs_per_s / 10,
                                         backward_macs_per_s=v.backward_macs_per_s / 10)
                  for k, v in profile.measured.items()}
    slow = CostModel(graph, dataclasses.replace(profile, measured=slow_rates)).summarize(
        Plan.full(graph)).latency_ms
    assert slow > fast


def test_cost_says_when_the_latency_model_was_timed_otherwise(capsys, tmp_path):
    """A measured latency model timed at another thread count warns on loading; the cost
    command passes the warning on (on stderr: stdout may be JSON)."""
    from pathlib import Path

    import yaml

    here = Path(__file__).resolve().parents[2] / "studies/results/latency_model/this-host.yaml"
    data = yaml.safe_load(here.read_text())
    data["latency"]["threads"] = 97
    path = tmp_path / "this-host.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, err = run(capsys, "cost", "--model", "mcunet-5fps", "--num-classes", "2",
                         "--input-size", "32", "--device", str(path), "--json")
    assert code == 0, err
    json.loads(out)  # still JSON
    assert "warning: " in err and "97" in err


def _last_k_plan(capsys, path, *flags: str) -> dict:
    """The JSON of the last-k plan ``select`` makes for MCUNet-5fps with ``flags``."""
    code, _out, err = run(capsys, "select", "--method", "last-k", "--model", "mcunet-5fps",
                          *flags, "--out", str(path))
    assert code == 0, err
    return json.loads(path.read_text())


def test_cost_of_a_plan_file_takes_its_input_batch_and_optimizer(capsys, tmp_path):
    """select made the plan at 64 px and batch 1: cost --plan, without those flags, costs it
    as it was made (the same peak), not at the command's defaults."""
    path = tmp_path / "p.json"
    made = _last_k_plan(capsys, path, "--device", "stm32f746", "--input-size", "64",
                        "--batch-size", "1", "--budget", "300KB")
    code, out, err = run(capsys, "cost", "--model", "mcunet-5fps", "--device", "stm32f746",
                         "--plan", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["peak_memory_bytes"] == made["predicted"]["peak_memory_bytes"]


def test_cost_of_a_plan_file_checks_the_budget_it_was_made_for(capsys, tmp_path):
    """A plan made for 300 KB of training memory fits it though its peak passes the device's
    memory: cost --plan says both, each against its own figure."""
    path = tmp_path / "p.json"
    made = _last_k_plan(capsys, path, "--device", "stm32f746", "--input-size", "128",
                        "--budget", "300KB", "--memory-measure", "training")
    assert made["predicted"]["training_memory_bytes"] <= 300 * 1024
    assert made["predicted"]["peak_memory_bytes"] > 256 * 1024  # the device's memory
    code, out, err = run(capsys, "cost", "--model", "mcunet-5fps", "--device", "stm32f746",
                         "--plan", str(path))
    assert code == 0, err
    assert "memory of the device: 256 KB for the step's peak of" in out and "does NOT fit" in out
    assert "the plan's budget (307200 bytes (300.0 KB) of training memory): fits" in out
    code, out, err = run(capsys, "cost", "--model", "mcunet-5fps", "--device", "stm32f746",
                         "--plan", str(path), "--json")
    assert json.loads(out)["plan_budget"] == {"memory_bytes": 307200,
                                              "memory_measure": "training",
                                              "latency_ms": None, "fits": True}
    # trained with Adam (two state tensors per weight) the same plan no longer fits its budget
    code, out, err = run(capsys, "cost", "--model", "mcunet-5fps", "--device", "stm32f746",
                         "--plan", str(path), "--optimizer", "adam")
    assert "the plan's budget (307200 bytes (300.0 KB) of training memory): does NOT fit: it " \
           "needs" in out


def test_training_memory_without_a_budget_is_refused(capsys, tmp_path):
    """The profile's memory bounds a step's whole peak: it is no budget for the memory over
    inference."""
    code, _out, err = run(capsys, "select", "--method", "mit", "--model", "mcunet-5fps",
                         "--device", "stm32f746", "--memory-measure", "training", "--out",
                         str(tmp_path / "s.json"))
    assert code == 2
    assert "--memory-measure training needs --budget: the profile's memory (256.0 KB on " \
           "stm32f746)" in err
    assert not (tmp_path / "s.json").exists()


def test_cost_of_a_plan_file_takes_its_accounting(capsys, tmp_path):
    """A plan made under the pytorch accounting records it; cost --plan costs it so (the
    device accounting gives another peak), unless --accounting says otherwise."""
    path = tmp_path / "p.json"
    made = _last_k_plan(capsys, path, "--device", "stm32h743", "--accounting", "pytorch",
                        "--budget", "8MB")
    assert made["provenance"]["accounting"] == "pytorch"
    assert made["provenance"]["bn_train"] is False
    code, out, err = run(capsys, "cost", "--model", "mcunet-5fps", "--device", "stm32h743",
                         "--plan", str(path), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["accounting"] == "pytorch"
    assert doc["peak_memory_bytes"] == made["predicted"]["peak_memory_bytes"]
    code, out, err = run(capsys, "cost", "--model", "mcunet-5fps", "--device", "stm32h743",
                         "--plan", str(path), "--json", "--accounting", "device")
    assert code == 0, err
    assert json.loads(out)["peak_memory_bytes"] != made["predicted"]["peak_memory_bytes"]
