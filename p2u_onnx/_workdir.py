"""Work folders named after the process that owns them, so that the next process finds and
removes the ones a crashed process left behind (device side: the standard library only); and
:func:`exchange`, which swaps two folders' names in one step.

A folder made by :func:`make_dir` is called ``<prefix><pid>-<start>-<boot>-<host>-<random>``:
the owner's process id, its start time (clock ticks after boot, ``/proc/<pid>/stat``), the first
8 hex digits of the boot id and 8 hex digits naming the machine and PID namespace
(``/etc/machine-id``, ``/proc/self/ns/pid``). The name is the marker: it exists from the moment
the folder does (``mkdir`` is atomic), so there is no window where a folder has no owner on
record, and the folder holds nothing but its own files.

:func:`sweep` removes such folders whose owner is dead:

- same boot, same machine and namespace: dead when no process has that pid, or the one that has
  it started at another time (a reused pid), or is a zombie;
- same machine and namespace, another boot: dead (every process of an earlier boot is);
- another machine or PID namespace (a shared network or container volume): left alone, its
  owner cannot be checked from here.

Elsewhere than Linux there is no start time to compare: a folder is removed only when no
process has its pid, so a reused pid keeps a leftover rather than risking a live folder.
Removal never follows a symbolic link: entries that are not real directories are skipped, and
:func:`remove_tree` uses :func:`shutil.rmtree`, which on Linux works through directory file
descriptors (``rmtree.avoids_symlink_attacks``) and unlinks links instead of entering them.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import stat
import sys
from pathlib import Path

__all__ = ["owner_tag", "make_dir", "owner_alive", "dead_dirs", "sweep", "remove_tree",
           "exchange"]

_TAG = r"(\d+)-(\d+)-([0-9a-f]{8})-([0-9a-f]{8})"


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _start_time(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks after boot, state letter) of process ``pid`` (Linux), or
    None when there is no such process (or no ``/proc``)."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # the command name may hold spaces and ')'
    try:
        return int(fields[19]), fields[0]
    except (IndexError, ValueError):
        return None


@functools.cache
def _this_boot() -> str:
    return re.sub(r"[^0-9a-f]", "", _read("/proc/sys/kernel/random/boot_id"))[:8].ljust(8, "0")


@functools.cache
def _this_host() -> str:
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return hashlib.sha256((_read("/etc/machine-id").strip() + "|" + ns).encode()).hexdigest()[:8]


def owner_tag(pid: int | None = None) -> str:
    """``<pid>-<start>-<boot>-<host>`` of this process (``pid`` for tests only)."""
    pid = os.getpid() if pid is None else pid
    st = _start_time(pid)
    return f"{pid}-{st[0] if st else 0}-{_this_boot()}-{_this_host()}"


def make_dir(parent: str | os.PathLike, prefix: str, mode: int = 0o700) -> Path:
    """A new folder ``<prefix><owner tag>-<random>`` in ``parent`` (``mode`` less the umask)."""
    tag = owner_tag()
    for _ in range(100):
        path = Path(parent) / f"{prefix}{tag}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free name for a work folder in {parent}")


def owner_alive(pid: int, start: int, boot: str, host: str) -> bool:
    """Whether the process a folder's name records may still run (True when it cannot be
    told: another machine or namespace, or no ``/proc``)."""
    if host != _this_host():
        return True
    if os.path.isdir("/proc/self"):
        if boot != _this_boot():
            return False
        st = _start_time(pid)
        return st is not None and st[0] == start and st[1] not in "ZX"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # EPERM: someone else's process, alive
    return True


def remove_tree(path: str | os.PathLike) -> None:
    """Remove folder ``path`` and what it holds, best effort, never following a symbolic link
    (a link at ``path`` itself is left alone)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return
    except OSError:
        return
    shutil.rmtree(path, ignore_errors=True)


def parse(name: str, prefix: str) -> tuple[int, int, str, str, str] | None:
    """(pid, start, boot, host, suffix) of a folder name made by :func:`make_dir` with
    ``prefix`` (``suffix``: what follows the random part, e.g. ``.old``), or None."""
    m = re.fullmatch(re.escape(prefix) + _TAG + r"-[0-9a-f]{8}(\.old)?", name)
    if m is None:
        return None
    return int(m[1]), int(m[2]), m[3], m[4], m[5] or ""


def dead_dirs(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Folders of ``parent`` named by :func:`make_dir` with ``prefix``, owned by this user,
    whose owner is dead. Symbolic links and other users' folders are never listed."""
    found = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    uid = os.getuid() if hasattr(os, "getuid") else None
    for e in entries:
        info = parse(e.name, prefix)
        if info is None:
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue
        if not owner_alive(*info[:4]):
            found.append(Path(e.path))
    return found


def sweep(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Remove the folders :func:`dead_dirs` lists; returns them."""
    dead = dead_dirs(parent, prefix)
    for path in dead:
        remove_tree(path)
    return dead


_RENAME_EXCHANGE = 2  # Linux renameat2 flag
_AT_FDCWD = -100


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap the names ``a`` and ``b`` (both must exist) in one step: Linux
    ``renameat2(RENAME_EXCHANGE)`` (kernel 3.15+, glibc 2.28+; ext4, xfs, btrfs, tmpfs...).
    False where that is not available (another system, an older C library, a file system
    without it, such as some network file systems): nothing was changed then."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))
