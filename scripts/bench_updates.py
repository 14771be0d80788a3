"""Benchmark model updates (``p2u encode v2.onnx --from v1``) on real version pairs and a
federated run, beside the anchors, and check the targets of the updates issue.

Per pair (``scripts/updatepairs.py``; the models are made by ``scripts/make_update_pairs.py``
and ``scripts/make_minilm_update.py``):

* the update package of v2 against v1 (the default update plan, or ``--plan``): per stage the
  bytes on the wire as a share of v2's fp32 file and of v2's full p2u package, v2's task metric
  reached at that stage (and relative to v2's), the relative L2 error of the weights against
  v2, the time to encode and to apply stages 0..k to v1; the last stage is checked bit-exact;
* the anchors, in the same run (``scripts/update_anchors.py``): the full p2u package of v2 (and
  its base stage), zstd -19 of v2, ZipNN of v2, ZipNN's delta of v2 against v1, XOR of the bit
  patterns with byte grouping + zstd -19, and the plain fp32 difference at zstd -19.

Federated (``build/updates/fedavg``, or ``--fedavg-dir``): the global model of every round is
shipped to two kinds of devices:

* *followers* run each round at the update's first stage (stage 0): round r's update is coded
  against exactly what they hold (round r-1 at stage 0 of its update), so the error does not
  add up; their accuracy and weight error are measured every round;
* *exact* devices take every round bit for bit (each update to its last stage, coded against
  the previous round exact);

against the full base stage of each round (what a device would fetch without updates), the
full package, and the anchors of each round against the previous one; cumulative bytes over
the rounds are plotted (``--plot``, default ``docs/updates-fedavg.png``).

Then a table checks the issue's targets (met / missed, with the figures). Results go to
``build/bench_updates/results.json`` and ``results.md``.

Usage::

    python scripts/bench_updates.py                  # every available pair + the federated run
    python scripts/bench_updates.py --no-minilm      # the small pairs only (about a minute)
    python scripts/bench_updates.py --pairs "digits v1->v2" --rounds 3

Timings are wall clock on a shared machine (one onnxruntime thread for the metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import update_anchors as ua  # noqa: E402
import updatepairs as up  # noqa: E402

ROOT = up.ROOT
DEFAULT_OUT = ROOT / "build" / "bench_updates"
DEFAULT_PLOT = ROOT / "docs" / "updates-fedavg.png"

# The targets
FIRST_STAGE_SHARE = 0.05  # first update stage <= 5% of v2's fp32 bytes (fine-tuning pairs)
METRIC_TOLERANCE = 0.005  # ... within 0.5% (relative) of v2's metric
FOLLOWER_SHARE = 0.25  # federated followers: <= 1/4 of each round's full base stage


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------
# Packages
# ------------------------------------------------------------------------------------------


def wire_bytes(package: Path) -> list[int]:
    """Bytes a device downloads for each stage of a package (not cumulative).

    Stage 0: ``manifest.json``, its stage file(s) (for a full package the smaller of
    ``stage-0.p2u`` and ``base.onnx`` + ``base.bin``, as ``HttpSource`` picks) and the probe
    file if any. Stage k: its stage file(s).
    """
    manifest = json.loads((package / "manifest.json").read_text())
    stage0 = sum(f["size"] for f in manifest["stages"][0]["files"])
    if "predecessor" not in manifest and manifest.get("base_model"):
        stage0 = min(stage0, sum(f["size"] for f in manifest["base_model"]["files"]))
    probe = manifest["probe"].get("size", 0) if manifest.get("probe") else 0
    first = (package / "manifest.json").stat().st_size + stage0 + probe
    return [first] + [sum(f["size"] for f in st["files"]) for st in manifest["stages"][1:]]


def stage0_parts(package: Path) -> dict[str, int]:
    """What stage 0's wire bytes are made of: the manifest, the stage file(s), the probe."""
    manifest = json.loads((package / "manifest.json").read_text())
    return {"manifest": (package / "manifest.json").stat().st_size,
            "stage_files": sum(f["size"] for f in manifest["stages"][0]["files"]),
            "probe": manifest["probe"].get("size", 0) if manifest.get("probe") else 0}


def full_package(model: Path, out: Path) -> dict[str, Any]:
    """Encode ``model`` as a full p2u package (default plan and bit budget)."""
    from p2u_onnx.encoder import encode

    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = encode(str(model), str(out), version=1)
    wires = wire_bytes(out)
    return {"path": str(out), "stages": wires, "base": wires[0], "total": sum(wires),
            "plan": res.manifest["plan"], "encode_s": res.seconds}


def _updates_api():
    """The update encoder / decoder, or the reason it cannot be imported."""
    try:
        from p2u_onnx import updates
    except ImportError as e:
        return None, f"p2u_onnx.updates not available ({e})"
    return updates, None


