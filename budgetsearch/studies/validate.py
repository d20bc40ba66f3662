"""The checks of a study file, section by section (see :mod:`.spec` for the format).

Every message names the file, the field (``methods[2].options``) and the allowed values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import BudgetSearchError
from .spec import (
    EXTRA_METHODS,
    ROLES,
    RUN_OPTIONS,
    SCORE_CRITERIA,
    UNSAFE_CHARS,
    Budget,
    DataSpec,
    DeviceSpec,
    MethodEntry,
    ModelSpec,
    StudyError,
    StudySpec,
)

__all__ = ["load_spec", "spec_from_dict", "validate"]

_TOP = ("name", "description", "data", "input_size", "models", "devices", "methods", "seeds",
        "training", "cost", "scores", "search", "results_dir", "exclude")
_DATA = ("name", "source", "train_split", "val_split", "train_size", "val_size", "per_class",
         "val_fraction", "test_split", "test_size",
         "seed", "epochs")
_MODEL = ("name", "weights", "mcu_dir")
_DEVICE = ("name", "budgets")
_BUDGET = ("memory", "latency", "label")
_METHOD = ("name", "method", "options", "scores", "models", "role", "lr", "filter_mode")
_TRAINING = ("epochs", "batch_size", "lr", "optimizer", "options", "keep_artifacts", "lrs",
             "engine")
#: How a study trains its plans: budgetsearch's Trainer, or the planner's PlanRunner.
ENGINES = ("trainer", "runner")
_COST = ("accounting", "memory_measure", "batch_size", "optimizer")
_SCORES = ("fisher_samples", "micro_batch")

def validate(data: Any, *, path: str | os.PathLike[str] | None = None,
                   results_dir: str | os.PathLike[str] | None = None) -> StudySpec:
    """A :class:`StudySpec` from a parsed study file (see :func:`.spec.load_spec`)."""
    from ..models import list_models
    from ..profiles import list_profiles
    from ..selectors import list_methods

    where = str(path) if path is not None else "<study>"
    path = Path(path) if path is not None else None
    top = _mapping(data, where, _TOP)
    name = str(top.get("name") or (path.stem if path else "study"))
    if UNSAFE_CHARS.search(name):
        raise StudyError(f"{where}: name: use letters, digits, '.', '_' or '-'; got {name!r}")
    models = tuple(_model(m, f"{where}: models[{i}]", list_models())
                   for i, m in enumerate(_list(top, "models", where)))
    devices = tuple(_device(d, f"{where}: devices[{i}]", list_profiles())
                    for i, d in enumerate(_list(top, "devices", where)))
    methods_known = [*list_methods(), *EXTRA_METHODS]
    methods = tuple(_method(m, f"{where}: methods[{i}]", methods_known, models)
                    for i, m in enumerate(_list(top, "methods", where)))
    raw_data = top.get("data", {})
    variants = raw_data if isinstance(raw_data, list) else [raw_data]
    if not variants:
        raise StudyError(f"{where}: data: expected a mapping or a non-empty list of them")
    datas = tuple(_data(d, f"{where}: data[{i}]") for i, d in enumerate(variants))
    for what, items in (("models", models), ("devices", devices), ("methods", methods),
                        ("data", datas)):
        names = [x.name for x in items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise StudyError(f"{where}: {what}: duplicate names {', '.join(dup)}; give each "
                             "entry a distinct name")
    seeds = top.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise StudyError(f"{where}: seeds: expected a list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        raise StudyError(f"{where}: seeds: {seeds!r} lists seed(s) {twice} twice")
    training = _section(top, "training", where, _TRAINING,
                        {"epochs": 1, "batch_size": 32, "lr": 0.05, "optimizer": "sgd",
                         "options": {}, "keep_artifacts": False})
    if not isinstance(training["keep_artifacts"], bool):
        raise StudyError(f"{where}: training.keep_artifacts: expected true or false")
    for key in ("epochs", "batch_size"):
        _positive_int(training[key], f"{where}: training.{key}")
    if not isinstance(training["lr"], (int, float)) or training["lr"] <= 0:
        raise StudyError(f"{where}: training.lr: expected a positive number, "
                         f"got {training['lr']!r}")
    _choice(training["optimizer"], ("sgd", "momentum", "adam"), f"{where}: training.optimizer")
    _tuning(training, where)
    cost = _cost(top, where)
    scores = _section(top, "scores", where, _SCORES, {"fisher_samples": 128, "micro_batch": 16})
    for key in _SCORES:
        _positive_int(scores[key], f"{where}: scores.{key}")
    search = top.get("search") or {}
    if not isinstance(search, dict):
        raise StudyError(f"{where}: search: expected a mapping of search options")
    _known_options(search, _search_options(), f"{where}: search")
    _effort(search, f"{where}: search")
    _search_values(search, f"{where}: search")
    _known_options(training["options"] or {}, _trainer_options(), f"{where}: training.options")
    size = _positive_int(top.get("input_size", 128), f"{where}: input_size")
    if top.get("results_dir") is not None and not isinstance(top["results_dir"],
                                                             (str, os.PathLike)):
        raise StudyError(f"{where}: results_dir: expected a path, got {top['results_dir']!r}")
    base = path.parent if path is not None else Path.cwd()
    out = Path(results_dir) if results_dir is not None else (
        base / top["results_dir"] if top.get("results_dir") else base / "results" / name)
    if training.get("lrs"):
        own = [m.name for m in methods if m.lr is not None]
        if own:
            raise StudyError(f"{where}: methods {', '.join(own)} set their own lr, but "
                             "training.lrs tunes every method on the same grid; drop one")
    if training.get("engine") == "runner":
        dynamic = [m.name for m in methods if m.dynamic is not None]
        if dynamic:
            raise StudyError(f"{where}: training.engine runner trains static plans only; "
                             f"methods {', '.join(dynamic)} re-plan during training (use "
                             "engine trainer)")
    exclude = _exclude(top.get("exclude") or [], f"{where}: exclude", {
        "data": [x.name for x in datas], "model": [m.name for m in models],
        "device": [d.name for d in devices],
        "budget": [b.label for d in devices for b in d.budgets],
        "method": [m.name for m in methods], "seed": list(seeds)})
    spec = StudySpec(exclude=exclude, name=name, path=path,
                     description=str(top.get("description") or ""),
                     data=datas, input_size=size, models=models, devices=devices,
                     methods=methods, seeds=tuple(seeds), training=training, cost=cost,
                     scores=scores, search=dict(search), results_dir=out)
    _unique_ids(spec, where)
    return spec


def _unique_ids(spec: StudySpec, where: str) -> None:
    """Distinct cells must have distinct ids (their record files): names that differ only in
    characters a file name cannot hold, or two device profiles with one file stem, collide."""
    seen: dict[str, dict[str, Any]] = {}
    for cell in spec.cells():
        first = seen.setdefault(cell.id, cell.key())
        if first != cell.key():
            differ = ", ".join(f"{k} {first[k]!r} and {v!r}" for k, v in cell.key().items()
                               if first[k] != v)
            raise StudyError(f"{where}: two cells would share the record {cell.id!r} ({differ}): "
                             "rename one so that the names differ in letters, digits, '.', "
                             "'_' or '-'")


# ---------------------------------------------------------------------------------- sections
def _mapping(value: Any, where: str, allowed: Sequence[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StudyError(f"{where}: expected a mapping with keys {', '.join(allowed)}; "
                         f"got {type(value).__name__}")
    unknown = [str(k) for k in value if k not in allowed]
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(allowed)}")
    return value


def _list(top: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = top.get(key)
    if not isinstance(value, list) or not value:
        raise StudyError(f"{where}: {key}: expected a non-empty list")
    return value


def _section(top: Mapping[str, Any], key: str, where: str, allowed: Sequence[str],
             defaults: Mapping[str, Any]) -> dict[str, Any]:
    value = top.get(key) or {}
    return {**defaults, **_mapping(value, f"{where}: {key}", allowed)}


def _choice(value: Any, allowed: Sequence[Any], where: str) -> str:
    if value not in allowed:
        raise StudyError(f"{where}: unknown value {value!r}; allowed: "
                         f"{', '.join(map(str, allowed))}")
    return str(value)


def _positive_int(value: Any, where: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StudyError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _data(value: Any, where: str) -> DataSpec:
    d = dict(_mapping(value, where, _DATA))
    for key in ("train_size", "val_size", "per_class", "epochs", "test_size"):
        _positive_int(d.get(key), f"{where}.{key}", optional=True)
    if not isinstance(d.get("seed", 0), int):
        raise StudyError(f"{where}.seed: expected an integer, got {d['seed']!r}")
    fraction = d.get("val_fraction")
    if fraction is not None and not (isinstance(fraction, (int, float))
                                     and not isinstance(fraction, bool) and 0 < fraction < 1):
        raise StudyError(f"{where}.val_fraction: expected a number in (0, 1), got {fraction!r}")
    if d.get("val_split") is not None:
        given = [k for k in ("val_fraction", "test_split", "test_size") if d.get(k) is not None]
        if given:
            raise StudyError(
                f"{where}: val_split names a validation split of its own, and {', '.join(given)} "
                "carve validation out of the training draw and report a test split; give one "
                "or the other (the test split is never used for a choice: drop val_split)")
    elif d.get("val_size") is not None:
        raise StudyError(f"{where}.val_size goes with val_split; validation carved from the "
                         "training draw is sized by val_fraction")
    text = ("name", "source", "train_split", "val_split", "test_split")
    return DataSpec(**{k: (str(v) if k in text and v is not None else v) for k, v in d.items()})


def _model(value: Any, where: str, known: Sequence[str]) -> ModelSpec:
    d = {"name": value} if isinstance(value, str) else dict(_mapping(value, where, _MODEL))
    _choice(d.get("name"), known, f"{where}.name (model)")
    return ModelSpec(**{k: None if v is None else str(v) for k, v in d.items()})


def _device(value: Any, where: str, known: Sequence[str]) -> DeviceSpec:
    from ..units import parse_bytes, parse_ms

    d = _mapping(value, where, _DEVICE)
    name = str(d.get("name"))
    if name not in known and not (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
        raise StudyError(f"{where}.name: unknown device {name!r}; allowed: {', '.join(known)} "
                         "or a profile .yaml path")
    raw_budgets = d.get("budgets")
    if raw_budgets is not None and not isinstance(raw_budgets, list):
        raise StudyError(f"{where}.budgets: expected a list of budgets (e.g. [99KB, 148KB] or "
                         f"[{{memory: 60MB, latency: 400ms}}]), got {raw_budgets!r}")
    budgets = []
    for i, raw in enumerate(raw_budgets or [None]):
        w = f"{where}.budgets[{i}]"
        b = {"memory": raw} if not isinstance(raw, dict) else _mapping(raw, w, _BUDGET)
        try:
            memory = None if b.get("memory") in (None, "device") else parse_bytes(
                b["memory"], what=f"{w}.memory")
            latency = None if b.get("latency") is None else parse_ms(b["latency"],
                                                                     what=f"{w}.latency")
        except BudgetSearchError as exc:
            raise StudyError(str(exc)) from exc
        label = b.get("label") or _budget_label(b.get("memory"), memory, latency)
        budgets.append(Budget(str(label), memory, latency))
    labels = [b.label for b in budgets]
    if len(set(labels)) != len(labels):
        raise StudyError(f"{where}.budgets: duplicate budget labels {labels}; set label:")
    return DeviceSpec(name, tuple(budgets))


def _budget_label(raw: Any, memory: int | None, latency: float | None) -> str:
    text = "device" if memory is None else (
        str(raw).replace(" ", "") if isinstance(raw, str) else f"{memory}B")
    return text + (f"-{latency:g}ms" if latency is not None else "")


_DEFAULT_SCORES = {"tinytrain": "fisher", "mit": "magnitude", "mit-scheme": "magnitude",
                   "neq": "fisher", "search": "fisher", "search-dynamic": "fisher"}
_DEFAULT_ROLE = {"search": "search", "search-dynamic": "search", "full": "reference",
                 "random": "baseline"}


def _method(value: Any, where: str, known: Sequence[str], models: Sequence[ModelSpec]
            ) -> MethodEntry:
    from ..selectors import MIT_SCHEMES, get_method

    d = {"method": value} if isinstance(value, str) else dict(_mapping(value, where, _METHOD))
    method = _choice(d.get("method"), known, f"{where}.method")
    options = d.get("options") or {}
    if not isinstance(options, dict):
        raise StudyError(f"{where}.options: expected a mapping")
    if method in ("search", "search-dynamic"):
        _known_options(options, _search_options(), f"{where}.options")
        _effort(options, f"{where}.options")
        _search_values(options, f"{where}.options")
    else:
        selector = "random" if method == "neq-dynamic" else method
        accepted = get_method(selector).defaults()
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise StudyError(f"{where}.options: unknown option(s) {', '.join(map(str, unknown))} "
                             f"of method {selector}; allowed: {', '.join(accepted) or 'none'}")
    scores = _choice(d.get("scores", _DEFAULT_SCORES.get(method, "none")), SCORE_CRITERIA,
                     f"{where}.scores")
    role = _choice(d.get("role", _DEFAULT_ROLE.get(method, "published")), ROLES, f"{where}.role")
    names = [m.name for m in models]
    only = d.get("models")
    if only is not None:
        if not isinstance(only, (str, list)):
            raise StudyError(f"{where}.models: expected a model name or a list of them, "
                             f"got {only!r}")
        only = [only] if isinstance(only, str) else list(only)
        for m in only:
            _choice(m, names, f"{where}.models (a model of this study)")
    if method == "mit-scheme":
        bad = [m for m in (only or names) if m not in MIT_SCHEMES]
        if bad:
            raise StudyError(f"{where}: mit-scheme has published schemes only for "
                             f"{', '.join(MIT_SCHEMES)}; not for {', '.join(bad)} (restrict it "
                             "with models: [...])")
    lr = d.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
        raise StudyError(f"{where}.lr: expected a positive number (this method's learning rate, "
                         f"overriding training.lr), got {lr!r}")
    from ..plan import FILTER_MODES

    filter_mode = d.get("filter_mode")
    if filter_mode is not None:
        _choice(filter_mode, FILTER_MODES, f"{where}.filter_mode")
    label = str(d.get("name") or method)
    return MethodEntry(label, method, dict(options), scores,
                       None if only is None else tuple(only), role,
                       None if lr is None else float(lr), filter_mode)


def _exclude(value: Any, where: str, known: Mapping[str, list[Any]]
             ) -> tuple[dict[str, tuple[Any, ...]], ...]:
    if not isinstance(value, list):
        raise StudyError(f"{where}: expected a list of patterns such as "
                         "{method: random, seed: [1, 2]}")
    out = []
    for i, raw in enumerate(value):
        pattern = _mapping(raw, f"{where}[{i}]", list(known))
        if not pattern:
            raise StudyError(f"{where}[{i}]: an empty pattern would exclude every cell")
        fields = {}
        for field, values in pattern.items():
            values = values if isinstance(values, list) else [values]
            for v in values:
                _choice(v, known[field], f"{where}[{i}].{field}")
            fields[field] = tuple(values)
        out.append(fields)
    return tuple(out)


def _cost(top: Mapping[str, Any], where: str) -> dict[str, Any]:
    from ..cost import ACCOUNTINGS
    from ..selectors import MEMORY_MEASURES

    cost = _section(top, "cost", where, _COST, {"accounting": "device", "memory_measure": "peak",
                                                 "batch_size": None, "optimizer": None})
    _choice(cost["accounting"], ACCOUNTINGS, f"{where}: cost.accounting")
    _choice(cost["memory_measure"], MEMORY_MEASURES, f"{where}: cost.memory_measure")
    _positive_int(cost["batch_size"], f"{where}: cost.batch_size", optional=True)
    if cost["optimizer"] is not None:
        _choice(cost["optimizer"], ("sgd", "momentum", "adam"), f"{where}: cost.optimizer")
    return cost


#: Arguments the study sets itself (not options of a spec).
_SET_BY_STUDY = frozenset({
    "self", "model", "plan", "train_data", "val_data", "epochs", "out_dir", "batch_size", "lr",
    "optimizer", "seed", "dynamic", "cost_model", "progress", "scores", "budget_bytes",
    "latency_budget_ms", "memory_measure", "scores_source", "test_data", "search_replan"})


def _signature_options(cls: Any, extra: Sequence[str] = ()) -> list[str] | None:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return sorted({*(p for p in params if p not in _SET_BY_STUDY), *extra})


def _tuning(training: dict[str, Any], where: str) -> None:
    """``training.lrs`` (a non-empty list of positive numbers, or absent) and
    ``training.engine`` (one of :data:`ENGINES`, or absent: the trainer)."""
    lrs = training.get("lrs")
    if lrs is not None:
        if (not isinstance(lrs, list) or not lrs
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                           for x in lrs)):
            raise StudyError(f"{where}: training.lrs: expected a non-empty list of positive "
                             f"learning rates (the grid every method is tuned on), got {lrs!r}")
        if len({f"{x:g}" for x in lrs}) != len(lrs):  # a run is keyed by the rate's {lr:g}
            raise StudyError(f"{where}: training.lrs: {lrs!r} lists a rate twice (rates that "
                             "agree to 6 significant digits count as one)")
        training["lrs"] = [float(x) for x in lrs]
    if training.get("engine") is not None:
        _choice(training["engine"], ENGINES, f"{where}: training.engine")


def _effort(options: Mapping[str, Any], where: str) -> None:
    """A search's run options: ``trials`` a positive integer, ``plan_seed`` one of at least 0,
    ``flush_seconds`` a positive number, ``pick`` a pick rule, ``effort`` one of the planner's
    levels, ``target`` a known target, ``lr_extensions``, ``race_folds`` and ``race_final``
    integers within the race's bounds, ``race_rungs`` increasing positive epoch counts."""
    for key in ("trials", "plan_seed"):
        value = options.get(key)
        least = 1 if key == "trials" else 0
        if key in options and (not isinstance(value, int) or isinstance(value, bool)
                               or value < least):
            raise StudyError(f"{where}.{key}: expected an integer of at least {least}, "
                             f"got {value!r}")
    if "flush_seconds" in options:
        value = options["flush_seconds"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise StudyError(f"{where}.flush_seconds: expected a positive number of seconds, "
                             f"got {value!r}")
    if "pick" in options:
        try:
            from ..search import parse_pick
        except ImportError:  # the search is not there: the rule is checked when it runs
            parse_pick = None
        if parse_pick is not None:
            try:
                parse_pick(str(options["pick"]))
            except BudgetSearchError as exc:
                raise StudyError(f"{where}.pick: {exc}") from exc
    if "effort" in options:
        from ..planner import EFFORTS

        _choice(options["effort"], list(EFFORTS), f"{where}.effort")
    if "target" in options:
        from ..choices import PLAN_TARGETS

        _choice(options["target"], PLAN_TARGETS, f"{where}.target")
    if "lr_extensions" in options:
        from ..planner.race import MAX_LR_EXTENSIONS

        value = options["lr_extensions"]
        if not isinstance(value, int) or isinstance(value, bool) or not (
                0 <= value <= MAX_LR_EXTENSIONS):
            raise StudyError(f"{where}.lr_extensions: expected an integer from 0 (the rate "
                             f"grid only) to {MAX_LR_EXTENSIONS}, got {value!r}")
    if "race_final" in options:
        from ..planner.race import MAX_FINAL, final_count_ok

        value = options["race_final"]
        if not final_count_ok(value):
            raise StudyError(f"{where}.race_final: expected 0 (no final) or an integer from 2 "
                             f"to {MAX_FINAL}, got {value!r}")
    if "race_folds" in options:
        from ..planner.race import MAX_FOLDS

        value = options["race_folds"]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_FOLDS:
            raise StudyError(f"{where}.race_folds: expected an integer from 1 (the validation "
                             f"split as it is) to {MAX_FOLDS}, got {value!r}")
    if "race_rungs" in options:
        from ..planner.race import rungs_ok

        value = options["race_rungs"]
        if not isinstance(value, list) or not rungs_ok(value):
            raise StudyError(f"{where}.race_rungs: expected a list of increasing positive "
                             f"epoch counts (e.g. [2, 4]), got {value!r}")


def _search_values(options: Mapping[str, Any], where: str) -> None:
    """The search's own options' values (their names are checked by :func:`_known_options`):
    ``space`` a mapping of :class:`~budgetsearch.search.SpaceOptions` fields, ``sampler`` a
    known sampler, ``alpha``, ``bias_credit``, ``decay`` and ``loss_weight`` finite numbers,
    ``population_size`` an integer of at least 2, ``third`` ``latency`` or ``macs``, and
    ``local_search`` and ``check_budgets`` true or false."""
    try:
        from ..search import SAMPLERS, SpaceOptions
    except ImportError:  # the search is not there: the values are checked when it runs
        return
    if "space" in options:
        space = options["space"]
        if not isinstance(space, Mapping):
            raise StudyError(f"{where}.space: expected a mapping of space options (granularity, "
                             f"last_n, filters, weight_layers, target), got {space!r}")
        try:
            SpaceOptions.from_dict(space)
        except BudgetSearchError as exc:
            raise StudyError(f"{where}.space: {exc}") from None
    if "sampler" in options:
        _choice(options["sampler"], SAMPLERS, f"{where}.sampler")
    if "third" in options:
        _choice(options["third"], ("latency", "macs"), f"{where}.third")
    for key in ("alpha", "bias_credit", "decay", "loss_weight"):
        value = options.get(key)
        if key in options and (isinstance(value, bool) or not isinstance(value, (int, float))
                               or not math.isfinite(value)):
            raise StudyError(f"{where}.{key}: expected a finite number, got {value!r}")
    value = options.get("population_size")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 2):
        raise StudyError(f"{where}.population_size: expected an integer of at least 2, got "
                         f"{value!r}")
    for key in ("local_search", "check_budgets"):
        if key in options and not isinstance(options[key], bool):
            raise StudyError(f"{where}.{key}: expected true or false, got {options[key]!r}")


