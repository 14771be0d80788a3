"""Give memory that numpy, zstandard or onnxruntime freed back to the system, and back an
onnxruntime session's weights with huge pages so that dropping it is quick."""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Iterable
from typing import Any

from ._rwlock import Pace, in_turn

HUGE = 2 << 20  # a transparent huge page on x86-64 and arm64 (4 KB base pages)
# per madvise call, each in its turn: one huge page, at most 9 ms (p99 6) of copying beside a
# loop of the 100M model (two took 7-11 ms, the longest job of a live update then)
_COLLAPSE_STEP = HUGE
_MADV_COLLAPSE = 25  # Linux 6.1+
_EINVAL = 22


_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "mmap": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_int64]),
    "munmap": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]),
    "madvise": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]),
    "mincore": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]),
    "sync_file_range": (ctypes.c_int, [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_uint]),
    "malloc_trim": (ctypes.c_int, [ctypes.c_size_t]),
}


@functools.cache
def libc() -> Any:
    """The C library through ctypes (``errno`` kept), with the signatures of the calls this
    package makes; the ones a platform lacks are absent. None where there is none to load."""
    try:
        lib = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        f = getattr(lib, name, None)
        if f is not None:
            f.restype, f.argtypes = restype, argtypes
    return lib


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc; a no-op elsewhere).

    glibc keeps freed blocks below its (adaptive) mmap threshold in its heaps, one per thread
    that allocated: without this, what one phase of work freed (decoding a stage, coding the
    weights, a dropped onnxruntime session) stays resident and adds to the next one's peak
    (measured on MiniLM: 0.5 to 0.8 x the fp32 weights).
    """
    trim = getattr(libc(), "malloc_trim", None)  # glibc
    if trim is not None:
        trim(0)


def _linux_libc() -> Any:
    return libc() if sys.platform.startswith("linux") else None


def anonymous_regions() -> set[tuple[int, int]]:
    """Address ranges ``(start, end)`` of this process's private anonymous read-write mappings
    that can hold a huge page (Linux; empty elsewhere)."""
    if _linux_libc() is None:
        return set()
    regions = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) == 5 and fields[1] == "rw-p" and fields[4] == "0":
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    if end - start >= HUGE:
                        regions.add((start, end))
    except OSError:
        return set()
    return regions


def new_ranges(before: Iterable[tuple[int, int]],
               after: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of the address ranges ``after`` that no range of ``before`` covers.

    The kernel merges a new anonymous mapping with a neighbour of the same kind, so a region
    listed after an allocation may be an old one grown: the set difference of the two lists
    would count all of it (in a process with other models loaded, hundreds of MB that were
    never this call's); this keeps only the new part.
    """
    old = sorted(before)
    out = []
    for start, end in sorted(after):
        pos = start
        for a, b in old:
            if b <= pos or a >= end:
                continue
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
            if pos >= end:
                break
        if pos < end:
            out.append((pos, end))
    return [(a, b) for a, b in out if b - a >= HUGE]


_collapse_works = [True]


def collapse_to_huge_pages(regions: Iterable[tuple[int, int]], pace: Pace | None = None,
                           limit: int | None = None) -> int:
    """Back the fully resident parts of ``regions`` with transparent huge pages
    (``MADV_COLLAPSE``, Linux 6.1+); returns the bytes collapsed. Each call copies at most
    2 MB, inside ``pace()`` when given. ``limit``: walk at most this many bytes (the caller's
    bound on what it allocated), so that the cost never grows with the rest of the process.

    Only the contents' backing changes, never their values, so this is safe on memory that
    others use. What it is for: onnxruntime frees a dropped session's weights in its destructor,
    which holds the GIL; on 4 KB pages, unmapping the 384 MB of prepacked weights of a 100M
    model took 32-41 ms, on huge pages 2-3 ms (and inferences ran 0-10% faster). Ranges with
    a page not yet touched are left alone: collapsing them would make them resident. Best
    effort: a kernel or configuration without the call makes this a no-op.
    """
    lib = _linux_libc()
    done = 0
    if lib is None or not _collapse_works[0]:
        return 0
    present = ctypes.create_string_buffer(_COLLAPSE_STEP // 4096)
    budget = limit if limit is not None else -1
    for start, end in sorted(regions):
        a = -(-start // HUGE) * HUGE
        while a + HUGE <= end:
            n = min(_COLLAPSE_STEP, (end - a) // HUGE * HUGE)
            if limit is not None:
                if budget < n:
                    return done
                budget -= n
            with in_turn(pace):
                if lib.mincore(a, n, present) != 0 or \
                        any(b & 1 == 0 for b in present.raw[:n // 4096]):
                    pass  # not all resident (or gone meanwhile): leave it
                elif lib.madvise(a, n, _MADV_COLLAPSE) == 0:
                    done += n
                elif ctypes.get_errno() == _EINVAL:  # not supported here
                    _collapse_works[0] = False
                    return done
            a += n
    return done


# ---------------------------------------------------------------- memory left to this process

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _stat_value(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == key:
                    return int(fields[1])
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_dirs() -> list[tuple[str, str, str, str]]:
    """``(folder, limit file, usage file, reclaimable stat key)`` of this process's memory
    cgroup and its parents, v2 and v1, as mounted here (in a container the process's own
    cgroup may be mounted at the hierarchy's root)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            root, files = "/sys/fs/cgroup", ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            root = "/sys/fs/cgroup/memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        parts = [p for p in path.split("/") if p and p != ".."]
        for i in range(len(parts), -1, -1):
            d = "/".join([root, *parts[:i]])
            out.append((d, *files))
    return out


def memory_left() -> tuple[int | None, str]:
    """Bytes this process can still allocate before a limit stops it, and which limit that
    is: the tightest of its memory cgroup (``memory.max`` minus usage, v2, or v1's
    ``memory.limit_in_bytes``; page cache that can be dropped counts as free), the machine's
    ``MemAvailable`` and ``RLIMIT_AS`` minus the address space in use. ``(None, "")`` when
    none can be read (not Linux)."""
    found: list[tuple[int, str]] = []
    seen = set()
    for d, limit_file, usage_file, key in _cgroup_dirs():
        if d in seen:
            continue
        seen.add(d)
        limit = _read_int(f"{d}/{limit_file}")
        usage = _read_int(f"{d}/{usage_file}")
        if limit is None or usage is None:
            continue
        usage -= _stat_value(f"{d}/memory.stat", key)
        found.append((max(0, limit - usage), f"cgroup {limit_file} {limit >> 20} MiB"))
    avail = _stat_value("/proc/meminfo", "MemAvailable:")
    if avail:
        found.append((avail * 1024, "MemAvailable"))
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            vm = _stat_value("/proc/self/status", "VmSize:") * 1024
            found.append((max(0, soft - vm), f"RLIMIT_AS {soft >> 20} MiB"))
    except (ImportError, OSError, ValueError):
        pass
    if not found:
        return None, ""
    return min(found)
