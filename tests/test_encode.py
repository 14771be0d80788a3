"""Encode -> restore on real and synthetic models: outputs, bounds, bit-exactness, errors."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import p2u_onnx
import synth
from p2u_onnx import QuantConfig
from p2u_onnx.api import load_stage_model, open_stages
from p2u_onnx.dtypes import dtype_info
from p2u_onnx.encoder import tensor_array
from p2u_onnx.errors import IntegrityError, P2UError, PlanError, UnsupportedModelError
from p2u_onnx.graph import iter_slots
from p2u_onnx.passes import lift_constants
from p2u_onnx.reconstruct import base_codes_of
from p2u_onnx.quantizers import stage_scale

ort.set_default_logger_severity(3)


def run(model, feed):
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)


def source_weights(path, min_elements):
    m = onnx.load(str(path))
    lift_constants(m, min_elements)
    return {s.key: tensor_array(s.tensor) for s in iter_slots(m)}


def check_bounds(pkg, src):
    """Every coded tensor, every lossy stage >= 1: |w - w_k| <= step_k / 2 (+ rounding)."""
    manifest = json.loads((pkg / "manifest.json").read_text())
    plan = manifest["plan"]
    for k in range(1, len(plan)):
        state = open_stages(pkg, k)
        for t in manifest["tensors"]:
            info = dtype_info(t["dtype"])
            w = info.to_compute(src[t["name"]]).astype(np.float64)
            got = info.to_compute(state.weight(t["name"])).astype(np.float64)
            if plan[k] == "lossless" or t["base"].get("kind") == "palette":  # exact
                assert np.array_equal(np.ascontiguousarray(state.weight(t["name"])).view(np.uint8),
                                      np.ascontiguousarray(src[t["name"]]).view(np.uint8))
                continue
            layout, base = base_codes_of(t, state.base_bin)
            step = stage_scale(base.scale, int(plan[k]) - int(plan[0])).astype(np.float64)
            bound = layout.from_blocks(np.repeat(step[:, None] / 2, layout.block_len, 1))
            tol = np.abs(w) * 2.0 ** -(23 if info.name in ("float32", "float64") else 10 if info.name == "float16" else 7)
            fin = np.isfinite(w) & (np.abs(w) < 1e30)
            err = np.abs(w - got)
            assert np.all(err[fin] <= bound[fin] + tol[fin] + 1e-30), (t["name"], k)
            # the bound shrinks from stage to stage
        errs = [s["max_abs_error"] for s in manifest["stages"]]
        assert all(a >= b for a, b in zip(errs, errs[1:])), errs


@pytest.fixture(scope="module")
def digits(models_dir, tmp_path_factory):
    pkg = tmp_path_factory.mktemp("d") / "digits.p2u"
    p2u_onnx.encode(models_dir / "digits_cnn.onnx", pkg)
    data = np.load(models_dir / "digits_test.npz")
    return pkg, data["x"], data["y"]


def test_digits_base_accuracy_and_lossless_outputs(digits, models_dir):
    pkg, x, y = digits
    ref = run(str(models_dir / "digits_cnn.onnx"), {"image": x})[0]
    accs = []
    for k in range(3):
        out = run(load_stage_model(pkg, k), {"image": x})[0]
        accs.append(np.mean(out.argmax(1) == y))
    fp32 = np.mean(ref.argmax(1) == y)
    assert accs[0] >= fp32 - 0.01
    np.testing.assert_array_equal(out, ref)  # lossless: identical outputs, atol 0
    # the base holds integer codes for every coded weight (dequantized by DequantizeLinear, or
    # for Conv and Gemm(transB) by ops onnxruntime folds at load: p2u_onnx.base_speed)
    base_model = onnx.load(str(pkg / "base.onnx"), load_external_data=False)
    coded = {t["name"] for t in json.loads((pkg / "manifest.json").read_text())["tensors"]}
    inits = {t.name: t.data_type for t in base_model.graph.initializer}
    assert coded and not coded & set(inits)
    assert all(inits[f"{n}__p2u_q"] in (onnx.TensorProto.INT4, onnx.TensorProto.INT8,
                                        onnx.TensorProto.UINT8) for n in coded)


def test_digits_package_is_small_and_verifies(digits, models_dir):
    pkg, _, _ = digits
    info = p2u_onnx.inspect(pkg)
    s = info["stages"]
    assert s[0]["share"] < 0.2 and s[-1]["cumulative_share"] < 1.0
    assert p2u_onnx.verify(pkg)["lossless_match"] is True
    check_bounds(pkg, source_weights(models_dir / "digits_cnn.onnx", 4096))


def test_base_runs_in_stock_onnxruntime_from_the_package_dir(digits):
    pkg, x, _ = digits
    sess = ort.InferenceSession(str(pkg / "base.onnx"))
    assert sess.run(None, {"image": x[:2]})[0].shape == (2, 10)


def test_edge_cases_graph(tmp_path):
    """Subgraphs, functions, Constant weights, shared and input-listed initializers, Resize
    scales, awkward values: every stage runs, the last is bit-exact, bounds hold."""
    m = synth.edge_model()
    src = tmp_path / "edge.onnx"
    onnx.save(m, str(src))
    feed = synth.edge_feed()
    ref = run(m, feed)
    pkg = tmp_path / "edge.p2u"
    res = p2u_onnx.encode(src, pkg, "3,6,lossless", QuantConfig(min_elements=1024))
    where = {t["name"]: t["where"] for t in res.manifest["tensors"]}
    assert {"W", "Wc", "Wt", "We", "fw", "Awk", "Z", "C"} <= set(where)
    assert "scales" not in where and where["fw"].startswith("function")
    outs = [run(load_stage_model(pkg, k), feed) for k in range(3)]
    for a, b in zip(outs[-1], ref):
        np.testing.assert_array_equal(a, b)  # NaNs in the same places, identical values
    assert np.max(np.abs(outs[1][0] - ref[0])) < np.max(np.abs(outs[0][0] - ref[0]))
    check_bounds(pkg, source_weights(src, 1024))
    # the base model keeps Resize's scales exact and no longer lists W as a graph input
    base = onnx.load(str(pkg / "base.onnx"), load_external_data=False)
    assert "W" not in [i.name for i in base.graph.input]
    assert p2u_onnx.verify(pkg)["lossless_match"]


@pytest.mark.parametrize("make", [lambda: synth.mlp(np.float16), lambda: synth.mlp(np.float64),
                                  synth.bf16_mlp], ids=["fp16", "fp64", "bf16"])
def test_other_float_dtypes(tmp_path, make):
    m = make()
    src = tmp_path / "m.onnx"
    onnx.save(m, str(src))
    et = m.graph.input[0].type.tensor_type.elem_type
    feed = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(
        onnx.helper.tensor_dtype_to_np_dtype(et))}
    ref = run(m, feed)[0]
    pkg = tmp_path / "m.p2u"
    res = p2u_onnx.encode(src, pkg, "4,8,lossless")
    assert res.manifest["tensors"], "no tensor was coded"
    out0 = run(load_stage_model(pkg, 0), feed)[0]
    assert np.all(np.isfinite(out0))
    np.testing.assert_array_equal(run(load_stage_model(pkg, 2), feed)[0], ref)
    check_bounds(pkg, source_weights(src, 4096))


def test_external_data_model(tmp_path):
    m = synth.mlp()
    src = tmp_path / "ext" / "m.onnx"
    src.parent.mkdir()
    onnx.save(m, str(src), save_as_external_data=True, location="m.data", size_threshold=0)
    x = np.ones((2, 64), np.float32)
    ref = run(str(src), {"x": x})[0]
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(src, pkg, "4,lossless")
    out = tmp_path / "restored.onnx"
    p2u_onnx.restore(pkg, out)
    np.testing.assert_array_equal(run(str(out), {"x": x})[0], ref)


def test_plan_may_end_lossy(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(synth.mlp(), str(src))
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(src, pkg, "2,4,8")
    assert len(p2u_onnx.inspect(pkg)["stages"]) == 3
    assert p2u_onnx.verify(pkg)["lossless_match"] is None
    check_bounds(pkg, source_weights(src, 4096))


@pytest.mark.parametrize("granularity,symmetric", [("channel", True), ("tensor", True),
                                                   ("block", False)])
def test_granularities(tmp_path, granularity, symmetric):
    src = tmp_path / "m.onnx"
    onnx.save(synth.mlp(), str(src))
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(src, pkg, "4,8,lossless",
                    QuantConfig(granularity=granularity, block_size=64, symmetric=symmetric))
    check_bounds(pkg, source_weights(src, 4096))
    assert p2u_onnx.verify(pkg)["lossless_match"]


def test_quantized_and_integer_models_pass_through(tmp_path, models_dir):
    from onnxruntime.quantization import quantize_dynamic

    src = tmp_path / "m.onnx"
    onnx.save(synth.mlp(), str(src))
    q = tmp_path / "q.onnx"
    quantize_dynamic(str(src), str(q))
    x = np.ones((2, 64), np.float32)
    ref = run(str(q), {"x": x})[0]
    pkg = tmp_path / "q.p2u"
    res = p2u_onnx.encode(q, pkg)
    assert res.manifest["tensors"] == []  # int8 weights: nothing to code, all exact
    np.testing.assert_array_equal(run(load_stage_model(pkg, 0), {"x": x})[0], ref)
    # scikit-learn model through skl2onnx (ai.onnx.ml domain)
    skl = models_dir / "digits_mlp_sklearn.onnx"
    pkg2 = tmp_path / "skl.p2u"
    p2u_onnx.encode(skl, pkg2, "4,8,lossless", QuantConfig(min_elements=1024))
    assert p2u_onnx.verify(pkg2)["lossless_match"]


def test_bad_inputs(tmp_path):
    with pytest.raises(UnsupportedModelError, match="no such file"):
        p2u_onnx.encode(tmp_path / "nope.onnx", tmp_path / "o.p2u")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \xff\xff")
    with pytest.raises(UnsupportedModelError, match="not"):
        p2u_onnx.encode(junk, tmp_path / "o.p2u")
    m = synth.mlp()
    m.graph.node[2].domain = "com.example.secret"
    onnx.save(m, str(tmp_path / "dom.onnx"))
    with pytest.raises(UnsupportedModelError, match="com.example.secret"):
        p2u_onnx.encode(tmp_path / "dom.onnx", tmp_path / "o.p2u")
    for bad in ("8,4", "4,lossless,8", "1,8", "four", ""):
        with pytest.raises(PlanError):
            p2u_onnx.Plan.parse(bad)
    assert not (tmp_path / "o.p2u").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.p2u")]


def test_tampered_package_is_refused(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(synth.mlp(), str(src))
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(src, pkg)
    bad = tmp_path / "bad.p2u"
    shutil.copytree(pkg, bad)
    data = bytearray((bad / "stage-2.p2u").read_bytes())
    data[-3] ^= 0x40
    (bad / "stage-2.p2u").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="stage-2.p2u"):
        p2u_onnx.verify(bad)
    (bad / "stage-1.p2u").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        p2u_onnx.restore(bad, tmp_path / "r.onnx", stage=1)
    with pytest.raises(P2UError, match="stage 7"):
        p2u_onnx.restore(pkg, tmp_path / "r.onnx", stage=7)
    assert not (tmp_path / "r.onnx").exists()


def _encode_mlp(tmp_path, opset):
    """Encode an MLP of ``opset``: the model, the package, its notes and its base graph."""
    model = synth.mlp(opset=opset)
    onnx.save(model, str(tmp_path / "m.onnx"))
    pkg = tmp_path / "m.p2u"
    res = p2u_onnx.encode(tmp_path / "m.onnx", pkg)
    base = onnx.load(str(pkg / "base.onnx"), load_external_data=False)
    return model, pkg, res.manifest.get("notes", []), base


def test_opset_fallback_when_conversion_fails(tmp_path, monkeypatch):
    from p2u_onnx import passes

    monkeypatch.setattr(passes, "raise_opset", lambda *a, **k: "converter says no")
    model, pkg, notes, base = _encode_mlp(tmp_path, opset=15)
    assert "converter says no" in notes[0]
    assert base.opset_import[0].version == 15
    assert {t.data_type for t in base.graph.initializer if t.name.endswith("_q")} == {onnx.TensorProto.INT8}
    x = np.ones((2, 64), np.float32)
    ref = run(model, {"x": x})[0]
    out0 = run(load_stage_model(pkg, 0), {"x": x})[0]
    assert np.max(np.abs(out0 - ref)) < 0.25 * np.max(np.abs(ref))
    assert p2u_onnx.verify(pkg)["lossless_match"]


def test_a_model_below_opset_10_is_converted_first(tmp_path, monkeypatch):
    """Opset 9 has no DequantizeLinear: the source is converted before it is coded (it used to
    be refused), and every stage still runs; the lossless stage gives the original outputs."""
    model, pkg, notes, base = _encode_mlp(tmp_path, opset=9)
    assert "converted from opset 9 to 21" in notes[0]
    assert base.opset_import[0].version == 21
    # 4-bit codes exist at the new opset (a fixed 4-bit base: the default may choose more bits)
    p2u_onnx.encode(tmp_path / "m.onnx", tmp_path / "m4.p2u", "4,8,lossless",
                    budget=p2u_onnx.BitBudget(adaptive=False))
    manifest = json.loads((tmp_path / "m4.p2u" / "manifest.json").read_text())
    assert {t["base"]["code_type"] for t in manifest["tensors"]} == {onnx.TensorProto.INT4}
    x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    ref = run(model, {"x": x})[0]
    errs = [np.max(np.abs(run(load_stage_model(pkg, k), {"x": x})[0] - ref)) for k in range(3)]
    assert errs[0] < 0.5 * np.max(np.abs(ref)) and errs[0] > errs[1] > errs[2] == 0
    assert p2u_onnx.verify(pkg)["lossless_match"]

    from p2u_onnx import passes

    monkeypatch.setattr(passes, "raise_opset", lambda *a, **k: "converter says no")
    with pytest.raises(UnsupportedModelError, match=r"opset 9 \(< 10, no DequantizeLinear\) "
                                                    r"and converter says no"):
        p2u_onnx.encode(tmp_path / "m.onnx", tmp_path / "n.p2u")
    assert not (tmp_path / "n.p2u").exists()


@pytest.mark.parametrize("plan", ["2,4,8,lossless", "8,lossless", "3,lossless"])
def test_other_plans_run_in_onnxruntime(tmp_path, plan):
    src = tmp_path / "m.onnx"
    model = synth.mlp()
    onnx.save(model, str(src))
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(src, pkg, plan)
    x = np.ones((2, 64), np.float32)
    ref = run(model, {"x": x})[0]
    errs = [np.max(np.abs(run(load_stage_model(pkg, k), {"x": x})[0] - ref))
            for k in range(len(plan.split(",")))]
    assert errs[-1] == 0 and all(a >= b for a, b in zip(errs, errs[1:]))


def test_restore_past_the_protobuf_limit_writes_external_data(tmp_path, monkeypatch):
    from p2u_onnx import api

    src = tmp_path / "m.onnx"
    model = synth.mlp()
    onnx.save(model, str(src))
    p2u_onnx.encode(src, tmp_path / "m.p2u")
    monkeypatch.setattr(api, "_PROTOBUF_LIMIT", 1000 + (64 << 20))  # pretend the model is huge
    out = p2u_onnx.restore(tmp_path / "m.p2u", tmp_path / "r.onnx")
    assert (tmp_path / "r.onnx.data").stat().st_size > 0
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(run(str(out), {"x": x})[0], run(model, {"x": x})[0])


def test_outputs_are_read_by_their_kind():
    """Each output is read as its task reads it (p2u_onnx.output_metrics): a Softmax as class
    scores, a Sigmoid as decisions, a small head per column, anything else by its cosine; a
    ReLU output that happens to lie in [0, 1] is not a probability."""
    from onnx import helper

    from p2u_onnx import calibrate, output_metrics

    def with_head(*nodes):
        m = synth.mlp()
        m.graph.node.extend(nodes)
        m.graph.output[0].name = nodes[-1].output[0]
        return m

    models = {
        "logits": synth.mlp(),
        "softmax": with_head(helper.make_node("Softmax", ["y"], ["s"], axis=-1),
                             helper.make_node("Identity", ["s"], ["p"])),
        "sigmoid": with_head(helper.make_node("Sigmoid", ["y"], ["p"])),
        "small relu": with_head(helper.make_node("Sigmoid", ["y"], ["s"]),
                                helper.make_node("Relu", ["s"], ["p"])),
        "head": synth.mlp(dout=3),
    }
    kinds = {}
    for name, m in models.items():
        w = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer
             if t.name in ("W1", "W2")}
        cal = calibrate.Calibration.build(m, w)
        assert cal.output_error({"W2": w["W2"] * np.float32(1.05)}) > 0
        kinds[name] = [c.kind for c in cal.checks]
    assert kinds == {"logits": ["cosine"], "softmax": ["classes"], "sigmoid": ["decisions"],
                     "small relu": ["cosine"], "head": ["regression"] * 3}
    assert output_metrics._in_unit([np.array([0.1, 0.9]), np.array([0.0, 1.0])])
    assert not output_metrics._in_unit([np.array([0.5, 0.5])])      # constant
    assert not output_metrics._in_unit([np.array([-0.1, 0.5])])     # below 0
    assert not output_metrics._in_unit([np.array([0.2, np.nan])])   # not finite


def test_consumers_found_in_every_subgraph():
    """Readers of a weight are found in each branch of an If, not only in the one whose Python
    object happened to survive (consumers_by_name keys containers by id)."""
    from onnx import TensorProto, helper

    from p2u_onnx.graph import consumers_by_name

    def branch(op):
        return helper.make_graph(
            [helper.make_node(op, ["x", "w"], ["y"])], op, [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
            [helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0])])

    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("MatMul"),
                          else_branch=branch("Add"))], "m",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    model = helper.make_model(g)
    users = consumers_by_name(model)
    found = {s.path: [c.node.op_type for c in users.get(id(s.container), {}).get("w", [])]
             for s in iter_slots(model)}
    assert sorted(found.values()) == [["Add"], ["MatMul"]]


def test_a_skeleton_pointing_outside_the_package_is_refused(tmp_path):
    """Restoring fills the skeleton's external tensors from the decoded weights and base.bin; a
    tensor that points at bytes the package does not hold is named, not read."""
    from onnx.external_data_helper import uses_external_data

    from p2u_onnx.api import _all_tensors, _filled_model
    from p2u_onnx.errors import FormatError

    src = tmp_path / "m.onnx"
    onnx.save(synth.mlp(), str(src))
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(src, pkg)
    state = open_stages(pkg)
    model = _filled_model(state)
    assert not any(uses_external_data(t) for t in _all_tensors(model))
    assert p2u_onnx.verify(pkg)["lossless_match"]
    skeleton = onnx.load_model_from_string(state.graph_bytes)
    t = next(t for t in _all_tensors(skeleton) if uses_external_data(t))
    for e in t.external_data:
        if e.key == "offset":
            e.value = str(int(e.value) + 4)
    state.graph_bytes = skeleton.SerializeToString()
    with pytest.raises(FormatError, match=f"tensor {t.name} of the skeleton graph points at"):
        _filled_model(state)
