"""Model updates (issue 17): update packages coded against what a device holds.

Real bytes on small synthetic models: every stage restored from the predecessor, the last
bit-exact, unchanged tensors free, graph changes, chains, lossy predecessors, refusals.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from p2u_onnx import api
from p2u_onnx.cli import main
from p2u_onnx.config import BitBudget
from p2u_onnx.encoder import encode, weights_digest
from p2u_onnx.errors import FormatError, IntegrityError, P2UError, PlanError, TrustError
from p2u_onnx.format import (READABLE_VERSIONS, load_manifest, parse_manifest, read_stage,
                             validate_manifest)
from p2u_onnx.updates import (apply_update, encode_update, held_state, restore_update,
                              verify_update)

import synth

FAST = BitBudget(adaptive=False)


def _mlp(seed: int = 0, hidden: int = 128, dout: int = 32, extra: bool = False,
         dtype=np.float32) -> onnx.ModelProto:
    """x @ W1 + b1 -> Relu -> @ W2 (-> Relu -> @ W3 with ``extra``), weights from ``seed``."""
    rng = np.random.default_rng(seed)
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(synth.weight((64, hidden), dtype=dtype, rng=rng), "W1"),
             numpy_helper.from_array(synth.weight((hidden,), dtype=dtype, rng=rng), "b1"),
             numpy_helper.from_array(synth.weight((hidden, dout), dtype=dtype, rng=rng), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "W2"], ["y" if not extra else "z"])]
    out = dout
    if extra:
        inits.append(numpy_helper.from_array(synth.weight((dout, 48), dtype=dtype, rng=rng),
                                             "W3"))
        nodes += [helper.make_node("Relu", ["z"], ["z1"]),
                  helper.make_node("MatMul", ["z1", "W3"], ["y"])]
        out = 48
    return synth._model(nodes, [synth.vi("x", et, ("N", 64))], [synth.vi("y", et, ("N", out))],
                        inits)


def _moved(m: onnx.ModelProto, scale: float = 0.01, only: tuple[str, ...] | None = None,
           seed: int = 5) -> onnx.ModelProto:
    """A fine-tune of ``m``: every float initializer (or those in ``only``) moved slightly."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if only is not None and t.name not in only:
            continue
        a = numpy_helper.to_array(t)
        if a.dtype.kind != "f":
            continue
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf stay as they are
            moved = (a + rng.standard_normal(a.shape) * scale * (np.abs(a) + 0.01)).astype(a.dtype)
        moved = np.where(np.isfinite(a), moved, a)
        t.CopyFrom(numpy_helper.from_array(moved, t.name))
    return out


def _save(m: onnx.ModelProto, path) -> str:
    onnx.save(m, str(path))
    return str(path)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _err(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    """Largest |difference| over the float initializers both models have."""
    bt = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    worst = 0.0
    for t in a.graph.initializer:
        x = numpy_helper.to_array(t)
        if t.name in bt and x.dtype.kind == "f" and x.shape == bt[t.name].shape:
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - bt[t.name]))))
    return worst


X = synth.weight((5, 64), 1.0, rng=np.random.default_rng(3))


def test_finetune_update_every_stage_and_exact(tmp_path):
    v1, v2 = _mlp(), _moved(_mlp())
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    r = encode_update(p2, tmp_path / "u.p2u", p1, plan="2,6,lossless")
    m = r.manifest
    assert m["format_version"] == 3
    assert m["predecessor"] == {"weights_sha256": weights_digest(v1)}
    assert {t["update"] for t in m["tensors"]} == {"delta"}
    held = held_state(p1)
    errs = []
    for k in range(3):
        errs.append(_err(apply_update(tmp_path / "u.p2u", held, k).model, v2))
    assert errs[0] < _err(v1, v2) / 2 and errs[1] < errs[0] / 4 and errs[2] == 0.0
    out = restore_update(tmp_path / "u.p2u", tmp_path / "r.onnx", p1)
    assert weights_digest(onnx.load(str(out))) == weights_digest(v2)
    assert np.array_equal(_run(onnx.load(str(out)), X), _run(v2, X))
    # the coarse stage is a small share of v2's fp32 bytes (the skeleton carries b1 here)
    fp32 = 4 * sum(int(np.prod(t.dims)) for t in v2.graph.initializer)
    assert m["stages"][0]["bytes"] < 0.12 * fp32
    assert m["stages"][0]["max_abs_error"] == pytest.approx(errs[0], rel=1e-6)


def test_auto_first_stage_bits_per_tensor(tmp_path):
    """The default first stage puts a tuned tensor (one whose sign codes would leave little
    error) on the uniform grid, and gives 2 bits to one whose delta has heavy tails (a
    retrained layer), by the measured criterion."""
    from p2u_onnx.updates import SIGN_MAX_ERROR

    v1 = _mlp(hidden=256)
    v2 = _moved(v1, scale=0.01, only=("W1",))
    rng = np.random.default_rng(7)
    w2 = numpy_helper.to_array(v2.graph.initializer[2])
    heavy = rng.standard_t(1.5, w2.shape) * 0.05 * np.abs(w2).mean()
    v2.graph.initializer[2].CopyFrom(numpy_helper.from_array(
        (w2 + heavy).astype(np.float32), "W2"))
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    held = held_state(p1)
    errs, rows = {}, {}
    for plan in ("auto,lossless", "1,lossless", "2,lossless"):
        out = tmp_path / f"u-{plan[0]}.p2u"
        m = encode_update(p2, out, held, plan=plan).manifest
        rows[plan] = {t["name"]: t for t in m["tensors"]}
        st0 = apply_update(out, held, 0)
        errs[plan] = {n: float(np.linalg.norm(st0.get(n).astype(np.float64) -
                                              numpy_helper.to_array(i).astype(np.float64)))
                      / float(np.linalg.norm(numpy_helper.to_array(i)))
                      for i in v2.graph.initializer for n in [i.name] if n in ("W1", "W2")}
        new = apply_update(out, held)  # every plan restores v2 bit for bit
        assert new.exact and weights_digest(new.model) == weights_digest(v2)
    auto = rows["auto,lossless"]
    assert auto["W1"]["update"] == auto["W2"]["update"] == "delta"
    assert auto["W1"]["base"]["code_type"] in (22, 3) and auto["W2"]["bits"] == 2  # grid; 2 bits
    assert rows["1,lossless"]["W1"]["base"]["code_type"] == 26  # signs in INT2 containers
    # the criterion: W1's 1-bit error is within the bound, W2's is not
    assert errs["1,lossless"]["W1"] <= SIGN_MAX_ERROR < errs["1,lossless"]["W2"]
    # auto's W1 is closer to v2 than v1 is; its W2 is the 2-bit plan's (same values)
    w1 = [numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64) for m in (v1, v2)]
    assert errs["auto,lossless"]["W1"] < np.linalg.norm(w1[1] - w1[0]) / np.linalg.norm(w1[1])
    assert errs["auto,lossless"]["W2"] == errs["2,lossless"]["W2"] < errs["1,lossless"]["W2"]
    with pytest.raises(PlanError, match="auto"):
        encode_update(p2, tmp_path / "bad.p2u", held, plan="2,auto,lossless")


