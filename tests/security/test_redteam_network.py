"""A second round of attacks on the network and trust side (classes 3, 4, 5, 6, 7, 10), tried
as an attacker would: each case builds a hostile server, signature, state file or folder and
asserts a clean refusal (a P2UError subclass, one line), a bounded time, and that nothing p2u did
not write was touched. Servers listen on 127.0.0.1 only; the hostile-server helpers come from
test_network.py and the signed packages from test_trust.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest

pytest.importorskip("cryptography")

from test_network import (  # noqa: E402,F401 - fixtures are used by name
    FAST,
    SECRETS,
    Hostile,
    _get,
    _redirect,
    endless,
    hostile,
    other,
    pkg,
    send,
    served,
    snapshot,
)
from test_trust import (  # noqa: E402,F401
    _bytes_source,
    _cli,
    _copy,
    _pin,
    _sign_raw,
    _signed_of,
    _state,
    _tree,
    keys,
    pkgs,
    site,
    work,
    _publish,
)

from p2u_onnx import api  # noqa: E402
from p2u_onnx.devserver import PackageServer  # noqa: E402
from p2u_onnx.errors import P2UError, TransportError, TrustError  # noqa: E402
from p2u_onnx.runtime import BytesSource, ProgressiveSession  # noqa: E402
from p2u_onnx.transport import HttpSource, RetryPolicy, fetch  # noqa: E402
from p2u_onnx.trust import SIGNATURE_NAME, VersionState, _canonical  # noqa: E402

QUICK = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02, timeout=3.0,
                    max_attempts_total=6)


def one_line(e: BaseException) -> str:
    """The error's message, asserted to be a P2UError on one line."""
    assert isinstance(e, P2UError), f"{type(e).__name__}: {e}"
    text = str(e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def refused(fn, kind=P2UError, match: str | None = None) -> str:
    with pytest.raises(BaseException) as info:
        fn()
    text = one_line(info.value)
    assert isinstance(info.value, kind), f"{type(info.value).__name__}: {text}"
    if match is not None:
        assert any(m in text for m in match.split("|")), text
    return text


def _priv(key: Path):
    from cryptography.hazmat.primitives import serialization as ser

    return ser.load_pem_private_key(key.read_bytes(), None)


def _keyid(key: Path) -> str:
    from cryptography.hazmat.primitives import serialization as ser

    pub = _priv(key).public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return hashlib.sha256(pub).hexdigest()


def _entry(key: Path, signed: dict) -> dict:
    return {"keyid": _keyid(key), "sig": _priv(key).sign(_canonical(signed)).hex()}


def _write_env(pkg: Path, env: object, raw: bytes | None = None) -> None:
    (pkg / SIGNATURE_NAME).write_bytes(raw if raw is not None else json.dumps(env).encode())


def _local_entry_points(pkg: Path, tmp: Path, **kw):
    out = tmp / "restored.onnx"
    return [lambda: api.verify(pkg, **kw), lambda: api.restore(pkg, out, **kw),
            lambda: api.inspect(pkg, **kw), lambda: ProgressiveSession(pkg, **kw).close(),
            lambda: ProgressiveSession(_bytes_source(pkg), **kw).close()]


def _all_refuse(pkg: Path, tmp: Path, match: str, **kw) -> None:
    before, state = _tree(pkg), _state()
    (tmp / "restored.onnx").unlink(missing_ok=True)
    for call in _local_entry_points(pkg, tmp, **kw):
        refused(call, TrustError, match)
    assert _tree(pkg) == before and _state() == state
    assert not (tmp / "restored.onnx").exists()


def _all_accept(pkg: Path, tmp: Path, **kw) -> None:
    for call in _local_entry_points(pkg, tmp, **kw):
        call()


def _timed(fn, limit: float) -> tuple[float, BaseException | None]:
    t = time.monotonic()
    err = None
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        err = e
    took = time.monotonic() - t
    assert took < limit, f"took {took:.2f} s, bound {limit} s"
    return took, err


def _in_thread(fn, timeout: float) -> BaseException | None:
    """Run ``fn`` in a thread; fail when it does not end within ``timeout`` (a hang)."""
    box: list = []

    def go() -> None:
        try:
            fn()
            box.append(None)
        except BaseException as e:  # noqa: BLE001
            box.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still running after {timeout} s (a hang)"
    return box[0]


# ================================================================ class 3: signatures


def test_two_entries_one_forged_one_good_is_accepted(pkgs, keys, tmp_path):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    signed = _signed_of(pkg)
    good = _entry(keys["a"][0], signed)
    forged = {"keyid": good["keyid"], "sig": "00" * 64}
    _write_env(pkg, {"signed": signed, "signatures": [forged, good]})
    _all_accept(pkg, tmp_path, trust=keys["a"][1])


def test_all_entries_bad_under_trusted_and_untrusted_ids(pkgs, keys, tmp_path):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    signed = _signed_of(pkg)
    by_b = _entry(keys["b"][0], signed)
    lying = {"keyid": _keyid(keys["a"][0]), "sig": by_b["sig"]}  # b's signature, a's keyid
    _write_env(pkg, {"signed": signed, "signatures": [by_b, lying, {"keyid": "x", "sig": "zz"}]})
    _all_refuse(pkg, tmp_path, "bad signature", trust=keys["a"][1])


def test_keyid_collision_between_two_trusted_keys_is_refused(pkgs, keys, tmp_path):
    """b signs but claims a's keyid; both are trusted: the claim is checked against a's key."""
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    signed = _signed_of(pkg)
    sig = {"keyid": _keyid(keys["a"][0]), "sig": _entry(keys["b"][0], signed)["sig"]}
    _write_env(pkg, {"signed": signed, "signatures": [sig]})
    _all_refuse(pkg, tmp_path, "bad signature", trust=[keys["a"][1], keys["b"][1]])


def test_non_canonical_envelope_json_is_still_checked_on_the_signed_object(pkgs, keys,
                                                                         tmp_path):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    env = json.loads((pkg / SIGNATURE_NAME).read_text())
    signed = env["signed"]
    # reordered keys, whitespace, \u escapes: the same object, a valid signature
    body = json.dumps({"signatures": env["signatures"],
                       "signed": dict(reversed(list(signed.items())))}, indent=3,
                      ensure_ascii=True).replace('"name"', '"\\u006eame"')
    _write_env(pkg, None, body.encode())
    _all_accept(pkg, tmp_path, trust=keys["a"][1])
    # duplicate keys in the envelope: two readers could see two different objects
    dup = body.replace('"signed": {', '"signed": {"version": 99, ', 1)
    _write_env(pkg, None, dup.encode())
    _all_refuse(pkg, tmp_path, "not a valid signature file", trust=keys["a"][1])


@pytest.mark.parametrize("field,value", [("version", 2.0), ("version", "2"),
                                         ("version", True), ("name", ["mlp"]),
                                         ("expires", 4102444800), ("manifest_sha256", None)])
def test_signed_fields_of_the_wrong_type_are_refused(pkgs, keys, tmp_path, field, value):
    pkg = _copy(pkgs["v2"] if field != "version" or value is not True else pkgs["v1"],
                tmp_path / "p")
    signed = {**_signed_of(pkg), field: value}
    _sign_raw(pkg, keys["a"][0], signed)  # validly signed by the trusted key, wrongly typed
    _all_refuse(pkg, tmp_path, "malformed|signature is for", trust=keys["a"][1])


@pytest.mark.parametrize("what", ["huge", "deep", "bigint", "nan", "not-utf8", "empty-list"])
def test_hostile_signature_files_are_one_line_refusals(pkgs, keys, tmp_path, what):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    raw = {"huge": b'{"signed": {}, "signatures": [' + b'{"keyid":"a","sig":"b"},' * 400000
           + b"]}", "deep": b"[" * 50000 + b"]" * 50000,
           "bigint": b'{"signed": {"version": ' + b"9" * 5000 + b'}, "signatures": []}',
           "nan": b'{"signed": {"version": NaN}, "signatures": [{"keyid":"a","sig":"b"}]}',
           "not-utf8": b"\xff\xfe\x00garbage",
           "empty-list": b'{"signed": {}, "signatures": []}'}[what]
    _write_env(pkg, None, raw)
    _all_refuse(pkg, tmp_path, "signature|signed by", trust=keys["a"][1])


def test_signature_present_but_garbage_and_trust_not_asked_is_not_required(pkgs, tmp_path):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    _write_env(pkg, None, b"[" * 100000)
    _all_accept(pkg, tmp_path)
    with PackageServer(pkg) as srv:
        fetch(srv.url, tmp_path / "m", retry=QUICK)
        ProgressiveSession(srv.url, workdir=tmp_path / "w").close()
    assert not (tmp_path / "m" / SIGNATURE_NAME).exists()  # a stale/garbage one is not mirrored


def test_signature_expired_by_one_second(pkgs, keys, tmp_path):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)).isoformat()
    _sign_raw(pkg, keys["a"][0], {**_signed_of(pkg), "expires": past})
    _all_refuse(pkg, tmp_path, "expired", trust=keys["a"][1])


