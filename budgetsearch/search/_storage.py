"""Study storage: URL checks, opening Optuna storages, and batched trial writes.

Accepted URLs: ``sqlite:///path.db`` (the embedded default), ``postgresql://user:pw@host/db``
(psycopg 3, or psycopg2 when only that is installed) and ``mysql://...`` (any SQLAlchemy driver
suffix, e.g. ``postgresql+psycopg2://``), ``journal:///path.log``
(Optuna's append-only journal file) and ``memory`` (not persistent). Anything else, a missing
database driver or an unreachable server raises :class:`~budgetsearch.errors.SearchError` before
any study is created.

**Batched writes.** Optuna's RDB storage writes a trial's parameters one SQL round trip at a time:
about 0.3 s for a 160-parameter trial here, far below the search's pace. The search therefore runs
on an in-memory study and persists finished trials in batches (:func:`write_trials`). For RDB
storages a batch is one transaction through Optuna's own table models, holding the study row lock
Optuna itself takes when it numbers trials, so trial numbers stay unique and contiguous with any
concurrent writer; a batch is written entirely or not at all. Other storages go through
:meth:`optuna.study.Study.add_trials`. Resuming reloads every persisted trial, including the
samplers' generation attributes, so a continued study is a true continuation.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import distribution_to_json
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from .._io import locked
from ..errors import SearchError

__all__ = [
    "complete_numbers",
    "fetch_trials",
    "load_study",
    "open_storage",
    "redact",
    "storage_kind",
    "storage_url",
    "write_trials",
]

_RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")
_DRIVER_HINT = {
    "postgresql": "psycopg (pip install 'budgetsearch[postgres]', i.e. 'psycopg[binary]')",
    "mysql": "a MySQL driver such as pymysql (pip install pymysql)",
}


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and provenance)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", str(url))


def storage_kind(url: str) -> str:
    """``sqlite``, ``rdb`` (another SQL server), ``journal`` or ``memory``.

    Raises:
        SearchError: For an unknown scheme, listing the accepted forms.
    """
    text = str(url).strip()
    if text in ("memory", ":memory:") or text.lower() in ("sqlite://", "sqlite:///:memory:"):
        return "memory"  # an in-memory SQLite database lives as long as its one connection
    scheme = text.split("://", 1)[0].split("+", 1)[0].lower() if "://" in text else ""
    if scheme == "journal":
        return "journal"
    if scheme == "sqlite":
        return "sqlite"
    if scheme in _RDB_SCHEMES:
        return "rdb"
    raise SearchError(
        f"unknown storage URL {redact(text)!r}: use sqlite:///path.db, "
        "postgresql://user:password@host/database, mysql://..., journal:///path.log or memory"
    )


def describe_url(url: str) -> str:
    """A short human-readable description of a storage URL."""
    return redact(url)


def open_storage(url: str, *, existing: bool = False) -> BaseStorage:
    """Open (and, for SQL databases, initialise) an Optuna storage.

    Args:
        url: The storage URL.
        existing: Refuse a SQLite or journal file that does not exist, instead of creating
            it (for commands that only read a study: a mistyped path is then an error, not a
            new empty database).

    Raises:
        SearchError: Unknown scheme, missing driver, missing directory, unreachable server, an
            incompatible schema, or a missing file with ``existing``; the message names the URL
            (password redacted).
    """
    kind = storage_kind(url)
    shown = redact(url)
    if kind == "memory":
        return InMemoryStorage()
    if existing and kind in ("sqlite", "journal"):
        from sqlalchemy.engine import make_url

        target = (make_url(_with_driver(url)).database if kind == "sqlite"
                  else url.split("://", 1)[1])
        if target and target != ":memory:" and not Path(target).expanduser().exists():
            raise SearchError(f"storage {shown}: no such file {target} (this command reads a "
                              "study and creates no database)")
    if kind == "journal":
        path = Path(url.split("://", 1)[1]).expanduser()
        if not path.parent.is_dir():
            raise SearchError(f"storage {shown}: directory {path.parent} does not exist")
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise SearchError(f"cannot open journal storage {shown}: {exc}") from None
    engine_kwargs: dict[str, Any] = {}
    url = _with_driver(url)
    db_file: Path | None = None
    if kind == "sqlite":
        from sqlalchemy.engine import make_url

        target = make_url(url).database  # the file SQLAlchemy opens (no query string)
        if target and target != ":memory:":
            db_file = Path(target).resolve()  # one lock however the file is spelled
            if not db_file.parent.is_dir():
                raise SearchError(f"storage {shown}: directory {db_file.parent} does not exist")
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        if db_file is not None and os.access(db_file.parent, os.W_OK):
            # Optuna creates the schema of a new database without guarding against another
            # process doing the same ("table studies already exists"): processes opening one
            # file take turns (the lock file is <db>.lock; a read-only folder holds no new
            # database and gets no lock file)
            with locked(db_file):
                storage = RDBStorage(url, engine_kwargs=engine_kwargs)
        else:
            storage = _rdb_storage(url, engine_kwargs)
    except ImportError as exc:
        scheme, _, driver = url.split("://", 1)[0].lower().partition("+")
        if driver:
            raise SearchError(f"storage {shown}: the database driver {driver} named in the URL "
                              "is not installed") from None
        hint = _DRIVER_HINT.get("postgresql" if scheme.startswith("postgres") else scheme, "")
        why = f"; install {hint}" if hint else f" ({exc.__cause__ or exc})"
        raise SearchError(f"storage {shown}: the database driver is not installed{why}") from None
    except Exception as exc:  # sqlalchemy errors: unreachable server, bad credentials...
        raise SearchError(f"cannot open storage {shown}: {_first_line(exc)}",
                          transient=_may_pass(exc)) from None
    if kind == "sqlite":
        _tune_sqlite(storage)
    return storage


# what a database says when it is down, unreachable or busy now (and may not be later); a wrong
# password, an unknown database or a file that is not a database says none of these
_PASSING = ("could not connect", "connection refused", "timed out",
            "timeout", "database is locked", "server closed the connection",
            "connection reset", "too many connections", "the database system is starting up")


def _may_pass(exc: BaseException) -> bool:
    """True when a database error says trying again later may succeed (a SQLAlchemy
    ``OperationalError`` whose message names a server down, unreachable or busy)."""
    from sqlalchemy.exc import OperationalError

    if not isinstance(exc, OperationalError):
        return False
    text = _db_message(exc).lower()
    return any(s in text for s in _PASSING)


def _db_message(exc: BaseException) -> str:
    """The database driver's own message (SQLAlchemy wraps it in ``orig``), else the error's."""
    return str(getattr(exc, "orig", None) or exc)


def _first_line(exc: BaseException) -> str:
    """The first line of :func:`_db_message`, or the error's type when it says nothing."""
    lines = _db_message(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], *, attempts: int = 3,
                 pause_s: float = 0.5) -> RDBStorage:
    """An :class:`~optuna.storages.RDBStorage` on a database server, tried again when another
    process was creating the same new schema at the same moment (the error says a table or
    row already exists; once that process is done, opening succeeds)."""
    for attempt in range(attempts - 1):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs)
        except Exception as exc:
            text = _db_message(exc).lower()
            if not any(s in text for s in ("already exists", "duplicate", "unique")):
                raise
            time.sleep(pause_s * (attempt + 1))
    return RDBStorage(url, engine_kwargs=engine_kwargs)


