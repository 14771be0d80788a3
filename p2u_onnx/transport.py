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
* A file arrives in ``NAME.part`` inside the cache directory, with the server's validator in
  ``NAME.part.json``. It is checked against the manifest's size and sha256, then renamed to
  ``NAME``. So the cache never holds a file that failed its check, and a cached file is checked
  again before it is used.
* An interrupted transfer resumes with ``Range: bytes=N-`` and ``If-Range`` (the strong ETag,
  else Last-Modified). A server whose file changed answers 200, and the file starts over.
* Failures that may pass are retried with exponential backoff (:class:`RetryPolicy`): connection
  refused or dropped, timeouts, HTTP 408/425/429/5xx, a digest mismatch. An attempt that brought
  new bytes resets the count. Other failures are final at once: 404, 403, a size the manifest
  does not promise. Every error is a :class:`~p2u_onnx.errors.TransportError` naming the URL.

The cache directory doubles as a mirror: once everything has arrived it is a complete package
directory (``DirectorySource``, ``p2u verify``, nginx can serve it). Without ``cache_dir``, files go
to a temporary directory that :meth:`HttpSource.close` removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from . import __version__
from .errors import FormatError, IntegrityError, P2UError, TransportError
from .format import MANIFEST_NAME, parse_manifest, read_stage, sha256_file

try:  # POSIX: lock the cache directory while a file is downloaded into it
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["HttpSource", "RetryPolicy", "fetch"]

Progress = Callable[[int, int], None]
"""``progress(done, total)``: bytes of the planned files present in the cache, and their sum."""

