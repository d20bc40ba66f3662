"""What a study stores about itself, so that any worker can rebuild its objective.

A study's user attributes hold:

- ``budgetsearch:config``: a JSON document with the model (registered name, weights, classes,
  input size), the device profile (embedded, so a worker needs no profile file), the accounting,
  batch size, optimizer, budgets, memory measure, third objective, space options, proxy options,
  sampler, seed, population size, target trial count, the traced graph's fingerprint and the
  scores' digest and origin;
- ``budgetsearch:scores:<i>``: the scores ``.npz`` file, base64 in chunks of at most 60,000
  characters (MySQL's ``TEXT`` limit), so workers on other machines need no scores file;
- ``budgetsearch:baselines``: the warm-start baselines' exact figures;
- ``budgetsearch:creator``: the worker that created the study (``host:pid:random``), so that a
  process finding it still empty can tell a creator at work from one that was killed;
- ``budgetsearch:complete``: written last; a study without it was interrupted while being created.

A worker needs no weights: the search reads only layer shapes (from the model name) and the stored
scores.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from ..criteria import Scores
from ..errors import SearchError
from ._storage import complete_numbers

__all__ = [
    "IDENTITY",
    "build_config",
    "decode_scores",
    "diff_config",
    "encode_scores",
    "profile_digest",
    "read_config",
    "scores_digest",
    "stored_scores",
    "write_config",
]

PREFIX = "budgetsearch:"
CONFIG_KEY = PREFIX + "config"
COMPLETE_KEY = PREFIX + "complete"
BASELINES_KEY = PREFIX + "baselines"
CREATOR_KEY = PREFIX + "creator"
SCORES_PREFIX = PREFIX + "scores:"
_CHUNK = 60_000

#: Config fields that define a study's objective: a study opened with other values is refused.
IDENTITY: tuple[tuple[str, str], ...] = (
    ("model", "model"),
    ("num_classes", "number of classes"),
    ("input_size", "input size"),
    ("graph_fingerprint", "model fingerprint"),
    ("device", "device profile"),
    ("profile_digest", "device profile contents"),
    ("accounting", "accounting"),
    ("batch_size", "batch size"),
    ("optimizer", "optimizer"),
    ("bn_train", "batch-norm mode"),
    ("budget_bytes", "memory budget (bytes)"),
    ("latency_budget_ms", "latency budget (ms)"),
    ("memory_measure", "memory measure"),
    ("third", "third objective"),
    ("space", "search space options"),
    ("alpha", "proxy exponent alpha"),
    ("bias_credit", "proxy bias credit"),
    ("scores_source", "scores source"),
    ("scores_digest", "scores"),
    ("objective", "accuracy objective"),
)


def profile_digest(profile_dict: Mapping[str, Any]) -> str:
    """A short digest of a profile's contents."""
    text = json.dumps(profile_dict, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_scores(scores: Scores) -> tuple[str, list[str]]:
    """The scores as (digest, base64 chunks of the ``.npz`` file)."""
    with tempfile.TemporaryDirectory(prefix="budgetsearch-") as tmp:
        path = scores.save(Path(tmp) / "scores.npz")
        raw = path.read_bytes()
    digest = scores_digest(scores)
    text = base64.b64encode(raw).decode("ascii")
    return digest, [text[i:i + _CHUNK] for i in range(0, len(text), _CHUNK)] or [""]


def scores_digest(scores: Scores) -> str:
    """A digest of the score values (not of the file bytes or metadata)."""
    h = hashlib.sha256(scores.criterion.encode())
    for name, ls in scores.layers.items():
        h.update(name.encode())
        h.update(ls.out_channel.tobytes())
        if ls.in_channel is not None:
            h.update(ls.in_channel.tobytes())
        for r, values in ls.filtered.items():
            h.update(f"filtered {r}".encode())
            h.update(values.tobytes())
    return h.hexdigest()[:16]


def decode_scores(chunks: list[str]) -> Scores:
    """Inverse of :func:`encode_scores`.

    Raises:
        SearchError: If the stored scores are unreadable.
    """
    try:
        raw = base64.b64decode("".join(chunks).encode("ascii"), validate=True)
    except ValueError as exc:
        raise SearchError(f"the study's stored scores are corrupted ({exc})") from None
    with tempfile.TemporaryDirectory(prefix="budgetsearch-") as tmp:
        path = Path(tmp) / "scores.npz"
        path.write_bytes(raw)
        try:
            return Scores.load(path)
        except Exception as exc:
            raise SearchError(f"the study's stored scores are unreadable ({exc})") from None


def write_config(study: Any, config: Mapping[str, Any], scores: Scores,
                 baselines: Mapping[str, Any]) -> None:
    """Store the config, scores and baselines in a new study's user attributes."""
    _digest, chunks = encode_scores(scores)
    study.set_user_attr(CONFIG_KEY, dict(config))
    for i, chunk in enumerate(chunks):
        study.set_user_attr(f"{SCORES_PREFIX}{i}", chunk)
    study.set_user_attr(BASELINES_KEY, dict(baselines))
    study.set_user_attr(COMPLETE_KEY, len(chunks))


#: Seconds a study without trials and without its configuration is given to finish being
#: created by another process before it is judged interrupted (creating one writes a few
#: attributes: well under a second).
CREATION_WAIT_S = 30.0


def read_config(study: Any, *, with_scores: bool = True,
                wait_s: float = CREATION_WAIT_S) -> tuple[dict, Scores | None, dict]:
    """The stored config, scores (if asked) and baselines of a study.

    A study another process is still creating (no trials yet, its configuration not all
    written) is waited for, ``wait_s`` seconds at most.

    Raises:
        SearchError: If the study was not made by budgetsearch, its creation was interrupted,
            or it was deleted meanwhile (``transient``: running again creates it anew).
    """
    start = time.monotonic()
    try:
        attrs = study.user_attrs
        while (COMPLETE_KEY not in attrs and time.monotonic() - start < wait_s
               and not study.get_trials(deepcopy=False)):
            time.sleep(0.25)
            attrs = study.user_attrs
    except KeyError:  # Optuna's "record does not exist": its creator failed and removed it
        raise SearchError(f"study {study.study_name!r} was deleted while it was being created "
                          "(the process creating it failed); run again", transient=True
                          ) from None
    waited = (f" (nothing more was written in {wait_s:g} s)"
              if time.monotonic() - start >= wait_s else "")
    if CONFIG_KEY not in attrs:
        raise SearchError(f"study {study.study_name!r} was not created by budgetsearch (it has "
                          f"no stored configuration{waited})")
    if COMPLETE_KEY not in attrs:
        raise SearchError(f"study {study.study_name!r} is incomplete: its creation was "
                          f"interrupted{waited}; delete it or use another --study name")
    config = dict(attrs[CONFIG_KEY])
    scores = None
    if with_scores:
        n = int(attrs[COMPLETE_KEY])
        try:
            chunks = [attrs[f"{SCORES_PREFIX}{i}"] for i in range(n)]
        except KeyError as exc:
            raise SearchError(f"study {study.study_name!r}: stored scores incomplete ({exc})"
                              ) from None
        scores = decode_scores(chunks)
    return config, scores, dict(attrs.get(BASELINES_KEY) or {})


# parts of an identity field that say where something was read from, not what it is: the
# measured objective's table is identified by its digest, so a study moved or copied with its
# contribution table (another path, e.g. a study's results under another --results) goes on
_LOCATION_KEYS: dict[str, tuple[str, ...]] = {"objective": ("table_source",)}


def diff_config(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """The identity fields that differ, as readable phrases (fields missing from ``given`` are
    not compared; nor are the file locations of :data:`_LOCATION_KEYS`)."""
    def content(key: str, value: Any) -> Any:
        drop = _LOCATION_KEYS.get(key, ())
        if drop and isinstance(value, Mapping):
            return {k: v for k, v in value.items() if k not in drop}
        return value

    out = []
    for key, label in IDENTITY:
        if key not in given or (key == "scores_digest" and given[key] is None):
            continue
        a, b = content(key, stored.get(key)), content(key, given.get(key))
        if _norm(a) != _norm(b):
            out.append(f"{label}: the study has {_show(a)}, this run {_show(b)}")
    return out


def stored_scores(
    storage: Any, study_name: str, *, config: Mapping[str, Any]
) -> tuple[Scores, int] | None:
    """The scores a stored study was made with, when it was made for the given configuration:
    what a run that continues the study searches with.

    Args:
        storage: A storage URL or an opened storage.
        study_name: The study.
        config: The run's configuration (:meth:`~budgetsearch.search.Search.config`); the
            identity fields it lacks (or a None ``scores_digest``) are not compared.

    Returns:
        The stored scores and the number of complete trials the study holds, or None when the
        storage holds no study of that name.

    Raises:
        SearchError: If the study was made for something else (naming each field that
            differs), was not made by budgetsearch, or its creation was interrupted.
    """
    if study_name not in optuna.get_all_study_names(storage):
        return None
    study = optuna.load_study(study_name=study_name, storage=storage)
    stored, scores, _ = read_config(study)
    diff = diff_config(stored, config)
    if diff:
        raise SearchError(f"study {study_name!r} was made for something else; use another "
                          "study name or the same settings: " + "; ".join(diff),
                          stale_study=study_name, stale_creator=study.user_attrs.get(CREATOR_KEY))
    assert scores is not None
    return scores, len(complete_numbers(study))


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    return "none" if value is None else str(value)


def build_config(search: Any, *, n_trials: int | None = None) -> dict[str, Any]:
    """The configuration of a :class:`~._study.Search` as its study stores it."""
    from .._version import __version__
    from ..profiles import profile_to_dict

    cm, ev = search.cost_model, search.evaluator
    profile = profile_to_dict(cm.profile)
    model = search.model or {}
    return {
        "version": __version__,
        "model": model.get("name", search.graph.model_name),
        "model_spec": model or None,
        "num_classes": model.get("num_classes"),
        "input_size": list(search.graph.input_shape[1:]),
        "graph_fingerprint": search.graph.fingerprint,
        "device": cm.profile.name,
        "profile": profile,
        "profile_digest": profile_digest(profile),
        "accounting": cm.acc.name,
        "batch_size": cm.batch,
        "optimizer": cm.optimizer,
        "bn_train": cm.bn_train,
        "training": cm.training,
        "budget_bytes": ev.budget_bytes,
        "latency_budget_ms": ev.latency_budget_ms,
        "memory_measure": ev.memory_measure,
        "third": ev.third,
        "space": search.space.options.to_dict(),
        "alpha": search.proxy.alpha,
        "bias_credit": search.proxy.bias_credit,
        "scores_source": search.scores_source,
        "scores_digest": scores_digest(search.scores),
        "scores_criterion": search.scores.criterion,
        "objective": None if search.contributions is None else search.accuracy.describe(),
        "contributions": search.contributions,
        "sampler": search.sampler_name,
        "seed": search.seed,
        "population_size": search.population_size,
        "n_trials": n_trials,
    }
