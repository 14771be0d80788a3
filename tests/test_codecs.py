import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2u_onnx.codecs import IntPlanesCodec, UnknownCodecError, ZstdCodec, get_codec
from p2u_onnx.errors import FormatError


@given(hnp.arrays(np.int64, st.integers(0, 500),
                  elements=st.integers(-(2**62), 2**62)), st.integers(1, 5))
def test_int_planes_round_trip(values, level):
    codec = IntPlanesCodec(level=level)
    np.testing.assert_array_equal(codec.decode(codec.encode(values), len(values)), values)


@given(st.binary(max_size=2000))
def test_zstd_round_trip(data):
    c = ZstdCodec(level=3)
    assert c.decode(c.encode(data), len(data)) == data


@pytest.mark.parametrize("codec", [ZstdCodec(level=7), IntPlanesCodec(level=2)])
def test_config_round_trips_through_json(codec):
    assert get_codec(json.loads(json.dumps(codec.get_config()))) == codec


def test_small_residuals_take_one_plane():
    v = np.random.default_rng(0).integers(-8, 9, 10000)
    enc = IntPlanesCodec().encode(v)
    assert enc[0] == 1 and len(enc) < 10000 * 0.6


def test_unknown_codec_and_corrupt_payload():
    with pytest.raises(UnknownCodecError, match="nope"):
        get_codec({"id": "nope"})
    enc = bytearray(IntPlanesCodec().encode(np.arange(1000)))
    with pytest.raises(FormatError):
        IntPlanesCodec().decode(bytes(enc[:-3]), 1000)
    enc[-5] ^= 0xFF
    with pytest.raises(FormatError):
        IntPlanesCodec().decode(bytes(enc), 1000)


@given(st.data())
def test_grouped_context_must_match_on_decode(data):
    """A payload decoded against another context (a wrong base or earlier stage) is refused
    whenever some group's count differs, and never decodes to other values silently."""
    from p2u_onnx.codecs import IntGroupsCodec

    n = data.draw(st.integers(1, 300))
    context = data.draw(hnp.arrays(np.uint8, n, elements=st.integers(20, 26)))
    values = data.draw(hnp.arrays(np.int32, n, elements=st.integers(-(2**20), 2**20)))
    other = data.draw(hnp.arrays(np.uint8, n, elements=st.integers(20, 26)))
    enc = IntGroupsCodec().encode(values, context)
    if (np.bincount(other, minlength=256) != np.bincount(context, minlength=256)).any():
        with pytest.raises(FormatError, match="does not match its context"):
            IntGroupsCodec().decode(enc, other)
    else:  # same counts: the values come back in the other context's order
        out = IntGroupsCodec().decode(enc, other)
        np.testing.assert_array_equal(np.sort(out), np.sort(values))


def _job(jobs: list):
    import contextlib

    jobs.append(1)
    return contextlib.nullcontext()


@given(st.data())
def test_int_groups_round_trip_mixed_widths(data):
    """Groups of different widths (1..8 bytes) in one payload; the encoding is the one of the
    original codec (grouped with a stable argsort, one IntPlanesCodec stream per group)."""
    import struct

    from p2u_onnx.codecs import IntGroupsCodec

    n = data.draw(st.integers(0, 400))
    top = data.draw(st.sampled_from([0, 5, 90]))  # one group, a few (compared), many (sorted)
    context = data.draw(hnp.arrays(np.uint8, n, elements=st.integers(0, top)))
    mag = data.draw(hnp.arrays(np.int64, n, elements=st.sampled_from(
        [1, 100, 30000, 2**31 - 1, 2**40, 2**62])))
    values = data.draw(hnp.arrays(np.int64, n, elements=st.integers(-(2**62), 2**62))) % mag
    if data.draw(st.booleans()) and (n == 0 or np.abs(values).max() < 2**31):
        values = values.astype(np.int32)
    codec = IntGroupsCodec(level=3)
    enc = codec.encode(values, context)
    np.testing.assert_array_equal(codec.decode(enc, context), values)
    # paced (a live session): the same values, in a job per group and two more
    jobs = []
    np.testing.assert_array_equal(codec.decode(enc, context, lambda: _job(jobs)), values)
    assert len(jobs) == 2 + len(np.unique(context))
    order = np.argsort(context, kind="stable")
    counts = np.bincount(context, minlength=256)
    ref, pos = [], 0
    for g in np.flatnonzero(counts):
        part = IntPlanesCodec(3).encode(values[order][pos:pos + counts[g]])
        ref.append((struct.pack("<BQQ", g, counts[g], len(part)), part))
        pos += counts[g]
    assert enc == struct.pack("<H", len(ref)) + b"".join(h for h, _ in ref) + \
        b"".join(p for _, p in ref)


