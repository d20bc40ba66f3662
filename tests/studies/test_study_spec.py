"""Study files: validation errors name the field and the allowed values; cells and their ids."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from budgetsearch.cli import main
from budgetsearch.studies import StudyError, load_spec, spec_from_dict
from budgetsearch.studies import spec as spec_module

BASE = {
    "name": "t",
    "data": {"source": "cifar10", "train_size": 20, "test_size": 20},
    "input_size": 32,
    "models": [{"name": "mcunet-5fps"}],
    "devices": [{"name": "stm32f746", "budgets": ["64KB", {"memory": "128KB", "latency": "2s"}]}],
    "methods": ["tinytrain", {"name": "gf", "method": "last-k",
                              "options": {"k": 2, "blocks": True, "patch_size": 4}}],
    "seeds": [0, 1],
}


def _with(**changes):
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def _error(data) -> str:
    with pytest.raises(StudyError) as info:
        spec_from_dict(data, path="s.yaml")
    return str(info.value)


def test_valid_spec_and_cells(tmp_path: Path) -> None:
    spec = spec_from_dict(BASE, path=tmp_path / "t.yaml")
    cells = spec.cells()
    assert len(cells) == 1 * 1 * 2 * 2 * 2
    assert len({c.id for c in cells}) == len(cells)
    assert spec.results_dir == tmp_path / "results" / "t"
    assert [b.label for b in spec.devices[0].budgets] == ["64KB", "128KB-2000ms"]
    assert spec.devices[0].budgets[1].latency_ms == 2000.0
    assert spec.methods[1].role == "published" and spec.methods[0].scores == "fisher"
    assert cells[0].id == "default__mcunet-5fps__stm32f746__64KB__tinytrain__s0"


def test_config_hash_follows_the_recipe() -> None:
    a = spec_from_dict(BASE).cells()[0]
    b = spec_from_dict(_with(training={"epochs": 2})).cells()[0]
    c = spec_from_dict(_with(training={"keep_artifacts": True})).cells()[0]
    assert a.id == b.id and a.config_hash() != b.config_hash()
    assert a.config_hash() == c.config_hash()  # keeping artifacts changes no result


@pytest.mark.parametrize("data, pattern", [
    (_with(colour="red"), r"unknown key\(s\) colour; allowed: name, description, data"),
    (_with(models=["resnet9000"]), r"models\[0\]\.name.*'resnet9000'.*allowed:.*mcunet-5fps"),
    (_with(devices=[{"name": "toaster"}]), r"devices\[0\]\.name: unknown device 'toaster'; "
                                            r"allowed: .*stm32f746"),
    (_with(methods=["magic"]), r"methods\[0\]\.method: unknown value 'magic'; allowed: .*"
                               r"tinytrain.*search.*neq-dynamic"),
    (_with(methods=[{"method": "last-k", "options": {"depth": 3}}]),
     r"unknown option\(s\) depth of method last-k; allowed: k, blocks, patch_size"),
    (_with(methods=[{"method": "search", "options": {"trails": 3}}]),
     r"unknown option\(s\) trails; allowed: .*trials"),
    (_with(methods=[{"method": "tinytl", "colour": 1}]), r"methods\[0\]: unknown key\(s\) colour"),
    (_with(models=["mobilenet_v2"], methods=["mit-scheme"]),
     r"mit-scheme has published schemes only for .*not for mobilenet_v2"),
    (_with(methods=["tinytl", "tinytl"]), r"methods: duplicate names tinytl"),
    (_with(devices=[{"name": "stm32f746", "budgets": ["lots"]}]), r"budgets\[0\]\.memory"),
    (_with(seeds=["a"]), r"seeds: expected a list of integers"),
    (_with(training={"epochs": 0}), r"training\.epochs: expected a positive integer"),
    (_with(training={"options": {"warp": 9}}), r"training\.options: unknown option\(s\) warp"),
    (_with(cost={"accounting": "abacus"}), r"cost\.accounting: unknown value 'abacus'; allowed: "
                                           r"pytorch, ops, device"),
    (_with(data={"source": "cifar10", "size": 3}), r"data\[0\]: unknown key\(s\) size"),
    (_with(methods=[{"method": "tinytl", "models": ["resnet18"]}]),
     r"models \(a model of this study\).*'resnet18'"),
    (_with(training={"lrs": [0.01, -1]}), r"training\.lrs: expected a non-empty list of positive"),
    (_with(training={"lrs": []}), r"training\.lrs: expected a non-empty list"),
    (_with(training={"lrs": [0.01, 0.01]}), r"training\.lrs: .* lists a rate twice"),
    (_with(training={"engine": "rocket"}), r"training\.engine: unknown value 'rocket'; allowed: "
                                           r"trainer, runner"),
    (_with(training={"lrs": [0.01, 0.1]}, methods=[{"method": "full", "lr": 0.001}]),
     r"methods full set their own lr, but training\.lrs tunes every method on the same grid"),
    (_with(training={"engine": "runner"}, methods=["neq-dynamic"]),
     r"engine runner trains static plans only; methods neq-dynamic re-plan"),
    (_with(devices=[{"name": "stm32f746", "budgets": "128KB"}]),
     r"devices\[0\]\.budgets: expected a list of budgets"),
    (_with(devices=[{"name": "stm32f746", "budgets": 4096}]),
     r"devices\[0\]\.budgets: expected a list of budgets .*got 4096"),
    (_with(methods=[{"method": "tinytl", "models": 5}]),
     r"methods\[0\]\.models: expected a model name or a list of them, got 5"),
    (_with(methods=[{"method": "search", "options": {"trials": "many"}}]),
     r"methods\[0\]\.options\.trials: expected an integer of at least 1, got 'many'"),
    (_with(methods=[{"method": "search", "options": {"trials": 0}}]),
     r"options\.trials: expected an integer of at least 1, got 0"),
    (_with(methods=[{"method": "search", "options": {"plan_seed": -1}}]),
     r"options\.plan_seed: expected an integer of at least 0, got -1"),
    (_with(methods=[{"method": "search", "options": {"flush_seconds": "soon"}}]),
     r"options\.flush_seconds: expected a positive number of seconds"),
    (_with(methods=[{"method": "search", "options": {"pick": "cheapest"}}]),
     r"options\.pick: unknown pick rule 'cheapest': use best, or min-memory"),
    (_with(search={"trials": 2.5}), r"search\.trials: expected an integer of at least 1"),
    (_with(seeds=[0, 1, 0]), r"seeds: \[0, 1, 0\] lists seed\(s\) \[0\] twice"),
    (_with(training={"lrs": [0.02, 0.020000001]}),
     r"training\.lrs: .* lists a rate twice \(rates that agree to 6 significant digits"),
    (_with(search={"space": "block"}),
     r"search\.space: expected a mapping of space options \(granularity, last_n, filters, "
     r"weight_layers, target\), got 'block'"),
    (_with(search={"space": {"last_n": "3"}}),
     r"search\.space: last_n must be an integer of at least 1 .*got '3'"),
    (_with(search={"space": {"granularty": "block"}}),
     r"search\.space: unknown space option\(s\) granularty; known: granularity"),
    (_with(search={"space": {"granularity": "blk"}}),
     r"search\.space: granularity must be one of layer, block; got 'blk'"),
    (_with(methods=[{"method": "search", "options": {"sampler": "foo"}}]),
     r"methods\[0\]\.options\.sampler: unknown value 'foo'; allowed: nsga2, tpe, gp, random"),
    (_with(search={"alpha": "2"}), r"search\.alpha: expected a finite number, got '2'"),
    (_with(search={"population_size": 1}),
     r"search\.population_size: expected an integer of at least 2, got 1"),
    (_with(search={"local_search": "no"}), r"search\.local_search: expected true or false"),
    (_with(search={"third": "energy"}), r"search\.third: unknown value 'energy'; allowed: "
                                        r"latency, macs"),
    (_with(results_dir=5), r"results_dir: expected a path, got 5"),
    (_with(methods=[{"name": "a/b", "method": "tinytl"}, {"name": "a b", "method": "last-k"}]),
     r"two cells would share the record '.*__a-b__s0' \(method 'a/b' and 'a b'\)"),
])
def test_bad_spec_names_the_field_and_the_allowed_values(data, pattern: str) -> None:
    assert re.search(pattern, _error(data)), _error(data)


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(StudyError, match="malformed YAML"):
        load_spec(bad)
    with pytest.raises(StudyError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_docstring_example_is_a_valid_spec() -> None:
    text = spec_module.__doc__.split("::", 1)[1].split("\n\nA method mapping")[0]
    spec = spec_from_dict(yaml.safe_load(text))
    assert spec.name == "smoke" and [m.name for m in spec.methods] == [
        "tinytrain", "gf-b2-r4", "mit-scheme", "full", "search"]
    assert [m.lr for m in spec.methods] == [None, None, None, 0.005, None]


def test_shipped_studies_are_valid() -> None:
    root = Path(__file__).resolve().parents[2] / "studies"
    files = sorted(root.glob("*.yaml"))
    assert {f.stem for f in files} >= {"smoke", "mcu_budgets", "gradient_filtering",
                                      "device_fronts"}
    for f in files:
        assert load_spec(f).cells(), f


def test_cli_reports_a_bad_spec_before_running(tmp_path: Path, capsys) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_with(methods=["magic"])))
    assert main(["study", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown value 'magic'" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_cli_dry_run_lists_cells_and_an_estimate(tmp_path: Path, capsys) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert main(["study", "run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 cells (8 pending)" in out and "estimate: 8 cells to run" in out
    assert out.count("pending  default__mcunet-5fps") == 8
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_a_method_may_set_its_own_learning_rate_and_filter_mode(tmp_path) -> None:
    from budgetsearch.studies import StudyError, spec_from_dict

    base = {"name": "lr", "data": {"source": "cifar10"}, "models": ["mcunet-5fps"],
            "devices": [{"name": "stm32f746", "budgets": ["64KB"]}],
            "training": {"lr": 0.02}}
    spec = spec_from_dict({**base, "methods": ["tinytl", {"method": "full", "lr": 0.005}]},
                          path=tmp_path / "lr.yaml")
    lrs = {c.method.name: c.method.lr for c in spec.cells()}
    assert lrs == {"tinytl": None, "full": 0.005}
    hashes = {c.method.name: c.config_hash() for c in spec.cells()}
    other = spec_from_dict({**base, "methods": ["tinytl", {"method": "full", "lr": 0.01}]},
                           path=tmp_path / "lr.yaml")
    assert {c.method.name: c.config_hash() for c in other.cells()}["full"] != hashes["full"]
    modes = spec_from_dict({**base, "methods": [{"method": "tinytl", "filter_mode": "corrected"}]},
                           path=tmp_path / "lr.yaml")
    assert [c.method.filter_mode for c in modes.cells()] == ["corrected"]
    with pytest.raises(StudyError,
                       match=r"methods\[0\]\.filter_mode.*normalized, paper, corrected"):
        spec_from_dict({**base, "methods": [{"method": "tinytl", "filter_mode": "exact"}]},
                       path=tmp_path / "lr.yaml")
    for bad in (0, -1, "fast", True):
        with pytest.raises(StudyError, match=r"methods\[1\]\.lr: expected a positive number"):
            spec_from_dict({**base, "methods": ["tinytl", {"method": "full", "lr": bad}]},
                           path=tmp_path / "lr.yaml")


def test_an_unset_filter_mode_leaves_the_cell_configuration_as_before(tmp_path) -> None:
    """Records made before methods had a filter_mode stay current: an unset one is not hashed."""
    base = {"name": "h", "data": {"source": "cifar10"}, "models": ["mcunet-5fps"],
            "devices": [{"name": "stm32f746", "budgets": ["64KB"]}]}
    plain = spec_from_dict({**base, "methods": ["tinytl"]}, path=tmp_path / "h.yaml")
    cell = plain.cells()[0]
    assert "filter_mode" not in cell.config()["method"] and "lr" in cell.config()["method"]
    set_ = spec_from_dict({**base, "methods": [{"method": "tinytl", "filter_mode": "paper"}]},
                          path=tmp_path / "h.yaml").cells()[0]
    assert set_.config()["method"]["filter_mode"] == "paper"
    assert set_.config_hash() != cell.config_hash()


def test_unset_tuning_fields_leave_the_cell_configuration_as_before(tmp_path) -> None:
    """Records made before ``training.lrs`` and ``training.engine`` existed stay current."""
    base = {"name": "h", "data": {"source": "cifar10"}, "models": ["mcunet-5fps"],
            "devices": [{"name": "stm32f746", "budgets": ["64KB"]}], "methods": ["tinytl"]}
    plain = spec_from_dict(base, path=tmp_path / "h.yaml").cells()[0]
    assert not {"lrs", "engine"} & set(plain.config()["training"])
    tuned = spec_from_dict({**base, "training": {"lrs": [0.01, 0.1], "engine": "runner"}},
                           path=tmp_path / "h.yaml").cells()[0]
    assert tuned.config()["training"]["lrs"] == [0.01, 0.1]
    assert tuned.config()["training"]["engine"] == "runner"
    assert tuned.config_hash() != plain.config_hash()
