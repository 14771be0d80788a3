"""Model updates: a new version shipped as a progressive update against the version a device
holds (encoder side and restore; needs onnx). Format and coding: docs/updates-format.md.

An *update package* is a package directory whose manifest (format version 3) names its
``predecessor``: the exact model a device must hold (``{"weights_sha256": ...}``) or a lossy
stage of a package (``{"package_id": ..., "stage": K}``). Per coded tensor of the new model:

* ``same``: bit-identical to the predecessor's tensor of the same key: no bytes at all;
* ``delta``: same dtype and shape, changed: stage 0 codes ``new - held`` on a grid of its own
  (per block scales, in ``base.bin``), later stages refine on finer grids, the last restores
  every bit (the usual ``refine`` / ``exact`` entries);
* ``new``: added, reshaped or retyped: coded as in a full package.

Stage 0 (``stage-0.p2u``) carries ``base.bin`` (delta and new codes) and ``graph.onnx`` (the new
model's skeleton: its structure and small tensors). What a device holds after stage k is a
function of what it held before and stages 0..k, so the encoder replays it exactly and the next
update can be coded against it (chains v1 -> v2 -> v3).

A :class:`Held` is such a state on the encoder / restore side: the coded tensors by key and the
state's identity. :func:`held_state` makes one from a model file, a full package (at a stage)
or a chain of updates; :func:`apply_update` moves one through an update;
:func:`encode_update` writes an update; :func:`restore_update` / :func:`verify_update` /
:func:`inspect` (in :mod:`p2u_onnx.api`) read one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto

from . import _workdir, passes
from .codecs import SegmentsCodec, ZstdCodec, zstd_compress_against
from .config import LOSSLESS, Plan, QuantConfig
from .dtypes import dtype_info
from .errors import IntegrityError, P2UError, PlanError
from .format import (ALIGN, BINDING_KEY, UPDATE_FORMAT_VERSION, AtomicFile, StageWriter,
                     check_file_entry, describe_predecessor, is_update, manifest_binding,
                     package_file, read_stage, stage_file_name)
from .format import check_predecessor as _check_pred
from .format import check_update_stage0
from .graph import iter_slots
from .reconstruct import (GROUPS, PLANES, WeightState, code_chunk, extract_update_files,
                          pack_codes, weights_layout)

__all__ = ["Held", "held_state", "apply_update", "encode_update", "restore_update",
           "verify_update", "UPDATE_PLAN", "DELTA_BLOCK", "binding_of", "check_predecessor"]

# The default plan of an update (delta tensors; new tensors start at NEW_BITS and refine by as
# many bits per stage), and the delta's block size: chosen by measurement, docs/updates-format.md
UPDATE_PLAN = "auto,lossless"
DELTA_BLOCK = 256
NEW_BITS = 4
# which tensors are coded (the rest ride whole in the skeleton): smaller ones than in a full
# package, and vectors, since a delta of them costs less than their float bytes
UPDATE_CONFIG = QuantConfig(min_elements=256, quantize_vectors=True)
_INT2 = 26  # onnx INT2: the container of 1-bit (sign) delta codes
# a tensor whose change is this large relative to its values (||new - held|| / ||new||) was
# replaced (a retrained head), not tuned: its first stage gets NEW_BITS, as a new tensor would
# (measured: a digits head retrained alone reached 0.9852 at 2 bits, v2's 0.9907 at 4)
REPLACED = 0.5
# "auto" first stage, against an exact model: a tuned tensor goes on the uniform grid below, at
# EXACT_STEP times the update's shared step; a tensor whose change sign codes (1 bit) would fit
# badly, ||new - stage0|| / ||new|| above SIGN_MAX_ERROR, gets 2 bits instead. Measured
# (docs/updates-format.md): that error is 0.001-0.113 on every tensor of the digits fine-tunes,
# 0.30 on the layer the head pair retrained (where 1 bit lost 3.3% of accuracy). Sign codes
# themselves were the first stage of tuned tensors until the MiniLM fine-tune: at 1.87% of
# fp32 they left MRR 1.82% below v2's, where the grid at 1.5x the step, which leaves as much
# of the change as error, lost 0.04% at 2.14% (scripts/first_stage_variants.py).
# Against a lossy state (federated followers): always the grid at the shared step. The delta
# carries the previous stage's error and at 1 bit the followers' weight error grew round after
# round (3.5e-2 -> 8.1e-2 over 12 FedAvg rounds, accuracy up to 1.9% below; 2 bits: 2.5e-2 ->
# 2.5e-2)
AUTO = "auto"
SIGN_MAX_ERROR = 0.15
# "auto" against a lossy state (federated followers), and against an exact model where it is
# smaller and closer than sign codes: the delta on one uniform grid shared by every changed
# tensor of the update, step = UNIFORM_STEP x the rms of all their deltas, each value rounded
# to the nearest multiple (unbounded codes, mostly 0: INT4 containers, INT8 when a code passes
# 7; the segments' entropy coder pays little for the zeros). One step everywhere is the
# rate-distortion rule for the weights' squared error (equal slope for every tensor): bits go
# where the round moved the weights most, and values that barely moved (dead units, weight
# decay) cost next to nothing. Round to nearest, no dead zone: the previous stage's error,
# which the delta of a follower carries, is corrected by the next round instead of piling up.
# Measured over 12 FedAvg rounds (docs/updates-format.md): followers' stage 0 delivered,
# weight error in rounds 2-12, worst accuracy gap: 1.75: 17.6-18.1 kB, 1.2-1.7e-2, 0.21%;
# 1.9: 17.0-17.5 kB, 1.3-1.9e-2, 0.41%; 2.0: 16.6-17.1 kB, 1.4-2.0e-2, 0.41% (2 bits per
# block before: 24-26 kB, 2.8-4.0e-2, 0.64%). 1.9 keeps the accuracy within 0.5% and stage 0
# a few hundred bytes under a quarter of a round's full base stage (72.5 kB).
UNIFORM = "uniform"
UNIFORM_STEP = 1.9
# The grid's step against an exact model, as a multiple of the shared step: coarser than a
# follower's, whose error the next round carries; an exact device's first stage is a preview of
# the exact one. Measured on every pair (docs/updates.md): at 1x, the digits fine-tunes' stage 0
# took 5.11-5.16% of fp32 (over the 5% target); at 1.5x 3.66-3.79% at v2's accuracy within
# 0.19%, MiniLM 2.14% at MRR -0.04%, the federated and head pairs' targets all met. Chosen on
# these pairs: a model unlike them may want another.
EXACT_STEP = 1.5
_INT4, _INT8 = 22, 3


@dataclasses.dataclass
class Held:
    """A state of a model a device can hold, which an update applies to.

    ``tensors(name)`` gives a coded tensor's value (its shape, storage dtype; bfloat16 as
    uint16), ``names`` the keys it holds. ``weights_sha256`` is the digest of the whole model
    when the state is exact (None for a lossy stage); ``package_id`` / ``stage`` the package
    and stage it came from (None for a plain model file). ``model`` is the model of the state
    when one was built (restores write it).
    """

    get: Callable[[str], np.ndarray]
    names: frozenset[str]
    weights_sha256: str | None
    package_id: str | None
    stage: int | None
    label: str
    name: str | None = None
    version: int | None = None
    model: ModelProto | None = None
    graph: bytes | None = None  # the skeleton graph a device in this state holds, if known
    #: where a device that took this state's package holds each coded tensor in its weights
    #: file: name -> (dtype, shape, offset, length); None for a plain model file
    layout: dict[str, tuple[str, tuple[int, ...], int, int]] | None = None

    @property
    def exact(self) -> bool:
        return self.weights_sha256 is not None

    def describe(self) -> str:
        if self.exact:
            return f"{self.label} (exact model, weights {self.weights_sha256[:12]})"
        return f"{self.label} (package {str(self.package_id)[:12]} at stage {self.stage})"


def binding_of(held: Held) -> dict[str, Any]:
    """The ``predecessor`` an update coded against ``held`` names."""
    pred: dict[str, Any] = {"weights_sha256": held.weights_sha256} if held.exact else \
        {"package_id": held.package_id, "stage": held.stage}
    if held.name is not None:
        pred["name"] = held.name
    if held.version is not None:
        pred["version"] = held.version
    return pred


def _describe_pred(pred: dict[str, Any]) -> str:
    return describe_predecessor(pred)


def check_predecessor(manifest: dict[str, Any], held: Held, where: str = "update") -> None:
    """:class:`IntegrityError` (one line naming both states) unless ``held`` is the state the
    update ``manifest`` applies to (:func:`p2u_onnx.format.check_predecessor`)."""
    _check_pred(manifest, held.weights_sha256, held.package_id, held.stage, where, held.label)


# ---------------------------------------------------------------- held states


def held_names(held: Held) -> frozenset[str]:
    """The tensors of ``held`` an update may start from: every device bound to it holds them
    as coded weights. For a lossy stage of a package, that package's tensors. For an exact
    model, whatever way a device reached it: the tensors a full package of it codes by default
    (1024 values or more, no vectors), which an update's own selection includes too, and the
    float initializers of the main graph (in its skeleton otherwise)."""
    if not held.exact or held.model is None:
        return held.names
    keys = {s.slot.key for s in passes.select_weights(held.model, QuantConfig())}
    # ... and the float initializers of its main graph, which a device finds in its skeleton
    # when its package did not code them (external.main_initializers)
    keys |= {s.key for s in iter_slots(held.model) if s.kind == "initializer"
             and s.path == "main" and s.key == s.name and s.tensor.data_type in (1, 10, 11, 16)}
    return held.names & keys



def _model_held(model: ModelProto, label: str, config: QuantConfig) -> Held:
    """An exact held state of a model (its constants lifted as the encoder lifts them)."""
    from .encoder import tensor_array, weights_digest

    passes.normalize(model, config.min_elements)
    digest = weights_digest(model)
    arrays = {s.slot.key: tensor_array(s.slot.tensor).reshape(s.shape)
              for s in passes.select_weights(model, config)}
    return Held(arrays.__getitem__, frozenset(arrays), digest, None, None, label, model=model)


def _package_held(package: Path, manifest: dict[str, Any], stage: int | None,
                  label: str) -> Held:
    """The state of a full package at ``stage`` (default: its last)."""
    from .api import _filled_model, _stage_index, open_stages
    from .encoder import weights_digest

    k = _stage_index(manifest, stage)
    state = open_stages(package, k, manifest=manifest)
    exact = k == len(manifest["plan"]) - 1 and manifest["plan"][-1] == LOSSLESS
    digest, model = None, None
    if exact:
        model = _filled_model(state)
        digest = weights_digest(model)
        if digest != manifest["source"]["weights_sha256"]:
            raise IntegrityError(f"{package}: the lossless stage does not reproduce the "
                                 "source weights")
    get, names = _with_model(state, manifest, model)
    return Held(get, names, digest, manifest["package_id"], k, label,
                manifest.get("name"), manifest.get("version"), model,
                state.graph_bytes if k >= 1 else None, weights_layout(manifest))


def _weights_offsets(rows: list[tuple[str, str, tuple[int, ...], int]],
                     layout: dict[str, tuple[str, tuple[int, ...], int, int]] | None
                     ) -> dict[str, int]:
    """Where each tensor (key, dtype, shape, bytes) goes in the update's weights file. A
    tensor the predecessor's package codes with the same dtype and shape keeps its place, the
    others follow the predecessor's file, each aligned: an inplace session then maps the new
    file where it mapped the old one and patches the update in (runtime). Back to back in
    order when there is no such package, or when the result would leave more room than a
    weights file may (tensors the update drops)."""
    def sequential() -> dict[str, int]:
        out, pos = {}, 0
        for key, _, _, n in rows:
            pos += (-pos) % ALIGN
            out[key] = pos
            pos += n
        return out

    if not layout:
        return sequential()
    out: dict[str, int] = {}
    pos = max(off + n for _, _, off, n in layout.values())
    for key, dtype, shape, n in rows:
        was = layout.get(key)
        if was is not None and was[:2] == (dtype, tuple(shape)) and was[3] == n:
            out[key] = was[2]
    for key, _, _, n in rows:
        if key not in out:
            pos += (-pos) % ALIGN
            out[key] = pos
            pos += n
    end = max((out[k] + n for k, _, _, n in rows), default=0)
    room = sum(n for *_, n in rows) + ALIGN * len(rows)  # as the manifest check allows
    return out if end <= room else sequential()


def _with_model(state: WeightState, manifest: dict[str, Any], model: ModelProto | None,
                config: QuantConfig = UPDATE_CONFIG):
    """(get, names) of a package's state: its coded tensors, and when the state's model is at
    hand (an exact state), also the model's other tensors an update may code."""
    from .encoder import tensor_array

    names = {t["name"] for t in manifest["tensors"]}
    if model is None:
        return state.weight, frozenset(names)
    m = ModelProto()
    m.CopyFrom(model)
    passes.normalize(m, config.min_elements)
    extra = {s.slot.key: s for s in passes.select_weights(m, config)
             if s.slot.key not in names}

    def get(name: str) -> np.ndarray:
        if name in names:
            return state.weight(name)
        s = extra[name]
        return tensor_array(s.slot.tensor).reshape(s.shape)

    return get, frozenset(names | set(extra))


