"""``p2u demo``: encode the bundled digits CNN and watch it upgrade stage by stage."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .api import inspect
from .encoder import encode


def bundled_model() -> tuple[Path, Path]:
    data = resources.files("p2u_onnx") / "data"
    return Path(str(data / "digits_cnn.onnx")), Path(str(data / "digits_test.npz"))


def _accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float(np.mean(logits.argmax(1) == y)), logits


def run_demo(stages: str = "4,8,lossless", echo: Callable[[str], None] = print) -> list[dict]:
    """Encode the bundled model, then serve it from the base and upgrade it live, scoring every
    stage on the held-out digits; returns one row per stage."""
    from .runtime import ProgressiveSession

    model_path, data_path = bundled_model()
    data = np.load(data_path)
    x, y = data["x"], data["y"]
    ref_acc, ref_logits = _accuracy(model_path.read_bytes(), x, y)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "digits.p2u"
        t0 = time.perf_counter()
        encode(model_path, pkg, stages)
        echo(f"encoded {model_path.name} ({info_line(pkg)}) with plan {stages} "
             f"in {time.perf_counter() - t0:.2f} s")
        echo(f"original model: test accuracy {ref_acc:.2%} on {len(y)} digits")
        echo(f"{'stage':>5} {'bits':>9} {'sent':>9} {'of fp32':>8} {'ready at':>9} "
             f"{'accuracy':>9} {'max |dlogit|':>13}")
        rows = []
        info = inspect(pkg)
        t0 = time.perf_counter()
        with ProgressiveSession(pkg) as sess:
            for r in info["stages"]:
                if r["stage"]:
                    sess.upgrade(until=r["stage"], background=False)
                ready = time.perf_counter() - t0
                logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
                acc = float(np.mean(logits.argmax(1) == y))
                diff = float(np.max(np.abs(logits - ref_logits)))
                rows.append({**r, "accuracy": acc, "max_logit_diff": diff, "ready_s": ready})
                echo(f"{r['stage']:>5} {str(r['bits']):>9} {r['cumulative_bytes']:>9} "
                     f"{r['cumulative_share']:>8.1%} {ready:>8.3f}s {acc:>9.2%} {diff:>13.3g}")
        if rows and rows[-1]["bits"] == "lossless":
            exact = rows[-1]["max_logit_diff"] == 0.0
            echo("last stage: outputs identical to the original model" if exact
                 else "last stage: outputs differ from the original model")
    return rows


def info_line(pkg: Path) -> str:
    src = inspect(pkg)["source"]
    return f"{src['weight_bytes']} bytes of weights, {src['coded_tensors']} tensors coded"
