"""Authenticity (pins, signatures) and freshness (rollback, freeze) on every entry point.

Real packages (tests/synth.py encoded by p2u_onnx.encode), real Ed25519 keys, a real HTTP
server on 127.0.0.1 (p2u_onnx.devserver.PackageServer). Each hostile case asserts the refusal
(TrustError, with a message naming the problem) and that nothing was written: no restored model,
no cached manifest, no change to a mirror, no version recorded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("cryptography")

import p2u_onnx  # noqa: E402
from p2u_onnx import api  # noqa: E402
from p2u_onnx.cli import main  # noqa: E402
from p2u_onnx.devserver import PackageServer  # noqa: E402
from p2u_onnx.errors import P2UError, TrustError  # noqa: E402
from p2u_onnx.runtime import BytesSource, ProgressiveSession  # noqa: E402
from p2u_onnx.transport import HttpSource, RetryPolicy, fetch  # noqa: E402
from p2u_onnx.trust import (  # noqa: E402
    SIGNATURE_NAME,
    VersionState,
    _canonical,
    generate_key,
    sign_package,
)

from synth import mlp  # noqa: E402

FAST = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02, timeout=5)


# ---------------------------------------------------------------- packages and keys


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("trust")
    onnx.save(mlp(), str(d / "mlp.onnx"))
    return d


def _encode(work: Path, name: str, version: int, plan: str = "4,8") -> Path:
    return p2u_onnx.encode(work / "mlp.onnx", work / name, plan, version=version,
                           probe=False).path


@pytest.fixture(scope="module")
def keys(work) -> dict[str, tuple[Path, str]]:
    """Two key pairs: "a" (trusted by the tests) and "b" (someone else's)."""
    return {k: (work / f"key-{k}", generate_key(work / f"key-{k}")) for k in "ab"}


@pytest.fixture(scope="module")
def pkgs(work, keys) -> dict[str, Path]:
    """v1 and v2 of model "mlp", each signed by key a; v2x: version 2 again, other content."""
    out = {"v1": _encode(work, "v1.p2u", 1), "v2": _encode(work, "v2.p2u", 2),
           "v2x": _encode(work, "v2x.p2u", 2, plan="4,lossless")}
    for p in out.values():
        sign_package(p, keys["a"][0], "30d")
    return out


def _copy(pkg: Path, dest: Path) -> Path:
    shutil.copytree(pkg, dest)
    return dest


def _tree(root: Path) -> dict[str, str]:
    """name -> sha256 of every file under ``root`` (what must not change)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _state() -> dict:
    return VersionState().load()


def _sign_raw(pkg: Path, key: Path, signed: dict) -> None:
    """A validly signed envelope with whatever ``signed`` says (e.g. an expiry in the past, as
    an old release replayed by a frozen mirror carries)."""
    from cryptography.hazmat.primitives import serialization as ser

    k = ser.load_pem_private_key(key.read_bytes(), None)
    pub = k.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    env = {"signed": signed, "signatures": [{"keyid": hashlib.sha256(pub).hexdigest(),
                                              "sig": k.sign(_canonical(signed)).hex()}]}
    (pkg / SIGNATURE_NAME).write_text(json.dumps(env))


def _signed_of(pkg: Path) -> dict:
    return json.loads((pkg / SIGNATURE_NAME).read_text())["signed"]


def _pin(pkg: Path) -> str:
    return "sha256:" + hashlib.sha256((pkg / "manifest.json").read_bytes()).hexdigest()


def _bytes_source(pkg: Path, signed: bool = True) -> BytesSource:
    sig = pkg / SIGNATURE_NAME
    return BytesSource((pkg / "manifest.json").read_bytes(), (pkg / "stage-0.p2u").read_bytes(),
                       signature=sig.read_bytes() if signed and sig.exists() else None)


def _refused_locally(pkg: Path, tmp: Path, match: str, **kw) -> None:
    """Every local entry point refuses ``pkg`` with ``kw`` (TrustError matching ``match``),
    writes nothing and records no version."""
    before = _tree(pkg)
    out = tmp / "restored.onnx"
    for call in (lambda: api.verify(pkg, **kw), lambda: api.restore(pkg, out, **kw),
                 lambda: api.inspect(pkg, **kw),
                 lambda: ProgressiveSession(pkg, **kw),
                 lambda: ProgressiveSession(_bytes_source(pkg), **kw)):
        with pytest.raises(TrustError, match=match):
            call()
    assert not out.exists()
    assert _tree(pkg) == before
    assert _state() == {}


# ---------------------------------------------------------------- pins


def test_wrong_pin_is_refused_before_anything_is_read(pkgs, tmp_path):
    pkg = pkgs["v2"]
    wrong = "sha256:" + "0" * 64
    _refused_locally(pkg, tmp_path, "does not match the pinned sha256:0000", expect=wrong)
    # the right pin passes everywhere, and a session records the version it accepted
    pin = _pin(pkg)
    assert api.verify(pkg, expect=pin)["manifest_sha256"] == pin[7:]
    with ProgressiveSession(pkg, expect=pin) as s:
        assert s.stage == 0
    assert _state()["mlp"]["version"] == 2


def test_pin_is_checked_before_parsing(pkgs, tmp_path):
    """A manifest that is not even JSON is refused by its pin (TrustError), not parsed."""
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    pin = _pin(pkg)
    (pkg / "manifest.json").write_bytes(b"\x00not json" * 10)
    with pytest.raises(TrustError, match="does not match the pinned"):
        ProgressiveSession(pkg, expect=pin)
    with pytest.raises(TrustError, match="does not match the pinned"):
        api.verify(pkg, expect=pin)


@pytest.mark.parametrize("bad", ["0" * 64, "sha256:abc", "md5:" + "0" * 64, 42])
def test_malformed_pin_is_a_one_line_error(pkgs, bad):
    with pytest.raises(P2UError, match="a pin is 'sha256:'"):
        ProgressiveSession(pkgs["v2"], expect=bad)
    # checked before any request: an unreachable URL does not matter
    with pytest.raises(P2UError, match="a pin is 'sha256:'"):
        HttpSource("http://127.0.0.1:9/pkg/", expect=bad)


# ---------------------------------------------------------------- signatures


def test_signed_package_is_accepted_everywhere(pkgs, keys, tmp_path):
    pkg, pub = pkgs["v2"], keys["a"][1]
    assert api.verify(pkg, trust=pub)["signed"]
    pub_file = Path(str(keys["a"][0]) + ".pub")  # a .pub file works as well as the string
    assert api.restore(pkg, tmp_path / "m.onnx", trust=pub_file).exists()
    assert api.inspect(pkg, trust=[keys["b"][1], pub])["version"] == 2  # one trusted key is enough
    with ProgressiveSession(_bytes_source(pkg), trust=pub, expect=_pin(pkg)) as s:
        assert s.manifest["version"] == 2


def test_tampered_manifest_with_its_old_signature(pkgs, keys, tmp_path):
    """Change the manifest (a table entry) and keep the valid signature of the original."""
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    m = json.loads((pkg / "manifest.json").read_text())
    m["stages"][1]["max_abs_error"] = 0.0
    (pkg / "manifest.json").write_text(json.dumps(m, indent=1))
    _refused_locally(pkg, tmp_path, "signature is for another manifest", trust=keys["a"][1])


def test_signature_swapped_from_another_release(pkgs, keys, tmp_path):
    """Mix-and-match: v2's manifest with v1's (valid) signature file."""
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    shutil.copy(pkgs["v1"] / SIGNATURE_NAME, pkg / SIGNATURE_NAME)
    _refused_locally(pkg, tmp_path, "signature is for another manifest", trust=keys["a"][1])


def test_signature_by_another_key(pkgs, keys, tmp_path):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    sign_package(pkg, keys["b"][0], "30d")
    _refused_locally(pkg, tmp_path, "which is not a trusted key", trust=keys["a"][1])


def test_forged_signature_under_a_trusted_keyid(pkgs, keys, tmp_path):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    env = json.loads((pkg / SIGNATURE_NAME).read_text())
    env["signatures"][0]["sig"] = "ab" * 64
    (pkg / SIGNATURE_NAME).write_text(json.dumps(env))
    _refused_locally(pkg, tmp_path, "bad signature by trusted key", trust=keys["a"][1])
    # the signed part altered (a later expiry) under the original signature: also bad
    env = json.loads((pkgs["v2"] / SIGNATURE_NAME).read_text())
    env["signed"]["expires"] = "2999-01-01T00:00:00Z"
    (pkg / SIGNATURE_NAME).write_text(json.dumps(env))
    _refused_locally(pkg, tmp_path, "bad signature by trusted key", trust=keys["a"][1])


def test_unsigned_package_with_trust(pkgs, keys, tmp_path):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    (pkg / SIGNATURE_NAME).unlink()
    _refused_locally(pkg, tmp_path, "the package is not signed", trust=keys["a"][1])


@pytest.mark.parametrize("garbage", [b"", b"[" * 30000 + b"]" * 30000, b"{}",
                                     b'{"signed": {}, "signatures": []}', b"x" * 70000])
def test_malformed_signature_file(pkgs, keys, tmp_path, garbage):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    (pkg / SIGNATURE_NAME).write_bytes(garbage)
    with pytest.raises(TrustError, match="signature file"):
        api.verify(pkg, trust=keys["a"][1])


def test_signature_file_that_is_a_symlink_or_fifo(pkgs, keys, tmp_path):
    """A signature "file" leading outside the package, or a FIFO that would block a reader."""
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    outside = tmp_path / "elsewhere.sig"
    shutil.move(pkg / SIGNATURE_NAME, outside)
    (pkg / SIGNATURE_NAME).symlink_to(outside)
    with pytest.raises(TrustError, match="symbolic link"):
        api.verify(pkg, trust=keys["a"][1])
    (pkg / SIGNATURE_NAME).unlink()
    os.mkfifo(pkg / SIGNATURE_NAME)
    with pytest.raises(TrustError, match="not a regular file"):
        ProgressiveSession(pkg, trust=keys["a"][1])


def test_expired_signature_is_refused(pkgs, keys, tmp_path):
    """Freeze: an old release whose signature expired, replayed. No option accepts it."""
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    signed = dict(_signed_of(pkgs["v2"]), expires="2020-01-01T00:00:00Z")
    _sign_raw(pkg, keys["a"][0], signed)
    _refused_locally(pkg, tmp_path, "signature expired at 2020-01-01T00:00:00Z .*freeze",
                     trust=keys["a"][1])
    with pytest.raises(TrustError, match="expired"):
        ProgressiveSession(pkg, trust=keys["a"][1], allow_rollback=True)
    # signing it again refreshes it
    sign_package(pkg, keys["a"][0], "1d")
    assert api.verify(pkg, trust=keys["a"][1])["stages"] == 2


def test_signed_name_or_version_must_match_the_manifest(pkgs, keys, tmp_path):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    _sign_raw(pkg, keys["a"][0], dict(_signed_of(pkgs["v2"]), version=99))
    with pytest.raises(TrustError, match="signature is for model 'mlp' version 99"):
        api.verify(pkg, trust=keys["a"][1])


def test_sign_refuses_a_past_expiry_and_a_public_key(pkgs, keys, tmp_path):
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    before = _tree(pkg)
    with pytest.raises(P2UError, match="already past"):
        sign_package(pkg, keys["a"][0], dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc))
    with pytest.raises(P2UError, match="this is the public key"):
        sign_package(pkg, Path(str(keys["a"][0]) + ".pub"))
    assert _tree(pkg) == before


# ---------------------------------------------------------------- rollback


def test_rollback_from_a_folder_and_from_bytes(pkgs, tmp_path):
    with ProgressiveSession(pkgs["v2"]):
        pass
    assert _state()["mlp"]["version"] == 2
    for source in (lambda: pkgs["v1"], lambda: _bytes_source(pkgs["v1"], signed=False)):
        with pytest.raises(TrustError, match=r"version 1 is older than version 2 .*"
                                             r"allow_rollback=True"):
            ProgressiveSession(source())
        assert _state()["mlp"]["version"] == 2
    # same version, other content: refused when the manifest is authenticated (pinned) ...
    with pytest.raises(TrustError, match="same version, other content"):
        ProgressiveSession(pkgs["v2x"], expect=_pin(pkgs["v2x"]))
    # ... and taken as a new build when it is not (anybody can write any version there)
    with ProgressiveSession(pkgs["v2x"]):
        pass
    assert _state()["mlp"]["version"] == 2
    # told otherwise: accepted, and remembered as the current version
    with ProgressiveSession(pkgs["v1"], allow_rollback=True) as s:
        assert s.run(None, {"x": np.ones((1, 64), np.float32)})[0].shape == (1, 32)
    assert _state()["mlp"]["version"] == 1
    with ProgressiveSession(pkgs["v2"]):  # a higher version is always welcome
        pass
    assert _state()["mlp"]["version"] == 2


def test_version_is_recorded_only_after_every_check(pkgs, keys, tmp_path):
    """A refused v3 (bad signature) must not raise the remembered version."""
    pkg = _copy(pkgs["v2"], tmp_path / "p")
    m = json.loads((pkg / "manifest.json").read_text())
    m["version"] = 3
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TrustError):
        ProgressiveSession(pkg, trust=keys["a"][1])
    assert _state() == {}


def test_local_commands_do_not_touch_the_version_state(pkgs, tmp_path):
    with ProgressiveSession(pkgs["v2"]):
        pass
    state = VersionState().path.read_bytes()
    assert api.verify(pkgs["v1"])["version"] == 1  # an older package can still be checked
    api.restore(pkgs["v1"], tmp_path / "old.onnx", stage=0)
    assert VersionState().path.read_bytes() == state


def test_unwritable_state_is_a_warning(pkgs, tmp_path, monkeypatch):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        blocker = tmp_path / "file"  # root ignores permissions: a file where the folder goes
        blocker.write_text("")
        monkeypatch.setenv("P2U_STATE_DIR", str(blocker / "state"))
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        monkeypatch.setenv("P2U_STATE_DIR", str(ro / "state"))
    with pytest.warns(RuntimeWarning, match="cannot record version 2 of model 'mlp'"):
        with ProgressiveSession(pkgs["v2"]):
            pass


# ---------------------------------------------------------------- over HTTP


@pytest.fixture
def site(tmp_path):
    """A static host whose ``pkg/`` we can swap for another release."""
    root = tmp_path / "site"
    root.mkdir()
    with PackageServer(root) as srv:
        yield root, srv.url + "pkg/"


def _publish(root: Path, pkg: Path) -> None:
    shutil.rmtree(root / "pkg", ignore_errors=True)
    shutil.copytree(pkg, root / "pkg")


def test_http_refused_manifest_is_never_cached(site, pkgs, keys, tmp_path):
    root, url = site
    _publish(root, pkgs["v2"])
    cache = tmp_path / "cache"
    for kw, match in (({"expect": "sha256:" + "1" * 64}, "does not match the pinned"),
                      ({"trust": keys["b"][1]}, "not a trusted key")):
        with pytest.raises(TrustError, match=match):
            HttpSource(url, cache, retry=FAST, **kw)
        with pytest.raises(TrustError, match=match):
            ProgressiveSession(url, workdir=tmp_path / "w", **kw)
        with pytest.raises(TrustError, match=match):
            fetch(url, tmp_path / "mirror", retry=FAST, **kw)
        for d in (cache, tmp_path / "w" / "http", tmp_path / "mirror"):
            assert not (d / "manifest.json").exists() and not (d / SIGNATURE_NAME).exists()
            assert not [p for p in d.rglob("*")  # p2u's own .p2u/ folder aside
                        if not any(part.startswith(".") for part in p.relative_to(d).parts)] \
                if d.exists() else True
        assert _state() == {}
    (root / "pkg" / SIGNATURE_NAME).unlink()
    with pytest.raises(TrustError, match="not signed"):
        HttpSource(url, cache, retry=FAST, trust=keys["a"][1])
    assert not (cache / "manifest.json").exists()


def test_http_signed_session_and_mirror(site, pkgs, keys, tmp_path):
    root, url = site
    _publish(root, pkgs["v2"])
    pub = keys["a"][1]
    x = {"x": np.ones((2, 64), np.float32)}
    with ProgressiveSession(url, trust=pub, expect=_pin(pkgs["v2"])) as s:
        s.upgrade(background=False)
        y = s.run(None, x)[0]
    with ProgressiveSession(pkgs["v2"]) as s:
        s.upgrade(background=False)
        np.testing.assert_array_equal(s.run(None, x)[0], y)
    assert _state()["mlp"]["version"] == 2
    mirror = fetch(url, tmp_path / "mirror", retry=FAST, trust=pub)
    assert (mirror / SIGNATURE_NAME).read_bytes() == (pkgs["v2"] / SIGNATURE_NAME).read_bytes()
    assert api.verify(mirror, trust=pub)["signed"]  # the mirror is a signed package too


def test_http_offline_restart_checks_the_cached_signature(pkgs, keys, tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    _publish(root, pkgs["v2"])
    cache = tmp_path / "cache"
    with PackageServer(root) as srv:
        url = srv.url + "pkg/"
        HttpSource(url, cache, retry=FAST, trust=keys["a"][1]).download()
    assert (cache / SIGNATURE_NAME).exists()
    src = HttpSource(url, cache, retry=FAST, trust=keys["a"][1])  # server gone: offline
    assert src.offline and src.manifest["version"] == 2
    src.close()
    env = json.loads((cache / SIGNATURE_NAME).read_text())
    env["signatures"][0]["sig"] = "00" * 64
    (cache / SIGNATURE_NAME).write_text(json.dumps(env))
    with pytest.raises(TrustError, match="bad signature"):
        HttpSource(url, cache, retry=FAST, trust=keys["a"][1])


def test_http_rollback_keeps_the_newer_cache(site, pkgs, keys, tmp_path, monkeypatch):
    """The server now offers v1 where the cache holds v2: refused, and every cached file of v2
    stays, whether the version state remembers v2 or was lost."""
    root, url = site
    _publish(root, pkgs["v2"])
    mirror = fetch(url, tmp_path / "mirror", retry=FAST)
    cache = tmp_path / "cache"
    HttpSource(url, cache, retry=FAST).download()
    kept = {d: _tree(d) for d in (mirror, cache)}
    _publish(root, pkgs["v1"])
    with pytest.raises(TrustError, match="version 1 is older than version 2"):
        fetch(url, mirror, retry=FAST)
    with pytest.raises(TrustError, match="version 1 is older than version 2"):
        ProgressiveSession(HttpSource(url, cache, retry=FAST))
    monkeypatch.setenv("P2U_STATE_DIR", str(tmp_path / "fresh-state"))  # state lost
    with pytest.raises(TrustError, match="older than version 2 in the cache"):
        HttpSource(url, cache, retry=FAST)
    assert {d: _tree(d) for d in (mirror, cache)} == kept
    # told otherwise, the older release replaces the mirror's files, its signature included
    fetch(url, mirror, retry=FAST, allow_rollback=True)
    assert json.loads((mirror / "manifest.json").read_text())["version"] == 1
    assert (mirror / SIGNATURE_NAME).read_bytes() == (pkgs["v1"] / SIGNATURE_NAME).read_bytes()
    assert api.verify(mirror, trust=keys["a"][1])["version"] == 1


def test_session_checks_a_source_built_by_the_caller(site, pkgs, keys, tmp_path):
    """An HttpSource or BytesSource made without trust=, given to a session that asks for it:
    the session checks the source's manifest bytes and signature itself."""
    root, url = site
    _publish(root, pkgs["v2"])
    with HttpSource(url, tmp_path / "c", retry=FAST) as src:
        with pytest.raises(TrustError, match="not a trusted key"):
            ProgressiveSession(src, trust=keys["b"][1])
        with ProgressiveSession(src, trust=keys["a"][1], expect=_pin(pkgs["v2"])) as s:
            assert s.stage == 0
    with pytest.raises(TrustError, match="not signed"):
        ProgressiveSession(_bytes_source(pkgs["v2"], signed=False), trust=keys["a"][1])
    parsed = BytesSource(json.loads((pkgs["v2"] / "manifest.json").read_text()),
                         (pkgs["v2"] / "stage-0.p2u").read_bytes())
    with pytest.raises(P2UError, match="holds no manifest bytes"):
        ProgressiveSession(parsed, expect=_pin(pkgs["v2"]))


def test_http_same_version_other_content(site, pkgs, tmp_path):
    root, url = site
    _publish(root, pkgs["v2"])
    with ProgressiveSession(url):
        pass
    _publish(root, pkgs["v2x"])
    cache = tmp_path / "cache"
    with pytest.raises(TrustError, match="same version, other content"):
        HttpSource(url, cache, retry=FAST, expect=_pin(pkgs["v2x"]))
    assert not (cache / "manifest.json").exists()


# ---------------------------------------------------------------- the command line


def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(r, *needles: str) -> None:
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], r.output


