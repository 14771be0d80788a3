"""Turn ``scripts/evaluate.py``'s results into ``results.md`` and ``results-*.png``.

Every number in the report is read from the results dictionary that the evaluation wrote
(``results.json`` in its work directory); nothing here measures. Plots need matplotlib; without
it the report says so and keeps its tables.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MB = 1e6
HEADLINE_PNG = "results-headline.png"


# ------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------


def mb(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / MB:.3f}" if n < 10 * MB else f"{n / MB:.1f}"


def pct(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}%" if x >= 0.1 else f"{100 * x:.2f}%"


def num(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def secs(x: float | None) -> str:
    if x is None:
        return "–"
    if x < 0.01:
        return f"{1000 * x:.2f} ms"
    if x < 1:
        return f"{1000 * x:.0f} ms"
    return f"{x:.1f} s" if x < 100 else f"{x:.0f} s"


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def scored(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in results["subjects"] if not s.get("skipped") and s.get("primary")]


def live(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in results["subjects"] if not s.get("skipped")]


def plan(subject: dict[str, Any], label: str) -> dict[str, Any] | None:
    return next((p for p in subject["plans"] if p["label"] == label and not p.get("error")),
                None)


def default_plan(subject: dict[str, Any]) -> dict[str, Any] | None:
    return next((p for p in subject["plans"] if p["adaptive"] and not p.get("error")), None)


def alternative(subject: dict[str, Any], method: str) -> dict[str, Any] | None:
    return next((a for a in subject["alternatives"] if a["method"] == method
                 and not a.get("error")), None)


def metric_of(row: dict[str, Any], key: str | None) -> float | None:
    return None if key is None else row.get("metrics", {}).get(key)


# ------------------------------------------------------------------------------------------
# Headline
# ------------------------------------------------------------------------------------------


def headline(results: dict[str, Any]) -> str:
    """A paragraph of the key figures, from the MiniLM results (the digits CNN without them)."""
    subs = {s["name"]: s for s in scored(results)}
    s = subs.get("minilm") or subs.get("digits-cnn")
    if s is None:
        return ""
    d = default_plan(s)
    if d is None:
        return ""
    key, ref = s["primary"], s["reference"]
    file_s = s["fp32_wire_s"]
    st = d["stages"]
    zstd = alternative(s, "zstd -19")
    zip_ = alternative(s, "ZipNN")
    extra = f" and embedding cosine {num(metric_of(st[0], 'cosine'))}" \
        if "cosine" in s["metrics"] else ""
    parts = [
        f"On {s['name']} ({mb(s['file_bytes'])} MB fp32), p2u's default base is "
        f"{mb(st[0]['cum_bytes'])} MB on the wire ({pct(st[0]['share'])} of the file): at "
        f"1 Mbit/s the model answers after {secs(st[0]['seconds'])} instead of "
        f"{secs(file_s)} for the fp32 file"
        + (f" ({secs(zstd['wire_bytes'] * 8 / results['meta']['rate_bps'])} zstd-compressed)"
           if zstd else "")
        + f", with {key} {num(metric_of(st[0], key))} (fp32 {num(ref.get(key))}){extra}."]
    if len(st) > 2:
        parts.append(f"The {st[1]['bits']}-bit stage arrives at {secs(st[1]['seconds'])} "
                     f"({key} {num(metric_of(st[1], key))}), and the exact fp32 weights at "
                     f"{secs(st[-1]['seconds'])}: {pct(st[-1]['share'])} of the file in all.")
    lossless = [(a["method"], a["wire_bytes"] / s["file_bytes"]) for a in (zstd, zip_) if a]
    if lossless:
        parts.append("Lossless alone, the file takes " + ", ".join(
            f"{pct(x)} with {m}" for m, x in lossless) + ".")
    others = []
    for method in ("ORT quantize_dynamic (int8)", "ORT MatMulNBits 4-bit b32",
                   "ORT MatMulNBits 4-bit b32 +Gather", "NNCodec qp -32"):
        a = alternative(s, method)
        if a and a.get("wire_bytes"):
            others.append(f"{method}: {pct(a['wire_bytes'] / s['file_bytes'])} on the wire, "
                          f"{key} {num(a['metrics'].get(key))}")
    if others:
        parts.append("What users would pick instead (one file, no upgrade path): "
                     + "; ".join(others) + ".")
    rel = []
    for x in scored(results):
        p4 = plan(x, "fixed 4,8,L")
        if p4 and x["reference"].get(x["primary"]):
            m = metric_of(p4["stages"][0], x["primary"])
            if m is not None:
                rel.append(m / x["reference"][x["primary"]])
    if len(rel) >= 3:
        parts.append(f"Across the {len(rel)} models with a task metric, a fixed 4-bit base keeps "
                     f"a median {pct(statistics.median(rel))} of the fp32 score (lowest "
                     f"{pct(min(rel))}).")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------


def section_meta(results: dict[str, Any]) -> str:
    m = results["meta"]
    mc = m["machine"]
    v = m["versions"]
    lines = [
        f"Written by `{m['command']}` on {m['started']}; the run took "
        f"{secs(m.get('seconds'))}. Every figure below comes from that run on this machine.",
        "",
        f"- Machine: {mc['cpu']}, {mc['cores']} cores, "
        f"{(mc['memory_bytes'] or 0) / 2**30:.0f} GiB, {mc['os']}, Python {mc['python']}; "
        f"load average at the start {', '.join(f'{x:.2f}' for x in mc['load_average'] or [])} "
        "(a shared machine: timings are noisy).",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
    ]
    missing = [k for k, val in v.items() if not val]
    if missing:
        lines.append("- Not installed here: " + ", ".join(missing) + ".")
    return "\n".join(lines)


def section_method(results: dict[str, Any]) -> str:
    m = results["meta"]
    return "\n".join([
        "- **Wire bytes** are the files a client downloads: for stage 0 `manifest.json`, the "
        "base (`stage-0.p2u`, or `base.onnx` + `base.bin` when smaller, as `HttpSource` "
        "picks) and `probe.npz`; for stage k its stage file. *Share* is the cumulative bytes "
        "over the size of the fp32 `.onnx` file.",
        "- **Time at 1 Mbit/s** is computed from the bytes (bytes × 8 / 10^6 s), "
        "without latency or protocol overhead; a measured check through "
        "`p2u_onnx.devserver` follows at the end.",
        "- **Metrics** run the stage's model in onnxruntime (CPU). A lossless stage is "
        "checked bit-exact against the source weights with `p2u_onnx.verify` and then "
        "scores as the fp32 model (marked *exact*).",
        f"- **Alternatives** are single files; their wire size is the file compressed with "
        f"zstd level {m['wire_zstd_level']} (level 19 made these files no smaller and "
        "ran far slower), except the lossless anchors, which are level 19 as named.",
        "- **Plans** (`fixed` = every coded tensor at the plan's base bits, "
        "`BitBudget(adaptive=False)`; block 32 inside an output channel unless named; "
        "`default` = `BitBudget()`: bits per tensor chosen by calibration under a budget). "
        "The fixed 4- and 2-bit bases are stage 0 of the 4,8,L and 2,4,8,L plans.",
        f"- **Timings** are medians of {m['repeats']} runs (one run for models over 200 MB, "
        "and for encodes other than the default plan's), wall clock on a shared 2-core "
        "machine.",
        "- Models marked **random weights** have no task metric: bytes and speed only.",
    ])


def section_summary(results: dict[str, Any]) -> str:
    """First answer: each model's p2u base next to the single-file alternatives."""
    rows = []
    for s in live(results):
        key = s["primary"]
        d, p4 = default_plan(s), plan(s, "fixed 4,8,L")

        def cell(row: dict[str, Any] | None, wire: float | None, s: dict[str, Any] = s,
                 key: str | None = key) -> str:
            if row is None or wire is None:
                return "–"
            m = metric_of(row, key)
            return pct(wire / s["file_bytes"]) + (f" / {num(m)}" if m is not None else "")

        alts = [alternative(s, name) for name in (
            "ORT quantize_dynamic (int8)", "ORT MatMulNBits 4-bit b32", "fp16",
            "NNCodec qp -32")]
        rows.append([
            s["name"] + (" (random weights)" if s["random_weights"] else ""),
            mb(s["file_bytes"]), key or "–", num(s["reference"].get(key)) if key else "–",
            cell(d["stages"][0], d["stages"][0]["cum_bytes"]) if d else "–",
            cell(p4["stages"][0], p4["stages"][0]["cum_bytes"]) if p4 else "–",
            *[cell(a, a["wire_bytes"] if a else None) for a in alts]])
    return table(["model", "fp32 MB", "metric", "fp32", "p2u default base",
                  "p2u fixed 4-bit base", "int8 dynamic", "MatMulNBits b32", "fp16",
                  "NNCodec qp -32"], rows)


