"""``budgetsearch.plan_for``, the library's entry point that ``budgetsearch plan`` and the studies
call: the command line and the library make the same plan from the same inputs; its argument
rules; a study it continues keeps its stored scores."""

from __future__ import annotations

import time

import pytest
import torch

import budgetsearch
from budgetsearch import Budget, CostModel, LayerGraph, load_model, load_profile
from budgetsearch.choices import EFFORT_NAMES
from budgetsearch.cli import main
from budgetsearch.criteria import magnitude_scores
from budgetsearch.errors import DataError, PlanError, SearchError
from budgetsearch.plan import load_plan
from budgetsearch.planner import EFFORTS, PlanData, choose_effort, plan_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BUDGET = Budget(memory_bytes=64 * 1024, measure="training")


def _model(seed: int = 0) -> tuple[torch.nn.Module, CostModel]:
    """What `plan --model mcunet-5fps --num-classes 2 --input-size 32 --device stm32h743
    --seed SEED` builds."""
    torch.manual_seed(seed)
    model = load_model("mcunet-5fps", num_classes=2)
    graph = LayerGraph.from_model(model, input_size=32, model_name="mcunet-5fps")
    return model, CostModel(graph, load_profile("stm32h743"))


def _cli(images, out, *extra):
    return ["plan", "--model", "mcunet-5fps", "--num-classes", "2", "--input-size", "32",
            "--device", "stm32h743", "--data", str(images), "--budget", "64KB",
            "--memory-measure", "training", "--trials", "30", "--population", "16",
            "--no-progress", "--out", str(out), *extra]


def test_the_entry_point_is_exported_by_the_package():
    assert budgetsearch.plan_for is plan_for and budgetsearch.PlanData is PlanData
    assert "plan_for" in budgetsearch.__all__
    assert tuple(EFFORTS) == EFFORT_NAMES


@pytest.mark.parametrize("effort", ["quick", "standard"])
def test_the_command_line_and_the_library_make_the_same_plan(effort, images, tmp_path, capsys):
    """quick: the search on Fisher potential measured on the data set, by each side on its own;
    standard: contributions measured on a split of it, the search on them, the race. The library
    finds the command's contribution table and race under the same keys (made of the model, its
    initial weights, the split, the recipe, the channel scores and the candidates), so it trains
    nothing again; both hand out the same plan, figures and recipe."""
    out = tmp_path / "cli.json"
    if effort == "quick":
        flags = ["--objective", "fisher", "--samples", "8", "--micro-batch", "4"]
        kwargs = {"objective": "fisher", "fisher_samples": 8, "micro_batch": 4}
    else:
        flags = ["--candidates", "last:2", "--lrs", "0.02"]
        kwargs = {"candidates": "last:2", "lrs": (0.02,)}
    assert main(_cli(images, out, *flags)) == 0, capsys.readouterr().err
    capsys.readouterr()
    cli = load_plan(out)

    model, cost_model = _model()
    lines: list[str] = []
    outcome = plan_for(model=model, cost_model=cost_model, budget=BUDGET,
                       data=PlanData(source=images), trials=30,
                       search_options={"population_size": 16}, progress=False, log=lines.append,
                       **kwargs)
    lib = outcome.plan
    assert lib.updates == cli.updates and lib.predicted == cli.predicted
    assert lib.recipe == cli.recipe
    for key in ("effort", "trial", "trials", "objectives", "scores", "objective", "memory_bytes",
                "baselines"):
        assert lib.provenance.get(key) == cli.provenance.get(key), key
    assert not lines  # no table measured, no study continued (its name is the library's own)
    assert outcome.search.study_name != cli.provenance["study"]
    if effort == "quick":
        assert outcome.race is None and lib.recipe is None
    else:
        race, cli_race = lib.provenance["race"], cli.provenance["race"]
        assert race["file"] == cli_race["file"] and race["arms_trained"] == 0
        assert cli_race["arms_trained"] > 0
        assert race["winner"] == cli_race["winner"] and race["rungs"] == cli_race["rungs"]


