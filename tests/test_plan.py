"""Update plans: constructors, validation against a model, the JSON format, and refusal of
malformed or foreign plan files with a PlanError that names the file and the field."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from budgetsearch.errors import BudgetSearchError, PlanError
from budgetsearch.graph import LayerGraph, block_of
from budgetsearch.models import list_models, load_model
from budgetsearch.plan import SCHEMA_VERSION, LayerUpdate, Plan, load_plan, plan_schema

MODELS = list_models()
SIZE = 64
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "budgetsearch" / "schema" / "plan.schema.json"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny inputs: one thread is faster than two on a shared 2-core machine (no spin-waiting).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def graphs():
    """``graphs(name, num_classes=None)`` -> the model's graph at 64×64, each traced once."""
    cache: dict[tuple[str, int | None], LayerGraph] = {}

    def get(name: str, num_classes: int | None = None) -> LayerGraph:
        key = (name, num_classes)
        if key not in cache:
            torch.manual_seed(0)
            model = load_model(name, weights="random", num_classes=num_classes)
            cache[key] = LayerGraph.from_model(model, input_size=SIZE, model_name=name)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _documented_fingerprint(shapes: dict) -> str:
    """The schema's definition of the fingerprint, computed independently of the library."""
    text = json.dumps([[k, list(v)] for k, v in sorted(shapes.items())], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _head(graph: LayerGraph) -> str:
    return list(graph.layers)[-1]


def _consecutive_blocks(graph: LayerGraph) -> list[list[str]]:
    """Layers grouped into runs of the same block (independent of LayerGraph.blocks)."""
    return [list(g) for _, g in itertools.groupby(graph.layers, key=block_of)]


CONSTRUCTORS = {
    "full": lambda g: Plan.full(g),
    "bias_only": lambda g: Plan.bias_only(g),
    "last_k_layers": lambda g: Plan.last_k_layers(g, 5),
    "last_k_layers_patch": lambda g: Plan.last_k_layers(g, 7, patch_size=4),
    "last_k_blocks": lambda g: Plan.last_k_blocks(g, 2),
    "last_k_blocks_patch": lambda g: Plan.last_k_blocks(g, 3, patch_size=8),
}


def _enrich(plan: Plan, graph: LayerGraph) -> Plan:
    """The plan with output channels on its last weight update, input channels (given unsorted)
    on the first layer, and every optional field set."""
    updates = dict(plan.updates)
    last = [n for n, u in updates.items() if u.mode == "weight"][-1]
    out_ch = graph.layers[last].out_channels
    updates[last] = replace(updates[last], channels=(out_ch - 1, 0, out_ch // 2), axis="out")
    first = next(iter(graph.layers))
    updates[first] = LayerUpdate("weight", channels=(graph.layers[first].in_channels - 1, 0),
                                 axis="in", patch_size=2)  # fmt: skip
    return plan.with_(
        updates=updates,
        batch_size=8,
        device="pixel-8",
        memory_budget_bytes=256 * 1024,
        latency_budget_ms=12.5,
        optimizer="adam",
        filter_mode="paper",
        predicted={"memory_bytes": 123456, "latency_ms": 3.25, "per_layer": [[first, 1.5]]},
        provenance={"method": "test", "params": {"k": 3, "seed": None}, "note": "µ ✓"},
    )


# ---------------------------------------------------------------------------- JSON round trip
@pytest.mark.parametrize("ctor", list(CONSTRUCTORS))
@pytest.mark.parametrize("name", MODELS)
def test_round_trip(graphs, validator, tmp_path, name, ctor) -> None:
    graph = graphs(name)
    plan = _enrich(CONSTRUCTORS[ctor](graph), graph)
    plan.validate(graph)
    assert plan.model == name
    assert plan.input_size == (SIZE, SIZE)
    assert plan.fingerprint == graph.fingerprint == _documented_fingerprint(graph.layer_shapes)

    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert list(back.updates) == list(plan.updates)
    assert back.fingerprint == plan.fingerprint
    assert back.to_json() == text  # serialisation is stable

    first = next(iter(graph.layers))
    last = [n for n, u in plan.updates.items() if u.mode == "weight"]
    assert back.updates[first].channels == (0, graph.layers[first].in_channels - 1)
    assert back.updates[first].axis == "in"
    assert back.updates[first].patch_size == 2
    assert back.updates[last[-1]].axis == "out"
    assert back.predicted == plan.predicted
    assert back.provenance["note"] == "µ ✓"
    assert {n: u.patch_size for n, u in back.updates.items()} == {
        n: u.patch_size for n, u in plan.updates.items()
    }

    path = plan.save(tmp_path / "nested" / "plan.json")
    assert path == tmp_path / "nested" / "plan.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]  # no temp file left
    raw = path.read_text()
    assert raw.endswith("\n")
    loaded = load_plan(path)
    assert loaded == plan
    loaded.validate(graph)
    doc = json.loads(raw)
    validator.validate(doc)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["model"]["fingerprint"] == graph.fingerprint
    assert list(doc["model"]["layer_shapes"]) == list(graph.layers)


def test_plan_schema_is_the_committed_file() -> None:
    assert plan_schema() == json.loads(SCHEMA_FILE.read_text())


def test_the_schemas_bounds_are_the_command_lines() -> None:
    """A plan file takes no size the command line would refuse."""
    from budgetsearch.cli import _common as cli

    props = plan_schema()["properties"]
    recipe = props["recipe"]["properties"]
    assert props["input_size"]["items"]["maximum"] == cli.MAX_INPUT_SIZE
    assert props["batch_size"]["maximum"] == recipe["batch_size"]["maximum"] == cli.MAX_BATCH_SIZE
    assert props["budget"]["properties"]["memory_bytes"]["maximum"] == cli.MAX_BUDGET_BYTES
    assert props["budget"]["properties"]["latency_ms"]["maximum"] == cli.MAX_LATENCY_MS
    assert recipe["epochs"]["maximum"] == cli.MAX_EPOCHS
    assert recipe["seed"]["maximum"] == cli.MAX_SEED
    patch = props["updates"]["additionalProperties"]["properties"]["patch_size"]
    assert patch["maximum"] == cli.MAX_INPUT_SIZE


def test_save_overwrites_atomically(graphs, tmp_path) -> None:
    graph = graphs("mcunet-5fps")
    path = tmp_path / "plan.json"
    Plan.full(graph).save(path)
    Plan.bias_only(graph).save(path)
    assert load_plan(path) == Plan.bias_only(graph)
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


# ----------------------------------------------------------------------------- constructors
@pytest.mark.parametrize("name", MODELS)
def test_full_updates_every_layer(graphs, name) -> None:
    graph = graphs(name)
    plan = Plan.full(graph)
    assert plan.updates == {n: LayerUpdate("weight") for n in graph.layers}
    assert plan.updated_layers == list(graph.layers)


@pytest.mark.parametrize("name", MODELS)
def test_bias_only(graphs, name) -> None:
    graph = graphs(name)
    plan = Plan.bias_only(graph)
    head = _head(graph)
    assert plan.updates[head] == LayerUpdate("weight")
    for lname, layer in graph.layers.items():
        if lname == head:
            continue
        if layer.bias_param is None:
            assert lname not in plan.updates
        else:
            assert plan.updates[lname] == LayerUpdate("bias")
    # Every registered model has a bias (own or batch norm) on every layer.
    assert plan.updated_layers == list(graph.layers)


def test_bias_only_leaves_bias_free_layers_frozen() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(),  # no bias anywhere: frozen
        nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4),  # the batch norm's bias
        nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3, bias=False),
    )  # fmt: skip
    graph = LayerGraph.from_model(model, input_size=8)
    plan = Plan.bias_only(graph)
    assert plan.updates == {
        "2": LayerUpdate("bias"),
        "4": LayerUpdate("bias"),
        "6": LayerUpdate("weight"),  # the head's weight, bias or not
    }