@pytest.mark.parametrize("expires,ok", [("9999-12-31T23:59:59.999999+00:00", True),
                                        ("2999-01-01T00:00:00+14:00", True),
                                        ("2999-01-01T00:00:00", False),  # no zone
                                        ("2999-01-01", False),
                                        ("+12999-01-01T00:00:00Z", False),
                                        ("2999-13-45T99:00:00Z", False),
                                        ("x" * 10000, False)])
def test_expiry_in_weird_formats(pkgs, keys, tmp_path, expires, ok):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    _sign_raw(pkg, keys["a"][0], {**_signed_of(pkg), "expires": expires})
    if ok:
        _all_accept(pkg, tmp_path, trust=keys["a"][1])
    else:
        for call in _local_entry_points(pkg, tmp_path, trust=keys["a"][1]):
            refused(call, TrustError, "expires|malformed|not a valid signature file")


@pytest.mark.parametrize("what", ["garbage", "dir", "fifo", "empty", "huge", "private",
                                  "short", "int", "symlink"])
def test_malformed_trusted_key_files(pkgs, keys, tmp_path, what):
    p = tmp_path / "k.pub"
    if what == "garbage":
        p.write_bytes(b"\xff\xfe\x00\x01binary")
    elif what == "dir":
        p.mkdir()
    elif what == "fifo":
        os.mkfifo(p)
    elif what == "empty":
        p.write_text("# nothing\n\n")
    elif what == "huge":
        p.write_text(keys["a"][1] + "\n" + "#" * (1 << 20))
    elif what == "private":
        shutil.copy(keys["a"][0], p)
    elif what == "short":
        p.write_text("ed25519:" + base64.b64encode(b"x" * 31).decode())
    elif what == "symlink":
        p.symlink_to(tmp_path / "nowhere")
    trust = 5 if what == "int" else p
    for call in _local_entry_points(pkgs["v2"], tmp_path, trust=trust):
        err = _in_thread(call, 5)
        assert err is not None
        one_line(err)
    r = _cli("verify", pkgs["v2"], "--trust", p)
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_bytes_source_with_a_signature_over_other_bytes(pkgs, keys, tmp_path):
    src = BytesSource((pkgs["v2"] / "manifest.json").read_bytes(),
                      (pkgs["v2"] / "stage-0.p2u").read_bytes(),
                      signature=(pkgs["v1"] / SIGNATURE_NAME).read_bytes())
    refused(lambda: ProgressiveSession(src, trust=keys["a"][1]), TrustError, "another manifest")
    src2 = BytesSource((pkgs["v2"] / "manifest.json").read_bytes(),
                       (pkgs["v2"] / "stage-0.p2u").read_bytes())
    refused(lambda: ProgressiveSession(src2, trust=keys["a"][1]), TrustError, "not signed")
    refused(lambda: ProgressiveSession(src2, expect=_pin(pkgs["v1"])), TrustError, "pinned")
    assert _state() == {}


@pytest.mark.parametrize("status", [404, 410, 500])
def test_trust_asked_and_the_server_withholds_the_signature(pkgs, keys, tmp_path, status):
    with Hostile(pkgs["v2"]) as srv:
        srv.routes[SIGNATURE_NAME] = lambda h: send(h, status, b"nope")
        for call in (lambda: fetch(srv.url, tmp_path / "m", retry=QUICK, trust=keys["a"][1]),
                     lambda: ProgressiveSession(HttpSource(srv.url, retry=QUICK,
                                                           trust=keys["a"][1]))):
            _, err = _timed(call, 10)
            text = one_line(err)
            assert ("not signed" in text) if status != 500 else ("500" in text), text
    assert not (tmp_path / "m" / "manifest.json").exists() and _state() == {}


def test_trust_not_asked_and_the_server_500s_the_signature(pkgs, tmp_path):
    """A mirror keeps a signature when it can get one; one it cannot get is not required."""
    with Hostile(pkgs["v2"]) as srv:
        srv.routes[SIGNATURE_NAME] = lambda h: send(h, 500, b"oops")
        fetch(srv.url, tmp_path / "m", retry=QUICK)
    assert (tmp_path / "m" / "manifest.json").exists()


def test_signature_over_other_bytes_from_a_url_and_fetch(pkgs, keys, tmp_path):
    with Hostile(pkgs["v2"]) as srv:
        v1sig = (pkgs["v1"] / SIGNATURE_NAME).read_bytes()
        srv.routes[SIGNATURE_NAME] = lambda h: send(h, 200, v1sig)
        for call in (lambda: fetch(srv.url, tmp_path / "m", retry=QUICK, trust=keys["a"][1]),
                     lambda: ProgressiveSession(srv.url, trust=keys["a"][1]),
                     lambda: ProgressiveSession(HttpSource(srv.url, retry=QUICK),
                                                trust=keys["a"][1])):
            refused(call, TrustError, "another manifest")
        r = _cli("fetch", srv.url, "-o", tmp_path / "cli", "--trust", keys["a"][1])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "m" / "manifest.json").exists()
    assert not (tmp_path / "cli" / "manifest.json").exists()
    assert _state() == {}


def test_pin_of_another_package_on_every_http_entry_point(pkgs, tmp_path):
    with PackageServer(pkgs["v2"]) as srv:
        pin = _pin(pkgs["v1"])
        for call in (lambda: fetch(srv.url, tmp_path / "m", retry=QUICK, expect=pin),
                     lambda: ProgressiveSession(srv.url, expect=pin),
                     lambda: ProgressiveSession(HttpSource(srv.url, retry=QUICK,
                                                           prefetch=False), expect=pin)):
            refused(call, TrustError, "pinned")
        for cmd in (["fetch", srv.url, "-o", tmp_path / "cli"], ["run", srv.url]):
            r = _cli(*cmd, "--expect", pin)
            assert r.exit_code == 1 and "pinned" in r.output, r.output
            assert len([x for x in r.output.splitlines() if x.strip()]) == 1, r.output
    assert not (tmp_path / "m" / "manifest.json").exists() and _state() == {}


