"""HTTP delivery with real parts: nginx, the dev server, and a proxy that injects faults."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from http_helpers import Fault, FaultProxy, free_port, nginx
from onnx import numpy_helper

import p2u_onnx
from p2u_onnx import cli_http
from p2u_onnx.api import open_stages, verify
from p2u_onnx.devserver import PackageServer, TokenBucket, parse_rate
from p2u_onnx.errors import FormatError, P2UError, TransportError
from p2u_onnx.format import load_manifest, save_manifest, sha256_file
from p2u_onnx.probe import record_probe
from p2u_onnx.runtime import ProgressiveSession
from p2u_onnx.transport import HttpSource, RetryPolicy, fetch

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05, timeout=5.0)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A directory as a static host would hold it: ``digits.p2u/`` (with a probe)."""
    root = tmp_path_factory.mktemp("site")
    pkg = root / "digits.p2u"
    p2u_onnx.encode(DIGITS, pkg, "4,8,lossless")
    manifest = load_manifest(pkg)
    manifest["probe"] = record_probe(pkg, manifest)
    save_manifest(pkg, manifest)
    return root


@pytest.fixture(scope="module")
def pkg(site) -> Path:
    return site / "digits.p2u"


@pytest.fixture(scope="module")
def dev(site):
    with PackageServer(site) as srv:
        yield srv


@pytest.fixture(scope="module")
def nginx_url(site, tmp_path_factory):
    with nginx(site, tmp_path_factory.mktemp("nginx")) as url:
        yield url


@pytest.fixture
def proxy(dev):
    with FaultProxy(dev.url) as p:
        yield p


@pytest.fixture(scope="module")
def feed():
    x = np.load(ROOT / "models" / "digits_test.npz")["x"][:16].astype(np.float32)
    return {ort.InferenceSession(str(DIGITS)).get_inputs()[0].name: x}


@pytest.fixture(scope="module")
def original(feed):
    return ort.InferenceSession(str(DIGITS)).run(None, feed)[0]


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(DIGITS)).graph.initializer}


def stage_output(pkg: Path, feed, stage: int) -> np.ndarray:
    with ProgressiveSession(pkg) as s:
        s.upgrade(stage, background=False)
        return s.run(None, feed)[0]


def assert_bit_exact(directory: Path, weights: dict[str, np.ndarray]) -> None:
    """The last stage of the package in ``directory`` restores every weight bit for bit."""
    state = open_stages(directory)
    for t in state.manifest["tensors"]:
        got, want = state.weight(t["name"]), weights[t["tensor"]]
        assert got.shape == want.shape and got.dtype == want.dtype, t["name"]
        assert np.array_equal(np.ascontiguousarray(got).view(np.uint8),
                              np.ascontiguousarray(want).view(np.uint8)), t["name"]


def complete_files(directory: Path, manifest: dict) -> list[str]:
    """Names of final (non-partial) files in ``directory``; each must match the manifest."""
    listed = {Path(f["path"]).name: f for st in manifest["stages"] for f in st["files"]}
    listed |= {Path(f["path"]).name: f for f in manifest["base_model"]["files"]}
    names = []
    for p in directory.iterdir():
        if p.name in listed:
            assert sha256_file(p) == listed[p.name]["sha256"], f"corrupt file in cache: {p}"
            names.append(p.name)
    return sorted(names)


# ---------------------------------------------------------------- the dev server


def test_parse_rate():
    assert parse_rate("250kbit") == 31250
    assert parse_rate("1mbit") == parse_rate("1Mbit") == 125000
    assert parse_rate("10mbit") == 1.25e6
    assert parse_rate("2MB") == 2e6 and parse_rate("500") == 500
    for bad in ("1mb", "fast", "0", "1k"):
        with pytest.raises(P2UError, match="rate"):
            parse_rate(bad)