def _named_stage(nxt, item) -> int | None:
    """The stage of package ``item`` that update ``nxt`` is bound to (a lossy binding to that
    package), else None (its last stage)."""
    from .format import load_manifest

    if isinstance(nxt, Held) or isinstance(item, (Held, ModelProto)):
        return None
    try:
        if not (Path(nxt).is_dir() and Path(item).is_dir()):
            return None
        pred = load_manifest(nxt).get("predecessor") or {}
        if "stage" in pred and pred.get("package_id") == load_manifest(item)["package_id"]:
            return int(pred["stage"])
    except (P2UError, OSError, TypeError):
        return None
    return None


def held_state(source: str | os.PathLike | ModelProto | Held | Sequence, stage: int | None = None,
               *, expect: str | None = None, trust=None,
               config: QuantConfig = UPDATE_CONFIG) -> Held:
    """What a device holds, from ``source``: a model (``.onnx`` path or ``ModelProto``: the
    exact model), a full package folder (at ``stage``, default its last), or a sequence whose
    first item is one of those and whose next items are update packages applied in turn (each
    to the stage the next one is bound to, else its last; ``stage`` applies to the last item). ``expect`` / ``trust`` pin or
    check the signature of the package (the first item of a sequence)."""
    if isinstance(source, Held):
        return source
    if isinstance(source, (list, tuple)):
        if not source:
            raise P2UError("no predecessor given")
        if len(source) == 1:
            return held_state(source[0], stage, expect=expect, trust=trust, config=config)
        items = list(source)
        held = held_state(items[0], _named_stage(items[1], items[0]), expect=expect,
                          trust=trust, config=config)
        for i, upd in enumerate(items[1:], start=1):
            held = apply_update(upd, held, stage if i == len(items) - 1 else
                                _named_stage(items[i + 1], upd))
        return held
    if isinstance(source, ModelProto):
        m = ModelProto()
        m.CopyFrom(source)
        return _model_held(m, m.graph.name or "model", config)
    path = Path(source)
    if path.is_dir():
        from .api import _checked_manifest

        manifest = _checked_manifest(path, expect, trust)[0]
        if is_update(manifest):
            raise P2UError(f"{path} is an update package: give the model or package it "
                           "applies to first, then this update (--from A --from UPDATE)")
        return _package_held(path, manifest, stage, str(path))
    from .encoder import load_model

    if stage is not None:
        raise P2UError(f"--from-stage {stage}: {path} is a model file, not a package (it has "
                       "no stages)")
    return _model_held(load_model(path)[0], str(path), config)


