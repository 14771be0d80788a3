"""Attacks from the network side: a hostile server, redirects, a mirror folder of the user's, and
the dev server under abuse (security classes 5 (network half), 6, 7 and 10).

Every server here listens on 127.0.0.1 only. The hostile server serves a real package and lets
each test replace the answer for one file by a function of its own (gzip bombs, endless bodies,
drips, 503 forever, redirects, lying headers).
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import onnx
import pytest
from click.testing import CliRunner

import p2u_onnx
import synth
from p2u_onnx import cli_http
from p2u_onnx.devserver import PackageServer
from p2u_onnx.errors import FormatError, P2UError, TransportError
from p2u_onnx.format import sha256_file
from p2u_onnx.transport import MAX_MANIFEST, HttpSource, RetryPolicy, fetch

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.02, timeout=5.0)
BOMB_SIZE = 2 << 30  # decoded bytes of the gzip bomb: more than the child's address space
RLIMIT = 3 << 29  # 1.5 GiB of address space for the child that meets the bomb


# ---------------------------------------------------------------- a hostile server


class Hostile(ThreadingHTTPServer):
    """Serves the files under ``root`` (200, or 206 for ``Range: bytes=N-``), except the names
    in ``routes``, answered by ``routes[name](handler)``. ``log``: (path, headers) per request.
    ``stop`` is set at teardown, so that answers that stall end."""

    daemon_threads = True

    def __init__(self, root: Path | None = None):
        self.root = root
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.log: list[tuple[str, dict[str, str]]] = []
        self.stop = threading.Event()
        super().__init__(("127.0.0.1", 0), _HostileHandler)
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def handle_error(self, request, client_address) -> None:
        pass  # clients that give up on hostile answers are the point here

    def requests(self, name: str) -> list[dict[str, str]]:
        return [h for p, h in self.log if p.rsplit("/", 1)[-1] == name]

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self._thread.join()
        self.server_close()

    def __enter__(self) -> Hostile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HostileHandler(BaseHTTPRequestHandler):
    server: Hostile
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.server.log.append((path, {k.lower(): v for k, v in self.headers.items()}))
        name = path.rsplit("/", 1)[-1]
        if name in self.server.routes:
            self.server.routes[name](self)
            return
        file = self.server.root / name if self.server.root and name else None
        if file is None or not file.is_file():
            send(self, 404, b"no such file")
            return
        data = file.read_bytes()
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m and int(m.group(1)) < len(data):
            start = int(m.group(1))
            send(self, 206, data[start:], {
                "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}", "ETag": '"v1"'})
        else:
            send(self, 200, data, {"ETag": '"v1"'})


def send(h: BaseHTTPRequestHandler, status: int, body: bytes,
         headers: dict[str, str] | None = None, length: int | None = None) -> None:
    """One answer; ``length`` overrides the Content-Length header (-1: none, close after)."""
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    if length == -1:
        h.send_header("Connection", "close")
        h.close_connection = True
    else:
        h.send_header("Content-Length", str(len(body) if length is None else length))
    h.end_headers()
    try:
        h.wfile.write(body)
    except OSError:
        h.close_connection = True


def endless(h: BaseHTTPRequestHandler, status: int = 200, headers: dict | None = None,
            length: int = -1, limit: int = 1 << 30) -> None:
    """A body that never ends (up to ``limit`` bytes, or until the client hangs up)."""
    send(h, status, b"", headers, length=length)
    chunk = b"\x00" * 65536
    sent = 0
    try:
        while sent < limit and not h.server.stop.is_set():
            h.wfile.write(chunk)
            sent += len(chunk)
    except OSError:
        pass
    h.close_connection = True


def drip(h: BaseHTTPRequestHandler, body: bytes, every: float, headers: dict | None = None,
         length: int | None = None) -> None:
    """``body`` one byte every ``every`` seconds (slow retrieval)."""
    send(h, 200, b"", headers, length=len(body) if length is None else length)
    try:
        for i in range(len(body)):
            if h.server.stop.wait(every):
                break
            h.wfile.write(body[i:i + 1])
            h.wfile.flush()
    except OSError:
        pass
    h.close_connection = True


def stall(h: BaseHTTPRequestHandler, body: bytes, after: int) -> None:
    """The first ``after`` bytes of ``body``, then nothing until the server stops."""
    send(h, 200, b"", {"ETag": '"v1"'}, length=len(body))
    try:
        h.wfile.write(body[:after])
        h.wfile.flush()
    except OSError:
        return
    h.server.stop.wait(120)
    h.close_connection = True


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def pkg(tmp_path_factory) -> Path:
    """A real package (an MLP, default plan: 3 stages, with a probe)."""
    d = tmp_path_factory.mktemp("pkg")
    onnx.save(synth.mlp(), str(d / "m.onnx"))
    p2u_onnx.encode(d / "m.onnx", d / "m.p2u")
    return d / "m.p2u"


@pytest.fixture
def hostile(pkg):
    with Hostile(pkg) as srv:
        yield srv


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """gzip of BOMB_SIZE zero bytes: about 2 MB on the wire."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
    zeros = bytes(1 << 20)
    return b"".join([c.compress(zeros) for _ in range(BOMB_SIZE >> 20)] + [c.flush()])


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, size, mtime and sha256 (files), link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if p.is_symlink():
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif p.is_file():
                out[str(p.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns,
                                                 sha256_file(p))
            else:
                out[str(p.relative_to(root))] = ("dir", st.st_mode)
    return out


def stage_size(pkg: Path, k: int) -> int:
    return (pkg / f"stage-{k}.p2u").stat().st_size


def run_limited(code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python whose address space is capped at RLIMIT."""
    prelude = ("import resource, sys\n"
               f"resource.setrlimit(resource.RLIMIT_AS, ({RLIMIT}, {RLIMIT}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + str(ROOT / "tests"),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True,
                          text=True, timeout=120, env=env, check=False)


_CHILD_FETCH = """
from p2u_onnx.errors import P2UError
from p2u_onnx.transport import HttpSource, RetryPolicy
try:
    with HttpSource(sys.argv[1], sys.argv[2], prefetch=False,
                    retry=RetryPolicy(attempts=2, backoff=0.01, timeout=20)) as src:
        src.fetch(int(sys.argv[3]))
    print("fetched")
except P2UError as e:
    print(type(e).__name__, e)
except MemoryError:
    print("MemoryError")
    sys.exit(3)
"""


# ---------------------------------------------------------------- class 5: compression bombs


def test_bomb_control_the_limit_bites(bomb):
    """The control: decoding the bomb whole under the same limit does run out of memory, so
    the limit below is one the client would hit if it decoded without a bound."""
    r = run_limited("import zlib\ntry:\n    zlib.decompress(open(sys.argv[1],'rb').read(), 31)\n"
                    "    print('decoded')\nexcept MemoryError:\n    print('MemoryError')\n",
                    _bomb_file(bomb))
    assert r.stdout.strip() == "MemoryError", r.stdout + r.stderr


_BOMB_PATH: list[str] = []


def _bomb_file(bomb: bytes) -> str:
    if not _BOMB_PATH:
        import tempfile
        fd, path = tempfile.mkstemp(suffix=".gz")
        os.write(fd, bomb)
        os.close(fd)
        _BOMB_PATH.append(path)
    return _BOMB_PATH[0]


@pytest.fixture(scope="module", autouse=True)
def _remove_bomb_file():
    yield
    for p in _BOMB_PATH:
        os.unlink(p)


def test_manifest_gzip_bomb_is_bounded(hostile, bomb, tmp_path):
    """manifest.json sent gzip-encoded although identity was asked, 2 GiB once decoded: the
    client (1.5 GiB of address space) stops at the manifest cap, with a clean TransportError."""
    hostile.routes["manifest.json"] = lambda h: send(h, 200, bomb, {
        "Content-Encoding": "gzip", "Content-Type": "application/json"})
    r = run_limited(_CHILD_FETCH, hostile.url, str(tmp_path / "c"), "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("TransportError"), r.stdout + r.stderr
    assert "manifest is larger than" in r.stdout and "MemoryError" not in r.stderr
    assert hostile.requests("manifest.json")[0]["accept-encoding"] == "identity"
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_stage_gzip_bomb_is_refused_unread(hostile, bomb, tmp_path):
    """A stage sent gzip-encoded: refused on its headers, nothing decoded, nothing written."""
    hostile.routes["stage-1.p2u"] = lambda h: send(h, 200, bomb, {"Content-Encoding": "gzip"})
    r = run_limited(_CHILD_FETCH, hostile.url, str(tmp_path / "c"), "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("TransportError") and "Content-Encoding gzip" in r.stdout
    assert hostile.requests("stage-1.p2u")[0]["accept-encoding"] == "identity"
    assert not list((tmp_path / "c" / ".p2u").glob("stage-1.p2u.part*"))


def test_stage_bomb_without_encoding_header_is_cut_at_its_size(hostile, bomb, pkg, tmp_path):
    """The same bytes as a plain body, with no Content-Length: cut at the manifest's size."""
    hostile.routes["stage-1.p2u"] = lambda h: send(h, 200, bomb, length=-1)
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST) as src, \
            pytest.raises(TransportError, match="sent more than the .* bytes the manifest"):
        src.fetch(1)
    part = tmp_path / "c" / ".p2u" / "stage-1.p2u.part"
    assert not part.exists() or part.stat().st_size <= stage_size(pkg, 1)


def test_manifest_gzip_small_is_decoded(hostile, pkg, tmp_path):
    """A server that gzips the manifest anyway (within the cap) still works."""
    text = (pkg / "manifest.json").read_bytes()
    hostile.routes["manifest.json"] = lambda h: send(h, 200, gzip.compress(text),
                                                     {"Content-Encoding": "gzip"})
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST) as src:
        assert src.manifest["package_id"] == json.loads(text)["package_id"]
    assert (tmp_path / "c" / "manifest.json").read_bytes() == text


