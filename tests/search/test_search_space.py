"""The search space encoding and the proxy: fixed length, filters only where the operator accepts
them, decoding deterministic, encoding nearest, proxy bounds and credits, budget refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from budgetsearch import load_model
from budgetsearch.criteria import magnitude_scores, random_scores
from budgetsearch.errors import BudgetError, ScoresError, SearchError
from budgetsearch.ops.filtered import check_filterable
from budgetsearch.plan import LayerUpdate, Plan
from budgetsearch.search import RATIOS, Evaluator, ProxyModel, SearchSpace, SpaceOptions
from budgetsearch.search._warmstart import sparse_points

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mcu(mcunet: dict) -> dict:
    return {**mcunet, "scores": random_scores(mcunet["model"], seed=1)}


def _evaluator(mcu: dict, space: SearchSpace, budget: int | None = 64 * 1024, **kw) -> Evaluator:
    proxy = ProxyModel(mcu["graph"], mcu["scores"], **kw)
    return Evaluator(space=space, proxy=proxy, cost_model=mcu["cm"], budget_bytes=budget,
                     memory_measure="training")


def test_space_is_fixed_length_with_filters_only_where_accepted(mcu: dict) -> None:
    graph = mcu["graph"]
    space = SearchSpace(graph)
    assert len(space.units) == len(graph.layers)
    n_patch = sum(len(u.patches) > 1 for u in space.units)
    assert len(space) == 2 * len(space.units) + n_patch + 1
    head = list(graph.layers)[-1]
    for unit in space.units:
        (name,) = unit.layers
        node = graph.nodes[graph.layers[name].node]
        if name == head or node.kind != "conv2d":
            assert unit.patches == (1,), name
            continue
        src = graph.nodes[node.inputs[0]]
        cells = node.shape[2] * node.shape[3]
        for r in unit.patches[1:]:
            a = node.attrs
            assert check_filterable(in_hw=src.shape[2:4], out_hw=node.shape[2:4],
                                    kernel_size=a["kernel_size"], stride=a["stride"],
                                    padding=a["padding"], dilation=a["dilation"],
                                    groups=a["groups"], patch_size=r) is None
            grid = -(-node.shape[2] // r) * -(-node.shape[3] // r)
            assert grid < cells  # each offered size shrinks the pooled grid
            cells = grid
    # every offered patch is accepted by the cost model
    ev = _evaluator(mcu, space, budget=None)
    for unit in space.units:
        for p in unit.patches:
            ev.measure({unit.layers[0]: LayerUpdate("weight", patch_size=p)})


def test_block_granularity_and_last_n(mcu: dict) -> None:
    graph = mcu["graph"]
    blocks = SearchSpace(graph, SpaceOptions(granularity="block"))
    assert [u.name for u in blocks.units] == list(graph.blocks())
    last = SearchSpace(graph, SpaceOptions(last_n=7, filters=False))
    assert last.candidates == tuple(list(graph.layers)[-7:])
    assert all(u.patches == (1,) for u in last.units)
    assert len(last) == 2 * 7 + 1
    with pytest.raises(SearchError, match="granularity"):
        SpaceOptions(granularity="channel")
    with pytest.raises(SearchError, match="last_n"):
        SpaceOptions(last_n=0)


def test_decoding_is_deterministic_and_channels_follow_scores(mcu: dict) -> None:
    space = SearchSpace(mcu["graph"])
    ev = _evaluator(mcu, space)
    points = sparse_points(space, 20, seed=3)
    for p in points:
        a, b = ev.updates(p), ev.updates(dict(p))
        assert a == b
    # top channels by score
    name = space.units[-5].layers[0]
    layer = mcu["graph"].layers[name]
    p = dict(points[0])
    p[f"r:{name}"], p[f"a:{name}"] = 2, "out"
    chans = ev.updates(p)[name].channels
    k = max(1, int(np.floor(RATIOS[2] * layer.out_channels + 0.5)))
    expect = np.argsort(-mcu["scores"][name].out_channel, kind="stable")[:k]
    assert chans == tuple(sorted(int(c) for c in expect))


def test_bias_depth_counts_layers_with_a_bias_from_the_end(mcu: dict) -> None:
    space = SearchSpace(mcu["graph"])
    ev = _evaluator(mcu, space)
    p = {k: 0 if k.startswith(("r:", "p:")) else "out" for k in space.param_names}
    p["bias_depth"] = 3
    ups = ev.updates(p)
    assert list(ups) == list(space.bias_layers[-3:])
    assert all(u.mode == "bias" for u in ups.values())


def test_encode_finds_the_nearest_point(mcu: dict) -> None:
    graph = mcu["graph"]
    space = SearchSpace(graph)
    ev = _evaluator(mcu, space)
    rng = np.random.default_rng(0)
    for p in sparse_points(space, 30, seed=5):
        ups = ev.updates(p)
        q = space.encode(ups)
        for unit in space.units:
            (name,) = unit.layers
            layer = graph.layers[name]
            ri = p[f"r:{unit.name}"]
            if ri == 0:
                assert q[f"r:{unit.name}"] == 0
            elif min(layer.out_channels, layer.in_channels) >= 16:
                assert q[f"r:{unit.name}"] == ri
                if ri < len(RATIOS) - 1:
                    assert q[f"a:{unit.name}"] == p[f"a:{unit.name}"]
                    assert q.get(f"p:{unit.name}", 0) == p.get(f"p:{unit.name}", 0)
        assert q["bias_depth"] <= p["bias_depth"]
    # 3/8 of the channels: nearest 1/2 (log scale), up 1/2, down 1/4
    name = next(n for n, ly in graph.layers.items() if ly.out_channels == 96 * 1 or
                ly.out_channels >= 64)
    n_out = graph.layers[name].out_channels
    chans = tuple(rng.choice(n_out, size=round(3 * n_out / 8), replace=False))
    ups = {name: LayerUpdate("weight", channels=chans)}
    assert space.encode(ups)[f"r:{name}"] == 4 - 1  # RATIOS[3] == 1/2
    assert space.encode(ups, rounding="up")[f"r:{name}"] == 3
    assert space.encode(ups, rounding="down")[f"r:{name}"] == 2
    with pytest.raises(SearchError, match="rounding"):
        space.encode(ups, rounding="sideways")


def test_proxy_bounds_and_credits(mcu: dict) -> None:
    graph, scores = mcu["graph"], mcu["scores"]
    proxy = ProxyModel(graph, scores, bias_credit=0.25)
    assert proxy({}) == 0.0
    assert proxy(Plan.full(graph).updates) == pytest.approx(1.0)
    name = list(graph.layers)[-3]
    p_l = float(np.sum(scores[name].out_channel))
    assert proxy({name: LayerUpdate("bias")}) == pytest.approx(0.25 * p_l / proxy.total)
    d = scores[name].out_channel
    top = tuple(int(i) for i in np.argsort(-d)[:4])
    kept = float(d[list(top)].sum())
    assert proxy({name: LayerUpdate("weight", channels=top)}) == pytest.approx(
        (kept + 0.25 * (p_l - kept)) / proxy.total)
    # adding an update never lowers the proxy; bias < partial weight < full weight
    partial = proxy({name: LayerUpdate("weight", channels=top)})
    assert proxy({name: LayerUpdate("bias")}) <= partial <= proxy({name: LayerUpdate("weight")})
    # the channels the space picks capture at least any other set of the same size
    other = tuple(int(i) for i in np.argsort(d)[:4])
    assert proxy({name: LayerUpdate("weight", channels=other)}) <= partial
    with pytest.raises(SearchError, match="bias_credit"):
        ProxyModel(graph, scores, bias_credit=2.0)


def test_filtered_updates_earn_the_filtered_potential(mcu: dict) -> None:
    """With filtered potentials in the scores, a filtered update captures
    Σ_U max(d^(r), β d) + β Σ_rest d; an input-channel one P (φ ρ + β (1 − φ)); without them
    (random scores) a filter changes nothing. The evaluator's table agrees with the proxy."""
    import copy

    graph, base = mcu["graph"], mcu["scores"]
    name = next(n for n, layer in graph.layers.items() if len(layer.weight_shape) == 4
                and layer.groups == 1 and layer.in_channels > 8)
    plain = ProxyModel(graph, base)
    assert plain({name: LayerUpdate("weight", patch_size=4)}) == plain({name: LayerUpdate(
        "weight")})
    scores = copy.deepcopy(base)
    d = scores[name].out_channel
    rng = np.random.default_rng(0)
    scores[name].filtered = {2: d * rng.uniform(0, 1, d.shape), 4: d * 0.05}
    proxy = ProxyModel(graph, scores, bias_credit=0.25)
    f2 = np.maximum(scores[name].filtered[2], 0.25 * d)
    assert proxy({name: LayerUpdate("weight", patch_size=2)}) == pytest.approx(
        f2.sum() / proxy.total)
    assert proxy({name: LayerUpdate("weight", patch_size=4)}) == pytest.approx(  # β floor
        0.25 * d.sum() / proxy.total)
    assert proxy({name: LayerUpdate("weight", patch_size=8)}) == proxy({name: LayerUpdate(
        "weight")})  # no r = 8 potential given: unfiltered credit
    top = tuple(int(i) for i in np.argsort(-d)[:3])
    assert proxy({name: LayerUpdate("weight", channels=top, patch_size=2)}) == pytest.approx(
        (f2[list(top)].sum() + 0.25 * (d.sum() - d[list(top)].sum())) / proxy.total)
    e = scores[name].in_channel
    cols = tuple(int(i) for i in np.argsort(-e)[:5])
    phi, rho = e[list(cols)].sum() / e.sum(), f2.sum() / d.sum()
    assert proxy({name: LayerUpdate("weight", channels=cols, axis="in", patch_size=2)}) == (
        pytest.approx(d.sum() * (phi * rho + 0.25 * (1 - phi)) / proxy.total))
    ev = Evaluator(space=SearchSpace(graph, SpaceOptions()), proxy=proxy, cost_model=mcu["cm"],
                   budget_bytes=None)
    unit = next(u for u in ev.space.units if name in u.layers and 2 in u.layer_patches[name])
    params = {k: 0 for k in ev.space.distributions}
    params[f"r:{unit.name}"] = len(RATIOS) - 1
    params[f"p:{unit.name}"] = list(unit.patches).index(2)
    assert ev.evaluate(params).proxy == pytest.approx(proxy(ev.updates(params)))


