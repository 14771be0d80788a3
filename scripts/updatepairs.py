"""Version pairs for benchmarking model updates (``p2u encode --from``): where they live, how
each version is scored.

The models are made by ``scripts/make_update_pairs.py`` (digits CNN trained further, a head
replaced for new classes, a federated run) and ``scripts/make_minilm_update.py`` (MiniLM
fine-tuned on a retrieval task). This module needs numpy, onnxruntime and scikit-learn only
(torch is needed to *make* the models, not to score them), so the benchmark runs without torch.

A :class:`Pair` names the predecessor ``v1``, the new version ``v2`` and the task metric of
``v2`` (higher is better). Every metric takes an ONNX file's path (or a serialized model) and returns one float.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import realmodels

ROOT = realmodels.REPO_ROOT
UPDATES_DIR = ROOT / "models" / "updates"  # small committed versions
BUILD_DIR = ROOT / "build" / "updates"  # big or many versions, made by the scripts
FEDAVG_DIR = BUILD_DIR / "fedavg"
MINILM_V2_PATH = BUILD_DIR / "minilm" / "minilm_v2.onnx"
MINILM_V1_PATH = realmodels.MINILM_DEFAULT_PATH

DIGITS_V1 = realmodels.MODELS_DIR / "digits_cnn.onnx"
DIGITS_V2 = UPDATES_DIR / "digits_cnn_v2.onnx"
DIGITS_V3 = UPDATES_DIR / "digits_cnn_v3.onnx"
HEAD_V1 = UPDATES_DIR / "digits8_cnn.onnx"
HEAD_V2 = UPDATES_DIR / "digits10_head.onnx"

Metric = Callable[[Path | bytes], float]


def session(model: Path | str | bytes):
    """A one-thread CPU onnxruntime session of a model file or serialized model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def digits_accuracy(path: Path | str | bytes) -> float:
    """Top-1 accuracy on the held-out digits split (all ten classes, 540 images)."""
    return realmodels.digits_accuracy(session(path))


def digits8_accuracy(path: Path | str | bytes) -> float:
    """Top-1 accuracy on the held-out images of digits 0..7 (the 8-class predecessor)."""
    x, y = realmodels.digits_test_set()
    keep = y < 8
    logits = session(path).run(None, {"image": x[keep]})[0]
    return float(np.mean(np.argmax(logits, 1) == y[keep]))


# --------------------------------------------------------------------------------------------
# MiniLM: Python standard-library docstring -> function name + signature retrieval
# --------------------------------------------------------------------------------------------

MINILM_HELDOUT_PAIRS = 512
MINILM_DOC_TOKENS = 48
MINILM_SIG_TOKENS = 24


@functools.lru_cache(maxsize=1)
def stdlib_signature_pairs() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """``(train, held_out)`` pairs ``(docstring, "module.name(signature)")`` from the local
    standard library's source (nothing imported, no network).

    Public functions and methods of public classes with a docstring of at least 4 words are
    taken; the query is the docstring (whitespace collapsed, cut to 600 characters), the
    document the qualified name with its argument list. A module goes wholly to one side: one
    module in five (by a stable hash of its name) is held out, so no held-out function's module
    was seen in training. Duplicate queries or documents are dropped. Sorted, deterministic for
    one Python version; ``held_out`` is cut to :data:`MINILM_HELDOUT_PAIRS` at an even stride.
    """
    import ast
    import hashlib

    train: list[tuple[str, str]] = []
    held: list[tuple[str, str]] = []
    seen_q: set[str] = set()
    seen_d: set[str] = set()
    for mod, path in realmodels._stdlib_sources():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        side = held if int(hashlib.sha256(mod.encode()).hexdigest(), 16) % 5 == 0 else train
        items: list[tuple[str, ast.AST]] = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                items.append((node.name, node))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        items.append((f"{node.name}.{sub.name}", sub))
        for qual, fn in items:
            if qual.split(".")[-1].startswith("_"):
                continue
            doc = ast.get_docstring(fn)
            if not doc:
                continue
            text = " ".join(doc.split())[:600]
            if len(text.split()) < 4:
                continue
            args = ast.unparse(fn.args)
            if args.startswith("self"):
                args = args[4:].lstrip(", ")
            sig = f"{mod}.{qual}({args})"
            if text in seen_q or sig in seen_d:
                continue
            seen_q.add(text)
            seen_d.add(sig)
            side.append((text, sig))
    if len(held) > MINILM_HELDOUT_PAIRS:
        stride = len(held) / MINILM_HELDOUT_PAIRS
        held = [held[int(i * stride)] for i in range(MINILM_HELDOUT_PAIRS)]
    return tuple(train), tuple(held)