def section_full(results: dict[str, Any]) -> str:
    """Last answer: p2u's total for the exact weights next to the lossless codecs."""
    rows = []
    for s in live(results):
        d, p4 = default_plan(s), plan(s, "fixed 4,8,L")
        zs, zn = alternative(s, "zstd -19"), alternative(s, "ZipNN")
        rows.append([
            s["name"], mb(s["file_bytes"]),
            pct(d["stages"][-1]["share"]) if d else "–",
            pct(p4["stages"][-1]["share"]) if p4 else "–",
            pct(zs["wire_bytes"] / s["file_bytes"]) if zs else "–",
            pct(zn["wire_bytes"] / s["file_bytes"]) if zn else "–",
            secs(d["stages"][-1]["seconds"]) if d else "–", secs(s["fp32_wire_s"])])
    return table(["model", "fp32 MB", "p2u default, all stages", "p2u fixed 4,8,L, all stages",
                  "zstd -19", "ZipNN", "p2u exact at 1 Mbit/s", "fp32 file at 1 Mbit/s"], rows)


def section_bits(results: dict[str, Any]) -> str:
    labels = {2: "fixed 2,4,8,L", 3: "fixed 3,L", 4: "fixed 4,8,L", 6: "fixed 6,L",
              8: "fixed 8,L"}
    rows = []
    for s in live(results):
        key = s["primary"]
        cells = []
        for label in labels.values():
            p = plan(s, label)
            if p is None:
                cells.append("–")
                continue
            st = p["stages"][0]
            m = metric_of(st, key)
            cells.append(pct(st["share"]) + (f" / {num(m)}" if m is not None else ""))
        rows.append([s["name"], key or "–", num(s["reference"].get(key)) if key else "–",
                     *cells])
    return table(["model", "metric", "fp32", *[f"{b}-bit base" for b in labels]], rows)


