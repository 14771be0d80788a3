"""The base-graph passes change how onnxruntime computes the base, never what it computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import p2u_onnx
from p2u_onnx.api import open_stages
from p2u_onnx.format import load_manifest
from p2u_onnx.runtime import ProgressiveSession
from p2u_onnx.base_speed import dequantize_at_load, gather_then_dequantize, keep_matmul_add
from p2u_onnx.reconstruct import pack_codes

RNG = np.random.default_rng(7)
V, H, BLOCK = 50, 64, 32


def _codes_tensor(name: str, codes: np.ndarray, onnx_type: int) -> onnx.TensorProto:
    """Integer codes packed the way ONNX stores ``onnx_type`` (raw bytes, as the encoder's)."""
    return helper.make_tensor(name, onnx_type, list(codes.shape), pack_codes(codes, onnx_type),
                              raw=True)


def _table_model(onnx_type: int, lo: int, hi: int, zero_point: bool, per_tensor: bool,
                 opset: int, extra_consumer: str | None = None) -> onnx.ModelProto:
    codes = RNG.integers(lo, hi + 1, (V, H))
    scale = RNG.uniform(0.01, 0.1, () if per_tensor else (V, H // BLOCK)).astype(np.float32)
    inits = [_codes_tensor("q", codes, onnx_type), numpy_helper.from_array(scale, "s")]
    dq_in = ["q", "s"]
    if zero_point:
        zp = RNG.integers(lo, hi + 1, scale.shape)
        inits.append(_codes_tensor("zp", zp, onnx_type))
        dq_in.append("zp")
    attrs = {} if per_tensor else {"axis": 1, "block_size": BLOCK}
    nodes = [helper.make_node("DequantizeLinear", dq_in, ["table"], name="dq", **attrs),
             helper.make_node("Gather", ["table", "ids"], ["y"], axis=0),
             helper.make_node("Gather", ["table", "ids2"], ["y2"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", H]),
               helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["c", H])]
    if extra_consumer:
        nodes.append(helper.make_node(extra_consumer, ["x", "table"], ["z"], name="extra"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [V, H]))
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["a", "b"]),
              helper.make_tensor_value_info("ids2", TensorProto.INT64, ["c"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [V, V])]
    g = helper.make_graph(nodes, "table", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    feed = {i.name: feed[i.name] for i in model.graph.input}
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feed)


FEED = {"ids": RNG.integers(0, V, (3, 7)), "ids2": np.array([0, V - 1, 5]),
        "x": RNG.standard_normal((V, V)).astype(np.float32)}


@pytest.mark.parametrize("onnx_type,lo,hi,zero_point,per_tensor,opset", [
    (TensorProto.INT4, -8, 7, False, False, 21),
    (TensorProto.UINT4, 0, 15, False, False, 21),
    (TensorProto.INT4, -8, 7, False, True, 21),
    (TensorProto.INT8, -128, 127, True, False, 21),
    (TensorProto.UINT8, 0, 255, False, True, 13),
    (TensorProto.INT2, -2, 1, False, False, 25),
    (TensorProto.UINT2, 0, 3, False, False, 25),
])
def test_gather_then_dequantize_is_exact(onnx_type, lo, hi, zero_point, per_tensor, opset):
    model = _table_model(onnx_type, lo, hi, zero_point, per_tensor, opset)
    try:
        before = _run(model, FEED)
    except Exception as e:  # an onnxruntime without this type cannot run either graph
        pytest.skip(f"onnxruntime cannot run {TensorProto.DataType.Name(onnx_type)}: {e}")
    after_model = onnx.ModelProto()
    after_model.CopyFrom(model)
    assert gather_then_dequantize(after_model) == 2
    onnx.checker.check_model(after_model, full_check=True)
    # nothing dequantizes the whole table any more
    assert all(n.input[0] != "q" for n in after_model.graph.node
               if n.op_type == "DequantizeLinear")
    after = _run(after_model, FEED)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)


def test_tables_with_other_readers_are_left_alone():
    model = _table_model(TensorProto.INT4, -8, 7, False, False, 21, extra_consumer="MatMul")
    before = model.SerializeToString()
    assert gather_then_dequantize(model) == 0
    assert model.SerializeToString() == before
    # the codes read by a second DequantizeLinear: their type must not change
    model = _table_model(TensorProto.INT4, -8, 7, False, False, 21)
    model.graph.node.append(helper.make_node("DequantizeLinear", ["q", "s"], ["t2"], axis=1,
                                             block_size=BLOCK))
    before = model.SerializeToString()
    assert gather_then_dequantize(model) == 0
    assert model.SerializeToString() == before


def _mlp_with_embedding(batch_dim) -> onnx.ModelProto:
    emb = (RNG.standard_normal((V, H)) * 0.1).astype(np.float32)
    w = (RNG.standard_normal((H, 1024)) * 0.1).astype(np.float32)
    b = (RNG.standard_normal(1024) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["y"])]
    g = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("ids", TensorProto.INT64, [batch_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 1024])],
        [numpy_helper.from_array(a, n) for a, n in ((emb, "emb"), (w, "w"), (b, "b"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_encoded_base_uses_low_bit_kernels(tmp_path):
    """A 2-D MatMul + Add keeps onnxruntime's low-bit MatMul (its Add becomes Sum); the table
    is gathered before it is dequantized; the base still computes its stage-0 weights."""
    src = tmp_path / "m.onnx"
    onnx.save(_mlp_with_embedding("N"), str(src))
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(src, pkg, "4,lossless", p2u_onnx.QuantConfig(min_elements=64),
                    p2u_onnx.BitBudget(adaptive=False))
    base = onnx.load(str(pkg / "base.onnx"), load_external_data=False)
    ops = [n.op_type for n in base.graph.node]
    assert "Sum" in ops and "Add" not in ops
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    # float activations in the low-bit kernel (onnxruntime's default, level 4, rounds them to
    # 8 bits), so that the result can be held to float precision
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    s = ort.InferenceSession(str(pkg / "base.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(options.optimized_model_filepath,
                                               load_external_data=False).graph.node]
    assert "MatMulNBits" in optimized and "Gemm" not in optimized
    ids = np.array([0, 3, V - 1, 3])
    y = s.run(None, {"ids": ids})[0]
    state = open_stages(pkg, 0)
    emb, w = state.weight("emb"), state.weight("w")
    b = numpy_helper.to_array(next(t for t in base.graph.initializer if t.name == "b"),
                              base_dir=str(pkg))
    expect = emb[ids].astype(np.float64) @ w + b
    assert np.abs(y - expect).max() < 1e-4 * max(1.0, np.abs(expect).max())


def test_dynamic_matmul_add_is_left_alone():
    model = _mlp_with_embedding("N")
    e = helper.make_tensor_value_info("e3", TensorProto.FLOAT, ["B", "T", H])
    model.graph.input.append(e)
    model.graph.node[1].input[0] = "e3"  # a 3-D input with unknown dims: no Gemm fusion
    w = model.graph.initializer[1]
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"]))
    model.graph.initializer.extend([
        _codes_tensor("wq", RNG.integers(-100, 100, tuple(w.dims)), TensorProto.INT8),
        numpy_helper.from_array(np.float32(0.01), "ws")])
    model.graph.initializer.remove(w)
    assert keep_matmul_add(model) == 0
    model.graph.node[2].input[0] = "e"  # 1-D ids -> 2-D e: the fusion would apply
    assert keep_matmul_add(model) == 1


def test_tables_inside_subgraphs_are_rewritten():
    """Both branches of an If hold a table and its Gather (the main graph is rewritten after
    its subgraphs, so that copying its nodes keeps their rewrites)."""
    table = _table_model(TensorProto.INT4, -8, 7, False, False, 21)
    branches = []
    for name in ("then", "else"):
        g = onnx.GraphProto()
        g.CopyFrom(table.graph)
        g.name = name
        del g.node[2:]  # DequantizeLinear + the Gather of `ids`
        del g.input[:]
        del g.output[1:]
        branches.append(g)
    branches[1].node[1].input[1] = "ids_else"
    main = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["ids_else"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=branches[0],
                          else_branch=branches[1])],
        "main", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("ids", TensorProto.INT64, ["a", "b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", H])])
    model = helper.make_model(main, opset_imports=[helper.make_opsetid("", 21)])
    feeds = [{"cond": np.array(c), "ids": FEED["ids"]} for c in (True, False)]
    before = [_run(model, f) for f in feeds]
    assert gather_then_dequantize(model) == 2
    onnx.checker.check_model(model, full_check=True)
    for b in model.graph.node[1].attribute:
        assert all(n.input[0] != "q" for n in b.g.node if n.op_type == "DequantizeLinear")
    for f, ref in zip(feeds, before):
        assert np.array_equal(_run(model, f)[0], ref[0])


