"""Background memory and disk work of a live session: huge pages under a new session's weights,
and work files written back a few megabytes at a time."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

import numpy as np
import pytest

from p2u_onnx import _memory, _writeback
from p2u_onnx._writeback import Writeback

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _resident_pages(a: np.ndarray) -> int:
    start = a.ctypes.data // 4096 * 4096
    n = -(-(a.ctypes.data + a.nbytes - start) // 4096)
    vec = ctypes.create_string_buffer(n)
    assert _memory.libc().mincore(start, n * 4096, vec) == 0
    return sum(b & 1 for b in vec.raw)


def _huge_kb(a: np.ndarray) -> int:
    """AnonHugePages of the mappings that hold ``a`` (a collapse may split one in three)."""
    inside, total = False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < a.ctypes.data + a.nbytes and a.ctypes.data < hi
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


@linux
def test_collapse_keeps_values_and_leaves_untouched_memory_alone():
    touched = np.arange(8 << 20, dtype=np.int32)  # 32 MB, every page written
    untouched = np.empty(32 << 20, np.uint8)  # mapped, never written
    regions = [(a.ctypes.data, a.ctypes.data + a.nbytes) for a in (touched, untouched)]
    assert _resident_pages(untouched) < 4
    done = _memory.collapse_to_huge_pages(regions)
    np.testing.assert_array_equal(touched, np.arange(8 << 20, dtype=np.int32))
    # not made resident. The 2 MB at each end are left out: when the two arrays are adjacent
    # in one mapping, the kernel's own khugepaged may collapse the huge page that straddles
    # them (numpy advises MADV_HUGEPAGE for large arrays), faulting in up to 511 pages there
    assert _resident_pages(untouched[_memory.HUGE:-_memory.HUGE]) < 4
    assert done % _memory.HUGE == 0 and done <= touched.nbytes
    if done:  # the kernel has MADV_COLLAPSE (Linux 6.1+) and transparent huge pages
        assert done >= touched.nbytes - 2 * _memory.HUGE
        assert _huge_kb(touched) * 1024 >= done


@linux
def test_anonymous_regions_lists_new_mappings():
    before = _memory.anonymous_regions()
    a = np.ones(64 << 20, np.uint8)  # above glibc's largest mmap threshold: a mapping of its own
    new = _memory.anonymous_regions() - before
    lo, hi = a.ctypes.data, a.ctypes.data + a.nbytes
    covered = sum(min(hi, end) - max(lo, start) for start, end in new if start < hi and lo < end)
    assert covered >= a.nbytes - _memory.HUGE  # numpy may split off an unaligned first page


def _wait(cond, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fake_sync(monkeypatch):
    """Write-back calls recorded as (inode, offset, length, flags); each waits for ``gate``."""
    calls: list[tuple[int, int, int, int]] = []
    gate = threading.Event()
    gate.set()

    def sync(fd, offset, length, flags):
        calls.append((os.fstat(fd).st_ino, offset, length, flags))
        gate.wait(10)
        return 0

    monkeypatch.setattr(_writeback, "_sync_file_range", lambda: sync)
    return calls, gate


@linux
def test_writeback_writes_each_range_in_chunks_then_lets_go(tmp_path, fake_sync):
    calls, _ = fake_sync
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(10_000))
    fds = _open_fds()
    wb = Writeback(chunk=4096, pause=0)
    fd = os.open(path, os.O_RDONLY)
    wb.add(fd, 1000, 9000)
    wb.add(fd, 0, 1000)
    wb.add(fd, 5, 0)  # nothing to do
    os.close(fd)  # the writeback keeps its own descriptor
    _wait(lambda: len(calls) == 4)
    assert [c[1:3] for c in calls] == [(1000, 4096), (5096, 4096), (9192, 808), (0, 1000)]
    assert {c[0] for c in calls} == {path.stat().st_ino}
    assert all(c[3] == 7 for c in calls)  # wait before, write, wait after
    _wait(lambda: wb._thread is None)  # idle: the thread ended
    assert _open_fds() == fds
    with open(path, "rb") as f:
        wb.add(f.fileno(), 0, 10)  # starts a thread again
    _wait(lambda: len(calls) == 5)
    wb.close()
    wb.add(0, 0, 10)  # ignored once closed
    assert len(calls) == 5


@linux
def test_writeback_close_drops_what_is_pending(tmp_path, fake_sync):
    calls, release = fake_sync
    release.clear()
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(100))
    fds = _open_fds()
    wb = Writeback(chunk=10, pause=0)
    with open(path, "rb") as f:
        wb.add(f.fileno(), 0, 100)
        wb.add(f.fileno(), 0, 100)
    _wait(lambda: calls)
    wb.close()
    release.set()
    _wait(lambda: _open_fds() == fds)
    assert [c[1] for c in calls] == [0]  # the rest of the first range, all of the second: dropped


@linux
def test_writeback_with_the_real_call(tmp_path):
    path = tmp_path / "w.bin"
    data = os.urandom(3 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.write(fd, data)
    wb = Writeback(chunk=1 << 20, pause=0)
    wb.add(fd, 0, len(data))
    os.close(fd)
    _wait(lambda: wb._thread is None)
    assert path.read_bytes() == data
