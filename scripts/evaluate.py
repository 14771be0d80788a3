"""Evaluate p2u on real models: accuracy, bytes on the wire and time to each stage, beside
what a user would ship instead. Writes a Markdown report with tables and plots.

Usage::

    python scripts/evaluate.py                  # full run: docs/results.md, docs/results-*.png
    python scripts/evaluate.py --quick          # CI subset: build/results-quick/results.md
    python scripts/evaluate.py --out DIR [--work DIR] [--repeats N] [--only NAME ...]

Full run: the digits CNN and the scikit-learn MLP (models/), MiniLM (built when missing), the
third-party models of ``scripts/thirdparty.py`` and a BERT-base-sized encoder with random
weights (bytes and speed only). For each model:

* p2u plans (:data:`FULL_PLANS`): fixed-bit bases of 2, 3, 4, 6 and 8 bits, progressive plans,
  per-channel versus block-wise scales, and the default (adaptive bits);
* per stage: bytes on the wire (the files a client downloads, see :func:`wire_bytes`),
  cumulative and as a share of the fp32 model file, the time to reach the stage at 1 Mbit/s
  (computed from the bytes) and the task metric; a lossless stage is checked bit-exact with
  ``p2u_onnx.verify`` and then scores as the fp32 model;
* alternatives (``scripts/eval_alternatives.py``): onnxruntime int8 and 4-bit quantizers, fp16,
  zstd -19, ZipNN, NNCodec; and the paper's plain scheme (low-bit base + fp32 difference);
* for MiniLM and the BERT-sized model: inference latency and load time of each variant.

``--quick`` (CI) runs the two digits models with five plans and the alternatives that need no
extra package or network, in well under two minutes on two cores. Work files (packages,
quantized models, ``results.json``) go to ``--work`` (default ``build/eval``, or ``OUT/work``
with ``--quick``). Every figure in the report comes from this run; timings are medians of
``--repeats`` unless the report says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

import eval_alternatives as alt  # noqa: E402
import eval_models as em  # noqa: E402
import eval_report  # noqa: E402

import p2u_onnx  # noqa: E402
from p2u_onnx import BitBudget, QuantConfig  # noqa: E402
from p2u_onnx.api import load_stage_model, open_stages  # noqa: E402

RATE_BPS = 1e6  # the link the report's times assume: 1 Mbit/s
LATENCY_RUNS = 20
NNCODEC_QPS = (-20, -26, -32)
NNCODEC_QPS_LARGE = (-32,)
LARGE_FILE = 200e6  # above this, a model is timed once and NNCodec runs one qp


@dataclass(frozen=True)
class PlanSpec:
    """One p2u configuration: the plan, the scales' granularity, fixed or adaptive bits."""

    label: str
    plan: str
    granularity: str = "block"
    block: int = 32
    adaptive: bool = False

    def config(self) -> QuantConfig:
        return QuantConfig(granularity=self.granularity, block_size=self.block)

    def budget(self) -> BitBudget:
        return BitBudget() if self.adaptive else BitBudget(adaptive=False)


DEFAULT = PlanSpec("default (adaptive) 4,8,L", "4,8,lossless", adaptive=True)
FULL_PLANS = (
    PlanSpec("fixed 2,4,8,L", "2,4,8,lossless"),
    PlanSpec("fixed 3,L", "3,lossless"),
    PlanSpec("fixed 4,8,L", "4,8,lossless"),
    PlanSpec("fixed 6,L", "6,lossless"),
    PlanSpec("fixed 8,L", "8,lossless"),
    PlanSpec("channel 4,8,L", "4,8,lossless", granularity="channel"),
    PlanSpec("block64 4,8,L", "4,8,lossless", block=64),
    PlanSpec("block128 4,8,L", "4,8,lossless", block=128),
    DEFAULT,
)
QUICK_PLANS = (
    PlanSpec("fixed 2,4,8,L", "2,4,8,lossless"),
    PlanSpec("fixed 4,8,L", "4,8,lossless"),
    PlanSpec("fixed 8,L", "8,lossless"),
    PlanSpec("channel 4,8,L", "4,8,lossless", granularity="channel"),
    DEFAULT,
)


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------
# Machine and versions
# ------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "os": platform.platform(), "python": platform.python_version(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("numpy", "onnx", "onnxruntime", "zstandard", "onnx-ir", "onnxconverter-common",
                 "zipnn", "scikit-learn", "matplotlib", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["p2u-onnx"] = p2u_onnx.__version__
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        out["p2u-onnx"] += f" (git {rev}{', modified working tree' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        pass
    out["nncodec (venv)"] = alt.nncodec_version()
    return out