# ---------------------------------------------------------------- dequantize_at_load


def _weight_model(onnx_type: int, lo: int, hi: int, shape: tuple[int, ...], mode: str,
                  axis: int = 0, block: int = 0, zero_point: bool = False,
                  scale_type=np.float32, opset: int = 21, reader: str = "Identity"
                  ) -> onnx.ModelProto:
    """DequantizeLinear(codes, scale[, zero point]) read by ``reader`` (Identity: the weight
    itself is the output)."""
    codes = RNG.integers(lo, hi + 1, shape)
    if mode == "tensor":
        sshape, attrs = (), {}
    elif mode == "channel":
        sshape, attrs = (shape[axis],), {"axis": axis}
    else:
        sshape = tuple(-(-d // block) if i == axis else d for i, d in enumerate(shape))
        attrs = {"axis": axis, "block_size": block}
    scale = RNG.uniform(0.01, 0.1, sshape).astype(scale_type)
    inits = [_codes_tensor("q", codes, onnx_type), numpy_helper.from_array(scale, "s")]
    dq_in = ["q", "s"]
    if zero_point:
        inits.append(_codes_tensor("zp", RNG.integers(lo, hi + 1, sshape), onnx_type))
        dq_in.append("zp")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(scale_type))
    nodes = [helper.make_node("DequantizeLinear", dq_in, ["w"], name="dq", **attrs)]
    inputs, y_shape = [], list(shape)
    if reader == "Identity":
        nodes.append(helper.make_node("Identity", ["w"], ["y"]))
    else:  # MatMul / Gemm(transB=1) / Conv-like readers with an input x
        x_shape = {"MatMul": [3, shape[0]], "Gemm": [3, shape[1]]}[reader]
        inputs.append(helper.make_tensor_value_info("x", elem, x_shape))
        y_shape = [3, shape[1] if reader == "MatMul" else shape[0]]
        nodes.append(helper.make_node(reader, ["x", "w"], ["y"],
                                      **({"transB": 1} if reader == "Gemm" else {})))
    g = helper.make_graph(nodes, "w", inputs, [helper.make_tensor_value_info("y", elem, y_shape)],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
             optimized: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("onnx_type,lo,hi,shape,mode,axis,block,zero_point,scale_type,opset", [
    (TensorProto.INT4, -8, 7, (64, 32, 3, 3), "block", 1, 32, False, np.float32, 21),
    (TensorProto.INT4, -8, 7, (10, 45), "block", 1, 32, False, np.float32, 21),  # padded
    (TensorProto.UINT4, 0, 15, (9, 7, 5), "block", 0, 4, True, np.float32, 21),  # odd count
    (TensorProto.INT4, -8, 7, (16, 64), "block", 1, 32, True, np.float32, 21),
    (TensorProto.INT4, -8, 7, (5, 7), "channel", 1, 0, True, np.float32, 21),
    (TensorProto.INT2, -2, 1, (6, 40), "block", 1, 16, True, np.float32, 25),
    (TensorProto.INT4, -8, 7, (30, 20), "channel", 0, 0, False, np.float32, 21),
    (TensorProto.INT4, -8, 7, (16, 16), "tensor", 0, 0, False, np.float32, 21),
    (TensorProto.INT8, -128, 127, (1, 512, 64), "block", 2, 32, True, np.float32, 21),
    (TensorProto.UINT8, 0, 255, (40, 24), "channel", 1, 0, True, np.float32, 13),
    (TensorProto.INT8, -128, 127, (40, 24), "tensor", 0, 0, False, np.float32, 13),
    (TensorProto.INT4, -8, 7, (32, 64), "block", 1, 32, False, np.float16, 21),
    (TensorProto.INT2, -2, 1, (8, 64, 3), "block", 1, 32, False, np.float32, 25),
    (TensorProto.UINT2, 0, 3, (7, 13), "block", 1, 16, True, np.float32, 25),
])
def test_dequantize_at_load_is_exact_and_folded(tmp_path, onnx_type, lo, hi, shape, mode, axis,
                                                block, zero_point, scale_type, opset):
    """The rewritten weight equals DequantizeLinear's bit for bit, and onnxruntime computes it
    once at load: no DequantizeLinear (nor any of the new ops) is left to run."""
    model = _weight_model(onnx_type, lo, hi, shape, mode, axis, block, zero_point, scale_type,
                          opset)
    try:
        before = _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {})[0]
    except Exception as e:  # an onnxruntime without this type cannot run either graph
        pytest.skip(f"onnxruntime cannot run {TensorProto.DataType.Name(onnx_type)}: {e}")
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert dequantize_at_load(folded) == 1
    onnx.checker.check_model(folded, full_check=True)
    assert "DequantizeLinear" not in [n.op_type for n in folded.graph.node]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        after = _session(folded, level).run(None, {})[0]
        assert after.dtype == before.dtype and after.shape == before.shape
        assert np.array_equal(after.view(np.uint8), before.view(np.uint8))
    path = tmp_path / "optimized.onnx"
    _session(folded, optimized=str(path))
    assert {n.op_type for n in onnx.load(str(path)).graph.node} <= {"Identity"}


def test_low_bit_matmul_weights_keep_their_kernel(tmp_path):
    """A MatMul weight in 4-bit blocks along axis 0 stays DequantizeLinear (onnxruntime runs
    it as MatMulNBits) unless it is small; codes under Gemm(transB=1) are folded at load."""
    mm = _weight_model(TensorProto.INT4, -8, 7, (256, 256), "block", 0, 32, reader="MatMul")
    before = mm.SerializeToString()
    assert dequantize_at_load(mm) == 0
    assert mm.SerializeToString() == before
    path = tmp_path / "mm.onnx"
    _session(mm, optimized=str(path))
    assert "MatMulNBits" in [n.op_type for n in onnx.load(str(path)).graph.node]
    # a small one is faster in float, and its float copy costs little
    small = _weight_model(TensorProto.INT4, -8, 7, (64, 48), "block", 0, 32, reader="MatMul")
    assert dequantize_at_load(small) == 1

    gemm = _weight_model(TensorProto.INT4, -8, 7, (48, 64), "block", 1, 32, reader="Gemm")
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    ref = _session(gemm, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    assert dequantize_at_load(gemm) == 1
    path = tmp_path / "gemm.onnx"
    y = _session(gemm, optimized=str(path)).run(None, {"x": x})[0]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ["Gemm"], ops
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def _mixed_model() -> onnx.ModelProto:
    """Conv (channel and block layouts), Gemm(transB=1), GRU and a MatMul: every path."""
    r = np.random.default_rng(3)

    def w(*shape):
        return (r.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = {"c1": w(32, 4, 3, 3), "c1b": w(32), "c2": w(32, 32, 3, 3), "g": w(64, 32),
             "gb": w(64), "W": w(1, 96, 16), "R": w(1, 96, 32), "B": w(1, 192), "m": w(32, 2048),
             "seq": np.array([4, 1, 16], np.int64), "flat": np.array([4, 32], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "c1", "c1b"], ["a"], pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "c2"], ["b"], pads=[1] * 4),
             helper.make_node("GlobalAveragePool", ["b"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "g", "gb"], ["h"], transB=1),
             helper.make_node("Reshape", ["h", "seq"], ["s"]),
             helper.make_node("GRU", ["s", "W", "R", "B"], ["y"], hidden_size=32),
             helper.make_node("Reshape", ["y", "flat"], ["yf"]),
             helper.make_node("MatMul", ["yf", "m"], ["out"])]
    g = helper.make_graph(
        nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 2048])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def mixed_pkg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    src = tmp / "mixed.onnx"
    onnx.save(_mixed_model(), str(src))
    pkg = tmp / "mixed.p2u"
    p2u_onnx.encode(src, pkg, "4,8,lossless", p2u_onnx.QuantConfig(min_elements=64),
                    p2u_onnx.BitBudget(adaptive=False))
    return src, pkg