def _weights(model_bytes: bytes) -> dict[str, np.ndarray]:
    m = onnx.load_model_from_string(model_bytes)
    tmp = Path(ROOT / "build" / "bench_updates" / ".tmp.onnx")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(tmp))
    try:
        return ua.split_model(tmp).weights
    finally:
        tmp.unlink(missing_ok=True)


def rel_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Relative L2 error of all float weights of ``got`` against ``want`` (same keys)."""
    num = den = 0.0
    for k, w in want.items():
        g = got.get(k)
        if g is None or g.shape != w.shape:
            num += float(np.sum(w.astype(np.float64) ** 2))
        else:
            num += float(np.sum((g.astype(np.float64) - w) ** 2))
        den += float(np.sum(w.astype(np.float64) ** 2))
    return (num / den) ** 0.5 if den else 0.0


def run_update(api, base_from, v2: Path, out: Path, metric, plan: str | None,
               v2_weights: dict[str, np.ndarray], stages: list[int] | None = None
               ) -> dict[str, Any]:
    """Encode v2 as an update against ``base_from`` and measure every stage (or ``stages``).

    ``base_from`` is what the encoder takes (a model path, a package, or a held state)."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kw = {} if plan is None else {"plan": plan}
    held = api.held_state(base_from)
    res = api.encode_update(str(v2), str(out), held, version=2, **kw)
    wires = wire_bytes(out)
    n = len(wires)
    rows = []
    last_held = None
    for k in range(n) if stages is None else stages:
        t0 = time.perf_counter()
        h = api.apply_update(str(out), held, k)
        apply_s = time.perf_counter() - t0
        blob = h.model.SerializeToString()
        row = {"stage": k, "bits": res.manifest["plan"][k], "bytes": wires[k],
               "cum_bytes": int(sum(wires[:k + 1])), "apply_s": apply_s,
               "exact": bool(h.exact), "weight_rel_error": rel_error(_weights(blob), v2_weights)}
        row["metric"] = metric(blob) if metric is not None else None
        rows.append(row)
        last_held = h
    return {"path": str(out), "plan": res.manifest["plan"], "encode_s": res.seconds,
            "stage0_parts": stage0_parts(out), "stages": rows, "wires": wires, "total": int(sum(wires)), "held": last_held,
            "predecessor": res.manifest.get("predecessor")}


def live_update(v1_package: Path, update: Path, v2: Path, work: Path) -> dict[str, Any]:
    """A ``ProgressiveSession`` serving v1 (a full package at its last stage) moves live to v2:
    ``update(until=0)`` then ``upgrade()`` to the last stage; times of each, and whether the
    session's outputs equal v2's (onnxruntime on the v2 file) on a real input at the end."""
    from p2u_onnx.runtime import ProgressiveSession

    feed = up.check_feed(v2)
    want = up.session(v2).run(None, feed)
    wd, state = work / "live", work / "live-state"
    for d in (wd, state):
        if d.exists():
            shutil.rmtree(d)
    state.mkdir(parents=True)
    # a device of its own: its remembered versions (rollback protection) start empty
    old_state = os.environ.get("P2U_STATE_DIR")
    os.environ["P2U_STATE_DIR"] = str(state)
    try:
        return _live(ProgressiveSession, v1_package, update, wd, feed, want)
    finally:
        if old_state is None:
            os.environ.pop("P2U_STATE_DIR", None)
        else:
            os.environ["P2U_STATE_DIR"] = old_state


def _live(ProgressiveSession, v1_package: Path, update: Path, wd: Path, feed, want
          ) -> dict[str, Any]:
    with ProgressiveSession(str(v1_package), workdir=str(wd)) as s:
        s.upgrade(background=False)
        t0 = time.perf_counter()
        s.update(str(update), until=0)
        stage0_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        last = s.upgrade(background=False)
        rest_s = time.perf_counter() - t0
        got = s.run(None, feed)
    same = all(np.array_equal(a, b) for a, b in zip(got, want))
    return {"stage0_s": stage0_s, "rest_s": rest_s, "last_stage": last, "outputs_equal_v2": same}


# ------------------------------------------------------------------------------------------
# Pairs
# ------------------------------------------------------------------------------------------


