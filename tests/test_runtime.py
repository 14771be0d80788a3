"""ProgressiveSession: exact stages, live upgrades, bad stage files, probe, device footprint."""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import synth
from onnx import TensorProto, helper, numpy_helper

import p2u_onnx
from p2u_onnx import QuantConfig, reconstruct, runtime
from p2u_onnx.errors import FormatError, IntegrityError, P2UError, PatchError
from p2u_onnx.format import StageFile, load_manifest, read_stage, save_manifest
from p2u_onnx.probe import Probe, record_probe, sample, synthesize_inputs
from p2u_onnx.reconstruct import WeightState
from p2u_onnx._rwlock import TurnLock
from p2u_onnx.runtime import BytesSource, ProgressiveSession

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
STRATEGIES = ["swap", "inplace"]


def mlp(dims=(64, 96, 96, 64), seed=0) -> onnx.ModelProto:
    """MatMul+Add(+Relu) layers with random weights."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(b) * 0.1).astype(np.float32),
                                          f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        prev = f"a{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    g = helper.make_graph(nodes, "mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dims[0]])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT,
                                                         ["n", dims[-1]])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def package(model, out: Path, plan: str) -> Path:
    p2u_onnx.encode(model, out, plan)
    manifest = load_manifest(out)
    entry = record_probe(out, manifest)
    assert entry is not None
    manifest["probe"] = entry
    save_manifest(out, manifest)
    return out


def options(strategy: str) -> ort.SessionOptions:
    """The options the runtime's float sessions use under ``strategy`` (caller passes none)."""
    so = ort.SessionOptions()
    if strategy == "inplace":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def references(pkg: Path, feed, strategy: str, tmp: Path) -> list[np.ndarray]:
    """Outputs of ``restore(pkg, stage=k)`` in plain onnxruntime, for every stage."""
    n = len(load_manifest(pkg)["stages"])
    refs = []
    for k in range(n):
        path = p2u_onnx.restore(pkg, tmp / f"{pkg.name}-{k}.onnx", stage=k)
        so = ort.SessionOptions() if k == 0 else options(strategy)
        refs.append(ort.InferenceSession(str(path), so).run(None, feed)[0])
    return refs


@pytest.fixture(scope="module")
def mlp_pkg(tmp_path_factory) -> Path:
    return package(mlp(), tmp_path_factory.mktemp("mlp") / "mlp.p2u", "4,6,8,12,16,lossless")


@pytest.fixture(scope="module")
def digits_pkg(tmp_path_factory) -> Path:
    return package(DIGITS, tmp_path_factory.mktemp("digits") / "digits.p2u", "4,8,lossless")


@pytest.fixture(scope="module")
def mlp_feed():
    return {"x": np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)}


@pytest.fixture(scope="module")
def digits_feed():
    return {"image": np.load(ROOT / "models" / "digits_test.npz")["x"][:32]}


@pytest.fixture(scope="module")
def mlp_refs(mlp_pkg, mlp_feed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refs")
    return {s: references(mlp_pkg, mlp_feed, s, tmp) for s in STRATEGIES}


# ---------------------------------------------------------------- exact stages


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("which", ["digits", "mlp"])
def test_each_stage_equals_restore(which, strategy, request, tmp_path):
    pkg = request.getfixturevalue(f"{which}_pkg")
    feed = request.getfixturevalue(f"{which}_feed")
    refs = references(pkg, feed, strategy, tmp_path)
    seen = []
    with ProgressiveSession(pkg, strategy=strategy, on_stage=seen.append) as s:
        assert s.strategy == strategy and s.stages == len(refs)
        assert [i.name for i in s.get_inputs()] == list(feed)
        for k in range(len(refs)):
            if k:
                assert s.apply(pkg / f"stage-{k}.p2u") == k
            assert s.stage == k
            np.testing.assert_array_equal(s.run(None, feed)[0], refs[k])
    assert seen == list(range(len(refs)))  # stage 0 too, from the constructor
    original = str(DIGITS) if which == "digits" else mlp().SerializeToString()
    final = ort.InferenceSession(original, options(strategy)).run(None, feed)[0]
    np.testing.assert_array_equal(refs[-1], final)


def test_fast_base(mlp_pkg, mlp_feed, mlp_refs):
    with ProgressiveSession(mlp_pkg, fast_base=True) as s:
        y0 = s.run(None, mlp_feed)[0]
        scale = np.abs(mlp_refs["swap"][0]).max()
        assert np.abs(y0 - mlp_refs["swap"][0]).max() < 0.02 * scale
        s.upgrade(background=False)
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs["swap"][-1])


