"""The base's quality as each output's task reads it (p2u_onnx.output_metrics): a scalar
regressor whose cosine looks fine while its error is large, a classifier, decisions, and no
warning on a model that is fine."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import p2u_onnx
from p2u_onnx import BitBudget, output_metrics as om

import synth

ort.set_default_logger_severity(3)
DATA = Path(p2u_onnx.__file__).resolve().parent / "data"
X = np.random.default_rng(5).standard_normal((512, 64)).astype(np.float32)  # held-out inputs


def run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def share(res):
    return res.stage_bytes[0] / res.manifest["source"]["fp32_equivalent_bytes"]


def encode_twin(model, tmp_path, label, **kw):
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    res = p2u_onnx.encode(src, tmp_path / f"{label}.p2u", budget=BitBudget(**kw), probe=False)
    return src, res, run(tmp_path / f"{label}.p2u" / "base.onnx", {"x": X})


def test_estimates_follow_gaussian_errors():
    """The estimate maps an error to the quality a random error of that size gives."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2000, 10)) * 2
    noise = rng.standard_normal(ref.shape) * 0.3
    got = ref + noise
    for kind, values, e in (
            ("classes", ref, float(np.sum(noise ** 2))),
            ("regression", ref[:, :1], float(np.sum(noise[:, :1] ** 2)))):
        c = om._check("y", 0, None, kind, [values])
        part = got if kind == "classes" else got[:, :1]
        est, real = c.quality(e / c.den), c.measure([values], [part])
        assert abs(est - real) < 0.02, (kind, est, real)
        assert 0.5 < real < 0.99  # a real effect, not a saturated one
    probs = 1 / (1 + np.exp(-ref[:, 0]))
    c = om._check("p", 0, None, "decisions", [probs])
    pn = probs + rng.standard_normal(probs.shape) * 0.02
    est = c.quality(float(np.sum((pn - probs) ** 2)) / c.den)
    assert abs(est - c.measure([probs], [pn])) < 0.01
    # error_at inverts quality
    assert c.quality(om.error_at(c, 0.985)) == pytest.approx(0.985, abs=1e-6)


def test_scalar_regressor_gets_the_bits_its_spread_needs(tmp_path):
    """One score per input around 3.0, varying by a few hundredths: plain 4-bit keeps the
    batch cosine at 0.99999 while a quarter of its scores leave 0.2 of the spread; the base is
    now read against the spread and gets the bits for it."""
    model = synth.regressor()
    src, res, got = encode_twin(model, tmp_path, "default")
    _, plain, got_plain = encode_twin(model, tmp_path, "plain", adaptive=False)
    ref = run(src, {"x": X})
    spread = float(ref.std())

    def within(g):
        return float(np.mean(np.abs(g - ref) <= 0.2 * spread))

    def batch_cosine(g):
        return float(np.sum(g * ref) / np.linalg.norm(g) / np.linalg.norm(ref))

    assert batch_cosine(got_plain) > 0.99999  # what the old estimate saw
    assert within(got_plain) < 0.85, within(got_plain)  # measured 0.748
    [out] = res.manifest["allocation"]["outputs"]
    assert out["kind"] == "regression" and out["output"] == "y"
    assert within(got) >= 0.97, within(got)  # measured 1.000
    assert share(res) <= 0.21 and share(res) > share(plain)
    # where the cap does not allow it, a warning names the output and its metric
    _, capped, got_capped = encode_twin(model, tmp_path, "capped", cap=0.12)
    assert within(got_capped) < 0.97
    assert any("below the target" in w and "share within 0.2 of its spread of y" in w
               for w in capped.warnings), capped.warnings


