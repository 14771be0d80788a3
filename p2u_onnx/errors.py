"""The exception tree. Every error p2u raises on purpose is a :class:`P2UError`::

    P2UError
    ├── PlanError               bad encode options (stage plan, bits, granularity)
    ├── UnsupportedModelError   input is not an ONNX model p2u can convert
    ├── FormatError             a package or stage file is malformed or of an unknown version
    │   └── IntegrityError      digest mismatch, truncated, foreign or out-of-order stage
    │       └── TrustError      pin, signature, expiry or version (rollback) refused
    ├── PatchError              a runtime upgrade did not take effect
    └── TransportError          an HTTP fetch failed (carries the URL)

The CLI prints ``str(error)`` on one line and exits non-zero; where the advice differs between
the Python API and the command line (``overwrite=True`` / ``--force``), an error carries the
command line's wording in ``cli_message`` and the CLI prints that instead.
"""

from __future__ import annotations

__all__ = [
    "P2UError",
    "PlanError",
    "UnsupportedModelError",
    "FormatError",
    "IntegrityError",
    "TrustError",
    "PatchError",
    "TransportError",
]


class P2UError(Exception):
    """Root of every error raised by p2u_onnx.

    ``cli``: the message as the command line should word it (its options instead of the API's
    keyword arguments); ``str(error)`` keeps the API's wording.
    """

    def __init__(self, *args: object, cli: str | None = None):
        super().__init__(*args)
        self.cli_message = cli


class PlanError(P2UError, ValueError):
    """Encode options are invalid (e.g. ``--stages 8,4``)."""


class UnsupportedModelError(P2UError):
    """The input is not an ONNX model p2u can convert (unknown op domain, bad file...)."""


class FormatError(P2UError):
    """A package, manifest or stage file is malformed or of an unsupported version."""


class IntegrityError(FormatError):
    """Bytes do not match what the manifest promises: corrupt, truncated, foreign or reordered."""


class TrustError(IntegrityError):
    """A package is refused by a check its user asked for or that protects their device: the
    manifest does not match its pin, its signature is missing, bad, by an untrusted key or
    expired, or its version is older than one accepted before (rollback)."""


class PatchError(P2UError):
    """Applying a stage to a live session failed or did not take effect."""


class TransportError(P2UError):
    """Fetching a package over HTTP failed."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(f"{url}: {message}" if url else message)
        self.url = url
