"""Probe: check on the device that a stage really took effect (no silent staleness).

The encoder runs every stage of a package on deterministic synthetic inputs and stores, in
``probe.npz`` beside the manifest, those inputs and a fixed subsample of every float output per
stage (:func:`record_probe`). After each patch the runtime runs the same inputs and checks
(:meth:`Probe.check`) that every sampled output is within the stage's tolerance of the recorded
values and, where the stages are far enough apart to tell, nearer to stage ``k`` than to stage
``k - 1`` (in the L2 norm, scaled by the tolerance). Tolerances are ``max(16 x`` the spread
seen between two onnxruntime configurations (optimizations on/off, thread counts)``, 1e-4 x``
the output's largest sampled magnitude ``)`` (4e-3 for float16 outputs), so a different CPU or
thread count passes while weights from the wrong stage do not.

``probe.npz`` holds ``input_<i>`` (the user's own inputs only since format 4; synthesized ones
are made again on the device, checked against ``inputs_sha256``) and the outputs: up to
format 2 ``out_<stage>_<j>`` (float32), since format 4 one int32 array ``q`` (a row per
recorded stage, the outputs' samples side by side) of integers on a grid ``step[j]`` at most
1/8 of output ``j``'s smallest tolerance: row 0 holds ``round(y / step)`` of stage 0, row
``k`` the difference from row ``k - 1`` (the stages' outputs converge, so later rows are small
numbers). The check then allows ``tol + step / 2``. The number of samples per output
(``samples``) is sized against the package (:data:`PROBE_SHARE` of its stage bytes, at least
:data:`MIN_SAMPLES` per output, and never so few that stages that were told apart no longer
are): at most :data:`MAX_SAMPLES` evenly spread values, then ``samples[j]`` evenly spread
among those (:func:`sample`). The manifest entry (``manifest["probe"]``) names the file and
carries the tolerances::

    {"path": "probe.npz", "size": ..., "sha256": ..., "int_high": 100,
     "inputs": ["x"], "inputs_stored": true, "inputs_sha256": "...",
     "outputs": ["y"], "samples": [4096],
     "stages": [{"index": 0, "tol": [..]}, {"index": 1, "tol": [..], "gap": 35.2}, ...]}

Device side: numpy only (the runtime passes in its session's ``run``). :func:`record_probe` is
encoder side and imports onnxruntime and the package readers when called.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import IntegrityError, P2UError, PatchError

__all__ = ["MAX_SAMPLES", "PROBE_NAME", "Probe", "check_feed", "record_probe", "sample",
           "synthesize_inputs"]

PROBE_NAME = "probe.npz"
MAX_SAMPLES = 4096  # values kept per output and stage
MIN_SAMPLES = 64  # ... at least this many (or the whole output) when the probe is sized
PROBE_SHARE = 0.01  # the probe's share of the package's stage bytes it is sized for ...
PROBE_MIN_BYTES = 1024  # ... or this many bytes, whichever is more
PROBE_GRID = 8  # stored outputs (format 4) on a grid this many times finer than a tolerance
MAX_STORED_INPUT_BYTES = 4 << 20  # bigger inputs are synthesized again on the device
STORED_SYNTH_INPUT_BYTES = 64 << 10  # format 2 stored synthesized inputs up to this; 3: none
MAX_SYNTH_BYTES = 1 << 28  # ... up to this size (inputs declared bigger: no probe)
NOISE_FACTOR = 16.0  # tolerance = this x the spread seen between two configurations ...
REL_FLOOR = {"tensor(float)": 1e-4, "tensor(double)": 1e-4, "tensor(float16)": 4e-3}
SEPARABLE_GAP = 2.0  # ... and stages closer than this (tolerance-scaled L2) are not told apart
INT_RANGES = (100, 2, 1)  # integer inputs in [0, n): token ids first, then flags, then zeros

_NUMPY_TYPES: dict[str, type] = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


class ArgInfo(Protocol):
    """What the probe needs of an input or output description (onnxruntime's ``NodeArg``)."""

    name: str
    type: str
    shape: Sequence[int | str | None]


def check_feed(inputs: Sequence[ArgInfo], feed: dict[str, np.ndarray]) -> None:
    """Raise :class:`P2UError` naming what is wrong when ``feed`` does not fit the model's
    ``inputs``: a name it lacks or does not know, a wrong number of dimensions, a fixed
    dimension of another size, another element type."""
    want = {i.name: i for i in inputs}
    unknown = sorted(set(feed) - set(want))
    if unknown:
        raise P2UError(f"the model has no input {', '.join(map(repr, unknown))}; its inputs "
                       f"are {', '.join(map(repr, want))}")
    missing = [n for n in want if n not in feed]
    if missing:
        raise P2UError(f"no value given for input {', '.join(map(repr, missing))}")
    for name, info in want.items():
        a = np.asarray(feed[name])
        shape = [d if isinstance(d, int) and d >= 0 else None for d in info.shape]
        expected = "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
        if a.ndim != len(shape) or any(d is not None and d != n for d, n in zip(shape, a.shape)):
            raise P2UError(f"input {name!r} has shape {list(a.shape)}; the model expects "
                           f"{expected} (? = any size)")
        dtype = _NUMPY_TYPES.get(info.type)
        if dtype is not None and a.dtype != np.dtype(dtype):
            raise P2UError(f"input {name!r} is {a.dtype}; the model expects "
                           f"{np.dtype(dtype)} ({info.type})")


def _mix(i: np.ndarray) -> np.ndarray:
    """splitmix64 of ``i`` (uint64): the same bits on every platform and numpy version."""
    with np.errstate(over="ignore"):
        z = i * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


MAX_SYNTH_ELEMENTS = 1 << 26  # largest synthesized input a spec may ask for (per input)


def synthesize_inputs(inputs: Sequence[ArgInfo], int_high: int = 100,
                      spec: Mapping[str, Mapping[str, Any]] | None = None, *, seed: int = 0,
                      floats: str = "uniform") -> dict[str, np.ndarray]:
    """Deterministic inputs from input descriptions: what the probe and calibration run.

    ``spec`` (from :func:`p2u_onnx.calibrate.input_spec`, which reads what the graph implies:
    table sizes, consistent symbolic dimensions, image sizes) gives per input name a
    ``shape``, an exclusive upper bound ``high`` for integers and a constant ``fill`` (masks
    are ones). Without it, symbolic or unknown dimensions become 1. Floats are spread over
    [-1, 1) (``floats="normal"``: a unit normal), integers over [0, ``int_high``) or
    [0, min(``high``, ``int_high``)), booleans alternate. ``seed`` 0 gives the values earlier
    versions gave. Raises ``ValueError`` for input types it cannot make (strings, sequences,
    maps, bfloat16) and :class:`~p2u_onnx.errors.FormatError` for a spec it will not follow
    (a package's spec is untrusted: shapes are bounded).

    >>> synthesize_inputs(session.get_inputs())  # doctest: +SKIP
    """
    from .errors import FormatError

    if spec is not None and not isinstance(spec, Mapping):
        raise FormatError("probe input spec: not a mapping of input names")
    feed: dict[str, np.ndarray] = {}
    total = 0
    for j, arg in enumerate(inputs):
        dtype = _NUMPY_TYPES.get(arg.type)
        if dtype is None:
            raise ValueError(f"input {arg.name!r} of type {arg.type} cannot be synthesized")
        want = (spec or {}).get(arg.name) or {}
        if not isinstance(want, Mapping):
            raise FormatError(f"probe input spec for {arg.name!r}: not a mapping")
        shape = _spec_shape(arg, want)
        n = math.prod(shape)
        total += n * np.dtype(dtype).itemsize
        if total > MAX_SYNTH_BYTES:  # the shapes come from the package's base.onnx
            raise ValueError(f"input {arg.name!r} of shape {list(shape)} makes the probe "
                             f"inputs larger than {MAX_SYNTH_BYTES >> 20} MiB")
        bits = _mix(np.arange(n, dtype=np.uint64) + np.uint64((j + 1) << 40)
                    + np.uint64((seed & 0xFF) << 56))
        values: np.ndarray
        fill = want.get("fill")
        if isinstance(fill, (int, float)) and not isinstance(fill, bool):
            if np.issubdtype(dtype, np.integer) and not (
                    math.isfinite(fill) and np.iinfo(dtype).min <= fill <= np.iinfo(dtype).max):
                raise FormatError(f"probe input spec for {arg.name!r}: fill {fill!r} does not "
                                  f"fit its type {np.dtype(dtype).name}")
            values = np.full(n, fill, dtype)
        elif np.issubdtype(dtype, np.floating):
            unit = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
            if floats == "normal":  # Box-Muller over two halves of the bits
                u2 = ((_mix(bits) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
                values = (np.sqrt(-2.0 * np.log1p(-unit)) * np.cos(2 * np.pi * u2)).astype(dtype)
            else:
                values = (unit * 2.0 - 1.0).astype(dtype)
        elif dtype is np.bool_:
            values = (bits & np.uint64(1)).astype(np.bool_)
        else:
            high = want.get("high")
            high = int_high if not isinstance(high, int) or high < 1 else min(high, int_high)
            values = (bits % np.uint64(max(1, int(high)))).astype(dtype)
        feed[arg.name] = values.reshape(shape)
    return feed


def _spec_shape(arg: ArgInfo, want: Mapping[str, Any]) -> tuple[int, ...]:
    from .errors import FormatError

    shape = want.get("shape")
    if shape is None:
        return tuple(d if isinstance(d, int) and d >= 0 else 1 for d in (arg.shape or ()))
    if not isinstance(shape, (list, tuple)) or len(shape) > 16 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape) \
            or math.prod(shape) > MAX_SYNTH_ELEMENTS:
        raise FormatError(f"probe input spec for {arg.name!r}: bad shape {str(shape)[:80]}")
    return tuple(shape)


#: Output types whose values are read as a float tensor: a classifier's class probabilities as
#: a sequence of maps (scikit-learn exports end in ZipMap), one row per sample, classes in key
#: order.
PROBABILITY_MAPS = ("seq(map(int64,tensor(float)))", "seq(map(string,tensor(float)))")


def compared_type(out_type: str) -> str | None:
    """The tensor type an output of ``out_type`` is compared as (a float tensor type of
    :data:`REL_FLOOR`), or None when it is not compared."""
    if out_type in REL_FLOOR:
        return out_type
    return "tensor(float)" if out_type in PROBABILITY_MAPS else None


def output_values(value: Any) -> np.ndarray:
    """An output of ``session.run`` as an array: a sequence of maps (class -> probability) as
    a float64 ``(samples, classes)`` array with the classes in key order; anything else as
    ``np.asarray`` makes it."""
    if isinstance(value, list) and value and all(isinstance(d, dict) for d in value):
        keys = sorted(value[0])
        if any(sorted(d) != keys for d in value):
            raise ValueError("the maps of a sequence output have different keys")
        return np.array([[float(d[k]) for k in keys] for d in value], np.float64)
    return np.asarray(value)


def read_output(value: Any) -> Any:
    """A run's output as the comparisons read it: a sequence of class-probability maps as
    :func:`output_values` makes it, anything else (and maps it cannot read: their keys
    differ) as it is."""
    if isinstance(value, list) and value and all(isinstance(d, dict) for d in value):
        try:
            return output_values(value)
        except ValueError:
            return value
    return value


def sample(values: Any, count: int | None = None) -> np.ndarray:
    """A fixed subsample of at most :data:`MAX_SAMPLES` values (float32), spread evenly;
    with ``count``, ``count`` values spread evenly among those (a sized probe, format 4).
    ``values``: an array, or an output :func:`output_values` reads."""
    flat = output_values(values).reshape(-1)
    m = min(flat.size, MAX_SAMPLES)
    idx = np.arange(m, dtype=np.int64) * flat.size // max(m, 1)
    out = flat[idx].astype(np.float32)
    if count is not None and count < out.size:
        out = out[np.arange(max(count, 0), dtype=np.int64) * out.size // max(count, 1)]
    return out


def feed_digest(feed: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(feed):
        a = np.ascontiguousarray(feed[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


RunFn = Callable[[list[str], dict[str, np.ndarray]], Sequence[Any]]


class Probe:
    """The recorded probe of a package, ready to check a session (device side).

    ``entry`` is ``manifest["probe"]`` and ``data`` the bytes of ``probe.npz`` (checked here
    against the entry's sha256). Raises :class:`IntegrityError` when they do not match.
    """

    def __init__(self, entry: Mapping[str, Any], data: bytes,
                 inputs: Sequence[ArgInfo] | None = None):
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise IntegrityError(f"{entry.get('path', PROBE_NAME)}: sha256 does not match the "
                                 "manifest (corrupt or altered)")
        self.entry = entry
        self.outputs: list[str] = list(entry["outputs"])
        self.stages = {int(s["index"]): s for s in entry["stages"]}
        want = [f"out_{k}_{j}" for k in self.stages for j in range(len(self.outputs))]
        stored = [f"input_{i}" for i in range(len(entry["inputs"]))] \
            if entry.get("inputs_stored", True) else []
        self.step: list[float] | None = entry.get("step")  # format 4: outputs on a grid
        self.counts: list[int] | None = entry.get("samples") if self.step else None
        where = str(entry.get("path", PROBE_NAME))
        arrays = load_npz(data, (["q"] if self.step else want) + stored, where)
        self._expected = _from_grid(arrays["q"], entry, where) if self.step else \
            {k: arrays[k] for k in want}
        self.feed = {name: arrays[k] for name, k in zip(entry["inputs"], stored)}
        if not entry.get("inputs_stored", True):
            if inputs is None:
                raise IntegrityError("probe inputs are not stored; input descriptions needed")
            try:
                self.feed = synthesize_inputs(inputs, int(entry.get("int_high", 100)),
                                              entry.get("synth"))
            except ValueError as e:
                raise IntegrityError(f"probe inputs cannot be made again: {e}") from e
        if feed_digest(self.feed) != entry.get("inputs_sha256"):
            raise IntegrityError("probe inputs differ from the recorded ones (corrupt probe, "
                                 "or inputs synthesized differently)")

    def expected(self, stage: int) -> list[np.ndarray]:
        if any(f"out_{stage}_{j}" not in self._expected for j in range(len(self.outputs))):
            raise IntegrityError(f"the probe has no recorded outputs for stage {stage}")
        return [self._expected[f"out_{stage}_{j}"] for j in range(len(self.outputs))]

    def check(self, run: RunFn, stage: int) -> None:
        """Run the probe through ``run`` and raise :class:`PatchError` unless it shows ``stage``."""
        if stage not in self.stages:
            return
        tol = np.asarray(self.stages[stage]["tol"], np.float64)
        if self.step is not None:  # what the grid the outputs are stored on can be off by
            tol = tol + np.asarray(self.step, np.float64) / 2
        counts = self.counts or [None] * len(self.outputs)
        got = [sample(v, n).astype(np.float64)
               for v, n in zip(run(list(self.outputs), dict(self.feed)), counts)]
        want = [e.astype(np.float64) for e in self.expected(stage)]
        for name, g, w, t in zip(self.outputs, got, want, tol):
            if g.shape != w.shape:
                raise PatchError(f"stage {stage}: probe output {name!r} has {g.size} sampled "
                                 f"values, expected {w.size}")
            err = float(np.max(np.abs(g - w), initial=0.0))
            if not err <= t:
                raise PatchError(
                    f"stage {stage} did not take effect: probe output {name!r} is {err:.3g} "
                    f"away from the recorded stage-{stage} values (tolerance {t:.3g})")
        gap = self.stages[stage].get("gap")
        if gap is not None and gap >= SEPARABLE_GAP and stage - 1 in self.stages:
            prev = [e.astype(np.float64) for e in self.expected(stage - 1)]
            d_new = sum(float(np.sum(((g - w) / t) ** 2)) for g, w, t in zip(got, want, tol))
            d_old = sum(float(np.sum(((g - p) / t) ** 2)) for g, p, t in zip(got, prev, tol))
            if not d_new < d_old:
                raise PatchError(f"stage {stage} did not take effect: probe outputs are nearer "
                                 f"to stage {stage - 1} than to stage {stage} (stale weights)")


def _from_grid(q: np.ndarray, entry: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    """The recorded outputs (``out_<stage>_<j>``, float64) of a format-4 probe: ``q`` has a
    row per recorded stage (stage 0's integers, then differences) and the outputs' samples
    side by side; :class:`IntegrityError` unless its shape and type are what the entry says."""
    counts = [int(n) for n in entry["samples"]]
    rows = [int(s["index"]) for s in entry["stages"]]
    if q.dtype != np.dtype("<i4") or q.shape != (len(rows), sum(counts)):
        raise IntegrityError(f"{where}: array 'q' is {q.dtype} {list(q.shape)}, the manifest "
                             f"says int32 [{len(rows)}, {sum(counts)}]")
    grid = np.cumsum(q.astype(np.int64), axis=0)  # int32 rows: no overflow in int64
    out: dict[str, np.ndarray] = {}
    at = 0
    for j, (n, step) in enumerate(zip(counts, entry["step"])):
        for r, k in enumerate(rows):
            out[f"out_{k}_{j}"] = grid[r, at:at + n] * float(step)
        at += n
    return out


MAX_PROBE_BYTES = 64 << 20  # probe.npz, and the arrays read from it, at most this


def read_probe_file(root: str | os.PathLike, entry: Mapping[str, Any]) -> bytes:
    """The bytes of the probe file named by manifest entry ``entry`` in package folder
    ``root``: a plain name (:func:`~p2u_onnx.format.package_file`), a regular file, at most
    :data:`MAX_PROBE_BYTES` and never more than the entry's ``size`` (+1, to tell a longer
    file) read. Its sha256 is checked by :class:`Probe`."""
    from .format import open_regular, package_file

    size = entry.get("size")
    if not isinstance(size, int) or not 0 <= size <= MAX_PROBE_BYTES:
        raise IntegrityError(f"the probe's size {size!r} is not between 0 and "
                             f"{MAX_PROBE_BYTES} bytes")
    path = package_file(root, entry.get("path"), "probe file")
    try:
        with open_regular(path) as f:
            data = f.read(size + 1)
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read the probe ({e.strerror or e})") from e
    if len(data) != size:
        raise IntegrityError(f"{entry.get('path')}: {len(data) if len(data) <= size else 'more'}"
                             f" bytes, the manifest says {size}")
    return data


def load_npz(data: bytes, names: Sequence[str], where: str = PROBE_NAME) -> dict[str, np.ndarray]:
    """Arrays ``names`` of an ``.npz`` file (a zip of ``.npy`` files), each member's header
    read and checked before its data is decompressed: a plain numeric dtype, a shape whose
    bytes fit in what is left of :data:`MAX_PROBE_BYTES` and match the member's size. Only
    those members are read (no pickles, no other members). :class:`IntegrityError` otherwise."""
    import zipfile

    out: dict[str, np.ndarray] = {}
    budget = MAX_PROBE_BYTES
    # zipfile builds an object per member of the central directory (about 600 bytes each):
    # 64 MiB of tiny entries would take half a GB. Each entry starts with this signature, so
    # its count bounds the members (an npz holds one per array).
    members = data.count(b"PK\x01\x02")
    if members > max(4096, 2 * len(names)):
        raise IntegrityError(f"{where}: {members} zip members, far more than the "
                             f"{len(names)} arrays a probe holds")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in names:
                try:
                    info = z.getinfo(f"{name}.npy")
                except KeyError:
                    raise IntegrityError(f"{where}: has no array {name!r}") from None
                if info.file_size > budget:
                    raise IntegrityError(f"{where}: array {name!r} declares {info.file_size} "
                                         f"bytes, more than the {MAX_PROBE_BYTES} a probe may "
                                         "hold")
                with z.open(info) as f:  # reads at most info.file_size bytes
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"npy version {version}")
                    if dtype.hasobject or dtype.kind not in "biuf" or dtype.subdtype:
                        raise IntegrityError(f"{where}: array {name!r} has dtype {dtype}")
                    n = math.prod(shape) * dtype.itemsize
                    if n > budget or n != info.file_size - f.tell():
                        raise IntegrityError(f"{where}: array {name!r} of shape {shape} "
                                             f"({n} bytes) does not fit its member "
                                             f"({info.file_size} bytes) or the probe's limit")
                    raw = f.read(n)
                    if len(raw) != n:
                        raise IntegrityError(f"{where}: array {name!r} is truncated")
                budget -= n
                a = np.frombuffer(raw, dtype)
                out[name] = a.reshape(shape[::-1]).T if fortran else a.reshape(shape)
    except IntegrityError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError,
            NotImplementedError) as e:  # zipfile and numpy's header parser on bad bytes
        raise IntegrityError(f"{where}: not a valid probe file ({' '.join(str(e).split())[:200]})"
                             ) from e
    return out


# ---------------------------------------------------------------- encoder side


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _tolerance(values: np.ndarray, noise: float, out_type: str) -> float:
    scale = float(np.max(np.abs(values), initial=0.0))
    tol = max(NOISE_FACTOR * noise, REL_FLOOR[out_type] * scale)
    return tol if tol > 0 else float(np.finfo(np.float32).tiny)


def record_probe(package_dir: str | Path, manifest: dict[str, Any], *,
                 spec: Mapping[str, Mapping[str, Any]] | None = None,
                 feed: Mapping[str, np.ndarray] | None = None,
                 retry: Sequence[Mapping[str, Mapping[str, Any]]] = (),
                 why: list[str] | None = None) -> dict[str, Any] | None:
    """Record ``probe.npz`` in ``package_dir``; returns the manifest entry, or None.

    Runs every stage in onnxruntime (CPU, default options; stage 0 with exact low-bit MatMuls)
    on the first inputs the base runs on with finite outputs: ``feed`` (the user's), then
    :func:`synthesize_inputs` with ``spec`` (what the graph implies), with each ``retry`` spec
    (other image sizes), then without a spec; and each
    later stage once more with optimizations off, one thread and no prepacking to measure how
    much results move between configurations. Returns None when the model cannot be probed
    (unsupported input types, no float outputs, a failure on every input tried, non-finite
    outputs), and appends the reason to ``why``.
    """
    import shutil
    import tempfile

    import onnxruntime as ort

    from ._memory import trim_heap
    from .format import atomic_write_bytes, read_stage, sha256_file
    from .reconstruct import WeightState, extract_file

    def fail(reason: str) -> None:
        if why is not None:
            why.append(reason)

    pkg = Path(package_dir)
    providers = ["CPUExecutionProvider"]
    exact = ort.SessionOptions()
    exact.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    exact.log_severity_level = 4  # failures on the inputs tried are expected: the note says
    default = ort.SessionOptions()
    default.log_severity_level = 4  # a model's own shape warnings, once per run: not ours
    plain = ort.SessionOptions()
    plain.log_severity_level = 4
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain.intra_op_num_threads = 1
    plain.add_session_config_entry("session.disable_prepacking", "1")

    try:
        base = ort.InferenceSession(str(pkg / "base.onnx"), exact, providers=providers)
    except Exception as e:  # noqa: BLE001 - any failure means: cannot probe
        return fail(f"base.onnx does not load in onnxruntime ({_first_line(e)})")
    outs = [o for o in base.get_outputs() if compared_type(o.type)]
    if not outs:
        return fail("the model has no float output to compare")
    names = [o.name for o in outs]
    types = [compared_type(o.type) for o in outs]

    args = base.get_inputs()
    tries: list[tuple[str, int, Any]] = []
    if feed is not None:
        given = dict(feed)
        if sum(np.asarray(v).nbytes for v in given.values()) > MAX_STORED_INPUT_BYTES:
            given = {k: v[:1] if np.ndim(v) else v for k, v in given.items()}  # one row
        if sum(np.asarray(v).nbytes for v in given.values()) <= MAX_STORED_INPUT_BYTES:
            tries.append(("given", INT_RANGES[0], given))
    for label, sp in [("spec", spec)] + [("spec", r) for r in retry] + [("plain", None)]:
        if label == "spec" and not sp:
            continue
        tries += [(label, high, sp) for high in INT_RANGES]
    chosen: dict[str, np.ndarray] | None = None
    used = ("plain", INT_RANGES[0])
    first: list[np.ndarray] = []
    last = "no inputs to try"
    for label, int_high, how in tries:
        try:
            candidate = how if label == "given" else synthesize_inputs(args, int_high, how)
        except ValueError as e:
            return fail(f"cannot synthesize the inputs ({_first_line(e)})")
        try:
            outputs = base.run(names, candidate)
        except Exception as e:  # noqa: BLE001 - fails on these inputs: try the next ones
            last = f"the base fails on {'the given' if label == 'given' else 'synthesized'} " \
                   f"inputs ({_first_line(e)})"
            continue
        try:
            first = [sample(v) for v in outputs]
        except ValueError as e:  # outputs the probe cannot read (maps of different classes)
            return fail(f"the outputs cannot be compared ({_first_line(e)})")
        if all(np.all(np.isfinite(v)) for v in first):
            chosen, used = candidate, (label, int_high)
            spec = how if label == "spec" else spec
            break
        last = "the outputs are not finite on the inputs tried"
    if chosen is None:
        return fail(last)
    feed = chosen
    int_high = used[1]
    del base

    samples: list[list[np.ndarray]] = [first]
    tols: list[list[float]] = [[_tolerance(v, 0.0, t) for v, t in zip(first, types)]]
    try:
        # each stage streams into its own weights.bin (file-backed state: one tensor in memory)
        state = WeightState(manifest, pkg / "base.bin")
        graph: bytes | None = None
        previous: Path | None = None
        with tempfile.TemporaryDirectory(prefix="p2u-probe-") as tmp:
            for k in range(1, len(manifest["stages"])):
                f = manifest["stages"][k]["files"][0]
                sf = read_stage(pkg / f["path"], package_id=manifest["package_id"], stage=k,
                                sha256=f["sha256"])
                if graph is None:
                    graph = extract_file(sf, "graph.onnx",
                                         ref=(pkg / "base.onnx").read_bytes())
                d = Path(tmp) / f"stage-{k}"
                d.mkdir()
                state.advance(sf, d / "weights.bin")
                if previous is not None:
                    shutil.rmtree(previous, ignore_errors=True)
                previous = d
                (d / "graph.onnx").write_bytes(graph)
                try:
                    os.link(pkg / "base.bin", d / "base.bin")
                except OSError:
                    shutil.copyfile(pkg / "base.bin", d / "base.bin")
                model = d / "graph.onnx"
                trim_heap()  # decoding's temporaries
                a = ort.InferenceSession(str(model), default, providers=providers)
                ya = [sample(v) for v in a.run(names, feed)]
                del a
                trim_heap()
                b = ort.InferenceSession(str(model), plain, providers=providers)
                yb = [sample(v) for v in b.run(names, feed)]
                del b
                trim_heap()
                if not all(np.all(np.isfinite(v)) for v in ya + yb):
                    return fail(f"stage {k} gives non-finite outputs on the probe inputs")
                samples.append(ya)
                tols.append([_tolerance(x, float(np.max(np.abs(x - y), initial=0.0)), t)
                             for x, y, t in zip(ya, yb, types)])
    except Exception as e:  # noqa: BLE001 - any failure means: cannot probe
        return fail(f"a later stage fails on the probe inputs ({_first_line(e)})")

    # Synthesized inputs are made again on the device (deterministic, exact arithmetic), so
    # only the user's own inputs ride in probe.npz: stored synthesized inputs were most of some
    # packages (a 534 KB probe beside 1.1 MB of stages, 256 B of a 1.2 KB one)
    stored = used[0] == "given"
    input_names = list(feed)
    inputs = {f"input_{i}": feed[n] for i, n in enumerate(input_names)} if stored else {}
    stage_bytes = int(manifest["stages"][-1].get("cumulative_bytes") or 0)
    counts, step, q, gaps = _sized_outputs(samples, tols, inputs, stage_bytes)
    buf = io.BytesIO()
    np.savez_compressed(buf, q=q, **inputs)  # type: ignore[arg-type]
    path = pkg / PROBE_NAME
    atomic_write_bytes(path, buf.getvalue())

    stages: list[dict[str, Any]] = []
    for k in range(len(samples)):
        st: dict[str, Any] = {"index": k, "tol": tols[k]}
        if k:
            st["gap"] = gaps[k - 1]
        stages.append(st)
    return {
        "path": PROBE_NAME, "size": path.stat().st_size, "sha256": sha256_file(path),
        "int_high": int_high, "inputs": input_names, "inputs_stored": stored,
        **({"synth": {k: dict(v) for k, v in spec.items()}}
           if used[0] == "spec" and spec and not stored else {}),
        "inputs_sha256": feed_digest(feed), "outputs": names,
        "samples": counts, "step": step, "stages": stages,
    }


def _gaps(ys: list[list[np.ndarray]], tols: list[list[float]]) -> list[float]:
    """Per later stage, the tolerance-scaled L2 distance of its outputs from the stage before."""
    return [math.sqrt(sum(float(np.sum(((a.astype(np.float64) - b) / t) ** 2))
                          for a, b, t in zip(ys[k], ys[k - 1], tols[k])))
            for k in range(1, len(ys))]


def _sized_outputs(samples: list[list[np.ndarray]], tols: list[list[float]],
                   inputs: dict[str, np.ndarray], stage_bytes: int
                   ) -> tuple[list[int], list[float], np.ndarray, list[float]]:
    """How the outputs are stored (format 4): (samples per output, grid step per output, the
    int32 array ``q``, the gaps between stages on those samples).

    The most samples (4096, 2048, ... down to :data:`MIN_SAMPLES` per output) whose probe
    fits in :data:`PROBE_SHARE` of the package's stage bytes (at least
    :data:`PROBE_MIN_BYTES`), but never fewer than keep every pair of stages that the full
    samples tell apart (gap >= :data:`SEPARABLE_GAP`) told apart.
    """
    n_out = len(samples[0])
    # 1/PROBE_GRID of the smallest tolerance, but coarse enough for int32 (a tolerance can be
    # the float32 floor on an all-zero output)
    step = [max(min(t[j] for t in tols) / PROBE_GRID,
                max(float(np.max(np.abs(row[j]), initial=0.0)) for row in samples) / 2**29,
                float(np.finfo(np.float32).tiny)) for j in range(n_out)]
    full = [int(v.size) for v in samples[0]]
    budget = max(PROBE_MIN_BYTES, int(PROBE_SHARE * stage_bytes))
    separable = [g >= SEPARABLE_GAP for g in _gaps(samples, tols)]
    best = None
    m = MAX_SAMPLES
    while True:
        counts = [min(n, max(m, MIN_SAMPLES)) for n in full]
        ys = [[sample(v, c) for v, c in zip(row, counts)] for row in samples]
        gaps = _gaps(ys, tols)
        if best is not None and any(s and g < SEPARABLE_GAP for s, g in zip(separable, gaps)):
            break  # fewer samples would no longer tell two stages apart: keep the last size
        grid = np.array([np.concatenate([np.rint(y.astype(np.float64) / s)
                                         for y, s in zip(row, step)]) for row in ys])
        q = np.diff(grid, axis=0, prepend=0).astype("<i4") if grid.size else \
            np.zeros(grid.shape, "<i4")
        buf = io.BytesIO()
        np.savez_compressed(buf, q=q, **inputs)  # type: ignore[arg-type]
        best = (counts, step, q, gaps)
        if buf.tell() <= budget or m <= MIN_SAMPLES:
            break
        m //= 2
    return best