@pytest.mark.parametrize("name", MODELS)
def test_last_k_layers(graphs, name) -> None:
    graph = graphs(name)
    names = list(graph.layers)
    head = names[-1]
    for k in (1, 3, len(names)):
        plan = Plan.last_k_layers(graph, k, patch_size=4)
        assert plan.updated_layers == names[-k:]
        for lname, update in plan.updates.items():
            assert update.mode == "weight"
            assert update.channels is None
            conv_4d = len(graph.layers[lname].weight_shape) == 4
            assert update.patch_size == (4 if conv_4d and lname != head else 1), lname
    assert Plan.last_k_layers(graph, 3).updates == {n: LayerUpdate("weight") for n in names[-3:]}
    for bad in (0, -1, len(names) + 1):
        with pytest.raises(PlanError, match=rf"between 1 and {len(names)}.*got {bad}"):
            Plan.last_k_layers(graph, bad)


@pytest.mark.parametrize("name", MODELS)
def test_last_k_blocks(graphs, name) -> None:
    graph = graphs(name)
    runs = _consecutive_blocks(graph)
    head_run, body = runs[-1], runs[:-1]
    assert head_run == [_head(graph)]
    for k in sorted({0, 1, 2, len(body)}):
        expected = [n for run in runs[len(runs) - 1 - k :] for n in run]
        plan = Plan.last_k_blocks(graph, k)
        assert plan.updates == {n: LayerUpdate("weight") for n in expected}
        patched = Plan.last_k_blocks(graph, k, patch_size=8)
        assert patched.updated_layers == expected
        for lname, update in patched.updates.items():
            conv_4d = len(graph.layers[lname].weight_shape) == 4
            assert update.patch_size == (8 if conv_4d and lname != head_run[0] else 1), lname
    assert Plan.last_k_blocks(graph, len(body)).updates == Plan.full(graph).updates
    for bad in (-1, len(body) + 1):
        with pytest.raises(PlanError, match=rf"between 0 and {len(body)}.*got {bad}"):
            Plan.last_k_blocks(graph, bad)