# ---------------------------------------------------------------- applying an update


def _open_update(package: Path, expect: str | None, trust) -> dict[str, Any]:
    from .api import _checked_manifest

    manifest = _checked_manifest(package, expect, trust)[0]
    if not is_update(manifest):
        raise P2UError(f"{package} is a full package, not an update: it needs no --from "
                       "(restore it as it is)")
    return manifest


def _stage_file(package: Path, manifest: dict[str, Any], k: int):
    f = manifest["stages"][k]["files"][0]
    path = check_file_entry(package_file(package, f["path"]), f, digest=False)
    return read_stage(path, package_id=manifest["package_id"], stage=k, sha256=f["sha256"],
                      manifest=manifest)


def update_state(package: str | os.PathLike, held: Held, stage: int | None = None, *,
                 manifest: dict[str, Any] | None = None) -> WeightState:
    """A :class:`WeightState` of an update package moved through stages 0..``stage`` (default:
    the last) from ``held``, after checking the binding (:func:`check_predecessor`)."""
    from .api import _stage_index

    package = Path(package)
    manifest = _open_update(package, None, None) if manifest is None else manifest
    k = _stage_index(manifest, stage)
    check_predecessor(manifest, held, str(package))
    sf0 = _stage_file(package, manifest, 0)
    check_update_stage0(sf0, f"stage 0 of {package}")
    parts = extract_update_files(sf0, manifest, lambda: held.graph)
    state = WeightState(manifest, parts["base.bin"], predecessor=lambda t: held.get(t["name"]))
    state.check_skeleton(parts["graph.onnx"])
    state.graph_bytes = parts["graph.onnx"]
    for i in range(1, k + 1):
        state.apply(_stage_file(package, manifest, i))
    return state


def apply_update(update: str | os.PathLike, held: Held, stage: int | None = None, *,
                 expect: str | None = None, trust=None) -> Held:
    """The state a device holding ``held`` reaches at ``stage`` (default: the last) of the
    update package ``update``. Refused (one line) when the update was made for another state,
    is not an update, or its files do not match its manifest; at the last stage of a lossless
    plan, the restored weights must hash to the new model's digest."""
    from .api import _filled_model, _stage_index
    from .encoder import weights_digest

    package = Path(update)
    manifest = _open_update(package, expect, trust)
    k = _stage_index(manifest, stage)
    state = update_state(package, held, k, manifest=manifest)
    model = _filled_model(state)
    exact = k == len(manifest["plan"]) - 1 and manifest["plan"][-1] == LOSSLESS
    digest = None
    if exact:
        digest = weights_digest(model)
        if digest != manifest["source"]["weights_sha256"]:
            raise IntegrityError(f"{package}: the lossless stage does not reproduce the new "
                                 "model's weights")
    get, names = _with_model(state, manifest, model if exact else None)
    return Held(get, names, digest, manifest["package_id"], k, str(package),
                manifest.get("name"), manifest.get("version"), model, state.graph_bytes,
                weights_layout(manifest))


