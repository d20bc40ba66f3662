"""The contribution table: measured validation accuracy and loss of every unit, in one JSON file.

The file is keyed by what the numbers depend on (the model's layer fingerprint and initial weights,
the training and validation data, the recipe, the input size): a table made for anything else is
refused with the differing fields named. It is written atomically after every unit, so a killed
analysis resumes where it stopped and a reader never sees half a file. Several processes may
measure into the same file: each takes a unit under an exclusive lock on ``FILE.lock`` and marks
it claimed, and a claim whose worker has died is taken over: on the same host when its process
is gone, on any host when its heartbeat is older than ``stale_after`` seconds. A worker keeps its
claim's heartbeat fresh while it measures the unit (:func:`keep_claim`, every
:data:`HEARTBEAT_S` seconds), so a long unit is never taken from a live worker, and a unit of a
worker that died on another machine is taken over after ``stale_after`` seconds rather than
waited on for ever.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write_text, locked
from ..errors import DataError
from ..store import heartbeat_while, worker_gone

__all__ = [
    "TABLE_VERSION",
    "ContributionTable",
    "SharedTable",
    "StoreTable",
    "TableError",
    "check_key",
    "default_table_path",
    "discard_stale",
    "keep_claim",
    "open_shared",
]

TABLE_VERSION = 1
#: Seconds between two heartbeats of a held claim (:func:`keep_claim`).
HEARTBEAT_S = 60.0
#: Seconds without a heartbeat after which a claim is stale (ten heartbeats missed).
STALE_AFTER_S = 600.0


class TableError(DataError):
    """A contribution table (or race file) that cannot be used: another key, or an unreadable
    file.

    Attributes:
        stale_path: The file refused because it was made with another key (None for other
            errors): a caller that owns the file may remove it (:func:`discard_stale`) and
            start anew.
        wanted_key: The key the refused file was opened with.
    """

    def __init__(self, message: str, *, stale_path: Path | None = None,
                 wanted_key: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.stale_path = stale_path
        self.wanted_key = dict(wanted_key) if wanted_key is not None else None


class ContributionTable:
    """Measured units of one analysis.

    Attributes:
        key: What the measurements depend on (see the module docstring).
        results: Per unit key: ``val_accuracy``, ``val_loss``, ``train_loss``, ``seconds``,
            ``cut`` (where the cached prefix ended) and ``worker``.
        path: The file, or None for a table in memory.
    """

    def __init__(
        self,
        key: Mapping[str, Any],
        results: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.key = dict(key)
        self.results: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (results or {}).items()}
        self.path = Path(path) if path is not None else None
        #: How the call that produced this table spent its time (see measure_contributions).
        self.stats: dict[str, Any] = {}

    # --------------------------------------------------------------------------------- queries
    def gain(self, unit: str) -> tuple[float, float]:
        """(accuracy gain, loss reduction) of a unit over classifier-only training.

        Raises:
            TableError: If the unit or the ``head`` reference is not measured.
        """
        for k in ("head", unit):
            if k not in self.results:
                raise TableError(f"unit {k!r} is not in the contribution table"
                                 + (f" {self.path}" if self.path else ""))
        ref, got = self.results["head"], self.results[unit]
        losses = (ref.get("val_loss"), got.get("val_loss"))
        loss_gain = math.nan if None in losses else losses[0] - losses[1]
        return (got["val_accuracy"] - ref["val_accuracy"], loss_gain)

    def rows(self) -> list[dict[str, Any]]:
        """One row per measured unit, with its gains when ``head`` is measured."""
        out = []
        for unit, r in self.results.items():
            row = {"unit": unit, **r}
            if "head" in self.results:
                row["gain_accuracy"], row["gain_loss"] = self.gain(unit)
            out.append(row)
        return out

    def format_table(self, *, top: int | None = None) -> str:
        """The units by accuracy gain (then loss gain), as text."""
        rows = sorted(self.rows(), key=lambda r: (-r.get("gain_accuracy", 0.0),
                                                   -r.get("gain_loss", 0.0)))
        if top is not None:
            rows = rows[:top]
        lines = [f"{'unit':<54}{'val acc':>9}{'gain':>8}{'val loss':>10}{'gain':>8}{'s':>7}"]
        for r in rows:
            loss = "diverged" if r.get("val_loss") is None else f"{r['val_loss']:.4f}"
            lines.append(f"{r['unit'][:53]:<54}{r['val_accuracy']:>9.4f}"
                         f"{r.get('gain_accuracy', 0.0):>+8.4f}{loss:>10}"
                         f"{r.get('gain_loss', 0.0):>+8.4f}{r['seconds']:>7.1f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"version": TABLE_VERSION, "key": self.key, "results": self.results}

    # ------------------------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | os.PathLike[str], *, key: Mapping[str, Any] | None = None
             ) -> ContributionTable:
        """Read a table; with ``key``, refuse one made for anything else.

        Raises:
            TableError: Unreadable or malformed file, another version, or a differing key
                (naming the fields).
        """
        path = Path(path)
        doc = _read(path)
        if doc is None:
            raise TableError(f"{path}: no contribution table here")
        table = cls(doc["key"], doc["results"], path=path)
        if key is not None:
            check_key(table.key, key, path)
        return table

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the table atomically (to ``path`` or where it was loaded from)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise TableError("the table has no file: give a path")
        _write(target, self.to_dict())
        self.path = target
        return target


def default_table_path(key: Mapping[str, Any], **more: Any) -> Path:
    """Where a table with this key lives by default: ``$BUDGETSEARCH_CACHE`` (else
    ``~/.cache/budgetsearch``) ``/contrib/<model>-<digest of the key and more>.json``, so that
    later plans for the same model, data and recipe find it."""
    import hashlib

    root = Path(os.environ.get("BUDGETSEARCH_CACHE") or Path.home() / ".cache" / "budgetsearch")
    text = json.dumps({"key": dict(key), **more}, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return root / "contrib" / f"{key.get('model') or 'model'}-{digest}.json"


def check_key(stored: Mapping[str, Any], wanted: Mapping[str, Any], path: Path) -> None:
    """Raise a :class:`TableError` naming every field where ``stored`` and ``wanted`` differ."""
    fields = sorted(set(stored) | set(wanted))
    diff = [f for f in fields if _canonical(stored.get(f)) != _canonical(wanted.get(f))]
    if diff:
        detail = "; ".join(f"{f}: table {stored.get(f)!r}, now {wanted.get(f)!r}" for f in diff)
        raise TableError(f"{path} was measured for something else ({detail}); use another "
                         "file or the same model, data and recipe", stale_path=Path(path),
                         wanted_key=wanted)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _write(path: Path, doc: Mapping[str, Any]) -> None:
    """The one way a table file is written: atomically, as sorted, indented JSON."""
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _read(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TableError(f"{path}: not a readable contribution table ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("version") != TABLE_VERSION or not isinstance(
            doc.get("key"), dict) or not isinstance(doc.get("results"), dict):
        raise TableError(f"{path}: not a contribution table of version {TABLE_VERSION} (fields "
                         "version, key, results)")
    doc.setdefault("claims", {})
    return doc


def _alive(claim: Mapping[str, Any], stale_after: float) -> bool:
    """A claim's worker lives unless the study store's rule says it is dead: its process gone
    on this host, or its heartbeat older than ``stale_after`` on any."""
    beat = claim.get("beat", claim.get("since"))
    return not worker_gone(f"{claim.get('host')}:{claim.get('pid')}:",
                     beat if isinstance(beat, (int, float)) else time.time(), stale_after)


def discard_stale(path: str | os.PathLike[str], key: Mapping[str, Any], *,
                  stale_after: float = STALE_AFTER_S) -> bool:
    """Remove a table (or race) file made with another key than ``key``, unless a worker is
    at work on it: the caller that owns the file starts it anew.

    Args:
        path: The file a :class:`SharedTable` with ``key`` refused.
        key: The key it was opened with.
        stale_after: Seconds without heartbeat after which a claim no longer counts.

    Returns:
        True when the file is gone or now holds ``key`` (made anew meanwhile), False when it
        is left: a live claim is on it (another process measuring with its key), or it cannot
        be read.
    """
    path = Path(path)
    with locked(path):
        try:
            doc = _read(path)
        except TableError:
            return False
        if doc is None or _canonical(doc["key"]) == _canonical(dict(key)):
            return True
        if any(isinstance(c, Mapping) and _alive(c, stale_after)
               for c in doc["claims"].values()):
            return False
        path.unlink()
    return True


class SharedTable:
    """A table file several workers fill together (see the module docstring).

    Args:
        path: The table file.
        key: The analysis's key; an existing file with another key is refused.
        stale_after: Seconds without heartbeat after which a claim is stale.
    """

    def __init__(self, path: str | os.PathLike[str], key: Mapping[str, Any], *,
                 stale_after: float = STALE_AFTER_S) -> None:
        self.path = Path(path)
        self.key = dict(key)
        self.stale_after = float(stale_after)
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        with locked(self.path):
            doc = _read(self.path)
            if doc is None:
                self._write({"version": TABLE_VERSION, "key": self.key, "results": {},
                             "claims": {}})
            else:
                check_key(doc["key"], self.key, self.path)

    def _write(self, doc: Mapping[str, Any]) -> None:
        _write(self.path, doc)

    def _doc(self) -> dict[str, Any]:
        doc = _read(self.path)
        if doc is None:
            raise TableError(f"{self.path} disappeared while measuring")
        check_key(doc["key"], self.key, self.path)
        return doc

    def done(self) -> set[str]:
        """Units measured so far."""
        with locked(self.path):
            return set(self._doc()["results"])

    def claim(self, order: Sequence[str]) -> str | None:
        """Take the first unit of ``order`` that is neither measured nor claimed by a live
        worker (None when none is left)."""
        with locked(self.path):
            doc = self._doc()
            for unit in order:
                if unit in doc["results"]:
                    continue
                claim = doc["claims"].get(unit)
                if (claim is not None and not self._mine(claim)
                        and _alive(claim, self.stale_after)):
                    continue
                now = time.time()
                doc["claims"][unit] = {**self.me, "since": now, "beat": now}
                self._write(doc)
                return unit
        return None

    def heartbeat(self, unit: str) -> None:
        """Refresh the heartbeat of a unit this worker holds."""
        with locked(self.path):
            doc = self._doc()
            claim = doc["claims"].get(unit)
            if claim is not None and self._mine(claim):
                claim["beat"] = time.time()
                self._write(doc)

    def record(self, unit: str, result: Mapping[str, Any]) -> None:
        """Store a unit's result and drop its claim."""
        with locked(self.path):
            doc = self._doc()
            doc["results"][unit] = dict(result)
            doc["claims"].pop(unit, None)
            self._write(doc)

    def release(self, unit: str) -> None:
        """Give a claimed unit back (on an interruption)."""
        with locked(self.path):
            doc = self._doc()
            if self._mine(doc["claims"].get(unit) or {}):
                doc["claims"].pop(unit, None)
                self._write(doc)

    def _mine(self, claim: Mapping[str, Any]) -> bool:
        return claim.get("host") == self.me["host"] and claim.get("pid") == self.me["pid"]

    def table(self) -> ContributionTable:
        """The table as it is now."""
        with locked(self.path):
            doc = self._doc()
        return ContributionTable(doc["key"], doc["results"], path=self.path)


