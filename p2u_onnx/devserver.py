"""A development HTTP server for p2u packages (``p2u serve``): static files, Range, rate limit.

In production a package is served as plain files by anything (nginx, a CDN, S3). This server
exists to try a package on a laptop and to simulate slow links: it serves the files under one
directory with what :mod:`p2u_onnx.transport` relies on and a static host provides:

* ``GET`` and ``HEAD``; ``ETag`` (strong: mtime and size, as nginx makes it), ``Last-Modified``,
  ``Accept-Ranges: bytes``; ``If-None-Match`` / ``If-Modified-Since`` answer 304;
* one byte range per request (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``): 206 with
  ``Content-Range``; a range past the end (however large the number) or ``bytes=-0``: 416 with
  ``Content-Range: bytes */size``; several ranges, a reversed one (``bytes=5-2``) or numbers of
  more than 30 digits are answered with the whole file (200), which HTTP allows; ``If-Range``
  with a validator that no longer matches also gets the whole file;
* an optional bandwidth limit: one token bucket shared by every connection, so ``rate`` is the
  link's total, as on a real slow link.

Limits that keep one client from holding the server: a connection that sends nothing for
``idle_timeout`` seconds (or does not read what it is sent) is closed; at most
``max_connections`` connections are served at once, and the next ones get a quick ``503`` with
``Retry-After: 1`` (the p2u client retries those) and are closed.

It serves regular files only, under the root: every path segment must be a plain name
(:func:`~p2u_onnx.format.check_name`: no dotfiles, no ``..``), symbolic links are refused
(wherever they lead), and so are FIFOs and devices; partial downloads (``*.part``) are not
served. Needs only the standard library. It stays a development server (no TLS, no access
control, no protection against a client that sends its headers slowly): bind it to 127.0.0.1,
and serve production traffic with nginx or a CDN (docs/delivery.md).

>>> with PackageServer("model.p2u", rate=parse_rate("1mbit")) as srv:  # doctest: +SKIP
...     print(srv.url)  # http://127.0.0.1:PORT/
"""

from __future__ import annotations

import email.utils
import math
import mimetypes
import os
import re
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import FormatError, P2UError
from .format import check_name, open_regular

__all__ = ["PackageServer", "TokenBucket", "parse_rate"]

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|b)?\s*", re.IGNORECASE)
_RANGE = re.compile(r"bytes=([0-9]{0,30})-([0-9]{0,30})")
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
    together. ``log(line)`` receives one line per request. ``idle_timeout``: seconds a
    connection may stay silent (or not read) before it is closed. ``max_connections``:
    connections served at once; more get ``503`` with ``Retry-After: 1``. Use :meth:`start` (a
    background thread) or ``serve_forever()``; :meth:`close` stops it. A context manager starts
    and stops.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, *,
                 rate: float | None = None, log: Callable[[str], None] | None = None,
                 idle_timeout: float = 30.0, max_connections: int = 32):
        self.root = Path(root)
        if not self.root.is_dir():
            raise P2UError(f"{root}: not a directory")
        if not 0 < idle_timeout < math.inf or max_connections < 1:  # NaN fails too
            raise P2UError("idle_timeout must be positive and finite and max_connections at "
                           "least 1")
        if not 0 <= port <= 65535:
            raise P2UError(f"port {port} is not between 0 and 65535")
        self.bucket = TokenBucket(rate) if rate else None
        self.log = log
        self.idle_timeout = float(idle_timeout)
        self.max_connections = int(max_connections)
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._refusers = threading.BoundedSemaphore(8)  # threads answering 503 at once
        self._thread: threading.Thread | None = None
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            shown = "".join(c if c.isprintable() else "?" for c in str(host))[:100]
            raise P2UError(f"cannot listen on {shown}:{port}: {e.strerror or e}") from e

    def handle_error(self, request, client_address) -> None:
        """One line, never a traceback: a client's bad request must not flood the log."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # a client that went away or went silent mid-answer: normal on bad links
        line = f"{client_address[0]} error while answering: {type(exc).__name__}: {exc}"
        if self.log is not None:
            self.log(line)
        else:
            print(line, file=sys.stderr)

    def process_request(self, request, client_address) -> None:
        """Serve the connection in a thread of its own if a slot is free, else refuse it."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request) -> None:
        """Answer 503 (after reading the request, so that the client sees the answer and not
        a reset) in a short-lived thread; when too many are refused at once, just close."""
        if not self._refusers.acquire(blocking=False):
            self.shutdown_request(request)
            return

        def answer() -> None:
            try:
                request.settimeout(1.0)
                got = b""
                end = time.monotonic() + 2.0  # a client that drips its request is not waited for
                while b"\r\n\r\n" not in got and len(got) < 65536 and time.monotonic() < end:
                    data = request.recv(4096)
                    if not data:
                        break
                    got += data
                body = b"503 Service Unavailable: too many connections\n"
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                                b"Content-Type: text/plain\r\nConnection: close\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            finally:
                self.shutdown_request(request)
                self._refusers.release()

        threading.Thread(target=answer, name="p2u-serve-503", daemon=True).start()

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

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # every read and write on the connection
        super().setup()

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.log is not None:  # the request line is the client's: no escapes
            line = "".join(c if c.isprintable() else "?" for c in format % args)
            self.server.log(f"{self.address_string()} {line}")

    # -- the one path through

    def _serve(self, body: bool) -> None:
        path = self._resolve()
        if path is None:
            return self._error(HTTPStatus.NOT_FOUND)
        try:
            f = open_regular(path)  # no symbolic link, no FIFO, whatever changed since
        except (OSError, P2UError):
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
        """The regular file a request path names under the root, or None: every segment a
        plain name (no '..', no dotfiles), no symbolic link on the way (the root itself may be
        one), the last one a regular file."""
        try:
            raw = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path, errors="strict")
            parts = [check_name(p, "path segment") for p in raw.split("/") if p]
        except (ValueError, FormatError):
            return None
        if not parts or parts[-1].endswith((".part", ".part.json")):
            return None
        path = self.server.root
        for i, part in enumerate(parts):
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                return None
            last = i == len(parts) - 1
            if not (stat.S_ISREG(mode) if last else stat.S_ISDIR(mode)):
                return None  # a symbolic link, a FIFO, a device, or a file used as a folder
        return path

    def _not_modified(self, etag: str, mtime: float) -> bool:
        inm = self.headers.get("If-None-Match")
        if inm is not None:
            return inm.strip() == "*" or etag in [t.strip().removeprefix("W/")
                                                  for t in inm.split(",")]
        ims = self.headers.get("If-Modified-Since")
        if ims:
            try:
                since = email.utils.parsedate_to_datetime(ims).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
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
