"""Stage files: round trip, and every kind of damage is refused with a clear message."""

import contextlib
import hashlib
import io
import os

import pytest

from p2u_onnx import format as p2u_format
from p2u_onnx.errors import FormatError, IntegrityError
from p2u_onnx.format import StageWriter, read_stage, sha256_bytes, sha256_file


@pytest.fixture
def stage_file(tmp_path):
    w = StageWriter(tmp_path / "stage-1.p2u", "pkg-a", 1)
    raw = {"codec": {"id": "zstd", "level": 3}, "raw_length": 0, "sha256": "0" * 64}
    w.add({"kind": "file", "name": "a", **raw}, b"hello")
    w.add({"kind": "file", "name": "b", **raw}, b"world!" * 100)
    w.finish()
    return tmp_path / "stage-1.p2u"


def test_round_trip_and_external_data_keys(stage_file):
    sf = read_stage(stage_file, package_id="pkg-a", stage=1)
    assert [bytes(sf.data(e)) for e in sf.entries] == [b"hello", b"world!" * 100]
    e = sf.entries[0]
    assert e["location"] == "stage-1.p2u" and e["offset"] % 64 == 0 and e["length"] == 5
    assert read_stage(stage_file.read_bytes()).stage == 1


def test_truncated(stage_file):
    data = stage_file.read_bytes()
    for cut in (3, 20, len(data) - 1):
        with pytest.raises(IntegrityError, match="truncated"):
            read_stage(data[:cut])


def test_bit_flip(stage_file):
    data = bytearray(stage_file.read_bytes())
    data[-10] ^= 0x01
    with pytest.raises(IntegrityError, match="digest"):
        read_stage(bytes(data))


def test_foreign_and_out_of_order(stage_file):
    with pytest.raises(IntegrityError, match="foreign"):
        read_stage(stage_file, package_id="pkg-b")
    with pytest.raises(IntegrityError, match="expected stage 2"):
        read_stage(stage_file, stage=2)


def test_not_a_stage_file(tmp_path):
    p = tmp_path / "x.p2u"
    p.write_bytes(b"PK\x03\x04 definitely a zip" + bytes(100))
    with pytest.raises(FormatError, match="not a p2u stage file"):
        read_stage(p)
    with pytest.raises(FormatError, match="cannot read"):
        read_stage(tmp_path / "missing.p2u")


def test_manifest_digest_mismatch(stage_file):
    with pytest.raises(IntegrityError, match="sha256"):
        read_stage(stage_file, sha256="0" * 64)


def test_unknown_version(stage_file):
    data = bytearray(stage_file.read_bytes())
    data[8] = 99
    with pytest.raises(FormatError, match="version 99"):
        read_stage(bytes(data))


@pytest.mark.parametrize("version", [1, 2])
def test_older_format_fixture_still_decodes(version, tmp_path):
    """A package written by format version 1 or 2 decodes to the same bits at every stage,
    and a live session upgrades through it with its probe (format 2: float32 outputs, the
    skeleton graph coded on its own)."""
    import hashlib
    import json
    from pathlib import Path

    import p2u_onnx
    from p2u_onnx.api import open_stages
    from p2u_onnx.format import load_manifest

    fx = Path(__file__).parent / "fixtures" / f"v{version}"
    assert load_manifest(fx / "mlp.p2u")["format_version"] == version
    expected = json.loads((fx / "expected.json").read_text())["weights_sha256"]
    for k, digest in enumerate(expected):
        open_stages(fx / "mlp.p2u", k).write_weights(tmp_path / "w.bin")
        assert hashlib.sha256((tmp_path / "w.bin").read_bytes()).hexdigest() == digest, k
    assert p2u_onnx.verify(fx / "mlp.p2u")["lossless_match"]
    with p2u_onnx.ProgressiveSession(fx / "mlp.p2u", workdir=tmp_path / "work",
                                     allow_rollback=True) as s:
        assert s._probe is not None and s._probe.step is None  # probe checked on every stage
        assert s.upgrade(background=False) == len(expected) - 1


def test_sha256_in_turns(tmp_path, monkeypatch):
    """Hashing in turns (a live session's stage check) enters ``pace()`` once per chunk, reads
    the file only between turns, and gives hashlib's digest, for files and for bytes."""
    data = os.urandom(10_000)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    turns = []
    in_turn = [False]

    @contextlib.contextmanager
    def pace():
        turns.append(1)
        in_turn[0] = True
        yield
        in_turn[0] = False

    class Watched(io.FileIO):
        def read(self, *args):
            assert not in_turn[0], "a file read inside a turn"
            return super().read(*args)

    monkeypatch.setattr(p2u_format, "open_regular", lambda path: Watched(path, "rb"))
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(p, chunk=4096, pace=pace) == want
    assert len(turns) == 3  # one per chunk
    monkeypatch.undo()
    turns.clear()
    assert sha256_bytes(data, chunk=4096, pace=pace) == want and len(turns) == 3
    assert sha256_bytes(b"") == hashlib.sha256(b"").hexdigest()
    assert sha256_file(p) == want