def restore_update(update: str | os.PathLike, output: str | os.PathLike,
                   base_from, stage: int | None = None, *, from_stage: int | None = None,
                   expect: str | None = None, trust=None) -> Path:
    """Write the model an update package gives at ``stage`` (default: the last, bit-exact)
    applied to ``base_from`` (anything :func:`held_state` takes; a full package is taken at the
    stage the update names when it names one) to ``output``.

    >>> restore_update("v2-from-v1.p2u", "v2.onnx", "v1.p2u")  # doctest: +SKIP
    """
    package = Path(update)
    manifest = _open_update(package, expect, trust)
    held = held_state(base_from, _pred_stage(manifest, base_from, from_stage))
    new = apply_update(package, held, stage, expect=expect, trust=trust)
    from .api import _write_model

    return _write_model(new.model, output)


def _pred_stage(manifest: dict[str, Any], base_from, from_stage: int | None) -> int | None:
    """The stage to take a full package given as predecessor at: the one the update names
    (lossy binding to that package), else ``from_stage`` (default: its last)."""
    if from_stage is not None:
        return from_stage
    pred = manifest["predecessor"]
    last = base_from[-1] if isinstance(base_from, (list, tuple)) and base_from else base_from
    if "stage" in pred and isinstance(last, (str, os.PathLike)) and Path(last).is_dir():
        try:
            from .format import load_manifest

            if load_manifest(last)["package_id"] == pred["package_id"]:
                return int(pred["stage"])
        except P2UError:
            return None
    return None


def verify_update(update: str | os.PathLike, base_from=None, *, from_stage: int | None = None,
                  expect: str | None = None, trust=None) -> dict[str, Any]:
    """Check an update package: every stage file against the manifest (sha256, header,
    binding); with ``base_from``, also replay every stage from it, check the lossless stage
    reproduces the new model's digest and that onnxruntime loads the result."""
    from .api import _checked_manifest

    package = Path(update)
    manifest, raw = _checked_manifest(package, expect, trust)
    if not is_update(manifest):
        raise P2UError(f"{package} is a full package, not an update: verify it without --from")
    for k in range(len(manifest["stages"])):
        _stage_file(package, manifest, k)
    result = {"package": str(package), "stages": len(manifest["stages"]),
              "predecessor": manifest["predecessor"], "lossless_match": None,
              "replayed": False, "signed": trust is not None,
              "name": manifest.get("name"), "version": manifest.get("version"),
              "manifest_sha256": hashlib.sha256(raw).hexdigest()}
    if base_from is None:
        return result
    held = held_state(base_from, _pred_stage(manifest, base_from, from_stage))
    new = apply_update(package, held, None)
    result["replayed"] = True
    result["lossless_match"] = True if new.exact else None
    import tempfile

    import onnxruntime as ort

    from .api import _onnx_error

    with tempfile.TemporaryDirectory(prefix="p2u-verify-") as tmp:
        path = Path(tmp) / "v.onnx"
        onnx.save_model(new.model, str(path))
        try:
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise _onnx_error(f"{package}: the updated model: onnxruntime cannot load it", e) \
                from e
    return result


# ---------------------------------------------------------------- encoding an update


@dataclasses.dataclass(frozen=True)
class _UpdatePlan:
    """An update's plan: bits of the changed tensors' deltas per stage, rising, ``lossless``
    last if given. Unlike a full package's (2..8 bits first), the first stage may be 1 bit: a
    sign per changed value and a scale per block (BitDelta-like, :func:`_sign_codes`)."""

    stages: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if AUTO in self.stages[1:]:
            raise PlanError("'auto' can only be the first stage (1 or 2 bits per tensor)")
        bits = [2 if b == AUTO else b for b in self.stages if b != LOSSLESS]
        if not bits or self.stages[0] == LOSSLESS:
            raise PlanError("an update plan needs a lossy first stage (e.g. 2,lossless)")
        if LOSSLESS in self.stages[:-1]:
            raise PlanError("'lossless' can only be the last stage")
        if not 1 <= int(bits[0]) <= 8:
            raise PlanError(f"the first stage of an update has 1..8 bits, not {bits[0]}")
        for a, b in zip(bits, bits[1:]):
            if int(b) <= int(a) or int(b) > 32:
                raise PlanError(f"stage bits must rise (and stay <= 32): {a} then {b}")

    @classmethod
    def parse(cls, text: str) -> "_UpdatePlan":
        out: list[int | str] = []
        for part in text.split(","):
            part = part.strip().lower()
            if part in (LOSSLESS, AUTO):
                out.append(part)
            elif part.isdigit():
                out.append(int(part))
            else:
                raise PlanError(f"bad stage {part!r} in plan {text!r} (bits, 'auto' first, or "
                                "'lossless')")
        return cls(tuple(out))

    @property
    def auto(self) -> bool:
        """The first stage is chosen per tensor: the uniform grid (one step for the whole
        update, :func:`_uniform_codes`), coarser against an exact model
        (:func:`_exact_grid_step`), where a tensor whose change sign codes fit badly gets 2
        bits instead (:func:`_first_bits`)."""
        return self.stages[0] == AUTO

    @property
    def base_bits(self) -> int:
        return 2 if self.auto else int(self.stages[0])

    @property
    def recorded(self) -> list[str]:
        """The plan as the manifest lists it (bit counts): ``auto`` is its upper bound, 2."""
        return [str(self.base_bits if s == AUTO else s) for s in self.stages]

    @property
    def lossless(self) -> bool:
        return self.stages[-1] == LOSSLESS

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.stages)


