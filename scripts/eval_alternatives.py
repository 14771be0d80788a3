"""What a user would ship instead of a p2u package, measured on the same fp32 model.

Each function takes the fp32 model's path and a work directory and returns an
:class:`Alternative`: the bytes it puts on the wire, how long it took to make (median of
``repeats``), how long to decode when there is a decode step, and the model to score (for lossy
methods). A method that cannot run here returns an ``Alternative`` with ``error`` set to the
reason, so the report says why a row is empty instead of dropping it.

Lossy, one model file each (its wire size is the file compressed with zstd, level
:data:`WIRE_ZSTD_LEVEL`, as a server would send it with ``Content-Encoding: zstd``):

* :func:`ort_int8_dynamic`: ``onnxruntime.quantization.quantize_dynamic``, defaults (int8);
* :func:`ort_matmul_nbits`: ``MatMulNBitsQuantizer``, 4-bit, symmetric, one block size;
  optionally Gather too (after converting the model to opset 21, which that option needs);
* :func:`fp16`: onnxconverter-common's ``convert_float_to_float16`` (``keep_io_types``), or a
  plain cast of float initializers and graph types when that package is missing.

Lossless, on the wire: :func:`zstd19` (the whole ``.onnx`` at level 19) and :func:`zipnn`
(ZipNN on the float32 weights + the rest of the file at zstd level 19).

Lossy codec: :func:`nncodec` (Fraunhofer's NNC implementation) runs in its own virtual
environment (``build/nncodec-venv``, torch CPU) through ``scripts/eval_nncodec_worker.py``.

The paper's plain scheme (low-bit base + fp32 difference, no entropy coding) is computed from a
p2u package by :func:`plain_scheme`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import zstandard
from onnx import TensorProto, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
WIRE_ZSTD_LEVEL = 9  # level 19 made these int8/int4/fp16 files no smaller, and ran 20x slower
NNCODEC_VENV = ROOT / "build" / "nncodec-venv"
NNCODEC_WORKER = Path(__file__).resolve().parent / "eval_nncodec_worker.py"
NNCODEC_REQUIREMENTS = ("torch==2.13.0", "nncodec")
NNCODEC_MIN_ELEMENTS = 1024  # smaller float tensors stay exact (see :func:`nncodec`)


@dataclass
class Alternative:
    """One alternative's measurements. ``model`` is the candidate to score (lossy only)."""

    method: str
    kind: str  # "lossy" or "lossless"
    file_bytes: int | None = None
    wire_bytes: int | None = None
    make_s: float | None = None
    decode_s: float | None = None
    repeats: int = 1
    note: str = ""
    error: str | None = None
    model: bytes | Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-ready fields (the candidate model itself is left out)."""
        return {k: v for k, v in self.__dict__.items() if k != "model"}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls of ``fn`` and the last call's result."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def zstd_size(data: bytes, level: int = WIRE_ZSTD_LEVEL) -> int:
    return len(zstandard.ZstdCompressor(level=level, threads=-1).compress(data))


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``, with directories dropped from file paths."""
    text = str(e).strip().splitlines()
    line = re.sub(r"(?:/[\w.+-]+)+/([\w.+-]+)", r"\1", text[0][:300] if text else "")
    return f"{type(e).__name__}: {line}"


def failed(method: str, kind: str, e: BaseException) -> Alternative:
    return Alternative(method, kind, error=first_line(e))


# ------------------------------------------------------------------------------------------
# Lossy: onnxruntime's quantizers, fp16
# ------------------------------------------------------------------------------------------


