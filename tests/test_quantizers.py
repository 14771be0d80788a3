"""Quantizers and dtype helpers: property tests over random shapes, dtypes and values."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2u_onnx import quantizers as qz
from p2u_onnx.dtypes import FLOAT_TYPES, dtype_info
from p2u_onnx.reconstruct import (base_blocks, code_chunk, lossless_blocks, pack_codes,
                                  refine_blocks, unpack_codes)


def weight_from_base(layout, base, info):
    return layout.from_blocks(base_blocks(base, info))

shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9)


@st.composite
def layouts(draw):
    shape = draw(shapes)
    mode = draw(st.sampled_from(["tensor", "channel", "block"]))
    axis = draw(st.integers(0, len(shape) - 1))
    bs = draw(st.sampled_from([1, 2, 3, 8, 32]))
    return qz.Layout(shape, mode, axis, bs)


@given(layouts(), st.data())
def test_layout_round_trip(layout, data):
    x = np.arange(layout.size, dtype=np.float32).reshape(layout.shape)
    b = layout.to_blocks(x)
    assert b.shape == (layout.n_blocks, layout.block_len)
    np.testing.assert_array_equal(layout.from_blocks(b), x)
    s = np.arange(layout.n_blocks, dtype=np.float32)
    np.testing.assert_array_equal(layout.scales_to_blocks(layout.blocks_to_scales(s)), s)
    assert layout.blocks_to_scales(s).shape == layout.scale_shape


@given(layouts(), st.data())
def test_blocks_of_is_a_slice_of_to_blocks(layout, data):
    """blocks_of(x, b0, b1) == to_blocks(x)[b0:b1] for any run of blocks (what an update's
    decoder reads from the predecessor, run by run)."""
    x = np.arange(layout.size, dtype=np.float32).reshape(layout.shape) + 1
    b0 = data.draw(st.integers(0, layout.n_blocks - 1))
    b1 = data.draw(st.integers(b0 + 1, layout.n_blocks))
    np.testing.assert_array_equal(layout.blocks_of(x, b0, b1), layout.to_blocks(x)[b0:b1])


def test_block_layout_matches_dequantize_linear_semantics():
    # DequantizeLinear blocked: scale[i, j // bs] applies to x[i, j] along axis 1.
    lay = qz.Layout((2, 5), "block", 1, 2)
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    b = lay.to_blocks(x)
    np.testing.assert_array_equal(b[0], [0, 1]); np.testing.assert_array_equal(b[2], [4, 0])
    np.testing.assert_array_equal(lay.blocks_to_scales(np.arange(6)), [[0, 1, 2], [3, 4, 5]])


floats32 = hnp.arrays(np.float32, shapes, elements=st.floats(width=32, allow_nan=True,
                                                            allow_infinity=True))


def _bits_view(x):
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


@given(hnp.arrays(np.uint32, st.integers(1, 200)))
def test_ordered_mapping_is_bijective_and_monotonic(bits):
    x = bits.view(np.float32)
    k = qz.float_to_ordered(x)
    np.testing.assert_array_equal(_bits_view(qz.ordered_to_float(k, np.float32)), bits)
    fin = ~np.isnan(x)
    order = np.argsort(k[fin], kind="stable")
    # sorted by their ordered images, the floats never decrease (-0.0 just before +0.0)
    assert np.all(np.diff(x[fin][order].astype(np.float64)) >= 0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_chain_bounds_and_lossless(dtype, data):
    """Base, refinements and lossless stage on random (often awkward) values of every dtype."""
    info = dtype_info(dtype)
    layout = data.draw(layouts())
    raw = data.draw(hnp.arrays(np.dtype(f"u{info.storage.itemsize}"), layout.shape))
    w = raw.view(info.storage) if dtype != "bfloat16" else raw
    if data.draw(st.booleans()):  # mostly ordinary weights, sometimes raw bit patterns
        wc = np.random.default_rng(0).standard_normal(layout.shape) * 0.1
        wc.reshape(-1)[: data.draw(st.integers(0, 3))] = data.draw(
            st.sampled_from([np.nan, np.inf, -np.inf, -0.0, 1e-40, 3e4]))
        w = info.from_compute(wc.astype(info.compute))
    bits0 = data.draw(st.integers(2, 8))
    shifts = [data.draw(st.integers(1, 6))]
    blocks = layout.to_blocks(info.to_compute(w))
    base = qz.quantize_base(blocks, bits0, info, symmetric=data.draw(st.booleans()),
                            clip_search=data.draw(st.booleans()))
    prev_b = base_blocks(base, info)
    with np.errstate(invalid="ignore"):  # raw bit patterns: NaNs of every kind
        wc = info.to_compute(w).astype(np.float64)
    finite = np.isfinite(wc)
    # the base is finite wherever the weight is finite
    assert np.all(np.isfinite(info.to_compute(layout.from_blocks(prev_b)))[finite])
    for shift in shifts:
        step = qz.stage_scale(base.scale, shift)
        codes = qz.refine_codes(blocks, info.to_compute(prev_b), step)
        prev_b = refine_blocks(info, prev_b, codes, step)
        prev = layout.from_blocks(prev_b)
        p = info.to_compute(prev).astype(np.float64)
        bound = layout.from_blocks(np.repeat(step[:, None].astype(np.float64) / 2,
                                             layout.block_len, axis=1))
        ulp = np.spacing(np.maximum(np.abs(wc), np.abs(p)).astype(info.compute if dtype != "bfloat16" else np.float32))
        if dtype in ("float16", "bfloat16"):
            ulp = np.abs(wc) * 2.0 ** -(11 if dtype == "float16" else 8) + 2.0 ** -24
        err = np.abs(wc - p)
        # float64 weights are quantized through float32: beyond its range only the lossless
        # stage is exact
        outside = (np.abs(wc) > 1e30) | ((dtype == "float64") & (np.abs(wc) < 2.0**-120))
        ok = (err <= bound + 2 * np.abs(ulp)) | ~finite | outside
        assert ok.all(), (err[~ok], bound[~ok])
    xs = layout.to_blocks(w)
    codes = qz.lossless_codes(np.ascontiguousarray(xs).reshape(-1), prev_b.reshape(-1))
    exact = layout.from_blocks(lossless_blocks(prev_b, codes))
    np.testing.assert_array_equal(_bits_view(exact), _bits_view(np.ascontiguousarray(w)))
    # the chunk coder (what the encoder runs) ends on the same bits
    cc = code_chunk(xs, info, [bits0, bits0 + shifts[0], "lossless"], symmetric=True,
                    clip_search=True)
    np.testing.assert_array_equal(_bits_view(cc.final), _bits_view(np.ascontiguousarray(xs)))


@pytest.mark.parametrize("ctype", [3, 2, 22, 21, 26, 25])
@given(n=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_pack_unpack_codes(ctype, n, seed):
    bits = {3: 8, 2: 8, 22: 4, 21: 4, 26: 2, 25: 2}[ctype]
    signed = ctype in (3, 22, 26)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    v = np.random.default_rng(seed).integers(lo, hi + 1, n)
    np.testing.assert_array_equal(unpack_codes(pack_codes(v, ctype), ctype, n), v)


def test_zero_blocks_exact_and_constant_blocks_bounded_at_the_base():
    info = FLOAT_TYPES["float32"]
    lay = qz.Layout((4, 64), "block", 1, 32)
    w = np.zeros((4, 64), np.float32)
    w[1] = 0.125
    base = qz.quantize_base(lay.to_blocks(w), 4, info)
    got = weight_from_base(lay, base, info)
    np.testing.assert_array_equal(got[[0, 2, 3]], 0)
    assert np.max(np.abs(got[1] - 0.125)) <= base.scale[2] / 2


def test_one_huge_outlier_does_not_break_the_chain():
    info = FLOAT_TYPES["float32"]
    lay = qz.Layout((1, 4096), "block", 1, 32)
    w = (np.random.default_rng(0).standard_normal((1, 4096)) * 0.02).astype(np.float32)
    w[0, 5] = 1e4
    b = qz.quantize_base(lay.to_blocks(w), 4, info)
    prev = weight_from_base(lay, b, info)
    # only the outlier's block is coarse; every other block keeps its own fine scale
    others = np.ones(4096, bool)
    others[:32] = False
    assert np.max(np.abs(prev - w)[0, others]) < 0.02


# ---- the fast paths compute exactly what their definitions say

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _special_bits(draw, itemsize, n):
    """Bit patterns biased toward zeros, subnormals, infinities, NaNs and huge values."""
    top = {2: 0x7C00, 4: 0x7F800000, 8: 0x7FF0000000000000}[itemsize]
    picks = st.one_of(st.integers(0, (1 << (8 * itemsize)) - 1),
                      st.sampled_from([0, 1, 3, top - 1, top, top + 1,
                                       top | 1 << (8 * itemsize - 1), 1 << (8 * itemsize - 1)]))
    return np.array(draw(st.lists(picks, min_size=n, max_size=n)), _UINT[itemsize])


def _reference_lossless_codes(original, previous):
    d = qz.float_to_ordered(original) - qz.float_to_ordered(previous)
    if d.size and original.dtype.itemsize <= 4 and -(2**31) <= d.min() and d.max() < 2**31:
        return d.astype(np.int32)
    return d


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(data=st.data())
def test_exponent_context_matches_frexp(dtype, data):
    size = np.dtype(dtype).itemsize
    n, length = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 9))
    prev = _special_bits(data.draw, size, n * length).view(dtype).reshape(n, length)
    step = _special_bits(data.draw, size, n).view(dtype)
    with np.errstate(all="ignore"):
        step = np.abs(step)
        fast, ref = qz.exponent_context(prev, step), qz._exponent_context_frexp(prev, step)
    np.testing.assert_array_equal(fast, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16, np.float64])
@given(data=st.data())
def test_lossless_codes_match_int64_definition(dtype, data):
    size = np.dtype(dtype).itemsize
    n = data.draw(st.integers(0, 40))
    a = _special_bits(data.draw, size, n).view(dtype)
    b = _special_bits(data.draw, size, n).view(dtype)
    d = qz.lossless_codes(a, b)
    ref = _reference_lossless_codes(a, b)
    np.testing.assert_array_equal(d, ref)
    assert d.dtype.itemsize >= 4 and (d.dtype == ref.dtype or not d.size or size == 2)
    # applying either (wide or narrow) codes restores every bit
    np.testing.assert_array_equal(_bits_view(qz.apply_lossless(b, d)), _bits_view(a))
    np.testing.assert_array_equal(_bits_view(qz.apply_lossless(b, ref.astype(np.int64))),
                                  _bits_view(a))


@given(hnp.arrays(np.uint32, st.integers(0, 50)), st.integers(-130, 130))
def test_stage_scale_is_ldexp(bits, shift):
    s = bits.view(np.float32)
    with np.errstate(all="ignore"):
        ref = np.ldexp(s, -shift).astype(np.float32)
        got = qz.stage_scale(s, shift)
    np.testing.assert_array_equal(_bits_view(got), _bits_view(ref))