def test_swap_keeps_one_stage_dir_and_cleans_up(mlp_pkg, tmp_path):
    work = tmp_path / "cache"
    s = ProgressiveSession(mlp_pkg, workdir=work)
    assert s.upgrade(background=False) == s.stages - 1
    (session_dir,) = work.glob("session-*")
    assert len(list(session_dir.glob("stage-*"))) == 1
    s.close()
    assert not session_dir.exists() and work.exists()
    with pytest.raises(P2UError, match="closed"):
        s.run(None, {"x": np.zeros((1, 64), np.float32)})
    with pytest.raises(P2UError, match="closed"):
        s.upgrade()
    own = ProgressiveSession(mlp_pkg)
    tmp = own._dir
    own.close()
    assert not tmp.exists()


# ---------------------------------------------------------------- live upgrades


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_runs_during_upgrade_are_one_stage_each(strategy, mlp_pkg, mlp_feed, mlp_refs):
    refs = mlp_refs[strategy]
    s = ProgressiveSession(mlp_pkg, strategy=strategy)
    stop = threading.Event()
    seen: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def loop(out: list[int]) -> None:
        try:
            while not stop.is_set():
                y = s.run(None, mlp_feed)[0]
                match = [k for k, r in enumerate(refs) if np.array_equal(y, r)]
                assert match, "result matches no stage"
                out.append(match[-1])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(o,)) for o in seen]
    for t in threads:
        t.start()
    try:
        assert s.upgrade().result(timeout=30) == len(refs) - 1
        stop.set()
    finally:
        stop.set()
        for t in threads:
            t.join()
        s.close()
    assert not errors, errors
    for out in seen:
        assert out and out == sorted(out)  # never back to an older stage
    assert max(o[-1] for o in seen) >= 1


class _Held:
    """Stands in for a live onnxruntime session: run() waits for ``go`` inside the call."""

    def __init__(self, session):
        self.session, self.inside, self.go = session, threading.Event(), threading.Event()

    def run(self, *args):
        self.inside.set()
        assert self.go.wait(10)
        return self.session.run(*args)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lock_free_run_in_flight_holds_off_apply_and_close(strategy, mlp_pkg, mlp_feed,
                                                            mlp_refs):
    """A run on the lock-free path is waited for: the stage is not applied (swapped or
    switched) under it, the session not closed under it; its result is stage 0's."""
    refs = mlp_refs[strategy]
    s = ProgressiveSession(mlp_pkg, strategy=strategy)
    try:
        assert s._fast  # idle: runs take no lock
        held = _Held(s._live.session)
        s._live.session = held
        out: list = []
        t = threading.Thread(target=lambda: out.append(s.run(None, mlp_feed)[0]))
        t.start()
        assert held.inside.wait(5)
        fut = s.upgrade(1)
        time.sleep(0.3)
        assert not fut.done() and s.stage == 0 and not s._fast  # waits for the run
        held.go.set()
        t.join(10)
        assert fut.result(timeout=30) == 1
        assert np.array_equal(out[0], refs[0])
        assert s._fast and s.stage == 1  # on again once the stage is in
        assert np.array_equal(s.run(None, mlp_feed)[0], refs[1])
        # close waits for a run in flight too, and later runs are refused
        held = _Held(s._live.session)
        s._live.session = held
        t = threading.Thread(target=lambda: out.append(s.run(None, mlp_feed)[0]))
        t.start()
        assert held.inside.wait(5)
        closer = threading.Thread(target=s.close)
        closer.start()
        time.sleep(0.2)
        assert closer.is_alive()
        held.go.set()
        t.join(10)
        closer.join(10)
        assert np.array_equal(out[1], refs[1])
        with pytest.raises(P2UError, match="closed"):
            s.run(None, mlp_feed)
    finally:
        s.close()


# ---------------------------------------------------------------- bad stage files


def _bad(kind: str, pkg: Path, foreign: Path, tmp: Path):
    data = (pkg / "stage-2.p2u").read_bytes()
    if kind == "truncated":
        return data[: len(data) - 100]
    if kind == "truncated-path":
        (tmp / "cut.p2u").write_bytes(data[:50])
        return tmp / "cut.p2u"
    if kind == "bit-flipped":
        b = bytearray(data)
        b[-7] ^= 0x10
        return bytes(b)
    if kind == "foreign":
        return (foreign / "stage-2.p2u").read_bytes()
    if kind == "out-of-order":
        return (pkg / "stage-3.p2u").read_bytes()
    if kind == "repeated":
        return pkg / "stage-1.p2u"
    return b"not a stage file at all"


BAD = {"truncated": "truncated", "truncated-path": "truncated", "bit-flipped": "corrupt",
       "foreign": "foreign", "out-of-order": "out of order", "repeated": "already applied",
       "garbage": "not a p2u stage file"}


