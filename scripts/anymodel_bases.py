"""Default and plain 4-bit bases of the bundled models and of small synthetic twins (fp16,
fp64, bf16, a tiny classifier, a dynamic-shape detector): base share, agreement, cosine.

Usage: ``python scripts/anymodel_bases.py [--only cnn,cnn16,...]`` (about a minute on two
cores). Per model and configuration (``default`` = ``BitBudget()``, ``plain4`` =
``BitBudget(adaptive=False)``): stage-0 bytes over the fp32-equivalent weight bytes (floats
at 4 bytes), top-1 agreement and mean per-row output cosine of ``base.onnx`` against the
original model, the bits used, the encoder's estimated quality, whether a probe was recorded
and the manifest's notes. Digits models run on ``models/digits_test.npz`` (540 images); the
synthetic twins on fixed random inputs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import p2u_onnx  # noqa: E402
from p2u_onnx import BitBudget  # noqa: E402

ort.set_default_logger_severity(4)
FLOATS = (1, 10, 11, 16)


def fp32_equivalent(m: onnx.ModelProto) -> int:
    from p2u_onnx.graph import iter_slots

    total = 0
    for s in iter_slots(m):
        t = s.tensor
        n = int(np.prod(t.dims)) if t.dims else 1
        total += 4 * n if t.data_type in FLOATS else (len(t.raw_data) or t.ByteSize())
    return total


def first_float(path: Path, feed: dict) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for o in s.run(None, feed):
        if np.asarray(o).dtype.kind == "f":
            n = len(next(iter(feed.values())))
            return np.asarray(o, np.float64).reshape(n, -1)
    raise SystemExit(f"{path}: no float output")


def twins(only: set[str] | None) -> list[tuple[str, Path, dict]]:
    import synth
    import test_anymodel as ta

    work = Path(tempfile.mkdtemp(prefix="anymodel-"))
    x = np.load(ROOT / "models" / "digits_test.npz")["x"].astype(np.float32)
    rng = np.random.default_rng(0)
    out = []

    def add(name, model_or_path, feed):
        if only and name not in only:
            return
        if isinstance(model_or_path, onnx.ModelProto):
            p = work / f"{name}.onnx"
            onnx.save(model_or_path, str(p))
        else:
            p = model_or_path
        out.append((name, p, feed))

    cnn = onnx.load(str(ROOT / "models" / "digits_cnn.onnx"))
    add("digits_cnn", ROOT / "models" / "digits_cnn.onnx", {"image": x})
    add("digits_mlp_sklearn", ROOT / "models" / "digits_mlp_sklearn.onnx",
        {"image": x.reshape(len(x), -1)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add("digits_cnn_fp16", ta.fp16_twin(cnn), {"image": x})
    z = rng.standard_normal((256, 64))
    add("mlp_fp32", synth.mlp(np.float32, din=64, hidden=256), {"x": z.astype(np.float32)})
    add("mlp_fp16", synth.mlp(np.float16, din=64, hidden=256), {"x": z.astype(np.float16)})
    add("mlp_fp64", synth.mlp(np.float64, din=64, hidden=256), {"x": z.astype(np.float64)})
    add("mlp_bf16", synth.bf16_mlp(), {"x": z.astype(np.float32)})
    add("tiny_classifier", ta.tiny_classifier(), {"x": z.astype(np.float32)[:128]})
    add("detector_twin", ta.detector_twin(),
        {"image": rng.random((16, 3, 64, 64), np.float32),
         "cls": rng.integers(0, 4, 16).astype(np.int32),
         "rows": rng.random((16, 64), np.float32)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated model names")
    args = ap.parse_args(argv)
    only = set(filter(None, args.only.split(","))) or None
    print(f"p2u_onnx from {Path(p2u_onnx.__file__).parent}")
    print(f"{'model':<20} {'config':<8} {'share':>6} {'agree':>7} {'cosine':>8} {'est':>7} "
          f"{'bits':<10} probe  notes")
    for name, path, feed in twins(only):
        ref = first_float(path, feed)
        total = fp32_equivalent(onnx.load(str(path)))
        for label, budget in (("default", BitBudget()), ("plain4", BitBudget(adaptive=False))):
            with tempfile.TemporaryDirectory() as d:
                pkg = Path(d) / "p.p2u"
                try:
                    res = p2u_onnx.encode(path, pkg, budget=budget)
                except p2u_onnx.P2UError as e:
                    print(f"{name:<20} {label:<8} encode failed: {e}")
                    continue
                try:
                    got = first_float(pkg / "base.onnx", feed)
                    agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
                    cos = float(np.mean(np.sum(got * ref, 1) / (
                        np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-30)))
                except Exception as e:  # noqa: BLE001 - a base that does not load is a result
                    agree = cos = float("nan")
                    print(f"  base.onnx does not load: {str(e).splitlines()[0][:100]}")
                m = res.manifest
                est = (m.get("allocation") or {}).get("est_quality")
                bits = sorted({t["bits"] for t in m["tensors"]})
                notes = "; ".join(n[:70] for n in m.get("notes", []))
                print(f"{name:<20} {label:<8} {res.stage_bytes[0] / total:>6.1%} {agree:>7.4f} "
                      f"{cos:>8.5f} {'-' if est is None else f'{est:.4f}':>7} "
                      f"{','.join(map(str, bits)):<10} {'yes' if 'probe' in m else 'NO':<5}  "
                      f"{notes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