def _quiet_ort_logging() -> None:
    """onnxruntime's quantization modules log every node at INFO on the root logger."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    for name in ("onnxruntime", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _file_result(method: str, source: Path, out: Path, make_s: float, repeats: int,
                 note: str = "", wire_level: int = WIRE_ZSTD_LEVEL) -> Alternative:
    data = out.read_bytes()
    if len(data) > 0.9 * source.stat().st_size:
        note += "; the file is barely smaller than fp32: little here for this method to quantize"
    return Alternative(method, "lossy", file_bytes=len(data),
                       wire_bytes=zstd_size(data, wire_level), make_s=make_s, repeats=repeats,
                       note=note, model=out)


def ort_int8_dynamic(path: Path, work: Path, repeats: int) -> Alternative:
    method = "ORT quantize_dynamic (int8)"
    try:
        from onnxruntime.quantization import quantize_dynamic
    except ImportError as e:
        return failed(method, "lossy", e)
    _quiet_ort_logging()
    out = work / "int8_dynamic.onnx"
    try:
        t, _ = timed(lambda: quantize_dynamic(path, out), repeats)
    except Exception as e:  # noqa: BLE001 - any quantizer failure is a result to report
        return failed(method, "lossy", e)
    return _file_result(method, path, out, t, repeats, "defaults: per-tensor int8 weights, "
                                                 "MatMul/Gemm/Conv/... dynamic activations")


def ort_matmul_nbits(path: Path, work: Path, repeats: int, block: int,
                     gather: bool = False) -> Alternative:
    method = f"ORT MatMulNBits 4-bit b{block}" + (" +Gather" if gather else "")
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        return failed(method, "lossy", e)
    _quiet_ort_logging()
    out = work / f"matmul_nbits_b{block}{'_gather' if gather else ''}.onnx"

    def make() -> None:
        model = onnx.load(str(path))
        if gather:
            from onnx import version_converter

            model = version_converter.convert_version(model, 21)
        q = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True,
                                 op_types_to_quantize=("MatMul", "Gather") if gather else None)
        q.process()
        q.model.save_model_to_file(str(out), False)

    try:
        t, _ = timed(make, repeats)
    except Exception as e:  # noqa: BLE001
        return failed(method, "lossy", e)
    note = "symmetric; " + ("MatMul and Gather weights (model converted to opset 21 first)"
                            if gather else "MatMul weights only (the default)")
    return _file_result(method, path, out, t, repeats, note)


def fp16(path: Path, work: Path, repeats: int) -> Alternative:
    out = work / "fp16.onnx"
    try:
        from onnxconverter_common import __version__ as occ_version
        from onnxconverter_common import float16

        def make() -> None:
            import warnings

            with warnings.catch_warnings():  # one warning per weight clipped to fp16's range
                warnings.simplefilter("ignore")
                m = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
            onnx.save(m, str(out))

        method, note = "fp16", f"onnxconverter-common {occ_version}, keep_io_types"
    except ImportError:
        def make() -> None:
            onnx.save(cast_fp16(onnx.load(str(path))), str(out))

        method, note = "fp16", "plain cast of float initializers (onnxconverter-common missing)"
    try:
        t, _ = timed(make, repeats)
    except Exception as e:  # noqa: BLE001
        return failed(method, "lossy", e)
    return _file_result(method, path, out, t, repeats, note)


def fp16_cast(path: Path, work: Path, repeats: int, why: str) -> Alternative:
    """The plain cast, used when onnxconverter-common's model does not run (``why``)."""
    out = work / "fp16_cast.onnx"
    try:
        t, _ = timed(lambda: onnx.save(cast_fp16(onnx.load(str(path))), str(out)), repeats)
    except Exception as e:  # noqa: BLE001
        return failed("fp16", "lossy", e)
    return _file_result("fp16", path, out, t, repeats,
                        f"plain cast of float initializers: onnxconverter-common's model did "
                        f"not run ({why})")