class StoreTable:
    """The interface of :class:`SharedTable` on a database shared by machines.

    The rows live in :class:`budgetsearch.store.SqlStore`'s table of the URL (the SQLite or
    PostgreSQL database the search's Optuna studies use), under a name made of a digest of the
    key, so a table is keyed by construction: another model, data set or recipe is another name.
    A unit is claimed by an atomic ``INSERT`` or conditional ``UPDATE``; a claim whose worker
    died is taken over (same host: its process is gone; any host: no heartbeat for
    ``stale_after`` seconds). The results are also mirrored to files under ``mirror_dir``.

    Args:
        url: A SQLAlchemy URL (``sqlite:///file.db``, ``postgresql://...``).
        key: What the measurements depend on.
        kind: What the rows are (``contrib``, ``race``): part of the name.
        mirror_dir: Local directory of the mirrored records (default: a temporary one).
        stale_after: Seconds without heartbeat after which another host's claim is stale.
    """

    def __init__(self, url: str, key: Mapping[str, Any], *, kind: str = "contrib",
                 mirror_dir: str | os.PathLike[str] | None = None,
                 stale_after: float = STALE_AFTER_S) -> None:
        import hashlib

        from ..store import SqlStore, worker_id

        self.key = dict(key)
        digest = hashlib.sha256(_canonical(self.key).encode()).hexdigest()[:16]
        self.name = f"{kind}:{self.key.get('model') or 'model'}:{digest}"
        self.path = None
        root = Path(os.environ.get("BUDGETSEARCH_CACHE") or Path.home() / ".cache" / "budgetsearch")
        mirror = Path(mirror_dir) if mirror_dir is not None else (
            root / "mirror" / self.name.replace(":", "-"))
        self.store = SqlStore(url, study=self.name, cells_dir=mirror, stale_after=stale_after)
        self.me = worker_id()
        if self.store.record(_KEY_ROW) is None and self.store.claim(_KEY_ROW, self.me):
            self.store.write(_KEY_ROW, {"version": TABLE_VERSION, "key": self.key})
            self.store.release(_KEY_ROW, self.me)

    def done(self) -> set[str]:
        """Units measured so far."""
        return set(self.store.records()) - {_KEY_ROW}

    def claim(self, order: Sequence[str]) -> str | None:
        """Take the first unit of ``order`` that is neither measured nor claimed by a live
        worker (None when none is left)."""
        done = self.done()
        for unit in order:
            if unit in done or not self.store.claim(unit, self.me):
                continue
            if self.store.record(unit) is not None:  # finished since we looked
                self.store.release(unit, self.me)
                continue
            return unit
        return None

    def record(self, unit: str, result: Mapping[str, Any]) -> None:
        """Store a unit's result and drop its claim."""
        self.store.write(unit, dict(result))
        self.store.release(unit, self.me)

    def heartbeat(self, unit: str) -> None:
        """Refresh the heartbeat of a unit this worker holds."""
        self.store.heartbeat(unit, self.me)

    def release(self, unit: str) -> None:
        """Give a claimed unit back (on an interruption)."""
        self.store.release(unit, self.me)

    def table(self) -> ContributionTable:
        """The table as it is now."""
        results = {k: v for k, v in self.store.records().items() if k != _KEY_ROW}
        return ContributionTable(self.key, results)


@contextlib.contextmanager
def keep_claim(shared: SharedTable | StoreTable | None, unit: str, *,
               every: float = HEARTBEAT_S) -> Iterator[None]:
    """Refresh the heartbeat of ``unit``'s claim every ``every`` seconds while the block runs
    (nothing for a table in memory, ``shared`` None), so that no other worker takes a unit
    that is still being measured."""
    if shared is None:
        yield
        return
    with heartbeat_while(lambda: shared.heartbeat(unit), every=every):
        yield


#: The row of a :class:`StoreTable` that holds its key (not a unit).
_KEY_ROW = "__key__"


def open_shared(
    key: Mapping[str, Any], *, path: str | os.PathLike[str] | None = None,
    storage: str | None = None, kind: str = "contrib",
) -> SharedTable | StoreTable | None:
    """Where workers share results: a database URL (``storage``: a :class:`StoreTable`), else a
    file (``path``: a :class:`SharedTable`), else nowhere (None: in memory).

    Raises:
        TableError: A file made with another key.
        StoreError: A database that cannot be opened.
    """
    if storage is not None:
        return StoreTable(storage, key, kind=kind)
    if path is not None:
        return SharedTable(path, key)
    return None