def section_granularity(results: dict[str, Any]) -> str:
    labels = {"per channel": "channel 4,8,L", "block 32": "fixed 4,8,L",
              "block 64": "block64 4,8,L", "block 128": "block128 4,8,L"}
    rows = []
    for s in live(results):
        key = s["primary"]
        cells = []
        for label in labels.values():
            p = plan(s, label)
            if p is None:
                cells.append("–")
                continue
            st = p["stages"]
            m0, m1 = metric_of(st[0], key), metric_of(st[1], key) if len(st) > 2 else None
            cells.append(pct(st[0]["share"]) + (f" / {num(m0)}" if m0 is not None else "")
                         + (f" → {pct(st[1]['share'])} / {num(m1)}" if m1 is not None else ""))
        rows.append([s["name"], key or "–", *cells])
    return table(["model", "metric", *[f"{k}: 4-bit base → 8-bit stage" for k in labels]], rows)


def section_plain(results: dict[str, Any]) -> str:
    rows = []
    for s in live(results):
        for p in s.get("plain", []):
            plain_total = p["base_raw"] + p["update_raw"]
            zstd_total = p["base_zstd"] + p["update_zstd"]
            ours = " + ".join(f"{mb(b)} ({bits})" for b, bits in
                              zip(p["ours_stages"], p["ours_bits"]))
            rows.append([
                s["name"], str(p["base_bits"]), mb(p["base_raw"]), mb(p["update_raw"]),
                pct(plain_total / s["file_bytes"]),
                f"{mb(p['base_zstd'])} + {mb(p['update_zstd'])} = {pct(zstd_total / s['file_bytes'])}",
                ours, pct(p["ours_total"] / s["file_bytes"]),
                "yes" if p["not_bit_exact"] == 0 else
                f"no: {p['not_bit_exact']} of {p['coded_weights']} weights differ"])
    level = next((p["zstd_level"] for s in live(results) for p in s.get("plain", [])), 9)
    return table(["model", "base bits", "plain base MB", "plain update MB (fp32 diff)",
                  "plain total", f"plain, each part zstd -{level}", "p2u stages MB (bits)",
                  "p2u total", "plain base + diff exact in fp32?"], rows)


