"""Rebuild weights stage by stage from a package's files (device side: numpy + zstandard).

:class:`WeightState` holds every coded weight as the device has it now. It starts from the base's
integer codes and scales (read from ``base.bin`` with the offsets in the manifest) and moves one
stage at a time with :meth:`WeightState.apply`. The encoder runs the very same code to know what
the device will hold, so both sides agree bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import quantizers as qz
from .codecs import get_codec
from .dtypes import (ONNX_INT2, ONNX_INT4, ONNX_INT8, ONNX_UINT2, ONNX_UINT4, ONNX_UINT8,
                     DTypeInfo, dtype_info)
from .errors import FormatError, IntegrityError
from .format import AtomicFile, StageFile

__all__ = ["WeightState", "pack_codes", "unpack_codes", "base_codes_of"]

_CODE_TYPES = {  # onnx type -> (bits per element, signed)
    ONNX_INT8: (8, True), ONNX_UINT8: (8, False),
    ONNX_INT4: (4, True), ONNX_UINT4: (4, False),
    ONNX_INT2: (2, True), ONNX_UINT2: (2, False),
}


def pack_codes(codes: np.ndarray, onnx_type: int) -> bytes:
    """Pack integer codes the way ONNX stores ``onnx_type`` (low bits first for 4/2-bit)."""
    bits, signed = _CODE_TYPES[onnx_type]
    flat = np.asarray(codes).reshape(-1)
    if bits == 8:
        return flat.astype(np.int8 if signed else np.uint8).tobytes()
    per = 8 // bits
    u = flat.astype(np.int16).astype(np.uint8) & ((1 << bits) - 1)
    pad = (-len(u)) % per
    if pad:
        u = np.concatenate([u, np.zeros(pad, np.uint8)])
    u = u.reshape(-1, per)
    out = np.zeros(len(u), np.uint8)
    for i in range(per):
        out |= u[:, i] << (bits * i)
    return out.tobytes()


def unpack_codes(raw, onnx_type: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`; returns int16 values."""
    bits, signed = _CODE_TYPES[onnx_type]
    b = np.frombuffer(raw, np.uint8)
    per = 8 // bits
    if len(b) != -(-count // per):
        raise FormatError(f"code buffer holds {len(b)} bytes, expected {-(-count // per)}")
    if bits == 8:
        return b.view(np.int8 if signed else np.uint8).astype(np.int16)
    mask = (1 << bits) - 1
    vals = np.stack([(b >> (bits * i)) & mask for i in range(per)], axis=1).reshape(-1)[:count]
    v = vals.astype(np.int16)
    if signed:
        v = np.where(v >= (1 << (bits - 1)), v - (1 << bits), v)
    return v


def _read(base_bin, span: list[int] | None):
    if span is None:
        return None
    off, length = span
    if off < 0 or off + length > len(base_bin):
        raise IntegrityError(f"base.bin is too short for span {off}+{length}")
    return base_bin[off:off + length]


def base_codes_of(t: dict[str, Any], base_bin) -> tuple[qz.Layout, qz.BaseCodes]:
    """Base codes and scales of tensor-table entry ``t``, in block order."""
    shape = tuple(t["shape"])
    layout = qz.Layout.from_json(shape, t["layout"])
    info = dtype_info(t["dtype"])
    b = t["base"]
    count = int(np.prod(shape, dtype=np.int64))
    codes = unpack_codes(_read(base_bin, b["codes"]), b["code_type"], count)
    codes = layout.to_blocks(codes.reshape(shape))
    sraw = np.frombuffer(_read(base_bin, b["scale"]), info.scale_storage)
    scale = layout.scales_to_blocks(sraw).astype(np.float32)
    zp = None
    if b.get("zero_point") is not None:
        zraw = unpack_codes(_read(base_bin, b["zero_point"]), b["code_type"], layout.n_blocks)
        zp = layout.scales_to_blocks(zraw.reshape(layout.scale_shape))
    return layout, qz.BaseCodes(codes, scale, zp, int(t["bits"]))


def weight_from_base(layout: qz.Layout, base: qz.BaseCodes, info: DTypeInfo) -> np.ndarray:
    """The stage-0 weight in its storage dtype, as DequantizeLinear yields it."""
    w = qz.dequantize_base(base).astype(info.compute)
    return info.from_compute(layout.from_blocks(w))


def refine_from(layout: qz.Layout, info: DTypeInfo, base_scale: np.ndarray,
                previous: np.ndarray, codes: np.ndarray, shift: int) -> np.ndarray:
    """Next lossy stage: ``previous + codes * base_scale * 2**-shift`` (storage dtype in and out).

    ``codes`` are in tensor order (as stored in stage files).
    """
    step = qz.stage_scale(base_scale, shift)
    prev_blocks = layout.to_blocks(info.to_compute(previous))
    new = qz.apply_refine(prev_blocks, layout.to_blocks(codes.reshape(layout.shape)), step,
                          info.compute)
    return info.from_compute(layout.from_blocks(new))


def lossless_from(previous: np.ndarray, codes: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(previous).reshape(-1)
    return qz.apply_lossless(flat, codes.reshape(-1)).reshape(previous.shape)


class WeightState:
    """The coded weights of one package as the device holds them at :attr:`stage`.

    ``base_bin`` is the base's external-data file (path or bytes). Weights are materialized when
    the first update arrives; :meth:`apply` checks the stage file belongs to this package and is
    the next stage before touching anything, and replaces weights only once every entry decoded.
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
        self._weights: dict[str, np.ndarray] = {}

    @property
    def base_bin(self) -> np.ndarray:
        return self._base_bin

    def weight(self, name: str) -> np.ndarray:
        """Current value of a coded weight (storage dtype; bfloat16 as uint16 bits)."""
        if name not in self._weights:
            t = self.tensors[name]
            layout, base = base_codes_of(t, self._base_bin)
            self._weights[name] = weight_from_base(layout, base, dtype_info(t["dtype"]))
        return self._weights[name]

    def apply(self, stage_file: StageFile,
              on_tensor: Callable[[str], None] | None = None) -> None:
        """Move to the next stage using ``stage_file`` (already read with :func:`read_stage`)."""
        expected = self.stage + 1
        if stage_file.package_id != self.manifest["package_id"]:
            raise IntegrityError(
                f"stage file {Path(stage_file.name).name} belongs to another package")
        if stage_file.stage != expected:
            raise IntegrityError(
                f"stage file {Path(stage_file.name).name} holds stage {stage_file.stage}, "
                f"expected stage {expected}")
        updated: dict[str, np.ndarray] = {}
        for entry in stage_file.entries:
            if entry["kind"] == "file":
                continue
            name = entry["name"]
            t = self.tensors.get(name)
            if t is None:
                raise FormatError(f"stage {expected} updates unknown tensor {name!r}")
            updated[name] = decode_entry(t, self._base_bin, self.weight(name), entry,
                                         stage_file.data(entry))
            if on_tensor:
                on_tensor(name)
        self._weights.update(updated)
        self.stage = expected

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
                data = np.ascontiguousarray(w).tobytes()
                if len(data) != length:
                    raise FormatError(f"weight {t['name']} has {len(data)} bytes, expected {length}")
                f.write(data)
                pos = off + length


def decode_entry(t, base_bin, previous: np.ndarray, entry: dict[str, Any], data) -> np.ndarray:
    """Apply one stage-file entry to ``previous`` (storage dtype); returns the new weight."""
    count = int(np.prod(t["shape"], dtype=np.int64))
    codes = get_codec(entry["codec"]).decode(data, count)
    if entry["kind"] == "refine":
        layout, base = base_codes_of(t, base_bin)
        return refine_from(layout, dtype_info(t["dtype"]), base.scale, previous, codes,
                           int(entry["shift"]))
    if entry["kind"] == "exact":
        return lossless_from(previous, codes)
    raise FormatError(f"unknown entry kind {entry['kind']!r}")


def extract_file(stage_file: StageFile, name: str) -> bytes:
    """Decompress the file entry ``name`` of a stage file and check its sha256."""
    import hashlib

    for entry in stage_file.entries:
        if entry["kind"] == "file" and entry["name"] == name:
            data = get_codec(entry["codec"]).decode(stage_file.data(entry),
                                                    int(entry["raw_length"]))
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise IntegrityError(f"{name} inside {Path(stage_file.name).name} is corrupt")
            return data
    raise FormatError(f"{Path(stage_file.name).name} has no {name}")