MAX_MANIFEST = 64 << 20
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")  # a plain file name: no '/', no dotfile
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_HINTS = {
    401: "the server wants credentials (pass headers=...)",
    403: "the server refuses: are the files readable by the web server?",
    404: "no such file on the server: the URL must name the package directory",
    410: "the package was removed from the server",
}
_LOCK_NAME = ".p2u.lock"


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How hard :class:`HttpSource` tries before it gives up.

    ``attempts``: tries per request in a row that bring no new bytes. ``backoff``: the first wait
    in seconds, doubled after each failure up to ``max_backoff`` (a server's ``Retry-After`` is
    honoured up to ``max_backoff``). ``timeout``: seconds to connect, and at most between two
    reads (a stalled transfer fails after it, then resumes). ``digest_attempts``: complete
    downloads of one file whose sha256 does not match the manifest before giving up.
    """

    attempts: int = 6
    backoff: float = 0.5
    max_backoff: float = 10.0
    timeout: float = 30.0
    digest_attempts: int = 3

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.digest_attempts < 1:
            raise ValueError("attempts and digest_attempts must be at least 1")
        if not 0 <= self.backoff <= self.max_backoff:
            raise ValueError("need 0 <= backoff <= max_backoff")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")

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
    are sent with every request (e.g. authorization); ``client`` is an ``httpx.Client`` to use
    instead of one made here (then its timeouts and headers apply). ``mirror=True`` makes
    :meth:`download` fetch every file the manifest lists (stage 0 besides the base files).

    The manifest is fetched in the constructor, which raises :class:`TransportError` or
    :class:`~p2u_onnx.errors.FormatError`.

    >>> src = HttpSource("http://127.0.0.1:8000/", cache_dir="cache")  # doctest: +SKIP
    >>> session = ProgressiveSession(src)                                # doctest: +SKIP
    """

    def __init__(self, url: str, cache_dir: str | os.PathLike | None = None, *,
                 retry: RetryPolicy | None = None, progress: Progress | None = None,
                 cancel: threading.Event | None = None, prefetch: bool = True,
                 headers: dict[str, str] | None = None, client: httpx.Client | None = None,
                 mirror: bool = False):
        self.url = _package_url(url)
        self._retry = retry or RetryPolicy()
        self._progress = progress
        self._cancel = cancel if cancel is not None else threading.Event()
        self._stop = threading.Event()
        self._prefetch = prefetch
        self._own_client = client is None
        self._client = client if client is not None else httpx.Client(
            timeout=httpx.Timeout(self._retry.timeout), follow_redirects=True,
            headers={"User-Agent": f"p2u-onnx/{__version__}", **(headers or {})},
            transport=_Transport())
        self._headers = dict(headers or {}) if client is not None else {}
        if cache_dir is None:
            self.cache_dir = Path(tempfile.mkdtemp(prefix="p2u-http-"))
            self._cleanup: Any = weakref.finalize(self, shutil.rmtree, str(self.cache_dir), True)
        else:
            self.cache_dir = Path(cache_dir)
            self._cleanup = None
        self._cond = threading.Condition(threading.Lock())
        self._results: dict[Any, Any] = {}
        self._errors: dict[Any, BaseException] = {}
        self._queue: list[Any] = []
        self._current: Any = None
        self._worker: threading.Thread | None = None
        self._have: dict[str, int] = {}
        self.offline = False
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.manifest = self._load_manifest()
            self._stage_files = [[_entry(f, self.url) for f in st["files"]]
                                 for st in self.manifest["stages"]]
            base = {Path(f["path"]).name: _entry(f, self.url)
                    for f in self.manifest["base_model"]["files"]}
            self._base_files = [base[n] for n in ("base.onnx", "base.bin") if n in base]
            if len(self._base_files) != 2:
                raise FormatError(f"{self.url}{MANIFEST_NAME}: the base must be base.onnx + "
                                  "base.bin")
            probe = self.manifest.get("probe")
            self._probe = _entry(probe, self.url) if probe else None
            self._base_route = self._base_plan()
            self._jobs = ["base", "probe", *range(1, len(self._stage_files))]
            if mirror:
                self._jobs.append(0)
            planned = self._planned(mirror)
            self._total = sum(f.size for f in planned)
            self._planned_names = {f.name for f in planned}
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
        return None if path is None else path.read_bytes()

    # -- more

    def download(self) -> Path:
        """Fetch everything the session needs (and with ``mirror=True`` every file the
        manifest lists) now; returns the cache directory."""
        for job in self._jobs:
            self._need(job)
        return self.cache_dir

    def cancel(self) -> None:
        """Stop every transfer; waiting calls raise :class:`TransportError`."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def close(self) -> None:
        """Stop the background thread, close the connections, remove a temporary cache."""
        self._stop.set()
        worker = self._worker if self._worker is not threading.current_thread() else None
        if worker is not None:
            worker.join(1.0)  # it stops at its next chunk ...
        if self._own_client:
            self._client.close()  # ... or, stalled in a read, when its connection closes
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
        from .reconstruct import extract_file  # numpy + zstandard: only when unpacking

        entry = plan[0]
        sf = read_stage(self._file(entry), package_id=self.manifest["package_id"], stage=0,
                        verify_payload=False, manifest=self.manifest)  # sha256 checked on arrival
        for f, path in zip(self._base_files, paths):
            data = extract_file(sf, f.name, size=f.size)  # raw_length bounded before decoding
            if len(data) != f.size or _sha256(data) != f.sha256:
                raise IntegrityError(f"{f.name} inside {entry.name} does not match the manifest")
            _write_atomic(path, data)
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
        """Whether the cache holds ``f`` intact (a file that fails the check is removed)."""
        path = self.cache_dir / f.name
        try:
            if path.stat().st_size == f.size and sha256_file(path) == f.sha256:
                self._count(f.name, f.size)
                return True
        except OSError:
            return False
        _unlink(path)
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
            part = final.with_name(f.name + ".part")
            meta_path = final.with_name(f.name + ".part.json")
            bad = 0

            def attempt() -> None:
                nonlocal bad
                meta = _read_meta(meta_path, f)  # what the last attempt left
                have = part.stat().st_size if meta is not None and part.exists() else 0
                if have > f.size:
                    have = 0
                if have < f.size or not part.exists():
                    self._transfer(url, f, part, meta_path, meta, have)
                if sha256_file(part) == f.sha256:
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
                self._retrying(url, attempt)
                with open(part, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(part, final)
            except OSError as e:  # a full disk, a read-only cache...
                raise P2UError(f"cannot write {part}: {e.strerror or e}") from e
            _unlink(meta_path)
            return final

    def _transfer(self, url: str, f: _Entry, part: Path, meta_path: Path,
                  meta: dict[str, Any] | None, have: int) -> None:
        """One GET of ``f`` into ``part`` from byte ``have`` (0: from scratch).

        ``meta`` is the validator record of the bytes in ``part``; a 200 answer replaces both.

        Raises :class:`_Retry` when the attempt failed in a way that may pass.
        """
        headers = {**self._headers, "Accept-Encoding": "identity"}
        if have and meta is not None:
            headers["Range"] = f"bytes={have}-"
            validator = _strong(meta.get("etag")) or meta.get("last_modified")
            if validator:
                headers["If-Range"] = validator
        gained = 0
        try:
            with self._client.stream("GET", url, headers=headers) as r:
                if r.status_code == 206 and "Range" in headers:
                    start, total = _content_range(r, url)
                    if total is not None and total != f.size:
                        raise _size_error(url, total, f.size)
                    if start != have:
                        raise _Retry(f"server resumed at byte {start}, not {have}")
                    mode = "ab"
                elif r.status_code == 200:
                    length = r.headers.get("content-length")
                    if length is not None and length.isdigit() and int(length) != f.size:
                        raise _size_error(url, int(length), f.size)
                    have, mode = 0, "wb"
                    meta = {"sha256": f.sha256, "size": f.size,
                            "etag": r.headers.get("etag"),
                            "last_modified": r.headers.get("last-modified")}
                    _write_atomic(meta_path, json.dumps(meta).encode())
                elif r.status_code == 416:
                    _unlink(part)
                    raise _Retry("HTTP 416 Range Not Satisfiable (the file shrank on the server?)")
                else:
                    raise _status_error(r, url)
                encoding = r.headers.get("content-encoding", "identity").lower()
                if encoding != "identity":
                    raise TransportError(f"the server sent Content-Encoding {encoding} although "
                                         "identity was asked; serve the files as they are", url)
                with open(part, mode) as out:
                    self._count(f.name, have)
                    for chunk in r.iter_raw():
                        self._check_halt(url)
                        if have + len(chunk) > f.size:
                            raise TransportError(f"the server sent more than the {f.size} "
                                                 "bytes the manifest promises", url)
                        out.write(chunk)
                        have += len(chunk)
                        gained += len(chunk)
                        self._count(f.name, have)
        except httpx.HTTPError as e:
            raise _network_retry(e, self._retry.timeout, have, f.size, gained) from e
        except _Retry as e:
            e.gained = gained
            raise
        if have < f.size:
            raise _Retry(f"connection closed after {have} of {f.size} bytes", gained=gained)

    def _retrying(self, url: str, attempt: Callable[[], Any]) -> Any:
        """Run ``attempt`` until it succeeds, retrying :class:`_Retry` with backoff."""
        failures = 0
        while True:
            self._check_halt(url)
            try:
                return attempt()
            except _Retry as e:
                failures = 1 if e.gained else failures + 1
                if failures >= self._retry.attempts:
                    tries = f"{failures} attempt{'s' if failures > 1 else ''}"
                    raise TransportError(f"{e.reason} (gave up after {tries})", url) from e
                wait = self._retry.delay(failures) if e.retry_after is None else \
                    min(e.retry_after, self._retry.max_backoff)
                self._sleep(wait, url)

    # -- the manifest

    def _get_manifest(self, url: str) -> bytes:
        headers = {**self._headers, "Cache-Control": "no-cache"}
        try:
            with self._client.stream("GET", url, headers=headers) as r:
                if r.status_code != 200:
                    raise _status_error(r, url)
                body = bytearray()
                for chunk in r.iter_bytes():
                    self._check_halt(url)
                    body += chunk
                    if len(body) > MAX_MANIFEST:
                        raise TransportError(f"manifest larger than {MAX_MANIFEST} bytes", url)
                return bytes(body)
        except httpx.HTTPError as e:
            raise _network_retry(e, self._retry.timeout) from e

    def _load_manifest(self) -> dict[str, Any]:
        url = self.url + MANIFEST_NAME
        cached_path = self.cache_dir / MANIFEST_NAME
        cached = _read_cached_manifest(cached_path)
        text = None
        if cached is not None:  # one try: offline, the cached manifest lets the device start
            try:
                text = self._get_manifest(url)
            except _Retry as e:
                if e.network:
                    self.offline = True
                    return cached[1]
        if text is None:
            text = self._retrying(url, lambda: self._get_manifest(url))
        manifest = parse_manifest(text, url)
        if cached is None or cached[0] != text:
            if cached is not None:
                self._forget(cached[1], manifest)
            _write_atomic(cached_path, text)
        return manifest

    def _forget(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Remove cached files of ``old`` that ``new`` does not list with the same digest."""
        keep = {(f["path"], f["sha256"]) for f in _listed(new)}
        for f in _listed(old):
            name = str(f.get("path", ""))
            if _NAME.fullmatch(name) and (name, f.get("sha256")) not in keep:
                for p in (name, name + ".part", name + ".part.json"):
                    _unlink(self.cache_dir / p)

    # -- helpers

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the cache directory's lock (other processes and threads wait for it)."""
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.cache_dir / _LOCK_NAME, "a+b") as fh:
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
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
    """httpx's own transports, one per scheme, each made on first use.

    Loading the CA bundle for TLS takes about 50 ms, which a package on plain http:// (a LAN,
    a device's local server) never needs: that is 50 ms less before the first inference.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: dict[str, httpx.HTTPTransport] = {}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        tls = request.url.scheme == "https"
        with self._lock:
            t = self._made.get(request.url.scheme)
            if t is None:
                # verify=False only where no TLS ever happens: plain http:// requests (proxies
                # from the environment have transports of their own).
                t = self._made[request.url.scheme] = httpx.HTTPTransport() if tls else \
                    httpx.HTTPTransport(verify=False)
        return t.handle_request(request)

    def close(self) -> None:
        with self._lock:
            for t in self._made.values():
                t.close()
            self._made.clear()


def fetch(url: str, dest_dir: str | os.PathLike, progress: Progress | None = None,
          cancel: threading.Event | None = None, *, retry: RetryPolicy | None = None,
          headers: dict[str, str] | None = None) -> Path:
    """Mirror the package at ``url`` into ``dest_dir``; returns ``dest_dir`` as a Path.

    Every file the manifest lists arrives checked against it. Interrupted (error, ``cancel``
    set, process killed), a second call continues where the first stopped.

    >>> fetch("http://127.0.0.1:8000/", "model.p2u")  # doctest: +SKIP
    PosixPath('model.p2u')
    """
    with HttpSource(url, dest_dir, retry=retry, progress=progress, cancel=cancel,
                    prefetch=False, headers=headers, mirror=True) as src:
        src.download()
    return Path(dest_dir)


# ---------------------------------------------------------------- helpers


def _package_url(url: str) -> str:
    """The package directory's URL, ending in '/'."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise TransportError(f"not a valid URL ({e})", str(url)) from e
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise TransportError("not an http:// or https:// URL", str(url))
    text = str(parsed.copy_with(query=None, fragment=None))
    if text.endswith("/" + MANIFEST_NAME):
        text = text[: -len(MANIFEST_NAME)]
    return text if text.endswith("/") else text + "/"


