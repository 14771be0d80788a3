"""The device-only distribution (p2u-onnx-runtime, runtime/): what it holds, and that it works
alone: live upgrades from a folder and a URL, bit-exact, with onnx, click and tqdm absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from p2u_onnx import _device

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "p2u_onnx"


def test_every_module_has_a_side():
    """Each module of p2u_onnx is in exactly one of DEVICE_MODULES and FULL_ONLY, so the device
    wheel never silently misses a module the runtime imports, nor ships one needing onnx."""
    modules = {p.stem for p in PKG.glob("*.py")}
    device, full = set(_device.DEVICE_MODULES), set(_device.FULL_ONLY)
    assert not device & full, f"on both sides: {sorted(device & full)}"
    assert modules - device - full == set(), \
        f"give these a side in p2u_onnx/_device.py: {sorted(modules - device - full)}"
    assert (device | full) - modules == set(), f"listed but absent: {sorted((device | full) - modules)}"


def test_runtime_setup_reads_the_same_list():
    """runtime/setup.py keeps exactly DEVICE_MODULES (read with ast) from the linked sources."""
    assert (ROOT / "runtime" / "p2u_onnx").resolve() == PKG.resolve()
    code = ("import sys; sys.path.insert(0, 'runtime'); sys.argv = ['setup.py', '--name']; "
            "import setup; print(sorted(setup.device_modules()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == str(sorted(_device.DEVICE_MODULES))


def _device_tree(dest: Path) -> Path:
    """What the p2u-onnx-runtime wheel installs: the device modules of p2u_onnx, nothing else."""
    site = dest / "site"
    (site / "p2u_onnx").mkdir(parents=True)
    for m in _device.DEVICE_MODULES:
        shutil.copy2(PKG / f"{m}.py", site / "p2u_onnx" / f"{m}.py")
    return site


def _run_device(site: Path, code_or_args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Python without site processing (no editable install of the full package in reach), the
    device tree first, then the environment's third-party packages."""
    paths = [str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    env["P2U_STATE_DIR"] = str(tmp_path / "state")
    return subprocess.run([sys.executable, "-S", *code_or_args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)


def test_device_tree_refuses_encoder_names_in_one_line(tmp_path):
    site = _device_tree(tmp_path)
    code = """
import sys
sys.modules.update(onnx=None, click=None, tqdm=None)
import p2u_onnx
assert p2u_onnx.__file__.startswith(sys.argv[1]), p2u_onnx.__file__
for stmt in ("from p2u_onnx import encode", "from p2u_onnx import restore",
             "import p2u_onnx.encoder", "import p2u_onnx.cli", "p2u_onnx.inspect"):
    try:
        exec(stmt)
    except ImportError as e:
        assert isinstance(e, p2u_onnx.P2UError), type(e)
        print(stmt, "->", e)
    else:
        raise SystemExit(stmt + " did not fail")
from p2u_onnx import ProgressiveSession
import p2u_onnx.transport, p2u_onnx.format, p2u_onnx.reconstruct
try:
    import p2u_onnx.nonexistent
except ModuleNotFoundError as e:
    assert not isinstance(e, p2u_onnx.P2UError)
print("modules", sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "click", "tqdm")
                        and sys.modules[m] is not None))
"""
    r = _run_device(site, ["-c", code, str(site)], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    refusals = [ln for ln in lines if "->" in ln]
    assert len(refusals) == 5
    for ln in refusals:
        assert "not part of p2u-onnx-runtime" in ln and "pip install p2u-onnx " in ln
    assert "from p2u_onnx import encode -> p2u_onnx.encoder is not part" in lines[0]
    assert lines[-1] == "modules []"


def test_device_tree_upgrades_live_from_a_folder_and_a_url(tmp_path):
    """scripts/device_smoke.py check over a copy of the device modules, onnx, click and tqdm
    unimportable: every strategy from the folder, a session from the URL and a fetch, each
    bit-exact with the original model at its last stage."""
    from p2u_onnx.devserver import PackageServer

    subprocess.run([sys.executable, str(ROOT / "scripts" / "device_smoke.py"), "prepare",
                    str(tmp_path / "smoke")], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    site = _device_tree(tmp_path)
    with PackageServer(tmp_path / "smoke" / "digits.p2u") as server:
        r = _run_device(site, [str(ROOT / "scripts" / "device_smoke.py"), "check",
                               str(tmp_path / "smoke"), "--url", server.url,
                               "--simulate-device"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for label in ("folder, swap", "folder, inplace", "url", "fetched mirror"):
        assert f"{label}: strategy" in out and "bit-exact" in out, out
    assert "encoder-side name refused: NotInstalledError" in out
    assert out.rstrip().endswith("device smoke: ok")


def test_installed_check_refuses_a_full_environment(tmp_path):
    """--installed is a real check: in this (full) environment it fails on p2u-onnx-runtime
    missing or p2u-onnx / onnx present."""
    (tmp_path / "smoke").mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_smoke.py"), "check",
                        str(tmp_path / "smoke"), "--installed"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0
    assert "AssertionError" in r.stderr and ("p2u-onnx-runtime" in r.stderr or "onnx" in r.stderr)


def test_runtime_wheel_holds_the_device_modules(tmp_path):
    """Building runtime/ gives a wheel of the device modules only, requiring numpy,
    onnxruntime and zstandard (httpx only as the http extra)."""
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(ROOT / "runtime")],
                       capture_output=True, text=True, timeout=300)
    for junk in (ROOT / "runtime" / "build", ROOT / "runtime" / "p2u_onnx_runtime.egg-info"):
        shutil.rmtree(junk, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("p2u_onnx_runtime-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    mods = {n.split("/")[1][:-3] for n in names if n.startswith("p2u_onnx/") and n.endswith(".py")}
    assert mods == set(_device.DEVICE_MODULES)
    requires = sorted(ln.split(": ", 1)[1] for ln in meta.splitlines()
                      if ln.startswith("Requires-Dist:"))
    plain = [q for q in requires if "extra ==" not in q]
    assert [q.split(">")[0] for q in plain] == ["numpy", "onnxruntime", "zstandard"], requires
    assert any(q.startswith("httpx") and 'extra == "http"' in q for q in requires), requires


# ---------------------------------------------------------------- manifest limit on a board


def test_manifest_limit_is_lowered_by_the_environment(tmp_path, monkeypatch):
    """P2U_MAX_MANIFEST lowers the bytes of manifest.json and the JSON values a reader takes
    (parsing a hostile manifest at the defaults takes hundreds of MB); a real package still
    loads under it, and a bad value is one line naming the variable."""
    import json

    import onnx

    import synth
    from p2u_onnx import P2UError, ProgressiveSession
    from p2u_onnx.errors import FormatError
    from p2u_onnx.format import MAX_JSON_ITEMS, MAX_MANIFEST, json_limits, load_manifest

    assert json_limits() == (MAX_MANIFEST, MAX_JSON_ITEMS)
    monkeypatch.setenv("P2U_MAX_MANIFEST", "64MiB")
    assert json_limits() == (MAX_MANIFEST, MAX_JSON_ITEMS)
    monkeypatch.setenv("P2U_MAX_MANIFEST", "1GiB")
    with pytest.raises(P2UError, match="P2U_MAX_MANIFEST='1GiB' is not a size"):
        json_limits()
    monkeypatch.setenv("P2U_MAX_MANIFEST", "4MiB")
    assert json_limits() == (4 << 20, (4 << 20) // 16)

    onnx.save(synth.mlp(), str(tmp_path / "m.onnx"))
    import p2u_onnx

    p2u_onnx.encode(tmp_path / "m.onnx", tmp_path / "m.p2u")
    with ProgressiveSession(tmp_path / "m.p2u") as s:  # a real manifest: a few KB
        assert s.stages == len(load_manifest(tmp_path / "m.p2u")["stages"])

    big = tmp_path / "big.p2u"
    big.mkdir()
    (big / "manifest.json").write_bytes(b" " * ((4 << 20) + 1) + b"{}")
    with pytest.raises(FormatError, match=r"larger than 4194304 bytes \(P2U_MAX_MANIFEST\)"):
        ProgressiveSession(big)
    # many values in few bytes: refused before json builds them
    (big / "manifest.json").write_bytes(json.dumps([{}] * 300_000).encode())
    with pytest.raises(FormatError, match=r"more than 262144 JSON values \(P2U_MAX_MANIFEST\)"):
        load_manifest(big)
    monkeypatch.delenv("P2U_MAX_MANIFEST")
    with pytest.raises(FormatError, match="not a p2u manifest"):  # parsed, then refused
        load_manifest(big)


def test_manifest_limit_over_http(tmp_path, monkeypatch):
    """The HTTP client stops reading a manifest past the lowered limit."""
    from p2u_onnx.devserver import PackageServer
    from p2u_onnx.errors import TransportError
    from p2u_onnx.transport import HttpSource

    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "manifest.json").write_bytes(b" " * (600 << 10) + b"{}")
    monkeypatch.setenv("P2U_MAX_MANIFEST", "512KiB")
    with PackageServer(pkg) as server:
        with pytest.raises(TransportError, match="larger than the 524288-byte limit"):
            HttpSource(server.url, tmp_path / "cache")


def test_a_session_from_a_folder_imports_no_encoder_dependency(tmp_path):
    """With onnx, click and tqdm installed and importable (this environment), a live upgrade
    from a folder still leaves them out of sys.modules: nothing on the device path even tries."""
    import onnx

    import synth

    onnx.save(synth.mlp(), str(tmp_path / "m.onnx"))
    import p2u_onnx

    p2u_onnx.encode(tmp_path / "m.onnx", tmp_path / "m.p2u")
    code = """
import sys
import numpy as np
from p2u_onnx import ProgressiveSession
with ProgressiveSession(sys.argv[1], strategy="inplace") as s:
    s.run(None, {"x": np.ones((2, 64), np.float32)})
    s.upgrade().result()
    assert s.stage == s.stages - 1
print(sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "click", "tqdm")
             or m in ("p2u_onnx.encoder", "p2u_onnx.api", "p2u_onnx.cli")))
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.p2u")], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                     "P2U_STATE_DIR": str(tmp_path / "st")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