# ------------------------------------------------------------------------------------------
# p2u packages
# ------------------------------------------------------------------------------------------


def wire_bytes(package: Path) -> list[int]:
    """Bytes a client downloads to reach each stage (not cumulative).

    Stage 0: ``manifest.json``, the base (``stage-0.p2u`` or ``base.onnx`` + ``base.bin``,
    whichever is smaller, as ``p2u_onnx.transport.HttpSource`` picks) and the probe file (the
    session checks the base with it). Stage k: its stage file(s).
    """
    manifest = json.loads((package / "manifest.json").read_text())
    stage0 = sum(f["size"] for f in manifest["stages"][0]["files"])
    direct = sum(f["size"] for f in manifest["base_model"]["files"])
    probe = manifest.get("probe", {}).get("size", 0) if manifest.get("probe") else 0
    first = (package / "manifest.json").stat().st_size + min(stage0, direct) + probe
    return [first] + [sum(f["size"] for f in st["files"]) for st in manifest["stages"][1:]]


def score_safely(subject: em.Subject, model: bytes | Path) -> tuple[dict[str, float], str | None]:
    if subject.score is None:
        return {}, None
    try:
        return subject.score(model), None
    except Exception as e:  # noqa: BLE001 - a model that does not run is a result
        return {}, alt.first_line(e)


def run_plan(subject: em.Subject, spec: PlanSpec, work: Path, reference: dict[str, float],
             file_bytes: int, repeats: int) -> dict[str, Any]:
    """Encode ``subject`` with ``spec``; bytes, time at 1 Mbit/s and metrics per stage."""
    pkg = work / "packages" / f"{spec.label.replace(' ', '_').replace(',', '-')}.p2u"

    def encode() -> None:
        pkg.parent.mkdir(parents=True, exist_ok=True)  # encode() makes no parent folders
        p2u_onnx.encode(subject.path, pkg, spec.plan, spec.config(), spec.budget(),
                        overwrite=True)

    try:
        encode_s, _ = alt.timed(encode, repeats)
    except Exception as e:  # noqa: BLE001
        return {**asdict(spec), "error": alt.first_line(e), "stages": []}
    info = p2u_onnx.inspect(pkg)
    wires = wire_bytes(pkg)
    lossless = info["plan"][-1] == "lossless"
    exact = bool(p2u_onnx.verify(pkg)["lossless_match"]) if lossless else False
    stages, cum = [], 0
    last = len(info["stages"]) - 1
    for st, wire in zip(info["stages"], wires):
        cum += wire
        row: dict[str, Any] = {
            "stage": st["stage"], "bits": st["bits"], "wire_bytes": wire, "cum_bytes": cum,
            "share": cum / file_bytes, "seconds": cum * 8 / RATE_BPS,
            "max_abs_error": st["max_abs_error"], "exact": False, "metrics": {}}
        if st["stage"] == last and exact:
            row["exact"], row["metrics"] = True, dict(reference)
        elif subject.score is not None:
            model = load_stage_model(pkg, st["stage"]).SerializeToString()
            row["metrics"], row["error"] = score_safely(subject, model)
        stages.append(row)
    manifest = json.loads((pkg / "manifest.json").read_text())
    out = {**asdict(spec), "encode_s": encode_s, "encode_repeats": repeats, "stages": stages,
           "package": str(pkg), "notes": info.get("notes", []),
           "base_bits": _base_bits(pkg), "manifest_bytes": (pkg / "manifest.json").stat().st_size,
           "probe_bytes": (manifest.get("probe") or {}).get("size", 0)}
    if spec == DEFAULT:
        def device_decode() -> None:
            open_stages(pkg).write_weights(work / "weights.bin")

        out["decode_s"], _ = alt.timed(device_decode, repeats)
        (work / "weights.bin").unlink(missing_ok=True)
    return out


def _base_bits(pkg: Path) -> dict[str, int]:
    """How many coded weights got each base width (adaptive plans spread them)."""
    manifest = json.loads((pkg / "manifest.json").read_text())
    counts: dict[str, int] = {}
    for t in manifest["tensors"]:
        n = int(np.prod(t["shape"], dtype=np.int64))
        counts[str(t["bits"])] = counts.get(str(t["bits"]), 0) + n
    return counts


