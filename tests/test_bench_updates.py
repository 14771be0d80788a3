"""Smoke test of scripts/bench_updates.py: a real run on the committed digits v1 -> v2 pair and
a two-round "federated" sequence (digits v1, v2, v3), with the numbers it measures checked."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
V1 = ROOT / "models" / "digits_cnn.onnx"
V2 = ROOT / "models" / "updates" / "digits_cnn_v2.onnx"
V3 = ROOT / "models" / "updates" / "digits_cnn_v3.onnx"

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import bench_updates

    tmp = tmp_path_factory.mktemp("bench_updates")
    fed = tmp / "fed"
    fed.mkdir()
    rounds = []
    for r, src in enumerate((V1, V2, V3)):
        shutil.copyfile(src, fed / f"round-{r:02d}.onnx")
        rounds.append({"round": r, "file": f"round-{r:02d}.onnx"})
    (fed / "rounds.json").write_text(json.dumps({"rounds": rounds}))
    out = tmp / "out"
    plot = tmp / "fed.png"
    rc = bench_updates.main(["--pairs", "digits v1->v2", "--fedavg-dir", str(fed),
                             "--out", str(out), "--plot", str(plot)])
    assert rc == 0
    return json.loads((out / "results.json").read_text()), out, plot


def test_pair_stages_and_anchors(bench):
    res, out, _ = bench
    (pair,) = res["pairs"]
    fp32 = V2.stat().st_size
    assert pair["fp32_bytes"] == fp32
    assert pair["v2_metric"] > 0.97 and pair["v1_metric"] > 0.97
    upd = pair["update"]
    assert upd is not None, pair["update_error"]
    stages = upd["stages"]
    assert len(stages) >= 2
    # a coarse first stage, small and close to v2; the last stage exact
    assert 0 < stages[0]["bytes"] < 0.1 * fp32
    assert stages[0]["metric"] >= pair["v2_metric"] - 0.01
    assert 0 < stages[0]["weight_rel_error"] < 0.2
    assert not stages[0]["exact"]
    assert stages[-1]["exact"] and stages[-1]["weight_rel_error"] == 0.0
    assert stages[-1]["metric"] == pair["v2_metric"]
    assert upd["total"] == stages[-1]["cum_bytes"] == sum(upd["wires"])
    assert upd["total"] < fp32
    assert stages[-1]["cum_share_fp32"] == pytest.approx(upd["total"] / fp32)
    anchors = {a["method"]: a for a in pair["anchors"]}
    for name in ("zstd -19 of v2", "XOR + byte grouping + zstd -19"):
        assert anchors[name]["error"] is None and anchors[name]["exact"], name
    # deltas against v1 are smaller than v2 alone; everything is smaller than fp32
    assert anchors["XOR + byte grouping + zstd -19"]["wire_bytes"] < \
        anchors["zstd -19 of v2"]["wire_bytes"] < fp32
    zipnn = ("ZipNN of v2", "ZipNN delta vs v1")
    if importlib.util.find_spec("zipnn") is None:  # the bench extra's; it needs torch
        for name in zipnn:  # said, not silently dropped
            assert "zipnn missing" in anchors[name]["error"] and not anchors[name]["exact"]
    else:
        for name in zipnn:
            assert anchors[name]["error"] is None and anchors[name]["exact"], name
        assert anchors["ZipNN delta vs v1"]["wire_bytes"] < anchors["ZipNN of v2"]["wire_bytes"]
    assert 0 < pair["full"]["base"] < pair["full"]["total"] < fp32
    parts = upd["stage0_parts"]
    assert parts["manifest"] + parts["stage_files"] + parts["probe"] == stages[0]["bytes"]
    # the live update: a session on v1's full package moves to v2 and answers as v2
    live = upd["live"]
    assert "error" not in live, live.get("error")
    assert live["outputs_equal_v2"] is True and live["last_stage"] == len(stages) - 1
    assert live["stage0_s"] > 0 and live["rest_s"] > 0
    md = (out / "results.md").read_text()
    assert "digits v1->v2" in md and "### Targets" in md


def test_federated_rounds_and_plot(bench):
    res, _, plot = bench
    rounds = res["fedavg"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["exact_ok"]
        assert 0 < r["follow_bytes"] < r["exact_update"] < r["fp32_bytes"]
        assert r["follow_metric"] > 0.95
        assert 0 < r["follow_weight_rel_error"] < 0.2
        # the follower of round 2 holds round 1 at stage 0: its update is bound to that state
    assert rounds[1]["follow_predecessor"].get("stage") == 0
    assert "package_id" in rounds[1]["follow_predecessor"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_table(bench):
    res, _, _ = bench
    rows = res["targets"]
    by = {(r["target"], r["subject"]): r for r in rows}
    exact = by[("exact v2 < best lossless delta anchor", "digits v1->v2")]
    assert exact["status"] in ("met", "MISSED") and "kB" in exact["figure"]
    first = by[("first stage within 0.5% of v2's metric at <= 5% of fp32", "digits v1->v2")]
    assert first["status"] in ("met", "MISSED") and "% of fp32" in first["figure"]
    fed = [r for r in rows if r["subject"] == "2 rounds"]
    assert len(fed) == 4 and all(r["status"] in ("met", "MISSED") for r in fed)
    # the status follows the figures
    pair = res["pairs"][0]
    s0 = pair["update"]["stages"][0]
    want = s0["share_fp32"] <= 0.05 and s0["metric"] >= pair["v2_metric"] * 0.995
    assert (first["status"] == "met") == want