MIXED_FEED = {"x": np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)}


def _options(level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, exact_nbits=True):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if exact_nbits:  # float activations in MatMulNBits, to compare at float precision
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return so


def test_base_computes_stage0_weights_once(mixed_pkg, tmp_path):
    """The encoded base leaves only the MatMul's DequantizeLinear to onnxruntime (as
    MatMulNBits); the rest is folded at load, and the outputs are the stage-0 model's: the
    original graph with the weights open_stages(pkg, 0) decodes."""
    src, pkg = mixed_pkg
    base = onnx.load(str(pkg / "base.onnx"), load_external_data=False)
    dq = [n.input[0] for n in base.graph.node if n.op_type == "DequantizeLinear"]
    assert dq == ["m__p2u_q"]  # the MatMul weight keeps its low-bit kernel
    so = _options()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    fast = ort.InferenceSession(str(pkg / "base.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "DequantizeLinear" not in ops and "MatMulNBits" in ops and "GRU" in ops
    assert not {"Cast", "Mul", "BitShift", "Expand", "Unsqueeze"} & set(ops)  # all folded
    y = fast.run(None, MIXED_FEED)[0]

    state = open_stages(pkg, 0)
    ref_model = onnx.load(str(src))
    for t in ref_model.graph.initializer:
        if t.name in state.tensors:
            t.CopyFrom(numpy_helper.from_array(state.weight(t.name), t.name))
    ref = ort.InferenceSession(ref_model.SerializeToString(), _options(),
                               providers=["CPUExecutionProvider"]).run(None, MIXED_FEED)[0]
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    # the same graph run node by node (nothing folded) agrees as well
    slow = ort.InferenceSession(str(pkg / "base.onnx"),
                                _options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                providers=["CPUExecutionProvider"]).run(None, MIXED_FEED)[0]
    assert np.abs(y - slow).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("strategy", ["swap", "inplace"])
def test_stage0_session_is_plain_base_and_upgrades(mixed_pkg, strategy):
    """ProgressiveSession's stage 0 gives what base.onnx gives in plain onnxruntime (same
    options); every upgrade passes its probe and the last stage is the original, bit for bit."""
    src, pkg = mixed_pkg
    assert load_manifest(pkg).get("probe")
    so = _options(exact_nbits=False)
    plain = ort.InferenceSession(str(pkg / "base.onnx"), so,
                                 providers=["CPUExecutionProvider"]).run(None, MIXED_FEED)[0]
    with ProgressiveSession(pkg, _options(exact_nbits=False), strategy=strategy) as s:
        assert s.strategy == strategy
        np.testing.assert_array_equal(s.run(None, MIXED_FEED)[0], plain)
        assert s.upgrade(background=False) == s.stages - 1  # each stage checked by the probe
        final = s.run(None, MIXED_FEED)[0]
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if strategy == "inplace" else \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so = _options(level, exact_nbits=False)
    if strategy == "inplace":  # how the inplace strategy runs the float graph
        so.add_session_config_entry("session.disable_prepacking", "1")
    original = ort.InferenceSession(str(src), so,
                                    providers=["CPUExecutionProvider"]).run(None, MIXED_FEED)[0]
    np.testing.assert_array_equal(final, original)


def test_matmul_before_relu_is_folded(tmp_path):
    """onnxruntime does not fuse a MatMul whose Relu feeds one more node (it keeps the pair
    for a QuantizeLinear): that weight is folded at load, the last one (Relu -> output) keeps
    MatMulNBits; nothing is dequantized per run."""
    r = np.random.default_rng(5)
    nodes, inits, x = [], [], "x"
    for i in range(3):
        codes = r.integers(-8, 8, (256, 256))
        inits += [_codes_tensor(f"q{i}", codes, TensorProto.INT4),
                  numpy_helper.from_array(r.uniform(0.01, 0.02, (8, 256)).astype(np.float32),
                                          f"s{i}")]
        nodes += [helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"w{i}"], axis=0,
                                   block_size=32),
                  helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        x = f"r{i}"
    g = helper.make_graph(nodes, "relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                        ["n", 256])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", 256])],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    feed = {"x": r.standard_normal((5, 256)).astype(np.float32)}
    ref = _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feed)[0]
    assert dequantize_at_load(model) == 2
    assert [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"] == ["q2"]
    path = tmp_path / "optimized.onnx"
    so = _options()
    so.optimized_model_filepath = str(path)
    y = ort.InferenceSession(model.SerializeToString(), so,
                             providers=["CPUExecutionProvider"]).run(None, feed)[0]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "DequantizeLinear" not in ops and ops.count("MatMulNBits") == 1, ops
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_stage0_session_gives_the_heap_back(mixed_pkg, monkeypatch):
    """Folding at load leaves freed temporaries in glibc's heap: the base session is built,
    then the heap trimmed (once, before the session answers)."""
    from p2u_onnx import _base_session

    calls = []
    real = _base_session.ort.InferenceSession

    def built(*a, **k):
        calls.append("session")
        return real(*a, **k)

    monkeypatch.setattr(_base_session.ort, "InferenceSession", built)
    monkeypatch.setattr(_base_session, "trim_heap", lambda: calls.append("trim"))
    _, pkg = mixed_pkg
    with ProgressiveSession(pkg) as s:
        assert calls == ["session", "trim"]
        s.run(None, MIXED_FEED)


def test_inplace_base_unfolded_when_folding_would_not_fit(mixed_pkg, monkeypatch, caplog):
    """An inplace session whose memory left would not hold folding the base's weights at
    load loads the base with constant folding off, says so (strategy_reason, a warning), and
    answers as the folded base does; with the memory, it folds."""
    from p2u_onnx import runtime

    src, pkg = mixed_pkg
    base = (pkg / "base.onnx").read_bytes()
    folded = runtime.folded_bytes(base, load_manifest(pkg))
    assert folded > 0  # Conv, GRU, Gemm weights are folded; the MatMul's is not
    so = _options(exact_nbits=False)
    with ProgressiveSession(pkg, so, strategy="inplace") as s:
        assert "constant folding" not in s.strategy_reason
        ref = s.run(None, MIXED_FEED)[0]
    monkeypatch.setattr(runtime, "memory_left", lambda: (folded, "a test limit"))
    with caplog.at_level("WARNING", logger="p2u_onnx.runtime"):
        with ProgressiveSession(pkg, so, strategy="inplace") as s:
            assert "constant folding off" in s.strategy_reason
            assert "a test limit" in s.strategy_reason
            y = s.run(None, MIXED_FEED)[0]
            assert s.upgrade(background=False) == s.stages - 1
    assert "constant folding off" in caplog.text
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    with ProgressiveSession(pkg, so, strategy="swap") as s:  # swap: memory is not tight
        assert "constant folding" not in s.strategy_reason
