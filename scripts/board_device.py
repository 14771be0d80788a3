"""The device process of the simulated board (scripts/bench_board.py): one core, a memory cap,
a ProgressiveSession over a URL, inferences during the upgrade. Device-side imports only.

Two modes::

    # outputs of the original model, computed on one core, for each strategy's session options
    python scripts/board_device.py reference MODEL.onnx --feed feed.npz --out ref.npz [--core 1]

    # the device: join the memory cap, pin to one core, serve from the URL and upgrade
    python scripts/board_device.py run URL --ref ref.npz --workdir W --strategy inplace \\
        [--core 1] [--cgroup /sys/fs/cgroup/...] [--rlimit-as BYTES] [--period 0.2] [--t0 T]

``run`` prints one JSON object per line on stdout, as things happen: ``start`` (the cap in
force), ``first`` (the base answered), ``stage`` (each stage applied; RSS then), ``done``
(the stage reached, whether its outputs equal the original's bit for bit, inference latencies
during the upgrade overall and per stage, peak RSS, files in the download cache) or
``unsupported`` (the strategy is not in this build: ValueError) or ``error``. Times are seconds
since ``--t0`` (a ``time.monotonic()`` of the parent: system-wide on Linux), else since this
process started. With ``--simulate-device``, onnx, click and tqdm cannot be imported.
"""

from __future__ import annotations

import time

T_START = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def peak_rss() -> int:
    """VmHWM: this process's peak resident set (bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def confine(core: int | None, cgroup: str | None, rlimit_as: int | None) -> str:
    """Join the cgroup, pin to ``core``, cap the address space; returns what is in force.
    Done before numpy and onnxruntime are imported, so everything they allocate counts."""
    said = []
    if cgroup:
        Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
        said.append(f"cgroup {cgroup}")
    if rlimit_as:
        resource.setrlimit(resource.RLIMIT_AS, (rlimit_as, rlimit_as))
        said.append(f"RLIMIT_AS {rlimit_as >> 20} MiB")
    if core is not None:
        os.sched_setaffinity(0, {core})
        said.append(f"core {core}")
    return ", ".join(said) or "no limits"


def reference(model: str, feed_path: str, out: str) -> None:
    """The original model's outputs under the options each strategy's sessions use."""
    import numpy as np
    import onnxruntime as ort

    feed = dict(np.load(feed_path))
    swap = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    ys = {"swap": swap.run(None, feed)[0]}
    del swap
    so = ort.SessionOptions()  # the inplace float session: optimizations and prepacking off
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.disable_prepacking", "1")
    ys["inplace"] = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(
        None, feed)[0]
    np.savez(out, **{f"feed:{k}": v for k, v in feed.items()},
             **{f"out:{k}": v for k, v in ys.items()})


def run(a: argparse.Namespace, t0: float) -> int:
    import statistics

    import numpy as np

    from p2u_onnx.runtime import ProgressiveSession

    ref = np.load(a.ref)
    feed = {k[5:]: ref[k] for k in ref.files if k.startswith("feed:")}
    now = lambda: time.monotonic() - t0  # noqa: E731
    stage_at: dict[int, float] = {}

    def on_stage(k: int) -> None:
        stage_at[k] = now()
        emit(ev="stage", k=k, t=stage_at[k], rss=rss())

    try:
        sess = ProgressiveSession(a.source, strategy=a.strategy, workdir=a.workdir,
                                  on_stage=on_stage)
    except ValueError as e:
        emit(ev="unsupported", msg=str(e))
        return 3
    with sess:
        sess.run(None, feed)
        emit(ev="first", t=now(), rss=rss(), strategy=sess.strategy, stages=sess.stages)
        until = sess.stages - 1 if a.until is None else a.until
        future = sess.upgrade(until=until)
        runs: list[tuple[int, float]] = []  # (stage the run started at, seconds)
        while not future.done():
            k = sess.stage
            t = time.perf_counter()
            sess.run(None, feed)
            dt = time.perf_counter() - t
            runs.append((k, dt))
            if a.period > dt:
                time.sleep(a.period - dt)
        reached = future.result()
        t_done = now()
        y = sess.run(None, feed)[0]
        exact = bool(np.array_equal(y, ref[f"out:{sess.strategy}"])) \
            if reached == sess.stages - 1 else None
        lat = [d for _, d in runs]
        per_stage = {}
        for k in sorted({k for k, _ in runs}):
            ds = [d for s, d in runs if s == k]
            per_stage[k] = [statistics.median(ds), max(ds), len(ds)]
        cache = Path(a.workdir) / "http"
        emit(ev="done", stage=reached, t=t_done, exact=exact, strategy=sess.strategy,
             runs=len(lat), lat_med=statistics.median(lat) if lat else None,
             lat_max=max(lat) if lat else None, per_stage=per_stage, peak_rss=peak_rss(),
             rss=rss(), cached=sorted(p.name for p in cache.glob("*") if p.is_file()))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("model")
    r.add_argument("--feed", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--core", type=int)
    d = sub.add_parser("run")
    d.add_argument("source")
    d.add_argument("--ref", required=True)
    d.add_argument("--workdir", required=True)
    d.add_argument("--strategy", default="swap")
    d.add_argument("--until", type=int)
    d.add_argument("--core", type=int)
    d.add_argument("--cgroup")
    d.add_argument("--rlimit-as", type=int)
    d.add_argument("--period", type=float, default=0.2,
                   help="seconds between the starts of two inferences (0: back to back)")
    d.add_argument("--t0", type=float, help="the parent's time.monotonic() at the spawn")
    d.add_argument("--simulate-device", action="store_true")
    a = p.parse_args()
    if a.cmd == "reference":
        confine(a.core, None, None)
        reference(a.model, a.feed, a.out)
        return 0
    if a.simulate_device:
        sys.modules.update(onnx=None, click=None, tqdm=None)
    limits = confine(a.core, a.cgroup, a.rlimit_as)
    t0 = a.t0 if a.t0 is not None else T_START
    emit(ev="start", pid=os.getpid(), limits=limits, t=time.monotonic() - t0)
    try:
        return run(a, t0)
    except MemoryError as e:
        emit(ev="error", msg=f"MemoryError: {e}")
        return 4
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        emit(ev="error", msg=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return 5


if __name__ == "__main__":
    sys.exit(main())
