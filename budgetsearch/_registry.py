"""One registry style for everything budgetsearch looks up by name.

Cost rules, models, criteria and selection methods are each kept in a :class:`Registry`, the way
PyTorch keeps its FLOP formulas (``torch.utils.flop_counter.register_flop_formula``): an entry is
registered by a decorator on its definition (or by :meth:`Registry.add` for entries built from a
table), registering a name twice raises unless the caller asks to replace it, and looking up an
unknown name raises an error that lists the registered names (and the closest ones).

A registry is a read-only mapping: ``name in registry``, ``registry[name]``, ``dict(registry)``.
Changing it goes through :meth:`Registry.add` and :meth:`Registry.register` only.

Example:
    >>> from budgetsearch._registry import Registry
    >>> from budgetsearch.errors import PlanError
    >>> greetings = Registry("greeting", error=PlanError)
    >>> @greetings.register("hello", "hi")
    ... def hello(name):
    ...     return f"hello, {name}"
    >>> greetings["hi"]("you"), greetings.names()
    ('hello, you', ['hello', 'hi'])
    >>> try:
    ...     greetings.add("hello", print)
    ... except PlanError as exc:
    ...     print(exc)
    greeting 'hello' is already registered; pass replace=True to replace it
    >>> try:
    ...     greetings["helo"]
    ... except PlanError as exc:
    ...     print(exc)
    unknown greeting 'helo' (did you mean 'hello'?); known: hello, hi
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

__all__ = ["Registry", "unknown_name"]

T = TypeVar("T")
E = TypeVar("E")


def unknown_name(
    what: str,
    name: object,
    known: Iterable[str],
    *,
    error: type[Exception] = LookupError,
    suffix: str = "",
) -> Exception:
    """The error for a name that is not registered, in the one style of every registry.

    Args:
        what: What the names name, e.g. ``model`` or ``cost rule``.
        name: The name looked up.
        known: The registered names (listed sorted).
        error: The exception class.
        suffix: Text appended to the message (e.g. another way to give the value).

    Returns:
        The error (to raise): ``unknown <what> <name> (did you mean <closest>?); known: <names>``.
    """
    names = sorted(known)
    close = difflib.get_close_matches(str(name), names, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return error(f"unknown {what} {name!r}{hint}; known: {', '.join(names) or '(none)'}{suffix}")


class Registry(Mapping[str, T], Generic[T]):
    """Entries of one kind, each registered once under one or more names.

    Args:
        what: What an entry is, in messages (``cost rule``, ``model``, ``criterion``...).
        error: The exception class raised for a duplicate or an unknown name.
        normalize: Applied to every name registered or looked up (e.g. case folding); names are
            used as given without it.
    """

    def __init__(
        self,
        what: str,
        *,
        error: type[Exception] = LookupError,
        normalize: Callable[[str], str] | None = None,
    ) -> None:
        self.what = what
        self.error = error
        self._normalize = normalize
        self._entries: dict[str, T] = {}

    # ---------------------------------------------------------------------------- registering
    def add(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Register ``entry`` under ``name``.

        Args:
            name: The name (a non-empty string).
            entry: What the name stands for.
            replace: Replace an entry already registered under the name.

        Returns:
            The entry.

        Raises:
            Exception: The registry's error class, if the name is taken and ``replace`` is
                false, or is not a non-empty string.
        """
        if not isinstance(name, str) or not name.strip():
            raise self.error(f"a {self.what} name must be a non-empty string; got {name!r}")
        key = self._key(name)
        if key in self._entries and not replace:
            raise self.error(f"{self.what} {key!r} is already registered; pass replace=True to "
                             "replace it")
        self._entries[key] = entry
        return entry

    def register(self, *names: str, replace: bool = False) -> Callable[[E], E]:
        """A decorator registering what it decorates under each of ``names``.

        Args:
            *names: One or more names.
            replace: Replace entries already registered under these names.

        Returns:
            The decorator; it returns the decorated object unchanged.
        """
        if not names:
            raise self.error(f"registering a {self.what} needs at least one name")

        def decorate(entry: E) -> E:
            for name in names:
                self.add(name, entry, replace=replace)  # type: ignore[arg-type]
            return entry

        return decorate

    # ------------------------------------------------------------------------------- looking up
    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def unknown(self, name: object) -> Exception:
        """The error (to raise) for an unknown name, listing the registered ones."""
        return unknown_name(self.what, name, self._entries, error=self.error)

    def _key(self, name: str) -> str:
        return self._normalize(name) if self._normalize is not None else name

    def _find(self, name: object) -> str | None:
        if not isinstance(name, str):
            return None
        key = self._key(name)
        return key if key in self._entries else None

    def __getitem__(self, name: str) -> T:
        """The entry registered under ``name``.

        Raises:
            Exception: The registry's error class for an unknown name, listing the known ones.
        """
        key = self._find(name)
        if key is None:
            raise self.unknown(name)
        return self._entries[key]

    def get(self, name: str, default: T | None = None) -> T | None:  # type: ignore[override]
        """The entry registered under ``name``, or ``default``."""
        key = self._find(name)
        return default if key is None else self._entries[key]

    def __contains__(self, name: object) -> bool:
        return self._find(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"
