"""A development HTTP server for p2u packages (``p2u serve``): static files, Range, rate limit.

In production a package is served as plain files by anything (nginx, a CDN, S3). This server
exists to try a package on a laptop and to simulate slow links: it serves the files under one
directory with what :mod:`p2u_onnx.transport` relies on and a static host provides:

* ``GET`` and ``HEAD``; ``ETag`` (strong: mtime and size, as nginx makes it), ``Last-Modified``,
  ``Accept-Ranges: bytes``; ``If-None-Match`` / ``If-Modified-Since`` answer 304;
* one byte range per request (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``): 206 with
  ``Content-Range``; a range past the end: 416 with ``Content-Range: bytes */size``; several
  ranges are answered with the whole file (200), which HTTP allows; ``If-Range`` with a
  validator that no longer matches also gets the whole file;
* an optional bandwidth limit: one token bucket shared by every connection, so ``rate`` is the
  link's total, as on a real slow link.

Dotfiles and partial downloads (``*.part``) are not served, nor anything outside the root.
Needs only the standard library. Not hardened for the open internet: bind it to 127.0.0.1.

>>> with PackageServer("model.p2u", rate=parse_rate("1mbit")) as srv:  # doctest: +SKIP
...     print(srv.url)  # http://127.0.0.1:PORT/
"""

from __future__ import annotations

import email.utils
import mimetypes
import os
import posixpath
import re
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import P2UError

__all__ = ["PackageServer", "TokenBucket", "parse_rate"]

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|b)?\s*", re.IGNORECASE)
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_TYPES = {".json": "application/json", ".p2u": "application/octet-stream",
          ".onnx": "application/octet-stream", ".bin": "application/octet-stream",
          ".npz": "application/octet-stream"}


def parse_rate(text: str) -> float:
    """Bytes per second from a rate such as ``250kbit``, ``1mbit``, ``10mbit`` or ``2MB``.

    Units: ``bit``, ``kbit``, ``mbit``, ``gbit`` (bits per second, any case) or ``B``, ``kB``,
    ``MB``, ``GB`` (bytes per second, capital B); a bare number is bytes per second. Prefixes
    are decimal (1 kbit = 1000 bit), as tc's are.

    >>> parse_rate("1mbit")
    125000.0
    """
    m = _RATE.fullmatch(text)
    if m is None or (m.group(2) and not m.group(3)):
        raise P2UError(f"rate {text!r} not understood: write e.g. 250kbit, 1mbit, 10mbit or 2MB")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    unit = m.group(3) or "B"
    if unit == "B":
        rate = value
    elif unit.lower() == "bit":
        rate = value / 8
    else:  # a lowercase "b" alone: bits or bytes? refuse to guess
        raise P2UError(f"rate {text!r} is ambiguous: write bit (e.g. 1mbit) or B (e.g. 1MB)")
    if rate <= 0:
        raise P2UError(f"rate {text!r} must be positive")
    return rate


class TokenBucket:
    """A bandwidth limit shared by threads: ``take(n)`` returns when ``n`` bytes may be sent.

    Tokens accrue at ``rate`` bytes per second up to ``burst``; a taker may overdraw, and then
    sleeps until the debt is paid, so concurrent takers share the rate in arrival order.
    """

    def __init__(self, rate: float, burst: int | None = None):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = int(burst if burst is not None else self.chunk_size(rate))
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    @staticmethod
    def chunk_size(rate: float) -> int:
        """Bytes per write that keep the pacing smooth: about 1/50 s of data, 1..64 KiB."""
        return int(min(64 << 10, max(1 << 10, rate / 50)))

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class PackageServer(ThreadingHTTPServer):
    """Serves the files under ``root`` at ``http://host:port/`` (``port=0``: any free port).

    ``rate`` (bytes per second, see :func:`parse_rate`) limits the bandwidth of all connections
    together. ``log(line)`` receives one line per request. Use :meth:`start` (a background
    thread) or ``serve_forever()``; :meth:`close` stops it. A context manager starts and stops.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, *,
                 rate: float | None = None, log: Callable[[str], None] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise P2UError(f"{root}: not a directory")
        self.bucket = TokenBucket(rate) if rate else None
        self.log = log
        self._thread: threading.Thread | None = None
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise P2UError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # a client that went away mid-answer: normal on bad links
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://[{name}]:{port}/" if ":" in name else f"http://{name}:{port}/"

    def start(self) -> PackageServer:
        """Serve in a background thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,),
                                        name="p2u-serve", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> PackageServer:  # noqa: PYI034 - Self needs Python 3.11
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Unsatisfiable(Exception):
    """The range asked for starts past the end of the file (416)."""


