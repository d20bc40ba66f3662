"""Records and claims shared by workers: in a directory, or in a database shared by machines.

What the records are is the caller's: a study's cells (:mod:`budgetsearch.studies`), the units of
a contribution analysis or the arms of a race (:class:`budgetsearch.contrib.StoreTable`). Records
are JSON documents, one per id. A worker **claims** an id before working on it and releases the
claim when done; a claim is atomic, so two workers (processes, or machines sharing the store)
never work on the same id. A claim whose worker died is **stale** and may be taken over: on the
same host when the worker's process no longer exists, on any host when its heartbeat (refreshed
every ``heartbeat_s`` while the work runs) is older than ``stale_after`` seconds.

- :class:`FileStore`: ``<dir>/<id>.json`` records written atomically (temporary file + rename)
  and ``<dir>/<id>.claim`` claim files created with ``O_CREAT | O_EXCL``. Several machines share
  it by pointing at one shared directory (NFS, SMB...).
- :class:`SqlStore` (any SQLAlchemy URL, e.g. the PostgreSQL URL the search's Optuna studies live
  in): one table row per id; a claim is an ``INSERT`` or a conditional ``UPDATE`` (atomic in the
  database); records are stored in the row and also written as files under a local directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._io import atomic_open, locked
from .errors import StoreError

__all__ = ["FileStore", "SqlStore", "heartbeat_while", "open_store", "worker_gone",
           "worker_id", "write_json_atomic"]


def worker_id() -> str:
    """``host:pid:random``: unique per worker, with the host and process to check liveness."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def write_json_atomic(path: Path, data: Any, *, fsync: bool = False) -> Path:
    """Write JSON through a temporary file in the same directory and a rename
    (:func:`budgetsearch._io.atomic_open`), readable by everyone (``0o644`` less the umask).

    Args:
        path: The file to write.
        data: What to write.
        fsync: Flush it to disk before the rename (a record a power cut must not empty).
    """
    with atomic_open(path, "w", permissions=0o644, fsync=fsync) as fh:
        json.dump(data, fh, indent=1, default=_default)
        fh.write("\n")
    return path


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


@contextlib.contextmanager
def heartbeat_while(beat: Callable[[], None], *, every: float) -> Iterator[None]:
    """Call ``beat`` every ``every`` seconds in a background thread while the block runs (a
    claim's heartbeat, so that no other worker takes work still in hand). A beat that raises is
    tried again at the next one: a missed beat is never fatal to the work."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):
                beat()

    thread = threading.Thread(target=loop, daemon=True, name="heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def worker_gone(worker: str, mtime: float, stale_after: float) -> bool:
    """Whether a claim's worker is gone, so that its claim may be taken over.

    Args:
        worker: The claim's :func:`worker_id` (``host:pid:...``).
        mtime: When the claim was last refreshed (its heartbeat), in seconds since the epoch.
        stale_after: Seconds after which a heartbeat is too old on any host.

    Returns:
        True when the worker's process is missing on this host, or its heartbeat is older
        than ``stale_after``.
    """
    host, _, rest = str(worker).partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return time.time() - mtime > stale_after


def _read_records(cells_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(cells_dir.glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a record is written atomically; anything unreadable is not one
    return out


class FileStore:
    """Records and claim files in a directory (see the module docstring).

    Args:
        cells_dir: The ``cells`` directory of the study's results.
        stale_after: Seconds without heartbeat after which another host's claim is stale.
    """

    def __init__(self, cells_dir: Path, *, stale_after: float = 600.0) -> None:
        self.cells_dir = Path(cells_dir)
        self.stale_after = float(stale_after)  # directories are made on first write

    def records(self) -> dict[str, dict[str, Any]]:
        """Every record, by cell id."""
        return _read_records(self.cells_dir)

    def record(self, cell_id: str) -> dict[str, Any] | None:
        """One cell's record, or None."""
        try:
            return json.loads((self.cells_dir / f"{cell_id}.json").read_text())
        except (OSError, ValueError):
            return None

    def write(self, cell_id: str, record: dict[str, Any]) -> None:
        """Store a cell's record atomically, flushed to disk (it may stand for hours of work)."""
        write_json_atomic(self.cells_dir / f"{cell_id}.json", record, fsync=True)

    def claim(self, cell_id: str, worker: str) -> bool:
        """Claim a cell; False if another live worker holds it."""
        path = self.cells_dir / f"{cell_id}.claim"
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                # the verdict and the rename under one lock: a worker that judged the claim
                # dead must not move away a live claim another worker made meanwhile
                with locked(path):
                    try:
                        holder = path.read_text().strip()
                        mtime = path.stat().st_mtime
                    except OSError:
                        continue  # released or taken over meanwhile: try again
                    if not worker_gone(holder, mtime, self.stale_after):
                        return False
                    os.rename(path, path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}"))
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(worker + "\n")
            return True
        return False

    def heartbeat(self, cell_id: str, worker: str) -> None:
        """Refresh a held claim."""
        with contextlib.suppress(OSError):
            os.utime(self.cells_dir / f"{cell_id}.claim")

    def release(self, cell_id: str, worker: str) -> None:
        """Give a claim up (only the worker's own)."""
        path = self.cells_dir / f"{cell_id}.claim"
        try:
            if path.read_text().strip() == worker:
                path.unlink()
        except OSError:
            pass

    def claims(self) -> dict[str, str]:
        """Current claims: cell id -> worker."""
        out = {}
        for path in self.cells_dir.glob("*.claim"):
            try:
                out[path.stem] = path.read_text().strip()
            except OSError:
                continue
        return out