def _cached_mirror(pkgs, keys, tmp: Path) -> Path:
    with PackageServer(pkgs["v2"]) as srv:
        fetch(srv.url, tmp / "m", retry=QUICK, trust=keys["a"][1])
    return tmp / "m"


def _offline(mirror: Path, keys, **kw):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: the device is offline
    return HttpSource(f"http://127.0.0.1:{port}/", mirror, retry=QUICK, prefetch=False, **kw)


def test_offline_restart_with_the_cached_signature_a_fifo_or_symlink(pkgs, keys, tmp_path):
    mirror = _cached_mirror(pkgs, keys, tmp_path)
    sig = mirror / SIGNATURE_NAME
    good = sig.read_bytes()
    _offline(mirror, keys, trust=keys["a"][1]).close()  # control: accepted offline
    sig.unlink()
    os.mkfifo(sig)
    err = _in_thread(lambda: _offline(mirror, keys, trust=keys["a"][1]), 5)
    one_line(err)
    sig.unlink()
    (tmp_path / "elsewhere.sig").write_bytes(good)
    sig.symlink_to(tmp_path / "elsewhere.sig")
    err = _in_thread(lambda: _offline(mirror, keys, trust=keys["a"][1]), 5)
    assert isinstance(err, TrustError), err


def test_mirror_whose_signature_the_user_replaced_by_a_fifo(pkgs, keys, tmp_path):
    """Online, with and without trust: never blocks on a FIFO in the mirror."""
    mirror = _cached_mirror(pkgs, keys, tmp_path)
    (mirror / SIGNATURE_NAME).unlink()
    os.mkfifo(mirror / SIGNATURE_NAME)
    with PackageServer(pkgs["v2"]) as srv:
        for kw in ({}, {"trust": keys["a"][1]}):
            err = _in_thread(lambda: fetch(srv.url, mirror, retry=QUICK, **kw), 10)
            if err is not None:
                one_line(err)
    assert (mirror / SIGNATURE_NAME).is_fifo()


# ================================================================ class 4: rollback, state


@pytest.mark.parametrize("version", [2.5, "3", -1, 2 ** 64, True, None, [3]])
def test_manifest_version_of_the_wrong_type(pkgs, tmp_path, version):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    m = json.loads((pkg / "manifest.json").read_text())
    m["version"] = version
    (pkg / "manifest.json").write_text(json.dumps(m))
    refused(lambda: ProgressiveSession(pkg))
    refused(lambda: ProgressiveSession(_bytes_source(pkg, signed=False)))
    with PackageServer(pkg) as srv:
        refused(lambda: fetch(srv.url, tmp_path / "m", retry=QUICK))
    assert not (tmp_path / "m" / "manifest.json").exists()
    assert _state() == {}


@pytest.mark.parametrize("name", ["../../evil", "/etc/passwd", "a/b\\c", "x" * 201, "",
                                  "new\nline", "\x00"])
def test_model_names_with_path_characters_never_touch_a_path(work, tmp_path,
                                                             _version_state, name):
    import p2u_onnx

    try:
        pkg = p2u_onnx.encode(work / "mlp.onnx", tmp_path / "p", "4,8", version=3,
                              probe=False, name=name).path
    except P2UError as e:
        one_line(e)
        return
    before = set(os.listdir(tmp_path))
    try:
        ProgressiveSession(pkg).close()
    except P2UError as e:
        one_line(e)
    state = _state()
    assert set(state) <= {name}
    assert set(os.listdir(_version_state)) <= {"versions.json", "versions.json.lock"}
    assert set(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("what", ["garbage", "deep", "wrong-shape", "symlink", "fifo", "dir",
                                  "huge-version"])
def test_a_corrupt_version_state_fails_closed_in_one_line(pkgs, tmp_path, _version_state,
                                                         what):
    path = _version_state / "versions.json"
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"format": "p2u-versions",
                                   "models": {"mlp": {"version": 1, "digest": "x"}}}))
    if what == "garbage":
        path.write_bytes(b"\xff\x00{{{")
    elif what == "deep":
        path.write_bytes(b"[" * 100000)
    elif what == "wrong-shape":
        path.write_text(json.dumps({"format": "p2u-versions", "models": {"mlp": 5}}))
    elif what == "symlink":
        path.symlink_to(outside)
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "dir":
        path.mkdir()
    elif what == "huge-version":
        path.write_text(json.dumps({"format": "p2u-versions",
                                    "models": {"mlp": {"version": 10 ** 30, "digest": "x"}}}))
    before = outside.read_bytes()
    err = _in_thread(lambda: ProgressiveSession(pkgs["v2"]).close(), 10)
    assert err is not None, "a corrupt state was silently ignored"
    one_line(err)
    assert outside.read_bytes() == before


def test_state_folder_a_file_or_unwritable_is_a_warning_not_a_crash(pkgs, tmp_path,
                                                                    monkeypatch):
    f = tmp_path / "state-file"
    f.write_text("x")
    monkeypatch.setenv("P2U_STATE_DIR", str(f))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ProgressiveSession(pkgs["v2"]).close()
    assert any("cannot record" in str(x.message) for x in w)
    assert f.read_text() == "x"


def test_state_lock_file_symlink_creates_nothing_outside(pkgs, tmp_path, _version_state):
    target = tmp_path / "created-outside"
    (_version_state / "versions.json.lock").symlink_to(target)
    with pytest.warns(RuntimeWarning, match="cannot record version"):
        ProgressiveSession(pkgs["v2"]).close()  # accepted; the state is not written through
    assert not target.exists()