class _Handler(BaseHTTPRequestHandler):
    server: PackageServer
    protocol_version = "HTTP/1.1"
    server_version = "p2u-devserver"
    disable_nagle_algorithm = True  # headers, then body: Nagle + delayed ACK would add 40 ms

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")

    # -- the one path through

    def _serve(self, body: bool) -> None:
        path = self._resolve()
        if path is None:
            return self._error(HTTPStatus.NOT_FOUND)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError:
            return self._error(HTTPStatus.NOT_FOUND)
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            etag = f'"{st.st_mtime_ns // 1_000_000_000:x}-{size:x}"'
            modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            if self._not_modified(etag, st.st_mtime):
                self.send_response(HTTPStatus.NOT_MODIFIED)
                self._validators(etag, modified)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            try:
                span = self._range(size, etag, modified)
            except _Unsatisfiable:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self._validators(etag, modified)
                self.end_headers()
                return
            start, end = span if span else (0, size)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK)
            if span:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("Content-Type", _TYPES.get(path.suffix) or
                             mimetypes.guess_type(path.name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self._validators(etag, modified)
            self.end_headers()
            if body:
                self._send(f, start, end)

    def _resolve(self) -> Path | None:
        """The file a request path names under the root, or None (no '..', no dotfiles)."""
        raw = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        parts = [p for p in posixpath.normpath(raw).split("/") if p]
        if any(p.startswith(".") or p.endswith((".part", ".part.json")) or "\\" in p
               or "\0" in p for p in parts):
            return None
        path = self.server.root.joinpath(*parts)
        return path if path.is_file() else None

    def _not_modified(self, etag: str, mtime: float) -> bool:
        inm = self.headers.get("If-None-Match")
        if inm is not None:
            return inm.strip() == "*" or etag in [t.strip().removeprefix("W/")
                                                  for t in inm.split(",")]
        ims = self.headers.get("If-Modified-Since")
        if ims:
            try:
                since = email.utils.parsedate_to_datetime(ims).timestamp()
            except (TypeError, ValueError):
                return False
            return int(mtime) <= since
        return False

    def _range(self, size: int, etag: str, modified: str) -> tuple[int, int] | None:
        """(start, end) of the one range asked for, or None (the whole file).

        Raises :class:`_Unsatisfiable` for a range that starts past the end.
        """
        header = self.headers.get("Range")
        if not header:
            return None
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range.strip() not in (etag, modified):
            return None  # the client's copy is of another version: send the whole file
        m = _RANGE.fullmatch(header.strip().replace(" ", ""))
        if m is None or not (m.group(1) or m.group(2)):
            return None  # several ranges or a syntax we ignore: the whole file
        first, last = m.group(1), m.group(2)
        if first:
            start = int(first)
            end = min(int(last) + 1, size) if last else size
            if last and int(last) < start:
                return None  # invalid: ignored, as RFC 9110 says
        else:
            start, end = max(0, size - int(last)), size
            if int(last) == 0:
                raise _Unsatisfiable
        if start >= size:
            raise _Unsatisfiable
        return start, end

    def _validators(self, etag: str, modified: str) -> None:
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", modified)

    def _send(self, f, start: int, end: int) -> None:
        bucket = self.server.bucket
        chunk = TokenBucket.chunk_size(bucket.rate) if bucket else 1 << 16
        f.seek(start)
        left = end - start
        try:
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:  # the file shrank under us: the client sees a short body
                    self.close_connection = True
                    return
                if bucket is not None:
                    bucket.take(len(data))
                self.wfile.write(data)
                left -= len(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _error(self, status: HTTPStatus) -> None:
        text = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(text)
