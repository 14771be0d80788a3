"""Encode every third-party model with p2u defaults and check the issue-15 targets on each.

For every model of ``scripts/thirdparty.py`` (or those given with ``--models a,b``) this script

1. encodes the original ``.onnx`` with ``p2u_onnx.encode(path, out)`` and nothing else (the
   defaults a new user gets), into a temporary folder under ``build/bench_anymodel/``, keeping
   whatever the encoder printed, warned or logged, and the manifest's ``notes``;
2. runs stage 0 through ``ProgressiveSession`` and ``base.onnx`` in plain onnxruntime, and
   every later stage restored with ``p2u_onnx.restore``, on the model's realistic inputs
   (``thirdparty.make_inputs``), scoring each against the original with the model's own metric
   (``thirdparty.agreement``: top-1, cosine, box F1, ...);
3. times stage 0 of ``ProgressiveSession`` and ``base.onnx`` in plain onnxruntime against the
   original ``InferenceSession`` in the same process: interleaved single runs (original,
   stage 0, base.onnx; the feeds in turn), the median of the per-round ratios, for about
   ``--seconds`` seconds per model after a warm-up;
4. compares the package's bytes with ``zstd -19`` of the model file (``zstandard`` at level 19,
   ``threads=-1``), and checks that the last stage is bit-exact twice: ``p2u_onnx.verify`` and
   a byte-for-byte comparison of every tensor of the restored last stage with the original.

Sizes are shares of the *fp32-equivalent* weight bytes: every float tensor (initializers and
``Constant`` values, subgraphs included) counted at 4 bytes per element, other tensors at their
own size, so an fp16 model is measured against the same yardstick as its fp32 twin. The base is
stage 0 as sent (``stage-0.p2u``, from the manifest). The whole package is what a client
downloads: ``manifest.json``, every ``stage-K.p2u`` and ``probe.npz``.

Only the public API is used (``encode``, ``ProgressiveSession``, ``restore``, ``verify``,
``inspect``), so the script measures whatever the encoder of the day does.

Usage::

    PYTHONPATH=$PWD python scripts/bench_anymodel.py [--models swift-f0,lac] [--json out.json]
        [--seconds 2.5] [--keep]

Prints one Markdown table of results and one of missed targets. Targets (issue 15): the base
loads; agreement >= 0.97 (cosine >= 0.99 for embeddings) at <= 20% of the fp32-equivalent
bytes; the last stage bit-exact; stage-0 latency <= 1.1x the original; the whole package
smaller than zstd -19 of the model file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
WORK = ROOT / "build" / "bench_anymodel"

import onnxruntime as ort  # noqa: E402

import p2u_onnx  # noqa: E402
import thirdparty as tp  # noqa: E402

SHARE_TARGET = 0.20
AGREE_TARGET = 0.97
COSINE_TARGET = 0.99
LATENCY_TARGET = 1.1


# ---------------------------------------------------------------------------------------------
# Model facts
# ---------------------------------------------------------------------------------------------

_FLOAT_TYPES = {1: 4, 10: 2, 16: 2, 11: 8}  # FLOAT, FLOAT16, BFLOAT16, DOUBLE: bytes per element


def _weight_tensors(model) -> list:
    """Initializers and Constant-node values of the graph and all its subgraphs."""
    out = []
    for g in tp._subgraphs(model.graph):
        out.extend(g.initializer)
        out.extend(a.t for n in g.node if n.op_type == "Constant" for a in n.attribute
                   if a.name == "value")
    return out


def _tensor_nbytes(t) -> int:
    from onnx import numpy_helper

    return int(numpy_helper.to_array(t).nbytes) if not t.raw_data else len(t.raw_data)


def fp32_equivalent_bytes(model) -> tuple[int, int, dict[str, int]]:
    """(fp32-equivalent weight bytes, actual weight bytes, float dtypes seen with their counts)."""
    fp32eq = actual = 0
    dtypes: dict[str, int] = {}
    for t in _weight_tensors(model):
        n = math.prod(t.dims)
        size = _tensor_nbytes(t)
        actual += size
        if t.data_type in _FLOAT_TYPES:
            fp32eq += 4 * n
            name = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64"}[t.data_type]
            dtypes[name] = dtypes.get(name, 0) + 1
        else:
            fp32eq += size
    return fp32eq, actual, dtypes


def _tensor_bytes_map(model) -> dict[str, bytes]:
    """Name -> exact bytes (as numpy sees them) of every weight tensor, for bit-exact checks.

    Keyed by the tensor's name (a Constant's output name), not by where it lives: a restore may
    lift Constant values into initializers. A name seen twice (in two subgraphs) gets ``#k``.
    """
    from onnx import numpy_helper

    out: dict[str, bytes] = {}

    def put(name: str, t) -> None:
        key, k = name, 1
        while key in out:
            key, k = f"{name}#{k}", k + 1
        out[key] = numpy_helper.to_array(t).tobytes()

    for g in tp._subgraphs(model.graph):
        for t in g.initializer:
            put(t.name, t)
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        put(n.output[0], a.t)
    return out


def zstd19_size(path: Path) -> int:
    """Size of ``zstd -19`` of the file (zstandard, level 19, all cores), cached by SHA-256."""
    import zstandard

    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    cache_file = WORK / "zstd19.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if digest not in cache:
        cache[digest] = len(zstandard.ZstdCompressor(level=19, threads=-1).compress(data))
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1))
    return int(cache[digest])


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ddddocr declares a wrong output shape; onnxruntime warns
    return opts


def _session(model: Path | bytes) -> ort.InferenceSession:
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, _options(), providers=["CPUExecutionProvider"])


def _run_all(sess, feeds) -> list:
    return [sess.run(None, f) for f in feeds]


def latency_ratios(orig, stage0, plain, feeds, seconds: float) -> tuple[float | None, float | None, int]:
    """Median per-round ratios (stage 0 / original, base.onnx / original) of interleaved runs.

    Each round runs the original, stage 0 and base.onnx once each on the same feed (feeds in
    turn), in an order that rotates from round to round: the session that runs right after
    another one meets its onnxruntime threads still spinning (on a loaded 2-core machine a fixed
    order made stage 0 of minilm-l3 look 1.18x slower than the original, and 0.73-0.82x in
    another order), so each session runs first, second and third equally often. Rounds go on for
    about ``seconds`` (at least 3, at most 500) after three warm-up runs of each.
    """
    sessions = [s for s in (orig, stage0, plain) if s is not None]
    for _ in range(3):
        for s in sessions:
            s.run(None, feeds[0])
    r0, r1 = [], []
    t_end = time.perf_counter() + seconds
    rounds = 0
    while rounds < 3 or (time.perf_counter() < t_end and rounds < 500):
        f = feeds[rounds % len(feeds)]
        times: list[float | None] = [None, None, None]
        for i in range(3):
            j = (i + rounds) % 3
            s = (orig, stage0, plain)[j]
            if s is None:
                continue
            t0 = time.perf_counter()
            s.run(None, f)
            times[j] = time.perf_counter() - t0
        if times[1] is not None:
            r0.append(times[1] / times[0])
        if times[2] is not None:
            r1.append(times[2] / times[0])
        rounds += 1
    med = lambda r: statistics.median(r) if r else None  # noqa: E731
    return med(r0), med(r1), rounds


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"log {record.levelname.lower()}: {record.getMessage()}")


@contextlib.contextmanager
def captured():
    """Collect what the encoder prints, warns and logs at WARNING or above.

    Python's stdout and stderr, ``warnings``, ``logging`` and file descriptor 2 (where
    onnxruntime's own C++ log lines go) are all captured; the lines are appended to the list
    this yields when the block ends.
    """
    out, err = io.StringIO(), io.StringIO()
    handler = _Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    lines: list[str] = []
    caught: list = []
    sys.stderr.flush()
    saved_fd = os.dup(2)
    fd_file = tempfile.TemporaryFile()
    os.dup2(fd_file.fileno(), 2)
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            yield lines
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        fd_file.seek(0)
        fd_text = re.sub(r"\x1b\[[0-9;]*m", "", fd_file.read().decode("utf-8", "replace"))
        fd_file.close()
        root.removeHandler(handler)
        lines.extend(f"{w.category.__name__}: {w.message}" for w in caught)
        lines.extend(handler.lines)
        lines.extend(ln.strip() for ln in (out.getvalue() + err.getvalue() + fd_text).splitlines()
                     if ln.strip())


def _dedupe(lines) -> list[str]:
    seen, out = set(), []
    for ln in lines:
        if ln not in seen:
            seen.add(ln)
            out.append(ln)
    return out


def bench_model(name: str, seconds: float, keep: bool) -> dict[str, Any]:
    """Encode ``name`` with defaults and measure everything the table reports."""
    import onnx

    row: dict[str, Any] = {"model": name, "metric": tp.metric_name(name), "errors": []}
    path = tp.get_model_path(name)
    model = onnx.load(str(path))
    fp32eq, actual, dtypes = fp32_equivalent_bytes(model)
    row.update(file_bytes=path.stat().st_size, fp32_equivalent_bytes=fp32eq,
               weight_bytes=actual, float_dtypes=dtypes)
    feeds = tp.make_inputs(name)
    orig = _session(path)
    ref = _run_all(orig, feeds)
    row["zstd19_bytes"] = zstd19_size(path)

    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=WORK))
    pkg = tmp / f"{name}.p2u"
    try:
        t0 = time.perf_counter()
        with captured() as lines:
            try:
                p2u_onnx.encode(path, pkg)
            except Exception as e:  # a failed encode is a result too
                lines.append(f"encode failed: {type(e).__name__}: {e}")
                row["errors"].append(f"encode: {type(e).__name__}: {e}")
        row["encode_seconds"] = time.perf_counter() - t0
        row["encoder_output"] = _dedupe(lines)
        if not pkg.exists():
            return row
        info = p2u_onnx.inspect(pkg)
        row["notes"] = list(info.get("notes") or [])
        stages = info["stages"]
        row["stage_bits"] = [s["bits"] for s in stages]
        row["stage_bytes"] = [s["bytes"] for s in stages]
        row["base_share"] = stages[0]["bytes"] / fp32eq
        row["stage_cumulative_share"] = [s["cumulative_bytes"] / fp32eq for s in stages]
        files = {p.name: p.stat().st_size for p in pkg.iterdir() if p.is_file()}
        row["package_files"] = files
        wire = files.get("manifest.json", 0) + sum(
            v for k, v in files.items() if k.startswith("stage-") and k.endswith(".p2u"))
        row["package_bytes_without_probe"] = wire
        row["probe_bytes"] = files.get("probe.npz", 0)
        if "probe.npz" not in files:
            row["errors"].append("the package has no probe.npz (no staleness check on upgrades)")
        row["package_bytes"] = wire + row["probe_bytes"]
        row["package_vs_zstd"] = row["package_bytes"] / row["zstd19_bytes"]
        row["package_without_probe_vs_zstd"] = wire / row["zstd19_bytes"]

        # stage 0 as users meet it: ProgressiveSession, and base.onnx in plain onnxruntime
        stage0 = plain = None
        try:
            stage0 = p2u_onnx.ProgressiveSession(pkg, _options(), ["CPUExecutionProvider"],
                                                 allow_rollback=True)
            row["stage0_agreement"] = tp.agreement(name, ref, _run_all(stage0, feeds))
        except Exception as e:
            row["errors"].append(f"stage 0 session: {type(e).__name__}: {str(e)[:300]}")
        try:
            plain = _session(pkg / "base.onnx")
            row["base_onnx_loads"] = True
            row["base_onnx_agreement"] = tp.agreement(name, ref, _run_all(plain, feeds))
        except Exception as e:
            row["base_onnx_loads"] = False
            row["errors"].append(f"base.onnx in onnxruntime: {type(e).__name__}: {str(e)[:300]}")
        r0, r1, rounds = latency_ratios(orig, stage0, plain, feeds, seconds)
        row.update(stage0_latency_ratio=r0, base_onnx_latency_ratio=r1, latency_rounds=rounds)
        if stage0 is not None:
            stage0.close()
        del plain

        # every later stage, restored
        agreements = [row.get("stage0_agreement")]
        last_model = None
        for k in range(1, len(stages)):
            out = tmp / f"stage{k}.onnx"
            try:
                p2u_onnx.restore(pkg, out, stage=k)
                agreements.append(tp.agreement(name, ref, _run_all(_session(out), feeds)))
                if k == len(stages) - 1:
                    last_model = onnx.load(str(out))
            except Exception as e:
                agreements.append(None)
                row["errors"].append(f"stage {k}: {type(e).__name__}: {str(e)[:300]}")
            out.unlink(missing_ok=True)
        row["stage_agreement"] = agreements

        # last stage bit-exact: verify() and a tensor-by-tensor byte comparison
        try:
            row["verify_lossless_match"] = p2u_onnx.verify(pkg).get("lossless_match")
        except Exception as e:
            row["verify_lossless_match"] = False
            row["errors"].append(f"verify: {type(e).__name__}: {str(e)[:300]}")
        if len(stages) == 1:
            last_model = None
            row["errors"].append("the package has one stage: nothing to restore exactly")
        if last_model is not None:
            a, b = _tensor_bytes_map(model), _tensor_bytes_map(last_model)
            differ = [k for k in a if b.get(k) != a[k]]
            row["last_stage_tensors"] = len(a)
            row["last_stage_tensors_differing"] = len(differ)
            row["last_stage_extra_tensors"] = len(set(b) - set(a))
            row["last_stage_bit_exact"] = not differ
        else:
            row["last_stage_bit_exact"] = False
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return row


# ---------------------------------------------------------------------------------------------
# Targets and tables
# ---------------------------------------------------------------------------------------------


def missed_targets(row: dict[str, Any]) -> list[str]:
    """The issue-15 targets this row misses, each as a short phrase with the number."""
    missed = []
    if "stage_bytes" not in row:
        return ["no package: " + ("; ".join(row.get("errors", [])) or "encode failed")]
    if not row.get("base_onnx_loads"):
        missed.append("base.onnx does not load")
    target = COSINE_TARGET if row["metric"] == "cosine" else AGREE_TARGET
    agr = row.get("stage0_agreement")
    if agr is None or agr < target:
        missed.append(f"base agreement {_f(agr)} < {target}")
    share = row.get("base_share")
    if share is None or share > SHARE_TARGET:
        missed.append(f"base share {_pct(share)} > {SHARE_TARGET:.0%}")
    if not (row.get("last_stage_bit_exact") and row.get("verify_lossless_match")):
        missed.append("last stage not bit-exact")
    lat = row.get("stage0_latency_ratio")
    if lat is None or lat > LATENCY_TARGET:
        missed.append(f"stage-0 latency {_x(lat)} > {LATENCY_TARGET}x")
    ratio = row.get("package_vs_zstd")
    if ratio is None or ratio >= 1.0:
        missed.append(f"package {_x(ratio)} of zstd -19")
    return missed


def _f(v, nd=4):
    return "-" if v is None else f"{v:.{nd}f}"


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | metric | fp32-eq MB | base share | base agr. (session / base.onnx) "
        "| later stages: agr. (cum. share) | stage-0 lat. | base.onnx lat. "
        "| package / zstd-19 (no probe) | last exact | encode s | encoder warnings and notes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if "stage_bytes" not in r:
            err = "; ".join(r.get("errors", [])) or "no package"
            lines.append(f"| {r['model']} | {r['metric']} | "
                         f"{r.get('fp32_equivalent_bytes', 0) / 1e6:.2f} | - | - | - | - | - | - "
                         f"| - | {_f(r.get('encode_seconds'), 0)} | {err} |")
            continue
        later = ", ".join(
            f"{b}: {_f(a)} ({_pct(s)})" for b, a, s in zip(
                r["stage_bits"][1:], r["stage_agreement"][1:], r["stage_cumulative_share"][1:]))
        notes = _dedupe(list(r.get("encoder_output", [])) + [f"note: {n}" for n in r.get("notes", [])]
                        + [f"error: {e}" for e in r.get("errors", [])])
        note_txt = "<br>".join(n.replace("|", "/")[:240] for n in notes) or "none"
        base_agr = f"{_f(r.get('stage0_agreement'))} / {_f(r.get('base_onnx_agreement'))}"
        exact = "yes" if r.get("last_stage_bit_exact") and r.get("verify_lossless_match") else "NO"
        dt = ",".join(r.get("float_dtypes", {})) or "-"
        lines.append(
            f"| {r['model']} | {r['metric']} | {r['fp32_equivalent_bytes'] / 1e6:.2f} ({dt}) "
            f"| {_pct(r['base_share'])} | {base_agr} | {later} | {_x(r.get('stage0_latency_ratio'))} "
            f"| {_x(r.get('base_onnx_latency_ratio'))} "
            f"| {_x(r.get('package_vs_zstd'))} ({_x(r.get('package_without_probe_vs_zstd'))}) "
            f"| {exact} | {_f(r.get('encode_seconds'), 0)} | {note_txt} |"
        )
    lines.append("")
    lines.append("| model | missed targets |")
    lines.append("|---|---|")
    for r in rows:
        lines.append(f"| {r['model']} | {'; '.join(missed_targets(r)) or 'none'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated registry names (default: all)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--seconds", type=float, default=2.5,
                    help="latency measurement time per model, after warm-up (default 2.5)")
    ap.add_argument("--keep", action="store_true", help="keep the packages under build/")
    args = ap.parse_args(argv)
    # the version state (rollback protection) of these throw-away encodes stays in build/
    os.environ.setdefault("P2U_STATE_DIR", str(WORK / "state"))
    names = args.models.split(",") if args.models else tp.list_models()
    unknown = [n for n in names if n not in tp.list_models()]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(tp.list_models())}")
    rows = []
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(bench_model(name, args.seconds, args.keep))
        except Exception as e:
            traceback.print_exc()
            rows.append({"model": name, "metric": tp.metric_name(name),
                         "errors": [f"{type(e).__name__}: {e}"]})
        r = rows[-1]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: share {_pct(r.get('base_share'))} "
              f"agreement {_f(r.get('stage0_agreement'))} missed: "
              f"{'; '.join(missed_targets(r)) or 'none'}", file=sys.stderr, flush=True)
        if args.json:  # after every model, so a long run leaves what it has
            args.json.write_text(json.dumps(rows, indent=1, default=str))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
