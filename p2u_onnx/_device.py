"""Which modules of :mod:`p2u_onnx` make up the device-only distribution, ``p2u-onnx-runtime``.

This repository builds two distributions from the one ``p2u_onnx`` package, the way
onnxruntime ships ``onnxruntime`` and ``onnxruntime-gpu``; install one of them, not both:

``p2u-onnx`` (the repository root)
    Everything: the encoder, restore/inspect/verify, the ``p2u`` command, the runtime.
    Needs onnx, click, tqdm, httpx besides numpy, onnxruntime and zstandard.
``p2u-onnx-runtime`` (``runtime/``)
    The device side only: :class:`~p2u_onnx.runtime.ProgressiveSession` from a folder, bytes or
    a URL, :func:`~p2u_onnx.transport.fetch`, the package format and its checks. Needs numpy,
    onnxruntime and zstandard; httpx only through its ``[http]`` extra (URLs). Its wheel holds
    the modules in :data:`DEVICE_MODULES` and nothing else (``runtime/setup.py`` reads this
    file).

In a device-only install, importing a module of :data:`FULL_ONLY` (directly or through a name
of ``p2u_onnx`` such as ``p2u_onnx.encode``) raises :class:`NotInstalledError`, one line that
says to install ``p2u-onnx``. Every module of the package is in exactly one of the two sets
(``tests/test_device.py`` checks it, and that the device modules import without onnx, click
or tqdm): a new module must be given a side.

The two tuples are plain literals: ``runtime/setup.py`` reads them with :mod:`ast`, without
importing the package.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

from .errors import P2UError

DEVICE_DISTRIBUTION = "p2u-onnx-runtime"
FULL_DISTRIBUTION = "p2u-onnx"

# modules of the device distribution (numpy, onnxruntime, zstandard; httpx for transport)
DEVICE_MODULES = (
    "__init__", "_base_session", "_device", "_memory", "_mirror", "_priority", "_rwlock",
    "_workdir", "_writeback", "codecs", "config", "dtypes", "errors", "external", "format",
    "palette", "probe", "quantizers", "reconstruct", "runtime", "transport", "trust",
)

# modules of the full distribution only (the encoder and what needs onnx, click or tqdm)
FULL_ONLY = (
    "_cliutil", "allocate", "api", "base_speed", "calibrate", "cli", "cli_http", "demo",
    "devserver", "encoder", "evaluation", "graph", "output_metrics", "passes", "sensitivity",
    "updates", "zstd_reference",
)


class NotInstalledError(P2UError, ImportError):
    """A part of p2u_onnx that the device-only distribution does not hold was imported."""


def not_installed(module: str) -> NotInstalledError:
    """The one-line error for ``p2u_onnx.<module>`` missing from a device-only install."""
    e = NotInstalledError(
        f"p2u_onnx.{module} is not part of {DEVICE_DISTRIBUTION} (the device-only install: "
        f"ProgressiveSession, fetch, the package format); pip install {FULL_DISTRIBUTION} for "
        "the encoder, restore, inspect, verify and the p2u command")
    e.name = f"p2u_onnx.{module}"
    return e


class _MissingFinder(importlib.abc.MetaPathFinder):
    """Last in ``sys.meta_path``: reached only when no other finder found a module, i.e. for a
    module of :data:`FULL_ONLY` in a device-only install, which it refuses in one line."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        package, _, module = fullname.partition(".")
        if package == "p2u_onnx" and module in FULL_ONLY:
            raise not_installed(module)
        return None


def install_finder() -> None:
    """Append :class:`_MissingFinder` to ``sys.meta_path`` once."""
    if not any(isinstance(f, _MissingFinder) for f in sys.meta_path):
        sys.meta_path.append(_MissingFinder())
