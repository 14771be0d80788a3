"""Synthetic ONNX models for the edge cases the encoder must handle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(1234)


def _model(nodes, inputs, outputs, inits=(), opset=17, functions=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                          functions=list(functions))
    m.ir_version = 8
    return m


def vi(name, elem=TensorProto.FLOAT, shape=("N", 64)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def weight(shape, scale=0.05, dtype=np.float32, rng=RNG):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def mlp(dtype=np.float32, opset=17, din=64, hidden=128, dout=32) -> onnx.ModelProto:
    """x @ W1 + b1 -> Relu -> @ W2, in ``dtype`` (fp32/fp16/fp64)."""
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(weight((din, hidden), dtype=dtype), "W1"),
             numpy_helper.from_array(weight((hidden,), dtype=dtype), "b1"),
             numpy_helper.from_array(weight((hidden, dout), dtype=dtype), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "W2"], ["y"])]
    return _model(nodes, [vi("x", et, ("N", din))], [vi("y", et, ("N", dout))], inits, opset)


def bf16_mlp() -> onnx.ModelProto:
    """bfloat16 weights cast to float for the compute (as mixed-precision exports do)."""
    w = weight((64, 96))
    u = w.view(np.uint32)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    t = helper.make_tensor("Wb", TensorProto.BFLOAT16, [64, 96], bits.tobytes(), raw=True)
    nodes = [helper.make_node("Cast", ["Wb"], ["W"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    return _model(nodes, [vi("x", shape=("N", 64))], [vi("y", shape=("N", 96))], [t])


def awkward_values(n=64 * 96) -> np.ndarray:
    """NaN (with payload), +-Inf, -0.0, subnormals, a huge outlier, and normal weights."""
    w = weight((n,))
    w[0] = np.nan
    w[1] = np.inf
    w[2] = -np.inf
    w[3] = -0.0
    w[4:8] = np.float32(1e-40)
    w[9] = 3e38
    w[10] = np.uint32(0x7FC01234).view(np.float32)  # NaN payload
    w[100:200] = 0.0
    return w


def edge_model() -> onnx.ModelProto:
    """One graph with most of the awkward cases at once:

    * shared initializer ``W`` read by two MatMuls and also listed as a graph input;
    * a weight held by a Constant node (``Wc``);
    * an If whose branches have their own initializers; a Loop body reading outer ``W``;
    * Resize scales (float, must stay exact) and an int64 shape tensor;
    * a model-local function whose body holds a weight in a Constant node;
    * all-zero, constant and awkward-valued tensors (NaN/Inf/-0.0/subnormal/outlier).
    """
    W = weight((64, 64))
    awk = awkward_values(64 * 64).reshape(64, 64)
    zeros = np.zeros((64, 64), np.float32)
    const = np.full((64, 64), 0.125, np.float32)
    then_w = weight((64, 64))
    else_w = weight((64, 64))
    fw = weight((64, 64))

    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "Wt"], ["o_then"])], "then", [],
        [vi("o_then")], [numpy_helper.from_array(then_w, "Wt")])
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "We"], ["o_else"])], "else", [],
        [vi("o_else")], [numpy_helper.from_array(else_w, "We")])
    body = helper.make_graph(
        [helper.make_node("MatMul", ["v_in", "W"], ["v_mm"]),
         helper.make_node("Tanh", ["v_mm"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), vi("v_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vi("v_out")])
    fn = helper.make_function(
        "custom.fn", "Proj", ["inp"], ["outp"],
        [helper.make_node("Constant", [], ["fw"], value=numpy_helper.from_array(fw, "fw")),
         helper.make_node("MatMul", ["inp", "fw"], ["outp"])],
        opset_imports=[helper.make_opsetid("", 17)])

    nodes = [
        helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(weight((64, 64)), "Wc")),
        helper.make_node("MatMul", ["x", "W"], ["a0"]),
        helper.make_node("MatMul", ["a0", "Wc"], ["a1"]),
        helper.make_node("MatMul", ["a1", "W"], ["a"]),
        helper.make_node("MatMul", ["a", "Awk"], ["b0"]),
        helper.make_node("MatMul", ["b0", "Z"], ["bz"]),
        helper.make_node("MatMul", ["a", "C"], ["bc"]),
        helper.make_node("Add", ["bz", "bc"], ["b"]),
        helper.make_node("If", ["flag"], ["c"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "", "c"], ["d"], body=body),
        helper.make_node("Proj", ["d"], ["e"], domain="custom.fn"),
        helper.make_node("Reshape", ["e", "shape"], ["e4"]),
        helper.make_node("Resize", ["e4", "", "scales"], ["f"], mode="nearest"),
    ]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(awk, "Awk"),
             numpy_helper.from_array(zeros, "Z"), numpy_helper.from_array(const, "C"),
             numpy_helper.from_array(np.array([1, 1, -1, 64], np.int64), "shape"),
             numpy_helper.from_array(np.array([1, 1, 1, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array(2, np.int64), "trip")]
    inputs = [vi("x"), helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
              helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 64])]
    outputs = [helper.make_tensor_value_info("f", TensorProto.FLOAT, [None, None, None, None]), vi("b")]
    m = helper.make_model(
        helper.make_graph(nodes, "edge", inputs, outputs, initializer=inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.fn", 1)],
        functions=[fn])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def edge_feed(batch=3) -> dict[str, np.ndarray]:
    return {"x": weight((batch, 64), 1.0, rng=np.random.default_rng(7)),
            "flag": np.array(True)}


def regressor(offset=3.0, spread=0.1, din=64, hidden=256, seed=7) -> onnx.ModelProto:
    """A scalar regressor (one score per input, like a MOS predictor): a 3-layer MLP whose
    output varies by about ``spread`` around ``offset``. The cosine of a batch of its scores
    stays near 1 for errors as large as the spread."""
    rng = np.random.default_rng(seed)
    w3 = rng.standard_normal((hidden, 1))
    inits = [numpy_helper.from_array(weight((din, hidden), 1 / np.sqrt(din), rng=rng), "W1"),
             numpy_helper.from_array(weight((hidden, hidden), 1 / np.sqrt(hidden), rng=rng),
                                     "W2"),
             numpy_helper.from_array((w3 / np.sqrt(hidden)).astype(np.float32), "W3"),
             numpy_helper.from_array(np.array([offset], np.float32), "b3")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["h2"]),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("MatMul", ["a2", "W3"], ["s"]),
             helper.make_node("Mul", ["s", "k"], ["s2"]),
             helper.make_node("Add", ["s2", "b3"], ["y"])]
    inits.append(numpy_helper.from_array(np.array([spread], np.float32), "k"))
    return _model(nodes, [vi("x", shape=("N", din))], [vi("y", shape=("N", 1))], inits)


def classifier(din=64, hidden=256, classes=10, seed=11) -> onnx.ModelProto:
    """An MLP classifier ending in a Softmax over ``classes`` scores."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(weight((din, hidden), 1 / np.sqrt(din), rng=rng), "W1"),
             numpy_helper.from_array(weight((hidden, hidden), 1 / np.sqrt(hidden), rng=rng),
                                     "W2"),
             numpy_helper.from_array(weight((hidden, classes), 4 / np.sqrt(hidden), rng=rng),
                                     "W3")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["h2"]),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("MatMul", ["a2", "W3"], ["z"]),
             helper.make_node("Softmax", ["z"], ["p"], axis=-1)]
    return _model(nodes, [vi("x", shape=("N", din))], [vi("p", shape=("N", classes))], inits)


def detector(bias=0.0, din=64, hidden=256, frames=16, seed=13) -> onnx.ModelProto:
    """Frame-wise speech-like probabilities: x (N, din) -> MLP -> Sigmoid(z + bias) -> p (N,).
    A large negative ``bias`` puts every probability near 0 on random inputs (a voice detector
    on noise), so that they never come near a decision threshold."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(weight((din, hidden), 1 / np.sqrt(din), rng=rng), "W1"),
             numpy_helper.from_array(weight((hidden, hidden), 1 / np.sqrt(hidden), rng=rng),
                                     "W2"),
             numpy_helper.from_array(weight((hidden, 1), 2 / np.sqrt(hidden), rng=rng), "W3"),
             numpy_helper.from_array(np.array([bias], np.float32), "b3"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["h2"]),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("MatMul", ["a2", "W3"], ["z"]),
             helper.make_node("Add", ["z", "b3"], ["zb"]),
             helper.make_node("Sigmoid", ["zb"], ["s"]),
             helper.make_node("Reshape", ["s", "flat"], ["p"])]
    return _model(nodes, [vi("x", shape=("N", din))], [vi("p", shape=("N",))], inits)