@pytest.fixture(scope="module")
def foreign_pkg(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("foreign") / "other.p2u"
    p2u_onnx.encode(mlp(seed=5), out, "4,6,8,lossless")
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_stage_file_is_refused(kind, strategy, mlp_pkg, foreign_pkg, mlp_feed, mlp_refs,
                                   tmp_path):
    with ProgressiveSession(mlp_pkg, strategy=strategy) as s:
        s.apply(mlp_pkg / "stage-1.p2u")
        with pytest.raises(IntegrityError, match=BAD[kind]):
            s.apply(_bad(kind, mlp_pkg, foreign_pkg, tmp_path))
        assert s.stage == 1
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs[strategy][1])
        assert s.apply(mlp_pkg / "stage-2.p2u") == 2  # the good file still applies
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs[strategy][2])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_full_disk_keeps_the_last_good_stage(strategy, mlp_pkg, mlp_feed, mlp_refs,
                                               tmp_path, monkeypatch):
    """Writing stage 2's weights fails as on a full disk: the error says so, the session keeps
    answering from stage 1, nothing half-written stays, and stage 2 applies once there is
    room again."""
    import errno

    pwrite = reconstruct._pwrite
    calls = itertools.count()

    def full(fd, buf, offset):
        if next(calls) == 1:  # the first write lands, the next one finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        pwrite(fd, buf, offset)

    work = tmp_path / "work"
    with ProgressiveSession(mlp_pkg, strategy=strategy, workdir=work) as s:
        s.apply(mlp_pkg / "stage-1.p2u")
        before = sorted(p.relative_to(work) for p in work.rglob("*"))
        with monkeypatch.context() as m:
            m.setattr(reconstruct, "_pwrite", full)
            with pytest.raises(P2UError, match="cannot write .*No space left on device"):
                s.apply(mlp_pkg / "stage-2.p2u")
        assert s.stage == 1
        assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs[strategy][1])
        s.upgrade(background=False)
        assert s.stage == s.stages - 1
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs[strategy][-1])


def test_a_full_disk_at_stage_1_leaves_no_skeleton(mlp_pkg, mlp_feed, mlp_refs, monkeypatch):
    import errno

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with ProgressiveSession(mlp_pkg) as s:
        with monkeypatch.context() as m:
            m.setattr(runtime, "_link_or_copy", full)
            with pytest.raises(P2UError, match="skeleton graph .*No space left on device"):
                s.apply(mlp_pkg / "stage-1.p2u")
        # only the session's copy of the base, no skeleton
        assert s.stage == 0 and list(s._dir.iterdir()) == [s._dir / "base"]
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs["swap"][0])
        s.upgrade(background=False)
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs["swap"][-1])


def test_tampered_base_is_refused(mlp_pkg, tmp_path):
    pkg = tmp_path / "p"
    shutil.copytree(mlp_pkg, pkg)
    b = bytearray((pkg / "base.bin").read_bytes())
    b[10] ^= 1
    (pkg / "base.bin").write_bytes(bytes(b))
    with pytest.raises(IntegrityError, match="base.bin"):
        ProgressiveSession(pkg)


# ---------------------------------------------------------------- no silent staleness


def test_stale_swap_is_caught_and_rolled_back(mlp_pkg, mlp_feed, mlp_refs, monkeypatch):
    refs = mlp_refs["swap"]
    with ProgressiveSession(mlp_pkg) as s:
        s.apply(mlp_pkg / "stage-1.p2u")
        stale = s._live.directory / "weights.bin"
        advance = s._state.advance

        def stale_advance(sf, path, pace=None, written=None):  # stage-1 weights land
            advance(sf, path, pace, written)
            shutil.copyfile(stale, path)

        with monkeypatch.context() as m:
            m.setattr(s._state, "advance", stale_advance)
            with pytest.raises(PatchError, match="stage 2 did not take effect"):
                s.apply(mlp_pkg / "stage-2.p2u")
        assert s.stage == 1 and s._state.stage == 1 and s._state.weights_file == stale
        assert len(list(s._dir.glob("stage-*"))) == 1
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], refs[1])
        s.upgrade(background=False)
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], refs[-1])