def minilm_signature_metrics(path: Path | str | bytes) -> dict[str, float]:
    """Recall@1 and MRR of docstring -> signature retrieval over the held-out pairs."""
    _, held = stdlib_signature_pairs()
    sess = session(path)
    q = realmodels.minilm_embed(sess, [d for d, _ in held], max_len=MINILM_DOC_TOKENS)
    d = realmodels.minilm_embed(sess, [s for _, s in held], max_len=MINILM_SIG_TOKENS)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ d.astype(np.float64).T
    own = np.diag(sims)
    ranks = 1 + np.sum(sims > own[:, None], axis=1)
    return {"recall@1": float(np.mean(ranks == 1)), "mrr": float(np.mean(1.0 / ranks)),
            "n_pairs": float(len(held))}


def minilm_mrr(path: Path | str | bytes) -> float:
    """MRR of docstring -> signature retrieval on the held-out pairs (the MiniLM metric)."""
    return minilm_signature_metrics(path)["mrr"]


def check_feed(model: Path | str | bytes) -> dict[str, np.ndarray]:
    """A small real input for the model's inputs (digits images, or MiniLM token ids), to
    compare a live session's outputs with the model's."""
    names = [i.name for i in session(model).get_inputs()]
    if names == ["image"]:
        return {"image": realmodels.digits_test_set()[0][:64]}
    _, held = stdlib_signature_pairs()
    ids, mask = realmodels.minilm_tokenize([d for d, _ in held[:8]], max_len=MINILM_DOC_TOKENS)
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------
# The pairs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One update: ``v1`` (what the device holds) -> ``v2`` (the new version)."""

    name: str
    v1: Path
    v2: Path
    metric_name: str
    metric: Metric
    kind: str  # "fine-tune", "head", "federated"
    fine_tune: bool  # the 5% / 0.5% target of the first stage applies
    note: str = ""
    v1_metric: Metric | None = None  # when v1 is scored on another task than v2
    extra: dict = field(default_factory=dict)

    def available(self) -> bool:
        return self.v1.is_file() and self.v2.is_file()


def pairs(include_minilm: bool = True) -> list[Pair]:
    """Every version pair of the benchmark, in report order (missing files included;
    :meth:`Pair.available` says which can run)."""
    out = [
        Pair("digits v1->v2", DIGITS_V1, DIGITS_V2, "accuracy", digits_accuracy, "fine-tune", True,
             "bundled digits CNN trained further on augmented images"),
        Pair("digits v2->v3", DIGITS_V2, DIGITS_V3, "accuracy", digits_accuracy, "fine-tune", True,
             "trained further again (chain)"),
        Pair("digits v1->v3", DIGITS_V1, DIGITS_V3, "accuracy", digits_accuracy, "fine-tune", True,
             "a device that missed v2"),
        Pair("head 8->10 classes", HEAD_V1, HEAD_V2, "accuracy", digits_accuracy, "head", False,
             "backbone frozen, head replaced: a tensor reshaped, new tensors, new nodes",
             v1_metric=digits8_accuracy),
    ]
    if include_minilm:
        out.append(Pair("minilm fine-tune", MINILM_V1_PATH, MINILM_V2_PATH, "MRR", minilm_mrr,
                        "fine-tune", True,
                        "all-MiniLM-L6-v2 fine-tuned on stdlib docstring -> signature pairs"))
    return out


def fedavg_info(folder: Path = FEDAVG_DIR) -> dict:
    """``rounds.json`` of a federated run (empty dict when there is none)."""
    meta = folder / "rounds.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def fedavg_rounds(folder: Path = FEDAVG_DIR) -> list[Path]:
    """The global model of each federated round, round 0 (the starting model) first."""
    meta = folder / "rounds.json"
    if not meta.is_file():
        return []
    info = json.loads(meta.read_text())
    return [folder / r["file"] for r in info["rounds"]]