def section_subject(s: dict[str, Any], results: dict[str, Any]) -> str:
    if s.get("skipped"):
        return f"### {s['name']}\n\nSkipped: {s['skipped']}\n"
    keys = s["metrics"]
    head = [f"### {s['name']}" + (" (random weights: bytes and speed only)"
                                  if s["random_weights"] else ""), "",
            f"{s['description']}. fp32 file {mb(s['file_bytes'])} MB, "
            f"{s['float_params'] / 1e6:.2f}M float parameters"
            + (", reference " + ", ".join(f"{k} {num(s['reference'].get(k))}" for k in keys)
               if keys else "") + f"; evaluated in {secs(s['seconds'])}.", ""]
    rows = []
    for p in s["plans"]:
        if p.get("error"):
            rows.append([p["label"], "–", "error: " + p["error"], *[""] * (5 + len(keys))])
            continue
        for st in p["stages"]:
            ms = [num(st["metrics"].get(k)) for k in keys]
            bits = str(st["bits"]) + (" (verified exact)" if st["exact"] else "")
            rows.append([p["label"] if st["stage"] == 0 else "", str(st["stage"]),
                         bits, mb(st["wire_bytes"]), mb(st["cum_bytes"]),
                         pct(st["share"]), secs(st["seconds"]), *ms,
                         secs(p["encode_s"]) if st["stage"] == 0 else ""])
    head.append(table(["plan", "stage", "bits", "stage MB", "cumulative MB", "share",
                       "at 1 Mbit/s", *keys, "encode"], rows))
    d = default_plan(s)
    if d and d.get("decode_s") is not None:
        head += ["", f"Default plan: device-side decoding of every stage (`open_stages` + "
                     f"`write_weights`) takes {secs(d['decode_s'])}; base widths "
                     + ", ".join(f"{n / 1e6:.2f}M weights at {b} bits"
                                 for b, n in sorted(d["base_bits"].items())) + "."
                     + (f" Stage 0 includes `manifest.json` ({mb(d['manifest_bytes'])} MB) and "
                        f"`probe.npz` ({mb(d['probe_bytes'])} MB)."
                        if "probe_bytes" in d else "")]
    rows = []
    for a in s["alternatives"]:
        if a.get("error"):
            rows.append([a["method"], "–", "–", "–", *["–"] * len(keys), "–", "–",
                         "not run: " + a["error"]])
            continue
        wire = a["wire_bytes"]
        ms = [num(a["metrics"].get(k)) if a["kind"] == "lossy" else "= fp32 (lossless)"
              for k in keys]
        rows.append([a["method"], mb(a.get("file_bytes")), mb(wire),
                     pct(wire / s["file_bytes"]),
                     *ms, secs(a.get("make_s")), secs(a.get("decode_s")), a.get("note", "")])
    head += ["", table(["alternative", "file MB", "wire MB", "share", *keys, "make",
                        "decode", "notes"], rows)]
    if s.get("latency"):
        rows = []
        for r in s["latency"]:
            if r.get("error"):
                rows.append([r["variant"], "–", "–", "–", "error: " + r["error"]])
                continue
            rows.append([r["variant"], mb(r["wire_bytes"]), secs(r["load_s"]),
                         secs(r["first_answer_s"]), f"{r['run_ms']:.1f} ms"])
        feed = "batch 1 × 128 tokens"
        head += ["", f"Latency ({feed}; load = create the session and run once, median of 3; "
                     f"run = median of {results['meta']['latency_runs']} runs; first answer "
                     "= download at 1 Mbit/s + load):", "",
                 table(["variant", "wire MB", "load", "first answer at 1 Mbit/s",
                        "run"], rows)]
    return "\n".join(head) + "\n"


