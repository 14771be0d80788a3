"""Attacks on update packages: hostile predecessor bindings and tensor tables, stage files
that touch what the update keeps unchanged, a manifest altered after its stage files were
written, a skeleton that points outside its weights, a predecessor of the wrong shape. Every
package is real (encoded, then altered and resealed so that the sha256 the manifest lists
match) and every refusal is one line, asserted by type and message; nothing is written."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from p2u_onnx.errors import FormatError, IntegrityError, P2UError
from p2u_onnx.format import ALIGN, StageWriter, read_stage, validate_manifest
from p2u_onnx.reconstruct import WeightState
from p2u_onnx.updates import apply_update, encode_update, held_state, restore_update
from synth import mlp


def _moved(m: onnx.ModelProto, only=None) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if only is None or t.name in only:
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(
                (a + rng.standard_normal(a.shape).astype(a.dtype) * 0.01).astype(a.dtype),
                t.name))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("upd")
    v1 = mlp()
    v2 = _moved(v1, only=("W2",))  # W1 unchanged, W2 changed
    onnx.save(v1, str(d / "v1.onnx"))
    onnx.save(v2, str(d / "v2.onnx"))
    encode_update(d / "v2.onnx", d / "u.p2u", d / "v1.onnx", plan="2,6,lossless")
    return {"dir": d, "v1": d / "v1.onnx", "u": d / "u.p2u"}


@pytest.fixture
def upd(built, tmp_path) -> Path:
    p = tmp_path / "u.p2u"
    shutil.copytree(built["u"], p)
    return p


def manifest(p: Path) -> dict:
    return json.loads((p / "manifest.json").read_text())


def reseal(p: Path, m: dict) -> None:
    for s in m["stages"]:
        for f in s["files"]:
            data = (p / f["path"]).read_bytes()
            f["size"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (p / "manifest.json").write_text(json.dumps(m, indent=1))


def refused(fn, err=P2UError, match: str | None = None) -> str:
    with pytest.raises(err) as info:
        fn()
    text = str(info.value)
    assert text and "\n" not in text, repr(text)
    if match:
        assert match in text, text
    return text


def restore_refused(p: Path, v1: Path, err=P2UError, match: str | None = None) -> None:
    out = p.parent / "out.onnx"
    refused(lambda: restore_update(p, out, v1), err, match)
    assert not out.exists()


HOSTILE_PREDECESSORS = {
    "unknown key": ({"weights_sha256": "a" * 64, "evil": 1}, "is not a known key"),
    "not hex": ({"weights_sha256": "xyz"}, "not a sha256"),
    "stage with digest": ({"weights_sha256": "a" * 64, "stage": 1}, "exact predecessor has no"),
    "neither form": ({"name": "m"}, "names neither weights_sha256"),
    "stage only": ({"stage": 1}, "names neither"),
    "bad package id": ({"package_id": "../x", "stage": 0}, "not a package id"),
    "stage negative": ({"package_id": "abc", "stage": -1}, "outside 0.."),
    "stage bool": ({"package_id": "abc", "stage": True}, "not an integer"),
    "not an object": (["a" * 64], "not an object"),
    "name control": ({"weights_sha256": "a" * 64, "name": "a\x1b[2J"}, "control characters"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PREDECESSORS))
def test_hostile_predecessor_refused(upd, built, case):
    value, match = HOSTILE_PREDECESSORS[case]
    m = manifest(upd)
    m["predecessor"] = value
    reseal(upd, m)
    restore_refused(upd, built["v1"], FormatError, match)


def test_missing_predecessor_refused(upd, built):
    m = manifest(upd)
    del m["predecessor"]
    reseal(upd, m)
    restore_refused(upd, built["v1"], FormatError, "predecessor is missing")


HOSTILE_TABLES = {
    "unknown kind": (lambda t: t.__setitem__("update", "patch"), "not one of same, delta, new"),
    "kind missing": (lambda t: t.pop("update"), "update is missing"),
    "same with codes": (lambda t: t.__setitem__("update", "same"),
                        "given for an unchanged tensor"),
    "codes past base.bin": (lambda t: t["base"].__setitem__("codes", [1 << 30, 8]),
                            "past the end of base.bin"),
    "palette in update": (lambda t: t["base"].__setitem__("kind", "palette"),
                          "no palettes"),
    "bits zero": (lambda t: t.__setitem__("bits", 0), "outside 1..16"),
    "weights overlap": (lambda t: t.__setitem__("weights", [0, t["weights"][1]]), "overlaps"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TABLES))
def test_hostile_tensor_table_refused(upd, built, case):
    change, match = HOSTILE_TABLES[case]
    m = manifest(upd)
    original = copy.deepcopy(m)
    delta = next(t for t in m["tensors"] if t["update"] == "delta")
    change(delta)
    reseal(upd, m)
    restore_refused(upd, built["v1"], FormatError, match)


def test_graph_file_must_be_listed(upd, built):
    m = manifest(upd)
    m["base_model"]["files"] = [f for f in m["base_model"]["files"] if f["path"] != "graph.onnx"]
    reseal(upd, m)
    restore_refused(upd, built["v1"], FormatError, "does not list graph.onnx")


def test_base_bin_larger_than_its_codes_refused(upd, built):
    """An update's base.bin holds its tensors' codes only: a manifest listing it larger than
    they need (each span aligned) is refused before anything is decoded, whatever its digest;
    the size as written passes."""
    m = manifest(upd)
    f = next(f for f in m["base_model"]["files"] if f["path"] == "base.bin")
    spans = [s for t in m["tensors"] for k, s in t.get("base", {}).items()
             if k in ("codes", "scale", "zero_point")]
    room = sum(n for _, n in spans) + ALIGN * len(spans)
    assert spans and f["size"] <= room  # what the encoder wrote
    validate_manifest(m)
    f["size"] = room + 1
    text = refused(lambda: validate_manifest(m), FormatError,
                   f"lists base.bin of {room + 1} bytes, more than the {room}")
    assert "base_model.files" in text
    f["size"] = 1 << 40  # a small stage declaring a huge file
    reseal(upd, m)
    restore_refused(upd, built["v1"], FormatError, "more than the")


def test_altered_manifest_refused_by_binding(upd, built):
    """An unchanged tensor turned into a delta, one bit count of the plan (every file's sha256
    resealed): refused, the stage headers name the manifest they were written for."""
    m = manifest(upd)
    original = copy.deepcopy(m)
    delta = next(t for t in m["tensors"] if t["update"] == "delta")
    same = next(t for t in m["tensors"] if t["update"] == "same")
    same["update"] = "delta"  # would read the other tensor's codes
    same["bits"] = 2
    same["base"] = copy.deepcopy(delta["base"])
    reseal(upd, m)
    restore_refused(upd, built["v1"], FormatError, "tensor's shape, layout and code type")
    m = original
    m["plan"][1] = "5"
    reseal(upd, m)
    restore_refused(upd, built["v1"], IntegrityError, "written for another manifest")


def _rewrite_stage(p: Path, k: int, edit) -> None:
    """Rewrite stage file ``k`` with its entries edited (``edit(entries, data)``), resealed and
    bound to the (unchanged) manifest."""
    m = manifest(p)
    sf = read_stage(p / f"stage-{k}.p2u")
    entries = [(dict(e), bytes(sf.data(e))) for e in sf.entries]
    entries = edit(entries)
    extra = {"manifest_binding": sf.header["manifest_binding"]}
    w = StageWriter(p / f"stage-{k}.p2u", sf.package_id, k, version=3, **extra)
    for e, data in entries:
        for key in ("offset", "length", "location"):
            e.pop(key, None)
        w.add(e, data)
    w.finish()
    reseal(p, m)


def test_stage_entry_for_unchanged_tensor_refused(upd, built):
    def edit(entries):
        e, data = entries[0]
        fake = dict(e, name="W1")  # W1 is kept unchanged by this update
        return [(fake, data)] + entries
    _rewrite_stage(upd, 1, edit)
    restore_refused(upd, built["v1"], FormatError, "keeps unchanged from its predecessor")


def test_stage_one_may_not_carry_a_graph(upd, built):
    sf0 = read_stage(upd / "stage-0.p2u")
    graph = next((dict(e), bytes(sf0.data(e))) for e in sf0.entries if e["name"] == "graph.onnx")
    _rewrite_stage(upd, 1, lambda entries: entries + [graph])
    restore_refused(upd, built["v1"], FormatError, "carries files ['graph.onnx']")


def test_skeleton_pointing_outside_refused(upd, built, tmp_path):
    """A skeleton (resealed, its digest in the manifest updated) whose tensor points past the
    weights file: refused before onnx loads it."""
    from p2u_onnx.codecs import ZstdCodec
    from p2u_onnx.format import manifest_binding

    m = manifest(upd)
    sf0 = read_stage(upd / "stage-0.p2u")
    gentry = next(e for e in sf0.entries if e["name"] == "graph.onnx")
    g = onnx.load_model_from_string(ZstdCodec().decode(sf0.data(gentry), gentry["raw_length"]))
    for t in g.graph.initializer:
        for kv in t.external_data:
            if kv.key == "offset":
                kv.value = str(1 << 30)
    graph = g.SerializeToString()
    gf = next(f for f in m["base_model"]["files"] if f["path"] == "graph.onnx")
    gf["size"], gf["sha256"] = len(graph), hashlib.sha256(graph).hexdigest()
    binding = manifest_binding(m)
    for k in range(len(m["stages"])):
        def edit(entries, k=k):
            if k == 0:
                z = ZstdCodec(level=3)
                entries = [(dict(e, raw_length=len(graph), sha256=gf["sha256"],
                                 codec=z.get_config()), z.encode(graph))
                           if e["name"] == "graph.onnx" else (e, d) for e, d in entries]
            return entries
        sf = read_stage(upd / f"stage-{k}.p2u")
        entries = edit([(dict(e), bytes(sf.data(e))) for e in sf.entries])
        w = StageWriter(upd / f"stage-{k}.p2u", sf.package_id, k, version=3,
                        manifest_binding=binding)
        for e, data in entries:
            for key in ("offset", "length", "location"):
                e.pop(key, None)
            w.add(e, data)
        w.finish()
    reseal(upd, m)
    restore_refused(upd, built["v1"], FormatError, "graph.onnx")


def test_predecessor_of_the_wrong_shape_refused(built):
    """A device whose tensor has the right name but another shape or dtype (an update made
    against another model that was relabelled): refused before anything is decoded."""
    m = manifest(built["u"])
    sf0 = read_stage(built["u"] / "stage-0.p2u")
    from p2u_onnx.reconstruct import extract_file

    base = extract_file(sf0, "base.bin")
    t = next(t for t in m["tensors"] if t["update"] == "same")
    for bad in (np.zeros((3, 3), np.float32), np.zeros(t["shape"], np.float16)):
        st = WeightState(m, base, predecessor=lambda t, bad=bad: bad)
        refused(lambda st=st: st.weight(t["name"]), IntegrityError, "the update expects")
    st = WeightState(m, base, predecessor=lambda t: {}[t["name"]])
    refused(lambda: st.weight(t["name"]), IntegrityError, "holds no tensor")
    st = WeightState(m, base)
    refused(lambda: st.weight(t["name"]), FormatError, "no predecessor was given")


def test_update_refused_by_old_format_in_stage_header(upd, built):
    """A stage file of format 2 inside an update (format 3): mixed packages are refused."""
    sf = read_stage(upd / "stage-1.p2u")
    w = StageWriter(upd / "stage-1.p2u", sf.package_id, 1, version=2,
                    manifest_binding=sf.header["manifest_binding"])
    for e in sf.entries:
        e2 = {k: v for k, v in e.items() if k not in ("offset", "length", "location")}
        w.add(e2, bytes(sf.data(e)))
    w.finish()
    reseal(upd, manifest(upd))
    restore_refused(upd, built["v1"], IntegrityError, "format version 2, the manifest's is 3")


def test_validate_manifest_update_keys_only_in_updates(built):
    m = manifest(built["u"])
    m2 = copy.deepcopy(m)
    m2["format_version"] = 2
    with pytest.raises(FormatError, match="predecessor is only valid in an update"):
        validate_manifest(m2)
    m3 = copy.deepcopy(m)
    m3["base_model"]["files"].append({"path": "base.onnx", "size": 1, "sha256": "a" * 64})
    with pytest.raises(FormatError, match="an update package has no base model"):
        validate_manifest(m3)


def test_stage_zero_with_other_entries_refused(upd, built):
    """Stage 0 of an update holds its two files only: an extra entry (here a refine entry
    from stage 1) is refused before anything is decoded."""
    sf1 = read_stage(upd / "stage-1.p2u")
    extra = (dict(sf1.entries[0]), bytes(sf1.data(sf1.entries[0])))
    _rewrite_stage(upd, 0, lambda entries: entries + [extra])
    restore_refused(upd, built["v1"], FormatError, "holds base.bin and graph.onnx only")


@pytest.fixture(scope="module")
def reused(tmp_path_factory) -> dict[str, Path]:
    """An update coded against the skeleton of v1's full package (the graph did not change:
    its ``graph.onnx`` names that skeleton's sha256 as ``reference``)."""
    from p2u_onnx.config import BitBudget, QuantConfig
    from p2u_onnx.encoder import encode

    d = tmp_path_factory.mktemp("reuse")
    v1 = mlp()
    onnx.save(v1, str(d / "v1.onnx"))
    onnx.save(_moved(v1, only=("W2",)), str(d / "v2.onnx"))
    fast = BitBudget(adaptive=False)
    encode(d / "v1.onnx", d / "v1.p2u", "4,lossless", budget=fast, probe=False, name="r",
           version=1)
    # the same v1 through another package: W2 kept in its graph, so another skeleton
    encode(d / "v1.onnx", d / "v1b.p2u", "4,lossless", QuantConfig(min_elements=5000),
           budget=fast, probe=False, name="r", version=1)
    encode_update(d / "v2.onnx", d / "u.p2u", d / "v1.p2u", name="r", version=2,
                  ship_graph=False)
    assert "reference" in manifest(d / "u.p2u")["base_model"]["files"][1]
    return {"dir": d, "v1": d / "v1.p2u", "v1b": d / "v1b.p2u", "u": d / "u.p2u"}


