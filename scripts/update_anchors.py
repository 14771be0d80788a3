"""What one would ship instead of a p2u update: lossless (and one lossy) anchors for sending
v2 to a device that holds v1. Used by ``scripts/bench_updates.py``.

Each function returns an :class:`Anchor`: bytes on the wire, the time to make them, and
whether decoding gives v2 bit for bit (checked by decoding, not assumed). A model is split
into its float32 weight tensors (initializers and Constant values of at least
:data:`MIN_ELEMENTS` values) and *the rest* (the graph and small tensors, serialized without
those weights). Tensors are matched between v1 and v2 by name, shape and dtype.

* :func:`zstd19`: the whole v2 ``.onnx`` at zstd level 19;
* :func:`zipnn_full`: ZipNN on v2's float32 weights (one buffer) + zstd -19 of the rest;
* :func:`zipnn_delta`: ZipNN's delta compression (``delta_compressed_type="byte"``: XOR of the
  bit patterns of v2 and v1, then its byte grouping and entropy coding) on the matched weights;
  unmatched v2 weights with plain ZipNN; the rest as a zstd -19 patch against v1's rest;
* :func:`xor_zstd`: the same idea done here: XOR of the float32 bit patterns, the four bytes
  of each value grouped into four planes, each plane zstd -19; unmatched weights byte-grouped
  + zstd -19; the rest as a patch;
* :func:`fp32_diff_zstd`: the plain float32 difference ``v2 - v1`` at zstd -19 (+ unmatched
  weights and the rest as above); decoding ``v1 + d`` in float32 is not always bit-exact, so
  its exactness is measured and reported.

The *rest patch* is zstd -19 of v2's rest with v1's rest as a raw-content dictionary (zstd's
"patch from"): it costs a few bytes when the graph did not change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import zstandard
from onnx import TensorProto, numpy_helper

MIN_ELEMENTS = 1
LEVEL = 19


@dataclass
class Anchor:
    """One anchor's measurement for one pair (``exact``: decoding gives v2 bit for bit)."""

    method: str
    wire_bytes: int
    seconds: float
    exact: bool
    lossless: bool  # the method is meant to be lossless
    note: str = ""
    error: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Split:
    """A model's float32 weights by key, and the rest of the file serialized."""

    weights: dict[str, np.ndarray]
    rest: bytes
    file_bytes: int


def _subgraphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _subgraphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _subgraphs(sub)


def split_model(path: Path | str) -> Split:
    """Load ``path`` and take its float32 weights out (see the module docstring)."""
    m = onnx.load(str(path))
    weights: dict[str, np.ndarray] = {}
    for gi, g in enumerate(_subgraphs(m.graph)):
        tensors = [(t.name, t) for t in g.initializer] + [
            (n.output[0], a.t) for n in g.node if n.op_type == "Constant"
            for a in n.attribute if a.name == "value"]
        for name, t in tensors:
            if t.data_type != TensorProto.FLOAT or math.prod(t.dims) < MIN_ELEMENTS:
                continue
            key = f"{gi}/{name}"
            weights[key] = np.ascontiguousarray(numpy_helper.to_array(t), "<f4")
            t.ClearField("raw_data")
            t.ClearField("float_data")
    return Split(weights, m.SerializeToString(), Path(path).stat().st_size)


