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


def bf16_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float initializer of 2 or more dimensions stored as bfloat16 and cast to float
    where it is read (as mixed-precision exports do)."""
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    casts = []
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2:
            u = numpy_helper.to_array(t).astype(np.float32).view(np.uint32)
            bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            name = t.name
            t.CopyFrom(helper.make_tensor(f"{name}_bf16", TensorProto.BFLOAT16, list(t.dims),
                                          bits.tobytes(), raw=True))
            casts.append(helper.make_node("Cast", [f"{name}_bf16"], [name], to=TensorProto.FLOAT))
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return m


def fp64_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in float64: weights, inputs and outputs."""
    from onnx import TensorProto, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    return m


def test_fp64_and_bf16_get_fp32_bits_per_weight(tmp_path):
    import synth

    feed32 = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    m32 = synth.mlp(np.float32, din=64, hidden=256)
    bits, cos = {}, {}
    for label, m, x in (("fp32", m32, feed32), ("bf16", bf16_twin(m32), feed32),
                        ("fp64", fp64_twin(m32), feed32.astype(np.float64))):
        path = tmp_path / f"{label}.onnx"
        onnx.save(m, str(path))
        res = p2u_onnx.encode(path, tmp_path / f"{label}.p2u")
        base = tmp_path / f"{label}.p2u" / "base.onnx"
        coded = sum(np.prod(t["shape"]) for t in res.manifest["tensors"])
        bits[label] = 8 * res.stage_bytes[0] / coded
        cos[label] = cosine(run(base, {"x": x})[0], run(path, {"x": x})[0])
        # bfloat16 weights are calibrated too (fed as float32, cast in the graph)
        assert res.manifest["allocation"]["calibrated"], res.warnings
        assert not any("calibration skipped" in n for n in res.warnings)
    # the fp64 base is not given twice the bits, nor the bf16 base half (shares are of
    # fp32-equivalent bytes), and both are as good as the fp32 one
    for label in ("fp64", "bf16"):
        assert 0.8 * bits["fp32"] <= bits[label] <= 1.25 * bits["fp32"], bits
        assert cos[label] >= min(cos["fp32"] - 0.005, 0.99) and cos[label] >= 0.985, cos


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


# ------------------------------------------------------------------ targets and warnings


def invoke(*args):
    from click.testing import CliRunner

    from p2u_onnx.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def mlp_path(tmp_path):
    import synth

    p = tmp_path / "mlp.onnx"
    onnx.save(synth.mlp(din=64, hidden=256), str(p))
    return p


def test_quality_reached_or_non_zero_exit(mlp_path, tmp_path):
    r = invoke("encode", mlp_path, "-o", tmp_path / "a.p2u", "--quality", "0.9999", "--cap",
               "0.12", "-q")
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "--quality" in line and "best reachable" in line and "--allow-below" in line
    est = float(line.split("estimated base quality ")[1].split()[0])
    best = float(line.split("best reachable ")[1].split()[0])
    assert est < 0.9999 and best > est
    assert not (tmp_path / "a.p2u").exists()
    # accepted below the target: a warning, in the output and in the manifest
    r = invoke("encode", mlp_path, "-o", tmp_path / "b.p2u", "--quality", "0.9999", "--cap",
               "0.12", "--allow-below", "-q")
    assert r.exit_code == 0, r.output
    assert "warning: estimated base quality" in r.output
    info = p2u_onnx.inspect(tmp_path / "b.p2u")
    assert any("below the target 0.9999" in n for n in info["notes"])
    r = invoke("inspect", tmp_path / "b.p2u")
    assert "warning: estimated base quality" in r.output
    # a reachable target: exit 0, no warning about it
    r = invoke("encode", mlp_path, "-o", tmp_path / "c.p2u", "--quality", "0.99", "-q")
    assert r.exit_code == 0, r.output
    assert "below the target" not in r.output
    alloc = p2u_onnx.inspect(tmp_path / "c.p2u")["allocation"]
    assert alloc["est_quality"] >= 0.99