def test_stale_inplace_is_caught_and_rolled_back(mlp_pkg, mlp_feed, mlp_refs, monkeypatch):
    refs = mlp_refs["inplace"]
    with ProgressiveSession(mlp_pkg, strategy="inplace") as s:
        s.upgrade(2, background=False)
        switch = type(s._live.weights).switch
        with monkeypatch.context() as m:  # the switch to the new weights is lost
            m.setattr(type(s._live.weights), "switch",
                      lambda self, path: None if path.name == "weights-3.bin" else
                      switch(self, path))
            with pytest.raises(PatchError, match="stage 3 did not take effect"):
                s.apply(mlp_pkg / "stage-3.p2u")
        assert s.stage == 2 and s._state.stage == 2
        assert sorted(p.name for p in s._dir.glob("weights-*")) == ["weights-2.bin"]
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], refs[2])
        s.upgrade(background=False)
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], refs[-1])


def test_probe_separates_stages(mlp_pkg):
    entry = load_manifest(mlp_pkg)["probe"]
    args = ort.InferenceSession(str(mlp_pkg / "base.onnx")).get_inputs()
    probe = Probe(entry, (mlp_pkg / entry["path"]).read_bytes(), args)
    ok = lambda k: lambda names, feed: [probe.expected(k)[0]]
    probe.check(ok(3), 3)
    with pytest.raises(PatchError):
        probe.check(ok(2), 3)
    with pytest.raises(IntegrityError, match="sha256"):
        Probe(entry, (mlp_pkg / entry["path"]).read_bytes() + b"x")


def test_synthesized_inputs_are_deterministic():
    class Arg:
        def __init__(self, name, type_, shape):
            self.name, self.type, self.shape = name, type_, shape

    args = [Arg("ids", "tensor(int64)", ["batch", 7]), Arg("x", "tensor(float)", [None, 3]),
            Arg("m", "tensor(bool)", [4]), Arg("h", "tensor(float16)", [2, 2])]
    a, b = synthesize_inputs(args), synthesize_inputs(args)
    assert a["ids"].shape == (1, 7) and a["ids"].dtype == np.int64
    assert a["ids"].min() >= 0 and a["ids"].max() < 100
    assert a["x"].shape == (1, 3) and np.all(np.abs(a["x"]) <= 1)
    assert a["m"].dtype == np.bool_ and a["h"].dtype == np.float16
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert sample(np.arange(10000)).size == 4096
    with pytest.raises(ValueError):
        synthesize_inputs([Arg("s", "tensor(string)", [1])])


def test_record_probe_gives_up_on_models_that_fail(tmp_path):
    shape = numpy_helper.from_array(np.array([2, 64], np.int64), "shape")
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("MatMul", ["r", "w"], ["y"])], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], [shape, w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p2u_onnx.encode(model, tmp_path / "bad.p2u", "4,lossless")
    assert record_probe(tmp_path / "bad.p2u", load_manifest(tmp_path / "bad.p2u")) is None


# ---------------------------------------------------------------- sources and strategies


def test_start_from_stage0_bytes(mlp_pkg, mlp_feed, mlp_refs):
    manifest = (mlp_pkg / "manifest.json").read_bytes()
    probe = (mlp_pkg / "probe.npz").read_bytes()
    src = BytesSource(manifest, (mlp_pkg / "stage-0.p2u").read_bytes(), probe=probe)
    with ProgressiveSession(src) as s:
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs["swap"][0])
        with pytest.raises(P2UError, match="apply"):
            s.upgrade(background=False)
        for k in range(1, s.stages):
            s.apply((mlp_pkg / f"stage-{k}.p2u").read_bytes())
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs["swap"][-1])


def test_package_without_base_files_unpacks_stage0(mlp_pkg, mlp_feed, mlp_refs, tmp_path):
    pkg = tmp_path / "p"
    shutil.copytree(mlp_pkg, pkg)
    (pkg / "base.onnx").unlink()
    (pkg / "base.bin").unlink()
    work = tmp_path / "cache"
    for _ in range(2):  # second time from the cache
        with ProgressiveSession(pkg, workdir=work) as s:
            np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs["swap"][0])
            s.upgrade(background=False)
            np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs["swap"][-1])
        assert (work / "base" / "base.bin").is_file()