def test_last_k_blocks_on_mobilenet_v2(graphs) -> None:
    graph = graphs("mobilenet_v2")
    plan = Plan.last_k_blocks(graph, 2, patch_size=4)
    assert plan.updated_layers == [
        "features.17.conv.0.0", "features.17.conv.1.0", "features.17.conv.2", "features.18.0",
        "classifier.1",
    ]  # fmt: skip
    assert [u.patch_size for u in plan.updates.values()] == [4, 4, 4, 4, 1]


def test_from_layers_orders_updates_and_keeps_options(graphs) -> None:
    graph = graphs("resnet18")
    plan = Plan.from_layers(
        graph, {"fc": LayerUpdate("weight"), "conv1": LayerUpdate("bias")}, batch_size=4
    )
    assert plan.updated_layers == ["conv1", "fc"]
    assert plan.batch_size == 4
    assert plan.layer_shapes == graph.layer_shapes


# ------------------------------------------------------------------------------- validation
def test_plan_for_another_model_is_refused(graphs) -> None:
    mbv2, resnet = graphs("mobilenet_v2"), graphs("resnet18")
    plan = Plan.full(mbv2)
    plan.validate(mbv2)
    missing = [n for n in mbv2.layer_shapes if n not in resnet.layer_shapes]
    extra = [n for n in resnet.layer_shapes if n not in mbv2.layer_shapes]
    assert missing and extra
    for target in (resnet, resnet.layer_shapes):
        with pytest.raises(PlanError) as info:
            plan.validate(target)
        msg = str(info.value)
        assert "mobilenet_v2" in msg
        assert mbv2.fingerprint in msg and resnet.fingerprint in msg
        assert f"{missing[0]}: missing from the model" in msg
        assert f"... and {len(missing) + len(extra) - 8} more" in msg


def test_head_mismatch_names_only_the_head(graphs) -> None:
    g1000, g10 = graphs("mobilenet_v2"), graphs("mobilenet_v2", num_classes=10)
    for plan, target, has, expected in [
        (Plan.full(g10), g1000, "[1000, 1280]", "[10, 1280]"),
        (Plan.bias_only(g1000), g10, "[10, 1280]", "[1000, 1280]"),
    ]:
        with pytest.raises(PlanError) as info:
            plan.validate(target)
        msg = str(info.value)
        assert f"classifier.1: shape {has} in the model, {expected} expected" in msg
        assert "features." not in msg  # the layers that agree are not listed
        assert "more" not in msg


