"""Palette tensors: weights with few distinct values, exact from the base on (pure numpy).

Clustered and already-quantized models store each weight as one of a few values (a CRNN with
76). Such a tensor is coded as a *palette* (its distinct bit patterns, at most
:data:`MAX_PALETTE`) and one ``uint8`` index per weight; the base computes
``W = Gather(palette, Cast(indices, int32))``, which is bit-exact (NaN payloads and -0.0
included: the palette holds the original bit patterns), so later stages carry nothing for it.

Manifest entry (``tensors[i]``)::

    "layout": {"mode": "channel", "axis": 0, "block_size": 0}   ("tensor" for rank < 2)
    "bits": 8,
    "base": {"kind": "palette", "codes": [offset, length], "palette": [offset, length],
             "code_type": 2, "size": k}

``codes`` are ``numel`` uint8 indices in C order, ``palette`` ``k`` values of the tensor's
storage dtype (little-endian; bfloat16 as its 16-bit patterns). :func:`check_entry` validates
such an entry; :func:`decode` rebuilds the tensor on the device. The encoder uses
:func:`find` and keeps the palette only where it is smaller than the regular coding (measured
per tensor).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dtypes import ONNX_UINT8, dtype_info
from .errors import FormatError

__all__ = ["MAX_PALETTE", "KIND", "find", "is_palette", "check_entry", "decode", "layout_json",
           "find_grid", "check_tensor_base"]

MAX_PALETTE = 256
KIND = "palette"
_SAMPLE = 4096  # values looked at first: most dense tensors are rejected on these


def _bits(w: np.ndarray) -> np.ndarray:
    """The values' bit patterns as unsigned integers (flat, C order)."""
    w = np.ascontiguousarray(w)
    return w.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[
        w.dtype.itemsize])