def test_concurrent_sessions_update_the_state_without_losing_a_model(tmp_path):
    st = VersionState()

    def rec(i: int) -> None:
        for v in range(1, 6):
            st.record({"name": f"m{i}", "version": v})

    threads = [threading.Thread(target=rec, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    state = st.load()
    assert {k: v["version"] for k, v in state.items()} == {f"m{i}": 5 for i in range(8)}


def test_server_offering_an_older_manifest_keeps_every_newer_file(site, pkgs, tmp_path):
    root, url = site
    _publish(root, pkgs["v2"])
    fetch(url, tmp_path / "m", retry=QUICK)
    before = snapshot(tmp_path / "m")
    _publish(root, pkgs["v1"])
    for call in (lambda: fetch(url, tmp_path / "m", retry=QUICK),
                 lambda: ProgressiveSession(HttpSource(url, tmp_path / "m", retry=QUICK)),
                 lambda: ProgressiveSession(url)):
        refused(call, TrustError, "older")
    after = snapshot(tmp_path / "m")
    assert {k: v for k, v in after.items() if not k.startswith(".p2u")} == \
        {k: v for k, v in before.items() if not k.startswith(".p2u")}


# ================================================================ class 5: hostile server


def test_retry_after_with_a_non_ascii_digit_is_not_a_crash(hostile, tmp_path):
    def busy(h) -> None:
        h.send_response(503)
        h.send_header("Content-Length", "0")
        h.end_headers()
        h.wfile.flush()

    def answer(h) -> None:  # Retry-After: "²" (latin-1 0xB2): str.isdigit() says True
        h.wfile.write(b"HTTP/1.1 503 Busy\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n")
        h.wfile.flush()
        h.close_connection = True

    hostile.routes["manifest.json"] = answer
    _, err = _timed(lambda: HttpSource(hostile.url, tmp_path / "c", retry=QUICK,
                                       prefetch=False), 10)
    one_line(err)


@pytest.mark.parametrize("encoding", ["zstd", "br", "gzip, gzip", "compress", "identity, gzip"])
def test_manifest_with_unasked_encodings(hostile, tmp_path, encoding):
    body = (hostile.root / "manifest.json").read_bytes()
    hostile.routes["manifest.json"] = lambda h: send(h, 200, body,
                                                     {"Content-Encoding": encoding})
    refused(lambda: HttpSource(hostile.url, tmp_path / "c", retry=QUICK, prefetch=False),
            TransportError, "Content-Encoding")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd", "br", "Identity, gzip", ""])
def test_stage_with_unasked_encodings(hostile, tmp_path, encoding):
    body = (hostile.root / "stage-1.p2u").read_bytes()
    hostile.routes["stage-1.p2u"] = lambda h: send(h, 200, body, {"Content-Encoding": encoding})
    with HttpSource(hostile.url, tmp_path / "c", retry=QUICK, prefetch=False) as src:
        refused(lambda: src.fetch(1), TransportError, "Content-Encoding")
    assert not (tmp_path / "c" / "stage-1.p2u").exists()


def test_206_to_a_request_without_range(hostile, tmp_path):
    body = (hostile.root / "stage-1.p2u").read_bytes()
    hostile.routes["stage-1.p2u"] = lambda h: send(
        h, 206, body, {"Content-Range": f"bytes 0-{len(body) - 1}/{len(body)}"})
    with HttpSource(hostile.url, tmp_path / "c", retry=QUICK, prefetch=False) as src:
        refused(lambda: src.fetch(1), TransportError, "206")
    body2 = (hostile.root / "manifest.json").read_bytes()
    hostile.routes["manifest.json"] = lambda h: send(h, 206, body2)
    refused(lambda: HttpSource(hostile.url, tmp_path / "d", retry=QUICK, prefetch=False),
            TransportError, "206")


def test_chunked_endless_manifest_and_signature(pkgs, keys, tmp_path):
    def chunked_forever(h) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b"a" * 65536
        try:
            while not h.server.stop.is_set():
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass
        h.close_connection = True

    with Hostile(pkgs["v2"]) as srv:
        srv.routes["manifest.json"] = chunked_forever
        _, err = _timed(lambda: HttpSource(srv.url, tmp_path / "c", retry=QUICK), 20)
        assert "larger than" in one_line(err)
        del srv.routes["manifest.json"]
        srv.routes[SIGNATURE_NAME] = chunked_forever
        _, err = _timed(lambda: HttpSource(srv.url, tmp_path / "d", retry=QUICK,
                                           trust=keys["a"][1]), 20)
        one_line(err)


@pytest.mark.parametrize("length", ["+10", "1e3", "10, 10", "0x10", "-1", "9" * 40])
def test_malformed_content_length(hostile, tmp_path, length):
    body = (hostile.root / "stage-1.p2u").read_bytes()

    def answer(h) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\nConnection: close\r\n\r\n"
                      % length.encode() + body)
        h.close_connection = True

    hostile.routes["stage-1.p2u"] = answer
    with HttpSource(hostile.url, tmp_path / "c", retry=QUICK, prefetch=False) as src:
        _, err = _timed(lambda: src.fetch(1), 15)
        one_line(err)
    assert not (tmp_path / "c" / "stage-1.p2u").exists()


def test_huge_headers_are_bounded(hostile, tmp_path):
    def answer(h) -> None:
        h.send_response(200)
        try:
            for i in range(100000):
                if h.server.stop.is_set():
                    break
                h.send_header(f"X-Junk-{i}", "j" * 1000)
                if i % 100 == 0:
                    h.flush_headers()
        except OSError:
            pass
        h.close_connection = True

    hostile.routes["manifest.json"] = answer
    _, err = _timed(lambda: HttpSource(hostile.url, tmp_path / "c", retry=QUICK,
                                       prefetch=False), 20)
    one_line(err)


def test_manifest_that_is_not_json_or_has_nan(hostile, tmp_path):
    for body in (b"\xff\xfe{", b'{"format": NaN}', b"[" * 100000, b"null", b"\x00" * 1000):
        hostile.routes["manifest.json"] = lambda h, b=body: send(h, 200, b)
        refused(lambda: HttpSource(hostile.url, tmp_path / "c", retry=QUICK, prefetch=False))
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_retry_after_huge_and_503_forever_are_bounded(hostile, tmp_path):
    hostile.routes["manifest.json"] = lambda h: send(h, 503, b"", {"Retry-After": "99999999"})
    pol = RetryPolicy(attempts=50, backoff=0.01, max_backoff=0.05, timeout=3,
                      max_attempts_total=10)
    _, err = _timed(lambda: HttpSource(hostile.url, tmp_path / "c", retry=pol,
                                       prefetch=False), 10)
    one_line(err)
    assert len(hostile.requests("manifest.json")) <= 10


# -- close() in every state of a download


def _close_within_a_second(src: HttpSource, start, wait_for) -> None:
    """Start a download with ``start(src)`` in a thread, wait until ``wait_for()`` says it is in
    the state under test, then ``close()``: it must return, and the download end, in < 1 s."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(_safe(lambda: start(src))), daemon=True)
    t.start()
    end = time.monotonic() + 10
    while not wait_for() and time.monotonic() < end:
        time.sleep(0.02)
    assert wait_for(), "never reached the state under test"
    time.sleep(0.2)
    t0 = time.monotonic()
    src.close()
    t.join(2)
    took = time.monotonic() - t0
    assert took < 1.0 and not t.is_alive(), f"close took {took:.2f} s"
    assert box and isinstance(box[0], P2UError), box


def _safe(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    return None


def test_close_while_connecting(hostile, tmp_path):
    """A server whose accept queue is full: the connection attempt itself hangs."""
    src = HttpSource(hostile.url, tmp_path / "c", prefetch=False,
                     retry=RetryPolicy(attempts=2, timeout=20))
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    fillers = []
    for _ in range(8):  # fill the backlog: further SYNs are dropped, connect() waits
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(lst.getsockname())
        fillers.append(s)
    time.sleep(0.2)
    src.url = f"http://127.0.0.1:{lst.getsockname()[1]}/"
    started = threading.Event()

    def go(s):
        started.set()
        s.fetch(1)

    try:
        _close_within_a_second(src, go, started.is_set)
    finally:
        for s in fillers:
            s.close()
        lst.close()


def test_close_while_waiting_for_headers(hostile, tmp_path):
    got = threading.Event()

    def silent(h) -> None:
        got.set()
        h.server.stop.wait(60)
        h.close_connection = True

    hostile.routes["stage-1.p2u"] = silent
    src = HttpSource(hostile.url, tmp_path / "c", prefetch=False,
                     retry=RetryPolicy(attempts=2, timeout=20))
    _close_within_a_second(src, lambda s: s.fetch(1), got.is_set)


def test_close_while_in_retry_backoff(hostile, tmp_path):
    hostile.routes["stage-1.p2u"] = lambda h: send(h, 503, b"", {"Retry-After": "30"})
    src = HttpSource(hostile.url, tmp_path / "c", prefetch=False,
                     retry=RetryPolicy(attempts=5, timeout=5, max_backoff=60))
    _close_within_a_second(src, lambda s: s.fetch(1),
                           lambda: len(hostile.requests("stage-1.p2u")) >= 1)


def test_close_while_in_lock_contention(hostile, tmp_path):
    src = HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=QUICK)
    with open(tmp_path / "c" / ".p2u" / "lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # another process holds the mirror
        _close_within_a_second(src, lambda s: s.fetch(1), lambda: True)


def test_close_of_a_session_from_a_url_in_the_constructor_with_cancel(hostile, tmp_path):
    """The manifest stalls: the caller's cancel event ends the constructor within a second."""
    hostile.routes["manifest.json"] = lambda h: h.server.stop.wait(60)
    cancel = threading.Event()
    box: list = []
    t = threading.Thread(target=lambda: box.append(_safe(lambda: HttpSource(
        hostile.url, tmp_path / "c", cancel=cancel, retry=RetryPolicy(timeout=20)))),
        daemon=True)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    cancel.set()
    t.join(3)
    assert not t.is_alive() and time.monotonic() - t0 < 1.0, time.monotonic() - t0
    one_line(box[0])


# ================================================================ class 6: fetch -o DIR


def test_fetch_into_a_file_or_a_dir_with_a_p2u_file(hostile, tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    refused(lambda: fetch(hostile.url, f, retry=QUICK))
    assert f.read_text() == "mine"
    d = tmp_path / "d"
    d.mkdir()
    (d / ".p2u").write_text("mine too")
    refused(lambda: fetch(hostile.url, d, retry=QUICK), match=".p2u")
    assert (d / ".p2u").read_text() == "mine too"
    assert hostile.log == []  # refused before any request


def test_fetch_into_a_dir_whose_p2u_is_a_symlink(hostile, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    d = tmp_path / "d"
    d.mkdir()
    (d / ".p2u").symlink_to(outside)
    refused(lambda: fetch(hostile.url, d, retry=QUICK), match=".p2u")
    assert list(outside.iterdir()) == []


def test_fetch_into_a_mirror_with_a_stage_symlink_pointing_outside(hostile, pkg, tmp_path):
    fetch(hostile.url, tmp_path / "m", retry=QUICK)
    outside = tmp_path / "victim"
    outside.write_bytes(b"do not touch")
    st = tmp_path / "m" / "stage-2.p2u"
    st.unlink()
    st.symlink_to(outside)
    before = snapshot(tmp_path)
    refused(lambda: fetch(hostile.url, tmp_path / "m", retry=QUICK))
    assert outside.read_bytes() == b"do not touch"
    assert st.is_symlink()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if ".p2u/" not in k} == \
        {k: v for k, v in before.items() if ".p2u/" not in k}


def test_fetch_into_a_mirror_whose_part_file_is_a_symlink(hostile, pkg, tmp_path):
    """Even p2u's own state folder: a link planted there is not written through."""
    MirrorDir = __import__("p2u_onnx._mirror", fromlist=["MirrorDir"]).MirrorDir
    m = MirrorDir.open(tmp_path / "m")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    m.part("stage-1.p2u").symlink_to(victim)
    m.part_meta("stage-1.p2u").symlink_to(tmp_path / "victim-meta")
    try:
        fetch(hostile.url, tmp_path / "m", retry=QUICK)
    except P2UError as e:
        one_line(e)
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "victim-meta").exists()


def test_fetch_through_a_dir_that_is_a_symlink(hostile, pkg, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    fetch(hostile.url, tmp_path / "link", retry=QUICK)
    assert (tmp_path / "real" / "manifest.json").read_bytes() == \
        (pkg / "manifest.json").read_bytes()


def test_refused_manifest_via_the_cli_leaves_the_folder_unchanged(pkgs, keys, tmp_path):
    with PackageServer(pkgs["v2"]) as srv:
        fetch(srv.url, tmp_path / "m", retry=QUICK)
    before = snapshot(tmp_path / "m")
    with PackageServer(pkgs["v1"]) as srv:  # an older release, a wrong pin, a wrong key
        for extra in ([], ["--expect", _pin(pkgs["v2"])], ["--trust", keys["b"][1]]):
            r = _cli("fetch", srv.url, "-o", tmp_path / "m", *extra)
            assert r.exit_code == 1, r.output
            assert len([x for x in r.output.splitlines() if x.strip()]) == 1, r.output
    assert {k: v for k, v in snapshot(tmp_path / "m").items() if k != ".p2u/lock"} == \
        {k: v for k, v in before.items() if k != ".p2u/lock"}


# ================================================================ class 7: p2u serve


def _raw(url: str, data: bytes) -> bytes:
    u = httpx.URL(url)
    with socket.create_connection((u.host, u.port), timeout=5) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and len(out) > 4096:
                    break
        except TimeoutError:
            pass
    return out


@pytest.mark.parametrize("path", ["/m.p2u/%00manifest.json", "/m.p2u/manifest.json%00",
                                  "/%252e%252e/secret/key.txt", "/m.p2u/..%5c..%5csecret",
                                  "/m.p2u\\..\\leak.txt", "/%2e%2e%2fsecret%2fkey.txt",
                                  "//etc/passwd", "/m.p2u/%ff%fe", "/m.p2u/",
                                  "/m.p2u/./manifest.json", "/" + "a/" * 3000])
def test_serve_hostile_paths_get_a_clean_404(served, path):
    lines: list[str] = []
    with PackageServer(served, log=lines.append) as srv:
        status, _, body = _get(srv.url, path)
        assert status in (400, 404, 414), (status, body[:100])
        assert b"secret key" not in body
        assert _get(srv.url, "/m.p2u/manifest.json")[0] == 200  # still serving
    assert not [ln for ln in lines if "error while answering" in ln], lines


def test_serve_absolute_url_in_the_request_line(served):
    with PackageServer(served) as srv:
        close = b"Host: x\r\nConnection: close\r\n\r\n"
        out = _raw(srv.url, b"GET http://evil.example/../leak.txt HTTP/1.1\r\n" + close)
        assert b"secret key" not in out and out.startswith(b"HTTP/1.1 404"), out[:200]
        out = _raw(srv.url, b"GET file:///etc/passwd HTTP/1.1\r\n" + close)
        assert b"root:" not in out and out.startswith(b"HTTP/1.1 404"), out[:200]


@pytest.mark.parametrize("rng", ["bytes=" + ",".join(f"{i}-{i}" for i in range(2000)),
                                 "bytes=99999999999999999999999999999999-",
                                 "bytes=-99999999999999999999999999999999",
                                 "bytes=0-99999999999999999999999999999999",
                                 "bytes=1-0", "bytes= -", "items=0-1",
                                 "bytes=-0"])
def test_serve_range_abuse(served, rng):
    lines: list[str] = []
    with PackageServer(served, log=lines.append) as srv:
        status, headers, body = _get(srv.url, "/m.p2u/manifest.json", {"Range": rng})
        assert status in (200, 206, 416), status
    assert not [ln for ln in lines if "error while answering" in ln], lines


def test_serve_head_and_directory_and_fifo(served):
    with PackageServer(served) as srv:
        u = httpx.URL(srv.url)
        import http.client

        c = http.client.HTTPConnection(u.host, u.port, timeout=5)
        c.request("HEAD", "/m.p2u/manifest.json")
        r = c.getresponse()
        assert r.status == 200 and r.read() == b""
        c.request("HEAD", "/nothing")  # the same connection still works after HEAD
        r = c.getresponse()
        assert r.status == 404 and r.read() == b""
        c.close()
        for p in ("/m.p2u", "/fifo", "/"):
            assert _get(srv.url, p)[0] == 404


def test_serve_a_fifo_root_file_does_not_block_others(served):
    with PackageServer(served, idle_timeout=1) as srv:
        _, err = _timed(lambda: _get(srv.url, "/fifo"), 3)
        assert err is None


def test_serve_slowloris_is_bounded_by_the_idle_timeout(served):
    with PackageServer(served, idle_timeout=0.5, max_connections=2) as srv:
        u = httpx.URL(srv.url)
        s = socket.create_connection((u.host, u.port), timeout=5)
        s.sendall(b"GET /m.p2u/manifest.json HTTP/1.1\r\n")
        time.sleep(1.0)  # silent past the idle timeout: dropped
        s.settimeout(3)
        assert s.recv(100) == b""
        s.close()
        assert _get(srv.url, "/m.p2u/manifest.json")[0] == 200


# ================================================================ class 10: redirects


def test_cookies_of_a_callers_client_stay_at_the_origin(hostile, other, tmp_path):
    hostile.routes["manifest.json"] = _redirect(other.url + "manifest.json")
    with httpx.Client(cookies={"session": "abc"},
                      headers={"Proxy-Authorization": "Basic eA=="}) as client:
        with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=QUICK,
                        client=client):
            pass
    assert hostile.requests("manifest.json")[0].get("cookie") == "session=abc"
    (_, headers), = other.log
    assert "cookie" not in headers and "proxy-authorization" not in headers, headers


def test_proxy_authorization_and_custom_headers_stay_at_the_origin(hostile, other, tmp_path):
    hostile.routes["manifest.json"] = _redirect(other.url + "manifest.json", 308)
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=QUICK,
                    headers={**SECRETS, "Proxy-Authorization": "Basic eA==",
                             "Range": "bytes=0-", "If-Range": "evil"}):
        pass
    (_, headers), = other.log
    assert not {"authorization", "cookie", "x-api-key", "proxy-authorization"} & set(headers)


