"""The package format: a manifest and stage files (device side; needs numpy only).

A package is a directory of plain static files (see docs/format.md)::

    manifest.json     format version, package id, source digest, tensor table, stages
    base.onnx         the base as a plain ONNX model (stock onnxruntime runs it) ...
    base.bin          ... with its tensors in this ONNX external-data file
    stage-0.p2u       the base, compressed, as sent over the wire
    stage-1.p2u ...   updates

A stage file is::

    8 bytes   magic b"P2USTAGE"
    u32 LE    format version
    u32 LE    header length H (at most 64 MiB)
    H bytes   JSON header, space-padded so the payload starts on a 64-byte boundary
    payload   entries, back to back, in header order

The header names the package id and the stage index, and lists entries with ONNX's external-data
keys ``location`` (this file's name), ``offset`` (from the start of the file) and ``length``,
plus the codec that decodes them. Entries must tile the payload exactly (no gaps, no overlaps);
``payload_sha256`` covers the payload, so a lone file can be checked without its manifest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import stat
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from ._rwlock import Pace, in_turn
from .errors import FormatError, IntegrityError, P2UError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "StageFile",
    "StageWriter",
    "read_stage",
    "load_manifest",
    "save_manifest",
    "stage_file_name",
    "check_file_entry",
    "sha256_bytes",
    "sha256_file",
    "atomic_write_bytes",
    "AtomicFile",
    "check_name",
    "package_file",
    "open_regular",
]

FORMAT_VERSION = 1
MAGIC = b"P2USTAGE"
MANIFEST_NAME = "manifest.json"
ALIGN = 64
MAX_HEADER = 64 << 20
_PREFIX = struct.Struct("<8sII")


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def check_name(name: object, what: str = "file name") -> str:
    """``name`` if it is one plain file name (letters, digits, ``._-``, not a dotfile, at most
    200 characters), else :class:`FormatError`. Every file name a manifest, a stage header or an
    ONNX external-data ``location`` gives goes through here before it is joined to a folder:
    absolute paths, ``..``, separators, NUL bytes and non-strings never are."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise FormatError(f"{what} {name!r} is not a plain file name inside the package "
                          "(absolute paths, '..', '/' and hidden files are refused)")
    return name


def package_file(root: str | os.PathLike, name: object, what: str = "file") -> Path:
    """``root / name`` for a ``name`` taken from a package, checked before anything touches it.

    The name must pass :func:`check_name`. When the path exists it must be a regular file, not a
    symbolic link (which could lead outside the package), a FIFO or a device:
    :class:`IntegrityError` otherwise. A missing file is returned as it is, for the caller to
    report. Use :func:`open_regular` to read it (the check here is repeated on the descriptor).
    """
    p = Path(root) / check_name(name, what)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    except OSError as e:
        raise IntegrityError(f"{p}: cannot stat ({e.strerror or e})") from e
    if stat.S_ISLNK(st.st_mode):
        raise IntegrityError(f"{p}: a symbolic link; a package holds regular files only")
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(f"{p}: not a regular file (a package holds regular files only)")
    return p


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading without following a symbolic link in its last component and
    without blocking on a FIFO; refuse anything but a regular file (:class:`IntegrityError`).
    ``FileNotFoundError`` and other ``OSError`` pass through for the caller to word."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IntegrityError(f"{path}: a symbolic link; a package holds regular files "
                                 "only") from e
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IntegrityError(f"{path}: not a regular file (a package holds regular files "
                                 "only)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def stage_file_name(index: int) -> str:
    return f"stage-{index}.p2u"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22,
                pace: Pace | None = None) -> str:
    """Hex sha256 of the file at ``path``, read ``chunk`` bytes at a time. With ``pace`` (a live
    session hashing in turns with its inferences) each chunk is hashed inside ``pace()`` and read
    outside it, so that a read waiting for the disk never holds up a turn."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            with in_turn(pace):
                h.update(block)
    return h.hexdigest()


def check_file_entry(path: str | os.PathLike, entry: dict[str, Any], *,
                     digest: bool = True) -> Path:
    """Check that ``path`` is there with the size and (with ``digest``) the sha256 that its
    manifest entry ``entry`` lists; returns it as a :class:`~pathlib.Path`."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path}: missing from the package")
    size = path.stat().st_size
    if size != entry["size"]:
        raise IntegrityError(f"{path}: {size} bytes, the manifest says {entry['size']} "
                             "(truncated or altered)")
    if digest and sha256_file(path) != entry["sha256"]:
        raise IntegrityError(f"{path}: sha256 does not match the manifest (altered)")
    return path


