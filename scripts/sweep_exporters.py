"""Encode models as other exporters write them, the way a new user would, and print one row each.

The models are made here, offline and seeded: scikit-learn estimators through skl2onnx
(classifiers end in ZipMap: class probabilities as a sequence of maps; a k-NN classifier whose
weights are its training set; trees; a pipeline), and small torch models through both torch
exporters (the legacy TorchScript one and ``dynamo=True``, which writes external data and one
copy of a tensor per use): a patch transformer, a conv/norm/transposed-conv net, an
embedding + bidirectional LSTM text model, a tiny LM with tied embeddings, a 1-D conv + GRU
audio model, a half-precision CNN, and a graph whose weights sit in the branches of an If.

Per model: encode with the defaults (no inputs given: synthesized ones), verify, then
``p2u eval --synth`` against the original: base share of the fp32-equivalent bytes, stage-0
agreement and cosine, stage-0 latency over the original's (median, interleaved), package bytes
over zstd -19 of the model file(s), whether the last stage is bit-exact, whether a probe was
recorded and calibration ran, and the encoder's warnings.

Usage::

    python scripts/sweep_exporters.py [--out build/sweep] [--only a,b] [--json out.json]

Needs the test extras (scikit-learn, skl2onnx) and, for the torch models, torch and
onnxscript (``pip install torch onnxscript``); models whose maker is missing are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "sweep"


# ------------------------------------------------------------------ scikit-learn


def _sklearn(kind: str, out: Path) -> list[Path]:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    model = {
        "skl-mlp-zipmap": lambda: MLPClassifier((128,), max_iter=80, random_state=0),
        "skl-logreg-pipeline": lambda: make_pipeline(StandardScaler(),
                                                     LogisticRegression(max_iter=300)),
        "skl-knn": lambda: KNeighborsClassifier(3),
        "skl-forest": lambda: RandomForestClassifier(20, max_depth=8, random_state=0),
        "skl-gbr": lambda: GradientBoostingRegressor(n_estimators=50, random_state=0),
    }[kind]()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y if kind != "skl-gbr" else y.astype(float))
    path = out / f"{kind}.onnx"
    path.write_bytes(to_onnx(model, x[:1]).SerializeToString())
    return [path]


# ------------------------------------------------------------------ torch


def _torch_models() -> dict[str, tuple[Callable[[], Any], Callable[[], tuple], dict]]:
    import torch
    from torch import nn

    class PatchTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 64, 8, 8)
            layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            return self.head(self.enc(t).mean(1))

    class ConvNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.GroupNorm(8, 32), nn.SiLU(),
                                   nn.Conv2d(32, 32, 3, 1, 1, groups=32), nn.BatchNorm2d(32),
                                   nn.ReLU())
            self.u = nn.ConvTranspose2d(32, 16, 4, 2, 1)
            self.o = nn.Conv2d(16, 1, 1)

        def forward(self, x):
            return torch.sigmoid(self.o(self.u(self.d(x))))

    class TextLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e = nn.Embedding(1000, 64)
            self.lstm = nn.LSTM(64, 96, batch_first=True, bidirectional=True)
            self.h = nn.Linear(192, 5)

        def forward(self, ids):
            o, _ = self.lstm(self.e(ids))
            return self.h(o[:, -1])

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(2000, 128)
            self.pos = nn.Parameter(torch.randn(64, 128) * 0.02)
            layer = nn.TransformerEncoderLayer(128, 4, 256, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            with torch.no_grad():
                for p in self.blocks.parameters():
                    p += torch.randn_like(p) * 0.02  # the layers differ
            self.ln = nn.LayerNorm(128)
            self.head = nn.Linear(128, 2000, bias=False)
            self.head.weight = self.emb.weight  # tied

        def forward(self, ids):
            h = self.emb(ids) + self.pos[: ids.shape[1]]
            return self.head(self.ln(self.blocks(h)))

    class AudioGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Sequential(nn.Conv1d(1, 32, 9, 2, 4), nn.ReLU(),
                                   nn.Conv1d(32, 64, 5, 2, 2), nn.ReLU(),
                                   nn.Conv1d(64, 64, 3, 1, 2, dilation=2, groups=4), nn.ReLU())
            self.g = nn.GRU(64, 64, batch_first=True)
            self.h = nn.Linear(64, 3)

        def forward(self, x):
            o, _ = self.g(self.c(x).transpose(1, 2))
            return self.h(o)

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x):
            return self.f(x)

    def ids(t: int) -> Callable[[], tuple]:
        return lambda: (torch.randint(0, 1000, (1, t)),)

    return {
        "patch-transformer": (PatchTransformer, lambda: (torch.randn(1, 3, 32, 32),),
                              {"x": {0: "b"}}),
        "conv-norm": (ConvNorm, lambda: (torch.randn(1, 3, 64, 64),),
                      {"x": {0: "b", 2: "h", 3: "w"}}),
        "text-lstm": (TextLSTM, ids(12), {"x": {0: "b", 1: "t"}}),
        "tied-lm": (TiedLM, ids(16), {"x": {0: "b", 1: "t"}}),
        "audio-gru": (AudioGRU, lambda: (torch.randn(1, 1, 1600),), {"x": {0: "b", 2: "n"}}),
        "cnn-fp16": (SmallCNN, lambda: (torch.randn(1, 3, 32, 32),), {"x": {0: "b"}}),
    }


def _torch(kind: str, out: Path) -> list[Path]:
    import torch

    name, dynamo = (kind[: -len("-dynamo")], True) if kind.endswith("-dynamo") else (kind, False)
    make, example, axes = _torch_models()[name]
    torch.manual_seed(0)
    model = make().eval()
    args = example()
    if name == "cnn-fp16":
        model, args = model.half(), tuple(a.half() for a in args)
    path = out / f"{kind}.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, args, str(path), input_names=["x"], dynamo=True)
        else:
            torch.onnx.export(model, args, str(path), input_names=["x"], dynamic_axes=axes,
                              opset_version=17, dynamo=False)
    return [path] + sorted(out.glob(f"{kind}.onnx.data"))


def _if_branches(kind: str, out: Path) -> list[Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def branch(name: str):
        w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.1,
                                    f"{name}_w")
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])], name, [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["b", 64])], [w])

    g = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["y"], then_branch=branch("then"),
                          else_branch=branch("else"))],
        "if-branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = out / f"{kind}.onnx"
    onnx.save(m, str(path))
    return [path]


MODELS: dict[str, Callable[[str, Path], list[Path]]] = {
    **{k: _sklearn for k in ("skl-mlp-zipmap", "skl-logreg-pipeline", "skl-knn", "skl-forest",
                             "skl-gbr")},
    **{k: _torch for k in ("patch-transformer", "patch-transformer-dynamo", "conv-norm",
                           "conv-norm-dynamo", "text-lstm", "text-lstm-dynamo", "tied-lm",
                           "tied-lm-dynamo", "audio-gru", "cnn-fp16")},
    "if-branches": _if_branches,
}


# ------------------------------------------------------------------ one row


def _zstd19(files: list[Path]) -> int:
    import zstandard

    c = zstandard.ZstdCompressor(level=19)
    return sum(len(c.compress(f.read_bytes())) for f in files)


def run_one(kind: str, out: Path) -> dict[str, Any]:
    import p2u_onnx
    from p2u_onnx.evaluation import evaluate

    row: dict[str, Any] = {"model": kind}
    try:
        files = MODELS[kind](kind, out)
    except ImportError as e:
        row["skipped"] = f"maker needs {e.name}"
        return row
    src, pkg = files[0], out / f"{kind}.p2u"
    res = p2u_onnx.encode(src, pkg, overwrite=True)
    m = res.manifest
    row["warnings"] = list(res.warnings)
    row["probe"] = "probe" in m
    row["calibrated"] = bool((m.get("allocation") or {}).get("calibrated"))
    row["lossless"] = p2u_onnx.verify(pkg)["lossless_match"]
    wire = sum(p.stat().st_size for p in pkg.iterdir()
               if p.name == "manifest.json" or p.name == "probe.npz"
               or (p.name.startswith("stage-") and p.name.endswith(".p2u")))
    row["package_vs_zstd19"] = wire / _zstd19(files)
    try:
        ev = evaluate(pkg, src, synth=True, repeats=60)
        s0 = ev["stages"][0]
        row.update(base_share=s0["share"], agreement=s0["agreement"], cosine=s0["cosine"],
                   latency_ratio=s0["latency_ratio"])
    except p2u_onnx.P2UError as e:
        row["eval_error"] = str(e)[:200]
    return row


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | base share | stage-0 agree / cosine | stage-0 latency | package / zstd-19 "
             "| last exact | probe | calibrated | warnings |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} |||||||")
            continue
        warn = "<br>".join(w[:140] for w in r.get("warnings", [])) or "none"
        if "eval_error" in r:
            warn = f"eval: {r['eval_error']}<br>{warn}"
        lines.append(
            f"| {r['model']} | {_f(r.get('base_share'), '.1%')} | {_f(r.get('agreement'), '.4f')}"
            f" / {_f(r.get('cosine'), '.5f')} | {_f(r.get('latency_ratio'), '.2f')}x "
            f"| {r['package_vs_zstd19']:.2f}x | {'yes' if r['lossless'] else 'NO'} "
            f"| {'yes' if r['probe'] else 'no'} | {'yes' if r['calibrated'] else 'no'} | {warn} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", help="comma-separated model names (default: all)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    names = a.only.split(",") if a.only else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in names:
        print(f"{n} ...", file=sys.stderr, flush=True)
        rows.append(run_one(n, a.out))
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
