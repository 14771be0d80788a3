"""What a base's error does to each model output, as the task reading it sees it (encoder side).

Output cosine on a batch is the wrong yardstick for many outputs: a regression head (a MOS
score, one number per input) keeps a cosine near 1 for errors of a whole point, a detector's
box decisions flip on scores near their threshold while the map's cosine barely moves, an
argmax flips on rows whose top two classes are close. Each float output of a model (or each
column of a small last axis, as boxes ``x, y, w, h, score, class``) is therefore read as one of
these kinds, chosen from its shape, the ops that make it and its values on the calibration
inputs, with no knowledge of the model:

* ``classes`` (a Softmax over the last axis: class scores): top-1 agreement. Estimated from
  the reference rows' margins (top-1 minus top-2): a row flips when the error on the difference
  of its two best scores exceeds its margin. (Logits look like embeddings or any other vector:
  they are read by their cosine);
* ``decisions`` (values in [0, 1] made by a Sigmoid or Softmax, or a [0, 1] column of a small
  last axis: probabilities, masks, scores): the share of values on the same side of each of
  :data:`THRESHOLDS`, the worst threshold. Estimated from the distance of each reference value
  to the threshold;
* ``regression`` (at most :data:`SMALL_HEAD` values per sample, or another column of a small
  last axis: scores, coordinates): the share of values within :data:`REG_TOLERANCE` of the
  output's spread across inputs (its standard deviation) of the reference. Estimated from the
  error relative to that spread (1 - R^2), for a normal error;
* ``cosine`` (everything else: embeddings, hidden states, dense maps): the output cosine.

Every kind maps a normalized squared error ``e = sum((got - ref)^2) / den`` (additive over
small independent weight errors, which is what the allocator adds up) to its quality
(:meth:`OutputCheck.quality`), and measures the real quality of given outputs
(:meth:`OutputCheck.measure`). :func:`error_at` inverts the map: the error at which the output
just reaches a target, from which :mod:`p2u_onnx.calibrate` weighs each output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from onnx import NodeProto

__all__ = ["OutputCheck", "checks_for", "error_at", "target_error", "DEFAULT_TARGETS", "KIND_METRIC"]

MIN_UNIT = 64  # a column is read as decisions when at least this many values lie in [0, 1]
SMALL_HEAD = 8  # at most this many values per row: a head of scores/coordinates, per column
REG_TOLERANCE = 0.2  # regression: within this share of the output's spread counts as agreeing
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)  # decision thresholds a [0, 1] output may be read at
MAX_SAMPLED = 1 << 16  # reference values kept per check for the estimates
# Default targets per kind (``BitBudget.quality`` replaces them all): an agreement of 0.985
# estimated leaves room for the estimate's error above the 0.97 users expect; embeddings are
# read by their cosine, 0.995 estimated for 0.99.
DEFAULT_TARGETS = {"classes": 0.985, "decisions": 0.985, "regression": 0.985, "cosine": 0.995}
KIND_METRIC = {"classes": "top-1 agreement", "decisions": "decision agreement",
               "regression": f"share within {REG_TOLERANCE:g} of its spread",
               "cosine": "cosine"}
# a regression output whose spread on the calibration inputs is below this share of its
# magnitude does not vary on them: its spread is floored there, and a note says so
FLAT_SPREAD = 1e-3

# a decision output with fewer than MIN_NEAR of its values in the UNCERTAIN band on the
# calibration inputs does not show how close real inputs sit to its thresholds (a voice
# detector on white noise: 1.6% of its probabilities in 0.2..0.8, 20% on speech)
UNCERTAIN = (0.2, 0.8)
MIN_NEAR = 0.05
# class scores whose median margin (top-1 minus top-2) is below this: the model is unsure on
# the calibration inputs, whose margins then say little about real ones
UNSURE_MARGIN = 0.1

_SHAPE_ONLY = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice",
               "Gather", "Concat", "Split", "Cast", "Expand", "Tile"}
_SQUASHING = {"Softmax", "Sigmoid", "HardSigmoid"}
_LINEAR = {"Gemm", "MatMul"}


def _erfc(x: np.ndarray) -> np.ndarray:
    """erfc for x >= 0 (Abramowitz and Stegun 7.1.26, error below 1.5e-7), vectorized."""
    x = np.asarray(x, np.float64)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (
        -1.453152027 + t * 1.061405429))))
    return poly * np.exp(-x * x)


def _tail(z: np.ndarray) -> np.ndarray:
    """P(N(0, 1) > z) for z >= 0."""
    return 0.5 * _erfc(np.asarray(z, np.float64) / math.sqrt(2.0))


@dataclasses.dataclass
class OutputCheck:
    """One output (or one column of its last axis) and how its quality is read."""

    label: str  # output name, with [k] for a column
    index: int  # position among the calibration's float outputs
    column: int | None  # last-axis column, or None for the whole output
    kind: str  # classes, decisions, regression, cosine
    den: float  # normalizer of the squared error
    count: int  # values compared
    sampled: np.ndarray  # classes: row margins; decisions: values; others: unused
    spread: float = 0.0  # regression: the reference's standard deviation (floored)
    # the calibration inputs do not exercise it: a regression output that barely varies, a
    # decision output with (almost) no value near a threshold, class scores with no margin.
    # Class scores and regressions are then weighed as a cosine target (:func:`target_error`);
    # decisions keep their own (their thresholds 0.1 and 0.9 still read the tails)
    flat: bool = False
    sumsq: float = 1.0  # sum of the squared reference values
    target: float = 0.985

    def part(self, value: np.ndarray) -> np.ndarray:
        """The values of this check within a whole output."""
        v = np.asarray(value)
        return v if self.column is None else v[..., self.column]

    def quality(self, error: float) -> float:
        """Estimated quality (in this kind's metric) at normalized squared error ``error``."""
        e = max(float(error), 0.0)
        if self.kind == "cosine":
            return max(-1.0, 1.0 - e / 2)
        if e == 0.0:
            return 1.0
        if self.kind == "regression":
            return float(math.erf(REG_TOLERANCE / math.sqrt(2 * e)))
        sigma = math.sqrt(e * self.den / max(self.count, 1))
        if sigma == 0.0 or not self.sampled.size:
            return 1.0
        if self.kind == "classes":  # the error on a difference of two scores: sqrt(2) sigma
            return float(1.0 - np.mean(_tail(self.sampled / (math.sqrt(2.0) * sigma))))
        return float(min(1.0 - np.mean(_tail(np.abs(self.sampled - t) / sigma))
                         for t in THRESHOLDS))

    def measure(self, refs: Sequence[np.ndarray], gots: Sequence[np.ndarray]) -> float:
        """The real quality of outputs ``gots`` against ``refs`` (one array per feed)."""
        rs = [np.asarray(self.part(r), np.float64) for r in refs]
        gs = [np.asarray(self.part(g), np.float64) for g in gots]
        if self.kind == "classes":
            same = sum(int(np.sum(r.argmax(-1) == g.argmax(-1))) for r, g in zip(rs, gs))
            return same / max(sum(r[..., 0].size for r in rs), 1)
        if self.kind == "decisions":
            n = max(sum(r.size for r in rs), 1)
            return min(sum(int(np.sum((r > t) == (g > t))) for r, g in zip(rs, gs)) / n
                       for t in THRESHOLDS)
        if self.kind == "regression":
            n = max(sum(r.size for r in rs), 1)
            tol = REG_TOLERANCE * self.spread
            return sum(int(np.sum(np.abs(g - r) <= tol)) for r, g in zip(rs, gs)) / n
        sims = []
        for r, g in zip(rs, gs):
            a = r.reshape(len(r), -1) if r.ndim >= 2 else r.reshape(1, -1)
            b = g.reshape(a.shape)
            na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
            sims.extend(np.where(na * nb > 0, (a * b).sum(1) / np.maximum(na * nb, 1e-300),
                                 np.where(na + nb > 0, 0.0, 1.0)))
        return float(np.mean(sims)) if sims else 1.0

    def describe(self, value: float) -> str:
        return f"{KIND_METRIC[self.kind]} of {self.label} {value:.4f}"


def error_at(check: OutputCheck, target: float) -> float:
    """The normalized squared error at which ``check`` estimates exactly ``target`` (bisection
    on a log scale; the map is decreasing in the error)."""
    if check.kind == "cosine":
        return max(2.0 * (1.0 - target), 1e-12)
    lo, hi = -30.0, 8.0  # log10 of the error
    if check.quality(10.0 ** hi) >= target:
        return 10.0 ** hi
    if check.quality(10.0 ** lo) < target:
        return 10.0 ** lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if check.quality(10.0 ** mid) >= target:
            lo = mid
        else:
            hi = mid
    return 10.0 ** lo


def target_error(check: OutputCheck, target: float, cosine_target: float) -> float:
    """The normalized error the allocation aims ``check`` at: where it reaches ``target``
    and its output cosine ``cosine_target``, or, for class scores and regressions the calibration inputs do not exercise (``flat``),
    where an output cosine reaches ``cosine_target`` (what the estimate cannot see is not
    bought blindly)."""
    as_cosine = max(2.0 * (1.0 - cosine_target), 1e-12) * check.sumsq / max(check.den, 1e-300)
    if check.flat and check.kind in ("classes", "regression"):
        return as_cosine
    # never looser than the cosine target: a recognizer that confidently answers "blank" on
    # noise images shows margins that say any error is fine
    return min(error_at(check, target), as_cosine)


def _source(producer: Mapping[str, NodeProto], name: str) -> NodeProto | None:
    """The node that makes ``name``, looking through shape-only ops (first input)."""
    for _ in range(64):
        node = producer.get(name)
        if node is None or node.op_type not in _SHAPE_ONLY or not node.input:
            return node
        name = node.input[0]
    return None


def _made_by(producer: Mapping[str, NodeProto], name: str) -> str:
    """``softmax``, ``sigmoid``, ``linear`` (a Gemm or MatMul, plus a bias Add) or ``other``."""
    node = _source(producer, name)
    if node is None:
        return "other"
    if node.op_type == "ZipMap":  # class probabilities as maps (scikit-learn classifiers)
        return "softmax"
    if node.op_type == "Softmax" or node.op_type == "Div" and \
            getattr(producer.get(node.input[0]), "op_type", "") == "Exp":
        return "softmax"  # also exp(x) / sum(exp(x)), as JAX and TF exports write it
    if node.op_type in _SQUASHING:
        return "sigmoid"
    if node.op_type == "Add" and len(node.input) == 2:
        a = _source(producer, node.input[0])
        b = _source(producer, node.input[1])
        if any(getattr(x, "op_type", "") in _LINEAR for x in (a, b)):
            return "linear"
    return "linear" if node.op_type in _LINEAR else "other"


def _in_unit(values: Sequence[np.ndarray]) -> bool:
    """Every value finite and in [0, 1], and not all equal."""
    vs = [v for v in values if v.size]
    if not vs or not all(np.all(np.isfinite(v)) for v in vs):
        return False
    lo, hi = min(float(v.min()) for v in vs), max(float(v.max()) for v in vs)
    return 0.0 <= lo < hi <= 1.0


def _sample(flat: np.ndarray) -> np.ndarray:
    if flat.size <= MAX_SAMPLED:
        return flat
    return flat[np.arange(MAX_SAMPLED, dtype=np.int64) * flat.size // MAX_SAMPLED]


def _finite(vs: Sequence[np.ndarray]) -> np.ndarray:
    flat = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in vs]) \
        if vs else np.zeros(0)
    return flat[np.isfinite(flat)]


