"""The runtime under load: upgrades finish while runs never stop, the decoder's share is a
setting that is honoured, strategy="auto" follows the memory left. Behaviour only: speed
targets are in ``scripts/bench_load.py``'s table."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from test_runtime import STRATEGIES, mlp, package, references

from p2u_onnx import _memory, runtime
from p2u_onnx._rwlock import TurnLock, sharing
from p2u_onnx.cli import main
from p2u_onnx.runtime import ProgressiveSession


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return package(mlp((64, 256, 256, 64)), tmp_path_factory.mktemp("load") / "m.p2u",
                   "4,8,lossless")


@pytest.fixture(scope="module")
def feed():
    return {"x": np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)}


@pytest.fixture(scope="module")
def refs(pkg, feed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refs")
    return {s: references(pkg, feed, s, tmp) for s in STRATEGIES}


def _loop(lock: TurnLock, work: float, stop: threading.Event, done: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        with lock.hold(0):
            time.sleep(work)
        done.append(time.perf_counter() - t)


# ---------------------------------------------------------------- the lock


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_decoder_gets_its_share_of_contested_time(share):
    """Three runners never stop; a decoder of many short jobs still gets ``share`` of the time
    they compete (counted by the lock), and every runner keeps running."""
    lock = TurnLock(share, turn=0.05)
    stop, runs = threading.Event(), [[], [], []]
    runners = [threading.Thread(target=_loop, args=(lock, 0.01, stop, r)) for r in runs]
    for t in runners:
        t.start()
    time.sleep(0.1)

    def job(_):
        with lock.hold(1):
            time.sleep(0.001)

    with cf.ThreadPoolExecutor(2) as pool:
        list(pool.map(job, range(300)))
    stop.set()
    for t in runners:
        t.join()
    runs_during = [len(r) for r in runs]
    held = lock.contested
    got = held[1] / (held[0] + held[1])
    assert share * 0.7 <= got <= share * 1.5 + 0.1, (share, got, held)
    assert min(runs_during) > 3  # runs went on during the decoding


def test_decoder_turn_ends_for_waiting_runs():
    """A decoder with endless work lets waiting runs in once its turn ran out: with share 1.0
    runs still get through, one round per turn."""
    lock = TurnLock(1.0, turn=0.02)
    stop, runs = threading.Event(), []
    busy = threading.Event()

    def decoder() -> None:
        while not busy.is_set():
            with lock.hold(1):
                time.sleep(0.002)

    d = threading.Thread(target=decoder)
    d.start()
    runner = threading.Thread(target=_loop, args=(lock, 0.005, stop, runs))
    runner.start()
    time.sleep(0.5)
    stop.set()
    runner.join()
    busy.set()
    d.join()
    assert len(runs) >= 5


def test_one_slow_run_is_not_followed_by_as_long_a_turn():
    """The decoder's turn after a round of runs repays that round, but no more than a usual
    round (1.25 x the median of the last ones): one run slowed to 20 times the others must not
    make the next run wait as long for the decoder."""
    lock = TurnLock(0.5, turn=2.0)
    busy = threading.Event()
    waits: list[float] = []

    def decoder() -> None:
        while not busy.is_set():
            with lock.hold(1):
                time.sleep(0.001)

    d = threading.Thread(target=decoder)
    d.start()
    try:
        for i in range(30):
            t = time.perf_counter()
            with lock.hold(0):
                waits.append(time.perf_counter() - t)
                time.sleep(0.3 if i == 20 else 0.015)
    finally:
        busy.set()
        d.join()
    usual = sorted(waits[5:20])[7]
    assert usual > 0.005  # the decoder had turns between the runs
    assert waits[21] < 0.15, (waits[21], usual)  # without the bound: about 0.3 s


def test_sharing_holds_turns_for_a_long_call():
    """A long call inside ``sharing`` has the decoder's turns taken for it: runs wait during
    them, and the call's share of contested time is counted."""
    lock = TurnLock(0.5, turn=0.03)
    stop, runs = threading.Event(), []
    runner = threading.Thread(target=_loop, args=(lock, 0.01, stop, runs))
    runner.start()
    time.sleep(0.05)
    with sharing(lock):
        time.sleep(0.4)
    stop.set()
    runner.join()
    held = lock.contested
    assert held[1] > 0.1 and held[0] > 0.05 and len(runs) > 3