# ------------------------------------------------------------------------------------------
# Alternatives, plain scheme, latency
# ------------------------------------------------------------------------------------------


def run_alternatives(subject: em.Subject, work: Path, repeats: int, quick: bool,
                     nncodec_ok: str | None) -> list[alt.Alternative]:
    d = work / "alternatives"
    d.mkdir(parents=True, exist_ok=True)
    path = subject.path
    rows = [alt.ort_int8_dynamic(path, d, repeats),
            alt.ort_matmul_nbits(path, d, repeats, 32),
            alt.fp16(path, d, repeats),
            alt.zstd19(path, repeats)]
    if not quick:
        rows[2:2] = [alt.ort_matmul_nbits(path, d, repeats, 128),
                     alt.ort_matmul_nbits(path, d, repeats, 32, gather=True)]
        rows.append(alt.zipnn(path, repeats))
        if nncodec_ok is None:
            large = path.stat().st_size > LARGE_FILE
            rows += alt.nncodec(path, d, NNCODEC_QPS_LARGE if large else NNCODEC_QPS)
        else:
            rows.append(alt.Alternative("NNCodec", "lossy", error=nncodec_ok))
    fp16 = next(i for i, r in enumerate(rows) if r.method == "fp16")
    if rows[fp16].error is None and "onnxconverter" in rows[fp16].note:
        try:  # onnxconverter-common's output does not load for every graph: fall back
            em.session(rows[fp16].model)
        except Exception as e:  # noqa: BLE001
            rows[fp16] = alt.fp16_cast(path, d, repeats, alt.first_line(e))
    for r in rows:
        if r.error is None and r.model is not None and subject.score is not None:
            r.metrics, err = score_safely(subject, r.model)
            if err:
                r.error = f"the model it made does not run: {err}"
    return rows


