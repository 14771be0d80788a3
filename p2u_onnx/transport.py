"""Fetch p2u packages over HTTP from any static host: verified, resumable, cancellable.

Device side: needs httpx, numpy and zstandard (never onnx, click or tqdm).

A package on a server is its directory of plain files, served by anything that serves files
(nginx, a CDN, S3; no p2u code on the server). :class:`HttpSource` is the runtime's
:class:`~p2u_onnx.runtime.StageSource` for such a URL, and :func:`fetch` mirrors a package into a
directory (``p2u fetch``)::

    from p2u_onnx.runtime import ProgressiveSession
    from p2u_onnx.transport import HttpSource

    with ProgressiveSession(HttpSource("https://cdn.example.com/model.p2u/")) as s:
        y = s.run(None, feed)  # the base answers as soon as it is verified
        s.upgrade()            # the stages, applied as they arrive

How the files travel:

* ``manifest.json`` first, fetched anew on every start. When the server cannot be reached and the
  cache holds a manifest, that one is used, so a device restarts on the files it has.
* Then the base, the probe and the stages in order, one file at a time, by a background thread
  (``prefetch``): the link keeps busy while the session applies a stage. The base is fetched as
  ``stage-0.p2u`` (compressed) or as ``base.onnx`` + ``base.bin``, whichever the manifest says is
  fewer bytes.
* A file arrives in ``.p2u/NAME.part`` inside the cache directory, with the server's validator
  in ``.p2u/NAME.part.json``. It is checked against the manifest's size and sha256, then renamed
  to ``NAME``. So the cache never holds a file that failed its check, and a cached file is
  checked again before it is used.
* An interrupted transfer resumes with ``Range: bytes=N-`` and ``If-Range`` (the strong ETag,
  else Last-Modified). A server whose file changed answers 200, and the file starts over.
* Failures that may pass are retried with exponential backoff (:class:`RetryPolicy`): connection
  refused or dropped, timeouts, HTTP 408/425/429/5xx, a digest mismatch. An attempt that brought
  new bytes resets the count. Other failures are final at once: 404, 403, a size the manifest
  does not promise. Every error is a :class:`~p2u_onnx.errors.TransportError` naming the URL.

What a hostile server cannot do (docs/security.md): make the client decode or store more than
the manifest's sizes (``Accept-Encoding: identity``; an encoded file is refused, an encoded
manifest decoded under :data:`MAX_MANIFEST`; bodies are cut at the promised size); hold it
forever (every file has an overall deadline, every read ends by it, and the requests for one
file are bounded in all); lead it out of http(s), from https to http, or carry the caller's
headers to another origin (redirects are followed here, :data:`MAX_REDIRECTS` hops at most);
make it write a manifest it refused, or touch a file it did not write.

The cache directory doubles as a mirror: once everything has arrived it is a complete package
directory (``DirectorySource``, ``p2u verify``, nginx can serve it; p2u's own files are in the
hidden ``.p2u/``). It must be new, empty or a mirror already (:mod:`p2u_onnx._mirror`). Without
``cache_dir``, files go to a temporary directory that :meth:`HttpSource.close` removes.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import math
import os
import re
import selectors
import shutil
import socket
import ssl
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import httpcore
    import httpx
except ImportError as e:  # the device-only install without its [http] extra
    raise ImportError(f"p2u_onnx.transport (packages at a URL) needs httpx, not installed ({e}): "
                      "pip install 'p2u-onnx-runtime[http]' on a device", name=e.name) from e

from . import __version__, _workdir
from ._mirror import MirrorDir
from .errors import FormatError, P2UError, TransportError, TrustError
from .format import MANIFEST_NAME, check_name, json_limits, open_regular, package_file, \
    parse_manifest, read_stage, sha256_file
from .trust import MAX_SIGNATURE, SIGNATURE_NAME, Policy, TrustSpec, check_signature, package_identity

try:  # POSIX: lock the cache directory while a file is downloaded into it
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["HttpSource", "RetryPolicy", "fetch"]

Progress = Callable[[int, int], None]
"""``progress(done, total)``: bytes of the planned files present in the cache, and their sum."""

MAX_MANIFEST = 16 << 20
"""Bytes of ``manifest.json`` at most; a larger one is refused while it streams in."""
MAX_FILE = 1 << 40
"""Bytes of one package file at most (1 TiB): a manifest that lists more is refused before
anything is written."""
MAX_REDIRECTS = 5
"""Redirect hops followed for one request."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
# ASCII digits, at most 40 (int() of more than 4300 digits is a ValueError, not a refusal)
_CONTENT_RANGE = re.compile(r"bytes\s+([0-9]{1,40})-([0-9]{1,40})/([0-9]{1,40}|\*)")
_HINTS = {
    401: "the server wants credentials (pass headers=...)",
    403: "the server refuses: are the files readable by the web server?",
    404: "no such file on the server: the URL must name the package directory",
    410: "the package was removed from the server",
}
# Sent to another origin after a redirect: only what the request is about, never the caller's
# headers (Authorization, API keys, cookies...).
_SAFE_HEADERS = {"accept-encoding", "range", "if-range", "cache-control", "user-agent"}


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How hard :class:`HttpSource` tries before it gives up.

    ``attempts``: tries per request in a row that bring no new bytes. ``backoff``: the first wait
    in seconds, doubled after each failure up to ``max_backoff`` (a server's ``Retry-After`` is
    honoured up to ``max_backoff``). ``timeout``: seconds to connect, and at most between two
    reads (a stalled transfer fails after it, then resumes). ``digest_attempts``: complete
    downloads of one file whose sha256 does not match the manifest before giving up.

    Bounds over a whole file, however the server behaves (a server that drips bytes, or gives
    a few new bytes per attempt, cannot hold a client forever):

    * ``max_attempts_total`` (100): requests for one file, all attempts counted, those that
      brought new bytes too.
    * ``deadline`` (600 s) and ``min_rate`` (1024 bytes/s): one file, retries and waits
      included, must be complete within ``deadline + size / min_rate`` seconds (the manifest,
      whose size is not known in advance, within ``deadline``). Every connect, read and write
      ends by the deadline (a server dripping its headers or body cannot stretch a request),
      and no retry starts that could not finish before it. A link slower than ``min_rate`` on
      average cannot fetch a large file in time: lower it for such links.
    """

    attempts: int = 6
    backoff: float = 0.5
    max_backoff: float = 10.0
    timeout: float = 30.0
    digest_attempts: int = 3
    deadline: float = 600.0
    min_rate: float = 1024.0
    max_attempts_total: int = 100

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.digest_attempts < 1 or self.max_attempts_total < 1:
            raise ValueError("attempts, digest_attempts and max_attempts_total must be at "
                             "least 1")
        if not 0 <= self.backoff <= self.max_backoff:
            raise ValueError("need 0 <= backoff <= max_backoff")
        if not all(0 < x < math.inf for x in (self.timeout, self.deadline, self.min_rate)) \
                or not 0 <= self.max_backoff < math.inf:  # NaN fails these too
            raise ValueError("timeout, deadline and min_rate must be positive and finite")

    def budget(self, size: int | None = None) -> float:
        """Seconds one file of ``size`` bytes may take in all (None: the manifest)."""
        return self.deadline + (size / self.min_rate if size else 0.0)

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row (1, 2, ...)."""
        return min(self.max_backoff, self.backoff * 2.0 ** (failures - 1))