def test_unpacked_base_is_bounded_before_it_is_decoded(mlp_pkg, tmp_path, monkeypatch):
    """The base files unpacked from stage 0 at the start are refused, before a byte is decoded,
    when the manifest's sizes exceed the memory left or the work folder's free space (a small
    stage can declare a huge file): the error names the file, and nothing is written."""
    import collections

    pkg = tmp_path / "p"
    shutil.copytree(mlp_pkg, pkg)
    (pkg / "base.onnx").unlink()
    (pkg / "base.bin").unlink()
    sizes = {Path(f["path"]).name: f["size"] for f in load_manifest(pkg)["base_model"]["files"]}
    big = max(sizes, key=sizes.get)
    decoded: list[str] = []
    real = reconstruct.extract_file
    monkeypatch.setattr(runtime, "extract_file",
                        lambda sf, name, **kw: decoded.append(name) or real(sf, name, **kw))
    monkeypatch.setattr(reconstruct, "memory_left",
                        lambda: (2 * sizes[big] - 1, "cgroup memory.max"))
    with pytest.raises(P2UError, match=f"{big} inside stage-0.p2u is {sizes[big]} bytes; "
                                       f"decoding it needs about {2 * sizes[big]} bytes of memory"):
        ProgressiveSession(pkg, workdir=tmp_path / "w1")
    assert decoded == [] and not list((tmp_path / "w1").rglob("base.*"))
    monkeypatch.setattr(reconstruct, "memory_left", lambda: (None, ""))
    usage = collections.namedtuple("usage", "total used free")
    total = sum(sizes.values())
    real_usage = shutil.disk_usage
    monkeypatch.setattr(reconstruct.shutil, "disk_usage",
                        lambda path: usage(total, 0, total - 1) if Path(path).name == "base"
                        else real_usage(path))
    with pytest.raises(P2UError, match=f"the base files inside stage 0: {total} bytes, more "
                                       f"than the {total - 1} free"):
        ProgressiveSession(pkg, workdir=tmp_path / "w2")
    assert decoded == [] and not list((tmp_path / "w2").rglob("base.*"))
    monkeypatch.undo()
    with ProgressiveSession(pkg, workdir=tmp_path / "w3") as s:  # the same package, room left
        assert s.stage == 0


def _if_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w_{name}")
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"w_{name}"], [f"y_{name}"])], name, [],
            [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["n", 64])], [w])

    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("then"),
                          else_branch=branch("else"))], "if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _function_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(
        np.random.default_rng(4).standard_normal((64, 64)).astype(np.float32), "w")
    f = helper.make_function("local", "Lin", ["x"], ["y"],
                             [helper.make_node("Constant", [], ["w"], value=w),
                              helper.make_node("MatMul", ["x", "w"], ["y"])],
                             [helper.make_opsetid("", 17)])
    g = helper.make_graph(
        [helper.make_node("Lin", ["x"], ["y"], domain="local")], "fn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])])
    return helper.make_model(g, functions=[f], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])


@pytest.mark.parametrize("mapped", [True, False])
def test_inplace_weights_mapped_or_copied(mapped, mlp_pkg, mlp_feed, mlp_refs, monkeypatch):
    """Inplace weights are a file mapping switched stage by stage (Linux, macOS) or, where a
    file cannot be remapped, buffers read from each stage's file: same outputs either way."""
    if not mapped:
        def refuse(*args):
            raise OSError("no fixed mappings here")
        monkeypatch.setattr(runtime._MappedWeights, "__init__", refuse)
    elif sys.platform not in ("linux", "darwin"):
        pytest.skip("file mappings are used on Linux and macOS")
    with ProgressiveSession(mlp_pkg, strategy="inplace") as s:
        s.upgrade(1, background=False)
        kind = runtime._MappedWeights if mapped else runtime._CopiedWeights
        assert type(s._live.weights) is kind
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs["inplace"][1])
        s.upgrade(background=False)
        np.testing.assert_array_equal(s.run(None, mlp_feed)[0], mlp_refs["inplace"][-1])
        assert sorted(p.name for p in s._dir.glob("weights-*")) == \
            [f"weights-{s.stages - 1}.bin"]


@pytest.mark.parametrize("which", ["if", "function"])
def test_inplace_subgraphs_and_function_fallback(which, tmp_path):
    model = _if_model() if which == "if" else _function_model()
    pkg = package(model, tmp_path / "p.p2u", "4,8,lossless")
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    feeds = [{"x": x, "c": np.array(c)} for c in (True, False)] if which == "if" else [{"x": x}]
    expected = "inplace" if which == "if" else "swap"  # Constant nodes in functions: swap
    for feed in feeds:
        refs = references(pkg, feed, expected, tmp_path)
        with ProgressiveSession(pkg, strategy="inplace") as s:
            assert s.strategy == expected
            for k in range(1, s.stages):
                s.apply(pkg / f"stage-{k}.p2u")
                np.testing.assert_array_equal(s.run(None, feed)[0], refs[k])


def test_inplace_falls_back_or_refuses():
    t = {"name": "w", "tensor": "w", "kind": "initializer", "dtype": "float32"}
    assert runtime._inplace_ready({"tensors": [t]})
    assert not runtime._inplace_ready({"tensors": [dict(t, kind="constant")]})
    assert not runtime._inplace_ready({"tensors": [dict(t, name="w@main/If#1")]})
    assert not runtime._cpu_only(["CUDAExecutionProvider", "CPUExecutionProvider"])


