"""Train a scikit-learn MLP on the digits data and convert it with skl2onnx.

Uses the same images, scaling and train/test split as
``scripts/make_digits_cnn.py`` (``realmodels.digits_split``, flattened to 64
features), and writes
``models/digits_mlp_sklearn.onnx``: input ``image`` float32 ``[batch, 64]``
(pixels in [0, 1]); outputs ``label`` int64 ``[batch]`` and
``probabilities`` float32 ``[batch, 10]`` (no ZipMap). Prints the test
accuracy measured with onnxruntime on the written file.

Usage: ``python scripts/make_sklearn_model.py [--out-dir DIR]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.neural_network import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realmodels

OPSET = {"": 17, "ai.onnx.ml": 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=realmodels.MODELS_DIR)
    args = parser.parse_args()

    t0 = time.perf_counter()
    x_tr, x_te, y_tr, y_te = realmodels.digits_split()
    x_tr = x_tr.reshape(len(x_tr), -1)
    x_te = x_te.reshape(len(x_te), -1)

    clf = MLPClassifier(
        hidden_layer_sizes=(128, 64),
        alpha=1e-3,
        max_iter=500,
        random_state=0,
    )
    clf.fit(x_tr, y_tr)
    n_params = sum(w.size for w in clf.coefs_) + sum(b.size for b in clf.intercepts_)
    sk_acc = float(clf.score(x_te, y_te))
    print(f"iterations: {clf.n_iter_}  parameters: {n_params}")

    onx = to_onnx(
        clf,
        initial_types=[("image", FloatTensorType([None, 64]))],
        target_opset=OPSET,
        options={id(clf): {"zipmap": False}},
    )
    onx.doc_string = "MLP (128, 64) for 8x8 digits; made by scripts/make_sklearn_model.py"
    onnx.checker.check_model(onx, full_check=True)
    out = args.out_dir / "digits_mlp_sklearn.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onx, str(out))

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    probs = sess.run(["probabilities"], {"image": x_te})[0]
    max_diff = float(np.max(np.abs(probs - clf.predict_proba(x_te))))
    if realmodels.DIGITS_TEST_PATH.exists():
        acc = realmodels.digits_accuracy(sess)
    else:
        acc = float(np.mean(probs.argmax(1) == y_te))
    print(f"onnx outputs: {names}")
    print(f"onnx ops: {sorted({n.op_type for n in onx.graph.node})}")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    print(f"sklearn vs onnxruntime max |probability diff|: {max_diff:.3e}")
    print(f"fp32 test accuracy (sklearn):     {sk_acc:.4f}")
    print(f"fp32 test accuracy (onnxruntime): {acc:.4f}")
    print(f"total time: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