def test_localhost_and_127_0_0_1_are_different_origins(hostile, tmp_path):
    port = hostile.server_address[1]
    hostile.routes["manifest.json"] = lambda h: (
        send(h, 200, (hostile.root / "manifest.json").read_bytes())
        if h.headers.get("Host", "").startswith("localhost")
        else _redirect(f"http://localhost:{port}/manifest.json")(h))
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=QUICK,
                    headers=SECRETS):
        pass
    second = hostile.requests("manifest.json")[1]
    assert "authorization" not in second and "x-api-key" not in second, second


@pytest.mark.parametrize("target", ["javascript:alert(1)", "http+unix://%2Ftmp%2Fs/x",
                                    "unix:/tmp/s", "http://", "http://[::1", "https:///x",
                                    "\x00http://127.0.0.1/", "http://127.0.0.1:99999/x",
                                    "HTTP://127.0.0.1:1/x" + "a" * 70000])
def test_redirect_to_odd_targets_is_one_line(hostile, tmp_path, target):
    hostile.routes["manifest.json"] = _redirect(target)
    _, err = _timed(lambda: HttpSource(hostile.url, tmp_path / "c", prefetch=False,
                                       retry=QUICK), 15)
    one_line(err)


def test_relative_redirect_with_dotdot_stays_on_the_origin(hostile, tmp_path):
    body = (hostile.root / "manifest.json").read_bytes()
    hostile.routes["manifest.json"] = lambda h: send(h, 200, body) if h.path.startswith(
        "/x/") else _redirect("../../../../x/manifest.json")(h)
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=QUICK,
                    headers=SECRETS):
        pass
    assert [p for p, _ in hostile.log][-1] == "/x/manifest.json"