def test_argument_rules_name_the_library_arguments():
    model, cost_model = _model()
    base = {"model": model, "cost_model": cost_model, "budget": BUDGET, "progress": False}
    with pytest.raises(DataError, match=r"^plan_for needs data \(for the contribution analysis "
                                        r"or the Fisher pass\), scores or contrib TABLE$"):
        plan_for(**base)
    with pytest.raises(DataError, match="effort standard trains the candidate plans on data: "
                                        "give data, or effort quick"):
        plan_for(**base, scores=magnitude_scores(model), effort="standard")
    with pytest.raises(DataError, match="contrib goes with objective measured"):
        plan_for(**base, data="cifar10", objective="fisher", contrib="t.json")
    with pytest.raises(PlanError, match="unknown objective 'loss'"):
        plan_for(**base, data="cifar10", objective="loss")
    with pytest.raises(PlanError, match="search_options seed: set by plan_for itself"):
        plan_for(**base, scores=magnitude_scores(model), search_options={"seed": 3})
    with pytest.raises(PlanError, match="data: give a PlanData"):
        plan_for(**base, data=42)
    # tensors checked against the model before any work
    x, y = torch.zeros(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    shape = tuple(cost_model.graph.input_shape)
    good = (torch.zeros(4, *shape), y)
    with pytest.raises(DataError, match=r"^data: the validation tensors hold no images$"):
        plan_for(**base, data=(good, (torch.zeros(0, *shape), y[:0])))
    with pytest.raises(DataError, match=r"^data: the training tensors hold 4 images but 3 labels"):
        plan_for(**base, data=((good[0], y[:3]), good))
    with pytest.raises(DataError, match=r"the validation images are \(3, 16, 16\) but the model "
                                        rf"was traced and costed at \({shape[0]}, "):
        plan_for(**base, data=(good, (x, y)))
    with pytest.raises(DataError, match=r"the training labels run from 0 to 9 but the model's "
                                        r"head \(.+\) has 2 outputs \(labels 0 to 1\)"):
        plan_for(**base, data=((good[0], torch.tensor([0, 9, 1, 1])), good))
    with pytest.raises(DataError, match="labels must be a 1-D tensor of class indices"):
        plan_for(**base, data=((good[0], y.float()), good))
    with pytest.raises(PlanError, match="micro_batch must be an integer >= 1; got 0"):
        plan_for(**base, data=(good, good), micro_batch=0)
    with pytest.raises(PlanError, match="lrs: give a sequence of learning rates"):
        plan_for(**base, data=(good, good), lrs=0.02)
    with pytest.raises(SearchError, match="trials must be at least 1"):
        plan_for(**base, scores=magnitude_scores(model), trials=0)
    with pytest.raises(PlanError, match="race learning rates must differ within 6 significant"):
        plan_for(**base, data="cifar10", lrs=(0.02, 0.020000001))  # before any work
    with pytest.raises(SearchError, match="unknown pick rule 'max-accuracy'"):
        plan_for(**base, data="cifar10", pick="max-accuracy")  # before any work
    # batch norm trained as the cost model counts it: a recipe that disagrees is refused up
    # front; without a recipe, the race's follows the cost model
    from budgetsearch.planner.flow import check_recipe, cost_bn
    from budgetsearch.recipe import Recipe

    bn_cost = CostModel(cost_model.graph, load_profile("stm32h743"), bn_train=True)
    with pytest.raises(PlanError, match=r"the recipe trains batch norm 'frozen' but the cost "
                                        r"model counts it 'train' \(bn_train=True\)"):
        plan_for(**{**base, "cost_model": bn_cost}, data="cifar10", recipe=Recipe())
    assert (cost_bn(bn_cost), cost_bn(cost_model)) == ("train", "frozen")
    # an optimizer keeping more state than the cost model counts could train over budget: the
    # cost model (stm32h743) counts plain SGD
    with pytest.raises(PlanError, match=r"the recipe's optimizer 'adam' keeps 2 state tensor\(s\) "
                                        r"per trained parameter but the cost model counts 'sgd', "
                                        r"which keeps 0.*plan --optimizer adam"):
        plan_for(**base, data="cifar10", recipe=Recipe(optimizer="adam"))
    with pytest.raises(PlanError, match="'momentum' keeps 1"):
        check_recipe(Recipe(optimizer="momentum"), cost_model)
    # less state than counted fits: momentum counted, plain SGD trained
    check_recipe(Recipe(optimizer="sgd"),
                 CostModel(cost_model.graph, load_profile("stm32h743"), optimizer="momentum"))
    # the command line's flags in the same rules
    flags = {"plan": "plan", "data": "--data", "scores": "--scores FILE", "contrib": "--contrib",
             "effort": "--effort", "objective": "--objective"}
    with pytest.raises(DataError, match=r"--objective measured needs --data .* or --contrib TABLE"):
        choose_effort(objective="measured", data=False, scores=True, contrib=False, names=flags)
    assert choose_effort(data=True, scores=False, contrib=False) == (EFFORTS["standard"],
                                                                    "measured")
    assert choose_effort(objective="fisher", data=True, scores=False, contrib=False) == (
        EFFORTS["quick"], "fisher")
    assert choose_effort(data=False, scores=False, contrib=True) == (EFFORTS["quick"], "measured")


def test_a_study_it_continues_keeps_its_stored_scores(tmp_path):
    """Scores left to compute (a Fisher pass here) are not computed again for a stored study: it
    continues with the ones it holds; a scores file that differs from them is refused."""
    model, cost_model = _model()
    torch.manual_seed(1)
    tensors = torch.randn(12, 3, 32, 32), torch.arange(12) % 2
    url = f"sqlite:///{tmp_path / 'study.db'}"
    common = {"model": model, "cost_model": cost_model, "budget": BUDGET, "progress": False,
              "data": (tensors, tensors), "effort": "quick", "fisher_samples": 8, "storage": url,
              "search_options": {"population_size": 8}}
    first = plan_for(**common, trials=12)
    name = first.search.study_name
    assert name.startswith("mcunet-5fps-stm32h743-64.0KB-")
    assert first.plan.provenance["scores"]["source"] == "fisher on the training tensors, 8 samples"
    lines: list[str] = []
    again = plan_for(**common, trials=16, log=lines.append)
    assert again.search.study_name == name and len(again.search.trials) == 16
    assert lines == [f"continuing study {name!r} (12 trials) with its stored scores"]
    other = tmp_path / "magnitude.npz"
    magnitude_scores(model).save(other)
    with pytest.raises(SearchError, match=r"was made with other scores than .*magnitude\.npz"):
        plan_for(**common, trials=16, scores=other, study_name=name,
                 scores_source="fisher on the training tensors, 8 samples")


def test_an_interrupted_plan_leaves_the_database_it_opened(tmp_path):
    """plan_for opens a new SQLite file while its scores are computed; interrupted, it leaves
    the file: another plan given the same storage may have opened it meanwhile (to store a
    study there now or later), and a file deleted under it would take that study with it."""
    import optuna

    from budgetsearch.planner.entry import _GivenScores, _open_with_scores
    from budgetsearch.search import open_storage

    url = f"sqlite:///{tmp_path}/plan.db"
    opened: list = []

    def interrupted():
        deadline = time.monotonic() + 60
        while not (tmp_path / "plan.db").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        opened.append(open_storage(url))  # another plan opened it: no study in it yet
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _open_with_scores(url, "mine", {}, compute=interrupted, given=_GivenScores(None, None),
                          log=print)
    assert (tmp_path / "plan.db").exists()
    # the other plan's study goes into the file on disk, not into a deleted one
    optuna.create_study(study_name="other", storage=opened[0]).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="other", storage=url).trials) == 2


def test_a_missing_data_set_is_refused_before_any_file_is_made(tmp_path):
    model, cost_model = _model()
    with pytest.raises(DataError, match=r"data set '.*no-such-dir': no such file or directory"):
        plan_for(model=model, cost_model=cost_model, budget=BUDGET, progress=False,
                 data=PlanData(source=tmp_path / "no-such-dir"), objective="fisher",
                 storage=f"sqlite:///{tmp_path}/plan.db")
    assert list(tmp_path.iterdir()) == []