def sha256_bytes(data: bytes | bytearray | memoryview, chunk: int = 1 << 22,
                 pace: Pace | None = None) -> str:
    """Hex sha256 of ``data``, ``chunk`` bytes per ``pace()`` turn (see :func:`sha256_file`)."""
    h = hashlib.sha256()
    view = memoryview(data).cast("B")
    for i in range(0, len(view), chunk):
        with in_turn(pace):
            h.update(view[i:i + chunk])
    return h.hexdigest()


class AtomicFile:
    """Write to a temporary name beside ``path`` and rename into place on success.

    On any error (a full disk included) the temporary file is removed and a :class:`P2UError`
    naming the path is raised; an existing file at ``path`` is left untouched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f: BinaryIO | None = None
        self._tmp = ""

    def __enter__(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                         dir=self.path.parent)
        self._f = os.fdopen(fd, "wb")
        return self._f

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._f is not None
        try:
            if exc_type is None:
                self._f.flush()
                # mkstemp creates 0600; a package must be readable by the web server serving it
                os.fchmod(self._f.fileno(), 0o666 & ~_umask())
                os.fsync(self._f.fileno())
            self._f.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
                return False
        except OSError as e:
            _unlink(self._tmp)
            raise P2UError(f"cannot write {self.path}: {e.strerror or e}") from e
        _unlink(self._tmp)
        if isinstance(exc, OSError):
            raise P2UError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Iterable[bytes]) -> None:
    with AtomicFile(path) as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            for part in data:
                f.write(part)


class StageWriter:
    """Builds one stage file: ``add(entry, data)`` per entry, then ``finish()``.

    Payload parts are spooled to a temporary file so huge stages never sit in memory twice.
    """

    def __init__(self, path: str | os.PathLike, package_id: str, stage: int, **extra: Any):
        self.path = Path(path)
        self.package_id = package_id
        self.stage = stage
        self.extra = extra
        self.entries: list[dict[str, Any]] = []
        self._spool = tempfile.TemporaryFile(dir=self.path.parent)
        self._hash = hashlib.sha256()
        self._size = 0

    def add(self, entry: dict[str, Any], data: bytes) -> None:
        e = dict(entry)
        e["offset"] = self._size  # relative for now; made absolute in finish()
        e["length"] = len(data)
        self.entries.append(e)
        self._spool.write(data)
        self._hash.update(data)
        self._size += len(data)

    def _header(self, start: int) -> bytes:
        entries = [dict(e, location=self.path.name, offset=e["offset"] + start)
                   for e in self.entries]
        head = {
            "format_version": FORMAT_VERSION,
            "package_id": self.package_id,
            "stage": self.stage,
            **self.extra,
            "payload_size": self._size,
            "payload_sha256": self._hash.hexdigest(),
            "entries": entries,
        }
        return json.dumps(head, separators=(",", ":")).encode()

    def finish(self) -> tuple[int, str]:
        """Write the file atomically; returns its size in bytes and its sha256."""
        start = ALIGN
        while True:
            head = self._header(start)
            if _PREFIX.size + len(head) <= start:
                break
            start = -(-(_PREFIX.size + len(head)) // ALIGN) * ALIGN
        head = head.ljust(start - _PREFIX.size, b" ")
        self._spool.seek(0)
        digest = hashlib.sha256()
        with AtomicFile(self.path) as f:
            for block in (_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head):
                f.write(block)
                digest.update(block)
            while block := self._spool.read(1 << 22):
                f.write(block)
                digest.update(block)
        self._spool.close()
        return start + self._size, digest.hexdigest()


class StageFile:
    """A parsed, checked stage file. ``data(entry)`` returns an entry's bytes (zero-copy)."""

    def __init__(self, buf, header: dict[str, Any], name: str):
        self._buf = memoryview(buf)
        self.header = header
        self.name = name

    @property
    def stage(self) -> int:
        return int(self.header["stage"])

    @property
    def package_id(self) -> str:
        return str(self.header["package_id"])

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.header["entries"]

    def data(self, entry: dict[str, Any]) -> memoryview:
        return self._buf[entry["offset"]: entry["offset"] + entry["length"]]

    def __len__(self) -> int:
        return len(self._buf)


