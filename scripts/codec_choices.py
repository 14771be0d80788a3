"""Measure the codec design choices on MiniLM's weights (the table in docs/codec.md).

Usage: ``python scripts/codec_choices.py [--model build/minilm/minilm.onnx]``

Every row codes the same 2-D weights of the model (38 tensors for MiniLM) and prints bytes as a
share of their fp32 size; the quality rows also run the model on real text (embedding cosine of
a uniform base against fp32).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import realmodels  # noqa: E402

from p2u_onnx import quantizers as qz  # noqa: E402
from p2u_onnx.codecs import IntGroupsCodec, IntPlanesCodec, zigzag  # noqa: E402
from p2u_onnx.dtypes import FLOAT_TYPES  # noqa: E402
from p2u_onnx.reconstruct import base_blocks, lossless_context, pack_codes  # noqa: E402

INFO = FLOAT_TYPES["float32"]
ort.set_default_logger_severity(3)


def weights(model: onnx.ModelProto):
    for t in model.graph.initializer:
        if t.data_type == 1 and len(t.dims) == 2 and np.prod(t.dims) >= 4096:
            w = onnx.numpy_helper.to_array(t)
            # Gather tables are blocked along rows, MatMul weights along their input axis
            yield t.name, w, (1 if "embeddings" in t.name else 0)


def planes_zstd(values: np.ndarray, level: int) -> int:
    """Byte planes, each compressed with plain zstd at ``level`` (match finder on)."""
    u = zigzag(values.reshape(-1))
    width = next(w for w in (1, 2, 4, 8) if int(u.max()) < 1 << (8 * w))
    p = u.astype(f"<u{width}").view(np.uint8).reshape(-1, width)
    c = zstandard.ZstdCompressor(level=level)
    return sum(len(c.compress(np.ascontiguousarray(p[:, i]))) for i in range(width))


def sizes(model: onnx.ModelProto, block: int) -> dict[str, int]:
    out: dict[str, int] = {}

    def add(k: str, v: int) -> None:
        out[k] = out.get(k, 0) + v

    planes, groups = IntPlanesCodec(3), IntGroupsCodec(3)
    for _, w, axis in weights(model):
        lay = qz.Layout(w.shape, "block", axis, block)
        b = lay.to_blocks(w)
        add("fp32", w.nbytes)
        base = qz.quantize_base(b, 4, INFO)
        add("base codes, zstd-9 on packed int4",
            len(zstandard.ZstdCompressor(level=9).compress(pack_codes(base.codes, 22))))
        add("base codes, entropy-mode zstd", len(planes.encode(base.codes.astype(np.int32))))
        add("base scales, zstd-9 on float32", len(zstandard.ZstdCompressor(level=9).compress(
            base.scale.tobytes())))
        add("base scales, byte planes", sum(len(zstandard.ZstdCompressor(level=3).compress(
            np.ascontiguousarray(base.scale.view(np.uint8).reshape(-1, 4)[:, i])))
            for i in range(4)))
        prev = base_blocks(base, INFO)
        step = qz.stage_scale(base.scale, 4)
        # stage 1 (4 -> 8 bits): mid-tread grid (kept), codes coded three ways
        c1 = qz.refine_codes(b, prev, step)
        add("stage 1, zstd-3 planes", planes_zstd(c1, 3))
        add("stage 1, zstd-9 planes", planes_zstd(c1, 9))
        add("stage 1, entropy-mode zstd planes (chosen)", len(planes.encode(c1)))
        # nested (mid-rise) sub-cells: exactly 2**d codes, but 0 is no longer a grid point
        r = b.astype(np.float64) - prev
        nested = np.floor(r / np.where(step > 0, step, 1)[:, None]).astype(np.int32)
        add("stage 1, nested sub-cells, entropy-mode", len(planes.encode(nested)))
        w1 = qz.apply_refine(prev, c1, step, np.float32)
        d = qz.lossless_codes(b.reshape(-1), w1.reshape(-1))
        add("lossless, plain planes", len(planes.encode(d)))
        add("lossless, grouped by step/spacing context (chosen)",
            len(groups.encode(d, lossless_context(INFO, w1, step))))
    return out


def base_cosine(model: onnx.ModelProto, ref: np.ndarray, **kw) -> float:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = {n for n, _, _ in weights(model)}
    block = kw.pop("block", 32)
    mode = kw.pop("mode", "block")
    for t in m.graph.initializer:
        if t.name in names:
            w = onnx.numpy_helper.to_array(t)
            axis = 1 if "embeddings" in t.name else 0
            lay = qz.Layout(w.shape, mode, axis if mode == "block" else 1 - axis, block)
            q = lay.from_blocks(base_blocks(qz.quantize_base(lay.to_blocks(w), 4, INFO, **kw),
                                            INFO))
            t.CopyFrom(onnx.numpy_helper.from_array(q.astype(np.float32), t.name))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return realmodels.minilm_eval(sess, ref)["cosine_mean"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=realmodels.MINILM_DEFAULT_PATH)
    args = ap.parse_args()
    model = onnx.load(str(args.model))
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}, "
          f"zstandard {zstandard.__version__}")
    t = time.perf_counter()
    s = sizes(model, 32)
    fp32 = s.pop("fp32")
    print(f"\nbytes as a share of the fp32 weights ({fp32 / 1e6:.1f} MB), blocks of 32, 4-bit base, "
          "plan 4,8,lossless")
    for k, v in s.items():
        print(f"  {k:55s} {v / fp32:8.2%}")
    for block in (64, 128):
        sb = sizes(model, block)
        print(f"  blocks of {block}: base codes {sb['base codes, entropy-mode zstd'] / fp32:.2%}, "
              f"scales {sb['base scales, byte planes'] / fp32:.2%}")
    ref = realmodels.minilm_reference_embeddings(ort.InferenceSession(str(args.model)))
    print("\nuniform 4-bit base, embedding cosine vs fp32 on real text:")
    for label, kw in [("blocks of 32, MSE clip search (chosen)", {}),
                      ("blocks of 32, plain absmax", {"clip_search": False}),
                      ("blocks of 64, MSE clip search", {"block": 64}),
                      ("blocks of 128, MSE clip search", {"block": 128}),
                      ("per output channel, MSE clip search", {"mode": "channel"})]:
        print(f"  {label:55s} {base_cosine(model, ref, **kw):.4f}")
    print(f"\n({time.perf_counter() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