def _sign_codes(xs: np.ndarray, origin: np.ndarray, info) -> Any:
    """1-bit delta codes of a run of blocks: the sign of ``xs - origin`` per value (0 where it
    is zero or not finite) and per block the mean |delta| of its changed values as the scale
    (the L2-best scale for sign codes), rounded to a scale the dtype holds. INT2 containers."""
    from . import quantizers as qz

    with np.errstate(over="ignore", invalid="ignore"):
        d = info.to_compute(xs).astype(np.float32) - info.to_compute(origin).astype(np.float32)
    ok = np.isfinite(d) & (d != 0)
    codes = np.where(ok, np.sign(np.where(ok, d, 0)), 0).astype(np.int8)
    count = ok.sum(axis=1)
    mean = np.where(count > 0, np.abs(np.where(ok, d, 0)).sum(axis=1, dtype=np.float64) /
                    np.maximum(count, 1), 0.0)
    scale = np.where(mean > 0, info.round_scale(np.maximum(mean, info.scale_tiny)
                                                .astype(np.float32)), np.float32(0))
    return qz.BaseCodes(codes, scale.astype(np.float32), None, 1)


def _first_bits(layout, x: np.ndarray, r: np.ndarray, info) -> int:
    """1 when sign codes (:func:`_sign_codes`) would leave at most :data:`SIGN_MAX_ERROR` of
    the tensor's norm as error in its first-stage value (a tuned tensor: the ``auto`` first
    stage puts it on the grid), else 2 (docs/updates-format.md)."""
    xs = np.ascontiguousarray(layout.to_blocks(x))
    rs = np.ascontiguousarray(layout.to_blocks(r))
    err = _code_error(xs, rs, info, _sign_codes(xs, rs, info))
    return 1 if err <= SIGN_MAX_ERROR else 2


def _code_error(xs: np.ndarray, rs: np.ndarray, info, code) -> float:
    """||new - stage0|| / ||new|| (finite values) of delta codes ``code`` of blocks ``xs``
    against held blocks ``rs`` (0 for a zero tensor)."""
    with np.errstate(over="ignore", invalid="ignore"):
        a = info.to_compute(xs).astype(np.float64)
        y = info.to_compute(rs).astype(np.float64) + \
            code.codes.astype(np.float64) * code.scale.astype(np.float64)[:, None]
    ok = np.isfinite(a) & np.isfinite(y)
    norm = float(np.sqrt(np.sum(a[ok] ** 2)))
    return float(np.sqrt(np.sum((a[ok] - y[ok]) ** 2))) / norm if norm > 0 else 0.0


def _finite_delta(x: np.ndarray, r: np.ndarray, info) -> np.ndarray:
    """``x - r`` (float64, flat) over the values where both are finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        d = info.to_compute(x).astype(np.float64).reshape(-1) - \
            info.to_compute(r).astype(np.float64).reshape(-1)
    return d[np.isfinite(d)]


def _tensor_step(step: float, x: np.ndarray, r: np.ndarray, info) -> float:
    """The uniform first stage's step for one tensor: the update's shared ``step``, coarser
    only where a code would pass 127 (INT8), rounded to a scale the dtype holds (0: no step,
    the delta is all zero or not finite)."""
    d = _finite_delta(x, r, info)
    top = float(np.max(np.abs(d), initial=0.0))
    s = max(step, top / 127.0)
    if not (s > 0 and np.isfinite(s)):
        return 0.0
    def rounded(v: float) -> float:
        return float(info.round_scale(np.array([max(v, info.scale_tiny)], np.float32))[0])

    r = rounded(s)
    # a rounded-down scale may bring the largest code past 127: up by 1% (more than half a
    # step of any scale dtype) until it fits; codes are clipped to 127 in any case (the scale
    # dtype's range may end first), the exact stage restores every bit
    for _ in range(8):
        if top / r <= 127.25:
            break
        s *= 1.01
        r = rounded(s)
    return r


def _uniform_codes(xs: np.ndarray, origin: np.ndarray, info, step: float) -> Any:
    """The uniform first stage of a run of blocks: ``xs - origin`` rounded to the nearest
    multiple of ``step`` (0 where not finite), every block's scale ``step``; codes in
    [-127, 127]."""
    from . import quantizers as qz

    with np.errstate(over="ignore", invalid="ignore"):
        d = info.to_compute(xs).astype(np.float32) - info.to_compute(origin).astype(np.float32)
        q = np.rint(d / np.float32(step)) if step > 0 else np.zeros_like(d)
    q = np.where(np.isfinite(q), q, 0)
    codes = np.clip(q, -127, 127).astype(np.int8)
    return qz.BaseCodes(codes, np.full(len(xs), step, np.float32), None, 8)


def _exact_grid_step(x: np.ndarray, r: np.ndarray, info, step: float) -> float | None:
    """Against an exact model: the grid step of a tuned tensor's first stage,
    :data:`EXACT_STEP` times the update's shared ``step`` (None: no step, nothing to code)."""
    s = _tensor_step(step * EXACT_STEP, x, r, info)
    return s if s > 0 else None


def _relative_change(x: np.ndarray, r: np.ndarray, info) -> float:
    """||x - r|| / ||x|| over the finite values (0 for a zero tensor)."""
    with np.errstate(over="ignore", invalid="ignore"):
        a = info.to_compute(x).astype(np.float64).reshape(-1)
        d = a - info.to_compute(r).astype(np.float64).reshape(-1)
    ok = np.isfinite(a) & np.isfinite(d)
    norm = float(np.sqrt(np.sum(a[ok] ** 2)))
    return float(np.sqrt(np.sum(d[ok] ** 2))) / norm if norm > 0 else 0.0


def _delta_layout(layout, block: int):
    """The delta's blocks: along the axis the tensor's own blocks run (or its last axis), of
    ``block`` values (one block per row when the axis is shorter)."""
    from .quantizers import Layout

    shape = layout.shape
    if len(shape) < 2:
        return Layout(shape, "tensor")
    axis = layout.axis if layout.mode == "block" else len(shape) - 1
    if shape[axis] < block:
        return Layout(shape, "channel", 0 if axis != 0 else 1)
    return Layout(shape, "block", axis, block)


