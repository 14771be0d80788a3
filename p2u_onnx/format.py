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
Format 2 headers also carry ``manifest_binding`` (:func:`manifest_binding`), the digest of the
manifest they were written for.

Everything read from a package is hostile until checked: :func:`validate_manifest` and
:func:`validate_stage_header` check the type and range of every key a reader uses (one
:class:`FormatError` line naming the key path), :func:`check_name` / :func:`package_file` /
:func:`open_regular` turn names into paths and open them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
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
    "parse_manifest",
    "validate_manifest",
    "validate_stage_header",
    "manifest_binding",
    "check_binding",
    "READABLE_VERSIONS",
    "UPDATE_FORMAT_VERSION",
    "is_update",
    "check_predecessor",
    "describe_predecessor",
]

# 2: stage headers carry "manifest_binding" (see manifest_binding); version 1 is still read
# 3: an update package (manifest key "predecessor"): a reader of versions 1-2 refuses it by its
#    version number instead of misreading it as a full package (docs/updates-format.md)
# 4: a full package whose graph.onnx may be coded against base.onnx ("zstd-ref") and whose
#    probe outputs may be stored as integers on a grid finer than their tolerance ("step")
# 5: a full package whose refine and exact entries may use the "int-ctx" codec (context
#    groups with compact framing; refine codes by the current value's distance from zero)
FORMAT_VERSION = 5
UPDATE_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3, 4, 5)
MAGIC = b"P2USTAGE"
MANIFEST_NAME = "manifest.json"
ALIGN = 64
MAX_HEADER = 64 << 20
MAX_MANIFEST = 64 << 20  # bytes of manifest.json a reader accepts
MAX_SIZE = 1 << 40  # any size, offset, length or element count a package declares
MAX_DEPTH = 32  # nesting of JSON arrays and objects in a manifest or stage header
MAX_JSON_ITEMS = 4 << 20  # values in one (a stage header of a 7B model has about 1.5M)
MANIFEST_LIMIT_ENV = "P2U_MAX_MANIFEST"  # lowers both on a small device: json_limits()
MAX_RANK = 32  # dimensions of a tensor
MAX_STAGES = 1024
MAX_EXTRA_PADDING = 1 << 22  # values of block padding beyond twice a tensor's own, in total
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
    with open_regular(path) as f:
        while block := f.read(chunk):
            with in_turn(pace):
                h.update(block)
    return h.hexdigest()


def check_file_entry(path: str | os.PathLike, entry: dict[str, Any], *,
                     digest: bool = True) -> Path:
    """Check that ``path`` is there with the size and (with ``digest``) the sha256 that its
    manifest entry ``entry`` lists; returns it as a :class:`~pathlib.Path`. A symbolic link,
    FIFO or device is refused (:class:`IntegrityError`) without being opened."""
    path = package_file(Path(path).parent, Path(path).name)
    try:
        size = os.lstat(path).st_size
    except OSError:
        raise IntegrityError(f"{path}: missing from the package") from None
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
    hash_in_turns(h, data, chunk, pace)
    return h.hexdigest()


def hash_in_turns(h: Any, data: bytes | bytearray | memoryview, chunk: int,
                  pace: Pace | None = None) -> None:
    """``h.update(data)``, ``chunk`` bytes per ``pace()`` turn."""
    view = memoryview(data).cast("B")
    for i in range(0, len(view), chunk):
        with in_turn(pace):
            h.update(view[i:i + chunk])


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

    def __init__(self, path: str | os.PathLike, package_id: str, stage: int, *,
                 version: int = FORMAT_VERSION, **extra: Any):
        self.path = Path(path)
        self.version = version
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
        # (format 3, updates: no "location", which can only name this file anyway; a small
        # update pays for every byte of its headers)
        loc = {} if self.version == UPDATE_FORMAT_VERSION else {"location": self.path.name}
        entries = [dict(e, **loc, offset=e["offset"] + start) for e in self.entries]
        head = {
            "format_version": self.version,
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
            for block in (_PREFIX.pack(MAGIC, self.version, len(head)), head):
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
    manifest: dict[str, Any] | None = None,
) -> StageFile:
    """Parse and check a stage file given as a path or bytes.

    Raises :class:`IntegrityError` when the bytes are truncated, corrupt (payload digest), belong
    to another package (``package_id``), are not the expected ``stage`` or (with ``manifest``)
    name another manifest (:func:`check_binding`); :class:`FormatError` when the file is not a
    stage file at all, of an unknown version, or its header is malformed
    (:func:`validate_stage_header`). A path is opened with :func:`open_regular`.
    """
    in_memory = isinstance(source, (bytes, bytearray, memoryview))
    if in_memory:
        buf, name = memoryview(source), "<bytes>"  # type: ignore[arg-type]
    else:
        name = str(source)
        try:
            with open_regular(source) as f:
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
    if version not in READABLE_VERSIONS:
        raise FormatError(f"{label}: format version {version}, this reader knows "
                          f"{_known_versions()}")
    if hlen > MAX_HEADER:
        raise FormatError(f"{label}: header of {hlen} bytes exceeds the {MAX_HEADER} limit")
    start = _PREFIX.size + hlen
    if len(buf) < start:
        raise IntegrityError(f"{label}: truncated inside its header")
    header = _load_json(bytes(buf[_PREFIX.size:start]), f"{label}: header")
    validate_stage_header(header, version, label)
    payload_size = header["payload_size"]
    if len(buf) != start + payload_size:
        what = "truncated" if len(buf) < start + payload_size else "has trailing bytes"
        raise IntegrityError(
            f"{label}: {what} ({len(buf)} bytes, header promises {start + payload_size})")
    pos = start
    for e in header["entries"]:
        if e["offset"] != pos:
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
    if manifest is not None:
        check_binding(header, manifest, label)
    if verify_payload and sha256 is None:
        if hashlib.sha256(buf[start:]).hexdigest() != header.get("payload_sha256"):
            raise IntegrityError(f"{label}: payload digest mismatch (corrupt)")
    return StageFile(buf, header, name)