# ---------------------------------------------------------------- weights on file


def odd_model() -> onnx.ModelProto:
    """MatMuls and a Conv whose block layouts need padding (70 and 50 rows, blocks of 32)."""
    rng = np.random.default_rng(6)
    w0 = (rng.standard_normal((70, 50)) * 0.1 + 0.05).astype(np.float32)
    w1 = (rng.standard_normal((50, 33)) * 0.1).astype(np.float32)
    k = (rng.standard_normal((16, 3, 5, 5)) * 0.2).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"]),
         helper.make_node("MatMul", ["h", "w1"], ["y"]),
         helper.make_node("Conv", ["img", "k"], ["z"])], "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 70]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 33]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 16, 5, 5])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1"),
         numpy_helper.from_array(k, "k")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _stages(pkg: Path) -> list[StageFile]:
    manifest = load_manifest(pkg)
    return [read_stage(pkg / f"stage-{k}.p2u") for k in range(1, len(manifest["stages"]))]


def wide_conv() -> onnx.ModelProto:
    """One block per output channel of 75 weights, several entries per tensor."""
    k = (np.random.default_rng(8).standard_normal((4096, 3, 5, 5)) * 0.2).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["img", "k"], ["z"])], "conv",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 3, 9, 9])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4096, 5, 5])],
        [numpy_helper.from_array(k, "k")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("which", ["odd-asymmetric", "odd", "bf16", "fp16", "edge", "channel",
                                   "tensor", "wide-conv-asymmetric"])
def test_advance_writes_what_apply_holds(which, tmp_path):
    """Streaming through files gives the same bits as decoding in memory, at every stage, for
    runs of blocks read in place (contiguous layouts) and tensors assembled in memory; each
    tensor is reported written once, when its bytes in the file are final."""
    model = {"odd-asymmetric": odd_model, "odd": odd_model, "bf16": synth.bf16_mlp,
             "fp16": lambda: synth.mlp(np.float16), "edge": synth.edge_model,
             "channel": mlp, "tensor": mlp, "wide-conv-asymmetric": wide_conv}[which]()
    granularity = which if which in ("channel", "tensor") else "block"
    pkg = tmp_path / "p.p2u"
    p2u_onnx.encode(model, pkg, "4,6,lossless", QuantConfig(
        granularity=granularity, block_size=32, symmetric="asymmetric" not in which),
        probe=False)
    manifest = load_manifest(pkg)
    memory = WeightState(manifest, pkg / "base.bin")
    streamed = WeightState(manifest, pkg / "base.bin")
    for k, sf in enumerate(_stages(pkg), start=1):
        memory.apply(sf)
        reported = []
        streamed.advance(sf, tmp_path / f"w{k}.bin",
                         written=lambda fd, off, n: reported.append(
                             (off, n, os.pread(fd, n, off))))
        memory.write_weights(tmp_path / f"m{k}.bin")
        assert streamed.stage == k and streamed.weights_file == tmp_path / f"w{k}.bin"
        assert not streamed._blocks  # holds no weights
        data = (tmp_path / f"w{k}.bin").read_bytes()
        assert data == (tmp_path / f"m{k}.bin").read_bytes()
        assert sorted(r[:2] for r in reported) == \
            sorted(tuple(t["weights"]) for t in manifest["tensors"])
        assert all(got == data[off:off + n] for off, n, got in reported)
        for t in manifest["tensors"]:
            np.testing.assert_array_equal(streamed.weight(t["name"]), memory.weight(t["name"]))
    assert p2u_onnx.verify(pkg)["lossless_match"]
    assert not list(tmp_path.glob(".*.tmp"))


def _broken(sf, how: str):
    """A copy of stage file ``sf`` whose last tensor entry is broken in memory."""
    header = copy.deepcopy(sf.header)
    entries = [e for e in header["entries"] if e["kind"] != "file"]
    last = entries[-1]
    if how == "codec":
        buf = bytearray(sf._buf)
        buf[last["offset"]:last["offset"] + last["length"]] = bytes(last["length"])
        return StageFile(bytes(buf), header, sf.name)
    if how == "overlap":  # same number of blocks covered, one range shifted onto another
        same = [e for e in entries if e["name"] == last["name"]]
        assert len(same) >= 2
        same[-1]["blocks"] = [same[-1]["blocks"][0] - 1, same[-1]["blocks"][1] - 1]
    if how == "short":
        last["blocks"] = [last["blocks"][0], last["blocks"][1] - 1]
    if how == "unknown":
        last["name"] = "nope"
    return StageFile(sf._buf, header, sf.name)


@pytest.mark.parametrize("how", ["codec", "overlap", "short", "unknown"])
def test_advance_is_atomic(how, tmp_path):
    """A stage that fails to decode leaves no file behind and the state where it was."""
    pkg = tmp_path / "p.p2u"
    p2u_onnx.encode(mlp(dims=(64, 8192, 64)), pkg, "4,6,8,lossless", probe=False)
    manifest = load_manifest(pkg)
    s1, s2, s3 = _stages(pkg)
    state = WeightState(manifest, pkg / "base.bin")
    state.advance(s1, tmp_path / "w1.bin")
    before = (tmp_path / "w1.bin").read_bytes()
    with pytest.raises(Exception) as e:  # any decode error will do
        state.advance(_broken(s2, how), tmp_path / "w2.bin")
    if how != "codec":
        assert isinstance(e.value, FormatError)
    assert state.stage == 1 and state.weights_file == tmp_path / "w1.bin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.p2u", "w1.bin"]
    assert (tmp_path / "w1.bin").read_bytes() == before
    state.advance(s2, tmp_path / "w2.bin")  # the good file still applies
    cp = state.checkpoint()
    with pytest.raises(ValueError, match="current weights file"):
        state.advance(s3, tmp_path / "w2.bin")
    assert state.checkpoint() == cp


