"""Atomic file writes: a temporary file in the target's folder, renamed over the target, so a
reader never sees a half-written file and an interrupted write leaves the old one intact.

Every file the library writes goes through here. The temporary file has a unique name
(``.<name>.<random>.tmp`` beside the target), so two writers of the same file never share one;
the last rename wins. The written file gets the permissions :func:`open` would give it: an
existing target keeps its mode, a new file gets ``0o666`` less the umask (not the ``0o600`` of
:func:`tempfile.mkstemp`), unless ``permissions`` says otherwise.

- :func:`atomic_open`: a file object to write to (text or bytes);
- :func:`atomic_path`: a temporary path, for writers that take a file name (safetensors'
  ``save_file``);
- :func:`atomic_write_text`, :func:`atomic_write_bytes`: a whole file at once;
- :func:`locked`: an exclusive lock for a read-modify-write of a file several processes share.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: The process's umask, read once at import (reading it means setting it, which is not
#: thread-safe).
UMASK = _read_umask()


def _final_mode(path: Path, permissions: int | None) -> int:
    if permissions is not None:
        return permissions & ~UMASK
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~UMASK


def _temporary(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    return fd, Path(tmp)


def _commit(tmp: Path, path: Path, *, fsync: bool, permissions: int | None) -> None:
    if fsync:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    os.chmod(tmp, _final_mode(path, permissions))
    os.replace(tmp, path)


@contextmanager
def atomic_open(
    path: str | os.PathLike[str],
    mode: str = "w",
    *,
    encoding: str | None = None,
    fsync: bool = False,
    permissions: int | None = None,
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` (its folder is created); on a clean exit it replaces
    ``path``, on an exception it is removed and ``path`` is left as it was.

    Args:
        path: The file to write.
        mode: ``"w"`` for text or ``"wb"`` for bytes.
        encoding: The text encoding (text mode; the locale's by default, as :func:`open`).
        fsync: Flush the file to disk before the rename (for files a crash must not lose).
        permissions: Mode bits of the file, less the umask; by default those :func:`open` gives
            (an existing file's, else ``0o666`` less the umask).

    Yields:
        The open temporary file.
    """
    path = Path(path)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
        _commit(tmp, path, fsync=fsync, permissions=permissions)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(
    path: str | os.PathLike[str],
    *,
    fsync: bool = False,
    permissions: int | None = None,
) -> Iterator[Path]:
    """A unique temporary path beside ``path`` for a writer that takes a file name; on a clean
    exit the file written there replaces ``path``, on an exception it is removed.

    Example::

        with atomic_path(target) as tmp:
            safetensors.torch.save_file(tensors, str(tmp))

    Args:
        path: The file to write.
        fsync: Flush the file to disk before the rename.
        permissions: As for :func:`atomic_open`.

    Yields:
        The temporary path (an empty file exists there; the writer may overwrite or replace it).
    """
    path = Path(path)
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        yield tmp
        _commit(tmp, path, fsync=fsync, permissions=permissions)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(
    path: str | os.PathLike[str],
    text: str,
    *,
    encoding: str | None = None,
    fsync: bool = False,
    permissions: int | None = None,
) -> Path:
    """Write text to ``path`` atomically and return the path (options as :func:`atomic_open`)."""
    with atomic_open(path, "w", encoding=encoding, fsync=fsync,
                     permissions=permissions) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_bytes(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    fsync: bool = False,
    permissions: int | None = None,
) -> Path:
    """Write bytes to ``path`` atomically and return the path (options as :func:`atomic_open`)."""
    with atomic_open(path, "wb", fsync=fsync, permissions=permissions) as handle:
        handle.write(data)
    return Path(path)


@contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``<path>.lock`` beside ``path`` (its
    folder created), for one process's read-modify-write of a file other processes share.

    Args:
        path: The shared file; the lock file is its name plus ``.lock``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
