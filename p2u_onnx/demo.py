"""``p2u demo``: encode the bundled digits CNN and watch it upgrade stage by stage."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .api import inspect, load_stage_model
from .encoder import encode


def bundled_model() -> tuple[Path, Path]:
    data = resources.files("p2u_onnx") / "data"
    return Path(str(data / "digits_cnn.onnx")), Path(str(data / "digits_test.npz"))


def _accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float(np.mean(logits.argmax(1) == y)), logits


def run_demo(stages: str = "4,8,lossless", echo: Callable[[str], None] = print) -> list[dict]:
    """Encode, then restore each stage and score it on the held-out digits; returns the rows."""
    model_path, data_path = bundled_model()
    data = np.load(data_path)
    x, y = data["x"], data["y"]
    ref_acc, ref_logits = _accuracy(model_path.read_bytes(), x, y)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "digits.p2u"
        t0 = time.perf_counter()
        encode(model_path, pkg, stages)
        echo(f"encoded {model_path.name} with plan {stages} in {time.perf_counter() - t0:.2f} s")
        info = inspect(pkg)
        echo(f"original: {info['source']['weight_bytes']} bytes of weights, "
             f"test accuracy {ref_acc:.2%} on {len(y)} digits")
        echo(f"{'stage':>5} {'bits':>9} {'sent':>9} {'of fp32':>8} {'accuracy':>9} "
             f"{'max |dlogit|':>13} {'max w err':>10}")
        rows = []
        for r in info["stages"]:
            model = load_stage_model(pkg, r["stage"])
            acc, logits = _accuracy(model.SerializeToString(), x, y)
            diff = float(np.max(np.abs(logits - ref_logits)))
            rows.append({**r, "accuracy": acc, "max_logit_diff": diff})
            echo(f"{r['stage']:>5} {str(r['bits']):>9} {r['cumulative_bytes']:>9} "
                 f"{r['cumulative_share']:>8.1%} {acc:>9.2%} {diff:>13.3g} "
                 f"{r['max_abs_error']:>10.3g}")
        if rows and rows[-1]["bits"] == "lossless":
            exact = rows[-1]["max_logit_diff"] == 0.0
            echo("last stage: outputs identical to the original model" if exact
                 else "last stage: outputs differ from the original model")
    return rows