def test_paced_buffers_are_zeroed_in_turns():
    """A buffer a live session fills in turns is faulted in, slab by slab, each in a turn."""
    turns = []

    @contextlib.contextmanager
    def pace():
        turns.append(1)
        yield

    out = reconstruct._zeros((3 << 20, 1), np.float32, None, pace)
    assert out.shape == (3 << 20, 1) and not out.any()
    assert len(turns) == 12  # 12 MB, 1 MB a turn


def test_weights_files_are_removed_gradually_but_never_through_a_link(tmp_path, monkeypatch):
    own, shared, link = tmp_path / "own.bin", tmp_path / "shared.bin", tmp_path / "link.bin"
    own.write_bytes(b"\1" * (9 << 20))
    shared.write_bytes(b"\2" * (9 << 20))
    os.link(shared, link)
    sizes = []
    truncate = os.truncate
    monkeypatch.setattr(os, "truncate", lambda p, n: (sizes.append(n), truncate(p, n)))
    runtime._remove_gradually(own)
    runtime._remove_gradually(link)
    assert not own.exists() and not link.exists()
    assert sizes == [5 << 20, 1 << 20]  # the own file shrank 4 MB at a time; the link did not
    assert shared.read_bytes() == b"\2" * (9 << 20)


def test_advance_memory_does_not_grow_with_the_model(tmp_path, monkeypatch):
    """Peak numpy memory while streaming is about the same for 2 tensors as for 8: tensors are
    held a batch at a time (at most two batches in flight; decoding in memory grows by 6)."""
    tensor = 1024 * 1024 * 4
    monkeypatch.setattr(reconstruct, "BATCH_BYTES", tensor)
    peaks = {}
    for layers in (2, 8):
        pkg = tmp_path / f"p{layers}.p2u"
        p2u_onnx.encode(mlp(dims=(1024,) * (layers + 1)), pkg, "4,8,lossless", probe=False)
        manifest = load_manifest(pkg)
        assert sum(t["weights"][1] for t in manifest["tensors"]) == layers * tensor
        state = WeightState(manifest, pkg / "base.bin")
        for k, sf in enumerate(_stages(pkg), start=1):
            tracemalloc.start()
            try:
                state.advance(sf, tmp_path / f"w{layers}-{k}.bin")
                peaks[layers, k] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    for k in (1, 2):
        assert peaks[8, k] < peaks[2, k] + 2 * tensor, {key: v / tensor for key, v in peaks.items()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_session_keeps_weights_on_file(strategy, tmp_path):
    """Asymmetric, padded blocks through the runtime; the state holds no arrays; one weights
    file per live stage in the work dir."""
    model = odd_model()
    pkg = tmp_path / "p.p2u"
    p2u_onnx.encode(model, pkg, "4,8,lossless", QuantConfig(block_size=32, symmetric=False))
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((2, 70)).astype(np.float32),
            "img": rng.standard_normal((2, 3, 9, 9)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), options(strategy)).run(None, feed)
    with ProgressiveSession(pkg, strategy=strategy) as s:
        for k in range(1, s.stages):
            s.apply(pkg / f"stage-{k}.p2u")
            assert not s._state._blocks and s._state.graph_bytes is None
            files = sorted(p.relative_to(s._dir).parts[-1] for p in s._dir.rglob("weights*"))
            # swap: the live stage dir's weights.bin; inplace: a placeholder and weights-k.bin
            assert files == (["weights.bin"] if strategy == "swap"
                             else [f"weights-{k}.bin", "weights.bin"])
        for got, ref in zip(s.run(None, feed), want):
            np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------- device footprint