def test_unchanged_tensors_cost_nothing(tmp_path):
    v1 = _mlp(hidden=256)
    v2 = _moved(v1, only=("W2",))  # a new head: only the last layer changes
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    m = encode_update(p2, tmp_path / "u.p2u", p1).manifest
    kinds = {t["name"]: t["update"] for t in m["tensors"]}
    assert kinds == {"W1": "same", "b1": "same", "W2": "delta"}
    w2_fp32 = 256 * 32 * 4
    total = m["stages"][-1]["cumulative_bytes"]
    assert total < 1.2 * w2_fp32  # the unchanged W1 (64 kB) costs nothing
    same = next(t for t in m["tensors"] if t["name"] == "W1")
    assert "base" not in same and "bits" not in same
    last = read_stage(tmp_path / "u.p2u" / "stage-1.p2u")
    assert {e["name"] for e in last.entries} == {"W2"}
    new = apply_update(tmp_path / "u.p2u", held_state(p1))
    assert new.exact and weights_digest(new.model) == weights_digest(v2)
    # tuned by small gaussian steps: sign codes fit (error within SIGN_MAX_ERROR), and the
    # uniform grid at no more error is smaller still: the auto first stage takes it (INT4/8)
    w2row = next(t for t in m["tensors"] if t["name"] == "W2")
    assert (w2row["bits"], w2row["base"]["code_type"]) in ((4, 22), (8, 3))
    assert m["plan"] == ["2", "lossless"] and m["config"]["first_bits"] == "auto"
    # a head replaced (retrained from scratch) gets the bits of a new tensor at stage 0
    v3 = _mlp(hidden=256)
    v3.graph.initializer[2].CopyFrom(numpy_helper.from_array(
        synth.weight((256, 32), rng=np.random.default_rng(99)), "W2"))
    p3 = _save(v3, tmp_path / "v3.onnx")
    m3 = encode_update(p3, tmp_path / "u3.p2u", p1).manifest
    w2 = next(t for t in m3["tensors"] if t["name"] == "W2")
    assert (w2["update"], w2["bits"]) == ("delta", 4)
    assert weights_digest(apply_update(tmp_path / "u3.p2u", held_state(p1)).model) == \
        weights_digest(v3)
    # at stage 0 the unchanged tensor is already v2's, bit for bit
    s0 = apply_update(tmp_path / "u.p2u", held_state(p1), 0)
    assert np.array_equal(s0.get("W1"), numpy_helper.to_array(v2.graph.initializer[0]))


def test_graph_changes_added_removed_reshaped(tmp_path):
    v1 = _mlp(dout=32)
    v2 = _mlp(seed=9, dout=16, extra=True)  # W2 reshaped, W3 and two nodes added
    v3 = _moved(_mlp(seed=9, dout=16))  # W3 removed again
    paths = [_save(m, tmp_path / f"v{i}.onnx") for i, m in enumerate((v1, v2, v3), 1)]
    m = encode_update(paths[1], tmp_path / "u12.p2u", paths[0]).manifest
    kinds = {t["name"]: t["update"] for t in m["tensors"]}
    assert kinds["W2"] == "new" and kinds["W3"] == "new" and kinds["W1"] == "delta"
    # the exact stage of the small new W3 is plain planes (smaller than groups there)
    last = read_stage(tmp_path / "u12.p2u" / "stage-1.p2u")
    assert {e["name"]: e["codec"]["id"] for e in last.entries}["W3"] == "int-planes"
    out = restore_update(tmp_path / "u12.p2u", tmp_path / "r2.onnx", paths[0])
    assert np.array_equal(_run(onnx.load(str(out)), X), _run(v2, X))
    m = encode_update(paths[2], tmp_path / "u23.p2u", paths[1]).manifest
    assert {t["name"] for t in m["tensors"]} == {"W1", "W2"}  # (b1 rides in the skeleton)
    out = restore_update(tmp_path / "u23.p2u", tmp_path / "r3.onnx", paths[1])
    assert weights_digest(onnx.load(str(out))) == weights_digest(v3)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_dtypes_bit_exact(tmp_path, dtype):
    v1 = _mlp(dtype=dtype)
    v2 = _moved(v1, scale=0.05)
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    encode_update(p2, tmp_path / "u.p2u", p1)
    new = apply_update(tmp_path / "u.p2u", held_state(p1))
    assert weights_digest(new.model) == weights_digest(v2)


def test_awkward_values_and_bfloat16(tmp_path):
    """NaN payloads, infinities, -0.0, subnormals in both versions; a bfloat16 model."""
    v1 = synth.edge_model()
    v2 = _moved(v1, scale=0.02)
    awk = next(t for t in v2.graph.initializer if t.name == "Awk")
    a = numpy_helper.to_array(awk).copy()
    a.reshape(-1)[11:20] = [np.nan, -0.0, np.inf, 1e-42, -np.inf, 0.0, 5.0, -7.0, 3e38]
    awk.CopyFrom(numpy_helper.from_array(a, "Awk"))
    p1, p2 = _save(v1, tmp_path / "e1.onnx"), _save(v2, tmp_path / "e2.onnx")
    encode_update(p2, tmp_path / "ue.p2u", p1)
    new = apply_update(tmp_path / "ue.p2u", held_state(p1))
    assert weights_digest(new.model) == weights_digest(v2)
    feed = synth.edge_feed()
    s = ort.InferenceSession(new.model.SerializeToString(), providers=["CPUExecutionProvider"])
    r = ort.InferenceSession(v2.SerializeToString(), providers=["CPUExecutionProvider"])
    feed["W"] = numpy_helper.to_array(v2.graph.initializer[0])
    for a_, b_ in zip(s.run(None, feed), r.run(None, feed)):
        assert np.array_equal(a_, b_, equal_nan=True)
    b1 = synth.bf16_mlp()
    b2 = _moved(b1, scale=0.0)  # numpy has no bf16: move the bit patterns instead
    t = b2.graph.initializer[0]
    bits = np.frombuffer(t.raw_data, np.uint16).copy()
    bits[::7] += 3
    t.raw_data = bits.tobytes()
    q1, q2 = _save(b1, tmp_path / "b1.onnx"), _save(b2, tmp_path / "b2.onnx")
    encode_update(q2, tmp_path / "ub.p2u", q1)
    assert weights_digest(apply_update(tmp_path / "ub.p2u", held_state(q1)).model) == \
        weights_digest(b2)


