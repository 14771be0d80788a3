"""Helpers shared by the CLI modules: one-line errors, byte counts."""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Iterator

import click

from .errors import P2UError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _friendly(fn):
    """Turn library errors (and a few OS errors) into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except P2UError as e:
            raise click.ClickException(getattr(e, "cli_message", None) or str(e)) from None
        except OSError as e:
            raise click.ClickException(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) \
                from None
        except Terminated:
            click.echo("Error: terminated (SIGTERM)", err=True)
            raise click.exceptions.Exit(128 + signal.SIGTERM) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:  # a bug or an unforeseen input: still one line, no traceback
            text = " ".join(str(e).split())[:300]
            raise click.ClickException(f"internal error ({type(e).__name__}"
                                       f"{': ' + text if text else ''}); please report it") \
                from None

    return wrapper


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class ProgressBar:
    """``progress(done, total)`` callback drawing a tqdm bar on stderr from the first report;
    does nothing when ``quiet``. Use as a context manager so the bar is always closed."""

    def __init__(self, desc: str, quiet: bool = False):
        self.desc, self.quiet, self.bar = desc, quiet, None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=self.desc,
                            leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM inside :func:`cleanup_on_sigterm`."""


@contextlib.contextmanager
def cleanup_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (as Ctrl-C
    raises KeyboardInterrupt), so that the code inside unwinds and removes what it was writing
    (an encode's temporary folder, a session's work folder) before the process ends with
    status 143. The previous handler is put back afterwards. Only the CLI does this: the
    library never installs signal handlers (a process that dies leaves its work folders to
    the next session or encode, which removes them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
