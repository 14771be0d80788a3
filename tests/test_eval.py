"""p2u eval / p2u_onnx.evaluate: per-stage agreement, cosine, errors and latency against the
original, checked against independent computations; bad inputs are one-line errors."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import synth
from p2u_onnx import encode
from p2u_onnx.cli import main
from p2u_onnx.errors import P2UError
from p2u_onnx.evaluation import evaluate


def _two_outputs() -> onnx.ModelProto:
    """synth.mlp plus its argmax as a second (int64) output."""
    m = synth.mlp()
    m.graph.node.append(helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0))
    m.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    return m


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    model = d / "m.onnx"
    onnx.save(_two_outputs(), str(model))
    pkg = d / "m.p2u"
    encode(model, pkg, "4,8,lossless")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 5, 64)).astype(np.float32)  # 6 feeds of 5 rows
    data = d / "x.npz"
    np.savez(data, x=x)
    return model, pkg, data, x


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


def test_lossless_stage_matches_the_original_exactly(encoded):
    model, pkg, data, _ = encoded
    r = evaluate(pkg, model, data, repeats=1)
    assert r["reference"] == {"kind": "model", "path": str(model),
                              "same_weights_as_source": True}
    assert r["inputs"] == {"kind": "npz", "path": str(data), "feeds": 6}
    last = r["stages"][-1]
    assert last["bits"] == "lossless"
    assert last["agreement"] == 1.0 and last["cosine"] == 1.0 and last["max_abs_error"] == 0.0
    assert last["rel_error"] == 0.0 and last["exact_match"] == 1.0
    for row in r["stages"]:
        assert row["latency_ms"]["median"] > 0 and row["latency_ratio"] > 0
    assert r["reference_latency_ms"]["median"] > 0
    # bytes rise stage by stage, and shares are of the source's fp32 bytes
    cum = [s["cumulative_bytes"] for s in r["stages"]]
    assert cum == sorted(cum) and cum[0] > 0
    assert r["stages"][0]["share"] == pytest.approx(cum[0] / r["fp32_bytes"])


def test_base_metrics_match_an_independent_computation(encoded):
    model, pkg, data, x = encoded
    r = evaluate(pkg, model, data, repeats=1)
    y_ref = [_run(model, xi) for xi in x]
    y_base = [_run(pkg / "base.onnx", xi) for xi in x]
    ref = np.concatenate([a[0] for a in y_ref]).astype(np.float64)
    base = np.concatenate([b[0] for b in y_base]).astype(np.float64)
    cos = np.sum(ref * base, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(base, axis=1))
    base_row = r["stages"][0]
    y = base_row["outputs"]["y"]
    assert 0.9 < y["cosine"] < 1.0
    assert y["cosine"] == pytest.approx(float(np.mean(cos)), rel=0, abs=1e-12)
    assert y["max_abs_error"] == pytest.approx(float(np.max(np.abs(ref - base))), abs=1e-12)
    assert y["rel_error"] == pytest.approx(
        float(np.linalg.norm(ref - base) / np.linalg.norm(ref)), rel=1e-9)
    assert y["agreement"] == float(np.mean(ref.argmax(1) == base.argmax(1)))
    labels_ref = np.concatenate([a[1] for a in y_ref])
    labels_base = np.concatenate([b[1] for b in y_base])
    assert base_row["outputs"]["label"]["exact_match"] == float(np.mean(labels_ref == labels_base))
    assert base_row["outputs"]["label"]["exact_match"] == y["agreement"]
    # the row is the worst over both outputs
    assert base_row["cosine"] == y["cosine"] and base_row["agreement"] == y["agreement"]


def test_default_reference_is_the_lossless_stage_and_inputs_the_probe(encoded):
    _, pkg, _, _ = encoded
    r = evaluate(pkg, repeats=1)
    assert r["reference"] == {"kind": "lossless-stage", "stage": 2}
    assert r["inputs"]["kind"] == "probe" and r["inputs"]["feeds"] == 1
    assert any("lossless stage 2" in n for n in r["notes"])
    assert r["stages"][2]["max_abs_error"] == 0.0
    assert r["stages"][0]["cosine"] < 1.0


def test_cli_json_has_one_row_per_stage(encoded):
    model, pkg, data, _ = encoded
    r = invoke("eval", pkg, "--model", model, "--inputs", data, "--repeats", 1, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert [s["stage"] for s in info["stages"]] == [0, 1, 2]
    r = invoke("eval", pkg, "--inputs", data, "-s", 0, "-s", 2, "--repeats", 1, "--json")
    assert [s["stage"] for s in json.loads(r.output)["stages"]] == [0, 2]


def test_cli_table(encoded):
    model, pkg, data, _ = encoded
    r = invoke("eval", pkg, "--model", model, "--inputs", data, "--repeats", 1)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["stage", "bits", "bytes", "share", "agree", "cosine", "max",
                                "err", "exact", "ms", "x", "orig"]
    assert lines[3].split()[:2] == ["2", "lossless"] and lines[4].split()[0] == "orig"
    assert "note: inputs: npz" in r.output and "(6 feeds)" in r.output


def test_synth_on_a_package_without_a_probe(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(synth.mlp(), str(model))
    pkg = tmp_path / "m.p2u"
    encode(model, pkg, "4,lossless", probe=False)
    r = invoke("eval", pkg)  # no probe, no inputs: says what to pass
    assert r.exit_code == 1
    assert len(r.output.strip().splitlines()) == 1
    assert "--inputs" in r.output and "--synth" in r.output
    r = invoke("eval", pkg, "--synth", "--repeats", 1, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["inputs"]["kind"] == "synth"
    assert 0.9 < info["stages"][0]["cosine"] < 1.0 and info["stages"][1]["cosine"] == 1.0


def test_no_reference_without_lossless_stage(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(synth.mlp(), str(model))
    pkg = tmp_path / "m.p2u"
    encode(model, pkg, "4,8")
    r = invoke("eval", pkg, "--synth")
    assert r.exit_code == 1 and "--model" in r.output
    r = invoke("eval", pkg, "--synth", "--model", model, "--repeats", 1, "--json")
    assert r.exit_code == 0, r.output
    assert 0.9999 < json.loads(r.output)["stages"][1]["cosine"] < 1.0


def _bad_npz(kind, d):
    p = d / f"{kind}.npz"
    x = np.zeros((2, 64), np.float32)
    if kind == "text":
        p.write_text("x,y\n1,2\n")
    elif kind == "npy":
        np.save(d / "a.npy", x)
        (d / "a.npy").rename(p)
    elif kind == "pickled":
        np.savez(p, x=np.array([{"a": 1}, None], dtype=object))
    elif kind == "missing":
        np.savez(p, image=x)
    elif kind == "dtype":
        np.savez(p, x=x.astype(np.float64))
    elif kind == "shape":
        np.savez(p, x=np.zeros((2, 63), np.float32))
    elif kind == "truncated":
        np.savez(p, x=x)
        p.write_bytes(p.read_bytes()[:60])
    return p


@pytest.mark.parametrize("kind,needle", [
    ("text", "not an .npz file"), ("npy", "a single .npy array"),
    ("pickled", "array 'x' holds Python objects"), ("missing", "no array for input 'x'"),
    ("dtype", "array 'x' is float64"), ("shape", "array 'x' has shape [2, 63]"),
    ("truncated", "cannot read")])
def test_bad_inputs_are_one_line(encoded, tmp_path, kind, needle):
    _, pkg, _, _ = encoded
    p = _bad_npz(kind, tmp_path)
    r = invoke("eval", pkg, "--inputs", p)
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert needle in r.output and str(p.name) in r.output


def test_feeds_from_an_npz(tmp_path):
    """One feed as it is; one per index of an extra leading axis; per fixed batch; --batch."""
    m = synth.mlp()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # fixed batch of 2
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    model = tmp_path / "m.onnx"
    onnx.save(m, str(model))
    pkg = tmp_path / "m.p2u"
    encode(model, pkg, "4,lossless")
    x = np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32)
    cases = {"one": (x[:2], None, 1), "per_batch": (x, None, 3),
             "leading": (x.reshape(3, 2, 64), None, 3), "batch": (x, 2, 3)}
    for name, (arr, batch, feeds) in cases.items():
        np.savez(tmp_path / f"{name}.npz", x=arr, labels=np.arange(3))
        r = evaluate(pkg, inputs=tmp_path / f"{name}.npz", batch=batch, repeats=1)
        assert r["inputs"]["feeds"] == feeds, name
        assert any("ignored arrays" in n and "labels" in n for n in r["notes"])
    # the same rows give the same figures however they are cut into feeds
    a = evaluate(pkg, inputs=tmp_path / "per_batch.npz", repeats=1)["stages"][0]
    b = evaluate(pkg, inputs=tmp_path / "leading.npz", repeats=1)["stages"][0]
    assert a["cosine"] == b["cosine"] and a["max_abs_error"] == b["max_abs_error"]
    with pytest.raises(P2UError, match=r"array 'x' has shape \[5, 64\]"):
        np.savez(tmp_path / "odd.npz", x=x[:5])
        evaluate(pkg, inputs=tmp_path / "odd.npz")
    with pytest.raises(P2UError, match="stage 7 does not exist"):
        evaluate(pkg, synth=True, stages=[7])


def test_given_feeds_are_checked(encoded):
    _, pkg, _, x = encoded
    r = evaluate(pkg, inputs={"x": x[0]}, repeats=1)
    assert r["inputs"] == {"kind": "given", "feeds": 1}
    with pytest.raises(P2UError, match="'x' is float64"):
        evaluate(pkg, inputs={"x": x[0].astype(np.float64)})
    with pytest.raises(P2UError, match="no value given for input 'x'"):
        evaluate(pkg, inputs=[{}])


def test_exported_from_the_package():
    import p2u_onnx
    from p2u_onnx import evaluation

    # twice: importing the module must not shadow the function under the same name
    assert p2u_onnx.evaluate is evaluation.evaluate and p2u_onnx.evaluate is evaluate
    assert "evaluate" in p2u_onnx.__all__


def test_a_bad_original_is_one_line(encoded, tmp_path):
    _, pkg, data, _ = encoded
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    other = tmp_path / "other.onnx"
    m = synth.mlp()
    m.graph.input[0].name = "features"
    m.graph.node[0].input[0] = "features"
    onnx.save(m, str(other))
    for model, needle in [(junk, "not an ONNX model"), (tmp_path / "none.onnx", "cannot read"),
                          (other, "its inputs (features) are not those of the package's")]:
        r = invoke("eval", pkg, "--model", model, "--inputs", data)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert needle in r.output
    # same inputs, other weights: runs, and says so
    onnx.save(synth.mlp(), str(other))
    r = evaluate(pkg, other, data, repeats=1)
    assert r["reference"]["same_weights_as_source"] is False
    assert any("differ from the package's source" in n for n in r["notes"])
    assert r["stages"][-1]["max_abs_error"] > 0


def test_output_stats_edge_cases():
    from p2u_onnx.evaluation import _OutputStats

    s = _OutputStats()  # NaN where both have it counts as equal; one-sided infinities are counted
    s.add(np.array([[np.nan, 1.0, 2.0]], np.float32), np.array([[np.nan, 1.0, 2.0]], np.float32))
    s.add(np.array([[np.inf, 1.0, 2.0]], np.float32), np.array([[0.0, 1.0, 2.5]], np.float32))
    s.add(np.zeros((1, 3), np.float32), np.zeros((1, 4), np.float32))  # another shape
    r = s.result()
    assert r["feeds"] == 2 and r["shape_mismatch"] == 1 and r["nonfinite_mismatch"] == 1
    assert r["max_abs_error"] == 0.5
    assert r["cosine"] == pytest.approx((1.0 + (1 + 5) / (5 ** 0.5 * 7.25 ** 0.5)) / 2)
    assert r["agreement"] == 0.5  # argmax 0 (NaN) both times in the reference
    e = _OutputStats()
    e.add(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32))
    assert e.result() == {"kind": None, "feeds": 1}
    i = _OutputStats()
    i.add(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]))
    assert i.result()["exact_match"] == 0.75


def test_stages_past_the_protobuf_limit_go_through_files(encoded, monkeypatch):
    from p2u_onnx import evaluation

    model, pkg, data, _ = encoded
    small = evaluate(pkg, inputs=data, repeats=1)
    monkeypatch.setattr(evaluation, "INLINE_LIMIT", 0)
    saved = []
    real = evaluation._model_input

    def spy(m, tmp, stage):
        out = real(m, tmp, stage)
        saved.append(out)
        return out

    monkeypatch.setattr(evaluation, "_model_input", spy)
    big = evaluate(pkg, inputs=data, repeats=1)
    assert saved and all(isinstance(s, str) and s.endswith(".onnx") for s in saved)
    for a, b in zip(small["stages"], big["stages"]):
        assert a["outputs"] == b["outputs"]


@pytest.mark.parametrize("damage", ["entry", "file"])
def test_a_damaged_probe_is_one_line(encoded, tmp_path, damage):
    import shutil

    pkg = tmp_path / "copy.p2u"
    shutil.copytree(encoded[1], pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    if damage == "entry":
        del manifest["probe"]["inputs"]
        (pkg / "manifest.json").write_text(json.dumps(manifest))
    else:
        (pkg / "probe.npz").write_bytes(b"PK\x03\x04 not really")
    r = invoke("eval", pkg)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    if damage == "entry":  # a malformed manifest: the package is refused as a whole
        assert "probe.inputs is missing" in r.output
        return
    assert "probe" in r.output and "--synth" in r.output
    assert invoke("eval", pkg, "--synth", "--repeats", 1).exit_code == 0


def test_api_errors_name_keyword_arguments(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(synth.mlp(), str(model))
    pkg = tmp_path / "m.p2u"
    encode(model, pkg, "4,8", probe=False)
    with pytest.raises(P2UError, match=r"pass original='ORIGINAL.onnx'$"):
        evaluate(pkg)
    with pytest.raises(P2UError, match=r"no probe inputs; pass inputs= .* or synth=True$"):
        evaluate(pkg, model)
