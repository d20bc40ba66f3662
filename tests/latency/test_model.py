"""The measured latency model: its profile section (round trip, every bad field named), the
warnings when it is used under another torch version, thread count or CPU kernels, and the cost
model using it (closed forms on a toy model)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import yaml
from _toys import small_cnn

from budgetsearch import CostModel, LayerGraph, Plan, load_profile
from budgetsearch._threads import cpu_kernels
from budgetsearch.errors import ProfileError
from budgetsearch.latency import FEATURES, LatencyModel, LatencyModelWarning, coefficient_name
from budgetsearch.profiles import profile_from_dict, profile_to_dict, save_profile

FIT = {"samples": 10, "folds": 5, "median_error_pct": 4.0, "p90_error_pct": 9.0,
       "max_error_pct": 12.0}
CALIBRATION = {"models": ["mcunet-5fps"], "batch_sizes": [1, 8], "input_size": 128,
               "plans": ["full"], "repeats": 5}


def _model(coefficients: dict[str, float], **kw) -> LatencyModel:
    args = {"torch_version": str(torch.__version__), "threads": torch.get_num_threads(),
            "fit": FIT, "calibration": CALIBRATION} | kw
    return LatencyModel(coefficients=coefficients, **args)


def _profile(latency: LatencyModel | None):
    base = load_profile("rpi4")
    data = profile_to_dict(dataclasses.replace(base, latency=latency))
    if latency is not None:
        data["sources"]["latency"] = "timed in a test"
    return profile_from_dict(data)


def test_round_trip_through_a_profile_file(tmp_path) -> None:
    lat = _model({f: 1e-3 * (i + 1) for i, f in enumerate(FEATURES)}, kernels=cpu_kernels())
    profile = _profile(lat)
    path = save_profile(dataclasses.replace(profile, name="mine"), tmp_path / "mine.yaml")
    loaded = load_profile(path)
    assert loaded.latency == lat
    assert loaded.latency.kernels == cpu_kernels()
    raw = yaml.safe_load(path.read_text())["latency"]
    assert raw["coefficients"]["forward.conv.ms_per_mac"] == pytest.approx(
        lat.coefficients["forward.conv.macs"])
    assert len(raw["coefficients"]) == len(FEATURES)


def test_coefficient_names_carry_units() -> None:
    assert coefficient_name("forward.conv.macs") == "forward.conv.ms_per_mac"
    assert coefficient_name("backward.depthwise.grad_weight_macs") == (
        "backward.depthwise.ms_per_grad_weight_mac")
    assert coefficient_name("step.calls") == "step.ms_per_call"


def _section() -> dict:
    return _model({f: 0.5 for f in FEATURES}).to_dict()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["coefficients"].pop("forward.conv.ms_per_mac"),
     "latency.coefficients.forward.conv.ms_per_mac: missing"),
    (lambda d: d["coefficients"].__setitem__("step.ms_per_call", -1.0),
     "latency.coefficients.step.ms_per_call: expected a finite number >= 0"),
    (lambda d: d["coefficients"].__setitem__("forward.gpu.ms_per_call", 1.0),
     "latency.coefficients.forward.gpu.ms_per_call: unknown coefficient"),
    (lambda d: d.__setitem__("model", "random-forest"), "latency.model: expected"),
    (lambda d: d.__setitem__("threads", 0), "latency.threads: expected a positive integer"),
    (lambda d: d.__setitem__("kernels", 5), "latency.kernels: expected the CPU kernels"),
    (lambda d: d.pop("fit"), "latency.fit: expected a mapping with keys samples"),
    (lambda d: d["fit"].__setitem__("median_error_pct", "n/a"),
     "latency.fit.median_error_pct: expected a finite number >= 0, got 'n/a'"),
    (lambda d: d["fit"].__setitem__("folds", 2.5),
     "latency.fit.folds: expected a whole number >= 0, got 2.5"),
    (lambda d: d.__setitem__("colour", 1), "latency.colour: unknown key"),
])
def test_a_bad_section_is_a_named_error(edit, message, tmp_path) -> None:
    profile = _profile(None)
    data = profile_to_dict(dataclasses.replace(profile, name="broken"))
    data["latency"] = _section()
    data["sources"]["latency"] = "a test"
    edit(data["latency"])
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_a_truncated_file_is_a_named_error(tmp_path) -> None:
    profile = dataclasses.replace(_profile(_model({"step.calls": 1.0})), name="cut")
    path = save_profile(profile, tmp_path / "cut.yaml")
    text = path.read_text()
    path.write_text(text[: text.index("forward.depthwise")])
    with pytest.raises(ProfileError, match=r"cut\.yaml"):
        load_profile(path)


def test_the_latency_section_needs_a_source() -> None:
    data = profile_to_dict(_profile(None))
    data["latency"] = _section()
    with pytest.raises(ProfileError, match="latency: numeric field without a source"):
        profile_from_dict(data)


@pytest.mark.parametrize(("change", "words"), [
    ({"torch_version": "1.13.0"}, "torch 1.13.0"),
    ({"threads": torch.get_num_threads() + 3}, f"{torch.get_num_threads() + 3} threads"),
    ({"kernels": "aten=DEFAULT onednn=SSE41 cpu=base"},
     "CPU kernels aten=DEFAULT onednn=SSE41 cpu=base \\(this process computes with aten="),
])
def test_loading_a_model_fitted_elsewhere_warns(change, words, tmp_path) -> None:
    profile = dataclasses.replace(_profile(_model({"step.calls": 1.0}, **change)), name="other")
    path = save_profile(profile, tmp_path / "other.yaml")
    with pytest.warns(LatencyModelWarning, match=words):
        load_profile(path)


@pytest.mark.parametrize("kernels", [None, "here"])
def test_loading_a_model_fitted_here_does_not_warn(kernels, tmp_path) -> None:
    """Kernels are compared when the profile recorded them; older profiles have none."""
    recorded = cpu_kernels() if kernels == "here" else None
    profile = dataclasses.replace(_profile(_model({"step.calls": 1.0}, kernels=recorded)),
                                  name="here")
    path = save_profile(profile, tmp_path / "here.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatencyModelWarning)
        load_profile(path)


# ------------------------------------------------------------------------------- the cost model
@pytest.fixture(scope="module")
def graph() -> LayerGraph:
    return LayerGraph.from_model(small_cnn(), input_size=16)


PLANS = {
    "classifier": lambda g: Plan.last_k_layers(g, 1),
    "full": Plan.full,
    "bias": Plan.bias_only,
    "filtered": lambda g: Plan.from_layers(g, {"3": __import__(
        "budgetsearch").LayerUpdate(patch_size=2)}),
}


@pytest.mark.parametrize("plan_name", PLANS)
def test_a_step_constant_alone_is_the_whole_latency(graph, plan_name) -> None:
    plan = PLANS[plan_name](graph)
    cm = CostModel(graph, _profile(_model({"step.calls": 7.5})), batch_size=4)
    assert cm.summarize(plan).latency_ms == pytest.approx(7.5)
    assert cm.summarize(plan).latency_model.startswith("measured")


def test_per_call_costs_count_the_ops(graph) -> None:
    plan = Plan.full(graph)
    cm = CostModel(graph, _profile(_model({"forward.elementwise.calls": 1.0,
                                           "backward.conv.calls": 10.0})), batch_size=4)
    kinds = [n.kind for n in graph.nodes]
    elementwise = sum(k not in ("input", "conv2d", "linear") for k in kinds)
    cost = cm.evaluate(plan)
    assert cost.totals.forward_ms == pytest.approx(elementwise)
    assert cost.totals.backward_ms == pytest.approx(10.0 * kinds.count("conv2d"))
    assert cost.latency_ms == pytest.approx(elementwise + 10.0 * kinds.count("conv2d"))


def test_per_mac_costs_follow_the_cost_rules(graph) -> None:
    plan = Plan.full(graph)
    cm = CostModel(graph, _profile(_model({
        "forward.conv.macs": 1e-6, "forward.linear.macs": 1e-6,
        "backward.conv.grad_input_macs": 2e-6, "backward.conv.grad_weight_macs": 3e-6,
        "backward.linear.grad_input_macs": 2e-6, "backward.linear.grad_weight_macs": 3e-6})),
        batch_size=4)
    t = cm.evaluate(plan).totals
    assert t.forward_ms == pytest.approx(1e-6 * t.forward_macs)
    assert t.backward_ms == pytest.approx(2e-6 * t.grad_input_macs + 3e-6 * t.grad_weight_macs)


def test_features_sum_to_the_prediction(graph) -> None:
    lat = _model({f: 1e-4 * (1 + i % 7) for i, f in enumerate(FEATURES)})
    cm = CostModel(graph, _profile(lat), batch_size=4, optimizer="momentum")
    for build in PLANS.values():
        plan = build(graph)
        assert cm.summarize(plan).latency_ms == pytest.approx(
            lat.predict_ms(cm.latency_features(plan)))
        features = cm.latency_features(plan)
        assert features["forward.conv.macs"] + features["forward.linear.macs"] == pytest.approx(
            cm.evaluate(plan).forward_macs)


def test_filtered_and_sparse_updates_have_their_own_features(graph) -> None:
    from budgetsearch import LayerUpdate

    cm = CostModel(graph, _profile(None), batch_size=2)
    filtered = cm.latency_features(Plan.from_layers(graph, {"3": LayerUpdate(patch_size=2)}))
    sparse = cm.latency_features(Plan.from_layers(graph, {"3": LayerUpdate(channels=(0, 1))}))
    dense = cm.latency_features(Plan.from_layers(graph, {"3": LayerUpdate()}))
    assert filtered.get("backward.filtered.calls") == 1.0
    assert sparse.get("backward.sparse.calls") == 1.0
    assert "backward.filtered.calls" not in dense and "backward.sparse.calls" not in dense


def test_without_a_measured_model_the_analytic_one_is_named(graph) -> None:
    cm = CostModel(graph, _profile(None), batch_size=2)
    assert cm.latency_model.startswith("analytic")
    assert "analytic" in cm.evaluate(Plan.full(graph)).format_table()
