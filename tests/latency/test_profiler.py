"""profile-device: the designed plans on every calibration model, and the quick mode end to end
(the CLI writes a profile the cost model then uses; CI runs this)."""

from __future__ import annotations

import json
import warnings

import pytest

from budgetsearch import CostModel, LayerGraph, Plan, load_model, load_profile
from budgetsearch._threads import cpu_kernels
from budgetsearch.cli import main
from budgetsearch.errors import ProfileError
from budgetsearch.latency import DEFAULT_MODELS, PLAN_FAMILIES, designed_plans, profile_device


def _key(plan: Plan) -> str:
    return json.dumps({k: u.to_dict() for k, u in plan.updates.items()}, sort_keys=True)


@pytest.fixture(scope="module", params=DEFAULT_MODELS)
def model_graph(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(request.param, num_classes=10)
    return request.param, LayerGraph.from_model(model, input_size=64, model_name=request.param)


def test_every_family_is_built_and_distinct(model_graph) -> None:
    _name, graph = model_graph
    cm = CostModel(graph, load_profile("rpi4"), accounting="ops", batch_size=2)
    plans = designed_plans(graph, cm, seed=0)
    assert list(plans) == list(PLAN_FAMILIES)
    fingerprints = {_key(p) for p in plans.values()}
    assert len(fingerprints) == len(plans)
    feats = {k: cm.latency_features(p) for k, p in plans.items()}
    assert feats["filtered-r2"].get("backward.filtered.calls", 0) > 0
    assert feats["sparse-out"].get("backward.sparse.calls", 0) > 0
    assert any(u.axis == "in" for u in plans["sparse-in"].updates.values())
    # the full plan does the most backward work, the classifier the least
    bwd = {k: sum(v for f, v in x.items() if f.endswith("_macs")) for k, x in feats.items()}
    assert bwd["full"] == max(bwd.values()) and bwd["classifier"] == min(bwd.values())


def test_same_seed_same_plans(model_graph) -> None:
    _name, graph = model_graph
    cm = CostModel(graph, load_profile("rpi4"), accounting="ops", batch_size=2)
    a = designed_plans(graph, cm, seed=3, families=("mixed", "sparse-out"))
    b = designed_plans(graph, cm, seed=3, families=("mixed", "sparse-out"))
    assert {k: _key(p) for k, p in a.items()} == {k: _key(p)
                                                         for k, p in b.items()}


def test_unknown_family_and_bad_arguments_are_named() -> None:
    graph = LayerGraph.from_model(load_model("mcunet-5fps", num_classes=10), input_size=32)
    cm = CostModel(graph, load_profile("rpi4"), batch_size=1)
    with pytest.raises(ProfileError, match="unknown plan family 'huge'; known: classifier"):
        designed_plans(graph, cm, families=("huge",))
    with pytest.raises(ProfileError, match="repeats"):
        profile_device(repeats=0, progress=False)
    with pytest.raises(ProfileError, match="batch_sizes"):
        profile_device(batch_sizes=(0,), progress=False)


def test_quick_profile_device_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "here.yaml"
    steps = tmp_path / "steps.json"
    assert main(["profile-device", "--quick", "--out", str(out), "--steps-json",
                 str(steps)]) == 0
    assert "measured (budgetsearch profile-device" in capsys.readouterr().out
    profile = load_profile(out)
    lat = profile.latency
    assert lat is not None and lat.calibration["models"] == ["mcunet-5fps"]
    assert lat.fit["samples"] == 8 and lat.fit["median_error_pct"] >= 0
    assert lat.kernels == cpu_kernels()
    assert f"kernels {cpu_kernels()}" in profile.sources["latency"]
    rows = json.loads(steps.read_text())
    assert len(rows) == 8 and all(r["measured_ms"] > 0 for r in rows)
    # the cost model now times steps with it, and says so
    graph = LayerGraph.from_model(load_model("mcunet-5fps", num_classes=10), input_size=64)
    cm = CostModel(graph, profile, batch_size=4)
    summary = cm.summarize(Plan.full(graph))
    assert summary.latency_ms > 0 and summary.latency_model.startswith("measured")
    assert summary.latency_ms == pytest.approx(
        lat.predict_ms(cm.latency_features(Plan.full(graph))))


def test_quick_keeps_the_models_batch_sizes_and_input_size_given(tmp_path, capsys) -> None:
    out, steps = tmp_path / "here.yaml", tmp_path / "steps.json"
    assert main(["profile-device", "--quick", "--models", "proxyless-w0.3", "--batch-sizes",
                 "2", "--input-size", "32", "--out", str(out), "--steps-json",
                 str(steps)]) == 0
    capsys.readouterr()
    calibration = load_profile(out).latency.calibration
    assert calibration["models"] == ["proxyless-w0.3"]
    rows = json.loads(steps.read_text())
    assert {(r["model"], r["batch_size"]) for r in rows} == {("proxyless-w0.3", 2)}
    assert calibration["input_size"] == 32


def test_an_unknown_model_is_refused_before_any_timing(monkeypatch) -> None:
    import budgetsearch.hostprofile

    def measure_host(**_kwargs):
        raise AssertionError("the host was timed before the models were checked")

    monkeypatch.setattr(budgetsearch.hostprofile, "measure_host", measure_host)
    with pytest.raises(ProfileError, match=r"models: .*no-such-net"):
        profile_device(models=("mcunet-5fps", "no-such-net"), progress=False)
    with pytest.raises(ProfileError, match="input_size"):
        profile_device(input_size=4, progress=False)


def test_time_plan_groups_round_robin_and_leaves_models_untouched() -> None:
    """Every plan of every group gets its timed steps, each visit one untimed step before them;
    the caller's models are copied, never trained, and no hook is left behind."""
    import torch

    from budgetsearch.latency import TimingGroup, time_plan_groups, timed_step_count

    torch.manual_seed(0)
    groups, before = [], []
    for name, batch in (("mcunet-5fps", 1), ("mcunet-5fps", 3)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_model(name, num_classes=10).eval()
        graph = LayerGraph.from_model(model, input_size=32, model_name=name)
        plans = {"classifier": Plan.last_k_layers(graph, 1), "bias": Plan.bias_only(graph)}
        groups.append(TimingGroup(model=model, graph=graph, plans=plans, batch_size=batch,
                                  input_size=32))
        before.append({k: v.clone() for k, v in model.state_dict().items()})
    calls = []
    out = time_plan_groups(groups, repeats=3, on_step=lambda: calls.append(1))
    assert [sorted(t) for t in out] == [["bias", "classifier"]] * 2
    assert all(len(v) == 3 and all(x > 0 for x in v) for t in out for v in t.values())
    # 4 plans, each: a visit of 1 untimed + 2 timed steps, then one of 1 untimed + 1 timed
    assert len(calls) == 4 * 5 == timed_step_count(4, repeats=3)
    for g, state in zip(groups, before, strict=True):
        assert not g.model.training
        assert all(torch.equal(state[k], v) for k, v in g.model.state_dict().items())
        assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                       for m in g.model.modules())


@pytest.mark.parametrize("caller_froze", [False, True])
def test_time_plans_freezes_the_collector_only_when_the_caller_has_not(caller_froze) -> None:
    """The timed steps run with the collector's objects frozen and thawed after; objects the
    caller froze stay frozen (gc.unfreeze would thaw them all), and nothing is frozen anew.
    A frozen object that dies meanwhile leaves the count, so with the caller's objects frozen
    the count may fall by a few, never to zero, and never rises."""
    import gc

    from budgetsearch.latency import time_plans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model("mcunet-5fps", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=32, model_name="mcunet-5fps")
    during = []
    gc.unfreeze()
    try:
        if caller_froze:
            gc.freeze()
        before = gc.get_freeze_count()
        time_plans(model, graph, {"classifier": Plan.last_k_layers(graph, 1)}, batch_size=1,
                   input_size=32, repeats=1, on_step=lambda: during.append(gc.get_freeze_count()))
        if caller_froze:
            assert before // 2 < gc.get_freeze_count() <= before
            assert all(before // 2 < n <= before for n in during)
        else:
            assert gc.get_freeze_count() == 0
            assert before == 0 and during[-1] > 0
    finally:
        gc.unfreeze()
