"""The layer graph: op nodes with shapes and storages, trainable layers, biases, both tracers,
and which nodes backward runs on."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

from budgetsearch.cost import RULES
from budgetsearch.errors import GraphError
from budgetsearch.graph import LayerGraph, block_of
from budgetsearch.models import list_models, load_model
from budgetsearch.tracing import _LeafTracer

MODELS = list_models()
SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny inputs: one thread is faster than two on a shared 2-core machine (no spin-waiting).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def traced():
    """``traced(name)`` -> (model in eval mode, its graph at 64×64, its torch.nn leaf-module calls
    recorded independently with plain hooks), each model built, traced and run once."""
    cache: dict[str, tuple[nn.Module, LayerGraph, list[dict]]] = {}

    def get(name: str) -> tuple[nn.Module, LayerGraph, list[dict]]:
        if name not in cache:
            torch.manual_seed(0)
            model = load_model(name, weights="random").eval()
            graph = LayerGraph.from_model(model, input_size=SIZE, model_name=name)
            cache[name] = (model, graph, _leaf_calls(model))
        return cache[name]

    return get


def _is_torch_leaf(module: nn.Module) -> bool:
    """A torch.nn module without children, or a custom module of a kind with a cost rule (the
    MCU ``Clamp``, torchvision's ``StochasticDepth``): what both tracers record as one module
    op."""
    if isinstance(module, _LeafTracer.leaves):
        return True
    return not list(module.children()) and type(module).__module__.startswith("torch.nn")


def _leaf_calls(model: nn.Module, size: int = SIZE) -> list[dict]:
    """Every torch.nn leaf-module call of one forward pass, in order, recorded with plain hooks:
    name, module, output shape, input tensors and output tensor (the last entry is the model's
    output)."""
    calls: list[dict] = []

    def hook(name):
        def record(module, args, out):
            calls.append(
                {"name": name, "module": module, "shape": tuple(out.shape), "inputs": args,
                 "out": out}
            )  # fmt: skip

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if n and _is_torch_leaf(m)
    ]
    try:
        with torch.no_grad():
            out = model(torch.randn(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return [
        *calls,
        {"name": None, "module": None, "shape": tuple(out.shape), "inputs": (), "out": out},
    ]


# ------------------------------------------------------------------------------- every model
@pytest.mark.parametrize("name", MODELS)
def test_one_node_per_op_with_shapes(traced, name) -> None:
    _, graph, calls = traced(name)
    nodes = graph.nodes
    assert [n.index for n in nodes] == list(range(len(nodes)))
    assert nodes[0].kind == "input"
    assert nodes[0].shape == (1, 3, SIZE, SIZE)
    assert [n for n in nodes if n.kind == "input"] == [nodes[0]]
    for node in nodes:
        assert node.shape[0] == 1, node
        assert all(i < node.index for i in node.inputs), node
        assert node.kind in RULES, f"{node.name}: kind {node.kind!r} has no cost rule"
        assert node.itemsize == 4
        assert node.storage <= node.index
        assert node.storage_numel >= node.numel
    assert all(node.inputs for node in nodes[1:])
    *calls, output = calls
    assert nodes[-1].shape == output["shape"]
    # Every op feeds the output: nothing dead is recorded.
    assert nx.is_directed_acyclic_graph(graph.graph)
    assert nx.ancestors(graph.graph, nodes[-1].index) == set(range(len(nodes) - 1))
    # Exactly one node per torch.nn module call, with that call's output shape.
    module_nodes = [n for n in nodes if n.module is not None]
    assert [n.module for n in module_nodes] == [c["name"] for c in calls]
    assert [n.shape for n in module_nodes] == [c["shape"] for c in calls]


@pytest.mark.parametrize("name", MODELS)
def test_conv_and_linear_shapes_follow_from_their_inputs(traced, name) -> None:
    _, graph, _ = traced(name)
    for node in graph.nodes:
        if node.kind == "conv2d":
            _, c, h, w = graph.nodes[node.inputs[0]].shape
            a = node.attrs
            assert c == a["in_channels"]
            expect = [
                (size + 2 * a["padding"][i] - a["dilation"][i] * (a["kernel_size"][i] - 1) - 1)
                // a["stride"][i] + 1
                for i, size in enumerate((h, w))
            ]  # fmt: skip
            assert node.shape == (1, a["out_channels"], *expect), node.name
        elif node.kind == "linear":
            assert graph.nodes[node.inputs[0]].shape[-1] == node.attrs["in_channels"]
            assert node.shape[-1] == node.attrs["out_channels"]


@pytest.mark.parametrize("name", MODELS)
def test_layers_are_the_convs_and_linears_in_forward_order(traced, name) -> None:
    model, graph, calls = traced(name)
    order = [c["name"] for c in calls if isinstance(c["module"], (nn.Conv2d, nn.Linear))]
    assert list(graph.layers) == order
    assert graph.layer_names == order
    # layer_shapes (the fingerprint's input) lists the same layers in the same order.
    assert list(graph.layer_shapes) == order
    modules = dict(model.named_modules())
    for i, (lname, layer) in enumerate(graph.layers.items()):
        module = modules[lname]
        assert layer.name == lname
        assert layer.index == i
        assert layer.weight_shape == tuple(module.weight.shape)
        assert graph.layer_shapes[lname] == list(module.weight.shape)
        assert layer.groups == getattr(module, "groups", 1)
        assert layer.block == block_of(lname)
        node = graph.nodes[layer.node]
        assert node.module == lname
        assert node.layer == lname
        assert node.kind == ("conv2d" if isinstance(module, nn.Conv2d) else "linear")
        if isinstance(module, nn.Conv2d):
            assert layer.in_channels == module.in_channels
            assert layer.out_channels == module.out_channels
        else:
            assert layer.in_channels == module.in_features
            assert layer.out_channels == module.out_features
        assert layer.weight_numel == module.weight.numel()


@pytest.mark.parametrize("name", MODELS)
def test_bias_is_own_or_of_the_following_batch_norm(traced, name) -> None:
    model, graph, calls = traced(name)
    params = dict(model.named_parameters())
    by_name = {c["name"]: c for c in calls}
    for lname, layer in graph.layers.items():
        module = by_name[lname]["module"]
        if module.bias is not None:
            expected, expected_node = f"{lname}.bias", layer.node
        else:
            out = by_name[lname]["out"]
            consumers = [c for c in calls if any(t is out for t in c["inputs"])]
            assert len(consumers) == 1 and isinstance(consumers[0]["module"], nn.BatchNorm2d)
            expected = f"{consumers[0]['name']}.bias"
            expected_node = next(n.index for n in graph.nodes if n.module == consumers[0]["name"])
        assert layer.bias_param == expected
        assert layer.bias_node == expected_node
        assert graph.nodes[expected_node].bias_of == lname
        assert params[expected].shape == (layer.out_channels,)
        assert layer.bias_numel == layer.out_channels
    holders = [n for n in graph.nodes if n.bias_of is not None]
    assert sorted(n.index for n in holders) == sorted(
        la.bias_node for la in graph.layers.values() if la.bias_node is not None
    )


@pytest.mark.parametrize("name", MODELS)
def test_blocks_group_layers_in_forward_order(traced, name) -> None:
    _, graph, _ = traced(name)
    blocks = graph.blocks()
    assert [n for names in blocks.values() for n in names] == list(graph.layers)
    for block, names in blocks.items():
        assert all(block_of(n) == block for n in names)


# ------------------------------------------------------------------------- specific models
def test_mobilenet_v2_biases_come_from_batch_norms(traced) -> None:
    _, graph, _ = traced("mobilenet_v2")
    first = graph.layers["features.0.0"]
    assert first.bias_param == "features.0.1.bias"
    assert graph.nodes[first.bias_node].module == "features.0.1"
    assert graph.nodes[first.bias_node].kind == "batch_norm"
    assert graph.layers["features.1.conv.0.0"].bias_param == "features.1.conv.0.1.bias"
    assert graph.layers["features.1.conv.1"].bias_param == "features.1.conv.2.bias"
    assert graph.layers["features.18.0"].bias_param == "features.18.1.bias"
    head = graph.layers["classifier.1"]
    assert head.bias_param == "classifier.1.bias"
    assert head.bias_node == head.node
    assert len(graph.layers) == 53
    dw = graph.layers["features.1.conv.0.0"]
    assert dw.groups == 32
    assert dw.weight_shape == (32, 1, 3, 3)
    assert dw.in_channels == 32


def test_mcunet_convs_have_their_own_bias(traced) -> None:
    model, graph, _ = traced("mcunet-5fps")
    assert len(graph.layers) == 43
    for lname, layer in graph.layers.items():
        assert model.get_submodule(lname).bias is not None
        assert layer.bias_param == f"{lname}.bias"
        assert layer.bias_node == layer.node
        assert graph.nodes[layer.node].bias_of == lname


def test_mobilenet_v2_inplace_relu6_shares_the_batch_norm_storage(traced) -> None:
    model, graph, _ = traced("mobilenet_v2")
    by_module = {n.module: n for n in graph.nodes if n.module}
    bn, relu = by_module["features.0.1"], by_module["features.0.2"]
    assert model.get_submodule("features.0.2").inplace
    assert relu.kind == "hardtanh"
    assert relu.inputs == (bn.index,)
    assert bn.storage == bn.index
    assert relu.storage == bn.index
    conv = by_module["features.0.0"]
    assert conv.storage == conv.index  # a conv allocates its output
    relus = [n for n in graph.nodes if n.kind == "hardtanh"]
    assert len(relus) == 35
    for node in relus:
        src = graph.nodes[node.inputs[0]]
        assert src.kind == "batch_norm"
        assert node.storage == src.storage == src.index
        assert node.storage_numel == src.numel


def test_mcunet_clamps_allocate(traced) -> None:
    # torch.clamp is out of place: every clamp has its own storage.
    _, graph, _ = traced("mcunet-5fps")
    clamps = [n for n in graph.nodes if n.kind == "clamp"]
    assert clamps
    assert all(n.storage == n.index for n in clamps)


@pytest.mark.parametrize(
    ("layer", "block"),
    [
        ("features.3.conv.0.0", "features.3"),
        ("layer1.0.conv1", "layer1.0"),
        ("features.2.0.block.1.0", "features.2.0"),
        ("features.0.0", "features.0.0"),
        ("blocks.4.depthwise", "blocks.4"),
        ("classifier.1", "classifier.1"),
        ("fc", "fc"),
        ("first_conv", "first_conv"),
        ("layer1.0.downsample.0", "layer1.0"),
        ("stage2.0.branch1.0", "stage2.0"),
        ("conv1.0", "conv1.0"),
        ("a.b.c", "a.b.c"),
        ("12", "12"),
    ],
)
def test_block_of(layer, block) -> None:
    assert block_of(layer) == block


# ---------------------------------------------------------------------------- both tracers
def _both(name):
    torch.manual_seed(0)
    model = load_model(name, weights="random")
    fx_graph = LayerGraph.from_model(model, input_size=SIZE, tracer="fx")
    hooks_graph = LayerGraph.from_model(model, input_size=SIZE, tracer="hooks")
    assert fx_graph.tracer == "fx"
    assert hooks_graph.tracer == "hooks"
    return fx_graph, hooks_graph


@pytest.fixture(scope="module")
def both_tracers():
    cache: dict[str, tuple[LayerGraph, LayerGraph]] = {}

    def get(name):
        if name not in cache:
            cache[name] = _both(name)
        return cache[name]

    return get


@pytest.mark.parametrize(
    "name",
    [
        "mobilenet_v2",
        "resnet18",
        "mcunet-5fps",
        "efficientnet_b0",
    ],
)
def test_fx_and_hooks_record_the_same_ops(both_tracers, name) -> None:
    a, b = both_tracers(name)
    assert [n.kind for n in a.nodes] == [n.kind for n in b.nodes]
    assert [n.inputs for n in a.nodes] == [n.inputs for n in b.nodes]
    assert [n.shape for n in a.nodes] == [n.shape for n in b.nodes]
    assert [n.attrs for n in a.nodes] == [n.attrs for n in b.nodes]
    assert [n.layer for n in a.nodes] == [n.layer for n in b.nodes]
    assert [n.bias_of for n in a.nodes] == [n.bias_of for n in b.nodes]
    assert a.layer_shapes == b.layer_shapes
    assert a.fingerprint == b.fingerprint
    assert {k: (v.node, v.bias_node, v.bias_param) for k, v in a.layers.items()} == {
        k: (v.node, v.bias_node, v.bias_param) for k, v in b.layers.items()
    }


@pytest.mark.parametrize(
    "name",
    [
        "mobilenet_v2",
        "resnet18",
        "mcunet-5fps",
    ],
)
def test_fx_and_hooks_agree_on_storages(both_tracers, name) -> None:
    a, b = both_tracers(name)
    assert [n.storage for n in a.nodes] == [n.storage for n in b.nodes]
    assert [n.storage_numel for n in a.nodes] == [n.storage_numel for n in b.nodes]


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.abs().sum() >= 0:  # data-dependent: torch.fx cannot trace this
            x = torch.relu(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def test_data_dependent_control_flow_falls_back_to_hooks() -> None:
    model = _DataDependent()
    graph = LayerGraph.from_model(model, input_size=16)
    assert graph.tracer == "hooks"
    assert list(graph.layers) == ["conv", "fc"]
    assert graph.layers["conv"].bias_param == "bn.bias"
    assert graph.layers["fc"].bias_param == "fc.bias"
    assert [n.kind for n in graph.nodes] == [
        "input", "conv2d", "batch_norm", "relu", "adaptive_avg_pool2d", "view", "linear",
    ]  # fmt: skip
    assert graph.nodes[-1].shape == (1, 4)
    with pytest.raises(GraphError, match=r"torch\.fx cannot trace"):
        LayerGraph.from_model(model, input_size=16, tracer="fx")


# ------------------------------------------------------------------------------ tiny model
def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),  # node 1
        nn.BatchNorm2d(4),  # node 2
        nn.ReLU(),  # node 3
        nn.Conv2d(4, 8, 3, padding=1, bias=False),  # node 4
        nn.BatchNorm2d(8),  # node 5
        nn.ReLU(inplace=True),  # node 6
        nn.AdaptiveAvgPool2d(1),  # node 7
        nn.Flatten(),  # node 8
        nn.Linear(8, 5),  # node 9
    )


@pytest.fixture(scope="module", params=["fx", "hooks"])
def tiny(request):
    model = _tiny()
    return model, LayerGraph.from_model(model, input_size=8, tracer=request.param)


def test_tiny_graph_structure(tiny) -> None:
    _, graph = tiny
    assert [n.kind for n in graph.nodes] == [
        "input", "conv2d", "batch_norm", "relu", "conv2d", "batch_norm", "relu",
        "adaptive_avg_pool2d", "view", "linear",
    ]  # fmt: skip
    assert [n.inputs for n in graph.nodes] == [(), *[(i,) for i in range(9)]]
    assert [n.shape for n in graph.nodes] == [
        (1, 3, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8), (1, 8, 8, 8), (1, 8, 8, 8),
        (1, 8, 8, 8), (1, 8, 1, 1), (1, 8), (1, 5),
    ]  # fmt: skip
    # The out-of-place ReLU allocates; the in-place one and the flatten view do not.
    assert [n.storage for n in graph.nodes] == [0, 1, 2, 3, 4, 5, 5, 7, 7, 9]
    assert graph.nodes[8].storage_numel == 8
    assert list(graph.layers) == ["0", "3", "8"]
    assert [la.bias_param for la in graph.layers.values()] == ["1.bias", "4.bias", "8.bias"]
    assert [la.bias_node for la in graph.layers.values()] == [2, 5, 9]
    assert [la.node for la in graph.layers.values()] == [1, 4, 9]
    assert graph.input_shape == (3, 8, 8)


@pytest.mark.parametrize(
    ("updated", "expected"),
    [
        ([], []),
        (["8"], [9]),  # only the classifier: backward runs on it alone
        (["3"], [4, 5, 6, 7, 8, 9]),  # from the second conv on
        (["0"], list(range(1, 10))),  # from the first conv on
        (["8", "3"], [4, 5, 6, 7, 8, 9]),
        (["0", "8"], list(range(1, 10))),
    ],
)
def test_backward_nodes_closed_form(tiny, updated, expected) -> None:
    _, graph = tiny
    assert graph.backward_nodes(updated) == expected


@pytest.mark.parametrize(
    ("trainable", "expected"),
    [
        ([], [False] * 10),
        ([5], [False] * 5 + [True] * 5),  # a batch norm's bias alone
        ([2, 9], [False, False] + [True] * 8),
        ([0], [True] * 10),  # an input that requires grad
    ],
)
def test_requires_grad_closed_form(tiny, trainable, expected) -> None:
    _, graph = tiny
    assert graph.requires_grad(trainable) == expected


@pytest.mark.parametrize("updated", [["0"], ["3"], ["8"], ["3", "8"]])
def test_requires_grad_matches_autograd(tiny, updated) -> None:
    # Real autograd: make only the updated layers' weights and bias holders trainable and see
    # which module outputs require grad.
    model, graph = tiny
    layers = [graph.layers[n] for n in updated]
    trainable = {la.name + ".weight" for la in layers} | {la.bias_param for la in layers}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    seen: dict[str, bool] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, out.requires_grad))
        for n, m in model.named_children()
    ]
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        model.eval()
        model(torch.randn(1, 3, 8, 8))
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    flags = graph.requires_grad(
        {la.node for la in layers} | {la.bias_node for la in layers if la.bias_node is not None}
    )
    assert {n.module: flags[n.index] for n in graph.nodes if n.module} == seen


def test_backward_nodes_unknown_layer(tiny) -> None:
    _, graph = tiny
    with pytest.raises(GraphError, match="'nope'") as info:
        graph.backward_nodes(["nope"])
    assert "0, 3, 8" in str(info.value)


def test_from_model_keeps_mode_and_running_stats() -> None:
    model = _tiny().train()
    before = model[1].running_mean.clone()
    graph = LayerGraph.from_model(model, input_size=8)
    assert model.training
    assert torch.equal(model[1].running_mean, before)
    assert graph.tracer == "fx"


def test_rectangular_input() -> None:
    graph = LayerGraph.from_model(_tiny(), input_size=(8, 6))
    assert graph.input_shape == (3, 8, 6)
    assert graph.nodes[1].shape == (1, 4, 8, 6)


def test_batch_norm_without_affine_gives_no_bias() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4, affine=False),
        nn.Conv2d(4, 4, 1, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 2, bias=False),
    )  # fmt: skip
    graph = LayerGraph.from_model(model, input_size=4)
    assert [la.bias_param for la in graph.layers.values()] == [None, None, None]
    assert [la.bias_node for la in graph.layers.values()] == [None, None, None]
    assert all(la.bias_numel == 0 for la in graph.layers.values())
    assert all(n.bias_of is None for n in graph.nodes)


# --------------------------------------------------------------------------------- refusals
class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x))


@pytest.mark.parametrize("tracer", ["auto", "fx", "hooks"])
def test_layer_run_twice_is_refused(tracer) -> None:
    with pytest.raises(GraphError, match="layer conv runs more than once"):
        LayerGraph.from_model(_Twice(), input_size=8, tracer=tracer)


@pytest.mark.parametrize("tracer", ["auto", "fx", "hooks"])
def test_model_without_trainable_layer_is_refused(tracer) -> None:
    model = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(GraphError, match="no conv or linear layer"):
        LayerGraph.from_model(model, input_size=8, tracer=tracer)


def test_model_that_cannot_run_is_refused() -> None:
    with pytest.raises(GraphError, match=r"\(1, 1, 8, 8\)"):
        LayerGraph.from_model(_tiny(), input_size=8, in_channels=1)


def test_unknown_tracer_is_refused() -> None:
    with pytest.raises(GraphError, match="auto, fx, hooks"):
        LayerGraph.from_model(_tiny(), input_size=8, tracer="jit")