def test_cli_keygen_sign_verify(work, pkgs, tmp_path):
    key = tmp_path / "k"
    r = _cli("keygen", "-o", key)
    assert r.exit_code == 0, r.output
    assert (key.stat().st_mode & 0o777) == 0o600
    pub = Path(str(key) + ".pub").read_text()
    assert pub.startswith("ed25519:") and pub.count("\n") == 1 and pub.strip() in r.output
    _one_line_error(_cli("keygen", "-o", key), "already exists (use --force)")
    assert Path(str(key) + ".pub").read_text() == pub
    assert _cli("keygen", "-o", key, "--force").exit_code == 0
    assert Path(str(key) + ".pub").read_text() != pub
    pub = Path(str(key) + ".pub")

    pkg = _copy(pkgs["v2"], tmp_path / "p")
    (pkg / SIGNATURE_NAME).unlink()
    _one_line_error(_cli("verify", pkg, "--trust", pub), "not signed", "--trust")
    r = _cli("sign", pkg, "--key", key, "--expires", "30d")
    assert r.exit_code == 0 and "version 2" in r.output, r.output
    r = _cli("verify", pkg, "--trust", pub, "--expect", _pin(pkg))
    assert r.exit_code == 0 and "signature valid" in r.output and _pin(pkg) in r.output, r.output
    _one_line_error(_cli("verify", pkg, "--expect", "sha256:" + "f" * 64),
                    "does not match the pinned")
    _one_line_error(_cli("verify", pkg, "--expect", "deadbeef"), "--expect: a pin is")
    _one_line_error(_cli("verify", pkg, "--trust", key), "a private key")
    _one_line_error(_cli("verify", pkg, "--trust", "ed25519:AAAA"), "not a valid Ed25519")
    _one_line_error(_cli("sign", pkg, "--key", pub), "this is the public key")
    _one_line_error(_cli("sign", pkg, "--key", key, "--expires", "soon"), "not a duration")
    out = tmp_path / "m.onnx"
    _one_line_error(_cli("restore", pkg, "-o", out, "--trust", pkgs["v2"].parent / "key-b.pub"),
                    "not a trusted key")
    assert not out.exists()
    assert _cli("restore", pkg, "-o", out, "--trust", pub).exit_code == 0 and out.exists()


