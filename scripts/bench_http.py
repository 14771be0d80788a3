"""Time to first inference on slow links: a p2u package over HTTP vs the fp32 .onnx.

For the digits CNN (``models/digits_cnn.onnx``) and MiniLM (``build/minilm/minilm.onnx``, made by
``scripts/make_minilm.py`` when missing), each encoded with ``p2u_onnx.encode`` defaults (plan
4,8,lossless), over links of 0.25, 1 and 10 Mbit/s simulated by the dev server's token bucket
(:class:`p2u_onnx.devserver.PackageServer` on 127.0.0.1, one bucket for all connections of a
run, round-trip time ~0):

* fp32: download the original ``.onnx`` (httpx, streamed to disk), load it in onnxruntime, run;
* p2u: ``ProgressiveSession(HttpSource(url))``; first run on the base, then every stage in the
  background. Times are when each stage became active (``on_stage``); the last stage is lossless,
  so "full precision" means the original weights bit for bit.

Every time is measured from the start of the fetch, so imports are excluded.

MiniLM at 0.25 Mbit/s would take ~48 min for the fp32 download alone; unless ``--full``, only its
time to first inference is measured, and the other cells are computed from the bytes and the
processing times measured at 1 Mbit/s (marked "computed"); the first inference is also computed
that way, to show the error of the method next to the measurement.

Writes ``build/bench_http/results.json``, ``docs/delivery-ttfi.png``,
``docs/delivery-timeline.png`` and the results section of ``docs/delivery.md`` (between the
``bench-http`` markers). Usage::

    python scripts/bench_http.py [--models digits,minilm] [--rates 0.25,1,10] [--full]
    python scripts/bench_http.py --from-json    # redo the doc and plots from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "bench_http"
DOC = ROOT / "docs" / "delivery.md"
MODELS = {"digits": ROOT / "models" / "digits_cnn.onnx",
          "minilm": ROOT / "build" / "minilm" / "minilm.onnx"}
LABELS = {"digits": "digits CNN", "minilm": "MiniLM-L6"}
COMPUTED = {"minilm"}  # below 1 Mbit/s, only the first inference is measured (see above)
BEGIN, END = "<!-- bench-http:begin -->", "<!-- bench-http:end -->"


# ---------------------------------------------------------------- setup


def ensure_model(name: str) -> Path:
    path = MODELS[name]
    if not path.exists() and name == "minilm":
        print("building MiniLM with scripts/make_minilm.py ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_minilm.py"), "--out",
                        str(path)], check=True)
    return path


def ensure_package(name: str, model: Path, site: Path, reencode: bool) -> Path:
    """``site/NAME.p2u`` (encoded with defaults) and ``site/NAME.onnx`` (the original)."""
    import p2u_onnx

    pkg = site / f"{name}.p2u"
    if reencode or not (pkg / "manifest.json").exists():
        t = time.perf_counter()
        p2u_onnx.encode(model, pkg, "4,8,lossless", overwrite=True)
        print(f"encoded {model.name} in {time.perf_counter() - t:.1f} s", flush=True)
    plain = site / f"{name}.onnx"
    if not plain.exists() or plain.stat().st_size != model.stat().st_size:
        plain.unlink(missing_ok=True)
        shutil.copyfile(model, plain)
    return pkg


def make_feed(name: str) -> dict[str, np.ndarray]:
    if name == "digits":
        x = np.load(ROOT / "models" / "digits_test.npz")["x"][:1].astype(np.float32)
        return {"image": x}
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1000, 3000, (1, 128), dtype=np.int64),
            "attention_mask": np.ones((1, 128), np.int64)}


# ---------------------------------------------------------------- one measurement each


def measure_plain(url: str, feed, tmp: Path) -> dict:
    """Download the .onnx, load it, run once."""
    import httpx
    import onnxruntime as ort

    path = tmp / "model.onnx"
    samples = []
    t0 = time.perf_counter()
    with httpx.Client(timeout=120) as c, c.stream("GET", url) as r, open(path, "wb") as f:
        r.raise_for_status()
        done = 0
        for chunk in r.iter_raw():
            f.write(chunk)
            done += len(chunk)
            samples.append((time.perf_counter() - t0, done))
    download = time.perf_counter() - t0
    ort.InferenceSession(str(path)).run(None, feed)
    first = time.perf_counter() - t0
    return {"bytes": done, "download_s": download, "first_inference_s": first,
            "samples": _thin(samples)}


def measure_p2u(url: str, feed, tmp: Path, until_first: bool = False) -> dict:
    """HttpSource + ProgressiveSession: first run on the base, then every stage."""
    from p2u_onnx.runtime import ProgressiveSession
    from p2u_onnx.transport import HttpSource

    samples, stage_at = [], {}
    t0 = time.perf_counter()
    src = HttpSource(url, tmp / "cache",
                     progress=lambda d, t: samples.append((time.perf_counter() - t0, d)))
    session = ProgressiveSession(src, on_stage=lambda k: stage_at.__setitem__(
        k, time.perf_counter() - t0))
    session.run(None, feed)
    first = time.perf_counter() - t0
    manifest = session.manifest
    try:
        if not until_first:
            session.upgrade().result()
            session.run(None, feed)
    finally:
        session.close()
        src.close()
    # bytes on the wire, in the order they travel: manifest, base (stage 0), probe, stages
    mbytes = (tmp / "cache" / "manifest.json").stat().st_size
    sizes = [st["files"][0]["size"] for st in manifest["stages"]]
    probe = manifest.get("probe", {}).get("size", 0) if manifest.get("probe") else 0
    files = [sizes[0], probe, *sizes[1:]]  # the progress callback counts these, in order
    ends = np.cumsum(files)
    arrived = [next((t for t, d in samples if d >= e), None) for e in ends]
    return {
        "manifest_bytes": mbytes, "stage_bytes": sizes, "probe_bytes": probe,
        "wire_bytes": mbytes + int(ends[-1]),
        "first_inference_s": first,
        "stage_s": {**{str(k): t for k, t in stage_at.items()}, "0": first},  # first answer
        "arrived_s": {"0": arrived[0], **{str(k): arrived[k + 1] for k in range(1, len(sizes))}},
        "samples": _thin([(t, d + mbytes) for t, d in samples]),
    }


def measure(kind: str, url: str, name: str, until_first: bool = False) -> dict:
    """One measurement in a fresh process: both sides pay onnxruntime's start-up alike."""
    cmd = [sys.executable, __file__, "--one", kind, "--url", url, "--models", name]
    if until_first:
        cmd.append("--until-first")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _one(kind: str, url: str, name: str, until_first: bool) -> None:
    import httpcore  # noqa: F401 - imports are not part of the timings (httpx loads it lazily)
    import httpx  # noqa: F401
    import onnxruntime  # noqa: F401

    import p2u_onnx.runtime
    import p2u_onnx.transport  # noqa: F401

    feed = make_feed(name)
    with tempfile.TemporaryDirectory() as d:
        r = measure_p2u(url, feed, Path(d), until_first) if kind == "p2u" else \
            measure_plain(url, feed, Path(d))
    print(json.dumps(r))


