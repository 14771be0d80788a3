"""Initializers equal bit for bit (exporters that write one copy per use) are sent once."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import p2u_onnx
from p2u_onnx.passes import alias_duplicates


def _model(path, copies: int = 3, seed: int = 0):
    """x -> MatMul(W1) -> Relu -> MatMul(W2) -> ... where W1 == W2 == ... (separate copies),
    plus a different last weight."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((128, 128)).astype(np.float32) * 0.1
    other = rng.standard_normal((128, 16)).astype(np.float32) * 0.1
    inits, nodes, x = [], [], "x"
    for i in range(copies):
        inits.append(numpy_helper.from_array(w.copy(), f"layer{i}.weight"))
        nodes += [helper.make_node("MatMul", [x, f"layer{i}.weight"], [f"h{i}"]),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        x = f"r{i}"
    inits.append(numpy_helper.from_array(other, "head.weight"))
    nodes.append(helper.make_node("MatMul", [x, "head.weight"], ["y"]))
    g = helper.make_graph(nodes, "dup", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                       ["n", 128])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return m


def _run(model, x):
    src = model if isinstance(model, (str, bytes)) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_alias_duplicates_pass(tmp_path):
    m = _model(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    want = _run(m.SerializeToString(), x)
    n, saved = alias_duplicates(m, 1024)
    assert (n, saved) == (2, 2 * 128 * 128 * 4)
    assert [t.name for t in m.graph.initializer] == ["layer0.weight", "head.weight"]
    ids = [nd for nd in m.graph.node if nd.op_type == "Identity"]
    assert [(nd.input[0], nd.output[0]) for nd in ids] == [("layer0.weight", "layer1.weight"),
                                                           ("layer0.weight", "layer2.weight")]
    onnx.checker.check_model(m)
    np.testing.assert_array_equal(_run(m.SerializeToString(), x), want)
    # a graph input of that name (a user may feed it) is left alone
    m2 = _model(tmp_path / "m2.onnx")
    m2.graph.input.append(helper.make_tensor_value_info("layer1.weight", TensorProto.FLOAT,
                                                        [128, 128]))
    assert alias_duplicates(m2, 1024) == (1, 128 * 128 * 4)
    assert "layer1.weight" in {t.name for t in m2.graph.initializer}


def test_duplicates_are_coded_once_and_restored_exactly(tmp_path):
    src = tmp_path / "m.onnx"
    _model(src)
    one = tmp_path / "one.onnx"
    _model(one, copies=1)
    res = p2u_onnx.encode(src, tmp_path / "m.p2u")
    names = [t["name"] for t in res.manifest["tensors"]]
    assert names == ["layer0.weight", "head.weight"]
    assert any("2 initializer(s) equal bit for bit" in n for n in res.manifest["notes"])
    # three copies cost what one does (within the graph's few extra bytes)
    single = p2u_onnx.encode(one, tmp_path / "one.p2u")
    total = res.manifest["stages"][-1]["cumulative_bytes"]
    assert total < single.manifest["stages"][-1]["cumulative_bytes"] + 2048
    assert p2u_onnx.verify(tmp_path / "m.p2u")["lossless_match"] is True
    out = tmp_path / "restored.onnx"
    p2u_onnx.restore(tmp_path / "m.p2u", out)
    x = np.random.default_rng(2).standard_normal((8, 128)).astype(np.float32)
    np.testing.assert_array_equal(_run(str(out), x), _run(str(src), x))
    restored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    for k, v in restored.items():
        assert v.tobytes() == original[k].tobytes()
    with p2u_onnx.ProgressiveSession(tmp_path / "m.p2u") as s:
        s.upgrade().result()
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], _run(str(src), x))


def test_update_between_models_with_duplicates(tmp_path):
    """The binding digest covers the normalized model on both sides."""
    v1, v2 = tmp_path / "v1.onnx", tmp_path / "v2.onnx"
    _model(v1, seed=0)
    _model(v2, seed=3)
    p2u_onnx.encode(v1, tmp_path / "v1.p2u")
    from p2u_onnx.updates import encode_update, restore_update

    up = encode_update(v2, tmp_path / "up.p2u", tmp_path / "v1.p2u")
    full = p2u_onnx.encode(v2, tmp_path / "v2.p2u")
    # v2 reached through the update is the v2 of its full package: one digest, one binding
    assert up.manifest["source"]["weights_sha256"] == full.manifest["source"]["weights_sha256"]
    assert "layer1.weight" not in {t["name"] for t in up.manifest["tensors"]}
    out = tmp_path / "v2r.onnx"
    restore_update(tmp_path / "up.p2u", out, tmp_path / "v1.p2u")
    x = np.random.default_rng(4).standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_array_equal(_run(str(out), x), _run(str(v2), x))