def run_plain(plans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's plain scheme next to ours, for every fixed-bit block-32 plan."""
    out = []
    for p in plans:
        if p.get("error") or p["adaptive"] or p["granularity"] != "block" or p["block"] != 32:
            continue
        stages = p["stages"]
        plain = alt.plain_scheme(Path(p["package"]))
        out.append({"label": p["label"], "base_bits": int(stages[0]["bits"]), **plain,
                    "ours_base": stages[0]["wire_bytes"], "ours_total": stages[-1]["cum_bytes"],
                    "ours_stages": [s["wire_bytes"] for s in stages],
                    "ours_bits": [s["bits"] for s in stages]})
    return out


def measure_latency(subject: em.Subject, default_pkg: Path, default_wire: int,
                    alternatives: list[alt.Alternative], fp32_wire: int) -> list[dict[str, Any]]:
    """Load time, first-answer time at 1 Mbit/s and run time of each variant of a model.

    Load time: median of 3 (create the session, run once); run time: median of
    :data:`LATENCY_RUNS` runs after that. First answer: download at 1 Mbit/s (computed) + load.
    """
    from p2u_onnx.runtime import ProgressiveSession

    feed = subject.latency_feed
    assert feed is not None
    variants: list[tuple[str, int, Any]] = [
        ("fp32 (.onnx file, zstd -19 on the wire)", fp32_wire, lambda: em.session(subject.path)),
        ("p2u stage 0, onnxruntime on base.onnx", default_wire,
         lambda: em.session(default_pkg / "base.onnx")),
        ("p2u stage 0, ProgressiveSession(fast_base=True)", default_wire,
         lambda: ProgressiveSession(default_pkg, fast_base=True)),
    ]
    for a in alternatives:
        if a.error is None and isinstance(a.model, Path) and a.wire_bytes:
            variants.append((a.method, a.wire_bytes, lambda p=a.model: em.session(p)))
    rows = []
    for name, wire, make in variants:
        try:
            loads, sess = [], None
            for _ in range(3):
                if sess is not None and hasattr(sess, "close"):
                    sess.close()
                t = time.perf_counter()
                sess = make()
                sess.run(None, feed)
                loads.append(time.perf_counter() - t)
            runs = []
            for _ in range(LATENCY_RUNS):
                t = time.perf_counter()
                sess.run(None, feed)
                runs.append(time.perf_counter() - t)
            if hasattr(sess, "close"):
                sess.close()
            load = statistics.median(loads)
            rows.append({"variant": name, "wire_bytes": wire, "load_s": load,
                         "first_answer_s": wire * 8 / RATE_BPS + load,
                         "run_ms": 1000 * statistics.median(runs)})
        except Exception as e:  # noqa: BLE001
            rows.append({"variant": name, "error": alt.first_line(e)})
    return rows


def measure_transfer(pkg: Path, rate_bps: float) -> dict[str, Any] | None:
    """Time to each stage through ``p2u_onnx.devserver`` at ``rate_bps``, next to computed."""
    try:
        from p2u_onnx.devserver import PackageServer
        from p2u_onnx.runtime import ProgressiveSession
        from p2u_onnx.transport import HttpSource
    except ImportError as e:
        return {"error": alt.first_line(e)}
    wires = wire_bytes(pkg)
    measured = []
    try:
        with PackageServer(pkg, rate=rate_bps / 8) as srv:
            t0 = time.perf_counter()
            with HttpSource(srv.url) as src, ProgressiveSession(src) as s:
                feed = _synthetic_feed(s)
                s.run(None, feed)
                measured.append(time.perf_counter() - t0)
                for k in range(1, s.stages):
                    s.upgrade(k, background=False)
                    measured.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        return {"error": alt.first_line(e)}
    computed = list(np.cumsum(wires) * 8 / rate_bps)
    return {"package": pkg.name, "rate_bps": rate_bps, "wire_bytes": wires,
            "computed_s": [float(c) for c in computed], "measured_s": measured}


def _synthetic_feed(session: Any) -> dict[str, np.ndarray]:
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        dtype = np.int64 if "int64" in i.type else np.float32
        feed[i.name] = np.zeros(shape, dtype)
    return feed


# ------------------------------------------------------------------------------------------
# One model
# ------------------------------------------------------------------------------------------


def evaluate_subject(subject: em.Subject, plans: tuple[PlanSpec, ...], work: Path,
                     repeats: int, quick: bool, nncodec_ok: str | None,
                     latency: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    work = work / subject.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    file_bytes = subject.path.stat().st_size
    large = file_bytes > LARGE_FILE
    reps = 1 if large else repeats
    import onnx

    model = onnx.load(str(subject.path))
    params = sum(int(np.prod(t.dims)) for t in alt.float_tensors(model))
    del model
    reference, ref_err = score_safely(subject, subject.path)
    log(f"  fp32: {file_bytes / 1e6:.1f} MB, {params / 1e6:.2f}M float parameters, "
        f"reference {reference or 'none (random weights)'}")
    result: dict[str, Any] = {
        "name": subject.name, "description": subject.description, "path": str(subject.path),
        "random_weights": subject.random_weights, "file_bytes": file_bytes,
        "float_params": params, "metrics": list(subject.metrics), "primary": subject.primary,
        "reference": reference, "reference_error": ref_err, "repeats": reps,
        "fp32_wire_s": file_bytes * 8 / RATE_BPS, "plans": []}
    for spec in plans:
        t = time.perf_counter()
        p = run_plan(subject, spec, work, reference, file_bytes, reps if spec == DEFAULT else 1)
        result["plans"].append(p)
        summary = ", ".join(
            f"{s['share']:.1%}" + (f" {s['metrics'].get(subject.primary, float('nan')):.4f}"
                                   if subject.primary else "") for s in p["stages"])
        log(f"  {spec.label}: {p.get('error') or summary} ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    alternatives = run_alternatives(subject, work, reps, quick, nncodec_ok)
    result["alternatives"] = [a.record() for a in alternatives]
    for a in alternatives:
        msg = a.error or (f"{a.wire_bytes / file_bytes:.1%} on the wire"
                          + (f", {subject.primary} {a.metrics.get(subject.primary, float('nan')):.4f}"
                             if subject.primary and a.kind == "lossy" else ""))
        log(f"  {a.method}: {msg}")
    log(f"  alternatives: {time.perf_counter() - t:.0f} s")
    result["plain"] = run_plain(result["plans"])
    default = next((p for p in result["plans"] if p["label"] == DEFAULT.label and
                    not p.get("error")), None)
    if latency and subject.latency_feed is not None and default is not None:
        fp32_wire = next((a.wire_bytes for a in alternatives
                          if a.method == "zstd -19" and a.wire_bytes), file_bytes)
        result["latency"] = measure_latency(subject, Path(default["package"]),
                                            default["stages"][0]["cum_bytes"], alternatives,
                                            fp32_wire)
    result["seconds"] = time.perf_counter() - t_start
    return result


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def subjects(quick: bool, only: list[str] | None, work: Path) -> list[Any]:
    """Makers of the models to run, in report order (made lazily: MiniLM may need building)."""
    makers: list[tuple[str, Any]] = [("digits-cnn", em.digits_cnn), ("sklearn-mlp", em.sklearn_mlp)]
    if not quick:
        makers.append(("minilm", em.minilm))
        makers += [(n, lambda n=n: em.thirdparty(n)) for n in em.thirdparty_names()]
        makers.append(("bert-base-random", lambda: em.bert_base_random(work / "models")))
    if only:
        makers = [m for m in makers if m[0] in only]
    return makers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI subset (digits models, few plans)")
    ap.add_argument("--out", type=Path, help="report directory (default: docs/, or "
                                             "build/results-quick/ with --quick)")
    ap.add_argument("--work", type=Path, help="work files (default: build/eval, or OUT/work)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    ap.add_argument("--only", nargs="*", help="model names to run (default: all)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report from WORK/results.json without measuring")
    args = ap.parse_args(argv)
    out = args.out or (ROOT / "build" / "results-quick" if args.quick else ROOT / "docs")
    work = args.work or (out / "work" if args.quick else ROOT / "build" / "eval")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results_json = work / "results.json"
    if args.report_only:
        results = json.loads(results_json.read_text())
        eval_report.write(results, out)
        log(f"report: {out / 'results.md'}")
        return 0

    t0 = time.perf_counter()
    command = "python scripts/evaluate.py" + (" --quick" if args.quick else "")
    meta = {"command": command, "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine_info(), "rate_bps": RATE_BPS, "repeats": args.repeats,
            "latency_runs": LATENCY_RUNS, "wire_zstd_level": alt.WIRE_ZSTD_LEVEL,
            "plans": [asdict(p) for p in (QUICK_PLANS if args.quick else FULL_PLANS)]}
    nncodec_ok = None
    if not args.quick:
        log("NNCodec venv: checking (creating it when missing takes a few minutes)")
        nncodec_ok = alt.ensure_nncodec_venv(work / "nncodec-venv-install.log")
        log(f"  {nncodec_ok or 'usable'}")
    meta["versions"] = versions()
    meta["nncodec_status"] = nncodec_ok
    m = meta["machine"]
    log(f"machine: {m['cpu']}, {m['cores']} cores, "
        f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB, {m['os']}, load {m['load_average']}")
    log("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))

    plans = QUICK_PLANS if args.quick else FULL_PLANS
    results: dict[str, Any] = {"meta": meta, "subjects": []}
    for name, make in subjects(args.quick, args.only, work):
        log(f"\n== {name}")
        t = time.perf_counter()
        try:
            subject = make()
        except Exception as e:  # noqa: BLE001 - a model that cannot be had is reported
            log(f"  skipped: {alt.first_line(e)}")
            results["subjects"].append({"name": name, "skipped": alt.first_line(e)})
            continue
        results["subjects"].append(evaluate_subject(
            subject, plans, work, args.repeats, args.quick, nncodec_ok,
            latency=not args.quick))
        log(f"  {name}: {time.perf_counter() - t:.0f} s")
        results_json.write_text(json.dumps(results, indent=1, default=float))

    digits = next((s for s in results["subjects"] if s.get("name") == "digits-cnn"
                   and not s.get("skipped")), None)
    if digits is not None:
        pkg = next(Path(p["package"]) for p in digits["plans"] if p["label"] == DEFAULT.label)
        log("\n== measured transfer: digits-cnn default package through p2u_onnx.devserver")
        results["transfer_check"] = measure_transfer(pkg, RATE_BPS)
        log(f"  {results['transfer_check']}")
    meta["seconds"] = time.perf_counter() - t0
    results_json.write_text(json.dumps(results, indent=1, default=float))
    eval_report.write(results, out)
    log(f"\nreport: {out / 'results.md'} ({meta['seconds']:.0f} s)")
    headline = eval_report.headline(results)
    if headline:
        log("\n" + headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
