"""Benchmark the device runtime: apply time, latency per stage, runs during upgrades, memory.

For a MiniLM-sized model (``build/minilm/minilm.onnx`` from ``scripts/make_minilm.py``; skipped
with a message when absent) and a synthetic model of >= 100M parameters (MatMul+Add+Relu
layers, random weights, built here), and for each strategy of :class:`ProgressiveSession`:

* start: seconds from ``ProgressiveSession(...)`` to the base answering (plain onnxruntime
  loading the fp32 model is shown for comparison, and the base with ``fast_base=True``),
* plain onnxruntime running the fp32 model in a loop for 20 s with no upgrade: its median,
  p99.9 and worst run, the machine's own jitter, for scale against the worst runs below,
* per stage: seconds to apply it (verify, decode, build or patch, probe) and the median
  inference latency at that stage,
* during a background upgrade, with one thread calling ``run()`` in a loop: the median and the
  worst ``run()`` latency, also over the runs that started at stage 1 or later (stage-0 runs
  are slow without ``fast_base`` and compete with decoding; the later ones show the inplace
  writer lock),
* peak RSS of a process that starts the session and applies every stage, above its RSS right
  after imports, as a multiple of the model's fp32 weight bytes (``VmHWM``); ``start RSS`` is
  the same once the base answers, before any upgrade.

Each measurement runs in its own subprocess; ``--repeat N`` runs each N times and shows ranges
(min-max; the machine may be shared). Usage::

    python scripts/bench_runtime.py [--out build/bench_runtime] [--plan 4,8,lossless] [--reuse]
        [--repeat 3] [--models minilm,synthetic-100M] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MINILM = ROOT / "build" / "minilm" / "minilm.onnx"
REPEATS = 30
JITTER_SECONDS = 20
TARGET_PEAK = {"swap": 2.2, "inplace": 1.3}


def build_synthetic(path: Path, layers: int = 6, width: int = 4096) -> None:
    """``layers`` x (MatMul width x width + Add + Relu): 6 x 4096 -> 100.7M parameters."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((width, width), dtype=np.float32) / np.float32(np.sqrt(width))
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(width, dtype=np.float32) * 0.1,
                                          f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        prev = f"r{i}"
    g = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["batch", width])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def make_feed(model: Path, out: Path) -> None:
    """Batch 1; other free dimensions 128; token ids in [0, 1000), masks of ones."""
    import onnxruntime as ort

    feed = {}
    rng = np.random.default_rng(0)
    for a in ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs():
        shape = [d if isinstance(d, int) else (1 if i == 0 else 128)
                 for i, d in enumerate(a.shape)]
        if a.type == "tensor(int64)":
            feed[a.name] = np.ones(shape, np.int64) if "mask" in a.name else \
                rng.integers(0, 1000, shape).astype(np.int64)
        else:
            feed[a.name] = rng.standard_normal(shape).astype(np.float32)
    np.savez(out, **feed)