_DEVICE = """
import importlib.abc, sys
BLOCKED = ("onnx", "click", "tqdm", "p2u_onnx.encoder", "p2u_onnx.passes", "p2u_onnx.graph",
           "p2u_onnx.api", "p2u_onnx.cli", "p2u_onnx.demo")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"blocked on the device: {name}")
sys.meta_path.insert(0, Block())
import numpy as np
from p2u_onnx.runtime import ProgressiveSession
pkg, ref = sys.argv[1], np.load(sys.argv[2])
for strategy in ("swap", "inplace"):
    with ProgressiveSession(pkg, strategy=strategy) as s:
        s.upgrade().result()
        y = s.run(None, {"x": ref["x"]})[0]
        assert s.stage == s.stages - 1 and np.array_equal(y, ref[strategy]), strategy
print("device ok", sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "click")))
"""


def test_device_needs_no_onnx(mlp_pkg, mlp_feed, mlp_refs, tmp_path):
    np.savez(tmp_path / "ref.npz", x=mlp_feed["x"], swap=mlp_refs["swap"][-1],
             inplace=mlp_refs["inplace"][-1])
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_DEVICE), str(mlp_pkg),
                        str(tmp_path / "ref.npz")], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert "device ok []" in r.stdout


def test_turn_lock_alternates_kinds():
    """Work of one kind shares the lock; a waiting kind stops new arrivals of the other and
    gets the next turn whole."""
    lock = TurnLock()
    order: list[str] = []
    first = lock.hold(0)
    first.__enter__()
    with lock.hold(0):  # same kind, nobody waiting: shares at once
        order.append("run-b")

    def take(kind: int, name: str) -> threading.Thread:
        def body() -> None:
            with lock.hold(kind):
                order.append(name)
                time.sleep(0.05)
        t = threading.Thread(target=body)
        t.start()
        time.sleep(0.05)
        return t

    threads = [take(1, "decode-1"), take(1, "decode-2"), take(0, "run-c")]
    assert order == ["run-b"]  # both decode jobs wait for the run; the new run waits for them
    first.__exit__(None, None, None)
    for t in threads:
        t.join(5)
    assert order[1:3] == ["decode-1", "decode-2"] or order[1:3] == ["decode-2", "decode-1"]
    assert order[3] == "run-c"


def test_decoding_takes_turns_with_inferences(mlp_pkg, mlp_feed):
    """A run waits while a decode job holds its turn; the decoder takes a turn for every job
    of every stage (decode jobs run inside apply(), where runs leave the lock-free path)."""
    with ProgressiveSession(mlp_pkg) as s:
        s.run(None, mlp_feed)
        done = threading.Event()
        with s._slow_runs(), s._pace():
            t = threading.Thread(target=lambda: (s.run(None, mlp_feed), done.set()))
            t.start()
            assert not done.wait(0.2)
        assert done.wait(5)
        t.join()
        calls = []
        real = s._pace
        s._pace = lambda: (calls.append(1), real())[1]
        s.upgrade(background=False)
        manifest = load_manifest(mlp_pkg)
        entries = sum(len([e for e in read_stage(mlp_pkg / st["files"][0]["path"]).entries
                           if e["kind"] != "file"]) for st in manifest["stages"][1:])
        assert entries and len(calls) >= entries


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_lowered_priority_gives_priority_back():
    """Session builds run at a lower priority; the building thread and the threads it started
    (onnxruntime's pool threads) get their priority back; where that is not allowed nothing
    changes."""
    import os

    from p2u_onnx._priority import _can_restore, lowered_priority

    tid = threading.get_native_id()
    nice = os.getpriority(os.PRIO_PROCESS, tid)
    started, done = threading.Event(), threading.Event()
    child: dict[str, int] = {}

    def body() -> None:
        child["tid"] = threading.get_native_id()
        started.set()
        done.wait(10)

    with lowered_priority(5):
        inside = os.getpriority(os.PRIO_PROCESS, tid)
        t = threading.Thread(target=body)
        t.start()
        assert started.wait(10)
        child_inside = os.getpriority(os.PRIO_PROCESS, child["tid"])
    child_after = os.getpriority(os.PRIO_PROCESS, child["tid"])
    done.set()
    t.join()
    assert child_inside == inside
    assert os.getpriority(os.PRIO_PROCESS, tid) == nice and child_after == nice
    assert inside == (min(19, nice + 5) if _can_restore(nice) else nice)
