"""Real parts for the HTTP tests: nginx on 127.0.0.1, and a proxy that injects faults."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# ---------------------------------------------------------------- nginx


def nginx_binary() -> str:
    """Path of nginx; skips the test when absent, or fails it when the CI variable is set."""
    path = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
         if os.access(p, os.X_OK)), None)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("nginx is required when CI is set (apt-get install nginx-light)")
    pytest.skip("nginx is not installed (apt-get install nginx-light); these tests never skip "
                "when the CI variable is set")
    raise AssertionError  # unreachable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nginx_conf(binary: str, root: Path, prefix: Path, port: int) -> str:
    built = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False).stderr
    temps = ["client_body", "proxy"] + [m for m in ("fastcgi", "uwsgi", "scgi")
                                        if f"--without-http_{m}_module" not in built]
    for t in temps:
        (prefix / "tmp" / t).mkdir(parents=True, exist_ok=True)
    temp_lines = "\n".join(f"    {t}_temp_path {prefix}/tmp/{t};" for t in temps)
    # Running as root, nginx's workers would drop to "nobody", who cannot read a pytest tmp dir.
    user = "user root;" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    return f"""
{user}
daemon off;
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {prefix}/access.log;
{temp_lines}
    types {{ application/json json; application/octet-stream p2u bin onnx npz; }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 1000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(root: Path, prefix: Path) -> Iterator[str]:
    """nginx serving the files under ``root`` on 127.0.0.1; yields the base URL."""
    binary = nginx_binary()
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(_nginx_conf(binary, root, prefix, port))
    proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf), "-e",
                             str(prefix / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                log = (prefix / "error.log").read_text() if (prefix / "error.log").exists() \
                    else ""
                pytest.fail(f"nginx did not start: {err} {log}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                         timeout=0.2):
                break
            if time.monotonic() > deadline:
                pytest.fail("nginx did not start listening within 10 s")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- a proxy that injects faults


@dataclass
class Fault:
    """What the proxy does to the next ``times`` requests whose path ends with ``path``.

    ``kind``: ``"drop"`` (close the connection after ``at`` body bytes), ``"flip"`` (invert the
    body byte at ``at``), ``"stall"`` (stop for ``seconds`` after ``at`` body bytes) or
    ``"status"`` (answer ``status`` without asking the server). ``times=-1``: every request.
    """

    path: str
    kind: str
    at: int = 0
    status: int = 500
    seconds: float = 0.0
    times: int = 1


class FaultProxy(ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of ``upstream``; ``log`` lists what it forwarded."""

    daemon_threads = True

    def __init__(self, upstream: str):
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str | None, int]] = []  # method, path, Range, status
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up on a stalled or cut answer is expected here

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def take(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.times != 0 and path.endswith(f.path):
                    f.times -= 1 if f.times > 0 else 0
                    return f
        return None

    def requests(self, suffix: str) -> list[tuple[str, str, str | None, int]]:
        return [r for r in self.log if r[1].endswith(suffix)]

    def close(self) -> None:
        self.shutdown()
        self._thread.join()
        self.server_close()

    def __enter__(self) -> FaultProxy:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class _ProxyHandler(BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        fault = self.server.take(self.path)
        if fault is not None and fault.kind == "status":
            self.server.log.append((self.command, self.path, self.headers.get("Range"),
                                    fault.status))
            body = f"injected {fault.status}\n".encode()
            self.send_response(fault.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        conn.request(self.command, self.path, headers=headers)
        resp = conn.getresponse()
        self.server.log.append((self.command, self.path, self.headers.get("Range"),
                                resp.status))
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP:
                self.send_header(k, v)
        self.end_headers()
        pos = 0
        try:
            while self.command != "HEAD" and (data := resp.read(8192)):
                n = len(data)
                if fault is not None and pos <= fault.at < pos + len(data):
                    cut = fault.at - pos
                    if fault.kind == "flip":
                        data = data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1:]
                    elif fault.kind == "drop":
                        self.wfile.write(data[:cut])
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    elif fault.kind == "stall":
                        self.wfile.write(data[:cut])
                        self.wfile.flush()
                        time.sleep(fault.seconds)
                        data = data[cut:]
                self.wfile.write(data)
                pos += n
        except OSError:
            self.close_connection = True
        finally:
            conn.close()
