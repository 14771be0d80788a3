"""Compare first-stage codings of an update against an exact model, on real version pairs.

For each pair (``scripts/updatepairs.py``) and each variant, v2 is encoded as an update against
v1 (exact) and stage 0 is measured: bytes on the wire (manifest + stage file + probe, as
``bench_updates.py`` counts them) as a share of v2's fp32 file, v2's task metric at stage 0 and
relative to v2's, the error left in the *delta*, ``||v2 - stage0|| / ||v2 - v1||`` over every
float weight, and the exact total (every stage). Variants:

* ``auto``: the encoder's default plan (``auto,lossless``: against an exact model the uniform
  grid at ``EXACT_STEP`` x the shared step, 2 bits where sign codes would fit badly);
* ``1`` / ``2``: plans ``1,lossless`` (sign codes on every changed tensor) and ``2,lossless``;
* ``grid:F``: ``auto``, with every tuned tensor on the uniform grid at F times the update's
  shared step (``UNIFORM_STEP`` x the rms of all deltas, as federated followers get at F = 1;
  the default is F = ``EXACT_STEP``); ``grid-matrices:F`` / ``grid-vectors:F``: the same for
  tensors of two or more dimensions only / for 1-D tensors only (the others as ``auto``
  chooses). The encoder's choice is replaced for this run only (a patch of
  ``updates._exact_grid_step`` inside this process); the packages are ordinary update
  packages, decoded by the unchanged device code.

Usage::

    python scripts/first_stage_variants.py                        # MiniLM, the default variants
    python scripts/first_stage_variants.py --pairs "digits v1->v2,digits v2->v3" \\
        --variants auto,grid:1.5
    python scripts/first_stage_variants.py --variants grid:1.5 --bench --no-minilm \\
        --out build/bench_updates_grid15 --plot build/bench_updates_grid15/fedavg.png

The MiniLM pair needs ``build/minilm/minilm.onnx`` and ``scripts/make_minilm_update.py``'s v2.
Packages are written to ``build/first_stage_variants/``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_updates as bu  # noqa: E402
import update_anchors as ua  # noqa: E402
import updatepairs as up  # noqa: E402
from p2u_onnx import updates  # noqa: E402

DEFAULT_VARIANTS = "auto,1,2,grid:1,grid:1.5"
OUT = up.ROOT / "build" / "first_stage_variants"


def delta_error(v1: dict[str, np.ndarray], v2: dict[str, np.ndarray],
                got: dict[str, np.ndarray]) -> float:
    """``||v2 - got|| / ||v2 - v1||`` over the float weights of v2 (0 when nothing changed)."""
    num = den = 0.0
    for k, w in v2.items():
        w64 = w.astype(np.float64)
        g = got.get(k)
        num += float(np.sum((w64 - g) ** 2)) if g is not None and g.shape == w.shape \
            else float(np.sum(w64 ** 2))
        a = v1.get(k)
        den += float(np.sum((w64 - a) ** 2)) if a is not None and a.shape == w.shape \
            else float(np.sum(w64 ** 2))
    return (num / den) ** 0.5 if den else 0.0


def grid_patch(variant: str):
    """The replacement of ``updates._exact_grid_step`` a ``grid*:F`` variant stands for (None
    for ``auto``, ``1``, ``2``); SystemExit for an unknown variant."""
    if variant in ("auto", "1", "2"):
        return None
    kind, _, factor_text = variant.partition(":")
    try:
        factor = float(factor_text)
    except ValueError:
        factor = 0.0
    if kind not in ("grid", "grid-matrices", "grid-vectors") or not factor > 0:
        raise SystemExit(f"unknown variant {variant!r} (auto, 1, 2, grid:F, grid-matrices:F, "
                         "grid-vectors:F with F > 0)")
    original = updates._exact_grid_step

    def grid(x, r, info, step):  # noqa: ANN001
        if (kind == "grid-matrices" and x.ndim < 2) or (kind == "grid-vectors" and x.ndim > 1):
            return original(x, r, info, step)
        s = updates._tensor_step(step * factor, x, r, info)
        return s if s > 0 else None

    return grid


def run(pair: up.Pair, variant: str, work: Path) -> dict:
    """Encode ``pair``'s v2 against v1 with ``variant`` and measure stage 0 and the total."""
    plan = f"{variant},lossless" if variant in ("1", "2") else None
    original = updates._exact_grid_step
    patch = grid_patch(variant)
    if patch is not None:
        updates._exact_grid_step = patch
    slug = "".join(c if c.isalnum() else "_" for c in f"{pair.name}-{variant}")
    out = work / f"{slug}.p2u"
    if out.exists():
        shutil.rmtree(out)
    try:
        held = updates.held_state(str(pair.v1))
        t0 = time.perf_counter()
        updates.encode_update(str(pair.v2), str(out), held, version=2,
                              **({} if plan is None else {"plan": plan}))
        encode_s = time.perf_counter() - t0
    finally:
        updates._exact_grid_step = original
    wires = bu.wire_bytes(out)
    h = updates.apply_update(str(out), held, 0)
    tmp = work / f"{slug}.stage0.onnx"
    onnx.save(h.model, str(tmp))
    try:
        got = ua.split_model(tmp).weights
    finally:
        tmp.unlink(missing_ok=True)
    return {"variant": variant, "stage0": wires[0], "total": int(sum(wires)),
            "metric": pair.metric(h.model.SerializeToString()), "encode_s": encode_s,
            "got": got}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="minilm fine-tune",
                    help="comma-separated pair names (default: the MiniLM pair)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma-separated: auto, 1, 2, grid:F, grid-matrices:F, grid-vectors:F "
                         f"(default {DEFAULT_VARIANTS})")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--bench", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                    help="run scripts/bench_updates.py with ARGS, the one grid variant of "
                         "--variants patched in for the whole run (federated rounds and "
                         "uplink included)")
    args = ap.parse_args(argv)
    if args.bench is not None:
        patch = grid_patch(args.variants)
        if patch is None:
            ap.error("--bench takes one grid variant (grid:F, grid-matrices:F, grid-vectors:F); "
                     "for the others run scripts/bench_updates.py [--plan ...] itself")
        original = updates._exact_grid_step
        updates._exact_grid_step = patch
        try:
            return bu.main(args.bench)
        finally:
            updates._exact_grid_step = original
    known = {p.name: p for p in up.pairs()}
    names = [n.strip() for n in args.pairs.split(",")]
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown pairs {unknown}; known: {list(known)}")
    args.out.mkdir(parents=True, exist_ok=True)
    print("| pair | variant | stage 0 bytes | % of v2 fp32 | metric (v2) | rel. to v2 | "
          "delta error | exact total | encode s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        pair = known[name]
        if not pair.available():
            print(f"| {name} | SKIPPED: missing {pair.v1 if not pair.v1.is_file() else pair.v2} "
                  "| | | | | | | |")
            continue
        fp32 = pair.v2.stat().st_size
        m2 = pair.metric(pair.v2)
        v1w, v2w = ua.split_model(pair.v1).weights, ua.split_model(pair.v2).weights
        for variant in [v.strip() for v in args.variants.split(",")]:
            r = run(pair, variant, args.out)
            err = delta_error(v1w, v2w, r.pop("got"))
            print(f"| {name} | {variant} | {r['stage0']:,} | {r['stage0'] / fp32:.2%} | "
                  f"{pair.metric_name} {r['metric']:.4f} ({m2:.4f}) | {r['metric'] / m2 - 1:+.2%} | "
                  f"{err:.3f} | {r['total']:,} | {r['encode_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