def test_brotli_or_unknown_encoding_is_refused(hostile, tmp_path):
    hostile.routes["manifest.json"] = lambda h: send(h, 200, b"xx", {"Content-Encoding": "br"})
    with pytest.raises(TransportError, match="Content-Encoding br"):
        HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST)


# ---------------------------------------------------------------- class 5: endless data, lies


def test_endless_manifest_is_refused_while_streaming(hostile, tmp_path):
    """No Content-Length, endless: refused once past the cap, long before the server's 1 GiB."""
    sent = []
    hostile.routes["manifest.json"] = lambda h: (sent.append(1), endless(h))
    t = time.monotonic()
    with pytest.raises(TransportError, match="manifest is larger than"):
        HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST)
    assert time.monotonic() - t < 30 and len(sent) == 1  # final at once: not retried
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_huge_manifest_content_length_refused_before_reading(hostile, tmp_path):
    hostile.routes["manifest.json"] = lambda h: endless(h, length=10 ** 15)
    with pytest.raises(TransportError, match=f"larger than the {MAX_MANIFEST}-byte limit.*"
                                             "Content-Length says 1000000000000000"):
        HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST)


def test_endless_stage_is_cut_at_the_manifest_size(hostile, pkg, tmp_path):
    hostile.routes["stage-1.p2u"] = lambda h: endless(h)
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST) as src, \
            pytest.raises(TransportError, match="more than the .* bytes the manifest promises"):
        src.fetch(1)
    assert len(hostile.requests("stage-1.p2u")) == 1
    part = tmp_path / "c" / ".p2u" / "stage-1.p2u.part"
    assert part.stat().st_size <= stage_size(pkg, 1)


