"""Floating dtypes the codec handles, without ml_dtypes or onnx (device side).

bfloat16 is held as raw ``uint16`` bit patterns; every other dtype is its numpy type. Arithmetic
happens in float32 (float64 for float64 weights) and is rounded back to the storage dtype.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["DTypeInfo", "dtype_info", "FLOAT_TYPES"]

# ONNX TensorProto data type numbers (kept here so the device never imports onnx).
ONNX_FLOAT, ONNX_UINT8, ONNX_INT8 = 1, 2, 3
ONNX_FLOAT16, ONNX_DOUBLE, ONNX_BFLOAT16 = 10, 11, 16
ONNX_UINT4, ONNX_INT4, ONNX_UINT2, ONNX_INT2 = 21, 22, 25, 26


def _bf16_to_f32(u: np.ndarray) -> np.ndarray:
    return (np.asarray(u, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if np.any(nan):
        rounded = np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
    return rounded


def _trim_mantissa(s: np.ndarray, keep: int) -> np.ndarray:
    """Round float32 values to ``keep`` explicit mantissa bits, keeping float32's range."""
    drop = 23 - keep
    u = np.ascontiguousarray(s, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + (1 << (drop - 1))) >> drop << drop
    return np.minimum(u, 0x7F7FFFFF).astype(np.uint32).view(np.float32)


@dataclasses.dataclass(frozen=True)
class DTypeInfo:
    """One floating weight dtype: storage, arithmetic and base-scale conventions."""

    name: str
    onnx_type: int
    storage: np.dtype
    compute: np.dtype
    scale_onnx_type: int
    scale_tiny: float  # smallest scale used for a non-zero block

    def to_compute(self, x: np.ndarray) -> np.ndarray:
        if self.name == "bfloat16":
            return _bf16_to_f32(x)
        return np.asarray(x).astype(self.compute, copy=False)

    def from_compute(self, x: np.ndarray) -> np.ndarray:
        if self.name == "bfloat16":
            return _f32_to_bf16(x)
        with np.errstate(over="ignore"):
            return np.asarray(x).astype(self.storage, copy=False)

    def round_scale(self, s: np.ndarray) -> np.ndarray:
        """Round float32 scales to values the scale dtype holds exactly (returned as float32)."""
        s = np.asarray(s, np.float32)
        if self.name == "float16":
            s = np.clip(s, self.scale_tiny, 65504.0).astype(np.float16).astype(np.float32)
        else:
            # float32 scales with 10 mantissa bits: exact, and cheap to entropy-code.
            s = _trim_mantissa(s, 10)
        return s

    def scale_to_storage(self, s: np.ndarray) -> np.ndarray:
        """Scales (float32, already rounded) in the dtype DequantizeLinear reads."""
        return s.astype(self.scale_storage)

    @property
    def scale_storage(self) -> np.dtype:
        return np.dtype(np.float16 if self.scale_onnx_type == ONNX_FLOAT16 else np.float32)


FLOAT_TYPES: dict[str, DTypeInfo] = {
    "float32": DTypeInfo("float32", ONNX_FLOAT, np.dtype(np.float32), np.dtype(np.float32),
                         ONNX_FLOAT, 2.0**-126),
    "float16": DTypeInfo("float16", ONNX_FLOAT16, np.dtype(np.float16), np.dtype(np.float32),
                         ONNX_FLOAT16, 2.0**-14),
    # onnxruntime has no low-bit DequantizeLinear to bfloat16: float32 scales, then a Cast.
    "bfloat16": DTypeInfo("bfloat16", ONNX_BFLOAT16, np.dtype(np.uint16), np.dtype(np.float32),
                          ONNX_FLOAT, 2.0**-126),
    "float64": DTypeInfo("float64", ONNX_DOUBLE, np.dtype(np.float64), np.dtype(np.float64),
                         ONNX_FLOAT, 2.0**-126),
}
_BY_ONNX = {d.onnx_type: d for d in FLOAT_TYPES.values()}


def dtype_info(key: str | int) -> DTypeInfo:
    """Look up by name (``"float32"``) or ONNX type number; KeyError if not a float weight."""
    if isinstance(key, str):
        return FLOAT_TYPES[key]
    return _BY_ONNX[key]
