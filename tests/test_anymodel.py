"""Models a user brings: every float width, tiny models, quality targets, warnings, shapes."""

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import p2u_onnx
from p2u_onnx import BitBudget

ort.set_default_logger_severity(3)
DATA = Path(p2u_onnx.__file__).resolve().parent / "data"


def run(path, feed):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feed)


def agreement(a, b):
    return float(np.mean(np.argmax(a, 1) == np.argmax(b, 1)))


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.fixture(scope="module")
def digits():
    x = np.load(DATA / "digits_test.npz")["x"][:256].astype(np.float32)
    return onnx.load(str(DATA / "digits_cnn.onnx")), x


def fp16_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float16 conversion users make, float inputs and outputs kept; the output listed in
    value_info too (as shape-inferred exports have it), which is what broke the base."""
    from onnxconverter_common import float16

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.value_info.extend(m.graph.output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(m, keep_io_types=True)


def test_fp16_base_loads_and_matches_fp32_quality(digits, tmp_path):
    model, x = digits
    m16 = fp16_twin(model)
    results = {}
    for label, m in (("fp32", model), ("fp16", m16)):
        path = tmp_path / f"{label}.onnx"
        onnx.save(m, str(path))
        res = p2u_onnx.encode(path, tmp_path / f"{label}.p2u")
        base = tmp_path / f"{label}.p2u" / "base.onnx"
        ref, got = run(path, {"image": x})[0], run(base, {"image": x})[0]  # base loads
        assert "probe" in res.manifest
        share = res.stage_bytes[0] / res.manifest["source"]["fp32_equivalent_bytes"]
        results[label] = (agreement(got, ref), cosine(got, ref), share)
    (a32, c32, s32), (a16, c16, s16) = results["fp32"], results["fp16"]
    # same bits per weight as the fp32 twin: same quality, about the same share of fp32 bytes
    assert a16 >= a32 - 0.01 and a16 >= 0.98, results
    assert c16 >= c32 - 0.002, results
    assert s16 <= 0.20 and s16 >= 0.6 * s32, results


def test_fp64_and_bf16_get_fp32_bits_per_weight(tmp_path):
    import synth

    feed32 = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    bits = {}
    for label, m, x in (("fp32", synth.mlp(np.float32, din=64, hidden=256), feed32),
                        ("fp64", synth.mlp(np.float64, din=64, hidden=256),
                         feed32.astype(np.float64))):
        path = tmp_path / f"{label}.onnx"
        onnx.save(m, str(path))
        res = p2u_onnx.encode(path, tmp_path / f"{label}.p2u")
        base = tmp_path / f"{label}.p2u" / "base.onnx"
        coded = sum(np.prod(t["shape"]) for t in res.manifest["tensors"])
        bits[label] = 8 * res.stage_bytes[0] / coded
        assert cosine(run(base, {"x": x})[0], run(path, {"x": x})[0]) >= 0.99
    # the fp64 base is not given twice the bits (its share is of fp32-equivalent bytes)
    assert bits["fp64"] <= 1.25 * bits["fp32"], bits


def tiny_classifier(depth: int = 20, seed: int = 3) -> onnx.ModelProto:
    """A ~0.3 MB classifier whose tensors sent as they are (twenty 30x30 layers, under the
    1024-value threshold, with their biases) take more than the 20% cap on their own."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def he(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / shape[0])).astype(np.float32)

    inits = [numpy_helper.from_array(he(64, 256), "W0"), numpy_helper.from_array(he(256, 30), "W1")]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"]), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "W1"], ["a0"])]
    prev = "a0"
    for i in range(depth):
        inits += [numpy_helper.from_array(he(30, 30), f"L{i}"),
                  numpy_helper.from_array((rng.standard_normal(30) * 0.1).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Relu", [prev], [f"p{i}"]),
                  helper.make_node("MatMul", [f"p{i}", f"L{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"o{i}"])]
        prev = f"o{i}"
    inits.append(numpy_helper.from_array(he(30, 10), "Wout"))
    nodes.append(helper.make_node("MatMul", [prev, "Wout"], ["logits"]))
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_tiny_model_base_never_worse_than_plain(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))
    x = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    ref = run(path, {"x": x})[0]
    plain = p2u_onnx.encode(path, tmp_path / "plain.p2u", budget=BitBudget(adaptive=False))
    res = p2u_onnx.encode(path, tmp_path / "default.p2u")
    fp32 = res.manifest["source"]["fp32_equivalent_bytes"]
    assert fp32 < 600_000
    # what is sent as it is already exceeds the cap ...
    coded = sum(4 * np.prod(t["shape"]) for t in res.manifest["tensors"])
    assert fp32 - coded > 0.2 * fp32
    cos_plain = cosine(run(tmp_path / "plain.p2u" / "base.onnx", {"x": x})[0], ref)
    cos = cosine(run(tmp_path / "default.p2u" / "base.onnx", {"x": x})[0], ref)
    # ... and still no tensor is pushed below the plain 4 bits: as good as plain 4-bit
    assert min(t["bits"] for t in res.manifest["tensors"]) >= 4
    assert cos >= cos_plain - 1e-3, (cos, cos_plain)
    # said out loud, naming why
    assert any("cap" in n and "plain 4-bit" in n for n in res.warnings), res.warnings
    assert res.warnings == res.manifest["notes"]


def test_allocator_keeps_default_unless_target_met():
    from p2u_onnx.allocate import TensorCost, allocate_from_default

    # two tensors; going below 4 bits saves bytes but misses the target
    costs = [TensorCost("a", [3, 4, 5], [30.0, 40.0, 50.0], [0.04, 0.01, 0.0025]),
             TensorCost("b", [3, 4, 5], [30.0, 40.0, 50.0], [0.04, 0.01, 0.0025])]
    default = {"a": 4, "b": 4}
    # a cap below the plain base: the plain base, not everything at 3 bits
    a = allocate_from_default(costs, default, budget=50.0, max_error=0.001, cap=60.0)
    assert a.bits == default and a.floored and not a.target_met
    # a loose target met below the default: the measurement allows 3 bits
    a = allocate_from_default(costs, default, budget=60.0, max_error=0.1, cap=60.0)
    assert a.bits == {"a": 3, "b": 3} and a.target_met
    # no_worse: the target is at least the plain base's error
    a = allocate_from_default(costs, default, budget=60.0, max_error=0.1, cap=100.0, no_worse=True)
    assert a.error <= a.plain_error
