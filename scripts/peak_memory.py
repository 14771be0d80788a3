"""Where a live upgrade's memory peaks come from: RSS split into anonymous and file pages, per
phase (start, then each stage), optionally inside a memory cgroup of a given size.

Usage::

    python scripts/peak_memory.py PACKAGE FEED.npz [--strategy swap|inplace|auto]
        [--cap MiB]

``--cap`` moves the process into a new memory cgroup limited to that many MiB first (cgroup v2
``memory.max``, else v1 ``memory.limit_in_bytes``; needs the right to make one, e.g. root) and
reports whether the upgrade reached the last stage; when the kernel kills the process for
memory, the parent says so. Peaks are sampled every 2 ms from ``/proc/self/status``
(``RssAnon``, ``RssFile``; ``VmHWM`` for the overall peak). Page cache of the work files is not
in the RSS but counts in a cgroup (the kernel can drop it when clean: the write-back thread
makes it clean as the decoder goes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


def _make_cgroup(mib: int) -> Path:
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.exists():
        d = Path(f"/sys/fs/cgroup/p2u-peak-{os.getpid()}")
        d.mkdir()
        (d / "memory.max").write_text(str(mib << 20))
        if (d / "memory.swap.max").exists():
            (d / "memory.swap.max").write_text("0")
    else:
        d = Path(f"/sys/fs/cgroup/memory/p2u-peak-{os.getpid()}")
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(mib << 20))
    return d


def child(pkg: str, feed_path: str, strategy: str, cgroup: str | None) -> None:
    if cgroup:
        Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
    import numpy as np

    from p2u_onnx.runtime import ProgressiveSession

    feed = dict(np.load(feed_path))
    phase, peaks, stop = ["start"], {}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            p = peaks.setdefault(phase[0], {})
            for k, v in _status().items():
                p[k] = max(p.get(k, 0), v)
            time.sleep(0.002)

    base = _status()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    with ProgressiveSession(pkg, strategy=strategy) as s:
        print(f"strategy {s.strategy_reason}", flush=True)
        s.run(None, feed)
        steady = {"start": _status()}
        times = {"start": time.perf_counter() - t0}
        for k in range(1, s.stages):
            phase[0] = f"stage {k}"
            s.upgrade(until=k).result()
            s.run(None, feed)
            steady[phase[0]] = _status()
            times[phase[0]] = time.perf_counter() - t0
        stop.set()
        t.join()
        print(json.dumps({"after_imports": base, "peaks": peaks, "steady": steady,
                          "seconds": times, "reached": s.stage, "last": s.stages - 1}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("feed")
    ap.add_argument("--strategy", default="swap")
    ap.add_argument("--cap", type=int, help="MiB: run inside a memory cgroup of this size")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.package, a.feed, a.strategy, a.child or None)
        return 0
    cg = _make_cgroup(a.cap) if a.cap else None
    try:
        r = subprocess.run([sys.executable, __file__, a.package, a.feed, "--strategy",
                            a.strategy, "--child", str(cg or "")], capture_output=True,
                           text=True, check=False)
    finally:
        if cg is not None:
            time.sleep(0.2)
            cg.rmdir()
    lines = r.stdout.strip().splitlines()
    print(lines[0] if lines else "")
    if r.returncode:
        killed = r.returncode == -9
        print(f"did not finish: {'killed (out of memory)' if killed else r.stderr[-800:]}")
        return 1
    res = json.loads(lines[-1])
    cap = f", cap {a.cap} MiB" if a.cap else ""
    print(f"reached stage {res['reached']} of {res['last']}{cap}; MiB, after imports: "
          f"{res['after_imports']}")
    print("| phase | at [s] | peak RSS | peak anonymous | peak file | after: anonymous | file |")
    print("|---|---|---|---|---|---|---|")
    for phase, p in res["peaks"].items():
        s = res["steady"].get(phase, {})
        print(f"| {phase} | {res['seconds'].get(phase, 0):.1f} | {p['VmRSS']} | {p['RssAnon']} "
              f"| {p['RssFile']} | {s.get('RssAnon', '')} | {s.get('RssFile', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
