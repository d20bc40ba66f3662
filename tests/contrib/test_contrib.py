"""The contribution analysis: prefix cuts, units, the keyed table, measurement on a tiny model."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from torch import nn

from budgetsearch._threads import cpu_kernels
from budgetsearch.cli import main
from budgetsearch.contrib import (
    ContributionTable,
    PrefixSplit,
    SharedTable,
    TableError,
    Unit,
    build_units,
    measure_contributions,
    parse_unit,
)
from budgetsearch.criteria import magnitude_scores
from budgetsearch.errors import DataError, PlanError
from budgetsearch.graph import LayerGraph
from budgetsearch.models import register_model
from budgetsearch.recipe import Recipe
from budgetsearch.search import ProxyModel, scores_digest

torch.set_num_threads(1)


class Block(nn.Module):
    """A residual block: no cut inside it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.bn(self.conv(x)))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        Block(8),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 16, 16, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


@pytest.fixture
def setup():
    model = tiny()
    graph = LayerGraph.from_model(model, input_size=16, model_name="tiny")
    scores = magnitude_scores(model)
    return model, graph, ProxyModel(graph, scores).channels, scores_digest(scores)


def test_cuts_split_the_forward_pass_exactly(setup):
    model = setup[0]
    model.eval()
    split = PrefixSplit(model)
    names = [c.name for c in split.cuts]
    assert names[0] == "input"
    assert not any(n.startswith("_3_") or n in ("_3_conv", "_3_bn") for n in names)  # in Block
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    for cut in split.cuts:
        mid = split.features(model, split.cuts[0], cut, x, batch_size=3)
        assert torch.allclose(split.suffix(model, cut)(mid), ref, atol=1e-6)
        for later in split.cuts:
            if later.position >= cut.position:
                chained = split.features(model, cut, later, mid)
                direct = split.features(model, split.cuts[0], later, x)
                assert torch.allclose(chained, direct, atol=1e-6)
    last_conv = split.cut_before(["4"])
    assert last_conv.position == max(c.position for c in split.cuts
                                     if c.position < [n.target for n in split.nodes].index("4"))
    with pytest.raises(ValueError, match="comes before"):
        split.segment(model, split.cuts[-1], split.cuts[1])


def test_untraceable_model_has_only_the_input_cut():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent

    split = PrefixSplit(Branchy())
    assert [c.name for c in split.cuts] == ["input"]
    model = Branchy()
    assert split.suffix(model, split.cuts[0]) is model


def test_units_grid_and_keys(setup):
    _, graph, _, _ = setup
    units = build_units(graph, ratios=(0.25, 1.0), axes=("out", "in"), filters=False)
    keys = [u.key for u in units]
    assert keys[:4] == ["head", "bias:1", "bias:2", "bias:3"]  # 3 layers with a bias (BN)
    assert "weight:4:in:0.25:r1" in keys and "weight:4:in:1:r1" not in keys  # ratio 1: out only
    for key in keys:
        assert parse_unit(key, graph).key == key
    for bad, message in (("bias:9", r"depth must be in 1\.\.3"), ("weight:5:out:0.25:r1",
                         "not a trainable layer"), ("weight:4:out:0.3:r1", "ratio one of"),
                         ("weight:4:out:0.25:r16", "patch size must be one of r1, "),
                         ("nonsense", "expected head")):
        with pytest.raises(PlanError, match=message):
            parse_unit(bad, graph)
    with pytest.raises(PlanError, match="candidate layers 9"):
        build_units(graph, candidates=["9"])


def test_unit_updates_include_the_classifier(setup):
    _, graph, channels, _ = setup
    ups = Unit("weight", layer="4", axis="out", ratio=0.25).updates(graph, channels)
    assert set(ups) == {"4", "9"} and len(ups["4"].channels) == 4 and ups["9"].mode == "weight"
    bias = Unit("bias", depth=2).updates(graph, channels)
    assert {k: v.mode for k, v in bias.items()} == {"3.conv": "bias", "4": "bias", "9": "weight"}