def json_limits() -> tuple[int, int]:
    """The largest ``manifest.json`` (bytes) and the most values in one JSON document (a
    manifest or a stage header) this process accepts: :data:`MAX_MANIFEST` and
    :data:`MAX_JSON_ITEMS`, or less where ``$P2U_MAX_MANIFEST`` says so (bytes, or with a
    ``KiB``/``MiB`` suffix; it only lowers them), and then at most one value per 16 bytes of
    it. A hostile but well-formed manifest (``[{"a":{},"b":{}},...]``) took 771 MiB to parse
    at the defaults, 49 MiB at ``P2U_MAX_MANIFEST=4MiB``: a small board sets it."""
    text = os.environ.get(MANIFEST_LIMIT_ENV, "").strip()
    if not text:
        return MAX_MANIFEST, MAX_JSON_ITEMS
    m = re.fullmatch(r"(\d{1,12})\s*(KiB|MiB|)", text)
    if m is None or int(m.group(1)) == 0:
        raise P2UError(f"{MANIFEST_LIMIT_ENV}={text[:40]!r} is not a size: write e.g. 4MiB, "
                       "512KiB or 4194304 (bytes)")
    limit = int(m.group(1)) << {"": 0, "KiB": 10, "MiB": 20}[m.group(2)]
    limit = min(limit, MAX_MANIFEST)
    return limit, min(MAX_JSON_ITEMS, max(1, limit // 16))


def _over(limit: int) -> str:
    """Names the knob in a refusal when it set ``limit``."""
    return f" ({MANIFEST_LIMIT_ENV})" if limit < MAX_MANIFEST else ""


def read_manifest_bytes(package: str | os.PathLike) -> bytes:
    """The exact bytes of ``package/manifest.json`` (a regular file, at most 64 MiB), not yet
    parsed: what a pin is checked against."""
    path = Path(package) / MANIFEST_NAME
    limit = json_limits()[0]
    try:
        with open_regular(path) as f:
            text = f.read(limit + 1)
    except FileNotFoundError:
        raise FormatError(f"{package}: not a p2u package (no {MANIFEST_NAME})") from None
    except NotADirectoryError:
        raise FormatError(f"{package}: not a p2u package (a file; a package is the directory "
                          f"that holds {MANIFEST_NAME} and the stage files)") from None
    except OSError as e:
        raise FormatError(f"cannot read {path}: {e.strerror or e}") from e
    if len(text) > limit:
        raise FormatError(f"{path}: manifest larger than {limit} bytes{_over(limit)} (refused)")
    return text


def load_manifest(package: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``manifest.json`` of a package directory (at most 64 MiB, a regular
    file, validated by :func:`validate_manifest`)."""
    return parse_manifest(read_manifest_bytes(package), str(Path(package) / MANIFEST_NAME))


def parse_manifest(text: bytes, where: str = MANIFEST_NAME) -> dict[str, Any]:
    """The manifest in ``text`` (JSON), checked by :func:`validate_manifest`; :class:`FormatError`
    naming the first problem otherwise."""
    limit = json_limits()[0]
    if len(text) > limit:
        raise FormatError(f"{where}: larger than the {limit / (1 << 20):g} MiB a manifest may "
                          f"be{_over(limit)}")
    m = _load_json(text, where)
    validate_manifest(m, where)
    return m


# ---------------------------------------------------------------- validation

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PACKAGE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# onnx code types -> bits per element (see reconstruct._CODE_TYPES)
_CODE_BITS = {2: 8, 3: 8, 21: 4, 22: 4, 25: 2, 26: 2}
# float weight dtypes -> (bytes per element, bytes per scale)
_DTYPES = {"float32": (4, 4), "float16": (2, 2), "bfloat16": (2, 4), "float64": (8, 4)}
_LAYOUTS = ("tensor", "channel", "block")
_ENTRY_KINDS = ("file", "refine", "exact")
_CODECS = {"zstd": {"level"}, "int-planes": {"level"}, "int-groups": {"level"},
           "int-ctx": {"level"}, "segments": {"level", "segments"}, "zstd-ref": {"level", "ref"}}
_SEGMENT_KINDS = ("symbols", "bytes", "planes2", "planes4")


def _member(v: Any, table: Any) -> bool:
    """``v in table`` for any JSON value (a list or an object is never a key)."""
    return isinstance(v, (str, int, float)) and v in table


def _known_versions() -> str:
    return " and ".join(map(str, READABLE_VERSIONS))


def _load_json(text: bytes, where: str) -> Any:
    """``json.loads`` with every failure (bad syntax, bad UTF-8, nesting too deep for the
    parser, absurd numbers) as one :class:`FormatError` line; then the nesting is capped.
    Before parsing, the number of values (commas, an upper bound) is capped too, which bounds
    the memory the parsed objects take (a few hundred MB at worst for 64 MiB of JSON)."""
    items = json_limits()[1]
    if text.count(b",") > items:
        raise FormatError(f"{where}: more than {items} JSON values{_over(items << 4)}")
    try:
        value = json.loads(text)
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply") from None
    except (ValueError, TypeError) as e:
        raise FormatError(f"{where}: not valid JSON ({_one_line(e)})") from None
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FormatError(f"{where}: JSON nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return value


def _one_line(e: object) -> str:
    return " ".join(str(e).split())[:300]


def _show(v: Any) -> str:
    if isinstance(v, (list, dict)) and len(v) > 8:
        return f"a {type(v).__name__} of {len(v)} items"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Type and range checks that raise one :class:`FormatError` line naming the key path."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, problem: str) -> FormatError:
        return FormatError(f"{self.where}: {path} {problem}")

    def get(self, d: dict, key: str, path: str, default: Any = KeyError) -> Any:
        if key in d:
            return d[key]
        if default is KeyError:
            raise self.fail(f"{path}.{key}" if path else key, "is missing")
        return default

    def dict(self, v: Any, path: str) -> dict:
        if not isinstance(v, dict):
            raise self.fail(path, f"is {_show(v)}, not an object")
        return v

    def list(self, v: Any, path: str, max_len: int = MAX_SIZE) -> list:
        if not isinstance(v, list):
            raise self.fail(path, f"is {_show(v)}, not a list")
        if len(v) > max_len:
            raise self.fail(path, f"has {len(v)} items, more than {max_len}")
        return v

    def int(self, v: Any, path: str, lo: int = 0, hi: int = MAX_SIZE) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(path, f"is {_show(v)}, not an integer")
        if not lo <= v <= hi:
            raise self.fail(path, f"is {v}, outside {lo}..{hi}")
        return v

    def num(self, v: Any, path: str, none: bool = False) -> None:
        if v is None and none:
            return
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise self.fail(path, f"is {_show(v)}, not a number")

    def str(self, v: Any, path: str, max_len: int = 4096) -> str:
        if not isinstance(v, str):
            raise self.fail(path, f"is {_show(v)}, not a string")
        if len(v) > max_len:
            raise self.fail(path, f"is a string of {len(v)} characters, more than {max_len}")
        if _CONTROL.search(v):  # names and notes end up in messages and on terminals
            raise self.fail(path, f"is {_show(v)}, which holds control characters")
        return v

    def hex64(self, v: Any, path: str) -> str:
        if not isinstance(v, str) or not _HEX64.fullmatch(v):
            raise self.fail(path, f"is {_show(v)}, not a sha256 (64 hex digits)")
        return v

    def bool(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(path, f"is {_show(v)}, not true or false")
        return v

    def name(self, v: Any, path: str) -> str:
        try:
            return check_name(v, path)
        except FormatError as e:
            raise FormatError(f"{self.where}: {e}") from None

    def span(self, v: Any, path: str, limit: int, limit_name: str) -> tuple[int, int]:
        """``[offset, length]`` inside a file of ``limit`` bytes."""
        self.list(v, path)
        if len(v) != 2:
            raise self.fail(path, f"is {_show(v)}, not [offset, length]")
        off = self.int(v[0], f"{path}[0]")
        length = self.int(v[1], f"{path}[1]")
        if off + length > limit:
            raise self.fail(path, f"is [{off}, {length}], past the end of {limit_name} "
                                  f"({limit} bytes)")
        return off, length


def validate_manifest(m: Any, where: str = MANIFEST_NAME) -> None:
    """Check the type and range of every key a reader uses; :class:`FormatError` naming the key
    path (``manifest.json: tensors[3].layout.axis is 7, the tensor has 2 axes``) otherwise.

    Beyond types: every file name passes :func:`check_name`; sizes, offsets, lengths and
    element counts are below 2**40; each tensor's base spans lie inside ``base.bin`` (its size
    as listed) and hold exactly the bytes its shape, layout and code type need; its ``weights``
    span holds exactly its values and overlaps no other; tensor names are unique.
    """
    c = _Checker(where)
    if not isinstance(m, dict) or m.get("format") != "p2u":
        raise FormatError(f"{where}: not a p2u manifest")
    version = m.get("format_version")
    if not _member(version, READABLE_VERSIONS) or isinstance(version, bool):
        raise FormatError(f"{where}: format version {_show(version)}, this reader knows "
                          f"{_known_versions()}")
    pid = c.get(m, "package_id", "")
    if not isinstance(pid, str) or not _PACKAGE_ID.fullmatch(pid):
        raise c.fail("package_id", f"is {_show(pid)}, not a package id")
    update = version == UPDATE_FORMAT_VERSION
    if update:
        _predecessor(c, c.dict(c.get(m, "predecessor", ""), "predecessor"))
    elif "predecessor" in m:
        raise c.fail("predecessor", f"is only valid in an update package (format version "
                                    f"{UPDATE_FORMAT_VERSION}), this one says {version}")
    src = c.dict(c.get(m, "source", ""), "source")
    c.hex64(c.get(src, "weights_sha256", "source"), "source.weights_sha256")
    c.str(c.get(src, "name", "source"), "source.name")
    c.int(c.get(src, "weight_bytes", "source"), "source.weight_bytes")
    for key in ("opset", "coded_weight_bytes", "coded_fp32_bytes", "coded_tensors",
                "fp32_equivalent_bytes"):
        if key in src:
            c.int(src[key], f"source.{key}")
    if "name" in m:
        c.str(m["name"], "name", 200)
    if "version" in m:
        c.int(m["version"], "version", 0, 2**63 - 1)
    if "config" in m:
        c.dict(m["config"], "config")
    if m.get("allocation") is not None:
        alloc = c.dict(m["allocation"], "allocation")
        c.bool(c.get(alloc, "calibrated", "allocation"), "allocation.calibrated")
        c.num(c.get(alloc, "est_quality", "allocation"), "allocation.est_quality")
    if "notes" in m:
        for i, note in enumerate(c.list(m["notes"], "notes", 1000)):
            c.str(note, f"notes[{i}]", 10000)
    stages = c.list(c.get(m, "stages", ""), "stages", MAX_STAGES)
    if not stages:
        raise c.fail("stages", "is empty (a package has at least stage 0)")
    plan = c.list(c.get(m, "plan", ""), "plan", MAX_STAGES)
    if len(plan) != len(stages):
        raise c.fail("plan", f"has {len(plan)} stages, the stage table {len(stages)}")
    for i, bits in enumerate(plan):
        if not (isinstance(bits, str) and (bits == "lossless" or bits.isdigit() and
                                           0 < int(bits) <= 64)):
            raise c.fail(f"plan[{i}]", f"is {_show(bits)}, not a bit count or 'lossless'")
    for i, st in enumerate(stages):
        p = f"stages[{i}]"
        c.dict(st, p)
        if c.get(st, "index", p) != i or isinstance(st["index"], bool):
            raise c.fail(f"{p}.index", f"is {_show(st['index'])}, expected {i}")
        files = c.list(c.get(st, "files", p), f"{p}.files", 16)
        if not files:
            raise c.fail(f"{p}.files", "is empty")
        for j, f in enumerate(files):
            _file_entry(c, f, f"{p}.files[{j}]")
        for key in ("bytes", "cumulative_bytes"):
            c.int(c.get(st, key, p), f"{p}.{key}")
        for key in ("max_abs_error", "max_rel_error"):
            c.num(c.get(st, key, p), f"{p}.{key}")
    base = c.dict(c.get(m, "base_model", ""), "base_model")
    if "opset" in base:
        c.int(base["opset"], "base_model.opset", 1, 1000)
    base_files: dict[str, int] = {}
    for j, f in enumerate(c.list(c.get(base, "files", "base_model"), "base_model.files", 16)):
        _file_entry(c, f, f"base_model.files[{j}]")
        base_files[f["path"]] = f["size"]
        if "reference" in f:  # an update's skeleton coded against the one the device holds
            if not (update and f["path"] == "graph.onnx"):
                raise c.fail(f"base_model.files[{j}].reference", "is allowed only on an "
                                                                 "update's graph.onnx")
            c.hex64(f["reference"], f"base_model.files[{j}].reference")
    # an update has no runnable base: stage 0 carries base.bin (codes) and graph.onnx
    for name in ("base.bin", "graph.onnx") if update else ("base.onnx", "base.bin"):
        if name not in base_files:
            raise c.fail("base_model.files", f"does not list {name}")
    if update and "base.onnx" in base_files:
        raise c.fail("base_model.files", "lists base.onnx: an update package has no base model")
    _tensors(c, c.list(c.get(m, "tensors", ""), "tensors", 1 << 20), base_files["base.bin"],
             update)
    if m.get("probe") is not None:
        _probe_entry(c, c.dict(m["probe"], "probe"), len(stages))


def _file_entry(c: _Checker, f: Any, p: str) -> None:
    c.dict(f, p)
    c.name(c.get(f, "path", p), f"{p}.path")
    c.int(c.get(f, "size", p), f"{p}.size")
    c.hex64(c.get(f, "sha256", p), f"{p}.sha256")


_PREDECESSOR_KEYS = ("weights_sha256", "package_id", "stage", "name", "version")
_UPDATE_KINDS = ("same", "delta", "new")


def is_update(manifest: dict[str, Any]) -> bool:
    """Whether a (validated) manifest is an update package's: it applies to a predecessor."""
    return manifest.get("format_version") == UPDATE_FORMAT_VERSION


def describe_predecessor(pred: dict[str, Any]) -> str:
    """A validated ``predecessor`` binding in words, for messages."""
    who = f"{pred['name']} v{pred.get('version')} " if "name" in pred else ""
    if "weights_sha256" in pred:
        return f"{who}exact model (weights {pred['weights_sha256'][:12]})"
    return f"{who}package {pred['package_id'][:12]} at stage {pred['stage']}"


def describe_state(weights_sha256: str | None, package_id: str | None, stage: int | None,
                   label: str = "the model held") -> str:
    if weights_sha256 is not None:
        return f"{label} (exact model, weights {weights_sha256[:12]})"
    return f"{label} (package {str(package_id)[:12]} at stage {stage})"


def check_predecessor(manifest: dict[str, Any], weights_sha256: str | None,
                      package_id: str | None, stage: int | None, where: str = "update",
                      label: str = "the model held") -> None:
    """:class:`IntegrityError` (one line naming both states) unless the state a device holds
    (the digest of its exact weights, or None for a lossy stage; the package and stage it came
    from) is the one the update ``manifest`` is bound to (its ``predecessor``)."""
    pred = manifest.get("predecessor")
    if pred is None:
        raise P2UError(f"{where} is a full package, not an update")
    if "weights_sha256" in pred:
        ok = weights_sha256 is not None and weights_sha256 == pred["weights_sha256"]
    else:
        ok = package_id == pred["package_id"] and stage == pred["stage"]
    if not ok:
        raise IntegrityError(f"{where} applies to {describe_predecessor(pred)}, not to "
                             f"{describe_state(weights_sha256, package_id, stage, label)}")


def check_update_stage0(stage_file: StageFile, label: str = "stage 0 of the update") -> None:
    """:class:`FormatError` unless an update's stage 0 holds exactly its two files,
    ``base.bin`` and ``graph.onnx`` (nothing is decoded from anything else in it)."""
    names = sorted(str(e.get("name")) for e in stage_file.entries)
    if names != ["base.bin", "graph.onnx"] or any(e["kind"] != "file"
                                                  for e in stage_file.entries):
        raise FormatError(f"{label} holds {names[:4]}; it holds base.bin and graph.onnx only")


def _predecessor(c: _Checker, pred: dict) -> None:
    """An update's binding: the exact model (``weights_sha256``) or stage ``stage`` of package
    ``package_id``; ``name`` and ``version`` only label it. Unknown keys are refused: a binding
    a reader half understands would bind to nothing."""
    for key in pred:
        if key not in _PREDECESSOR_KEYS:
            raise c.fail(f"predecessor.{_show(key)}", f"is not a known key (known: "
                                                      f"{', '.join(_PREDECESSOR_KEYS)})")
    if "weights_sha256" in pred:
        c.hex64(pred["weights_sha256"], "predecessor.weights_sha256")
        if "stage" in pred:
            raise c.fail("predecessor.stage", "is given with weights_sha256 (an exact "
                                              "predecessor has no stage)")
    elif "stage" not in pred or "package_id" not in pred:
        raise c.fail("predecessor", "names neither weights_sha256 (the exact model) nor "
                                    "package_id and stage (a lossy stage of a package)")
    if "package_id" in pred:
        p = pred["package_id"]
        if not isinstance(p, str) or not _PACKAGE_ID.fullmatch(p):
            raise c.fail("predecessor.package_id", f"is {_show(p)}, not a package id")
    if "stage" in pred:
        c.int(pred["stage"], "predecessor.stage", 0, MAX_STAGES - 1)
    if "name" in pred:
        c.str(pred["name"], "predecessor.name", 200)
    if "version" in pred:
        c.int(pred["version"], "predecessor.version", 0, 2**63 - 1)


def _tensors(c: _Checker, tensors: list, base_bin: int, update: bool = False) -> None:
    names: set[str] = set()
    extra = 0
    spans: list[tuple[int, int, str]] = []
    base_spans: list[tuple[int, int, str]] = []
    for i, t in enumerate(tensors):
        p = f"tensors[{i}]"
        c.dict(t, p)
        name = c.str(c.get(t, "name", p), f"{p}.name")
        if name in names:
            raise c.fail(f"{p}.name", f"{name!r} is listed twice")
        names.add(name)
        c.str(c.get(t, "tensor", p), f"{p}.tensor")
        if "where" in t:
            c.str(t["where"], f"{p}.where")
        if c.get(t, "kind", p) not in ("initializer", "constant"):
            raise c.fail(f"{p}.kind", f"is {_show(t['kind'])}, not 'initializer' or 'constant'")
        dtype = c.get(t, "dtype", p)
        if not _member(dtype, _DTYPES):
            raise c.fail(f"{p}.dtype", f"is {_show(dtype)}, not one of {', '.join(_DTYPES)}")
        item, scale_item = _DTYPES[dtype]
        shape = c.list(c.get(t, "shape", p), f"{p}.shape", MAX_RANK)
        size = 1
        for k, d in enumerate(shape):
            size *= c.int(d, f"{p}.shape[{k}]")
            if size > MAX_SIZE:
                raise c.fail(f"{p}.shape", f"{shape} holds more than 2**40 values")
        n_blocks, padded = _layout(c, c.dict(c.get(t, "layout", p), f"{p}.layout"), shape,
                                   size, f"{p}.layout")
        # decoding holds whole blocks: padding beyond twice the values is paid for by no byte
        # of base.bin (blocks of 65536 over one value each), so the package has little of it
        extra += max(0, padded - 2 * size)
        if extra > MAX_EXTRA_PADDING:
            raise c.fail(f"{p}.layout", f"brings the blocks' padding past the "
                                        f"{MAX_EXTRA_PADDING} values a package may have")
        kind = c.get(t, "update", p) if update else None
        if update and not _member(kind, _UPDATE_KINDS):
            raise c.fail(f"{p}.update", f"is {_show(kind)}, not one of {', '.join(_UPDATE_KINDS)}")
        if not update and "update" in t:
            raise c.fail(f"{p}.update", "is only valid in an update package")
        if "symmetric" in t:
            c.bool(t["symmetric"], f"{p}.symmetric")
        if "est_error" in t:
            c.num(t["est_error"], f"{p}.est_error", none=True)
        if kind == "same":  # the predecessor's value, bit for bit: nothing in base.bin
            for key in ("base", "bits"):
                if key in t:
                    raise c.fail(f"{p}.{key}", "is given for an unchanged tensor (update "
                                               "'same' has no codes)")
        else:
            c.int(c.get(t, "bits", p), f"{p}.bits", 1, 16)
        b = {} if kind == "same" else c.dict(c.get(t, "base", p), f"{p}.base")
        if kind == "same":
            pass
        elif "kind" in b and update:
            raise c.fail(f"{p}.base.kind", "is given in an update package (no palettes)")
        elif "kind" in b:  # a palette tensor: indices and values, no scales (see palette.py)
            from .palette import check_tensor_base

            try:
                check_tensor_base(t, base_bin)
            except FormatError as e:
                raise c.fail(f"{p}.base", f"is not valid ({e})") from None
            base_spans += [(b[k][0], b[k][0] + b[k][1], f"{p}.base.{k}")
                           for k in ("codes", "palette")]
        else:
            _base_spans(c, b, size, n_blocks, scale_item, base_bin, p, base_spans)
        off, length = c.span(c.get(t, "weights", p), f"{p}.weights", MAX_SIZE, "2**40")
        if length != size * item:
            raise c.fail(f"{p}.weights", f"holds {length} bytes, a {dtype} tensor of shape "
                                         f"{shape} has {size * item}")
        spans.append((off, off + length, p))
    # base spans are disjoint: what the tensors declare is bounded by base.bin's size
    base_spans.sort()
    for (_, end, p), (start, _, q) in zip(base_spans, base_spans[1:]):
        if start < end:
            raise c.fail(q, f"overlaps {p}")
    # an update's base.bin holds its tensors' codes only, each aligned: its size is bounded by
    # them too (a full package's also holds the base model's other initializers)
    room = sum(e - s for s, e, _ in base_spans) + ALIGN * len(base_spans)
    if update and base_bin > room:
        raise c.fail("base_model.files", f"lists base.bin of {base_bin} bytes, more than the "
                                         f"{room} its tensors' codes need")
    spans.sort()
    for (_, end, p), (start, _, q) in zip(spans, spans[1:]):
        if start < end:
            raise c.fail(f"{q}.weights", f"overlaps {p}.weights")
    # weights.bin holds the tensors back to back, each aligned: no room for more
    room = sum(e - s for s, e, _ in spans) + ALIGN * len(spans)
    if spans and spans[-1][1] > room:
        raise c.fail(f"{spans[-1][2]}.weights", f"ends at byte {spans[-1][1]} of weights.bin, "
                                                f"past the {room} bytes its tensors need")



def _base_spans(c: _Checker, b: dict, size: int, n_blocks: int, scale_item: int,
                base_bin: int, p: str, base_spans: list[tuple[int, int, str]]) -> None:
    """Check a regular tensor's codes, scale and zero point spans (inside base.bin, exactly as
    long as the shape, layout and code type need) and add them to ``base_spans``."""
    code_type = c.get(b, "code_type", f"{p}.base")
    if not _member(code_type, _CODE_BITS) or isinstance(code_type, bool):
        raise c.fail(f"{p}.base.code_type", f"is {_show(code_type)}, not one of "
                                            f"{sorted(_CODE_BITS)} (onnx integer types)")
    per = 8 // _CODE_BITS[code_type]
    want = {"codes": -(-size // per), "scale": n_blocks * scale_item,
            "zero_point": -(-n_blocks // per)}
    for key, n in want.items():
        v = c.get(b, key, f"{p}.base", None if key == "zero_point" else KeyError)
        if v is None and key == "zero_point":
            continue
        off, length = c.span(v, f"{p}.base.{key}", base_bin, "base.bin")
        if length != n:
            raise c.fail(f"{p}.base.{key}", f"holds {length} bytes, the tensor's shape, "
                                            f"layout and code type need {n}")
        base_spans.append((off, off + length, f"{p}.base.{key}"))


def _layout(c: _Checker, lay: dict, shape: list[int], size: int,
            p: str) -> tuple[int, int]:
    """Checked layout: (number of blocks, values including padding)."""
    mode = c.get(lay, "mode", p)
    if mode not in _LAYOUTS:
        raise c.fail(f"{p}.mode", f"is {_show(mode)}, not one of {', '.join(_LAYOUTS)}")
    axis = c.get(lay, "axis", p)
    block = c.get(lay, "block_size", p)
    c.int(axis, f"{p}.axis", 0, MAX_RANK)
    c.int(block, f"{p}.block_size", 0, 1 << 16)
    if mode == "tensor":
        return 1, max(size, 1)
    if axis >= len(shape):
        raise c.fail(f"{p}.axis", f"is {axis}, the tensor has {len(shape)} axes")
    n = shape[axis]
    if mode == "channel":
        return n, n * max(size // n, 1) if n else 0
    if block < 1:
        raise c.fail(f"{p}.block_size", f"is {block}, a block layout needs 1 or more")
    n_blocks = size // n * -(-n // block) if n else 0
    padded = n_blocks * block
    if padded > 2 * size + (1 << 16):
        raise c.fail(f"{p}.block_size", f"is {block}: blocks of that size along an axis of "
                                        f"{n} would mostly be padding")
    return n_blocks, padded


def _probe_entry(c: _Checker, pr: dict, n_stages: int) -> None:
    c.name(c.get(pr, "path", "probe"), "probe.path")
    c.int(c.get(pr, "size", "probe"), "probe.size", 0, MAX_MANIFEST)
    c.hex64(c.get(pr, "sha256", "probe"), "probe.sha256")
    for key in ("inputs", "outputs"):
        for i, v in enumerate(c.list(c.get(pr, key, "probe"), f"probe.{key}", 4096)):
            c.str(v, f"probe.{key}[{i}]")
    n_out = len(pr["outputs"])
    if "inputs_stored" in pr:
        c.bool(pr["inputs_stored"], "probe.inputs_stored")
    if "int_high" in pr:
        c.int(pr["int_high"], "probe.int_high", 0, 1 << 31)
    if "inputs_sha256" in pr:
        c.hex64(pr["inputs_sha256"], "probe.inputs_sha256")
    for i, v in enumerate(c.list(pr.get("samples", []), "probe.samples", 4096)):
        c.int(v, f"probe.samples[{i}]")
    if "step" in pr:  # format 4: outputs stored as integers on this grid (see p2u_onnx.probe)
        step = c.list(pr["step"], "probe.step", 4096)
        if len(step) != n_out or len(pr.get("samples", [])) != n_out:
            raise c.fail("probe.step", f"has {len(step)} values and probe.samples "
                                       f"{len(pr.get('samples', []))} for {n_out} outputs")
        for j, v in enumerate(step):
            c.num(v, f"probe.step[{j}]")
            if not (math.isfinite(v) and v > 0):
                raise c.fail(f"probe.step[{j}]", f"is {_show(v)}, not a positive number")
    for i, st in enumerate(c.list(c.get(pr, "stages", "probe"), "probe.stages", n_stages)):
        p = f"probe.stages[{i}]"
        c.dict(st, p)
        c.int(c.get(st, "index", p), f"{p}.index", 0, n_stages - 1)
        tol = c.list(c.get(st, "tol", p), f"{p}.tol", 4096)
        if len(tol) != n_out:
            raise c.fail(f"{p}.tol", f"has {len(tol)} values for {n_out} outputs")
        for j, v in enumerate(tol):
            c.num(v, f"{p}.tol[{j}]")
        if "gap" in st:
            c.num(st["gap"], f"{p}.gap", none=True)


def validate_stage_header(header: Any, version: int = FORMAT_VERSION,
                          label: str = "stage file") -> None:
    """Check a stage header's types and ranges (entries: kind, name, codec, offsets, lengths,
    blocks, shift); :class:`FormatError` naming the key path otherwise."""
    c = _Checker(f"{label}: header")
    c.dict(header, "header")
    if c.get(header, "format_version", "") != version:
        raise c.fail("format_version", f"is {_show(header['format_version'])}, the file's "
                                       f"prefix says {version}")
    pid = c.get(header, "package_id", "")
    if not isinstance(pid, str) or not _PACKAGE_ID.fullmatch(pid):
        raise c.fail("package_id", f"is {_show(pid)}, not a package id")
    c.int(c.get(header, "stage", ""), "stage", 0, MAX_STAGES)
    c.int(c.get(header, "payload_size", ""), "payload_size")
    c.hex64(c.get(header, "payload_sha256", ""), "payload_sha256")
    if BINDING_KEY in header:  # required by check_binding for format 2
        c.hex64(c.get(header, BINDING_KEY, ""), BINDING_KEY)
    for i, e in enumerate(c.list(c.get(header, "entries", ""), "entries", 1 << 24)):
        p = f"entries[{i}]"
        c.dict(e, p)
        kind = c.get(e, "kind", p)
        if kind not in _ENTRY_KINDS:
            raise c.fail(f"{p}.kind", f"is {_show(kind)}, not one of {', '.join(_ENTRY_KINDS)}")
        c.str(c.get(e, "name", p), f"{p}.name")
        c.int(c.get(e, "offset", p), f"{p}.offset")
        c.int(c.get(e, "length", p), f"{p}.length")
        if "location" in e:  # this file: an entry never points at another
            c.name(e["location"], f"{p}.location")
            if e["location"] != stage_file_name(header["stage"]):
                raise c.fail(f"{p}.location", f"is {_show(e['location'])}, not this stage "
                                              f"file ({stage_file_name(header['stage'])})")
        _codec(c, c.dict(c.get(e, "codec", p), f"{p}.codec"), f"{p}.codec")
        if e["codec"]["id"] == "zstd-ref":  # format 4: the skeleton graph against base.onnx
            if version < 4 or kind != "file" or e["name"] != "graph.onnx":
                raise c.fail(f"{p}.codec", f"zstd-ref is for graph.onnx in format 4 or later, "
                                           f"not for {_show(e['name'])} in format {version}")
            if c.get(e["codec"], "ref", f"{p}.codec") != "base.onnx":
                raise c.fail(f"{p}.codec.ref", f"is {_show(e['codec']['ref'])}, not base.onnx")
        if e["codec"]["id"] == "int-ctx" and (version < 5 or kind == "file"):  # format 5
            raise c.fail(f"{p}.codec", f"int-ctx is for refine and exact entries in format 5 "
                                       f"or later, not for a {_show(kind)} entry in format "
                                       f"{version}")
        if kind == "file":
            c.name(e["name"], f"{p}.name")
            c.int(c.get(e, "raw_length", p), f"{p}.raw_length")
            c.hex64(c.get(e, "sha256", p), f"{p}.sha256")
        else:
            blocks = c.list(c.get(e, "blocks", p), f"{p}.blocks")
            if len(blocks) != 2:
                raise c.fail(f"{p}.blocks", f"is {_show(blocks)}, not [first, end]")
            b0 = c.int(blocks[0], f"{p}.blocks[0]")
            if c.int(blocks[1], f"{p}.blocks[1]") <= b0:
                raise c.fail(f"{p}.blocks", f"is {blocks}: an empty or reversed run")
            c.int(e.get("shift", 0), f"{p}.shift", 0, 64)


def _codec(c: _Checker, codec: dict, p: str) -> None:
    cid = c.get(codec, "id", p)
    if not _member(cid, _CODECS):
        raise c.fail(f"{p}.id", f"is {_show(cid)}, not one of {', '.join(_CODECS)}")
    if "level" in codec:
        c.int(codec["level"], f"{p}.level", -(1 << 17), 22)
    if cid == "segments":
        for i, s in enumerate(c.list(c.get(codec, "segments", p), f"{p}.segments", 1 << 24)):
            c.list(s, f"{p}.segments[{i}]")
            if len(s) != 3 or s[2] not in _SEGMENT_KINDS:
                raise c.fail(f"{p}.segments[{i}]", f"is {_show(s)}, not [offset, length, kind]")
            c.int(s[0], f"{p}.segments[{i}][0]")
            c.int(s[1], f"{p}.segments[{i}][1]")


# ---------------------------------------------------------------- binding

BINDING_KEY = "manifest_binding"
_UNBOUND = ("stages", "probe", "notes")


def manifest_binding(manifest: dict[str, Any]) -> str:
    """Hex sha256 of the canonical JSON of ``manifest`` without ``stages``, ``probe`` and
    ``notes``: every key decoding depends on (tensor table, base files, plan, config, package
    id, name and version). Format 2 stage headers carry it, so that a manifest changed after
    its stage files were written is refused (:func:`check_binding`)."""
    bound = {k: v for k, v in manifest.items() if k not in _UNBOUND}
    text = json.dumps(bound, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_binding(header: dict[str, Any], manifest: dict[str, Any],
                  label: str = "stage file") -> None:
    """:class:`IntegrityError` unless a stage header belongs to exactly this manifest: its
    format version is the manifest's, and (format 2) its ``manifest_binding`` is
    :func:`manifest_binding` of the manifest. Format 1 headers carry no binding."""
    version = header.get("format_version")
    if version != manifest.get("format_version"):
        raise IntegrityError(f"{label}: format version {version}, the manifest's is "
                             f"{manifest.get('format_version')} (mixed packages)")
    if BINDING_KEY in header or version != 1:
        if header.get(BINDING_KEY) != manifest_binding(manifest):
            raise IntegrityError(f"{label}: was written for another manifest (its "
                                 f"{BINDING_KEY} does not match manifest.json: the tensor "
                                 "table or settings were altered)")


def save_manifest(package: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` (compact JSON, one line: the indented form was a quarter
    larger, 1-2 KB of a small model's package; ``p2u inspect`` shows it readably)."""
    atomic_write_bytes(Path(package) / MANIFEST_NAME,
                       json.dumps(manifest, separators=(",", ":")).encode() + b"\n")