def package(model: Path, out: Path, plan: str, reuse: bool) -> dict:
    """Encode and record the probe (``reuse``: keep a package already there); the manifest."""
    import p2u_onnx
    from p2u_onnx.format import load_manifest, save_manifest
    from p2u_onnx.probe import record_probe

    if not (reuse and (out / "manifest.json").exists()):
        t0 = time.perf_counter()
        p2u_onnx.encode(model, out, plan, overwrite=True)
        manifest = load_manifest(out)
        manifest["probe"] = record_probe(out, manifest)
        save_manifest(out, manifest)
        print(f"  encoded {model.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return json.loads((out / "manifest.json").read_text())


# ---------------------------------------------------------------- workers (one per process)


def _latency(run, feed, repeats: int = REPEATS) -> float:
    run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    """VmHWM: this process's peak RSS (``ru_maxrss`` would include the parent's, via exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(mode: str, target: str, strategy: str, feed_path: str) -> dict:
    import onnxruntime as ort

    from p2u_onnx.runtime import ProgressiveSession

    feed = dict(np.load(feed_path))
    base_rss = _rss()
    out: dict = {}
    if mode == "plain":
        t0 = time.perf_counter()
        s = ort.InferenceSession(target, providers=["CPUExecutionProvider"])
        out["start"] = time.perf_counter() - t0
        out["latency"] = _latency(s.run, feed)
        # the machine's own jitter: the same loop as during an upgrade, with no upgrade
        times, end = [], time.perf_counter() + JITTER_SECONDS
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            s.run(None, feed)
            times.append(time.perf_counter() - t0)
        out["loop"] = {"runs": len(times), "median": statistics.median(times),
                       "p999": float(np.percentile(times, 99.9)), "worst": max(times)}
    elif mode == "fastbase":
        t0 = time.perf_counter()
        s = ProgressiveSession(target, fast_base=True)
        s.run(None, feed)
        out["start"] = time.perf_counter() - t0
        out["latency"] = _latency(s.run, feed)
        s.close()
    elif mode == "quiet":
        t0 = time.perf_counter()
        s = ProgressiveSession(target, strategy=strategy)
        s.run(None, feed)
        out["start"] = time.perf_counter() - t0
        out["start_rss"] = _rss() - base_rss
        out["stages"] = [{"apply": 0.0, "latency": _latency(s.run, feed)}]
        out["stages"][0]["rss"] = _rss() - base_rss
        for k in range(1, s.stages):
            t0 = time.perf_counter()
            s.apply(Path(target) / f"stage-{k}.p2u")
            out["stages"].append({"apply": time.perf_counter() - t0,
                                  "latency": _latency(s.run, feed), "rss": _rss() - base_rss})
        s.close()
    else:  # live
        s = ProgressiveSession(target, strategy=strategy)
        s.run(None, feed)
        times: list[float] = []
        stages: list[int] = []  # stage when each run started
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                stage = s.stage
                t0 = time.perf_counter()
                s.run(None, feed)
                times.append(time.perf_counter() - t0)
                stages.append(stage)

        th = threading.Thread(target=loop)
        th.start()
        time.sleep(0.5)
        while len(times) < 3:  # an idle median even when runs are slow
            time.sleep(0.05)
        before = len(times)
        t0 = time.perf_counter()
        s.upgrade().result()
        out["upgrade"] = time.perf_counter() - t0
        during = times[before:]
        later = [t for t, k in zip(during, stages[before:]) if k >= 1]
        stop.set()
        th.join()
        s.close()
        out["runs_during"] = len(during)
        out["median_during"] = statistics.median(during) if during else float("nan")
        out["worst_during"] = max(during) if during else float("nan")
        out["worst_during_later"] = max(later) if later else float("nan")
        out["median_before"] = statistics.median(times[:before])
        out["during"] = [[t, k] for t, k in zip(during, stages[before:])]
    out["peak_rss_above_base"] = _peak_rss() - base_rss
    return out


def run_worker(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True,
                       text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"worker {args} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def _range(values: list[float], fmt: str = ".2f") -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else \
        f"{format(lo, fmt)}-{format(hi, fmt)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench_runtime")
    ap.add_argument("--plan", default="4,8,lossless")
    ap.add_argument("--reuse", action="store_true",
                    help="keep packages from an earlier run (only if the format did not change)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (ranges)")
    ap.add_argument("--models", default="minilm,synthetic-100M",
                    help="comma-separated subset of: minilm, synthetic-100M")
    ap.add_argument("--strategies", default="swap,inplace")
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    ap.add_argument("--worker", nargs=4, metavar=("MODE", "TARGET", "STRATEGY", "FEED"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    wanted = set(args.models.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    models: list[tuple[str, Path]] = []
    if "minilm" in wanted:
        if MINILM.exists():
            models.append(("minilm", MINILM))
        else:
            print(f"skipping MiniLM: {MINILM} not found (run python scripts/make_minilm.py)")
    if "synthetic-100M" in wanted:
        synthetic = args.out / "synthetic100m.onnx"
        if not synthetic.exists():
            print("building the synthetic 100M-parameter model ...", flush=True)
            build_synthetic(synthetic)
        models.append(("synthetic-100M", synthetic))

    rows, record, verdicts = [], [], []
    for name, model in models:
        pkg = args.out / f"{name}.p2u"
        manifest = package(model, pkg, args.plan, args.reuse)
        feed = args.out / f"{name}.feed.npz"
        make_feed(model, feed)
        fp32 = manifest["source"]["coded_fp32_bytes"]
        plain = run_worker("plain", str(model), "-", str(feed))
        print(f"\n{name}: {fp32 / 1e6:.0f} MB of fp32 coded weights, plan {args.plan}, "
              f"stage bytes {[s['bytes'] for s in manifest['stages']]}, "
              f"probe: {'yes' if manifest.get('probe') else 'no'}")
        print(f"  plain onnxruntime (fp32 model): load {plain['start']:.3f} s, latency "
              f"{plain['latency'] * 1e3:.2f} ms, peak RSS {plain['peak_rss_above_base'] / fp32:.2f}"
              " x fp32")
        loop = plain["loop"]
        print(f"  plain onnxruntime in a loop for {JITTER_SECONDS} s, no upgrade: {loop['runs']} "
              f"runs, median {loop['median'] * 1e3:.1f} ms, p99.9 {loop['p999'] * 1e3:.1f} ms, "
              f"worst {loop['worst'] * 1e3:.1f} ms (+{(loop['worst'] - loop['median']) * 1e3:.0f}"
              " ms above the median with nothing else running)")
        fast = run_worker("fastbase", str(pkg), "swap", str(feed))
        print(f"  fast_base=True: start {fast['start']:.3f} s, stage-0 latency "
              f"{fast['latency'] * 1e3:.2f} ms")
        record.append({"model": name, "fp32": fp32, "plain": plain, "fast_base": fast})
        for strategy in args.strategies.split(","):
            quiet = [run_worker("quiet", str(pkg), strategy, str(feed))
                     for _ in range(args.repeat)]
            live = [run_worker("live", str(pkg), strategy, str(feed))
                    for _ in range(args.repeat)]
            rows.append((name, strategy, manifest, quiet, live, fp32))
            record.append({"model": name, "strategy": strategy, "quiet": quiet, "live": live})
            peak = _range([q["peak_rss_above_base"] / fp32 for q in quiet])
            # worst run during the upgrade, above the idle latency of the stage it started on
            idle = [statistics.median(q["stages"][k]["latency"] for q in quiet)
                    for k in range(len(quiet[0]["stages"]))]
            excess = [max((t - idle[k] for t, k in x["during"]), default=float("nan"))
                      for x in live]
            # onnxruntime's own overhead: plain onnxruntime's peak above the weights
            overhead = max(plain["peak_rss_above_base"] / fp32 - 1, 0)
            target = TARGET_PEAK[strategy] + overhead
            worst_peak = max(q["peak_rss_above_base"] for q in quiet) / fp32
            verdicts.append(
                f"| {name} | {strategy} | {_range([e * 1e3 for e in excess], '.0f')} | "
                f"{'yes' if max(excess) <= 0.050 else 'no'} | {peak} | "
                f"{TARGET_PEAK[strategy]} + {overhead:.2f} = {target:.2f} | "
                f"{'yes' if worst_peak <= target else 'no'} |")
            print(f"  {strategy}: start {_range([q['start'] for q in quiet], '.3f')} s; " +
                  "; ".join(f"stage {k}: apply {_range([q['stages'][k]['apply'] for q in quiet])}"
                            f" s, latency "
                            f"{_range([q['stages'][k]['latency'] * 1e3 for q in quiet])} ms"
                            for k in range(len(quiet[0]["stages"]))))
            print(f"    live upgrade {_range([x['upgrade'] for x in live])} s, "
                  f"{_range([x['runs_during'] for x in live], '.0f')} runs during it: median "
                  f"{_range([x['median_during'] * 1e3 for x in live], '.1f')} ms, worst "
                  f"{_range([x['worst_during'] * 1e3 for x in live], '.1f')} ms (started at "
                  f"stage >= 1: {_range([x['worst_during_later'] * 1e3 for x in live], '.1f')}"
                  f" ms; idle median "
                  f"{_range([x['median_before'] * 1e3 for x in live])} ms); peak RSS {peak} x "
                  f"fp32 (RSS once each stage is up: " + " / ".join(
                      _range([q["stages"][k]["rss"] / fp32 for q in quiet])
                      for k in range(len(quiet[0]["stages"]))) + ")", flush=True)

    print(f"\n{args.repeat} run(s) each; ranges are min-max")
    print("| model | strategy | stage | bits | apply [s] | latency [ms] | worst run during "
          "upgrade [ms] (all / started at stage >= 1) | RSS / fp32 after stage | peak RSS / "
          "fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, strategy, manifest, quiet, live, fp32 in rows:
        for k in range(len(quiet[0]["stages"])):
            first = k == 0
            apply = "start " + _range([q["start"] for q in quiet], ".3f") if first else \
                _range([q["stages"][k]["apply"] for q in quiet])
            print(f"| {name if first else ''} | {strategy if first else ''} | {k} | "
                  f"{manifest['stages'][k]['bits']} | {apply} | "
                  f"{_range([q['stages'][k]['latency'] * 1e3 for q in quiet])} | "
                  + (f"{_range([x['worst_during'] * 1e3 for x in live], '.0f')} / "
                     f"{_range([x['worst_during_later'] * 1e3 for x in live], '.0f')}"
                     if first else "") + " | "
                  f"{_range([q['stages'][k]['rss'] / fp32 for q in quiet])} | "
                  f"{_range([q['peak_rss_above_base'] / fp32 for q in quiet]) if first else ''} |")
    print("\nTargets: the worst run() during an upgrade at most one inference (the idle latency "
          "of the stage it started on) + 50 ms; peak RSS at most 2.2x (swap) or 1.3x (inplace) "
          "the fp32 weights plus onnxruntime's own overhead (plain onnxruntime's peak on the "
          "fp32 model, above the weights)")
    print("| model | strategy | worst run above one inference [ms] | <= 50 ms | peak RSS / fp32 "
          "| target | met |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(verdicts))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
