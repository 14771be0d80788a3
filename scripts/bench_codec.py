"""Benchmark the core codec: bytes, accuracy and speed per stage, beside the usual anchors.

Usage: ``python scripts/bench_codec.py [--plan 4,8,lossless] [--repeats 3] [--json out.json]``

On MiniLM (built by ``scripts/make_minilm.py`` when missing) and the digits CNN it prints, in
one run on this machine:
* per stage: bytes on the wire, share of the fp32 weight bytes, the task metric (MiniLM
  embedding cosine vs fp32 and retrieval recall@1; digits test accuracy);
* lossless anchors on the same fp32 weights: zstd level 19 and ZipNN (if installed);
* encode and restore throughput (median of ``--repeats``) in MB of fp32 weights per second:
  ``restore (device)`` decodes every stage and writes ``weights.bin`` (what a device does),
  ``restore (onnx)`` also writes a self-contained ONNX file;
* peak memory while encoding, as a multiple of the weight bytes (a fresh subprocess).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import realmodels  # noqa: E402

import p2u_onnx  # noqa: E402
from p2u_onnx import BitBudget  # noqa: E402
from p2u_onnx.api import load_stage_model, open_stages  # noqa: E402

ort.set_default_logger_severity(3)


def fp32_weight_bytes(path: Path) -> bytes:
    m = onnx.load(str(path))
    return b"".join(onnx.numpy_helper.to_array(t).astype("<f4").tobytes()
                    for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def anchors(raw: bytes) -> dict[str, float]:
    out = {"zstd-19": len(zstandard.ZstdCompressor(level=19, threads=-1).compress(raw)) / len(raw)}
    try:
        from zipnn import ZipNN

        z = ZipNN(input_format="byte", bytearray_dtype="float32")
        out["ZipNN"] = len(z.compress(raw)) / len(raw)
    except ImportError:
        out["ZipNN"] = float("nan")
    return out


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_encode_memory(model: Path, plan: str, extra: str = "") -> float:
    """Peak RSS growth (bytes) of a fresh process while it encodes."""
    code = f"""
import sys, tempfile, psutil
import p2u_onnx, p2u_onnx.encoder, onnx, numpy
def hwm():  # VmHWM starts afresh at exec (ru_maxrss keeps the parent's peak across fork+exec)
    line = [x for x in open('/proc/self/status') if x.startswith('VmHWM:')][0]
    return int(line.split()[1]) * 1024
base = psutil.Process().memory_info().rss
with tempfile.TemporaryDirectory() as d:
    p2u_onnx.encode({str(model)!r}, d + '/m.p2u', {plan!r}, {extra})
print(hwm() - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def bench_model(name: str, path: Path, plan: str, repeats: int, metric) -> dict:
    raw = fp32_weight_bytes(path)
    nbytes = len(raw)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / f"{name}.p2u"

        def enc():
            p2u_onnx.encode(path, pkg, plan, overwrite=True)

        def enc_codec():  # the codec alone: fixed bits, no calibration runs, no probe
            p2u_onnx.encode(path, Path(tmp) / "fixed.p2u", plan, budget=BitBudget(adaptive=False),
                            overwrite=True, probe=False)

        t_codec = timed(enc_codec, repeats)
        t_enc = timed(enc, repeats)
        info = p2u_onnx.inspect(pkg)

        def dev_restore():
            st = open_stages(pkg)
            st.write_weights(Path(tmp) / "weights.bin")

        t_dev = timed(dev_restore, repeats)
        t_onnx = timed(lambda: p2u_onnx.restore(pkg, Path(tmp) / "r.onnx"), repeats)
        ref = metric(ort.InferenceSession(str(path)), None)
        rows = []
        for st in info["stages"]:
            m = metric(session(load_stage_model(pkg, st["stage"])), ref)
            rows.append({**st, "share_of_fp32": st["cumulative_bytes"] / nbytes, **m})
    mem = peak_encode_memory(path, plan)
    mem_codec = peak_encode_memory(path, plan, "budget=p2u_onnx.BitBudget(adaptive=False), "
                                   "probe=False")
    return {
        "model": name, "fp32_weight_bytes": nbytes, "stages": rows, "anchors": anchors(raw),
        "encode_MBps": nbytes / t_enc / 1e6, "encode_codec_MBps": nbytes / t_codec / 1e6,
        "restore_device_MBps": nbytes / t_dev / 1e6,
        "restore_onnx_MBps": nbytes / t_onnx / 1e6, "encode_peak_x": mem / nbytes,
        "encode_codec_peak_x": mem_codec / nbytes,
        "reference": {k: v for k, v in ref.items() if not isinstance(v, np.ndarray)},
    }


def minilm_metric(sess, ref):
    if ref is None:
        emb = realmodels.minilm_reference_embeddings(sess)
        r = realmodels.minilm_eval(sess)
        return {"emb": emb, "recall@1": r["recall@1"], "mrr": r["mrr"]}
    r = realmodels.minilm_eval(sess, ref["emb"])
    return {"cosine_mean": r["cosine_mean"], "cosine_min": r["cosine_min"],
            "recall@1": r["recall@1"], "mrr": r["mrr"]}


def digits_metric(sess, ref):
    return {"accuracy": realmodels.digits_accuracy(sess)}


def print_report(r: dict) -> None:
    print(f"\n{r['model']}: {r['fp32_weight_bytes'] / 1e6:.1f} MB of fp32 weights; "
          f"reference {r['reference']}")
    keys = [k for k in r["stages"][0] if k in ("cosine_mean", "cosine_min", "recall@1", "mrr",
                                                "accuracy")]
    print(f"{'stage':>5} {'bits':>9} {'bytes':>11} {'cum. share':>10} {'max err':>10} "
          + " ".join(f"{k:>11}" for k in keys))
    for s in r["stages"]:
        print(f"{s['stage']:>5} {str(s['bits']):>9} {s['bytes']:>11} {s['share_of_fp32']:>10.2%} "
              f"{s['max_abs_error']:>10.3g} " + " ".join(f"{s[k]:>11.4f}" for k in keys))
    a = r["anchors"]
    print(f"anchors (lossless, same fp32 weights): zstd-19 {a['zstd-19']:.2%}, "
          f"ZipNN {a['ZipNN']:.2%}")
    print(f"encode, default (calibration runs + probe): {r['encode_MBps']:.0f} MB/s, peak "
          f"memory {r['encode_peak_x']:.2f}x the weights")
    print(f"encode, codec alone (--fixed-bits --no-probe): {r['encode_codec_MBps']:.0f} MB/s, "
          f"peak memory {r['encode_codec_peak_x']:.2f}x the weights")
    print(f"restore (device: decode every stage, write weights.bin) "
          f"{r['restore_device_MBps']:.0f} MB/s, restore (self-contained onnx file) "
          f"{r['restore_onnx_MBps']:.0f} MB/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="4,8,lossless")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}, "
          f"zstandard {zstandard.__version__}, plan {args.plan}")
    minilm = realmodels.MINILM_DEFAULT_PATH
    if not minilm.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_minilm.py")], check=True)
    results = [
        bench_model("digits-cnn", ROOT / "models" / "digits_cnn.onnx", args.plan, args.repeats,
                    digits_metric),
        bench_model("minilm", minilm, args.plan, args.repeats, minilm_metric),
    ]
    for r in results:
        print_report(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