def test_proxy_refuses_scores_of_another_model(mcu: dict) -> None:
    other = load_model("mcunet-5fps", num_classes=7)
    with pytest.raises(ScoresError, match="another model"):
        ProxyModel(mcu["graph"], magnitude_scores(other))


def test_budget_below_the_cheapest_plan_names_the_minimum(mcu: dict) -> None:
    space = SearchSpace(mcu["graph"])
    ev = _evaluator(mcu, space, budget=10)
    minimum, _ = ev.minimum()
    with pytest.raises(BudgetError, match=f"minimum feasible memory budget is {minimum} bytes") \
            as info:
        ev.check_budgets()
    assert info.value.minimum_bytes == minimum
    _evaluator(mcu, space, budget=minimum).check_budgets()  # exactly the minimum is fine


def test_local_search_neighbours_stay_in_the_space(mcu: dict) -> None:
    from budgetsearch.search._local import LocalSearch, neighbour

    space = SearchSpace(mcu["graph"])
    rng = np.random.default_rng(0)
    for p in sparse_points(space, 10, seed=2):
        for _ in range(20):
            q = neighbour(space, p, rng, steps=2)
            assert set(q) == set(space.param_names)
            for name, dist in space.distributions.items():
                assert dist._contains(dist.to_internal_repr(q[name])), (name, q[name])
            assert sum(q[k] != p[k] for k in p) <= 4
    local = LocalSearch(space, seed=1, period=5, count=4)
    points = sparse_points(space, 5, seed=3)
    for i, p in enumerate(points):
        local.observe(p, (0.1 * i, 1000.0, 1.0), feasible=i != 4)
    assert local.due(5) and not local.due(4)
    again = LocalSearch(space, seed=1, period=5, count=4)
    for i, p in enumerate(points):
        again.observe(p, (0.1 * i, 1000.0, 1.0), feasible=i != 4)
    assert local.propose() == again.propose()  # seeded: reproducible
