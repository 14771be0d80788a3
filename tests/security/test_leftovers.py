"""Leftovers and shared files: a session never links to or writes into its package, the work
folders of dead processes are removed by the next one, a truncated stage file is a clean error
and never a SIGBUS, ``--force`` replaces a package atomically, packages are readable by a web
server, SIGTERM leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import synth
from click.testing import CliRunner

import p2u_onnx
from p2u_onnx import _workdir, encoder
from p2u_onnx.cli import main as cli
from p2u_onnx.errors import IntegrityError, P2UError
from p2u_onnx.format import load_manifest, save_manifest
from p2u_onnx.probe import record_probe
from p2u_onnx.runtime import ProgressiveSession

ROOT = Path(__file__).resolve().parents[2]
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _package(out: Path, plan: str = "4,8,lossless") -> Path:
    p2u_onnx.encode(synth.mlp(), out, plan)
    manifest = load_manifest(out)
    manifest["probe"] = record_probe(out, manifest)
    save_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def pkg(tmp_path_factory) -> Path:
    return _package(tmp_path_factory.mktemp("pkg") / "m.p2u")


@pytest.fixture(scope="module")
def feed() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)}


@pytest.fixture(scope="module")
def refs(pkg, feed, tmp_path_factory) -> dict[str, list[np.ndarray]]:
    """Outputs of every restored stage in plain onnxruntime, per strategy's session options."""
    d = tmp_path_factory.mktemp("refs")
    out: dict[str, list[np.ndarray]] = {"swap": [], "inplace": []}
    for k in range(len(load_manifest(pkg)["stages"])):
        path = str(p2u_onnx.restore(pkg, d / f"{k}.onnx", stage=k))
        for strategy in out:
            so = ort.SessionOptions()
            if k and strategy == "inplace":
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                so.add_session_config_entry("session.disable_prepacking", "1")
            out[strategy].append(ort.InferenceSession(path, so).run(None, feed)[0])
    return out


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every file of ``folder``: inode, link count, size, mtime, sha256."""
    snap = {}
    for p in sorted(folder.iterdir()):
        st = p.lstat()
        snap[p.name] = (st.st_ino, st.st_nlink, st.st_size, st.st_mtime_ns,
                        hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env.pop("PYTHONHASHSEED", None)
    return env


def _spawn(code: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE,
                            text=True, env=_env(**env), cwd=ROOT)


def _ours(folder: Path) -> list[str]:
    """What p2u left in ``folder`` (onnxruntime's telemetry keeps a ``.ses`` file in $TMPDIR)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".ses")


def _wait_line(proc: subprocess.Popen, prefix: str, timeout: float = 60) -> str:
    """The first stdout line of ``proc`` starting with ``prefix``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line[len(prefix):].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"no {prefix!r} line; stderr: {proc.stderr.read()[-2000:]}")


# ---------------------------------------------------------------- no links into the package


@pytest.mark.parametrize("strategy", ["swap", "inplace"])
def test_session_never_links_or_writes_into_the_package(pkg, feed, refs, strategy, tmp_path):
    before = _snapshot(pkg)
    work = tmp_path / "work"
    with ProgressiveSession(pkg, strategy=strategy, workdir=work) as s:
        np.testing.assert_array_equal(s.run(None, feed)[0], refs[strategy][0])
        s.upgrade(background=False)
        np.testing.assert_array_equal(s.run(None, feed)[0], refs[strategy][-1])
        inodes = {p.lstat().st_ino for p in work.rglob("*") if p.is_file()}
        now = _snapshot(pkg)
        assert all(v[1] == 1 for v in now.values()), now  # no hard link anywhere
        assert not inodes & {v[0] for v in now.values()}
        # onnx refuses hard-linked external data: verify and restore work while it runs
        assert p2u_onnx.verify(pkg)["lossless_match"] is True
        p2u_onnx.restore(pkg, tmp_path / "final.onnx")
        assert ort.InferenceSession(str(tmp_path / "final.onnx")).run(None, feed)[0] \
            .shape == refs[strategy][-1].shape
    assert _snapshot(pkg) == before  # same inodes, links, sizes, times, contents
    assert list(work.iterdir()) == []


def test_workdir_inside_the_package_is_refused(pkg):
    before = _snapshot(pkg)
    for work in (pkg, pkg / "cache"):
        with pytest.raises(P2UError, match="inside the package folder"):
            ProgressiveSession(pkg, workdir=work)
    assert _snapshot(pkg) == before


# ---------------------------------------------------------------- dead sessions' folders

_HOLD = """
import sys
from p2u_onnx.runtime import ProgressiveSession
s = ProgressiveSession(sys.argv[1], workdir=sys.argv[2] if len(sys.argv) > 2 else None)
s.apply(s._source.fetch(1))
print("DIR", s._dir, flush=True)
sys.stdin.readline()  # until the test lets go (or kills us)
s.close()
print("CLOSED", flush=True)
"""


@linux
@pytest.mark.parametrize("where", ["workdir", "tmpdir"])
def test_killed_session_folder_is_removed_by_the_next(pkg, tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    args, env = ([pkg, work], {}) if where == "workdir" else ([pkg], {"TMPDIR": str(work)})
    if where == "tmpdir":
        monkeypatch.setattr("tempfile.tempdir", str(work))
    killed = _spawn(_HOLD, *args, **env)
    live = _spawn(_HOLD, *args, **env)
    try:
        dead_dir = Path(_wait_line(killed, "DIR "))
        live_dir = Path(_wait_line(live, "DIR "))
        assert dead_dir.parent == work == live_dir.parent
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(10) == -signal.SIGKILL
        assert any(dead_dir.rglob("weights*"))  # what it left behind
        with ProgressiveSession(pkg, workdir=work if where == "workdir" else None) as s:
            assert s._dir.parent == work
            assert not dead_dir.exists()  # removed: its owner is dead
            assert live_dir.is_dir() and any(live_dir.rglob("weights*"))  # owner alive: kept
        live.stdin.write("\n")
        live.stdin.flush()
        assert _wait_line(live, "CLOSED") == "" and live.wait(10) == 0
        assert _ours(work) == []
    finally:
        for p in (killed, live):
            if p.poll() is None:
                p.kill()
            p.communicate()


@linux
def test_killed_session_from_a_url_leaves_nothing_for_long(pkg, tmp_path, monkeypatch):
    """A session from a URL has two temporary folders (its work folder and the download
    cache): both are named after the process, and the next session removes both."""
    from p2u_onnx.devserver import PackageServer

    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(work))
    with PackageServer(pkg) as srv:
        killed = _spawn(_HOLD, srv.url, TMPDIR=str(work))
        try:
            _wait_line(killed, "DIR ")
            left = _ours(work)
            assert len(left) == 2 and {n.startswith("p2u-http-") for n in left} == {True, False}
            assert all(f"-{killed.pid}-" in n for n in left)  # both named after their owner
            killed.send_signal(signal.SIGKILL)
            assert killed.wait(10) == -signal.SIGKILL
        finally:
            if killed.poll() is None:
                killed.kill()
            killed.communicate()
        assert _ours(work) == left  # what the killed process left
        with ProgressiveSession(srv.url) as s:
            assert s.upgrade(background=False) == s.stages - 1
            assert not set(left) & set(_ours(work))  # both removed
        assert _ours(work) == []


@linux
def test_sweep_tells_reused_pids_and_never_follows_links(tmp_path):
    work, victim = tmp_path / "work", tmp_path / "victim"
    work.mkdir()
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    pid, start, boot, host = _workdir.owner_tag().split("-")
    mine = work / f"session-{pid}-{start}-{boot}-{host}-00000001"  # this process: alive
    reused = work / f"session-{pid}-{int(start) + 1}-{boot}-{host}-00000002"  # pid reused
    rebooted = work / f"session-{pid}-{start}-{'0' * 8}-{host}-00000003"  # an earlier boot
    foreign = work / f"session-{pid}-{int(start) + 1}-{boot}-{'f' * 8}-00000004"  # elsewhere
    other = work / "session-abc"  # not a name we make
    for d in (mine, reused, rebooted, foreign, other):
        d.mkdir()
        (d / "weights.bin").write_bytes(b"x" * 10)
    os.symlink(victim, reused / "link")  # inside a dead folder: the link goes, not its target
    trap = work / f"session-{pid}-{int(start) + 1}-{boot}-{host}-00000005"
    os.symlink(victim, trap)  # a link named like a dead folder: not a folder, left alone
    removed = _workdir.sweep(work, "session-")
    assert sorted(removed) == sorted([reused, rebooted])
    assert not reused.exists() and not rebooted.exists()
    assert mine.is_dir() and foreign.is_dir() and other.is_dir() and trap.is_symlink()
    assert (victim / "keep.txt").read_text() == "precious"
    assert _workdir.owner_alive(os.getpid(), int(start), boot, host)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    assert not _workdir.owner_alive(int(dead.stdout), int(start), boot, host)


# ---------------------------------------------------------------- truncated stage files

_TRUNCATE = """
import os, shutil, sys
import numpy as np
from p2u_onnx import runtime
from p2u_onnx.errors import IntegrityError, P2UError

pkg, intact, refs, strategy = sys.argv[1], sys.argv[2], np.load(sys.argv[3]), sys.argv[4]
feed = {"x": refs["x"]}
runtime._COPY_CHUNK = 1024  # many chunks, so that a truncation lands in the middle of a copy

def out():
    return s.run(None, feed)[0]

s = runtime.ProgressiveSession(pkg, strategy=strategy)
# the package's base shrinks to nothing while the base serves
os.truncate(os.path.join(pkg, "base.bin"), 0)
os.truncate(os.path.join(pkg, "base.onnx"), 0)
assert np.array_equal(out(), refs["s0"])

# stage 1 is truncated while the session copies and checks it: a clean error
stage1 = os.path.join(pkg, "stage-1.p2u")
size = os.path.getsize(stage1)
pace, calls = s._pace, [0]
def truncating_pace():
    calls[0] += 1
    if calls[0] == 2:
        os.truncate(stage1, size // 2)
    return pace()
s._pace = truncating_pace
try:
    s.apply(stage1)
    raise SystemExit("FAIL: a truncated stage file was applied")
except IntegrityError as e:
    print("ERROR", e, flush=True)
s._pace = pace
assert s.stage == 0 and np.array_equal(out(), refs["s0"])

# once checked, the stage files are truncated or rewritten: the session decodes what it checked
shutil.copyfile(os.path.join(intact, "stage-1.p2u"), stage1)
open_stage = runtime.open_stage
def then_damage(source, manifest, k, *a, **kw):
    sf = open_stage(source, manifest, k, *a, **kw)
    original = os.path.join(pkg, f"stage-{k}.p2u")
    if k == 1:
        os.truncate(original, 0)
    else:  # same size, other bytes
        with open(original, "r+b") as f:
            f.write(os.urandom(os.path.getsize(original)))
    return sf
runtime.open_stage = then_damage
for k in (1, 2):
    assert s.apply(os.path.join(pkg, f"stage-{k}.p2u")) == k
    assert np.array_equal(out(), refs[f"s{k}"]), k
s.close()
print("OK", flush=True)
"""


@pytest.mark.parametrize("strategy", ["swap", "inplace"])
def test_truncated_stage_file_is_a_clean_error_not_sigbus(pkg, feed, refs, strategy, tmp_path):
    """The serving side runs in a subprocess: a SIGBUS would show as a signal exit."""
    own = tmp_path / "m.p2u"
    shutil.copytree(pkg, own)
    np.savez(tmp_path / "refs.npz", x=feed["x"],
             **{f"s{k}": r for k, r in enumerate(refs[strategy])})
    r = subprocess.run([sys.executable, "-c", _TRUNCATE, own, pkg, tmp_path / "refs.npz",
                        strategy], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-3000:])
    assert "OK" in r.stdout
    error = next(line for line in r.stdout.splitlines() if line.startswith("ERROR"))
    assert "stage-1.p2u" in error and "truncated" in error, error


def test_huge_stage_file_is_not_copied_whole(pkg, tmp_path):
    """The private copy stops one byte past the package's largest stage file."""
    huge = tmp_path / "stage-1.p2u"
    with open(huge, "wb") as f:
        f.write((pkg / "stage-1.p2u").read_bytes())
        f.truncate(64 << 30)  # 64 GiB, sparse
    largest = max(st["files"][0]["size"] for st in load_manifest(pkg)["stages"])
    work = tmp_path / "work"
    with ProgressiveSession(pkg, workdir=work) as s:
        written = []
        s._writeback.add = lambda fd, off, n: written.append(n)
        t0 = time.monotonic()
        with pytest.raises(IntegrityError, match="stage-1.p2u"):
            s.apply(huge)
        assert time.monotonic() - t0 < 30 and written == [largest + 1]
        assert s.stage == 0 and not list(s._dir.glob("incoming-*"))


def test_stage_file_that_is_not_a_regular_file_is_refused(pkg, tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "stage-1.p2u"
    os.mkfifo(fifo)
    with ProgressiveSession(pkg) as s:
        with pytest.raises(IntegrityError, match="not a regular file"):
            s.apply(fifo)  # would block forever if opened for a plain read
        assert s.stage == 0
        assert s.apply(pkg / "stage-1.p2u") == 1


# ---------------------------------------------------------------- --force, modes, -o


def _watched(out: Path, work) -> dict[str, int]:
    """Run ``work()`` while a thread reads ``out/manifest.json`` in a loop; what it saw."""
    stop, seen = threading.Event(), {"reads": 0, "missing": 0, "bad": 0}

    def reader() -> None:
        while not stop.is_set():
            try:
                m = json.loads((out / "manifest.json").read_bytes())
                seen["reads"] += 1
                seen["bad"] += m.get("format") != "p2u"
            except FileNotFoundError:
                seen["missing"] += 1
            except ValueError:
                seen["bad"] += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        work()
    finally:
        stop.set()
        t.join()
    return seen


@pytest.fixture()
def slow_renames(monkeypatch):
    """Each rename (and exchange) of a folder is followed by 50 ms: a reader gets the time to
    look at whatever the folder's name shows between two steps."""
    rename, exchange, swapped = os.rename, encoder._exchange, []

    def slow_rename(a, b):
        rename(a, b)
        time.sleep(0.05)

    def slow_exchange(a, b):
        swapped.append(exchange(a, b))
        time.sleep(0.05)
        return swapped[-1]

    monkeypatch.setattr(os, "rename", slow_rename)
    monkeypatch.setattr(encoder, "_exchange", slow_exchange)
    return swapped


@linux
def test_force_replaces_atomically(tmp_path, slow_renames):
    out = tmp_path / "x.p2u"
    model = tmp_path / "m.onnx"
    model.write_bytes(synth.mlp().SerializeToString())
    p2u_onnx.encode(model, out, "4,8")
    ids = set()
    seen = _watched(out, lambda: [
        ids.add(p2u_onnx.encode(model, out, plan, overwrite=True).manifest["package_id"])
        for plan in ("4,8,lossless", "4,8", "4,lossless")])
    assert slow_renames == [True] * 3  # swapped in one step each time
    assert seen["missing"] == 0 and seen["bad"] == 0 and seen["reads"] > 10, seen
    assert len(ids) == 3 and load_manifest(out)["plan"] == ["4", "lossless"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "x.p2u"]


def test_force_without_exchange_and_recovery_after_a_crash(tmp_path, monkeypatch, slow_renames):
    out = tmp_path / "x.p2u"
    model = tmp_path / "m.onnx"
    model.write_bytes(synth.mlp().SerializeToString())
    first = p2u_onnx.encode(model, out, "4,8").manifest["package_id"]
    monkeypatch.setattr(encoder, "_exchange", lambda a, b: False)  # two renames instead
    ids = []
    seen = _watched(out, lambda: ids.append(
        p2u_onnx.encode(model, out, "4,lossless", overwrite=True).manifest["package_id"]))
    # the documented window of the fallback, which the reader above does see
    assert seen["missing"] > 0 and seen["bad"] == 0, seen
    second = ids[0]
    assert load_manifest(out)["package_id"] == second != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "x.p2u"]
    # a run that died between its two renames: the old package aside, the new one unfinished
    pid, start, boot, host = _workdir.owner_tag().split("-")
    dead = f".x.p2u.{pid}-{int(start) + 1}-{boot}-{host}-0000000a"
    out.rename(tmp_path / (dead + ".old"))
    (tmp_path / dead).mkdir()
    (tmp_path / dead / "stage-0.p2u").write_bytes(b"half")
    with pytest.raises(P2UError, match="already exists"):
        p2u_onnx.encode(model, out, "4,8")  # the old package is back, and not replaced
    assert load_manifest(out)["package_id"] == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "x.p2u"]


def test_force_refuses_a_folder_that_is_not_a_package(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(P2UError, match="not a p2u package"):
        p2u_onnx.encode(synth.mlp(), home, "4,8", overwrite=True)
    assert (home / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


@pytest.mark.parametrize("umask,dmode,fmode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_package_is_readable_by_a_web_server(tmp_path, umask, dmode, fmode):
    old = os.umask(umask)
    try:
        out = p2u_onnx.encode(synth.mlp(), tmp_path / "x.p2u", "4,8,lossless").path
        p2u_onnx.encode(synth.mlp(), out, "4,8", overwrite=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dmode
    files = list(out.iterdir())
    assert len(files) >= 5
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == fmode, f


def test_missing_output_folder_is_refused(tmp_path):
    target = tmp_path / "missing" / "dir" / "x.p2u"
    with pytest.raises(P2UError, match=f"folder {tmp_path / 'missing' / 'dir'} does not exist"):
        p2u_onnx.encode(synth.mlp(), target, "4,8")
    model = tmp_path / "m.onnx"
    model.write_bytes(synth.mlp().SerializeToString())
    r = CliRunner().invoke(cli, ["encode", str(model), "-o", str(target), "-q"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"Error: cannot write package {target}: folder {target.parent} does not exist"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ---------------------------------------------------------------- SIGTERM

_SLOW_ENCODE = """
import sys, time
from p2u_onnx import encoder
from p2u_onnx.cli import main
real = encoder._encode_into
def slow(*a, **kw):
    print("ENCODING", flush=True)
    time.sleep(60)
    return real(*a, **kw)
encoder._encode_into = slow
main(sys.argv[1:])
"""


@linux
@pytest.mark.parametrize("force", [False, True])
def test_sigterm_during_encode_leaves_no_temporary_folder(tmp_path, force):
    model = tmp_path / "m.onnx"
    model.write_bytes(synth.mlp().SerializeToString())
    out = tmp_path / "x.p2u"
    if force:
        old = p2u_onnx.encode(model, out, "4,8").manifest["package_id"]
    args = ["encode", model, "-o", out, "-q", *(["--force"] if force else [])]
    proc = _spawn(_SLOW_ENCODE, *args)
    try:
        _wait_line(proc, "ENCODING")
        assert [p.name for p in tmp_path.glob(".x.p2u.*")]  # it is writing there now
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.glob(".x.p2u*")) == []
    if force:
        assert load_manifest(out)["package_id"] == old  # the old package, untouched
    else:
        assert not out.exists()


_SLOW_RUN = """
import sys, time
from p2u_onnx import runtime
from p2u_onnx.cli import main
real = runtime.ProgressiveSession.apply
def slow(self, stage):
    print("APPLYING", self._dir, flush=True)
    time.sleep(60)
    return real(self, stage)
runtime.ProgressiveSession.apply = slow
main(sys.argv[1:])
"""


@linux
def test_sigterm_during_p2u_run_leaves_no_work_folder(pkg, tmp_path):
    proc = _spawn(_SLOW_RUN, "run", pkg, TMPDIR=str(tmp_path))
    try:
        work = Path(_wait_line(proc, "APPLYING "))
        assert work.parent == tmp_path and (work / "base" / "base.bin").is_file()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert _ours(tmp_path) == []


def test_library_installs_no_signal_handler(pkg, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with ProgressiveSession(pkg) as s:
        s.upgrade(background=False)
        assert signal.getsignal(signal.SIGTERM) is before
    p2u_onnx.encode(synth.mlp(), tmp_path / "x.p2u", "4,8")
    assert signal.getsignal(signal.SIGTERM) is before
    r = CliRunner().invoke(cli, ["run", str(pkg)])
    assert r.exit_code == 0, r.output
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI puts the previous one back


# ---------------------------------------------------------------- on_stage(0)


def test_on_stage_is_called_for_stage_0(pkg, tmp_path):
    seen = []
    with ProgressiveSession(pkg, on_stage=seen.append) as s:
        assert seen == [0]
        s.upgrade(background=False)
    assert seen == [0, 1, 2]

    def refuse(k):
        raise RuntimeError(f"not ready for stage {k}")

    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="stage 0"):
        ProgressiveSession(pkg, workdir=work, on_stage=refuse)
    assert list(work.iterdir()) == []  # the half-made session cleaned up after itself


@linux
def test_sigterm_stops_p2u_serve_cleanly(pkg):
    proc = _spawn("from p2u_onnx.cli import main; import sys; main(sys.argv[1:])",
                  "serve", pkg, "--port", "0", "-q")
    try:
        url = _wait_line(proc, "serving package").split(" at ")[1].split(";")[0]
        assert url.startswith("http://127.0.0.1:")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err  # a service manager's stop is a normal stop
    assert "stopped" in err and "Traceback" not in err


_SLOW_FETCH = """
import sys, time
from p2u_onnx import transport
from p2u_onnx.cli import main
real = transport.fetch
def slow(url, dest, *a, **kw):
    print("FETCHING", flush=True)
    time.sleep(60)
    return real(url, dest, *a, **kw)
transport.fetch = slow
main(sys.argv[1:])
"""


@linux
def test_sigterm_during_p2u_fetch_exits_143_and_the_fetch_resumes(pkg, tmp_path):
    from p2u_onnx.devserver import PackageServer

    with PackageServer(pkg, "127.0.0.1", 0) as srv:
        url = srv.url
        out = tmp_path / "mirror.p2u"
        proc = _spawn(_SLOW_FETCH, "fetch", url, "-o", out, "-q")
        try:
            _wait_line(proc, "FETCHING")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "terminated" in err and "Traceback" not in err
        result = CliRunner().invoke(cli, ["fetch", url, "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
    assert (out / "manifest.json").read_bytes() == (pkg / "manifest.json").read_bytes()