def _measure(setup, path=None, units=None, **kw):
    model, graph, channels, digest = setup
    return measure_contributions(
        model, graph=graph, train=data(24, 0), val=data(12, 1),
        recipe=Recipe(epochs=1, batch_size=8, lr=0.05), channels=channels,
        scores_digest=digest, units=units, path=path, progress=False, **kw)


def _no_cache_reference(setup, unit, updates=None):
    """The unit (or plan) trained the plain way: whole model, apply_plan, same recipe (no
    prefix cache)."""
    import torch.nn.functional as F

    from budgetsearch.plan import Plan
    from budgetsearch.trainer import apply_plan
    from budgetsearch.trainer.loop import build_optimizer

    model, graph, channels, _ = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data(24, 0)
    xv, yv = data(12, 1)
    plan = Plan.from_layers(graph, updates or unit.updates(graph, channels), batch_size=8,
                            optimizer="momentum")
    torch.manual_seed(0)
    handle = apply_plan(model, plan, graph=graph)
    opt = build_optimizer("momentum", handle.param_groups(), lr=0.05)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    for i in range(0, 24, 8):
        idx = perm[i:i + 8]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(xv)
    handle.remove()
    model.load_state_dict(state)
    return float((logits.argmax(1) == yv).float().mean()), float(F.cross_entropy(logits, yv))