def _zstd(data: bytes, dict_data: bytes | None = None) -> bytes:
    d = None if dict_data is None else zstandard.ZstdCompressionDict(
        dict_data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(level=LEVEL, dict_data=d, threads=-1).compress(data)


def _unzstd(data: bytes, dict_data: bytes | None = None) -> bytes:
    d = None if dict_data is None else zstandard.ZstdCompressionDict(
        dict_data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdDecompressor(dict_data=d).decompress(data)


def matched(v1: Split, v2: Split) -> tuple[list[str], list[str]]:
    """Keys of v2's weights that v1 has with the same shape (matched) and the others."""
    both = [k for k, a in v2.weights.items() if k in v1.weights and v1.weights[k].shape == a.shape]
    other = [k for k in v2.weights if k not in set(both)]
    return both, other


def _concat(arrays: list[np.ndarray]) -> bytes:
    return b"".join(a.tobytes() for a in arrays)


def _group_bytes(raw: bytes) -> bytes:
    """Four planes: byte 0 of every float32, then byte 1, ..."""
    return np.frombuffer(raw, np.uint8).reshape(-1, 4).T.copy().tobytes() if raw else b""


def _ungroup_bytes(planes: bytes) -> bytes:
    return np.frombuffer(planes, np.uint8).reshape(4, -1).T.copy().tobytes() if planes else b""


def _rest_patch(v1: Split, v2: Split) -> tuple[int, bool]:
    packed = _zstd(v2.rest, v1.rest)
    return len(packed), _unzstd(packed, v1.rest) == v2.rest


def _timed(fn: Callable[[], Anchor]) -> Anchor:
    t0 = time.perf_counter()
    a = fn()
    a.seconds = time.perf_counter() - t0
    return a


def zstd19(v2_path: Path) -> Anchor:
    def run() -> Anchor:
        data = Path(v2_path).read_bytes()
        packed = _zstd(data)
        return Anchor("zstd -19 of v2", len(packed), 0.0, _unzstd(packed) == data, True,
                      "whole .onnx file")
    return _timed(run)


def _zipnn_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zipnn")
    except PackageNotFoundError:
        return "?"


def warm_up() -> None:
    """Import ZipNN and run it once on a few bytes (its first call loads its native parts;
    that is not counted in the anchors' times)."""
    try:
        _zipnn(False).compress(bytes(4096))
    except ImportError:
        pass


def _zipnn(delta: bool):
    from zipnn import ZipNN

    if delta:
        return ZipNN(input_format="byte", bytearray_dtype="float32", delta_compressed_type="byte")
    return ZipNN(input_format="byte", bytearray_dtype="float32")


def zipnn_full(v2: Split) -> Anchor:
    def run() -> Anchor:
        try:
            import zipnn  # noqa: F401
        except ImportError as e:
            return Anchor("ZipNN of v2", 0, 0.0, False, True, error=f"zipnn missing: {e}")
        raw = _concat(list(v2.weights.values()))
        # ZipNN 0.5.4 reorders its input's bytes in place: hand it a private copy.
        packed = bytes(_zipnn(False).compress(bytes(bytearray(raw)))) if raw else b""
        back = bytes(_zipnn(False).decompress(packed)) if raw else b""
        rest = _zstd(v2.rest)
        return Anchor("ZipNN of v2", len(packed) + len(rest), 0.0, back == raw, True,
                      f"zipnn {_zipnn_version()}: weights {len(packed)} B + "
                      f"rest at zstd -19 {len(rest)} B")
    return _timed(run)


def zipnn_delta(v1: Split, v2: Split) -> Anchor:
    def run() -> Anchor:
        try:
            import zipnn  # noqa: F401
        except ImportError as e:
            return Anchor("ZipNN delta vs v1", 0, 0.0, False, True, error=f"zipnn missing: {e}")
        both, other = matched(v1, v2)
        new = _concat([v2.weights[k] for k in both])
        old = _concat([v1.weights[k] for k in both])
        packed = bytes(_zipnn(True).compress(bytes(bytearray(new)), delta_second_data=old)) \
            if new else b""
        back = bytes(_zipnn(True).decompress(packed, delta_second_data=old)) if new else b""
        extra_raw = _concat([v2.weights[k] for k in other])
        extra = bytes(_zipnn(False).compress(bytes(bytearray(extra_raw)))) if extra_raw else b""
        extra_back = bytes(_zipnn(False).decompress(extra)) if extra_raw else b""
        rest, rest_ok = _rest_patch(v1, v2)
        return Anchor("ZipNN delta vs v1", len(packed) + len(extra) + rest, 0.0,
                      back == new and extra_back == extra_raw and rest_ok, True,
                      f"delta_compressed_type=byte on {len(both)} matched tensors {len(packed)} B"
                      f", {len(other)} others {len(extra)} B, rest patch {rest} B")
    return _timed(run)


def xor_zstd(v1: Split, v2: Split) -> Anchor:
    def run() -> Anchor:
        both, other = matched(v1, v2)
        new = _concat([v2.weights[k] for k in both])
        old = _concat([v1.weights[k] for k in both])
        x = (np.frombuffer(new, np.uint32) ^ np.frombuffer(old, np.uint32)).tobytes()
        planes = _group_bytes(x)
        q = len(planes) // 4
        packed = [_zstd(planes[i * q:(i + 1) * q]) for i in range(4)] if planes else []
        back_x = _ungroup_bytes(b"".join(_unzstd(p) for p in packed)) if planes else b""
        back = (np.frombuffer(back_x, np.uint32) ^ np.frombuffer(old, np.uint32)).tobytes() \
            if planes else b""
        extra_raw = _concat([v2.weights[k] for k in other])
        extra = _zstd(_group_bytes(extra_raw)) if extra_raw else b""
        rest, rest_ok = _rest_patch(v1, v2)
        size = sum(map(len, packed)) + len(extra) + rest
        return Anchor("XOR + byte grouping + zstd -19", size, 0.0, back == new and rest_ok, True,
                      f"planes {[len(p) for p in packed]} B, {len(other)} other tensors "
                      f"{len(extra)} B, rest patch {rest} B")
    return _timed(run)


def fp32_diff_zstd(v1: Split, v2: Split) -> Anchor:
    def run() -> Anchor:
        both, other = matched(v1, v2)
        d = [v2.weights[k] - v1.weights[k] for k in both]
        packed = _zstd(_concat(d)) if d else b""
        exact = all(np.array_equal((v1.weights[k] + dk).view(np.uint32),
                                   v2.weights[k].view(np.uint32)) for k, dk in zip(both, d))
        wrong = sum(int(np.count_nonzero((v1.weights[k] + dk).view(np.uint32)
                                         != v2.weights[k].view(np.uint32)))
                    for k, dk in zip(both, d))
        extra_raw = _concat([v2.weights[k] for k in other])
        extra = _zstd(extra_raw) if extra_raw else b""
        rest, rest_ok = _rest_patch(v1, v2)
        n = sum(v2.weights[k].size for k in both)
        return Anchor("fp32 difference + zstd -19", len(packed) + len(extra) + rest, 0.0,
                      exact and rest_ok, False,
                      f"v1 + (v2 - v1) in float32 differs from v2 in {wrong} of {n} values"
                      if wrong else "v1 + (v2 - v1) gives v2 bit for bit here")
    return _timed(run)


def all_anchors(v1_path: Path, v2_path: Path) -> list[Anchor]:
    """Every anchor of ``v2`` against ``v1``, in report order."""
    v1, v2 = split_model(v1_path), split_model(v2_path)
    return [zstd19(v2_path), zipnn_full(v2), zipnn_delta(v1, v2), xor_zstd(v1, v2),
            fp32_diff_zstd(v1, v2)]


def best_lossless_delta(anchors: list[Anchor]) -> Anchor | None:
    """The smallest anchor that is a delta against v1 and decodes v2 exactly."""
    cands = [a for a in anchors if a.error is None and a.exact and a.lossless
             and a.method in ("ZipNN delta vs v1", "XOR + byte grouping + zstd -19")]
    return min(cands, key=lambda a: a.wire_bytes, default=None)
