"""Rebuild weights stage by stage from a package's files (device side: numpy + zstandard).

:class:`WeightState` holds every coded weight as the device has it now, in *block order* (see
:class:`~p2u_onnx.quantizers.Layout`): it starts from the base's integer codes and scales (read
from ``base.bin`` at the offsets the manifest gives) and moves one stage at a time with
:meth:`WeightState.apply`. Stage entries cover runs of blocks (``"blocks": [first, end]``), so
big tensors decode in cache-sized chunks, on several threads.

The encoder calls the same functions (:func:`code_chunk` mirrors :func:`decode_entry`), so both
sides compute bit-identical weights at every stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import quantizers as qz
from .codecs import IntGroupsCodec, IntPlanesCodec, get_codec
from .dtypes import (ONNX_INT2, ONNX_INT4, ONNX_INT8, ONNX_UINT2, ONNX_UINT4, ONNX_UINT8,
                     DTypeInfo, dtype_info)
from .errors import FormatError, IntegrityError
from .format import AtomicFile, StageFile

__all__ = ["WeightState", "pack_codes", "unpack_codes", "base_codes_of", "extract_file",
           "code_chunk", "ChunkCode", "workers"]

_CODE_TYPES = {  # onnx type -> (bits per element, signed)
    ONNX_INT8: (8, True), ONNX_UINT8: (8, False),
    ONNX_INT4: (4, True), ONNX_UINT4: (4, False),
    ONNX_INT2: (2, True), ONNX_UINT2: (2, False),
}


def workers() -> int:
    """Threads for coding work (numpy and zstandard release the GIL)."""
    return max(1, min(4, os.cpu_count() or 1))


def pack_codes(codes: np.ndarray, onnx_type: int) -> bytes:
    """Pack integer codes the way ONNX stores ``onnx_type`` (low bits first for 4/2-bit)."""
    bits, signed = _CODE_TYPES[onnx_type]
    flat = np.asarray(codes).reshape(-1)
    if bits == 8:
        return flat.astype(np.int8 if signed else np.uint8).tobytes()
    per = 8 // bits
    u = flat.astype(np.uint8) & ((1 << bits) - 1)
    pad = (-len(u)) % per
    if pad:
        u = np.concatenate([u, np.zeros(pad, np.uint8)])
    u = u.reshape(-1, per)
    out = u[:, 0].copy()
    for i in range(1, per):
        out |= u[:, i] << (bits * i)
    return out.tobytes()


def unpack_codes(raw, onnx_type: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`; returns int8 (signed types) or uint8 values."""
    bits, signed = _CODE_TYPES[onnx_type]
    b = np.frombuffer(raw, np.uint8)
    per = 8 // bits
    if len(b) != -(-count // per):
        raise FormatError(f"code buffer holds {len(b)} bytes, expected {-(-count // per)}")
    if bits == 8:
        return b.view(np.int8) if signed else b
    mask = (1 << bits) - 1
    v = np.empty((len(b), per), np.uint8)
    for i in range(per):
        np.bitwise_and(b >> (bits * i), mask, out=v[:, i])
    v = v.reshape(-1)[:count]
    if signed:
        shift = 8 - bits
        return ((v << shift).view(np.int8) >> shift).astype(np.int8)
    return v


def _read(base_bin, span: list[int] | None):
    if span is None:
        return None
    off, length = span
    if off < 0 or off + length > len(base_bin):
        raise IntegrityError(f"base.bin is too short for span {off}+{length}")
    return base_bin[off:off + length]


def base_scale_of(t: dict[str, Any], base_bin) -> tuple[qz.Layout, np.ndarray]:
    """Layout and per-block base scales (float32, block order) of tensor-table entry ``t``."""
    layout = qz.Layout.from_json(tuple(t["shape"]), t["layout"])
    info = dtype_info(t["dtype"])
    sraw = np.frombuffer(_read(base_bin, t["base"]["scale"]), info.scale_storage)
    if sraw.size != layout.n_blocks:
        raise FormatError(f"tensor {t['name']}: {sraw.size} scales for {layout.n_blocks} blocks")
    return layout, layout.scales_to_blocks(sraw).astype(np.float32)


def base_codes_of(t: dict[str, Any], base_bin) -> tuple[qz.Layout, qz.BaseCodes]:
    """Base codes and scales of tensor-table entry ``t``, in block order."""
    layout, scale = base_scale_of(t, base_bin)
    b = t["base"]
    codes = unpack_codes(_read(base_bin, b["codes"]), b["code_type"], layout.size)
    codes = layout.to_blocks(codes.reshape(layout.shape))
    zp = None
    if b.get("zero_point") is not None:
        zraw = unpack_codes(_read(base_bin, b["zero_point"]), b["code_type"], layout.n_blocks)
        zp = layout.scales_to_blocks(zraw.reshape(layout.scale_shape))
    return layout, qz.BaseCodes(codes, scale, zp, int(t["bits"]))


def base_blocks(base: qz.BaseCodes, info: DTypeInfo) -> np.ndarray:
    """Stage-0 weights (storage dtype, block order), as DequantizeLinear yields them."""
    return info.from_compute(qz.dequantize_base(base).astype(info.compute))


def refine_blocks(info: DTypeInfo, previous: np.ndarray, codes: np.ndarray,
                  step: np.ndarray) -> np.ndarray:
    """Next lossy stage of a run of blocks (storage dtype in and out)."""
    return info.from_compute(qz.apply_refine(info.to_compute(previous), codes, step, info.compute))


def lossless_context(info: DTypeInfo, previous: np.ndarray, step: np.ndarray) -> np.ndarray:
    return qz.exponent_context(info.to_compute(previous), step.astype(info.compute))


def lossless_blocks(previous: np.ndarray, codes: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(previous).reshape(-1)
    return qz.apply_lossless(flat, codes.reshape(-1)).reshape(previous.shape)


@dataclasses.dataclass
class ChunkCode:
    """Everything the encoder produces for one run of blocks of one tensor."""

    base: qz.BaseCodes
    payloads: list[bytes]  # one per stage >= 1
    max_err: list[float]  # per stage, over finite weights
    abs_max: float  # largest finite |weight|
    final: np.ndarray | None  # what the device holds after the last stage (if replayed)


PLANES = IntPlanesCodec(level=3)
GROUPS = IntGroupsCodec(level=3)


def code_chunk(xs: np.ndarray, info: DTypeInfo, stages: list[int | str], *, symmetric: bool,
               clip_search: bool, replay: bool = True,
               importance: np.ndarray | None = None) -> ChunkCode:
    """Code a run of blocks ``xs`` ([n, block_len], storage dtype) through every stage.

    ``stages`` are total bits per stage with ``"lossless"`` allowed last; the decoder's
    :func:`decode_entry` undoes each payload using the same functions. ``replay`` also runs
    the device's lossless step, so ``final`` can be checked against ``xs``. ``importance``
    (same shape as ``xs``) weights the base quantizer's error.
    """
    xc = info.to_compute(xs)
    finite = np.isfinite(xc)
    finite = None if finite.all() else finite
    base = qz.quantize_base(xc, int(stages[0]), info, symmetric=symmetric,
                            clip_search=clip_search, importance=importance)
    prev = base_blocks(base, info)
    errs = [_max_err(xc, prev, info, finite)]
    payloads = []
    step = base.scale
    for bits in stages[1:]:
        if bits == "lossless":
            d = qz.lossless_codes(np.ascontiguousarray(xs).reshape(-1), prev.reshape(-1))
            payloads.append(GROUPS.encode(d, lossless_context(info, prev, step)))
            prev = lossless_blocks(prev, d) if replay else None
        else:
            step = qz.stage_scale(base.scale, int(bits) - int(stages[0]))
            codes = qz.refine_codes(xc, info.to_compute(prev), step)
            payloads.append(PLANES.encode(codes))
            prev = refine_blocks(info, prev, codes, step)
        errs.append(0.0 if bits == "lossless" else _max_err(xc, prev, info, finite))
    with np.errstate(invalid="ignore"):
        a = np.abs(xc if finite is None else xc[finite])
    return ChunkCode(base, payloads, errs, float(a.max()) if a.size else 0.0, prev)


def _max_err(xc, prev, info, finite) -> float:
    """Largest |error| over finite weights (``finite`` is None when all are finite)."""
    with np.errstate(over="ignore", invalid="ignore"):
        diff = xc - info.to_compute(prev)
        if finite is not None:
            if not finite.any():
                return 0.0
            diff = np.where(finite, diff, 0)
        return float(np.max(np.abs(diff))) if diff.size else 0.0


def decode_entry(info: DTypeInfo, scale: np.ndarray, previous: np.ndarray,
                 entry: dict[str, Any], data) -> np.ndarray:
    """Apply one stage-file entry to a run of blocks ``previous``; returns the new run."""
    kind = entry["kind"]
    step = qz.stage_scale(scale, int(entry.get("shift", 0)))
    codec = get_codec(entry["codec"])
    if kind == "refine" and isinstance(codec, IntPlanesCodec):
        codes = codec.decode(data, previous.size).reshape(previous.shape)
        return refine_blocks(info, previous, codes, step)
    if kind == "exact" and isinstance(codec, IntGroupsCodec):
        codes = codec.decode(data, lossless_context(info, previous, step))
        return lossless_blocks(previous, codes)
    raise FormatError(f"entry kind {kind!r} with codec {codec.codec_id!r} is not supported")


class WeightState:
    """The coded weights of one package as the device holds them at :attr:`stage`.

    ``base_bin`` is the base's external-data file (path or bytes). :meth:`apply` checks that a
    stage file belongs to this package and is the next stage before touching anything, and
    replaces weights only once every entry decoded.
    """

    def __init__(self, manifest: dict[str, Any], base_bin: str | os.PathLike | bytes):
        self.manifest = manifest
        if isinstance(base_bin, (str, os.PathLike)):
            self._base_bin = np.memmap(base_bin, np.uint8, mode="r") \
                if os.path.getsize(base_bin) else np.zeros(0, np.uint8)
        else:
            self._base_bin = np.frombuffer(base_bin, np.uint8)
        self.tensors = {t["name"]: t for t in manifest["tensors"]}
        self.stage = 0
        self._blocks: dict[str, np.ndarray] = {}
        self._scales: dict[str, np.ndarray] = {}
        self.graph_bytes: bytes | None = None

    @property
    def base_bin(self) -> np.ndarray:
        return self._base_bin

    def _state(self, name: str) -> np.ndarray:
        if name not in self._blocks:
            t = self.tensors[name]
            layout, base = base_codes_of(t, self._base_bin)
            self._scales[name] = base.scale
            self._blocks[name] = base_blocks(base, dtype_info(t["dtype"]))
        return self._blocks[name]

    def weight(self, name: str) -> np.ndarray:
        """Current value of a coded weight, in its shape (storage dtype; bfloat16 as uint16)."""
        t = self.tensors[name]
        return qz.Layout.from_json(tuple(t["shape"]), t["layout"]).from_blocks(self._state(name))

    def apply(self, stage_file: StageFile) -> None:
        """Move to the next stage using ``stage_file`` (already read with :func:`read_stage`)."""
        expected = self.stage + 1
        label = f"stage file {Path(stage_file.name).name}"
        if stage_file.package_id != self.manifest["package_id"]:
            raise IntegrityError(f"{label} belongs to another package")
        if stage_file.stage != expected:
            raise IntegrityError(f"{label} holds stage {stage_file.stage}, expected stage "
                                 f"{expected}")
        jobs = []
        fresh: dict[str, np.ndarray] = {}
        for entry in stage_file.entries:
            if entry["kind"] == "file":
                continue
            name = entry["name"]
            if name not in self.tensors:
                raise FormatError(f"{label} updates unknown tensor {name!r}")
            current = self._state(name)
            b0, b1 = entry["blocks"]
            if not 0 <= b0 < b1 <= len(current):
                raise FormatError(f"{label}: block range {b0}..{b1} out of range for {name}")
            if name not in fresh:
                fresh[name] = np.empty_like(current)
            jobs.append((name, b0, b1, entry))
        covered = {n: 0 for n in fresh}
        for name, b0, b1, _ in jobs:
            covered[name] += b1 - b0
        for name, n in covered.items():
            if n != len(self._blocks[name]):
                raise FormatError(f"{label} does not cover every block of {name}")

        def run(job):
            name, b0, b1, entry = job
            t = self.tensors[name]
            fresh[name][b0:b1] = decode_entry(dtype_info(t["dtype"]), self._scales[name][b0:b1],
                                              self._blocks[name][b0:b1], entry,
                                              stage_file.data(entry))

        with ThreadPoolExecutor(workers()) as pool:
            list(pool.map(run, jobs))
        self._blocks.update(fresh)
        self.stage = expected
        for entry in stage_file.entries:
            if entry["kind"] == "file" and entry["name"] == "graph.onnx":
                self.graph_bytes = extract_file(stage_file, "graph.onnx")

    def checkpoint(self) -> tuple:
        """Snapshot for :meth:`rollback` (cheap: apply replaces arrays, never writes into them)."""
        return self.stage, dict(self._blocks), dict(self._scales), self.graph_bytes

    def rollback(self, checkpoint: tuple) -> None:
        """Return to a :meth:`checkpoint`, e.g. when the patched session failed its probe."""
        self.stage, blocks, scales, self.graph_bytes = checkpoint
        self._blocks, self._scales = dict(blocks), dict(scales)

    def iter_weights(self) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        for name, t in self.tensors.items():
            yield t, self.weight(name)

    def write_weights(self, path: str | os.PathLike) -> None:
        """Write ``weights.bin``: every coded weight at the offset the skeleton graph names."""
        with AtomicFile(path) as f:
            pos = 0
            for t, w in self.iter_weights():
                off, length = t["weights"]
                if off > pos:
                    f.write(b"\0" * (off - pos))
                data = np.ascontiguousarray(w)
                if data.nbytes != length:
                    raise FormatError(f"weight {t['name']} has {data.nbytes} bytes, "
                                      f"expected {length}")
                f.write(memoryview(data.reshape(-1).view(np.uint8)))
                pos = off + length


def extract_file(stage_file: StageFile, name: str) -> bytes:
    """Decompress the file entry ``name`` of a stage file and check its sha256."""
    for entry in stage_file.entries:
        if entry["kind"] == "file" and entry["name"] == name:
            data = get_codec(entry["codec"]).decode(stage_file.data(entry),
                                                    int(entry["raw_length"]))
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise IntegrityError(f"{name} inside {Path(stage_file.name).name} is corrupt")
            return data
    raise FormatError(f"{Path(stage_file.name).name} has no {name}")
