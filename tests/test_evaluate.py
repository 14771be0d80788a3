"""scripts/evaluate.py --quick: runs end to end and writes a report made of measured numbers."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_evaluation_writes_a_report(tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--quick",
                        "--out", str(out), "--repeats", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "versions:" in r.stdout and "machine:" in r.stdout

    md = (out / "results.md").read_text()
    for heading in ("## First answer", "## Last answer", "## Fixed-bit bases",
                    "## The paper's plain scheme", "### digits-cnn", "### sklearn-mlp",
                    "## Measured transfer"):
        assert heading in md
    assert "onnxruntime" in md and not re.search(r"\bnan\b", md, re.IGNORECASE)

    results = json.loads((out / "work" / "results.json").read_text())
    cnn = next(s for s in results["subjects"] if s["name"] == "digits-cnn")
    assert 0.9 < cnn["reference"]["accuracy"] <= 1.0
    default = next(p for p in cnn["plans"] if p["adaptive"])
    stages = default["stages"]
    # bytes grow stage by stage; the base is a small share of the file; the last stage is exact
    assert all(a["cum_bytes"] < b["cum_bytes"] for a, b in zip(stages, stages[1:]))
    assert 0 < stages[0]["share"] < 0.5
    assert stages[0]["seconds"] == stages[0]["cum_bytes"] * 8 / 1e6
    assert stages[-1]["exact"] and stages[-1]["metrics"] == cnn["reference"]
    assert 0.5 < stages[0]["metrics"]["accuracy"] <= 1.0
    int8 = next(a for a in cnn["alternatives"] if a["method"].startswith("ORT quantize_dynamic"))
    assert int8["error"] is None and 0 < int8["wire_bytes"] < cnn["file_bytes"]
    assert 0.5 < int8["metrics"]["accuracy"] <= 1.0
    plain = cnn["plain"]
    assert plain and all(p["update_raw"] == 4 * p["coded_weights"] for p in plain)

    # the report's default-plan row shows the measured share, not a placeholder
    share = f"{100 * stages[0]['share']:.1f}%"
    assert re.search(rf"\| default \(adaptive\) 4,8,L \| 0 \| 4 \|[^\n]*{re.escape(share)}", md)
