"""Compressible weights: palette tensors, weights on a uniform grid, pruned weights.

Every twin's package must be smaller than zstd -19 of its model file at every stage, its last
stage bit-exact; a dense model's package must not change at all."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import twins
import zstandard
from onnx import TensorProto, helper, numpy_helper

from p2u_onnx import api, encoder, palette as pl, reconstruct
from p2u_onnx.dtypes import dtype_info
from p2u_onnx.encoder import encode
from p2u_onnx.errors import FormatError
from p2u_onnx.format import load_manifest, read_stage
from p2u_onnx.quantizers import dequantize_base
from p2u_onnx.reconstruct import WeightState
from p2u_onnx.runtime import ProgressiveSession

COMPRESSIBLE = ["clustered", "clustered-own", "fakequant", "pruned"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("twins")
    out = {}
    for kind in COMPRESSIBLE:
        src = d / f"{kind}.onnx"
        src.write_bytes(twins.twin(kind).SerializeToString())
        encode(src, d / f"{kind}.p2u", name=kind, version=1)
        out[kind] = (src, d / f"{kind}.p2u")
    return out


def _feed(n=16, seed=3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 16, 16, 16), np.float32)}


@pytest.mark.parametrize("kind", COMPRESSIBLE)
def test_every_stage_under_zstd19_and_exact(kind, packages):
    src, pkg = packages[kind]
    z19 = len(zstandard.ZstdCompressor(level=19).compress(src.read_bytes()))
    man = load_manifest(pkg)
    cum = [s["cumulative_bytes"] for s in man["stages"]]
    sizes = [(pkg / s["files"][0]["path"]).stat().st_size for s in man["stages"]]
    assert cum == list(np.cumsum(sizes))  # the manifest tells the truth about the files
    assert all(c < z19 for c in cum), (kind, cum, z19)
    # the whole directory as served, manifest and probe included
    assert sum(f.stat().st_size for f in pkg.iterdir()
               if f.name not in ("base.onnx", "base.bin")) < z19
    assert api.verify(pkg)["lossless_match"] is True
    # and the weights of the last stage are the model's, bit for bit
    state = WeightState(man, pkg / "base.bin")
    for k in range(1, len(man["stages"])):
        state.apply(read_stage(pkg / f"stage-{k}.p2u"))
    model = onnx.load(str(src))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for t in man["tensors"]:
        assert state.weight(t["name"]).tobytes() == inits[t["tensor"]].tobytes()


def test_palette_and_grid_bases_are_exact(packages):
    for kind in ("clustered", "clustered-own", "fakequant"):
        src, pkg = packages[kind]
        man = load_manifest(pkg)
        # stage 0 already holds every weight's value (fake-quantized: up to the sign of zero)
        assert man["stages"][0]["max_abs_error"] == 0.0, kind
        base = WeightState(man, pkg / "base.bin")
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
        for t in man["tensors"]:
            np.testing.assert_array_equal(base.weight(t["name"]), inits[t["tensor"]])
        y0 = ort.InferenceSession(str(src)).run(None, _feed())[0]
        yb = ort.InferenceSession(str(pkg / "base.onnx")).run(None, _feed())[0]
        if kind == "fakequant":  # onnxruntime runs the last int8 MatMul its own way
            np.testing.assert_allclose(yb, y0, rtol=0.02, atol=0.02 * np.abs(y0).max())
        else:  # the palette's Gather is folded at load: the original weights, the same run
            np.testing.assert_array_equal(y0, yb)
        assert any("exact in the base" in n for n in man.get("notes", ())), kind
    man = load_manifest(packages["clustered"][1])
    assert all(pl.is_palette(t) for t in man["tensors"])
    for t in man["tensors"]:
        pl.check_entry(t, (packages["clustered"][1] / "base.bin").stat().st_size)
    # later stages carry nothing for palette tensors
    for k in (1, 2):
        sf = read_stage(packages["clustered"][1] / f"stage-{k}.p2u")
        assert [e["kind"] for e in sf.entries] == (["file"] if k == 1 else [])
    fq = load_manifest(packages["fakequant"][1])
    # an exact base above the cap says so
    assert any("above the 20% cap" in n for n in fq["notes"]), fq["notes"]
    assert not any(pl.is_palette(t) for t in fq["tensors"])
    assert {t["bits"] for t in fq["tensors"]} == {8}


def test_pruned_refine_is_grouped_by_zeros(packages):
    """Format 5 (int-ctx): context 0 is "the current value is zero"; in a pruned tensor the
    zeros stay zero, so their group is all 0 codes and costs no byte at all (width 0)."""
    from p2u_onnx.codecs import _read_varint

    sf = read_stage(packages["pruned"][1] / "stage-1.p2u")
    refine = [e for e in sf.entries if e["kind"] == "refine"]
    assert {e["codec"]["id"] for e in refine} == {"int-ctx"}
    for e in refine:
        buf = memoryview(bytes(sf.data(e)))
        n, pos = _read_varint(buf, 0)
        records = []
        for _ in range(n):
            lo, pos = _read_varint(buf, pos)
            span, pos = _read_varint(buf, pos)
            count, pos = _read_varint(buf, pos)
            width = buf[pos]
            pos += 1
            for _ in range(width):
                _, pos = _read_varint(buf, pos)
            records.append((lo, span, count, width))
        lo, span, count, width = records[0]
        assert (lo, span, width) == (0, 0, 0), (e["name"], records)  # zeros: no planes
        assert count > 0.5 * sum(r[2] for r in records)  # the twin is mostly zeros


def test_pruned_base_codes_coded_with_matches(packages):
    """Mostly-zero base codes go to base.bin's zstd stream with matches (level 19)."""
    pkg = packages["pruned"][1]
    man = load_manifest(pkg)
    (entry,) = [e for e in read_stage(pkg / "stage-0.p2u").entries if e["name"] == "base.bin"]
    kinds = {off: kind for off, _, kind in entry["codec"]["segments"]}
    assert entry["codec"]["level"] == encoder.SPARSE_LEVEL
    assert {kinds[t["base"]["codes"][0]] for t in man["tensors"]} == {"bytes"}