def _with_driver(url: str) -> str:
    """A ``postgresql://`` URL without a driver names one that is installed: psycopg (3,
    SQLAlchemy's default) if present, else psycopg2."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme.lower() not in ("postgresql", "postgres") or not sep:
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql+psycopg://{rest}" if scheme.lower() == "postgres" else url


def _tune_sqlite(storage: RDBStorage) -> None:
    """Write-ahead logging: readers do not block the writer (several workers on one file), and a
    killed process never corrupts the file."""
    from sqlalchemy import event

    @event.listens_for(storage.engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    storage.engine.dispose()


def _rdb_backend(study: optuna.Study) -> RDBStorage | None:
    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def write_trials(study: optuna.Study, trials: Sequence[FrozenTrial], *,
                 on_written: Callable[[int, int], object] | None = None) -> list[int]:
    """Persist finished trials into a study in one batch.

    Args:
        study: The persistent study.
        trials: Finished trials (their numbers and ids are ignored; new ones are assigned); a
            parameter name must have the same distribution in all of them (as in the search).
        on_written: Called with (position in ``trials``, number) for each trial once it is
            stored: a SQL database stores the batch in one transaction, a journal file one
            trial at a time, so a write stopped midway (Ctrl-C) has stored some of the batch,
            which the caller must not write again.

    Returns:
        The trial numbers the study gave them, in order.

    Raises:
        SearchError: If the database refuses the batch (nothing of it is written).
    """
    if not trials:
        return []
    for t in trials:  # before anything is written, whichever storage
        if not t.state.is_finished():
            raise SearchError(f"trial {t.number} is not finished; only finished trials are "
                              "written")
    backend = _rdb_backend(study)
    if backend is None:
        return _write_other(study, trials, on_written)
    try:
        numbers = _write_rdb(backend, study._study_id, trials)
    except SearchError:
        raise
    except Exception as exc:
        raise SearchError(f"writing {len(trials)} trials to the study failed: "
                          f"{_first_line(exc)}", transient=_may_pass(exc)) from None
    if on_written is not None:
        for i, number in enumerate(numbers):
            on_written(i, number)
    return numbers


def _write_other(study: optuna.Study, trials: Sequence[FrozenTrial],
                 on_written: Callable[[int, int], object] | None = None) -> list[int]:
    """Journal and in-memory storages: every trial checked first (as ``Study.add_trial`` checks
    one), then added one at a time and numbered as the storage numbered it (other workers may
    add trials in between, so the numbers need not be contiguous)."""
    for t in trials:
        t._validate()
        if t.values is not None and len(t.values) != len(study.directions):
            raise SearchError(f"trial {t.number} has {len(t.values)} values; the study has "
                              f"{len(study.directions)} objectives")
    storage, study_id = study._storage, study._study_id
    numbers = []
    for i, t in enumerate(trials):
        numbers.append(storage.get_trial_number_from_id(
            storage.create_new_trial(study_id, template_trial=t)))
        if on_written is not None:
            on_written(i, numbers[-1])
    return numbers


def _write_rdb(backend: RDBStorage, study_id: int, trials: Sequence[FrozenTrial]) -> list[int]:
    from optuna.storages._rdb import models
    from sqlalchemy import insert

    session = backend.scoped_session()
    try:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        rows = []
        for t in trials:
            rows.append(models.TrialModel(
                study_id=study_id, number=None, state=t.state,
                datetime_start=t.datetime_start, datetime_complete=t.datetime_complete))
        session.add_all(rows)
        session.flush()
        rows.sort(key=lambda r: r.trial_id)
        base = rows[0].count_past_trials(session)
        numbers = []
        params, values, user, system = [], [], [], []
        dist_json: dict[str, str] = {}  # the search's space: one distribution per name
        for i, (row, t) in enumerate(zip(rows, trials, strict=True)):
            row.number = base + i
            numbers.append(base + i)
            tid = row.trial_id
            for name, value in t.params.items():
                dist = t.distributions[name]
                text = dist_json.get(name)
                if text is None:
                    text = dist_json[name] = distribution_to_json(dist)
                params.append({"trial_id": tid, "param_name": name,
                               "param_value": dist.to_internal_repr(value),
                               "distribution_json": text})
            for k, v in enumerate(t.values or ()):
                stored, kind = models.TrialValueModel.value_to_stored_repr(v)
                values.append({"trial_id": tid, "objective": k, "value": stored,
                               "value_type": kind})
            user.extend({"trial_id": tid, "key": k, "value_json": json.dumps(v)}
                        for k, v in t.user_attrs.items())
            system.extend({"trial_id": tid, "key": k, "value_json": json.dumps(v)}
                          for k, v in t.system_attrs.items())
        for model, batch in ((models.TrialParamModel, params), (models.TrialValueModel, values),
                             (models.TrialUserAttributeModel, user),
                             (models.TrialSystemAttributeModel, system)):
            if batch:
                session.execute(insert(model.__table__), batch)
        session.commit()
        return numbers
    except BaseException:
        session.rollback()
        raise
    finally:
        backend.scoped_session.remove()


def finished_states() -> tuple[TrialState, ...]:
    """States of the trials the search persists and reloads."""
    return (TrialState.COMPLETE,)


def complete_numbers(study: optuna.Study) -> dict[int, int]:
    """Numbers of the study's complete trials, mapped to their trial ids (one cheap query on SQL
    storages)."""
    backend = _rdb_backend(study)
    if backend is None:
        return {t.number: t._trial_id
                for t in study.get_trials(deepcopy=False, states=finished_states())}
    from optuna.storages._rdb import models

    session = backend.scoped_session()
    try:
        rows = (session.query(models.TrialModel.number, models.TrialModel.trial_id)
                .filter(models.TrialModel.study_id == study._study_id,
                        models.TrialModel.state == TrialState.COMPLETE).all())
        session.commit()
        return {int(n): int(i) for n, i in rows}
    finally:
        backend.scoped_session.remove()


def fetch_trials(study: optuna.Study, trial_ids: Sequence[int]) -> list[FrozenTrial]:
    """The given trials of a study, by trial id, in number order."""
    wanted = set(trial_ids)
    if not wanted:
        return []
    backend = _rdb_backend(study)
    if backend is None:
        found = [t for t in study.get_trials(deepcopy=False) if t._trial_id in wanted]
    else:
        found = [backend.get_trial(i) for i in sorted(wanted)]
    return sorted(found, key=lambda t: t.number)


def storage_url(storage: BaseStorage) -> str:
    """A URL-like name of an opened storage."""
    backend = getattr(storage, "_backend", storage)
    url = getattr(backend, "url", None)
    if url:
        return str(url)
    return "memory" if isinstance(storage, InMemoryStorage) else type(storage).__name__


def load_study(storage: Any, name: str, url: str) -> optuna.Study:
    """Load a study, or raise :class:`SearchError` listing the studies there."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise SearchError(f"no study {name!r} in {redact(url)}; studies there: "
                          f"{', '.join(sorted(names)) or 'none'}") from None
