"""Encode, restore and verify a model past the 2 GB protobuf limit (external data).

Usage: ``python scripts/big_model.py [--gib 2.2] [--workdir build/big]``

Builds a stack of MatMul+Relu layers with random float32 weights, saved with external data
(a single protobuf of this size cannot be serialized), then times ``p2u encode`` (default
plan), ``p2u verify`` and ``p2u restore`` of the last stage, checks the restored model's output
against the original's at atol 0 in onnxruntime, and prints sizes and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import p2u_onnx


def build(path: Path, gib: float, width: int = 4096) -> int:
    layers = max(1, int(gib * 2**30 / (width * width * 4)) + 1)
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((width, width), dtype=np.float32) * np.float32(1 / np.sqrt(width))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"]))
        x = f"a{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, width])], [helper.make_tensor_value_info(
            x, TensorProto.FLOAT, [1, width])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return layers * width * width * 4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.2)
    ap.add_argument("--workdir", type=Path, default=Path("build/big"))
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    src = args.workdir / "big.onnx"
    nbytes = build(src, args.gib)
    print(f"model: {nbytes / 2**30:.2f} GiB of fp32 weights in external data")
    t = time.perf_counter()
    r = p2u_onnx.encode(src, args.workdir / "big.p2u")
    print(f"encode: {time.perf_counter() - t:.1f} s; stages (cumulative share): " + ", ".join(
        f"{s['cumulative_bytes'] / nbytes:.1%}" for s in r.manifest["stages"]))
    t = time.perf_counter()
    p2u_onnx.verify(args.workdir / "big.p2u")
    print(f"verify (every stage replayed, lossless digest matches): {time.perf_counter() - t:.1f} s")
    out = args.workdir / "restored.onnx"
    t = time.perf_counter()
    p2u_onnx.restore(args.workdir / "big.p2u", out)
    print(f"restore: {time.perf_counter() - t:.1f} s -> {out.name} + {out.name}.data")
    x = np.random.default_rng(1).standard_normal((1, 4096), dtype=np.float32)
    a = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    print(f"restored outputs identical to the original: {np.array_equal(a, b)}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak RSS of this process: {peak / 2**30:.2f} GiB ({peak / nbytes:.2f}x the weights)")
    return 0 if np.array_equal(a, b) else 1


if __name__ == "__main__":
    sys.exit(main())