class SqlStore(FileStore):
    """Records and claims in a database table, mirrored to local record files.

    Args:
        url: A SQLAlchemy database URL (``postgresql://...``, ``sqlite:///study.db``).
        study: The study's name (rows are keyed by study and cell).
        cells_dir: Local directory the records are mirrored to.
        stale_after: Seconds without heartbeat after which a claim is stale.
    """

    def __init__(self, url: str, *, study: str, cells_dir: Path, stale_after: float = 600.0
                 ) -> None:
        import sqlalchemy as sa

        super().__init__(cells_dir, stale_after=stale_after)
        try:
            self.engine = sa.create_engine(url)
            meta = sa.MetaData()
            self.table = sa.Table(
                "budgetsearch_study_cells", meta,
                sa.Column("study", sa.String(200), primary_key=True),
                sa.Column("cell_id", sa.String(400), primary_key=True),
                sa.Column("record", sa.Text, nullable=True),
                sa.Column("worker", sa.String(200), nullable=True),
                sa.Column("heartbeat", sa.Float, nullable=True),
            )
            meta.create_all(self.engine)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"--storage {url}: cannot open the table of records: {exc}") from exc
        self.sa, self.study = sa, study

    def _where(self, cell_id: str) -> Any:
        t = self.table
        return (t.c.study == self.study) & (t.c.cell_id == cell_id)

    def records(self) -> dict[str, dict[str, Any]]:
        t = self.table
        with self.engine.connect() as conn:
            rows = conn.execute(self.sa.select(t.c.cell_id, t.c.record).where(
                (t.c.study == self.study) & t.c.record.is_not(None))).all()
        out = {cid: json.loads(text) for cid, text in rows}
        for cid, rec in out.items():  # mirror to the local directory
            if super().record(cid) != rec:
                super().write(cid, rec)
        return out

    def record(self, cell_id: str) -> dict[str, Any] | None:
        t = self.table
        with self.engine.connect() as conn:
            text = conn.execute(self.sa.select(t.c.record).where(self._where(cell_id))).scalar()
        return None if text is None else json.loads(text)

    def write(self, cell_id: str, record: dict[str, Any]) -> None:
        text = json.dumps(record, default=_default)
        with self.engine.begin() as conn:
            conn.execute(self.table.update().where(self._where(cell_id)).values(record=text))
        super().write(cell_id, record)

    def claim(self, cell_id: str, worker: str) -> bool:
        sa, t, now = self.sa, self.table, time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(t.insert().values(study=self.study, cell_id=cell_id, worker=worker,
                                               heartbeat=now))
            return True
        except sa.exc.IntegrityError:
            pass
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(t.c.worker, t.c.heartbeat).where(
                self._where(cell_id))).first()
            if row is None:
                return False
            holder, beat = row
            if holder is not None and not worker_gone(holder, beat or 0.0, self.stale_after):
                return False
            cond = t.c.worker.is_(None) if holder is None else (
                (t.c.worker == holder) & (t.c.heartbeat == beat))
            done = conn.execute(t.update().where(self._where(cell_id) & cond).values(
                worker=worker, heartbeat=now))
            return done.rowcount == 1

    def heartbeat(self, cell_id: str, worker: str) -> None:
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(t.update().where(self._where(cell_id) & (t.c.worker == worker)).values(
                heartbeat=time.time()))

    def release(self, cell_id: str, worker: str) -> None:
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(t.update().where(self._where(cell_id) & (t.c.worker == worker)).values(
                worker=None))

    def claims(self) -> dict[str, str]:
        t = self.table
        with self.engine.connect() as conn:
            rows = conn.execute(self.sa.select(t.c.cell_id, t.c.worker).where(
                (t.c.study == self.study) & t.c.worker.is_not(None))).all()
        return dict(rows)


def open_store(cells_dir: Path, *, storage: str | None = None, study: str = "",
               stale_after: float = 600.0) -> FileStore:
    """A :class:`SqlStore` for a database URL, else a :class:`FileStore` on ``cells_dir``
    (``storage`` may also be a ``file://`` URL or a directory: the cells directory itself)."""
    if storage is None:
        return FileStore(cells_dir, stale_after=stale_after)
    if storage.startswith("file://"):
        return FileStore(Path(storage[len("file://"):]), stale_after=stale_after)
    if "://" not in storage:
        return FileStore(Path(storage), stale_after=stale_after)
    return SqlStore(storage, study=study, cells_dir=cells_dir, stale_after=stale_after)
