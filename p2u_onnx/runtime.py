"""Serve a p2u package in onnxruntime and upgrade it stage by stage while it answers.

Device side: needs numpy, onnxruntime and zstandard only (never onnx or the encoder).

:class:`ProgressiveSession` starts on the base (stage 0: ``base.onnx`` + ``base.bin``, loaded by
path, as fast as plain onnxruntime loads it) and moves to stage ``k`` when :meth:`apply` gets the
next stage file, or :meth:`upgrade` reads them from the package. Each stage file is checked
against the manifest before anything changes; after the patch a recorded probe (see
:mod:`p2u_onnx.probe`) must show the new stage, or :class:`PatchError` is raised. On any error
the session keeps serving its last good stage.

Two strategies:

``swap`` (default)
    Stage ``k`` is decoded straight into its own directory of the work dir (``weights.bin`` of
    stage ``k``, hard links of the session's ``graph.onnx`` and its copy of ``base.bin``) and a
    new session is loaded from
    it by path with the caller's options. The reference to the live session is then swapped;
    runs in flight finish on the old session, which is dropped (and its directory deleted) when
    the last of them returns. Every onnxruntime optimization is kept.
``inplace``
    For memory-tight devices. Stage 1 builds one float session with optimizations off and
    prepacking off whose coded weights are handed to it as numpy arrays (``add_initializer``)
    over a read-only mapping of the stage's weights file; each later stage is decoded into a
    file of the work dir, and the mapping is switched to it (one ``mmap`` call, no copy) while
    a writer lock keeps ``run()`` out. Where a file cannot be remapped at a fixed address (not
    64-bit Linux or macOS) the weights are buffers each new file is read into instead. The base
    session runs without onnxruntime's memory arena, so it keeps no dequantized weights cached
    beside stage 1's. Needs the CPU provider; a package whose coded weights
    ``add_initializer`` cannot reach (Constant nodes inside functions, names shared across
    scopes) falls back to ``swap`` (see :attr:`ProgressiveSession.strategy`).

``run()`` is thread-safe; its result comes entirely from one stage. While a stage decodes,
inferences and the decoder take turns (:class:`~p2u_onnx._rwlock.TurnLock`) instead of sharing
the cores: under load the decoder has them at least ``decoder_share`` of the time (default
0.5), in turns of at most ``decoder_turn`` seconds (default 0.25). A turn starts when the runs in
flight have finished and lasts until the decoder had its share: at 0.5, about as long as it
waited for them (one round of runs). A run waits at most for the runs in flight and one turn,
plus the decode job in progress; the session build, one long call, takes the decoder's turns
too.
With no inferences running the decoder decodes at full speed.

Memory: decoding streams from the current stage's ``weights.bin`` to the next one's
(:meth:`~p2u_onnx.reconstruct.WeightState.advance`), so beyond what onnxruntime holds (and the
inplace weights) the runtime keeps at most about one tensor of decoded weights during an upgrade
and none between upgrades. The work dir holds one weights file per live stage (two during an
upgrade); a background thread writes each one back to disk as it is decoded, a few MB at a time
(:mod:`p2u_onnx._writeback`), instead of the kernel's burst 30 s later.

The work dir holds ``base/`` (the base unpacked from ``stage-0.p2u`` when the package has no
usable ``base.onnx``; kept as a cache in a caller's work dir) and one ``session-*`` directory per
session (``graph.onnx``, stage directories, inplace weights files), removed on
:meth:`ProgressiveSession.close`.

A session never writes into, nor links to, a file of the package: it copies ``base.onnx``,
``base.bin`` and each stage file into its own folder, hashes the copy as it writes it, and
loads or maps only the copy (a stage file's copy is unlinked as soon as it is mapped). What was
checked is what is used, and a package file truncated or rewritten meanwhile is either caught
by the hash (a clean :class:`IntegrityError`) or no longer matters, never a SIGBUS. Session
folders are named after their owner process (:mod:`p2u_onnx._workdir`); a new session removes
those of sessions whose process died (killed, crashed, powered off).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import ctypes
import hashlib
import logging
import mmap
import os
import shutil
import stat
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, NoReturn, Protocol

import numpy as np
import onnxruntime as ort

from . import _workdir
from ._base_session import open_base_session
from ._memory import (anonymous_regions, collapse_to_huge_pages, libc, memory_left, new_ranges,
                      trim_heap)
from ._priority import lowered_priority
from ._rwlock import Pace, RWLock, TurnLock, sharing
from ._writeback import Writeback
from .dtypes import FLOAT_TYPES
from .errors import FormatError, IntegrityError, P2UError, PatchError
from .format import (
    StageFile,
    atomic_write_bytes,
    check_file_entry,
    check_name,
    check_predecessor,
    check_update_stage0,
    is_update,
    parse_manifest,
    hash_in_turns,
    read_stage,
    sha256_bytes,
    sha256_file,
)
from .external import (check_base_graph, external_tensors, graph_inputs, graph_size_limit,
                       graph_structure, initializer_names, main_float_types, main_initializers,
                       node_outputs)
from .format import package_file
from .probe import Probe, read_probe_file
from .reconstruct import (WeightState, check_disk_room, check_entries, extract_file,
                          extract_update_files, read_into, weights_layout, weights_size)
from .trust import Policy, TrustSpec, check_signature, read_manifest_bytes, read_signature

__all__ = ["BytesSource", "DirectorySource", "ProgressiveSession", "StageSource", "open_stage",
           "private_copy"]

StageInput = str | os.PathLike | bytes | bytearray | memoryview

CPU = "CPUExecutionProvider"
# Providers that run on host memory, where in-place writes to weight buffers are seen.
_HOST_PROVIDERS = {CPU, "AzureExecutionProvider"}
_BASE_FILES = ("base.onnx", "base.bin")
# Base-session optimizer that blocks the DequantizeLinear->MatMulNBits fusion (``fast_base``).
_BASE_OFF = ("MatMulAddFusion",)
# SessionOptions fields carried over to the inplace float session (it cannot copy the object).
_COPIED_OPTIONS = ("enable_cpu_mem_arena", "enable_mem_pattern", "enable_mem_reuse",
                   "enable_profiling", "execution_mode", "execution_order",
                   "inter_op_num_threads", "intra_op_num_threads", "log_severity_level",
                   "log_verbosity_level", "logid", "profile_file_prefix",
                   "use_deterministic_compute", "use_per_session_threads")
_COPIED_CONFIG = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning",
                  "session.set_denormal_as_zero", "session.intra_op_thread_affinities",
                  "session.use_env_allocators", "session.x64quantprecision",
                  # how the base runs its low-bit weights (see docs/runtime.md, base speed)
                  "session.disable_quant_qdq", "session.qdq_matmulnbits_accuracy_level")


# ---------------------------------------------------------------- sources


class StageSource(Protocol):
    """Where a session gets its package: the manifest, the base, stage files, the probe.

    :class:`DirectorySource` reads a package directory, :class:`BytesSource` starts from the
    manifest and the bytes of ``stage-0.p2u``; a transport can implement the same four members.
    For ``expect=`` / ``trust=`` a source also offers ``manifest_bytes`` (the exact bytes the
    manifest was parsed from) and ``signature_bytes()`` (``manifest.json.sig``, or None).
    """

    manifest: dict[str, Any]

    def base_files(self, workdir: Path) -> tuple[Path, Path]:
        """Checked ``base.onnx`` and ``base.bin``, side by side, ready to load by path."""
        ...

    def fetch(self, stage: int) -> StageInput:
        """Path or bytes of stage file ``stage`` (checked by the session)."""
        ...

    def probe_bytes(self) -> bytes | None:
        """Bytes of the probe file named by ``manifest["probe"]``, or None."""
        ...


def _base_entries(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(f["path"]).name: f for f in manifest["base_model"]["files"]}


def open_stage(source: StageInput, manifest: dict[str, Any], expected: int,
               pace: Pace | None = None, *, digest: str | None = None) -> StageFile:
    """Read stage file ``source`` and check it is stage ``expected`` of ``manifest``'s package.

    The whole file must match the manifest's sha256. When it does not, the error says why:
    truncated, corrupt, foreign (another package), already applied (repeated) or out of order.
    ``pace``: hash in turns (see :func:`~p2u_onnx.format.sha256_file`). ``digest``: the sha256
    of ``source`` when the caller has it (:func:`private_copy` hashes a copy as it writes it).
    A path ``source`` is memory-mapped: give a file no one else can change (see
    :func:`private_copy`).
    """
    stages = manifest["stages"]
    pid = manifest["package_id"]
    want = stages[expected]["files"][0]["sha256"] if 0 <= expected < len(stages) else None
    if digest is not None:
        pass
    elif isinstance(source, (bytes, bytearray, memoryview)):
        digest = sha256_bytes(source, pace=pace)
    else:
        try:
            digest = sha256_file(source, pace=pace)
        except OSError as e:
            raise FormatError(f"cannot read stage file {source}: {e.strerror or e}") from e
    if digest == want:
        return read_stage(source, package_id=pid, stage=expected, verify_payload=False,
                          manifest=manifest)
    _diagnose(source, pid, expected, want, len(stages))


@contextlib.contextmanager
def private_copy(source: StageInput, folder: str | os.PathLike, pace: Pace | None = None,
                 written: Callable[[int, int, int], None] | None = None,
                 limit: int | None = None) -> Iterator[tuple[StageInput, str | None]]:
    """``(what to read, its sha256)`` for a stage file given as a path or bytes.

    A path is copied into a new owner-named folder of ``folder`` (a folder of the caller's own)
    and the copy is hashed as it is written; the block reads and maps only the copy, so what was
    checked is what is decoded, and the source may be changed, truncated or removed meanwhile (a
    mapping of it would die of SIGBUS past a truncation). Afterwards the copy is removed, 4 MB
    at a time at a lowered priority (dropping a 241 MB copy's cached pages at once held
    everything up for 30-37 ms). ``written(fd, offset, length)`` is told of the copy's bytes
    (a session's write-back). ``limit``: copy at most this many bytes and one more (a file
    that goes on is not the stage file; the hash says so). Bytes are given back as they are,
    with no digest.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield source, None
        return
    try:
        d = _workdir.make_dir(folder, "incoming-")
    except OSError as e:
        raise P2UError(f"cannot copy stage file {source} into the work folder {folder}: "
                       f"{e.strerror or e}") from e
    name = Path(source).name
    copy = d / (name if _plain(name) else "stage.p2u")  # its name shows in messages
    try:
        try:
            digest = _copy_hashed(source, copy, pace, written, limit=limit)
        except OSError as e:
            raise P2UError(f"cannot copy stage file {source} into the work folder {d}: "
                           f"{e.strerror or e}") from e
        yield copy, digest
    finally:
        with lowered_priority():
            _remove_gradually(copy)
        _workdir.remove_tree(d)


_COPY_CHUNK = 4 << 20
_HASH_STEP = 1 << 20  # bytes hashed per turn


def _plain(name: str) -> bool:
    try:
        check_name(name)
    except FormatError:
        return False
    return True


def _copy_hashed(source: str | os.PathLike, dest: Path, pace: Pace | None,
                 written: Callable[[int, int, int], None] | None,
                 what: str = "stage file", limit: int | None = None) -> str:
    """Copy the regular file ``source`` (at most ``limit`` + 1 bytes of it) to the new file
    ``dest``; returns the sha256 of what was written. Read and written outside ``pace``
    (either may wait for the disk), hashed in its turns, :data:`_COPY_CHUNK` bytes at a
    time."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        src = os.open(source, flags)
    except OSError as e:
        raise FormatError(f"cannot read {what} {source}: {e.strerror or e}") from e
    h = hashlib.sha256()
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise IntegrityError(f"{source}: not a regular file")
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                      0o600)
        try:
            buf = memoryview(bytearray(_COPY_CHUNK))
            size = 0
            while limit is None or size <= limit:
                want = _COPY_CHUNK if limit is None else min(_COPY_CHUNK, limit + 1 - size)
                try:
                    n = os.readv(src, [buf[:want]])
                except OSError as e:
                    raise FormatError(f"cannot read {what} {source}: {e.strerror or e}") from e
                if not n:
                    break
                hash_in_turns(h, buf[:n], _HASH_STEP, pace)  # 4 MB a turn: up to 18 ms
                pos = 0
                while pos < n:
                    pos += os.pwrite(out, buf[pos:n], size + pos)
                size += n
            if written is not None:
                written(out, 0, size)
        finally:
            os.close(out)
    finally:
        os.close(src)
    return h.hexdigest()


def _diagnose(source: StageInput, pid: str, expected: int, want: str | None,
              n_stages: int) -> NoReturn:
    """Raise the error that says why ``source`` is not stage ``expected`` (its sha256 is not
    the manifest's)."""
    try:
        sf = read_stage(source)
    except IntegrityError:
        raise
    except FormatError as e:
        raise IntegrityError(f"{e} (expected stage {expected} of package {pid[:12]})") from e
    label = f"stage file {Path(sf.name).name}"
    if sf.package_id != pid:
        raise IntegrityError(f"{label} belongs to package {sf.package_id[:12]}, not "
                             f"{pid[:12]} (foreign stage file)")
    if sf.stage < expected:
        raise IntegrityError(f"{label} holds stage {sf.stage}, which is already applied "
                             f"(repeated stage file); the next stage is {expected}")
    if want is None:
        raise IntegrityError(f"{label} holds stage {sf.stage}, but the package has only "
                             f"stages 0..{n_stages - 1}")
    if sf.stage > expected:
        raise IntegrityError(f"{label} holds stage {sf.stage}, expected stage {expected} "
                             "(out of order: apply stages one after another)")
    raise IntegrityError(f"{label}: sha256 does not match the manifest (altered)")


def extract_base(stage0: StageInput, manifest: dict[str, Any], workdir: Path) -> tuple[Path, Path]:
    """Unpack ``base.onnx`` and ``base.bin`` from stage 0 into ``workdir/base`` (a cache)."""
    d = Path(workdir) / "base"
    entries = _base_entries(manifest)
    paths = tuple(d / n for n in _BASE_FILES)
    try:
        for p in paths:
            check_file_entry(p, entries[p.name])
        return paths  # type: ignore[return-value]
    except (OSError, IntegrityError):
        pass
    d.mkdir(parents=True, exist_ok=True)
    _workdir.sweep(d, "incoming-")  # copies left by processes that died
    with private_copy(stage0, d, limit=_largest_stage(manifest)) as (source, digest):
        sf = open_stage(source, manifest, 0, digest=digest)
        sizes = {p.name: entries[p.name]["size"] for p in paths}
        check_entries(sf, sizes)  # every file bounded before anything is decoded
        check_disk_room("the base files inside stage 0", sum(sizes.values()), d)
        for p in paths:
            atomic_write_bytes(p, extract_file(sf, p.name, size=sizes[p.name],
                                               sha256=entries[p.name]["sha256"]))
        del sf
    return paths  # type: ignore[return-value]


class DirectorySource:
    """A package directory (``manifest.json``, ``stage-*.p2u``, optionally ``base.*``).

    ``policy`` (a :class:`~p2u_onnx.trust.Policy`): the manifest's pin is checked before it is
    parsed, its signature after; versions are the session's business.
    """

    def __init__(self, path: str | os.PathLike, *, policy: Policy | None = None):
        self.path = Path(path)
        self.manifest_bytes = read_manifest_bytes(self.path)
        self.manifest = (policy or Policy()).admit(
            self.manifest_bytes, str(self.path / "manifest.json"), self.signature_bytes)

    def signature_bytes(self) -> bytes | None:
        """``manifest.json.sig`` of the package, or None when it is not signed."""
        return read_signature(self.path)

    def base_files(self, workdir: Path, *, digest: bool = True) -> tuple[Path, Path]:
        """The package's base files, checked (sizes only with ``digest=False``: a session
        hashes the copies it makes), or else the base unpacked from stage 0 into ``workdir``.
        """
        entries = _base_entries(self.manifest)
        paths = tuple(package_file(self.path, n) for n in _BASE_FILES)
        if all(p.is_file() for p in paths):
            for p in paths:
                check_file_entry(p, entries[p.name], digest=digest)
            return paths  # type: ignore[return-value]
        return extract_base(self.fetch(0), self.manifest, workdir)

    def fetch(self, stage: int) -> StageInput:
        n = len(self.manifest["stages"])
        if not 0 <= stage < n:
            raise P2UError(f"stage {stage} does not exist: {self.path} has stages 0..{n - 1}")
        p = package_file(self.path, self.manifest["stages"][stage]["files"][0]["path"])
        # its size first: a huge file is refused before it is hashed
        return check_file_entry(p, self.manifest["stages"][stage]["files"][0], digest=False)

    def probe_bytes(self) -> bytes | None:
        entry = self.manifest.get("probe")
        if not entry:
            return None
        try:
            return read_probe_file(self.path, entry)
        except OSError as e:
            raise IntegrityError(f"{self.path / entry['path']}: cannot read the probe "
                                 f"({e.strerror or e})") from e


class BytesSource:
    """A package known by its manifest and the bytes of ``stage-0.p2u``.

    Later stages come through :meth:`ProgressiveSession.apply`, or from ``fetch(stage)`` when
    given (what a transport passes). A session can pin (``expect=``) only a manifest given as
    bytes, and check a signature (``trust=``) only when ``signature`` holds the bytes of
    ``manifest.json.sig``.
    """

    def __init__(self, manifest: dict[str, Any] | bytes, stage0: StageInput, *,
                 probe: bytes | None = None,
                 fetch: Callable[[int], StageInput] | None = None,
                 signature: bytes | None = None):
        self.manifest_bytes = None if isinstance(manifest, dict) else bytes(manifest)
        if isinstance(manifest, dict):
            from .format import validate_manifest

            validate_manifest(manifest, "manifest (dict)")  # as the bytes would be
        self.manifest = manifest if isinstance(manifest, dict) else parse_manifest(manifest)
        self._signature = signature
        self._stage0 = stage0
        self._probe = probe
        self._fetch = fetch

    def base_files(self, workdir: Path) -> tuple[Path, Path]:
        return extract_base(self._stage0, self.manifest, workdir)

    def fetch(self, stage: int) -> StageInput:
        if self._fetch is None:
            raise P2UError("this session has no way to fetch stages: pass each stage file "
                           "to apply()")
        return self._fetch(stage)

    def probe_bytes(self) -> bytes | None:
        return self._probe

    def signature_bytes(self) -> bytes | None:
        return self._signature


# ---------------------------------------------------------------- weights on disk and in memory


_TRUNCATE_STEP = 4 << 20


def _remove_gradually(path: Path) -> None:
    """Remove a weights file of this session, giving its page cache back 4 MB at a time.

    Unlinking a 400 MB file frees about 100k cached pages in one system call: against a loop
    of the 100M model, the worst run was +24-31 ms above its median, +16-23 with 4 MB steps
    (+11-21 with nothing removed). Short truncations let the scheduler run inferences between
    them; they are not taken in turns, since one may wait for the file system's journal (up to
    0.1 s measured) and a turn would make runs wait too. Best effort, like any cleanup.
    """
    try:
        st = os.stat(path)
        size = st.st_size if st.st_nlink == 1 else 0  # never shorten a file linked elsewhere
        while size > _TRUNCATE_STEP:
            size -= _TRUNCATE_STEP
            os.truncate(path, size)
        os.unlink(path)
    except OSError:
        pass


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _load_weight(buffer: np.ndarray, fd: int, t: dict[str, Any]) -> None:
    """Read tensor ``t`` of the weights file ``fd`` into ``buffer`` (C order, its shape)."""
    off, length = t["weights"]
    if buffer.nbytes != length:
        raise FormatError(f"weight {t['name']} has {buffer.nbytes} bytes, expected {length}")
    read_into(fd, off, buffer)


def _tensor_view(raw: np.ndarray, t: dict[str, Any]) -> np.ndarray:
    off, length = t["weights"]
    return raw[off:off + length].view(FLOAT_TYPES[t["dtype"]].storage).reshape(t["shape"])


class _CopiedWeights:
    """Inplace weights as buffers owned here; :meth:`switch` reads a weights file into them."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.tensors = manifest["tensors"]
        self.layout = weights_layout(manifest)
        self.buffers = {t["name"]: np.empty(t["shape"], FLOAT_TYPES[t["dtype"]].storage)
                        for t in self.tensors}
        self.switch(path)

    def switch(self, path: Path) -> None:
        with _opened(path) as fd:
            for t in self.tensors:
                _load_weight(self.buffers[t["name"]], fd, t)

    def close(self) -> None:
        self.buffers = {}


class _MappedWeights:
    """Inplace weights as one read-only, private mapping of a weights file at a fixed address.

    :meth:`switch` maps another weights file of the same size at the same address (one
    ``mmap(MAP_FIXED)`` call): every tensor changes at once, nothing is copied, and the pages
    are the file's, which the kernel can drop and read again under memory pressure.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.size = weights_size(manifest)
        self.layout = weights_layout(manifest)
        self.addr = self._map(path, None)
        raw = np.ctypeslib.as_array((ctypes.c_ubyte * self.size).from_address(self.addr))
        raw.flags.writeable = False
        self.buffers = {t["name"]: _tensor_view(raw, t) for t in manifest["tensors"]}

    def _map(self, path: Path, at: int | None) -> int:
        lib = libc()
        with _opened(path) as fd:
            if os.fstat(fd).st_size < self.size:
                raise FormatError(f"{path}: shorter than the package's weights "
                                  f"({self.size} bytes)")
            flags = mmap.MAP_PRIVATE | (_MAP_FIXED if at is not None else 0)
            addr = lib.mmap(at, self.size, mmap.PROT_READ, flags, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value) or (at is not None and addr != at):
            err = ctypes.get_errno()
            raise OSError(err, f"cannot map {path}: {os.strerror(err)}")
        # Map the file's 2 MB folios (see reconstruct._prefill) whole, one fault each: the
        # first run after a switch (the probe, runs waiting) took 39 ms on the 100M model with
        # 4 KB mappings, 22 ms with these. Pages are mapped in 2 MB units, so a sparsely read
        # tensor (an embedding table) is mapped whole: file pages, which the kernel can drop.
        # Linux with transparent huge pages; a no-op elsewhere.
        lib.madvise(addr, self.size, _MADV_HUGEPAGE)
        return addr

    def switch(self, path: Path) -> None:
        self._map(path, self.addr)

    def close(self) -> None:
        self.buffers = {}
        if self.addr:
            libc().munmap(self.addr, self.size)
            self.addr = 0


_MAP_FIXED = 0x10  # Linux, macOS and the BSDs
_MADV_HUGEPAGE = 14 if sys.platform.startswith("linux") else -1  # -1: no such advice


def _inplace_weights(path: Path, manifest: dict[str, Any]) -> _MappedWeights | _CopiedWeights:
    """The inplace strategy's weights: mapped where the platform can remap a file at a fixed
    address (64-bit Linux and macOS), copied into buffers elsewhere."""
    if sys.platform in ("linux", "darwin") and ctypes.sizeof(ctypes.c_void_p) == 8 \
            and weights_size(manifest) > 0:
        try:
            return _MappedWeights(path, manifest)
        except (OSError, AttributeError):
            pass
    return _CopiedWeights(path, manifest)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def _inplace_ready(manifest: dict[str, Any]) -> bool:
    """Whether ``add_initializer`` reaches every coded weight by its name."""
    return all(t["kind"] == "initializer" and t["name"] == t["tensor"]
               and t["dtype"] in FLOAT_TYPES for t in manifest["tensors"])


def _cpu_only(providers: Sequence[Any] | None) -> bool:
    names = ort.get_available_providers() if providers is None else \
        [p[0] if isinstance(p, tuple) else p for p in providers]
    return set(names) <= _HOST_PROVIDERS


def _copy_options(user: ort.SessionOptions | None) -> ort.SessionOptions:
    """Fresh options with the fields of ``user`` that matter here (the object cannot be
    copied)."""
    so = ort.SessionOptions()
    if user is not None:
        for name in _COPIED_OPTIONS:
            if hasattr(user, name):
                setattr(so, name, getattr(user, name))
        for key in _COPIED_CONFIG:
            try:
                so.add_session_config_entry(key, user.get_session_config_entry(key))
            except RuntimeError:
                pass
    return so


def _inplace_options(user: ort.SessionOptions | None) -> ort.SessionOptions:
    """Options like ``user``'s, with optimizations and prepacking off."""
    so = _copy_options(user)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def _lean_base_options(user: ort.SessionOptions | None) -> ort.SessionOptions:
    """Options like ``user``'s without the memory arena: the base's dequantized weights are
    freed after each run instead of staying cached beside the next stage's weights (inplace,
    100M parameters: 0.57 -> 0.22 x the fp32 weights once the base has answered). Weights the
    base folds to float at load (:func:`~p2u_onnx.base_speed.dequantize_at_load`: Conv, Gemm,
    RNN weights) are the session's own, held until stage 1 replaces it."""
    so = _copy_options(user)
    if user is not None:
        so.graph_optimization_level = user.graph_optimization_level
    so.enable_cpu_mem_arena = False
    return so


def _file_bytes(path: Path) -> np.ndarray | bytes:
    """A file's bytes for :func:`~p2u_onnx.external.main_initializers`: mapped read only
    (b"" for an empty file, which cannot be mapped)."""
    return np.memmap(path, np.uint8, mode="r") if os.path.getsize(path) else b""


def _same_span(a: Any, a_off: int, b: Any, b_off: int, length: int,
               chunk: int = 1 << 20) -> bool:
    """Whether ``length`` bytes at ``a_off`` of file ``a`` equal those at ``b_off`` of ``b``
    (compared a chunk at a time)."""
    a.seek(a_off)
    b.seek(b_off)
    while length > 0:
        n = min(chunk, length)
        x, y = a.read(n), b.read(n)
        if x != y or len(x) != n:
            return False
        length -= n
    return True


def _extra_initializers(graph: bytes, base_bin: Path, manifest: dict[str, Any]
                        ) -> dict[str, np.ndarray]:
    """Inplace: the float initializers of the skeleton's main graph other than the coded
    weights (biases, norms, small tensors kept as they are), as arrays owned here. Given to
    onnxruntime by name beside the coded weights, an update can patch them in place (see
    ProgressiveSession._update_in_place). Left out: a name that is also an input of the graph
    or that an initializer of a subgraph shares, and values p2u does not read (onnxruntime
    then keeps its own)."""
    coded = {t["tensor"] for t in manifest["tensors"]}
    names = collections.Counter(initializer_names(graph))
    once = {n for n, k in names.items() if k == 1} - coded - graph_inputs(graph)
    out: dict[str, np.ndarray] = {}
    for name, value in main_initializers(graph, _file_bytes(base_bin)).items():
        if name in once:
            try:
                out[name] = np.array(value(), copy=True)
            except KeyError:
                continue
    return out


def _given_by_name(live: _Live, manifest: dict[str, Any], graph: bytes, base_bin: Path,
                   options: ort.SessionOptions) -> None:
    """Inplace: hand ``options`` every coded weight (from ``live.weights``) and every other
    float initializer of the main graph (:func:`_extra_initializers`) by name, keeping their
    OrtValues alive in ``live``."""
    assert live.weights is not None
    for t in manifest["tensors"]:
        live.values.append(_ortvalue(live.weights.buffers[t["name"]], t["dtype"]))
        options.add_initializer(t["tensor"], live.values[-1])
    types = main_float_types(graph)
    onnx_names = {v.onnx_type: k for k, v in FLOAT_TYPES.items()}
    live.extras = _extra_initializers(graph, base_bin, manifest)
    for name, value in live.extras.items():
        live.values.append(_ortvalue(value, onnx_names.get(types[name], "float32")))
        options.add_initializer(name, live.values[-1])


def _ortvalue(buf: np.ndarray, dtype: str) -> ort.OrtValue:
    if dtype == "bfloat16":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(buf, FLOAT_TYPES[dtype].onnx_type)
    return ort.OrtValue.ortvalue_from_numpy(buf)


# ---------------------------------------------------------------- the session

_log = logging.getLogger(__name__)

#: Memory a swap upgrade adds to the process, as a multiple of the package's float weights
#: (``scripts/bench_runtime.py``: peak RSS 2.19-2.27x above the process before the session,
#: against 1.18-1.31x for inplace), plus a margin for onnxruntime and the decoder.
SWAP_PEAK = 2.3
_MARGIN = 64 << 20


def swap_need(manifest: dict[str, Any]) -> int:
    """Bytes of memory a swap upgrade of this package may need at its peak (an estimate)."""
    base = sum(int(f.get("size", 0)) for f in manifest["base_model"]["files"]
               if Path(f["path"]).name == "base.bin")
    return int(SWAP_PEAK * weights_size(manifest)) + base + _MARGIN


#: Peak memory of loading a base whose weights onnxruntime folds to float at load
#: (:func:`~p2u_onnx.base_speed.dequantize_at_load`), as a multiple of those float weights:
#: the 100M model with 5 of its 6 tensors folded (335 MB of float) peaked at 1.23 GB.
FOLD_PEAK = 3.7


def folded_bytes(base_onnx: bytes, manifest: dict[str, Any]) -> int:
    """Float bytes of the coded weights the base graph folds to float at load."""
    outputs = node_outputs(base_onnx)
    stems = {o.split("__p2u_load", 1)[0] for o in outputs if "__p2u_load" in o}
    return sum(int(t["weights"][1]) for t in manifest["tensors"] if t["tensor"] in stems)


def base_folding(base_onnx: str | os.PathLike, manifest: dict[str, Any], strategy: str
                 ) -> tuple[bool, str]:
    """Whether an ``inplace`` session loads its base with onnxruntime's constant folding
    off, and why: when the memory left (:func:`~p2u_onnx._memory.memory_left`) would not
    hold the folding of the weights the base computes at load (:data:`FOLD_PEAK` times their
    float bytes). The base then computes them on every run: it loads in a fraction of the
    memory, and answers more slowly until stage 1. ``base_onnx``: the base graph's path (read
    for an inplace session only)."""
    folded = folded_bytes(Path(base_onnx).read_bytes(), manifest) if strategy == "inplace" \
        else 0
    if not folded:
        return True, ""
    left, which = memory_left()
    need = int(FOLD_PEAK * folded) + _MARGIN
    if left is None or left >= need:
        return True, ""
    return False, (f"; the base loads with constant folding off: {left >> 20} MiB left "
                   f"({which}) would not hold folding its {folded >> 20} MiB of float weights "
                   f"(about {need >> 20} MiB), so it computes them on every run (slower) until "
                   "stage 1")


def choose_strategy(manifest: dict[str, Any],
                    providers: Sequence[Any] | None = None) -> tuple[str, str]:
    """``strategy="auto"``: ``"inplace"`` when the memory left to this process (see
    :func:`~p2u_onnx._memory.memory_left`) would not hold a swap upgrade
    (:func:`swap_need`), else ``"swap"``; and why, in words."""
    need = swap_need(manifest)
    if not _cpu_only(providers):
        return "swap", "swap: auto, inplace needs the CPU execution provider only"
    left, which = memory_left()
    if left is None:
        return "swap", "swap: auto, no memory limit could be read"
    verdict = "would not hold" if left < need else "holds"
    text = (f"auto, {left >> 20} MiB left ({which}) {verdict} a swap upgrade "
            f"(about {need >> 20} MiB)")
    return ("inplace", "inplace: " + text) if left < need else ("swap", "swap: " + text)


#: Default share of the time the decoder has the cores while runs wait for it (see
#: :class:`~p2u_onnx._rwlock.TurnLock`): under a saturating load an upgrade takes about
#: 1 / share times as long as on an idle device.
DECODER_SHARE = 0.5
#: Default longest turn of the decoder, in seconds: the most a run waits for it (plus the
#: runs in flight and the decode job in progress). A turn ends sooner once the decoder had
#: its share, so this caps only long rounds of runs: with 0.04 (the earlier default) an
#: upgrade of MiniLM under 3 threads on 2 cores took 3.4-5.4x its idle time (rounds of 90-110
#: ms left the decoder a quarter of the time); with 0.25, 1.9-3.0x, and its worst run 65-150
#: ms later (docs/runtime.md, "Under load").
DECODER_TURN = 0.25


@dataclass(eq=False)
class _Live:
    """One onnxruntime session serving one stage, and what it needs to stay valid."""

    session: Any
    stage: int
    directory: Path | None = None
    weights: _MappedWeights | _CopiedWeights | None = None  # inplace: the weight buffers
    values: list[Any] = field(default_factory=list)  # inplace: their OrtValues, kept alive
    # inplace: the skeleton's other float initializers of the main graph (biases, norms...),
    # given by name from these arrays, which an update patches (see _given_by_name)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    # inplace after an update patched in: coded tensors this session gives from ``extras``,
    # copied from each stage's weights file (table entries)
    tail: dict[str, dict[str, Any]] = field(default_factory=dict)
    users: int = 0  # run() calls in flight (slow path)
    # run() calls in flight on the fast path (ProgressiveSession.run): one item each, added
    # and removed with deque's atomic append / pop, no lock
    fast: collections.deque = field(default_factory=collections.deque)


def _trim_heap(pace: Pace) -> None:
    """:func:`~p2u_onnx._memory.trim_heap` in a decode-job turn of ``pace``: runs allocate
    from the heaps it walks and locks (beside a 3-thread load on MiniLM, at the lowered
    priority, it took 74 ms against 5 ms idle)."""
    with pace():
        trim_heap()


def _release(live: _Live) -> None:
    """Drop ``live``'s session, then its weights (never while a run uses them)."""
    live.session = None
    live.values = []
    live.extras = {}
    if live.weights is not None:
        live.weights.close()
        live.weights = None


def _largest_stage(manifest: dict[str, Any]) -> int | None:
    """The size of the package's largest stage file (none of its stage files is longer)."""
    try:
        return max(int(st["files"][0]["size"]) for st in manifest["stages"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _check_workdir(workdir: str | os.PathLike | None, source: Any) -> None:
    """Refuse a ``workdir`` inside the package folder: a session never writes there."""
    if workdir is None or not isinstance(source, DirectorySource):
        return
    package, work = os.path.realpath(source.path), os.path.realpath(workdir)
    if os.path.commonpath([package, work]) == package:
        raise P2UError(f"the work folder {workdir} is inside the package folder {source.path}: "
                       "a session never writes into its package; choose another folder")


def _session_dir(workdir: str | os.PathLike | None) -> Path:
    """A new folder for one session: ``p2u-<owner>-<random>`` in the system's temporary
    folder, or ``session-<owner>-<random>`` in ``workdir`` (see :mod:`p2u_onnx._workdir`).
    First the folders there of sessions whose process died are removed."""
    if workdir is None:
        parent, prefix = Path(tempfile.gettempdir()), "p2u-"
    else:
        parent, prefix = Path(workdir), "session-"
        parent.mkdir(parents=True, exist_ok=True)
    _workdir.sweep(parent, prefix)
    return _workdir.make_dir(parent, prefix)


def _http_source(url: str, workdir: str | os.PathLike | None, **trust: Any) -> StageSource:
    """An :class:`~p2u_onnx.transport.HttpSource` for ``url``; it keeps its downloads in
    ``workdir/http`` when a work dir is given, so a restart continues where it stopped.
    ``trust``: its ``expect``, ``trust`` and ``allow_rollback`` arguments."""
    try:
        from .transport import HttpSource
    except ImportError as e:
        raise P2UError("loading a package from a URL needs httpx: "
                       "pip install 'p2u-onnx-runtime[http]' on a device") from e
    return HttpSource(url, None if workdir is None else Path(workdir) / "http", **trust)


def _admit_source(source: StageSource, policy: Policy) -> str:
    """Check the pin and signature ``policy`` asks for on a source the caller built; returns
    the name to use in messages."""
    home = getattr(source, "url", None) or getattr(source, "path", None)
    where = f"{str(home).rstrip('/')}/manifest.json" if home else "manifest.json (bytes)"
    if not policy.authenticates:
        return where
    raw = getattr(source, "manifest_bytes", None)
    if not isinstance(raw, (bytes, bytearray)):
        raise P2UError(f"{type(source).__name__} holds no manifest bytes to check expect= or "
                       "trust= against (give BytesSource the bytes of manifest.json)")
    policy.check_pin(bytes(raw), where)
    if parse_manifest(bytes(raw), where) != source.manifest:
        raise IntegrityError(f"{where}: the source's manifest is not the one its bytes hold")
    if policy.keys:
        sig = getattr(source, "signature_bytes", None)
        check_signature(sig() if sig is not None else None, bytes(raw), source.manifest,
                        policy.keys, where)
    return where


class ProgressiveSession:
    """An onnxruntime session over a p2u package that upgrades itself stage by stage.

    ``source`` is a package directory or a :class:`StageSource`. ``sess_options`` and
    ``providers`` are passed to onnxruntime as for ``InferenceSession``; ``strategy`` is
    ``"swap"``, ``"inplace"`` (see the module docs) or ``"auto"``: inplace when the memory left
    to the process (cgroup limit minus usage, ``MemAvailable``, ``RLIMIT_AS``) would not hold
    a swap upgrade, else swap (:func:`choose_strategy`; :attr:`strategy_reason` says why).
    ``decoder_share`` and ``decoder_turn``: while runs and an upgrade compete for the cores,
    the decoder has them to itself at least this share of the time, in turns of at most this
    many seconds (beside the runs in flight, the most a run waits for it: lower it, e.g. to
    0.04, to favour latency over the upgrade's time); see :class:`~p2u_onnx._rwlock.TurnLock`.
    ``workdir`` is a directory for unpacked files (default: a temporary directory removed on :meth:`close`). ``on_stage(k)`` is called
    after stage ``k`` became active, in the thread that applied it (an exception it raises
    reaches the caller of :meth:`apply`; the stage stays active); for stage 0, at the end of
    the constructor (an exception it raises closes the session and reaches the caller).
    ``verify=False`` skips the probe check (e.g. on providers whose numerics differ from the
    CPU's).

    ``expect="sha256:<hex>"`` pins the exact bytes of ``manifest.json``; ``trust`` (a public key
    ``"ed25519:..."``, a ``.pub`` file, or a list of them) asks for a valid, unexpired
    ``manifest.json.sig`` by one of those keys; both are checked before anything else is read,
    unpacked or loaded (:class:`~p2u_onnx.errors.TrustError` otherwise). Whatever the source,
    a package whose model name was seen before with a higher version (or the same version with
    other content) is refused unless ``allow_rollback=True``; once the base is loaded its version
    is recorded (see :mod:`p2u_onnx.trust`). For a URL these go to the
    :class:`~p2u_onnx.transport.HttpSource` made here, which checks before it caches anything;
    for a source you build, give them to it as well (the session checks pins and signatures
    again on its ``manifest_bytes``).

    ``fast_base=True`` loads the base with onnxruntime's ``MatMulAddFusion`` off: where it
    turns MatMul+Add into Gemm before DequantizeLinear->MatMul can become ``MatMulNBits``, the
    base dequantizes those weights on every run. The encoder already writes such an Add as
    ``Sum`` wherever its shape inference sees the shapes onnxruntime's fusion needs
    (:mod:`p2u_onnx.base_speed`); this covers the rest. Stage-0 outputs then differ slightly
    from plain onnxruntime's on the restored stage-0 model; later stages are not affected.

    >>> with ProgressiveSession("model.p2u") as s:  # doctest: +SKIP
    ...     y = s.run(None, {"x": x})               # stage 0 answers at once
    ...     s.upgrade().result()                    # every stage, in the background
    ...     y = s.run(None, {"x": x})               # final stage
    """

    def __init__(self, source: str | os.PathLike | StageSource,
                 sess_options: ort.SessionOptions | None = None,
                 providers: Sequence[Any] | None = None, strategy: str = "swap",
                 workdir: str | os.PathLike | None = None,
                 on_stage: Callable[[int], None] | None = None, *, verify: bool = True,
                 fast_base: bool = False, expect: str | None = None,
                 trust: TrustSpec | None = None, allow_rollback: bool = False,
                 decoder_share: float = DECODER_SHARE, decoder_turn: float = DECODER_TURN):
        if strategy not in ("swap", "inplace", "auto"):
            raise ValueError(f"strategy must be 'swap', 'inplace' or 'auto', not {strategy!r}")
        turns = TurnLock(decoder_share, decoder_turn)  # checks them first
        self._owned: Any = None  # a source made here from a URL, closed with the session
        policy = Policy.make(expect, trust, allow_rollback)
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            source = self._owned = _http_source(source, workdir, expect=expect, trust=trust,
                                                allow_rollback=allow_rollback)
        try:
            if isinstance(source, (str, os.PathLike)):
                self._source: StageSource = DirectorySource(source, policy=policy)
                where = str(Path(source) / "manifest.json")
            else:
                self._source = source
                where = _admit_source(source, Policy() if source is self._owned else policy)
            self._manifest = self._source.manifest
            if is_update(self._manifest):
                raise P2UError(f"{where} is an update package: open a session on the model it "
                               "applies to, then call update() with it")
            policy.check_version(self._manifest, where)
        except BaseException:
            self._close_owned()
            raise
        if strategy == "inplace" and not _cpu_only(providers):
            raise P2UError("the inplace strategy needs the CPU execution provider only; "
                           "use strategy='swap' with other providers")
        self._strategy_reason = f"{strategy}: asked"
        if strategy == "auto":
            strategy, self._strategy_reason = choose_strategy(self._manifest, providers)
        self._strategy = "inplace" if strategy == "inplace" and _inplace_ready(self._manifest) \
            else "swap"
        if strategy == "inplace" and self._strategy == "swap":
            self._strategy_reason += ("; swap instead: onnxruntime's add_initializer cannot "
                                      "reach every coded weight of this package")
        _log.info("%s: strategy %s", where, self._strategy_reason)
        self._options = sess_options
        self._verify = verify
        self._providers = providers
        self._on_stage = on_stage
        self._gate = threading.Lock()  # _cond's lock: run() takes it without the wrapper
        self._cond = threading.Condition(self._gate)
        self._watchers = 0  # _swap_in calls waiting on _cond: runs notify only when > 0
        self._rw = RWLock()
        self._apply_lock = threading.RLock()
        self._executor: cf.ThreadPoolExecutor | None = None
        self._closing = self._closed = False
        # inferences (0) and decode jobs (1) take turns, the decoder with its share: _pace
        self._turns = turns
        self._fast = False  # run() may take the lock-free path (see run); set below
        self._slow = 0  # _slow_runs in progress
        self._writeback = Writeback()  # work files go to disk as they are decoded
        try:
            _check_workdir(workdir, self._source)
            self._dir = _session_dir(workdir)
        except P2UError:
            self._close_owned()
            raise
        except OSError as e:
            self._close_owned()
            raise P2UError(f"cannot make a work folder in {e.filename or workdir}: "
                           f"{e.strerror or e}") from e
        self._workdir = self._dir if workdir is None else Path(workdir)
        self._cleanup = weakref.finalize(self, _workdir.remove_tree, str(self._dir))
        try:
            base_onnx, self._base_bin = self._private_base()
            self._base_onnx = base_onnx  # a format-4 skeleton graph is coded against it
            check_base_graph(base_onnx, self._manifest, os.path.getsize(self._base_bin))
            fold, why = base_folding(base_onnx, self._manifest, self._strategy)
            if not fold:
                self._strategy_reason += why
                _log.warning("%s: %s", where, why[2:])
            session = open_base_session(
                base_onnx, _lean_base_options(sess_options)
                if self._strategy == "inplace" else sess_options, providers,
                (*(_BASE_OFF if fast_base else ()), *(() if fold else ("ConstantFolding",))))
            probe = self._source.probe_bytes() if verify else None
            self._probe = None if probe is None else \
                Probe(self._manifest["probe"], probe, session.get_inputs())
            self._state = WeightState(self._manifest, self._base_bin)
            policy.record(self._manifest)  # it passed every check and its base loads
        except BaseException as e:
            self._cleanup()
            self._close_owned()
            if isinstance(e, Exception) and not isinstance(e, (P2UError, OSError, ValueError)):
                # onnxruntime's own exceptions on a hostile base.onnx: one line
                raise FormatError("the package's base.onnx cannot be loaded: " +
                                  " ".join(str(e).split())[:300]) from e
            raise
        self._live = _Live(session, 0)
        self._fast = True
        if on_stage is not None:
            try:
                on_stage(0)
            except BaseException:
                self.close()
                raise

    # -- what InferenceSession offers

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any],
            run_options: ort.RunOptions | None = None) -> list[Any]:
        """As ``InferenceSession.run``; the whole result comes from one stage.

        Fast path, while no stage is being applied and the session is open: the run registers
        itself on the live session (an atomic ``deque.append``), then checks that the fast
        path is still on and that session still live, and runs without any lock: a few
        hundred nanoseconds instead of the three locks below (about 5 us, a quarter of a
        small model's run). :meth:`apply` and :meth:`close` first turn the fast path off and,
        before the live session changes, wait for the runs registered on it (:meth:`_drain`);
        a run that finds it off, or the session swapped, unregisters and takes the slow path. A registration is seen
        either by that wait (which then waits for the run) or after the switch (and the run
        goes the slow way): nothing changes under a fast-path run.
        """
        live = self._live
        fast = live.fast
        fast.append(None)
        try:
            if self._fast and self._live is live:
                return live.session.run(output_names, input_feed, run_options)
        finally:
            fast.pop()
            if self._watchers:
                self._wake()
        return self._run_slow(output_names, input_feed, run_options)

    def _run_slow(self, output_names: Sequence[str] | None, input_feed: dict[str, Any],
                  run_options: ort.RunOptions | None = None) -> list[Any]:
        """:meth:`run` while a stage is applied: a reader of the writer lock (inplace
        switches), a turn against decode jobs, counted on the live session (swaps)."""
        with self._turns.hold(0), self._rw.read():  # in this order: see _switch
            live = self._enter()
            try:
                return live.session.run(output_names, input_feed, run_options)
            finally:
                self._leave(live)

    def get_inputs(self) -> list[Any]:
        return self._current().session.get_inputs()

    def get_outputs(self) -> list[Any]:
        return self._current().session.get_outputs()

    def get_modelmeta(self) -> Any:
        return self._current().session.get_modelmeta()

    def get_providers(self) -> list[str]:
        return self._current().session.get_providers()

    # -- stages

    @property
    def stage(self) -> int:
        """The stage whose weights ``run()`` uses now."""
        return self._live.stage

    @property
    def stages(self) -> int:
        """How many stages the package has (stage 0 included)."""
        return len(self._manifest["stages"])

    @property
    def strategy(self) -> str:
        """The strategy in use: ``"swap"`` when ``"inplace"`` was asked but cannot be used."""
        return self._strategy

    @property
    def strategy_reason(self) -> str:
        """Why :attr:`strategy` is in use, e.g. ``"inplace: auto, 412 MiB left (cgroup
        memory.max 640 MiB) would not hold a swap upgrade (about 990 MiB)"``."""
        return self._strategy_reason

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def apply(self, stage: StageInput) -> int:
        """Apply the next stage file (path or bytes); returns the new stage index.

        Raises :class:`IntegrityError` for a file that is not the next stage of this package
        (truncated, corrupt, foreign, repeated, out of order) and :class:`PatchError` when the
        patched model fails or the probe does not show the new stage. Either way the session
        keeps serving the stage it had.
        """
        with self._apply_lock, self._slow_runs():
            self._check_open()
            k = self.stage + 1
            # a private copy, checked as it is written: the package's file is never mapped
            with private_copy(stage, self._dir, self._pace, self._writeback.add,
                              _largest_stage(self._manifest)) as (src, digest):
                sf = open_stage(src, self._manifest, k, self._pace, digest=digest)
                cp = self._state.checkpoint()
                try:
                    if k == 1 and not is_update(self._manifest):  # (an update: at stage 0)
                        self._write_skeleton(sf)
                    if self._strategy == "inplace" and (k > 1 or is_update(self._manifest)):
                        self._patch_buffers(k, sf)
                    else:
                        self._rebuild(k, sf)
                except BaseException as e:
                    self._state.rollback(cp)
                    if isinstance(e, OSError):  # a full disk, a read-only work directory...
                        where = f" ({e.filename})" if e.filename else f" (in {self._dir})"
                        raise PatchError(f"stage {k} could not be applied: "
                                         f"{e.strerror or e}{where}") from e
                    if isinstance(e, Exception) and not isinstance(e, P2UError):
                        text = " ".join(str(e).split())[:300] or type(e).__name__
                        raise PatchError(f"stage {k} could not be applied: {text}") from e
                    raise
                finally:
                    # what the stage freed (the session it replaced): at every stage, or it adds
                    # to the next one's peak (the 100M model on the simulated board: 658 MiB
                    # instead of 619 with a trim after the last stage only)
                    _trim_heap(self._pace)
                del sf  # its mapping, before the copy is removed
                if self._on_stage is not None:
                    self._on_stage(k)
            return k

    def held(self) -> tuple[str | None, str, int]:
        """What this session holds, as an update's ``predecessor`` names it: (the digest of the
        exact weights at the last stage of a lossless plan, else None; package id; stage)."""
        m, k = self._manifest, self.stage
        exact = k == len(m["plan"]) - 1 and m["plan"][-1] == "lossless"
        return (m["source"]["weights_sha256"] if exact else None), m["package_id"], k

    def update(self, source: str | os.PathLike | StageSource, until: int | None = None,
               background: bool = False, *, expect: str | None = None,
               trust: TrustSpec | None = None,
               allow_rollback: bool = False) -> cf.Future[int] | int:
        """Move this session live to the new model of an update package, stage by stage up to
        ``until`` (default: its last).

        ``source``: the update package's folder, URL or a :class:`StageSource`
        (:class:`BytesSource` for bytes). The update must be bound to what this session holds
        (:meth:`held`); a full package, an update made for another model or stage, a stage file
        that does not match, a pin or signature that fails, a lower version of the model
        (unless ``allow_rollback``) or a probe that does not show the update's stage are
        refused, and the session keeps serving what it had. Stage 0 of the update (the new
        skeleton and the coarse deltas) is decoded from the weights this session holds into
        a new session, which is checked and swapped in: each run is answered entirely by the
        old or the new model. Later stages are applied as :meth:`upgrade` applies them (the
        update becomes this session's package). An ``inplace`` session stays ``inplace`` when
        the update's tensor table allows it (every coded tensor a float initializer given by
        name), else continues with ``swap``. Returns the stage reached, or a ``Future`` of it with ``background``.
        """
        self._check_open()
        src, where, policy = self._update_source(source, expect, trust, allow_rollback)
        manifest = src.manifest
        check_predecessor(manifest, *self.held(), where=where, label="this session's model")
        last = len(manifest["stages"]) - 1
        target = last if until is None else int(until)
        if not 0 <= target <= last:
            raise P2UError(f"stage {target} does not exist: this update has stages 0..{last}")
        if not background:
            return self._update_to(src, where, policy, target)
        with self._cond:
            if self._closing:
                raise P2UError("the session is closed")
            if self._executor is None:
                self._executor = cf.ThreadPoolExecutor(1, thread_name_prefix="p2u-upgrade")
            return self._executor.submit(self._update_to, src, where, policy, target)

    def _update_source(self, source: Any, expect: str | None, trust: TrustSpec | None,
                       allow_rollback: bool) -> tuple[StageSource, str, Policy]:
        policy = Policy.make(expect, trust, allow_rollback)
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            src: Any = _http_source(source, self._workdir, expect=expect, trust=trust,
                                    allow_rollback=allow_rollback)
            where = f"{source.rstrip('/')}/manifest.json"
        elif isinstance(source, (str, os.PathLike)):
            src = DirectorySource(source, policy=policy)
            where = str(Path(source) / "manifest.json")
        else:
            src = source
            where = _admit_source(source, policy)
        try:
            if not is_update(src.manifest):
                raise P2UError(f"{where} is a full package, not an update: open a new session "
                               "on it")
            policy.check_version(src.manifest, where)
        except BaseException:
            if src is not source and hasattr(src, "close"):
                src.close()
            raise
        return src, where, policy

    def _update_to(self, src: StageSource, where: str, policy: Policy, target: int) -> int:
        with self._apply_lock:
            self._check_open()
            # again under the lock: an upgrade may have moved the session meanwhile
            check_predecessor(src.manifest, *self.held(), where=where,
                              label="this session's model")
            with self._slow_runs():  # as apply()
                self._apply_update_base(src)
            policy.record(src.manifest)
            if self._on_stage is not None:
                self._on_stage(0)
            return self._upgrade_to(target)

    def _held_tensors(self) -> Callable[[dict[str, Any]], np.ndarray]:
        """What an update's tensors start from: this session's coded weights, else (a tensor
        its package kept in the graph) the float initializer of that name in its skeleton."""
        old = self._state
        skeleton: dict[str, Any] | None = None
        mapped = self._live.weights.buffers if isinstance(self._live.weights, _MappedWeights) \
            else {}

        def held(t: dict[str, Any]) -> np.ndarray:
            nonlocal skeleton
            name = t["name"]
            if name in mapped and old.tensors[name]["dtype"] == t["dtype"]:
                return mapped[name]  # inplace: the live session's own pages, read only
            if name in old.tensors:
                return old.weight(name, self._pace)
            if skeleton is None:
                graph = self._dir / "graph.onnx"
                skeleton = {} if self.stage == 0 and old.graph_bytes is None and \
                    not graph.exists() else main_initializers(
                        graph.read_bytes(), _file_bytes(self._base_bin))
            return skeleton[name]()

        return held

    def _apply_update_base(self, src: StageSource) -> None:
        """Stage 0 of an update: its skeleton and base codes, decoded from the weights this
        session holds into a new session, checked and swapped in. On any error nothing
        changes."""
        manifest = src.manifest
        d = Path(tempfile.mkdtemp(prefix="update-0-", dir=self._dir))
        live = _Live(None, 0, d)
        weights: Path | None = None
        try:
            stage0 = getattr(src, "_stage0", None)
            stage0 = src.fetch(0) if stage0 is None else stage0
            with private_copy(stage0, self._dir, self._pace, self._writeback.add,
                              _largest_stage(manifest)) as (copy, digest):
                sf = open_stage(copy, manifest, 0, self._pace, digest=digest)
                check_update_stage0(sf)
                skel = self._dir / "graph.onnx"  # the skeleton this session holds, if any
                parts = extract_update_files(sf, manifest, lambda: skel.read_bytes()
                                             if skel.exists() else None, d / "base.bin",
                                             self._pace, self._writeback.add)
                del sf
            state = WeightState(manifest, d / "base.bin", predecessor=self._held_tensors())
            state.check_skeleton(parts["graph.onnx"])
            (d / "graph.onnx").write_bytes(parts["graph.onnx"])
            del parts
            probe_data = None
            if self._verify and manifest.get("probe"):
                probe_data = src.probe_bytes()
                if probe_data is None:
                    raise IntegrityError("the update lists a probe its source does not have")
            # inplace goes on when the new table allows it: the weights in a file of their own
            # (a hole file for the graph), given to onnxruntime by name, as _rebuild does
            inplace = self._strategy == "inplace" and _inplace_ready(manifest)
            weights = self._dir / f"weights-u{manifest['package_id'][:12]}.bin" if inplace \
                else d / "weights.bin"
            patch = self._patchable(manifest, d) if inplace else None
            state.materialize(weights, self._pace, self._writeback.add)
            _trim_heap(self._pace)
            if patch:
                probe = self._update_in_place(manifest, patch, weights, probe_data)
            if not patch:
                probe = None
                self._load(live, manifest, weights if inplace else None)
                if probe_data is not None:
                    probe = Probe(manifest["probe"], probe_data, live.session.get_inputs())
                    probe.check(live.session.run, 0)
        except BaseException as e:
            _release(live)
            shutil.rmtree(d, ignore_errors=True)
            if weights is not None and weights.parent == self._dir:  # inplace's own file
                weights.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise PatchError(f"the update could not be applied: {e.strerror or e}") from e
            if isinstance(e, Exception) and not isinstance(e, P2UError):
                text = " ".join(str(e).split())[:300] or type(e).__name__
                raise PatchError(f"the update could not be applied: {text}") from e
            raise
        old_file = self._state.weights_file if self._strategy == "inplace" else None
        if patch:
            _release(live)
        else:
            self._swap_in(live)
        # the update is this session's package from now on: its later stages are decoded from
        # the new weights file, with the new skeleton and base data
        for name in ("graph.onnx", "base.bin"):
            _link_or_copy(d / name, self._dir / name)
        self._base_bin = self._dir / "base.bin"
        self._state = WeightState(manifest, self._base_bin)
        self._state._file = weights  # stage 0, already written (materialize)
        self._manifest = manifest
        self._probe = probe
        if self._owned is not None and self._owned is not src:
            self._owned.close()
        self._owned = src if hasattr(src, "close") else None
        self._source = src
        self._strategy = "inplace" if inplace else "swap"
        if patch:
            shutil.rmtree(d, ignore_errors=True)
        if old_file is not None:
            with lowered_priority():
                _remove_gradually(old_file)

    def _patchable(self, manifest: dict[str, Any], d: Path
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]] | None:
        """How the inplace session takes the update (``d``: its skeleton and base.bin)
        without a new session, or None when it cannot. It can when the skeleton computes what
        this session's does (:func:`graph_structure`), every other tensor of its base.bin is
        equal to this session's, each weight mapped here keeps its place in the new weights
        file (updates lay their file out so), and every other coded tensor is one the session
        gives by name from an array (``live.extras``: a bias this session's package kept in
        its graph and the update codes). Returns those tensors (table entries: their values
        come from each stage's weights file) and the new values of the other given
        arrays."""
        live = self._live
        if live.weights is None or live.session is None:
            return None

        def no(why: str) -> None:  # said: the update then costs a second session's memory
            _log.info("update %s: a new inplace session, not patched in place: %s",
                      manifest.get("package_id", "?")[:12], why)

        mapped = live.weights.layout
        given = frozenset(live.extras)
        tail: dict[str, dict[str, Any]] = {}
        places = weights_layout(manifest)
        for t in manifest["tensors"]:
            name = t["name"]
            if mapped.get(name) == places[name]:
                continue
            held = live.extras.get(name)
            if name != t["tensor"] or name in mapped or held is None or \
                    held.shape != tuple(t["shape"]) or \
                    held.dtype != FLOAT_TYPES[t["dtype"]].storage:
                return no(f"weight {name} is new, or not where this session holds it")
            tail[name] = t
        if not set(mapped) <= set(places):
            return no("it drops weights this session holds")
        old_graph = (self._dir / "graph.onnx").read_bytes()
        new_graph = (d / "graph.onnx").read_bytes()
        if graph_structure(old_graph, given) != graph_structure(new_graph, given):
            return no("its graph differs")
        # the other base.bin tensors: the same names in the same order, equal bytes
        olds, news = ([x for x in external_tensors(g) if x.location == "base.bin"
                       and x.name not in given] for g in (old_graph, new_graph))
        if [(x.name, x.length) for x in olds] != [(x.name, x.length) for x in news] or \
                any(x.length is None for x in olds):
            return no("its graph's other tensors differ")
        with open(self._dir / "base.bin", "rb") as fo, open(d / "base.bin", "rb") as fn:
            for a, b in zip(olds, news):
                if not _same_span(fo, a.offset, fn, b.offset, int(a.length or 0)):
                    return no(f"its {a.name} differs")
        values: dict[str, np.ndarray] = {}
        readers = main_initializers(new_graph, _file_bytes(d / "base.bin"))
        for name, held in live.extras.items():
            if name in tail:
                continue
            try:
                value = np.array(readers[name](), copy=True)
            except KeyError:
                return no(f"its {name} is held in a way p2u does not read")
            if value.dtype != held.dtype or value.shape != held.shape:
                return no(f"its {name} has another type or shape")
            values[name] = value
        return tail, values

    def _tail_values(self, tail: dict[str, dict[str, Any]], path: Path
                     ) -> dict[str, np.ndarray]:
        """The values of ``tail``'s tensors in the weights file ``path``."""
        out = {}
        with _opened(path) as fd:
            for name, t in tail.items():
                out[name] = np.empty(t["shape"], FLOAT_TYPES[t["dtype"]].storage)
                _load_weight(out[name], fd, t)
        return out

    def _switch(self, live: _Live, path: Path, values: dict[str, np.ndarray],
                check: Callable[[], None], stage: int) -> None:
        """Under the writer lock: map the weights file ``path``, copy ``values`` into the
        arrays given by name, then ``check()`` (the probe) and the session is at ``stage``;
        on a failure both go back."""
        assert live.weights is not None
        old = self._state.weights_file
        assert old is not None
        saved = {name: live.extras[name].copy() for name in values}
        self._drain()
        # In a decode-job turn, which excludes runs: the writer lock is then free at once (runs
        # take it inside their turn), and the turn usually goes on from the decoding just
        # before, instead of waiting for every run in flight (a round of runs under load)
        with self._pace(), self._rw.write():
            live.weights.switch(path)
            try:
                for name, value in values.items():
                    np.copyto(live.extras[name], value)
                check()
            except BaseException:
                live.weights.switch(old)
                for name, value in saved.items():
                    np.copyto(live.extras[name], value)
                raise
            live.stage = stage

    def _update_in_place(self, manifest: dict[str, Any], plan: tuple, weights: Path,
                         probe_data: bytes | None) -> Probe | None:
        """Stage 0 of an update into the live inplace session, as :meth:`_patchable`
        planned: its weights file mapped, the other values copied in, the probe checked."""
        live = self._live
        assert live.session is not None
        tail, values = plan
        probe = None if probe_data is None else \
            Probe(manifest["probe"], probe_data, live.session.get_inputs())
        values = {**values, **self._tail_values(tail, weights)}
        self._switch(live, weights, values,
                     lambda: None if probe is None else probe.check(live.session.run, 0), 0)
        live.tail = tail
        return probe

    def _private_base(self) -> tuple[Path, Path]:
        """``base.onnx`` and ``base.bin`` copied into this session's folder (``base/``), each
        hashed as it is written and checked against the manifest: the session loads and maps
        these copies only, never a file of the package (which another process may truncate or
        rewrite, and which must never be linked from a work folder)."""
        d = self._dir / "base"
        if isinstance(self._source, DirectorySource):
            files = self._source.base_files(self._workdir, digest=False)
        else:
            files = self._source.base_files(self._workdir)
        if all(p.parent == d for p in files):  # unpacked from stage 0 by this session
            return files
        d.mkdir(exist_ok=True)
        entries = _base_entries(self._manifest)
        out = []
        for p in files:
            entry = entries[p.name]
            copy = d / p.name
            try:
                digest = _copy_hashed(p, copy, None, self._writeback.add, "base file",
                                      limit=int(entry["size"]))
            except OSError as e:
                raise P2UError(f"cannot copy {p} into the work folder {d}: "
                               f"{e.strerror or e}") from e
            size = os.stat(copy).st_size
            if size != entry["size"]:
                raise IntegrityError(f"{p}: {size} bytes, the manifest says {entry['size']} "
                                     "(truncated or altered)")
            if digest != entry["sha256"]:
                raise IntegrityError(f"{p}: sha256 does not match the manifest (altered)")
            out.append(copy)
        return out[0], out[1]

    def _write_skeleton(self, sf: StageFile) -> None:
        """Stage 1's skeleton graph and a link of the base's data, once: on disk, not in
        memory. On a failure (a full disk) neither is left behind."""
        files = [self._dir / "graph.onnx", self._dir / "base.bin"]
        try:
            graph = extract_file(sf, "graph.onnx", max_size=graph_size_limit(self._manifest),
                                 ref=self._base_onnx.read_bytes())
            self._state.check_skeleton(graph)
            files[0].write_bytes(graph)
            _link_or_copy(self._base_bin, files[1])
        except OSError as e:
            for f in files:
                f.unlink(missing_ok=True)
            raise P2UError(f"cannot write the skeleton graph and base data into {self._dir}: "
                           f"{e.strerror or e}") from e

    def upgrade(self, until: int | None = None,
                background: bool = True) -> cf.Future[int] | int:
        """Apply the package's stages up to ``until`` (default: the last).

        In the background (default) returns a ``Future`` whose result is the stage reached;
        otherwise applies in this thread and returns it.
        """
        self._check_open()
        last = self.stages - 1
        target = last if until is None else int(until)
        if not 0 <= target <= last:
            raise P2UError(f"stage {target} does not exist: this package has stages 0..{last}")
        if not background:
            return self._upgrade_to(target)
        with self._cond:
            if self._closing:
                raise P2UError("the session is closed")
            if self._executor is None:
                self._executor = cf.ThreadPoolExecutor(1, thread_name_prefix="p2u-upgrade")
            return self._executor.submit(self._upgrade_to, target)

    def close(self) -> None:
        """Stop upgrading, wait for runs in flight, free the sessions and the work files."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        with self._apply_lock, self._slow_runs():
            self._drain()  # the writer lock below counts only the runs on the slow path
            with self._rw.write():
                with self._cond:
                    self._closed = True
                _release(self._live)
        self._writeback.close()
        self._cleanup()
        self._close_owned()

    def _close_owned(self) -> None:
        if self._owned is not None:
            self._owned.close()

    def __enter__(self) -> ProgressiveSession:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    def _check_open(self) -> None:
        if self._closing:
            raise P2UError("the session is closed")

    def _current(self) -> _Live:
        if self._closed:
            raise P2UError("the session is closed")
        return self._live

    def _enter(self) -> _Live:
        with self._gate:
            if self._closed:
                raise P2UError("the session is closed")
            live = self._live
            live.users += 1
            return live

    @contextlib.contextmanager
    def _slow_runs(self) -> Iterator[None]:
        """Turn :meth:`run`'s lock-free path off; inside, every new run takes the locks (turns
        with decode jobs, the writer lock, the swap's count), and the runs still on the fast
        path are waited for where it matters (:meth:`_drain`). On leaving, the fast path is on
        again unless the session is closing."""
        with self._cond:
            self._fast = False
            self._slow += 1  # nested: on_stage may apply or close
        try:
            yield
        finally:
            with self._cond:
                self._slow -= 1
                self._fast = not self._slow and not self._closing

    def _drain(self) -> None:
        """With the lock-free path off, wait for the runs still on it. Needed before the live
        session changes (a swap counts the runs of the old session, a switch takes the writer
        lock), not before decoding: a stage's first decode turns may overlap the fast runs of
        the moment the upgrade began (at most one run each) instead of waiting for them and
        then for a round of slow runs (two rounds of runs under load)."""
        with self._cond:
            live = self._live
            self._watchers += 1
            try:
                while live.fast:
                    self._cond.wait(0.05)
            finally:
                self._watchers -= 1

    def _wake(self) -> None:
        with self._gate:
            self._cond.notify_all()

    def _leave(self, live: _Live) -> None:
        with self._gate:
            live.users -= 1
            if not live.users and self._watchers:
                self._cond.notify_all()

    def _pace(self) -> ContextManager[None]:
        """The decoder decodes each run of blocks (a few ms of work) inside this: decode jobs and
        inferences take turns (:class:`TurnLock`), so that a run waits at most for the jobs in
        progress and never shares the cores with them; an idle session decodes at full speed."""
        return self._turns.hold(1)

    def _upgrade_to(self, target: int) -> int:
        with self._apply_lock:
            before = list(self._turns.contested)
            while not self._closing and self.stage < target:
                self.apply(self._source.fetch(self.stage + 1))
            self._say_share(before)
            return self.stage

    def _say_share(self, before: list[float]) -> None:
        """Warn when runs and the upgrade competed and the decoder got under half its share
        (counted by the lock since ``before``): rounds of runs longer than ``decoder_turn``
        cap its turns, and the upgrade took longer than ``1 / decoder_share`` times its idle
        time. Not said below 20 turns of competition (too short to tell)."""
        t = self._turns
        runs, dec = (now - then for now, then in zip(t.contested, before))
        if runs + dec < 20 * t.turn or dec >= 0.5 * t.share * (runs + dec):
            return
        _log.warning("the upgrade had the cores %.0f%% of the time runs competed for them "
                     "(decoder_share %.2f): runs took longer than decoder_turn (%.3f s), which "
                     "caps each of its turns; a larger decoder_turn upgrades sooner, at the "
                     "cost of longer waits for runs", 100 * dec / (runs + dec), t.share, t.turn)

    def _rebuild(self, k: int, sf: StageFile) -> None:
        """Decode stage ``k`` into its own directory, load a new session, check it, swap it in.

        Inplace (stage 1): the stage is decoded into ``weights-1.bin``, which becomes the
        session's weights (:func:`_inplace_weights`); the directory's ``weights.bin`` is a hole
        onnxruntime never reads.
        """
        d = Path(tempfile.mkdtemp(prefix=f"stage-{k}-", dir=self._dir))
        weights = self._dir / f"weights-{k}.bin" if self._strategy == "inplace" \
            else d / "weights.bin"
        live = _Live(None, k, d)
        try:
            _link_or_copy(self._dir / "graph.onnx", d / "graph.onnx")
            _link_or_copy(self._dir / "base.bin", d / "base.bin")
            self._state.advance(sf, weights, self._pace, self._writeback.add)
            _trim_heap(self._pace)  # before onnxruntime allocates the new session
            self._load(live, self._manifest, weights if self._strategy == "inplace" else None)
            if self._probe is not None:
                # At normal priority: at a lowered one its thread was descheduled while holding
                # the GIL between onnxruntime calls, and a run waited 23 ms for the GIL (MiniLM,
                # stage-0 runs +52-55 ms). Not in a turn: a new session's first run is slow
                # (its allocations), and the 100M model's 5 ms stage-0 runs waiting for it
                # came out +60-66 ms.
                self._probe.check(live.session.run, k)
        except BaseException:
            _release(live)
            shutil.rmtree(d, ignore_errors=True)
            if self._strategy == "inplace":
                weights.unlink(missing_ok=True)
            raise
        self._swap_in(live)

    def _load(self, live: _Live, manifest: dict[str, Any], weights: Path | None) -> None:
        """A new onnxruntime session for ``live`` on its directory's ``graph.onnx``: inplace
        when ``weights`` is given (every float initializer given by name, the coded weights
        over that file; the directory's ``weights.bin`` is a hole onnxruntime never reads),
        else with the caller's options."""
        d = live.directory
        assert d is not None
        options = self._options
        if weights is not None:
            options = _inplace_options(self._options)
            with open(d / "weights.bin", "wb") as f:
                f.truncate(weights_size(manifest))
            live.weights = _inplace_weights(weights, manifest)
            _given_by_name(live, manifest, (d / "graph.onnx").read_bytes(), d / "base.bin",
                           options)
        before = anonymous_regions()
        # a long call that cannot take turns with runs: at a lowered priority, and alone on
        # the cores in the decoder's turns (taken by a thread at normal priority, which lets
        # the runs in on time)
        with sharing(self._turns), lowered_priority():
            live.session = ort.InferenceSession(str(d / "graph.onnx"), options,
                                                providers=self._providers)
        # huge pages under what the build allocated (the address ranges new since before it,
        # never more than the model's share): its release at the next swap is then quick
        collapse_to_huge_pages(new_ranges(before, anonymous_regions()), self._pace,
                               limit=2 * weights_size(manifest) + (64 << 20))

    def _swap_in(self, new: _Live) -> None:
        self._drain()
        with self._cond:
            old, self._live = self._live, new
            self._watchers += 1
            try:
                while old.users:
                    self._cond.wait()
            finally:
                self._watchers -= 1
        # The release holds the GIL (onnxruntime's destructor) and gives back the old
        # session's memory: 2-3 ms on a 100M model whose memory was collapsed into huge pages
        # (_rebuild), 33-46 ms on 4 KB pages (kernels without MADV_COLLAPSE). In a decode turn,
        # alone on the cores: overlapping a run instead (started just after the run entered
        # onnxruntime), it took 13-14 ms of a core beside the 100M model's run, which took
        # 40 ms instead of 17.
        with self._pace():
            _release(old)
        with lowered_priority():  # removing its files: background work
            if old.directory is not None:
                _remove_gradually(old.directory / "weights.bin")
                shutil.rmtree(old.directory, ignore_errors=True)

    def _patch_buffers(self, k: int, sf: StageFile) -> None:
        """Inplace: decode stage ``k`` into a file (runs go on), then switch the live session's
        weights to it under the writer lock. The previous stage's file is kept until the probe
        passed: a failed patch switches back to it."""
        live = self._live
        assert live.weights is not None
        old = self._state.weights_file
        new = self._dir / f"weights-{k}.bin"
        assert old is not None and old != new
        self._state.advance(sf, new, self._pace, self._writeback.add)
        _trim_heap(self._pace)  # decoding's temporaries, before the probe runs
        try:
            probe = self._probe
            self._switch(live, new, self._tail_values(live.tail, new),
                         lambda: None if probe is None else probe.check(live.session.run, k), k)
        except BaseException:
            new.unlink(missing_ok=True)
            raise
        with lowered_priority():
            _remove_gradually(old)