def run_pair(pair: up.Pair, work: Path, plan: str | None) -> dict[str, Any]:
    log(f"\n== {pair.name}: {pair.v1.relative_to(ROOT)} -> {pair.v2.relative_to(ROOT)} "
        f"({pair.note})")
    fp32 = pair.v2.stat().st_size
    m2 = pair.metric(pair.v2)
    m1 = (pair.v1_metric or pair.metric)(pair.v1)
    log(f"v2 fp32 file {fp32} B; {pair.metric_name}: v1 {m1:.4f}"
        f"{' (its own task)' if pair.v1_metric else ''}, v2 {m2:.4f}")
    slug = "".join(c if c.isalnum() else "_" for c in pair.name)
    full = full_package(pair.v2, work / f"{slug}-full.p2u")
    log(f"full p2u package of v2: {full['total']} B ({full['total'] / fp32:.1%}), base stage "
        f"{full['base']} B ({full['base'] / fp32:.1%}), encoded in {full['encode_s']:.1f} s")
    anchors = ua.all_anchors(pair.v1, pair.v2)
    for a in anchors:
        log(f"anchor {a.method}: {a.wire_bytes} B ({a.wire_bytes / fp32:.1%}), "
            f"{'exact' if a.exact else 'NOT exact'}, {a.seconds:.1f} s; {a.note}"
            + (f"; error: {a.error}" if a.error else ""))
    result: dict[str, Any] = {
        "pair": pair.name, "kind": pair.kind, "fine_tune": pair.fine_tune, "note": pair.note,
        "v1": str(pair.v1.relative_to(ROOT)), "v2": str(pair.v2.relative_to(ROOT)),
        "fp32_bytes": fp32, "metric_name": pair.metric_name, "v1_metric": m1, "v2_metric": m2,
        "v1_metric_own_task": pair.v1_metric is not None,
        "full": full, "anchors": [a.as_dict() for a in anchors], "update": None,
        "update_error": None}
    api, why = _updates_api()
    if api is None:
        result["update_error"] = why
        log(f"update: NOT MEASURED: {why}")
        return result
    v2w = ua.split_model(pair.v2).weights
    upd = run_update(api, str(pair.v1), pair.v2, work / f"{slug}-update.p2u", pair.metric, plan,
                     v2w)
    upd.pop("held")
    for r in upd["stages"]:
        r["share_fp32"] = r["bytes"] / fp32
        r["cum_share_fp32"] = r["cum_bytes"] / fp32
        r["cum_share_package"] = r["cum_bytes"] / full["total"]
        r["metric_rel"] = r["metric"] / m2 if r["metric"] is not None and m2 else None
    result["update"] = upd
    parts = upd["stage0_parts"]
    log(f"update plan {upd['plan']}, encoded in {upd['encode_s']:.2f} s; stage 0 on the wire = "
        f"manifest {parts['manifest']} B + stage file {parts['stage_files']} B + probe "
        f"{parts['probe']} B")
    try:
        v1_full = full_package(pair.v1, work / f"{slug}-v1-full.p2u")
        upd["live"] = live_update(Path(v1_full["path"]), Path(upd["path"]), pair.v2, work)
        lv = upd["live"]
        log(f"live: a session on v1's package took update stage 0 in {lv['stage0_s']:.2f} s, "
            f"the rest in {lv['rest_s']:.2f} s; outputs equal v2's: {lv['outputs_equal_v2']}")
    except Exception as e:  # noqa: BLE001  (reported, not hidden)
        upd["live"] = {"error": f"{type(e).__name__}: {e}"}
        log(f"live update FAILED: {upd['live']['error']}")
    for r in upd["stages"]:
        log(f"  stage {r['stage']} ({r['bits']}): {r['bytes']} B, cumulative "
            f"{r['cum_share_fp32']:.2%} of fp32, {r['cum_share_package']:.1%} of the full "
            f"package; {pair.metric_name} {r['metric']:.4f} ({r['metric_rel']:.2%} of v2); "
            f"weight error {r['weight_rel_error']:.2e}; apply {r['apply_s']:.2f} s"
            f"{'; EXACT' if r['exact'] else ''}")
    return result


def run_chain(work: Path, plan: str | None) -> dict[str, Any] | None:
    """v1 -> v2 -> v3 through two updates: the v2 -> v3 update (coded against v2 exact) must
    apply to v2 reached through the first update, and give v3 bit for bit."""
    api, why = _updates_api()
    if api is None or not (up.DIGITS_V2.is_file() and up.DIGITS_V3.is_file()):
        return None
    kw = {} if plan is None else {"plan": plan}
    a, b = work / "chain-v2-from-v1.p2u", work / "chain-v3-from-v2.p2u"
    for p in (a, b):
        if p.exists():
            shutil.rmtree(p)
    api.encode_update(str(up.DIGITS_V2), str(a), str(up.DIGITS_V1), version=2, **kw)
    api.encode_update(str(up.DIGITS_V3), str(b), str(up.DIGITS_V2), version=3, **kw)
    held = api.apply_update(str(a), api.held_state(str(up.DIGITS_V1)))
    held = api.apply_update(str(b), held)
    v3 = api.held_state(str(up.DIGITS_V3))
    ok = held.exact and held.weights_sha256 == v3.weights_sha256
    refused = None
    try:  # the v2 -> v3 update on v1 must be refused
        api.apply_update(str(b), api.held_state(str(up.DIGITS_V1)))
    except Exception as e:  # noqa: BLE001
        refused = f"{type(e).__name__}: {e}"
    log(f"\nchain v1 -> v2 -> v3 by two updates: {'v3 bit for bit' if ok else 'NOT exact'}; "
        f"v2->v3 update applied to v1: {'refused: ' + refused if refused else 'NOT refused'}")
    return {"exact": bool(ok), "refused_on_v1": refused}