def test_redirected_stage_with_other_bytes_is_refused(hostile, other, tmp_path):
    other.routes["stage-1.p2u"] = lambda h: send(h, 200, (other.root / "stage-2.p2u")
                                                 .read_bytes()[: (other.root / "stage-1.p2u")
                                                               .stat().st_size])
    hostile.routes["stage-1.p2u"] = _redirect(other.url + "stage-1.p2u", 301)
    with HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=QUICK) as src:
        refused(lambda: src.fetch(1), TransportError, "sha256")
    assert not (tmp_path / "c" / "stage-1.p2u").exists()


def test_fifos_planted_in_the_mirror_state_folder_never_block(hostile, pkg, tmp_path):
    fetch(hostile.url, tmp_path / "m", retry=QUICK)
    state = tmp_path / "m" / ".p2u"
    (state / "written" / "stage-1.p2u").unlink()
    os.mkfifo(state / "written" / "stage-1.p2u")
    (tmp_path / "m" / "stage-2.p2u").unlink()
    os.mkfifo(state / "stage-2.p2u.part.json")
    os.mkfifo(state / "stage-2.p2u.part")
    err = _in_thread(lambda: fetch(hostile.url, tmp_path / "m", retry=QUICK), 10)
    assert err is None or one_line(err)


@pytest.mark.parametrize("keyid", ["evil\nError: all good", "\x1b[2J\x1b[Hforged", "a\r" * 50])
def test_signature_keyids_cannot_forge_lines_in_the_error(pkgs, keys, tmp_path, keyid):
    """A keyid is server-controlled text: a newline or a terminal escape in it must not reach
    the one-line error (a fake second line, a cleared screen)."""
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    _write_env(pkg, {"signed": _signed_of(pkg), "signatures": [{"keyid": keyid, "sig": "00"}]})
    for call in _local_entry_points(pkg, tmp_path, trust=keys["a"][1]):
        text = refused(call, TrustError, "not a trusted key")
        assert "\x1b" not in text and "\r" not in text, repr(text)
    r = _cli("verify", pkg, "--trust", keys["a"][1])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, repr(r.output)


def test_credentials_in_the_url_never_appear_in_errors(hostile, tmp_path):
    port = hostile.server_address[1]
    hostile.routes["manifest.json"] = lambda h: send(h, 404, b"")
    url = f"http://user:hunter2@127.0.0.1:{port}/"
    text = refused(lambda: HttpSource(url, tmp_path / "c", retry=QUICK, prefetch=False),
                   TransportError, "404")
    assert "hunter2" not in text, text
    assert hostile.requests("manifest.json")[0]["authorization"].startswith("Basic ")
    r = _cli("fetch", url, "-o", tmp_path / "cli")
    assert r.exit_code == 1 and "hunter2" not in r.output, r.output