@given(hnp.arrays(np.int64, st.integers(0, 300), elements=st.integers(-(2**62), 2**62)))
def test_int_planes_decode_is_narrow_and_exact(values):
    for bound, size in ((2**8, 1), (2**16, 2), (2**32, 4), (None, 8)):
        v = values if bound is None else values % bound - bound // 2
        out = IntPlanesCodec().decode(IntPlanesCodec().encode(v), len(v))
        np.testing.assert_array_equal(out, v)
        assert out.dtype.itemsize <= size


@given(st.data())
def test_int_ctx_round_trip_mixed_widths(data):
    """Format 5's context codec: any signed values (1..8-byte zigzag widths, all zeros, empty)
    under any context come back exactly, in the context's order."""
    from p2u_onnx.codecs import IntContextCodec

    n = data.draw(st.integers(0, 400))
    top = data.draw(st.sampled_from([0, 5, 90, 255]))
    context = data.draw(hnp.arrays(np.uint8, n, elements=st.integers(0, top)))
    mag = data.draw(hnp.arrays(np.int64, n, elements=st.sampled_from(
        [1, 2, 100, 30000, 2**31 - 1, 2**40, 2**62])))
    values = data.draw(hnp.arrays(np.int64, n, elements=st.integers(-(2**62), 2**62))) % mag
    if data.draw(st.booleans()) and (n == 0 or np.abs(values).max() < 2**31):
        values = values.astype(np.int32)
    codec = IntContextCodec(level=3)
    enc = codec.encode(values, context)
    out = codec.decode(enc, context)
    np.testing.assert_array_equal(out, values)
    assert out.dtype.kind == "i"
    # paced (a live session): the same values, in a job per merged group and two more
    jobs = []
    np.testing.assert_array_equal(codec.decode(enc, context, lambda: _job(jobs)), out)
    assert len(jobs) == 2 + len(IntContextCodec._records(memoryview(enc), n)[0])
    assert (len(jobs) > 2) == (n > 0)


@given(st.data())
def test_int_ctx_context_must_match_on_decode(data):
    """Decoded against another context, a payload is refused wherever a group's run of
    sorted contexts leaves its range, and otherwise gives the same multiset of values."""
    from p2u_onnx.codecs import IntContextCodec

    n = data.draw(st.integers(1, 300))
    context = data.draw(hnp.arrays(np.uint8, n, elements=st.integers(20, 26)))
    values = data.draw(hnp.arrays(np.int32, n, elements=st.integers(-(2**20), 2**20)))
    other = data.draw(hnp.arrays(np.uint8, n, elements=st.integers(20, 26)))
    codec = IntContextCodec()
    enc = codec.encode(values, context)
    try:
        out = codec.decode(enc, other)
    except FormatError as e:
        assert "does not match its context" in str(e)
    else:
        np.testing.assert_array_equal(np.sort(out), np.sort(values))
    with pytest.raises(FormatError, match="does not cover"):
        codec.decode(enc, np.concatenate([other, other[:1]]))


def test_int_ctx_merges_small_groups_and_stores_noise_raw():
    """Small groups are merged (fewer records than contexts), planes of random bytes are
    stored raw (no frame), and the payload is smaller than format 4's grouped coding."""
    from p2u_onnx.codecs import IntContextCodec, IntGroupsCodec, _read_varint

    rng = np.random.default_rng(0)
    context = rng.integers(20, 34, 6000).astype(np.uint8)
    values = rng.integers(-(2 ** (context.astype(np.int64) - 12)), 2 ** (context.astype(
        np.int64) - 12))
    enc = IntContextCodec().encode(values, context)
    n, _ = _read_varint(memoryview(enc), 0)
    assert n < len(np.unique(context))
    assert len(enc) < len(IntGroupsCodec().encode(values, context))
    big = rng.integers(-(2**30), 2**30, 70000)  # low planes are noise: raw
    enc = IntContextCodec().encode(big, np.zeros(70000, np.uint8))
    assert len(enc) < 4 * 70000 + 64
    np.testing.assert_array_equal(IntContextCodec().decode(enc, np.zeros(70000, np.uint8)), big)