def _stage_digests(pkg: Path) -> list[str]:
    man = load_manifest(pkg)
    return [s["files"][0]["sha256"] for s in man["stages"]] + [
        hashlib.sha256((pkg / "base.bin").read_bytes()).hexdigest()]


def test_dense_package_unchanged(tmp_path, monkeypatch):
    """The new codings only kick in where they win: a dense model's package is the same
    bytes as with them switched off."""
    m = twins.twin("dense")
    encode(m, tmp_path / "on", name="d", version=1)
    man = load_manifest(tmp_path / "on")
    assert not any(pl.is_palette(t) for t in man["tensors"])
    assert not any("exact in the base" in n for n in man.get("notes", ()))
    monkeypatch.setattr(pl, "find", lambda w: None)
    monkeypatch.setattr(pl, "find_grid", lambda blocks, info, max_bits=8: None)
    monkeypatch.setattr(reconstruct, "SPARSE_SHARE", 2.0)
    monkeypatch.setattr(encoder, "SPARSE_CODES", 2.0)
    encode(m, tmp_path / "off", name="d", version=1)
    assert _stage_digests(tmp_path / "on") == _stage_digests(tmp_path / "off")


@pytest.mark.parametrize("strategy", ["swap", "inplace"])
def test_live_upgrade_of_palette_model(strategy, packages):
    src, pkg = packages["clustered"]
    feed = _feed()
    ref = ort.InferenceSession(str(src)).run(None, feed)[0]
    seen = []
    with ProgressiveSession(pkg, strategy=strategy, on_stage=seen.append) as s:
        np.testing.assert_array_equal(s.run(None, feed)[0], ref)
        s.upgrade(background=False)
        assert s.stage == 2
        so = ort.SessionOptions()
        if strategy == "inplace":  # what the runtime's inplace sessions run with
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.add_session_config_entry("session.disable_prepacking", "1")
        final = ort.InferenceSession(str(src), so).run(None, feed)[0]
        np.testing.assert_array_equal(s.run(None, feed)[0], final)
    assert seen[-1] == 2


def _special_model(dtype=np.float32, onnx_type=TensorProto.FLOAT) -> tuple[onnx.ModelProto,
                                                                          np.ndarray]:
    rng = np.random.default_rng(5)
    values = np.array([0.0, -0.0, 1.5, -2.25, 0.125, 3e-3], np.float32).astype(dtype)
    w = values[rng.integers(0, len(values), (64, 48))]
    if dtype == np.float32:
        nan = np.array([0x7FC01234], np.uint32).view(np.float32)[0]
        w.reshape(-1)[7] = nan  # a NaN with a payload
    t = numpy_helper.from_array(w, "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx_type, ["N", 64])],
                          [helper.make_tensor_value_info("y", onnx_type, ["N", 48])], [t])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, w