@dataclass(frozen=True)
class _Entry:
    """A file the manifest lists: plain name, size and sha256."""

    name: str
    size: int
    sha256: str


class _Retry(Exception):
    """A failed attempt that may succeed later (internal)."""

    def __init__(self, reason: str, *, gained: int = 0, retry_after: float | None = None,
                 network: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.gained = gained  # new bytes this attempt kept
        self.retry_after = retry_after
        self.network = network  # the server could not be reached at all


class HttpSource:
    """A p2u package at an HTTP(S) URL, as a :class:`~p2u_onnx.runtime.StageSource`.

    ``url`` names the package directory (``.../model.p2u/``; a URL ending in
    ``manifest.json`` works too). ``cache_dir`` keeps the files across restarts (default: a
    temporary directory removed by :meth:`close`). ``progress(done, total)`` is called with
    bytes, from the thread that downloads. ``cancel`` is an event that stops every transfer
    (as :meth:`cancel` does); waits and transfers then raise :class:`TransportError`.
    ``prefetch=True`` downloads the base, the probe and every stage in order in a background
    thread from construction on; with ``False`` each file is fetched when asked for. ``headers``
    are sent with every request to the package's origin (e.g. authorization), never to another
    origin a redirect leads to; ``client`` is an ``httpx.Client`` to use instead of one made here
    (then its headers and transport apply, with the same rule for redirects; :meth:`close` can
    then not break a stalled read, which ends at ``timeout``, and the deadline is checked at
    each chunk rather than each read). ``mirror=True`` makes
    :meth:`download` fetch every file the manifest lists (stage 0 besides the base files).

    ``cache_dir`` must be new, empty, or a mirror p2u made (it has a ``.p2u/`` folder, where the
    lock and the partial files live): p2u never replaces or removes a file it did not write
    there (see :mod:`p2u_onnx._mirror`). A manifest is written there only once it is accepted.

    ``expect="sha256:<hex>"`` pins the exact bytes of ``manifest.json``; ``trust`` (public
    keys, see :mod:`p2u_onnx.trust`) asks for a valid, unexpired ``manifest.json.sig`` beside
    it, fetched with it (and kept in the cache, so that an offline restart is checked too).
    A manifest whose model name this device (its version state) accepted with a higher version,
    or with the same version and other content, or whose version is lower than the cached
    manifest's, is refused unless ``allow_rollback=True``. A refused manifest is never written
    to the cache, and the cached files stay as they were. An accepted manifest's version is
    recorded in the version state.

    The manifest is fetched in the constructor, which raises :class:`TransportError`,
    :class:`~p2u_onnx.errors.FormatError` or :class:`~p2u_onnx.errors.TrustError`.

    >>> src = HttpSource("http://127.0.0.1:8000/", cache_dir="cache")  # doctest: +SKIP
    >>> session = ProgressiveSession(src)                                # doctest: +SKIP
    """

    def __init__(self, url: str, cache_dir: str | os.PathLike | None = None, *,
                 retry: RetryPolicy | None = None, progress: Progress | None = None,
                 cancel: threading.Event | None = None, prefetch: bool = True,
                 headers: dict[str, str] | None = None, client: httpx.Client | None = None,
                 mirror: bool = False, expect: str | None = None,
                 trust: TrustSpec | None = None, allow_rollback: bool = False):
        self._policy = Policy.make(expect, trust, allow_rollback)  # bad arguments: no request
        self._mirroring = mirror
        self._signature: bytes | None = None
        self._signature_known = False
        self.manifest_bytes = b""
        self.url = _package_url(url)  # without user:password, which no message may show
        basic = _basic_auth(url)  # user:password in the URL: HTTP basic auth, to its origin only
        if basic is not None and not any(k.lower() == "authorization" for k in headers or {}):
            headers = {**(headers or {}), "Authorization": basic}
        self._retry = retry or RetryPolicy()
        self._progress = progress
        self._cancel = cancel if cancel is not None else threading.Event()
        self._stop = threading.Event()
        self._prefetch = prefetch
        self._own_client = client is None
        self._transport = _Transport(self._halted)
        for k, v in (headers or {}).items():  # httpx would raise a bare UnicodeEncodeError
            if not (isinstance(k, str) and isinstance(v, str) and k.isascii() and v.isascii()):
                raise P2UError(f"headers: {_short(repr(k), 40)} must be an ASCII string with an "
                               "ASCII string value")
        self._client = client if client is not None else httpx.Client(
            timeout=httpx.Timeout(self._retry.timeout), follow_redirects=False,
            headers={"User-Agent": f"p2u-onnx/{__version__}", **(headers or {})},
            transport=self._transport)
        self._headers = dict(headers or {}) if client is not None else {}
        if cache_dir is None:  # named after this process: removed by the next one if it dies
            _workdir.sweep(tempfile.gettempdir(), "p2u-http-")
            self.cache_dir = _workdir.make_dir(tempfile.gettempdir(), "p2u-http-")
            self._cleanup: Any = weakref.finalize(self, _workdir.remove_tree, str(self.cache_dir))
        else:
            self.cache_dir = Path(cache_dir)
            self._cleanup = None
        self._worker: threading.Thread | None = None
        self._cond = threading.Condition(threading.Lock())
        self._results: dict[Any, Any] = {}
        self._errors: dict[Any, BaseException] = {}
        self._queue: list[Any] = []
        self._current: Any = None
        self._have: dict[str, int] = {}
        self.offline = False
        try:
            self._mirror = MirrorDir.open(self.cache_dir)  # before any network: refuse early
            self.manifest = self._load_manifest()
            self._stage_files = [[_entry(f, self.url) for f in st["files"]]
                                 for st in self.manifest["stages"]]
            base = {Path(f["path"]).name: _entry(f, self.url)
                    for f in self.manifest["base_model"]["files"]}
            # an update package has no base of its own: its stage 0 applies to what the
            # device holds (ProgressiveSession.update fetches it as a stage)
            update = self.manifest.get("predecessor") is not None
            self._base_files = [] if update else \
                [base[n] for n in ("base.onnx", "base.bin") if n in base]
            if len(self._base_files) != 2 and not update:
                raise FormatError(f"{self.url}{MANIFEST_NAME}: the base must be base.onnx + "
                                  "base.bin")
            probe = self.manifest.get("probe")
            self._probe = _entry(probe, self.url) if probe else None
            self._base_route = self._stage_files[0] if update else self._base_plan()
            self._jobs = [0 if update else "base", "probe", *range(1, len(self._stage_files))]
            if mirror and not update:
                self._jobs.append(0)
            planned = self._planned(mirror)
            self._total = sum(f.size for f in planned)
            self._planned_names = {f.name for f in planned}
            self._commit_manifest()  # accepted: only now is it written to the cache
        except (KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
            self.close()  # a manifest of the wrong shape: one line, never a traceback
            raise FormatError(f"{self.url}{MANIFEST_NAME}: malformed manifest "
                              f"({type(e).__name__}: {_short(str(e))})") from None
        except BaseException:
            self.close()
            raise
        if prefetch:
            self._start_worker(self._jobs)

    # -- the StageSource protocol

    def base_files(self, workdir: Path | None = None) -> tuple[Path, Path]:
        """Verified ``base.onnx`` and ``base.bin`` in the cache (``workdir`` is not used)."""
        return self._need("base")

    def fetch(self, stage: int) -> Path:
        """The verified file of stage ``stage`` in the cache (waits for it)."""
        n = len(self._stage_files)
        if not 0 <= stage < n:
            raise P2UError(f"stage {stage} does not exist: {self.url} has stages 0..{n - 1}")
        return self._need(stage)

    def probe_bytes(self) -> bytes | None:
        """The verified probe file, or None when the package has none."""
        path = self._need("probe")
        if path is None:
            return None
        with open_regular(path) as fh:
            return fh.read()

    def signature_bytes(self) -> bytes | None:
        """``manifest.json.sig`` as the server (or, offline, the cache) has it, or None."""
        if not self._signature_known:
            self._signature = self._get_signature()
            self._signature_known = True
        return self._signature

    # -- more

    def download(self) -> Path:
        """Fetch everything the session needs (and with ``mirror=True`` every file the
        manifest lists) now; returns the cache directory."""
        for job in self._jobs:
            self._need(job)
        self._policy.record(self.manifest)
        return self.cache_dir

    def cancel(self) -> None:
        """Stop every transfer (a stalled read too, within a second); waiting calls raise
        :class:`TransportError`."""
        self._cancel.set()
        self._transport.abort()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def close(self) -> None:
        """Stop the background thread, close the connections, remove a temporary cache.

        A download in flight stops within a second: at its next chunk, or, stalled in a read,
        when its connection is shut down here (with a ``client`` of the caller's, at
        ``timeout``)."""
        self._stop.set()
        self._transport.abort()
        worker = self._worker if self._worker is not threading.current_thread() else None
        if worker is not None:
            worker.join(1.0)
        if self._own_client:
            self._client.close()
        if worker is not None:
            worker.join(self._retry.timeout)
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> HttpSource:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HttpSource({self.url!r}, cache_dir={str(self.cache_dir)!r})"

    # -- jobs: "base", "probe", stage numbers; run by the worker or by the caller

    def _planned(self, mirror: bool) -> list[_Entry]:
        files = list(self._base_route)
        if self._probe is not None:
            files.append(self._probe)
        for k, st in enumerate(self._stage_files):
            if k >= 1 or (mirror and files[0] != st[0]):
                files += st
        return files

    def _base_plan(self) -> list[_Entry]:
        """Files that bring the base: base.onnx + base.bin when the cache has them, else
        stage 0 or those two, whichever is fewer bytes."""
        direct = self._base_files
        stage0 = self._stage_files[0]
        if all(_size_is(self.cache_dir / f.name, f.size) for f in direct):
            return direct
        if len(stage0) == 1 and stage0[0].size < sum(f.size for f in direct):
            return stage0
        return direct

    def _run(self, job: Any) -> Any:
        if job == "base":
            return self._job_base()
        if job == "probe":
            return None if self._probe is None else self._file(self._probe)
        paths = [self._file(f) for f in self._stage_files[job]]
        return paths[0]

    def _job_base(self) -> tuple[Path, Path]:
        paths = tuple(self.cache_dir / f.name for f in self._base_files)
        if all(self._cached(f) for f in self._base_files):
            return paths  # type: ignore[return-value]
        plan = self._base_route
        if plan is self._base_files:
            for f in plan:
                self._file(f)
            return paths  # type: ignore[return-value]
        from .reconstruct import (  # numpy + zstandard: only when unpacking
            check_disk_room, check_entries, extract_file)

        entry = plan[0]
        sf = read_stage(self._file(entry), package_id=self.manifest["package_id"], stage=0,
                        verify_payload=False, manifest=self.manifest)  # sha256 checked on arrival
        check_entries(sf, {f.name: f.size for f in self._base_files})  # before any decoding
        check_disk_room(f"the base files inside {entry.name}",
                        sum(f.size for f in self._base_files), self.cache_dir)
        for f in self._base_files:  # size and sha256 checked against the manifest's
            self._mirror.write(f.name, extract_file(sf, f.name, size=f.size, sha256=f.sha256))
        return paths  # type: ignore[return-value]

    def _need(self, job: Any) -> Any:
        with self._cond:
            # A failure from before this request (the prefetch's, while nobody waited for the
            # job: a full disk since freed, a dropped connection) is not handed out: the
            # request tries again, resuming what the failed attempt had downloaded.
            self._errors.pop(job, None)
            while True:
                self._check_halt(self.url)
                if job in self._results:
                    return self._results[job]
                if job in self._errors:
                    raise self._errors.pop(job)
                if job != self._current and job not in self._queue:
                    if not self._prefetch:
                        break
                    later = self._jobs[self._jobs.index(job):] if job in self._jobs else [job]
                    self._start_worker(later)
                self._cond.wait(0.1)
        value = self._run(job)
        with self._cond:
            self._results[job] = value
        return value

    def _start_worker(self, jobs: list[Any]) -> None:
        """(Re)start the background thread on ``jobs``; when it runs, jobs it does not have
        yet go first (call with ``_cond`` held, or before the thread exists)."""
        if self._worker is not None and self._worker.is_alive():
            self._queue[:0] = [j for j in jobs if j not in self._queue and j != self._current]
            return
        self._queue = [j for j in jobs if j not in self._results]
        self._worker = threading.Thread(target=self._work, name="p2u-http", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._queue or self._halted():
                    self._current = None
                    self._queue = []
                    self._cond.notify_all()
                    return
                job = self._current = self._queue.pop(0)
            try:
                value = self._run(job)
            except BaseException as e:  # noqa: BLE001 - handed to whoever needs the job
                with self._cond:
                    self._errors[job] = e
                    self._current = None
                    self._queue = []
                    self._cond.notify_all()
                return
            with self._cond:
                self._results[job] = value
                self._current = None
                self._cond.notify_all()

    # -- one file: cache, .part, resume, verify, rename

    def _cached(self, f: _Entry) -> bool:
        """Whether the cache holds ``f`` intact. A file there that does not match is removed
        when p2u wrote it, and refused (:class:`P2UError`) when it did not: p2u never replaces
        a file of the user's."""
        path = package_file(self.cache_dir, f.name, "cached file")
        try:
            if path.stat().st_size == f.size and sha256_file(path, pace=self._pace) == f.sha256:
                self._count(f.name, f.size)
                return True
        except OSError:
            return False
        if not self._mirror.owns(f.name):
            raise P2UError(f"{path} is not the file the manifest lists, and p2u did not write "
                           "it: it is left as it is (move it away to fetch the package there)")
        self._mirror.remove(f.name)
        return False

    def _file(self, f: _Entry) -> Path:
        """``f`` in the cache, downloaded if needed; checked against the manifest."""
        final = self.cache_dir / f.name
        if self._cached(f):
            return final
        with self._locked():
            if self._cached(f):  # another process finished it while we waited
                return final
            url = self.url + f.name
            part = self._mirror.part(f.name)
            meta_path = self._mirror.part_meta(f.name)
            bad = 0

            def attempt(end: float) -> None:
                nonlocal bad
                for p in (part, meta_path):  # p2u's own files: a link planted there is dropped
                    if os.path.islink(p) or (p.exists() and not p.is_file()):
                        _unlink(p)
                meta = _read_meta(meta_path, f)  # what the last attempt left
                have = part.stat().st_size if meta is not None and part.exists() else 0
                if have > f.size:
                    have = 0
                if have < f.size or not part.exists():
                    self._transfer(url, f, part, meta_path, meta, have, end)
                if sha256_file(part, pace=self._pace) == f.sha256:
                    return
                bad += 1
                _unlink(part)
                _unlink(meta_path)
                self._count(f.name, 0)
                reason = (f"sha256 does not match the manifest after {bad} complete "
                          "download(s) (corrupted in transit, or the package changed on the "
                          "server)")
                if bad >= self._retry.digest_attempts:
                    raise TransportError(reason, url)
                raise _Retry(reason)

            try:
                self._retrying(url, attempt, self._retry.budget(f.size))
                with open(part, "rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError as e:  # a full disk, a read-only cache...
                raise P2UError(f"cannot write {part}: {e.strerror or e}") from e
            self._mirror.install(part, f.name)
            _unlink(meta_path)
            return final

    def _transfer(self, url: str, f: _Entry, part: Path, meta_path: Path,
                  meta: dict[str, Any] | None, have: int, end: float) -> None:
        """One GET of ``f`` into ``part`` from byte ``have`` (0: from scratch), to finish by
        ``end`` (monotonic seconds).

        ``meta`` is the validator record of the bytes in ``part``; a 200 answer replaces both.
        Nothing is written before the status, the encoding and the sizes the answer declares are
        checked against the manifest, and never more than the manifest's size.

        Raises :class:`_Retry` when the attempt failed in a way that may pass.
        """
        headers = {**self._headers, "Accept-Encoding": "identity"}
        if have and meta is not None:
            headers["Range"] = f"bytes={have}-"
            validator = _strong(meta.get("etag")) or meta.get("last_modified")
            if validator:
                headers["If-Range"] = validator
        _check_space(part, f.size - have, url)
        gained = 0
        try:
            with self._open(url, headers, end, f.size) as r:
                if r.status_code not in (200, 206, 416):
                    raise _status_error(r, url)
                encoding = r.headers.get("content-encoding", "identity").strip().lower()
                if encoding != "identity":
                    raise TransportError(f"the server sent Content-Encoding {_short(encoding)} "
                                         "although "
                                         "identity was asked; serve the files as they are", url)
                length = _content_length(r, url)
                if r.status_code == 206 and "Range" in headers:
                    start, last, total = _content_range(r, url)
                    if total is not None and total != f.size:
                        raise _size_error(url, total, f.size)
                    if start != have:
                        raise _Retry(f"server resumed at byte {start}, not {have}")
                    if last >= f.size or (length is not None and length != last + 1 - start):
                        raise TransportError(
                            f"the server's Content-Range bytes {start}-{last} does not fit the "
                            f"file's {f.size} bytes or its Content-Length {length}", url)
                    limit, mode = last + 1, "ab"
                elif r.status_code == 200:
                    if length is not None and length != f.size:
                        raise _size_error(url, length, f.size)
                    have, limit, mode = 0, f.size, "wb"
                    meta = {"sha256": f.sha256, "size": f.size,
                            "etag": r.headers.get("etag"),
                            "last_modified": r.headers.get("last-modified")}
                    _write_atomic(meta_path, json.dumps(meta).encode())
                elif r.status_code == 416:
                    _unlink(part)
                    raise _Retry("HTTP 416 Range Not Satisfiable (the file shrank on the server?)")
                else:  # 206 to a request without Range
                    raise TransportError("the server answered 206 to a request for the whole "
                                         "file", url)
                with _open_part(part, mode) as out:
                    self._count(f.name, have)
                    for chunk in r.iter_raw():
                        self._check_halt(url)
                        if have + len(chunk) > limit:
                            raise TransportError(f"the server sent more than the {f.size} "
                                                 "bytes the manifest promises", url)
                        out.write(chunk)
                        have += len(chunk)
                        gained += len(chunk)
                        self._count(f.name, have)
                        if time.monotonic() >= end:
                            raise self._deadline_error(url, f.size)
        except httpx.HTTPError as e:
            if time.monotonic() >= end:
                raise self._deadline_error(url, f.size) from e
            raise _network_retry(e, self._retry.timeout, have, f.size, gained) from e
        except _Retry as e:
            e.gained = gained
            raise
        if have < f.size:
            raise _Retry(f"connection closed after {have} of {f.size} bytes", gained=gained)

    def _retrying(self, url: str, attempt: Callable[[float], Any], budget: float) -> Any:
        """Run ``attempt(end)`` until it succeeds, retrying :class:`_Retry` with backoff: at
        most ``attempts`` failures in a row, ``max_attempts_total`` tries in all, and
        ``budget`` seconds in all (``end``: the monotonic time by which it must finish)."""
        end = time.monotonic() + budget
        failures = tries = 0
        while True:
            self._check_halt(url)
            tries += 1
            try:
                return attempt(end)
            except _Retry as e:
                failures = 1 if e.gained else failures + 1
                if failures >= self._retry.attempts:
                    n = f"{failures} attempt{'s' if failures > 1 else ''}"
                    raise TransportError(f"{e.reason} (gave up after {n})", url) from e
                if tries >= self._retry.max_attempts_total:
                    raise TransportError(f"{e.reason} (gave up after {tries} attempts in all)",
                                         url) from e
                wait = self._retry.delay(failures) if e.retry_after is None else \
                    min(e.retry_after, self._retry.max_backoff)
                if time.monotonic() + wait >= end:
                    raise TransportError(f"{e.reason} (gave up: no time left before the "
                                         f"deadline of {_secs(budget)} s)", url) from e
                self._sleep(wait, url)

    def _deadline_error(self, url: str, size: int | None) -> TransportError:
        budget = self._retry.budget(size)
        how = f"{_secs(self._retry.deadline)} s" + \
            (f" + {size} bytes at {self._retry.min_rate:g} bytes/s" if size else "")
        return TransportError(f"not complete within its deadline of {_secs(budget)} s ({how}): "
                              "the server is too slow or stalls on purpose", url)

    @contextlib.contextmanager
    def _open(self, url: str, headers: dict[str, str], end: float,
              size: int | None = None) -> Iterator[httpx.Response]:
        """GET ``url``, following at most :data:`MAX_REDIRECTS` redirects, yielding the
        streamed answer.

        Redirects lead only to http(s), never from https to plain http. ``headers`` (and the
        client's own headers and credentials) go only to the origin of ``url``; another origin
        receives just the headers about the request itself (``_SAFE_HEADERS``).
        """
        outer = getattr(_DEADLINE, "end", None)
        _DEADLINE.end = end  # every read and write of this thread's connections ends by then
        try:
            with self._follow(url, headers, end, size) as r:
                yield r
        finally:
            _DEADLINE.end = outer

    @contextlib.contextmanager
    def _follow(self, url: str, headers: dict[str, str], end: float,
                size: int | None) -> Iterator[httpx.Response]:
        current = httpx.URL(url)
        origin = _origin(current)
        for _hop in range(MAX_REDIRECTS + 1):
            left = end - time.monotonic()
            if left <= 0:
                raise self._deadline_error(url, size)
            timeout = httpx.Timeout(min(self._retry.timeout, left))
            if _origin(current) == origin:
                request = self._client.build_request("GET", current, headers=headers,
                                                     timeout=timeout)
                r = self._send(request, url)
            else:
                safe = {k: v for k, v in headers.items() if k.lower() in _SAFE_HEADERS}
                safe.setdefault("User-Agent", f"p2u-onnx/{__version__}")
                request = httpx.Request("GET", current, headers=safe,
                                        extensions={"timeout": timeout.as_dict()})
                r = self._send(request, url, auth=None)
            if not r.has_redirect_location:
                try:
                    yield r
                finally:
                    r.close()
                return
            location = r.headers.get("location", "")
            r.close()
            try:
                target = current.join(location)
            except (httpx.InvalidURL, ValueError, TypeError) as e:
                raise TransportError(f"redirected to an invalid URL {location!r}", url) from e
            if target.scheme not in ("http", "https") or not target.host:
                raise TransportError(f"redirected to {_short(location)}: only http:// and "
                                     "https:// redirects are followed", url)
            if current.scheme == "https" and target.scheme == "http":
                raise TransportError(f"redirected from https to plain http ({_short(location)}):"
                                     " a downgrade, refused", url)
            current = target
        raise TransportError(f"more than {MAX_REDIRECTS} redirects", url)

    def _send(self, request: httpx.Request, url: str, **kw: Any) -> httpx.Response:
        try:
            return self._client.send(request, stream=True, follow_redirects=False, **kw)
        except httpx.InvalidURL as e:  # httpx parses a redirect's Location even unfollowed
            raise TransportError(f"redirected to an invalid URL, or not to http(s) ({e})",
                                 url) from e

    # -- the manifest

    def _get_manifest(self, url: str, end: float, cap: int = MAX_MANIFEST,
                      what: str = "the manifest") -> bytes:
        """The manifest's bytes, refused while they stream in once past ``cap`` bytes (a gzip
        or deflate body the server sends anyway is decoded under the same bound)."""
        headers = {**self._headers, "Cache-Control": "no-cache", "Accept-Encoding": "identity"}
        cap = min(cap, json_limits()[0])  # $P2U_MAX_MANIFEST on a small device
        too_big = f"{what} is larger than the {cap}-byte limit (refused)"
        try:
            with self._open(url, headers, end) as r:
                if r.status_code != 200:
                    raise _status_error(r, url)
                length = _content_length(r, url)
                if length is not None and length > cap:
                    raise TransportError(f"{too_big}; Content-Length says {length}", url)
                decode = _Decoder(r.headers.get("content-encoding", "identity"), url)
                body = bytearray()
                for chunk in r.iter_raw():
                    self._check_halt(url)
                    body += decode(chunk, cap + 1 - len(body))
                    if len(body) > cap:
                        raise TransportError(too_big, url)
                    if time.monotonic() >= end:
                        raise self._deadline_error(url, None)
                body += decode.finish(cap + 1 - len(body))
                if len(body) > cap:
                    raise TransportError(too_big, url)
                return bytes(body)
        except httpx.HTTPError as e:
            if time.monotonic() >= end:
                raise self._deadline_error(url, None) from e
            raise _network_retry(e, self._retry.timeout) from e

    def _load_manifest(self) -> dict[str, Any]:
        """Fetch and parse the manifest (not yet written: see :meth:`_commit_manifest`)."""
        url = self.url + MANIFEST_NAME
        cached_path = self.cache_dir / MANIFEST_NAME
        cached = _read_cached_manifest(cached_path) if self._mirror.owns(MANIFEST_NAME) \
            else None
        self._cached_manifest = cached
        text = None
        if cached is not None:  # one try: offline, the cached manifest lets the device start
            try:
                text = self._get_manifest(url, time.monotonic() + self._retry.budget())
            except _Retry as e:
                if e.network and not self._halted():
                    self.offline = True
                    self._manifest_text = cached[0]
                    return self._admit_offline(cached[0], cached_path)
        if text is None:
            text = self._retrying(url, lambda end: self._get_manifest(url, end),
                                  self._retry.budget())
        manifest = self._admit(text, url, None if cached is None else cached[1])
        self._manifest_text = text
        return manifest

    def _commit_manifest(self) -> None:
        """Write the accepted manifest (and its signature) to the cache, forget the cached files
        of the one it replaces, and record its version. Called once every check has passed."""
        cached, text = self._cached_manifest, self._manifest_text
        if cached is None or cached[0] != text:
            with self._locked():
                if cached is not None:
                    self._forget(cached[1], self.manifest)
                self._mirror.write(MANIFEST_NAME, text)
        self._cache_signature()
        if self._policy.authenticates:
            # Unauthenticated, the version is recorded only once the package is used (by
            # download() here, or by the session, which may check a pin or signature of its
            # own first): else a hostile server could raise the remembered version of a model
            # through a source that a session then refuses, and freeze it out of updates.
            self._policy.record(self.manifest)
    def _admit(self, text: bytes, url: str, cached: dict[str, Any] | None) -> dict[str, Any]:
        """The manifest in ``text`` if it passes the pin, the signature and the version checks
        (:class:`TrustError` otherwise: nothing is written then)."""
        policy = self._policy
        policy.check_pin(text, url)
        manifest = parse_manifest(text, url)
        self.manifest_bytes = text
        if policy.keys:
            self.signature_bytes()
        elif self._mirroring:  # a mirror keeps the signature a package has, when it can get it
            try:
                self.signature_bytes()
            except TransportError:  # not asked for: a server failing on it is no reason to fail
                self._signature = None
        if policy.keys:
            check_signature(self._signature, text, manifest, policy.keys, url)
        elif self._signature is not None and not _signs(self._signature, text):
            self._signature = None  # a stale signature of another release: not mirrored
        policy.check_version(manifest, url)
        ident = package_identity(manifest, url)
        try:
            old = None if cached is None else package_identity(cached)
        except FormatError:
            old = None
        if ident and old and ident[0] == old[0] and ident[1] < old[1] \
                and not policy.allow_rollback:
            msg = (f"{url}: model {ident[0]!r} version {ident[1]} is older than version "
                   f"{old[1]} in the cache {self.cache_dir} (rollback refused; the cache is "
                   "kept as it is)")
            raise TrustError(f"{msg}; pass allow_rollback=True to accept it",
                             cli=f"{msg}; use --allow-rollback to accept it")
        return manifest

    def _admit_offline(self, text: bytes, path: Path) -> dict[str, Any]:
        """The cached manifest, checked as a fresh one would be (signature from the cache)."""
        self._signature = _read_small(self.cache_dir / SIGNATURE_NAME)
        self._signature_known = True
        policy = self._policy
        policy.check_pin(text, str(path))
        manifest = parse_manifest(text, str(path))
        self.manifest_bytes = text
        if policy.keys:
            check_signature(self._signature, text, manifest, policy.keys, str(path))
        policy.check_version(manifest, str(path))
        return manifest

    def _get_signature(self) -> bytes | None:
        """``manifest.json.sig`` from the server, or None when it has none (404, 403, 410)."""
        url = self.url + SIGNATURE_NAME
        try:
            return self._retrying(url, lambda end: self._get_manifest(
                url, end, MAX_SIGNATURE, "the signature file"),
                                  self._retry.budget())
        except TransportError as e:
            if re.search(r"HTTP (?:403|404|410)\b", str(e)):
                return None
            raise

    def _cache_signature(self) -> None:
        """Keep the accepted manifest's signature beside it in the cache (or none)."""
        path = self.cache_dir / SIGNATURE_NAME
        if self._signature is None:
            if self._signature_known or not _signs(_read_small(path) or b"", self.manifest_bytes):
                self._mirror.remove(SIGNATURE_NAME)
        elif _read_small(path) != self._signature:
            self._mirror.write(SIGNATURE_NAME, self._signature)

    def _forget(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Remove cached files of ``old`` that ``new`` does not list with the same digest
        (only files p2u wrote; a file of the user's is never removed)."""
        keep = {(f.get("path"), f.get("sha256")) for f in _listed(new)}
        for f in _listed(old):
            name = f.get("path")
            try:
                check_name(name)
            except FormatError:
                continue
            if (name, f.get("sha256")) not in keep:
                self._mirror.remove(name)

    # -- helpers

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the cache directory's lock, ``.p2u/lock`` (other processes and threads wait
        for it, at most as long as the whole package may take to download: a process that
        holds it forever cannot hang this one)."""
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self._mirror.lock_path, os.O_RDWR | os.O_CREAT
                     | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)
        wait = self._retry.budget(getattr(self, "_total", None))
        end = time.monotonic() + wait
        with os.fdopen(fd, "r+b") as fh:
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= end:
                        raise P2UError(f"{self.cache_dir}: another process has held the cache's "
                                       f"lock ({self._mirror.lock_path}) for {_secs(wait)} s; "
                                       "giving up") from None
                    self._sleep(0.05, self.url)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _count(self, name: str, have: int) -> None:
        if self._progress is None or name not in self._planned_names:
            return
        with self._cond:
            self._have[name] = have
            done = sum(self._have.values())
        self._progress(min(done, self._total), self._total)

    def _pace(self) -> contextlib.AbstractContextManager[None]:
        """Called per hashed chunk (4 MiB): a closed or cancelled source stops hashing a large
        file at once, not after it (about 2 s per GB)."""
        self._check_halt(self.url)
        return contextlib.nullcontext()

    def _halted(self) -> bool:
        return self._cancel.is_set() or self._stop.is_set()

    def _check_halt(self, url: str) -> None:
        if self._cancel.is_set():
            raise TransportError("cancelled", url)
        if self._stop.is_set():
            raise TransportError("the source is closed", url)

    def _sleep(self, seconds: float, url: str) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._check_halt(url)
            self._cancel.wait(min(left, 0.1))
        self._check_halt(url)


class _Transport(httpx.BaseTransport):
    """httpx's own transports, one per scheme, each made on first use, whose connections
    :meth:`abort` can shut down from another thread (what lets ``close()`` stop a read that
    stalls).

    Loading the CA bundle for TLS takes about 50 ms, which a package on plain http:// (a LAN,
    a device's local server) never needs: that is 50 ms less before the first inference.
    """

    def __init__(self, halted: Callable[[], bool] | None = None) -> None:
        self._lock = threading.Lock()
        self._made: dict[str, httpx.HTTPTransport] = {}
        self._backend = _Backend(halted)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        tls = request.url.scheme == "https"
        with self._lock:
            t = self._made.get(request.url.scheme)
            if t is None:
                # verify=False only where no TLS ever happens: plain http:// requests (proxies
                # from the environment have transports of their own).
                t = self._made[request.url.scheme] = httpx.HTTPTransport() if tls else \
                    httpx.HTTPTransport(verify=False)
                pool = getattr(t, "_pool", None)
                if hasattr(pool, "_network_backend"):  # httpcore's pool: track its sockets
                    pool._network_backend = self._backend
        return t.handle_request(request)

    def abort(self) -> None:
        """Shut down every open connection (a read blocked on one returns at once)."""
        self._backend.abort()

    def close(self) -> None:
        with self._lock:
            for t in self._made.values():
                t.close()
            self._made.clear()


class _Backend(httpcore.SyncBackend):
    """httpcore's network backend, remembering the sockets it opens for :meth:`abort`.

    Connecting and reading wait in slices of :data:`_SLICE` seconds and stop when ``halted()``
    says so (the source was closed or cancelled, the caller's ``cancel`` event too) or after
    :meth:`abort`: a connection attempt that hangs (a full accept queue, a black-holed address)
    or a server that never answers cannot hold ``close()`` past a second."""

    def __init__(self, halted: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._socks: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._halted = halted
        self._aborted = threading.Event()

    def stopped(self) -> bool:
        return self._aborted.is_set() or (self._halted is not None and self._halted())

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None,
                    ) -> httpcore.NetworkStream:
        timeout = _clamp(timeout)
        if _SyncStream is None:  # pragma: no cover - another httpcore layout
            return _Tracked(super().connect_tcp(host, port, timeout, local_address,
                                                socket_options), self)
        end = None if timeout is None else time.monotonic() + timeout
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise httpcore.ConnectError(str(e)) from e
        last: OSError | None = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                if local_address is not None:
                    sock.bind((local_address, 0))
                for option in socket_options or ():
                    sock.setsockopt(*option)
                self._connect(sock, address, end)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return _Tracked(_SyncStream(sock), self)
            except OSError as e:
                sock.close()
                last = e
            except BaseException:
                sock.close()
                raise
        raise httpcore.ConnectError(str(last or "no address"))

    def _connect(self, sock: socket.socket, address: Any, end: float | None) -> None:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            raise OSError(err, os.strerror(err))
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_WRITE)
            while err:
                if self.stopped():
                    raise httpcore.ConnectError("cancelled")
                left = _SLICE if end is None else min(_SLICE, end - time.monotonic())
                if left <= 0:
                    raise httpcore.ConnectTimeout("no connection before the timeout")
                if sel.select(left):
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    break
        sock.setblocking(True)

    def track(self, stream: httpcore.NetworkStream) -> None:
        sock = stream.get_extra_info("socket")
        if sock is not None:
            with self._lock:
                self._socks.add(sock)

    def abort(self) -> None:
        self._aborted.set()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_SLICE = 0.25  # seconds: how often a wait to connect or to read checks for close()/cancel
try:
    from httpcore._backends.sync import SyncStream as _SyncStream
except ImportError:  # pragma: no cover
    _SyncStream = None  # type: ignore[assignment,misc]

_DEADLINE = threading.local()  # .end: monotonic time by which this thread's request must end


def _clamp(timeout: float | None) -> float | None:
    """``timeout`` shortened to what is left before the current request's deadline, so that a
    server dripping its headers or body byte by byte cannot stretch a request past it."""
    end = getattr(_DEADLINE, "end", None)
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the transfer's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _Tracked(httpcore.NetworkStream):
    """A network stream whose socket (after TLS too) its backend can shut down, and whose
    reads and writes end by the current request's deadline."""

    def __init__(self, stream: httpcore.NetworkStream, backend: _Backend):
        self._stream = stream
        self._backend = backend
        backend.track(stream)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        timeout = _clamp(timeout)
        end = None if timeout is None else time.monotonic() + timeout
        while True:  # in slices: a halted source stops waiting within one
            if self._backend.stopped():
                raise httpcore.ReadError("cancelled")
            left = _SLICE if end is None else min(_SLICE, end - time.monotonic())
            if left <= 0:
                raise httpcore.ReadTimeout("timed out")
            try:
                return self._stream.read(max_bytes, left)
            except httpcore.ReadTimeout:
                if end is not None and time.monotonic() >= end:
                    raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _clamp(timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        timeout = _clamp(timeout)
        sock = getattr(self._stream, "_sock", None)
        if _SyncStream is None or type(sock) is not socket.socket:  # pragma: no cover
            return _Tracked(self._stream.start_tls(ssl_context, server_hostname, timeout),
                            self._backend)
        # The handshake in slices, as reads are: a halted source stops waiting within one.
        end = None if timeout is None else time.monotonic() + timeout
        try:
            tls = ssl_context.wrap_socket(sock, server_hostname=server_hostname,
                                          do_handshake_on_connect=False)
            while True:
                if self._backend.stopped():
                    raise httpcore.ConnectError("cancelled")
                left = _SLICE if end is None else min(_SLICE, end - time.monotonic())
                if left <= 0:
                    raise httpcore.ConnectTimeout("TLS handshake timed out")
                tls.settimeout(left)
                try:
                    tls.do_handshake()
                    break
                except (socket.timeout, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
            tls.settimeout(None)
        except OSError as e:
            sock.close()
            raise httpcore.ConnectError(str(e)) from e
        except BaseException:
            sock.close()
            raise
        return _Tracked(_SyncStream(tls), self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def fetch(url: str, dest_dir: str | os.PathLike, progress: Progress | None = None,
          cancel: threading.Event | None = None, *, retry: RetryPolicy | None = None,
          headers: dict[str, str] | None = None, expect: str | None = None,
          trust: TrustSpec | None = None, allow_rollback: bool = False) -> Path:
    """Mirror the package at ``url`` into ``dest_dir``; returns ``dest_dir`` as a Path.

    Every file the manifest lists arrives checked against it. Interrupted (error, ``cancel``
    set, process killed), a second call continues where the first stopped. ``dest_dir`` must be
    new, empty or a mirror made by p2u (it has ``.p2u/``): a folder of the user's is refused
    with :class:`~p2u_onnx.errors.P2UError` before any request, and no file p2u did not write is
    ever replaced or removed. ``expect``, ``trust`` and ``allow_rollback``: as for
    :class:`HttpSource` (a signature the package has is mirrored with it).

    >>> fetch("http://127.0.0.1:8000/", "model.p2u")  # doctest: +SKIP
    PosixPath('model.p2u')
    """
    with HttpSource(url, dest_dir, retry=retry, progress=progress, cancel=cancel,
                    prefetch=False, headers=headers, mirror=True, expect=expect, trust=trust,
                    allow_rollback=allow_rollback) as src:
        src.download()
    return Path(dest_dir)


# ---------------------------------------------------------------- helpers


def _package_url(url: str) -> str:
    """The package directory's URL, ending in '/'."""
    # a URL refused here is shown without user:password and on one line
    shown = _short(re.sub(r"//[^/?#@]*@", "//", str(url)), 200)
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise TransportError(f"not a valid URL ({_short(str(e), 200)})", shown) from e
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise TransportError("not an http:// or https:// URL", shown)
    text = str(parsed.copy_with(query=None, fragment=None, userinfo=b""))
    if text.endswith("/" + MANIFEST_NAME):
        text = text[: -len(MANIFEST_NAME)]
    return text if text.endswith("/") else text + "/"


def _basic_auth(url: str) -> str | None:
    """An ``Authorization: Basic`` value for the user and password a URL holds, or None."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return None
    if not parsed.userinfo:
        return None
    pair = f"{parsed.username}:{parsed.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def _entry(f: Any, url: str) -> _Entry:
    where = f"{url}{MANIFEST_NAME}"
    if not isinstance(f, dict):
        raise FormatError(f"{where}: a file entry is not an object")
    name, size, sha = f.get("path"), f.get("size"), f.get("sha256")
    try:
        check_name(name, f"{where}: file")
    except FormatError as e:
        raise FormatError(f"{e} (not a plain file name: refused)") from None
    if name == MANIFEST_NAME:
        raise FormatError(f"{where}: a file entry names the manifest itself (refused)")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 \
            or not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise FormatError(f"{where}: file {name} has no valid size and sha256")
    if size > MAX_FILE:
        raise FormatError(f"{where}: file {name} declares {size} bytes, more than the "
                          f"{MAX_FILE}-byte limit (refused)")
    return _Entry(name, size, sha)


def _listed(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    files = [f for st in manifest.get("stages", []) for f in st.get("files", [])]
    files += manifest.get("base_model", {}).get("files", [])
    if manifest.get("probe"):
        files.append(manifest["probe"])
    return [f for f in files if isinstance(f, dict)]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name (mode from the umask, like every
    downloaded file, so that a web server can serve a mirror)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise P2UError(f"cannot write {path}: {e.strerror or e}") from e


def _size_is(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _read_cached_manifest(path: Path) -> tuple[bytes, dict[str, Any]] | None:
    try:
        text = path.read_bytes()
        return text, parse_manifest(text, str(path))
    except (OSError, FormatError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _read_small(path: Path, cap: int = 64 << 10) -> bytes | None:
    """Up to ``cap`` bytes of a regular file of the cache, or None (also for a symbolic link,
    a FIFO, which would block, or a device)."""
    try:
        with open_regular(path) as f:
            data = f.read(cap + 1)
    except (OSError, P2UError):
        return None
    return data if len(data) <= cap else None


def _signs(signature: bytes, manifest: bytes) -> bool:
    """Whether ``signature`` is an envelope over these manifest bytes (not verified: a mirror
    keeps it for whoever checks it with their keys)."""
    from .trust import _parse_envelope, manifest_sha256

    try:
        signed, _ = _parse_envelope(signature, SIGNATURE_NAME)
    except P2UError:
        return False
    return signed.get("manifest_sha256") == manifest_sha256(manifest)


def _open_part(part: Path, mode: str) -> Any:
    """``part`` opened for writing (``"wb"`` or ``"ab"``), never through a symbolic link."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_APPEND if mode == "ab" else os.O_TRUNC
    return os.fdopen(os.open(part, flags, 0o666), mode)


def _read_meta(path: Path, f: _Entry) -> dict[str, Any] | None:
    """The validator record of a partial file, if it is for this very file."""
    try:
        meta = json.loads(_read_small(path) or b"")
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != f.sha256 or meta.get("size") != f.size:
        _unlink(path)
        return None
    return meta


def _strong(etag: str | None) -> str | None:
    """A strong ETag, usable in If-Range (weak ones are not)."""
    return etag if etag and not etag.startswith("W/") else None


def _content_range(r: httpx.Response, url: str) -> tuple[int, int, int | None]:
    """(first, last, total or None) of a 206 answer's Content-Range."""
    value = r.headers.get("content-range", "")
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if m is None:
        raise _Retry(f"206 without a valid Content-Range ({_short(value)!r})")
    first, last = int(m.group(1)), int(m.group(2))
    if last < first:
        raise TransportError(f"the server's Content-Range {_short(value)!r} is not valid", url)
    return first, last, None if m.group(3) == "*" else int(m.group(3))


def _content_length(r: httpx.Response, url: str) -> int | None:
    """The answer's Content-Length (None when absent); a malformed one is refused."""
    value = r.headers.get("content-length")
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise TransportError(f"the server sent an invalid Content-Length {_short(value)!r}", url)
    return int(value)


def _check_space(part: Path, need: int, url: str) -> None:
    """Refuse, before writing, a file that cannot fit on the cache's file system."""
    try:
        free = shutil.disk_usage(part.parent).free
    except OSError:
        return
    if need > free:
        raise P2UError(f"{url}: needs {need} more bytes in {part.parent}, which has {free} free")


class _Decoder:
    """Decodes a body the server compressed although ``identity`` was asked (gzip or deflate
    only), never producing more than the caller allows per call: a compression bomb cannot
    grow past the limit."""

    def __init__(self, encoding: str, url: str):
        encoding = encoding.strip().lower()
        self.url = url
        if encoding in ("identity", ""):
            self._z = None
        elif encoding in ("gzip", "x-gzip", "deflate"):
            self._z = zlib.decompressobj(31 if "gzip" in encoding else 15)
        else:
            raise TransportError(f"the server sent Content-Encoding {_short(encoding)} although "
                                 "identity was asked; serve the files as they are", url)

    def __call__(self, data: bytes, limit: int) -> bytes:
        if self._z is None:
            return data
        try:
            out = self._z.decompress(data, max(limit, 1))
        except zlib.error as e:
            raise TransportError(f"the server's compressed body is not valid ({e})",
                                 self.url) from e
        return out  # with input left over, ``out`` fills ``limit``: the caller sees it is over

    def finish(self, limit: int) -> bytes:
        if self._z is None:
            return b""
        if not self._z.eof:
            raise TransportError("the server's compressed body is truncated", self.url)
        return b""


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def _secs(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _short(text: str, n: int = 80) -> str:
    """``text`` (a server's) cut at ``n`` characters, with every character that is not
    printable (newlines, NEL, terminal escapes) shown as '?': it goes into one-line errors."""
    text = "".join(c if c.isprintable() else "?" for c in text[:n + 1])
    return text if len(text) <= n else text[:n] + "..."


def _size_error(url: str, got: int, want: int) -> TransportError:
    return TransportError(f"the server has {got} bytes, the manifest says {want} (the package "
                          "changed on the server while fetching? start again)", url)


def _status_error(r: httpx.Response, url: str) -> Exception:
    reason = f"HTTP {r.status_code} {_short(r.reason_phrase)}".strip()
    if r.status_code in _RETRY_STATUS:
        return _Retry(reason, retry_after=_retry_after(r))
    hint = _HINTS.get(r.status_code)
    return TransportError(f"{reason} ({hint})" if hint else reason, url)


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after", "").strip()
    # str.isdigit() is True for "²" too, which float() refuses: ASCII digits only
    return float(value) if value.isascii() and value.isdigit() and len(value) < 12 else None


def _network_retry(e: httpx.HTTPError, timeout: float, have: int = 0, size: int = 0,
                   gained: int = 0) -> _Retry:
    if isinstance(e, httpx.ConnectTimeout):
        return _Retry(f"server not reachable (no connection within {timeout:g} s)",
                      network=True)
    if isinstance(e, httpx.ConnectError):
        return _Retry(f"server not reachable ({e})", network=True)
    if isinstance(e, httpx.TimeoutException):
        return _Retry(f"timed out: no data for {timeout:g} s", gained=gained)
    if size:
        return _Retry(f"connection dropped after {have} of {size} bytes ({e})", gained=gained)
    return _Retry(f"connection dropped ({e})", gained=gained)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
