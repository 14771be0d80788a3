"""Package size per stage against zstd -19 of the model file, on synthetic twins with
compressible weights (clustered, fake-quantized, pruned) and a dense control.

    PYTHONPATH=. python scripts/bench_palette.py [--json out.json] [--kinds clustered,dense]
    PYTHONPATH=. python scripts/bench_palette.py --model captcha_crnn.onnx  # any .onnx file

Prints, per twin: zstd -19 of the .onnx file, each stage's cumulative bytes (stage files),
the whole package (stage files + manifest + probe), where stage 0's bytes go (base.onnx,
base.bin by segment kind), what each later stage holds (refine / exact / graph entries),
the base's class agreement and output cosine against the original (256 random inputs), and
the base's median latency against the original's in plain onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import twins  # noqa: E402

from p2u_onnx.encoder import encode  # noqa: E402
from p2u_onnx.format import read_stage  # noqa: E402


def _segments(entry, data) -> dict[str, int]:
    """Compressed bytes of each stream of a SegmentsCodec payload."""
    n = struct.unpack_from("<I", data, 0)[0]
    lengths = struct.unpack_from(f"<{n}Q", data, 4)
    names = ["symbols", "bytes", "planes2", "planes2", "planes4", "planes4", "planes4",
             "planes4"]
    out: dict[str, int] = {}
    for name, ln in zip(names, lengths):
        out[name] = out.get(name, 0) + ln
    return out


def _latency(sess, feed, n=30) -> float:
    for _ in range(3):
        sess.run(None, feed)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def _feeds(sess, kind: str, rng) -> list[dict[str, np.ndarray]]:
    """256 random inputs for a twin; for a model file, 8 feeds shaped as the probe makes them
    (symbolic dimensions 1), floats uniform in [0, 1)."""
    if kind in twins.KINDS:
        return [{"x": rng.standard_normal((256, 16, 16, 16), np.float32)}]
    from p2u_onnx.probe import synthesize_inputs

    base = synthesize_inputs(sess.get_inputs())
    return [{k: rng.random(v.shape, np.float32) if v.dtype == np.float32 else v
             for k, v in base.items()} for _ in range(8)]


def bench(kind: str, work: Path) -> dict:
    if kind in twins.KINDS:
        src = work / f"{kind}.onnx"
        src.write_bytes(twins.twin(kind).SerializeToString())
    else:
        src = Path(kind)
        kind = src.stem
    raw = src.read_bytes()
    z19 = len(zstandard.ZstdCompressor(level=19).compress(raw))
    pkg = work / f"{kind}.p2u"
    res = encode(src, pkg, overwrite=True)
    man = res.manifest
    cum = [s["cumulative_bytes"] for s in man["stages"]]
    extra = sum((pkg / f).stat().st_size for f in ("manifest.json", "probe.npz")
                if (pkg / f).exists())
    where: list[dict[str, int]] = []
    for st in man["stages"]:
        sf = read_stage(pkg / st["files"][0]["path"])
        parts: dict[str, int] = {}
        for e in sf.entries:
            if e["kind"] == "file" and e["name"] == "base.bin":
                for k, v in _segments(e, sf.data(e)).items():
                    parts[f"bin:{k}"] = parts.get(f"bin:{k}", 0) + v
            else:
                key = e["name"] if e["kind"] == "file" else e["kind"]
                parts[key] = parts.get(key, 0) + e["length"]
        parts["header+framing"] = st["bytes"] - sum(parts.values())
        where.append(parts)
    palettes = sum(1 for t in man["tensors"] if t["base"].get("kind") == "palette")
    rng = np.random.default_rng(1)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    orig = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    base = ort.InferenceSession(str(pkg / "base.onnx"), so, providers=["CPUExecutionProvider"])
    feeds = _feeds(orig, kind if src.parent == work else "", rng)
    y0 = [orig.run(None, f)[0] for f in feeds]
    y1 = np.concatenate([base.run(None, f)[0].reshape(-1, y.shape[-1])
                         for f, y in zip(feeds, y0)])
    y0 = np.concatenate([y.reshape(-1, y.shape[-1]) for y in y0])
    agree = float((y0.argmax(-1) == y1.argmax(-1)).mean())  # top-1 along the last axis
    cos = float((y0 * y1).sum() / np.sqrt((y0 * y0).sum() * (y1 * y1).sum()))
    feed = {k: v[:8] for k, v in feeds[0].items()} if src.parent == work else feeds[0]
    lat = [(_latency(orig, feed), _latency(base, feed)) for _ in range(3)]
    ratio = float(np.median([b / a for a, b in lat]))
    return {"kind": kind, "onnx_bytes": len(raw), "zstd19": z19, "cumulative": cum,
            "package_all": cum[-1] + extra, "where": where, "agreement": agree,
            "cosine": cos, "latency_ratio": ratio, "palette_tensors": palettes,
            "tensors": len(man["tensors"]),
            "max_abs_error": [s["max_abs_error"] for s in man["stages"]],
            "under_zstd": all(c < z19 for c in cum)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default=",".join(twins.KINDS))
    ap.add_argument("--model", action="append", default=[],
                    help="an .onnx file to measure instead of the twins (repeatable)")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for kind in args.model or args.kinds.split(","):
            rows.append(bench(kind, Path(d)))
    print(f"{'twin':14} {'onnx':>8} {'zstd-19':>8} {'stage cumulative bytes':>30} "
          f"{'+man/probe':>10} {'<zstd':>5} {'agree':>6} {'cosine':>8} {'lat':>5} {'pal':>5}")
    for r in rows:
        cum = " ".join(f"{c:>9}" for c in r["cumulative"])
        print(f"{r['kind']:14} {r['onnx_bytes']:>8} {r['zstd19']:>8} {cum:>30} "
              f"{r['package_all']:>10} {str(r['under_zstd']):>5} {r['agreement']:>6.3f} "
              f"{r['cosine']:>8.5f} {r['latency_ratio']:>5.2f} "
              f"{r['palette_tensors']:>2}/{r['tensors']}")
    print("\nwhere the bytes go (per stage file):")
    for r in rows:
        for k, parts in enumerate(r["where"]):
            print(f"  {r['kind']:14} stage {k}: " + ", ".join(
                f"{n} {v}" for n, v in sorted(parts.items(), key=lambda kv: -kv[1])))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