@pytest.mark.parametrize("dtype,onnx_type", [(np.float32, TensorProto.FLOAT),
                                             (np.float16, TensorProto.FLOAT16)])
def test_palette_keeps_every_bit(dtype, onnx_type, tmp_path):
    m, w = _special_model(dtype, onnx_type)
    encode(m, tmp_path / "p", name="s", version=1, probe=False)
    man = load_manifest(tmp_path / "p")
    (t,) = man["tensors"]
    assert pl.is_palette(t) and t["base"]["size"] == len(np.unique(w.view(np.uint16 if
                                                         dtype == np.float16 else np.uint32)))
    # the base graph gives the bits themselves (-0.0 and the NaN payload included)
    base = onnx.load(str(tmp_path / "p" / "base.onnx"))
    assert {n.op_type for n in base.graph.node} >= {"Cast", "Gather"}
    state = WeightState(man, tmp_path / "p" / "base.bin")
    assert state.weight("W").tobytes() == w.tobytes()
    assert api.verify(tmp_path / "p")["lossless_match"] is True
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(dtype)
    sess = ort.InferenceSession(str(tmp_path / "p" / "base.onnx"))
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ref)


def _palette_entry() -> dict:
    return {"name": "W", "dtype": "float32", "shape": [4, 8],
            "layout": {"mode": "channel", "axis": 0, "block_size": 0},
            "base": {"kind": "palette", "codes": [0, 32], "palette": [64, 12],
                     "code_type": 2, "size": 3}}


@pytest.mark.parametrize("field,value,message", [
    ("size", 0, "palette size"), ("size", 257, "palette size"), ("size", True, "palette size"),
    ("code_type", 3, "uint8"), ("codes", [0, 31], "holds 31 bytes"),
    ("codes", [0, -1], "non-negative"), ("palette", [64, 16], "holds 16 bytes"),
    ("palette", "x", "[offset, length]"), ("extra", 1, "unknown palette field"),
    ("codes", [100, 32], "beyond the end")])
def test_check_entry_refuses(field, value, message):
    t = _palette_entry()
    t["base"][field] = value
    with pytest.raises(FormatError, match=message.replace("[", r"\[")):
        pl.check_entry(t, 128)


def test_check_entry_layout_and_indices():
    t = _palette_entry()
    pl.check_entry(t, 128)
    bad = copy.deepcopy(t)
    bad["layout"] = {"mode": "block", "axis": 1, "block_size": 32}
    with pytest.raises(FormatError, match="layout"):
        pl.check_entry(bad, 128)
    base_bin = np.zeros(128, np.uint8)
    base_bin[64:76] = np.array([1, 2, 3], np.float32).view(np.uint8)
    base_bin[:32] = np.arange(32) % 3
    np.testing.assert_array_equal(pl.decode(t, base_bin), np.arange(32) % 3 + 1)
    base_bin[5] = 3  # beyond the palette
    with pytest.raises(FormatError, match="palette index 3"):
        pl.decode(t, base_bin)


def test_stage_entry_for_palette_tensor_refused(packages):
    """A stage that claims to update a palette tensor is refused before anything changes."""
    pkg = packages["pruned"][1]
    man = load_manifest(pkg)
    victim = man["tensors"][0]["name"]
    forged = copy.deepcopy(man)
    forged["tensors"][0]["base"] = {"kind": "palette", "codes": [0, 1], "palette": [0, 4],
                                    "code_type": 2, "size": 1}
    state = WeightState(forged, pkg / "base.bin")
    with pytest.raises(FormatError, match=f"updates {victim}.*palette"):
        state.apply(read_stage(pkg / "stage-1.p2u"))
    assert state.stage == 0