def test_inspect_bits_column_shows_the_mix(mlp_path, tmp_path):
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(mlp_path, pkg, budget=BitBudget(budget=4.6))
    manifest = p2u_onnx.inspect(pkg, tensors=True)
    sizes = [(t["size"], t["bits"]) for t in manifest["tensor_table"]]
    mix = sum(n * b for n, b in sizes) / sum(n for n, _ in sizes)
    assert len({b for _, b in sizes}) > 1  # a real mix, not the plan's 4
    row0 = manifest["stages"][0]
    assert row0["mean_bits"] == pytest.approx(mix)
    out = invoke("inspect", pkg).output.splitlines()
    stage0 = next(line for line in out if line.split()[:1] == ["0"])
    assert stage0.split()[1] == f"{mix:.2f}"


def test_calib_file_that_is_not_npz(mlp_path, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not arrays\n")
    for opt in ("--calib", "--inputs"):
        r = invoke("encode", mlp_path, "-o", tmp_path / "x.p2u", opt, notes, "-q")
        assert r.exit_code == 1
        assert r.output.strip().count("\n") == 0 and "pickle" not in r.output
        assert "not an .npz file" in r.output, r.output
    np.savez(tmp_path / "wrong.npz", y=np.zeros((2, 64), np.float32))
    r = invoke("encode", mlp_path, "-o", tmp_path / "x.p2u", "--inputs", tmp_path / "wrong.npz")
    assert r.exit_code == 1 and "no array for input(s) x" in r.output, r.output
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 63), np.float32))
    r = invoke("encode", mlp_path, "-o", tmp_path / "x.p2u", "--inputs", tmp_path / "shape.npz")
    assert r.exit_code == 1 and "'x' has shape [2, 63]" in r.output, r.output


def test_package_compared_with_zstd19(tmp_path):
    import zstandard
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    # clustered weights (8 distinct values): zstd -19 of the file is small
    w = rng.choice(np.linspace(-0.1, 0.1, 8).astype(np.float32), (256, 256))
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "c",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "clustered.onnx"
    onnx.save(m, str(path))
    res = p2u_onnx.encode(path, tmp_path / "c.p2u")
    src = res.manifest["source"]
    data = path.read_bytes()
    assert src["file_bytes"] == len(data)
    assert src["zstd19_bytes"] == len(zstandard.ZstdCompressor(level=19).compress(data))
    pkg = tmp_path / "c.p2u"  # what a client downloads: manifest, stage files, probe
    total = sum(q.stat().st_size for q in pkg.iterdir()
                if q.name.startswith("stage-") or q.name in ("manifest.json", "probe.npz"))
    said = any("larger than zstd -19" in n and "package" in n for n in res.warnings)
    assert said == (total > src["zstd19_bytes"]), (total, src, res.warnings)
    base_said = any(n.startswith("the base (") for n in res.warnings)
    assert base_said == (res.stage_bytes[0] > src["zstd19_bytes"])


def test_sampled_zstd_reference_is_close(tmp_path, monkeypatch):
    import zstandard

    from p2u_onnx import zstd_reference as zr

    rng = np.random.default_rng(2)
    data = rng.choice(np.linspace(-1, 1, 16).astype(np.float32), 3 << 18).tobytes()  # 3 MB
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    exact = len(zstandard.ZstdCompressor(level=19).compress(data))
    monkeypatch.setattr(zr, "EXACT_LIMIT", 1 << 20)
    monkeypatch.setattr(zr, "SAMPLE_BYTES", 256 << 10)
    size, method = zr._compressed_size([p])
    assert "slices" in method
    assert abs(size - exact) / exact < 0.1, (size, exact)