def test_int_ctx_hostile_payloads_are_refused():
    """Every malformed payload is one FormatError / IntegrityError, never a wrong array:
    truncation, an overlong varint, ranges out of order or past 255, counts that overrun,
    a raw plane of the wrong length, trailing bytes, a frame that decodes to more bytes
    than its group holds."""
    import zstandard

    from p2u_onnx.codecs import IntContextCodec, _varint
    from p2u_onnx.errors import IntegrityError

    codec = IntContextCodec()
    ctx = np.array([0] * 50 + [3] * 50, np.uint8)
    good = codec.encode(np.arange(100) * 1000, ctx)
    np.testing.assert_array_equal(codec.decode(good, ctx), np.arange(100) * 1000)

    def rec(lo, span, count, planes):
        return _varint(lo) + _varint(span) + _varint(count) + bytes([len(planes)]) + b"".join(
            _varint(length << 1 | raw) for raw, length in planes)

    raw50 = bytes(range(50))
    bad = {
        "truncated": good[:-1],
        "empty": b"",
        "overlong": b"\xff" * 12,
        "too many groups": _varint(300),
        "out of order": _varint(2) + rec(3, 0, 50, [(1, 50)]) + rec(0, 0, 50, [(1, 50)]) +
        raw50 * 2,
        "past 255": _varint(1) + rec(250, 10, 100, [(1, 100)]) + bytes(100),
        "overrun": _varint(1) + rec(0, 3, 101, [(1, 101)]) + bytes(101),
        "raw length": _varint(1) + rec(0, 3, 100, [(1, 99)]) + bytes(99),
        "trailing": good + b"\0",
        "width 9": _varint(1) + rec(0, 3, 100, [(1, 100)] * 9) + bytes(900),
    }
    for what, payload in bad.items():
        with pytest.raises(FormatError):
            codec.decode(payload, ctx)
    bomb = zstandard.ZstdCompressor().compress(bytes(5000))
    with pytest.raises(IntegrityError, match="more than"):
        codec.decode(_varint(1) + rec(0, 3, 100, [(0, len(bomb))]) + bomb, ctx)
    assert get_codec(json.loads(json.dumps(codec.get_config()))) == codec


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "bfloat16"])
def test_format5_chunk_round_trip_with_special_values(dtype):
    """code_chunk(compact=True) and decode_entry agree bit for bit on every stage's output,
    through NaN payloads, infinities, signed zeros, subnormals and huge values, in every
    float dtype (refine context from |value| / scale: non-finite ratios, zero scales)."""
    from p2u_onnx.dtypes import dtype_info
    from p2u_onnx.reconstruct import base_blocks, code_chunk, decode_entry, refine_context

    info = dtype_info(dtype)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 32)) * 0.1).astype(np.float64)
    x[0, :6] = [np.nan, np.inf, -np.inf, -0.0, 1e-310, 1e30]
    x[1] = 0.0  # a block of zeros: scale 0
    x[2, :3] = [5e-324, -1e-40, 3e-8]
    with np.errstate(over="ignore", invalid="ignore"):
        xs = info.from_compute(x.astype(info.compute))
    if dtype != "bfloat16":
        xs.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[xs.dtype.itemsize])[0, 0] |= 5
    r = code_chunk(xs, info, [4, 8, "lossless"], symmetric=True, clip_search=True,
                   compact=True)
    v = base_blocks(r.base, info)
    ctx, flip = refine_context(info, v, r.base.scale)
    assert ctx.max() <= 63 and (ctx[info.to_compute(v) == 0] == 0).all()
    for shift, kind, data, codec in ((4, "refine", r.payloads[0], r.codecs[0]),
                                     (4, "exact", r.payloads[1], r.codecs[1])):
        v = decode_entry(info, r.base.scale, v, {"kind": kind, "shift": shift,
                                                 "codec": codec.get_config()}, data)
    assert v.tobytes() == xs.tobytes()
    assert [c.codec_id for c in r.codecs] == ["int-ctx", "int-ctx"]
