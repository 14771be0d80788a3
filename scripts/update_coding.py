"""Measure update codings on a version pair (the choice of p2u_onnx.updates' defaults).

For each plan and delta block size: bytes of each update stage as a share of v2's fp32 bytes,
the digits accuracy reached at each stage (a digits classifier pair), and beside them the
lossless delta anchors of the same pair: XOR of the bit patterns with byte grouping + zstd -19,
and ZipNN's delta (XOR, byte grouping, its own entropy coder), both over every weight tensor v1
and v2 share (others: zstd -19 of v2's bytes).

Usage: ``python scripts/update_coding.py V1.onnx V2.onnx [--plans 3,lossless ...] [--blocks 64 ...]``
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from p2u_onnx import passes  # noqa: E402
from p2u_onnx.config import QuantConfig  # noqa: E402
from p2u_onnx.encoder import tensor_array  # noqa: E402
from p2u_onnx.graph import iter_slots  # noqa: E402
from p2u_onnx.updates import apply_update, encode_update, held_state  # noqa: E402

TEST = Path(__file__).resolve().parent.parent / "models" / "digits_test.npz"


def accuracy(model: onnx.ModelProto) -> float:
    d = np.load(TEST)
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(np.mean(s.run(None, {s.get_inputs()[0].name: d["x"]})[0].argmax(1) == d["y"]))


def _tensors(path: str) -> dict[str, np.ndarray]:
    m = onnx.load(path)
    passes.lift_constants(m, QuantConfig().min_elements)
    return {s.key: np.ascontiguousarray(tensor_array(s.tensor)) for s in iter_slots(m)
            if s.tensor.data_type in (1, 10, 11, 16)}


def anchors(v1: str, v2: str) -> dict[str, int]:
    """Lossless delta anchors of v2 against v1 (bytes)."""
    from zipnn import ZipNN

    a, b = _tensors(v1), _tensors(v2)
    shared = [k for k in b if k in a and a[k].shape == b[k].shape and a[k].dtype == b[k].dtype]
    rest = [k for k in b if k not in shared]
    cctx = zstandard.ZstdCompressor(level=19)
    x1 = b"".join(a[k].tobytes() for k in shared)
    x2 = b"".join(b[k].tobytes() for k in shared)
    other = sum(len(cctx.compress(b[k].tobytes())) for k in rest)
    xor = np.bitwise_xor(np.frombuffer(x1, np.uint8), np.frombuffer(x2, np.uint8))
    planes = xor.reshape(-1, 4) if len(xor) % 4 == 0 else xor.reshape(1, -1)
    xor_zstd = sum(len(cctx.compress(planes[:, i].tobytes())) for i in range(planes.shape[1]))
    z = ZipNN(input_format="byte", bytearray_dtype="float32", delta_compressed_type="byte",
              zstd_level=19)
    zipnn_delta = len(z.compress(x2, delta_second_data=x1))
    return {"xor_zstd": xor_zstd + other, "zipnn_delta": zipnn_delta + other,
            "fp32": 4 * sum(v.size for v in b.values()),
            "zstd_v2": len(cctx.compress(x2)) + other}


def _rel_error(held, model: onnx.ModelProto) -> float:
    """Relative L2 distance of a held state's tensors to a model's (over what it holds)."""
    t = {s.key: tensor_array(s.tensor) for s in iter_slots(model)}
    num = den = 0.0
    for k in held.names:
        if k in t:
            a = t[k].astype(np.float64).reshape(-1)
            num += float(np.sum((held.get(k).astype(np.float64).reshape(-1) - a) ** 2))
            den += float(np.sum(a ** 2))
    return (num / den) ** 0.5 if den else 0.0


def followers(folder: str, plans: list[str]) -> None:
    """Federated followers: round-00.onnx held exact, then each round's update coded against
    what the follower holds (its stage 0 of the previous round's update); per round and plan:
    stage 0 bytes (+ manifest + probe), accuracy against the round's, weight error."""
    rounds = sorted(Path(folder).glob("round-*.onnx"))
    with tempfile.TemporaryDirectory() as tmp:
        for plan in plans:
            held = held_state(str(rounds[0]))
            print(f"plan {plan}: round  stage0  delivered  acc0 (round's)  rel.gap  weight err"
                  "  bits (1/2/4)")
            tot = 0
            for r, path in enumerate(rounds[1:], start=1):
                out = Path(tmp) / f"r{r}.p2u"
                res = encode_update(str(path), out, held, plan=plan, overwrite=True)
                st0 = res.manifest["stages"][0]["bytes"]
                d0 = st0 + (out / "manifest.json").stat().st_size + sum(
                    p.stat().st_size for p in out.glob("probe*"))
                tot += d0
                held = apply_update(out, held, 0)
                m2 = onnx.load(str(path))
                a0, a2 = accuracy(held.model), accuracy(m2)
                bits = [t.get("bits") for t in res.manifest["tensors"]
                        if t["update"] == "delta"]
                print(f"  {r:>5} {st0:>7} {d0:>9}  {a0:.4f} ({a2:.4f}) {(a2 - a0) / a2:8.2%}"
                      f"  {_rel_error(held, m2):.2e}  {bits.count(1)}/{bits.count(2)}/"
                      f"{bits.count(4)}")
            print(f"  all rounds delivered {tot}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("v1", nargs="?")
    ap.add_argument("v2", nargs="?")
    ap.add_argument("--plans", nargs="*", default=["auto,lossless", "1,lossless", "2,lossless", "3,lossless", "4,lossless",
                                                   "2,6,lossless", "3,8,lossless"])
    ap.add_argument("--blocks", nargs="*", type=int, default=[32, 64, 128, 256])
    ap.add_argument("--min-elements", type=int, default=None,
                    help="code tensors from this many values (default: the update default)")
    ap.add_argument("--vectors", action="store_true", help="code 1-D tensors too")
    ap.add_argument("--rounds", default=None, metavar="DIR",
                    help="federated followers over DIR/round-*.onnx instead (v1 v2 ignored)")
    ap.add_argument("--graft", default=None, metavar="PREFIX",
                    help="v2 is v1 with only the tensors whose names start with PREFIX taken "
                         "from V2 (e.g. classifier.4: a head retrained alone)")
    ap.add_argument("--package", action="store_true",
                    help="the device holds v1 through its full p2u package (default settings): "
                         "the update codes the skeleton against that package's")
    args = ap.parse_args()
    if args.rounds:
        return followers(args.rounds, args.plans)
    pkg_dir = tempfile.mkdtemp(prefix="update-coding-")
    if args.graft:
        m1, m2 = onnx.load(args.v1), onnx.load(args.v2)
        new = {i.name: i for i in m2.graph.initializer}
        for i in m1.graph.initializer:
            if i.name.startswith(args.graft):
                i.CopyFrom(new[i.name])
        args.v2 = str(Path(pkg_dir) / "grafted.onnx")
        onnx.save(m1, args.v2)
    anc = anchors(args.v1, args.v2)
    fp32 = anc["fp32"]
    from p2u_onnx.updates import UPDATE_CONFIG

    config = UPDATE_CONFIG
    if args.min_elements is not None or args.vectors:
        config = QuantConfig(min_elements=args.min_elements or config.min_elements,
                             quantize_vectors=args.vectors)
    if args.package:
        from p2u_onnx import encode

        pkg = encode(args.v1, Path(pkg_dir) / "v1.p2u").path
        held = held_state(str(pkg), config=config)
        print(f"v1 held through its full package ({held.describe()})")
    else:
        held = held_state(args.v1, config=config)
    v1acc, v2acc = accuracy(onnx.load(args.v1)), accuracy(onnx.load(args.v2))
    print(f"v1 accuracy {v1acc:.4f}   v2 accuracy {v2acc:.4f}   v2 fp32 bytes {fp32}")
    print(f"anchors: xor+bytegroup+zstd19 {anc['xor_zstd']} ({anc['xor_zstd'] / fp32:.2%})   "
          f"zipnn delta {anc['zipnn_delta']} ({anc['zipnn_delta'] / fp32:.2%})   "
          f"zstd19 of v2 {anc['zstd_v2']} ({anc['zstd_v2'] / fp32:.2%})")
    print("(stage 0 / exact total: the stage files; 'delivered': + manifest.json + probe.npz, "
          "which every device downloads with stage 0)")
    print(f"{'plan':>14} {'block':>5}  {'stage 0':>16} {'delivered 0':>16} {'acc0':>7} "
          f"{'rel.gap':>8}  {'exact total':>18} {'delivered':>9} {'vs best anchor':>14}  enc s  "
          "bits (1/2/4)")
    best = min(anc["xor_zstd"], anc["zipnn_delta"])
    with tempfile.TemporaryDirectory() as tmp:
        for plan in args.plans:
            for block in args.blocks:
                out = Path(tmp) / "u.p2u"
                t0 = time.perf_counter()
                r = encode_update(args.v2, out, held, plan=plan, delta_block=block,
                                  overwrite=True, config=config)
                enc = time.perf_counter() - t0
                st = r.manifest["stages"]
                acc0 = accuracy(apply_update(out, held, 0).model)
                total = st[-1]["cumulative_bytes"]
                fixed = (out / "manifest.json").stat().st_size + sum(
                    p.stat().st_size for p in out.glob("probe*"))
                d0, dt = st[0]["bytes"] + fixed, total + fixed
                bits = [t.get("bits") for t in r.manifest["tensors"] if t["update"] == "delta"]
                print(f"{plan:>14} {block:>5}  {st[0]['bytes']:>7} ({st[0]['bytes'] / fp32:6.2%})"
                      f" {d0:>7} ({d0 / fp32:6.2%}) {acc0:7.4f} {(v2acc - acc0) / v2acc:8.2%}  "
                      f"{total:>8} ({total / fp32:6.2%}) {dt:>9} {dt / best:13.3f}x  {enc:5.2f}  "
                      f"{bits.count(1)}/{bits.count(2)}/{bits.count(4)}")
                shutil.rmtree(out)
    shutil.rmtree(pkg_dir)


if __name__ == "__main__":
    main()