def section_transfer(results: dict[str, Any]) -> str:
    t = results.get("transfer_check")
    if not t:
        return "Not run."
    if t.get("error"):
        return f"Not run: {t['error']}"
    rows = [[str(k), mb(b), secs(c), secs(m)] for k, (b, c, m) in
            enumerate(zip(t["wire_bytes"], t["computed_s"], t["measured_s"]))]
    return (f"The digits CNN's default package served by `p2u_onnx.devserver.PackageServer` "
            f"at {t['rate_bps'] / 1e6:g} Mbit/s (one token bucket for the link) and read by "
            "`ProgressiveSession(HttpSource(url))`: seconds from the start until stage 0 "
            "answered, then until each stage was applied, next to the computed time.\n\n"
            + table(["stage", "stage MB", "computed (cumulative)", "measured (cumulative)"],
                    rows))


def section_problems(results: dict[str, Any]) -> str:
    lines = []
    status = results["meta"].get("nncodec_status")
    if results["meta"]["quick"]:
        lines.append("- Quick run: ZipNN, NNCodec, MatMulNBits b128 and +Gather, the latency tables, MiniLM, the "
                     "third-party and the BERT-sized model are left out.")
    elif status:
        lines.append(f"- NNCodec did not run: {status}")
    else:
        lines.append("- NNCodec runs in `build/nncodec-venv` (torch CPU). PyPI's torchvision "
                     "is built for CUDA torch and cannot load there; NNCodec imports it only "
                     "for its training data sets, so `scripts/eval_nncodec_worker.py` puts a "
                     "stand-in module in its place. NNCodec gets every float32 tensor as one "
                     "parameter with its defaults, but only tensors of 1024 values or more: "
                     "given every tensor, its tiny error on scalars (a `Pow` exponent of 2.0 "
                     "in silero-vad) gives NaN outputs, and float constants that feed shapes "
                     "(ppocrv4-det) break the graph.")
    if any(alternative(s, "ZipNN") for s in live(results)):
        lines.append("- ZipNN 0.5.4 reorders the bytes of its input buffer in place (even of a "
                     "`bytes` object), so compressing the same buffer twice gives a different "
                     "stream; the script hands it a fresh copy and checks the round trip.")
    seen = set()
    for s in live(results):
        for a in s["alternatives"]:
            if a.get("error") and (a["method"], a["error"]) not in seen:
                seen.add((a["method"], a["error"]))
                lines.append(f"- {s['name']}, {a['method']}: {a['error']}")
        for p in s["plans"]:
            if p.get("error"):
                lines.append(f"- {s['name']}, p2u {p['label']}: {p['error']}")
            for st in p["stages"]:
                if st.get("error"):
                    lines.append(f"- {s['name']}, p2u {p['label']} stage {st['stage']} did not "
                                 f"run: {st['error']}")
            for note in p.get("notes", []):
                if (s["name"], note) not in seen:
                    seen.add((s["name"], note))
                    lines.append(f"- {s['name']}, p2u encoder note: {note}")
    for s in results["subjects"]:
        if s.get("skipped"):
            lines.append(f"- {s['name']} skipped: {s['skipped']}")
    return "\n".join(lines) if lines else "None."


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------