def test_an_oversized_signature_is_not_downloaded_past_its_cap(pkgs, keys, tmp_path):
    with Hostile(pkgs["v2"]) as srv:
        sent: list[int] = []

        def big(h) -> None:
            send(h, 200, b"", {"Content-Length": str(8 << 20)}, length=8 << 20)
            n = 0
            try:
                while n < (8 << 20):
                    h.wfile.write(b" " * 65536)
                    n += 65536
            except OSError:
                pass
            sent.append(n)
            h.close_connection = True

        srv.routes[SIGNATURE_NAME] = big
        refused(lambda: fetch(srv.url, tmp_path / "m", retry=QUICK, trust=keys["a"][1]),
                P2UError, "Content-Length says")  # refused on its headers, nothing read
        srv.routes[SIGNATURE_NAME] = lambda h: endless(h)  # no Content-Length: cut while read
        refused(lambda: fetch(srv.url, tmp_path / "m", retry=QUICK, trust=keys["a"][1]),
                P2UError, "signature file is larger than the 65536-byte")
    assert not (tmp_path / "m" / "manifest.json").exists()


@pytest.mark.parametrize("where", ["reason", "encoding", "location", "content-range"])
def test_server_text_cannot_forge_lines_or_escapes_in_errors(hostile, pkg, tmp_path, where):
    """Header values and reason phrases may carry obs-text: \\x85 (NEL, a line break to
    str.splitlines) and \\x9b (CSI, a terminal escape) must not reach the one-line error."""
    evil = b"x\x85Error: fake\x9b2J"
    size = (pkg / "stage-1.p2u").stat().st_size

    def answer(h) -> None:
        if where == "reason":
            head = b"HTTP/1.1 418 " + evil + b"\r\nContent-Length: 0\r\n"
        elif where == "encoding":
            head = b"HTTP/1.1 200 OK\r\nContent-Encoding: " + evil + b"\r\nContent-Length: 0\r\n"
        elif where == "location":
            head = b"HTTP/1.1 302 Found\r\nLocation: ftp://" + evil + b"\r\nContent-Length: 0\r\n"
        else:
            head = (b"HTTP/1.1 206 Partial\r\nContent-Range: bytes " + evil +
                    b"\r\nContent-Length: %d\r\n" % size)
        h.wfile.write(head + b"Connection: close\r\n\r\n")
        h.close_connection = True

    hostile.routes["stage-1.p2u"] = answer
    with HttpSource(hostile.url, tmp_path / "c", retry=QUICK, prefetch=False) as src:
        if where == "content-range":  # asked for a resume: leave a partial file first
            src._mirror.part("stage-1.p2u").write_bytes((pkg / "stage-1.p2u").read_bytes()[:10])
            src._mirror.part_meta("stage-1.p2u").write_text(json.dumps(
                {"sha256": hashlib.sha256((pkg / "stage-1.p2u").read_bytes()).hexdigest(),
                 "size": size, "etag": '"v1"'}))
        text = refused(lambda: src.fetch(1))
    assert len(text.splitlines()) == 1 and "\x9b" not in text, repr(text)


def test_serve_log_lines_carry_no_terminal_escapes(served):
    lines: list[str] = []
    with PackageServer(served, log=lines.append) as srv:
        _raw(srv.url, b"GET /\x1b[2J\x1b[31mowned\x85x HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: close\r\n\r\n")
    assert lines and not any("\x1b" in ln or "\x85" in ln for ln in lines), lines


def test_close_while_hashing_a_large_file(hostile, tmp_path):
    """Checking a cached file of 1 GiB takes about 2 s: close() stops it within a second."""
    from p2u_onnx.transport import _Entry

    src = HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=QUICK)
    big = tmp_path / "c" / "stage-9.p2u"
    with open(big, "wb") as fh:
        fh.truncate(1 << 30)  # sparse: no disk used
    entry = _Entry("stage-9.p2u", 1 << 30, "0" * 64)
    started = threading.Event()

    def go(s):
        started.set()
        s._cached(entry)

    _close_within_a_second(src, go, started.is_set)
    assert big.exists()  # the user's file: not p2u's to remove


def test_close_during_a_tls_handshake_that_never_ends(tmp_path):
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    conns: list = []
    accepted = threading.Event()

    def accept() -> None:
        try:
            c, _ = lst.accept()  # then says nothing: no ServerHello
            conns.append(c)
            accepted.set()
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    cancel = threading.Event()
    box: list = []
    url = f"https://127.0.0.1:{lst.getsockname()[1]}/"
    t = threading.Thread(target=lambda: box.append(_safe(lambda: HttpSource(
        url, tmp_path / "c", cancel=cancel, retry=RetryPolicy(timeout=20)))), daemon=True)
    t.start()
    try:
        assert accepted.wait(10)
        time.sleep(0.3)
        t0 = time.monotonic()
        cancel.set()
        t.join(3)
        took = time.monotonic() - t0
        assert not t.is_alive() and took < 1.0, took
        one_line(box[0])
    finally:
        lst.close()
        for c in conns:
            c.close()


def test_offline_restart_with_an_expired_cached_signature(pkgs, keys, tmp_path):
    mirror = _cached_mirror(pkgs, keys, tmp_path)
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)).isoformat()
    m = json.loads((mirror / "manifest.json").read_text())
    _sign_raw(mirror, keys["a"][0], {**_signed_of(mirror), "expires": past,
                                     "version": m["version"]})
    refused(lambda: _offline(mirror, keys, trust=keys["a"][1]), TrustError, "expired")


@pytest.mark.parametrize("garbage", [b"hello\r\n\r\n", b"HTTP/9.9 200 OK\r\n\r\n",
                                     b"\x16\x03\x01\x00\xa5\x01\x00\x00",  # TLS on http
                                     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length:"
                                     b" 6\r\n\r\nhello!"])
def test_servers_speaking_garbage_are_one_line_and_bounded(hostile, tmp_path, garbage):
    def answer(h) -> None:
        h.wfile.write(garbage)
        h.close_connection = True

    hostile.routes["manifest.json"] = answer
    _, err = _timed(lambda: HttpSource(hostile.url, tmp_path / "c", retry=QUICK,
                                       prefetch=False), 10)
    one_line(err)


def test_captive_portal_html_for_the_manifest(hostile, tmp_path):
    html = b"<html><body>Please log in" + b" " * 1000 + b"</body></html>"
    hostile.routes["manifest.json"] = lambda h: send(h, 200, html,
                                                     {"Content-Type": "text/html"})
    refused(lambda: HttpSource(hostile.url, tmp_path / "c", retry=QUICK, prefetch=False))
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_cli_trust_refusals_are_one_line_everywhere(pkgs, keys, tmp_path):
    unsigned = _copy(pkgs["v2"], tmp_path / "u")
    (unsigned / SIGNATURE_NAME).unlink()
    out = tmp_path / "r.onnx"
    for cmd in (["verify", unsigned], ["restore", unsigned, "-o", out], ["run", unsigned]):
        r = _cli(*cmd, "--trust", keys["a"][1])
        assert r.exit_code == 1 and "not signed" in r.output, r.output
        assert len([x for x in r.output.splitlines() if x.strip()]) == 1, r.output
    assert not out.exists()
    with Hostile(pkgs["v2"]) as srv:
        srv.routes[SIGNATURE_NAME] = lambda h: send(h, 404, b"")
        for cmd in (["run", srv.url], ["fetch", srv.url, "-o", tmp_path / "m"]):
            r = _cli(*cmd, "--trust", keys["a"][1])
            assert r.exit_code == 1 and "not signed" in r.output, r.output
            assert len([x for x in r.output.splitlines() if x.strip()]) == 1, r.output


