"""Locks for a live session: :class:`RWLock` (many readers at once, one writer alone, writers
served first) and :class:`TurnLock` (inferences and a decoder take turns, the decoder with a
set share of the time)."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ContextManager

__all__ = ["RWLock", "TurnLock", "Pace", "in_turn", "sharing"]

#: Makes the context manager one step of background work runs in (a live session's
#: ``_pace``: a decode-job turn of its :class:`TurnLock`).
Pace = Callable[[], ContextManager[Any]]

#: A decoder's turn repays at most ROUND_SLACK x the median of the last ROUNDS rounds of
#: inferences it waited for (see TurnLock).
ROUNDS = 16
ROUND_SLACK = 1.25
#: A turn held for a long call (sharing) ends after SHARING_TURN x the usual round.
SHARING_TURN = 0.5


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
    """Two kinds of work take turns: inferences (kind 0) and a decoder's jobs (kind 1). Work of
    one kind shares the lock; the two kinds exclude each other.

    The decoder's share is a setting. While both kinds have work, the decoder holds the lock
    at least ``share`` of the time (counted in :attr:`contested`), in turns of at most ``turn``
    seconds (plus the job in progress): the longest a run waits for it. A decoder turn is a
    lease: in a gap of up to ``grace`` seconds between two of its jobs inferences stay out, so
    that a decoder made of many short jobs is not charged a round of inferences per job. When
    the decoder waits and is owed time, new inferences wait too, and it gets the lock as soon
    as the runs in flight finish; its turn lasts until it has had its share or ``turn`` ran
    out. When one round of inferences takes longer than ``turn * (1 - share) / share``, the
    decoder's share is ``turn / (turn + one round)``: ``turn`` bounds the latency, ``share``
    the upgrade time. Neither kind starves (a kind whose turn ends hands the lock to every
    waiter of the other). Time when only one kind has work is not counted: an idle session
    decodes at full speed, and one that is not upgrading serves at full speed.

    A turn repays at most a usual round: ``ROUND_SLACK`` (1.25) times the median of the last
    ``ROUNDS`` (16) rounds of inferences the decoder waited for. A round the machine slowed (a
    run beside a session build, CPUs stolen by the hypervisor) is then not followed by a turn
    as long, which the next run would wait for: on the 100M model under one loop, a 42 ms run
    was followed by a 42 ms wait, 59-63 ms above the 15 ms median. The share is kept over
    usual rounds.

    ``grace`` covers the decoder's own work between jobs (a stage file is copied 4 MB at a
    time, read and written outside its turns since either may wait for the disk, hashed in
    them): with 5 ms a loaded 2-core machine often let the runs in at each gap, and a 241 MB
    copy took 37-53 turns of 58 chunks (4.8-7.1 s); with 15-30 ms, 14-25 turns (1.5-3.7 s).
    A gap never lengthens a turn: runs wait at most until it ends.
    """

    def __init__(self, share: float = 0.5, turn: float = 0.25, grace: float = 0.015,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
            raise ValueError(f"the decoder's share must be in (0, 1], not {share!r}")
        if not isinstance(turn, (int, float)) or not 0.0 < turn <= 60.0:
            raise ValueError(f"the decoder's turn must be in (0, 60] seconds, not {turn!r}")
        self.share, self.turn, self.grace = float(share), float(turn), float(grace)
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._kind = 0
        self._holders = 0
        self._waiting = [0, 0]
        self._grants = [0, 0]  # turns handed to each kind's waiters, so that waiters see theirs
        self._lease_end = 0.0  # the decoder's turn lasts until then
        self._idle_since = 0.0  # when the last job of the decoder's turn ended
        self._balance = 0.0  # < 0: the decoder is owed time (seconds weighted by the share)
        self._floor = -(1.0 - self.share) * self.turn  # at most one turn owed
        self._round = 0.0  # how long inferences have held the lock while the decoder waits
        self._rounds: collections.deque[float] = collections.deque(maxlen=ROUNDS)
        self._usual: float | None = None  # their median, once there are 4
        self._mark = clock()
        #: seconds each kind held the lock (the decoder: its turn) while the other waited
        self.contested = [0.0, 0.0]
        self._holds = [_Holding(self, 0), _Holding(self, 1)]

    def hold(self, kind: int) -> ContextManager[None]:
        """A context manager that holds the lock for work of ``kind`` (0 or 1); made once,
        it holds no state of its own."""
        return self._holds[kind]

    def expired(self) -> bool:
        """Whether the decoder should let waiting inferences in now: its turn ran out, or it
        had its share (for a holder that is not one short job, see :func:`sharing`)."""
        with self._lock:
            now = self._clock()
            self._account(now)
            return bool(self._waiting[0]) and (now >= self._lease_end or not self._owed())

    # -- internals, called with self._lock held

    def _owed(self) -> bool:
        return self._balance < 0 or self.share >= 1.0

    def _leased(self, now: float) -> bool:
        """A gap between two jobs of the decoder's turn, which goes on."""
        return self._kind == 1 and not self._holders and now < self._lease_end \
            and now - self._idle_since < self.grace and self._owed()

    def _account(self, now: float) -> None:
        dt, self._mark = now - self._mark, now
        if dt <= 0:
            return
        if self._kind == 1 and (self._holders or self._leased(now)):
            if self._waiting[0]:
                self.contested[1] += dt
                if self._balance < 0:
                    self._balance = min(0.0, self._balance + (1.0 - self.share) * dt)
        elif self._holders and self._waiting[1]:  # inferences hold, the decoder waits
            self.contested[0] += dt
            self._round += dt
            self._balance = max(self._owed_at_most(), self._balance - self.share * dt)

    def _owed_at_most(self) -> float:
        """The floor of the balance: one turn, and no more than a usual round of inferences
        earns (``ROUND_SLACK`` times the median of the last ``ROUNDS``), so that one slow round
        (a run slowed by the machine) is not followed by as long a turn: the run after it would
        wait that long."""
        if self._usual is None:
            return self._floor
        return max(self._floor, -self.share * ROUND_SLACK * self._usual)

    def forgo(self) -> None:
        """Forgo the time the decoder is still owed: when its holder leaves, waiting inferences
        get the lock (for a holder that ends its turn early, see :func:`sharing`)."""
        with self._lock:
            self._account(self._clock())
            self._balance = max(self._balance, 0.0)

    def usual_round(self) -> float | None:
        """How long a round of inferences usually held the lock while the decoder waited: the
        median of the last ``ROUNDS`` (None before 4)."""
        return self._usual

    def _grant(self, kind: int, now: float) -> None:
        """Hand the free lock to every waiter of ``kind``."""
        self._kind = kind
        self._holders += self._waiting[kind]
        self._waiting[kind] = 0
        self._grants[kind] += 1
        if kind == 1:
            self._lease_end = now + self.turn
            self._end_round()
        self._cond.notify_all()

    def _end_round(self) -> None:
        """The decoder's wait ended: count the round of inferences it waited for."""
        if self._round > 0:
            self._rounds.append(self._round)
            self._round = 0.0
            if len(self._rounds) >= 4:
                self._usual = sorted(self._rounds)[len(self._rounds) // 2]

    def _admit(self, kind: int, now: float) -> bool:
        """Whether a new arrival of ``kind`` enters now (it is counted as a holder)."""
        if kind == 0:
            if self._holders:
                ok = self._kind == 0 and (not self._waiting[1] or not self._owed())
            else:
                ok = not self._leased(now) and not self._waiting[1]
            if ok:
                self._kind = 0
                self._holders += 1
            return ok
        if self._holders and self._kind == 0:
            return False
        if self._holders or self._leased(now):  # the decoder's turn goes on
            if self._waiting[0] and (now >= self._lease_end or not self._owed()):
                return False
        elif self._waiting[0]:  # its turn is over and inferences wait: theirs
            self._grant(0, now)
            return False
        else:  # a new turn
            self._kind = 1
            self._lease_end = now + self.turn
            self._end_round()
        self._holders += 1
        return True

    def _timeout(self, now: float) -> float | None:
        """How long a waiting inference sleeps before the decoder's lease may have ended."""
        if self._kind == 1 and not self._holders:
            return max(0.0, min(self._lease_end, self._idle_since + self.grace) - now) + 1e-4
        return None


class _Holding:
    __slots__ = ("_turns", "_kind")

    def __init__(self, turns: TurnLock, kind: int) -> None:
        self._turns = turns
        self._kind = kind

    def __enter__(self) -> None:
        t, kind = self._turns, self._kind
        with t._lock:
            if not kind and t._kind == 0 and not t._waiting[1]:  # no decoder: the usual case
                t._holders += 1
                return
            now = t._clock()
            t._account(now)
            if t._admit(kind, now):
                return
            t._waiting[kind] += 1
            grant = t._grants[kind]
            try:
                while True:
                    t._cond.wait(t._timeout(now) if not kind else None)
                    if t._grants[kind] != grant:
                        return  # granted: counted as a holder
                    now = t._clock()
                    t._account(now)
                    if not t._holders and t._kind != kind and not t._leased(now):
                        t._grant(kind, now)  # the other kind's turn ended meanwhile
                        return
                    t._waiting[kind] -= 1
                    if t._admit(kind, now):
                        return
                    t._waiting[kind] += 1
            except BaseException:
                if t._grants[kind] == grant:
                    t._waiting[kind] -= 1
                else:
                    t._holders -= 1
                raise

    def __exit__(self, *exc: object) -> None:
        t, kind = self._turns, self._kind
        with t._lock:
            if not t._waiting[0] and not t._waiting[1]:
                t._holders -= 1
                if kind and not t._holders:
                    t._idle_since = t._mark = t._clock()
                return
            now = t._clock()
            t._account(now)
            t._holders -= 1
            if t._holders:
                return
            if kind == 0:
                t._grant(1 if t._waiting[1] else 0, now)
            else:
                t._idle_since = now
                if t._waiting[0] and (now >= t._lease_end or not t._owed()):
                    t._grant(0, now)
                else:
                    t._cond.notify_all()


@contextlib.contextmanager
def sharing(turns: TurnLock | None, poll: float = 0.002) -> Iterator[None]:
    """Run the body (one long call that cannot take turns, e.g. building an onnxruntime
    session) with the decoder's share of the cores: a helper thread takes the decoder's turns
    for it and holds each until it ends, so that inferences wait during them and the body has
    the cores; between them the body runs beside the inferences.

    A turn held for it ends after ``SHARING_TURN`` (half) a usual round at most
    (:meth:`TurnLock.usual_round`), the rest of its due forgone (:meth:`TurnLock.forgo`): the
    body slows the runs beside it (a session build beside the 100M model's runs, which are
    bound by memory bandwidth: 17 ms runs took 30-48), and a turn as long as such a run would
    double the next run's wait. The body then has about a third of the contested time."""
    if turns is None:
        yield
        return
    done = threading.Event()

    def hold() -> None:
        while not done.is_set():
            with turns.hold(1):
                usual = turns.usual_round()
                end = None if usual is None else time.monotonic() + SHARING_TURN * usual
                while not done.wait(poll) and not turns.expired():
                    if end is not None and time.monotonic() >= end:
                        turns.forgo()
                        break

    helper = threading.Thread(target=hold, name="p2u-turns", daemon=True)
    helper.start()
    try:
        yield
    finally:
        done.set()
        helper.join()
