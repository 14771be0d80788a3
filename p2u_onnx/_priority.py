"""Run background work at a lower CPU priority than the inferences it would otherwise slow.

Building an onnxruntime session is one long call that cannot take turns with inferences (see
:class:`~p2u_onnx._rwlock.TurnLock`): on a 2-core machine a MiniLM run overlapping the build of
another MiniLM session took 90-97 ms instead of 27. With the building thread at nice 10 the
overlapping runs took 40-55 ms (the build then stretches while inferences keep the cores busy).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["lowered_priority", "lower_this_thread", "BUILD_NICE"]

BUILD_NICE = 10  # added to the thread's nice value while it builds a session


def _tasks() -> set[str]:
    try:
        return set(os.listdir("/proc/self/task"))
    except OSError:
        return set()


def _can_restore(nice: int) -> bool:
    """Whether this process may set a thread back to ``nice`` after raising it (Linux:
    CAP_SYS_NICE, which root has, or RLIMIT_NICE allowing it)."""
    if not sys.platform.startswith("linux"):
        return False
    if os.geteuid() == 0:
        return True
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - nice
    except (ImportError, OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def lowered_priority(by: int = BUILD_NICE) -> Iterator[None]:
    """Run the body with this thread's nice value raised by ``by``; afterwards the thread, and
    every thread started meanwhile at that lowered priority (onnxruntime's pool threads of a
    session built here), get their priority back.

    Linux only, and only where the priority can be given back (root, or an RLIMIT_NICE that
    allows it): elsewhere the body runs at normal priority, since threads started in it would
    otherwise keep the lower one.
    """
    tid = threading.get_native_id()
    try:
        nice = os.getpriority(os.PRIO_PROCESS, tid)
    except (OSError, AttributeError):
        yield
        return
    low = min(19, nice + by)
    if low == nice or not _can_restore(nice):
        yield
        return
    before = _tasks()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, low)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        for task in _tasks() - before:
            with contextlib.suppress(OSError, ValueError):
                if os.getpriority(os.PRIO_PROCESS, int(task)) == low:
                    os.setpriority(os.PRIO_PROCESS, int(task), nice)


def lower_this_thread(by: int = BUILD_NICE) -> None:
    """Raise this thread's nice value by ``by`` for good: for a thread that only does
    background work and starts no threads, so nothing needs to be given back (lowering a
    priority needs no privilege). Best effort; Linux (elsewhere it may apply to the process,
    so nothing is done)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