def test_measured_units_equal_plain_training_and_restore_the_model(setup):
    model = setup[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units = [Unit("head"), Unit("bias", depth=1),
             Unit("weight", layer="4", axis="in", ratio=0.5, patch_size=1),
             Unit("weight", layer="0", axis="out", ratio=1.0)]
    table = _measure(setup, units=units)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(table.results) == {u.key for u in units}
    cuts = {k: r["cut"] for k, r in table.results.items()}
    assert cuts["weight:0:out:1:r1"] == "input" and cuts["head"] != "input"
    for unit in units:
        acc, loss = _no_cache_reference(setup, unit)
        got = table.results[unit.key]
        assert got["val_accuracy"] == pytest.approx(acc)
        assert got["val_loss"] == pytest.approx(loss, rel=1e-5)
    a, lo = table.gain("bias:1")
    assert a == pytest.approx(table.results["bias:1"]["val_accuracy"]
                              - table.results["head"]["val_accuracy"])
    assert lo == pytest.approx(table.results["head"]["val_loss"]
                               - table.results["bias:1"]["val_loss"])
    assert table.stats["measured"] == 4


def test_table_resumes_and_refuses_another_key(setup, tmp_path):
    path = tmp_path / "t.json"
    units = build_units(setup[1], ratios=(1.0,), axes=("out",), filters=False)
    first = _measure(setup, path=str(path), units=units, max_units=2)
    assert len(first.results) == 2 and first.results.keys() >= {"head"}
    again = _measure(setup, path=str(path), units=units)
    assert again.stats["measured"] == len(units) - 2 and len(again.results) == len(units)
    done = _measure(setup, path=str(path), units=units)
    assert done.stats["measured"] == 0
    doc = json.loads(path.read_text())
    assert doc["claims"] == {} and doc["version"] == 1
    loaded = ContributionTable.load(path, key=again.key)
    assert loaded.results == again.results
    other = {**again.key, "recipe": {**again.key["recipe"], "lr": 0.1}}
    with pytest.raises(TableError, match=r"recipe: table .*'lr': 0.05"):
        ContributionTable.load(path, key=other)
    model, graph, channels, digest = setup
    with pytest.raises(TableError, match="train_data"):
        measure_contributions(model, graph=graph, train=data(24, 5), val=data(12, 1),
                              recipe=Recipe(epochs=1, batch_size=8, lr=0.05), channels=channels,
                              scores_digest=digest, units=units, path=str(path), progress=False)
    path.write_text('{"version": 1, "key": {}')
    with pytest.raises(TableError, match="not a readable contribution table"):
        ContributionTable.load(path)


def test_a_worker_waits_for_the_units_another_live_worker_measures(setup, tmp_path):
    """A shared table is returned complete: units claimed by another live worker are waited
    for (their results read, not measured again), so every worker plans from the same table."""
    import threading

    path = tmp_path / "t.json"
    units = build_units(setup[1], ratios=(1.0,), axes=("out",), filters=False)
    first = _measure(setup, path=str(path), units=units, max_units=1)  # creates the table
    other = SharedTable(path, first.key)
    other.me = {"host": other.me["host"], "pid": os.getppid()}  # a live process, not us
    theirs = other.claim([u.key for u in units if u.key != "head"][-1:])
    assert theirs is not None
    fake = {"val_accuracy": 0.123, "val_loss": 1.0, "train_loss": 1.0, "seconds": 0.0}
    timer = threading.Timer(1.0, other.record, args=(theirs, fake))
    timer.start()
    try:
        table = _measure(setup, path=str(path), units=units, poll_seconds=0.05)
    finally:
        timer.join()
    assert set(table.results) == {u.key for u in units} | {"head"}
    assert table.results[theirs]["val_accuracy"] == 0.123  # theirs, waited for
    assert table.stats["measured"] == len(set(table.results)) - 2  # all but head and theirs


def test_claims_of_dead_workers_are_taken_over(tmp_path):
    path = tmp_path / "shared.json"
    table = SharedTable(path, {"k": 1})
    assert table.claim(["a", "b"]) == "a"
    doc = json.loads(path.read_text())
    doc["claims"]["b"] = {"host": table.me["host"], "pid": 2**22 + 12345, "since": 0}
    doc["claims"]["a"] = {"host": table.me["host"], "pid": os.getppid(),  # alive, beating
                          "since": time.time()}
    path.write_text(json.dumps(doc))
    assert table.claim(["a", "b"]) == "b"  # a: a live worker's; b: its worker is gone
    table.record("b", {"val_accuracy": 1.0, "val_loss": 0.0})
    assert table.claim(["a", "b"]) is None
    assert table.done() == {"b"}
    with pytest.raises(TableError, match="k: table 1, now 2"):
        SharedTable(path, {"k": 2})


def test_a_claim_without_heartbeat_goes_stale_on_any_host(tmp_path):
    """Another machine's claim is trusted while its heartbeat is fresh and taken over when it
    is older than stale_after (its worker died there); a live process on this host that stopped
    beating is taken over too; keep_claim keeps a held unit's heartbeat fresh."""
    from budgetsearch.contrib import keep_claim

    path = tmp_path / "shared.json"
    table = SharedTable(path, {"k": 1}, stale_after=0.5)
    doc = json.loads(path.read_text())
    now = time.time()
    doc["claims"] = {"a": {"host": "elsewhere", "pid": 1, "since": now - 60, "beat": now},
                     "b": {"host": "elsewhere", "pid": 1, "since": now, "beat": now - 5},
                     "c": {"host": table.me["host"], "pid": os.getppid(), "since": now - 5}}
    path.write_text(json.dumps(doc))
    assert table.claim(["a", "b"]) == "b"  # a beats; b's worker stopped 5 s ago
    assert table.claim(["a", "c"]) == "c"  # c's process lives, but has not beaten for 5 s
    other = SharedTable(path, {"k": 1}, stale_after=0.5)
    other.me = {"host": "elsewhere", "pid": 2}
    assert other.claim(["d"]) == "d"
    with keep_claim(other, "d", every=0.05):
        time.sleep(0.8)  # beyond stale_after, but beating
        assert table.claim(["d"]) is None
    time.sleep(0.8)  # no beat since
    assert table.claim(["d"]) == "d"


def test_a_database_claim_is_kept_by_its_heartbeat(tmp_path, monkeypatch):
    from budgetsearch.contrib import StoreTable, keep_claim

    monkeypatch.setenv("BUDGETSEARCH_CACHE", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path / 'search.db'}"
    holder = StoreTable(url, {"model": "m"}, stale_after=0.5)
    holder.me = "elsewhere:1:x"
    taker = StoreTable(url, {"model": "m"}, stale_after=0.5)
    assert holder.claim(["a"]) == "a"
    with keep_claim(holder, "a", every=0.05):
        time.sleep(0.8)
        assert taker.claim(["a"]) is None  # a long unit is not taken from a live worker
    time.sleep(0.8)
    assert taker.claim(["a"]) == "a"  # its worker stopped beating: taken over


def test_a_table_in_a_database_is_shared_and_resumed_like_a_file(setup, tmp_path, monkeypatch):
    """--storage: the rows live in the search's database, keyed by a digest of the key; the
    results equal the file-backed table's; a live worker's claim is skipped, a finished unit
    is never measured again."""
    from budgetsearch.contrib import StoreTable

    monkeypatch.setenv("BUDGETSEARCH_CACHE", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path / 'search.db'}"
    units = build_units(setup[1], ratios=(1.0,), axes=("out",), filters=False)
    in_file = _measure(setup, path=str(tmp_path / "t.json"), units=units)
    first = _measure(setup, storage=url, units=units, max_units=2)
    assert first.stats["measured"] == 2
    rest = _measure(setup, storage=url, units=units)
    assert rest.stats["measured"] == len(units) - 2
    for unit, row in in_file.results.items():  # the same numbers through either store
        assert rest.results[unit]["val_accuracy"] == row["val_accuracy"]
    assert _measure(setup, storage=url, units=units).stats["measured"] == 0

    table = StoreTable(url, {"model": "m", "k": 1})
    other = StoreTable(url, {"model": "m", "k": 1})
    other.me = f"{other.me.split(':')[0]}:{os.getppid()}:x"  # a live process on this host
    assert other.claim(["a", "b"]) == "a"
    assert table.claim(["a", "b"]) == "b"  # a is held by a live worker
    table.record("b", {"val_accuracy": 0.5, "val_loss": 1.0})
    assert table.done() == {"b"} and table.claim(["b"]) is None
    assert StoreTable(url, {"model": "m", "k": 2}).done() == set()  # another key: other rows


def test_recipe_is_validated():
    assert Recipe.from_dict(Recipe(lr=0.1).to_dict()) == Recipe(lr=0.1)
    for field, value, message in (("lr", 0, "'lr' must be a finite number > 0"),
                                  ("lr", float("nan"), "'lr'"), ("epochs", 0, "'epochs'"),
                                  ("optimizer", "rmsprop", "one of sgd, momentum, adam"),
                                  ("momentum", 1.0, r"in \[0, 1\)")):
        with pytest.raises(PlanError, match=message):
            Recipe(**{field: value})
    with pytest.raises(PlanError, match="unknown recipe fields warmup"):
        Recipe.from_dict({"warmup": 3}, source="plan.json")


def test_contrib_command(tmp_path, capsys):
    from PIL import Image

    register_model("tiny-contrib", lambda: tiny(), replace=True)
    for c, name in enumerate(("a", "b", "c")):
        folder = tmp_path / "imgs" / name
        folder.mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (16, 16), (80 * c, 40 + 9 * i, 200 - 60 * c)).save(folder / f"{i}.png")
    out = tmp_path / "table.json"
    argv = ["contrib", "--model", "tiny-contrib", "--weights", "random", "--input-size", "16",
            "--data", str(tmp_path / "imgs"), "--samples", "30", "--epochs", "1",
            "--batch-size", "8", "--candidates", "top:1", "--ratios", "0.5,1", "--no-filters",
            "--out", str(out), "--no-progress"]
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    assert main([*argv, "--threads", str(other)]) == 0
    assert torch.get_num_threads() == before  # the count was --threads for the command only
    printed = capsys.readouterr()
    assert "24 training and 6 validation images" in printed.err
    assert f"1 worker(s) x {other} thread(s)" in printed.err
    doc = json.loads(out.read_text())
    assert "head" in doc["results"] and any(k.startswith("weight:") for k in doc["results"])
    assert main([*argv, "--lr", "0.5"]) == 2
    assert "was measured for something else (recipe" in capsys.readouterr().err
    assert main([*argv[:-3], "--candidates", "nope", "--out", str(out), "--threads",
                 str(other)]) == 2
    assert torch.get_num_threads() == before  # put back after an error too
    err = capsys.readouterr().err
    assert "--candidates nope: not trainable layers before the classifier" in err