def test_a_slow_tls_handshake_still_completes(pkg, tmp_path, monkeypatch):
    """The sliced handshake (what lets cancel stop it) resumes across slices: a server that
    waits 0.7 s before its ServerHello is still fetched from, over our own transport."""
    import ssl

    from test_network import _self_signed

    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    real = httpx.HTTPTransport
    monkeypatch.setattr(httpx, "HTTPTransport", lambda *a, **k: real(verify=client_ctx))
    body = (pkg / "manifest.json").read_bytes()
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)

    def serve() -> None:
        try:
            conn, _ = lst.accept()
        except OSError:
            return
        time.sleep(0.7)
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            req = b""
            while b"\r\n\r\n" not in req:
                req += tls.recv(4096)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                        % len(body) + body)

    threading.Thread(target=serve, daemon=True).start()
    try:
        src = HttpSource(f"https://127.0.0.1:{lst.getsockname()[1]}/", tmp_path / "c",
                         prefetch=False, retry=RetryPolicy(attempts=1, timeout=5))
        assert src.manifest_bytes == body
        src.close()
    finally:
        lst.close()


def test_an_endless_stream_of_1xx_answers_ends_at_the_deadline(hostile, tmp_path):
    def informational_forever(h) -> None:
        try:
            while not h.server.stop.is_set():
                h.wfile.write(b"HTTP/1.1 102 Processing\r\n\r\n" * 64)
                time.sleep(0.01)
        except OSError:
            pass
        h.close_connection = True

    hostile.routes["manifest.json"] = informational_forever
    pol = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02, timeout=3, deadline=2)
    _, err = _timed(lambda: HttpSource(hostile.url, tmp_path / "c", retry=pol,
                                       prefetch=False), 6)
    assert "deadline" in one_line(err)


@pytest.mark.parametrize("url", ["http://x\n/", "http://user:pa\nss@127.0.0.1:1/", "http://[::1",
                                 "ftp://user:secret@x/", "http:///x"])
def test_a_refused_url_is_shown_on_one_line_without_its_password(url, tmp_path):
    text = refused(lambda: HttpSource(url, tmp_path / "c", retry=QUICK), TransportError)
    assert "secret" not in text and "pa\nss" not in text and "pa?ss" not in text, text
    for cmd in (["fetch", url, "-o", tmp_path / "o"], ["run", url]):
        r = _cli(*cmd)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, repr(r.output)


@pytest.mark.parametrize("value", ["bytes 10-" + "9" * 5000 + "/" + "9" * 5000,
                                   "bytes 10-20/" + "9" * 4400, "bytes \u0661\u0660-20/30",
                                   "bytes 10-20/30, bytes 0-1/2"])
def test_content_range_with_huge_or_odd_numbers(hostile, pkg, tmp_path, value):
    """Python's int() refuses more than 4300 digits with a ValueError: never a raw one."""
    data = (pkg / "stage-1.p2u").read_bytes()

    def answer(h) -> None:
        h.wfile.write(b"HTTP/1.1 206 Partial\r\nContent-Range: " + value.encode("utf-8") +
                      b"\r\nContent-Length: 10\r\nConnection: close\r\n\r\n" + b"\0" * 10)
        h.close_connection = True

    hostile.routes["stage-1.p2u"] = answer
    with HttpSource(hostile.url, tmp_path / "c", retry=QUICK, prefetch=False) as src:
        src._mirror.part("stage-1.p2u").write_bytes(data[:10])
        src._mirror.part_meta("stage-1.p2u").write_text(json.dumps(
            {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "etag": '"v1"'}))
        _, err = _timed(lambda: src.fetch(1), 10)
        one_line(err)


@pytest.mark.parametrize("patch", [b'"version": ' + b"9" * 5000, b'"version": 1e999999',
                                   b'"version": -0.0', b'"name": "\\ud800"'])
def test_manifest_numbers_and_strings_python_cannot_take(hostile, pkg, tmp_path, patch):
    m = json.loads((pkg / "manifest.json").read_bytes())
    key = patch.split(b":")[0].strip(b'"').decode()
    m.pop(key, None)
    body = json.dumps(m).encode()
    body = body[:-1] + b", " + patch + b"}"
    hostile.routes["manifest.json"] = lambda h: send(h, 200, body)
    refused(lambda: HttpSource(hostile.url, tmp_path / "c", retry=QUICK, prefetch=False))
    pkg2 = tmp_path / "p"
    shutil.copytree(pkg, pkg2)
    (pkg2 / "manifest.json").write_bytes(body)
    refused(lambda: ProgressiveSession(pkg2))


def test_a_lock_held_forever_by_another_process_is_bounded(hostile, tmp_path):
    pol = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02, timeout=3, deadline=1,
                      min_rate=1e9)
    src = HttpSource(hostile.url, tmp_path / "c", prefetch=False, retry=pol)
    with open(tmp_path / "c" / ".p2u" / "lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        _, err = _timed(lambda: src.fetch(1), 5)
    assert "lock" in one_line(err)
    src.close()


def test_serve_survives_garbage_requests_and_logs_one_clean_line_each(served):
    import random

    rnd = random.Random(14)
    lines: list[str] = []
    garbage = [bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300))) + b"\r\n\r\n"
               for _ in range(25)]
    garbage += [b"GET /m.p2u/manifest.json HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
                b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                b"GET /m.p2u/manifest.json HTTP/1.1\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n",
                b"DELETE /m.p2u/manifest.json HTTP/1.1\r\n\r\n",
                b"GET /m.p2u/manifest.json HTTP/2.0\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64]
    with PackageServer(served, log=lines.append, idle_timeout=0.5,
                       max_connections=64) as srv:
        def one(g: bytes) -> None:
            try:
                _raw(srv.url, g)
            except OSError:
                pass

        threads = [threading.Thread(target=one, args=(g,)) for g in garbage]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert _get(srv.url, "/m.p2u/manifest.json")[0] == 200
    assert all(ln.isprintable() for ln in lines), [ln for ln in lines if not ln.isprintable()]
    assert not [ln for ln in lines if "Traceback" in ln]


@pytest.mark.parametrize("kw", [{"headers": {"X-Key": "\u00e9"}}, {"headers": {"\u00e9": "x"}},
                                {"trust": ""}, {"trust": [None]}, {"expect": b"sha256:00"}])
def test_bad_arguments_are_one_line_before_any_request(hostile, tmp_path, kw):
    refused(lambda: HttpSource(hostile.url, tmp_path / "c", retry=QUICK, prefetch=False, **kw))
    assert hostile.log == []


@pytest.mark.parametrize("opt", [["--attempts", "0"], ["--timeout", "-1"], ["--timeout", "nan"],
                                 ["--timeout", "inf"]])
def test_cli_fetch_bad_retry_options_are_usage_errors(opt, tmp_path):
    r = _cli("fetch", "http://127.0.0.1:1/", "-o", tmp_path / "o", *opt)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert isinstance(r.exception, SystemExit)
    with pytest.raises(ValueError):
        RetryPolicy(timeout=float("nan"))


@pytest.mark.parametrize("opt", [["--port", "70000"], ["--port", "-1"], ["--idle-timeout", "nan"],
                                 ["--idle-timeout", "inf"], ["--host", "bad host\n"]])
def test_cli_serve_bad_options_are_one_line(opt, tmp_path):
    """(A NaN idle timeout used to start a server whose every connection then failed.)"""
    r = _cli("serve", tmp_path, *opt)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert len(r.output.strip().splitlines()) == 1, repr(r.output)