def encode_update(model: str | os.PathLike | ModelProto, output: str | os.PathLike,
                  base_from, *, from_stage: int | None = None,
                  plan: Plan | str = UPDATE_PLAN, delta_block: int = DELTA_BLOCK,
                  new_bits: int = NEW_BITS, config: QuantConfig = UPDATE_CONFIG,
                  overwrite: bool = False, name: str | None = None,
                  version: int | None = None, expect: str | None = None,
                  trust=None, probe: bool = True, ship_graph: bool | None = None):
    """Encode ``model`` (v2) as an update package against ``base_from`` (v1: anything
    :func:`held_state` takes; a full package at ``from_stage``, default its last stage).

    >>> encode_update("v2.onnx", "v2-from-v1.p2u", "v1.p2u")  # doctest: +SKIP

    ``plan``: the delta tensors' bits per stage (``"3,lossless"``: stage 0 codes every changed
    tensor's delta with 3 bits per value on blocks of ``delta_block``, stage 1 restores every
    bit); new tensors start at ``new_bits`` and refine as many bits per stage. ``probe``
    records each stage's outputs on synthesized inputs, which a live session checks
    (:meth:`~p2u_onnx.runtime.ProgressiveSession.update`). When the skeleton graph a device in
    the predecessor state holds is known (``base_from`` is a package at stage >= 1 or an
    update), the new skeleton can be coded against it (what did not change costs almost
    nothing), and the update is then bound to it: a device holding another skeleton of the same
    model is refused. ``ship_graph``: None (default) reuses the held skeleton only for an update
    bound to a lossy state (package and stage fix the skeleton), and ships it whole for one
    bound to the exact model, which devices may have reached by several routes (its .onnx, a
    full package, a chain of updates); False reuses it whenever it is known, True never.
    Returns an :class:`~p2u_onnx.encoder.EncodeResult`.
    """
    from .encoder import EncodeResult, _identity, _install, _output_path, load_model, \
        weights_digest

    t0 = time.perf_counter()
    plan = _UpdatePlan.parse(plan) if isinstance(plan, str) else \
        _UpdatePlan(tuple(plan.stages))
    if not 2 <= new_bits <= 8:
        raise PlanError(f"new_bits must be 2..8, got {new_bits}")
    if delta_block < 8 or delta_block & (delta_block - 1):
        raise PlanError(f"delta_block must be a power of two >= 8, got {delta_block}")
    out = _output_path(output, overwrite)
    held = held_state(base_from, from_stage, expect=expect, trust=trust, config=config)
    m, mname = load_model(model)
    passes.normalize(m, config.min_elements)
    if version is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
        version = int(epoch) if epoch.isdigit() else int(time.time())
    ident = _identity(mname if name is None else name, version)
    digest = weights_digest(m)
    pred = binding_of(held)
    if ship_graph is None:  # exact models are reached by several routes: any of them applies
        ship_graph = "weights_sha256" in pred
    package_id = hashlib.sha256(
        f"{digest}|{json.dumps(pred, sort_keys=True)}|{plan}|{config}|{delta_block}|"
        f"{new_bits}|{UPDATE_FORMAT_VERSION}|"
        f"{'' if ship_graph or held.graph is None else hashlib.sha256(held.graph).hexdigest()}"
        f"{'' if not held.layout else json.dumps(sorted(held.layout.items()))}"
        .encode()).hexdigest()[:32]
    try:
        tmp = _workdir.make_dir(out.parent, f".{out.name}.", 0o777)
    except OSError as e:
        raise P2UError(f"cannot write package {out}: {e.strerror or e}") from e
    try:
        manifest = _encode_into(m, mname, tmp, held, plan, config, delta_block, new_bits,
                                package_id, pred, digest, ident, probe,
                                None if ship_graph else held.graph)
        _install(tmp, out)
    except BaseException:
        _workdir.remove_tree(tmp)
        raise
    return EncodeResult(out, manifest, time.perf_counter() - t0)


