"""Benchmark live upgrades under a saturating ``run()`` load, and in a larger process.

For each model (MiniLM from ``scripts/make_minilm.py``, the same MiniLM pre-quantized by
onnxruntime's ``quantize_dynamic`` so that few weights are left to code, and the synthetic
100M-parameter model of ``scripts/bench_runtime.py``), each strategy and each process kind,
a fresh subprocess repeats, interleaved:

* an **idle upgrade**: a new session upgrades to its last stage with nothing else running;
* a **loaded upgrade**: a new session, ``--threads`` threads (default 3) calling ``run()``
  back to back; after ``--settle`` seconds of that load the upgrade starts, and the loop runs
  on until it completes.

It prints, per configuration (medians over ``--repeat`` repeats; ranges min-max):
idle upgrade time, upgrade time under load, their ratio (target <= 3), the decoder's share of
the time runs and decoder competed (counted by the session's lock), an idle inference
(median of 20 runs, the slower of stage 0 and the last stage), a run under the load without
an upgrade (median, the slower of the two stages), and the median, 99th percentile and worst
run while the upgrade ran; the worst run's excess over one loaded inference (target <= 50 ms);
and for scale the same load without an upgrade, as long as the upgrade took (at most 30 s):
its worst run's excess over its median, what the machine adds with no upgrade at all.
Also the load average of the machine over the run (the machine may be shared: compare rows
measured together).

``--process large`` first loads other models into the same process (plain onnxruntime
sessions of the 100M model and of MiniLM, plus 1 GiB of touched numpy arrays), the way an
application serving several models would: an upgrade's cost must not grow with them.

Usage::

    python scripts/bench_load.py [--models minilm,minilm-int8,synthetic-100M]
        [--strategies swap,inplace] [--process small,large] [--repeat 3]
        [--share 0.5] [--turn 0.25] [--json out.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_runtime as br  # noqa: E402

OUT = ROOT / "build" / "bench_load"


def prepare(names: list[str], plan: str) -> dict[str, tuple[Path, Path, Path]]:
    """name -> (source model, package, feed .npz), made once and reused."""
    OUT.mkdir(parents=True, exist_ok=True)
    models: dict[str, tuple[Path, Path, Path]] = {}
    for name in names:
        if name.startswith("minilm"):
            if not br.MINILM.exists():
                print(f"skipping {name}: run scripts/make_minilm.py first", flush=True)
                continue
            src = br.MINILM
            if name == "minilm-int8":
                src = OUT / "minilm-int8.onnx"
                if not src.exists():
                    from onnxruntime.quantization import quantize_dynamic

                    quantize_dynamic(str(br.MINILM), str(src))
        elif name == "synthetic-100M":
            src = OUT / "synthetic-100M.onnx"
            if not src.exists():
                br.build_synthetic(src)
        else:
            raise SystemExit(f"unknown model {name}")
        pkg, feed = OUT / f"{name}.p2u", OUT / f"{name}.feed.npz"
        br.package(src, pkg, plan, reuse=True)
        if not feed.exists():
            br.make_feed(src, feed)
        models[name] = (src, pkg, feed)
    return models


# ---------------------------------------------------------------- worker (one per process)


def _ballast(extra: list[str]) -> list:
    """Other models and data in this process, as an application serving several would hold."""
    import onnxruntime as ort

    held: list = []
    for path in extra:
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = dict(np.load(Path(path).with_suffix(".feed.npz")))
        s.run(None, feed)
        held.append(s)
    arrays = [np.ones(64 << 20, np.uint8) for _ in range(16)]  # 1 GiB, touched
    held.append(arrays)
    return held


def _median_run(session, feed, n: int = 20) -> float:
    session.run(None, feed)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(pkg: str, feed_path: str, strategy: str, repeat: int, threads: int, settle: float,
           share: float | None, turn: float | None, extra: list[str]) -> dict:
    from p2u_onnx.runtime import ProgressiveSession

    feed = dict(np.load(feed_path))
    held = _ballast(extra) if extra else []
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * 4096
    opts: dict = dict(strategy=strategy)
    if "decoder_share" in inspect.signature(ProgressiveSession).parameters:
        opts.update({k: v for k, v in (("decoder_share", share), ("decoder_turn", turn))
                     if v is not None})  # (older versions: their pacing)
    out: dict = {"idle": [], "loaded": [], "idle_inference": [], "loaded_run": [],
                 "during_median": [], "during_worst": [], "during_p99": [], "contested_share": [],
                 "no_upgrade_excess": [],
                 "process_rss_mib": rss / 2**20, "strategy_used": None}
    for _ in range(repeat):
        # idle
        with ProgressiveSession(pkg, **opts) as s:
            out["strategy_used"] = s.strategy
            first = _median_run(s, feed)
            t0 = time.perf_counter()
            s.upgrade().result()
            out["idle"].append(time.perf_counter() - t0)
            out["idle_inference"].append(max(first, _median_run(s, feed)))
        # loaded
        with ProgressiveSession(pkg, **opts) as s:
            s.run(None, feed)
            stop = threading.Event()
            log: list[tuple[float, float]] = []  # (start, seconds)

            def loop() -> None:
                while not stop.is_set():
                    t = time.perf_counter()
                    s.run(None, feed)
                    log.append((t, time.perf_counter() - t))

            workers = [threading.Thread(target=loop) for _ in range(threads)]
            for w in workers:
                w.start()
            time.sleep(settle)
            t0 = time.perf_counter()
            s.upgrade().result()
            t1 = time.perf_counter()
            # the same load without an upgrade, as long as the upgrade took (at most 30 s):
            # how far the worst run is above the median there says what the machine adds
            time.sleep(min(30.0, max(settle, t1 - t0)))
            stop.set()
            for w in workers:
                w.join()
            # runs before the upgrade (the first one of each thread aside) and after it
            before = [d for t, d in log[threads:] if t + d < t0] or [d for t, d in log
                                                                      if t + d < t0]
            after = [d for t, d in log if t > t1] or [d for t, d in log if t + d > t1]
            during = [d for t, d in log if t < t1 and t + d > t0]
            c = getattr(s._turns, "contested", [0.0, 0.0])
            out["loaded"].append(t1 - t0)
            out["loaded_run"].append(max(statistics.median(before), statistics.median(after)))
            out["during_median"].append(statistics.median(during))
            out["during_worst"].append(max(during))
            out["during_p99"].append(float(np.percentile(during, 99)))
            out["no_upgrade_excess"].append(max(after) - statistics.median(after))
            out["contested_share"].append(c[1] / max(1e-9, c[0] + c[1]))
    del held
    return out


# ---------------------------------------------------------------- table


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _rng(xs: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    lo, hi = min(xs) * scale, max(xs) * scale
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,minilm-int8,synthetic-100M")
    ap.add_argument("--strategies", default="swap,inplace")
    ap.add_argument("--process", default="small,large")
    ap.add_argument("--plan", default="4,8,lossless")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--settle", type=float, default=1.5)
    ap.add_argument("--share", type=float, default=None,
                    help="the sessions' decoder_share (default: the runtime's)")
    ap.add_argument("--turn", type=float, default=None,
                    help="the sessions' decoder_turn in seconds (default: the runtime's)")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="seconds per configuration (all its repeats)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(**json.loads(a.worker))))
        return
    names = a.models.split(",")
    models = prepare(sorted(set(names) | ({"minilm", "synthetic-100M"}
                                          if "large" in a.process else set())), a.plan)
    print("| model | process (RSS before) | strategy | idle upgrade [s] | upgrade under load [s] "
          "| ratio (range) | decoder share of contested time | idle inference [ms] | "
          "loaded run, no upgrade [ms] | run during upgrade, median [ms] | p99 [ms] | worst [ms] (range) "
          "| worst - loaded run [ms] | no upgrade: worst - median [ms] | met (<= 3x, <= +50 ms) "
          "| load avg (5 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in names:
        if name not in models:
            continue
        src, pkg, feed = models[name]
        for process in a.process.split(","):
            extra = [str(models[m][0]) for m in ("synthetic-100M", "minilm") if m in models] \
                if process == "large" else []
            for m in extra:  # the ballast loader finds each model's feed beside it
                f = Path(m).with_suffix(".feed.npz")
                if not f.exists():
                    br.make_feed(Path(m), f)
            for strategy in a.strategies.split(","):
                args = dict(pkg=str(pkg), feed_path=str(feed), strategy=strategy,
                            repeat=a.repeat, threads=a.threads, settle=a.settle,
                            share=a.share, turn=a.turn, extra=extra)
                try:
                    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(args)],
                                       capture_output=True, text=True, check=False,
                                       timeout=a.timeout)
                except subprocess.TimeoutExpired:
                    print(f"| {name} | {process} | {strategy} | did not finish within "
                          f"{a.timeout:.0f} s |", flush=True)
                    continue
                if r.returncode:
                    print(f"{name} {process} {strategy}: failed\n{r.stderr[-2000:]}", flush=True)
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                res.update(model=name, process=process, strategy=strategy,
                           loadavg=os.getloadavg()[1])
                rows.append(res)
                ratio = [b / i for b, i in zip(res["loaded"], res["idle"])]
                excess = [w - l for w, l in zip(res["during_worst"], res["loaded_run"])]
                print(f"| {name} | {process} ({res['process_rss_mib']:.0f} MiB) | "
                      f"{res['strategy_used']} | {_med(res['idle']):.2f} | "
                      f"{_med(res['loaded']):.2f} | {_med(ratio):.2f} ({_rng(ratio)}) | "
                      f"{_med(res['contested_share']):.2f} | "
                      f"{_med(res['idle_inference']) * 1e3:.0f} | "
                      f"{_med(res['loaded_run']) * 1e3:.0f} | "
                      f"{_med(res['during_median']) * 1e3:.0f} | "
                      f"{_med(res['during_p99']) * 1e3:.0f} | "
                      f"{_med(res['during_worst']) * 1e3:.0f} ({_rng(res['during_worst'], 1e3, '.0f')}) | "
                      f"{_med(excess) * 1e3:+.0f} | "
                      f"{_med(res.get('no_upgrade_excess') or [float('nan')]) * 1e3:+.0f} | "
                      f"{'yes' if _med(ratio) <= 3 and _med(excess) <= 0.05 else 'no'} | "
                      f"{os.getloadavg()[1]:.1f} |",
                      flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
