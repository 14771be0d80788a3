"""Benchmark a live update of the 100M-parameter model under load (issue 17's runtime target).

v1: the synthetic model of ``scripts/bench_runtime.py`` (6 x MatMul 4096 x 4096 + Add + Relu,
100.7M parameters, 403 MB of fp32 weights), encoded as a full package. v2: v1 "fine-tuned":
every weight and bias moved by gaussian noise of ``--move`` times its tensor's standard
deviation (seeded), encoded as an update against v1's package (the default update plan).

For each strategy, in its own process: a :class:`~p2u_onnx.runtime.ProgressiveSession` on v1
upgraded to its last stage (exact v1), one thread calling ``run()`` in a loop, then
``session.update(v2-from-v1)`` to the update's last stage (exact v2). Printed per strategy: the
update's time (stage 0 swapped in, then to exact), the median run before it, the median and
the worst run while it ran, the target (worst <= one inference + 50 ms: the median before +
0.05 s), the worst run over the median before, beside the same over the 8 s of the same
loop just before the update (the load's own jitter, as ``scripts/bench_load.py`` shows it for
upgrades), the process's RSS before the update and its peak during the update (the high-water
mark is reset just before it), each above its RSS after imports as a multiple of the fp32
weight bytes, against the upgrades' targets (swap 2.2x, inplace 1.3x, plus onnxruntime's own
overhead: plain onnxruntime's peak above the weights when it loads v2, as
``scripts/bench_runtime.py`` counts it), whether an inplace session took the update without a
new session, and whether the session answers as v2 bit for bit at the end. Plain
onnxruntime's own jitter over the same loop (no update) is printed for scale.

On a virtual machine the hypervisor may run other work on its CPUs (steal time, counted by
/proc/stat): a run during which it did took up to 35 ms longer, with or without an update,
and no code of the process could change that. Each run's steal is counted, and the worst run
is also given over the runs without any (beside the same for the load before the update).

Usage: ``python scripts/bench_live_update.py [--out build/bench_live_update] [--reuse]
[--strategies swap,inplace] [--move 0.01] [--turn SECONDS]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_runtime import TARGET_PEAK, _peak_rss, _rss, build_synthetic, make_feed  # noqa: E402

SLACK = 0.050  # the target: worst run <= one inference + 50 ms


def make_v2(v1: Path, v2: Path, move: float, seed: int = 1) -> None:
    """v1 with every float initializer moved by ``move`` x its standard deviation (gaussian)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(v1))
    rng = np.random.default_rng(seed)
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        d = rng.standard_normal(a.shape, dtype=np.float32) * np.float32(move * a.std())
        t.CopyFrom(numpy_helper.from_array((a + d).astype(np.float32), t.name))
    onnx.save(m, str(v2))


