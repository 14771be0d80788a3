"""Codecs: small objects with ``encode(buf)`` / ``decode(buf)`` and a JSON config.

* :class:`ZstdCodec` compresses opaque bytes (graph files, the base's tensor data).
* :class:`ZstdRefCodec` compresses a file with another file of the package as zstd's
  dictionary (raw content): the skeleton graph against ``base.onnx``, which holds most of it.
* :class:`IntContextCodec` (format 5) codes integer arrays in groups of contexts the decoder
  recomputes, with varint framing, planes stored raw where zstd would not shrink them and
  adjacent contexts merged where that is smaller: on small tensors the framing and the frames
  of :class:`IntGroupsCodec` cost 3-7% of a stage.
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
import threading
from typing import Any, ClassVar

import numpy as np
import zstandard

from ._rwlock import Pace, in_turn
from .errors import FormatError, IntegrityError

__all__ = ["Codec", "ZstdCodec", "ZstdRefCodec", "IntPlanesCodec", "IntGroupsCodec", "IntContextCodec",
           "SegmentsCodec", "get_codec",
           "UnknownCodecError", "grouped_order"]

# Upper bound on what one decoded buffer may claim (guards against hostile headers).
MAX_DECODED = 1 << 40
#: bytes decoded or copied per ``pace()`` turn by ``decode_into``: an update's 50 MB base.bin
#: took jobs of 0.3 ms (median; at most 4) and 176 ms in all, against 3.5 ms (at most 9) and
#: 344 ms with 1 MB steps, whose output no longer fits the cache
STEP = 1 << 18


class UnknownCodecError(FormatError):
    """A stage file names a codec this version does not know."""


class Codec:
    codec_id: ClassVar[str]

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kw = {k: v for k, v in config.items() if k in fields}
        if "segments" in kw:
            kw["segments"] = tuple(tuple(s) for s in kw["segments"])
        return cls(**kw)


def _zstd_compress(data, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


_LOCAL = threading.local()


def _zstd_entropy(data, level: int) -> bytes:
    """zstd tuned for streams of small symbols: short matches off, so it reaches the entropy
    of the symbols (at levels 3-9 its match finder costs up to 8% on near-random symbols)."""
    cache = _LOCAL.__dict__.setdefault("entropy", {})
    if level not in cache:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, strategy=zstandard.STRATEGY_FAST, min_match=7)
        cache[level] = zstandard.ZstdCompressor(compression_params=params)
    return cache[level].compress(data)


def _dctx(reference: bytes | None) -> zstandard.ZstdDecompressor:
    if reference is not None:
        return zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(
            bytes(reference), dict_type=zstandard.DICT_TYPE_RAWCONTENT))
    dctx = _LOCAL.__dict__.get("dctx")
    if dctx is None:
        dctx = _LOCAL.dctx = zstandard.ZstdDecompressor()
    return dctx


def _check_size(size: object) -> None:
    if not isinstance(size, int) or not 0 <= size <= MAX_DECODED:
        raise FormatError(f"implausible decoded size {size!r}")


def _size_error(got: int, size: int) -> IntegrityError:
    what = "more than" if got > size else f"{got} bytes, not"
    return IntegrityError(f"compressed data decodes to {what} the {size} bytes its entry "
                          "declares")


def _zstd_decompress(data, size: int, reference: bytes | None = None) -> bytes:
    """The ``size`` bytes a zstd frame decodes to. The frame's own content size is never
    trusted: it is streamed with a hard limit of ``size + 1`` bytes of output, and anything but
    exactly ``size`` bytes is refused (:class:`IntegrityError`): a frame that expands past what
    its entry declares (a decompression bomb) costs at most ``size + 1`` bytes of memory.
    ``reference``: the frame was coded with these bytes as a raw-content dictionary
    (:func:`zstd_compress_against`)."""
    _check_size(size)
    try:
        with _dctx(reference).stream_reader(data, read_across_frames=False,
                                            closefd=False) as reader:
            out = reader.read(size + 1)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"compressed data is corrupt: {e}") from e
    if len(out) != size:
        raise _size_error(len(out), size)
    return out


def _zstd_decompress_into(data, out: np.ndarray, pace: Pace | None = None,
                          step: int = STEP) -> None:
    """As :func:`_zstd_decompress`, into the uint8 array ``out`` (exactly ``len(out)`` bytes),
    ``step`` bytes per ``pace()`` turn: a live session decodes a large file in short jobs that
    take turns with its inferences. Never more than ``len(out)`` bytes and one are decoded."""
    view = memoryview(out).cast("B")
    size, pos = len(view), 0
    try:
        with _dctx(None).stream_reader(data, read_across_frames=False,
                                       closefd=False) as reader:
            while pos < size:
                with in_turn(pace):
                    n = reader.readinto(view[pos:pos + step])
                if not n:
                    break
                pos += n
            with in_turn(pace):
                extra = len(reader.read(1))
    except zstandard.ZstdError as e:
        raise IntegrityError(f"compressed data is corrupt: {e}") from e
    if pos + extra != size:
        raise _size_error(pos + extra, size)


def zstd_compress_against(data: bytes, reference: bytes, level: int = 19) -> bytes:
    """zstd of ``data`` with ``reference`` as a raw-content dictionary: what ``data`` shares
    with ``reference`` costs a few bytes (an update's skeleton against the one a device holds);
    :func:`_zstd_decompress` with the same ``reference`` decodes it."""
    d = zstandard.ZstdCompressionDict(reference, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(data), dict_size=len(reference),
        window_log=max(10, min(27, (len(reference) + len(data)).bit_length())))
    return zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(data)


@dataclasses.dataclass(frozen=True)
class ZstdCodec(Codec):
    """zstandard over opaque bytes. ``decode`` needs the decoded size (stored beside the data)."""

    codec_id: ClassVar[str] = "zstd"
    level: int = 9

    def encode(self, buf) -> bytes:
        return _zstd_compress(memoryview(buf).cast("B"), self.level)

    def decode(self, buf, size: int) -> bytes:
        return _zstd_decompress(buf, size)

    def decode_into(self, buf, out: np.ndarray, pace: Pace | None = None,
                    step: int = STEP) -> None:
        """Decode into the uint8 array ``out`` (its length is the decoded size), ``step``
        bytes per ``pace()`` turn."""
        _zstd_decompress_into(buf, out, pace, step)


#: files a ``zstd-ref`` entry may use as its dictionary (already checked against the manifest)
REF_FILES = ("base.onnx",)


@dataclasses.dataclass(frozen=True)
class ZstdRefCodec(Codec):
    """zstandard with the bytes of the package file ``ref`` as a raw-content dictionary.

    The skeleton graph (``graph.onnx``) repeats most of ``base.onnx`` (node and tensor names,
    small tensors kept inline, attributes): coded against it, it costs a few hundred bytes
    instead of a second copy of the graph. ``encode`` / ``decode`` take the ``ref`` bytes;
    decoding streams with the same hard output limit as :class:`ZstdCodec`.
    """

    codec_id: ClassVar[str] = "zstd-ref"
    level: int = 19
    ref: str = "base.onnx"

    def encode(self, buf, ref: bytes = b"") -> bytes:
        d = zstandard.ZstdCompressionDict(bytes(ref), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        return zstandard.ZstdCompressor(level=self.level, dict_data=d).compress(
            memoryview(buf).cast("B"))

    def decode(self, buf, size: int, ref: bytes | None = None) -> bytes:
        if ref is None:
            raise FormatError(f"codec zstd-ref needs the bytes of {self.ref} to decode")
        return _zstd_decompress(buf, size, ref)


_WIDTHS = (1, 2, 4, 8)
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def zigzag(x: np.ndarray) -> np.ndarray:
    """Signed -> unsigned (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...), int32 kept as 32 bits."""
    x = np.asarray(x)
    if x.dtype != np.int32:
        x = x.astype(np.int64)
    bits = 8 * x.dtype.itemsize - 1
    u = x << 1
    u ^= x >> bits
    return u.view(np.uint32 if x.dtype == np.int32 else np.uint64)


def unzigzag(u: np.ndarray) -> np.ndarray:
    """Inverse of :func:`zigzag`, in the same width: uint8 -> int8, ..., uint64 -> int64."""
    u = np.asarray(u)
    if u.dtype.kind != "u":
        u = u.astype(np.uint64)
    out = u >> u.dtype.type(1)
    sign = u & u.dtype.type(1)
    s = sign.view(_SIGNED[u.dtype.itemsize])
    np.negative(s, out=s)
    out ^= sign
    return out.view(_SIGNED[u.dtype.itemsize])


def _planes_head(buf: memoryview) -> tuple[int, tuple[int, ...], int]:
    """(width, plane lengths, header size) of an :class:`IntPlanesCodec` payload."""
    if len(buf) < 1:
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
    return width, lengths, head


def _planes_into(buf: memoryview, out: np.ndarray) -> None:
    """Decode an :class:`IntPlanesCodec` payload of ``len(out)`` values into ``out`` as
    zigzag (unsigned) values; ``out`` is unsigned and at least as wide as the payload."""
    width, lengths, pos = _planes_head(buf)
    count = len(out)
    if width > out.dtype.itemsize:
        raise FormatError("integer payload is wider than expected")
    if width == out.dtype.itemsize == 1:
        out[:] = np.frombuffer(_zstd_decompress(buf[pos:pos + lengths[0]], count), np.uint8)
        return
    cols = out.view(np.uint8).reshape(count, out.dtype.itemsize)
    for i, n in enumerate(lengths):
        cols[:, i] = np.frombuffer(_zstd_decompress(buf[pos:pos + n], count), np.uint8)
        pos += n
    if width < out.dtype.itemsize:
        cols[:, width:] = 0


def _planes_width(buf: memoryview) -> int:
    return _planes_head(buf)[0]


@dataclasses.dataclass(frozen=True)
class IntPlanesCodec(Codec):
    """Signed integers -> zigzag -> byte planes -> zstd per plane.

    Encoded layout: ``u8 width`` then ``width`` little-endian u64 plane lengths, then the
    compressed planes, low byte first. ``decode(buf, count)`` returns ``count`` signed values
    (int8 ... int64, as wide as the payload's planes).
    """

    codec_id: ClassVar[str] = "int-planes"
    level: int = 3

    def encode(self, values: np.ndarray) -> bytes:
        return self.encode_zigzag(zigzag(np.asarray(values).reshape(-1)))

    def encode_zigzag(self, u: np.ndarray) -> bytes:
        """Encode zigzag values ``u`` (unsigned)."""
        top = int(u.max()) if u.size else 0
        width = next(w for w in _WIDTHS if top < (1 << (8 * w)))
        if width == 1:
            parts = [_zstd_entropy(u if u.dtype == np.uint8 else u.astype(np.uint8),
                                   self.level)]
        else:
            u = u.astype(u.dtype.newbyteorder("<"), copy=False)
            cols = u.view(np.uint8).reshape(-1, u.dtype.itemsize)
            parts = [_zstd_entropy(np.ascontiguousarray(cols[:, i]), self.level)
                     for i in range(width)]
        head = struct.pack(f"<B{width}Q", width, *map(len, parts))
        return head + b"".join(parts)

    def decode(self, buf, count: int) -> np.ndarray:
        buf = memoryview(buf)
        if not 0 <= count <= MAX_DECODED:
            raise FormatError("integer payload is truncated")
        u = np.empty(count, _UNSIGNED[_planes_width(buf)])
        _planes_into(buf, u)
        return unzigzag(u)


def grouped_order(context: np.ndarray) -> np.ndarray | None:
    """Positions of ``context`` (uint8) grouped by value in increasing order, stable (what
    ``np.argsort(context, kind="stable")`` gives: numpy's radix sort for 8-bit keys), or None
    when every value is the same (the identity)."""
    if len(context) == 0 or context.min() == context.max():
        return None
    return np.argsort(context, kind="stable")


@dataclasses.dataclass(frozen=True)
class IntGroupsCodec(Codec):
    """Signed integers coded in groups that share a context (one :class:`IntPlanesCodec` stream
    per group). The decoder recomputes the same per-value context (uint8) from data it already
    has, so contexts cost nothing on the wire.

    Encoded layout: ``u16 n`` then ``n`` records ``(u8 group, u64 count, u64 length)``, then
    the group streams in record order.
    """

    codec_id: ClassVar[str] = "int-groups"
    level: int = 3

    def encode(self, values: np.ndarray, context: np.ndarray) -> bytes:
        values = np.asarray(values).reshape(-1)
        context = np.asarray(context, np.uint8).reshape(-1)
        inner = IntPlanesCodec(self.level)
        u = zigzag(values)
        order = grouped_order(context)
        if order is not None:
            u = u[order]
        head, parts, pos = [], [], 0
        for g, count in _counts(context):
            parts.append(inner.encode_zigzag(u[pos:pos + count]))
            head.append((g, count, len(parts[-1])))
            pos += count
        out = [struct.pack("<H", len(head))]
        out += [struct.pack("<BQQ", *h) for h in head]
        return b"".join(out + parts)

    def decode(self, buf, context: np.ndarray, pace: Pace | None = None) -> np.ndarray:
        """Values in the order of ``context``: signed, as wide as the widest group's planes.
        ``pace``: the grouping, each group and the values' order are jobs inside ``pace()``."""
        buf = memoryview(buf)
        with in_turn(pace):
            context = np.asarray(context, np.uint8).reshape(-1)
            if len(buf) < 2:
                raise FormatError("grouped payload is truncated")
            (n,) = struct.unpack_from("<H", buf, 0)
            rec = struct.Struct("<BQQ")
            pos = 2 + n * rec.size
            if len(buf) < pos:
                raise FormatError("grouped payload is truncated")
            records = []
            for i in range(n):
                g, count, length = rec.unpack_from(buf, 2 + i * rec.size)
                if pos + length > len(buf) or (records and g <= records[-1][0]):
                    raise FormatError("grouped payload is malformed")
                records.append((g, count, buf[pos:pos + length]))
                pos += length
            if sum(r[1] for r in records) != len(context) or pos != len(buf):
                raise FormatError("grouped payload does not cover its values")
            widths = [_planes_width(data) for _, _, data in records]
            order = grouped_order(context)
            u = np.empty(len(context), _UNSIGNED[max(widths, default=1)])
        pos = 0
        for g, count, data in records:
            # the runs of sorted contexts are contiguous and increasing: both ends of a run
            # holding its group's value means every value in it does
            ends = [pos, pos + count - 1] if order is None or count == 0 else \
                order[[pos, pos + count - 1]]
            if count == 0 or context[ends[0]] != g or context[ends[1]] != g:
                raise FormatError("grouped payload does not match its context (wrong base or "
                                  "earlier stage)")
            with in_turn(pace):
                _planes_into(data, u[pos:pos + count])
            pos += count
        with in_turn(pace):
            return _in_order(u, order)


def _in_order(u: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """Zigzag values ``u``, grouped as :func:`grouped_order` sorted their context, back as
    signed values in the context's order."""
    if order is None:
        return unzigzag(u)
    out = np.empty(len(u), _SIGNED[u.dtype.itemsize])
    out[order] = unzigzag(u)
    return out


def _varint(n: int) -> bytes:
    """Unsigned LEB128."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """(value, next position) of an unsigned LEB128 at ``pos``: at most 9 bytes (values below
    2**63), inside ``buf``; :class:`FormatError` otherwise."""
    n = shift = 0
    for i in range(9):
        if pos + i >= len(buf):
            raise FormatError("context-grouped payload is truncated")
        b = buf[pos + i]
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos + i + 1
        shift += 7
    raise FormatError("context-grouped payload has an overlong number")


# planes up to this size also try zstd level 19 (better tables): 0.6-1% of the small models'
# lossless stages. Up to 64 KB it saved MiniLM's 0.4% more and took 2.3x the encoding time
# (50 s instead of 21): IntContextCodec.encode(..., thorough=True) is for small models
_SMALL_PLANE = 1 << 13
_SMALL_PLANE_THOROUGH = 1 << 16
_MERGE_MAX = 1 << 16  # groups merged only while they hold at most this many values together


def _plane_parts(u: np.ndarray, level: int, small: int = _SMALL_PLANE
                 ) -> list[tuple[bool, bytes]]:
    """Byte planes of unsigned ``u`` (low byte first, as many as its largest value needs; none
    when every value is 0), each ``(raw, data)``: a zstd frame, or the plane's bytes as they
    are when no frame is smaller."""
    top = int(u.max()) if u.size else 0
    width = (top.bit_length() + 7) // 8
    if not width:
        return []
    u = u.astype(u.dtype.newbyteorder("<"), copy=False)
    cols = u.view(np.uint8).reshape(-1, u.dtype.itemsize)
    parts = []
    for i in range(width):
        plane = np.ascontiguousarray(cols[:, i]) if u.dtype.itemsize > 1 else u
        best = _zstd_entropy(plane, level)
        if len(plane) <= small:
            other = _zstd_compress(plane, 19)
            if len(other) < len(best):
                best = other
        parts.append((True, plane.tobytes()) if len(best) >= len(plane) else (False, best))
    return parts


def _group_record(lo: int, hi: int, count: int, parts: list[tuple[bool, bytes]]) -> bytes:
    return _varint(lo) + _varint(hi - lo) + _varint(count) + bytes([len(parts)]) + b"".join(
        _varint(len(data) << 1 | raw) for raw, data in parts)


@dataclasses.dataclass(frozen=True)
class IntContextCodec(Codec):
    """Signed integers in groups of contexts (format 5). The decoder recomputes a per-value
    context (uint8) from what it already holds, so contexts cost nothing on the wire; values
    are sorted by context (stable) and each group, a range ``[lo, hi]`` of contexts, is coded
    as the byte planes of its zigzag values, each plane a zstd frame or raw.

    Encoded layout (all numbers unsigned LEB128 varints but ``width``)::

        n, then n records: lo, hi - lo, count, u8 width (0..8), width x (length << 1 | raw)
        then the planes of every group in record order, low byte first

    Ranges are increasing and disjoint, counts add up to the number of values, a raw plane
    is ``count`` bytes, a frame decodes to ``count`` bytes (never more: streamed with a hard
    limit); a group of width 0 is all zeros. The encoder merges adjacent groups when the
    merged group codes smaller (the framing and zstd's tables outweigh a small group's own
    statistics).
    """

    codec_id: ClassVar[str] = "int-ctx"
    level: int = 3

    def encode(self, values: np.ndarray, context: np.ndarray, thorough: bool = False) -> bytes:
        """``thorough``: also try zstd level 19 on planes up to 64 KB (8 KB otherwise)."""
        values = np.asarray(values).reshape(-1)
        context = np.asarray(context, np.uint8).reshape(-1)
        small = _SMALL_PLANE_THOROUGH if thorough else _SMALL_PLANE
        u = zigzag(values)
        order = grouped_order(context)
        if order is not None:
            u = u[order]
        groups = []  # [lo, hi, start, count, parts, size]
        pos = 0
        for g, count in _counts(context):
            parts = _plane_parts(u[pos:pos + count], self.level, small)
            groups.append([g, g, pos, count, parts, len(_group_record(g, g, count, parts)) +
                           sum(len(d) for _, d in parts)])
            pos += count
        cache: dict[tuple[int, int], tuple[list, int]] = {}
        while len(groups) > 1:  # greedy: the best merge of two neighbours, while one saves
            best = None
            for i in range(len(groups) - 1):
                a, b = groups[i], groups[i + 1]
                if a[3] + b[3] > _MERGE_MAX:
                    continue
                key = (a[2], a[3] + b[3])
                if key not in cache:
                    parts = _plane_parts(u[a[2]:a[2] + a[3] + b[3]], self.level, small)
                    cache[key] = parts, len(_group_record(a[0], b[1], a[3] + b[3], parts)) + \
                        sum(len(d) for _, d in parts)
                gain = a[5] + b[5] - cache[key][1]
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, i, key)
            if best is None:
                break
            _, i, key = best
            a, b = groups[i], groups.pop(i + 1)
            groups[i] = [a[0], b[1], a[2], a[3] + b[3], *cache[key]]
        head = [_varint(len(groups))] + [_group_record(lo, hi, count, parts)
                                         for lo, hi, _, count, parts, _ in groups]
        return b"".join(head + [d for g in groups for _, d in g[4]])

    def decode(self, buf, context: np.ndarray, pace: Pace | None = None) -> np.ndarray:
        """Values in the order of ``context``: signed, as wide as the widest group's planes.
        ``pace``: the header and grouping, each group and the values' order are jobs inside
        ``pace()`` (as :meth:`IntGroupsCodec.decode`)."""
        buf = memoryview(buf)
        with in_turn(pace):
            context = np.asarray(context, np.uint8).reshape(-1)
            records, pos = self._records(buf, len(context))
            width_max = max((len(r[3]) for r in records), default=1)
            order = grouped_order(context)
            dtype = _UNSIGNED[next(w for w in _WIDTHS if w >= max(width_max, 1))]
            u = np.zeros(len(context), dtype)
            cols = u.view(np.uint8).reshape(len(context), dtype().itemsize)
        at = 0
        for lo, hi, count, planes in records:
            ends = (at, at + count - 1) if order is None else order[[at, at + count - 1]]
            if not (lo <= context[ends[0]] <= hi and lo <= context[ends[1]] <= hi):
                raise FormatError("context-grouped payload does not match its context (wrong "
                                  "base or earlier stage)")
            with in_turn(pace):
                for i, (raw, length) in enumerate(planes):
                    data = buf[pos:pos + length]
                    plane = np.frombuffer(data, np.uint8) if raw else \
                        np.frombuffer(_zstd_decompress(data, count), np.uint8)
                    if dtype().itemsize == 1:
                        u[at:at + count] = plane
                    else:
                        cols[at:at + count, i] = plane
                    pos += length
            at += count
        with in_turn(pace):
            return _in_order(u, order)

    @staticmethod
    def _records(buf: memoryview, n_values: int) -> tuple[list, int]:
        """The groups' records ``(lo, hi, count, planes)`` of a payload over ``n_values``
        values, checked, and where their planes start."""
        n, pos = _read_varint(buf, 0)
        if n > 256:
            raise FormatError("context-grouped payload is malformed")
        records, last, total = [], -1, 0
        for _ in range(n):
            lo, pos = _read_varint(buf, pos)
            span, pos = _read_varint(buf, pos)
            count, pos = _read_varint(buf, pos)
            if pos >= len(buf):
                raise FormatError("context-grouped payload is truncated")
            width = buf[pos]
            pos += 1
            if lo <= last or lo + span > 255 or not 0 < count <= n_values - total \
                    or width > 8:
                raise FormatError("context-grouped payload is malformed")
            planes = []
            for _ in range(width):
                v, pos = _read_varint(buf, pos)
                if v & 1 and v >> 1 != count:
                    raise FormatError("context-grouped payload is malformed")
                planes.append((bool(v & 1), v >> 1))
            records.append((lo, lo + span, count, planes))
            last, total = lo + span, total + count
        if total != n_values:
            raise FormatError("context-grouped payload does not cover its values")
        if pos + sum(length for r in records for _, length in r[3]) != len(buf):
            raise FormatError("context-grouped payload lengths do not add up to its size")
        return records, pos


def _counts(context: np.ndarray) -> list[tuple[int, int]]:
    """``(value, count)`` for each value present in ``context`` (uint8), increasing."""
    counts = np.bincount(context, minlength=256)
    return [(int(g), int(counts[g])) for g in np.flatnonzero(counts)]


@dataclasses.dataclass(frozen=True)
class SegmentsCodec(Codec):
    """A file made of typed segments (the base's ``base.bin``), each kind coded its own way.

    ``segments`` lists ``[offset, length, kind]`` in file order; kinds: ``"symbols"`` (packed
    integer codes: entropy-only zstd), ``"planes2"`` / ``"planes4"`` (2- or 4-byte floats such as
    scales: byte planes, entropy-only zstd each), ``"bytes"`` (anything else: plain zstd). Bytes
    not covered by a segment (alignment padding) are zero. Encoded layout: ``u32 n`` then ``n``
    u64 stream lengths, then the streams: symbols, bytes, then the planes of each width.
    """

    codec_id: ClassVar[str] = "segments"
    level: int = 9
    segments: tuple = ()

    def _streams(self, buf: np.ndarray) -> list[np.ndarray]:
        kinds: dict[str, list[np.ndarray]] = {"symbols": [], "bytes": [], "planes2": [],
                                              "planes4": []}
        for off, length, kind in self.segments:
            if kind not in kinds or off < 0 or off + length > len(buf):
                raise FormatError(f"bad segment {off}+{length} {kind!r}")
            kinds[kind].append(buf[off:off + length])
        return kinds

    def encode(self, buf, strong_symbols: bool = False) -> bytes:
        """``strong_symbols``: also code the symbols with zstd at ``level`` (its full match
        finder) and keep the smaller frame. Near-random codes gain nothing from it (up to 12%
        larger), but the sparse codes of an update's delta (runs of zeros where weights did not
        move) come out 5-7% smaller. Decoding is the same either way."""
        data = np.frombuffer(memoryview(buf).cast("B"), np.uint8)
        kinds = self._streams(data)
        symbols = _cat(kinds["symbols"])
        coded = _zstd_entropy(symbols, 3)
        if strong_symbols:
            strong = _zstd_compress(symbols, self.level)
            coded = strong if len(strong) < len(coded) else coded
        parts = [coded, _zstd_compress(_cat(kinds["bytes"]), self.level)]
        for width in (2, 4):
            planes = _cat(kinds[f"planes{width}"]).reshape(-1, width)
            parts += [_zstd_entropy(np.ascontiguousarray(planes[:, i]), 3) for i in range(width)]
        return struct.pack(f"<I{len(parts)}Q", len(parts), *map(len, parts)) + b"".join(parts)

    def _check_segments(self, size: int) -> None:
        """Segments in file order, inside ``size`` bytes, planes whole: checked before any
        stream is decoded, so that no stream can be declared larger than the file."""
        if not isinstance(size, int) or not 0 <= size <= MAX_DECODED:
            raise FormatError(f"implausible decoded size {size!r}")
        end = 0
        for seg in self.segments:
            if len(seg) != 3:
                raise FormatError(f"bad segment {seg!r}")
            off, length, kind = seg
            if not (isinstance(off, int) and isinstance(length, int)) or off < end \
                    or length < 0 or off + length > size \
                    or kind not in ("symbols", "bytes", "planes2", "planes4") \
                    or (kind != "symbols" and kind != "bytes" and length % int(kind[-1])):
                raise FormatError(f"bad segment {off}+{length} {kind!r} in a file of {size} "
                                  "bytes (out of order, overlapping, past the end or not whole "
                                  "values)")
            end = off + length

    def decode(self, buf, size: int) -> bytes:
        self._check_segments(size)  # (and the size, before it is allocated)
        out = np.zeros(size, np.uint8)
        self._decode_into(buf, out, None, STEP)
        return out.tobytes()

    def decode_into(self, buf, out: np.ndarray, pace: Pace | None = None,
                    step: int = STEP) -> None:
        """Decode into the zeroed uint8 array ``out`` (its length is the file's size): each
        stream, then each segment's copy, ``step`` bytes per ``pace()`` turn. At most the
        streams and ``out`` are held: two file-sized buffers."""
        self._check_segments(len(out))
        self._decode_into(buf, out, pace, step)

    def _decode_into(self, buf, out: np.ndarray, pace: Pace | None, step: int) -> None:
        buf = memoryview(buf)
        if len(buf) < 4:
            raise FormatError("segmented payload is truncated")
        (n,) = struct.unpack_from("<I", buf, 0)
        if n != 8 or len(buf) < 4 + 8 * n:
            raise FormatError("segmented payload is malformed")
        lengths = struct.unpack_from(f"<{n}Q", buf, 4)
        if 4 + 8 * n + sum(lengths) != len(buf):
            raise FormatError("segmented payload lengths do not add up")
        totals = {k: sum(s[1] for s in self.segments if s[2] == k)
                  for k in ("symbols", "bytes", "planes2", "planes4")}
        sizes = [totals["symbols"], totals["bytes"]] + [totals["planes2"] // 2] * 2 + \
            [totals["planes4"] // 4] * 4
        pos = 4 + 8 * n
        raw = []
        for length, want in zip(lengths, sizes):
            raw.append(np.empty(want, np.uint8))
            _zstd_decompress_into(buf[pos:pos + length], raw[-1], pace, step)
            pos += length
        # a stream per kind; planes: one stream per byte of the value
        streams = {"symbols": raw[:1], "bytes": raw[1:2], "planes2": raw[2:4],
                   "planes4": raw[4:8]}
        at = dict.fromkeys(streams, 0)  # values of each kind taken so far
        for off, length, kind in self.segments:
            planes = streams[kind]
            width = len(planes)
            count, a = length // width, at[kind]
            dest = out[off:off + length].reshape(count, width)
            rows = max(1, step // width)
            for i in range(0, count, rows):
                j = min(count, i + rows)
                with in_turn(pace):
                    for b, plane in enumerate(planes):
                        dest[i:j, b] = plane[a + i:a + j]
            at[kind] += count


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


_REGISTRY: dict[str, type[Codec]] = {
    c.codec_id: c for c in (ZstdCodec, ZstdRefCodec, IntPlanesCodec, IntGroupsCodec,
                            IntContextCodec, SegmentsCodec)}


def get_codec(config: dict[str, Any]) -> Codec:
    """Rebuild a codec from ``get_config()`` output; :class:`UnknownCodecError` if unknown."""
    cid = config.get("id") if isinstance(config, dict) else None
    if cid not in _REGISTRY:
        raise UnknownCodecError(f"unknown codec {cid!r}; known: {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[cid].from_config(config)
    except (TypeError, ValueError) as e:
        raise FormatError(f"bad settings for codec {cid!r}: {config}") from e
