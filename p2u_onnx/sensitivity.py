"""Per-tensor bits for the base: estimate, for every coded tensor and candidate width, its size
on the wire and its effect on the outputs, then :func:`~p2u_onnx.allocate.allocate` (encoder).

* size: the entropy of the codes of a sample of blocks, plus ~1.4 bytes per block scale;
* weight error: squared quantization error on that sample, weighted by the mean square of the
  activation each weight multiplies (from :mod:`p2u_onnx.calibrate`), relative to the weighted
  signal;
* output error: weight error times a per-tensor gain measured once, by running the model with
  that tensor alone at 3 bits (tensors that cannot be measured get the median gain); the same
  runs decide, per tensor, whether the quantizer may clip outliers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from onnx import GraphProto, ModelProto

from . import palette as pl
from . import quantizers as qz
from .allocate import Allocation, TensorCost, allocate_from_default
from .calibrate import (Calibration, fallback_sizes, load_feeds,
                        synthesize_feeds)
from .config import BitBudget, Plan, QuantConfig
from .errors import P2UError, PlanError
from .dtypes import dtype_info
from .reconstruct import base_blocks

__all__ = ["plan_bits", "BitPlan"]

SAMPLE_BLOCKS = 4096
SCALE_BYTES = {2: 1.3, 4: 1.4}  # measured wire cost of one block scale, by scale width
REFERENCE_BITS = 3
CODE_OVERHEAD = 1.03  # zstd's cost over the codes' entropy, measured
CAP_MARGIN = 0.96  # size estimates came within 4% of the real base on the models measured
CALIBRATION_LIMIT = 1 << 30  # above this many bytes of coded weights, no calibration runs


@dataclasses.dataclass
class BitPlan:
    """What the encoder needs from the allocation."""

    bits: dict[str, int]  # slot key -> base bits
    importance: dict[str, np.ndarray]  # slot key -> per-input-channel weights (broadcastable)
    est_error: dict[str, float]  # slot key -> estimated output error at its bits
    allocation: Allocation | None
    calibrated: bool
    notes: list[str]
    clip: dict[str, bool] = dataclasses.field(default_factory=dict)  # clip search per tensor
    # keyword arguments for probe.record_probe: the inputs calibration used (spec, feeds)
    probe_inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    fixed_bytes: float = 0.0  # estimated bytes of the base besides the coded weights
    # per output (or column) read by its task: metric, target, estimated and measured quality
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    measured_error: float | None = None  # the whole base's error on the calibration inputs

    @property
    def est_quality(self) -> float | None:
        """Estimated quality on the target's scale (``1 - error / 2``: it reaches the target
        exactly when every output reaches its own): measured on the whole base when
        calibrated, else the allocation's sum."""
        if self.allocation is None:
            return None
        err = self.measured_error if self.measured_error is not None else self.allocation.error
        return _quality(err)


def candidates(plan: Plan) -> list[int]:
    low = 2 if plan.base_bits <= 2 else 3
    return sorted({b for b in (2, 3, 4, 5, 6, 8) if b >= low} | {plan.base_bits})