def test_classifier_estimate_matches_held_out_agreement(tmp_path):
    """A Softmax classifier with many close rows: the estimate (from the margins of 64+
    synthesized rows) is within 0.03 of the top-1 agreement on 512 held-out inputs, and the
    base buys what plain 4-bit lacks, up to the cap, with a warning when it stays below."""
    model = synth.classifier()
    src, res, got = encode_twin(model, tmp_path, "default")
    _, _, got_plain = encode_twin(model, tmp_path, "plain", adaptive=False)
    ref = run(src, {"x": X})
    agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
    plain = float(np.mean(got_plain.argmax(1) == ref.argmax(1)))
    [out] = res.manifest["allocation"]["outputs"]
    assert out["kind"] == "classes" and out["values"] >= 640  # 64 rows of 10 scores
    assert abs(out["est"] - agree) < 0.03, (out, agree)  # measured 0.982 vs 0.971
    assert agree > plain + 0.05, (agree, plain)  # measured 0.971 vs 0.857
    assert share(res) <= 0.21
    missed = out["est"] < out["target"]
    assert missed == any("top-1 agreement of p" in w for w in res.warnings), res.warnings


@pytest.mark.parametrize("model", ["digits_cnn.onnx", "digits_mlp_sklearn.onnx"])
def test_no_warning_on_models_that_are_fine(model, tmp_path):
    """The bundled digits models meet their target within the budget: no quality warning."""
    path = DATA / model if (DATA / model).exists() else \
        Path(__file__).resolve().parents[1] / "models" / model
    res = p2u_onnx.encode(path, tmp_path / "d.p2u")
    x = np.load(DATA / "digits_test.npz")["x"].astype(np.float32)
    name = ort.InferenceSession(str(path)).get_inputs()[0].name
    if model.startswith("digits_mlp"):
        x = x.reshape(len(x), -1)
    sess = ort.InferenceSession(str(path))
    outs = [o.name for o in sess.get_outputs()]
    ref = sess.run(outs, {name: x})
    got = ort.InferenceSession(str(tmp_path / "d.p2u" / "base.onnx")).run(outs, {name: x})
    scores = [i for i, r in enumerate(ref) if np.asarray(r).dtype.kind == "f"
              and np.ndim(r) == 2]
    agree = np.mean(np.argmax(got[scores[-1]], 1) == np.argmax(ref[scores[-1]], 1))
    assert agree >= 0.99, agree
    alloc = res.manifest["allocation"]
    assert alloc["est_quality"] >= alloc["target_quality"], alloc
    assert not [w for w in res.warnings if "quality" in w or "synthesized" in w], res.warnings


@pytest.mark.parametrize("bias", [0.0, -12.0])
def test_decisions_the_inputs_do_not_exercise_are_warned_about(bias, tmp_path):
    """A detector whose probabilities all sit near 0 on random inputs (bias -12: a voice
    detector on noise) cannot show how its decisions flip: when the base misses its target,
    the warning says the synthesized inputs do not exercise the output and names --inputs and
    p2u eval. The same detector with its decisions spread over 0..1 gets the missed target
    alone, no such warning."""
    model = synth.detector(bias=bias)
    _, res, _ = encode_twin(model, tmp_path, "d", quality=0.9999, cap=0.12)
    [out] = res.manifest["allocation"]["outputs"]
    assert out["kind"] == "decisions" and out["output"] == "p"
    assert any("below the target 0.9999" in w for w in res.warnings), res.warnings
    synthetic = [w for w in res.warnings if "synthesized inputs" in w]
    if bias:
        assert out.get("flat") is True
        assert len(synthetic) == 1 and "output p is not exercised" in synthetic[0]
        assert "--inputs real.npz" in synthetic[0] and "p2u eval" in synthetic[0]
    else:
        assert not out.get("flat") and not synthetic, res.warnings


def test_guessed_sizes_are_named():
    """Float inputs with sizes the model does not fix (besides the batch) are named with the
    shape the calibration guessed; --shape takes them off the list."""
    from onnx import TensorProto, helper

    from p2u_onnx.sensitivity import _guessed_inputs

    w = synth.weight((8, 3, 3, 3))
    m = synth._model([helper.make_node("Conv", ["img", "w"], ["y"])],
                     [synth.vi("img", shape=("N", 3, "H", "W")),
                      synth.vi("ids", TensorProto.INT64, ("N", "L"))],
                     [synth.vi("y", shape=("N", 8, "H2", "W2"))],
                     [onnx.numpy_helper.from_array(w, "w")])
    assert _guessed_inputs(m, BitBudget()) == ["'img' (4x3x64x64)"]
    assert _guessed_inputs(m, BitBudget(shapes={"img": (1, 3, 32, 32)})) == []
