"""Where a package's bytes go, against zstd -19 of the model file and the weights' own entropy.

    python scripts/package_bits.py PKG [--model MODEL.onnx]

Prints, per file a client downloads, its bytes (stage files split into JSON header and each
entry's payload, per coded tensor in bits per weight), then per coded tensor: the base's
codes and scales, each later stage, the sum, and two references computed from the source
weights (with --model, or the model file next to nothing: then only the package is shown):

* ``planes``: zstd -19 of each byte plane of the raw tensor, summed (ZipNN-style grouping);
* ``bound``: order-0 entropy of the sign and exponent field plus every mantissa bit (what a
  coder that models the exponent and takes the mantissa as random pays; trained weights'
  low mantissa bits are random).

The lower bound of a package is about the weights' ``bound`` plus everything that is not
coded weights (manifest, stage headers, base graph with the tensors sent as they are, probe):
the "overhead" line. docs/format.md (Coding, format 5) quotes this script's figures.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2u_onnx.format import load_manifest, read_stage  # noqa: E402


def _entropy_bits(x: np.ndarray) -> float:
    _, c = np.unique(x, return_counts=True)
    p = c / c.sum()
    return float(-(c * np.log2(p)).sum())


def _references(w: np.ndarray) -> tuple[int, int]:
    """(planes, bound) in bytes for one float tensor."""
    z = zstandard.ZstdCompressor(level=19)
    width = w.dtype.itemsize
    raw = np.frombuffer(np.ascontiguousarray(w).tobytes(), np.uint8).reshape(-1, width)
    planes = sum(len(z.compress(np.ascontiguousarray(raw[:, i]).tobytes()))
                 for i in range(width))
    mant = {2: 10, 4: 23, 8: 52}[width]
    bits = np.ascontiguousarray(w).reshape(-1).view({2: np.uint16, 4: np.uint32,
                                                     8: np.uint64}[width])
    sign_exp = bits >> type(bits[0])(mant) if bits.size else bits
    nonzero = np.count_nonzero(np.asarray(w).reshape(-1))
    return planes, int((_entropy_bits(sign_exp) + mant * nonzero) / 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--model", type=Path, help="the source model (for the references)")
    args = ap.parse_args()
    pkg = args.package
    m = load_manifest(pkg)
    files = [f for s in m["stages"] for f in s["files"]]
    total = (pkg / "manifest.json").stat().st_size
    print(f"manifest.json {total:>10,} B")
    if m.get("probe"):
        total += m["probe"]["size"]
        print(f"probe.npz     {m['probe']['size']:>10,} B")
    per: dict[str, dict[str, int]] = {}
    coded = 0
    for f in files:
        sf = read_stage(pkg / f["path"])
        raw = (pkg / f["path"]).read_bytes()
        head = 16 + struct.unpack_from("<I", raw, 12)[0]
        total += len(raw)
        parts = {}
        for e in sf.entries:
            if e["kind"] == "file":
                parts[e["name"]] = e["length"]
            else:
                per.setdefault(e["name"], {})
                k = f"stage {sf.stage}"
                per[e["name"]][k] = per[e["name"]].get(k, 0) + e["length"]
                coded += e["length"]
        print(f"{f['path']:13s} {len(raw):>10,} B  header {head:,}  " +
              "  ".join(f"{k} {v:,}" for k, v in parts.items()))
    zstd19 = m["source"].get("zstd19_bytes")
    print(f"package       {total:>10,} B" + (f"  zstd -19 of the model {zstd19:,} B: "
                                             f"{total / zstd19:.3f}x" if zstd19 else ""))
    weights = {}
    if args.model:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(args.model))
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    print("\ncoded tensors (bytes; b/w = bits per weight):")
    sums = {"planes": 0, "bound": 0}
    for t in m["tensors"]:
        n = int(np.prod(t["shape"]))
        base = t["base"]
        b0 = base["codes"][1] + (base["scale"][1] if base.get("scale") else 0)
        stages = per.get(t["name"], {})
        # base.bin travels zstd-coded: the raw span is an upper bound of its share
        line = f"  {t['name'][:32]:32s} {t['dtype']:8s} n={n:>8,} base(raw) {b0:>8,} " + \
            " ".join(f"{k} {v:>8,} ({8 * v / n:.2f} b/w)" for k, v in sorted(stages.items()))
        w = weights.get(t["tensor"])
        if w is not None and w.dtype.kind == "f":
            planes, bound = _references(w)
            sums["planes"] += planes
            sums["bound"] += bound
            line += f" | planes {planes:,} ({8 * planes / n:.2f}) bound {bound:,} " \
                    f"({8 * bound / n:.2f} b/w)"
        print(line)
    stage0 = next((pkg / f["path"]) for f in files if f["path"].endswith("-0.p2u"))
    sf0 = read_stage(stage0)
    bin_len = next(e["length"] for e in sf0.entries if e["name"] == "base.bin")
    print(f"\nbase.bin (coded codes, scales and tensors sent as they are) {bin_len:,} B; "
          f"later stages' coded payloads {coded:,} B")
    if sums["bound"]:
        print(f"references over the coded tensors: planes {sums['planes']:,} B, bound "
              f"{sums['bound']:,} B")
    print(json.dumps({"package": total, "zstd19": zstd19, "later_payloads": coded,
                      "base_bin": bin_len, **{k: v for k, v in sums.items() if v}}))


if __name__ == "__main__":
    main()