def _sample(blocks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if len(blocks) <= SAMPLE_BLOCKS:
        return np.arange(len(blocks))
    return np.sort(rng.choice(len(blocks), SAMPLE_BLOCKS, replace=False))


def _reconstruct(blocks: np.ndarray, info, config: QuantConfig, clip: bool,
                 importance: np.ndarray | None, bits: int = REFERENCE_BITS) -> np.ndarray:
    """The base at ``bits`` of a whole tensor's blocks, quantized in chunks (memory)."""
    out = np.empty(blocks.shape, info.storage)
    step = max(1, (1 << 18) // max(blocks.shape[1], 1))
    for i in range(0, len(blocks), step):
        q = qz.quantize_base(blocks[i:i + step], bits, info, symmetric=config.symmetric,
                             clip_search=clip,
                             importance=None if importance is None else importance[i:i + step])
        out[i:i + step] = base_blocks(q, info)
    return out


def _entropy_bits(codes: np.ndarray) -> float:
    """Order-0 entropy of 8-bit codes, in bits per code."""
    counts = np.bincount(np.ascontiguousarray(codes).view(np.uint8).reshape(-1), minlength=256)
    counts = counts[counts > 0]
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def plan_bits(model: ModelProto, selected: Sequence[Any], arrays: dict[str, np.ndarray],
              plan: Plan, config: QuantConfig, budget: BitBudget, *, fixed_bytes: int = 0,
              total_bytes: int | None = None) -> BitPlan:
    """Choose base bits per selected slot. ``arrays`` holds their values (storage dtype).

    A budget given as a share is a share of ``total_bytes`` (every weight of the source, as
    ``inspect`` reports it), of which ``fixed_bytes`` go to tensors sent as they are.
    """
    notes: list[str] = []
    calib = None
    coded_bytes = sum(a.nbytes for a in arrays.values())
    if budget.calibrate and coded_bytes > CALIBRATION_LIMIT and not budget.calib:
        notes.append(f"{coded_bytes / 2**30:.1f} GiB of coded weights: bits chosen from weight "
                     "errors alone (calibration runs the model once per tensor; pass --inputs "
                     "to run it anyway)")
    elif budget.calibrate:
        weights = {s.slot.key: arrays[s.slot.key] for s in selected
                   if s.slot.kind == "initializer" and isinstance(s.slot.container, GraphProto)
                   and s.slot.container is model.graph and s.slot.key == s.slot.name
                   and (arrays[s.slot.key].dtype in (np.float32, np.float16, np.float64)
                        or s.slot.tensor.data_type == 16)}  # bfloat16, as uint16 bits
        why: list[str] = []
        try:
            feeds = load_feeds(budget.calib, model) if budget.calib else \
                synthesize_feeds(model, shapes=budget.shapes)
        except P2UError as e:
            if budget.calib:
                raise  # the user's file: a one-line error, not a silent skip
            feeds, why = None, [str(e)]
        more = None if budget.calib else (
            lambda i: synthesize_feeds(model, seed=100 * i, shapes=budget.shapes)[0])
        if feeds is not None and weights:
            calib = Calibration.build(model, weights, feeds, why, quality=budget.quality,
                                      more_feeds=more)
            # sizes the graph analysis missed: other images (not 640: the probe, one image at
            # a time, tries it), other sequence lengths, one sample at a time
            retries = [] if budget.calib or calib is not None else \
                fallback_sizes(model, budget.shapes, large_images=False)
            for r in retries:
                calib = Calibration.build(model, weights, synthesize_feeds(
                    model, shapes=budget.shapes, **r), why, quality=budget.quality,
                    more_feeds=lambda i, r=r: synthesize_feeds(
                        model, seed=100 * i, shapes=budget.shapes, **r)[0])
                if calib is not None:
                    why.clear()
                    hw = r.get("spatial")
                    what = "x".join(map(str, hw if isinstance(hw, tuple) else (hw, hw))) + \
                        " images" if hw is not None else \
                        f"sequences of {r['seq']}" if "seq" in r else "inputs"
                    if r.get("batch") == 1:
                        what += ", one sample at a time"
                    notes.append(f"calibration ran on {what} (the sizes the graph implied did "
                                 "not run; --shape sets them)")
                    break
        elif feeds is not None:
            kinds = sorted({str(a.dtype) if a.dtype != np.uint16 else "bfloat16"
                            for a in arrays.values()})
            why.append(f"no coded weight it can vary ({', '.join(kinds)} or outside the main "
                       "graph)")
        if calib is None:
            src = "on the given inputs" if budget.calib else "on synthesized inputs"
            hint = "" if budget.calib else " (--shape or --inputs give it inputs that work)"
            why = list(dict.fromkeys(why))  # the same failure at two sizes: said once
            notes.append(f"calibration skipped {src}: {'; '.join(why) or 'the model fails'}; "
                         f"bits chosen from weight errors alone, the base's quality is not "
                         f"estimated{hint}; check it with `p2u eval PKG --model MODEL "
                         "--inputs real.npz`")
    # tensors with few distinct values are coded as palettes, exact in the base (palette.py):
    # they cost the base their indices and add no error at any bits
    exact = {s.slot.key for s in selected if pl.find(arrays[s.slot.key]) is not None}
    rng = np.random.default_rng(0)
    costs, gains, clip = [], {}, {}
    check_gains: dict[str, np.ndarray] = {}  # per tensor: each output check's error per weight error
    per_tensor = {}
    for s in selected:
        key, layout = s.slot.key, s.layout
        info = dtype_info(s.slot.tensor.data_type)
        w = arrays[key]
        blocks = np.asarray(layout.to_blocks(info.to_compute(w)), np.float32)
        imp = calib.importance.get(key) if calib else None
        imp_blocks = None if imp is None else \
            layout.to_blocks(np.broadcast_to(imp, layout.shape).astype(np.float32))
        measured, vectors = {}, {}
        if calib is not None and key in calib.measurable and key not in exact:
            # the output decides whether clipping outliers helps this tensor (it lowers the
            # weights' squared error, but some models depend on their largest weights)
            for c in ((True, False) if config.clip_search else (False,)):
                recon = _reconstruct(blocks, info, config, c, imp_blocks)
                ref_w = layout.from_blocks(recon).astype(w.dtype, copy=False)
                vectors[c] = calib.output_errors({key: ref_w})
                measured[c] = float(np.max(calib._weight * vectors[c], initial=0.0))
                del recon, ref_w
            clip[key] = min(measured, key=measured.get)
        else:
            clip[key] = config.clip_search
        idx = _sample(blocks, rng)
        xs = blocks[idx]
        xs = np.where(np.isfinite(xs), xs, 0)
        ims = None if imp_blocks is None else imp_blocks[idx]
        weight = ims if ims is not None else np.ones_like(xs)
        x64 = xs.astype(np.float64)
        signal = float(np.sum(weight * x64 * x64)) or 1.0
        rel, nbytes = [], []
        scale_bytes = SCALE_BYTES[info.scale_storage.itemsize]
        for b in candidates(plan):
            bc = qz.quantize_base(xs, b, info, symmetric=config.symmetric,
                                  clip_search=clip[key], importance=ims)
            recon = info.to_compute(base_blocks(bc, info))
            rel.append(float(np.sum(weight * np.square(recon - x64))) / signal)
            nbytes.append(CODE_OVERHEAD * layout.size * _entropy_bits(bc.codes) / 8
                          + layout.n_blocks * scale_bytes)
        per_tensor[key] = (rel, nbytes)
        if key in exact:
            rel = [0.0] * len(rel)
            per_tensor[key] = (rel, nbytes)
        elif measured:
            at_ref = rel[candidates(plan).index(REFERENCE_BITS)]
            if at_ref > 0:
                gains[key] = measured[clip[key]] / at_ref
                check_gains[key] = vectors[clip[key]] / at_ref
    default_gain = float(np.median(list(gains.values()))) if gains else 1.0 / max(len(selected), 1)
    for s in selected:
        key = s.slot.key
        rel, nbytes = per_tensor[key]
        g = gains.get(key, default_gain)
        costs.append(TensorCost(key, candidates(plan), nbytes, [g * r for r in rel]))
    coded_fp32 = sum(4 * int(np.prod(s.shape)) for s in selected)
    total = total_bytes if total_bytes is not None else coded_fp32 + fixed_bytes
    if budget.budget is None:
        spend = None
    elif budget.budget < 1:
        spend = budget.budget * total - fixed_bytes
    else:
        spend = budget.budget / 32 * coded_fp32
    # the cap is a promise: keep a margin for the size estimate's error
    cap = CAP_MARGIN * budget.cap * total - fixed_bytes
    default = {c.key: plan.base_bits for c in costs}
    # without an explicit --quality, the target is also "no worse than the plain base"
    alloc = allocate_from_default(costs, default, budget=spend, max_error=budget.max_error,
                                  cap=cap, no_worse=budget.quality is None,
                                  margin=1 - CAP_MARGIN)
    outputs: list[dict[str, Any]] = []
    measured_error = None
    if calib is not None and calib.checks:
        # The estimate adds up each tensor's effect measured alone; check it on the whole base
        # (every measurable tensor at its bits) and buy more bits where it says so
        max_error = budget.max_error
        for attempt in range(MEASURE_ROUNDS):
            quality, errors = _measure(calib, selected, arrays, alloc.bits, clip, config,
                                       exact)
            measured_error = float(np.max(calib._weight * errors, initial=0.0))
            outputs = _output_report(calib, errors, quality)
            target = min(max_error, alloc.plain_error) if budget.quality is None and \
                alloc.plain_error is not None else max_error
            if measured_error <= max(target, alloc.error) * 1.05 or \
                    attempt == MEASURE_ROUNDS - 1 or alloc.error <= 0:
                break
            # the tensors together do worse than their sum said: aim lower, in proportion
            max_error = max_error * alloc.error / measured_error
            again = allocate_from_default(costs, default, budget=spend, max_error=max_error,
                                          cap=cap, no_worse=budget.quality is None,
                                          margin=1 - CAP_MARGIN)
            if again.bits == alloc.bits:
                break
            alloc = again
    notes += _allocation_notes(alloc, plan, budget, total, fixed_bytes, cap,
                               measured_error=measured_error, outputs=outputs)
    # a base that needed more than the budget, or misses its target, is fragile: then say when
    # the estimate cannot be trusted (not on every model: a warning everywhere is none)
    # (more than the budget and than the plain base: a small model's fixed costs are not it)
    fragile = _quality(measured_error if measured_error is not None else alloc.error) < \
        budget.target_quality or (spend is not None and alloc.nbytes > 1.02 * max(
            spend, alloc.plain_nbytes or 0.0))
    if calib is not None and not budget.calib:
        notes += _synthetic_notes(model, budget, calib, outputs, fragile)
    return BitPlan(alloc.bits, calib.importance if calib else {}, alloc.errors, alloc,
                   calib is not None, notes, clip, fixed_bytes=fixed_bytes,
                   outputs=outputs, measured_error=measured_error)


MEASURE_ROUNDS = 3  # measurements of the whole base, and re-allocations between them


def _measure(calib: Calibration, selected: Sequence[Any], arrays: dict[str, np.ndarray],
             bits: dict[str, int], clip: dict[str, bool], config: QuantConfig,
             exact: set[str] = frozenset()) -> tuple[list[float], np.ndarray]:
    """Each output check's quality and normalized error, measured on the calibration inputs
    with every measurable tensor at its ``bits`` (quantized as the base will be), those of
    ``exact`` (palettes) as they are."""
    overrides = {}
    for s in selected:
        key = s.slot.key
        if key not in calib.measurable or key not in bits or key in exact:
            continue
        info, layout, w = dtype_info(s.slot.tensor.data_type), s.layout, arrays[key]
        blocks = np.asarray(layout.to_blocks(info.to_compute(w)), np.float32)
        imp = calib.importance.get(key)
        imp_blocks = None if imp is None else \
            layout.to_blocks(np.broadcast_to(imp, layout.shape).astype(np.float32))
        recon = _reconstruct(blocks, info, config, clip.get(key, config.clip_search),
                             imp_blocks, bits[key])
        overrides[key] = layout.from_blocks(recon).astype(w.dtype, copy=False)
        del blocks, recon
    return calib.measure(overrides)


def _output_report(calib: Calibration, errors: np.ndarray,
                   measured: list[float]) -> list[dict[str, Any]]:
    """Per output check: what is read, its target, estimated and measured quality."""
    from .output_metrics import KIND_METRIC

    est = calib.estimate(errors)
    # the allocation also holds every output to an output cosine (output_metrics.target_error)
    cos = [max(-1.0, 1.0 - float(err) * c.den / max(c.sumsq, 1e-300) / 2) for c, err in
           zip(calib.checks, errors)]
    return [{"output": c.label, "kind": c.kind, "metric": KIND_METRIC[c.kind],
             "target": round(float(c.target), 6), "est": round(float(e), 6),
             **({"cosine": round(k, 6)} if c.kind != "cosine" else {}),
             "measured": round(float(m), 6), "values": int(c.count),
             **({"rows": int(c.sampled.size)} if c.kind == "classes" else {}),
             **({"flat": True} if c.flat else {})}
            for c, e, m, k in zip(calib.checks, est, measured, cos)]


def _quality(error: float) -> float:
    """Estimated output cosine for a relative squared output error (clipped to [-1, 1])."""
    return max(-1.0, 1.0 - error / 2)


def _worst_outputs(outputs: list[dict[str, Any]], limit: int = 3) -> str:
    """The outputs below their target, worst first, as ``metric of name est (target t)``."""
    low = sorted((o for o in outputs if min(o["est"], o["measured"]) < o["target"]),
                 key=lambda o: min(o["est"], o["measured"]) - o["target"])
    parts = [f"{o['metric']} of {o['output']} {o['est']:.4f} estimated, {o['measured']:.4f} "
             f"measured (target {o['target']:.4f})" for o in low[:limit]]
    if not parts:  # the output cosine every output is also held to
        cos = sorted((o for o in outputs if "cosine" in o), key=lambda o: o["cosine"])
        parts = [f"output cosine of {o['output']} {o['cosine']:.4f}" for o in cos[:1]]
    if len(low) > limit:
        parts.append(f"{len(low) - limit} more")
    return "; ".join(parts)


def _allocation_notes(alloc: Allocation, plan: Plan, budget: BitBudget, total: float,
                      fixed: float, cap: float, *, measured_error: float | None = None,
                      outputs: list[dict[str, Any]] | None = None) -> list[str]:
    """Warnings about the allocation (a missed target, a cap that had to give way); raises
    :class:`PlanError` when ``budget.strict`` and the quality target is missed.
    ``measured_error``: the whole base's error on the calibration inputs (replaces the
    allocation's estimate); ``outputs``: the per-output report, to name the outputs that miss."""
    notes = []
    total = max(total, 1.0)
    err = measured_error if measured_error is not None else alloc.error
    q, target = _quality(err), budget.target_quality
    share = (alloc.nbytes + fixed) / total
    if alloc.floored and alloc.nbytes > cap:
        notes.append(
            f"the base is plain {plan.base_bits}-bit at about {share:.1%} of the fp32-equivalent "
            f"bytes, above the {budget.cap:.0%} cap, of which tensors sent as they are (biases, "
            f"norms, small tensors) and the graph take {fixed / total:.1%}: a smaller base "
            f"would be worse than plain {plan.base_bits}-bit (--stages {plan.base_bits - 1},... "
            "gives a smaller plain base)" if plan.base_bits > 2 else
            f"the base is plain {plan.base_bits}-bit at about {share:.1%} of the "
            f"fp32-equivalent bytes, above the {budget.cap:.0%} cap")
    if q < target:
        best = max(_quality(alloc.best_error or 0.0), q)  # (the estimate of 8 bits is a sum)
        best_share = ((alloc.best_nbytes or 0.0) + fixed) / total
        which = _worst_outputs(outputs or [])
        msg = (f"estimated base quality {q:.4f} is below the target {target:.4f} "
               f"({'--quality' if budget.quality is not None else 'default'}) within the "
               f"{budget.cap:.0%} cap; best reachable {best:.4f} at about {best_share:.1%} "
               "(every tensor at 8 bits)" + (f"; below target: {which}" if which else ""))
        if budget.strict:
            raise PlanError(f"{msg}: raise --cap (cap=), lower --quality (quality=), or pass "
                            "--allow-below (strict=False)")
        notes.append(msg)
    else:
        # the estimate meets the target, the task's own metric on the same inputs does not
        # (beyond what the number of values measured can tell apart)
        low = [o for o in outputs or [] if not o.get("flat") and o["measured"] < o["target"]
               - 2 * math.sqrt(o["target"] * (1 - o["target"]) / max(o.get("rows", o["values"]), 1))]
        if low:
            notes.append("the estimate meets the target but the base measures below it on the "
                         "calibration inputs: " + "; ".join(
                             f"{o['metric']} of {o['output']} {o['measured']:.4f} (target "
                             f"{o['target']:.4f})" for o in low[:3]))
    return notes


def _synthetic_notes(model: ModelProto, budget: BitBudget, calib: Calibration,
                     outputs: list[dict[str, Any]], fragile: bool = True) -> list[str]:
    """A warning when the estimate rests on synthesized inputs that cannot stand in for real
    ones: float inputs (images, audio, features) with sizes the graph does not fix, or outputs
    they do not exercise (``flat`` checks: a regression that barely varies, probabilities far
    from every threshold, class scores without a clear winner), whose real sensitivity the
    estimate cannot see. Guessed sizes and outputs with no finite value always warn; outputs
    not exercised only on a ``fragile`` base; random float inputs alone never (most models
    are fine)."""
    reasons = []
    guessed = _guessed_inputs(model, budget, calib)
    if guessed:
        reasons.append("input " + ", ".join(guessed) + " has sizes the model does not fix "
                       "(guessed)")
    init = {t.name for t in model.graph.initializer}
    noise = [vi.name for vi in model.graph.input if vi.name not in init
             and vi.type.tensor_type.elem_type in (1, 10, 11, 16)]
    flat = [o["output"] for o in outputs if o.get("flat")]
    if calib.empty:
        reasons.append(f"output {', '.join(calib.empty[:4])} has no finite value on them (not "
                       "estimated)")
    elif not guessed and (not flat or not fragile):
        # random floats alone are no reason (most such models are fine), nor outputs they do
        # not exercise on a base that met its target within the budget
        return []
    if noise:
        reasons.append(f"float input {', '.join(map(repr, noise[:4]))} (image, audio or "
                       "features) is random noise there")
    if flat:
        reasons.append(f"output {', '.join(flat[:4])} is not exercised by them (a score that "
                       "barely varies, probabilities far from any threshold, or class scores "
                       "with no clear winner)")
    if not reasons:
        return []
    hint = ("check the base on real inputs with `p2u eval PKG --model MODEL --inputs "
            "real.npz`, or encode with --inputs real.npz" +
            (" or --shape NAME=D1,D2,..." if guessed else ""))
    return [f"the quality estimate comes from synthesized inputs that may not look like real "
            f"ones: {'; '.join(reasons)}; {hint}"]


def _guessed_inputs(model: ModelProto, budget: BitBudget,
                    calib: Calibration | None = None) -> list[str]:
    """Float inputs with a symbolic dimension besides the first that ``--shape`` does not
    give, as ``name (shape used)``: the shape ``calib`` ran on, else the implied one."""
    from .calibrate import input_spec

    given = dict(budget.shapes)
    init = {t.name for t in model.graph.initializer}
    names = []
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        if vi.name in init or vi.name in given or not vi.type.HasField("tensor_type"):
            continue
        if tt.elem_type not in (1, 10, 11, 16) or len(tt.shape.dim) < 2:
            continue
        if any(not (d.HasField("dim_value") and d.dim_value > 0) for d in tt.shape.dim[1:]):
            names.append(vi.name)
    if not names:
        return []
    try:
        spec = {k: v["shape"] for k, v in input_spec(model, budget.shapes, batch=4).items()}
    except P2UError:
        spec = {}
    if calib is not None and calib._feeds:
        spec.update({k: list(np.shape(v)) for k, v in calib._feeds[0].items()})
    return [f"{n!r} ({'x'.join(map(str, spec[n]))})" if n in spec else repr(n)
            for n in names]
