"""scripts/sweep_exporters.py on the models it can make without torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sweep_exporters  # noqa: E402


def test_sweep_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert sweep_exporters.main(["--out", str(tmp_path / "sweep"), "--only",
                                 "skl-knn,if-branches", "--json", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())}
    knn, branches = rows["skl-knn"], rows["if-branches"]
    # the k-NN weights (its training set) are a palette: exact at stage 0, calibrated
    assert knn["lossless"] and knn["probe"] and knn["calibrated"]
    assert knn["cosine"] == pytest.approx(1.0) and knn["package_vs_zstd19"] < 1.0
    # weights in If branches are coded (bit-exact at the end), calibration says it cannot run
    assert branches["lossless"] and branches["probe"] and not branches["calibrated"]
    assert branches["cosine"] > 0.99
    assert any("calibration skipped" in w for w in branches["warnings"])
    table = capsys.readouterr().out
    assert "| skl-knn |" in table and "| if-branches |" in table