def unprobeable() -> onnx.ModelProto:
    """Outputs NaN on every input: no probe can be recorded."""
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((64, 64)) * 0.1).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Sub", ["h", "h"], ["z"]),
         helper.make_node("Div", ["z", "z"], ["y"])], "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_missing_probe_is_a_warning(tmp_path):
    path = tmp_path / "nan.onnx"
    onnx.save(unprobeable(), str(path))
    r = invoke("encode", path, "-o", tmp_path / "n.p2u", "-q")
    assert r.exit_code == 0, r.output
    assert "warning: no probe recorded" in r.output and "not finite" in r.output
    info = p2u_onnx.inspect(tmp_path / "n.p2u")
    assert any(n.startswith("no probe recorded") for n in info["notes"])
    assert "warning: no probe recorded" in invoke("inspect", tmp_path / "n.p2u").output


# ------------------------------------------------------------------ shapes


def detector_twin() -> onnx.ModelProto:
    """A dynamic-shape detector in miniature: image [N, 3, H, W] with symbolic H and W through
    two stride-2 Convs, a 2x Resize and a Concat with the skip connection (a 1x1 image breaks
    it); a class id [N] that picks a row of a 4-row table (ids of 4 or more break it); a row
    weighting [N, W] that shares the image's W."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)

    def w(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

    inits = [numpy_helper.from_array(w(16, 3, 3, 3), "c1"), numpy_helper.from_array(w(32, 16, 3, 3), "c2"),
             numpy_helper.from_array(w(8, 48, 1, 1), "c3"), numpy_helper.from_array(w(4, 8), "table"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "axes")]
    nodes = [
        helper.make_node("Unsqueeze", ["rows", "axes"], ["rows4"]),
        helper.make_node("Mul", ["image", "rows4"], ["img"]),
        helper.make_node("Conv", ["img", "c1"], ["f1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2"], ["f2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f2"], ["r2"]),
        helper.make_node("Resize", ["r2", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["up", "r1"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "c3"], ["f3"], kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["f3"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["feat"]),
        helper.make_node("Cast", ["cls"], ["cls64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "cls64"], ["emb"], axis=0),
        helper.make_node("Add", ["feat", "emb"], ["scores"]),
    ]
    g = helper.make_graph(nodes, "det", [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"]),
        helper.make_tensor_value_info("cls", TensorProto.INT32, ["N"]),
        helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", "W"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def probe_feed(pkg):
    from p2u_onnx.format import load_manifest
    from p2u_onnx.probe import Probe

    manifest = load_manifest(pkg)
    assert "probe" in manifest, manifest.get("notes")
    s = ort.InferenceSession(str(pkg / "base.onnx"), providers=["CPUExecutionProvider"])
    return Probe(manifest["probe"], (pkg / "probe.npz").read_bytes(), s.get_inputs()).feed


def test_input_spec_follows_the_graph():
    from p2u_onnx.calibrate import input_spec, synthesize_feeds

    m = detector_twin()
    spec = input_spec(m, batch=1)
    h, w = spec["image"]["shape"][2:]
    assert spec["image"]["shape"][:2] == [1, 3] and h == w >= 64 and h % 4 == 0
    assert spec["rows"]["shape"] == [1, w]  # one size per symbol across inputs
    assert spec["cls"] == {"shape": [1], "high": 4}  # through the Cast, below the table's rows
    feeds = synthesize_feeds(m, batches=2)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for f in feeds:
        assert f["image"].shape[0] == f["cls"].shape[0] == f["rows"].shape[0] == 4
        assert f["cls"].max() < 4 and f["cls"].dtype == np.int32
        s.run(None, f)  # runs
    # --shape fixes the symbols of every input that shares them
    spec = input_spec(m, {"image": (2, 3, 96, 128)}, batch=1)
    assert spec["rows"]["shape"] == [2, 128] and spec["cls"]["shape"] == [2]
    with pytest.raises(p2u_onnx.P2UError, match="no input 'img'"):
        input_spec(m, {"img": (1, 3, 8, 8)})
    with pytest.raises(p2u_onnx.P2UError, match="fixes 3"):
        input_spec(m, {"image": (1, 4, 8, 8)})


def test_spatial_size_fits_windows_and_strides():
    from onnx import TensorProto, helper, numpy_helper

    from p2u_onnx.calibrate import input_spec

    # five stride-2 convs, then a 7x7 average pool: the image must be at least 7 x 32 = 224
    nodes, inits, prev = [], [], "x"
    for i in range(5):
        inits.append(numpy_helper.from_array(np.zeros((4, 4 if i else 3, 3, 3), np.float32), f"k{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"k{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]))
        prev = f"c{i}"
    nodes.append(helper.make_node("AveragePool", [prev], ["y"], kernel_shape=[7, 7]))
    g = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    shape = input_spec(m)["x"]["shape"]
    assert shape[2] == shape[3] == 224
    x = np.zeros(shape, np.float32)
    ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_dynamic_detector_gets_probe_calibration_and_run(tmp_path):
    path = tmp_path / "det.onnx"
    onnx.save(detector_twin(), str(path))
    pkg = tmp_path / "det.p2u"
    res = p2u_onnx.encode(path, pkg)
    assert not any("calibration skipped" in n or "probe" in n for n in res.warnings), res.warnings
    assert res.manifest["allocation"]["calibrated"]
    feed = probe_feed(pkg)
    assert feed["image"].shape[2] == feed["image"].shape[3] >= 64
    assert feed["rows"].shape[1] == feed["image"].shape[3]
    assert 0 <= feed["cls"].min() and feed["cls"].max() < 4
    run(pkg / "base.onnx", feed)
    # p2u run without --input: the probe's inputs
    r = invoke("run", pkg)
    assert r.exit_code == 0, r.output
    assert f"scores: shape [{feed['image'].shape[0]}, 8]" in r.output


def test_shape_option_and_inputs_file(tmp_path):
    path = tmp_path / "det.onnx"
    onnx.save(detector_twin(), str(path))
    r = invoke("encode", path, "-o", tmp_path / "s.p2u", "--shape", "image=1,3,96,96", "-q")
    assert r.exit_code == 0, r.output
    feed = probe_feed(tmp_path / "s.p2u")
    assert feed["image"].shape == (1, 3, 96, 96) and feed["rows"].shape == (1, 96)
    r = invoke("encode", path, "-o", tmp_path / "bad.p2u", "--shape", "image=1,3,x", "-q")
    assert r.exit_code != 0 and "NAME=D1,D2" in r.output
    # real inputs: calibration and the probe use them
    rng = np.random.default_rng(4)
    inputs = {"image": rng.random((3, 3, 40, 48), np.float32),
              "cls": np.array([3, 0, 2], np.int32), "rows": rng.random((3, 48), np.float32)}
    np.savez(tmp_path / "in.npz", **inputs)
    r = invoke("encode", path, "-o", tmp_path / "i.p2u", "--inputs", tmp_path / "in.npz", "-q")
    assert r.exit_code == 0, r.output
    feed = probe_feed(tmp_path / "i.p2u")
    for k, v in inputs.items():
        np.testing.assert_array_equal(feed[k], v)


def test_unrunnable_shapes_are_loud(tmp_path):
    path = tmp_path / "det.onnx"
    onnx.save(detector_twin(), str(path))
    # a 2x2 image cannot pass the Resize + Concat: no calibration, no probe, both said
    res = p2u_onnx.encode(path, tmp_path / "t.p2u",
                          budget=BitBudget(shapes={"image": (1, 3, 2, 2)}))
    assert "probe" not in res.manifest
    assert any(n.startswith("calibration skipped on synthesized inputs") for n in res.warnings)
    assert any(n.startswith("no probe recorded") and "--shape" in n for n in res.warnings)


def test_probe_inputs_too_big_to_store_are_made_again_on_the_device(tmp_path):
    from p2u_onnx.runtime import ProgressiveSession

    path = tmp_path / "det.onnx"
    onnx.save(detector_twin(), str(path))
    pkg = tmp_path / "big.p2u"
    res = p2u_onnx.encode(path, pkg, budget=BitBudget(shapes={"image": (1, 3, 640, 640)}))
    entry = res.manifest["probe"]
    assert not entry["inputs_stored"] and entry["synth"]["image"]["shape"] == [1, 3, 640, 640]
    feed = probe_feed(pkg)  # the device makes the same inputs (the digest is checked)
    assert feed["image"].shape == (1, 3, 640, 640) and feed["rows"].shape == (1, 640)
    with ProgressiveSession(str(pkg)) as sess:
        sess.upgrade(background=False)  # each stage checked against the probe
        assert sess.stage == len(res.manifest["stages"]) - 1


def test_hostile_probe_spec_is_refused():
    from p2u_onnx.errors import FormatError
    from p2u_onnx.probe import synthesize_inputs

    class Arg:
        name, type, shape = "x", "tensor(float)", ["N", 64]

    assert synthesize_inputs([Arg()], spec={"x": {"shape": [2, 64]}})["x"].shape == (2, 64)
    for bad in ({"x": {"shape": [1 << 20, 1 << 20]}}, {"x": {"shape": [-1]}}, {"x": [1]},
                {"x": {"shape": "12"}}, [1, 2], {"x": {"shape": [1] * 100}}):
        with pytest.raises(FormatError):
            synthesize_inputs([Arg()], spec=bad)


def test_image_size_the_graph_does_not_say_is_retried(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    # a patchifying Conv (32x32, stride 32) then a Gemm that expects a 7x7 grid: only a
    # 224x224 image runs, which nothing in the windows or strides says
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 32, 32)) * 0.02).astype(np.float32), "patch"),
             numpy_helper.from_array((rng.standard_normal((392, 10)) * 0.05).astype(np.float32), "head")]
    nodes = [helper.make_node("Conv", ["x", "patch"], ["p"], strides=[32, 32]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "head"], ["y"])]
    g = helper.make_graph(nodes, "vit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "patch.onnx"
    onnx.save(m, str(path))
    res = p2u_onnx.encode(path, tmp_path / "p.p2u")
    assert res.manifest["allocation"]["calibrated"]
    assert any("calibration ran on 224x224 images" in n for n in res.warnings), res.warnings
    assert probe_feed(tmp_path / "p.p2u")["x"].shape == (1, 3, 224, 224)


def test_an_empty_integer_initializer_stays_empty(tmp_path):
    """A 0-element INT64 initializer (a Concat operand in some exports) was written back into
    base.onnx with the bytes it was hashed as (its serialized TensorProto): onnxruntime refused
    the base and no stage was bit-exact."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")
    empty = numpy_helper.from_array(np.zeros((0,), np.int64), "empty")
    shape = numpy_helper.from_array(np.array([1, 32], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y0"]),
         helper.make_node("Concat", ["shape", "empty"], ["newshape"], axis=0),
         helper.make_node("Reshape", ["y0", "newshape"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [w, empty, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(src, pkg, "4,lossless")
    assert p2u_onnx.verify(pkg)["lossless_match"] is True
    x = rng.standard_normal((1, 64)).astype(np.float32)
    base = ort.InferenceSession(str(pkg / "base.onnx"), providers=["CPUExecutionProvider"])
    assert base.run(None, {"x": x})[0].shape == (1, 32)
    out = tmp_path / "r.onnx"
    p2u_onnx.restore(pkg, out)
    restored = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert numpy_helper.to_array(restored["empty"]).shape == (0,)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.array_equal(got[0], want[0])


def test_scalar_initializers_keep_their_value(tmp_path):
    """A scalar (dims []) holds one value: it is written back, not taken for an empty tensor."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y0"]),
         helper.make_node("Mul", ["y0", "two"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [w, two])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(src, pkg, "4,lossless")
    assert p2u_onnx.verify(pkg)["lossless_match"] is True
    x = rng.standard_normal((1, 64)).astype(np.float32)
    base = ort.InferenceSession(str(pkg / "base.onnx"), providers=["CPUExecutionProvider"])
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = base.run(None, {"x": x})[0].ravel()
    cos = float(got @ want[0].ravel() / np.linalg.norm(got) / np.linalg.norm(want[0]))
    assert cos > 0.97 and 0.8 < np.linalg.norm(got) / np.linalg.norm(want[0]) < 1.25


def test_large_synthesized_probe_inputs_are_made_again_not_stored(tmp_path):
    """Synthesized probe inputs over 64 KiB are not stored in probe.npz (the device makes them
    again); the package is smaller for it and every upgrade is still checked."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((32768, 8)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32768])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(src, pkg, "4,8,lossless")
    probe = p2u_onnx.inspect(pkg)  # the manifest is valid
    entry = __import__("json").loads((pkg / "manifest.json").read_text())["probe"]
    assert entry["inputs_stored"] is False and probe["stages"]
    assert (pkg / "probe.npz").stat().st_size < 8 << 10  # outputs only: 128 KiB of inputs left out
    with p2u_onnx.ProgressiveSession(pkg) as s:
        assert s.upgrade(background=False) == 2


def test_sequence_length_and_batch_fixed_by_the_export_are_found(tmp_path):
    """An export that fixed its example input's batch (1) and length (16) in a Reshape: the
    default synthesized inputs (batch 4, length 32) do not run; calibration and the probe find
    sizes that do, and say so."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((100, 64)).astype(np.float32)
    w = rng.standard_normal((16 * 64, 10)).astype(np.float32) * 0.05
    g = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"]),
         helper.make_node("Reshape", ["e", "flat"], ["f"]),
         helper.make_node("MatMul", ["f", "w"], ["y"])],
        "fixed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.array([1, 16 * 64], np.int64), "flat")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src = tmp_path / "fixed.onnx"
    onnx.save(m, str(src))
    res = p2u_onnx.encode(src, tmp_path / "fixed.p2u")
    man = res.manifest
    assert man["allocation"]["calibrated"] is True
    assert any("calibration ran on sequences of 16, one sample at a time" in n
               for n in man["notes"]), man["notes"]
    assert "probe" in man and man["probe"]["synth"]["ids"]["shape"] == [1, 16]
    with p2u_onnx.ProgressiveSession(tmp_path / "fixed.p2u") as s:
        s.upgrade().result()  # the probe checks every stage
        ids = rng.integers(0, 100, (1, 16))
        got = s.run(None, {"ids": ids})[0]
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, want)


def test_text_line_height_the_graph_does_not_fix_is_found(tmp_path):
    """A recognizer whose input height is symbolic but must be 48 (its rows are flattened into
    a fixed-width feature): square retries fail, the text-line size runs."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((3 * 48, 64)).astype(np.float32) * 0.1
    g = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
         helper.make_node("Reshape", ["t", "rows"], ["r"]),
         helper.make_node("MatMul", ["r", "w"], ["y"])],
        "lines", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "w", 64])],
        [numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.array([0, 0, 3 * 48], np.int64), "rows")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src = tmp_path / "lines.onnx"
    onnx.save(m, str(src))
    man = p2u_onnx.encode(src, tmp_path / "lines.p2u").manifest
    assert man["allocation"]["calibrated"] is True
    assert any("calibration ran on 48x320 images" in n for n in man["notes"]), man["notes"]
    assert any("(4x3x48x320)" in n for n in man["notes"]), man["notes"]
    assert man["probe"]["synth"]["x"]["shape"] == [1, 3, 48, 320]