def test_plan_runner_trains_any_plan_and_reports_extra_data(setup):
    from budgetsearch.contrib import PlanRunner
    from budgetsearch.plan import LayerUpdate

    model, graph, _, _ = setup
    runner = PlanRunner(model, graph=graph, train=data(24, 0), val=data(12, 1),
                        extra={"test": data(9, 7)})
    recipe = Recipe(epochs=1, batch_size=8, lr=0.05)
    plans = [{"4": LayerUpdate("weight", channels=(1, 5), axis="in"),
              "3.conv": LayerUpdate("bias"), "9": LayerUpdate("weight")},
             {"9": LayerUpdate("weight")},
             {"0": LayerUpdate("bias"), "9": LayerUpdate("bias")}]
    for updates in plans:  # a later cut, then an earlier one: the cache moves both ways
        got = runner.run(updates, recipe)
        acc, loss = _no_cache_reference(setup, None, updates)
        assert got["val_accuracy"] == pytest.approx(acc)
        assert got["val_loss"] == pytest.approx(loss, rel=1e-5)
        assert 0 <= got["test_accuracy"] <= 1 and got["test_loss"] > 0
    assert runner.stats["cache_seconds"] > 0


def test_plan_runner_records_the_thread_count_it_trained_with(setup):
    from budgetsearch.contrib import PlanRunner
    from budgetsearch.plan import LayerUpdate

    model, graph, _, _ = setup
    runner = PlanRunner(model, graph=graph, train=data(24, 0), val=data(12, 1))
    recipe = Recipe(epochs=1, batch_size=8, lr=0.05)
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    try:
        torch.set_num_threads(other)
        got = runner.run({"9": LayerUpdate("weight")}, recipe)
    finally:
        torch.set_num_threads(before)
    assert got["threads"] == other
    assert runner.run({"9": LayerUpdate("weight")}, recipe)["threads"] == before
    assert got["kernels"] == cpu_kernels()  # and the CPU kernels it trained with