def read_stage(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    *,
    package_id: str | None = None,
    stage: int | None = None,
    sha256: str | None = None,
    verify_payload: bool = True,
) -> StageFile:
    """Parse and check a stage file given as a path or bytes.

    Raises :class:`IntegrityError` when the bytes are truncated, corrupt (payload digest), belong
    to another package (``package_id``) or are not the expected ``stage``; :class:`FormatError`
    when the file is not a stage file at all or of an unknown version.
    """
    in_memory = isinstance(source, (bytes, bytearray, memoryview))
    if in_memory:
        buf, name = memoryview(source), "<bytes>"
    else:
        name = str(source)
        try:
            with open(source, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) \
                    if size else memoryview(b"")
        except OSError as e:
            raise FormatError(f"cannot read stage file {name}: {e.strerror or e}") from e
    label = f"stage file {Path(name).name}"
    # a path is hashed by reading it: through the mapping, every page would stay resident
    if sha256 is not None and (hashlib.sha256(buf).hexdigest() if in_memory else
                               sha256_file(name)) != sha256:
        raise IntegrityError(f"{label}: sha256 does not match the manifest (corrupt or altered)")
    if len(buf) < _PREFIX.size:
        raise IntegrityError(f"{label}: truncated ({len(buf)} bytes)")
    magic, version, hlen = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FormatError(f"{label}: not a p2u stage file (bad magic)")
    if version != FORMAT_VERSION:
        raise FormatError(f"{label}: format version {version}, this reader knows {FORMAT_VERSION}")
    if hlen > MAX_HEADER:
        raise FormatError(f"{label}: header of {hlen} bytes exceeds the {MAX_HEADER} limit")
    start = _PREFIX.size + hlen
    if len(buf) < start:
        raise IntegrityError(f"{label}: truncated inside its header")
    try:
        header = json.loads(bytes(buf[_PREFIX.size:start]))
        entries = header["entries"]
        payload_size = int(header["payload_size"])
        int(header["stage"])
        str(header["package_id"])
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{label}: header is not valid ({e})") from e
    if len(buf) != start + payload_size:
        what = "truncated" if len(buf) < start + payload_size else "has trailing bytes"
        raise IntegrityError(
            f"{label}: {what} ({len(buf)} bytes, header promises {start + payload_size})")
    pos = start
    for e in entries:
        if not isinstance(e, dict) or e.get("offset") != pos or int(e.get("length", -1)) < 0:
            raise FormatError(f"{label}: entries do not tile the payload")
        pos += e["length"]
    if pos != len(buf):
        raise FormatError(f"{label}: entries do not cover the payload")
    if package_id is not None and header["package_id"] != package_id:
        raise IntegrityError(
            f"{label}: belongs to package {header['package_id'][:12]}, "
            f"not {package_id[:12]} (foreign stage file)")
    if stage is not None and header["stage"] != stage:
        raise IntegrityError(
            f"{label}: holds stage {header['stage']}, expected stage {stage} (out of order)")
    if verify_payload and sha256 is None:
        if hashlib.sha256(buf[start:]).hexdigest() != header.get("payload_sha256"):
            raise IntegrityError(f"{label}: payload digest mismatch (corrupt)")
    return StageFile(buf, header, name)


def load_manifest(package: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``manifest.json`` of a package directory."""
    path = Path(package) / MANIFEST_NAME
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"{package}: not a p2u package (no {MANIFEST_NAME})") from None
    except NotADirectoryError:
        raise FormatError(f"{package}: not a p2u package (a file; a package is the directory "
                          f"that holds {MANIFEST_NAME} and the stage files)") from None
    except OSError as e:
        raise FormatError(f"cannot read {path}: {e.strerror or e}") from e
    return parse_manifest(text, str(path))


def parse_manifest(text: bytes, where: str = MANIFEST_NAME) -> dict[str, Any]:
    try:
        m = json.loads(text)
    except ValueError as e:
        raise FormatError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != "p2u":
        raise FormatError(f"{where}: not a p2u manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{where}: format version {m.get('format_version')}, this reader knows "
            f"{FORMAT_VERSION}")
    for key in ("package_id", "stages", "tensors", "source"):
        if key not in m:
            raise FormatError(f"{where}: missing {key!r}")
    for i, st in enumerate(m["stages"]):
        if st.get("index") != i or not st.get("files"):
            raise FormatError(f"{where}: stage table is malformed at stage {i}")
    return m


def save_manifest(package: str | os.PathLike, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(Path(package) / MANIFEST_NAME,
                       json.dumps(manifest, indent=1).encode() + b"\n")
