"""The folder a package is mirrored into (``p2u fetch -o DIR``, an ``HttpSource`` cache).

Device side: standard library only.

``DIR`` holds the package's files and nothing else of p2u's: the lock, the partial downloads
(``NAME.part``, ``NAME.part.json``), temporary files and the record of what p2u wrote all live in
the hidden folder ``DIR/.p2u/``. That folder is also what makes ``DIR`` a mirror: p2u writes into
a folder that is new, empty, or already has ``DIR/.p2u/``, and refuses any other (a non-empty
folder of the user's).

p2u never replaces or deletes a file it did not write. Each file it puts in ``DIR`` is recorded
in ``DIR/.p2u/written/NAME`` with its inode, size and modification time; a file is p2u's only
while all three still match. A file of the same name that the user put there (or changed) is
left alone: reading it is fine when its bytes are the ones the manifest lists, replacing or
removing it is refused.

A mirror made by an older p2u (a ``.p2u.lock`` file beside the package files) is adopted: its
manifest and the files that manifest lists are recorded as p2u's, its partial files move into
``.p2u/``.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

from .errors import P2UError
from .format import MANIFEST_NAME, check_name, open_regular

STATE = ".p2u"
_LEGACY_LOCK = ".p2u.lock"


class MirrorDir:
    """A mirror folder: ``root`` (the package files) and ``root/.p2u`` (p2u's own files).

    Use :meth:`open`, which creates the folder or checks that p2u may write into it.
    """

    def __init__(self, root: Path):
        self.root = root
        self.state = root / STATE
        self._written = self.state / "written"

    @classmethod
    def open(cls, root: str | os.PathLike) -> MirrorDir:
        """The mirror at ``root``: created when missing; an existing folder must be empty or a
        mirror already (:class:`P2UError` otherwise, and nothing is changed)."""
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not root.is_dir():
                raise P2UError(f"{root}: not a directory")
            entries = set(os.listdir(root))
        except OSError as e:
            raise P2UError(f"cannot use {root} as a mirror: {e.strerror or e}") from e
        m = cls(root)
        if entries and STATE not in entries:
            if _LEGACY_LOCK not in entries:
                raise P2UError(f"{root} is not empty and is not a p2u mirror (it has no {STATE}/ "
                               "folder): refusing to write into it; give a new or empty folder")
            m._make()
            m._adopt_legacy(entries)
            return m
        if STATE in entries:
            st = os.lstat(m.state)
            if not stat.S_ISDIR(st.st_mode):
                raise P2UError(f"{m.state}: not a folder (p2u keeps its own files there)")
        m._make()
        return m

    def _make(self) -> None:
        try:
            self.state.mkdir(exist_ok=True)
            self._written.mkdir(exist_ok=True)
        except OSError as e:
            raise P2UError(f"cannot write {self.state}: {e.strerror or e}") from e

    # -- p2u's own files

    @property
    def lock_path(self) -> Path:
        return self.state / "lock"

    def part(self, name: str) -> Path:
        """Where ``name`` is downloaded to before it is complete and checked."""
        return self.state / (check_name(name) + ".part")

    def part_meta(self, name: str) -> Path:
        return self.state / (check_name(name) + ".part.json")

    def temp(self, name: str) -> Path:
        """A temporary name for writing ``name`` atomically (same file system as ``root``)."""
        return self.state / f".{check_name(name)}.{os.getpid()}.{threading.get_ident()}.tmp"

    # -- files in root, and whose they are

    def owns(self, name: str) -> bool:
        """Whether ``root/name`` is a file p2u wrote (and nobody changed since)."""
        try:
            with open_regular(self._written / check_name(name)) as fh:  # no FIFO, no link
                rec = json.loads(fh.read(4096))
            st = os.lstat(self.root / name)
        except (OSError, ValueError, P2UError):
            return False
        return stat.S_ISREG(st.st_mode) and rec == [st.st_ino, st.st_size, st.st_mtime_ns]

    def may_replace(self, name: str) -> bool:
        return not os.path.lexists(self.root / check_name(name)) or self.owns(name)

    def install(self, src: Path, name: str) -> Path:
        """Move the finished file ``src`` (under ``.p2u/``) to ``root/name`` and record it as
        p2u's; refuses (:class:`P2UError`) to replace a file p2u did not write."""
        final = self.root / check_name(name)
        if not self.may_replace(name):
            raise P2UError(f"{final} exists and was not written by p2u: it is left as it is "
                           "(move it away to let p2u put the package's file there)")
        try:
            os.replace(src, final)
        except OSError as e:
            raise P2UError(f"cannot write {final}: {e.strerror or e}") from e
        self._record(name)
        return final

    def write(self, name: str, data: bytes) -> Path:
        """Write ``root/name`` atomically (fsynced) and record it as p2u's."""
        tmp = self.temp(name)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            _unlink(tmp)
            raise P2UError(f"cannot write {self.root / name}: {e.strerror or e}") from e
        try:
            return self.install(tmp, name)
        finally:
            _unlink(tmp)

    def remove(self, name: str) -> None:
        """Remove ``root/name`` if p2u wrote it, and its partial files; others are kept."""
        if self.owns(name):
            _unlink(self.root / name)
        _unlink(self._written / name)
        _unlink(self.part(name))
        _unlink(self.part_meta(name))

    def _record(self, name: str) -> None:
        st = os.lstat(self.root / name)
        rec = self._written / name
        tmp = self.temp("written-" + name)
        try:
            tmp.write_bytes(json.dumps([st.st_ino, st.st_size, st.st_mtime_ns]).encode())
            os.replace(tmp, rec)
        except OSError as e:
            _unlink(tmp)
            raise P2UError(f"cannot write {rec}: {e.strerror or e}") from e

    def _adopt_legacy(self, entries: set[str]) -> None:
        """Take over a mirror written by an older p2u (files beside a ``.p2u.lock``)."""
        names = {MANIFEST_NAME}
        try:
            m = json.loads((self.root / MANIFEST_NAME).read_bytes())
            files = [f for st in m.get("stages", []) for f in st.get("files", [])]
            files += m.get("base_model", {}).get("files", [])
            if m.get("probe"):
                files.append(m["probe"])
            names |= {f["path"] for f in files
                      if isinstance(f, dict) and isinstance(f.get("path"), str)}
        except (OSError, ValueError, AttributeError, TypeError):
            pass
        for name in entries:
            for suffix in (".part", ".part.json"):
                base = name[: -len(suffix)] if name.endswith(suffix) else None
                if base in names:
                    os.replace(self.root / name, self.state / name)
                    break
            else:
                if name in names and os.path.isfile(self.root / name) \
                        and not os.path.islink(self.root / name):
                    self._record(name)
        _unlink(self.root / _LEGACY_LOCK)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
