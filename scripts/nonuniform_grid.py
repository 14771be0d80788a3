"""Would a non-uniform 4-bit grid (NF4 or per-tensor k-means) pay for itself in the base?

Usage: ``python scripts/nonuniform_grid.py [model.onnx ...]`` (default: MiniLM from
``scripts/make_minilm.py`` and the digits CNN). For every coded weight tensor (>= 1024 values,
2-D or more), blocks of 32 along the reduction axis as the encoder cuts them, it prints the
squared error over all weights, relative to p2u's 4-bit base (uniform grid, MSE clip search):

* ``int4 absmax``: uniform grid, scale = max |w| / 7 (no clipping);
* ``p2u int4``: what the encoder does (uniform grid, clip ratio per block by least error);
* ``nf4``: the 16 NormalFloat levels (QLoRA) scaled by each block's max |w|;
* ``kmeans16``: 16 levels per tensor by Lloyd's algorithm on the block-normalized weights
  (the codebook would be sent once per tensor, 16 floats).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from p2u_onnx import quantizers as qz  # noqa: E402
from p2u_onnx.dtypes import dtype_info  # noqa: E402

NF4 = np.array([-1.0, -0.6961928, -0.5250730, -0.3949175, -0.2844414, -0.1848318, -0.0910500,
                0.0, 0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170,
                0.7229568, 1.0], np.float32)


def nearest(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    idx = np.clip(np.searchsorted(levels, x), 1, len(levels) - 1)
    lo, hi = levels[idx - 1], levels[idx]
    return np.where(np.abs(x - lo) <= np.abs(hi - x), lo, hi)


def kmeans(x: np.ndarray, k: int = 16, iters: int = 20) -> np.ndarray:
    levels = np.quantile(x, (np.arange(k) + 0.5) / k).astype(np.float32)
    for _ in range(iters):
        idx = np.clip(np.searchsorted((levels[1:] + levels[:-1]) / 2, x), 0, k - 1)
        sums = np.bincount(idx, x, k)
        counts = np.bincount(idx, minlength=k)
        levels = np.where(counts > 0, sums / np.maximum(counts, 1), levels).astype(np.float32)
        levels.sort()
    return levels


def errors(w: np.ndarray) -> dict[str, float]:
    info = dtype_info(1)
    layout = qz.Layout(w.shape, "block", 0, 32)  # reduction axis first, as for MatMul
    b = np.ascontiguousarray(layout.to_blocks(w.astype(np.float32)))
    amax = np.abs(b).max(axis=1, keepdims=True)
    amax[amax == 0] = 1
    out = {}
    for name, clip in (("int4 absmax", False), ("p2u int4", True)):
        q = qz.quantize_base(b, 4, info, clip_search=clip)
        out[name] = float(np.sum((qz.dequantize_base(q) - b) ** 2))
    u = b / amax
    out["nf4"] = float(np.sum((nearest(u, NF4) * amax - b) ** 2))
    flat = u.reshape(-1)
    sample = flat[:: max(1, len(flat) // 200_000)]
    out["kmeans16"] = float(np.sum((nearest(u, kmeans(sample)) * amax - b) ** 2))
    return out


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or [ROOT / "build" / "minilm" / "minilm.onnx",
                                                ROOT / "models" / "digits_cnn.onnx"]
    for path in paths:
        if not path.exists():
            print(f"{path}: missing (MiniLM: python scripts/make_minilm.py)")
            continue
        total: dict[str, float] = {}
        for t in onnx.load(str(path)).graph.initializer:
            w = numpy_helper.to_array(t)
            if t.data_type != onnx.TensorProto.FLOAT or w.ndim < 2 or w.size < 1024:
                continue
            for k, v in errors(w).items():
                total[k] = total.get(k, 0.0) + v
        ref = total["p2u int4"]
        print(f"{path.name}: squared error relative to p2u int4 (blocks of 32): " +
              ", ".join(f"{k} {v / ref:.3f}" for k, v in total.items()))


if __name__ == "__main__":
    main()