def _thin(samples: list, keep: int = 400) -> list:
    step = max(1, len(samples) // keep)
    return samples[::step] + samples[-1:]


def serve(site: Path, mbit: float):
    from p2u_onnx.devserver import PackageServer

    return PackageServer(site, rate=mbit * 1e6 / 8)


# ---------------------------------------------------------------- the runs


def run(models: list[str], rates: list[float], full: bool, reencode: bool) -> dict:
    site = OUT / "site"
    site.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    results: dict = {"date": time.strftime("%Y-%m-%d"), "onnxruntime": ort.__version__,
                     "rates_mbit": rates, "models": {}}
    for name in models:
        model = ensure_model(name)
        pkg = ensure_package(name, model, site, reencode)
        manifest = json.loads((pkg / "manifest.json").read_text())
        entry = {"fp32_bytes": model.stat().st_size, "plan": manifest["plan"], "runs": {}}
        results["models"][name] = entry
        for mbit in sorted(rates, reverse=True):  # fast first: the slow ones reuse its figures
            rate = mbit * 1e6 / 8
            skip = name in COMPUTED and mbit < 1 and not full
            row: dict = {"computed": skip}
            print(f"{name} @ {mbit:g} Mbit/s: p2u ...", flush=True)
            with serve(site, mbit) as srv:
                row["p2u"] = measure("p2u", srv.url + f"{name}.p2u/", name, skip)
            if not skip:
                print(f"{name} @ {mbit:g} Mbit/s: fp32 ...", flush=True)
                with serve(site, mbit) as srv:
                    row["fp32"] = measure("fp32", srv.url + f"{name}.onnx", name)
            if skip:
                row.update(compute_slow(entry, row["p2u"], rate))
            entry["runs"][str(mbit)] = row
            _print_row(name, mbit, entry, row)
            (OUT / "results.json").write_text(json.dumps(results, indent=1))
    return results


def compute_slow(entry: dict, measured: dict, rate: float) -> dict:
    """fp32 and stage times at ``rate`` from the bytes and the 1 Mbit/s run's processing."""
    ref = entry["runs"].get("1") or entry["runs"].get("1.0")
    if ref is None:
        raise SystemExit("computing a slow run needs the 1 Mbit/s run (add 1 to --rates)")
    fp32_ref, p2u_ref = ref["fp32"], ref["p2u"]
    load = fp32_ref["first_inference_s"] - fp32_ref["download_s"]
    fp32 = {"bytes": entry["fp32_bytes"], "download_s": entry["fp32_bytes"] / rate,
            "first_inference_s": entry["fp32_bytes"] / rate + load, "samples": []}
    p = measured
    wire, stage_s = _wire_ends(p), {}
    for k, end in wire.items():
        lag = p2u_ref["stage_s"][str(k)] - _wire_ends(p2u_ref)[k] / (1e6 / 8)
        stage_s[str(k)] = end / rate + lag
    computed_first = stage_s["0"]
    stage_s["0"] = p["first_inference_s"]  # measured
    p["stage_s"] = stage_s
    p["first_inference_computed_s"] = computed_first
    return {"fp32": fp32}


def _wire_ends(p: dict) -> dict[int, int]:
    """Bytes on the wire when stage k is complete (manifest, base, probe, stages 1..k)."""
    sizes = p["stage_bytes"]
    ends, total = {}, p["manifest_bytes"] + sizes[0] + p["probe_bytes"]
    ends[0] = total
    for k in range(1, len(sizes)):
        total += sizes[k]
        ends[k] = total
    return ends


# ---------------------------------------------------------------- report


def _stage_times(p: dict) -> list[float]:
    s = {int(k): v for k, v in p["stage_s"].items()}
    return [s[k] for k in sorted(s)]


def _print_row(name: str, mbit: float, entry: dict, row: dict) -> None:
    fp32, p = row["fp32"], row["p2u"]
    st = _stage_times(p)
    print(f"  {name} {mbit:g} Mbit/s: fp32 download {fp32['download_s']:.2f} s, first inference "
          f"{fp32['first_inference_s']:.2f} s | p2u first inference {st[0]:.2f} s "
          f"({st[0] / fp32['download_s']:.1%} of the fp32 download), stages "
          + ", ".join(f"{t:.2f}" for t in st[1:]) + f" s; full/fp32 {st[-1] / fp32['download_s']:.2f}"
          + (" (computed)" if row["computed"] else ""), flush=True)


def _fmt_s(t: float) -> str:
    return f"{t:.2f} s" if t < 10 else f"{t:.1f} s" if t < 100 else f"{t:.0f} s"


def table(results: dict) -> str:
    lines = [("| model | link | fp32 download | fp32 first inference | p2u first inference "
              "| share of fp32 download | stage 1 (8 bit) | full precision (lossless) "
              "| full / fp32 download |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        for mbit in sorted(entry["runs"], key=float):
            row = entry["runs"][mbit]
            fp32, p = row["fp32"], row["p2u"]
            st = _stage_times(p)
            c = "*" if row["computed"] else ""
            lines.append(
                f"| {LABELS[name]} | {float(mbit):g} Mbit/s | {_fmt_s(fp32['download_s'])}{c} "
                f"| {_fmt_s(fp32['first_inference_s'])}{c} | **{_fmt_s(st[0])}** "
                f"| {st[0] / fp32['download_s']:.1%} | {_fmt_s(st[1])}{c} "
                f"| {_fmt_s(st[-1])}{c} | {st[-1] / fp32['download_s']:.2f}{c} |")
    return "\n".join(lines)


def bytes_table(results: dict) -> str:
    lines = [("| model | fp32 .onnx | manifest | base (stage 0) | probe | stage 1 | stage 2 "
              "| p2u total | before first inference |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        p = next(iter(entry["runs"].values()))["p2u"]
        s = p["stage_bytes"]
        first = p["manifest_bytes"] + s[0] + p["probe_bytes"]
        lines.append(f"| {LABELS[name]} | {entry['fp32_bytes']:,} | {p['manifest_bytes']:,} "
                     f"| {s[0]:,} | {p['probe_bytes']:,} | {s[1]:,} | {s[2]:,} "
                     f"| {p['wire_bytes']:,} | {first / entry['fp32_bytes']:.1%} |")
    return "\n".join(lines)


def targets(results: dict) -> str:
    """The goals at 1 Mbit/s: first inference within 1/6 of the fp32 download time, full
    precision no later than the fp32 download."""
    out = []
    for name, entry in results["models"].items():
        row = entry["runs"].get("1") or entry["runs"].get("1.0")
        if row is None:
            continue
        dl, st = row["fp32"]["download_s"], _stage_times(row["p2u"])
        ok1, ok2 = st[0] <= dl / 6, st[-1] <= dl
        out.append(f"- {LABELS[name]}: first inference {_fmt_s(st[0])} against a limit of "
                   f"{_fmt_s(dl / 6)} (1/6 of {_fmt_s(dl)}): {'met' if ok1 else 'MISSED'}; "
                   f"full precision {_fmt_s(st[-1])}, no later than {_fmt_s(dl)}: "
                   f"{'met' if ok2 else 'MISSED'}.")
    return "\n".join(out)


def checks(results: dict) -> str:
    out = []
    for name, entry in results["models"].items():
        for mbit, row in sorted(entry["runs"].items(), key=lambda kv: float(kv[0])):
            fp32, p = row["fp32"], row["p2u"]
            if not row["computed"]:
                eff = fp32["bytes"] / fp32["download_s"] * 8 / 1e6
                out.append(f"- {LABELS[name]} at {float(mbit):g} Mbit/s: the fp32 download ran "
                           f"at {eff:.3f} Mbit/s.")
            else:
                out.append(f"- {LABELS[name]} at {float(mbit):g} Mbit/s: first inference "
                           f"measured {p['first_inference_s']:.1f} s, computed "
                           f"{p['first_inference_computed_s']:.1f} s by the method used for "
                           "the cells marked *.")
    return "\n".join(out)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        runs = results["models"][name]["runs"]
        rates = sorted(runs, key=float)
        x = [float(r) for r in rates]
        series = {
            "fp32: download + first inference": [runs[r]["fp32"]["first_inference_s"]
                                                 for r in rates],
            "p2u: first inference (4-bit base)": [_stage_times(runs[r]["p2u"])[0] for r in rates],
            "p2u: stage 1 (8 bit)": [_stage_times(runs[r]["p2u"])[1] for r in rates],
            "p2u: full precision (lossless)": [_stage_times(runs[r]["p2u"])[-1] for r in rates],
        }
        styles = ["k-o", "C0-o", "C1--s", "C2-^"]
        for (label, ys), style in zip(series.items(), styles):
            ax.plot(x, ys, style, label=label)
        for r, xv in zip(rates, x):
            if runs[r]["computed"]:
                ax.annotate("computed*", (xv, runs[r]["fp32"]["first_inference_s"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.set_xlabel("link (Mbit/s)")
        ax.set_ylabel("seconds from the start of the fetch")
        ax.set_title(f"{LABELS[name]} ({results['models'][name]['fp32_bytes'] / 1e6:.1f} MB fp32)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "delivery-ttfi.png", dpi=110)
    plt.close(fig)

    name = "minilm" if "minilm" in results["models"] else names[0]
    row = results["models"][name]["runs"].get("1") or results["models"][name]["runs"].get("1.0")
    if row is None or row["computed"]:
        return
    fig, ax = plt.subplots(figsize=(8, 4.2))
    fs = np.array(row["fp32"]["samples"])
    ps = np.array(row["p2u"]["samples"])
    ax.plot(fs[:, 0], fs[:, 1] / 1e6, "k-", label="fp32 .onnx download")
    ax.plot(ps[:, 0], ps[:, 1] / 1e6, "C0-", label="p2u package download")
    ax.axvline(row["fp32"]["first_inference_s"], color="k", ls=":",
               label=f"fp32 first inference ({_fmt_s(row['fp32']['first_inference_s'])})")
    names_k = ["first inference (base)", "stage 1 (8 bit)", "full precision"]
    for k, t in enumerate(_stage_times(row["p2u"])):
        ax.axvline(t, color=f"C{k + 1}", ls="--", label=f"p2u {names_k[min(k, 2)]} ({_fmt_s(t)})")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MB received")
    ax.set_title(f"{LABELS[name]} over a 1 Mbit/s link")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "delivery-timeline.png", dpi=110)
    plt.close(fig)


def write_doc(results: dict) -> None:
    import onnxruntime as ort

    when = results.get("date", time.strftime("%Y-%m-%d"))
    section = "\n".join([
        BEGIN,
        (f"Measured {when} with `python scripts/bench_http.py` (onnxruntime "
         f"{results.get('onnxruntime', ort.__version__)}, Python {sys.version.split()[0]}, "
         f"{os.cpu_count()} CPUs)."),
        "",
        "Bytes per file:",
        "",
        bytes_table(results),
        "",
        "Seconds from the start of the fetch (cells marked * are computed, see below):",
        "",
        table(results),
        "",
        "![time to first inference](delivery-ttfi.png)",
        "",
        "![MiniLM at 1 Mbit/s](delivery-timeline.png)",
        "",
        "Targets at 1 Mbit/s:",
        "",
        targets(results),
        "",
        "Checks of the simulated links:",
        "",
        checks(results),
        END,
    ])
    text = DOC.read_text() if DOC.exists() else f"# Delivery over HTTP\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(head + section + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits,minilm")
    ap.add_argument("--rates", default="0.25,1,10", help="link rates in Mbit/s")
    ap.add_argument("--full", action="store_true",
                    help="measure MiniLM at < 1 Mbit/s too (about 90 minutes at 0.25)")
    ap.add_argument("--reencode", action="store_true", help="encode the packages again")
    ap.add_argument("--from-json", action="store_true",
                    help="only redo the doc and plots from build/bench_http/results.json")
    ap.add_argument("--one", choices=["p2u", "fp32"], help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--until-first", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return _one(args.one, args.url, args.models, args.until_first)
    if args.from_json:
        results = json.loads((OUT / "results.json").read_text())
    else:
        results = run(args.models.split(","), [float(r) for r in args.rates.split(",")],
                      args.full, args.reencode)
    print()
    print(bytes_table(results))
    print()
    print(table(results))
    print()
    print(targets(results))
    print(checks(results))
    plot(results)
    write_doc(results)
    print(f"\nwrote {OUT / 'results.json'}, {DOC}, docs/delivery-ttfi.png, "
          "docs/delivery-timeline.png")


if __name__ == "__main__":
    main()