def test_a_fold_trains_as_a_runner_built_on_that_split_would(setup):
    """Fold j of the pooled 24 + 12 images (dealt into 3 stratified folds) gives exactly the
    scores of a PlanRunner whose training data are the other folds (in pooled order) and whose
    validation data is fold j; extra data is scored as by run()."""
    from budgetsearch.contrib import PlanRunner
    from budgetsearch.plan import LayerUpdate

    model, graph, _, _ = setup
    train, val, test = data(24, 0), data(12, 1), data(9, 7)
    runner = PlanRunner(model, graph=graph, train=train, val=val, extra={"test": test})
    views = runner.folds(3, seed=5)
    assert [v.index for v in views] == [0, 1, 2] and {v.folds for v in views} == {3}
    rows = sorted(int(i) for v in views for i in v.val_rows)
    assert rows == list(range(36))  # every pooled image validated on once
    x = torch.cat([train[0], val[0]])
    y = torch.cat([train[1], val[1]])
    recipe = Recipe(epochs=1, batch_size=8, lr=0.05)
    for updates in ({"9": LayerUpdate("weight")}, {"3.conv": LayerUpdate("bias"),
                                                   "9": LayerUpdate("weight")}):
        for view in (views[0], views[2]):
            got = view.run(updates, recipe)
            tr, va = view.train_rows, view.val_rows
            assert sorted(set(tr.tolist()) | set(va.tolist())) == list(range(36))
            assert not set(tr.tolist()) & set(va.tolist()) and len(tr) == 24
            direct = PlanRunner(model, graph=graph, train=(x[tr], y[tr]), val=(x[va], y[va]),
                                extra={"test": test}).run(updates, recipe)
            assert got["val_images"] == len(va) == 12
            for k in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_loss"):
                assert got[k] == pytest.approx(direct[k], rel=1e-5), k
    # the runner itself still trains on its own split
    assert runner.run({"9": LayerUpdate("weight")}, recipe)["val_images"] == 12
    with pytest.raises(DataError, match="cannot deal 36 samples into 37 folds: give 2 to 36"):
        runner.folds(37, seed=0)