def test_same_architecture_validates(graphs) -> None:
    torch.manual_seed(1)
    other = LayerGraph.from_model(load_model("resnet18", weights="random"), input_size=32)
    Plan.last_k_blocks(graphs("resnet18"), 2).validate(other)
    Plan.last_k_blocks(graphs("resnet18"), 2).validate(dict(other.layer_shapes))


def test_layer_the_model_lacks(graphs) -> None:
    graph = graphs("mobilenet_v2")
    with pytest.raises(PlanError, match=r"lacks: features\.99\.0") as info:
        Plan.from_layers(graph, {"features.0.0": LayerUpdate(), "features.99.0": LayerUpdate()})
    assert "features.0.0," in str(info.value)  # and lists the model's layers


@pytest.mark.parametrize(
    ("channels", "bad"), [((3, 32, 40), "[32, 40]"), ((0, 31, 32), "[32]"), ((-1, 4), "[-1]")]
)
def test_output_channels_out_of_range(graphs, channels, bad) -> None:
    graph = graphs("mobilenet_v2")  # features.0.0 has 32 output channels
    update = LayerUpdate("weight", channels=channels)
    with pytest.raises(PlanError) as info:
        Plan.from_layers(graph, {"features.0.0": update})
    msg = str(info.value)
    assert "layer features.0.0" in msg
    assert "output channel" in msg
    assert bad in msg
    assert "0..31" in msg


def test_output_channels_in_range(graphs) -> None:
    graph = graphs("mobilenet_v2")
    plan = Plan.from_layers(graph, {"features.0.0": LayerUpdate("weight", channels=(31, 0))})
    assert plan.updates["features.0.0"].channels == (0, 31)
    assert plan.updates["features.0.0"].fraction(32) == pytest.approx(2 / 32)


@pytest.mark.parametrize(
    ("layer", "limit"),
    [
        ("features.1.conv.0.0", 32),  # depthwise: weight (32, 1, 3, 3), 32 input channels
        ("features.2.conv.0.0", 16),  # pointwise 16 -> 96
        ("classifier.1", 1280),  # linear
    ],
)
def test_input_channels_checked_against_the_graph(graphs, layer, limit) -> None:
    graph = graphs("mobilenet_v2")
    ok = Plan.from_layers(graph, {layer: LayerUpdate("weight", channels=(0, limit - 1), axis="in")})
    ok.validate(graph)
    bad_update = LayerUpdate("weight", channels=(1, limit, limit + 5), axis="in")
    bad = Plan.from_layers(graph, {layer: bad_update})  # the weight alone cannot tell the bound
    bad.validate(dict(graph.layer_shapes))
    with pytest.raises(PlanError) as info:
        bad.validate(graph)
    msg = str(info.value)
    assert f"layer {layer}" in msg
    assert "input channel" in msg
    assert f"0..{limit - 1}" in msg
    assert f"[{limit}, {limit + 5}]" in msg
    # And after a trip through a file.
    with pytest.raises(PlanError, match=re.escape(f"[{limit}, {limit + 5}]")):
        Plan.from_json(bad.to_json()).validate(graph)


def test_negative_input_channel(graphs) -> None:
    graph = graphs("mobilenet_v2")
    with pytest.raises(PlanError) as info:
        Plan.from_layers(
            graph, {"features.1.conv.0.0": LayerUpdate("weight", channels=(-2, 3), axis="in")}
        )
    msg = str(info.value)
    assert "layer features.1.conv.0.0" in msg
    assert "[-2]" in msg
    assert "0..0" not in msg  # the input bound is not known here; no made-up range


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"mode": "all"}, "mode must be one of bias, weight"),
        ({"axis": "both"}, "axis must be one of out, in"),
        ({"patch_size": 0}, "patch_size must be an integer >= 1"),
        ({"patch_size": 2.5}, "patch_size must be an integer >= 1"),
        ({"channels": ()}, "at least one index"),
    ],
)
def test_layer_update_refuses(kwargs, pattern) -> None:
    with pytest.raises(PlanError, match=pattern):
        LayerUpdate(**kwargs)