def test_find_grid():
    info = dtype_info("float32")
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((300, 32)).astype(np.float32)
    assert pl.find_grid(dense, info) is None
    s = (np.abs(dense).max(axis=1) / 7).astype(np.float32)  # a 4-bit grid per block
    k = np.clip(np.rint(dense / s[:, None]), -7, 7).astype(np.float32)
    w = (k * s[:, None]).astype(np.float32)
    g = pl.find_grid(w, info)
    assert g is not None and g.bits == 4
    assert dequantize_base(g).tobytes() == (w + 0.0).tobytes()  # -0.0 aside
    w[3, 5] = np.nextafter(w[3, 5], np.float32(1))  # one weight off its grid
    assert pl.find_grid(w, info) is None
    one = (rng.integers(-100, 100, (50, 32)) * np.float32(0.0123)).astype(np.float32)
    g = pl.find_grid(one, info)  # one step for the whole tensor
    assert g is not None and g.bits == 8
    assert dequantize_base(g).tobytes() == (one + 0.0).tobytes()


def test_palette_find():
    w = np.array([[1.0, -0.0], [0.0, 1.0]], np.float32)
    values, idx = pl.find(w)
    assert len(values) == 3 and values[idx].tobytes() == w.reshape(-1).tobytes()
    assert pl.find(np.arange(300, dtype=np.float32)) is None
    assert pl.find(np.zeros(0, np.float32)) is None


def test_bfloat16_palette(tmp_path):
    rng = np.random.default_rng(0)
    patterns = np.array([0x3F80, 0xBF80, 0x0000, 0x8000, 0x3E00, 0x7FC1], np.uint16)  # NaN too
    bits = patterns[rng.integers(0, len(patterns), (64, 96))]
    t = helper.make_tensor("Wb", TensorProto.BFLOAT16, [64, 96], bits.tobytes(), raw=True)
    nodes = [helper.make_node("Cast", ["Wb"], ["W"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 96])],
                          [t])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    encode(m, tmp_path / "p", name="b", version=1, probe=False)
    (entry,) = load_manifest(tmp_path / "p")["tensors"]
    assert entry["dtype"] == "bfloat16" and pl.is_palette(entry)
    assert api.verify(tmp_path / "p")["lossless_match"] is True
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "p" / "base.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)


def test_check_tensor_base():
    t = _palette_entry()
    assert pl.check_tensor_base(t, 128) is True
    assert pl.check_tensor_base({"name": "R", "base": {"codes": [0, 1]}}) is False
    with pytest.raises(FormatError, match="unknown base kind 'lut'"):
        pl.check_tensor_base({"name": "R", "base": {"kind": "lut"}})
    with pytest.raises(FormatError, match="base must be an object"):
        pl.check_tensor_base({"name": "R", "base": [1]})


def test_palette_in_function_body(tmp_path):
    """A palette weight held by a Constant node inside a model-local function."""
    rng = np.random.default_rng(2)
    fw = np.array([-0.5, -0.25, 0.0, 0.25, 0.5], np.float32)[rng.integers(0, 5, (64, 64))]
    fn = helper.make_function(
        "custom.fn", "Proj", ["inp"], ["outp"],
        [helper.make_node("Constant", [], ["fw"], value=numpy_helper.from_array(fw, "fw")),
         helper.make_node("MatMul", ["inp", "fw"], ["outp"])],
        opset_imports=[helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("Proj", ["x"], ["y"], domain="custom.fn")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("custom.fn", 1)],
                          functions=[fn])
    m.ir_version = 8
    encode(m, tmp_path / "p", name="f", version=1, probe=False)
    (entry,) = load_manifest(tmp_path / "p")["tensors"]
    assert pl.is_palette(entry)
    assert api.verify(tmp_path / "p")["lossless_match"] is True
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "p" / "base.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)


def test_find_grid_float16():
    """float16 weights fake-quantized in their own type (float16 steps) are found; the codes
    give the stored values back bit for bit. (bfloat16 rounds most products ``k * step``: only
    grids that survive that are found.)"""
    from p2u_onnx.reconstruct import base_blocks
    rng = np.random.default_rng(4)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    for name in ("float16",):
        info = dtype_info(name)
        s = info.scale_to_storage(np.abs(w).max(axis=1) / 127).astype(np.float32)
        k = np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.float32)
        stored = info.from_compute(k * s[:, None])
        g = pl.find_grid(stored, info)
        assert g is not None and g.bits == 8, name
        got = base_blocks(g, info)
        assert np.array_equal(got.view(np.uint16)[k != 0], stored.view(np.uint16)[k != 0])
        assert pl.find_grid(info.from_compute(w), info) is None, name