def cast_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float initializers to fp16, each followed by a Cast back to float (types unchanged)."""
    from onnx import helper

    graph = model.graph
    new_inits, casts = [], []
    for t in graph.initializer:
        if t.data_type != TensorProto.FLOAT:
            new_inits.append(t)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                       t.name + "__fp16")
        new_inits.append(half)
        casts.append(helper.make_node("Cast", [half.name], [t.name], to=TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


# ------------------------------------------------------------------------------------------
# Lossless on the wire
# ------------------------------------------------------------------------------------------


def float_tensors(model: onnx.ModelProto, min_elements: int = 1) -> Iterator[TensorProto]:
    """Float32 tensors of the model with at least ``min_elements`` values: initializers and
    Constant values, subgraphs too."""
    import thirdparty as tp

    yield from tp.iter_weight_tensors(model.graph, min_elements=min_elements)


def split_weights(path: Path, min_elements: int = 1) -> tuple[list[np.ndarray], onnx.ModelProto]:
    """The model's float32 tensors (``min_elements`` or more values), and the model with their
    data removed (the rest)."""
    model = onnx.load(str(path))
    arrays = []
    for t in float_tensors(model, min_elements):
        arrays.append(np.ascontiguousarray(numpy_helper.to_array(t), "<f4"))
        t.ClearField("raw_data")
        t.ClearField("float_data")
    return arrays, model


def zstd19(path: Path, repeats: int) -> Alternative:
    """The whole .onnx file at zstd level 19: compress once (slow), decompress ``repeats``."""
    data = path.read_bytes()
    t0 = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=19, threads=-1).compress(data)
    make_s = time.perf_counter() - t0
    dec_s, back = timed(lambda: zstandard.ZstdDecompressor().decompress(packed), repeats)
    if back != data:
        return Alternative("zstd -19", "lossless", error="zstd round trip differs")
    return Alternative("zstd -19", "lossless", file_bytes=len(data), wire_bytes=len(packed),
                       make_s=make_s, decode_s=dec_s, repeats=repeats,
                       note="whole .onnx file; compression timed once, decompression median")


def zipnn(path: Path, repeats: int) -> Alternative:
    """ZipNN on the float32 weights (one buffer) + zstd level 19 of the rest of the file."""
    method = "ZipNN"
    try:
        import zipnn as zipnn_mod
        from zipnn import ZipNN
    except ImportError as e:
        return failed(method, "lossless", e)
    arrays, rest = split_weights(path)
    raw = b"".join(a.tobytes() for a in arrays)
    version = getattr(zipnn_mod, "__version__", "")

    def compress() -> bytes:
        # ZipNN 0.5.4 reorders the bytes of its input in place: give it a fresh copy each time.
        return ZipNN(input_format="byte", bytearray_dtype="float32").compress(bytes(bytearray(raw)))

    try:
        make_s, packed = timed(compress, repeats)
        dec_s, back = timed(
            lambda: ZipNN(input_format="byte", bytearray_dtype="float32").decompress(packed),
            repeats)
    except Exception as e:  # noqa: BLE001
        return failed(method, "lossless", e)
    if bytes(back) != raw:
        return Alternative(method, "lossless", error="ZipNN round trip differs from the input")
    rest_bytes = zstd_size(rest.SerializeToString(), 19)
    return Alternative(method, "lossless", file_bytes=path.stat().st_size,
                       wire_bytes=len(packed) + rest_bytes, make_s=make_s, decode_s=dec_s,
                       repeats=repeats,
                       note=f"zipnn {version}: float32 weights {len(packed)} B + rest of the "
                            f"file at zstd -19 {rest_bytes} B; round trip checked")


# ------------------------------------------------------------------------------------------
# NNCodec, in its own virtual environment
# ------------------------------------------------------------------------------------------


def nncodec_python() -> Path:
    return NNCODEC_VENV / "bin" / "python"


def ensure_nncodec_venv(log: Path) -> str | None:
    """Create ``build/nncodec-venv`` with torch (CPU) and nncodec when missing.

    Returns None when the venv imports nncodec, else the reason (last lines of the log).
    """
    py = nncodec_python()
    if not py.exists() or nncodec_version() is None:  # missing, or an install cut short
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            steps = [[sys.executable, "-m", "venv", str(NNCODEC_VENV)],
                     [str(py), "-m", "pip", "install", *NNCODEC_REQUIREMENTS]]
            for cmd in steps:
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
                if r.returncode:
                    break
    probe = subprocess.run([str(py), str(NNCODEC_WORKER), "--version"], capture_output=True,
                           text=True, check=False) if py.exists() else None
    if probe is not None and probe.returncode == 0:
        return None
    tail = (probe.stderr if probe is not None else "") or \
        (log.read_text() if log.exists() else "no log")
    return "nncodec venv unusable: " + " | ".join(tail.strip().splitlines()[-3:])


def nncodec_version() -> str | None:
    py = nncodec_python()
    if not py.exists():
        return None
    r = subprocess.run([str(py), str(NNCODEC_WORKER), "--version"], capture_output=True,
                       text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def nncodec(path: Path, work: Path, qps: tuple[int, ...], timeout: float = 1800
            ) -> list[Alternative]:
    """NNCodec at each quantization parameter ``qp``: one :class:`Alternative` per qp, with
    the decoded model to score. A more negative qp is a finer quantization step.

    Every float32 tensor of at least :data:`NNCODEC_MIN_ELEMENTS` values goes to NNCodec as
    one parameter, with its defaults; smaller ones stay exact in the rest of the file. (Given
    every tensor, NNCodec's tiny error on scalars such as a ``Pow`` exponent of 2.0 turns
    outputs into NaN, and float constants that feed shapes break the graph.) The wire holds
    the bitstream plus the rest of the file at zstd level 19.
    """
    py = nncodec_python()
    if not py.exists():
        return [Alternative("NNCodec", "lossy", error=f"{py} missing (no venv)")]
    arrays, rest = split_weights(path, NNCODEC_MIN_ELEMENTS)
    rest_bytes = zstd_size(rest.SerializeToString(), 19)
    src = work / "nncodec_in.npz"
    np.savez(src, **{f"t{i:05d}": a for i, a in enumerate(arrays)})
    out_dir = work / "nncodec"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    cmd = [str(py), str(NNCODEC_WORKER), str(src), str(out_dir), *map(str, qps)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                           env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    except subprocess.TimeoutExpired:
        return [Alternative("NNCodec", "lossy", error=f"worker took over {timeout:.0f} s")]
    if r.returncode:
        err = " | ".join(r.stderr.strip().splitlines()[-3:])
        return [Alternative("NNCodec", "lossy", error=f"worker exit {r.returncode}: {err}")]
    results = []
    for line in r.stdout.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        model = split_weights(path, NNCODEC_MIN_ELEMENTS)[1]
        decoded = np.load(out_dir / rec["file"])
        for i, t in enumerate(float_tensors(model, NNCODEC_MIN_ELEMENTS)):
            a = decoded[f"t{i:05d}"].astype(np.float32).reshape(tuple(t.dims))
            t.raw_data = a.tobytes()
        results.append(Alternative(
            f"NNCodec qp {rec['qp']}", "lossy", file_bytes=None,
            wire_bytes=rec["bitstream_bytes"] + rest_bytes, make_s=rec["encode_s"],
            decode_s=rec["decode_s"], note=f"bitstream {rec['bitstream_bytes']} B (float32 "
            f"tensors of >= {NNCODEC_MIN_ELEMENTS} values) + rest of the file at zstd -19 "
            f"{rest_bytes} B; encode and decode timed once",
            model=model.SerializeToString()))
    return results


# ------------------------------------------------------------------------------------------
# The paper's plain scheme, from a p2u package
# ------------------------------------------------------------------------------------------


def plain_scheme(package: Path, level: int = 9) -> dict[str, Any]:
    """Bytes of the plain scheme on the same base as ``package`` (a ``b,...,lossless`` plan).

    Base: ``base.onnx`` + ``base.bin`` as stored (packed codes, scales, uncoded tensors; no
    entropy coding). Update: the fp32 difference between the original coded weights and the
    base's values, 4 bytes per weight. Also each part compressed with zstd at ``level``, and
    whether base + difference gives back the original bits in fp32 arithmetic.
    """
    from p2u_onnx.api import open_stages

    base_raw = (package / "base.onnx").read_bytes() + (package / "base.bin").read_bytes()
    base = open_stages(package, 0)
    final = open_stages(package)
    diffs, mismatched, n = [], 0, 0
    for t in base.manifest["tensors"]:
        if t["dtype"] != "float32":
            continue
        w0 = base.weight(t["name"]).astype(np.float32)
        w = final.weight(t["name"]).astype(np.float32)
        d = (w - w0).astype(np.float32)
        mismatched += int(np.count_nonzero((w0 + d).view(np.uint32) != w.view(np.uint32)))
        n += w.size
        diffs.append(d.tobytes())
    diff = b"".join(diffs)
    cz = zstandard.ZstdCompressor(level=level, threads=-1)
    return {"base_raw": len(base_raw), "update_raw": len(diff),
            "base_zstd": len(cz.compress(base_raw)), "update_zstd": len(cz.compress(diff)),
            "zstd_level": level, "coded_weights": n, "not_bit_exact": mismatched}