def test_sharing_turns_are_half_a_usual_round():
    """The call slows the runs beside it, so the turns held for it are cut to half a usual
    round: runs of 40 ms wait about 20 ms for each (a turn as long as a run: 40 ms)."""
    lock = TurnLock(0.5, turn=1.0)
    stop, waits = threading.Event(), []

    def runner() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            with lock.hold(0):
                waits.append(time.perf_counter() - t)
                time.sleep(0.04)

    r = threading.Thread(target=runner)
    r.start()
    time.sleep(0.05)
    with sharing(lock):
        time.sleep(1.5)
    stop.set()
    r.join()
    assert lock.usual_round() is not None and lock.usual_round() > 0.03
    waited = sorted(waits[6:-2])
    assert len(waited) > 10
    median = waited[len(waited) // 2]
    assert 0.01 < median < 0.032, waited


def test_share_settings_are_checked():
    with pytest.raises(ValueError, match="share"):
        TurnLock(0.0)
    with pytest.raises(ValueError, match="turn"):
        TurnLock(0.5, turn=-1)
    with pytest.raises(ValueError, match="share must be in"):
        TurnLock("half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="share must be in"):
        TurnLock(float("nan"))


# ---------------------------------------------------------------- sessions under load


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_upgrade_completes_under_continuous_runs(pkg, feed, refs, strategy):
    """Three threads call run() back to back; the upgrade still completes, every answer is
    exactly one stage's output, and runs keep being answered while it goes on."""
    with ProgressiveSession(pkg, strategy=strategy, decoder_share=0.3,
                            decoder_turn=0.01) as s:
        stop = threading.Event()
        seen: list[int] = []
        bad: list[str] = []

        def loop() -> None:
            while not stop.is_set():
                y = s.run(None, feed)[0]
                hits = [k for k, r in enumerate(refs[strategy]) if np.array_equal(y, r)]
                if len(hits) != 1 and not (hits and all(
                        np.array_equal(refs[strategy][h], refs[strategy][hits[0]])
                        for h in hits)):
                    bad.append(f"answer matches stages {hits}")
                seen.append(hits[0] if hits else -1)

        threads = [threading.Thread(target=loop) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        before = len(seen)
        assert s.upgrade().result(timeout=120) == s.stages - 1
        during = len(seen) - before
        time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
        assert not bad, bad[:3]
        assert -1 not in seen
        assert during > 0
        assert seen[-1] == s.stages - 1
        held = s._turns.contested
        assert held[1] > 0  # the decoder had turns while runs waited


def test_a_starved_upgrade_is_said(pkg, feed, caplog, monkeypatch):
    """Runs longer than decoder_turn leave the decoder under its share: the upgrade says so
    (and an upgrade without competing runs does not)."""
    import onnxruntime as ort

    with ProgressiveSession(pkg, decoder_turn=0.002) as s:
        with caplog.at_level("WARNING", logger="p2u_onnx.runtime"):
            s.upgrade(background=False)
        assert "competed" not in caplog.text
    real = ort.InferenceSession.run
    running = threading.Semaphore(0)

    def slow(self, *a, **k):  # every run 40 ms: twenty turns of the decoder
        running.release()
        time.sleep(0.04)
        return real(self, *a, **k)

    monkeypatch.setattr(ort.InferenceSession, "run", slow)
    with ProgressiveSession(pkg, decoder_turn=0.002) as s:
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                s.run(None, feed)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for _ in range(4):  # the load runs before the upgrade starts
                assert running.acquire(timeout=10)
            with caplog.at_level("WARNING", logger="p2u_onnx.runtime"):
                s.upgrade(background=False)
        finally:
            stop.set()
            for t in threads:
                t.join()
        runs, dec = s._turns.contested
        assert dec < 0.25 * (runs + dec)  # what the warning reports, counted by the lock
        assert "the upgrade had the cores" in caplog.text and "decoder_turn" in caplog.text


def test_decoder_share_reaches_the_session(pkg):
    with ProgressiveSession(pkg, decoder_share=0.25, decoder_turn=0.07) as s:
        assert (s._turns.share, s._turns.turn) == (0.25, 0.07)
    with pytest.raises(ValueError, match="share must be in"):
        ProgressiveSession(pkg, decoder_share=1.5)


# ---------------------------------------------------------------- strategy="auto"


def test_auto_picks_inplace_when_a_swap_would_not_fit(pkg, feed, refs, monkeypatch):
    need = runtime.swap_need(ProgressiveSession(pkg).manifest)
    monkeypatch.setattr(runtime, "memory_left", lambda: (need // 2, "cgroup memory.max 1 MiB"))
    with ProgressiveSession(pkg, strategy="auto") as s:
        assert s.strategy == "inplace"
        assert "would not hold a swap" in s.strategy_reason
        assert "cgroup memory.max" in s.strategy_reason
        s.upgrade(background=False)
        assert np.array_equal(s.run(None, feed)[0], refs["inplace"][-1])
    monkeypatch.setattr(runtime, "memory_left", lambda: (need * 2, "MemAvailable"))
    with ProgressiveSession(pkg, strategy="auto") as s:
        assert s.strategy == "swap" and "holds a swap" in s.strategy_reason
    monkeypatch.setattr(runtime, "memory_left", lambda: (None, ""))
    with ProgressiveSession(pkg, strategy="auto") as s:
        assert s.strategy == "swap" and "no memory limit" in s.strategy_reason
    with ProgressiveSession(pkg, strategy="inplace") as s:
        assert s.strategy_reason == "inplace: asked"


def test_auto_with_other_providers_is_swap(pkg):
    strategy, why = runtime.choose_strategy(ProgressiveSession(pkg).manifest,
                                            ["SomeGPUExecutionProvider"])
    assert strategy == "swap" and "CPU" in why


_RLIMIT = """
import resource, sys
from p2u_onnx._memory import memory_left
from p2u_onnx.runtime import ProgressiveSession
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), resource.RLIM_INFINITY))
left, which = memory_left()
print(which, left)
with ProgressiveSession(sys.argv[1], strategy="auto") as s:
    print(s.strategy, "|", s.strategy_reason)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and RLIMIT_AS")
def test_memory_left_sees_rlimit_as(pkg):
    """Under a real RLIMIT_AS the memory left is what the limit leaves, and auto follows it."""
    import psutil

    limit = psutil.Process().memory_info().vms * 4 + (8 << 30)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_RLIMIT), str(pkg), str(limit)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = r.stdout.strip().splitlines()[-2:]
    assert 0 < int(first.split()[-1]) < limit  # the limit minus what the process maps
    assert second.startswith("swap |") and "holds a swap" in second


def test_cli_run_auto_says_why(pkg):
    r = CliRunner().invoke(main, ["run", str(pkg), "--strategy", "auto"])
    assert r.exit_code == 0, r.output
    assert "strategy swap: auto" in r.output or "strategy inplace: auto" in r.output


def test_unknown_strategy_is_one_line(pkg):
    with pytest.raises(ValueError, match="'swap', 'inplace' or 'auto'"):
        ProgressiveSession(pkg, strategy="fast")


# ---------------------------------------------------------------- memory helpers


def test_new_ranges_keep_only_what_is_new():
    m = 1 << 20
    before = [(0, 10 * m), (20 * m, 30 * m)]
    after = [(0, 14 * m), (18 * m, 30 * m), (40 * m, 41 * m), (50 * m, 60 * m)]
    assert _memory.new_ranges(before, after) == [(10 * m, 14 * m), (18 * m, 20 * m),
                                                 (50 * m, 60 * m)]
    assert _memory.new_ranges(after, after) == []


def test_collapse_walks_at_most_its_limit(monkeypatch):
    """The walk stops at ``limit`` bytes whatever the ranges given: its cost is bounded by the
    caller's model, not by the process."""
    calls = []

    class Lib:
        def mincore(self, a, n, present):
            calls.append(n)
            return -1  # "not resident": nothing collapsed, but the step was taken

    monkeypatch.setattr(_memory, "_linux_libc", lambda: Lib())
    monkeypatch.setattr(_memory, "_collapse_works", [True])
    huge = _memory.HUGE
    assert _memory.collapse_to_huge_pages([(0, 1000 * huge)], limit=10 * huge) == 0
    assert sum(calls) == 10 * huge
    calls.clear()
    _memory.collapse_to_huge_pages([(0, 1000 * huge)])
    assert sum(calls) == 1000 * huge
