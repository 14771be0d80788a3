"""How fast the base runs against the original model: plain onnxruntime and ProgressiveSession.

For each model: encode it (default options), then time in one process, interleaved for
``--seconds`` per model, the original model, ``base.onnx`` in plain onnxruntime and stage 0 of
:class:`~p2u_onnx.runtime.ProgressiveSession`, also with ``session.disable_quant_qdq=1``
("stage 0 float": the MatMul weights folded to float at load as well). Each round runs every
session once, in a shuffled order; a ratio is the median over rounds of a session's time over
the original's in the same round (ratios survive a busy machine better than times). With
``--old`` the base as encoded without :func:`~p2u_onnx.base_speed.dequantize_at_load` is
timed too (packages written before it). Memory: each session is loaded and run once in a
fresh process (Linux): ``peak`` is the highest RSS while it loads and runs (``VmHWM``, reset
after the imports), ``steady`` the RSS after the run, both above the RSS after the imports.
``package / zstd-19``: what a client downloads (manifest, stage files, probe) over ``zstd -19``
of the model file.

Models: the bundled ``models/digits_cnn.onnx`` and ``models/digits_mlp_sklearn.onnx``, and
small synthetic ones made here with onnx.helper (a conv net, a PyTorch-style Gemm MLP, an
LSTM, a GRU, a CRNN with an LSTM cell unrolled by hand, an fp16 conv net via
onnxconverter-common, a MiniLM-like MatMul+Add block),
plus ``build/minilm/minilm.onnx`` when it exists (scripts/make_minilm.py).

Usage: ``python scripts/bench_base_speed.py [--seconds 3] [--old] [--threads 1]
[--only NAME ...] [--no-rss] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import p2u_onnx  # noqa: E402
from p2u_onnx import ProgressiveSession  # noqa: E402

R = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return (R.standard_normal(shape) * (1.0 / np.sqrt(np.prod(shape[1:]) or 1))).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    g = h.make_graph(nodes, "m", inputs, outputs, [nh.from_array(a, n) for n, a in inits.items()])
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def conv_net() -> onnx.ModelProto:
    """Four 3x3 convolutions (32-64-64-128 channels) on 1x3x64x64, pooling, a Gemm head."""
    nodes, inits, x, c = [], {}, "x", 3
    for i, co in enumerate([32, 64, 64, 128]):
        inits[f"w{i}"], inits[f"b{i}"] = _w(co, c, 3, 3), _w(co)
        nodes += [h.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4),
                  h.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, c = f"r{i}", co
        if i % 2:
            nodes.append(h.make_node("MaxPool", [x], [f"p{i}"], kernel_shape=[2, 2],
                                     strides=[2, 2]))
            x = f"p{i}"
    inits["fc"], inits["fcb"] = _w(10, c), _w(10)
    nodes += [h.make_node("GlobalAveragePool", [x], ["gap"]),
              h.make_node("Flatten", ["gap"], ["flat"]),
              h.make_node("Gemm", ["flat", "fc", "fcb"], ["y"], transB=1)]
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 64, 64])],
                  [h.make_tensor_value_info("y", TP.FLOAT, [1, 10])], inits)


def gemm_mlp() -> onnx.ModelProto:
    """PyTorch-style MLP: Gemm(transB=1) 784-1024-1024-1024-10, batch 1."""
    nodes, inits, x, d = [], {}, "x", 784
    for i, n in enumerate([1024, 1024, 1024, 10]):
        inits[f"w{i}"], inits[f"b{i}"] = _w(n, d), _w(n)
        nodes.append(h.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"], transB=1))
        x, d = f"g{i}", n
        if i < 3:
            nodes.append(h.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(h.make_node("Identity", [x], ["y"]))
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 784])],
                  [h.make_tensor_value_info("y", TP.FLOAT, [1, 10])], inits)


def rnn(op: str) -> onnx.ModelProto:
    """Two stacked ``op`` layers (hidden 256) over 40 steps of 64 features, a Gemm head."""
    gates = {"LSTM": 4, "GRU": 3}[op]
    hid, feat, steps = 256, 64, 40
    nodes, inits, x, d = [], {}, "x", feat
    for i in range(2):
        inits[f"W{i}"], inits[f"R{i}"] = _w(1, gates * hid, d), _w(1, gates * hid, hid)
        inits[f"B{i}"] = _w(1, 2 * gates * hid)
        nodes += [h.make_node(op, [x, f"W{i}", f"R{i}", f"B{i}"], [f"y{i}"], hidden_size=hid),
                  h.make_node("Squeeze", [f"y{i}", "ax1"], [f"s{i}"])]
        x, d = f"s{i}", hid
    inits["ax1"] = np.array([1], np.int64)
    inits["fc"], inits["fcb"] = _w(32, hid), _w(32)
    inits["last"] = np.array(steps - 1, np.int64)
    nodes += [h.make_node("Gather", [x, "last"], ["last_step"], axis=0),
              h.make_node("Gemm", ["last_step", "fc", "fcb"], ["y"], transB=1)]
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [steps, 1, feat])],
                  [h.make_tensor_value_info("y", TP.FLOAT, [1, 32])], inits)


def crnn_unrolled() -> onnx.ModelProto:
    """A CRNN-style reader: two convolutions over a 1x1x32x128 strip, then an LSTM cell
    unrolled over 32 columns by hand (MatMul + Add + Sigmoid/Tanh per step): its two weight
    matrices are each read by 32 MatMuls."""
    hid, feat, steps = 256, 128, 32
    inits = {"c1": _w(16, 1, 3, 3), "c1b": _w(16), "c2": _w(32, 16, 3, 3), "c2b": _w(32),
             "W": _w(feat, 4 * hid), "R": _w(hid, 4 * hid), "b": _w(4 * hid),
             "h0": np.zeros((1, hid), np.float32), "fc": _w(hid, 40),
             "pool": np.array([0, 2, 1, 3], np.int64), "cols": np.array([steps, 1, feat],
                                                                        np.int64)}
    nodes = [h.make_node("Conv", ["x", "c1", "c1b"], ["a"], pads=[1] * 4),
             h.make_node("Relu", ["a"], ["ar"]),
             h.make_node("MaxPool", ["ar"], ["ap"], kernel_shape=[2, 4], strides=[2, 4]),
             h.make_node("Conv", ["ap", "c2", "c2b"], ["b2"], pads=[1] * 4),
             h.make_node("Relu", ["b2"], ["br"]),
             h.make_node("MaxPool", ["br"], ["bp"], kernel_shape=[4, 1], strides=[4, 1]),
             # [1, 32, 4, 32] -> columns [32, 1, 128]
             h.make_node("Transpose", ["bp"], ["t"], perm=[3, 0, 1, 2]),
             h.make_node("Reshape", ["t", "cols"], ["seq"])]
    hs, c = "h0", "h0"
    for i in range(steps):
        inits[f"i{i}"] = np.array(i, np.int64)
        p = f"s{i}_"
        nodes += [h.make_node("Gather", ["seq", f"i{i}"], [p + "x"], axis=0),
                  h.make_node("MatMul", [p + "x", "W"], [p + "xw"]),
                  h.make_node("MatMul", [hs, "R"], [p + "hr"]),
                  h.make_node("Add", [p + "xw", p + "hr"], [p + "s"]),
                  h.make_node("Add", [p + "s", "b"], [p + "g"]),
                  h.make_node("Split", [p + "g"], [p + q for q in "ifco"], axis=1,
                              num_outputs=4),
                  h.make_node("Sigmoid", [p + "i"], [p + "si"]),
                  h.make_node("Sigmoid", [p + "f"], [p + "sf"]),
                  h.make_node("Sigmoid", [p + "o"], [p + "so"]),
                  h.make_node("Tanh", [p + "c"], [p + "tc"]),
                  h.make_node("Mul", [p + "sf", c], [p + "fc"]),
                  h.make_node("Mul", [p + "si", p + "tc"], [p + "ic"]),
                  h.make_node("Add", [p + "fc", p + "ic"], [p + "cn"]),
                  h.make_node("Tanh", [p + "cn"], [p + "tcn"]),
                  h.make_node("Mul", [p + "so", p + "tcn"], [p + "h"])]
        hs, c = p + "h", p + "cn"
    nodes.append(h.make_node("MatMul", [hs, "fc"], ["y"]))
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 1, 32, 128])],
                  [h.make_tensor_value_info("y", TP.FLOAT, [1, 40])], inits, opset=18)


def minilm_block() -> onnx.ModelProto:
    """Two transformer-like FFN blocks: MatMul + Add (384 -> 1536 -> 384) on [1, 64, 384],
    with residual adds: the pattern onnxruntime runs as MatMulNBits."""
    nodes, inits, x = [], {}, "x"
    for i in range(2):
        inits[f"w1_{i}"], inits[f"b1_{i}"] = _w(384, 1536), _w(1536)
        inits[f"w2_{i}"], inits[f"b2_{i}"] = _w(1536, 384), _w(384)
        nodes += [h.make_node("MatMul", [x, f"w1_{i}"], [f"m1_{i}"]),
                  h.make_node("Add", [f"m1_{i}", f"b1_{i}"], [f"a1_{i}"]),
                  h.make_node("Relu", [f"a1_{i}"], [f"r_{i}"]),
                  h.make_node("MatMul", [f"r_{i}", f"w2_{i}"], [f"m2_{i}"]),
                  h.make_node("Add", [f"m2_{i}", f"b2_{i}"], [f"a2_{i}"]),
                  h.make_node("Add", [f"a2_{i}", x], [f"o_{i}"])]
        x = f"o_{i}"
    nodes.append(h.make_node("Identity", [x], ["y"]))
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, ["B", 64, 384])],
                  [h.make_tensor_value_info("y", TP.FLOAT, ["B", 64, 384])], inits)


def fp16_conv() -> onnx.ModelProto:
    from onnxconverter_common import float16
    return float16.convert_float_to_float16(conv_net(), keep_io_types=True)


SYNTHETIC = {"conv": conv_net, "gemm-mlp": gemm_mlp, "lstm": lambda: rnn("LSTM"),
             "gru": lambda: rnn("GRU"), "crnn-unrolled": crnn_unrolled,
             "minilm-block": minilm_block, "fp16-conv": fp16_conv}


def feeds_for(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Random inputs for every graph input (symbolic dimensions set to 1)."""
    out = {}
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(double)": np.float64, "tensor(int64)": np.int64}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        out[i.name] = R.standard_normal(shape).astype(types.get(i.type, np.float32))
    return out