def test_more_bytes_than_content_length_are_not_taken(hostile, pkg, tmp_path):
    """The right file, then garbage past its Content-Length: the file arrives intact (the
    garbage is never read as file bytes), or the request is retried on a fresh connection."""
    data = (pkg / "stage-1.p2u").read_bytes()
    hostile.routes["stage-1.p2u"] = lambda h: send(h, 200, data + b"\xff" * 100_000,
                                                   length=len(data))
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST) as src:
        path = src.fetch(1)
        assert sha256_file(path) == sha256_file(pkg / "stage-1.p2u")
        src.fetch(2)  # the next request on that connection is not confused by the garbage


@pytest.mark.parametrize("length, error", [
    (10 ** 19, "the server has 10000000000000000000 bytes, the manifest says"),
    (10 ** 9, "the server has 1000000000 bytes, the manifest says"),
    (5, "the server has 5 bytes, the manifest says"),
    (10 ** 25, "bad Content-Length"),  # past what h11 parses: a protocol error, retried
])
def test_wrong_content_length_is_refused_before_writing(hostile, length, error, tmp_path):
    hostile.routes["stage-1.p2u"] = lambda h: endless(h, length=length, limit=1 << 20)
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST) as src, \
            pytest.raises(TransportError, match=error):
        src.fetch(1)
    assert not (tmp_path / "c" / ".p2u" / "stage-1.p2u.part").exists()
    assert len(hostile.requests("stage-1.p2u")) <= FAST.attempts


def test_manifest_declaring_an_absurd_size_is_refused_before_anything(hostile, pkg, tmp_path):
    m = json.loads((pkg / "manifest.json").read_bytes())
    m["stages"][1]["files"][0]["size"] = 1 << 60
    hostile.routes["manifest.json"] = lambda h: send(h, 200, json.dumps(m).encode())
    with pytest.raises(FormatError, match=r"more than the .*-byte limit|size is \d+, outside 0\.\."):
        HttpSource(hostile.url, tmp_path / "c", retry=FAST)
    assert [p.name for p in (tmp_path / "c").iterdir()] == [".p2u"]  # the manifest neither
    assert hostile.requests("stage-1.p2u") == []


