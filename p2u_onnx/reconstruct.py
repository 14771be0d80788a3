"""Rebuild weights stage by stage from a package's files (device side: numpy + zstandard).

:class:`WeightState` tracks every coded weight as the device has it now: it starts from the
base's integer codes and scales (read from ``base.bin`` at the offsets the manifest gives) and
moves one stage at a time, either streaming from one stage's ``weights.bin`` to the next
(:meth:`WeightState.advance`, the device: about one tensor in memory at a time) or keeping the
weights in memory in *block order* (:meth:`WeightState.apply`, see
:class:`~p2u_onnx.quantizers.Layout`). Stage entries cover runs of blocks (``"blocks": [first,
end]``), so big tensors decode in cache-sized chunks, on several threads.

The encoder calls the same functions (:func:`code_chunk` mirrors :func:`decode_entry`), so both
sides compute bit-identical weights at every stage.
"""

from __future__ import annotations

import collections
import functools
import dataclasses
import hashlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import palette as pl
from . import quantizers as qz
from ._memory import memory_left
from ._rwlock import Pace, in_turn
from .codecs import (STEP, IntContextCodec, IntGroupsCodec, IntPlanesCodec,
                     SegmentsCodec, ZstdCodec, ZstdRefCodec, _check_size, get_codec)
from .dtypes import (ONNX_INT2, ONNX_INT4, ONNX_INT8, ONNX_UINT2, ONNX_UINT4, ONNX_UINT8,
                     DTypeInfo, dtype_info)
from .errors import FormatError, IntegrityError, P2UError
from .external import check_skeleton, graph_size_limit
from .format import AtomicFile, StageFile

__all__ = ["WeightState", "pack_codes", "unpack_codes", "base_codes_of", "extract_file",
           "delta_blocks",
           "code_chunk", "ChunkCode", "workers", "weights_size", "read_into", "write_from",
           "copy_tiled"]

_CODE_TYPES = {  # onnx type -> (bits per element, signed)
    ONNX_INT8: (8, True), ONNX_UINT8: (8, False),
    ONNX_INT4: (4, True), ONNX_UINT4: (4, False),
    ONNX_INT2: (2, True), ONNX_UINT2: (2, False),
}


def workers() -> int:
    """Threads for coding work (numpy and zstandard release the GIL)."""
    return max(1, min(4, os.cpu_count() or 1))


def pack_codes(codes: np.ndarray, onnx_type: int) -> bytes:
    """Pack integer codes the way ONNX stores ``onnx_type`` (low bits first for 4/2-bit)."""
    bits, signed = _CODE_TYPES[onnx_type]
    flat = np.asarray(codes).reshape(-1)
    if bits == 8:
        return flat.astype(np.int8 if signed else np.uint8).tobytes()
    per = 8 // bits
    u = flat.astype(np.uint8) & ((1 << bits) - 1)
    pad = (-len(u)) % per
    if pad:
        u = np.concatenate([u, np.zeros(pad, np.uint8)])
    u = u.reshape(-1, per)
    out = u[:, 0].copy()
    for i in range(1, per):
        out |= u[:, i] << (bits * i)
    return out.tobytes()