def test_devserver_range_semantics(dev, pkg):
    url = dev.url + "digits.p2u/stage-1.p2u"
    data = (pkg / "stage-1.p2u").read_bytes()
    n = len(data)
    with httpx.Client() as c:
        head = c.head(url)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == n
        assert head.headers["accept-ranges"] == "bytes"
        etag, modified = head.headers["etag"], head.headers["last-modified"]
        assert not etag.startswith("W/")
        full = c.get(url)
        assert full.status_code == 200 and full.content == data
        for spec, want in (("bytes=10-99", data[10:100]), ("bytes=100-", data[100:]),
                           ("bytes=-50", data[-50:]), (f"bytes=5-{n + 100}", data[5:])):
            r = c.get(url, headers={"Range": spec})
            assert r.status_code == 206 and r.content == want, spec
            first = n - 50 if spec == "bytes=-50" else int(spec[6:].split("-")[0])
            assert r.headers["content-range"] == f"bytes {first}-{first + len(want) - 1}/{n}"
        r = c.get(url, headers={"Range": f"bytes={n}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{n}"
        assert c.get(url, headers={"Range": "bytes=0-1,5-6"}).status_code == 200  # multi: whole
        # If-Range: the current validator gets the range, a stale one the whole file
        assert c.get(url, headers={"Range": "bytes=7-", "If-Range": etag}).status_code == 206
        assert c.get(url, headers={"Range": "bytes=7-", "If-Range": modified}).status_code == 206
        r = c.get(url, headers={"Range": "bytes=7-", "If-Range": '"0-0"'})
        assert r.status_code == 200 and r.content == data
        assert c.get(url, headers={"If-None-Match": etag}).status_code == 304
        for bad in ("digits.p2u/../digits.p2u/nope", "digits.p2u/.hidden", "%2e%2e/etc/passwd",
                    "digits.p2u/stage-1.p2u.part", "digits.p2u/"):
            assert c.get(dev.url + bad).status_code == 404, bad


def test_devserver_rate_limit(tmp_path):
    """200 kB at 1 Mbit/s take about 1.6 s; two clients share the rate."""
    (tmp_path / "blob").write_bytes(os.urandom(200_000))
    (tmp_path / "half").write_bytes(os.urandom(100_000))
    with PackageServer(tmp_path, rate=parse_rate("1mbit")) as srv:
        t = time.perf_counter()
        assert len(httpx.get(srv.url + "blob").content) == 200_000
        alone = time.perf_counter() - t
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(2) as pool:
            sizes = list(pool.map(lambda _: len(httpx.get(srv.url + "half").content), range(2)))
        shared = time.perf_counter() - t
    assert sizes == [100_000, 100_000]
    ideal = 200_000 / 125_000 - TokenBucket.chunk_size(125_000) / 125_000
    assert 0.8 * ideal < alone < 1.5 * ideal, alone
    assert 0.8 * ideal < shared < 1.5 * ideal, shared


def test_serve_command(site, tmp_path):
    """`p2u serve` prints its URL and serves; rates are parsed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from p2u_onnx.cli_http import serve; serve()",
         str(site / "digits.p2u"), "--port", "0", "--rate", "10mbit", "-q"],
        stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "limited to 10mbit" in line, line
        url = line.split(" at ")[1].split(",")[0].split(";")[0]
        r = httpx.get(url + "manifest.json", timeout=10)
        assert r.status_code == 200 and r.json()["format"] == "p2u"
    finally:
        proc.terminate()
        proc.wait(10)
    r = CliRunner().invoke(cli_http.serve, [str(site), "--rate", "1mb"])
    assert r.exit_code == 1 and "ambiguous" in r.output


# ---------------------------------------------------------------- nginx: a real static host


def test_session_over_nginx(nginx_url, pkg, feed, original):
    """The base answers from the network; the final stage equals the original model exactly."""
    base = stage_output(pkg, feed, 0)
    stages = []
    with HttpSource(nginx_url + "digits.p2u") as src, \
            ProgressiveSession(src, on_stage=stages.append) as s:
        assert s.stage == 0
        np.testing.assert_array_equal(s.run(None, feed)[0], base)
        assert s.upgrade().result(timeout=30) == 2
        np.testing.assert_array_equal(s.run(None, feed)[0], original)  # atol 0
    assert stages == [0, 1, 2]


def test_fetch_mirror_from_nginx(nginx_url, pkg, tmp_path, weights):
    seen = []
    out = fetch(nginx_url + "digits.p2u/manifest.json", tmp_path / "m",
                progress=lambda d, t: seen.append((d, t)))
    assert verify(out)["lossless_match"]
    for f in pkg.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert not list(out.glob("*.part*")) and not list(out.glob(".p2u/*.part*"))
    assert seen[-1][0] == seen[-1][1] == sum(
        f.stat().st_size for f in pkg.iterdir() if f.name.endswith((".p2u", ".npz")))
    assert_bit_exact(out, weights)


def test_fifty_clients_from_nginx(nginx_url, tmp_path, weights):
    """50 concurrent clients fetch one package from nginx; each restores it bit-exact."""
    n = 50
    barrier = threading.Barrier(n)

    def client(i: int) -> Path:
        barrier.wait(timeout=30)
        return fetch(nginx_url + "digits.p2u/", tmp_path / f"c{i}", retry=FAST)

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as pool:
        dirs = list(pool.map(client, range(n)))
    elapsed = time.perf_counter() - t
    assert elapsed < 30
    digests = {sha256_file(d / "stage-2.p2u") for d in dirs}
    assert len(digests) == 1
    for d in dirs:
        assert_bit_exact(d, weights)


# ---------------------------------------------------------------- faults between client and server


def test_dropped_connection_resumes_with_range(proxy, pkg, tmp_path):
    proxy.add(Fault("stage-2.p2u", "drop", at=100_000))
    out = fetch(proxy.url + "digits.p2u/", tmp_path / "m", retry=FAST)
    assert (out / "stage-2.p2u").read_bytes() == (pkg / "stage-2.p2u").read_bytes()
    reqs = proxy.requests("stage-2.p2u")
    assert [r[2] for r in reqs] == [None, "bytes=100000-"] and reqs[1][3] == 206


def test_stall_times_out_and_resumes(proxy, pkg, tmp_path):
    proxy.add(Fault("stage-1.p2u", "stall", at=30_000, seconds=1.5))
    retry = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, timeout=0.4)
    t = time.perf_counter()
    out = fetch(proxy.url + "digits.p2u/", tmp_path / "m", retry=retry)
    assert time.perf_counter() - t < 5
    assert (out / "stage-1.p2u").read_bytes() == (pkg / "stage-1.p2u").read_bytes()
    reqs = proxy.requests("stage-1.p2u")
    assert len(reqs) >= 2 and reqs[1][2].startswith("bytes=") and reqs[1][2] != "bytes=0-"


def test_flipped_byte_is_caught_and_refetched(proxy, pkg, tmp_path, weights):
    proxy.add(Fault("stage-0.p2u", "flip", at=5_000), Fault("stage-2.p2u", "flip", at=123))
    out = fetch(proxy.url + "digits.p2u/", tmp_path / "m", retry=FAST)
    assert verify(out)["lossless_match"]
    assert len(proxy.requests("stage-0.p2u")) == 2 and len(proxy.requests("stage-2.p2u")) == 2
    assert_bit_exact(out, weights)


def test_server_errors_are_retried_then_reported(proxy, pkg, tmp_path):
    proxy.add(Fault("stage-1.p2u", "status", status=500, times=2),
              Fault("manifest.json", "status", status=503, times=1))
    fetch(proxy.url + "digits.p2u/", tmp_path / "a", retry=FAST)
    assert [r[3] for r in proxy.requests("stage-1.p2u")] == [500, 500, 200]
    proxy.add(Fault("stage-1.p2u", "status", status=500, times=-1))
    with pytest.raises(TransportError, match=r"stage-1\.p2u: HTTP 500 .*gave up after 4") as e:
        fetch(proxy.url + "digits.p2u/", tmp_path / "b", retry=FAST)
    assert e.value.url == proxy.url + "digits.p2u/stage-1.p2u"


def test_not_found_fails_at_once(proxy, tmp_path):
    proxy.add(Fault("stage-2.p2u", "status", status=404))
    with pytest.raises(TransportError, match=r"stage-2\.p2u: HTTP 404 Not Found"):
        fetch(proxy.url + "digits.p2u/", tmp_path / "m", retry=FAST)
    assert len(proxy.requests("stage-2.p2u")) == 1
    with pytest.raises(TransportError, match=r"nothing\.p2u/manifest\.json: HTTP 404"):
        HttpSource(proxy.url + "nothing.p2u/", retry=FAST)


def test_unreachable_server(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/digits.p2u/"
    with pytest.raises(TransportError, match="not reachable") as e:
        fetch(url, tmp_path / "m", retry=FAST)
    assert e.value.url == url + "manifest.json"
    with pytest.raises(TransportError, match="http://"):
        HttpSource("ftp://example.com/x.p2u")


def test_session_keeps_last_good_stage_on_bad_data(proxy, pkg, feed, original, tmp_path):
    """Stage 2 arrives corrupt every time: the session stays on stage 1, then recovers."""
    proxy.add(Fault("stage-2.p2u", "flip", at=1000, times=-1))
    stage1 = stage_output(pkg, feed, 1)
    cache = tmp_path / "cache"
    with HttpSource(proxy.url + "digits.p2u/", cache, retry=FAST) as src, \
            ProgressiveSession(src) as s:
        with pytest.raises(TransportError, match="sha256 does not match .* after 3"):
            s.upgrade().result(timeout=30)
        assert s.stage == 1
        np.testing.assert_array_equal(s.run(None, feed)[0], stage1)
        assert "stage-2.p2u" not in complete_files(cache, s.manifest)
        assert not (cache / ".p2u" / "stage-2.p2u.part").exists()
        proxy.faults.clear()
        assert s.upgrade().result(timeout=30) == 2
        np.testing.assert_array_equal(s.run(None, feed)[0], original)


def test_cancel_then_resume(site, proxy, tmp_path, weights):
    """Cancelled mid-file: only .part files are partial; the next run resumes with Range."""
    manifest = load_manifest(site / "digits.p2u")
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if done > 250_000:
            cancel.set()

    out = tmp_path / "m"
    with PackageServer(site, rate=parse_rate("8mbit")) as slow, \
            pytest.raises(TransportError, match="cancelled"):
        fetch(slow.url + "digits.p2u/", out, progress, cancel)
    have = complete_files(out, manifest)
    assert "stage-2.p2u" not in have and "stage-1.p2u" in have
    part = (out / ".p2u" / "stage-2.p2u.part").stat().st_size
    assert 0 < part < manifest["stages"][2]["files"][0]["size"]
    fetch(proxy.url + "digits.p2u/", out, retry=FAST)
    assert [r[2] for r in proxy.requests("stage-2.p2u")] == [f"bytes={part}-"]
    assert proxy.requests("stage-1.p2u") == []
    assert_bit_exact(out, weights)


def test_a_failed_prefetch_is_tried_again_when_needed(proxy, pkg, tmp_path):
    """The background download of stage 2 fails on a local write (a full disk, at ~250 kB
    in): nobody waited for it, so the later request for stage 2 is not handed that old error
    but resumes the file with Range."""
    import errno

    failed = threading.Event()

    def progress(done: int, total: int) -> None:
        if done > 250_000 and not failed.is_set():
            failed.set()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with HttpSource(proxy.url + "digits.p2u/", tmp_path / "c", retry=FAST,
                    progress=progress) as src:
        src._worker.join(10)
        assert failed.is_set() and not src._worker.is_alive()
        part = (tmp_path / "c" / ".p2u" / "stage-2.p2u.part").stat().st_size
        assert part > 0
        path = src.fetch(2)
    assert [r[2] for r in proxy.requests("stage-2.p2u")] == [None, f"bytes={part}-"]
    assert sha256_file(path) == sha256_file(pkg / "stage-2.p2u")


def test_resume_of_a_changed_file_starts_over(site, tmp_path):
    """If-Range: a part whose file changed on the server (new ETag) is fetched whole."""
    root = tmp_path / "site"
    shutil.copytree(site / "digits.p2u", root / "digits.p2u")
    cancel = threading.Event()
    out = tmp_path / "m"
    with PackageServer(root, rate=parse_rate("8mbit")) as slow, \
            pytest.raises(TransportError, match="cancelled"):
        fetch(slow.url + "digits.p2u/", out, lambda d, t: d > 250_000 and cancel.set(), cancel)
    assert (out / ".p2u" / "stage-2.p2u.part").exists()
    stage2 = root / "digits.p2u" / "stage-2.p2u"
    os.utime(stage2, (time.time() + 5, time.time() + 5))  # same bytes, new validator
    with PackageServer(root) as srv, FaultProxy(srv.url) as p:
        fetch(p.url + "digits.p2u/", out, retry=FAST)
        (req,) = p.requests("stage-2.p2u")
    assert req[2].startswith("bytes=") and req[3] == 200
    assert sha256_file(out / "stage-2.p2u") == sha256_file(stage2)


def test_restart_offline_from_cache(site, feed, tmp_path):
    """A device restarts without network on the cached manifest and base."""
    cache = tmp_path / "cache"
    base = stage_output(site / "digits.p2u", feed, 0)
    with PackageServer(site) as srv:
        url = srv.url + "digits.p2u/"
        with HttpSource(url, cache, prefetch=False) as src, ProgressiveSession(src):
            pass
    with HttpSource(url, cache, retry=FAST, prefetch=False) as src:
        assert src.offline
        with ProgressiveSession(src) as s:
            np.testing.assert_array_equal(s.run(None, feed)[0], base)
            with pytest.raises(TransportError, match="not reachable"):
                s.upgrade(background=False)
            assert s.stage == 0


def test_new_package_at_the_same_url_replaces_the_cache(site, tmp_path):
    root = tmp_path / "site"
    shutil.copytree(site / "digits.p2u", root / "m.p2u")
    cache = tmp_path / "cache"
    with PackageServer(root) as srv:
        fetch(srv.url + "m.p2u/", cache, retry=FAST)
        shutil.rmtree(root / "m.p2u")
        p2u_onnx.encode(DIGITS, root / "m.p2u", "4,lossless")
        fetch(srv.url + "m.p2u/", cache, retry=FAST)
    assert not (cache / "stage-2.p2u").exists()
    assert verify(cache)["stages"] == 2


def test_manifest_names_are_plain_files(site, tmp_path):
    root = tmp_path / "site"
    shutil.copytree(site / "digits.p2u", root / "evil.p2u")
    m = load_manifest(root / "evil.p2u")
    m["stages"][1]["files"][0]["path"] = "../../escape"
    (root / "evil.p2u" / "manifest.json").write_text(json.dumps(m))
    with PackageServer(root) as srv, pytest.raises(FormatError, match="not a plain file name"):
        HttpSource(srv.url + "evil.p2u/", tmp_path / "cache")


def test_fetch_command(dev, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli_http.fetch, [dev.url + "digits.p2u/", "-o", str(tmp_path / "m"), "-q"])
    assert r.exit_code == 0, r.output
    assert "fetched 7 files" in r.output and verify(tmp_path / "m")["stages"] == 3
    r = runner.invoke(cli_http.fetch, [dev.url + "gone.p2u/", "-o", str(tmp_path / "g")])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "gone.p2u/manifest.json: HTTP 404" in r.output


def test_device_side_imports():
    """The client and the dev server work on a device without onnx, click or tqdm."""
    code = ("import sys; sys.modules.update(onnx=None, click=None, tqdm=None); "
            "import p2u_onnx.transport, p2u_onnx.devserver, p2u_onnx.runtime")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_progressive_session_from_a_url(tmp_path):
    """ProgressiveSession("http://...") fetches, starts on the base and upgrades to exact."""
    import onnx
    import onnxruntime as ort

    import p2u_onnx
    import synth
    from p2u_onnx.devserver import PackageServer

    model = synth.mlp()
    onnx.save(model, str(tmp_path / "m.onnx"))
    p2u_onnx.encode(tmp_path / "m.onnx", tmp_path / "m.p2u")
    x = np.ones((2, 64), np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    with PackageServer(tmp_path / "m.p2u") as server:
        with p2u_onnx.ProgressiveSession(server.url, workdir=tmp_path / "w") as sess:
            assert sess.stage == 0
            sess.upgrade(background=False)
            assert sess.stage == sess.stages - 1
            np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ref)


def test_base_unpacked_from_stage0_is_bounded(dev, pkg, tmp_path, monkeypatch):
    """Over HTTP the base comes as stage 0 when that is fewer bytes; the files unpacked from it
    are bounded by the manifest's sizes before a byte is decoded (here the memory left), and
    nothing is written."""
    from p2u_onnx import reconstruct

    manifest = load_manifest(pkg)
    sizes = {Path(f["path"]).name: f["size"] for f in manifest["base_model"]["files"]}
    assert manifest["stages"][0]["files"][0]["size"] < sum(sizes.values())  # via stage 0
    big = max(sizes, key=sizes.get)
    monkeypatch.setattr(reconstruct, "memory_left", lambda: (2 * sizes[big] - 1, "a test limit"))
    cache = tmp_path / "cache"
    with pytest.raises(P2UError, match=f"{big} inside stage-0.p2u is {sizes[big]} bytes; "
                                       f"decoding it needs about {2 * sizes[big]} bytes"):
        with HttpSource(dev.url + "digits.p2u/", cache_dir=cache) as src:
            ProgressiveSession(src)
    assert not list(cache.rglob("base.*"))
    monkeypatch.undo()
    with HttpSource(dev.url + "digits.p2u/", cache_dir=cache) as src, \
            ProgressiveSession(src) as s:  # the same cache, room left
        assert s.stage == 0 and (cache / "base.bin").is_file()
