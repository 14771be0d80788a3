"""Give memory that numpy, zstandard or onnxruntime freed back to the system."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc; a no-op elsewhere).

    glibc keeps freed blocks below its (adaptive) mmap threshold in its heaps, one per thread
    that allocated: without this, what one phase of work freed (decoding a stage, coding the
    weights, a dropped onnxruntime session) stays resident and adds to the next one's peak
    (measured on MiniLM: 0.5 to 0.8 x the fp32 weights).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