def _check(label: str, index: int, column: int | None, kind: str,
           values: Sequence[np.ndarray]) -> OutputCheck:
    flat = _finite(values)
    sumsq = float(np.sum(flat * flat)) or 1.0
    if kind == "classes":
        margins = []
        for v in values:
            rows = np.asarray(v, np.float64).reshape(-1, v.shape[-1])
            rows = rows[np.all(np.isfinite(rows), axis=1)]
            top = np.sort(rows, axis=1)[:, -2:]
            margins.append(top[:, 1] - top[:, 0])
        m = np.concatenate(margins)
        # a model unsure on most inputs (random noise for an image classifier) shows margins
        # that real inputs do not have
        unsure = bool(m.size) and float(np.median(m)) < UNSURE_MARGIN
        return OutputCheck(label, index, column, kind, sumsq, flat.size, _sample(m),
                           flat=unsure, sumsq=sumsq)
    if kind == "decisions":
        # (almost) no value in the uncertain band: the inputs do not exercise the decisions
        some = _sample(flat)
        near = float(np.mean((some > UNCERTAIN[0]) & (some < UNCERTAIN[1]))) \
            if some.size else 0.0
        return OutputCheck(label, index, column, kind, sumsq, flat.size, some,
                           flat=near < MIN_NEAR, sumsq=sumsq)
    if kind == "regression":
        rms = math.sqrt(float(np.mean(flat * flat))) if flat.size else 0.0
        std = float(np.std(flat)) if flat.size else 0.0
        floor = FLAT_SPREAD * rms
        flat_out = std <= floor
        spread = max(std, floor) or 1.0
        return OutputCheck(label, index, column, kind, max(flat.size, 1) * spread * spread,
                           flat.size, np.zeros(0), spread=spread, flat=flat_out, sumsq=sumsq)
    return OutputCheck(label, index, column, kind, sumsq, flat.size, np.zeros(0), sumsq=sumsq)


