"""Synthetic twins of models with compressible weights (issue 15): clustered, fake-quantized,
pruned, and a dense control, all the same conv + MLP structure (numpy + onnx.helper)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"conv1": (32, 16, 3, 3), "conv2": (64, 32, 3, 3), "fc1": (512, 64),
          "fc2": (512, 512), "fc3": (512, 10)}


def _dense(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:] if len(s) == 4 else s[:1])))
            .astype(np.float32) for k, s in SHAPES.items()}


def _clustered(ws: dict[str, np.ndarray], n: int, rng: np.random.Generator,
               shared: bool = True) -> dict[str, np.ndarray]:
    """Each weight snapped to the nearest of ``n`` centres (quantiles: k-means-like)."""
    def snap(w, centres):
        idx = np.abs(w.reshape(-1, 1) - centres[None, :]).argmin(axis=1)
        return centres[idx].reshape(w.shape).astype(np.float32)
    if shared:
        allw = np.concatenate([w.reshape(-1) for w in ws.values()])
        c = np.quantile(allw, (np.arange(n) + 0.5) / n).astype(np.float32)
        return {k: snap(w, c) for k, w in ws.items()}
    return {k: snap(w, np.quantile(w, (np.arange(n) + 0.5) / n).astype(np.float32))
            for k, w in ws.items()}


def _fake_quant(ws: dict[str, np.ndarray], out_axes: dict[str, int]) -> dict[str, np.ndarray]:
    """Per-output-channel symmetric int8 fake quantization: scale * integer, in float32."""
    out = {}
    for k, w in ws.items():
        ax = out_axes[k]
        red = tuple(i for i in range(w.ndim) if i != ax)
        s = (np.abs(w).max(axis=red, keepdims=True) / np.float32(127)).astype(np.float32)
        q = np.clip(np.rint(w / s), -127, 127).astype(np.float32)
        out[k] = (q * s).astype(np.float32)
    return out


def _pruned(ws: dict[str, np.ndarray], rate: float) -> dict[str, np.ndarray]:
    out = {}
    for k, w in ws.items():
        t = np.quantile(np.abs(w), rate)
        out[k] = np.where(np.abs(w) > t, w, np.float32(0)).astype(np.float32)
    return out


def build(ws: dict[str, np.ndarray], rng: np.random.Generator) -> onnx.ModelProto:
    """x [N,16,16,16] -> Conv -> Relu -> Conv -> Relu -> GAP -> Gemm(transB) -> Relu ->
    MatMul -> Relu -> MatMul -> y [N,10]."""
    b = {k: (rng.standard_normal(s[0] if k != "fc3" else 10) * 0.01).astype(np.float32)
         for k, s in SHAPES.items()}
    inits = [numpy_helper.from_array(w, k) for k, w in ws.items()]
    inits += [numpy_helper.from_array(v, f"{k}_b") for k, v in b.items()
              if k in ("conv1", "conv2", "fc1")]
    inits.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "flat"))
    nodes = [helper.make_node("Conv", ["x", "conv1", "conv1_b"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "conv2", "conv2_b"], ["c2"], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Reshape", ["g", "flat"], ["f"]),
             helper.make_node("Gemm", ["f", "fc1", "fc1_b"], ["h1"], transB=1),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "fc2"], ["h2"]),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("MatMul", ["a2", "fc3"], ["y"])]
    g = helper.make_graph(nodes, "twin", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 16, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


OUT_AXES = {"conv1": 0, "conv2": 0, "fc1": 0, "fc2": 1, "fc3": 1}


def twin(kind: str, seed: int = 0) -> onnx.ModelProto:
    """``kind``: clustered (76 values shared by every tensor), clustered-own (76 per tensor),
    fakequant (per-channel int8 grid), pruned (80% zeros), dense."""
    rng = np.random.default_rng(seed)
    ws = _dense(rng)
    if kind == "clustered":
        ws = _clustered(ws, 76, rng)
    elif kind == "clustered-own":
        ws = _clustered(ws, 76, rng, shared=False)
    elif kind == "fakequant":
        ws = _fake_quant(ws, OUT_AXES)
    elif kind == "pruned":
        ws = _pruned(ws, 0.8)
    elif kind != "dense":
        raise ValueError(kind)
    return build(ws, rng)


KINDS = ("clustered", "clustered-own", "fakequant", "pruned", "dense")