def _resumable(pkg: Path, name: str, lie: Callable[[int, int], dict[str, str]]):
    """An answer for ``name``: the first request gets 1000 bytes then a cut connection; the
    resumes (Range) get 206 with the headers ``lie(start, size)``."""
    data = (pkg / name).read_bytes()

    def answer(h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        if rng is None:
            send(h, 200, b"", {"ETag": '"v1"'}, length=len(data))
            h.wfile.write(data[:1000])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        send(h, 206, data[start:], {"ETag": '"v1"', **lie(start, len(data))})
    return answer


@pytest.mark.parametrize("lie, error", [
    (lambda s, n: {"Content-Range": f"bytes {s}-{n - 1}/{n + 7}"}, "the server has"),
    (lambda s, n: {"Content-Range": f"bytes {s}-{n + 5000}/{n}"}, "does not fit"),
    (lambda s, n: {"Content-Range": f"bytes {s}-{s - 1}/{n}"}, "is not valid"),
    (lambda s, n: {"Content-Range": f"bytes 0-{n - 1}/{n}"}, "resumed at byte 0, not 1000"),
    (lambda s, n: {"Content-Range": "bytes 99999999999999999999999-1/2"}, "is not valid"),
    (lambda s, n: {"Content-Range": "lies"}, "without a valid Content-Range"),
], ids=["total", "past-the-end", "reversed", "start", "huge", "garbage"])
def test_content_range_lies(hostile, pkg, tmp_path, lie, error):
    """A resume answered with a lying Content-Range: refused; the 1000 bytes already there are
    neither extended nor corrupted."""
    hostile.routes["stage-2.p2u"] = _resumable(pkg, "stage-2.p2u", lie)
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST) as src, \
            pytest.raises(TransportError, match=error):
        src.fetch(2)
    part = tmp_path / "c" / ".p2u" / "stage-2.p2u.part"
    assert part.read_bytes() == (pkg / "stage-2.p2u").read_bytes()[:1000]
    assert len(hostile.requests("stage-2.p2u")) <= FAST.attempts + 1


# ---------------------------------------------------------------- class 5: time and retries


def test_slow_drip_hits_the_overall_deadline(hostile, pkg, tmp_path):
    """One byte every 0.3 s never trips the idle timeout (5 s); the deadline does."""
    data = (pkg / "stage-1.p2u").read_bytes()
    hostile.routes["stage-1.p2u"] = lambda h: drip(h, data, 0.3)
    policy = RetryPolicy(attempts=3, backoff=0.01, timeout=5.0, deadline=2.0, min_rate=1e9)
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=policy) as src:
        t = time.monotonic()
        with pytest.raises(TransportError, match="not complete within its deadline of 2 s"):
            src.fetch(1)
        took = time.monotonic() - t
    assert 1.5 < took < 4.0, took
    assert len(hostile.requests("stage-1.p2u")) == 1  # final: a deadline is not retried


def test_slow_drip_manifest_hits_the_deadline(hostile, pkg, tmp_path):
    text = (pkg / "manifest.json").read_bytes()
    hostile.routes["manifest.json"] = lambda h: drip(h, text, 0.3)
    policy = RetryPolicy(timeout=5.0, deadline=1.5)
    t = time.monotonic()
    with pytest.raises(TransportError, match="deadline of 1.5 s"):
        HttpSource(hostile.url, tmp_path / "c", retry=policy)
    assert time.monotonic() - t < 4.0
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_dripped_headers_hit_the_deadline(hostile, tmp_path):
    """The status line, then one header byte every 0.2 s: httpx is still reading headers
    (each read gets its byte well within the idle timeout), and the deadline ends it."""
    def headers_forever(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        give_up = time.monotonic() + 8  # a regression fails the test instead of hanging it
        try:
            while not h.server.stop.wait(0.2) and time.monotonic() < give_up:
                h.wfile.write(b"X")
                h.wfile.flush()
        except OSError:
            pass
        h.close_connection = True

    hostile.routes["manifest.json"] = headers_forever
    t = time.monotonic()
    with pytest.raises(TransportError, match="deadline of 1.5 s"):
        HttpSource(hostile.url, tmp_path / "c", retry=RetryPolicy(timeout=5.0, deadline=1.5))
    assert time.monotonic() - t < 3.5


def test_deadline_scales_with_the_file_size():
    p = RetryPolicy(deadline=10, min_rate=1000)
    assert p.budget() == 10 and p.budget(5000) == 15
    assert RetryPolicy().budget(50_000_000) > 600  # a large file on a slow link still fits
    for bad in ({"deadline": 0}, {"min_rate": -1}, {"max_attempts_total": 0}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_503_forever_costs_a_bounded_number_of_requests(hostile, tmp_path):
    hostile.routes["manifest.json"] = lambda h: send(h, 503, b"busy", {"Retry-After": "0"})
    with pytest.raises(TransportError, match=r"HTTP 503 .*gave up after 4 attempts"):
        HttpSource(hostile.url, tmp_path / "c",
                   retry=RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.01))
    assert len(hostile.requests("manifest.json")) == 4


def test_a_server_that_gives_a_byte_per_attempt_is_bounded_in_all(hostile, pkg, tmp_path):
    """Each attempt brings one new byte then drops, which resets the count of failures in a
    row: only ``max_attempts_total`` ends it, after exactly that many requests."""
    data = (pkg / "stage-2.p2u").read_bytes()

    def one_byte(h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        status, extra = (206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}) \
            if rng else (200, {})
        send(h, status, b"", {"ETag": '"v1"', **extra}, length=len(data) - start)
        h.wfile.write(data[start:start + 1])
        h.wfile.flush()
        h.connection.shutdown(socket.SHUT_RDWR)
        h.close_connection = True

    hostile.routes["stage-2.p2u"] = one_byte
    policy = RetryPolicy(attempts=3, backoff=0.001, max_backoff=0.001, max_attempts_total=7)
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=policy) as src, \
            pytest.raises(TransportError, match="gave up after 7 attempts in all"):
        src.fetch(2)
    assert len(hostile.requests("stage-2.p2u")) == 7