ALT_MARKERS = {"ORT quantize_dynamic (int8)": "s", "ORT MatMulNBits 4-bit b32": "D",
               "ORT MatMulNBits 4-bit b128": "d", "ORT MatMulNBits 4-bit b32 +Gather": "P",
               "fp16": "^"}


def _plot_subject(ax: Any, s: dict[str, Any], key: str, x_of: str, rate: float) -> None:
    """Metric against time at 1 Mbit/s (``x_of='seconds'``) or share of the file."""
    def x(stage_or_bytes: Any) -> float:
        b = stage_or_bytes if isinstance(stage_or_bytes, (int, float)) else \
            stage_or_bytes["cum_bytes"]
        return b * 8 / rate if x_of == "seconds" else b / s["file_bytes"]

    styles = [("default (adaptive) 4,8,L", "C0", "o", "-"), ("fixed 2,4,8,L", "C1", "v", "--"),
              ("fixed 8,L", "C2", "^", ":")]
    for label, color, marker, ls in styles:
        p = plan(s, label)
        if p is None:
            continue
        xs = [x(st) for st in p["stages"]]
        ys = [metric_of(st, key) for st in p["stages"]]
        ax.plot(xs, ys, color=color, marker=marker, ls=ls, label=f"p2u {label}",
                drawstyle="steps-post")
    for a in s["alternatives"]:
        if a.get("error") or not a.get("wire_bytes"):
            continue
        if a["kind"] == "lossless":
            ax.scatter([x(a["wire_bytes"])], [s["reference"].get(key)], marker="x", color="k",
                       zorder=3)
            below = a["method"].startswith("zstd")
            ax.annotate(a["method"], (x(a["wire_bytes"]), s["reference"].get(key)),
                        fontsize=7, xytext=(-12, -11 if below else 5), textcoords="offset points")
            continue
        m = a["metrics"].get(key)
        if m is None:
            continue
        if a["method"].startswith("NNCodec"):
            ax.scatter([x(a["wire_bytes"])], [m], marker="*", color="C4", s=60, zorder=3,
                       label="NNCodec (qp -20/-26/-32)" if a["method"].endswith("-20") else None)
        else:
            ax.scatter([x(a["wire_bytes"])], [m], marker=ALT_MARKERS.get(a["method"], "o"),
                       color="C3", zorder=3, label=a["method"])
    ax.scatter([x(s["file_bytes"])], [s["reference"].get(key)], marker="o", color="k",
               facecolors="none", s=60, zorder=3, label="fp32 .onnx file")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("seconds at 1 Mbit/s (cumulative, computed)" if x_of == "seconds"
                  else "bytes on the wire / fp32 file (cumulative)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3, which="both")


def plots(results: dict[str, Any], out: Path) -> list[str]:
    """Write the PNGs; returns their file names (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rate = results["meta"]["rate_bps"]
    names: list[str] = []
    subs = {s["name"]: s for s in scored(results)}
    head = subs.get("minilm") or subs.get("digits-cnn")
    if head is not None:
        keys = [head["primary"]] + (["cosine"] if "cosine" in head["metrics"] else [])
        fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            _plot_subject(ax, head, key, "seconds", rate)
            if key == "cosine" and ax.get_ylim()[0] < 0.9:
                ax.set_ylim(0.9, 1.002)
                ax.set_ylabel("cosine (axis cut at 0.9)")
        axes[0][0].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{head['name']}: task metric against download time at 1 Mbit/s\n"
                     "p2u stages (a step holds until the next stage arrives) and single-file "
                     "alternatives", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / HEADLINE_PNG, dpi=110)
        plt.close(fig)
        names.append(HEADLINE_PNG)

    models = list(subs.values())
    if models:
        cols = 3
        rows = math.ceil(len(models) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
        for ax, s in zip(axes.flat, models):
            _plot_subject(ax, s, s["primary"], "share", rate)
            ax.set_title(s["name"], fontsize=10)
        for ax in list(axes.flat)[len(models):]:
            ax.axis("off")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
        fig.tight_layout(rect=(0, 0.1 if rows == 1 else 0.05, 1, 1))
        fig.savefig(out / "results-models.png", dpi=100)
        plt.close(fig)
        names.append("results-models.png")

        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = {2: "fixed 2,4,8,L", 3: "fixed 3,L", 4: "fixed 4,8,L", 6: "fixed 6,L",
                  8: "fixed 8,L"}
        for s in models:
            ref = s["reference"].get(s["primary"])
            pts = [(b, metric_of(p["stages"][0], s["primary"]))
                   for b, label in labels.items() if (p := plan(s, label))]
            pts = [(b, m / ref) for b, m in pts if m is not None and ref]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{s['name']} ({s['primary']})")
        ax.set_xlabel("base bits (fixed, block 32)")
        ax.set_ylabel("metric of the base / fp32 metric")
        ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "results-bits.png", dpi=100)
        plt.close(fig)
        names.append("results-bits.png")
    return names


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


def write(results: dict[str, Any], out: Path) -> Path:
    """Write ``out/results.md`` (and the plots beside it); returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(results, out)
    quick = results["meta"]["quick"]
    parts = ["# Evaluation: accuracy, bandwidth and time to each stage" +
             (" (quick subset)" if quick else ""), "",
             "Progressive Precision Update (Tavakoli & Afrabandpey 2025, arXiv 2506.22871) "
             "sends a low-bit base, then updates up to the original weights. This report "
             "measures p2u-onnx's version of it on real models, side by side with what a "
             "user would ship instead.", "", section_meta(results), ""]
    text = headline(results)
    if text:
        parts += ["## Headline", "", text, ""]
        if HEADLINE_PNG in pngs:
            parts += [f"![headline]({HEADLINE_PNG})", ""]
    if not pngs:
        parts += ["(Plots skipped: matplotlib is not installed.)", ""]
    parts += ["## How to read the numbers", "", section_method(results), "",
              "## First answer: the base against single-file alternatives", "",
              "Cells: bytes on the wire as a share of the fp32 file / task metric.", "",
              section_summary(results), "",
              "## Last answer: the exact weights against lossless codecs", "",
              section_full(results), "",
              "## Fixed-bit bases", "",
              "Stage 0 with every coded tensor at the same width (block 32). "
              "Cells: share / metric.", "", section_bits(results), ""]
    if "results-bits.png" in pngs:
        parts += ["![bits](results-bits.png)", ""]
    parts += ["## Scales: per channel or per block (fixed 4-bit base)", "",
              section_granularity(results), "",
              "## The paper's plain scheme next to p2u", "",
              "Plain: the base as stored (`base.onnx` + `base.bin`: packed codes, scales, "
              "uncoded tensors) and the fp32 difference between the original and the base "
              "(4 bytes per coded weight), with no entropy coding; then the same two parts "
              "compressed with zstd. p2u: the same base entropy-coded, and updates on finer "
              "grids (intermediate stages) before an exact last stage.", "",
              section_plain(results), ""]
    if "results-models.png" in pngs:
        parts += ["## All models at a glance", "",
                  "Task metric against cumulative bytes on the wire (share of the fp32 file).",
                  "", "![models](results-models.png)", ""]
    parts += ["## Per model", ""]
    parts += [section_subject(s, results) for s in results["subjects"]]
    parts += ["## Measured transfer", "", section_transfer(results), "",
              "## Problems and gaps", "", section_problems(results), ""]
    path = out / "results.md"
    path.write_text("\n".join(parts))
    return path