def test_cli_run_and_fetch(site, pkgs, keys, tmp_path):
    root, url = site
    _publish(root, pkgs["v2"])
    pub = str(keys["a"][0]) + ".pub"
    # a URL stays a URL (click.Path would collapse '//')
    r = _cli("run", url, "--trust", pub, "--stage", "0")
    assert r.exit_code == 0 and "stage 0 active" in r.output, r.output
    _one_line_error(_cli("run", pkgs["v1"], "-s", "0"), "older than version 2",
                    "--allow-rollback")
    r = _cli("run", pkgs["v1"], "-s", "0", "--allow-rollback")
    assert r.exit_code == 0, r.output
    mirror = tmp_path / "mirror"
    _one_line_error(_cli("fetch", url, "-o", mirror, "-q", "--expect", "sha256:" + "2" * 64),
                    "does not match the pinned")
    assert not (mirror / "manifest.json").exists()
    r = _cli("fetch", url, "-o", mirror, "-q", "--trust", pub, "--expect", _pin(pkgs["v2"]))
    assert r.exit_code == 0 and (mirror / SIGNATURE_NAME).exists(), r.output


def test_cli_run_passes_the_strategy(pkgs, monkeypatch):
    seen = []
    real = ProgressiveSession.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("strategy"))
        real(self, *a, **kw)

    monkeypatch.setattr(ProgressiveSession, "__init__", spy)
    r = _cli("run", pkgs["v2"], "--strategy", "inplace", "-s", "1")
    assert r.exit_code == 0 and seen == ["inplace"], r.output