def test_close_stops_a_stalled_download_within_a_second(hostile, pkg, tmp_path):
    """The worker is stuck in a read (idle timeout 30 s): close() returns at once, and the
    thread is gone."""
    data = (pkg / "stage-1.p2u").read_bytes()
    hostile.routes["stage-1.p2u"] = lambda h: stall(h, data, 100)
    src = HttpSource(hostile.url, tmp_path / "c", retry=RetryPolicy(timeout=30.0))
    _wait_for(lambda: hostile.requests("stage-1.p2u"))
    time.sleep(0.3)  # into the stalled read
    assert src._worker.is_alive()
    t = time.monotonic()
    src.close()
    took = time.monotonic() - t
    assert took < 3.0, took
    assert not src._worker.is_alive()


def test_close_stops_a_caller_blocked_in_fetch(hostile, pkg, tmp_path):
    data = (pkg / "stage-2.p2u").read_bytes()
    hostile.routes["stage-2.p2u"] = lambda h: stall(h, data, 100)
    src = HttpSource(hostile.url, tmp_path / "c", prefetch=False,
                     retry=RetryPolicy(timeout=30.0))
    errors: list[BaseException] = []
    done = threading.Event()

    def get() -> None:
        try:
            src.fetch(2)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        done.set()

    threading.Thread(target=get, daemon=True).start()
    _wait_for(lambda: hostile.requests("stage-2.p2u"))
    time.sleep(0.3)
    t = time.monotonic()
    src.close()
    assert done.wait(3.0), "the blocked fetch did not end"
    assert time.monotonic() - t < 3.0
    assert isinstance(errors[0], TransportError) and "closed" in str(errors[0])


def test_cancel_breaks_a_stalled_read(hostile, pkg, tmp_path):
    data = (pkg / "stage-1.p2u").read_bytes()
    hostile.routes["stage-1.p2u"] = lambda h: stall(h, data, 100)
    with HttpSource(hostile.url, tmp_path / "c", retry=RetryPolicy(timeout=30.0)) as src:
        _wait_for(lambda: hostile.requests("stage-1.p2u"))
        time.sleep(0.3)
        t = time.monotonic()
        src.cancel()
        with pytest.raises(TransportError, match="cancelled"):
            src.fetch(1)
        _wait_for(lambda: not src._worker.is_alive(), 3.0)  # the read itself was broken
        assert time.monotonic() - t < 3.0


def _wait_for(cond: Callable[[], object], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.02)


# ---------------------------------------------------------------- class 10: redirects


@pytest.fixture
def other(pkg):
    """A second server on another port: another origin, serving the same package."""
    with Hostile(pkg) as srv:
        yield srv


def _redirect(target: str, status: int = 302):
    return lambda h: send(h, status, b"", {"Location": target})


SECRETS = {"Authorization": "Bearer s3cret", "X-Api-Key": "k-123", "Cookie": "session=abc"}


def test_redirect_to_another_origin_carries_no_credentials(hostile, other, pkg, tmp_path):
    for name in ("manifest.json", "stage-1.p2u"):
        hostile.routes[name] = _redirect(other.url + name)
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST,
                    headers=SECRETS) as src:
        assert sha256_file(src.fetch(1)) == sha256_file(pkg / "stage-1.p2u")
        src.fetch(2)  # not redirected: served by the first origin
    assert hostile.requests("manifest.json")[0]["authorization"] == "Bearer s3cret"
    assert hostile.requests("stage-2.p2u")[0]["x-api-key"] == "k-123"
    assert len(other.log) == 2
    for _, headers in other.log:
        assert not {"authorization", "x-api-key", "cookie"} & set(headers), headers
        assert headers["accept-encoding"] == "identity"


def test_redirect_with_a_callers_client_carries_no_credentials(hostile, other, tmp_path):
    """The same with an httpx.Client of the caller's, with its own headers and auth."""
    hostile.routes["manifest.json"] = _redirect(other.url + "manifest.json", 307)
    with httpx.Client(headers={"X-Api-Key": "k-123"}, auth=("user", "pw")) as client, \
            HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST,
                       client=client):
        pass
    assert hostile.requests("manifest.json")[0]["authorization"].startswith("Basic ")
    (_, headers), = other.log
    assert "authorization" not in headers and "x-api-key" not in headers