def unpack_codes(raw, onnx_type: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`; returns int8 (signed types) or uint8 values."""
    bits, signed = _CODE_TYPES[onnx_type]
    b = np.frombuffer(raw, np.uint8)
    per = 8 // bits
    if len(b) != -(-count // per):
        raise FormatError(f"code buffer holds {len(b)} bytes, expected {-(-count // per)}")
    if bits == 8:
        return b.view(np.int8) if signed else b
    mask = (1 << bits) - 1
    v = np.empty((len(b), per), np.uint8)
    for i in range(per):
        np.bitwise_and(b >> (bits * i), mask, out=v[:, i])
    v = v.reshape(-1)[:count]
    if signed:
        shift = 8 - bits
        return ((v << shift).view(np.int8) >> shift).astype(np.int8)
    return v


def _read(base_bin, span: list[int] | None):
    if span is None:
        return None
    off, length = span
    if off < 0 or off + length > len(base_bin):
        raise IntegrityError(f"base.bin is too short for span {off}+{length}")
    return base_bin[off:off + length]


def base_scale_of(t: dict[str, Any], base_bin) -> tuple[qz.Layout, np.ndarray]:
    """Layout and per-block base scales (float32, block order) of tensor-table entry ``t``."""
    layout = qz.Layout.from_json(tuple(t["shape"]), t["layout"])
    info = dtype_info(t["dtype"])
    if pl.is_palette(t):
        raise FormatError(f"tensor {t['name']} is a palette tensor: it has no base scales")
    sraw = np.frombuffer(_read(base_bin, t["base"]["scale"]), info.scale_storage)
    if sraw.size != layout.n_blocks:
        raise FormatError(f"tensor {t['name']}: {sraw.size} scales for {layout.n_blocks} blocks")
    return layout, layout.scales_to_blocks(sraw).astype(np.float32)


def base_codes_of(t: dict[str, Any], base_bin,
                  pace: Pace | None = None
                  ) -> tuple[qz.Layout, qz.BaseCodes]:
    """Base codes and scales of tensor-table entry ``t``, in block order. With ``pace``, the
    codes are unpacked slab by slab of rows, each slab inside ``pace()``."""
    layout, scale = base_scale_of(t, base_bin)
    b = t["base"]
    raw = _read(base_bin, b["codes"])
    per = 8 // _CODE_TYPES[b["code_type"]][0]
    rows = layout.shape[0] if layout.shape else 1
    row_len = layout.size // rows if rows else 0
    if pace is None or layout.mode == "tensor" or not row_len or row_len % per:
        with in_turn(pace):
            codes = unpack_codes(raw, b["code_type"], layout.size)
            codes = layout.to_blocks(codes.reshape(layout.shape))
    else:
        codes = _zeros((layout.n_blocks, layout.block_len),
                       np.int8 if _CODE_TYPES[b["code_type"]][1] else np.uint8, None, pace)
        view = layout.from_blocks(codes)  # the tensor's shape, writing into block order
        step = max(1, _PACED_SLAB // row_len)
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            with pace():
                copy_tiled(view[r0:r1], unpack_codes(raw[r0 * row_len // per:r1 * row_len // per],
                                                     b["code_type"], (r1 - r0) * row_len
                                                     ).reshape(view[r0:r1].shape))
    zp = None
    if b.get("zero_point") is not None:
        zraw = unpack_codes(_read(base_bin, b["zero_point"]), b["code_type"], layout.n_blocks)
        zp = layout.scales_to_blocks(zraw.reshape(layout.scale_shape))
    return layout, qz.BaseCodes(codes, scale, zp, int(t["bits"]))


def base_blocks(base: qz.BaseCodes, info: DTypeInfo) -> np.ndarray:
    """Stage-0 weights (storage dtype, block order), as DequantizeLinear yields them."""
    return info.from_compute(qz.dequantize_base(base).astype(info.compute))


def delta_blocks(info: DTypeInfo, origin: np.ndarray, base: qz.BaseCodes) -> np.ndarray:
    """First stage of an update for a changed tensor (storage dtype, block order): the value
    the device holds (``origin``) plus the dequantized delta codes, summed in the compute dtype
    and rounded once to the storage dtype."""
    with np.errstate(over="ignore", invalid="ignore"):
        return info.from_compute(info.to_compute(origin) + qz.dequantize_base(base))


def refine_blocks(info: DTypeInfo, previous: np.ndarray, codes: np.ndarray,
                  step: np.ndarray) -> np.ndarray:
    """Next lossy stage of a run of blocks (storage dtype in and out)."""
    return info.from_compute(qz.apply_refine(info.to_compute(previous), codes, step, info.compute))


def lossless_context(info: DTypeInfo, previous: np.ndarray, step: np.ndarray) -> np.ndarray:
    return qz.exponent_context(info.to_compute(previous), step.astype(info.compute))


def lossless_blocks(previous: np.ndarray, codes: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(previous).reshape(-1)
    return qz.apply_lossless(flat, codes.reshape(-1)).reshape(previous.shape)


@dataclasses.dataclass
class ChunkCode:
    """Everything the encoder produces for one run of blocks of one tensor."""

    base: qz.BaseCodes
    payloads: list[bytes]  # one per stage >= 1
    max_err: list[float]  # per stage, over finite weights
    abs_max: float  # largest finite |weight|
    final: np.ndarray | None  # what the device holds after the last stage (if replayed)
    codecs: list | None = None  # the codec of each payload (None: PLANES / GROUPS by kind)


PLANES = IntPlanesCodec(level=3)
GROUPS = IntGroupsCodec(level=3)
CONTEXT = IntContextCodec(level=3)  # format 5: refine and exact payloads
SPARSE_SHARE = 0.1  # zeros among the current values from which grouped refine codes are tried
SPARSE_GAIN = 0.98  # ... and kept when at most this share of the plain codes' size


def zero_context(previous: np.ndarray) -> np.ndarray:
    """Context of a grouped ``refine`` entry (uint8): 1 where the current value (storage
    dtype: +0.0 or -0.0; bfloat16 bit patterns: +0.0 only) is zero.

    In a pruned tensor the zeros stay zero: their codes, all 0 in one group, cost almost
    nothing, where plain planes pay for where the zeros are at every stage."""
    return (np.asarray(previous) == 0).view(np.uint8)


REFINE_CONTEXTS = 62  # |current value| in base steps, 0..61 (and more), as contexts 1..63


def refine_context(info: DTypeInfo, previous: np.ndarray,
                   scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Context and sign of a format-5 ``refine`` entry's codes, from the current values
    (storage dtype, ``[n_blocks, block_len]``) and the base scales (one per block).

    The context (uint8) is 0 where the current value is zero, else ``1 + round(min(|v| /
    scale, 62))``: how many base steps the value is from zero (non-finite ratios count as
    62). The codes are coded negated where the current value is negative (the second array,
    bool): the weights thin out away from zero, so within a base step the original is more
    often on the side toward zero, and with the sign folded both signs share that skew (the
    codes' entropy: 5-6% less on the sklearn digits MLP's 4-to-8-bit refinement, 16-30% on
    basic-pitch's sparse tensors)."""
    p = info.to_compute(previous)
    with np.errstate(all="ignore"):
        a = np.abs(p) / np.asarray(scale, p.dtype).reshape(-1, 1)
    a = np.nan_to_num(a, nan=REFINE_CONTEXTS, posinf=REFINE_CONTEXTS)
    np.clip(a, 0, REFINE_CONTEXTS, out=a)
    ctx = (a + 1.5).astype(np.uint8)
    ctx[p == 0] = 0
    return ctx, p < 0


def _refine_payload(codes: np.ndarray, prev: np.ndarray) -> tuple[bytes, IntPlanesCodec |
                                                                   IntGroupsCodec]:
    """A refine stage's payload: plain planes, or grouped by :func:`zero_context` when many
    current values are zero and that is measurably smaller."""
    plain = PLANES.encode(codes)
    ctx = zero_context(prev)
    if ctx.size and np.count_nonzero(ctx) >= SPARSE_SHARE * ctx.size:
        grouped = GROUPS.encode(codes, ctx)
        if len(grouped) <= SPARSE_GAIN * len(plain):
            return grouped, GROUPS
    return plain, PLANES


def code_chunk(xs: np.ndarray, info: DTypeInfo, stages: list[int | str], *, symmetric: bool,
               clip_search: bool, replay: bool = True,
               importance: np.ndarray | None = None,
               base: qz.BaseCodes | None = None,
               origin: np.ndarray | None = None, exact_plain: bool = False,
               compact: bool = False, small_model: bool = True) -> ChunkCode:
    """Code a run of blocks ``xs`` ([n, block_len], storage dtype) through every stage.

    ``stages`` are total bits per stage with ``"lossless"`` allowed last; the decoder's
    :func:`decode_entry` undoes each payload using the same functions. ``replay`` also runs
    the device's lossless step, so ``final`` can be checked against ``xs``. ``importance``
    (same shape as ``xs``) weights the base quantizer's error. ``base``, when given, is used as
    the base codes instead of quantizing (weights found on a uniform grid: exact codes).
    ``origin`` (same shape and dtype as ``xs``), when given, is what the device already holds
    (an update): the base codes then quantize the delta ``xs - origin`` and stage 0 is
    :func:`delta_blocks`; later stages are unchanged. ``exact_plain`` also codes the
    lossless stage as plain planes (no grouping by context) and keeps the smaller: on small
    tensors the groups' framing outweighs what grouping saves. ``compact`` (format 5) codes
    the lossless payload with :class:`~p2u_onnx.codecs.IntContextCodec` by
    :func:`lossless_context`; with ``small_model`` the refine payloads too, by
    :func:`refine_context` (sign folded; without it they are coded as in format 4: sorting
    by context made a refine stage of MiniLM 6x slower to decode for 3.6% fewer bytes), and
    the planes more thoroughly (``IntContextCodec.encode(thorough=True)``).
    """
    xc = info.to_compute(xs)
    finite = np.isfinite(xc)
    finite = None if finite.all() else finite
    if base is None:
        target = xc
        if origin is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                target = xc - info.to_compute(origin)
        base = qz.quantize_base(target, int(stages[0]), info, symmetric=symmetric,
                                clip_search=clip_search, importance=importance)
    prev = base_blocks(base, info) if origin is None else delta_blocks(info, origin, base)
    errs = [_max_err(xc, prev, info, finite)]
    payloads = []
    codecs: list = []
    step = base.scale
    for bits in stages[1:]:
        if bits == "lossless":
            d = qz.lossless_codes(np.ascontiguousarray(xs).reshape(-1), prev.reshape(-1))
            if compact:
                payload = CONTEXT.encode(d, lossless_context(info, prev, step), small_model)
                codec = CONTEXT
            else:
                payload, codec = GROUPS.encode(d, lossless_context(info, prev, step)), GROUPS
            if exact_plain and not compact:
                plain = PLANES.encode(d)
                if len(plain) < len(payload):
                    payload, codec = plain, PLANES
            payloads.append(payload)
            codecs.append(codec)
            prev = lossless_blocks(prev, d) if replay else None
        else:
            step = qz.stage_scale(base.scale, int(bits) - int(stages[0]))
            codes = qz.refine_codes(xc, info.to_compute(prev), step)
            if compact and small_model:
                ctx, flip = refine_context(info, prev, base.scale)
                payload = CONTEXT.encode(np.where(flip, -codes, codes), ctx, True)
                codec = CONTEXT
            else:
                payload, codec = _refine_payload(codes, prev)
            payloads.append(payload)
            codecs.append(codec)
            prev = refine_blocks(info, prev, codes, step)
        errs.append(0.0 if bits == "lossless" else _max_err(xc, prev, info, finite))
    a = xc if finite is None else xc[finite]
    abs_max = float(np.maximum(a.max(), -a.min())) + 0.0 if a.size else 0.0  # max |a|
    return ChunkCode(base, payloads, errs, abs_max, prev, codecs)


def _max_err(xc, prev, info, finite) -> float:
    """Largest |error| over finite weights (``finite`` is None when all are finite)."""
    with np.errstate(over="ignore", invalid="ignore"):
        diff = xc - info.to_compute(prev)
        if finite is not None:
            if not finite.any():
                return 0.0
            diff = np.where(finite, diff, 0)
        # max |diff| as max(max, -min): the same number without an |diff| array
        return float(np.maximum(diff.max(), -diff.min())) + 0.0 if diff.size else 0.0


def decode_entry(info: DTypeInfo, scale: np.ndarray, previous: np.ndarray,
                 entry: dict[str, Any], data, pace: Pace | None = None) -> np.ndarray:
    """Apply one stage-file entry to a run of blocks ``previous``; returns the new run.

    ``pace``: each pass over the run (its context, the codes, the new values) is a job inside
    ``pace()``, and the grouped codecs decode group by group in jobs of their own: a 262k-value
    entry of the 100M model took 8 ms in one job idle and up to 38 ms beside a loop of runs,
    and the runs waiting for a decoder's turn wait for the jobs in progress."""
    kind = entry["kind"]
    step = qz.stage_scale(scale, int(entry.get("shift", 0)))
    codec = get_codec(entry["codec"])
    grouped = isinstance(codec, IntGroupsCodec)
    if kind == "refine" and isinstance(codec, IntPlanesCodec):
        with in_turn(pace):
            codes = codec.decode(data, previous.size).reshape(previous.shape)
        with in_turn(pace):
            return refine_blocks(info, previous, codes, step)
    if kind == "refine" and grouped:  # grouped by zero_context
        with in_turn(pace):
            ctx = zero_context(previous)
        codes = codec.decode(data, ctx, pace).reshape(previous.shape)
        with in_turn(pace):
            return refine_blocks(info, previous, codes, step)
    if kind == "exact" and grouped:
        with in_turn(pace):
            ctx = lossless_context(info, previous, step)
        codes = codec.decode(data, ctx, pace)
        with in_turn(pace):
            return lossless_blocks(previous, codes)
    if kind == "refine" and isinstance(codec, IntContextCodec):  # format 5, sign folded
        with in_turn(pace):
            ctx, flip = refine_context(info, previous, scale)
        codes = codec.decode(data, ctx, pace).reshape(previous.shape)
        with in_turn(pace):
            codes = codes.astype(np.int64 if codes.dtype == np.int64 else np.int32)
            np.negative(codes, out=codes, where=flip)
            return refine_blocks(info, previous, codes, step)
    if kind == "exact" and isinstance(codec, IntContextCodec):  # format 5
        with in_turn(pace):
            ctx = lossless_context(info, previous, step)
        codes = codec.decode(data, ctx, pace)
        with in_turn(pace):
            return lossless_blocks(previous, codes)
    if kind == "exact" and isinstance(codec, IntPlanesCodec):  # ungrouped (small tensors)
        with in_turn(pace):
            return lossless_blocks(previous, codec.decode(data, previous.size))
    raise FormatError(f"entry kind {kind!r} with codec {codec.codec_id!r} is not supported")


class WeightState:
    """The coded weights of one package as the device holds them at :attr:`stage`.

    Each tensor's current values come from one of three places: the base (stage 0, recomputed
    from ``base.bin`` run by run), a *weights file* (the ``weights.bin`` of the current stage:
    tensor order, C order, at the manifest's ``weights`` offsets) or memory (block order).

    * :meth:`advance` streams from the current weights file (or the base) to the next stage's,
      run of blocks by run of blocks, and afterwards holds no weights (the device side). A
      tensor whose blocks are not runs of its C order (blocks along a leading axis, padded
      blocks) is assembled in memory, one batch of up to :data:`BATCH_BYTES` at a time.
    * :meth:`apply` keeps the decoded weights in memory, for :meth:`weight` and
      :meth:`write_weights` (restore, verify, the encoder's probe).

    Both check that a stage file belongs to this package, is the next stage and tiles the
    blocks of every tensor it updates before touching anything, and change the state only once
    every entry decoded. ``base_bin`` is the base's external-data file (path or bytes).

    >>> state = WeightState(manifest, "model.p2u/base.bin")           # doctest: +SKIP
    >>> state.advance(read_stage("model.p2u/stage-1.p2u"), "w1.bin")  # doctest: +SKIP
    >>> state.weights_file                                            # doctest: +SKIP
    PosixPath('w1.bin')
    """

    def __init__(self, manifest: dict[str, Any], base_bin: str | os.PathLike | bytes,
                 predecessor: Callable[[dict[str, Any]], np.ndarray] | None = None):
        self.manifest = manifest
        # an update package: its unchanged and changed tensors start from what the device
        # holds, ``predecessor(t)`` (t's shape, storage dtype) for tensor-table entry t
        self._predecessor = predecessor
        self._base_path: str | None = None
        self._base: Any  # sliceable bytes of base.bin
        if isinstance(base_bin, (str, os.PathLike)):
            self._base_path = os.fspath(base_bin)
            self._base = _FileBytes(self._base_path)
        else:
            self._base = np.frombuffer(base_bin, np.uint8)
        self._base_map: np.ndarray | None = None
        self.tensors = {t["name"]: t for t in manifest["tensors"]}
        self.stage = 0
        self._file: Path | None = None  # weights file of the current stage
        self._blocks: dict[str, np.ndarray] = {}  # values held in memory (block order)
        self.graph_bytes: bytes | None = None
        self._update = manifest.get("predecessor") is not None
        #: ``base.onnx`` (a path or its bytes): what a format-4 skeleton graph is coded
        #: against (see :meth:`apply`); by default the file beside ``base_bin``. A wrong one
        #: only makes the graph fail its sha256 check (:class:`IntegrityError`)
        self.base_onnx: str | os.PathLike | bytes | None = None if self._base_path is None \
            else Path(self._base_path).with_name("base.onnx")

    def base_onnx_bytes(self) -> bytes | None:
        """The bytes of :attr:`base_onnx` (None when not set)."""
        if self.base_onnx is None or isinstance(self.base_onnx, bytes):
            return self.base_onnx
        from .format import open_regular

        try:
            with open_regular(self.base_onnx) as f:
                return f.read()
        except FileNotFoundError:  # a format-4 graph then says what it lacks
            return None

    @property
    def base_bin(self) -> np.ndarray:
        """``base.bin`` as a byte array (memory-mapped when given as a path)."""
        if self._base_path is None:
            return self._base
        if self._base_map is None:
            self._base_map = np.memmap(self._base_path, np.uint8, mode="r") \
                if len(self._base) else np.zeros(0, np.uint8)
        return self._base_map

    @property
    def weights_file(self) -> Path | None:
        """The weights file the state reads its current values from (None: base or memory)."""
        return self._file

    # -- moving to the next stage

    def advance(self, stage_file: StageFile, out_path: str | os.PathLike,
                pace: Pace | None = None,
                written: Callable[[int, int, int], None] | None = None) -> None:
        """Move to the next stage, writing its ``weights.bin`` to ``out_path`` as it decodes.

        Run by run of blocks on a thread pool, the current values are read (from
        :attr:`weights_file`, or the base at stage 0), the stage's entry decoded and the result
        written where it belongs. The file is written under a temporary name in ``out_path``'s
        directory and renamed once every entry decoded; on any error it is removed and the state
        is unchanged. Afterwards the state reads from ``out_path`` and holds no weights: keep
        that file while the state is at this stage (and the previous one until a
        :meth:`rollback` past it is ruled out). No fsync: the file is a private cache.
        ``pace``, when given, makes a context manager that each run of blocks is decoded in
        (``with pace(): ...``): a live session's takes turns with its inferences, so that
        decoding takes the cores between them instead of slowing them down.
        ``written(fd, offset, length)``, when given, is called as each tensor's bytes are all in
        the file (``fd`` is only valid during the call).
        """
        plan = self._check_stage(stage_file)
        out = Path(out_path)
        if self._file is not None and out.resolve() == self._file.resolve():
            raise ValueError(f"{out} is the current weights file: write the next stage elsewhere")
        self._write_file(out, stage_file, plan, pace, written)
        self.stage += 1
        self._file, self._blocks = out, {}

    def materialize(self, out_path: str | os.PathLike, pace: Pace | None = None,
                    written: Callable[[int, int, int], None] | None = None) -> None:
        """Write the current values to ``out_path`` (a new ``weights.bin``) and read them from
        there from now on: an update's stage 0, computed from the predecessor and the delta
        codes, without keeping the predecessor. The stage does not change; on any error the
        file is removed and the state is unchanged. ``pace`` / ``written``: as for
        :meth:`advance`."""
        out = Path(out_path)
        self._write_file(out, None, {}, pace, written)
        self._file, self._blocks = out, {}

    def _write_file(self, out: Path, stage_file: StageFile | None, plan: dict,
                    pace: Pace | None, written: Callable[[int, int, int], None] | None) -> None:
        """Write every tensor's values after ``stage_file`` (None: the current ones) to ``out``:
        under a temporary name in its folder, renamed when complete, removed on any error."""
        tmp = ""
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            try:
                _prefill(fd, weights_size(self.manifest), pace)
                self._run(self.manifest["tensors"], stage_file, plan, fd, pace, written)
            finally:
                os.close(fd)
            os.replace(tmp, out)
        except BaseException as e:
            if tmp:
                _unlink(tmp)
            if isinstance(e, OSError):
                raise P2UError(f"cannot write {out}: {e.strerror or e}") from e
            raise

    def apply(self, stage_file: StageFile) -> None:
        """Move to the next stage, keeping its decoded weights in memory.

        ``stage_file`` was read with :func:`~p2u_onnx.format.read_stage`; stage 1 also yields
        :attr:`graph_bytes` (the skeleton graph).
        """
        plan = self._check_stage(stage_file)
        graph = extract_file(stage_file, "graph.onnx", max_size=graph_size_limit(self.manifest),
                             ref=self.base_onnx_bytes()) \
            if any(e["kind"] == "file" and e["name"] == "graph.onnx"
                   for e in stage_file.entries) else None
        if graph is not None:
            self.check_skeleton(graph)
        fresh: dict[str, np.ndarray] = {}
        self._run([t for t in self.manifest["tensors"] if t["name"] in plan], stage_file, plan,
                  fresh)
        self._blocks.update(fresh)
        self.stage += 1
        if graph is not None:
            self.graph_bytes = graph

    def predecessor_value(self, t: dict[str, Any]) -> np.ndarray:
        """The predecessor's value of update tensor ``t`` (its shape; not a copy: read only),
        after checking its dtype and shape against the tensor table."""
        name = t["name"]
        if self._predecessor is None:
            raise FormatError(f"tensor {name} comes from the predecessor of this update, and "
                              "no predecessor was given")
        try:
            r = np.asarray(self._predecessor(t))
        except KeyError:
            raise IntegrityError(f"the predecessor holds no tensor {name} (this update "
                                 "was made against another model)") from None
        info = dtype_info(t["dtype"])
        if r.dtype != info.storage or tuple(r.shape) != tuple(t["shape"]):
            raise IntegrityError(f"the predecessor's {name} is {r.dtype} {list(r.shape)}, the "
                                 f"update expects {t['dtype']} {list(t['shape'])} (this update "
                                 "was made against another model)")
        return r

    def check_skeleton(self, graph: bytes) -> None:
        """Refuse a skeleton graph whose external data does not match the manifest (see
        :func:`~p2u_onnx.external.check_skeleton`), before anything loads it."""
        check_skeleton(graph, self.manifest, len(self._base))

    def checkpoint(self) -> tuple:
        """Snapshot for :meth:`rollback`: the stage, its weights file, arrays held in memory.

        Cheap: neither :meth:`advance` nor :meth:`apply` writes into a file or array the state
        already holds. A file-backed state's snapshot is its stage and :attr:`weights_file`.
        """
        return self.stage, self._file, dict(self._blocks), self.graph_bytes

    def rollback(self, checkpoint: tuple) -> None:
        """Return to a :meth:`checkpoint`, e.g. when the patched session failed its probe."""
        self.stage, self._file, blocks, self.graph_bytes = checkpoint
        self._blocks = dict(blocks)

    # -- reading the current values

    def weight(self, name: str, pace: Pace | None = None) -> np.ndarray:
        """Current value of a coded weight, in its shape (storage dtype; bfloat16 as uint16).
        ``pace``: read it in turns (see :meth:`advance`)."""
        t = self.tensors[name]
        blocks = self._blocks.get(name)
        if blocks is None:
            values: dict[str, np.ndarray] = {}
            self._run([t], None, {}, values, pace)
            blocks = values[name]
        return _layout(t).from_blocks(blocks)

    def iter_weights(self) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        for name, t in self.tensors.items():
            yield t, self.weight(name)

    def write_weights(self, path: str | os.PathLike) -> None:
        """Write ``weights.bin``: every coded weight at the offset the skeleton graph names."""
        with AtomicFile(path) as f:
            f.truncate(weights_size(self.manifest))
            self._run(self.manifest["tensors"], None, {}, f.fileno())

    # -- internals

    def _check_stage(self, stage_file: StageFile) -> dict[str, list[tuple[int, int, dict]]]:
        """Entries of ``stage_file`` per tensor, after checking it is this package's next stage
        and that each updated tensor's entries tile its blocks exactly."""
        expected = self.stage + 1
        label = f"stage file {Path(stage_file.name).name}"
        if stage_file.package_id != self.manifest["package_id"]:
            raise IntegrityError(f"{label} belongs to another package")
        if stage_file.stage != expected:
            raise IntegrityError(f"{label} holds stage {stage_file.stage}, expected stage "
                                 f"{expected}")
        bits = self.manifest["plan"]
        if expected >= len(bits):
            raise IntegrityError(f"{label} holds stage {expected}, but the package has only "
                                 f"stages 0..{len(bits) - 1}")
        # what the plan (bound to the stage files) says this stage is: its kind, its shift
        # (stage k refines every tensor by plan[k] - plan[0] bits; the lossless stage keeps
        # the last lossy one's) and the files it carries (stage 1: the skeleton graph)
        lossy = [int(b) for b in bits[:expected + 1] if b != "lossless"]
        kind = "exact" if bits[expected] == "lossless" else "refine"
        shift = lossy[-1] - lossy[0] if lossy else 0
        files = [e["name"] for e in stage_file.entries if e["kind"] == "file"]
        graph_stage = 0 if self._update else 1  # an update's skeleton rides with stage 0
        if files != (["graph.onnx"] if expected == graph_stage else []):
            raise FormatError(f"{label} carries files {files}; stage {expected} carries "
                              f"{'graph.onnx only' if expected == graph_stage else 'none'}")
        order = {name: i for i, name in enumerate(self.tensors)}
        last = 0
        plan: dict[str, list[tuple[int, int, dict]]] = {}
        for entry in stage_file.entries:
            if entry["kind"] == "file":
                continue
            name = entry.get("name")
            if not isinstance(name, str) or name not in self.tensors:
                raise FormatError(f"{label} updates unknown tensor {name!r}")
            if pl.is_palette(self.tensors[name]):
                raise FormatError(f"{label} updates {name}, which the base holds exactly "
                                  "(a palette tensor)")
            if self.tensors[name].get("update") == "same":
                raise FormatError(f"{label} updates {name}, which the update keeps unchanged "
                                  "from its predecessor")
            if entry["kind"] != kind or entry.get("shift", 0) != shift:
                raise FormatError(f"{label}: entry for {name} is {entry['kind']!r} with shift "
                                  f"{entry.get('shift', 0)}; the plan makes stage {expected} "
                                  f"{kind!r} with shift {shift}")
            if order[name] < last:
                raise FormatError(f"{label}: entries are not in the order of the manifest's "
                                  f"tensors ({name} comes too late)")
            last = order[name]
            try:
                b0, b1 = (int(b) for b in entry["blocks"])
            except (KeyError, TypeError, ValueError) as e:
                raise FormatError(f"{label}: entry for {name} has no valid block range") from e
            plan.setdefault(name, []).append((b0, b1, entry))
        for name, runs in plan.items():
            n, pos = _layout(self.tensors[name]).n_blocks, 0
            for b0, b1, _ in sorted(runs, key=lambda r: r[0]):
                if b0 != pos or not b0 < b1 <= n:
                    raise FormatError(f"{label}: block range {b0}..{b1} of {name} overlaps, "
                                      f"leaves a gap or is out of range (0..{n})")
                pos = b1
            if pos != n:
                raise FormatError(f"{label} does not cover every block of {name}")
        missing = [name for name, t in self.tensors.items()  # palettes are exact already
                   if name not in plan and _layout(t).n_blocks and not pl.is_palette(t)
                   and t.get("update") != "same"]
        if missing:
            raise FormatError(f"{label} does not update tensor {missing[0]} (every stage "
                              "updates every coded tensor)")
        return plan

    def _run(self, tensors: list[dict[str, Any]], stage_file: StageFile | None,
             plan: dict[str, list[tuple[int, int, dict]]],
             target: int | dict[str, np.ndarray],
             pace: Pace | None = None,
             written: Callable[[int, int, int], None] | None = None) -> None:
        """Compute the next values of ``tensors`` (their current values where ``plan`` has no
        entries) and store them in ``target``: a file descriptor (tensor order at the manifest
        offsets; ``written`` is told of each tensor there, see :meth:`advance`) or a dict
        (block-order arrays by name)."""
        fd = None
        if self._file is not None:
            try:
                fd = os.open(self._file, os.O_RDONLY)
            except OSError as e:
                raise IntegrityError(f"weights file {self._file} of stage {self.stage} cannot "
                                     f"be read ({e.strerror or e})") from e

        def run(job) -> None:
            # the run's values read, decoded (in jobs of its own: decode_entry), stored: each
            # inside pace(), so that a run waiting for the decoder waits for a short job
            tensor, (b0, b1, entry) = job
            with in_turn(pace):
                values = tensor.previous(b0, b1)
            if entry is not None:
                values = decode_entry(tensor.info, tensor.scale[b0:b1], values, entry,
                                      stage_file.data(entry), pace)  # type: ignore[union-attr]
            with in_turn(pace):
                if entry is not None:
                    _release_pages(stage_file, entry)  # type: ignore[arg-type]
                tensor.put(b0, b1, values)

        # Batches of tensors go to the pool as they are read; while one decodes the next is
        # read, so at most two batches (2 * BATCH_BYTES assembled, or one bigger tensor) are
        # held at a time.
        inflight: collections.deque[tuple[list[_Tensor], list[Future], int]] = \
            collections.deque()
        held = 0

        def finish_oldest(pool: Executor) -> None:
            nonlocal held
            batch, futures, size = inflight.popleft()
            for f in futures:
                f.result()
            for x in batch:
                x.finish(pool if x.held > BATCH_BYTES else None)  # alone: use the pool
                if written is not None and isinstance(target, int):
                    written(target, *x.t["weights"])
            held -= size

        try:
            with ThreadPoolExecutor(workers()) as pool:
                try:
                    batch: list[_Tensor] = []
                    size = 0
                    for t in [*tensors, None]:
                        tensor = None if t is None else _Tensor(self, t, fd, target, pace)
                        if batch and (tensor is None or size + tensor.held > BATCH_BYTES):
                            jobs = [(x, r) for x in batch for r in x.runs(plan.get(x.name))]
                            inflight.append((batch, [pool.submit(run, j) for j in jobs], size))
                            held += size
                            batch, size = [], 0
                        if tensor is not None:
                            while inflight and (len(inflight) >= 2 or
                                                held + size + tensor.held > 2 * BATCH_BYTES):
                                finish_oldest(pool)
                            tensor.start(pool if tensor.held > BATCH_BYTES else None)
                            batch.append(tensor)
                            size += tensor.held
                    while inflight:
                        finish_oldest(pool)
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # no more work after an error
                    raise
        finally:
            if fd is not None:
                os.close(fd)


class _Tensor:
    """One coded tensor while :meth:`WeightState._run` computes its next values.

    ``previous(b0, b1)`` gives the current values of blocks ``b0:b1`` (block order) and
    ``put(b0, b1, values)`` stores the next ones; jobs on disjoint runs call both from worker
    threads. Runs are read and written in place in the weights files when blocks ``b0:b1``
    are elements ``b0 * block_len : b1 * block_len`` of the tensor (blocks along the last axis
    without padding, one block per leading index, one block); otherwise the tensor is
    assembled in memory (``held`` bytes) and written whole by ``finish()``.
    """

    def __init__(self, state: WeightState, t: dict[str, Any], fd: int | None,
                 target: int | dict[str, np.ndarray],
                 pace: Pace | None = None):
        self.t, self.name = t, t["name"]
        self.pace = pace
        self.state, self.fd, self.target = state, fd, target
        self.layout, self.info = _layout(t), dtype_info(t["dtype"])
        self.n = self.layout.n_blocks
        self.shape = (self.n, self.layout.block_len)
        self.run_bytes = self.layout.block_len * self.info.storage.itemsize
        contiguous = _runs_are_contiguous(self.layout)
        self.source = "memory" if self.name in state._blocks else "file" if fd is not None \
            else "pred" if t.get("update") in ("same", "delta") \
            else "base-runs" if contiguous else "base"
        self.assemble = not contiguous and (isinstance(target, int) or self.source == "file")
        self.held = self.n * self.run_bytes if self.assemble else 0
        if self.source == "pred" and t.get("update") == "delta":
            # start() unpacks its base codes whole (a byte per value): counted, so that such
            # tensors start a few at a time (100M model: 6 x 16 MB of codes at once otherwise)
            self.held = max(self.held, self.n * self.layout.block_len)
        self.out: np.ndarray | None = None
        self.scale = np.zeros(0, np.float32)
        self._base: qz.BaseCodes | None = None
        self._palette: np.ndarray | None = None  # a palette tensor's values (block order)
        self._origin: np.ndarray | None = None  # an update's predecessor value (block order)

    def start(self, pool: Executor | None) -> None:
        """Read what every run needs (called in order, before any job of this tensor)."""
        off, length = self.t["weights"]
        if length != self.n * self.run_bytes - _padding_bytes(self.layout, self.info) \
                or off < 0:
            raise FormatError(f"weight {self.name} has {length} bytes at offset {off} in the "
                              "manifest, which does not match its shape")
        if self.assemble or isinstance(self.target, dict):
            self.out = _zeros(self.shape, self.info.storage, pool, self.pace)  # padding as encoded
            if self.source == "file" and self.assemble:
                read_into(self._fd(), off, self.layout.from_blocks(self.out),
                          str(self.state._file), pool, self.pace)
        if self.source == "pred":
            # blocks are taken from it run by run (blocks_of): a copy of the whole tensor in
            # block order would add its size to the peak (100M model: 64 MB per tensor)
            self._origin = self.state.predecessor_value(self.t)
            if self.t["update"] == "delta":
                _, self._base = base_codes_of(self.t, self.state._base, self.pace)
                self.scale = self._base.scale
        elif self.source in ("base", "base-runs") and pl.is_palette(self.t):
            self._palette = self.layout.to_blocks(
                pl.decode(self.t, self.state._base).reshape(self.layout.shape))
        elif self.source == "base":
            _, self._base = base_codes_of(self.t, self.state._base, self.pace)
            self.scale = self._base.scale
        elif self.source == "base-runs":
            self._base = _base_meta(self.t, self.state._base, self.layout)
            self.scale = self._base.scale

    def runs(self, entries: list[tuple[int, int, dict]] | None) -> list[tuple]:
        """This stage's entries; without any, runs of about one entry's size to copy."""
        if entries:
            if self._base is None:
                self.scale = base_scale_of(self.t, self.state._base)[1]
            return entries
        per = max(1, _RUN_ELEMENTS // self.layout.block_len)
        return [(i, min(i + per, self.n), None) for i in range(0, self.n, per)]

    def previous(self, b0: int, b1: int) -> np.ndarray:
        if self.source == "memory":
            return self.state._blocks[self.name][b0:b1]
        if self.source == "file":
            if self.assemble:
                return self.out[b0:b1]  # type: ignore[index]
            values = np.empty((b1 - b0, self.layout.block_len), self.info.storage)
            _pread_into(self._fd(), _bytes(values), self.t["weights"][0] + b0 * self.run_bytes,
                        str(self.state._file))
            return values
        if self._palette is not None:
            return self._palette[b0:b1]
        if self._origin is not None:
            origin = self.layout.blocks_of(self._origin, b0, b1)
            if self._base is None:  # unchanged: the predecessor's value
                return origin
            b = self._base
            values = delta_blocks(self.info, origin, qz.BaseCodes(
                b.codes[b0:b1], b.scale[b0:b1],
                None if b.zero_point is None else b.zero_point[b0:b1], b.bits))
            _zero_padding(self.layout, values, b0)
            return values
        base = self._base
        assert base is not None
        codes = base.codes[b0:b1] if self.source == "base" else \
            _base_run_codes(self.t, self.state._base, self.layout, b0, b1)
        zp = None if base.zero_point is None else base.zero_point[b0:b1]
        values = base_blocks(qz.BaseCodes(codes, base.scale[b0:b1], zp, base.bits), self.info)
        _zero_padding(self.layout, values, b0)
        return values

    def _fd(self) -> int:
        if self.fd is None:
            raise AssertionError("internal error: no weights file to read from")
        return self.fd

    def put(self, b0: int, b1: int, values: np.ndarray) -> None:
        if self.out is not None:
            self.out[b0:b1] = values
        else:  # a run of the tensor's C order
            _pwrite(self.target, _bytes(np.ascontiguousarray(values)),  # type: ignore[arg-type]
                    self.t["weights"][0] + b0 * self.run_bytes)

    def finish(self, pool: Executor | None) -> None:
        """Hand an assembled tensor to the target and let it go."""
        if isinstance(self.target, dict):
            self.target[self.name] = self.out  # type: ignore[assignment]
        elif self.out is not None:
            write_from(self.target, self.t["weights"][0], self.layout.from_blocks(self.out),
                       pool, self.pace)
        self.out = self._base = self._palette = self._origin = None


def _zeros(shape: tuple[int, ...], dtype: np.dtype, pool: Executor | None,
           pace: Pace | None) -> np.ndarray:
    """``np.zeros(shape, dtype)``; with ``pace``, its pages are touched slab by slab, each in
    its turn. The first touch of a fresh buffer costs page faults and zeroing, and a strided
    copy into it (a weights file's C order into block order) touches every page at once: for
    a 64 MB tensor, one slab took 10-80 ms instead of about 1."""
    if pace is None:
        return np.zeros(shape, dtype)
    out = np.empty(shape, dtype)
    flat = out.reshape(-1).view(np.uint8)
    _each(pool, lambda part: flat[part].fill(0),
          [slice(i, i + _PACED_SLAB) for i in range(0, flat.size, _PACED_SLAB)], pace)
    return out


def _runs_are_contiguous(layout: qz.Layout) -> bool:
    """Whether blocks ``b0:b1`` are elements ``b0 * block_len : b1 * block_len`` of the tensor
    in C order (no transposition, no padding)."""
    if layout.size == 0:
        return False
    if layout.mode == "tensor":
        return True
    if layout.mode == "channel":
        return layout.axis == 0
    return layout.axis == len(layout.shape) - 1 and layout.shape[-1] % layout.block_size == 0


def _padding_bytes(layout: qz.Layout, info: DTypeInfo) -> int:
    return (layout.n_blocks * layout.block_len - layout.size) * info.storage.itemsize


def _base_meta(t: dict[str, Any], base_bin, layout: qz.Layout) -> qz.BaseCodes:
    """Per-block base scales and zero points of ``t``, without its codes."""
    _, scale = base_scale_of(t, base_bin)
    b = t["base"]
    bits, _ = _CODE_TYPES[b["code_type"]]
    if b["codes"][1] != -(-layout.size // (8 // bits)):
        raise FormatError(f"tensor {t['name']}: base codes hold {b['codes'][1]} bytes, "
                          f"expected {-(-layout.size // (8 // bits))}")
    zp = None
    if b.get("zero_point") is not None:
        zraw = unpack_codes(_read(base_bin, b["zero_point"]), b["code_type"], layout.n_blocks)
        zp = layout.scales_to_blocks(zraw.reshape(layout.scale_shape))
    return qz.BaseCodes(np.zeros((0, layout.block_len), np.int8), scale, zp, int(t["bits"]))


def _base_run_codes(t: dict[str, Any], base_bin, layout: qz.Layout, b0: int,
                    b1: int) -> np.ndarray:
    """Base codes of blocks ``b0:b1`` of ``t`` (a layout whose runs are contiguous)."""
    b = t["base"]
    bits, _ = _CODE_TYPES[b["code_type"]]
    per = 8 // bits
    e0, e1 = b0 * layout.block_len, b1 * layout.block_len
    lo, hi = e0 // per, -(-e1 // per)
    off = b["codes"][0]  # its length was checked by _base_meta
    codes = unpack_codes(_read(base_bin, [off + lo, hi - lo]), b["code_type"], (hi - lo) * per)
    return codes[e0 - lo * per:e1 - lo * per].reshape(b1 - b0, layout.block_len)


def _release_pages(stage_file: StageFile, entry: dict[str, Any]) -> None:
    """Unmap the pages of a decoded ``entry`` when ``stage_file`` is memory-mapped.

    A mapping keeps every page it touched resident in this process (a stage can be 60% the
    size of the weights). The file is mapped read-only and shared, so a page a neighbouring
    entry still needs is simply read back from the kernel's cache.
    """
    buf = stage_file.data(entry).obj
    if not isinstance(buf, mmap.mmap):
        return
    lo = entry["offset"] // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        buf.madvise(mmap.MADV_DONTNEED, lo, entry["offset"] + entry["length"] - lo)
    except (OSError, ValueError):  # best effort: only the footprint is at stake
        pass


class _FileBytes:
    """A file read by slices with ``pread``: unlike a memory map, what was read does not stay
    resident in the process."""

    def __init__(self, path: str):
        self.path = path
        self._size = os.path.getsize(path)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, span: slice) -> bytearray:
        out = bytearray(span.stop - span.start)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            _pread_into(fd, memoryview(out), span.start, self.path)
        finally:
            os.close(fd)
        return out


def _layout(t: dict[str, Any]) -> qz.Layout:
    return qz.Layout.from_json(tuple(t["shape"]), t["layout"])


def _zero_padding(layout: qz.Layout, blocks: np.ndarray, first: int = 0) -> None:
    """Zero the padding of ``blocks`` (blocks ``first..`` of a tensor), as the encoder codes it.

    Only the last block along the axis of a ``"block"`` layout is padded.
    """
    if layout.mode != "block":
        return
    length = layout.shape[layout.axis]
    rem = length % layout.block_size
    if rem:
        nb = -(-length // layout.block_size)
        blocks[(nb - 1 - first) % nb::nb, rem:] = 0


def weights_layout(manifest: dict[str, Any]
                   ) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Each coded tensor's place in a stage's ``weights.bin``: name -> (dtype, shape, offset,
    length)."""
    return {t["name"]: (t["dtype"], tuple(t["shape"]), int(t["weights"][0]),
                        int(t["weights"][1])) for t in manifest["tensors"]}


def weights_size(manifest: dict[str, Any]) -> int:
    """Size of a stage's ``weights.bin``: the end of the last tensor."""
    return max((int(t["weights"][0]) + int(t["weights"][1]) for t in manifest["tensors"]),
               default=0)


# ---------------------------------------------------------------- tensors in files


BATCH_BYTES = 1 << 22  # tensors assembled in memory at a time (a bigger one alone)
_RUN_ELEMENTS = 1 << 18  # values per job when a tensor is copied, not decoded
_SLAB_BYTES = 1 << 22  # staging buffer between a file and a strided view
_PACED_SLAB = 1 << 20  # the same when paced: a few ms of work, the longest an inference waits
_TILE = 256


def copy_tiled(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src``; 2-D copies between C order and a transposed view go tile by tile.

    Weights in block order are transposed views of their tensors; copying them in cache-sized
    tiles is about 2.5x faster than one strided copy.
    """
    if src.ndim != 2 or (src.flags.c_contiguous and dst.flags.c_contiguous):
        np.copyto(dst, src)
        return
    rows, cols = src.shape
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            dst[i:i + _TILE, j:j + _TILE] = src[i:i + _TILE, j:j + _TILE]


def _pread_into(fd: int, buf: memoryview, offset: int, where: str) -> None:
    pos = 0
    while pos < len(buf):
        n = os.preadv(fd, [buf[pos:]], offset + pos)
        if n <= 0:
            raise IntegrityError(f"{where} is truncated: nothing at byte {offset + pos}")
        pos += n


_FILL_BYTES = 4 << 20
_ZEROS = memoryview(bytes(_FILL_BYTES))


def _prefill(fd: int, size: int, pace: Pace | None = None) -> None:
    """Make the new file ``fd`` ``size`` bytes of zeros; when ``pace`` is given (a live
    session), by writing them 4 MB at a time, each write in its turn.

    Linux keeps a file's pages in folios as large as the writes that first created them. The
    decoder writes runs of 1 MB or less when paced; a 400 MB weights file made of them was
    mapped with 4 KB page-table entries, and the inplace switch's first run (the probe, runs
    waiting) spent 24-37 ms mapping it. Written first in 4 MB pieces, it is held in 2 MB folios
    and mapped in 1 ms. The decoder's writes then land in those folios. Unpaced, the decoder
    writes in 4 MB slabs itself and the file came out in large folios without this (mapped in
    0.5 ms), so only its length is set.
    """
    os.ftruncate(fd, size)
    if pace is None:
        return
    for off in range(0, size, _FILL_BYTES):
        with pace():
            _pwrite(fd, _ZEROS[:min(_FILL_BYTES, size - off)], off)


def _pwrite(fd: int, buf: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(buf):
        pos += os.pwrite(fd, buf[pos:], offset + pos)


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))


def _slabs(values: np.ndarray, size: int = _SLAB_BYTES) -> list[tuple[int, slice]]:
    """(byte offset, rows) of slabs of whole rows along the first axis of ``values`` (ndim >=
    1), for copying it between C order in a file and its own strides."""
    rows = values.shape[0]
    row_bytes = values.nbytes // rows
    step = max(1, size // max(row_bytes, 1))
    return [(i * row_bytes, slice(i, min(i + step, rows))) for i in range(0, rows, step)]


def _each(pool: Executor | None, fn: Callable[[Any], None], jobs: list,
          pace: Pace | None = None) -> None:
    if pace is not None:
        fn = functools.partial(_paced, pace, fn)
    if pool is None or len(jobs) < 2:
        for job in jobs:
            fn(job)
    else:
        list(pool.map(fn, jobs))


def _paced(pace: Pace, fn: Callable[[Any], None], job) -> None:
    with pace():
        fn(job)


def read_into(fd: int, offset: int, out: np.ndarray, where: str = "weights file",
              pool: Executor | None = None,
              pace: Pace | None = None) -> None:
    """Fill ``out`` (any strides) with the C-order tensor stored at ``offset`` of ``fd``
    (strided: slab by slab, on ``pool`` if given, each slab inside ``pace()`` if given)."""
    if out.flags.c_contiguous:
        _pread_into(fd, _bytes(out), offset, where)
        return

    def slab(job: tuple[int, slice]) -> None:
        pos, rows = job
        buf = np.empty(out[rows].shape, out.dtype)
        _pread_into(fd, _bytes(buf), offset + pos, where)
        copy_tiled(out[rows], buf)

    _each(pool, slab, _slabs(out, _PACED_SLAB if pace else _SLAB_BYTES), pace)


def write_from(fd: int, offset: int, values: np.ndarray, pool: Executor | None = None,
               pace: Pace | None = None) -> None:
    """Store ``values`` (any strides) in C order at ``offset`` of ``fd`` (strided: slab by
    slab, on ``pool`` if given, each slab inside ``pace()`` if given)."""
    if values.flags.c_contiguous:
        _pwrite(fd, _bytes(values), offset)
        return

    def slab(job: tuple[int, slice]) -> None:
        pos, rows = job
        buf = np.empty(values[rows].shape, values.dtype)
        copy_tiled(buf, values[rows])
        _pwrite(fd, _bytes(buf), offset + pos)

    _each(pool, slab, _slabs(values, _PACED_SLAB if pace else _SLAB_BYTES), pace)


def _unlink(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def extract_update_files(stage0: StageFile, manifest: dict[str, Any],
                         held_graph: Callable[[], bytes | None], base_bin: Path | None = None,
                         pace: Pace | None = None,
                         written: Callable[[int, int, int], None] | None = None
                         ) -> dict[str, bytes]:
    """``base.bin`` and ``graph.onnx`` of an update's stage 0, each checked against the
    manifest (size before decoding, sha256 after). When the manifest's ``graph.onnx`` entry
    names a ``reference`` (the sha256 of the skeleton the device holds: the graph did not
    change, so only what differs from it ships), ``held_graph()`` must give exactly those
    bytes, else the update is refused before anything is decoded (:class:`IntegrityError`).

    ``base_bin``: write ``base.bin`` to this new file instead of returning it, decoded in
    ``pace()`` turns (:func:`extract_file_into`: a live session taking an update)."""
    files = {f["path"]: f for f in manifest["base_model"]["files"]}
    out: dict[str, bytes] = {}
    for name in ("graph.onnx", "base.bin"):
        f = files[name]
        ref = None
        if f.get("reference") is not None:
            ref = held_graph()
            have = "no skeleton graph" if ref is None else \
                f"skeleton {hashlib.sha256(ref).hexdigest()[:12]}"
            if ref is None or hashlib.sha256(ref).hexdigest() != f["reference"]:
                raise IntegrityError(
                    f"this update reuses the skeleton graph {f['reference'][:12]} its "
                    f"predecessor's devices hold, and this one has {have} (it reached the model "
                    "another way): take an update encoded with the skeleton shipped "
                    "(--ship-graph) or the full package")
        if name == "base.bin" and base_bin is not None:
            extract_file_into(stage0, name, base_bin, f["size"], f["sha256"], pace, written)
        else:
            out[name] = extract_file(stage0, name, size=f["size"], reference=ref,
                                     sha256=f["sha256"])
    return out


def _file_entry(stage_file: StageFile, name: str, size: int | None,
                max_size: int | None) -> dict[str, Any]:
    """The file entry ``name`` of a stage file, its declared ``raw_length`` checked: ``size``
    when given, at most ``max_size`` when given, at most 2 GiB for an ``.onnx`` file, and
    at most half the memory left to the process (:func:`~p2u_onnx._memory.memory_left`: the
    decoded file and its streams), so that a small stage declaring a huge file (a
    decompression bomb) is refused before a byte of it is decoded."""
    label = Path(stage_file.name).name
    for entry in stage_file.entries:
        if entry["kind"] == "file" and entry["name"] == name:
            raw = entry["raw_length"]
            limit = max_size if max_size is not None else \
                (1 << 31) - 1 if name.endswith(".onnx") else None
            if size is not None and raw != size:
                raise IntegrityError(f"{name} inside {label} declares {raw} bytes, the "
                                     f"manifest lists {size}")
            if limit is not None and raw > limit:
                raise IntegrityError(f"{name} inside {label} declares {raw} bytes, more than "
                                     f"the {limit} it may have")
            left, which = memory_left()
            if left is not None and 2 * raw > left:
                raise P2UError(f"{name} inside {label} is {raw} bytes; decoding it needs about "
                               f"{2 * raw} bytes of memory, {left} are left ({which})")
            return entry
    raise FormatError(f"{label} has no {name}")


def check_entries(stage_file: StageFile, sizes: dict[str, int]) -> None:
    """Check the file entries named in ``sizes`` (their sizes as the manifest lists them) as
    :func:`extract_file` does, declared sizes and the memory they need, before any of them is
    decoded: a caller unpacking several files then writes none when one is refused."""
    for name, size in sizes.items():
        _file_entry(stage_file, name, size, None)


def _check_listed(stage_file: StageFile, entry: dict[str, Any], sha256: str | None) -> None:
    if sha256 is not None and entry["sha256"] != sha256:
        raise IntegrityError(f"{entry['name']} inside {Path(stage_file.name).name} differs "
                             "from what the manifest lists")


def extract_file(stage_file: StageFile, name: str, size: int | None = None,
                 max_size: int | None = None, ref: bytes | None = None,
                 reference: bytes | None = None, sha256: str | None = None) -> bytes:
    """Decompress the file entry ``name`` of a stage file and check its sha256.

    ``ref``: the bytes of ``base.onnx`` (checked against the manifest by the caller), which
    a ``zstd-ref`` entry (format 4: the skeleton graph) is coded against. ``reference``: the
    skeleton a device holds, which an update's ``zstd`` graph entry is coded against (format 3,
    the manifest's ``reference`` key). ``sha256``: the digest the manifest lists for the file,
    which the entry's must equal (checked before decoding; the bytes are hashed once).

    The entry's declared ``raw_length`` is checked before anything is decoded: it must be
    ``size`` when given (what the manifest lists), at most ``max_size`` when given, and at most
    2 GiB for an ``.onnx`` file (protobuf's limit); decoding then never produces more.
    """
    entry = _file_entry(stage_file, name, size, max_size)
    _check_listed(stage_file, entry, sha256)
    raw = entry["raw_length"]
    codec = get_codec(entry["codec"])
    if reference is not None:  # coded against the bytes the device holds
        if not isinstance(codec, ZstdCodec):
            raise FormatError(f"{name} inside {Path(stage_file.name).name} is coded against a "
                              f"reference with codec {entry['codec'].get('id')!r}, not zstd")
        from .codecs import _zstd_decompress

        data = _zstd_decompress(stage_file.data(entry), raw, reference)
    elif isinstance(codec, ZstdRefCodec):
        data = codec.decode(stage_file.data(entry), raw, ref)
    else:
        data = codec.decode(stage_file.data(entry), raw)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise IntegrityError(f"{name} inside {Path(stage_file.name).name} is corrupt")
    return data


def check_disk_room(label: str, size: int, folder: Path) -> None:
    """Refuse, before a byte is decoded, ``size`` bytes (``label`` names them) that would not
    fit in the free space of ``folder``, where they are written. (Memory is checked for every
    file entry, :func:`extract_file`.)"""
    free = shutil.disk_usage(folder).free
    if size > free:
        raise P2UError(f"{label}: {size} bytes, more than the {free} free in {folder}")


def extract_file_into(stage_file: StageFile, name: str, dest: Path, size: int, sha256: str,
                      pace: Pace | None = None,
                      written: Callable[[int, int, int], None] | None = None) -> None:
    """:func:`extract_file` (``size`` and ``sha256`` as the manifest lists them) into the new
    file ``dest``, in short jobs each inside ``pace()``: decoded and hashed
    :data:`~p2u_onnx.codecs.STEP` bytes at a time, as a live session's stage decoding is (an
    update's 50 MB ``base.bin`` decoded in one call beside the runs made a 15 ms run of the
    100M model take 55-93 ms). Written as it is hashed, outside the turns (a write may wait
    for the disk), as a stage's private copy is; on a mismatch ``dest`` is removed. ``written(fd, offset, length)`` is told of the bytes (a
    session's write-back)."""
    entry = _file_entry(stage_file, name, size, None)
    _check_listed(stage_file, entry, sha256)
    codec = get_codec(entry["codec"])
    _check_size(size)
    check_disk_room(f"{name} inside {Path(stage_file.name).name}", size, dest.parent)
    if isinstance(codec, (ZstdCodec, SegmentsCodec)):
        data = np.zeros(size, np.uint8)
        codec.decode_into(stage_file.data(entry), data, pace)
    else:  # no paced decoder: decoded at once
        data = np.frombuffer(codec.decode(stage_file.data(entry), size), np.uint8)
    h = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        for pos in range(0, size, STEP):
            part = memoryview(data[pos:pos + STEP])
            with in_turn(pace):
                h.update(part)
            _pwrite(fd, part, pos)
        if written is not None:
            written(fd, 0, size)
    except BaseException:
        os.close(fd)
        _unlink(dest)
        raise
    os.close(fd)
    if h.hexdigest() != sha256:
        _unlink(dest)
        raise IntegrityError(f"{name} inside {Path(stage_file.name).name} is corrupt")