def test_cli_run_keeps_onnxruntime_log_lines_off_stderr(work, tmp_path):
    """A package whose graph makes onnxruntime warn (an initializer no node uses): `p2u run`
    prints its table and nothing from onnxruntime on stderr."""
    m = mlp()
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(4, np.float32), "unused"))
    onnx.save(m, str(tmp_path / "m.onnx"))
    pkg = p2u_onnx.encode(tmp_path / "m.onnx", tmp_path / "m.p2u", "4,8", probe=False).path
    base = onnx.load(str(pkg / "base.onnx"), load_external_data=False)
    assert "unused" in {t.name for t in base.graph.initializer}  # onnxruntime will warn
    code = "from p2u_onnx.cli import main; main()"
    env = dict(os.environ, PYTHONPATH=str(Path(p2u_onnx.__file__).parent.parent))
    plain = subprocess.run([sys.executable, "-c",
                            "import onnxruntime as o, sys; o.InferenceSession(sys.argv[1])",
                            str(pkg / "base.onnx")], capture_output=True, text=True, env=env)
    assert "unused" in plain.stderr  # what leaked before
    r = subprocess.run([sys.executable, "-c", code, "run", str(pkg)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and "stage 1 active" in r.stdout, r.stderr
    assert r.stderr == ""


def test_cli_encode_name_and_version(work, tmp_path, monkeypatch):
    out = tmp_path / "n.p2u"
    r = _cli("encode", work / "mlp.onnx", "-o", out, "--stages", "4,8", "--no-probe",
             "--fixed-bits", "--name", "digits-net", "--version", "7", "-q")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert (m["name"], m["version"]) == ("digits-net", 7)
    _one_line_error(_cli("encode", work / "mlp.onnx", "-o", out), "already exists (use --force)")
    with pytest.raises(P2UError, match=r"already exists \(use overwrite=True\)"):
        p2u_onnx.encode(work / "mlp.onnx", out)
    # default: the file's stem, and the encode time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = p2u_onnx.encode(work / "mlp.onnx", tmp_path / "d.p2u", "4,8", probe=False).manifest
    assert d["name"] == "mlp" and abs(d["version"] - dt.datetime.now().timestamp()) < 600
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # reproducible builds
    r = _cli("encode", work / "mlp.onnx", "-o", tmp_path / "e.p2u", "--stages", "4,8",
             "--no-probe", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e.p2u" / "manifest.json").read_text())["version"] == 1700000000
    _one_line_error(_cli("encode", work / "mlp.onnx", "-o", tmp_path / "f.p2u", "--name", "a\tb"),
                    "printable characters")