def test_layer_update_sorts_and_dedups_channels() -> None:
    update = LayerUpdate("weight", channels=[5, 1, 5, 3])
    assert update.channels == (1, 3, 5)
    assert update.to_dict() == {"mode": "weight", "channels": [1, 3, 5], "axis": "out"}
    assert LayerUpdate("bias").to_dict() == {"mode": "bias"}
    assert LayerUpdate(patch_size=4).to_dict() == {"mode": "weight", "patch_size": 4}


def test_axis_without_channels_round_trips(graphs) -> None:
    graph = graphs("resnet18")
    plan = Plan.from_layers(graph, {"fc": LayerUpdate("weight", axis="in")})
    back = Plan.from_json(plan.to_json())
    assert back.updates["fc"].axis == "in"
    assert back == plan


def test_channels_need_weight_mode(graphs) -> None:
    graph = graphs("resnet18")
    with pytest.raises(PlanError, match="layer conv1: channels are only meaningful"):
        Plan.from_layers(graph, {"conv1": LayerUpdate("bias", channels=(0,))})


def test_filters_need_a_conv_weight_update(graphs) -> None:
    """A gradient filter on a linear layer, or on a bias-only update, was accepted and failed
    (or was silently dropped) only when training began."""
    graph = graphs("resnet18")
    with pytest.raises(PlanError, match=r"layer fc: a gradient filter \(patch_size 4\) filters "
                                        r"a conv's weight gradient; this update is a linear"):
        Plan.from_layers(graph, {"fc": LayerUpdate("weight", patch_size=4)})
    with pytest.raises(PlanError, match=r"layer conv1: .* this update is mode 'bias'"):
        Plan.from_layers(graph, {"conv1": LayerUpdate("bias", patch_size=2)})
    assert Plan.from_layers(graph, {"conv1": LayerUpdate("weight", patch_size=2)}).updates


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"optimizer": "rmsprop"}, "sgd, momentum, adam"),
        ({"filter_mode": "exact"}, "filter_mode must be one of normalized, paper, corrected"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_plan_refuses_bad_options(graphs, kwargs, pattern) -> None:
    with pytest.raises(PlanError, match=pattern):
        Plan.full(graphs("resnet18"), **kwargs)


class _Reordered(nn.Module):
    """Registers its head before the conv that runs first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.conv(x)), 1))


def test_updated_layers_in_forward_order_when_registration_differs() -> None:
    graph = LayerGraph.from_model(_Reordered(), input_size=8)
    assert list(graph.layers) == ["conv", "head"]
    assert Plan.full(graph).updated_layers == ["conv", "head"]


# ---------------------------------------------------------------------- hand-edited files
@pytest.fixture(scope="module")
def mbv2_doc(graphs):
    graph = graphs("mobilenet_v2")
    return _enrich(Plan.last_k_blocks(graph, 2, patch_size=4), graph).to_dict()


def _write(tmp_path: Path, doc) -> Path:
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["model"]["layer_shapes"].__setitem__("features.0.0", [16, 3, 3, 3]),
        lambda d: d["model"]["layer_shapes"].pop("features.5.conv.2"),
        lambda d: d["model"].__setitem__("fingerprint", "0123456789abcdef"),
    ],
)
def test_fingerprint_mismatch_in_edited_file(tmp_path, mbv2_doc, edit) -> None:
    doc = copy.deepcopy(mbv2_doc)
    edit(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(PlanError) as info:
        load_plan(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: field model.fingerprint")
    assert "edited or corrupted" in msg


def test_consistently_edited_file_loads_but_is_refused_by_the_model(
    tmp_path, graphs, mbv2_doc
) -> None:
    doc = copy.deepcopy(mbv2_doc)
    doc["model"]["layer_shapes"]["features.3.conv.2"] = [24, 144, 3, 3]
    doc["model"]["fingerprint"] = _documented_fingerprint(doc["model"]["layer_shapes"])
    plan = load_plan(_write(tmp_path, doc))
    with pytest.raises(PlanError) as info:
        plan.validate(graphs("mobilenet_v2"))
    msg = str(info.value)
    assert "features.3.conv.2: shape [24, 144, 1, 1] in the model, [24, 144, 3, 3] expected" in msg
    assert msg.count(": shape") == 1


def test_unknown_layer_in_file(tmp_path, mbv2_doc) -> None:
    doc = copy.deepcopy(mbv2_doc)
    doc["updates"]["features.42.conv"] = {"mode": "bias"}
    path = _write(tmp_path, doc)
    with pytest.raises(PlanError, match=re.escape(f"{path}: the plan names layers the model lacks: "
                                                  "features.42.conv")):  # fmt: skip
        load_plan(path)


def test_missing_file_and_directory(tmp_path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(PlanError, match=re.escape(f"cannot read plan file {missing}")):
        load_plan(missing)
    with pytest.raises(PlanError, match=re.escape(str(tmp_path))):
        load_plan(tmp_path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("[" * 100_000, "not valid JSON"),  # too deep for the parser
        ('{"batch_size": ' + "9" * 5000 + "}", "not valid JSON"),  # too many digits
        ("[]", r"field \(top level\): \[\] is not of type 'object'"),
        ("null", r"field \(top level\)"),
    ],
)
def test_not_a_plan_document(text, pattern) -> None:
    with pytest.raises(PlanError, match=rf"^in\.json: {pattern}"):
        Plan.from_json(text, source="in.json")


def test_nan_infinity_and_whole_floats_are_refused(mbv2_doc) -> None:
    """json.loads takes NaN and Infinity and JSON Schema takes 2.0 as an integer: a plan does
    not, naming the field."""
    for value in ("NaN", "Infinity", "-Infinity"):
        text = json.dumps({**mbv2_doc, "batch_size": "X"}).replace('"X"', value, 1)
        with pytest.raises(PlanError, match=rf"^in\.json: not valid JSON: {value} is not a "
                                            "JSON number"):
            Plan.from_json(text, source="in.json")
    for field, value in (("batch_size", 2.0), ("input_size", [128.0, 96.0])):
        with pytest.raises(PlanError, match=rf"^in\.json: field {field}.*is not of type "
                                            "'integer'"):
            Plan.from_dict({**mbv2_doc, field: value}, source="in.json")


def test_file_not_utf8(tmp_path, mbv2_doc) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps(mbv2_doc).encode()[:-1] + b"\xff}")
    with pytest.raises(PlanError, match=re.escape(str(path))):
        load_plan(path)


# ------------------------------------------------------------------- property-based refusals
class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.pw(self.dw(x))
        return self.head(torch.flatten(self.pool(x), 1))


def _small_doc() -> dict:
    graph = LayerGraph.from_model(_Small(), input_size=8, model_name="small")
    plan = Plan.from_layers(
        graph,
        {
            "stem": LayerUpdate("bias"),
            "dw": LayerUpdate("weight", channels=(0, 7), axis="in", patch_size=2),
            "pw": LayerUpdate("weight", channels=(1, 2, 3), patch_size=4),
            "head": LayerUpdate("weight"),
        },
        device="mcu",
        memory_budget_bytes=65536,
        latency_budget_ms=100.0,
        predicted={"memory_bytes": 1000, "per_layer": {"pw": [1, 2.5]}},
        provenance={"method": "manual", "versions": {"budgetsearch": "0"}},
    )
    doc = plan.to_dict()
    Plan.from_dict(doc)  # the unmutated document is valid
    return doc


SMALL_DOC = _small_doc()
SMALL_TEXT = json.dumps(SMALL_DOC, indent=1)
SOURCE = "mutated-plan.json"
HYPOTHESIS = settings(max_examples=150, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(doc, prefix=()) -> list[tuple]:
    """Every path to a value inside a JSON document."""
    if isinstance(doc, dict):
        items = doc.items()
    else:
        items = enumerate(doc) if isinstance(doc, list) else ()
    out = []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _kind(value) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


ALL_PATHS = _paths(SMALL_DOC)
KEY_PATHS = [p for p in ALL_PATHS if isinstance(_get(SMALL_DOC, p[:-1]), dict)]
DICT_PATHS = [(), *(p for p in ALL_PATHS if isinstance(_get(SMALL_DOC, p), dict))]


def _names_field(msg: str, path: tuple) -> bool:
    """Whether a PlanError message names the mutated field (or its parent, a child, or the
    fingerprint computed from it), or for a plan-level refusal, the mutated layer."""
    head = f"{SOURCE}: field "
    if not msg.startswith(head):
        return len(path) >= 2 and path[0] == "updates" and f"{path[1]}" in msg
    rest = msg[len(head) :]
    if rest.startswith("(top level): "):
        return repr(path[0]) in rest or json.dumps(path[0]) in rest
    if rest.startswith("model.fingerprint "):  # a layer_shapes edit breaks the fingerprint
        return path[:2] in (("model", "layer_shapes"), ("model", "fingerprint"))
    joined = [".".join(str(p) for p in path[:i]) for i in range(1, len(path) + 1)]
    return any(rest.startswith(f"{j}: ") for j in joined) or rest.startswith(f"{joined[-1]}.")


def _check(text: str, path: tuple) -> None:
    """from_json returns a plan that round-trips, or raises a PlanError naming source and field."""
    try:
        plan = Plan.from_json(text, source=SOURCE)
    except PlanError as exc:
        msg = str(exc)
        assert msg.startswith(f"{SOURCE}: "), msg
        assert _names_field(msg, path), (path, msg)
    else:
        assert isinstance(plan, Plan)
        assert Plan.from_json(plan.to_json()) == plan


@HYPOTHESIS
@given(st.sampled_from(KEY_PATHS))
def test_deleting_a_key(path) -> None:
    doc = copy.deepcopy(SMALL_DOC)
    del _get(doc, path[:-1])[path[-1]]
    _check(json.dumps(doc), path)


@pytest.mark.parametrize(
    "path",
    [("model",), ("model", "fingerprint"), ("updates", "pw", "mode"), ("batch_size",),
     ("input_size",), ("schema_version",), ("model", "layer_shapes", "dw")],
)  # fmt: skip
def test_deleting_a_required_key_is_refused(path) -> None:
    doc = copy.deepcopy(SMALL_DOC)
    del _get(doc, path[:-1])[path[-1]]
    with pytest.raises(PlanError) as info:
        Plan.from_json(json.dumps(doc), source=SOURCE)
    assert _names_field(str(info.value), path), str(info.value)


@pytest.mark.parametrize(
    "path",
    [("device",), ("budget",), ("optimizer",), ("filter_mode",), ("predicted",), ("provenance",),
     ("model", "name"), ("updates", "head"), ("updates", "pw", "channels"),
     ("updates", "pw", "patch_size")],
)  # fmt: skip
def test_deleting_an_optional_key_is_accepted(path) -> None:
    doc = copy.deepcopy(SMALL_DOC)
    del _get(doc, path[:-1])[path[-1]]
    plan = Plan.from_json(json.dumps(doc))
    assert plan.fingerprint == SMALL_DOC["model"]["fingerprint"]


@HYPOTHESIS
@given(st.sampled_from(ALL_PATHS), json_values)
def test_replacing_a_value_with_another_type(path, value) -> None:
    doc = copy.deepcopy(SMALL_DOC)
    assume(_kind(value) != _kind(_get(doc, path)))
    _get(doc, path[:-1])[path[-1]] = value
    _check(json.dumps(doc), path)


@pytest.mark.parametrize(
    ("path", "value"),
    [(("batch_size",), "8"), (("input_size",), 64), (("input_size", 0), 0), (("optimizer",), 1),
     (("model", "fingerprint"), None), (("updates", "dw", "axis"), "both"),
     (("updates", "pw", "patch_size"), 0), (("updates", "pw", "mode"), True),
     (("model", "layer_shapes", "pw"), [4, 8, 1, 1, 1]), (("budget", "memory_bytes"), -1),
     (("updates",), []), (("model", "name"), 3),
     # typos of a hand edit, far past anything the command line takes
     (("input_size", 0), 1_000_000), (("batch_size",), 10**30),
     (("budget", "memory_bytes"), 10**400), (("budget", "latency_ms"), 1e30),
     (("updates", "pw", "patch_size"), 10**6), (("provenance", "memory_measure"), "foo")],
)  # fmt: skip
def test_wrong_values_are_refused_naming_the_field(path, value) -> None:
    doc = copy.deepcopy(SMALL_DOC)
    _get(doc, path[:-1])[path[-1]] = value
    with pytest.raises(PlanError) as info:
        Plan.from_json(json.dumps(doc), source=SOURCE)
    msg = str(info.value)
    assert msg.startswith(f"{SOURCE}: field {'.'.join(map(str, path))}: "), msg


@HYPOTHESIS
@given(st.sampled_from(DICT_PATHS), st.text(min_size=1, max_size=8), json_values)
def test_adding_an_unknown_key(path, key, value) -> None:
    doc = copy.deepcopy(SMALL_DOC)
    target = _get(doc, path)
    assume(key not in target)
    target[key] = value
    _check(json.dumps(doc), (*path, key))


@pytest.mark.parametrize("path", [(), ("model",), ("budget",), ("updates", "pw")])
def test_unknown_keys_are_refused_where_the_format_is_closed(path) -> None:
    doc = copy.deepcopy(SMALL_DOC)
    _get(doc, path)["colour"] = "blue"
    with pytest.raises(PlanError, match="'colour' was unexpected") as info:
        Plan.from_json(json.dumps(doc), source=SOURCE)
    assert _names_field(str(info.value), (*path, "colour"))


@HYPOTHESIS
@given(
    st.sampled_from(["stem", "dw", "pw", "head"]),
    st.lists(st.integers(min_value=-3, max_value=2**40), max_size=6)
    | st.lists(json_values, max_size=3),
    st.sampled_from([None, "in", "out"]),
)
def test_corrupted_channels(layer, channels, axis) -> None:
    doc = copy.deepcopy(SMALL_DOC)
    doc["updates"][layer]["channels"] = channels
    if axis is not None:
        doc["updates"][layer]["axis"] = axis
    _check(json.dumps(doc), ("updates", layer, "channels"))


@pytest.mark.parametrize(
    ("layer", "channels", "pattern"),
    [
        ("pw", [], r"field updates\.pw\.channels: \[\] should be non-empty"),
        ("pw", [1, 1], r"field updates\.pw\.channels: .*non-unique"),
        ("pw", [-1], r"field updates\.pw\.channels\.0: -1 is less than the minimum"),
        ("pw", [1, "2"], r"field updates\.pw\.channels\.1: '2' is not of type 'integer'"),
        ("pw", [4], r"layer pw: output channel indices out of range 0\.\.3: \[4\]"),
        ("stem", [0], r"layer stem: channels are only meaningful with mode 'weight'"),
    ],
)
def test_corrupted_channels_messages(layer, channels, pattern) -> None:
    doc = copy.deepcopy(SMALL_DOC)
    doc["updates"][layer]["channels"] = channels
    with pytest.raises(PlanError, match=rf"^{re.escape(SOURCE)}: {pattern}"):
        Plan.from_json(json.dumps(doc), source=SOURCE)


@HYPOTHESIS
@given(st.text(max_size=40))
def test_arbitrary_text(text) -> None:
    try:
        Plan.from_json(text, source=SOURCE)
    except PlanError as exc:
        msg = str(exc)
        assert msg.startswith(f"{SOURCE}: not valid JSON: ") or msg.startswith(
            f"{SOURCE}: field (top level): "
        ), msg
    else:
        pytest.fail(f"{text!r} was read as a plan")


@HYPOTHESIS
@given(st.integers(min_value=0, max_value=len(SMALL_TEXT) - 1))
def test_truncated_text(n) -> None:
    pattern = rf"^{re.escape(SOURCE)}: not valid JSON: .*line \d+ column"
    with pytest.raises(PlanError, match=pattern):
        Plan.from_json(SMALL_TEXT[:n], source=SOURCE)


@HYPOTHESIS
@given(data=st.data())
def test_load_plan_of_damaged_bytes(tmp_path, data) -> None:
    raw = bytearray(SMALL_TEXT.encode())
    how = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    else:
        raw = bytearray(data.draw(st.binary(max_size=64)))
    path = tmp_path / "damaged.json"
    path.write_bytes(bytes(raw))
    try:
        plan = load_plan(path)
    except PlanError as exc:
        assert str(exc).startswith(f"{path}: "), str(exc)
    except BudgetSearchError as exc:  # pragma: no cover - a PlanError is expected
        pytest.fail(f"{type(exc).__name__} instead of PlanError: {exc}")
    else:
        assert plan == Plan.from_json(plan.to_json())