def test_from_full_package_exact_and_lossy_stage(tmp_path):
    v1, v2 = _mlp(hidden=256), _moved(_mlp(hidden=256))
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    pkg = encode(p1, tmp_path / "v1.p2u", "4,8,lossless", budget=FAST, probe=False,
                 name="mlp", version=1).path
    pm = load_manifest(pkg)
    # exact: the last stage of the package is v1 itself, bound by its digest
    m = encode_update(p2, tmp_path / "ux.p2u", pkg, ship_graph=False).manifest
    assert m["predecessor"] == {"weights_sha256": pm["source"]["weights_sha256"],
                                "name": "mlp", "version": 1}
    out = restore_update(tmp_path / "ux.p2u", tmp_path / "a.onnx", pkg)
    assert weights_digest(onnx.load(str(out))) == weights_digest(v2)
    # the graph did not change: the skeleton is coded against the package's, bound by its
    # sha256, so a device that holds v1 from its .onnx file (no such skeleton) is refused ...
    ref = m["base_model"]["files"][1]
    assert ref["path"] == "graph.onnx" and len(ref["reference"]) == 64
    with pytest.raises(IntegrityError, match="reuses the skeleton graph .* has no skeleton"):
        restore_update(tmp_path / "ux.p2u", tmp_path / "b.onnx", p1)
    # ... and takes the update with the skeleton shipped whole (the default for an exact
    # binding), one that holds v1 exact too
    ms = encode_update(p2, tmp_path / "us.p2u", pkg).manifest
    assert "reference" not in ms["base_model"]["files"][1]
    assert ms["stages"][0]["bytes"] > m["stages"][0]["bytes"] + 100  # what reuse saves
    assert ms["predecessor"] == m["predecessor"] and ms["package_id"] != m["package_id"]
    out = restore_update(tmp_path / "us.p2u", tmp_path / "b.onnx", p1)
    assert weights_digest(onnx.load(str(out))) == weights_digest(v2)
    # lossy: devices that stopped at stage 0 of the package
    m = encode_update(p2, tmp_path / "u0.p2u", pkg, from_stage=0).manifest
    assert m["predecessor"]["package_id"] == pm["package_id"] and \
        m["predecessor"]["stage"] == 0 and "weights_sha256" not in m["predecessor"]
    out = restore_update(tmp_path / "u0.p2u", tmp_path / "c.onnx", pkg)  # stage 0 taken
    assert weights_digest(onnx.load(str(out))) == weights_digest(v2)
    with pytest.raises(IntegrityError, match="at stage 0, not to .* at stage 1"):
        restore_update(tmp_path / "u0.p2u", tmp_path / "d.onnx", pkg, from_stage=1)
    with pytest.raises(IntegrityError, match="at stage 0, not to .*exact model"):
        restore_update(tmp_path / "u0.p2u", tmp_path / "d.onnx", p1)


def test_chain_and_federated_rounds(tmp_path):
    v = [_mlp()]
    for i in range(3):
        v.append(_moved(v[-1], seed=10 + i))
    paths = [_save(m, tmp_path / f"v{i}.onnx") for i, m in enumerate(v)]
    encode_update(paths[1], tmp_path / "u01.p2u", paths[0])
    # v2 against v1 as a device reached it through u01: same digest, so the same binding
    # (coded against u01's skeleton, which the device holds: bound to it)
    encode_update(paths[2], tmp_path / "u12.p2u", [paths[0], tmp_path / "u01.p2u"],
                  ship_graph=False)
    out = restore_update(tmp_path / "u12.p2u", tmp_path / "r.onnx",
                         [paths[0], tmp_path / "u01.p2u"])
    assert weights_digest(onnx.load(str(out))) == weights_digest(v[2])
    with pytest.raises(IntegrityError, match="reuses the skeleton graph"):
        restore_update(tmp_path / "u12.p2u", tmp_path / "r.onnx", paths[1])
    # with the skeleton shipped whole (the default for an exact binding) it applies to v2
    # whatever way it was reached
    encode_update(paths[2], tmp_path / "u12s.p2u", [paths[0], tmp_path / "u01.p2u"])
    for source in ([paths[0], tmp_path / "u01.p2u"], paths[1]):
        out = restore_update(tmp_path / "u12s.p2u", tmp_path / "r.onnx", source)
        assert weights_digest(onnx.load(str(out))) == weights_digest(v[2])
    # federated: clients follow each round at its first update stage; the next round is coded
    # against exactly that state (package id + stage 0), so errors do not pile up
    held = held_state(paths[0])
    errs = []
    for r in (1, 2, 3):
        u = tmp_path / f"round{r}.p2u"
        m = encode_update(paths[r], u, held).manifest
        if r > 1:
            pred = m["predecessor"]
            assert (pred["package_id"], pred["stage"]) == (held.package_id, 0)
            assert "weights_sha256" not in pred
        # the auto first stage: against the exact v0 sign codes or the uniform grid at no
        # more error, whichever is smaller; against lossy states always the uniform grid
        # (unbounded codes, INT4 or INT8 containers), which corrects the carried error
        bits = {t["bits"] for t in m["tensors"] if t["update"] == "delta"}
        assert bits <= ({1, 4, 8} if r == 1 else {4, 8}) and bits
        assert m["config"]["first_stage"] == "uniform"
        held = apply_update(u, held, 0)
        errs.append(_err(held.model, v[r]))
    assert errs[2] < 1.5 * errs[1] and errs[1] < errs[0]  # not growing
    # the server restores the last round exactly from the clients' lossy chain
    exact = apply_update(tmp_path / "round3.p2u",
                         held_state([paths[0], tmp_path / "round1.p2u",
                                     tmp_path / "round2.p2u"], 0))
    assert weights_digest(exact.model) == weights_digest(v[3])