# ------------------------------------------------------------------------------------------
# Federated
# ------------------------------------------------------------------------------------------


def run_fedavg(rounds: list[Path], work: Path, plan: str | None, metric) -> dict[str, Any]:
    log(f"\n== federated: {len(rounds) - 1} rounds ({rounds[0].parent})")
    api, why = _updates_api()
    out: dict[str, Any] = {"folder": str(rounds[0].parent), "rounds": [], "update_error": why}
    rounds_info = up.fedavg_info(rounds[0].parent).get("rounds", [])
    follower = None
    if api is not None:
        follower = api.held_state(str(rounds[0]))
    prev_split = ua.split_model(rounds[0])
    for r in range(1, len(rounds)):
        path = rounds[r]
        fp32 = path.stat().st_size
        cur = ua.split_model(path)
        m = metric(path)
        full = full_package(path, work / "fedavg" / f"round-{r:02d}-full.p2u")
        from p2u_onnx.api import load_stage_model

        base_metric = metric(load_stage_model(full["path"], 0).SerializeToString())
        row: dict[str, Any] = {
            "round": r, "fp32_bytes": fp32, "metric": m, "full_base": full["base"],
            "full_base_metric": base_metric,
            "full_total": full["total"],
            "zstd19": ua.zstd19(path).wire_bytes,
            "zipnn": ua.zipnn_full(cur).wire_bytes}
        for a in (ua.zipnn_delta(prev_split, cur), ua.xor_zstd(prev_split, cur),
                  ua.fp32_diff_zstd(prev_split, cur)):
            row[a.method] = a.wire_bytes
            row[a.method + " exact"] = a.exact
        if api is not None:
            # exact devices: every round to its last stage, coded against the previous round
            ex = run_update(api, str(rounds[r - 1]), path,
                            work / "fedavg" / f"round-{r:02d}-exact.p2u", None, plan,
                            cur.weights, stages=[])
            row["exact_update"] = ex["total"]
            row["exact_encode_s"] = ex["encode_s"]
            t0 = time.perf_counter()
            h = api.apply_update(ex["path"], api.held_state(str(rounds[r - 1])))
            row["exact_apply_s"] = time.perf_counter() - t0
            row["exact_ok"] = bool(h.exact)
            # followers: stage 0 of an update coded against what they hold
            fo = run_update(api, follower, path, work / "fedavg" / f"round-{r:02d}-follow.p2u",
                            metric, plan, cur.weights, stages=[0])
            s0 = fo["stages"][0]
            follower = fo["held"]
            row.update({"follow_bytes": s0["bytes"], "follow_metric": s0["metric"],
                        "follow_metric_rel": s0["metric"] / m if m else None,
                        "follow_weight_rel_error": s0["weight_rel_error"],
                        "follow_apply_s": s0["apply_s"], "follow_encode_s": fo["encode_s"],
                        "follow_stage_file": fo["stage0_parts"]["stage_files"],
                        "follow_predecessor": fo["predecessor"]})
        info_r = rounds_info[r] if r < len(rounds_info) else {}
        if api is not None and info_r.get("clients"):
            row["uplink"] = run_uplink(api, rounds[r - 1], path, info_r, work, plan, metric)
        out["rounds"].append(row)
        prev_split = cur
        msg = (f"round {r:2d}: accuracy {m:.4f}; full base {row['full_base']} B (accuracy "
               f"{base_metric:.4f}), full package "
               f"{row['full_total']} B, ZipNN delta {row['ZipNN delta vs v1']} B, XOR "
               f"{row['XOR + byte grouping + zstd -19']} B")
        if api is not None:
            msg += (f"; exact update {row['exact_update']} B; follower stage 0 "
                    f"{row['follow_bytes']} B ({row['follow_bytes'] / row['full_base']:.1%} of "
                    f"the base), accuracy {row['follow_metric']:.4f} "
                    f"({row['follow_metric_rel']:.2%}), weight error "
                    f"{row['follow_weight_rel_error']:.2e}")
        log(msg)
        ul = row.get("uplink")
        if ul:
            log(f"   uplink: {ul['clients']} clients, stage 0 {np.mean(ul['stage0_bytes']):.0f} B "
                f"each, exact {np.mean(ul['exact_bytes']):.0f} B (XOR + zstd "
                f"{np.mean(ul['xor_bytes']):.0f} B); server FedAvg of stage 0 uploads: accuracy "
                f"{ul['aggregate_stage0_metric']:.4f} vs {ul['round_metric']:.4f}, weight error "
                f"{ul['aggregate_stage0_rel_error']:.2e}; of exact uploads = the round's model: "
                f"{ul['aggregate_exact_equals_round']}")
    return out


