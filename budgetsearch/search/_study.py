"""The Optuna study: sampler, warm start, batched persistence, resume and workers.

:class:`Search` ties a cost model and scores to a :class:`~._space.SearchSpace`, a
:class:`~._objectives.ProxyModel` and an :class:`~._objectives.Evaluator`. :meth:`Search.run` runs
trials with ``ask``/``tell`` on an in-memory study seeded with every trial already persisted (so a
re-run continues the study up to the requested count), and writes finished trials to the
persistent storage in batches every ``flush_seconds`` and at the end (see :mod:`._storage`). A
process killed mid-run loses at most the trials of its last unflushed interval; the re-run redoes
them. Several processes may run on one study (``budgetsearch worker``): each writes its own
trials (trial numbers are assigned by the database, so none is lost or duplicated) and merges the
others' trials into its sampler's view at every flush.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import BaseStorage, InMemoryStorage
from optuna.trial import FrozenTrial

from .._version import __version__
from ..cost import CostModel
from ..criteria import Scores
from ..errors import SearchError
from ..plan import LayerUpdate, Plan
from ..store import worker_gone, worker_id
from . import _config
from ._config import (
    COMPLETE_KEY,
    CONFIG_KEY,
    CREATOR_KEY,
    build_config,
    diff_config,
    read_config,
    write_config,
)
from ._front import FrontTracker, pareto_front, pick
from ._local import LocalSearch
from ._loop import DONE, TrialLoop, quiet
from ._measured import CALIBRATED_DECAY, CALIBRATED_LOSS_WEIGHT, MeasuredModel
from ._objectives import DIRECTIONS, AccuracyModel, Evaluator, ProxyModel
from ._samplers import SAMPLERS, TimedSampler, make_sampler
from ._space import SearchSpace, SpaceOptions
from ._storage import (
    load_study,
    open_storage,
    redact,
    storage_url,
)
from ._warmstart import baseline_plans, baseline_table, sparse_points, warm_points

__all__ = ["Search", "SearchResult"]


@dataclass
class SearchResult:
    """What a search run produced.

    Attributes:
        plan: The chosen plan (provenance and predicted costs filled in).
        trial: The chosen trial (numbered as in the persistent study).
        study_name: Study name.
        storage: Storage URL (password redacted).
        trials: Finished trials of the study.
        front: Its Pareto front.
        hypervolume: The front's normalised hypervolume.
        baselines: Baselines' exact figures by name (``{"metrics": ..., "error": ...}``).
        objective_names: Names of the three objectives.
        stats: Timing and counts of this run.
    """

    plan: Plan
    trial: FrozenTrial
    study_name: str
    storage: str
    trials: list[FrozenTrial]
    front: list[FrozenTrial]
    hypervolume: float
    baselines: dict[str, Any]
    objective_names: tuple[str, str, str]
    stats: dict[str, Any] = field(default_factory=dict)


class Search:
    """A budgeted plan search for one model, device, budget and set of scores.

    Args:
        cost_model: The cost model (graph, device profile, accounting, batch size, optimizer).
        scores: Channel scores (Fisher potential by default; any criterion works).
        budget_bytes: Memory budget under ``memory_measure`` (None: unconstrained).
        latency_budget_ms: Latency budget per training step, or None.
        memory_measure: ``peak`` or ``training`` (peak minus the inference peak).
        third: Third objective, ``latency`` or ``macs`` (backward MACs).
        space: Space options (granularity, last N layers, filters).
        alpha: Proxy exponent applied to the scores.
        bias_credit: Proxy credit of a bias-only update, as a share of the channel's score.
        sampler: ``nsga2`` (default), ``tpe``, ``gp`` or ``random``.
        seed: Sampler and warm-start seed.
        population_size: NSGA-II population (default 50).
        model: How to rebuild the model in a worker (``name``, ``weights``, ``num_classes``,
            ``input_size``, ``mcu_dir``); None for models that are not registered.
        scores_source: How the scores were made, for the record and mismatch checks.
        check_budgets: Refuse budgets no plan meets (skip only when already checked).
        local_search: Interleave neighbours of the best trials (see :mod:`._local`): every
            ``population_size`` trials, ``population_size // 2`` of them.
        contributions: A contribution table's results (``budgetsearch contrib``): the search
            then maximises the accuracy it predicts (:class:`~._measured.MeasuredModel`) instead
            of the proxy, and only the measured layers (and the classifier) may have their
            weights updated. None: the proxy.
        decay: The measured model's discount per further weight layer.
        loss_weight: The measured model's weight of validation-loss gains.
        contributions_source: Where the table came from (for the record).

    Raises:
        BudgetError: If no non-empty plan of the space meets the budgets.

    Example:
        A short search (16 trials, the baselines' plans among them) for MCUNet on an STM32F746
        with 64 KB of training memory; its plan captures at least the potential of TinyTrain's:

        >>> import torch
        >>> from budgetsearch import CostModel, LayerGraph, load_model, load_profile
        >>> from budgetsearch.criteria import magnitude_scores
        >>> from budgetsearch.search import Search
        >>> _ = torch.manual_seed(0)
        >>> model = load_model("mcunet-5fps", num_classes=10)
        >>> cost_model = CostModel(LayerGraph.from_model(model, input_size=128),
        ...                        load_profile("stm32f746"))
        >>> search = Search(cost_model=cost_model, scores=magnitude_scores(model),
        ...                 budget_bytes=64 * 1024, memory_measure="training", population_size=8)
        >>> result = search.run(n_trials=16)
        >>> result.objective_names
        ('proxy', 'training_memory_bytes', 'latency_ms')
        >>> len(result.trials), result.plan.provenance["memory_bytes"] <= 64 * 1024
        (16, True)
        >>> result.plan.predicted["proxy"] >= result.baselines["tinytrain"]["metrics"]["proxy"]
        True
    """

    def __init__(
        self,
        *,
        cost_model: CostModel,
        scores: Scores,
        budget_bytes: int | None,
        latency_budget_ms: float | None = None,
        memory_measure: str = "peak",
        third: str = "latency",
        space: SpaceOptions | None = None,
        alpha: float = 1.0,
        bias_credit: float = 0.25,
        sampler: str = "nsga2",
        seed: int = 0,
        population_size: int | None = None,
        model: Mapping[str, Any] | None = None,
        scores_source: str | None = None,
        check_budgets: bool = True,
        local_search: bool = True,
        contributions: Mapping[str, Mapping[str, Any]] | None = None,
        decay: float = CALIBRATED_DECAY,
        loss_weight: float = CALIBRATED_LOSS_WEIGHT,
        contributions_source: str | None = None,
    ) -> None:
        if sampler not in SAMPLERS:
            raise SearchError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
        self.cost_model, self.scores = cost_model, scores
        self.graph = cost_model.graph
        self.proxy = ProxyModel(self.graph, scores, alpha=alpha, bias_credit=bias_credit)
        self.accuracy: AccuracyModel = self.proxy
        self.contributions = dict(contributions) if contributions is not None else None
        if contributions is not None:
            measured = MeasuredModel(self.graph, self.proxy, contributions, decay=decay,
                                     loss_weight=loss_weight, source=contributions_source)
            self.accuracy = measured
            options = space or SpaceOptions()
            if options.weight_layers is None:
                space = dataclasses.replace(options, weight_layers=(
                    *measured.measured_layers, self.graph.layer_names[-1]))
        self.space = SearchSpace(self.graph, space)
        self.evaluator = Evaluator(
            space=self.space, proxy=self.accuracy, cost_model=cost_model,
            budget_bytes=budget_bytes,
            latency_budget_ms=latency_budget_ms, memory_measure=memory_measure, third=third)
        if check_budgets:
            self.evaluator.check_budgets()
        self.sampler_name, self.seed = sampler, int(seed)
        self.local_search = bool(local_search)
        self.population_size = int(population_size or 50)
        self.model = dict(model) if model else None
        self.scores_source = scores_source
        full = self.evaluator.measure({n: _full() for n in self.graph.layers})
        self.memory_ref = float(budget_bytes or full.memory_bytes)
        self.third_ref = float(latency_budget_ms if (latency_budget_ms and third == "latency")
                               else max(full.third, 1.0))

    # ------------------------------------------------------------------------------- config
    def config(self, *, n_trials: int | None = None) -> dict[str, Any]:
        """The study configuration (see :mod:`._config`)."""
        return build_config(self, n_trials=n_trials)

    @classmethod
    def from_study(cls, *, storage: str, study_name: str, seed: int | None = None,
                   sampler: str | None = None) -> Search:
        """Rebuild the search of an existing study from what it stores (for workers).

        Raises:
            SearchError: Unknown study, a study not made by budgetsearch, an unregistered model,
                or a rebuilt model whose layers differ from the study's.
        """
        from ..graph import LayerGraph
        from ..models import load_model
        from ..profiles import profile_from_dict

        study = load_study(open_storage(storage), study_name, storage)
        config, scores, _ = read_config(study)
        spec = config.get("model_spec")
        if not spec or not spec.get("name"):
            raise SearchError(f"study {study_name!r} was made from an unregistered model; "
                              "workers can only rebuild registered models")
        model = load_model(spec["name"], weights="random", num_classes=spec.get("num_classes"),
                           mcu_dir=spec.get("mcu_dir"))
        size = config["input_size"]
        graph = LayerGraph.from_model(model, input_size=(int(size[0]), int(size[1])),
                                      model_name=spec["name"])
        if graph.fingerprint != config["graph_fingerprint"]:
            raise SearchError(
                f"study {study_name!r}: the rebuilt model {spec['name']} has fingerprint "
                f"{graph.fingerprint}, the study's is {config['graph_fingerprint']}")
        profile = profile_from_dict(config["profile"], source=f"study {study_name}")
        if profile.latency is not None:  # timings made elsewhere say so, as a loaded file does
            profile.latency.check_this_process(source=f"study {study_name}'s profile")
        cm = CostModel(graph, profile,
                       accounting=config["accounting"], batch_size=config["batch_size"],
                       optimizer=config["optimizer"], bn_train=config["bn_train"],
                       training=config.get("training", True))
        assert scores is not None
        return cls(
            cost_model=cm, scores=scores, budget_bytes=config["budget_bytes"],
            latency_budget_ms=config["latency_budget_ms"],
            memory_measure=config["memory_measure"], third=config["third"],
            space=SpaceOptions.from_dict(config["space"]), alpha=config["alpha"],
            bias_credit=config["bias_credit"], sampler=sampler or config["sampler"],
            seed=config["seed"] if seed is None else seed,
            population_size=config["population_size"], model=spec,
            scores_source=config.get("scores_source"), check_budgets=False,
            contributions=config.get("contributions"),
            decay=(config.get("objective") or {}).get("decay", CALIBRATED_DECAY),
            loss_weight=(config.get("objective") or {}).get("loss_weight",
                                                             CALIBRATED_LOSS_WEIGHT),
            contributions_source=(config.get("objective") or {}).get("table_source"))

    # ---------------------------------------------------------------------------------- run
    def run(
        self,
        *,
        n_trials: int,
        storage: str | BaseStorage = "memory",
        study_name: str | None = None,
        pick_rule: str = "best",
        progress: bool = False,
        flush_seconds: float = 2.0,
        max_new: int | None = None,
        create: bool = True,
        warm_start: bool = True,
        extra_points: list[dict[str, Any]] | None = None,
        on_trial: Callable[[int], None] | None = None,
        tag: str | None = None,
    ) -> SearchResult:
        """Run (or continue) the study until it holds ``n_trials`` finished trials.

        Args:
            n_trials: Target number of finished trials in the study (warm-start trials count).
            storage: Storage URL (see :mod:`._storage`; ``memory`` keeps nothing), or an opened
                Optuna storage (from :func:`.storage.open_storage`).
            study_name: Study name (default: ``budgetsearch``).
            pick_rule: How the plan is chosen (see :func:`.front.pick`).
            progress: Show a progress bar (best feasible proxy, hypervolume, ETA).
            flush_seconds: Interval between batched writes to the storage.
            max_new: Stop after this many new trials from this process, whatever the total.
            create: Create the study if it does not exist (workers pass False).
            warm_start: Enqueue the baselines and the sparse first generation in a new study.
            extra_points: Parameter sets to enqueue first (e.g. a previous plan's, re-planning).
            on_trial: Called with the number of trials made by this process after each one.
            tag: Recorded as each new trial's ``worker`` user attribute.

        The sampler and the local search draw from :func:`run_seed` of the seed, the trials the
        study already holds and the tag: a new study draws from the seed itself, as before; a
        resumed one, or another worker, does not replay the draws of the first run.

        Raises:
            SearchError: Storage problems, a study made for something else, nothing feasible.
        """
        if n_trials < 1:
            raise SearchError(f"n_trials must be at least 1; got {n_trials}")
        name = study_name or "budgetsearch"
        t_start = time.perf_counter()
        if isinstance(storage, str):
            url, persistent_storage = storage, open_storage(storage)
        else:
            url, persistent_storage = storage_url(storage), storage
        shown = redact(url)
        config = self.config(n_trials=n_trials)
        t0 = time.perf_counter()
        study, baselines, created = self._open(persistent_storage, name, config, create, url)
        t_open = time.perf_counter() - t0
        memory_only = isinstance(persistent_storage, InMemoryStorage)
        existing = study.get_trials(deepcopy=False, states=DONE)
        # a process that joins a study another one is still filling (no finished trial yet)
        # draws its own points: with the creator's seed it would draw the creator's trials; a
        # study whose creator is gone (killed before its first write) is run as its creator
        # would have, from the seed
        joined = (not created and not existing and tag is None
                  and _creator_alive(study.user_attrs.get(CREATOR_KEY)))
        draws = run_seed(self.seed, len(existing), worker_id() if joined else tag)
        sampler = TimedSampler(make_sampler(self.sampler_name, seed=draws, space=self.space,
                                            population_size=self.population_size))
        if memory_only:
            work = study
            work.sampler = sampler
        else:
            with quiet():
                work = optuna.create_study(storage=InMemoryStorage(), sampler=sampler,
                                           directions=list(DIRECTIONS))
            if existing:
                work.add_trials(existing)
        tracker = FrontTracker(memory_ref=self.memory_ref, third_ref=self.third_ref)
        for params in extra_points or ():
            work.enqueue_trial(params, user_attrs={"seed_point": True}, skip_if_exists=False)
        if warm_start and not any("baseline" in t.user_attrs for t in existing):
            self._enqueue(work, baselines, len(existing) + len(extra_points or ()))
        loop = TrialLoop(study=study, work=work, evaluator=self.evaluator, tracker=tracker,
                         existing=existing, memory_only=memory_only,
                         flush_seconds=flush_seconds, on_trial=on_trial, tag=tag,
                         local=self._local(draws))
        loop.run(n_trials=n_trials, max_new=max_new, progress=progress)
        trials = loop.trials()
        chosen = pick(trials, pick_rule)
        stats = {**loop.stats(sampler.seconds), "open_seconds": t_open,
                 "seconds": time.perf_counter() - t_start}
        front = pareto_front(trials)
        hv = FrontTracker(memory_ref=self.memory_ref, third_ref=self.third_ref)
        for t in front:
            hv.add(t.values, True)
        result_baselines = baseline_table(baselines) if isinstance(baselines, list) else baselines
        plan = self.plan_for(chosen, study_name=name, storage=shown, pick_rule=pick_rule,
                             baselines=result_baselines, n_trials=len(trials),
                             hypervolume=hv.hypervolume)
        return SearchResult(plan, chosen, name, shown, list(trials), front, hv.hypervolume,
                            dict(result_baselines), self.evaluator.objective_names, stats)

    # ------------------------------------------------------------------------------ helpers
    def _open(self, storage: Any, name: str, config: dict, create: bool, url: str):
        """The persistent study, the baselines (computed for a new study, read otherwise) and
        whether this call created the study."""
        names = set(optuna.get_all_study_names(storage))
        if name in names:
            study = optuna.load_study(study_name=name, storage=storage)
            try:
                stored, _scores, baselines = read_config(study, with_scores=False,
                                                         wait_s=_config.CREATION_WAIT_S)
            except SearchError:
                if not (create and _abandoned(study, self.evaluator.objective_names)):
                    raise
                # its creator was killed before the configuration was all written, and
                # nothing was written for as long as read_config waited: made anew
                with contextlib.suppress(KeyError):
                    optuna.delete_study(study_name=name, storage=storage)
                return self._open(storage, name, config, create, url)
            diff = diff_config(stored, config)
            if diff:
                raise SearchError(f"study {name!r} in {redact(url)} was made for something else; "
                                  "use another --study name or the same settings: "
                                  + "; ".join(diff), stale_study=name,
                                  stale_creator=study.user_attrs.get(CREATOR_KEY))
            if create and stored.get("n_trials") != config.get("n_trials"):
                study.set_user_attr(CONFIG_KEY, {**stored, "n_trials": config.get("n_trials")})
            _say_other_sampler(name, stored, config)
            return study, baselines, False
        if not create:
            raise SearchError(f"no study {name!r} in {redact(url)}; studies there: "
                              f"{', '.join(sorted(names)) or 'none'}")
        baselines = baseline_plans(evaluator=self.evaluator, cost_model=self.cost_model,
                                   scores=self.scores, seed=self.seed)
        try:
            with quiet():
                study = optuna.create_study(storage=storage, study_name=name,
                                            directions=list(DIRECTIONS))
        except optuna.exceptions.DuplicatedStudyError:  # created meanwhile by another process
            return self._open(storage, name, config, False, url)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(self.evaluator.objective_names))
            study.set_user_attr(CREATOR_KEY, worker_id())
            write_config(study, config, self.scores, baseline_table(baselines))
        except BaseException:
            optuna.delete_study(study_name=name, storage=storage)
            raise
        return study, baselines, True

    def _local(self, seed: int) -> LocalSearch | None:
        if not self.local_search:
            return None
        return LocalSearch(self.space, seed=seed, period=self.population_size,
                           count=max(1, self.population_size // 2))

    def _enqueue(self, work: optuna.Study, baselines: Any, existing: int) -> None:
        points: list[tuple[dict, dict]] = []
        if isinstance(baselines, list):
            points = warm_points(self.evaluator, baselines)
        else:  # resumed study without its warm start: recompute the baselines' plans
            points = warm_points(self.evaluator, baseline_plans(
                evaluator=self.evaluator, cost_model=self.cost_model, scores=self.scores,
                seed=self.seed))
        fill = max(0, self.population_size - existing - len(points))
        for params in sparse_points(self.space, fill, seed=self.seed):
            points.append((params, {}))
        for params, attrs in points:
            work.enqueue_trial(params, user_attrs=attrs or None, skip_if_exists=False)

    def plan_for(self, trial: FrozenTrial, *, study_name: str, storage: str, pick_rule: str,
                 baselines: Mapping[str, Any], n_trials: int, hypervolume: float) -> Plan:
        """The plan of a trial, with provenance and predicted costs."""
        plan = self.plan_of(self.evaluator.updates(trial.params), method="search",
                            study_name=study_name, storage=storage, pick_rule=pick_rule,
                            baselines=baselines, n_trials=n_trials, hypervolume=hypervolume)
        return plan.with_(provenance={**plan.provenance, "trial": trial.number,
                                      "objectives": dict(zip(self.evaluator.objective_names,
                                                             trial.values, strict=True)),
                                      "constraints": dict(trial.constraints)})

    def plan_of(self, updates: Mapping[str, LayerUpdate], *, method: str, study_name: str,
                storage: str, pick_rule: str, baselines: Mapping[str, Any], n_trials: int,
                hypervolume: float) -> Plan:
        """A plan of these updates (a trial's, or a baseline's that won the race) with the
        study's provenance (``method`` says where the updates came from) and predicted costs."""
        updates = dict(updates)
        ev = self.evaluator.measure(updates)
        names = self.evaluator.objective_names
        comparison = {}
        for bname, entry in sorted(baselines.items()):
            m = (entry or {}).get("metrics")
            comparison[bname] = None if not m else {
                "proxy": m["proxy"], "memory_bytes": m["memory_bytes"],
                "latency_ms": m["latency_ms"], "backward_macs": m["backward_macs"],
                "feasible": m["feasible"], "proxy_gain": ev.proxy - m["proxy"],
                "proxy_ratio": ev.proxy / m["proxy"] if m["proxy"] > 0 else math.inf}
        provenance = {
            "method": method,
            "study": study_name,
            "storage": storage,
            "objectives": dict(zip(names, ev.values, strict=True)),
            "feasible": ev.feasible,
            "pick": pick_rule,
            "sampler": self.sampler_name,
            "seed": self.seed,
            "population_size": self.population_size,
            "local_search": self.local_search,
            "trials": n_trials,
            "hypervolume": hypervolume,
            "budgetsearch_version": __version__,
            "memory_measure": self.evaluator.memory_measure,
            "accounting": self.cost_model.acc.name,
            "bn_train": bool(self.cost_model.bn_train),
            "memory_bytes": ev.memory_bytes,
            "space": self.space.describe(),
            "proxy": {**self.proxy.describe(), "value": self.proxy(updates)},
            "objective": {**self.accuracy.describe(), "name": self.accuracy.name,
                          "value": ev.proxy},
            "scores": {"criterion": self.scores.criterion, "fingerprint": self.scores.fingerprint,
                       "source": self.scores_source,
                       "samples": self.scores.metadata.get("samples")},
            "baselines": comparison,
        }
        predicted = {**dataclasses.asdict(ev.summary), "proxy": self.proxy(updates)}
        if self.accuracy is not self.proxy:
            predicted["predicted_accuracy"] = ev.proxy
        return Plan.from_layers(
            self.graph, updates, device=self.cost_model.profile.name,
            memory_budget_bytes=self.evaluator.budget_bytes,
            latency_budget_ms=self.evaluator.latency_budget_ms,
            batch_size=self.cost_model.batch, optimizer=self.cost_model.optimizer,
            predicted=predicted, provenance=provenance)


def _full() -> LayerUpdate:
    return LayerUpdate("weight")


def _say_other_sampler(name: str, stored: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Warn when a run continues a study with another sampler or population than it was made
    with: allowed (the objective is the same), but the trials then come from two samplers."""
    changed = [(label, stored[key], config[key])
               for key, label in (("sampler", "sampler"), ("population_size", "population"))
               if stored.get(key) is not None and config.get(key) is not None
               and stored[key] != config[key]]
    if changed:
        warnings.warn(
            f"study {name!r} was made with "
            + ", ".join(f"{label} {was}" for label, was, _ in changed)
            + "; this run continues it with "
            + ", ".join(f"{label} {now}" for label, _, now in changed)
            + " (use another --study name to start afresh)", UserWarning, stacklevel=4)


def _creator_alive(creator: Any) -> bool:
    """Whether a study's creator may still be running: its process exists on this host, or it
    ran on another host (whose processes cannot be seen from here). A study without a recorded
    creator (made before the record) counts as its creator's gone."""
    if not isinstance(creator, str):
        return False
    return not worker_gone(creator, time.time(), math.inf)


def _abandoned(study: optuna.Study, objective_names: Sequence[str]) -> bool:
    """Whether a budgetsearch study's creation stopped before its configuration was complete
    and it holds no trial (read_config has waited for it). A study is budgetsearch's when it
    has begun to store its configuration, or names its objectives as this search does (the
    first thing written after the study itself); another program's empty study is not."""
    try:
        attrs = study.user_attrs
        ours = (CONFIG_KEY in attrs or CREATOR_KEY in attrs
                or list(study.metric_names or ()) == list(objective_names))
        return ours and COMPLETE_KEY not in attrs and not study.get_trials(deepcopy=False)
    except KeyError:  # deleted meanwhile
        return False


def run_seed(seed: int, existing: int, tag: str | None = None) -> int:
    """The seed a run's sampler and local search draw from: ``seed`` itself for a new study
    (``existing`` 0, no tag), so a fresh search is reproducible as it always was; otherwise a
    seed mixed from the seed, the number of finished trials the study holds and the worker's
    tag, so that resuming a study, or a second worker joining it, draws new points rather than
    the first run's again (which would spend trials on duplicates)."""
    if existing == 0 and tag is None:
        return int(seed)
    import hashlib

    text = f"{int(seed)}:{int(existing)}:{tag or ''}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
