"""``zstd -19`` of the model file: what a package is compared with (encoder side).

A user who does not use p2u would ship the model file compressed; a package larger than that
is a warning in the encoder's output and the manifest. :class:`ZstdReference` compresses on a
thread while the encoder works. Level 19 runs at about 3 MB/s on one core, so files (the .onnx
file and the external data files it names) up to :data:`EXACT_LIMIT` bytes are compressed
whole, and larger ones are estimated from :data:`SAMPLES` evenly spaced slices of
:data:`SAMPLE_BYTES` at the same level (``method`` says which): weights compress alike all
through a file, and zstd's window does not reach across the slices' gaps either.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["ZstdReference", "EXACT_LIMIT"]

LEVEL = 19
EXACT_LIMIT = 8 << 20
SAMPLES = 8
SAMPLE_BYTES = 1 << 20
MODEL_PROTO_LIMIT = 256 << 20  # in-memory models larger than this are not serialized again


def _model_files(source: Any) -> list[Path] | bytes | None:
    """The files a model is made of (the .onnx file and its external data files), or the
    serialized bytes of an in-memory model; None when there is nothing to compare with."""
    from onnx import ModelProto

    if isinstance(source, ModelProto):
        if source.ByteSize() > MODEL_PROTO_LIMIT:  # a second copy of a big model: no
            return None
        try:
            return source.SerializeToString()
        except Exception:  # noqa: BLE001 - over 2 GB: no reference
            return None
    path = Path(source)
    if not path.is_file():
        return None
    files = [path]
    try:
        import onnx

        # external data files are named in the structure; loading it without the data is
        # cheap only when the weights are outside, so look only when the file is small
        if path.stat().st_size < (256 << 20):
            m = onnx.load(str(path), load_external_data=False)
            from .graph import iter_slots

            seen = set()
            for slot in iter_slots(m):
                for e in slot.tensor.external_data:
                    if e.key == "location" and e.value not in seen:
                        seen.add(e.value)
                        f = (path.parent / e.value)
                        if f.is_file() and f.resolve().parent == path.parent.resolve():
                            files.append(f)
    except Exception:  # noqa: BLE001 - the encoder reports unreadable models itself
        pass
    return files


def _compressed_size(parts: list[Path] | bytes) -> tuple[int, str]:
    import zstandard

    cctx = zstandard.ZstdCompressor(level=LEVEL)
    if isinstance(parts, bytes):
        sizes = [len(parts)]
    else:
        sizes = [os.path.getsize(p) for p in parts]
    total = sum(sizes)
    if total <= EXACT_LIMIT:
        data = parts if isinstance(parts, bytes) else b"".join(p.read_bytes() for p in parts)
        return len(cctx.compress(data)), f"zstd -{LEVEL}"
    # evenly spaced slices over the concatenated files
    read = sampled = 0
    starts = [i * (total - SAMPLE_BYTES) // (SAMPLES - 1) for i in range(SAMPLES)]
    for start in starts:
        chunk = _slice(parts, sizes, start, SAMPLE_BYTES)
        read += len(chunk)
        sampled += len(cctx.compress(chunk))
    return int(round(sampled / max(read, 1) * total)), \
        f"zstd -{LEVEL} of {SAMPLES} slices of {SAMPLE_BYTES >> 20} MB, scaled to the file size"


def _slice(parts: list[Path] | bytes, sizes: list[int], start: int, length: int) -> bytes:
    if isinstance(parts, bytes):
        return parts[start:start + length]
    out = b""
    offset = 0
    for p, size in zip(parts, sizes):
        if start < offset + size and len(out) < length:
            with open(p, "rb") as f:
                f.seek(max(0, start - offset))
                out += f.read(length - len(out))
        offset += size
    return out


class ZstdReference:
    """Compresses ``source`` (a path or a ModelProto) on a daemon thread; :meth:`result`
    waits for it."""

    def __init__(self, source: Any):
        self._result: tuple[int, int, str] | None = None
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True,
                                        name="p2u-zstd-reference")
        self._thread.start()

    def _run(self, source: Any) -> None:
        try:
            parts = _model_files(source)
            if parts is None:
                return
            size = len(parts) if isinstance(parts, bytes) else sum(
                os.path.getsize(p) for p in parts)
            compressed, method = _compressed_size(parts)
            self._result = (size, compressed, method)
        except Exception:  # noqa: BLE001 - no reference: nothing compared
            self._result = None

    def result(self) -> tuple[int, int, str] | None:
        """(model file bytes, zstd -19 bytes, how they were measured), or None."""
        self._thread.join()
        return self._result