def test_refusals(tmp_path):
    v1, v2 = _mlp(), _moved(_mlp())
    other = _mlp(seed=42)
    p1, p2, po = (_save(m, tmp_path / n) for m, n in ((v1, "v1.onnx"), (v2, "v2.onnx"),
                                                       (other, "o.onnx")))
    encode_update(p2, tmp_path / "u.p2u", p1)
    full = encode(p2, tmp_path / "v2.p2u", "4,lossless", budget=FAST, probe=False).path
    with pytest.raises(IntegrityError, match="applies to exact model .* not to .*o.onnx"):
        restore_update(tmp_path / "u.p2u", tmp_path / "x.onnx", po)
    with pytest.raises(P2UError, match="is a full package, not an update"):
        restore_update(full, tmp_path / "x.onnx", p1)
    with pytest.raises(P2UError, match="is an update: it applies to .*give that with --from"):
        api.restore(tmp_path / "u.p2u", tmp_path / "x.onnx")
    with pytest.raises(P2UError, match="is an update package: give the model"):
        held_state(tmp_path / "u.p2u")
    with pytest.raises(P2UError, match="is a model file, not a package"):
        held_state(p1, 0)
    # a stage file of another update, dropped into this one
    encode_update(po, tmp_path / "u2.p2u", p1)
    broken = tmp_path / "broken.p2u"
    shutil.copytree(tmp_path / "u.p2u", broken)
    shutil.copy(tmp_path / "u2.p2u" / "stage-1.p2u", broken / "stage-1.p2u")
    with pytest.raises(IntegrityError):
        restore_update(broken, tmp_path / "x.onnx", p1)
    assert not (tmp_path / "x.onnx").exists()
    # pinning and signing apply to updates too
    good = api.verify(tmp_path / "u.p2u")["manifest_sha256"]
    with pytest.raises(TrustError):
        restore_update(tmp_path / "u.p2u", tmp_path / "x.onnx", p1, expect="sha256:" + "0" * 64)
    out = restore_update(tmp_path / "u.p2u", tmp_path / "x.onnx", p1, expect="sha256:" + good)
    assert out.exists()
    pytest.importorskip("cryptography")
    from p2u_onnx.trust import generate_key

    pub = generate_key(tmp_path / "k")
    with pytest.raises(TrustError):
        verify_update(tmp_path / "u.p2u", p1, trust=pub)
    from p2u_onnx.trust import sign_package

    sign_package(tmp_path / "u.p2u", tmp_path / "k")
    assert verify_update(tmp_path / "u.p2u", p1, trust=pub)["lossless_match"]
    out = restore_update(tmp_path / "u.p2u", tmp_path / "s.onnx", p1, trust=pub)
    assert weights_digest(onnx.load(str(out))) == weights_digest(v2)
    other = generate_key(tmp_path / "k2")
    with pytest.raises(TrustError):
        restore_update(tmp_path / "u.p2u", tmp_path / "t.onnx", p1, trust=other)
    assert not (tmp_path / "t.onnx").exists()