def test_reused_skeleton_refused_on_another(reused, tmp_path):
    """The reference binds the skeleton: a device holding v1 exact with another skeleton (other
    package) or none (the .onnx file) is refused before anything is decoded or written; a
    reference edited in the manifest (resealed) is refused by the stage headers' binding; a
    reference on base.bin, or not a sha256, is refused by the validator."""
    d = reused["dir"]
    out = tmp_path / "o.onnx"
    refused(lambda: restore_update(reused["u"], out, reused["v1b"]), IntegrityError,
            "reuses the skeleton graph")
    refused(lambda: restore_update(reused["u"], out, d / "v1.onnx"), IntegrityError,
            "has no skeleton graph")
    assert not out.exists()
    restore_update(reused["u"], out, reused["v1"])  # the right one: restored
    p = tmp_path / "u.p2u"
    shutil.copytree(reused["u"], p)
    m = manifest(p)
    m["base_model"]["files"][1]["reference"] = hashlib.sha256(
        (reused["v1b"] / "manifest.json").read_bytes()).hexdigest()
    reseal(p, m)
    restore_refused(p, reused["v1"], IntegrityError, "written for another manifest")
    m = manifest(reused["u"])
    bad = copy.deepcopy(m)
    bad["base_model"]["files"][0]["reference"] = "a" * 64
    with pytest.raises(FormatError, match="only on an update's graph.onnx"):
        validate_manifest(bad)
    bad = copy.deepcopy(m)
    bad["base_model"]["files"][1]["reference"] = "../x"
    with pytest.raises(FormatError, match="reference"):
        validate_manifest(bad)


def test_live_session_with_another_skeleton_keeps_serving(reused, tmp_path):
    """A live session that holds v1 exact through another package (another skeleton) refuses
    the update that reuses v1.p2u's skeleton and keeps serving v1."""
    from p2u_onnx.runtime import ProgressiveSession

    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    with ProgressiveSession(reused["v1b"], workdir=tmp_path / "w") as s:
        s.upgrade(background=False)
        name = "x"
        before = s.run(None, {name: x})[0]
        refused(lambda: s.update(reused["u"]), IntegrityError, "reuses the skeleton graph")
        assert s.manifest["package_id"] == manifest(reused["v1b"])["package_id"]
        assert np.array_equal(s.run(None, {name: x})[0], before)
    with ProgressiveSession(reused["v1"], workdir=tmp_path / "w2") as s:
        s.upgrade(background=False)
        assert s.update(reused["u"]) == 1