def _entry(f: Any, url: str) -> _Entry:
    where = f"{url}{MANIFEST_NAME}"
    if not isinstance(f, dict):
        raise FormatError(f"{where}: a file entry is not an object")
    name, size, sha = f.get("path"), f.get("size"), f.get("sha256")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == MANIFEST_NAME:
        raise FormatError(f"{where}: file {name!r} is not a plain file name (refused)")
    if not isinstance(size, int) or size < 0 or not isinstance(sha, str) \
            or not _SHA256.fullmatch(sha):
        raise FormatError(f"{where}: file {name} has no valid size and sha256")
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
    except (OSError, FormatError):
        return None


def _read_meta(path: Path, f: _Entry) -> dict[str, Any] | None:
    """The validator record of a partial file, if it is for this very file."""
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != f.sha256 or meta.get("size") != f.size:
        _unlink(path)
        return None
    return meta


def _strong(etag: str | None) -> str | None:
    """A strong ETag, usable in If-Range (weak ones are not)."""
    return etag if etag and not etag.startswith("W/") else None


def _content_range(r: httpx.Response, url: str) -> tuple[int, int | None]:
    m = _CONTENT_RANGE.fullmatch(r.headers.get("content-range", "").strip())
    if m is None:
        raise _Retry(f"206 without a valid Content-Range ({r.headers.get('content-range')!r})")
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total


def _size_error(url: str, got: int, want: int) -> TransportError:
    return TransportError(f"the server has {got} bytes, the manifest says {want} (the package "
                          "changed on the server while fetching? start again)", url)


def _status_error(r: httpx.Response, url: str) -> Exception:
    reason = f"HTTP {r.status_code} {r.reason_phrase}".strip()
    if r.status_code in _RETRY_STATUS:
        return _Retry(reason, retry_after=_retry_after(r))
    hint = _HINTS.get(r.status_code)
    return TransportError(f"{reason} ({hint})" if hint else reason, url)


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