def find(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(palette, indices)`` when ``w`` (storage dtype) has at most :data:`MAX_PALETTE`
    distinct bit patterns, else None. ``palette`` has ``w``'s dtype (distinct bit patterns,
    increasing as unsigned integers); ``indices`` is uint8, flat C order, and
    ``palette[indices]`` is ``w`` bit for bit."""
    u = _bits(w)
    if u.size == 0:
        return None
    step = max(1, u.size // _SAMPLE)
    seen = np.unique(u[::step])
    if len(seen) > MAX_PALETTE:
        return None
    # the values the sample saw are usually all there are: one search, not a sort
    inverse = np.minimum(np.searchsorted(seen, u), len(seen) - 1)
    if np.array_equal(seen[inverse], u):
        return seen.view(w.dtype), inverse.astype(np.uint8)
    values, inverse = np.unique(u, return_inverse=True)
    if len(values) > MAX_PALETTE:
        return None
    return values.view(w.dtype), inverse.reshape(-1).astype(np.uint8)


def layout_json(shape: tuple[int, ...]) -> dict[str, Any]:
    """The layout a palette tensor is recorded with: runs of whole leading rows (contiguous in
    C order, so the device rebuilds it run by run), or one block below rank 2."""
    if len(shape) >= 2:
        return {"mode": "channel", "axis": 0, "block_size": 0}
    return {"mode": "tensor", "axis": 0, "block_size": 0}


def is_palette(t: dict[str, Any]) -> bool:
    """Whether tensor-table entry ``t`` is a palette tensor."""
    base = t.get("base")
    return isinstance(base, dict) and base.get("kind") == KIND


def _span(v: object, what: str) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)):
        raise FormatError(f"{what} must be [offset, length] with non-negative integers")
    return v[0], v[1]


def check_entry(t: dict[str, Any], base_size: int | None = None) -> None:
    """Validate the palette fields of tensor-table entry ``t`` (call it for entries where
    :func:`is_palette` is true): the kind, code type, palette size, spans (inside
    ``base.bin`` of ``base_size`` bytes when given) and layout. :class:`FormatError` naming
    the tensor and the field otherwise."""
    name = t.get("name")
    what = f"tensor {name!r}"
    b = t.get("base")
    if not isinstance(b, dict) or b.get("kind") != KIND:
        raise FormatError(f"{what}: base.kind is not {KIND!r}")
    allowed = {"kind", "codes", "palette", "code_type", "size"}
    extra = set(b) - allowed
    if extra:
        raise FormatError(f"{what}: unknown palette field(s) {sorted(extra)}")
    try:
        info = dtype_info(t.get("dtype"))
    except Exception:
        raise FormatError(f"{what}: palette tensor has an unknown dtype {t.get('dtype')!r}") \
            from None
    shape = t.get("shape")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                            and d >= 0 for d in shape)):
        raise FormatError(f"{what}: shape must be a list of non-negative integers")
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if b.get("code_type") != ONNX_UINT8:
        raise FormatError(f"{what}: palette indices must be uint8 (code_type {ONNX_UINT8})")
    k = b.get("size")
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_PALETTE):
        raise FormatError(f"{what}: palette size must be 1..{MAX_PALETTE}, got {k!r}")
    spans = {}
    for field, length in (("codes", numel), ("palette", k * info.storage.itemsize)):
        off, ln = spans[field] = _span(b.get(field), f"{what}: base.{field}")
        if ln != length:
            raise FormatError(f"{what}: base.{field} holds {ln} bytes, expected {length}")
        if base_size is not None and off + ln > base_size:
            raise FormatError(f"{what}: base.{field} lies beyond the end of base.bin")
    if t.get("layout") != layout_json(tuple(shape)):
        raise FormatError(f"{what}: a palette tensor has layout {layout_json(tuple(shape))}")


def decode(t: dict[str, Any], base_bin) -> np.ndarray:
    """The tensor's values (storage dtype, flat C order) from ``base.bin`` (any object sliced
    by ``base_bin[a:b]`` into bytes). Checks the entry and every index."""
    check_entry(t, len(base_bin))
    b = t["base"]
    info = dtype_info(t["dtype"])
    (co, cn), (po, pn) = b["codes"], b["palette"]
    idx = np.frombuffer(base_bin[co:co + cn], np.uint8)
    pal = np.frombuffer(base_bin[po:po + pn], info.storage.newbyteorder("<"))
    if idx.size and int(idx.max()) >= len(pal):
        raise FormatError(f"tensor {t['name']!r}: palette index {int(idx.max())} beyond its "
                          f"{len(pal)} values")
    return pal.astype(info.storage)[idx]


# ---------------------------------------------------------------- uniform grids


_GRID_TRIES = 16  # the smallest |weight| of a block is tried as 1..16 grid steps
_GRID_SAMPLE = 64  # blocks looked at first
_GRID_LEFT = 4096  # blocks at most tried against the steps found for the others
_GRID_NEAR = 128  # ... the steps of that many blocks on either side, and as many others


def find_grid(blocks: np.ndarray, info, max_bits: int = 8):
    """Base codes that are exact for weights already on a uniform grid (fake-quantized:
    ``scale * integer`` per block, channel or tensor), or None.

    ``blocks`` is ``[n_blocks, block_len]`` in storage dtype (block order). Per block, the grid
    step is found from the smallest non-zero ``|weight|`` (taken as 1..16 steps) and the largest
    code, then checked: every weight must equal what DequantizeLinear gives for its code
    (:func:`~p2u_onnx.quantizers.dequantize_base`, bit for bit but for the sign of zero, which
    the lossless stage restores) with every code in ``[-2**(bits-1), 2**(bits-1) - 1]``,
    ``bits <= max_bits``. Steps are values the base's scale type holds (float16 steps for
    float16 weights); float64 weights are not looked at. Returns :class:`~p2u_onnx.quantizers.BaseCodes` (int8 codes, the
    found steps as scales, the fewest bits that hold the codes); all-zero blocks get scale 0.
    """
    from . import quantizers as qz

    n = len(blocks)
    if n == 0 or blocks.size == 0 or info.compute != np.float32:
        return None  # float64 weights: not looked for
    if n > _GRID_SAMPLE and _grid_scales(blocks[:_GRID_SAMPLE], info, max_bits) is None:
        return None  # most dense tensors stop here
    found = _grid_scales(blocks, info, max_bits)
    if found is None:
        return None
    scale, codes = found
    top = int(max(codes.max(), -int(codes.min()) - 1, 0))
    bits = max(2, int(top).bit_length() + 1)
    return qz.BaseCodes(codes, scale, None, bits)


def _exact(q: np.ndarray, s: np.ndarray, xl: np.ndarray, stored: np.ndarray, info) -> np.ndarray:
    """Rows where codes ``q`` times steps ``s`` give the weights (``xl`` in float32,
    ``stored`` in their storage dtype) as the base computes them, bit for bit but for zeros."""
    back = q.astype(np.float32) * s[:, None]  # what dequantize_base computes
    if info.name == "float32":  # equal floats are equal bits but for zeros (all finite here)
        same = back == xl
    else:  # rounded to the weights' dtype, as base_blocks does
        got = np.ascontiguousarray(info.from_compute(back))
        same = got.view(_UINT[got.dtype.itemsize]) == \
            np.ascontiguousarray(stored).view(_UINT[stored.dtype.itemsize])
    return (same | (xl == 0)).all(axis=1)


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _steps(s: np.ndarray, info, toward=None) -> np.ndarray:
    """Candidate steps as the base's scales hold them (float16 for float16 weights), or
    their neighbours in that type toward ``toward``; as float32, invalid ones 1."""
    st = s.astype(info.scale_storage)
    if toward is not None:
        st = np.nextafter(st, st.dtype.type(toward))
    s = st.astype(np.float32)
    return np.where((s > 0) & np.isfinite(s), s, np.float32(1))


def _grid_scales(blocks: np.ndarray, info, max_bits: int):
    """(scales, int8 codes) with every block exact on its grid, or None."""
    x = info.to_compute(blocks).astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        return None
    lo, hi = -(1 << (max_bits - 1)), (1 << (max_bits - 1)) - 1
    a = np.abs(x)
    m = np.where(a > 0, a, np.float32(np.inf)).min(axis=1)
    scale = np.zeros(len(x), np.float32)
    codes = np.zeros(x.shape, np.int8)
    todo = np.flatnonzero(np.isfinite(m))  # all-zero blocks: scale 0, codes 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for j in range(1, _GRID_TRIES + 1):
            if not len(todo):
                break
            xs = x[todo]
            k = np.rint(xs / (m[todo] / np.float32(j))[:, None])
            # the step as the largest weight over its code, and its float neighbours
            arg = np.abs(k).argmax(axis=1)
            rows = np.arange(len(todo))
            s1 = (xs[rows, arg] / k[rows, arg]).astype(np.float32)
            left = np.arange(len(todo))  # rows of xs without a step yet
            for toward in (None, 0, np.inf):
                if not len(left):
                    break
                s = _steps(s1[left], info, toward)
                xl = xs[left]
                q = np.rint(xl / s[:, None])
                ok = (q.min(axis=1) >= lo) & (q.max(axis=1) <= hi)
                ok &= _exact(q, s, xl, blocks[todo[left]], info)
                hit = np.flatnonzero(ok)
                scale[todo[left[hit]]] = s[hit]
                codes[todo[left[hit]]] = q[hit].astype(np.int8)
                left = left[~ok]
            todo = todo[left]
        if len(todo) and len(todo) <= _GRID_LEFT:
            # blocks without a small weight: the steps found for nearby blocks (a channel's
            # blocks are neighbours in block order), else for any block
            found = scale > 0
            anywhere = np.unique(scale[found])[:_GRID_NEAR]
            for i in todo:
                near = scale[max(0, i - _GRID_NEAR):i + _GRID_NEAR]
                steps = np.unique(np.concatenate([near[near > 0], anywhere]))
                if not len(steps):
                    continue
                q = np.rint(x[i][None, :] / steps[:, None])
                rows = np.broadcast_to(x[i], q.shape)
                ok = (q.min(axis=1) >= lo) & (q.max(axis=1) <= hi) & _exact(
                    q, steps, rows, np.broadcast_to(blocks[i], q.shape), info)
                if ok.any():
                    c = int(np.flatnonzero(ok)[0])
                    scale[i], codes[i] = steps[c], q[c].astype(np.int8)
                    todo = todo[todo != i]
    if len(todo):
        return None
    return scale, codes


def check_tensor_base(t: dict[str, Any], base_size: int | None = None) -> bool:
    """For a manifest validator: check the ``base.kind`` of tensor-table entry ``t``. Returns
    True for a palette tensor (checked with :func:`check_entry`: it has no scales or zero
    points), False for the regular kind (no ``kind`` field: codes, scale, zero point, left to
    the caller); :class:`FormatError` for an unknown kind."""
    base = t.get("base")
    if not isinstance(base, dict):
        raise FormatError(f"tensor {t.get('name')!r}: base must be an object")
    if "kind" not in base:
        return False
    if base["kind"] != KIND:
        raise FormatError(f"tensor {t.get('name')!r}: unknown base kind {base['kind']!r}")
    check_entry(t, base_size)
    return True
