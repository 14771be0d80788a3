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
