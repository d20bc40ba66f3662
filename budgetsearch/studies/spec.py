"""Study specifications: a YAML file naming every cell of a study, validated before anything runs.

A study is the product data variant × model × device × budget × method × seed; every combination
is a :class:`Cell`. The file (read with ``yaml.safe_load`` only)::

    name: smoke                    # results go to <spec dir>/results/<name>/ (default: file stem)
    description: one line for the report
    data:                          # one mapping, or a list of them each with a distinct name
      name: default
      source: cifar10              # anything budgetsearch.data.load_dataset accepts
      train_split: train
      train_size: 200              # images drawn (seeded) from the train split; null = all
      val_fraction: 0.2            # validation carved (stratified) out of those (default 0.2)
      test_split: test             # only ever reported (default test)
      test_size: 200               # images drawn from it; null = all
      per_class: null              # balanced draw of this many train images per class first
      seed: 0
      epochs: null                 # this variant's epochs (default: training.epochs)
    input_size: 64
    models:                        # a name, or {name, weights, mcu_dir}
      - {name: mcunet-5fps, weights: imagenet}
    devices:                       # a profile name or path, with its budgets
      - name: stm32f746
        budgets: [64KB, {memory: 128KB, latency: 2s, label: b128}]   # memory null = profile's
    methods:                       # a method name, or a mapping
      - tinytrain
      - {name: gf-b2-r4, method: last-k, options: {k: 2, blocks: true, patch_size: 4}}
      - {method: mit-scheme, models: [mcunet-5fps]}  # label: largest published <= budget
      - {method: full, lr: 0.005}  # its own learning rate
      - search
    seeds: [0, 1, 2]
    training: {epochs: 1, batch_size: 32, lr: 0.05, optimizer: sgd, options: {},
               keep_artifacts: false,   # options: Trainer's (momentum, bn, every...)
               lrs: null,               # a grid: each cell trains at every rate, keeps the
                                        # best on validation (then no method sets its own lr)
               engine: trainer}         # or runner: the planner's PlanRunner (frozen prefix
                                        # cached, static plans, final epoch, no measured memory)
    cost: {accounting: device, memory_measure: peak, batch_size: null, optimizer: null}
    scores: {fisher_samples: 128, micro_batch: 16}
    search: {trials: 200}          # Search options (trials, pick, sampler, space, alpha...);
                                   # effort: quick|standard|thorough; plan_seed: the seed the
                                   # plan is made with (default the cell's: with it, every
                                   # seed trains the same plan, raced once)
                                   # lr_extensions: rates the race may try beyond
                                   # its grid's edges (default the effort's; 0: none)
                                   # race_folds: folds the race cross-validates on (1:
                                   # the validation split; default: 5-ish below 200 images)
                                   # race_final: candidates in the cross-validated final
                                   # of a race on the validation split (0: none; default
                                   # the effort's)
                                   # race_rungs: the race's rungs in epochs, replacing
                                   # the effort's (e.g. [2, 4]: thorough's race judged at
                                   # the study's 4 epochs, not its own 8)
                                   # target: pytorch|tte (plans MIT's engine takes)
    exclude:                       # cells not to run: every listed coordinate matches
      - {method: [gf-b2-r4], seed: [1, 2]}

A method mapping has ``method`` (required), ``name`` (its label in the results; default the
method), ``options`` (the selector's or the search's options), ``scores`` (criterion ranking the
channels: ``fisher``, ``magnitude``, ``random`` or ``none``; default per method), ``models``
(restrict it to these models) and ``role`` (``published``, ``search``, ``baseline``,
``reference``: how the report compares it) and ``lr`` (its own learning rate, overriding
``training.lr``: full fine-tuning usually needs a smaller one than a sparse update) and
``filter_mode`` (``normalized``, ``paper`` or ``corrected``: the gradient-filter variant recorded
in its plans, which the trainer uses).
``exclude`` patterns match cells on ``data``, ``model``, ``device``, ``budget`` (label),
``method`` (name) and ``seed``, each a value or a list of values; a cell matching all fields of
a pattern is left out. Every unknown model, device, method or key is an error naming it and the
allowed values, raised by :func:`~.validate.load_spec` before any cell runs.

Every choice a training run makes (its best epoch, and with ``training.lrs`` its learning rate)
is made on the validation split carved out of the training draw; the test split is only
reported (records carry the test accuracy at the best validation epoch and the final one). A
data variant that names ``val_split`` (with ``val_size``) instead validates on that split: the
protocol of the studies committed before this rule, kept so that their records can still be
reported (their accuracy is then the final one, not the best over epochs); ``val_split``
together with ``val_fraction``, ``test_split`` or ``test_size`` is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BudgetSearchError

__all__ = [
    "EXTRA_METHODS",
    "ROLES",
    "Budget",
    "Cell",
    "DataSpec",
    "DeviceSpec",
    "MethodEntry",
    "ModelSpec",
    "StudyError",
    "StudySpec",
]

#: Study methods beyond the registered selectors.
EXTRA_METHODS = ("search", "search-dynamic", "neq-dynamic")
ROLES = ("published", "search", "baseline", "reference")
SCORE_CRITERIA = ("fisher", "magnitude", "random", "none")
UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


#: Search options a study passes to the planner (Search.run, the race) rather than to Search.
RUN_OPTIONS = ("trials", "pick", "flush_seconds", "effort", "plan_seed", "lr_extensions",
               "race_folds", "race_final", "race_rungs", "target")


class StudyError(BudgetSearchError):
    """A study file is invalid, or a study cannot run or be reported."""


@dataclass(frozen=True)
class DataSpec:
    """One data variant: source, splits, sizes, the seed of the subset draws, and optionally its
    own number of epochs (overriding ``training.epochs``)."""

    name: str = "default"
    source: str = "cifar10"
    train_split: str = "train"
    val_split: str | None = None
    train_size: int | None = None
    val_size: int | None = None
    per_class: int | None = None
    seed: int = 0
    epochs: int | None = None
    val_fraction: float | None = None
    test_split: str | None = None
    test_size: int | None = None

    @property
    def legacy(self) -> bool:
        """Validation on a split of its own (``val_split``; the committed studies' test split)
        instead of a part carved out of the training draw."""
        return self.val_split is not None

    def epochs_or(self, default: int) -> int:
        """This variant's number of epochs, or the training recipe's."""
        return int(self.epochs or default)

    def hashed(self) -> dict[str, Any]:
        """The fields that determine results (the honest-split fields only when set, so that
        records of the legacy protocol keep their hash)."""
        return {k: v for k, v in asdict(self).items()
                if not (k in ("val_fraction", "test_split", "test_size") and v is None)}


@dataclass(frozen=True)
class ModelSpec:
    """A model and its weights (``imagenet``, ``random``, a file, or None for the default)."""

    name: str
    weights: str | None = None
    mcu_dir: str | None = None


@dataclass(frozen=True)
class Budget:
    """A memory budget in bytes (None: the profile's memory) and optional latency budget."""

    label: str
    memory_bytes: int | None
    latency_ms: float | None = None


@dataclass(frozen=True)
class DeviceSpec:
    """A device profile (name or path) and its budgets."""

    name: str
    budgets: tuple[Budget, ...]


@dataclass(frozen=True)
class MethodEntry:
    """A method of the study: label, method, options, channel criterion, models, role, its own
    learning rate (None: the recipe's ``training.lr``) and the gradient-filter variant its plans
    are trained with (None: the plan's own, unless ``training.options`` sets one)."""

    name: str
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)
    scores: str = "none"
    models: tuple[str, ...] | None = None
    role: str = "published"
    lr: float | None = None
    filter_mode: str | None = None

    @property
    def selector(self) -> str | None:
        """The selector method run to make the plan (None for the search)."""
        if self.method in ("search", "search-dynamic"):
            return None
        return "random" if self.method == "neq-dynamic" else self.method

    @property
    def dynamic(self) -> str | None:
        """The trainer's dynamic mode (the scores refreshed during training): ``neq`` for
        ``neq-dynamic`` (NEq velocities), ``fisher`` for ``search-dynamic`` (Fisher potential on
        the current weights), None for a static method."""
        return {"neq-dynamic": "neq", "search-dynamic": "fisher"}.get(self.method)

    @property
    def replan_method(self) -> str | None:
        """Who picks the re-selected plans: the ``neq`` budgeted selector (Quelennec et al.) for
        ``neq-dynamic``, the budget search's re-planning for ``search-dynamic``."""
        return {"neq-dynamic": "selector", "search-dynamic": "search"}.get(self.method)


@dataclass(frozen=True)
class StudySpec:
    """A validated study (see the module docstring for the file format)."""

    name: str
    path: Path | None
    description: str
    data: tuple[DataSpec, ...]
    input_size: int
    models: tuple[ModelSpec, ...]
    devices: tuple[DeviceSpec, ...]
    methods: tuple[MethodEntry, ...]
    seeds: tuple[int, ...]
    training: Mapping[str, Any]
    cost: Mapping[str, Any]
    scores: Mapping[str, Any]
    search: Mapping[str, Any]
    results_dir: Path
    exclude: tuple[Mapping[str, tuple[Any, ...]], ...] = ()

    def cells(self) -> list[Cell]:
        """Every cell not excluded, in a stable order (data, model, device, budget, method,
        seed)."""
        out = []
        for data in self.data:
            for model in self.models:
                for device in self.devices:
                    for budget in device.budgets:
                        for method in self.methods:
                            if method.models is not None and model.name not in method.models:
                                continue
                            out.extend(Cell(self, data, model, device.name, budget, method, s)
                                       for s in self.seeds)
        return [c for c in out if not any(_matches(c.key(), p) for p in self.exclude)]

    @property
    def cells_dir(self) -> Path:
        """Where the per-cell records live."""
        return self.results_dir / "cells"


@dataclass(frozen=True)
class Cell:
    """One (data, model, device, budget, method, seed) combination of a study."""

    study: StudySpec = field(repr=False, compare=False)
    data: DataSpec
    model: ModelSpec
    device: str
    budget: Budget
    method: MethodEntry
    seed: int

    @property
    def id(self) -> str:
        """A file-name-safe identifier, unique in the study."""
        device = Path(self.device).stem if self.device.endswith((".yaml", ".yml")) else self.device
        parts = [self.data.name, self.model.name, device, self.budget.label, self.method.name,
                 f"s{self.seed}"]
        return "__".join(UNSAFE_CHARS.sub("-", str(p)) for p in parts)

    def key(self) -> dict[str, Any]:
        """The cell's coordinates, for tables."""
        return {"data": self.data.name, "model": self.model.name, "device": self.device,
                "budget": self.budget.label, "method": self.method.name, "seed": self.seed}

    def config(self) -> dict[str, Any]:
        """Everything that determines the cell's result (JSON-ready)."""
        s = self.study
        method = {k: v for k, v in _plain(asdict(self.method)).items()
                  if not (k in _UNSET_UNHASHED and v is None)}
        return {"data": self.data.hashed(), "model": asdict(self.model), "device": self.device,
                "budget": asdict(self.budget), "method": method,
                "seed": self.seed, "input_size": s.input_size, "training": _plain(
                    {k: v for k, v in s.training.items() if k != "keep_artifacts"
                     and not (k in _UNSET_UNHASHED_TRAINING and v is None)}),
                "cost": _plain(s.cost), "scores": _plain(s.scores),
                "search": _plain(s.search) if self.method.selector is None else None}

    def config_hash(self) -> str:
        """A short hash of :meth:`config`: a record with another hash is outdated."""
        text = json.dumps(self.config(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _matches(key: Mapping[str, Any], pattern: Mapping[str, tuple[Any, ...]]) -> bool:
    """Whether a cell's coordinates match every field of an ``exclude`` pattern."""
    return all(key[field] in values for field, values in pattern.items())


#: Method fields added after studies had run: left out of a cell's configuration while unset, so
#: the records made before them stay current.
_UNSET_UNHASHED = ("filter_mode",)
_UNSET_UNHASHED_TRAINING = ("lrs", "engine")


def _plain(value: Any) -> Any:
    """Mappings to dicts and tuples to lists, recursively (JSON-ready)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
