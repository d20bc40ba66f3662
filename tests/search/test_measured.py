"""The measured accuracy objective: closed-form predictions, consistency with the search's
decoding, the restricted space, and the search and ``plan --contrib`` using it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from budgetsearch import load_model
from budgetsearch.cli import main
from budgetsearch.contrib import ContributionTable
from budgetsearch.criteria import magnitude_scores
from budgetsearch.errors import SearchError
from budgetsearch.plan import LayerUpdate
from budgetsearch.search import (
    RATIOS,
    Evaluator,
    MeasuredModel,
    ProxyModel,
    Search,
    SearchSpace,
    SpaceOptions,
    scores_digest,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mcu(mcunet: dict) -> dict:
    scores = magnitude_scores(mcunet["model"])
    return {**mcunet, "scores": scores, "proxy": ProxyModel(mcunet["graph"], scores)}


def _r(acc: float, loss: float = 1.0) -> dict:
    return {"val_accuracy": acc, "val_loss": loss}


@pytest.fixture(scope="module")
def results(mcu: dict) -> dict:
    names = mcu["graph"].layer_names
    a, b = names[-3], names[-5]
    return {"head": _r(0.50, 1.0), "bias:2": _r(0.54, 0.9), "bias:8": _r(0.60, 0.8),
            f"weight:{a}:out:1:r1": _r(0.58, 0.95), f"weight:{a}:out:0.25:r1": _r(0.53, 0.97),
            f"weight:{a}:out:0.25:r2": _r(0.52, 0.99), f"weight:{b}:in:0.5:r1": _r(0.56, 0.9),
            f"weight:{b}:out:0.5:r1": _r(0.45, 1.2)}


def test_predictions_in_closed_form(mcu: dict, results: dict) -> None:
    graph = mcu["graph"]
    names = graph.layer_names
    a, b, head = names[-3], names[-5], names[-1]
    bias_layers = [n for n in names[:-1] if graph.layers[n].bias_param is not None]
    m = MeasuredModel(graph, mcu["proxy"], results, decay=1.0, loss_weight=0.0)  # additive
    assert m({head: LayerUpdate("weight")}) == pytest.approx(0.50)
    whole = {head: LayerUpdate("weight")}
    # bias run of 5: interpolated between depth 2 (+0.04) and 8 (+0.10)
    run5 = {n: LayerUpdate("bias") for n in bias_layers[-5:]}
    assert m({**run5, head: LayerUpdate("weight")}) == pytest.approx(0.50 + 0.04 + 0.03)
    # a gap in the run stops it: only the last one counts (interpolated 0 .. +0.04 at 2)
    gap = {bias_layers[-1]: LayerUpdate("bias"), bias_layers[-3]: LayerUpdate("bias")}
    assert m({**gap, **whole}) == pytest.approx(0.50 + 0.02)
    # the new classifier not (wholly) trained: chance, whatever else is updated
    assert m(gap) == pytest.approx(0.1) and m(run5) == pytest.approx(0.1)
    assert m({**run5, head: LayerUpdate("weight", channels=(0, 1))}) == pytest.approx(0.1)
    # weight units: a at 1/4 of its output channels (+0.03), b at 1/2 of its inputs (+0.06)
    ca = mcu["proxy"].channels(a, RATIOS.index(0.25), "out")
    cb = mcu["proxy"].channels(b, RATIOS.index(0.5), "in")
    two = {a: LayerUpdate("weight", channels=ca), b: LayerUpdate("weight", channels=cb,
                                                                 axis="in"), **whole}
    assert m(two) == pytest.approx(0.50 + 0.06 + 0.03)
    assert MeasuredModel(graph, mcu["proxy"], results, decay=0.5, loss_weight=0.0)(two) == \
        pytest.approx(
        0.50 + 0.06 + 0.5 * 0.03)
    # a filtered update uses its own measurement; an unmeasured patch size falls back to r1
    assert m({a: LayerUpdate("weight", channels=ca, patch_size=2), **whole}) == pytest.approx(
        0.52)
    assert m({a: LayerUpdate("weight", channels=ca, patch_size=4), **whole}) == pytest.approx(
        0.53)
    # a harmful unit counts fully; loss gains enter with their weight
    bout = {b: LayerUpdate("weight", channels=mcu["proxy"].channels(b, 3, "out")), **whole}
    assert m(bout) == pytest.approx(0.45)
    ml = MeasuredModel(graph, mcu["proxy"], results, decay=1.0, loss_weight=0.1)
    assert ml(bout) == pytest.approx(0.45 + 0.1 * (1.0 - 1.2))
    # an unmeasured layer adds nothing
    assert m({names[2]: LayerUpdate("weight"), **whole}) == pytest.approx(0.50)
    assert m.measured_layers == (b, a)


def test_bad_tables_and_parameters(mcu: dict, results: dict) -> None:
    with pytest.raises(SearchError, match="no 'head' measurement"):
        MeasuredModel(mcu["graph"], mcu["proxy"], {"bias:2": _r(0.5)})
    with pytest.raises(SearchError, match="names no layer"):
        MeasuredModel(mcu["graph"], mcu["proxy"], {**results, "weight:nope:out:1:r1": _r(0.5)})
    with pytest.raises(SearchError, match="is not head, bias:K"):
        MeasuredModel(mcu["graph"], mcu["proxy"], {**results, "bias": _r(0.5)})
    with pytest.raises(SearchError, match=r"decay must lie in \(0, 1\]"):
        MeasuredModel(mcu["graph"], mcu["proxy"], results, decay=0)


def test_choices_score_as_their_decoded_plans(mcu: dict, results: dict) -> None:
    graph = mcu["graph"]
    m = MeasuredModel(graph, mcu["proxy"], results, decay=0.7, loss_weight=0.05)
    space = SearchSpace(graph, SpaceOptions(weight_layers=(*m.measured_layers,
                                                           graph.layer_names[-1])))
    ev = Evaluator(space=space, proxy=m, cost_model=mcu["cm"], budget_bytes=None)
    rng = np.random.default_rng(0)
    for _ in range(200):
        params = {}
        for name, dist in space.distributions.items():
            if hasattr(dist, "choices"):
                params[name] = dist.choices[rng.integers(len(dist.choices))]
            else:
                params[name] = int(rng.integers(dist.low, dist.high + 1))
        # the search's cached per-choice value is the value of the plan the trial decodes to
        assert m.score_choices(space.choices(params)) == pytest.approx(m(ev.updates(params)))


def test_restricted_space(mcu: dict) -> None:
    graph = mcu["graph"]
    names = graph.layer_names
    keep = (names[-3], names[-1])
    space = SearchSpace(graph, SpaceOptions(weight_layers=keep))
    assert [u.name for u in space.units] == list(keep)
    assert len(space.bias_layers) == sum(graph.layers[n].bias_param is not None for n in names)
    params = space.encode({names[-2]: LayerUpdate("bias"), names[-3]: LayerUpdate("weight"),
                           names[5]: LayerUpdate("weight")})
    choices = space.choices(params)
    assert choices[names[-3]][0] == len(RATIOS) - 1 and choices[names[-2]][3]
    assert choices[names[5]][0] == 0  # not a weight candidate: no weight choice
    assert SpaceOptions.from_dict(SpaceOptions(weight_layers=keep).to_dict()).weight_layers == keep
    with pytest.raises(SearchError, match="weight_layers nope"):
        SearchSpace(graph, SpaceOptions(weight_layers=("nope",)))


def test_search_maximises_the_measured_objective(mcu: dict, results: dict) -> None:
    graph = mcu["graph"]
    search = Search(cost_model=mcu["cm"], scores=mcu["scores"], budget_bytes=400 * 1024,
                    contributions=results, contributions_source="test")
    result = search.run(n_trials=60, progress=False)
    plan = result.plan
    measured = set(search.accuracy.measured_layers) | {graph.layer_names[-1]}
    assert {n for n, u in plan.updates.items() if u.mode == "weight"} <= measured
    assert plan.predicted["predicted_accuracy"] == pytest.approx(search.accuracy(plan.updates))
    assert plan.provenance["objective"]["name"] == "predicted_accuracy"
    assert plan.provenance["objective"]["value"] >= max(
        (e["metrics"]["proxy"] for e in result.baselines.values()
         if e.get("metrics") and e["metrics"]["feasible"]), default=0.0)
    config = search.config()
    assert config["contributions"] == results and config["objective"]["decay"] == 0.2


def test_plan_command_with_a_table(mcu: dict, results: dict, tmp_path, capsys) -> None:
    graph = mcu["graph"]
    from budgetsearch.contrib import weights_digest

    torch.manual_seed(0)  # the plan command's head, as its --seed 0 makes it
    fresh = load_model("mcunet-5fps", num_classes=10)
    key = {"model_fingerprint": graph.fingerprint, "input_size": [128, 128],
           "channel_scores": scores_digest(mcu["scores"]),
           "initial_weights": weights_digest(fresh.state_dict())}
    ContributionTable(key, results).save(tmp_path / "t.json")
    argv = ["plan", "--model", "mcunet-5fps", "--num-classes", "10", "--device", "stm32h743",
            "--budget", "400KB", "--trials", "30", "--no-progress"]
    assert main([*argv, "--contrib", str(tmp_path / "t.json"),
                 "--out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "pred acc" in out and " pt" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["provenance"]["objective"]["objective"] == "measured"
    # a table for other initial weights (another --seed initialises another head) is refused
    assert main([*argv, "--seed", "3", "--contrib", str(tmp_path / "t.json"),
                 "--out", str(tmp_path / "p3.json")]) == 2
    assert "made for another set of initial weights (--weights, and --seed" in \
        capsys.readouterr().err
    assert main([*argv, "--scores", str(tmp_path / "none.npz"), "--objective", "measured",
                 "--out", str(tmp_path / "p4.json")]) == 2
    assert "--objective measured needs --data" in capsys.readouterr().err
    ContributionTable({**key, "input_size": [96, 96]}, results).save(tmp_path / "bad.json")
    assert main([*argv, "--contrib", str(tmp_path / "bad.json"),
                 "--out", str(tmp_path / "p2.json")]) == 2
    assert "made for another input size" in capsys.readouterr().err


def test_plan_measures_its_table_on_the_data_by_default(tmp_path, capsys, monkeypatch) -> None:
    from PIL import Image

    monkeypatch.setenv("BUDGETSEARCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("cat", "dog")):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.png")
    out = tmp_path / "plan.json"
    argv = ["plan", "--model", "mcunet-5fps", "--num-classes", "2", "--input-size", "64",
            "--device", "stm32h743", "--data", str(tmp_path / "data"), "--contrib-samples",
            "10", "--candidates", "last:1", "--budget", "200KB", "--trials", "30",
            "--population", "10", "--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "units measured into" in err and "8 training, 2 validation images" in err
    (path,) = (tmp_path / "cache" / "contrib").glob("mcunet-5fps-*.json")
    table = ContributionTable.load(path)
    assert "head" in table.results and table.key["input_size"] == [64, 64]
    plan = json.loads(out.read_text())
    assert plan["provenance"]["objective"]["objective"] == "measured"
    assert plan["updates"][list(plan["model"]["layer_shapes"])[-1]] == {"mode": "weight"}
    # a second plan reuses the table: nothing is measured again
    assert main([*argv[:-1], str(tmp_path / "second.json")]) == 0
    assert "units measured" not in capsys.readouterr().err
    # the same table with other data settings is refused, naming what differs
    assert main([*argv[:-1], str(tmp_path / "third.json"), "--contrib", str(path),
                 "--val-fraction", "0.5"]) == 2
    assert "was measured for something else (train_data" in capsys.readouterr().err


def test_small_layers_score_their_kept_share_in_both_paths(mcu: dict) -> None:
    graph = mcu["graph"]
    first = graph.layer_names[0]  # 3 input channels: 1/8 and 1/4 keep 1 of 3, 1/2 keeps 2
    assert graph.layers[first].in_channels == 3
    results = {"head": _r(0.5), f"weight:{first}:in:0.25:r1": _r(0.6),
               f"weight:{first}:in:0.5:r1": _r(0.7), f"weight:{first}:in:0.125:r1": _r(0.1)}
    m = MeasuredModel(graph, mcu["proxy"], results, decay=1.0, loss_weight=0.0)
    space = SearchSpace(graph, SpaceOptions(weight_layers=(first, graph.layer_names[-1])))
    ev = Evaluator(space=space, proxy=m, cost_model=mcu["cm"], budget_bytes=None)
    for ri in range(1, len(RATIOS)):
        params = space.encode({first: LayerUpdate("weight"),
                               graph.layer_names[-1]: LayerUpdate("weight")})
        params[f"r:{first}"], params[f"a:{first}"] = ri, "in"
        assert m.score_choices(space.choices(params)) == pytest.approx(m(ev.updates(params)))
