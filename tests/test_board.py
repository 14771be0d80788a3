"""The simulated board: a device killed mid-upgrade restarts on the stage files it had already
downloaded (a real SIGKILL of a real process), and scripts/bench_board.py --quick runs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

import p2u_onnx
import synth
from p2u_onnx.devserver import PackageServer

ROOT = Path(__file__).resolve().parent.parent
DEVICE = ROOT / "scripts" / "board_device.py"


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "P2U_STATE_DIR": str(tmp_path / "state")}


def _device(url: str, ref: Path, work: Path, tmp_path: Path, kill_at: int | None = None):
    """board_device.py run; its JSON events and exit status; SIGKILL once stage ``kill_at``
    is active."""
    proc = subprocess.Popen([sys.executable, str(DEVICE), "run", url, "--ref", str(ref),
                             "--workdir", str(work), "--strategy", "swap", "--period", "0.02",
                             "--simulate-device"], stdout=subprocess.PIPE, text=True,
                            env=_env(tmp_path))
    events = []
    try:
        for line in proc.stdout:
            events.append(json.loads(line))
            ev = events[-1]
            if kill_at is not None and ev.get("ev") == "stage" and ev.get("k") == kill_at:
                proc.send_signal(signal.SIGKILL)
        return events, proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_reboot_mid_upgrade_reuses_downloaded_stages(tmp_path):
    model = synth.mlp(din=256, hidden=512, dout=64)
    onnx.save(model, str(tmp_path / "m.onnx"))
    pkg = tmp_path / "m.p2u"
    p2u_onnx.encode(tmp_path / "m.onnx", pkg, "4,8,lossless")
    manifest = json.loads((pkg / "manifest.json").read_text())
    last = len(manifest["stages"]) - 1
    np.savez(tmp_path / "feed.npz", x=np.random.default_rng(1).standard_normal(
        (2, 256)).astype(np.float32))
    subprocess.run([sys.executable, str(DEVICE), "reference", str(tmp_path / "m.onnx"),
                    "--feed", str(tmp_path / "feed.npz"), "--out", str(tmp_path / "ref.npz")],
                   check=True, env=_env(tmp_path), timeout=120)
    # a link on which the last stage file takes about 4 s: the kill lands while it travels
    rate = manifest["stages"][last]["files"][0]["size"] / 4.0
    log: list[str] = []
    work = tmp_path / "work"
    with PackageServer(pkg, rate=rate, log=log.append) as server:
        events, rc = _device(server.url, tmp_path / "ref.npz", work, tmp_path, kill_at=last - 1)
        assert rc == -signal.SIGKILL
        assert events[-1]["ev"] == "stage" and events[-1]["k"] == last - 1  # no later stage
        killed_pid = events[0]["pid"]
        # what the dead device left: the stages it applied, checked against the manifest
        for k in range(last):
            entry = manifest["stages"][k]["files"][0]
            data = (work / "http" / entry["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert not (work / "http" / manifest["stages"][last]["files"][0]["path"]).exists()
        owners = [p.name.split("-")[1] for p in work.glob("session-*")]
        assert str(killed_pid) in owners  # its session folder, left behind
        seen = len(log)
        events2, rc2 = _device(server.url, tmp_path / "ref.npz", work, tmp_path)
    assert rc2 == 0, events2
    again = [ln.split('"')[1].split()[1].lstrip("/") for ln in log[seen:] if '"GET ' in ln]
    assert set(again) <= {"manifest.json", manifest["stages"][last]["files"][0]["path"]}, again
    assert "manifest.json" in again  # the manifest is asked anew on every start
    stages = {e["k"]: e["t"] for e in events2 if e["ev"] == "stage"}
    assert sorted(stages) == list(range(last + 1))
    done = events2[-1]
    assert done["ev"] == "done" and done["stage"] == last and done["exact"] is True
    # the restarted device removed the killed one's session folder
    assert str(killed_pid) not in [p.name.split("-")[1] for p in work.glob("session-*")]


def test_bench_board_quick(tmp_path):
    """The smoke run of the simulated board: every strategy reaches the exact last stage inside
    its cap (or says it is not in this build), and the reboot refetches no applied stage."""
    out = tmp_path / "board"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_board.py"), "--quick",
                        "--out", str(out), "--json", str(tmp_path / "board.json")],
                       capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "board.json").read_text())
    rows = {row["asked"]: row for row in res["results"]}
    assert set(rows) == {"swap", "inplace", "auto"}
    for name, row in rows.items():
        if name == "auto" and row["status"] == "not in this build":
            assert "auto: not in this build" in r.stdout
            continue
        if "RLIMIT_AS" in row["cap"] and name != "inplace" and not row["fit"]:
            # a machine without a usable cgroup: the address-space cap counts what
            # onnxruntime and glibc reserve; only the inplace strategy is held to it
            assert row["status"].startswith("failed") and row["status"] in r.stdout
            continue
        assert row["fit"] is True and row["exact"] is True, row
        assert row["reached"] == max(int(k) for k in row["stages"])
        assert row["first"] < row["stages"][str(row["reached"])]
        assert row["lat_med"] is not None and row["lat_med"] <= row["lat_max"]
    (boot,) = res["reboots"]
    assert boot["killed"] and boot["exact"] is True and boot["back_to_k"] is not None
    applied = {f"stage-{k}.p2u" for k in range(boot["k"] + 1)} | {"probe.npz"}
    assert not {f.split()[0] for f in boot["refetched"]} & applied, boot["refetched"]
    assert "| quick-mlp | swap |" in r.stdout and "Reboot mid-upgrade" in r.stdout
    assert "memory cap: " in r.stdout