def _encode_into(m: ModelProto, mname: str, tmp: Path, held: Held, plan: Plan,
                 config: QuantConfig, delta_block: int, new_bits: int, package_id: str,
                 pred: dict[str, Any], digest: str, ident: tuple[str, int],
                 probe: bool = True, reference: bytes | None = None) -> dict[str, Any]:
    from .encoder import (CHUNK_ELEMENTS, _BinWriter, fp32_equivalent_bytes, slot_nbytes,
                          tensor_array)
    from . import quantizers as qz

    fp32_bytes = fp32_equivalent_bytes(m)
    weight_bytes = sum(slot_nbytes(s.tensor) for s in iter_slots(m))
    selected = passes.select_weights(m, config)
    usable = held_names(held)
    n = len(plan.stages)
    writers = [StageWriter(tmp / stage_file_name(k), package_id, k,
                           version=UPDATE_FORMAT_VERSION) for k in range(n)]
    err = [0.0] * n
    rel = [0.0] * n
    tensors: list[dict[str, Any]] = []
    counts = {"same": 0, "delta": 0, "new": 0}
    places = _weights_offsets(
        [(s.slot.key, dtype_info(s.slot.tensor.data_type).name, tuple(s.shape),
          int(np.prod(s.shape, dtype=np.int64)) *
          dtype_info(s.slot.tensor.data_type).storage.itemsize) for s in selected],
        held.layout)

    def held_value(s, x: np.ndarray, info) -> np.ndarray | None:
        """What the device holds for slot ``s`` (None: nothing of that dtype and shape)."""
        if s.slot.key not in usable:
            return None
        try:
            r = held.get(s.slot.key)
        except KeyError:
            return None
        return None if r.dtype != info.storage or r.shape != x.shape else r

    # "auto": the shared grid step of the uniform first stage (UNIFORM_STEP x the rms of the
    # delta of every tensor on the grid: changed, not replaced, and against an exact model
    # tuned; a retrained layer's large delta would otherwise make the step too coarse for the
    # tuned ones)
    # Which tensors are replaced and which go on the grid is decided here, once (the main loop
    # below reads these sets: the sign codes' error is a pass over the whole tensor).
    step = 0.0
    replaced: set[str] = set()
    on_grid: set[str] = set()
    if plan.auto:
        sq, count = 0.0, 0
        for s in selected:
            info = dtype_info(s.slot.tensor.data_type)
            x = np.ascontiguousarray(tensor_array(s.slot.tensor).reshape(s.shape))
            r = held_value(s, x, info)
            if r is None or np.array_equal(x.view(np.uint8), np.ascontiguousarray(r).view(
                    np.uint8)):
                continue  # new or same: not on the grid
            if _relative_change(x, r, info) > REPLACED:
                replaced.add(s.slot.key)
                continue
            if held.exact and _first_bits(_delta_layout(s.layout, delta_block), x, r,
                                          info) != 1:
                continue  # 2 bits
            on_grid.add(s.slot.key)
            d = _finite_delta(x, r, info)
            sq += float(np.dot(d, d))
            count += d.size
            del x, r, d
        step = UNIFORM_STEP * (sq / count) ** 0.5 if count else 0.0
    with AtomicFile(tmp / "base.bin") as bf:
        bins = _BinWriter(bf)
        for s in selected:
            t = s.slot.tensor
            info = dtype_info(t.data_type)
            x = np.ascontiguousarray(tensor_array(t).reshape(s.shape))
            r = held_value(s, x, info)
            kind = "new" if r is None else \
                "same" if np.array_equal(x.view(np.uint8), np.ascontiguousarray(r).view(
                    np.uint8)) else "delta"
            counts[kind] += 1
            row: dict[str, Any] = {
                "name": s.slot.key, "tensor": s.slot.name,
                **({} if s.slot.path == "main" else {"where": s.slot.path}),
                "kind": s.slot.kind, "dtype": info.name, "shape": list(s.shape),
                "update": kind, "weights": [places[s.slot.key], x.nbytes]}
            if kind == "same":
                row["layout"] = qz.Layout(s.shape, "tensor").to_json()
            else:
                layout = _delta_layout(s.layout, delta_block) if kind == "delta" else s.layout
                b0 = plan.base_bits if kind == "delta" else new_bits
                uniform = None  # the uniform first stage's step for this tensor, if chosen
                if kind == "delta" and (s.slot.key in replaced if plan.auto else
                                        _relative_change(x, r, info) > REPLACED):
                    b0 = max(b0, new_bits)  # replaced rather than tuned: as many bits as new
                elif kind == "delta" and s.slot.key in on_grid:
                    # against a lossy state at the shared step (the delta carries its error)
                    uniform = _exact_grid_step(x, r, info, step) if held.exact else \
                        (_tensor_step(step, x, r, info) or None)
                    if uniform is not None:
                        b0 = plan.base_bits  # (refine stages, if any, are finer than the step)
                stages = [st if st == LOSSLESS else int(st) - plan.base_bits + b0
                          for st in plan.recorded]
                blocks = np.ascontiguousarray(layout.to_blocks(x))
                origin = None if r is None else np.ascontiguousarray(layout.to_blocks(r))
                # one stage entry per run of at most CHUNK_ELEMENTS values, as in full
                # packages: a device decodes entry by entry, taking turns with inferences (one
                # entry of a 16.7M-value tensor held a run of the 100M model up for > 1 s)
                per = max(1, CHUNK_ELEMENTS // layout.block_len)
                codes_l, scales_l = [], []
                max_err, abs_max = [0.0] * n, 0.0
                for c0 in range(0, len(blocks), per):
                    c1 = min(c0 + per, len(blocks))
                    xb = blocks[c0:c1]
                    ob = None if origin is None else origin[c0:c1]
                    code = code_chunk(xb, info, stages, symmetric=True,
                                      clip_search=True, origin=ob, exact_plain=True,
                                      base=_sign_codes(xb, ob, info) if b0 == 1 else
                                      _uniform_codes(xb, ob, info, uniform)
                                      if uniform is not None else None)
                    if plan.lossless and not np.array_equal(
                            np.ascontiguousarray(code.final).view(np.uint8),
                            np.ascontiguousarray(xb).view(np.uint8)):
                        raise P2UError("internal error: the update does not restore "
                                       f"{s.slot.key}")
                    max_err = [max(a, e) for a, e in zip(max_err, code.max_err)]
                    abs_max = max(abs_max, code.abs_max)
                    shift = 0
                    for k, bits in enumerate(plan.stages[1:], start=1):
                        if bits != LOSSLESS:
                            shift = int(bits) - plan.base_bits
                        codec = (GROUPS if bits == LOSSLESS else PLANES) \
                            if code.codecs is None else code.codecs[k - 1]
                        writers[k].add({"kind": "exact" if bits == LOSSLESS else "refine",
                                        "name": s.slot.key, "blocks": [c0, c1],
                                        "shift": shift, "codec": codec.get_config()},
                                       code.payloads[k - 1])
                    codes_l.append(code.base.codes)
                    scales_l.append(code.base.scale)
                    del code
                for k, e in enumerate(max_err):
                    err[k] = max(err[k], e)
                    if abs_max > 0:
                        rel[k] = max(rel[k], e / abs_max)
                base_codes = np.concatenate(codes_l) if len(codes_l) > 1 else codes_l[0]
                base_scale = np.concatenate(scales_l) if len(scales_l) > 1 else scales_l[0]
                ctype = _INT2 if b0 == 1 else passes.code_type(b0, 99)[0]
                if uniform is not None:  # unbounded codes: the smallest container they fit
                    b0, ctype = (4, _INT4) if int(np.max(np.abs(base_codes), initial=0)) <= 7 \
                        else (8, _INT8)
                packed = pack_codes(layout.from_blocks(base_codes), ctype)
                row.update({
                    "layout": layout.to_json(), "bits": b0,
                    "base": {"codes": bins.add(packed, "symbols"),
                             "scale": bins.add(np.ascontiguousarray(layout.blocks_to_scales(
                                 info.scale_to_storage(base_scale))).tobytes(),
                                 f"planes{info.scale_storage.itemsize}"),
                             "code_type": ctype}})
            passes.set_external(t, "weights.bin", row["weights"])
            tensors.append(row)
        segments = tuple(bins.segments)
    graph = m.SerializeToString()
    base_bin = (tmp / "base.bin").read_bytes()
    bin_codec = SegmentsCodec(level=19, segments=segments)
    gz = ZstdCodec(level=19)
    coded_graph = gz.encode(graph)
    if reference is not None:  # the skeleton against the one the device holds, if smaller
        against = zstd_compress_against(graph, reference)
        if len(against) < len(coded_graph):
            coded_graph = against
        else:
            reference = None
    for fname, data, codec, coded in (("base.bin", base_bin, bin_codec, None),
                                      ("graph.onnx", graph, gz, coded_graph)):
        writers[0].add({"kind": "file", "name": fname, "codec": codec.get_config(),
                        "raw_length": len(data), "sha256": hashlib.sha256(data).hexdigest()},
                       (codec.encode(data, strong_symbols=True) if codec is bin_codec else
                        codec.encode(data)) if coded is None else coded)
    stages: list[dict[str, Any]] = []
    manifest: dict[str, Any] = {
        "format": "p2u", "format_version": UPDATE_FORMAT_VERSION, "package_id": package_id,
        "name": ident[0], "version": ident[1],
        "predecessor": pred,
        "source": {"name": mname, "weights_sha256": digest, "weight_bytes": weight_bytes,
                   "fp32_equivalent_bytes": fp32_bytes, "coded_tensors": len(selected)},
        "plan": plan.recorded,
        "config": {**dataclasses.asdict(config), "delta_block": delta_block,
                   "new_bits": new_bits,
                   **({"first_bits": AUTO, "sign_max_error": SIGN_MAX_ERROR,
                       "first_stage": UNIFORM, "uniform_step": UNIFORM_STEP,
                       **({"exact_step": EXACT_STEP} if held.exact else {})}
                      if plan.auto else {})},
        "base_model": {"files": [
            {"path": "base.bin", "size": len(base_bin), "sha256": hashlib.sha256(
                base_bin).hexdigest()},
            {"path": "graph.onnx", "size": len(graph), "sha256": hashlib.sha256(
                graph).hexdigest(), **({} if reference is None else
                                       {"reference": hashlib.sha256(reference).hexdigest()})}]},
        "tensors": tensors,
        "stages": stages,
    }
    (tmp / "base.bin").unlink()  # it travels inside stage 0 only
    binding = manifest_binding(manifest)
    cum = 0
    for k, wr in enumerate(writers):
        wr.extra[BINDING_KEY] = binding
        size, sha = wr.finish()
        cum += size
        stages.append({"index": k, "bits": plan.recorded[k],
                       "files": [{"path": stage_file_name(k), "size": size, "sha256": sha}],
                       "bytes": size, "cumulative_bytes": cum,
                       "max_abs_error": err[k], "max_rel_error": rel[k]})
    _save_compact(tmp, manifest)  # (the probe is outside the binding: it comes last)
    why: list[str] = []
    entry = _record_probe(tmp, manifest, held, why) if probe else None
    if entry is not None:
        manifest["probe"] = entry
    else:
        manifest["notes"] = ["no probe recorded (a live session cannot check that the update "
                             f"took effect): {why[-1] if why else 'not asked for'}"]
    _save_compact(tmp, manifest)
    return manifest


def _save_compact(folder: Path, manifest: dict[str, Any]) -> None:
    """manifest.json without spaces: an update's manifest is part of what every device
    downloads, and indented it was 40% larger (4.8 kB against 3.4 kB on the digits CNN, a
    fifth of its first stage)."""
    from .format import atomic_write_bytes

    atomic_write_bytes(folder / "manifest.json",
                       json.dumps(manifest, separators=(",", ":")).encode() + b"\n")


def _record_probe(tmp: Path, manifest: dict[str, Any], held: Held,
                  why: list[str]) -> dict[str, Any] | None:
    """``probe.npz`` of an update: each stage's outputs, restored from ``held``, on inputs
    synthesized from the model's signature (as :func:`p2u_onnx.probe.record_probe` does for a
    full package), with the tolerances measured between two onnxruntime configurations."""
    import io

    import onnxruntime as ort

    from .format import atomic_write_bytes, sha256_file
    from .probe import (INT_RANGES, PROBE_NAME, REL_FLOOR, _sized_outputs, _tolerance,
                        feed_digest, sample, synthesize_inputs)

    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain.intra_op_num_threads = 1
    plain.add_session_config_entry("session.disable_prepacking", "1")
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 4
    cpu = ["CPUExecutionProvider"]
    samples: list[list[np.ndarray]] = []
    tols: list[list[float]] = []
    feed = names = types = None
    int_high = INT_RANGES[0]
    try:
        for k in range(len(manifest["stages"])):
            model = apply_update(tmp, held, k).model.SerializeToString()
            a = ort.InferenceSession(model, quiet, providers=cpu)
            if feed is None:
                outs = [o for o in a.get_outputs() if o.type in REL_FLOOR]
                if not outs:
                    why.append("the model has no float output to compare")
                    return None
                names, types = [o.name for o in outs], [o.type for o in outs]
                for int_high in INT_RANGES:
                    feed = synthesize_inputs(a.get_inputs(), int_high)
                    ya = [sample(v) for v in a.run(names, feed)]
                    if all(np.all(np.isfinite(v)) for v in ya):
                        break
            ya = [sample(v) for v in a.run(names, feed)]
            yb = [sample(v) for v in ort.InferenceSession(model, plain, providers=cpu)
                  .run(names, feed)]
            if not all(np.all(np.isfinite(v)) for v in ya + yb):
                why.append(f"stage {k} gives non-finite outputs on the probe inputs")
                return None
            samples.append(ya)
            tols.append([_tolerance(x, float(np.max(np.abs(x - y), initial=0.0)), t)
                         for x, y, t in zip(ya, yb, types)])
    except Exception as e:  # noqa: BLE001 - any failure means: cannot probe
        why.append(f"the model cannot be probed ({' '.join(str(e).split())[:200]})")
        return None
    # as a full package's probe (format 4): the synthesized inputs are made again on the
    # device (their digest is checked) and the outputs ride as integers on a grid finer than
    # the tolerances, stage 0's then each stage's difference: on the digits CNN 942 -> 262
    # bytes, which every device downloads with stage 0
    stage_bytes = int(manifest["stages"][-1].get("cumulative_bytes") or 0)
    counts, step, q, gaps = _sized_outputs(samples, tols, {}, stage_bytes)
    buf = io.BytesIO()
    np.savez_compressed(buf, q=q)
    path = tmp / PROBE_NAME
    atomic_write_bytes(path, buf.getvalue())
    stages = []
    for k in range(len(samples)):
        st: dict[str, Any] = {"index": k, "tol": tols[k]}
        if k:
            st["gap"] = gaps[k - 1]
        stages.append(st)
    return {"path": PROBE_NAME, "size": path.stat().st_size, "sha256": sha256_file(path),
            "int_high": int_high, "inputs": list(feed), "inputs_stored": False,
            "inputs_sha256": feed_digest(feed), "outputs": names,
            "samples": counts, "step": step, "stages": stages}