def _with_weights(model_path: Path, weights: dict[str, np.ndarray]) -> bytes:
    """``model_path`` with its main-graph float initializers replaced by ``weights``
    (keys as :func:`update_anchors.split_model` names them)."""
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    for t in m.graph.initializer:
        key = f"0/{t.name}"
        if key in weights:
            t.CopyFrom(numpy_helper.from_array(weights[key].astype(np.float32), t.name))
    return m.SerializeToString()


def run_uplink(api, global_prev: Path, global_new: Path, info: dict[str, Any], work: Path,
               plan: str | None, metric) -> dict[str, Any]:
    """The federated uplink of one round: each client encodes its local model as an update
    against the global model it received (exact); the server either restores every upload
    exactly or reads only stage 0 of each, and averages (FedAvg, client weights of the run).
    Returns the bytes per client and the accuracy of both aggregates."""
    folder = global_new.parent
    held = api.held_state(str(global_prev))
    prev = ua.split_model(global_prev)
    w = info["client_weights"]
    s0_bytes, exact_bytes, xor_bytes = [], [], []
    agg0: dict[str, np.ndarray] = {}
    agg_exact: dict[str, np.ndarray] = {}
    for c, (rel, wc) in enumerate(zip(info["clients"], w)):
        cpath = folder / rel
        out = work / "fedavg" / f"{global_new.stem}-client-{c}.p2u"
        if out.exists():
            shutil.rmtree(out)
        api.encode_update(str(cpath), str(out), held, version=2,
                          **({} if plan is None else {"plan": plan}))
        wires = wire_bytes(out)
        s0_bytes.append(wires[0])
        exact_bytes.append(sum(wires))
        local = ua.split_model(cpath)
        xor_bytes.append(ua.xor_zstd(prev, local).wire_bytes)
        got0 = _weights(api.apply_update(str(out), held, 0).model.SerializeToString())
        gotx = api.apply_update(str(out), held)
        if not gotx.exact:
            raise RuntimeError(f"{out}: the last stage is not exact")
        gotx_w = _weights(gotx.model.SerializeToString())
        for k in local.weights:
            agg0[k] = agg0.get(k, 0.0) + wc * got0[k].astype(np.float64)
            agg_exact[k] = agg_exact.get(k, 0.0) + wc * gotx_w[k].astype(np.float64)
    new = ua.split_model(global_new).weights
    same = all(np.array_equal(agg_exact[k].astype(np.float32), new[k]) for k in new)
    m_new = metric(global_new)
    m0 = metric(_with_weights(global_new, agg0))
    return {"clients": len(info["clients"]), "stage0_bytes": s0_bytes, "exact_bytes": exact_bytes,
            "xor_bytes": xor_bytes, "fp32_bytes": global_new.stat().st_size,
            "aggregate_stage0_metric": m0, "round_metric": m_new,
            "aggregate_stage0_rel_error": rel_error(
                {k: v.astype(np.float32) for k, v in agg0.items()}, new),
            "aggregate_exact_equals_round": bool(same)}


# ------------------------------------------------------------------------------------------
# Targets, tables, plot
# ------------------------------------------------------------------------------------------