def _options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def interleaved(runs: dict[str, callable], seconds: float, ref: str = "original"
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per callable, and the median over rounds of each one's time over ``ref``'s
    in the same round: every round runs each callable once, in a shuffled order (after two
    warm-up rounds), so a load change on the machine hits all of them alike."""
    for _ in range(2):
        for f in runs.values():
            f()
    names = list(runs)
    order = np.random.default_rng(1)
    times: dict[str, list[float]] = {k: [] for k in runs}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or min(len(t) for t in times.values()) < 5:
        for k in order.permutation(names):
            t = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t)
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    base = np.array(times[ref])
    ratio = {k: float(np.median(np.array(v) / base)) for k, v in times.items()}
    return ms, ratio


_RSS_CHILD = r"""
import sys, json
import numpy as np, onnxruntime as ort
sys.path.insert(0, sys.argv[4])
from p2u_onnx import ProgressiveSession
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
kind, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.log_severity_level = 3
with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from here
    f.write("5")
base = status("VmRSS")
s = ProgressiveSession(path, so) if kind == "stage0" else \
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                         types.get(i.type, np.float32)) for i in s.get_inputs()}
s.run(None, feed)
print(json.dumps({"peak": status("VmHWM") - base, "steady": status("VmRSS") - base}))
"""


def rss_of(kind: str, path: Path, threads: int) -> dict[str, int] | None:
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, kind, str(path), str(threads),
                        str(ROOT)], capture_output=True, text=True, timeout=300)
    if r.returncode:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def encode_old(src: Path, pkg: Path) -> None:
    """Encode as before :func:`dequantize_at_load` existed (Gather and MatMul+Add passes only)."""
    from p2u_onnx import base_speed, encoder
    saved = encoder.speed_up_base
    encoder.speed_up_base = lambda m: base_speed.gather_then_dequantize(m) + \
        base_speed.keep_matmul_add(m)
    try:
        p2u_onnx.encode(src, pkg)
    finally:
        encoder.speed_up_base = saved


def bench_model(name: str, src: Path, work: Path, args) -> dict:
    pkg = work / f"{name}.p2u"
    row: dict = {"model": name, "mb": src.stat().st_size / 1e6}
    try:
        p2u_onnx.encode(src, pkg)
    except Exception as e:  # reported, not hidden
        row["error"] = f"encode: {type(e).__name__}: {e}"
        return row
    # the whole package a client downloads against zstd -19 of the model file
    import zstandard

    row["package_bytes"] = sum(p.stat().st_size for p in pkg.iterdir() if p.name in (
        "manifest.json", "probe.npz") or p.name.startswith("stage-"))
    row["zstd19_bytes"] = len(zstandard.ZstdCompressor(level=19).compress(src.read_bytes()))
    so = _options(args.threads)
    sessions = {}
    t = time.perf_counter()
    sessions["original"] = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    row["load_original"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        sessions["base"] = ort.InferenceSession(str(pkg / "base.onnx"), _options(args.threads),
                                                providers=["CPUExecutionProvider"])
        row["load_base"] = time.perf_counter() - t
    except Exception as e:
        row["error"] = f"base.onnx does not load: {str(e).splitlines()[0][:120]}"
    t = time.perf_counter()
    progressive = ProgressiveSession(pkg, _options(args.threads))
    row["load_stage0"] = time.perf_counter() - t
    sessions["stage0"] = progressive
    so = _options(args.threads)  # every weight folded to float at load, MatMuls too
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    float_stage0 = ProgressiveSession(pkg, so)
    sessions["stage0_float"] = float_stage0
    if args.old:
        old = work / f"{name}-old.p2u"
        try:
            encode_old(src, old)
            sessions["old_base"] = ort.InferenceSession(str(old / "base.onnx"),
                                                        _options(args.threads),
                                                        providers=["CPUExecutionProvider"])
        except Exception as e:
            row["old_error"] = str(e).splitlines()[0][:120]
    feed = feeds_for(sessions["original"])
    ref = sessions["original"].run(None, feed)[0].astype(np.float64)
    out = progressive.run(None, feed)[0].astype(np.float64)
    row["stage0_cosine"] = float((ref.ravel() @ out.ravel()) /
                                 (np.linalg.norm(ref) * np.linalg.norm(out) + 1e-30))
    row["ms"], row["ratio"] = interleaved(
        {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, args.seconds)
    progressive.close()
    float_stage0.close()
    if not args.no_rss:
        row["rss"] = {"original": rss_of("ort", src, args.threads),
                      "base": rss_of("ort", pkg / "base.onnx", args.threads),
                      "stage0": rss_of("stage0", pkg, args.threads)}
    return row


def _mb(x: dict | None, key: str) -> str:
    return "-" if not x else f"{x[key] / 1e6:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per model")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per session")
    ap.add_argument("--old", action="store_true",
                    help="also time the base encoded without dequantize_at_load")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--only", nargs="*", help="model names to run")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    ort.set_default_logger_severity(3)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-base-speed-") as tmp:
        work = Path(tmp)
        models = {"digits_cnn": ROOT / "models" / "digits_cnn.onnx",
                  "digits_mlp_sklearn": ROOT / "models" / "digits_mlp_sklearn.onnx"}
        for name, make in SYNTHETIC.items():
            if args.only and name not in args.only:
                continue
            try:
                m = make()
            except ImportError as e:
                print(f"{name}: skipped ({e})")
                continue
            models[name] = work / f"{name}.onnx"
            onnx.save(m, str(models[name]))
        minilm = ROOT / "build" / "minilm" / "minilm.onnx"
        if minilm.is_file():
            models["minilm"] = minilm
        else:
            print("minilm: skipped (build/minilm/minilm.onnx not found; "
                  "scripts/make_minilm.py makes it)")
        for name, src in models.items():
            if args.only and name not in args.only:
                continue
            row = bench_model(name, src, work, args)
            rows.append(row)
            if "ms" not in row:
                print(f"{name}: {row.get('error')}")
                continue
            print(f"{name}: done", file=sys.stderr)
    cols = ["original", "base", "stage0"] + (["old_base"] if args.old else [])
    print(f"\nonnxruntime {ort.__version__}, {args.threads} intra-op thread(s), "
          f"{args.seconds:g} s interleaved per model; ratios: median over rounds of time / "
          "original's time in the same round")
    head = ("| model | MB | orig ms | base.onnx ms | stage 0 ms | base / orig | stage 0 / orig |"
            " stage 0 float / orig |")
    sep = "|---|---|---|---|---|---|---|---|"
    if args.old:
        head += " old base / orig |"
        sep += "---|"
    head += (" stage-0 cosine | peak RSS MB orig / base / stage 0 |"
             " steady RSS MB orig / base / stage 0 | package / zstd-19 |")
    sep += "---|---|---|---|"
    print(head)
    print(sep)
    for r in rows:
        if "ms" not in r:
            print(f"| {r['model']} | {r['mb']:.2f} | {r.get('error')} |")
            continue
        ms, ratio = r["ms"], r["ratio"]
        line = (f"| {r['model']} | {r['mb']:.2f} | {ms['original']:.3f} | "
                f"{ms.get('base', float('nan')):.3f} | {ms['stage0']:.3f} | "
                f"{ratio.get('base', float('nan')):.2f} | {ratio['stage0']:.2f} | "
                f"{ratio['stage0_float']:.2f} |")
        if args.old:
            line += f" {ratio.get('old_base', float('nan')):.2f} |"
        rss = r.get("rss") or {}
        line += (f" {r['stage0_cosine']:.4f} | {_mb(rss.get('original'), 'peak')} / "
                 f"{_mb(rss.get('base'), 'peak')} / {_mb(rss.get('stage0'), 'peak')} | "
                 f"{_mb(rss.get('original'), 'steady')} / {_mb(rss.get('base'), 'steady')} / "
                 f"{_mb(rss.get('stage0'), 'steady')} | "
                 f"{r['package_bytes'] / r['zstd19_bytes']:.2f} "
                 f"({r['package_bytes']:,} / {r['zstd19_bytes']:,}) |")
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
