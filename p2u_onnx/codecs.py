"""Codecs: small objects with ``encode(buf)`` / ``decode(buf)`` and a JSON config.

* :class:`ZstdCodec` compresses opaque bytes (graph files, the base's tensor data).
* :class:`IntPlanesCodec` codes integer arrays (stage codes): zigzag to unsigned, keep only as many
  bytes per value as the largest needs, split those bytes into planes (all low bytes, then all next
  bytes, ...) and compress each plane on its own with zstandard. Low planes of fine residuals are
  nearly random while high planes are mostly zero; separate planes let the entropy coder model each.

Every codec's settings travel in the stage file (``get_config()``), so decoding needs nothing
from outside the file. :func:`get_codec` rebuilds a codec from its config.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, ClassVar

import numpy as np
import zstandard

from .errors import FormatError

__all__ = ["Codec", "ZstdCodec", "IntPlanesCodec", "get_codec", "UnknownCodecError"]

# Upper bound on what one decoded buffer may claim (guards against hostile headers).
MAX_DECODED = 1 << 40


class UnknownCodecError(FormatError):
    """A stage file names a codec this version does not know."""


class Codec:
    codec_id: ClassVar[str]

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in config.items() if k in fields})


def _zstd_compress(data, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


def _zstd_decompress(data, size: int) -> bytes:
    if not 0 <= size <= MAX_DECODED:
        raise FormatError(f"implausible decoded size {size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as e:
        raise FormatError(f"compressed data is corrupt: {e}") from e
    if len(out) != size:
        raise FormatError(f"decoded {len(out)} bytes, expected {size}")
    return out


@dataclasses.dataclass(frozen=True)
class ZstdCodec(Codec):
    """zstandard over opaque bytes. ``decode`` needs the decoded size (stored beside the data)."""

    codec_id: ClassVar[str] = "zstd"
    level: int = 9

    def encode(self, buf) -> bytes:
        return _zstd_compress(memoryview(buf).cast("B"), self.level)

    def decode(self, buf, size: int) -> bytes:
        return _zstd_decompress(buf, size)


_WIDTHS = (1, 2, 4, 8)


def zigzag(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.int64)
    return ((x << 1) ^ (x >> 63)).view(np.uint64)


def unzigzag(u: np.ndarray) -> np.ndarray:
    u = np.asarray(u, np.uint64)
    return ((u >> np.uint64(1)).view(np.int64)) ^ -((u & np.uint64(1)).view(np.int64))


@dataclasses.dataclass(frozen=True)
class IntPlanesCodec(Codec):
    """Signed integers -> zigzag -> byte planes -> zstd per plane.

    Encoded layout: ``u8 width`` then ``width`` little-endian u64 plane lengths, then the
    compressed planes, low byte first. ``decode(buf, count)`` returns ``count`` int64 values.
    """

    codec_id: ClassVar[str] = "int-planes"
    level: int = 3

    def encode(self, values: np.ndarray) -> bytes:
        u = zigzag(np.asarray(values).reshape(-1))
        top = int(u.max()) if u.size else 0
        width = next(w for w in _WIDTHS if top < (1 << (8 * w)))
        planes = u.astype(f"<u{width}").view(np.uint8).reshape(-1, width)
        parts = [_zstd_compress(np.ascontiguousarray(planes[:, i]), self.level)
                 for i in range(width)]
        head = struct.pack(f"<B{width}Q", width, *map(len, parts))
        return head + b"".join(parts)

    def decode(self, buf, count: int) -> np.ndarray:
        buf = memoryview(buf)
        if not 0 <= count <= MAX_DECODED or len(buf) < 1:
            raise FormatError("integer payload is truncated")
        width = buf[0]
        if width not in _WIDTHS:
            raise FormatError(f"integer payload has invalid width {width}")
        head = 1 + 8 * width
        if len(buf) < head:
            raise FormatError("integer payload is truncated")
        lengths = struct.unpack_from(f"<{width}Q", buf, 1)
        if head + sum(lengths) != len(buf):
            raise FormatError("integer payload lengths do not add up to its size")
        planes = np.empty((count, width), np.uint8)
        pos = head
        for i, n in enumerate(lengths):
            planes[:, i] = np.frombuffer(_zstd_decompress(buf[pos:pos + n], count), np.uint8)
            pos += n
        u = planes.view(f"<u{width}").reshape(-1).astype(np.uint64)
        return unzigzag(u)


_REGISTRY: dict[str, type[Codec]] = {c.codec_id: c for c in (ZstdCodec, IntPlanesCodec)}


def get_codec(config: dict[str, Any]) -> Codec:
    """Rebuild a codec from ``get_config()`` output; :class:`UnknownCodecError` if unknown."""
    cid = config.get("id") if isinstance(config, dict) else None
    if cid not in _REGISTRY:
        raise UnknownCodecError(f"unknown codec {cid!r}; known: {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[cid].from_config(config)
    except (TypeError, ValueError) as e:
        raise FormatError(f"bad settings for codec {cid!r}: {config}") from e