def _fmt_b(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def targets(pairs: list[dict[str, Any]], fed: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(target: str, subject: str, figure: str, met: bool | None) -> None:
        rows.append({"target": target, "subject": subject, "figure": figure,
                     "status": "not measured" if met is None else ("met" if met else "MISSED")})

    for p in pairs:
        best = ua.best_lossless_delta([ua.Anchor(**a) for a in p["anchors"]])
        upd = p["update"]
        t1 = "exact v2 < best lossless delta anchor"
        if upd is None:
            add(t1, p["pair"], p["update_error"] or "no update", None)
        else:
            last = upd["stages"][-1]
            ok = last["exact"] and best is not None and upd["total"] < best.wire_bytes
            add(t1, p["pair"],
                f"p2u update {_fmt_b(upd['total'])} ({upd['total'] / p['fp32_bytes']:.1%} of "
                f"fp32){'' if last['exact'] else ' NOT EXACT'} vs {best.method if best else '-'} "
                f"{_fmt_b(best.wire_bytes) if best else '-'}"
                + (f" ({upd['total'] / best.wire_bytes:.3f}x)" if best else ""), ok)
        if p["fine_tune"]:
            t2 = "first stage within 0.5% of v2's metric at <= 5% of fp32"
            if upd is None:
                add(t2, p["pair"], p["update_error"] or "no update", None)
            else:
                s0 = upd["stages"][0]
                gap = 1 - s0["metric"] / p["v2_metric"]
                ok = s0["share_fp32"] <= FIRST_STAGE_SHARE and gap <= METRIC_TOLERANCE
                file_share = upd["stage0_parts"]["stage_files"] / p["fp32_bytes"]
                add(t2, p["pair"],
                    f"{s0['share_fp32']:.2%} of fp32 on the wire ({file_share:.2%} for the "
                    f"stage file alone, without manifest and probe), {p['metric_name']} "
                    f"{s0['metric']:.4f} vs v2 {p['v2_metric']:.4f} ({-gap:+.2%})", ok)
    if fed is not None and fed["rounds"]:
        rr = fed["rounds"]
        n = len(rr)
        if fed.get("update_error"):
            add("federated targets", f"{n} rounds", fed["update_error"], None)
        else:
            shares = [r["follow_bytes"] / r["full_base"] for r in rr]
            worst = max(shares)
            files = max(r["follow_stage_file"] / r["full_base"] for r in rr)
            add("followers: stage 0 <= 1/4 of each round's full base stage", f"{n} rounds",
                f"worst round {worst:.1%}, all rounds "
                f"{sum(r['follow_bytes'] for r in rr) / sum(r['full_base'] for r in rr):.1%} "
                f"(stage file alone: worst {files:.1%})", worst <= FOLLOWER_SHARE)
            gaps = [1 - r["follow_metric_rel"] for r in rr]
            add("followers: metric within 0.5% of each round's model", f"{n} rounds",
                f"worst round {-max(gaps):+.2%} (round {int(np.argmax(gaps)) + 1})",
                max(gaps) <= METRIC_TOLERANCE)
            errs = [r["follow_weight_rel_error"] for r in rr]
            k = max(1, n // 3)
            early, late = float(np.mean(errs[:k])), float(np.mean(errs[-k:]))
            add("followers: error not growing over rounds", f"{n} rounds",
                f"weight error, mean of first {k} rounds {early:.2e}, last {k} {late:.2e} "
                f"(max {max(errs):.2e})", late <= 1.25 * early)
            ex = sum(r["exact_update"] for r in rr)
            # anchors that decoded every round exactly (ZipNN may be missing: not installed)
            usable = [a for a in ("ZipNN delta vs v1", "XOR + byte grouping + zstd -19")
                      if all(r.get(a + " exact") for r in rr)]
            best_name = min(usable, key=lambda a: sum(r[a] for r in rr))
            best = sum(r[best_name] for r in rr)
            add("exact devices: < best lossless delta anchor", f"{n} rounds",
                f"p2u {_fmt_b(ex)} vs {best_name} {_fmt_b(best)} ({ex / best:.3f}x)",
                ex < best and all(r["exact_ok"] for r in rr))
    add("live update of the 100M model under load (latency, memory)", "runtime",
        "measured by scripts/bench_live_update.py, not by this script (docs/updates.md, "
        "'Live update of the 100M model under load')", None)
    return rows


def markdown(pairs: list[dict[str, Any]], fed: dict[str, Any] | None,
             chain: dict[str, Any] | None, checks: list[dict[str, Any]], meta: dict) -> str:
    L: list[str] = []
    L.append(f"Written by `python scripts/bench_updates.py {meta['argv']}` on {meta['when']} "
             f"({meta['seconds']:.0f} s; {meta['machine']}).\n")
    L.append("### Update stages\n")
    L.append("| pair | stage | plan | bytes | cum. % of v2 fp32 | cum. % of v2 p2u package | "
             "metric | rel. to v2 | weight error | encode s | apply s |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in pairs:
        u = p["update"]
        if u is None:
            L.append(f"| {p['pair']} | – | – | – | – | – | – | – | – | – | not measured: "
                     f"{p['update_error']} |")
            continue
        for r in u["stages"]:
            err = "exact" if r["exact"] else f"{r['weight_rel_error']:.1e}"
            enc = f"{u['encode_s']:.2f}" if r["stage"] == 0 else ""
            L.append(f"| {p['pair']} | {r['stage']} | {r['bits']} | {r['bytes']:,} | "
                     f"{r['cum_share_fp32']:.2%} | {r['cum_share_package']:.1%} | "
                     f"{p['metric_name']} {r['metric']:.4f} | {r['metric_rel']:.2%} | "
                     f"{err} | {enc} | {r['apply_s']:.2f} |")
    L.append("\nLive (a `ProgressiveSession` serving v1's full package moves to v2 with "
             "`update(until=0)` then `upgrade()`):\n")
    L.append("| pair | update stage 0 live, s | remaining stages, s | outputs equal v2 |")
    L.append("|---|---|---|---|")
    for p in pairs:
        lv = (p["update"] or {}).get("live")
        if not lv:
            continue
        if "error" in lv:
            L.append(f"| {p['pair']} | failed: {lv['error']} | | |")
        else:
            L.append(f"| {p['pair']} | {lv['stage0_s']:.2f} | {lv['rest_s']:.2f} | "
                     f"{'yes' if lv['outputs_equal_v2'] else 'NO'} |")
    L.append("\n### Beside the anchors (bytes to ship v2 to a device holding v1)\n")
    names = [a["method"] for a in pairs[0]["anchors"]] if pairs else []
    L.append("| pair | v2 fp32 | v2 metric (v1) | p2u update, first stage | p2u update, exact | "
             "p2u full package (base stage) | " + " | ".join(names) + " |")
    L.append("|---" * (6 + len(names)) + "|")
    for p in pairs:
        u = p["update"]
        first = f"{u['stages'][0]['bytes']:,}" if u else "–"
        exact = f"{u['total']:,}" if u else "–"
        cells = []
        for a in p["anchors"]:
            c = "–" if a["error"] else f"{a['wire_bytes']:,}"
            if not a["error"] and not a["exact"]:
                c += " (not exact)"
            cells.append(c)
        own = " (own task)" if p["v1_metric_own_task"] else ""
        L.append(f"| {p['pair']} | {p['fp32_bytes']:,} | {p['v2_metric']:.4f} "
                 f"({p['v1_metric']:.4f}{own}) | {first} | {exact} | {p['full']['total']:,} "
                 f"({p['full']['base']:,}) | " + " | ".join(cells) + " |")
    if chain:
        L.append(f"\nChain v1 -> v2 -> v3 by two updates: "
                 f"{'v3 bit for bit' if chain['exact'] else 'NOT exact'}; the v2 -> v3 update "
                 f"on v1: {'refused (' + chain['refused_on_v1'] + ')' if chain['refused_on_v1'] else 'NOT refused'}.")
    if fed and fed["rounds"]:
        rr = fed["rounds"]
        L.append("\n### Federated rounds\n")
        L.append("| round | accuracy | full base stage (accuracy) | full package | zstd -19 | ZipNN | "
                 "ZipNN delta | XOR + zstd | fp32 diff + zstd | p2u exact update | "
                 "follower stage 0 (% of base) | follower accuracy (rel.) | follower weight error |")
        L.append("|---" * 13 + "|")
        for r in rr:
            f = (f"{r['follow_bytes']:,} ({r['follow_bytes'] / r['full_base']:.1%}) | "
                 f"{r['follow_metric']:.4f} ({r['follow_metric_rel']:.2%}) | "
                 f"{r['follow_weight_rel_error']:.2e}") if "follow_bytes" in r else "– | – | –"
            ex = f"{r['exact_update']:,}" if "exact_update" in r else "–"
            L.append(f"| {r['round']} | {r['metric']:.4f} | {r['full_base']:,} "
                     f"({r['full_base_metric']:.4f}) | "
                     f"{r['full_total']:,} | {r['zstd19']:,} | {r['zipnn']:,} | "
                     f"{r['ZipNN delta vs v1']:,} | {r['XOR + byte grouping + zstd -19']:,} | "
                     f"{r['fp32 difference + zstd -19']:,} | {ex} | {f} |")
        tot = {k: sum(r.get(k, 0) for r in rr) for k in
               ("full_base", "full_total", "zstd19", "zipnn", "ZipNN delta vs v1",
                "XOR + byte grouping + zstd -19", "fp32 difference + zstd -19",
                "exact_update", "follow_bytes")}
        L.append(f"| **all {len(rr)}** | | {tot['full_base']:,} | {tot['full_total']:,} | "
                 f"{tot['zstd19']:,} | {tot['zipnn']:,} | {tot['ZipNN delta vs v1']:,} | "
                 f"{tot['XOR + byte grouping + zstd -19']:,} | "
                 f"{tot['fp32 difference + zstd -19']:,} | {tot['exact_update']:,} | "
                 f"{tot['follow_bytes']:,} | | |")
    ups = [r for r in (fed or {}).get("rounds", []) if r.get("uplink")]
    if ups:
        L.append("\n### Federated uplink (clients send their local model as an update against "
                 "the global model they received)\n")
        L.append("| round | clients | stage 0 per client (% of fp32) | exact per client | "
                 "XOR + zstd per client | server FedAvg of stage 0 uploads: accuracy (round's) "
                 "| weight error | FedAvg of exact uploads = round's model |")
        L.append("|---" * 8 + "|")
        for r in ups:
            u = r["uplink"]
            s0 = float(np.mean(u["stage0_bytes"]))
            L.append(f"| {r['round']} | {u['clients']} | {s0:,.0f} ({s0 / u['fp32_bytes']:.1%}) | "
                     f"{np.mean(u['exact_bytes']):,.0f} | {np.mean(u['xor_bytes']):,.0f} | "
                     f"{u['aggregate_stage0_metric']:.4f} ({u['round_metric']:.4f}) | "
                     f"{u['aggregate_stage0_rel_error']:.2e} | "
                     f"{'yes' if u['aggregate_exact_equals_round'] else 'no'} |")
    L.append("\n### Targets\n")
    L.append("| target | subject | figure | status |")
    L.append("|---|---|---|---|")
    for c in checks:
        L.append(f"| {c['target']} | {c['subject']} | {c['figure']} | {c['status']} |")
    return "\n".join(L).replace(f"{ROOT}/", "") + "\n"


def plot(fed: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rr = fed["rounds"]
    x = [r["round"] for r in rr]
    series = [("fp32 file every round", "fp32_bytes", ":"),
              ("zstd -19 every round", "zstd19", ":"),
              ("p2u full package every round", "full_total", "--"),
              ("p2u full base stage every round", "full_base", "--"),
              ("ZipNN delta vs previous round", "ZipNN delta vs v1", "-."),
              ("XOR + byte grouping + zstd -19", "XOR + byte grouping + zstd -19", "-."),
              ("p2u update, every round exact", "exact_update", "-"),
              ("p2u update, followers at stage 0", "follow_bytes", "-")]
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, key, style in series:
        if all(key in r for r in rr):
            ax.plot(x, np.cumsum([r[key] for r in rr]) / 1e6, style, marker="o", ms=3,
                    label=label)
    ax.plot(x, np.cumsum([FOLLOWER_SHARE * r["full_base"] for r in rr]) / 1e6, color="black",
            lw=0.8, ls=(0, (1, 3)), label="target for followers: 1/4 of the full base stage")
    ax.set_xlabel("federated round")
    ax.set_ylabel("cumulative MB sent to one device")
    ax.set_yscale("log")
    ax.set_title(f"FedAvg digits CNN ({rr[0]['fp32_bytes'] / 1e3:.0f} kB fp32): bytes over "
                 f"{len(rr)} rounds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default=None,
                    help="comma-separated pair names (default: every available pair)")
    ap.add_argument("--no-minilm", action="store_true", help="leave out the MiniLM pair")
    ap.add_argument("--no-fedavg", action="store_true", help="leave out the federated run")
    ap.add_argument("--fedavg-dir", type=Path, default=up.FEDAVG_DIR)
    ap.add_argument("--rounds", type=int, default=0, help="at most this many federated rounds")
    ap.add_argument("--plan", default=None, help="update plan (default: the encoder's)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    ua.warm_up()

    chosen = up.pairs(include_minilm=not args.no_minilm)
    if args.pairs:
        want = [w.strip() for w in args.pairs.split(",")]
        unknown = set(want) - {p.name for p in chosen}
        if unknown:
            ap.error(f"unknown pairs {sorted(unknown)}; known: {[p.name for p in chosen]}")
        chosen = [p for p in chosen if p.name in want]
    results = []
    for p in chosen:
        if not p.available():
            log(f"\n== {p.name}: SKIPPED, missing {p.v1 if not p.v1.is_file() else p.v2} "
                "(run the script that makes it)")
            continue
        results.append(run_pair(p, work, args.plan))
    chain = run_chain(work, args.plan) if not args.pairs else None
    fed = None
    if not args.no_fedavg:
        rounds = up.fedavg_rounds(args.fedavg_dir)
        if args.rounds:
            rounds = rounds[:args.rounds + 1]
        if len(rounds) < 2:
            log(f"\n== federated: SKIPPED, no rounds in {args.fedavg_dir} "
                "(python scripts/make_update_pairs.py --only fedavg)")
        else:
            fed = run_fedavg(rounds, work, args.plan, up.digits_accuracy)
    checks = targets(results, fed)
    meta = {"argv": " ".join(argv if argv is not None else sys.argv[1:]),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": time.perf_counter() - t0,
            "machine": f"{platform.machine()}, Python {platform.python_version()}"}
    md = markdown(results, fed, chain, checks, meta)
    log("\n" + md)
    (args.out / "results.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps(
        {"meta": meta, "pairs": results, "chain": chain, "fedavg": fed, "targets": checks},
        indent=1, default=str) + "\n")
    if fed and fed["rounds"]:
        plot(fed, args.plot)
        log(f"plot: {args.plot}")
    log(f"results: {args.out / 'results.md'}, {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
