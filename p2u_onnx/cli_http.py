"""``p2u serve`` and ``p2u fetch``: a thin layer over :mod:`.devserver` and :mod:`.transport`.

Registered in :mod:`p2u_onnx.cli` with ``main.add_command``.
"""

from __future__ import annotations

import threading
import urllib.parse
from pathlib import Path

import click

from ._cliutil import CONTEXT, ProgressBar, _fmt_bytes, _friendly, cleanup_on_sigterm


@click.command(context_settings=CONTEXT)
@click.argument("package", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (keep 127.0.0.1 unless you mean to share it).")
@click.option("--port", type=int, default=8000, show_default=True,
              help="Port to listen on; 0 picks a free one.")
@click.option("--rate", default=None,
              help="Bandwidth limit shared by all connections, e.g. 250kbit, 1mbit, 10mbit, 2MB.")
@click.option("--max-connections", type=click.IntRange(min=1), default=32, show_default=True,
              help="Connections served at once; more get 503 (Retry-After: 1).")
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds a silent connection is kept open.")
@click.option("-q", "--quiet", is_flag=True, help="Do not log requests.")
@_friendly
def serve(package, host, port, rate, max_connections, idle_timeout, quiet) -> None:
    """Serve PACKAGE (a package directory) over HTTP, for development and slow-link tests.

    Supports HEAD, Range requests (206, 416), ETag and Last-Modified; serves regular files
    only (no symbolic links, no dotfiles). In production serve the directory as plain files
    with nginx, a CDN or a bucket (docs/delivery.md): no p2u code is needed there.
    """
    from .devserver import PackageServer, parse_rate

    limit = parse_rate(rate) if rate else None
    log = None if quiet else (lambda line: click.echo(line, err=True))
    server = PackageServer(package, host, port, rate=limit, log=log,
                           idle_timeout=idle_timeout, max_connections=max_connections)
    what = "package" if (package / "manifest.json").is_file() else \
        "directory (no manifest.json: not a package)"
    pace = f", limited to {rate} ({_fmt_bytes(limit)}/s)" if limit else ""
    try:
        # SIGTERM (a service manager's stop) as Ctrl-C, from before the first line: exit 0
        with cleanup_on_sigterm():
            click.echo(f"serving {what} {package} at {server.url}{pace}; Ctrl-C stops")
            if host not in ("127.0.0.1", "::1", "localhost"):
                click.echo("warning: p2u serve is a development server (no TLS, no access "
                           "control); serve production traffic with nginx or a CDN "
                           "(docs/delivery.md)", err=True)
            server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    finally:
        server.server_close()


@click.command(context_settings=CONTEXT)
@click.argument("url")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory to mirror into [default: the last segment of URL, e.g. model.p2u].")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait to connect and between two reads.")
@click.option("--attempts", type=int, default=6, show_default=True,
              help="Tries per request without progress before giving up.")
@click.option("--expect", metavar="sha256:HEX",
              help="Refuse the package unless manifest.json's sha256 is HEX (this pins every "
                   "file: the manifest lists their sha256).")
@click.option("--trust", "trust", multiple=True, metavar="PUBKEY",
              help="Refuse the package unless manifest.json.sig is a valid, unexpired signature "
                   "by this key: 'ed25519:...' or a .pub file (repeat for several keys).")
@click.option("--allow-rollback", is_flag=True,
              help="Accept a package older than the version of its model seen before (the "
                   "mirror's newer files are then replaced).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_friendly
def fetch(url, output, timeout, attempts, expect, trust, allow_rollback, quiet) -> None:
    """Mirror the package at URL into a directory, checking every file against its manifest.

    Resumable: after an interruption run the same command again and it continues where it
    stopped. The result is a package directory (p2u verify, p2u restore, ProgressiveSession),
    with the package's signature when it has one. A refused manifest (--expect, --trust, or a
    version older than one seen before) is never written, and the directory is left as it was.
    """

    try:
        from .transport import RetryPolicy
        from .transport import fetch as do_fetch
    except ImportError as e:
        raise click.ClickException(f"p2u fetch needs httpx: pip install 'p2u-onnx[http]' "
                                   f"({e})") from None

    if output is None:
        name = Path(urllib.parse.urlsplit(url).path.rstrip("/")).name
        if not name or name == "manifest.json":
            raise click.UsageError("cannot name the directory after this URL: give -o DIR")
        output = Path(name)
    try:
        retry = RetryPolicy(attempts=attempts, timeout=timeout)
    except ValueError as e:  # --attempts 0, --timeout -1 or nan: a usage error, one line
        raise click.UsageError(f"--attempts / --timeout: {e}") from None
    cancel = threading.Event()
    with ProgressBar("fetch", quiet) as progress, cleanup_on_sigterm():
        try:
            path = do_fetch(url, output, progress, cancel, retry=retry,
                            expect=expect, trust=trust or None, allow_rollback=allow_rollback)
        except KeyboardInterrupt:
            cancel.set()
            raise
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    size = sum(p.stat().st_size for p in files)
    click.echo(f"fetched {len(files)} files ({_fmt_bytes(size)}) into {path}")
