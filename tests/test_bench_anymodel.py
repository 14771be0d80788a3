"""The scoring helpers of scripts/thirdparty.py and scripts/bench_anymodel.py, offline.

No model is downloaded here: the metrics, decoders and target checks are fed hand-made outputs
whose right answers are known.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_anymodel as bench  # noqa: E402
import thirdparty as tp  # noqa: E402


def test_registry_has_the_new_kinds_with_pinned_hashes():
    names = tp.list_models()
    for name in ("swift-f0", "basic-pitch", "dnsmos", "plcmos", "lac", "effword-resnet50",
                 "ddddocr-det", "layout-cdla"):
        assert name in names
        src = tp.model_info(name).source
        assert len(src.sha256) == 64 and src.size > 0
    assert len(names) == len(set(names)) >= 15


def test_box_f1_counts_one_to_one_matches_of_the_same_class():
    ref = np.array([[0, 0, 10, 10, 0], [20, 20, 30, 30, 1]], float)
    assert tp._box_f1(ref, ref) == 1.0
    shifted = ref + np.array([1, 1, 1, 1, 0])  # IoU 81/119 = 0.68 >= 0.5
    assert tp._box_f1(ref, shifted) == 1.0
    wrong_class = ref.copy()
    wrong_class[1, 4] = 0
    assert tp._box_f1(ref, wrong_class) == pytest.approx(0.5)
    # two candidates on one reference box: only one may match
    dup = np.array([[0, 0, 10, 10, 0], [0, 0, 10, 10, 0]], float)
    assert tp._box_f1(ref[:1], dup) == pytest.approx(2 / 3)
    assert tp._box_f1(np.zeros((0, 5)), np.zeros((0, 5))) == 1.0
    assert tp._box_f1(ref, np.zeros((0, 5))) == 0.0


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    keep = tp._nms(boxes, np.array([0.5, 0.9, 0.7]), 0.45)
    assert keep == [1, 2]


def test_viterbi_follows_the_transitions():
    emissions = np.array([[2.0, 0.0], [0.0, 0.1], [0.0, 0.1]])
    free = np.zeros((2, 2))
    assert list(tp._viterbi(emissions, free)) == [0, 1, 1]
    sticky = np.array([[0.0, -5.0], [-5.0, 0.0]])  # switching tags costs more than it gains
    assert list(tp._viterbi(emissions, sticky)) == [0, 0, 0]


def test_pitch_agreement_checks_voicing_and_cents():
    pitch = np.array([[100.0, 200.0, 300.0, 400.0]])
    conf = np.array([[0.95, 0.95, 0.2, 0.95]])
    ref = [[pitch, conf]]
    assert tp._pitch_agreement(ref, ref) == 1.0
    # frame 0 off by 100 cents, frame 2 stays unvoiced at any pitch, frame 3 loses its voicing
    cand = [[pitch * np.array([[2 ** (100 / 1200), 1, 3, 1]]), np.array([[0.95, 0.95, 0.3, 0.5]])]]
    assert tp._pitch_agreement(ref, cand) == pytest.approx(0.5)


def test_mos_within_tolerance():
    score = tp._mos_within(0, 0.1)
    ref = [[np.float32(3.0)], [np.float32(2.0)]]
    assert score(ref, [[np.float32(3.05)], [np.float32(2.3)]]) == pytest.approx(0.5)


def test_picodet_decode_finds_one_box_of_the_right_class():
    sizes = [(100 * 76), (50 * 38), (25 * 19), (13 * 10)]
    scores = [np.zeros((1, n, 10), np.float32) for n in sizes]
    boxes = [np.zeros((1, n, 32), np.float32) for n in sizes]
    scores[0][0, 0, 3] = 0.9  # anchor (0,0) at stride 8, class 3
    d = tp._picodet_decode(scores + boxes)
    assert len(d) == 1 and d[0].shape == (1, 5) and d[0][0, 4] == 3
    # uniform distributions over 8 bins: 3.5 bins * stride 8 = 28 pixels each side of (4,4)
    assert np.allclose(d[0][0, :4], [4 - 28, 4 - 28, 4 + 28, 4 + 28])


def test_yolox_decode_uses_the_grid_and_score_threshold():
    out = np.zeros((1, 3549, 6), np.float32)
    out[0, :, 4] = -1  # objectness below threshold everywhere ...
    out[0, 53, :] = [0.5, 0.5, 0.0, 0.0, 0.9, 0.9]  # ... but here: row 1, column 1 of stride 8
    d = tp._yolox_decode([out])[0]
    assert d.shape == (1, 5)
    assert np.allclose(d[0, :4], [12 - 4, 12 - 4, 12 + 4, 12 + 4])


def _model_with(tensors: list[TensorProto]) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [t.name], [t.name + "_out"]) for t in tensors]
    outs = [helper.make_tensor_value_info(t.name + "_out", t.data_type, list(t.dims))
            for t in tensors]
    graph = helper.make_graph(nodes, "g", [], outs, initializer=tensors)
    return helper.make_model(graph)


def test_fp32_equivalent_bytes_counts_fp16_at_four_bytes():
    w16 = numpy_helper.from_array(np.ones((10, 10), np.float16), "w16")
    w32 = numpy_helper.from_array(np.ones((5,), np.float32), "w32")
    idx = numpy_helper.from_array(np.arange(3, dtype=np.int64), "idx")
    fp32eq, actual, dtypes = bench.fp32_equivalent_bytes(_model_with([w16, w32, idx]))
    assert fp32eq == 400 + 20 + 24
    assert actual == 200 + 20 + 24
    assert dtypes == {"fp16": 1, "fp32": 1}


def test_tensor_bytes_map_sees_a_changed_byte():
    a = numpy_helper.from_array(np.arange(4, dtype=np.float32), "a")
    m1 = _model_with([a])
    b = numpy_helper.from_array(np.arange(4, dtype=np.float32) + np.float32(1e-7), "a")
    m2 = _model_with([b])
    assert bench._tensor_bytes_map(m1) == bench._tensor_bytes_map(_model_with([a]))
    assert bench._tensor_bytes_map(m1) != bench._tensor_bytes_map(m2)


def _row(**kw):
    row = {"model": "m", "metric": "top1", "errors": [], "stage_bytes": [1, 2],
           "base_onnx_loads": True, "stage0_agreement": 0.99, "base_share": 0.15,
           "last_stage_bit_exact": True, "verify_lossless_match": True,
           "stage0_latency_ratio": 1.0, "package_vs_zstd": 0.9}
    row.update(kw)
    return row


def test_missed_targets():
    assert bench.missed_targets(_row()) == []
    missed = bench.missed_targets(_row(stage0_agreement=0.95, base_share=0.25,
                                       stage0_latency_ratio=1.3, package_vs_zstd=1.2,
                                       verify_lossless_match=None))
    assert missed == ["base agreement 0.9500 < 0.97", "base share 25.0% > 20%",
                      "last stage not bit-exact", "stage-0 latency 1.30x > 1.1x",
                      "package 1.20x of zstd -19"]
    # embeddings need cosine >= 0.99
    assert bench.missed_targets(_row(metric="cosine", stage0_agreement=0.985)) == [
        "base agreement 0.9850 < 0.99"]
    assert bench.missed_targets({"model": "m", "metric": "top1", "errors": ["boom"]}) == [
        "no package: boom"]


def test_markdown_has_one_row_per_model_and_the_missed_targets():
    rows = [_row(model="a", fp32_equivalent_bytes=4_000_000, float_dtypes={"fp32": 3},
                 stage_bits=[4, 8, "lossless"], stage_agreement=[0.99, 1.0, 1.0],
                 stage_cumulative_share=[0.15, 0.4, 0.9], base_onnx_agreement=0.99,
                 base_onnx_latency_ratio=1.2, package_without_probe_vs_zstd=0.8,
                 encode_seconds=3.0, encoder_output=["UserWarning: x"], notes=["n"]),
            {"model": "b", "metric": "top1", "errors": ["encode: P2UError: bad"],
             "fp32_equivalent_bytes": 1000, "encode_seconds": 1.0}]
    md = bench.markdown(rows)
    assert "| a | top1 | 4.00 (fp32) | 15.0% | 0.9900 / 0.9900 |" in md
    assert "UserWarning: x<br>note: n" in md
    assert "| b | no package: encode: P2UError: bad |" in md
    assert "| a | none |" in md


def test_tensor_bytes_map_matches_a_constant_lifted_to_an_initializer():
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    const = helper.make_node("Constant", [], ["w"], value=w)
    ident = helper.make_node("Identity", ["w"], ["y"])
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    as_constant = helper.make_model(helper.make_graph([const, ident], "g", [], out))
    as_initializer = helper.make_model(helper.make_graph([ident], "g", [], out, initializer=[w]))
    assert bench._tensor_bytes_map(as_constant) == bench._tensor_bytes_map(as_initializer)


def test_captured_collects_prints_warnings_logs_and_fd2():
    import logging
    import os
    import warnings

    with bench.captured() as lines:
        print("printed")
        warnings.warn("warned")
        logging.getLogger("x").warning("logged")
        os.write(2, b"\x1b[1;31mnative line\x1b[m\n")
    assert "UserWarning: warned" in lines
    assert "log warning: logged" in lines
    assert "printed" in lines
    assert "native line" in lines
