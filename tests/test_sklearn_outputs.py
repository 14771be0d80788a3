"""scikit-learn classifiers as skl2onnx exports them: class probabilities as a sequence of maps
(ZipMap), labels as int64, and weights that are the training data (k-nearest neighbours)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")

from skl2onnx import to_onnx  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

from p2u_onnx import BitBudget, ProgressiveSession, encode  # noqa: E402
from p2u_onnx.probe import output_values  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y


def _export(model, x, path):
    path.write_bytes(to_onnx(model, x[:1]).SerializeToString())
    return path


def test_output_values_reads_probability_maps():
    maps = [{0: 0.25, 2: 0.5, 1: 0.25}, {1: 1.0, 0: 0.0, 2: 0.0}]
    got = output_values(maps)
    assert got.dtype == np.float64 and got.shape == (2, 3)
    assert got.tolist() == [[0.25, 0.25, 0.5], [0.0, 1.0, 0.0]]  # classes in key order
    with pytest.raises(ValueError, match="different keys"):
        output_values([{0: 1.0}, {1: 1.0}])
    assert output_values(np.arange(3)).tolist() == [0, 1, 2]


def test_zipmap_classifier_is_calibrated_and_probed(digits, tmp_path):
    """The probabilities (seq(map)) are what calibration and the probe compare: before, such a
    model had 'no float output', so no quality estimate and no staleness check."""
    x, y = digits
    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=60, random_state=0).fit(x, y)
    src = _export(mlp, x, tmp_path / "mlp.onnx")
    res = encode(src, tmp_path / "mlp.p2u")
    m = res.manifest
    assert m["allocation"]["calibrated"] is True
    kinds = {o["output"]: o["metric"] for o in m["allocation"]["outputs"]}
    assert "output_probability" in kinds, kinds
    assert "probe" in m and m["probe"]["outputs"] == ["output_probability"]
    assert not any("no float output" in n for n in m.get("notes", [])), m.get("notes")
    with ProgressiveSession(tmp_path / "mlp.p2u") as s:
        first = s.run(None, {"X": x[:200]})
        s.upgrade().result()  # every stage passes the probe check on the maps
        last = s.run(None, {"X": x[:200]})
        assert s.stage == len(m["stages"]) - 1
    want = mlp.predict_proba(x[:200])
    np.testing.assert_allclose(output_values(last[1]), want, atol=1e-5)
    assert np.mean(first[0] == last[0]) >= 0.95  # the base's labels


def test_palette_weights_meet_a_strict_quality_target(digits, tmp_path):
    """A k-NN classifier's weights are its training set (integers 0..16): a palette, exact in
    the base. The quality estimate counts it as exact: --quality 0.99 (strict) used to fail
    with 'estimated base quality 0.9858 is below the target' for a base that is exact."""
    x, y = digits
    knn = KNeighborsClassifier(3).fit(x, y)
    src = _export(knn, x, tmp_path / "knn.onnx")
    res = encode(src, tmp_path / "knn.p2u", budget=BitBudget(quality=0.99, strict=True))
    m = res.manifest
    assert m["stages"][0]["max_abs_error"] == 0.0
    assert m["allocation"]["est_quality"] == 1.0
    with ProgressiveSession(tmp_path / "knn.p2u") as s:
        labels = s.run(None, {"X": x[:100]})[0]
    assert labels.tolist() == knn.predict(x[:100]).tolist()