def checks_for(name: str, index: int, values: Sequence[np.ndarray],
               producer: Mapping[str, NodeProto], batched: bool) -> list[OutputCheck]:
    """How output ``name`` (its values on each calibration feed) is read; ``batched``: its
    first axis runs over the inputs (samples), so what is left per sample decides a head."""
    vs = [np.asarray(v, np.float64) for v in values]
    shape = vs[0].shape if vs else ()
    made = _made_by(producer, name)
    last = shape[-1] if shape else 1
    per_sample = int(np.prod(shape[1:] if batched and len(shape) >= 1 else shape))
    if made == "softmax" and len(shape) >= 1 and last > 1:
        return [_check(name, index, None, "classes", vs)]
    if made in ("softmax", "sigmoid") and _in_unit(vs):
        return [_check(name, index, None, "decisions", vs)]
    if len(shape) >= 2 and 1 < last <= SMALL_HEAD:  # a small head: boxes, scores, ratings
        out = []
        for k in range(last):
            col = [v[..., k] for v in vs]
            # a handful of values in [0, 1] is no evidence of a probability
            kind = "decisions" if _in_unit(col) and sum(c.size for c in col) >= MIN_UNIT \
                else "regression"
            out.append(_check(f"{name}[{k}]", index, k, kind, col))
        return out
    if per_sample <= SMALL_HEAD // 2 or not shape:
        return [_check(name, index, None, "regression", vs)]
    return [_check(name, index, None, "cosine", vs)]
