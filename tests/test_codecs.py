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
