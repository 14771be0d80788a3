"""scripts/first_stage_variants.py on the committed digits v1 -> v2 pair: each variant codes
the first stage as it says, the encoder is left as it was, and the figures are real."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def fsv():
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import first_stage_variants

    return first_stage_variants


def _first_codes(package: Path) -> set[int]:
    """The code types of the first stage's delta codes (26: sign codes, 22/3: the grid)."""
    m = json.loads((package / "manifest.json").read_text())
    return {t["base"]["code_type"] for t in m["tensors"] if t.get("update") == "delta"}


def test_variants_code_what_they_name(fsv, tmp_path):
    from p2u_onnx import updates

    before = updates._exact_grid_step
    pair = {p.name: p for p in fsv.up.pairs(include_minilm=False)}["digits v1->v2"]
    v1 = fsv.ua.split_model(pair.v1).weights
    v2 = fsv.ua.split_model(pair.v2).weights
    got = {}
    for variant in ("auto", "1", "grid:1"):
        r = fsv.run(pair, variant, tmp_path)
        assert updates._exact_grid_step is before  # the patch is undone
        slug = "".join(c if c.isalnum() else "_" for c in f"{pair.name}-{variant}")
        r["codes"] = _first_codes(tmp_path / f"{slug}.p2u")
        r["delta_error"] = fsv.delta_error(v1, v2, r.pop("got"))
        got[variant] = r
    assert got["1"]["codes"] == {26}  # sign codes everywhere
    assert 26 not in got["auto"]["codes"]  # tuned tensors on the grid
    assert 26 not in got["grid:1"]["codes"]
    # a finer step than auto's (EXACT_STEP x the shared step): more bytes, less error
    assert got["grid:1"]["stage0"] > got["auto"]["stage0"]
    assert got["grid:1"]["delta_error"] < got["auto"]["delta_error"]
    for r in got.values():
        assert 0.3 < r["delta_error"] < 0.9  # a first stage: part of the delta, not all of it
        assert 0.95 < r["metric"] <= 1.0  # digits accuracy
        assert r["total"] > r["stage0"]
    # nothing changed: the delta error is 0 against v2 itself, 1 against v1
    assert fsv.delta_error(v1, v2, v2) == 0.0
    assert fsv.delta_error(v1, v2, v1) == pytest.approx(1.0)


def test_unknown_variant_refused(fsv, tmp_path):
    pair = fsv.up.pairs(include_minilm=False)[0]
    with pytest.raises(SystemExit, match="unknown variant"):
        fsv.run(pair, "3bits", tmp_path)


def test_bench_takes_one_grid_variant(fsv):
    from p2u_onnx import updates

    before = updates._exact_grid_step
    for variants in ("auto", "auto,grid:1.5", "grid:0", "grid:x"):
        with pytest.raises(SystemExit):
            fsv.main(["--variants", variants, "--bench", "--no-minilm"])
    assert updates._exact_grid_step is before