def _search_options() -> list[str] | None:
    try:
        from ..search import Search
    except ImportError:  # the search is not there: options are checked when it runs
        return None
    return _signature_options(Search, RUN_OPTIONS)


def _trainer_options() -> list[str] | None:
    try:
        from ..trainer import Trainer
    except ImportError:
        return None
    return _signature_options(Trainer)


def _known_options(options: Mapping[str, Any], allowed: list[str] | None, where: str) -> None:
    if not isinstance(options, Mapping):
        raise StudyError(f"{where}: expected a mapping of options")
    unknown = [str(k) for k in options if allowed is not None and k not in allowed]
    if unknown:
        raise StudyError(f"{where}: unknown option(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(allowed or [])}")


# ------------------------------------------------------------------------------------ loading
def load_spec(path: str | os.PathLike[str], *, results_dir: str | os.PathLike[str] | None = None
              ) -> StudySpec:
    """Read and validate a study file.

    Args:
        path: The YAML file.
        results_dir: Where results go, overriding the file's ``results_dir`` and the default
            ``<file's directory>/results/<name>``.

    Raises:
        StudyError: Unreadable or malformed YAML, or any invalid field (naming it and the
            allowed values).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StudyError(f"{path}: cannot read the study file: {exc}") from exc
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: malformed YAML: {exc}") from exc
    return spec_from_dict(data, path=path, results_dir=results_dir)


def spec_from_dict(data: Any, *, path: str | os.PathLike[str] | None = None,
                   results_dir: str | os.PathLike[str] | None = None) -> StudySpec:
    """Validate a parsed study (see :func:`load_spec`).

    Raises:
        StudyError: Any invalid field, naming it and the allowed values.
    """
    return validate(data, path=path, results_dir=results_dir)