def test_same_origin_redirect_keeps_the_headers(hostile, tmp_path):
    moved = (hostile.root / "manifest.json").read_bytes()
    hostile.routes["manifest.json"] = lambda h: send(h, 200, moved) if h.path.startswith(
        "/moved/") else _redirect("/moved/manifest.json", 301)(h)
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST,
                    headers=SECRETS):
        pass
    moved = [h for p, h in hostile.log if p == "/moved/manifest.json"]
    assert moved and moved[0]["authorization"] == "Bearer s3cret"


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/manifest.json",
                                    "gopher://127.0.0.1:70/x", "data:text/plain,hi"])
def test_redirect_never_leaves_http(hostile, target, tmp_path):
    hostile.routes["manifest.json"] = _redirect(target)
    with pytest.raises(TransportError, match="only http:// and https:// redirects|not to http"):
        HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST)
    assert len(hostile.requests("manifest.json")) == 1  # final at once


def test_redirect_loops_are_bounded(hostile, tmp_path):
    hostile.routes["manifest.json"] = _redirect("manifest.json")
    with pytest.raises(TransportError, match="more than 5 redirects"):
        HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=FAST)
    assert len(hostile.requests("manifest.json")) == 6


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (the cryptography package)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_to_http_redirect_is_a_refused_downgrade(pkg, other, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    with Hostile(pkg) as tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
        url = f"https://127.0.0.1:{tls.server_address[1]}/"
        client_ctx = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(verify=client_ctx) as client:
            with HttpSource(url, tmp_path / "ok", prefetch=False, retry=FAST,
                            client=client) as src:  # the TLS server itself works
                src.fetch(1)
            tls.routes["manifest.json"] = _redirect(other.url + "manifest.json")
            with pytest.raises(TransportError, match="from https to plain http"):
                HttpSource(url, tmp_path / "c", prefetch=False, retry=FAST, client=client,
                           headers=SECRETS)
    assert other.log == []  # not even asked


# ---------------------------------------------------------------- class 6: the mirror folder


def test_fetch_into_a_users_folder_is_refused_with_nothing_changed(hostile, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "stage-1.p2u").write_bytes(b"my own file")
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(P2UError, match="is not empty and is not a p2u mirror"):
        fetch(hostile.url, out, retry=FAST)
    r = CliRunner().invoke(cli_http.fetch, [hostile.url, "-o", str(out), "-q"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "not a p2u mirror" in r.output
    assert snapshot(tmp_path) == before
    assert hostile.log == []  # refused before any request


def test_mirror_keeps_its_own_files_hidden(hostile, pkg, tmp_path):
    out = tmp_path / "m"
    fetch(hostile.url, out, retry=FAST)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([".p2u", *(p.name for p in pkg.iterdir())])
    assert not list(out.glob("*.part*")) and not list(out.glob("*.lock"))
    assert (out / ".p2u" / "lock").exists()
    fetch(hostile.url, out, retry=FAST)  # a mirror: fetching again is fine


def test_a_users_file_in_a_mirror_is_never_replaced(hostile, pkg, tmp_path):
    """A file of the user's where the mirror wants stage-2.p2u: refused, left as it is."""
    out = tmp_path / "m"
    cancel = threading.Event()
    hostile.routes["stage-2.p2u"] = lambda h: (cancel.set(), send(h, 503, b""))
    with pytest.raises(TransportError):
        fetch(hostile.url, out, cancel=cancel, retry=FAST)
    del hostile.routes["stage-2.p2u"]
    (out / "stage-2.p2u").write_bytes(b"the user's own stage-2.p2u")
    before = snapshot(out)
    with pytest.raises(P2UError, match="stage-2.p2u is not the file the manifest lists, and "
                                       "p2u did not write it"):
        fetch(hostile.url, out, retry=FAST)
    assert (out / "stage-2.p2u").read_bytes() == b"the user's own stage-2.p2u"
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith(".p2u")} == \
        {k: v for k, v in before.items() if not k.startswith(".p2u")}


def test_a_users_file_with_the_right_bytes_is_used_but_never_deleted(hostile, pkg, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / ".p2u").mkdir()
    (out / "stage-2.p2u").write_bytes((pkg / "stage-2.p2u").read_bytes())
    ino = (out / "stage-2.p2u").stat().st_ino
    fetch(hostile.url, out, retry=FAST)
    assert hostile.requests("stage-2.p2u") == []  # it was used as it is
    # a new package at the same URL, without stage-2: p2u's files go, the user's stays
    m = json.loads((pkg / "manifest.json").read_bytes())
    m["package_id"] = "f" * 64
    m["stages"], m["plan"] = m["stages"][:2], m["plan"][:2]
    m.pop("probe", None)
    hostile.routes["manifest.json"] = lambda h: send(h, 200, json.dumps(m).encode())
    with HttpSource(hostile.url, out, prefetch=False, retry=FAST):
        pass
    assert (out / "stage-2.p2u").stat().st_ino == ino


def test_a_file_the_user_replaced_is_not_deleted_when_the_package_changes(hostile, pkg,
                                                                          tmp_path):
    out = tmp_path / "m"
    fetch(hostile.url, out, retry=FAST)
    (out / "stage-2.p2u").unlink()
    (out / "stage-2.p2u").write_bytes(b"mine now")
    m = json.loads((pkg / "manifest.json").read_bytes())
    m["stages"][2]["files"][0]["sha256"] = "0" * 64  # the server's stage-2 changed
    hostile.routes["manifest.json"] = lambda h: send(h, 200, json.dumps(m).encode())
    with HttpSource(hostile.url, out, prefetch=False, retry=FAST) as src:
        with pytest.raises(P2UError, match="p2u did not write it"):
            src.fetch(2)
    assert (out / "stage-2.p2u").read_bytes() == b"mine now"


def test_a_refused_manifest_is_never_written(hostile, pkg, tmp_path):
    out = tmp_path / "m"
    fetch(hostile.url, out, retry=FAST)
    good = (out / "manifest.json").read_bytes()
    before = snapshot(out)
    m = json.loads(good)
    m["package_id"] = "e" * 64
    m["stages"][1]["files"][0]["path"] = "../../escape"
    hostile.routes["manifest.json"] = lambda h: send(h, 200, json.dumps(m).encode())
    with pytest.raises(FormatError, match="not a plain file name"):
        fetch(hostile.url, out, retry=FAST)
    assert (out / "manifest.json").read_bytes() == good
    assert snapshot(out) == before  # and no cached file of the old package was dropped
    with pytest.raises(FormatError):
        fetch(hostile.url, tmp_path / "fresh", retry=FAST)
    assert not (tmp_path / "fresh" / "manifest.json").exists()


def test_an_older_mirror_is_adopted(hostile, pkg, tmp_path):
    """A mirror from before .p2u/ (a .p2u.lock beside the files, a .part) is taken over."""
    out = tmp_path / "old"
    out.mkdir()
    for name in ("manifest.json", "base.onnx", "base.bin"):
        (out / name).write_bytes((pkg / name).read_bytes())
    (out / ".p2u.lock").write_bytes(b"")
    (out / "stage-2.p2u.part").write_bytes((pkg / "stage-2.p2u").read_bytes()[:500])
    fetch(hostile.url, out, retry=FAST)
    assert not (out / ".p2u.lock").exists() and not (out / "stage-2.p2u.part").exists()
    assert sha256_file(out / "stage-2.p2u") == sha256_file(pkg / "stage-2.p2u")


# ---------------------------------------------------------------- class 7: p2u serve


@pytest.fixture
def served(pkg, tmp_path):
    """A served root holding the package, a file outside it, and hostile entries."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "m.p2u").mkdir()
    for p in pkg.iterdir():
        (root / "m.p2u" / p.name).write_bytes(p.read_bytes())
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("secret key")
    (root / "leak.txt").symlink_to(outside / "key.txt")
    (root / "leakdir").symlink_to(outside)
    (root / "inside-link.p2u").symlink_to(root / "m.p2u" / "stage-1.p2u")
    (root / ".hidden").write_text("hidden")
    os.mkfifo(root / "fifo")
    return root


def _get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    u = httpx.URL(url)
    c = http.client.HTTPConnection(u.host, u.port, timeout=10)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def test_serve_refuses_symlinks_dotfiles_and_fifos(served, capfd):
    lines: list[str] = []
    with PackageServer(served, log=lines.append) as srv:
        assert _get(srv.url, "/m.p2u/stage-1.p2u")[0] == 200
        for path in ("/leak.txt", "/leakdir/key.txt", "/inside-link.p2u", "/.hidden",
                     "/fifo", "/m.p2u/../leak.txt", "/%2e%2e/secret/key.txt",
                     "/m.p2u/%2Fetc%2Fpasswd", "/m.p2u/", "/m.p2u/stage-1.p2u/x",
                     "/..%2f..%2fsecret/key.txt", "/m.p2u/%ff"):
            status, _, body = _get(srv.url, path)
            assert status == 404 and b"secret" not in body, path
    assert not any("error" in line for line in lines), lines
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("rng, status", [
    ("bytes=99999999999999999999-", 416),
    ("bytes=99999999999999999999-99999999999999999999", 416),
    ("bytes=-0", 416),
    ("bytes=5-2", 200),
    ("bytes=" + ",".join(f"{i}-{i}" for i in range(1000)), 200),
    ("bytes=" + "9" * 5000 + "-", 200),
    ("bytes=-" + "9" * 25, 206),
    ("bytes=--1", 200),
    ("bytes=-1-2", 200),
    ("bytes=0-0", 206),
    ("items=0-1", 200),
    ("bytes=\u0663-", 200),
])
def test_serve_range_parsing_is_robust(served, rng, status, capfd):
    lines: list[str] = []
    size = (served / "m.p2u" / "stage-1.p2u").stat().st_size
    with PackageServer(served, log=lines.append) as srv:
        got, headers, body = _get(srv.url, "/m.p2u/stage-1.p2u",
                                  {"Range": rng.encode("utf-8").decode("latin-1")})
    assert got == status
    if status == 416:
        assert headers["Content-Range"] == f"bytes */{size}" and body == b""
    elif status == 200:
        assert len(body) == size
    assert not any("error" in line for line in lines), lines
    assert "Traceback" not in capfd.readouterr().err


def test_serve_closes_an_idle_connection(served):
    with PackageServer(served, idle_timeout=0.5) as srv, \
            socket.create_connection(srv.server_address[:2], timeout=5) as s:
        s.sendall(b"GET /m.p2u/manifest.json HT")  # half a request line, then silence
        t = time.monotonic()
        assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - t < 3.0


def test_serve_bounds_concurrent_connections(served):
    """Two connections fill the server (max_connections=2): a third gets 503 with
    Retry-After at once; once one closes, requests are served again."""
    with PackageServer(served, max_connections=2, idle_timeout=10) as srv:
        addr = srv.server_address[:2]
        held = [socket.create_connection(addr, timeout=5) for _ in range(2)]
        time.sleep(0.3)  # both accepted, each with its handler waiting for a request
        status, headers, body = _get(srv.url, "/m.p2u/manifest.json")
        assert status == 503 and headers["Retry-After"] == "1", (status, headers)
        held[0].close()
        _wait_for(lambda: _get(srv.url, "/m.p2u/manifest.json")[0] == 200)
        held[1].close()


def test_serve_survives_a_connection_flood(served):
    """200 connections at once against max_connections=4: the server's threads stay bounded
    (4 handlers + at most 8 answering 503), and it serves again once they are gone."""
    before = threading.active_count()
    with PackageServer(served, max_connections=4, idle_timeout=5) as srv:
        addr = srv.server_address[:2]
        flood = []
        peak = 0
        for _ in range(200):
            try:
                flood.append(socket.create_connection(addr, timeout=5))
            except OSError:
                pass
            peak = max(peak, threading.active_count())
        time.sleep(0.5)
        peak = max(peak, threading.active_count())
        assert peak - before <= 1 + 4 + 8, peak - before  # + the server's own thread
        for s in flood:
            s.close()
        _wait_for(lambda: _get(srv.url, "/m.p2u/manifest.json")[0] == 200)


def test_malformed_manifest_shapes_give_one_line(hostile, pkg, tmp_path):
    """Manifests of the wrong shape reaching the client: FormatError, never a raw exception,
    and nothing written."""
    good = json.loads((pkg / "manifest.json").read_bytes())
    bad = [dict(good, base_model=None), dict(good, base_model={"files": 3}),
           dict(good, probe=[1]), dict(good, stages=[{"index": 0, "files": [7]}]),
           dict(good, stages=[{"index": 0, "files": [{"path": "x", "size": True,
                                                      "sha256": "0" * 64}]}])]
    for i, m in enumerate(bad):
        hostile.routes["manifest.json"] = lambda h, m=m: send(h, 200, json.dumps(m).encode())
        with pytest.raises(FormatError):
            HttpSource(hostile.url, tmp_path / f"c{i}", prefetch=False, retry=FAST)
        assert not (tmp_path / f"c{i}" / "manifest.json").exists()
    hostile.routes["manifest.json"] = lambda h: send(h, 200, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(FormatError):
        HttpSource(hostile.url, tmp_path / "deep", prefetch=False, retry=FAST)


def test_a_client_rides_out_a_busy_server(served, tmp_path):
    """The p2u client retries the dev server's 503 (Retry-After: 1) and gets the package."""
    with PackageServer(served, max_connections=1, idle_timeout=10) as srv:
        blocker = socket.create_connection(srv.server_address[:2], timeout=5)
        time.sleep(0.2)
        threading.Timer(0.5, blocker.close).start()
        out = fetch(srv.url + "m.p2u/", tmp_path / "m",
                    retry=RetryPolicy(attempts=5, backoff=0.1, max_backoff=1.0))
    assert sha256_file(out / "stage-2.p2u") == sha256_file(served / "m.p2u" / "stage-2.p2u")


def test_every_request_asks_for_identity(hostile, tmp_path):
    fetch(hostile.url, tmp_path / "m", retry=FAST)
    assert hostile.log and all(h.get("accept-encoding") == "identity" for _, h in hostile.log)


def test_digest_of_a_small_manifest(pkg):
    """Sanity of the fixture: the package is what the manifest says (guards the tests)."""
    m = json.loads((pkg / "manifest.json").read_bytes())
    for st in m["stages"]:
        for f in st["files"]:
            assert hashlib.sha256((pkg / f["path"]).read_bytes()).hexdigest() == f["sha256"]