def test_cli_update_commands(tmp_path):
    v1, v2 = _mlp(), _moved(_mlp())
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    run = CliRunner().invoke
    r = run(main, ["encode", p2, "-o", str(tmp_path / "u.p2u"), "--from", p1, "-q"])
    assert r.exit_code == 0, r.output
    r = run(main, ["inspect", str(tmp_path / "u.p2u")])
    assert r.exit_code == 0 and "update of exact model" in r.output and "2 delta" in r.output
    r = run(main, ["verify", str(tmp_path / "u.p2u"), "--from", p1])
    assert r.exit_code == 0 and "lossless stage reproduces" in r.output, r.output
    r = run(main, ["verify", str(tmp_path / "u.p2u")])
    assert r.exit_code == 0 and "not replayed" in r.output
    r = run(main, ["restore", str(tmp_path / "u.p2u"), "--from", p1, "-o",
                   str(tmp_path / "r.onnx")])
    assert r.exit_code == 0 and weights_digest(onnx.load(str(tmp_path / "r.onnx"))) == \
        weights_digest(v2)
    r = run(main, ["restore", str(tmp_path / "u.p2u"), "--from", p2, "-o",
                   str(tmp_path / "w.onnx")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "applies to" in r.output
    assert not (tmp_path / "w.onnx").exists()
    r = run(main, ["restore", str(tmp_path / "u.p2u"), "-o", str(tmp_path / "w.onnx")])
    assert r.exit_code == 1 and "give that with --from" in r.output


def test_readers_refuse_what_they_do_not_know(tmp_path, monkeypatch):
    v1, v2 = _mlp(), _moved(_mlp())
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    encode_update(p2, tmp_path / "u.p2u", p1)
    raw = (tmp_path / "u.p2u" / "manifest.json").read_bytes()
    # a reader of format 1-2 only refuses an update by its version number
    import p2u_onnx.format as fmt

    monkeypatch.setattr(fmt, "READABLE_VERSIONS", (1, 2))
    with pytest.raises(FormatError, match="format version 3, this reader knows 1 and 2"):
        parse_manifest(raw)
    with pytest.raises(FormatError, match="format version 3, this reader knows 1 and 2"):
        read_stage(tmp_path / "u.p2u" / "stage-0.p2u")
    monkeypatch.setattr(fmt, "READABLE_VERSIONS", READABLE_VERSIONS)
    # a full package's manifest that names a predecessor is refused, not half read
    full = encode(p1, tmp_path / "v1.p2u", "4,lossless", budget=FAST, probe=False).path
    m = load_manifest(full)
    m["predecessor"] = {"weights_sha256": "a" * 64}
    with pytest.raises(FormatError, match="predecessor is only valid in an update"):
        validate_manifest(m)
    m = json.loads(raw)
    m["tensors"][0]["update"] = "same"
    with pytest.raises(FormatError, match="is given for an unchanged tensor"):
        validate_manifest(m)


# ---------------------------------------------------------------- live sessions


@pytest.fixture(scope="module")
def live_pair(tmp_path_factory):
    """v1 as a full package, v2 and v3 as a chain of updates (names and versions set)."""
    d = tmp_path_factory.mktemp("live")
    v = [_mlp(hidden=256)]
    v.append(_moved(v[0], seed=21))
    v.append(_moved(v[1], seed=22))
    paths = [_save(m, d / f"v{i}.onnx") for i, m in enumerate(v)]
    encode(paths[0], d / "v1.p2u", "4,8,lossless", budget=FAST, name="live", version=1)
    encode_update(paths[1], d / "u12.p2u", d / "v1.p2u", plan="2,6,lossless", name="live",
                  version=2)
    encode_update(paths[2], d / "u23.p2u", paths[1], name="live", version=3)
    # v1 -> v3 made from the .onnx file: it applies to a session that reached v1 through
    # the full package (the same exact model; the update uses only tensors every such device
    # holds as coded weights)
    encode_update(paths[2], d / "u13.p2u", paths[0], name="live", version=3)
    outs = [_run(m, X) for m in v]
    return d, v, outs


def _serving(s, outs, seen, stop):
    """Run the session until ``stop``; ``seen`` gets, per run, the index of the state in
    ``outs`` whose outputs it gave bit for bit (-1: none of them)."""
    while not stop.is_set():
        y = s.run(None, {"x": X})[0]
        seen.append(next((i for i, o in enumerate(outs) if np.array_equal(y, o)), -1))


def test_live_update_folder_stage_by_stage(live_pair, tmp_path):
    import threading

    from p2u_onnx.runtime import ProgressiveSession

    d, v, outs = live_pair
    with ProgressiveSession(d / "v1.p2u", workdir=tmp_path / "w") as s:
        s.upgrade(background=False)
        assert np.array_equal(s.run(None, {"x": X})[0], outs[0])
        # a foreign update (made for v2) and a full package are refused; v1 keeps serving
        with pytest.raises(IntegrityError, match="applies to .*not to this session's model"):
            s.update(d / "u23.p2u")
        with pytest.raises(P2UError, match="is a full package, not an update"):
            s.update(d / "v1.p2u")
        assert s.stage == 2 and np.array_equal(s.run(None, {"x": X})[0], outs[0])
        # the outputs of every state the session may serve: v1, the update's stages 0 and 1, v2
        held = held_state(d / "v1.p2u")
        states = [outs[0]] + [_run(apply_update(d / "u12.p2u", held, k).model, X)
                              for k in (0, 1)] + [outs[1]]
        stop, seen = threading.Event(), []
        t = threading.Thread(target=_serving, args=(s, states, seen, stop))
        t.start()
        try:
            assert s.update(d / "u12.p2u", until=0) == 0
            y0 = s.run(None, {"x": X})[0]
            assert s.manifest["package_id"] == load_manifest(d / "u12.p2u")["package_id"]
            assert float(np.abs(y0 - outs[1]).max()) < float(np.abs(outs[0] - outs[1]).max())
            assert s.upgrade(background=False) == 2
        finally:
            stop.set()
            t.join()
        assert np.array_equal(s.run(None, {"x": X})[0], outs[1])
        # every run was answered by exactly one state, in order
        assert seen and -1 not in seen and seen == sorted(seen), seen[:50]
        # the chain goes on: an update made against v2 (exact) applies to v2 reached this way
        assert s.update(d / "u23.p2u") == 1
        assert np.array_equal(s.run(None, {"x": X})[0], outs[2])
        # a lower version of the model is refused (rollback)
        with pytest.raises(P2UError):
            s.update(d / "u12.p2u")


def test_live_update_bytes_url_and_bad_stage(live_pair, tmp_path):
    from http_helpers import nginx

    from p2u_onnx.runtime import BytesSource, ProgressiveSession

    d, v, outs = live_pair
    u = d / "u13.p2u"
    with ProgressiveSession(d / "v1.p2u", workdir=tmp_path / "w", allow_rollback=True) as s:
        s.upgrade(background=False)
        # stage 1 of the update is corrupt: stage 0 serves, then the bad stage is refused
        src = BytesSource((u / "manifest.json").read_bytes(), (u / "stage-0.p2u").read_bytes(),
                          probe=(u / "probe.npz").read_bytes(),
                          fetch=lambda k: b"P2USTAGE" + b"\0" * 100)
        with pytest.raises(IntegrityError):
            s.update(src, allow_rollback=True)
        assert s.stage == 0
        y0 = s.run(None, {"x": X})[0]
        good = BytesSource((u / "manifest.json").read_bytes(), (u / "stage-0.p2u").read_bytes(),
                           fetch=lambda k: (u / f"stage-{k}.p2u").read_bytes())
        s.apply(good.fetch(1))
        assert np.array_equal(s.run(None, {"x": X})[0], outs[2])
        assert not np.array_equal(y0, outs[2])
    # over HTTP, from a URL, pinned
    site = tmp_path / "site"
    shutil.copytree(u, site / "u13.p2u")
    pin = "sha256:" + api.verify(u)["manifest_sha256"]
    with nginx(site, tmp_path / "nginx") as url:
        with ProgressiveSession(d / "v1.p2u", workdir=tmp_path / "w2",
                                allow_rollback=True) as s:
            s.upgrade(background=False)
            with pytest.raises(TrustError):
                s.update(f"{url}/u13.p2u/", expect="sha256:" + "0" * 64, allow_rollback=True)
            assert s.stage == 2 and np.array_equal(s.run(None, {"x": X})[0], outs[0])
            s.update(f"{url}/u13.p2u/", expect=pin, allow_rollback=True)
            assert np.array_equal(s.run(None, {"x": X})[0], outs[2])
        # p2u fetch mirrors an update like any package; it restores from the mirror
        from p2u_onnx.transport import fetch

        mirror = fetch(f"{url}/u13.p2u/", tmp_path / "mirror", expect=pin, allow_rollback=True)
        assert {"manifest.json", "stage-0.p2u", "stage-1.p2u"} <= {p.name for p in
                                                                   mirror.iterdir()}
        out = restore_update(mirror, tmp_path / "m.onnx", d / "v1.p2u")
        assert weights_digest(onnx.load(str(out))) == weights_digest(v[2])


def test_session_refuses_an_update_package(live_pair):
    from p2u_onnx.runtime import ProgressiveSession

    d, _, _ = live_pair
    with pytest.raises(P2UError, match="is an update package: open a session on the model"):
        ProgressiveSession(d / "u12.p2u")


def test_live_update_reads_tensors_the_package_kept_in_its_graph(tmp_path):
    """A full package keeps vectors in its graph (inline, or in base.bin when big): an update
    made from the .onnx file starts those from the session's skeleton."""
    from p2u_onnx.runtime import ProgressiveSession

    v1 = _mlp(hidden=1024)  # b1: 4 kB, in base.bin of the full package
    v2 = _moved(v1, only=("b1", "W2"))
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    pkg = encode(p1, tmp_path / "v1.p2u", "4,lossless", budget=FAST, name="kept", version=1)
    m = encode_update(p2, tmp_path / "u.p2u", p1, name="kept", version=2).manifest
    assert {t["name"]: t["update"] for t in m["tensors"]} == \
        {"W1": "same", "b1": "delta", "W2": "delta"}
    assert "b1" not in {t["name"] for t in load_manifest(pkg.path)["tensors"]}
    with ProgressiveSession(pkg.path, workdir=tmp_path / "w") as s:
        s.upgrade(background=False)
        s.update(tmp_path / "u.p2u")
        assert np.array_equal(s.run(None, {"x": X})[0], _run(v2, X))


def test_one_bit_first_stage(tmp_path):
    """plan "1,lossless": a sign per changed value and a mean-|delta| scale per block
    (BitDelta-like), then the exact model; unchanged values keep code 0."""
    v1 = _mlp(hidden=256)
    v2 = _moved(v1)
    a = numpy_helper.to_array(v2.graph.initializer[0]).copy()
    a[:, :8] = numpy_helper.to_array(v1.graph.initializer[0])[:, :8]  # some values unchanged
    v2.graph.initializer[0].CopyFrom(numpy_helper.from_array(a, "W1"))
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    m = encode_update(p2, tmp_path / "u1.p2u", p1, plan="1,lossless").manifest
    assert {t["name"]: t.get("bits") for t in m["tensors"]} == {"W1": 1, "b1": 1, "W2": 1}
    held = held_state(p1)
    s0 = apply_update(tmp_path / "u1.p2u", held, 0)
    w1 = s0.get("W1")
    assert np.array_equal(w1[:, :8], a[:, :8])  # code 0: the held value stays
    assert _err(s0.model, v2) < _err(v1, v2)
    assert weights_digest(apply_update(tmp_path / "u1.p2u", held).model) == weights_digest(v2)
    w = next(t for t in m["tensors"] if t["name"] == "W1")
    assert w["base"]["code_type"] == 26  # INT2 containers of -1, 0, +1
    with pytest.raises(PlanError, match="1..8 bits"):
        encode_update(p2, tmp_path / "u0.p2u", p1, plan="0,lossless")
    with pytest.raises(PlanError, match="lossy first stage"):
        encode_update(p2, tmp_path / "u0.p2u", p1, plan="lossless")
    # the manifest is compact JSON and still validates (and pins: it is what is hashed)
    raw = (tmp_path / "u1.p2u" / "manifest.json").read_bytes()
    assert b", " not in raw and parse_manifest(raw)["plan"] == ["1", "lossless"]


def test_cli_ship_graph(tmp_path):
    """`--from v1.p2u --reuse-graph` codes the skeleton against the package's (bound); by
    default (an exact binding) and with `--ship-graph` it is shipped whole, so a device holding
    v1 from its .onnx file can take it."""
    v1, v2 = _mlp(hidden=256), _moved(_mlp(hidden=256))
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    encode(p1, tmp_path / "v1.p2u", "4,lossless", budget=FAST, probe=False)
    run = CliRunner().invoke
    for out, extra in (("u.p2u", ["--reuse-graph"]), ("us.p2u", ["--ship-graph"]),
                       ("ud.p2u", [])):
        r = run(main, ["encode", p2, "-o", str(tmp_path / out), "--from",
                       str(tmp_path / "v1.p2u"), "-q", *extra])
        assert r.exit_code == 0, r.output
    files = [load_manifest(tmp_path / u)["base_model"]["files"][1]
             for u in ("u.p2u", "us.p2u", "ud.p2u")]
    assert "reference" in files[0] and "reference" not in files[1] | files[2]
    r = run(main, ["restore", str(tmp_path / "u.p2u"), "--from", p1, "-o",
                   str(tmp_path / "a.onnx")])
    assert r.exit_code != 0 and "reuses the skeleton graph" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "a.onnx").exists()
    r = run(main, ["restore", str(tmp_path / "us.p2u"), "--from", p1, "-o",
                   str(tmp_path / "b.onnx")])
    assert r.exit_code == 0, r.output
    assert weights_digest(onnx.load(str(tmp_path / "b.onnx"))) == weights_digest(v2)


def test_live_update_keeps_inplace(live_pair, tmp_path):
    """An inplace session stays inplace through an update: stage 0 in a weights file of its
    own given to onnxruntime by name, the later stages patched into the live session (no new
    session), every run answered by one state, v2 bit for bit at the end."""
    import threading

    from p2u_onnx.runtime import ProgressiveSession

    d, v, outs = live_pair
    with ProgressiveSession(d / "v1.p2u", workdir=tmp_path / "w", strategy="inplace") as s:
        s.upgrade(background=False)
        assert s._strategy == "inplace"
        held = held_state(d / "v1.p2u")
        states = [outs[0]] + [_run(apply_update(d / "u12.p2u", held, k).model, X)
                              for k in (0, 1)] + [outs[1]]
        stop, seen = threading.Event(), []
        t = threading.Thread(target=_serving, args=(s, states, seen, stop))
        t.start()
        try:
            session = s._live.session
            assert s.update(d / "u12.p2u", until=0) == 0
            assert s._strategy == "inplace"
            assert s._live.session is session  # the same graph: stage 0 patched in place too
            assert s.upgrade(background=False) == 2
            assert s._live.session is session  # patched in place, not rebuilt
        finally:
            stop.set()
            t.join()
        assert np.array_equal(s.run(None, {"x": X})[0], outs[1])
        assert seen and -1 not in seen and seen == sorted(seen), seen[:50]
        # only the current stage's weights file is left in the session's folder
        assert [p.name for p in s._dir.glob("weights-*.bin")] == ["weights-2.bin"]
        assert s.update(d / "u23.p2u") == 1 and s._strategy == "inplace"
        assert np.array_equal(s.run(None, {"x": X})[0], outs[2])


def test_big_tensor_entries_in_runs(tmp_path):
    """A tensor of more than CHUNK_ELEMENTS values is coded in several stage entries (runs of
    blocks, as full packages do: a device decodes entry by entry between inferences), and
    restores bit for bit at every stage count."""
    from p2u_onnx.encoder import CHUNK_ELEMENTS

    v1 = _mlp(hidden=5000)  # W1 64 x 5000 = 320,000 values
    v2 = _moved(v1, only=("W1",))
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    for plan in ("auto,lossless", "2,6,lossless"):
        out = tmp_path / f"u{plan[0]}.p2u"
        m = encode_update(p2, out, p1, plan=plan).manifest
        row = next(t for t in m["tensors"] if t["name"] == "W1")
        assert row["update"] == "delta"
        last = read_stage(out / f"stage-{len(m['stages']) - 1}.p2u")
        runs = [e["blocks"] for e in last.entries if e["name"] == "W1"]
        assert len(runs) >= 2 and runs[0][0] == 0 and \
            all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        per_block = 64 * 5000 // runs[-1][1]  # values per block of the delta's layout
        assert all((b - a) * per_block <= CHUNK_ELEMENTS for a, b in runs)
        new = apply_update(out, held_state(p1))
        assert weights_digest(new.model) == weights_digest(v2)


def test_uniform_first_stage_follows_and_restores(tmp_path):
    """The uniform first stage against a lossy state: one grid step shared by every changed
    tensor (UNIFORM_STEP x the rms of their deltas), codes rounded to the nearest multiple,
    INT4/INT8 containers; a unit that did not move costs zero codes; the error a follower
    carries is corrected by the next round (not growing); the last stage is bit for bit;
    an edited code type is refused."""
    from p2u_onnx.reconstruct import base_codes_of, extract_update_files
    from p2u_onnx.updates import UNIFORM_STEP

    rng = np.random.default_rng(5)
    v = [_mlp(hidden=256)]
    for r in range(4):  # rounds that move half of the hidden units (the others are dead)
        m = onnx.ModelProto()
        m.CopyFrom(v[-1])
        for init in m.graph.initializer:
            a = numpy_helper.to_array(init).astype(np.float32)
            if init.name in ("W1", "W2"):
                d = rng.normal(0, 0.01 * float(np.std(a)), a.shape).astype(np.float32)
                if init.name == "W1":
                    d[:, 128:] = 0  # dead units: their column does not move
                init.CopyFrom(numpy_helper.from_array((a + d).astype(np.float32), init.name))
        v.append(m)
    paths = [_save(m, tmp_path / f"r{i}.onnx") for i, m in enumerate(v)]
    held = apply_update(encode_update(paths[1], tmp_path / "u1.p2u", paths[0]).path,
                        held_state(paths[0]), 0)
    errs = []
    for r in range(2, 5):
        u = tmp_path / f"u{r}.p2u"
        res = encode_update(paths[r], u, held)
        rows = {t["name"]: t for t in res.manifest["tensors"] if t["update"] == "delta"}
        assert set(rows) >= {"W1", "W2"}
        base_bin = extract_update_files(read_stage(u / "stage-0.p2u"), res.manifest,
                                        lambda: held.graph)["base.bin"]
        # one step for every tensor: UNIFORM_STEP x the rms of all their deltas
        deltas = [numpy_helper.to_array(next(i for i in v[r].graph.initializer
                                             if i.name == n)).astype(np.float64)
                  - held.get(n).astype(np.float64) for n in rows]
        rms = float(np.sqrt(np.mean(np.concatenate([d.ravel() for d in deltas]) ** 2)))
        for (name, row), d in zip(rows.items(), deltas):
            assert row["bits"] in (4, 8) and row["base"]["code_type"] in (22, 3)
            layout, codes = base_codes_of(row, base_bin)
            # (the scale is rounded as the dtype's scales are: float16 precision)
            assert np.allclose(codes.scale, UNIFORM_STEP * rms, rtol=1e-3)
            q = layout.from_blocks(codes.codes.astype(np.float64))
            assert np.array_equal(q, np.rint(d / codes.scale[0]))  # nearest multiple
            if name == "W1":  # the dead units' own change is zero: only the carried
                # error is left there, a fraction of a step
                assert np.count_nonzero(q[:, 128:]) < 0.05 * q[:, 128:].size
        new = apply_update(u, held, 0)
        errs.append(_err(new.model, v[r]))
        exact = apply_update(u, held)  # the last stage: the round's model bit for bit
        assert exact.exact and weights_digest(exact.model) == weights_digest(v[r])
        held = new
    assert errs[-1] < 1.5 * errs[0]  # not growing
    # an edited code type (INT4 <-> INT8) is refused before anything is decoded
    man = json.loads((tmp_path / "u4.p2u" / "manifest.json").read_text())
    row = next(t for t in man["tensors"] if t["update"] == "delta")
    row["base"]["code_type"] = 3 if row["base"]["code_type"] == 22 else 22
    (tmp_path / "u4.p2u" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(P2UError):
        apply_update(tmp_path / "u4.p2u", held_state([paths[0], tmp_path / "u1.p2u",
                                                      tmp_path / "u2.p2u",
                                                      tmp_path / "u3.p2u"], 0), 0)


def test_strong_symbols_round_trip_and_never_larger():
    """The update's base.bin tries zstd's full match finder on its symbols stream and keeps the
    smaller frame: on sparse delta codes (long zero runs) it is smaller, on near-random codes
    it falls back to the entropy-only frame; both decode to the same bytes."""
    from p2u_onnx.codecs import SegmentsCodec
    from p2u_onnx.reconstruct import pack_codes

    rng = np.random.default_rng(3)
    sparse = np.rint(rng.normal(0, 0.6, (64, 1024))).astype(np.int8)
    sparse[::2] = 0  # dead rows
    noisy = rng.integers(-8, 8, 65536).astype(np.int8)
    for codes in (sparse, noisy):
        data = pack_codes(np.clip(codes, -8, 7).reshape(-1), 22) + \
            np.float32(0.5).tobytes() * 16
        codec = SegmentsCodec(level=19, segments=((0, len(data) - 64, "symbols"),
                                                  (len(data) - 64, 64, "planes4")))
        plain, strong = codec.encode(data), codec.encode(data, strong_symbols=True)
        assert len(strong) <= len(plain)
        assert codec.decode(strong, len(data)) == data == codec.decode(plain, len(data))
        if codes is sparse:
            assert len(strong) < 0.97 * len(plain)


def test_update_keeps_the_predecessor_layout(tmp_path):
    """An update made from a package puts each tensor that package codes where its weights
    file had it (new ones after), so an inplace session can map the new file where it mapped
    the old one; from a model file the layout is back to back. The layout is part of the
    package id."""
    from p2u_onnx.reconstruct import weights_size

    v1 = _mlp(hidden=256)
    v2 = _moved(v1)
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    pkg = encode(p1, tmp_path / "v1.p2u", "4,lossless", budget=FAST, probe=False)
    old = {t["name"]: t["weights"] for t in pkg.manifest["tensors"]}
    assert "b1" not in old  # a vector: kept in the full package's graph
    a = encode_update(p2, tmp_path / "a.p2u", pkg.path).manifest
    b = encode_update(p2, tmp_path / "b.p2u", p1).manifest
    placed = {t["name"]: t["weights"] for t in a["tensors"]}
    assert all(placed[n] == w for n, w in old.items())
    assert placed["b1"][0] >= weights_size(pkg.manifest)  # after the predecessor's file
    flat = [t["weights"] for t in b["tensors"]]
    assert [w[0] for w in flat] == sorted(w[0] for w in flat) and flat[0][0] == 0
    assert placed != {t["name"]: t["weights"] for t in b["tensors"]}
    assert a["package_id"] != b["package_id"]
    for upd, src in ((tmp_path / "a.p2u", pkg.path), (tmp_path / "b.p2u", p1)):
        assert weights_digest(apply_update(upd, held_state(src)).model) == weights_digest(v2)


def test_inplace_update_failed_probe_keeps_v1(live_pair, tmp_path, monkeypatch):
    """A stage 0 patched into the live inplace session whose probe fails goes back: the
    session answers as v1 bit for bit (coded weights and the biases it gives by name), and
    takes the update afterwards."""
    from p2u_onnx.errors import PatchError
    from p2u_onnx.probe import Probe
    from p2u_onnx.runtime import ProgressiveSession

    d, v, outs = live_pair
    with ProgressiveSession(d / "v1.p2u", workdir=tmp_path / "w", strategy="inplace") as s:
        s.upgrade(background=False)
        session = s._live.session
        assert "b1" in s._live.extras
        real = Probe.check
        seen = []

        def failing(self, run, k):
            seen.append(run(None, {"x": X})[0])  # what the patched session answers
            raise PatchError("probe: outputs differ (forced)")

        monkeypatch.setattr(Probe, "check", failing)
        with pytest.raises(PatchError, match="forced"):
            s.update(d / "u12.p2u", until=0)
        assert seen and not np.array_equal(seen[0], outs[0])  # it was patched, then undone
        assert s._live.session is session and s._strategy == "inplace"
        assert np.array_equal(s.run(None, {"x": X})[0], outs[0])
        assert [p.name for p in s._dir.glob("weights-*.bin")] == ["weights-2.bin"]
        monkeypatch.setattr(Probe, "check", real)
        assert s.update(d / "u12.p2u") == 2 and s._live.session is session
        assert np.array_equal(s.run(None, {"x": X})[0], outs[1])


def test_inplace_update_of_a_changed_graph_builds_a_new_session(tmp_path, caplog):
    """A graph that changes (a layer added) cannot be patched into the live session: the
    inplace session builds one for the update's stage 0 and stays inplace."""
    from p2u_onnx.runtime import ProgressiveSession

    v1, v2 = _mlp(hidden=256), _moved(_mlp(hidden=256, extra=True))
    p1, p2 = _save(v1, tmp_path / "v1.onnx"), _save(v2, tmp_path / "v2.onnx")
    pkg = encode(p1, tmp_path / "v1.p2u", "4,lossless", budget=FAST, name="g", version=1)
    encode_update(p2, tmp_path / "u.p2u", pkg.path, name="g", version=2)
    with ProgressiveSession(pkg.path, workdir=tmp_path / "w", strategy="inplace") as s:
        s.upgrade(background=False)
        session = s._live.session
        with caplog.at_level("INFO", logger="p2u_onnx.runtime"):
            assert s.update(tmp_path / "u.p2u") == 1
        assert s._live.session is not session and s._strategy == "inplace"
        assert "not patched in place: weight W3 is new" in caplog.text  # said, not silent
        assert np.allclose(s.run(None, {"x": X})[0], _run(v2, X), atol=1e-5)


def test_graph_structure_ignores_only_what_is_given():
    """graph_structure: base.bin offsets and the values of given initializers do not count;
    a node, an attribute or another initializer's value does."""
    from p2u_onnx.external import graph_structure, initializer_names

    def skeleton(b_off=0, w_val=1.0, op="Relu", b_where="base.bin"):
        m = _mlp(hidden=16)
        for t in m.graph.initializer:
            if t.name == "b1":
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                for k, val in (("location", b_where), ("offset", str(b_off)), ("length", "64")):
                    t.external_data.add(key=k, value=val)
            if t.name == "W2":
                t.CopyFrom(numpy_helper.from_array(
                    np.full((16, 32), w_val, np.float32), "W2"))
        m.graph.node[2].op_type = op
        return m.SerializeToString()

    given = frozenset({"b1"})
    ref = graph_structure(skeleton(), given)
    assert initializer_names(skeleton()) == ["W1", "b1", "W2"]
    assert graph_structure(skeleton(b_off=4096), given) == ref
    assert graph_structure(skeleton(b_where="weights.bin"), given) == ref  # given
    assert graph_structure(skeleton(b_off=4096), frozenset()) == \
        graph_structure(skeleton(), frozenset())  # a base.bin offset never counts
    assert graph_structure(skeleton(b_where="weights.bin"), frozenset()) != \
        graph_structure(skeleton(), frozenset())
    assert graph_structure(skeleton(w_val=2.0), given) != ref
    assert graph_structure(skeleton(op="Sigmoid"), given) != ref


def test_update_base_is_decoded_in_short_jobs(tmp_path, monkeypatch):
    """A live session decodes an update's base.bin in jobs of at most a step each, every one
    inside its pace (a long call beside the runs held them up), into a file byte for byte what
    the one-call path gives; a digest the manifest does not list is refused before anything is
    written, decoded bytes that do not match remove the file, and a declared size beyond the
    free disk or the memory left is refused before anything is decoded."""
    import contextlib

    from p2u_onnx.codecs import STEP, get_codec
    from p2u_onnx.reconstruct import extract_file_into, extract_update_files

    p1 = _save(_mlp(hidden=512), tmp_path / "v1.onnx")
    p2 = _save(_moved(_mlp(hidden=512)), tmp_path / "v2.onnx")
    res = encode_update(p2, tmp_path / "u.p2u", p1)
    sf0 = read_stage(tmp_path / "u.p2u" / "stage-0.p2u")
    ref = extract_update_files(sf0, res.manifest, lambda: None)["base.bin"]
    jobs = [0]

    @contextlib.contextmanager
    def pace():
        jobs[0] += 1
        yield

    dest = tmp_path / "base.bin"
    parts = extract_update_files(sf0, res.manifest, lambda: None, dest, pace)
    assert "base.bin" not in parts and "graph.onnx" in parts
    assert dest.read_bytes() == ref
    assert jobs[0] >= 2 * -(-len(ref) // STEP)  # decoded, then hashed, a step at a time
    # the segments decoder gives the same bytes with any step, one job per step at least
    entry = next(e for e in sf0.entries if e["name"] == "base.bin")
    codec = get_codec(entry["codec"])
    assert type(codec).__name__ == "SegmentsCodec"
    jobs[0] = 0
    out = np.zeros(len(ref), np.uint8)
    codec.decode_into(sf0.data(entry), out, pace, step=4096)
    assert out.tobytes() == ref and jobs[0] >= len(ref) // 4096
    # the manifest lists another digest than the entry: refused, nothing written
    listed = next(f for f in res.manifest["base_model"]["files"] if f["path"] == "base.bin")
    with pytest.raises(IntegrityError, match="differs from what the manifest lists"):
        extract_file_into(sf0, "base.bin", tmp_path / "a.bin", len(ref), "1" * 64, pace)
    assert not (tmp_path / "a.bin").exists()
    # an entry and a manifest that agree on a digest the bytes do not have: the file goes
    entry["sha256"] = "2" * 64
    with pytest.raises(IntegrityError, match="corrupt"):
        extract_file_into(sf0, "base.bin", tmp_path / "b.bin", len(ref), "2" * 64, pace)
    assert not (tmp_path / "b.bin").exists()
    assert listed["sha256"] != "2" * 64
    # a file larger than the work folder's free space: refused before anything is decoded
    import collections

    from p2u_onnx import reconstruct

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(reconstruct.shutil, "disk_usage",
                        lambda path: usage(len(ref), 1, len(ref) - 1))
    jobs[0] = 0
    with pytest.raises(P2UError, match=f"{len(ref)} bytes, more than the {len(ref) - 1} free"):
        extract_file_into(sf0, "base.bin", tmp_path / "c.bin", len(ref), "2" * 64, pace)
    assert not (tmp_path / "c.bin").exists() and jobs[0] == 0
    # or than the memory left: refused the same way
    monkeypatch.undo()
    monkeypatch.setattr(reconstruct, "memory_left", lambda: (len(ref), "a test limit"))
    with pytest.raises(P2UError, match=f"about {2 * len(ref)} bytes of memory, {len(ref)} are"):
        extract_file_into(sf0, "base.bin", tmp_path / "c.bin", len(ref), "2" * 64, pace)
    assert not (tmp_path / "c.bin").exists() and jobs[0] == 0
