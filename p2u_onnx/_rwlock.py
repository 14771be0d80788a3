"""Locks for a live session: :class:`RWLock` (many readers at once, one writer alone, writers
served first) and :class:`TurnLock` (two kinds of work take turns)."""

from __future__ import annotations

import contextlib
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
    :meth:`read` and :meth:`write` return context managers made once, which hold no state of
    their own (every ``run()`` takes the read side: the generator-based ones these replace took
    5-6 us a use, these 1.2).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._readers = 0
        self._writer = False
        self._waiting = 0
        self._read = _Reading(self)
        self._write = _Writing(self)

    def read(self) -> ContextManager[None]:
        return self._read

    def write(self) -> ContextManager[None]:
        return self._write


class _Reading:
    __slots__ = ("_rw",)

    def __init__(self, rw: RWLock) -> None:
        self._rw = rw

    def __enter__(self) -> None:
        rw = self._rw
        with rw._lock:
            while rw._writer or rw._waiting:
                rw._cond.wait()
            rw._readers += 1

    def __exit__(self, *exc: object) -> None:
        rw = self._rw
        with rw._lock:
            rw._readers -= 1
            if not rw._readers and rw._waiting:  # only writers wait for no readers
                rw._cond.notify_all()


class _Writing:
    __slots__ = ("_rw",)

    def __init__(self, rw: RWLock) -> None:
        self._rw = rw

    def __enter__(self) -> None:
        rw = self._rw
        with rw._lock:
            rw._waiting += 1
            try:
                while rw._writer or rw._readers:
                    rw._cond.wait()
            finally:
                rw._waiting -= 1
            rw._writer = True

    def __exit__(self, *exc: object) -> None:
        rw = self._rw
        with rw._lock:
            rw._writer = False
            rw._cond.notify_all()


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
        self._holds = [_Holding(self, 0), _Holding(self, 1)]

    def hold(self, kind: int) -> ContextManager[None]:
        """A context manager that holds the lock for work of ``kind`` (0 or 1); made once,
        it holds no state of its own."""
        return self._holds[kind]


class _Holding:
    __slots__ = ("_turns", "_kind")

    def __init__(self, turns: TurnLock, kind: int) -> None:
        self._turns = turns
        self._kind = kind

    def __enter__(self) -> None:
        t, kind = self._turns, self._kind
        other = 1 - kind
        with t._lock:
            if not t._waiting[other] and (not t._holders or t._kind == kind):
                t._kind = kind
                t._holders += 1
            else:
                t._waiting[kind] += 1
                turn = t._turns[kind]
                while t._turns[kind] == turn:
                    t._cond.wait()

    def __exit__(self, *exc: object) -> None:
        t, kind = self._turns, self._kind
        other = 1 - kind
        with t._lock:
            t._holders -= 1
            if not t._holders and t._waiting[other]:
                t._kind, t._holders = other, t._waiting[other]
                t._waiting[other] = 0
                t._turns[other] += 1
                t._cond.notify_all()
