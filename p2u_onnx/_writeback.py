"""Write a live session's work files to disk a few megabytes at a time, in the background.

Linux writes dirty file pages back 30 s after they were written (``vm.dirty_expire_centisecs``),
all that expired at once: 400 MB of a 100M model's weights file went out in 0.2-0.3 s, and the
inferences running then took +36-51 ms (on a 2-core machine; the same with one ``fsync`` at a
lowered priority). Written back here 4 MB at a time with a pause after each, as the decoder
finishes each tensor, the same file disturbed no run by more than the decoding did.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
from typing import Any

from ._memory import libc
from ._priority import lower_this_thread

__all__ = ["Writeback"]

CHUNK = 4 << 20
PAUSE = 0.02  # seconds after each chunk: at most about 150 MB/s, a few ms of disk work at a time
# sync_file_range: wait for pages already under write-back, start it, wait for it to finish
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _sync_file_range() -> Any:
    return getattr(libc(), "sync_file_range", None) if sys.platform.startswith("linux") \
        else None


class Writeback:
    """A background thread that writes back the ranges of files handed to :meth:`add`.

    Best effort and Linux only (elsewhere :meth:`add` does nothing and the kernel writes back
    as it always does). Nothing waits for it: a file may be renamed or removed meanwhile. The
    thread ends after a second with nothing to do.
    """

    def __init__(self, chunk: int = CHUNK, pause: float = PAUSE):
        self.chunk, self.pause = chunk, pause
        self._queue: collections.deque[tuple[int, int, int]] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, fd: int, offset: int, length: int) -> None:
        """Write back ``length`` bytes at ``offset`` of the open file ``fd`` (duplicated here:
        the caller may close it)."""
        if _sync_file_range() is None or length <= 0:
            return
        with self._cond:
            if self._closed:
                return
            self._queue.append((os.dup(fd), offset, length))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="p2u-writeback",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        """Stop; ranges not yet written back are left to the kernel."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            pending, self._queue = list(self._queue), collections.deque()
        for fd, _, _ in pending:
            os.close(fd)

    def _loop(self) -> None:
        sync = _sync_file_range()
        pause = threading.Event()
        lower_this_thread()  # background work, for the thread's life (it starts no threads)
        while True:
            with self._cond:
                if not self._queue and not self._closed:
                    self._cond.wait(1.0)
                if self._closed or not self._queue:  # idle: the next add() starts another
                    self._thread = None
                    return
                fd, offset, length = self._queue.popleft()
            try:
                end = offset + length
                while offset < end and not self._closed:
                    n = min(self.chunk, end - offset)
                    sync(fd, offset, n, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
                    offset += n
                    pause.wait(self.pause)
            finally:
                os.close(fd)
