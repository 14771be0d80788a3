"""Locks for a live session: :class:`RWLock` (many readers at once, one writer alone, writers
served first) and :class:`TurnLock` (two kinds of work take turns)."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any, ContextManager

__all__ = ["RWLock", "TurnLock", "Pace", "in_turn"]

#: Makes the context manager one step of background work runs in (a live session's
#: ``_pace``: a decode-job turn of its :class:`TurnLock`).
Pace = Callable[[], ContextManager[Any]]


def in_turn(pace: Pace | None) -> ContextManager[Any]:
    """``pace()``, or a context manager that does nothing when there is no ``pace``."""
    return contextlib.nullcontext() if pace is None else pace()


class RWLock:
    """Readers share the lock; a writer waits for them to leave and holds it alone.

    A waiting writer stops new readers from entering, so a steady stream of ``run()`` calls
    cannot starve an upgrade. Not reentrant: a reader must not take the lock again.
    :meth:`read` and :meth:`write` return context managers made once (every ``run()`` takes
    the read side: the generator-based ones these replace took 5-6 µs a use, these 1.7).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._readers = 0
        self._writer = False
        self._waiting = 0
        self._read = _Side(self._enter_read, self._leave_read)
        self._write = _Side(self._enter_write, self._leave_write)

    def read(self) -> ContextManager[None]:
        return self._read

    def write(self) -> ContextManager[None]:
        return self._write

    def _enter_read(self) -> None:
        with self._lock:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1

    def _leave_read(self) -> None:
        with self._lock:
            self._readers -= 1
            if not self._readers and self._waiting:  # only writers wait for no readers
                self._cond.notify_all()

    def _enter_write(self) -> None:
        with self._lock:
            self._waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer = True

    def _leave_write(self) -> None:
        with self._lock:
            self._writer = False
            self._cond.notify_all()


class _Side:
    """A reusable context manager: ``enter()`` on entry, ``leave()`` on exit (whatever the
    block raised). Holds no state of its own, so any number of threads can use it at once."""

    __slots__ = ("_enter", "_leave")

    def __init__(self, enter: Callable[[], None], leave: Callable[[], None]) -> None:
        self._enter = enter
        self._leave = leave

    def __enter__(self) -> None:
        self._enter()

    def __exit__(self, *exc: object) -> None:
        self._leave()


class TurnLock:
    """Two kinds of work (0 and 1) take turns: work of one kind shares the lock, the two kinds
    exclude each other.

    Phase-fair: while one kind waits, new arrivals of the kind holding the lock wait too; when
    the last holder leaves, every waiter of the other kind enters at once. Neither kind starves,
    and each waits at most one turn of the other. A session's inferences (kind 0) and its
    decoder's jobs (kind 1) use it so that decoding takes the cores between inferences instead
    of slowing them down.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._kind = 0
        self._holders = 0
        self._waiting = [0, 0]
        self._turns = [0, 0]  # turns granted to each kind, so that waiters see theirs
        self._holds = [_Side(functools.partial(self._acquire, k),
                             functools.partial(self._release, k)) for k in (0, 1)]

    def hold(self, kind: int) -> ContextManager[None]:
        """A context manager that holds the lock for work of ``kind`` (0 or 1)."""
        return self._holds[kind]

    def _acquire(self, kind: int) -> None:
        other = 1 - kind
        with self._lock:
            if not self._waiting[other] and (not self._holders or self._kind == kind):
                self._kind = kind
                self._holders += 1
            else:
                self._waiting[kind] += 1
                turn = self._turns[kind]
                while self._turns[kind] == turn:
                    self._cond.wait()

    def _release(self, kind: int) -> None:
        other = 1 - kind
        with self._lock:
            self._holders -= 1
            if not self._holders and self._waiting[other]:
                self._kind, self._holders = other, self._waiting[other]
                self._waiting[other] = 0
                self._turns[other] += 1
                self._cond.notify_all()
