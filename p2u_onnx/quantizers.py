"""Quantizers: pure numpy, shared by the encoder and the device.

A weight tensor is cut into *blocks* (:class:`Layout`): one block for the whole tensor, one per
output channel, or runs of ``block_size`` values along one axis inside one output channel. The
base stage stores, per block, integer codes and one scale (and a zero point when asymmetric)::

    w0 = (q0 - z) * s0

Every later lossy stage refines on a grid ``2**shift`` times finer than the one before, reusing the
base scales, so it costs no new scales::

    s_k = s0 * 2**-(bits_k - bits_0)        w_k = w_{k-1} + q_k * s_k

and its error on every finite weight is at most ``s_k / 2`` (plus the rounding of the sum to the
weight's dtype). The final lossless stage sends the difference between the *ordered integer*
images of the original and reconstructed bit patterns (:func:`float_to_ordered`), so every bit,
NaN payloads and -0.0 included, comes back.

The encoder and the device call the same reconstruction functions here, so both sides compute
bit-identical weights at every stage.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from .dtypes import DTypeInfo

__all__ = [
    "Layout",
    "BaseCodes",
    "quantize_base",
    "dequantize_base",
    "refine_codes",
    "apply_refine",
    "float_to_ordered",
    "ordered_to_float",
    "lossless_codes",
    "apply_lossless",
]

LayoutMode = Literal["tensor", "channel", "block"]

# Clipping ratios tried per block by the MSE search (1.0 = plain absmax).
_CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a tensor of ``shape`` is cut into quantization blocks.

    ``mode`` is ``"tensor"`` (one block), ``"channel"`` (one block per index of ``axis``) or
    ``"block"`` (runs of ``block_size`` values along ``axis``, one set per index of every other
    axis). The last mode matches ONNX DequantizeLinear's blocked quantization exactly.
    """

    shape: tuple[int, ...]
    mode: LayoutMode = "tensor"
    axis: int = 0
    block_size: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("tensor", "channel", "block"):
            raise ValueError(f"unknown layout mode {self.mode!r}")
        if self.mode != "tensor":
            if not self.shape or not 0 <= self.axis < len(self.shape):
                raise ValueError(f"axis {self.axis} out of range for shape {self.shape}")
        if self.mode == "block" and self.block_size < 1:
            raise ValueError("block layout needs block_size >= 1")

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def block_len(self) -> int:
        """Values per block (including padding of the last block along the axis)."""
        if self.mode == "tensor":
            return max(self.size, 1)
        if self.mode == "channel":
            n = self.shape[self.axis]
            return max(self.size // n, 1) if n else 1
        return self.block_size

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the scale tensor as ONNX DequantizeLinear wants it."""
        if self.mode == "tensor":
            return ()
        if self.mode == "channel":
            return (self.shape[self.axis],)
        nb = -(-self.shape[self.axis] // self.block_size)
        return tuple(nb if i == self.axis else d for i, d in enumerate(self.shape))

    @property
    def n_blocks(self) -> int:
        return int(np.prod(self.scale_shape, dtype=np.int64))

    def to_blocks(self, x: np.ndarray) -> np.ndarray:
        """View or copy ``x`` as ``[n_blocks, block_len]`` (zero padded)."""
        x = np.asarray(x).reshape(self.shape)
        if self.mode == "tensor":
            return x.reshape(1, -1) if x.size else np.zeros((1, 1), x.dtype)
        if self.mode == "channel":
            return np.moveaxis(x, self.axis, 0).reshape(self.shape[self.axis], -1)
        y = np.moveaxis(x, self.axis, -1)
        length = y.shape[-1]
        nb = -(-length // self.block_size)
        pad = nb * self.block_size - length
        if pad:
            y = np.concatenate([y, np.zeros(y.shape[:-1] + (pad,), y.dtype)], axis=-1)
        return y.reshape(-1, self.block_size)

    def blocks_of(self, x: np.ndarray, b0: int, b1: int) -> np.ndarray:
        """``to_blocks(x)[b0:b1]``, copying only the rows of ``x`` those blocks come from
        (``to_blocks`` copies the whole tensor when its blocks do not run along its C
        order)."""
        x = np.asarray(x).reshape(self.shape)
        if self.mode == "tensor":
            return self.to_blocks(x)[b0:b1]
        if self.mode == "channel":
            return np.moveaxis(x, self.axis, 0)[b0:b1].reshape(b1 - b0, -1)
        y = np.moveaxis(x, self.axis, -1)
        lead, length = y.shape[:-1], y.shape[-1]
        nb = -(-length // self.block_size)
        r0, r1 = b0 // nb, -(-b1 // nb)
        rows = y[np.unravel_index(np.arange(r0, r1), lead)] if lead else y[None]
        pad = nb * self.block_size - length
        if pad:
            rows = np.concatenate([rows, np.zeros((len(rows), pad), rows.dtype)], axis=1)
        return rows.reshape(-1, self.block_size)[b0 - r0 * nb:b1 - r0 * nb]

    def from_blocks(self, b: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_blocks` (drops the padding)."""
        if self.mode == "tensor":
            return b.reshape(-1)[: self.size].reshape(self.shape)
        if self.mode == "channel":
            moved = (self.shape[self.axis],) + tuple(
                d for i, d in enumerate(self.shape) if i != self.axis
            )
            return np.moveaxis(b.reshape(moved), 0, self.axis)
        moved = tuple(d for i, d in enumerate(self.shape) if i != self.axis)
        length = self.shape[self.axis]
        y = b.reshape(moved + (-1,))[..., :length]
        return np.moveaxis(y, -1, self.axis)

    def scales_to_blocks(self, s: np.ndarray) -> np.ndarray:
        """Per-block values in DequantizeLinear's scale layout -> ``[n_blocks]`` in block order."""
        s = np.asarray(s).reshape(self.scale_shape)
        if self.mode == "block":
            return np.moveaxis(s, self.axis, -1).reshape(-1)
        return s.reshape(-1)

    def blocks_to_scales(self, s: np.ndarray) -> np.ndarray:
        """``[n_blocks]`` in block order -> DequantizeLinear's scale layout."""
        if self.mode != "block":
            return np.asarray(s).reshape(self.scale_shape)
        moved = tuple(d for i, d in enumerate(self.scale_shape) if i != self.axis)
        nb = self.scale_shape[self.axis]
        return np.moveaxis(np.asarray(s).reshape(moved + (nb,)), -1, self.axis)

    def to_json(self) -> dict:
        return {"mode": self.mode, "axis": self.axis, "block_size": self.block_size}

    @classmethod
    def from_json(cls, shape: tuple[int, ...], d: dict) -> Layout:
        return cls(tuple(shape), d["mode"], int(d["axis"]), int(d["block_size"]))


@dataclasses.dataclass
class BaseCodes:
    """Base-stage quantization of one tensor, per block (block order, see :class:`Layout`)."""

    codes: np.ndarray  # int8/uint8 [n_blocks, block_len]
    scale: np.ndarray  # scale dtype [n_blocks]
    zero_point: np.ndarray | None  # same dtype as codes, [n_blocks], or None if symmetric
    bits: int


def quantize_base(
    blocks: np.ndarray,
    bits: int,
    info: DTypeInfo,
    *,
    symmetric: bool = True,
    clip_search: bool = True,
    importance: np.ndarray | None = None,
) -> BaseCodes:
    """Quantize ``[n_blocks, block_len]`` float values to ``bits``-bit integer codes.

    Scales come from the finite values of each block (NaN and +-Inf never reach a scale, so the
    base stays finite where the weight is finite). With ``clip_search`` each block tries a few
    clipping ratios and keeps the one with the least squared error; clipped values are restored
    by the next stage, whose grid is not clipped. ``importance`` (same shape as ``blocks``, e.g.
    the mean square of the activation each weight multiplies) weights that error.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    with np.errstate(over="ignore"):  # fp64 values past float32's range: treated as +-Inf
        x = np.asarray(blocks, np.float32)
    finite = np.isfinite(x)
    xf = x if finite.all() else np.where(finite, x, np.float32(0))
    del finite
    tiny = np.float32(info.scale_tiny)
    if symmetric:
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        # max |x| per block, as max(max, -min): the same number without an |x| array
        absmax = np.maximum(np.max(xf, axis=1), -np.min(xf, axis=1)) if xf.size \
            else np.zeros(len(x), np.float32)
        base_scale = absmax.astype(np.float64) / qmax
        lo = np.zeros_like(base_scale)
    else:
        qmin, qmax = 0, (1 << bits) - 1
        mn = np.minimum(np.min(xf, axis=1), 0).astype(np.float64)
        mx = np.maximum(np.max(xf, axis=1), 0).astype(np.float64)
        base_scale = (mx - mn) / qmax
        lo = mn

    ratios = _CLIP_RATIOS if clip_search else (1.0,)
    ctype = np.int8 if symmetric else np.uint8
    codes = np.empty(xf.shape, ctype)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        scale, zp = _search(xf, base_scale, lo, ratios, info, tiny, symmetric, qmin, qmax,
                            importance)
        safe = np.where(scale > 0, scale, np.float32(1))
        for rows in _slabs(xf):
            q = np.divide(xf[rows], safe[rows, None])
            if zp is not None:
                q += zp[rows, None]
            np.rint(q, out=q)
            np.clip(q, qmin, qmax, out=q)
            codes[rows] = q
        if zp is not None:
            codes[scale <= 0] = zp[scale <= 0, None]
    return BaseCodes(
        codes=codes,
        scale=scale.astype(np.float32),
        zero_point=None if zp is None else zp.astype(ctype),
        bits=bits,
    )


_SLAB = 1 << 18  # values per slab: the clip search's passes stay in the core's own cache


def _slabs(x: np.ndarray) -> list[slice]:
    """Runs of whole rows of ``x`` ([n, block_len]) of about :data:`_SLAB` values."""
    n, length = x.shape
    step = max(1, _SLAB // max(length, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _search(xf, base_scale, lo, ratios, info, tiny, symmetric, qmin, qmax, importance=None):
    """Per block, the clipping ratio with the least squared error: (scale, zero point).

    The squared errors of every ratio are computed slab by slab of rows (each row's sum is the
    same whatever the slab), then the ratios are compared in order as before: a later ratio
    wins only where its error is strictly smaller.
    """
    cands = []
    for r in ratios:
        scale = info.round_scale(np.maximum(base_scale * r, tiny))
        scale = np.where(base_scale > 0, scale, np.float32(0))
        zp = None
        if not symmetric:
            safe = np.where(scale > 0, scale, 1).astype(np.float64)
            zp = np.clip(np.rint(-lo * r / safe), qmin, qmax).astype(np.float32)
        if len(ratios) == 1:
            return scale, zp
        inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0)
        cands.append((scale, zp, inv))
    edtype = xf.dtype if importance is None else np.result_type(xf, importance)
    errs = [np.empty(len(xf), edtype) for _ in cands]
    slabs = _slabs(xf)
    buf = np.empty((slabs[0].stop if slabs else 0, xf.shape[1]), xf.dtype)
    for rows in slabs:
        xs = xf[rows]
        b = buf[:len(xs)]
        imp = None if importance is None else importance[rows]
        for (scale, zp, inv), err in zip(cands, errs):
            np.multiply(xs, inv[rows, None], out=b)
            if zp is not None:
                b += zp[rows, None]
            np.rint(b, out=b)
            np.clip(b, qmin, qmax, out=b)
            if zp is not None:
                b -= zp[rows, None]
            b *= scale[rows, None]
            b -= xs
            err[rows] = np.einsum("ij,ij->i", b, b * imp if imp is not None else b)
    best_scale, best_zp, best_err = cands[0][0], cands[0][1], errs[0]
    for (scale, zp, _), err in zip(cands[1:], errs[1:]):
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        if zp is not None:
            best_zp = np.where(better, zp, best_zp)
        best_err = np.where(better, err, best_err)
    return best_scale, best_zp


def dequantize_base(base: BaseCodes) -> np.ndarray:
    """``(q - z) * s`` in float32, as DequantizeLinear computes it; ``[n_blocks, block_len]``."""
    # codes and zero points are small integers: float32 holds them and their difference exactly
    q = base.codes.astype(np.float32)
    if base.zero_point is not None:
        q -= base.zero_point.astype(np.float32)[:, None]
    q *= base.scale.astype(np.float32)[:, None]
    return q


def stage_scale(base_scale: np.ndarray, shift: int) -> np.ndarray:
    """Grid step of a stage ``shift`` bits finer than the base (exact power-of-two scaling)."""
    s = np.asarray(base_scale, np.float32)
    if -100 <= shift <= 100:  # a product by a power of two: as exact (or as rounded) as ldexp
        return s * np.float32(2.0 ** -shift)
    return np.ldexp(s, -shift).astype(np.float32)


def refine_codes(original: np.ndarray, previous: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Codes of the next stage: the residual ``original - previous`` rounded to the grid
    ``step`` (per block), as int32; 0 where the weight is not finite or the step is 0.

    A stage ``d`` bits finer than the last needs codes in ``[-2**(d-1), 2**(d-1)]``; only
    values the base clipped fall outside. The grid keeps 0 (and every earlier grid point), so
    a weight already exact stays exact and errors never grow from stage to stage.
    """
    ct = np.float64 if previous.dtype == np.float64 else np.float32
    st = np.asarray(step, ct)[:, None]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        q = np.subtract(np.asarray(original, ct), previous, dtype=np.result_type(ct, previous))
        q /= np.where(st > 0, st, 1)
        np.rint(q, out=q)
    if not ((st > 0).all() and np.isfinite(q).all()):
        q = np.where(np.isfinite(q) & (st > 0), q, 0)
    np.clip(q, -(2**24), 2**24, out=q)
    return q.astype(np.int32)


def apply_refine(
    previous: np.ndarray, codes: np.ndarray, step: np.ndarray, compute_dtype: np.dtype
) -> np.ndarray:
    """``previous + codes * step`` in ``compute_dtype`` (exact product for codes < 2**13)."""
    ct = np.dtype(compute_dtype)
    out = codes.astype(ct)
    out *= np.asarray(step, ct)[:, None]
    out += previous
    return out


def exponent_context(previous: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Context for the lossless stage (uint8): how many binary orders of magnitude the last
    grid step spans over the spacing of floats near the current value. Values with the same
    context need about the same number of bits, so they are coded together.

    Defined as ``clip(e(step) - e(|previous|) + 32, 0, 95)`` with ``e`` the exponent
    :func:`numpy.frexp` returns (``previous`` is ``[n_blocks, block_len]``, ``step`` one per
    block). For normal float32/float64 values ``e`` is read from the exponent field of the bit
    pattern (the same number, without frexp's passes); zeros, subnormals, infinities and NaNs
    go through frexp itself.
    """
    previous = np.asarray(previous)
    _, es = np.frexp(np.asarray(step, previous.dtype))
    if previous.ndim != 2 or previous.dtype not in (np.float32, np.float64) or \
            es.shape != previous.shape[:1]:
        return _exponent_context_frexp(previous, step)
    if previous.dtype == np.float32:
        # biased exponent (the uint8 cast drops the sign bit); frexp's e is biased - 126
        e = (np.ascontiguousarray(previous).view(np.uint32) >> 23).astype(np.uint8)
        k = es.astype(np.int32) + (126 + 32)
        if k.size and 0 <= k.min() and k.max() <= 255:
            kb = k.astype(np.uint8)[:, None]
            ctx = np.minimum(e, kb)
            np.subtract(kb, ctx, out=ctx)  # max(k - e, 0)
            np.minimum(ctx, np.uint8(95), out=ctx)
        else:
            ctx = np.clip(k[:, None] - e.astype(np.int32), 0, 95).astype(np.uint8)
        special = e - np.uint8(1)
        special = special >= np.uint8(254)  # e == 0 (zero, subnormal) or 255 (inf, nan)
    else:
        e = ((np.ascontiguousarray(previous).view(np.uint64) >> np.uint64(52))
             & np.uint64(0x7FF)).astype(np.int32)
        ctx = np.clip((es.astype(np.int32) + (1022 + 32))[:, None] - e, 0, 95).astype(np.uint8)
        special = (e == 0) | (e == 0x7FF)
    if special.any():
        idx = np.flatnonzero(special)
        _, ep = np.frexp(np.abs(previous.reshape(-1)[idx]))
        ctx.reshape(-1)[idx] = np.clip(es[idx // previous.shape[1]].astype(np.int16) - ep + 32,
                                       0, 95).astype(np.uint8)
    return ctx


def _exponent_context_frexp(previous: np.ndarray, step: np.ndarray) -> np.ndarray:
    """:func:`exponent_context` by its definition (any shapes that broadcast)."""
    _, ep = np.frexp(np.abs(previous))
    _, es = np.frexp(np.asarray(step, previous.dtype))
    return np.clip(es[:, None].astype(np.int16) - ep + 32, 0, 95).astype(np.uint8)


_ORDERED = {2: (np.int16, np.uint16, 0x7FFF), 4: (np.int32, np.uint32, 0x7FFFFFFF),
            8: (np.int64, np.uint64, 0x7FFFFFFFFFFFFFFF)}


def float_to_ordered(x: np.ndarray) -> np.ndarray:
    """Map float bit patterns to signed integers in the same order as the floats (as int64).

    Bijective on bit patterns: -0.0 -> -1, +0.0 -> 0, NaNs keep their payloads.
    """
    return _ordered(np.asarray(x)).astype(np.int64, copy=False)


def ordered_to_float(k: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`float_to_ordered`."""
    dtype = np.dtype(dtype)
    return _from_ordered(np.asarray(k).astype(_ORDERED[dtype.itemsize][0]), dtype)


def _ordered(x: np.ndarray) -> np.ndarray:
    """:func:`float_to_ordered` in the float's own width (int16/int32/int64)."""
    itype, _, mask = _ORDERED[x.dtype.itemsize]
    b = np.ascontiguousarray(x).view(itype)
    k = b >> (8 * x.dtype.itemsize - 1)
    k &= itype(mask)
    k ^= b
    return k


def _from_ordered(k: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`_ordered`, in place on ``k`` (its own width)."""
    t = k >> (8 * k.dtype.itemsize - 1)
    t &= k.dtype.type(_ORDERED[k.dtype.itemsize][2])
    k ^= t
    return k.view(dtype)


def lossless_codes(original: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Ordered-integer difference that turns ``previous`` into ``original`` bit for bit
    (int32 when every difference fits, else int64)."""
    a = _ordered(original)
    b = _ordered(previous)
    if a.dtype == np.int16:  # 2-byte floats: every difference fits in int32
        return np.subtract(a, b, dtype=np.int32)
    if a.dtype == np.int32 and a.size:
        d = a - b  # wraps when the true difference does not fit in int32
        over = a ^ b
        over &= a ^ d  # overflow: a and b differ in sign and so do a and d
        if not (over < 0).any():
            return d
        # an overflow: that difference needs more than 32 bits
    return np.subtract(a, b, dtype=np.int64)


def apply_lossless(previous: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``previous`` moved by ``codes`` in ordered-integer space (:func:`lossless_codes`).

    The sum wraps in the float's own width: the result only ever needs its low bits, so this
    is bit-identical to adding in int64 and truncating.
    """
    k = _ordered(previous)
    k += codes.astype(k.dtype, copy=False)
    return _from_ordered(k, previous.dtype)
