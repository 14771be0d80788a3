"""Smoke test of the device-only install (p2u-onnx-runtime): a live upgrade from a folder and
from a URL, bit-exact against the original model, with no onnx, click or tqdm anywhere.

Two steps, in two environments (``.ci/run`` does both)::

    # with the full p2u-onnx: encode the bundled digits CNN, record the original's outputs
    python scripts/device_smoke.py prepare /tmp/smoke
    p2u serve /tmp/smoke/digits.p2u --port 0 &        # from the full install too

    # in a venv holding p2u-onnx-runtime[http] alone
    python scripts/device_smoke.py check /tmp/smoke --url http://127.0.0.1:PORT/ --installed

``check`` asserts (``--installed``) that the environment holds the distribution
p2u-onnx-runtime and none of p2u-onnx, onnx, click, tqdm; that an encoder-side name fails in
one line that says to install p2u-onnx; that every strategy (swap, inplace, and auto where
this build has it) upgrades a session from the folder to the last stage with outputs
identical to the original's; that a session from the URL (with a work folder) and a
``fetch`` of the URL do the same; and that onnx, click and tqdm were never imported.
``--simulate-device`` makes onnx, click and tqdm unimportable first (tests/test_device.py runs
the check so over a copy of the device modules).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

FORBIDDEN = ("onnx", "click", "tqdm")
ROOT = Path(__file__).resolve().parent.parent


def prepare(out: Path) -> None:
    """Encode the digits CNN into ``out/digits.p2u``; ``out/ref.npz``: inputs and the original
    model's outputs (full install)."""
    import numpy as np
    import onnxruntime as ort

    import p2u_onnx

    model = ROOT / "models" / "digits_cnn.onnx"
    x = np.load(ROOT / "models" / "digits_test.npz")["x"][:32]
    out.mkdir(parents=True, exist_ok=True)
    p2u_onnx.encode(model, out / "digits.p2u", "4,8,lossless", overwrite=True)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    # inplace runs its float session with optimizations and prepacking off: its exact outputs
    # are the original's under the same options (fused kernels round differently)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.disable_prepacking", "1")
    plain = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    np.savez(out / "ref.npz", x=x, swap=sess.run(None, {name: x})[0],
             inplace=plain.run(None, {name: x})[0], name=np.array(name))
    print(f"prepared {out / 'digits.p2u'} and {out / 'ref.npz'}")


def _check_installed() -> None:
    import importlib.metadata as md
    import importlib.util

    def has(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    version = has("p2u-onnx-runtime")
    assert version, "the distribution p2u-onnx-runtime is not installed"
    assert has("p2u-onnx") is None, "p2u-onnx is installed beside p2u-onnx-runtime"
    for name in FORBIDDEN:
        assert has(name) is None, f"the distribution {name} is installed on the device"
        assert importlib.util.find_spec(name) is None, f"{name} is importable on the device"
    import p2u_onnx

    assert ROOT not in Path(p2u_onnx.__file__).resolve().parents, \
        f"p2u_onnx comes from the source tree ({p2u_onnx.__file__}), not the install"
    print(f"installed: p2u-onnx-runtime {version} (p2u_onnx from {Path(p2u_onnx.__file__).parent}); "
          f"requires {md.requires('p2u-onnx-runtime')}; no p2u-onnx, onnx, click, tqdm")


def _check_refusal() -> None:
    try:
        from p2u_onnx import encode  # noqa: F401
    except ImportError as e:
        text = str(e)
        assert "\n" not in text and "pip install p2u-onnx" in text, text
        print(f"encoder-side name refused: {type(e).__name__}: {text}")
    else:
        raise AssertionError("p2u_onnx.encode imported on a device-only install")


def _upgrade(source: object, ref: dict, label: str, **kw: object) -> None:
    import numpy as np

    from p2u_onnx import ProgressiveSession

    t0 = time.perf_counter()
    with ProgressiveSession(source, **kw) as s:
        feed = {str(ref["name"]): ref["x"]}
        first = s.run(None, feed)[0]
        t_first = time.perf_counter() - t0
        want = ref[s.strategy]  # the original's outputs under the options this strategy uses
        assert s.stage == 0 and first.shape == want.shape
        s.upgrade().result()
        y = s.run(None, feed)[0]
        assert s.stage == s.stages - 1, (label, s.stage)
        assert np.array_equal(y, want), f"{label}: last stage differs from the original"
        print(f"{label}: strategy {s.strategy}, first answer {t_first * 1e3:.0f} ms, stage "
              f"{s.stage} of {s.stages - 1} in {time.perf_counter() - t0:.2f} s, bit-exact")


def check(folder: Path, url: str | None, installed: bool) -> None:
    """The device-side checks (see the module docs)."""
    import numpy as np

    if installed:
        _check_installed()
    _check_refusal()
    ref = dict(np.load(folder / "ref.npz"))
    pkg = folder / "digits.p2u"
    for strategy in ("swap", "inplace", "auto"):
        try:
            _upgrade(pkg, ref, f"folder, {strategy}", strategy=strategy)
        except ValueError as e:
            if strategy != "auto" or "strategy" not in str(e):
                raise
            print(f"folder, auto: not in this build ({e})")
    if url:
        from p2u_onnx.transport import fetch

        with tempfile.TemporaryDirectory() as tmp:
            _upgrade(url, ref, "url", workdir=Path(tmp) / "work")
            fetch(url, Path(tmp) / "mirror")
            _upgrade(Path(tmp) / "mirror", ref, "fetched mirror")
    seen = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN
                  and sys.modules[m] is not None)
    assert not seen, f"imported on the device: {seen}"
    print("device smoke: ok")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="encode and record references (full install)")
    pp.add_argument("folder", type=Path)
    pc = sub.add_parser("check", help="live upgrades on the device install")
    pc.add_argument("folder", type=Path)
    pc.add_argument("--url", help="the package served over HTTP (p2u serve FOLDER/digits.p2u)")
    pc.add_argument("--installed", action="store_true",
                    help="also check the installed distributions (a real device venv)")
    pc.add_argument("--simulate-device", action="store_true",
                    help="make onnx, click and tqdm unimportable before anything else")
    a = p.parse_args()
    if a.cmd == "prepare":
        prepare(a.folder)
    else:
        if a.simulate_device:
            sys.modules.update(dict.fromkeys(FORBIDDEN))
        check(a.folder, a.url, a.installed)


if __name__ == "__main__":
    main()
