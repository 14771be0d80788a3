"""Encode an ONNX model into a progressive package (encoder side: needs onnx).

:func:`encode` runs the passes, quantizes every selected weight, writes ``base.onnx`` +
``base.bin`` (plain ONNX), the stage files and the manifest, into a temporary directory that is
renamed into place only when everything succeeded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from . import _workdir, passes
from . import palette as pl
from ._memory import trim_heap
from .base_speed import speed_up_base
from . import quantizers as qz
from .codecs import SegmentsCodec, ZstdCodec, ZstdRefCodec, _zstd_entropy
from .config import LOSSLESS, BitBudget, Plan, QuantConfig
from .dtypes import ONNX_BFLOAT16, dtype_info
from .errors import P2UError, PlanError, UnsupportedModelError
from .format import ALIGN, BINDING_KEY, FORMAT_VERSION, AtomicFile, StageWriter, \
    manifest_binding, save_manifest, sha256_file, stage_file_name
from .graph import check_domains, default_opset, iter_slots
from .reconstruct import GROUPS, PLANES, code_chunk, pack_codes, workers
from .zstd_reference import ZstdReference

__all__ = ["encode", "EncodeResult", "load_model"]

EXTERNALIZE_BYTES = 4096  # other tensors this big go to base.bin, shared by base and skeleton
CHUNK_ELEMENTS = 1 << 18  # weights per stage entry: cache-sized, coded on parallel threads
# refine codes grouped by context (format 5, int-ctx) and planes coded more thoroughly for
# models of up to this many bytes of coded weights: 3-6% of a refinement, where a small
# model's package is closest to zstd -19; on larger ones the plain planes decode 6x faster
# (the context sort), and the thorough planes took 2.3x the encoding time
SMALL_MODEL_BYTES = 16 << 20
LOOKAHEAD_BYTES = 64 << 20  # weights submitted ahead of the one being written
GRAPH_RATIO = 0.3  # zstd-compressed size of a graph's protobuf (no weights), measured


@dataclasses.dataclass
class EncodeResult:
    """What :func:`encode` wrote."""

    path: Path
    manifest: dict[str, Any]
    seconds: float

    @property
    def stage_bytes(self) -> list[int]:
        return [s["bytes"] for s in self.manifest["stages"]]

    @property
    def warnings(self) -> list[str]:
        """What the user should know about this package (the manifest's ``notes``): a missed
        quality target, a cap that gave way, a skipped calibration, a missing probe, a
        package larger than ``zstd -19`` of the model file, a conversion."""
        return list(self.manifest.get("notes", []))


def load_model(source: str | os.PathLike | ModelProto) -> tuple[ModelProto, str]:
    """Load a model with its external data; returns (model, name). Clear errors on bad input."""
    if isinstance(source, ModelProto):
        m = ModelProto()
        m.CopyFrom(source)
        return m, m.graph.name or "model"
    path = Path(source)
    if not path.exists():
        raise UnsupportedModelError(f"{path}: no such file")
    if path.is_dir():
        raise UnsupportedModelError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as e:
        raise UnsupportedModelError(f"{path}: not a readable ONNX model ({_first_line(e)})") from e
    if not model.graph.node and not model.graph.initializer:
        raise UnsupportedModelError(f"{path}: not an ONNX model (empty graph)")
    return model, path.stem


def _identity(name: object, version: object) -> tuple[str, int]:
    """The manifest's ``name`` and ``version``, checked (:class:`PlanError` otherwise)."""
    from .trust import MAX_VERSION

    if not isinstance(name, str) or not name.strip() or len(name) > 200 \
            or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise PlanError(f"name {name!r}: give 1 to 200 printable characters")
    if isinstance(version, bool) or not isinstance(version, int) \
            or not 0 <= version <= MAX_VERSION:
        raise PlanError(f"version {version!r}: give an integer from 0 to 2**63-1")
    return name, version


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def tensor_array(t: TensorProto) -> np.ndarray:
    """Tensor values in storage dtype (bfloat16 as uint16 bits), flat order, zero-copy if raw."""
    if t.data_type == ONNX_BFLOAT16:
        if t.raw_data:
            return np.frombuffer(t.raw_data, "<u2").reshape(tuple(t.dims))
        return np.asarray(t.int32_data, np.uint32).astype(np.uint16).reshape(tuple(t.dims))
    info = dtype_info(t.data_type) if t.data_type in (1, 10, 11) else None
    if info is not None and t.raw_data:
        return np.frombuffer(t.raw_data, info.storage.newbyteorder("<")).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def slot_nbytes(t: TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    if t.data_type in (1, 10, 11, 16):
        return tensor_array(t).nbytes
    return t.ByteSize()


def fp32_equivalent_bytes(model: ModelProto) -> int:
    """Bytes of every constant tensor of ``model`` with floats counted at 4 bytes a value
    (what budget and cap shares are shares of); other tensors count their own bytes."""
    total = 0
    for slot in iter_slots(model):
        t = slot.tensor
        if t.data_type in (1, 10, 11, 16):
            total += 4 * int(np.prod(t.dims, dtype=np.int64))
        else:
            total += slot_nbytes(t)
    return total


def digest_slot(digest, slot, raw: bytes | None = None) -> bytes:
    """Feed one slot's identity and bytes to ``digest`` (same on the source and a restore).

    Returns the bytes hashed: little-endian values for float tensors (whatever field holds
    them), the raw data or serialized tensor otherwise.
    """
    t = slot.tensor
    digest.update(f"{slot.key}|{t.data_type}|{list(t.dims)}|".encode())
    raw = raw if raw is not None else t.raw_data
    if not raw:
        if t.data_type in (1, 10, 11, 16):
            a = tensor_array(t)
            raw = np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()
        else:
            raw = t.SerializeToString()
    digest.update(raw)
    return raw


def weights_digest(model: ModelProto) -> str:
    """sha256 over every constant tensor of ``model`` (after constants were lifted)."""
    h = hashlib.sha256()
    for slot in iter_slots(model):
        digest_slot(h, slot)
    return h.hexdigest()


class _BinWriter:
    """Appends aligned blobs to a file; returns [offset, length] spans."""

    def __init__(self, f):
        self.f, self.pos = f, 0
        self.segments: list[tuple[int, int, str]] = []

    def add(self, data: bytes, kind: str = "bytes") -> list[int]:
        """Append ``data``; ``kind`` tells the wire codec how to code it (SegmentsCodec)."""
        pad = (-self.pos) % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.pos += pad
        self.f.write(data)
        span = [self.pos, len(data)]
        if data:
            self.segments.append((self.pos, len(data), kind))
        self.pos += len(data)
        return span


def encode(
    model: str | os.PathLike | ModelProto,
    output: str | os.PathLike,
    plan: Plan | str = Plan(),
    config: QuantConfig = QuantConfig(),
    budget: BitBudget = BitBudget(),
    *,
    overwrite: bool = False,
    probe: bool = True,
    progress: Callable[[int, int], None] | None = None,
    name: str | None = None,
    version: int | None = None,
    base_from: Any = None,
    from_stage: int | None = None,
) -> EncodeResult:
    """Encode ``model`` into the package directory ``output``.

    >>> encode("model.onnx", "model.p2u", "4,8,lossless")  # doctest: +SKIP

    ``probe`` records, per stage, outputs on synthetic inputs that the runtime checks after each
    upgrade (see :mod:`p2u_onnx.probe`). ``progress(done, total)`` is called with weight bytes
    processed. ``name`` and ``version`` identify the release for rollback protection (see
    :mod:`p2u_onnx.trust`): a device refuses a lower version of a name it has seen; defaults:
    the model file's stem (or graph name) and ``$SOURCE_DATE_EPOCH``, else the encode time in
    seconds. Raises
    :class:`UnsupportedModelError` for input it cannot convert and :class:`PlanError` for bad
    options; on any error nothing is left at ``output``.

    The package is written into a temporary folder beside ``output`` (named after this process,
    so that a later run removes it if this one dies) and renamed into place; the parent folder
    must exist. ``overwrite`` replaces a p2u package (or an empty folder), atomically where the
    system allows (see :func:`_install`), and refuses anything else. The folder and its files
    get the usual modes less the umask (0755 / 0644 under umask 022).

    ``base_from`` (a model, a package, or a chain: see :func:`p2u_onnx.updates.held_state`)
    writes an update package against that state instead (:func:`p2u_onnx.updates
    .encode_update`; ``plan`` then defaults to the update plan, ``config`` and ``budget`` are
    not used).
    """
    if base_from is not None:
        from .updates import UPDATE_PLAN, encode_update

        return encode_update(model, output, base_from, from_stage=from_stage,
                             plan=UPDATE_PLAN if plan == Plan() else plan, overwrite=overwrite,
                             name=name, version=version)
    t0 = time.perf_counter()
    name_arg = name
    plan = Plan.parse(plan) if isinstance(plan, str) else plan
    out = _output_path(output, overwrite)
    if version is None:  # reproducible builds set SOURCE_DATE_EPOCH
        epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
        version = int(epoch) if epoch.isdigit() else int(time.time())
    _identity("model" if name_arg is None else name_arg, version)  # bad options: before loading
    m, name, converted = _load_source(model)
    ident = _identity(name if name_arg is None else name_arg, version)
    try:  # 0777 less the umask, as the files in it: a web server may serve the package
        tmp = _workdir.make_dir(out.parent, f".{out.name}.", 0o777)
    except OSError as e:
        raise P2UError(f"cannot write package {out}: {e.strerror or e}") from e
    loaded = [m]  # handed over, not kept here: _encode_into frees the model's weights
    del m
    try:
        zref = ZstdReference(model)  # zstd -19 of the model file, on a thread meanwhile
        try:
            manifest = _encode_into(loaded.pop(), name, tmp, plan, config, progress,
                                    raise_opset=True, probe=probe, budget=budget, note=converted,
                                    ident=ident, zref=zref)
        except _OpsetFallback as fb:
            # Keep the model's opset (>= 10): INT8 containers, per-channel (or per-tensor) scales.
            opset = fb.opset
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            gran = "channel" if opset >= 13 else "tensor"
            config = dataclasses.replace(config, granularity=gran)
            fallback = f"{fb.reason}; fell back to INT8 codes with {gran} scales at opset {opset}"
            manifest = _encode_into(_load_source(model)[0], name, tmp, plan, config, progress,
                                    raise_opset=False, probe=probe, budget=budget,
                                    note="; ".join(filter(None, [converted, fallback])),
                                    ident=ident, zref=zref)
        _install(tmp, out)
    except OSError as e:
        _workdir.remove_tree(tmp)
        raise P2UError(f"cannot write package {out}: {e.strerror or e}") from e
    except BaseException as e:
        _workdir.remove_tree(tmp)
        if type(e) is P2UError and isinstance(e.__cause__, OSError) and str(tmp) in str(e):
            # a file that could not be written: name it inside the package, not the
            # temporary directory that is gone now
            raise P2UError(str(e).replace(str(tmp), str(out))) from e.__cause__
        raise
    return EncodeResult(out, manifest, time.perf_counter() - t0)


def _output_path(output: str | os.PathLike, overwrite: bool) -> Path:
    """The package folder to write, after checking that its parent folder exists and that what
    is there already (with ``overwrite``) is a p2u package or an empty folder."""
    out = Path(output)
    if out.is_symlink():  # replace the package the link leads to, not the link
        out = Path(os.path.realpath(out))
    if not out.name or out.name in (".", ".."):
        raise P2UError(f"cannot write package {output}: give a folder name, e.g. model.p2u")
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise P2UError(f"cannot write package {out}: folder {out.parent} {what}")
    _recover(out)
    if os.path.lexists(out):
        if not overwrite:
            raise P2UError(f"{out} already exists (use overwrite=True)",
                           cli=f"{out} already exists (use --force)")
        if not (out.is_dir() and ((out / "manifest.json").is_file() or not any(out.iterdir()))):
            raise P2UError(f"{out} is not a p2u package (no manifest.json): not replacing it")
    return out


_exchange = _workdir.exchange  # a module attribute: tests replace it


def _install(tmp: Path, out: Path) -> None:
    """Put the finished package ``tmp`` at ``out``.

    An existing package is replaced atomically where the system can swap two names in one step
    (:func:`~p2u_onnx._workdir.exchange`): ``out`` names the old package, then the new one, never nothing and
    never a mix; the old one is then removed under the temporary name. Elsewhere the old package
    is renamed aside (``<tmp>.old``) and the new one into place: two renames, between which
    ``out`` is missing for a moment; if the process dies there, the next :func:`encode` to
    ``out`` puts the old package back (:func:`_recover`).
    """
    if not os.path.lexists(out):
        os.rename(tmp, out)  # an existing folder that appeared meanwhile makes this fail
        return
    if _exchange(tmp, out):
        _workdir.remove_tree(tmp)  # the old package, under the temporary name now
        return
    old = tmp.with_name(tmp.name + ".old")
    try:
        os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        if not os.path.lexists(out) and os.path.isdir(old):
            os.rename(old, out)
        raise
    _workdir.remove_tree(old)


def _recover(out: Path) -> None:
    """Clean up after earlier runs of :func:`encode` to ``out`` that died (killed, crashed,
    powered off): remove their temporary folders, and put an old package back that a run had
    renamed aside (:func:`_install`) when ``out`` is missing."""
    prefix = f".{out.name}."
    for d in sorted(_workdir.dead_dirs(out.parent, prefix), key=lambda p: p.suffix != ".old"):
        if d.suffix == ".old" and not os.path.lexists(out) and (d / "manifest.json").is_file():
            try:
                os.rename(d, out)
                continue
            except OSError:
                pass
        _workdir.remove_tree(d)


class _Pending:
    """A slot on its way through :class:`_TensorCoder` (futures for coded tensors)."""

    def __init__(self, slot, sel=None, raw=b"", blocks=None, spans=(), futures=(), nbytes=0,
                 palette=None):
        self.slot, self.sel, self.raw, self.blocks = slot, sel, raw, blocks
        self.spans, self.futures = list(spans), list(futures)
        self.nbytes = nbytes or len(raw)
        self.palette = palette  # (values, indices) of a tensor with few distinct values

    def ready(self) -> bool:
        return all(f is None or f.done() for f in self.futures)


class _TensorCoder:
    """Codes selected slots on a thread pool and writes results strictly in slot order."""

    def __init__(self, plan, config, ctypes, bitplan, bins, writers, pool, progress, total):
        self.plan, self.config, self.ctypes, self.bitplan = plan, config, ctypes, bitplan
        self.bins, self.writers, self.pool = bins, writers, pool
        self.progress, self.total, self.done = progress, total, 0
        n = len(plan.stages)
        self.stage_err, self.stage_rel = [0.0] * n, [0.0] * n
        self.tensors_meta: list[dict[str, Any]] = []
        self.coded: list[dict] = []
        self.weights_pos = 0
        self.all_bytes = 0
        self.fp32_bytes = 0  # every weight with floats at 4 bytes (what shares are shares of)
        self.digest = hashlib.sha256()
        self.grids = self.palettes = 0  # tensors coded exactly in the base (see palette.py)
        self.as_is = 0  # selected tensors sent as they are (see _as_sent)
        self.base_over_cap = False  # the planned base is over the cap already (_as_sent)
        self.sparse_codes = 0  # tensors whose base codes are mostly zeros (see _codes_kind)

    def digest_slot(self, slot, raw: bytes | None = None) -> bytes:
        """Hash the slot into the source digest; returns its raw bytes (read once, or ``raw``
        when the caller already took them out of the model).

        The tensor's inline bytes are dropped from the model meanwhile (only one copy of a
        tensor lives at a time); :meth:`finish` puts them back or points the tensor elsewhere.
        """
        raw = digest_slot(self.digest, slot, raw)
        self.all_bytes += len(raw)
        t = slot.tensor
        self.fp32_bytes += 4 * int(np.prod(t.dims, dtype=np.int64)) \
            if t.data_type in (1, 10, 11, 16) else len(raw)
        if slot.tensor.raw_data:
            slot.tensor.ClearField("raw_data")
        return raw

    def submit(self, slot, sel, raw: bytes) -> _Pending:
        if sel is None:
            return _Pending(slot, raw=raw)
        t = slot.tensor
        info = dtype_info(t.data_type)
        w = np.frombuffer(raw, info.storage.newbyteorder("<")).reshape(sel.shape)
        palette = pl.find(w)  # kept in finish() if smaller than the regular coding
        blocks = np.ascontiguousarray(sel.layout.to_blocks(w))
        grid = None if palette is not None or not self.config.symmetric else \
            pl.find_grid(blocks, info)
        if grid is not None:  # already on a uniform grid: exact base codes, in INT8 containers
            self.bitplan.bits[slot.key] = grid.bits
            self.ctypes[slot.key] = passes.code_type(grid.bits, 13)[0]
            self.grids += 1
        nbytes = len(raw)
        del raw, w  # the blocks are the only copy from here on
        per = max(1, CHUNK_ELEMENTS // sel.layout.block_len)
        spans = [(i, min(i + per, len(blocks))) for i in range(0, len(blocks), per)]
        stages, cfg = self._stages(slot.key), self.config
        imp = self.bitplan.importance.get(slot.key)
        if imp is not None:
            imp = np.ascontiguousarray(sel.layout.to_blocks(
                np.broadcast_to(imp, sel.shape).astype(np.float32)))
        # the device-side replay of the lossless stage is checked on each tensor's first chunk
        clip = self.bitplan.clip.get(slot.key, cfg.clip_search)
        futures = [self.pool.submit(code_chunk, blocks[b0:b1], info, stages,
                                    symmetric=cfg.symmetric, clip_search=clip,
                                    replay=i == 0,
                                    importance=None if imp is None else imp[b0:b1],
                                    base=None if grid is None else qz.BaseCodes(
                                        grid.codes[b0:b1], grid.scale[b0:b1], None, grid.bits),
                                    compact=True, small_model=self.total <= SMALL_MODEL_BYTES)
                   for i, (b0, b1) in enumerate(spans)]
        return _Pending(slot, sel, b"", blocks, spans, futures, nbytes, palette)

    def _stages(self, key: str) -> list[int | str]:
        """The plan for one tensor: its own base bits, later stages as many bits finer."""
        b = self.bitplan.bits.get(key, self.plan.base_bits)
        return [s if s == LOSSLESS else int(s) - self.plan.base_bits + b for s in self.plan.stages]

    def finish(self, p: _Pending) -> int:
        """Write one slot's results; returns its raw size."""
        t, plan = p.slot.tensor, self.plan
        if p.sel is None:
            kind = _passthrough_kind(t, p.raw) if len(p.raw) >= PLANES_MIN else "bytes"
            if (len(p.raw) >= EXTERNALIZE_BYTES or kind != "bytes") and not _typed_fields(t):
                passes.set_external(t, "base.bin", self.bins.add(p.raw, kind))
            elif not _typed_fields(t) and p.raw and math.prod(t.dims) > 0:  # [] is a scalar
                t.raw_data = p.raw  # (an empty tensor was hashed as its serialized self)
            return len(p.raw)
        info, layout, key = dtype_info(t.data_type), p.sel.layout, p.slot.key
        if p.palette is not None:
            p.futures = [_Done(f.result()) for f in p.futures]
            if _palette_bytes(p.palette) < _regular_bytes(p, self.ctypes[key], info):
                return self._finish_palette(p, info)
        if p.nbytes <= PLANES_MAX:
            p.futures = [f if isinstance(f, _Done) else _Done(f.result()) for f in p.futures]
            raw = _as_sent(p, info, self.ctypes[key], self.base_over_cap)
            if raw is not None:
                return self._finish_as_is(p, raw)
        codes, scales, zps, abs_max = [], [], [], 0.0
        errs = [0.0] * len(plan.stages)
        for i, ((b0, b1), fut) in enumerate(zip(p.spans, p.futures)):
            r = fut.result()
            p.futures[i] = None  # payloads are written now, not kept
            codes.append(r.base.codes)
            scales.append(r.base.scale)
            zps.append(r.base.zero_point)
            abs_max = max(abs_max, r.abs_max)
            errs = [max(a, e) for a, e in zip(errs, r.max_err)]
            shift = 0
            for k, bits in enumerate(plan.stages[1:], start=1):
                if bits != LOSSLESS:
                    shift = int(bits) - plan.base_bits
                codec = (GROUPS if bits == LOSSLESS else PLANES) if r.codecs is None \
                    else r.codecs[k - 1]
                self.writers[k - 1].add({"kind": "exact" if bits == LOSSLESS else "refine",
                                         "name": key, "blocks": [b0, b1], "shift": shift,
                                         "codec": codec.get_config()}, r.payloads[k - 1])
            if plan.lossless and r.final is not None and not _same_bits(r.final, p.blocks[b0:b1]):
                raise P2UError(f"internal error: lossless stage does not restore {key}")
        p.blocks = None
        bits = self._stages(key)[0]
        base = qz.BaseCodes(np.concatenate(codes), np.concatenate(scales),
                            None if self.config.symmetric else np.concatenate(zps), bits)
        bins, ctype = self.bins, self.ctypes[key]
        packed = pack_codes(layout.from_blocks(base.codes), ctype)
        kind = _codes_kind(base.codes, packed)
        self.sparse_codes += kind == "bytes"
        spans = {
            "codes": bins.add(packed, kind),
            "scale": bins.add(np.ascontiguousarray(
                layout.blocks_to_scales(info.scale_to_storage(base.scale))).tobytes(),
                f"planes{info.scale_storage.itemsize}"),
            "zero_point": None if base.zero_point is None else bins.add(
                pack_codes(layout.blocks_to_scales(base.zero_point), ctype), "symbols"),
        }
        for k, e in enumerate(errs):
            self.stage_err[k] = max(self.stage_err[k], e)
            if abs_max > 0:
                self.stage_rel[k] = max(self.stage_rel[k], e / abs_max)
        nbytes = p.nbytes
        self.weights_pos += (-self.weights_pos) % ALIGN
        wspan = [self.weights_pos, nbytes]
        self.weights_pos += nbytes
        self.tensors_meta.append({
            "name": key, "tensor": p.slot.name, "where": p.slot.path, "kind": p.slot.kind,
            "dtype": info.name, "shape": list(p.sel.shape), "layout": layout.to_json(),
            "bits": bits, "symmetric": self.config.symmetric,
            "base": {**spans, "code_type": ctype}, "weights": wspan,
            "est_error": self.bitplan.est_error.get(key),
        })
        self.coded.append({"slot": p.slot, "layout": layout, "dtype": info.name,
                           "shape": p.sel.shape, "code_type": ctype, **spans})
        passes.set_external(t, "weights.bin", wspan)
        self.done += nbytes
        if self.progress:
            self.progress(self.done, self.total)
        return nbytes


    def _finish_as_is(self, p: _Pending, raw: bytes) -> int:
        """Send a selected tensor as it is, exact in the base (see :func:`_as_sent`): like the
        tensors never selected, it has no manifest entry and no stage carries anything for it."""
        p.blocks = p.futures = None
        passes.set_external(p.slot.tensor, "base.bin",
                            self.bins.add(raw, _passthrough_kind(p.slot.tensor, raw)))
        self.as_is += 1
        self.done += p.nbytes
        if self.progress:
            self.progress(self.done, self.total)
        return p.nbytes

    def _finish_palette(self, p: _Pending, info) -> int:
        """Write a palette tensor (exact in the base: no stage carries anything for it)."""
        values, idx = p.palette
        key, shape = p.slot.key, p.sel.shape
        p.blocks = p.futures = None
        spans = {"codes": self.bins.add(idx.tobytes(), "symbols"),
                 "palette": self.bins.add(np.ascontiguousarray(
                     values, values.dtype.newbyteorder("<")).tobytes(), "bytes")}
        base = {"kind": pl.KIND, **spans, "code_type": int(TensorProto.UINT8),
                "size": len(values)}
        layout_json = pl.layout_json(shape)
        self.palettes += 1
        self.weights_pos += (-self.weights_pos) % ALIGN
        wspan = [self.weights_pos, p.nbytes]
        self.weights_pos += p.nbytes
        self.tensors_meta.append({
            "name": key, "tensor": p.slot.name, "where": p.slot.path, "kind": p.slot.kind,
            "dtype": info.name, "shape": list(shape), "layout": layout_json,
            "bits": 8, "symmetric": self.config.symmetric, "base": base, "weights": wspan,
            "est_error": 0.0,
        })
        self.coded.append({"slot": p.slot, "layout": qz.Layout.from_json(shape, layout_json),
                           "dtype": info.name, "shape": shape, "code_type": base["code_type"],
                           "codes": spans["codes"], "palette": spans["palette"],
                           "palette_size": len(values), "scale": None, "zero_point": None})
        passes.set_external(p.slot.tensor, "weights.bin", wspan)
        self.done += p.nbytes
        if self.progress:
            self.progress(self.done, self.total)
        return p.nbytes


class _Done:
    """A finished result standing in for its future."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def done(self) -> bool:
        return True


SMALL_BYTES = 4 << 20  # base.bin's "bytes" stream up to this size is coded at zstd level 19
PLANES_MAX = 1 << 20  # pass-through tensors up to this size may be sent as byte planes
PLANES_MIN = 1024  # ... and from this size, also when smaller than EXTERNALIZE_BYTES: a small
# float tensor kept inline in base.onnx is coded by zstd with the graph, as byte planes in
# base.bin it costs 5-12% less (swift-f0's 3x3 convolutions and tables: 2.1 KB less; the
# digits CNN's 2.5 KB classifier: 0.1 KB more, its planes share the streams of the scales)


def _passthrough_kind(t: TensorProto, raw: bytes) -> str:
    """Segment kind of a tensor sent as it is (not coded: 1-D, small, integer): ``"planes4"``
    / ``"planes2"`` (its bytes split into byte planes, entropy-only zstd each) for 4- or 2-byte
    elements when that is measurably smaller than ``"bytes"`` (zstd with matches): smooth
    float tables and small integers (swift-f0's int32 tables 1.4 KB -> 0.7 KB), else
    ``"bytes"``. Only up to :data:`PLANES_MAX` (both are measured)."""
    width = {1: 4, 6: 4, 12: 4, 10: 2, 16: 2, 5: 2, 4: 2}.get(t.data_type)
    if width is None or len(raw) > PLANES_MAX or len(raw) % width:
        return "bytes"
    a = np.frombuffer(raw, np.uint8).reshape(-1, width)
    planes = sum(len(_zstd_entropy(np.ascontiguousarray(a[:, i]), 3)) for i in range(width))
    plain = len(ZstdCodec(level=19).encode(raw))
    return f"planes{width}" if planes < 0.95 * plain else "bytes"


SPARSE_CODES = 0.5  # share of zero codes from which a tensor's base codes may go to "bytes"
SPARSE_LEVEL = 19  # zstd level of base.bin's "bytes" stream when it holds such codes


def _codes_kind(codes: np.ndarray, packed: bytes) -> str:
    """Segment kind of a tensor's packed base codes: ``"symbols"`` (entropy-only zstd), or
    ``"bytes"`` (zstd with matches, at :data:`SPARSE_LEVEL`) for mostly-zero codes (pruned
    weights) where that is measurably smaller."""
    if np.count_nonzero(codes) > (1 - SPARSE_CODES) * codes.size:
        return "symbols"
    plain = len(_zstd_entropy(np.frombuffer(packed, np.uint8), 3))
    runs = len(ZstdCodec(level=SPARSE_LEVEL).encode(packed))
    return "bytes" if runs <= 0.98 * plain else "symbols"


AS_IS_GAIN = 0.8  # a tensor may be sent as it is when that costs less than this share of its coding


def _as_sent(p: _Pending, info, ctype: int, over_cap: bool = False) -> bytes | None:
    """The bytes of ``p``'s tensor when sending it as it is (exact in the base, zstd -19 or
    byte planes) costs less than :data:`AS_IS_GAIN` of its progressive coding over every
    stage and saves at least as many bytes as it adds to the base, else None. Structured
    tables (silero-vad's STFT basis: 196 KB coded, 60 KB as it is, 38 KB of it in the base
    before) compress far better as they are than their residuals do; a small dense weight
    that saves 15% of the package by tripling its share of the base stays coded. A zstd -3
    estimate screens out the usual full-entropy weights before zstd -19 is measured.
    ``over_cap``: the planned base is over the size cap anyway (a model so small that the
    tensors sent as they are and the graph exceed it, swift-f0): any saving is taken."""
    regular = _regular_bytes(p, ctype, info)
    later = sum(len(x) for f in p.futures for x in f.result().payloads)  # stages 1..n
    raw = np.ascontiguousarray(p.sel.layout.from_blocks(p.blocks),
                               info.storage.newbyteorder("<")).tobytes()
    if len(ZstdCodec(level=3).encode(raw)) >= regular:
        return None
    t = p.slot.tensor
    kind = _passthrough_kind(t, raw)
    if kind == "bytes":
        sent = len(ZstdCodec(level=19).encode(raw))
    else:
        width = int(kind[-1])
        a = np.frombuffer(raw, np.uint8).reshape(-1, width)
        sent = sum(len(_zstd_entropy(np.ascontiguousarray(a[:, i]), 3)) for i in range(width))
    grows = sent - (regular - later)  # the base's own coding of it is regular - later
    return raw if sent < AS_IS_GAIN * regular and (over_cap or regular - sent >= grows) \
        else None


def _palette_bytes(palette) -> int:
    """Wire bytes of a palette tensor: its indices (entropy-coded as base symbols) + values."""
    values, idx = palette
    return len(_zstd_entropy(idx, 3)) + values.nbytes


def _regular_bytes(p: _Pending, ctype: int, info) -> int:
    """Wire bytes of the regular coding of ``p`` over every stage (base codes and scales as
    stage 0 codes them, every later payload), from its finished chunks."""
    rs = [f.result() for f in p.futures]
    total = sum(len(x) for r in rs for x in r.payloads)
    codes = np.concatenate([r.base.codes for r in rs])
    total += len(_zstd_entropy(np.frombuffer(pack_codes(p.sel.layout.from_blocks(codes), ctype),
                                             np.uint8), 3))
    scales = info.scale_to_storage(np.concatenate([r.base.scale for r in rs]))
    planes = np.ascontiguousarray(scales).view(np.uint8).reshape(-1, scales.dtype.itemsize)
    total += sum(len(_zstd_entropy(np.ascontiguousarray(planes[:, i]), 3))
                 for i in range(planes.shape[1]))
    return total


class _OpsetFallback(Exception):
    def __init__(self, reason: str, opset: int):
        super().__init__(reason)
        self.reason, self.opset = reason, opset


def _detach_weights(m: ModelProto, selected: list) -> tuple[ModelProto, list, dict[str, bytes]]:
    """Take the bytes of the selected weights out of ``m``: returns the model without them
    (parsed anew), ``selected`` pointing into it, and the bytes by slot key.

    Clearing a field gives no memory back (protobuf frees a message's memory only with the
    whole message), so the weights would otherwise be held twice while they are coded; the
    caller drops the original model, and the weights live once, in the returned bytes.
    """
    raws: dict[str, bytes] = {}
    for s in selected:
        t = s.slot.tensor
        if t.HasField("raw_data"):
            raws[s.slot.key] = t.raw_data
            t.ClearField("raw_data")
    if not raws:
        return m, selected, raws
    slim = ModelProto()
    slim.ParseFromString(m.SerializeToString())
    slots = {slot.key: slot for slot in iter_slots(slim)}
    return slim, [dataclasses.replace(s, slot=slots[s.slot.key]) for s in selected], raws


def _bit_plan(m: ModelProto, selected, raws: dict[str, bytes], plan: Plan, config: QuantConfig,
              budget: BitBudget):
    """Base bits per tensor (adaptive unless ``budget.adaptive`` is off); ``raws`` holds the
    selected weights' bytes (see :func:`_detach_weights`)."""
    from .calibrate import probe_inputs
    from .sensitivity import BitPlan, plan_bits

    # the inputs the probe tries: the user's, then what the graph implies (--shape)
    inputs = probe_inputs(m, budget.calib, budget.shapes)
    if not budget.adaptive or not selected:
        return BitPlan({s.slot.key: plan.base_bits for s in selected}, {}, {}, None, False, [],
                       probe_inputs=inputs)
    arrays = {}
    for s in selected:
        t, raw = s.slot.tensor, raws.get(s.slot.key)
        arrays[s.slot.key] = tensor_array(t) if raw is None else np.frombuffer(
            raw, dtype_info(t.data_type).storage.newbyteorder("<")).reshape(s.shape)
    # what the base pays besides the coded weights: tensors sent as they are, and the graph
    # itself (compressed to about GRAPH_RATIO of its protobuf size)
    chosen = {id(s.slot.tensor) for s in selected}
    fixed = sum(slot_nbytes(sl.tensor) for sl in iter_slots(m) if id(sl.tensor) not in chosen)
    # shares are of the fp32-equivalent bytes: an fp16, bf16 or fp64 model gets the bits per
    # weight its fp32 twin gets (tensors sent as they are still cost their own bytes)
    total = fp32_equivalent_bytes(m)
    # (the structure alone: weights kept in typed fields, float_data..., are still in ``m``)
    structure = m.ByteSize() - sum(sl.tensor.ByteSize() for sl in iter_slots(m))
    fixed += int(GRAPH_RATIO * max(structure, 0))
    bitplan = plan_bits(m, selected, arrays, plan, config, budget, fixed_bytes=fixed,
                        total_bytes=total)
    bitplan.probe_inputs = inputs
    return bitplan


def _load_source(model: str | os.PathLike | ModelProto) -> tuple[ModelProto, str, str | None]:
    """Load the model to encode and check its op domains. A model below opset 10 (which has no
    DequantizeLinear) is converted first, to opset 21, else 13, else 10; the third item says so
    (None when the model was kept as it is)."""
    m, name = load_model(model)
    unknown = check_domains(m)
    if unknown:
        raise UnsupportedModelError(
            f"model uses op domain(s) {', '.join(repr(d) for d in unknown)} that onnxruntime "
            "does not define; p2u cannot run or verify it")
    opset = default_opset(m)
    if opset >= 10:
        return m, name, None
    why = None
    for target in (21, 13, 10):
        why = passes.raise_opset(m, target)
        if why is None:
            return m, name, (f"converted from opset {opset} to {target} (DequantizeLinear "
                             "needs opset 10 or later)")
    raise UnsupportedModelError(f"model has opset {opset} (< 10, no DequantizeLinear) and "
                                f"{why}")


def _encode_into(m: ModelProto, name: str, tmp: Path, plan: Plan, config: QuantConfig,
                 progress, *, raise_opset: bool, probe: bool = True,
                 budget: BitBudget = BitBudget(), note: str | None = None,
                 ident: tuple[str, int] = ("model", 0),
                 zref: ZstdReference | None = None) -> dict[str, Any]:
    aliased, alias_bytes = passes.normalize(m, config.min_elements)
    selected = passes.select_weights(m, config)
    m, selected, taken = _detach_weights(m, selected)

    bitplan = _bit_plan(m, selected, taken, plan, config, budget)
    if aliased:
        bitplan.notes.append(f"{aliased} initializer(s) equal bit for bit to another "
                             f"({alias_bytes:,} bytes) sent once: Identity nodes of that one "
                             "in the graph")
    trim_heap()  # what the calibration runs freed, before the weights are coded

    # Low-bit codes need a recent opset; convert the structure, or fall back to INT8 codes.
    opset0 = default_opset(m)
    all_bits = set(bitplan.bits.values()) or {plan.base_bits}
    want = max(passes.code_type(b, 99)[1] for b in all_bits)
    if any(s.layout.mode == "block" for s in selected):
        want = max(want, 21)
    target_opset = max(opset0, want) if raise_opset else opset0

    total = sum(int(np.prod(s.shape)) * dtype_info(s.slot.tensor.data_type).storage.itemsize
                for s in selected)
    n_stages = len(plan.stages)
    # INT4/INT2 code types only when the opset can be raised.
    ctypes = {s.slot.key: passes.code_type(bitplan.bits.get(s.slot.key, plan.base_bits),
                                           target_opset, config.symmetric)[0] for s in selected}
    writers = [StageWriter(tmp / stage_file_name(k), "", k) for k in range(1, n_stages)]
    by_tensor = {id(s.slot.tensor): s for s in selected}
    with AtomicFile(tmp / "base.bin") as bf, ThreadPoolExecutor(workers()) as pool:
        coder = _TensorCoder(plan, config, ctypes, bitplan, _BinWriter(bf), writers, pool,
                             progress, total)
        coder.base_over_cap = bitplan.allocation is not None and \
            bitplan.allocation.nbytes + bitplan.fixed_bytes > budget.cap * fp32_equivalent_bytes(m)
        pending: deque = deque()
        in_flight = 0
        for slot in list(iter_slots(m)):
            raw = coder.digest_slot(slot, taken.pop(slot.key, None))
            sel = by_tensor.get(id(slot.tensor))
            pending.append(coder.submit(slot, sel, raw))
            in_flight += len(raw)
            # Keep the threads busy on the next tensors while this one is written, within a
            # bounded amount of weights in flight.
            while pending and (in_flight > LOOKAHEAD_BYTES or pending[0].ready()):
                in_flight -= coder.finish(pending.popleft())
        while pending:
            coder.finish(pending.popleft())
    coded = coder.coded
    src_digest = coder.digest.hexdigest()
    exact = [f"{n} tensor(s) {what}" for n, what in (
        (coder.palettes, "with few distinct values coded as palettes"),
        (coder.grids, "already on a uniform grid coded on their own steps"),
        (coder.as_is, "sent as they are (smaller than their progressive coding)")) if n]
    if exact:
        bitplan.notes.append(" and ".join(exact) + ": exact in the base")
    package_id = hashlib.sha256(
        f"{src_digest}|{plan}|{config}|{sorted(bitplan.bits.items())}|{FORMAT_VERSION}"
        .encode()).hexdigest()[:32]

    # Skeleton: the original structure with coded weights in weights.bin (device writes it).
    graph_bytes = m.SerializeToString()
    for wr in writers:
        wr.package_id = package_id
    # stage files are finished by _manifest: their headers name the manifest (binding)
    w0 = _write_base(m, tmp, coder, coded, ctypes, opset0, target_opset, package_id)
    if writers:  # graph.onnx rides with stage 1: the device needs it from then on
        _add_graph(writers[0], graph_bytes, (tmp / "base.onnx").read_bytes())
    return _manifest(m, tmp, name, plan, config, budget, bitplan, selected, coder,
                     [w0, *writers], src_digest, package_id, opset0, total, probe, note, ident,
                     zref)


SMALL_GRAPH = 8 << 20  # graph files up to this size are compressed at zstd level 19


def _graph_level(data: bytes) -> int:
    return 19 if len(data) <= SMALL_GRAPH else 9


def _add_graph(writer: StageWriter, graph: bytes, base_onnx: bytes) -> None:
    """Add the skeleton graph to stage 1, coded against ``base.onnx`` (format 4,
    ``zstd-ref``), which holds most of it (names, small tensors, attributes): a few hundred
    bytes where a second copy of the graph cost 20-50% of a small model's zstd -19 size.
    Plain zstd when that is smaller."""
    level = _graph_level(graph)
    ref = ZstdRefCodec(level=level)
    coded, codec = ref.encode(graph, base_onnx), ref.get_config()
    plain = ZstdCodec(level=level).encode(graph)
    if len(plain) < len(coded):
        coded, codec = plain, ZstdCodec(level=level).get_config()
    writer.add({"kind": "file", "name": "graph.onnx", "codec": codec, "raw_length": len(graph),
                "sha256": hashlib.sha256(graph).hexdigest()}, coded)


def _write_base(m: ModelProto, tmp: Path, coder: _TensorCoder, coded: list, ctypes: dict,
                opset0: int, target_opset: int, package_id: str) -> StageWriter:
    """base.onnx (codes + DequantizeLinear) and stage 0 (base.onnx and base.bin, compressed;
    returned unfinished)."""
    # Base: codes + DequantizeLinear, then raise the opset if the code types need it.
    passes.to_base(m, coded)
    if target_opset > opset0:
        why = passes.raise_opset(m, target_opset, {c["slot"].name for c in coded})
        if why is not None:
            raise _OpsetFallback(why, opset0)
    speed_up_base(m)  # same values, fewer weights dequantized on every run
    need_ir = max((2 if c in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else
                   3 if c in (onnx.TensorProto.INT2, onnx.TensorProto.UINT2) else 0
                   for c in ctypes.values()), default=0)
    need_ir = {0: 0, 2: 10, 3: 11}[need_ir]
    try:
        need_ir = max(need_ir, onnx.helper.find_min_ir_version_for(list(m.opset_import), True))
    except Exception:  # unknown domains: keep what the model says
        pass
    m.ir_version = max(m.ir_version, need_ir)
    base_onnx = m.SerializeToString()
    (tmp / "base.onnx").write_bytes(base_onnx)

    zstd = ZstdCodec(level=_graph_level(base_onnx))
    # Stage 0 on the wire: base.onnx and base.bin, compressed.
    w0 = StageWriter(tmp / stage_file_name(0), package_id, 0)
    small = sum(n for _, n, kind in coder.bins.segments if kind == "bytes") <= SMALL_BYTES
    bin_codec = SegmentsCodec(level=SPARSE_LEVEL if coder.sparse_codes or small else 9,
                              segments=tuple(coder.bins.segments))
    for fname, data, codec in (("base.onnx", base_onnx, zstd),
                               ("base.bin", (tmp / "base.bin").read_bytes(), bin_codec)):
        w0.add({"kind": "file", "name": fname, "codec": codec.get_config(),
                "raw_length": len(data), "sha256": hashlib.sha256(data).hexdigest()},
               codec.encode(data))
    return w0


def _manifest(m: ModelProto, tmp: Path, name: str, plan: Plan, config: QuantConfig,
              budget: BitBudget, bitplan, selected, coder: _TensorCoder,
              stage_writers: list[StageWriter], src_digest: str, package_id: str, opset0: int,
              total: int, probe: bool, note: str | None,
              ident: tuple[str, int] = ("model", 0),
              zref: ZstdReference | None = None) -> dict[str, Any]:
    stage_err, stage_rel = coder.stage_err, coder.stage_rel
    tensors_meta, all_bytes = coder.tensors_meta, coder.all_bytes
    # the tensors coded (not those sent as they are after all, see _as_sent)
    fp32_bytes = sum(int(np.prod(t["shape"])) * 4 for t in tensors_meta)
    weight_bytes = sum(t["weights"][1] for t in tensors_meta)
    stages: list[dict[str, Any]] = []  # filled once the stage files are written
    manifest = {
        "format": "p2u", "format_version": FORMAT_VERSION, "package_id": package_id,
        "name": ident[0], "version": ident[1],
        "source": {"name": name, "weights_sha256": src_digest, "opset": opset0,
                   "weight_bytes": all_bytes, "fp32_equivalent_bytes": coder.fp32_bytes,
                   "coded_weight_bytes": weight_bytes, "coded_fp32_bytes": fp32_bytes,
                   "coded_tensors": len(tensors_meta)},
        "plan": [str(s) for s in plan.stages],
        "config": dataclasses.asdict(config),
        "base_model": {"onnx": "base.onnx", "data": "base.bin",
                       "opset": default_opset(m), "files": [
                           {"path": p, "size": (tmp / p).stat().st_size,
                            "sha256": sha256_file(tmp / p)} for p in ("base.onnx", "base.bin")]},
        "tensors": tensors_meta,
        "stages": stages,
    }
    zstd19 = _zstd_reference(manifest, zref)  # in "source": before the binding below
    if bitplan.allocation is not None:
        manifest["allocation"] = {
            "calibrated": bitplan.calibrated, "budget": dataclasses.asdict(budget),
            "est_error": bitplan.allocation.error,
            "est_quality": bitplan.est_quality,
            "est_bytes": bitplan.allocation.nbytes,
            "target_quality": budget.target_quality,
            "plain_est_quality": max(-1.0, 1 - (bitplan.allocation.plain_error or 0.0) / 2),
        }
        if bitplan.outputs:  # each output as its task reads it: metric, target, est., measured
            manifest["allocation"]["outputs"] = bitplan.outputs
    # Every stage header names this manifest (all but stages, probe, notes): set every other
    # key above. The stage files are written (hashed, copied, synced) on threads.
    binding = manifest_binding(manifest)
    for wr in stage_writers:
        wr.extra[BINDING_KEY] = binding
    with ThreadPoolExecutor(len(stage_writers)) as files:
        finished = list(files.map(StageWriter.finish, stage_writers))
    cum = 0
    for k, bits in enumerate(plan.stages):
        size, sha = finished[k]
        cum += size
        stages.append({
            "index": k, "bits": bits,
            "files": [{"path": stage_file_name(k), "size": size, "sha256": sha}],
            "bytes": size, "cumulative_bytes": cum,
            "max_abs_error": stage_err[k], "max_rel_error": stage_rel[k],
        })
    notes = ([note] if note else []) + bitplan.notes
    base_share = stages[0]["bytes"] / max(coder.fp32_bytes, 1)
    if bitplan.allocation is not None and base_share > budget.cap and not any(
            f"above the {budget.cap:.0%} cap" in n for n in bitplan.notes):  # said already
        est = (bitplan.allocation.nbytes + bitplan.fixed_bytes) / max(coder.fp32_bytes, 1)
        exact = ("; its palette, grid and as-is tensors are exact"
                 if coder.palettes or coder.grids or coder.as_is else "")
        notes.append(f"the base is {base_share:.1%} of the fp32-equivalent bytes, above the "
                     f"{budget.cap:.0%} cap (its size was estimated at {est:.1%}){exact}")
    notes += _zstd_notes(stages, zstd19)
    if probe:
        from .probe import record_probe  # imports onnxruntime only here

        trim_heap()  # what coding freed, before onnxruntime loads each stage
        why: list[str] = []
        entry = record_probe(tmp, manifest, why=why, **bitplan.probe_inputs)
        if entry is not None:
            manifest["probe"] = entry
        else:
            notes.append("no probe recorded (live sessions cannot check that an upgrade took "
                         f"effect): {why[-1] if why else 'the model could not be probed'}; "
                         "pass --shape or --inputs")
    notes += _package_note(manifest, notes, zstd19)
    if notes:
        manifest["notes"] = notes
    save_manifest(tmp, manifest)
    return manifest


def _package_note(manifest: dict[str, Any], notes: list[str],
                  zstd19: tuple[int, str] | None) -> list[str]:
    """The warning when everything a client downloads (manifest.json with this very note,
    every stage file, probe.npz) is larger than zstd -19 of the model file."""
    if zstd19 is None or len(manifest["stages"]) < 2:
        return []
    compressed, method = zstd19
    files = manifest["stages"][-1]["cumulative_bytes"] + (manifest.get("probe") or {}).get(
        "size", 0)
    total = files
    for _ in range(4):  # the note's own digits count: settle the total
        note = (f"the package ({total:,} bytes, everything a client downloads) is larger "
                f"than zstd -19 of the model file ({compressed:,} bytes, {method})")
        size = files + len(json.dumps({**manifest, "notes": notes + [note]},
                                      separators=(",", ":"))) + 1  # as save_manifest writes
        if size == total:
            break
        total = size
    return [note] if total > compressed else []


def _zstd_reference(manifest: dict[str, Any],
                    zref: ZstdReference | None) -> tuple[int, str] | None:
    """Record ``zstd -19`` of the model file in ``source``; returns (its bytes, how measured)."""
    ref = zref.result() if zref is not None else None
    if ref is None:
        return None
    size, compressed, method = ref
    manifest["source"].update(file_bytes=size, zstd19_bytes=compressed, zstd19_method=method)
    return compressed, method


def _zstd_notes(stages: list[dict[str, Any]], zstd19: tuple[int, str] | None) -> list[str]:
    """The warning when the base is larger than zstd -19 of the model."""
    if zstd19 is None:
        return []
    compressed, method = zstd19
    notes = []
    if stages[0]["bytes"] > compressed:
        notes.append(f"the base ({stages[0]['bytes']:,} bytes) is larger than zstd -19 of the "
                     f"model file ({compressed:,} bytes, {method})")
    return notes  # the whole package: _package_note, once the probe is recorded


def _typed_fields(t: TensorProto) -> bool:
    """True when the tensor keeps its values in typed fields (float_data...), not raw bytes."""
    return any(len(getattr(t, f)) for f in ("float_data", "int32_data", "int64_data",
                                             "double_data", "uint64_data", "string_data"))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                          np.ascontiguousarray(b).view(np.uint8))