def worker(strategy: str, v1pkg: str, update: str, feed_path: str, ref_path: str,
           quiet: float = 8.0, turn: float | None = None) -> dict:
    from p2u_onnx.runtime import ProgressiveSession

    feed = dict(np.load(feed_path))
    base_rss = _rss()
    out: dict = {"strategy": strategy}
    s = ProgressiveSession(v1pkg, strategy=strategy, workdir=str(Path(update).parent / "work"),
                           **({} if turn is None else {"decoder_turn": turn}))
    s.upgrade(background=False)
    s.run(None, feed)
    out["rss_v1"] = _rss() - base_rss
    times: list[float] = []
    starts: list[float] = []
    stolen: list[int] = []  # the hypervisor's steal during each run (clock ticks, both CPUs)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            st = _steal()
            t0 = time.perf_counter()
            s.run(None, feed)
            times.append(time.perf_counter() - t0)
            stolen.append(_steal() - st)
            starts.append(t0)

    th = threading.Thread(target=loop)
    th.start()
    # the same load without an update first, for scale: its worst run over its median
    time.sleep(quiet)
    while len(times) < 5:
        time.sleep(0.05)
    before = len(times)
    warm = max(1, before // 10)  # the first runs of the loop warm up
    out["jitter_before"] = max(times[warm:before]) - statistics.median(times[warm:before])
    # the update's own peak: the high-water mark starts again here (Linux: clear_refs 5),
    # above what the process held before it (v1 exact, serving)
    out["rss_before_update"] = _rss() - base_rss
    out["peak_reset"] = _reset_peak()
    first = weakref.ref(s._live.session)  # (an id could be reused by a new session)
    t0 = time.perf_counter()
    s.update(update, until=0)
    t1 = time.perf_counter()
    out["stage0"] = t1 - t0
    s.upgrade(background=False)
    out["update"] = time.perf_counter() - t0
    after_n = len(times)
    time.sleep(0.5)
    stop.set()
    th.join()
    during = times[before:after_n + 1]
    out["median_before"] = statistics.median(times[:before])
    out["runs_during"] = len(during)
    out["median_during"] = statistics.median(during) if during else float("nan")
    out["worst_during"] = max(during) if during else float("nan")
    # runs during which the hypervisor ran something else on this machine's CPUs (steal time,
    # /proc/stat): time no code of this process could use
    hit = stolen[before:after_n + 1]
    out["runs_stolen"] = sum(1 for x in hit if x)
    out["worst_unstolen"] = max((t for t, x in zip(during, hit) if not x), default=float("nan"))
    out["jitter_before_unstolen"] = max(
        (t for t, x in zip(times[warm:before], stolen[warm:before]) if not x),
        default=float("nan")) - statistics.median(times[warm:before])
    # where the worst runs were: while stage 0 was decoded and swapped in, or later stages
    st = starts[before:after_n + 1]
    out["worst_stage0"] = max((t for t, a in zip(during, st) if a < t1), default=float("nan"))
    out["worst_later"] = max((t for t, a in zip(during, st) if a >= t1), default=float("nan"))
    # v2's outputs from onnxruntime with the session's own options (inplace runs with graph
    # optimizations and prepacking off, which changes the float results of MatMul)
    out["exact_v2"] = bool(np.array_equal(s.run(None, feed)[0], np.load(ref_path)[
        "y_plain" if s._strategy == "inplace" else "y"]))
    out["strategy_after"] = getattr(s, "_strategy", None)
    out["same_session"] = first() is s._live.session
    s.close()
    out["peak_rss_above_base"] = _peak_rss() - base_rss
    return out


def _steal() -> int:
    """Clock ticks the hypervisor gave this virtual machine's CPUs to others so far (the steal
    column of /proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) if len(fields) > 8 else 0
    except OSError:
        return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def jitter(model: str, feed_path: str, seconds: float = 10.0) -> dict:
    import onnxruntime as ort

    feed = dict(np.load(feed_path))
    base = _rss()
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    s.run(None, feed)
    peak = _peak_rss() - base
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "worst": max(times), "runs": len(times),
            "peak": peak}


def run_worker(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True,
                       text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"worker {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench_live_update")
    ap.add_argument("--reuse", action="store_true", help="keep models and packages already there")
    ap.add_argument("--strategies", default="swap,inplace")
    ap.add_argument("--move", type=float, default=0.01)
    ap.add_argument("--plan", default="4,lossless", help="v1's full package plan")
    ap.add_argument("--turn", type=float, default=None,
                    help="the sessions' decoder_turn in seconds (default: the runtime's)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker[0] == "jitter":
            print(json.dumps(jitter(args.worker[1], args.worker[2])))
        else:
            print(json.dumps(worker(*args.worker, turn=args.turn)))
        return
    import onnxruntime as ort

    import p2u_onnx
    from p2u_onnx.updates import encode_update

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # the version state of this run's sessions (v1, then v2 accepted, then v1 again for the
    # next strategy): its own, not the user's
    import os

    os.environ["P2U_STATE_DIR"] = str(out / "state")
    shutil_rm(out / "state")
    v1, v2 = out / "v1.onnx", out / "v2.onnx"
    feed, ref = out / "feed.npz", out / "v2_out.npz"
    if not (args.reuse and v1.exists()):
        build_synthetic(v1)
    if not (args.reuse and v2.exists()):
        make_v2(v1, v2, args.move)
    make_feed(v1, feed)
    sess = ort.InferenceSession(str(v2), providers=["CPUExecutionProvider"])
    y = sess.run(None, dict(np.load(feed)))[0]
    del sess
    from p2u_onnx.runtime import _inplace_options

    sess = ort.InferenceSession(str(v2), _inplace_options(None),
                                providers=["CPUExecutionProvider"])
    np.savez(ref, y=y, y_plain=sess.run(None, dict(np.load(feed)))[0])
    del sess
    fp32 = v1.stat().st_size
    pkg, upd = out / "v1.p2u", out / "v2-from-v1.p2u"
    if not (args.reuse and (pkg / "manifest.json").exists()):
        t0 = time.perf_counter()
        p2u_onnx.encode(v1, pkg, args.plan, overwrite=True, name="synthetic", version=1)
        print(f"encoded v1 ({args.plan}) in {time.perf_counter() - t0:.1f} s", flush=True)
    if not (args.reuse and (upd / "manifest.json").exists()):
        t0 = time.perf_counter()
        r = encode_update(v2, upd, pkg, overwrite=True, name="synthetic", version=2)
        print(f"encoded the update in {time.perf_counter() - t0:.1f} s", flush=True)
    m = json.loads((upd / "manifest.json").read_text())
    st = m["stages"]
    bits = sorted({t.get("bits") for t in m["tensors"] if t["update"] == "delta"})
    print(f"v1/v2: {fp32 / 1e6:.0f} MB model files; update plan {m['plan']} (delta bits "
          f"{bits}): stage 0 {st[0]['bytes']:,} B ({st[0]['bytes'] / fp32:.2%} of fp32), "
          f"exact {st[-1]['cumulative_bytes']:,} B ({st[-1]['cumulative_bytes'] / fp32:.2%})")
    j = run_worker("jitter", str(v2), str(feed), "-", "-")
    # onnxruntime's own overhead, allowed on top of the memory targets as for upgrades
    # (scripts/bench_runtime.py): plain onnxruntime's peak above the weights when it loads v2
    overhead = max(j["peak"] / fp32 - 1, 0)
    print(f"plain onnxruntime loop, no update (10 s): median {j['median'] * 1e3:.1f} ms, "
          f"worst {j['worst'] * 1e3:.1f} ms over {j['runs']} runs; its peak RSS loading v2 "
          f"{j['peak'] / fp32:.2f}x the fp32 weights (overhead {overhead:.2f})")
    print()
    print("| strategy | update s (stage 0 swapped in) | median run before ms | runs during | "
          "median during ms | worst during ms (stage 0 / later) | target ms (median + 50) | met | "
          "worst - median, update | worst - median, same load before it | "
          "runs with steal | worst - median, runs without steal: update / same load before | met | "
          "RSS before / fp32 | peak RSS during the update / fp32 | target (+ overhead) | met | "
          "exact v2 | strategy after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for strategy in args.strategies.split(","):
        shutil_rm(out / "work")
        shutil_rm(out / "state")
        r = run_worker(strategy, str(pkg), str(upd), str(feed), str(ref),
                       *(() if args.turn is None else ("--turn", str(args.turn))))
        target = r["median_before"] + SLACK
        peak = r["peak_rss_above_base"] / fp32
        limit = TARGET_PEAK.get(strategy, float("nan")) + overhead
        print(f"| {strategy} | {r['update']:.1f} ({r['stage0']:.1f}) | "
              f"{r['median_before'] * 1e3:.1f} | {r['runs_during']} | "
              f"{r['median_during'] * 1e3:.1f} | {r['worst_during'] * 1e3:.1f} "
              f"({r['worst_stage0'] * 1e3:.1f} / {r['worst_later'] * 1e3:.1f}) | "
              f"{target * 1e3:.1f} | {'yes' if r['worst_during'] <= target else 'NO'} | "
              f"+{(r['worst_during'] - r['median_before']) * 1e3:.0f} | "
              f"+{r['jitter_before'] * 1e3:.0f} | "
              f"{r['runs_stolen']} | +{(r['worst_unstolen'] - r['median_before']) * 1e3:.0f} / "
              f"+{r['jitter_before_unstolen'] * 1e3:.0f} | "
              f"{'yes' if r['worst_unstolen'] <= target else 'NO'} | "
              f"{r['rss_before_update'] / fp32:.2f} | "
              f"{peak:.2f}{'' if r['peak_reset'] else ' (whole process)'} | "
              f"{TARGET_PEAK.get(strategy, float('nan'))} + {overhead:.2f} | "
              f"{'yes' if peak <= limit else 'NO'} | "
              f"{'yes' if r['exact_v2'] else 'NO'} | {r['strategy_after']}"
              f"{' (same session)' if r['same_session'] else ''} |", flush=True)


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