def test_two_worker_processes_share_one_table(tmp_path, capfd):
    from PIL import Image

    for c, name in enumerate(("a", "b")):
        folder = tmp_path / "imgs" / name
        folder.mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (200 * c, 30 + 20 * i, 90)).save(folder / f"{i}.png")
    out = tmp_path / "shared.json"
    argv = ["contrib", "--model", "mcunet-5fps", "--num-classes", "2", "--input-size", "32",
            "--data", str(tmp_path / "imgs"), "--samples", "10", "--epochs", "1",
            "--candidates", "last:2", "--ratios", "0.5,1", "--axes", "out", "--no-filters",
            "--workers", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    units = set(doc["results"])
    assert "head" in units and len(units) >= 6 and doc["claims"] == {}
    printed = capfd.readouterr()
    assert "2 worker(s) x 1 thread(s)" in printed.err  # this process
    assert "1 worker(s) x 1 thread(s)" in printed.err  # the one it started, on the same table
    measured_here = int(printed.out.split("this process measured ")[1].split(":")[0])
    assert 0 < measured_here <= len(units)


def test_no_cut_on_tuples_or_after_dropout_and_modes_are_restored():
    from budgetsearch.contrib import relative_gradient_norms

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.drop = nn.Dropout(0.5)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.conv(x).chunk(2, dim=1)  # a tuple-valued node
            x = torch.cat([self.bn(a), b], 1).mean((2, 3))
            return self.fc(self.drop(x))

    torch.manual_seed(0)
    model = Split()
    split = PrefixSplit(model)
    names = [c.name for c in split.cuts]
    assert "chunk" not in names and "conv" in names
    drop_at = [n.target for n in split.nodes].index("drop")
    assert all(c.position < drop_at for c in split.cuts)  # no cached tensor skips dropout
    assert split.cut_before(["fc"]).position < drop_at
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    for cut in split.cuts:
        mid = split.features(model, split.cuts[0], cut, x)
        assert torch.allclose(split.suffix(model, cut)(mid), ref, atol=1e-6)
    # the caller's per-module modes survive both helpers
    model.train()
    model.bn.eval()
    split.features(model, split.cuts[0], split.cuts[-1], x)
    graph = LayerGraph.from_model(model, input_size=8)
    relative_gradient_norms(model, graph, x, torch.tensor([0, 1]))
    assert model.training and model.conv.training and not model.bn.training


def test_a_file_of_another_key_is_discarded_only_when_no_one_works_on_it(tmp_path):
    """check_key's refusal names the file and the key wanted; discard_stale removes the file
    for its owner to start anew, unless a live worker holds a claim on it."""
    from budgetsearch.contrib import SharedTable, TableError, discard_stale

    path = tmp_path / "race.json"
    old = SharedTable(path, {"recipe": "old"})
    assert old.claim(["a"]) == "a"  # this live process works on it
    with pytest.raises(TableError) as refused:
        SharedTable(path, {"recipe": "new"})
    assert refused.value.stale_path == path and refused.value.wanted_key == {"recipe": "new"}
    assert not discard_stale(path, {"recipe": "new"}) and path.exists()
    old.record("a", {"val_accuracy": 0.5})  # done: no claim left
    assert discard_stale(path, {"recipe": "new"}) and not path.exists()
    SharedTable(path, {"recipe": "new"})
    assert discard_stale(path, {"recipe": "new"}) and path.exists()  # holds the key wanted
