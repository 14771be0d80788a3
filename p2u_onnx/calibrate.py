"""Calibration: how much each coded weight matters to the model's outputs (encoder side).

Without data, inputs are synthesized from the model's input signature (token ids drawn below the
size of the table they index, masks set to one, images and other floats from a unit normal);
with ``--calib inputs.npz`` the user's real inputs are used instead.

:class:`Calibration` runs the model in onnxruntime with the coded main-graph weights turned into
graph inputs, so trying a quantized weight costs one forward pass and no new session. It yields

* ``importance[key]``: the mean square of the activation each weight multiplies, per input
  channel, broadcastable to the weight's shape (MatMul, Gemm, Conv); the quantizer weights its
  error by it;
* ``output_error({key: weight})``: the error of the model's float outputs when those weights
  are replaced, against the original outputs, as each output's task reads it
  (:mod:`p2u_onnx.output_metrics`: top-1 agreement of class scores, decisions of probabilities
  and masks, regression heads against their spread, cosine of the rest), scaled so that the
  target error (``2 * (1 - quality)``) is where every output just reaches its target;
* ``estimate(errors)`` and ``measure({key: weight})``: each output's estimated and measured
  quality in its own metric.

Anything that cannot be measured (a model that fails on synthetic inputs, weights inside
subgraphs or functions) gets no entry; callers fall back to weight-only estimates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper

from .config import DEFAULT_QUALITY
from .errors import P2UError
from .graph import Consumer, consumers_by_name
from .output_metrics import DEFAULT_TARGETS, OutputCheck, checks_for, target_error
from .probe import read_output

__all__ = ["Calibration", "synthesize_feeds", "load_feeds", "input_spec", "probe_inputs"]

_DEFAULT_DIMS = {"batch": 4, "seq": 32, "spatial": 64}
_MAX_ACTIVATION_SAMPLES = 1 << 16  # rows of an activation kept for its statistics
# A regression output's spread is measured over at least MIN_SAMPLES inputs, class scores'
# margins and decisions over MIN_ROWS rows: more feeds are synthesized for them, up to
# MAX_EXTRA_FEEDS, or MAX_EXTRA_LARGE when a feed holds more than LARGE_FEED bytes (images,
# audio: every calibration run goes over all feeds). A count, not a time: the same model
# always gets the same bits
MIN_SAMPLES = 8
MIN_ROWS = 64
MAX_EXTRA_FEEDS = 15
MAX_EXTRA_LARGE = 3
LARGE_FEED = 1 << 20


def _np_type(elem: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))


_SHAPE_PASS = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}
_WINDOWED = {"Conv", "ConvInteger", "MaxPool", "AveragePool", "LpPool"}
_MAX_SPATIAL = 1024


def _index_limit(model: ModelProto, name: str) -> int | None:
    """If input ``name`` indexes tables (Gather data; through casts and reshapes), the number
    of rows every one of them has (the smallest)."""
    g = model.graph
    tables = {t.name: list(t.dims) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    tables[n.output[0]] = list(a.t.dims)
    users: dict[str, list[NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    limit, todo, seen = None, [name], set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        for n in users.get(v, []):
            if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == v:
                dims = tables.get(n.input[0])
                if dims:
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                    rows = int(dims[axis % len(dims)])
                    limit = rows if limit is None else min(limit, rows)
            elif n.op_type in _SHAPE_PASS and n.input and n.input[0] == v:
                todo.extend(n.output)
    return limit


def _spatial_size(model: ModelProto, starts: Sequence[str], default: int) -> int:
    """A size for the symbolic spatial dimensions of the inputs ``starts`` that the graph can
    run on: at least ``default``, at least what every window (Conv and pooling kernels, after
    the strides before them, less the pads) needs, and a multiple of the largest product of
    strides (so that upsampled maps match their skip connections)."""
    g = model.graph
    dims = {t.name: list(t.dims) for t in g.initializer}
    factor = {n: 1 for n in starts}
    need, biggest = default, 1
    for node in g.node:
        f = max((factor[i] for i in node.input if i in factor), default=None)
        if f is None:
            continue
        out = f
        if node.op_type in _WINDOWED:
            at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            kernel = list(at.get("kernel_shape") or [])
            if not kernel and node.op_type in ("Conv", "ConvInteger") and len(node.input) > 1:
                kernel = dims.get(node.input[1], [])[2:]
            dil = list(at.get("dilations") or [1] * len(kernel))
            pads = list(at.get("pads") or [0] * (2 * len(kernel)))
            auto = at.get("auto_pad", b"NOTSET")
            auto = auto.decode() if isinstance(auto, bytes) else str(auto)
            for i, k in enumerate(kernel):
                span = (int(k) - 1) * int(dil[i] if i < len(dil) else 1) + 1
                pad = 0
                if not auto.startswith("SAME") and len(pads) >= 2 * len(kernel):
                    pad = int(pads[i]) + int(pads[i + len(kernel)])
                elif auto.startswith("SAME"):
                    pad = span - 1
                need = max(need, f * max(span - pad, 1))
            strides = [int(x) for x in at.get("strides") or [1]]
            out = f * max(strides)
        for o in node.output:
            factor[o] = max(factor.get(o, 1), out)
        biggest = max(biggest, out)
    step = min(biggest, 256)
    size = -(-need // step) * step
    return int(min(size, max(_MAX_SPATIAL, step)))


# image sizes tried when the implied one does not run: square ones (classifiers, detectors),
# then text lines (recognizers whose height the graph does not fix: 48 or 32 rows)
RETRY_SPATIAL: tuple[int | tuple[int, int], ...] = (224, 640, (48, 320), (32, 320))
# sequence lengths tried when the default one does not run (an exporter may have fixed the
# length of its example input in a Reshape: 16 and 8 are common example lengths)
RETRY_SEQ = (16, 8, 128)


def input_spec(model: ModelProto, shapes: Mapping[str, Sequence[int]] | Sequence = (),
               batch: int = 1, spatial: int | tuple[int, int] | None = None,
               seq: int | None = None) -> dict[str, dict[str, Any]]:
    """What :func:`p2u_onnx.probe.synthesize_inputs` needs to make inputs the graph runs on.

    Per graph input (initializers excluded): ``shape`` (symbolic dimensions resolved, one size
    per symbol across all inputs: the first dimension ``batch``, the other dimensions of float
    inputs of rank 3 or more a spatial size the graph's windows and strides accept, others
    :data:`_DEFAULT_DIMS` ``seq``); ``high`` for integer inputs that index tables (below the
    rows of every table they index); ``fill`` 1 for masks and booleans, 0 for token-type and
    position ids. ``shapes`` (``--shape``) fixes inputs' shapes, and with them their symbols;
    ``spatial`` replaces the implied spatial size (a retry: :data:`RETRY_SPATIAL`; a pair
    ``(h, w)`` gives an image's first open size ``h`` and the others ``w``), ``seq`` the
    ``seq`` size (a retry: :data:`RETRY_SEQ`).
    Raises :class:`P2UError` for an input that is not a tensor or a ``shapes`` entry that does
    not fit the model.
    """
    g = model.graph
    init = {t.name for t in g.initializer}
    inputs = [vi for vi in g.input if vi.name not in init]
    given = {str(k): tuple(int(d) for d in v) for k, v in dict(shapes).items()}
    names = [vi.name for vi in inputs]
    for k in given:
        if k not in names:
            raise P2UError(f"--shape {k}: the model has no input {k!r}; its inputs are "
                           f"{', '.join(map(repr, names))}")
    sym: dict[str, int] = {}
    for vi in inputs:
        if not vi.type.HasField("tensor_type"):
            raise P2UError(f"input {vi.name!r} is not a tensor; pass --inputs inputs.npz")
        if vi.name not in given:
            continue
        want = given[vi.name]
        dims = list(vi.type.tensor_type.shape.dim)
        if vi.type.tensor_type.HasField("shape") and len(dims) != len(want):
            raise P2UError(f"--shape {vi.name}: {len(want)} dimensions given, the model's input "
                           f"has {len(dims)}")
        for d, n in zip(dims, want):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != n:
                raise P2UError(f"--shape {vi.name}: size {n} where the model fixes "
                               f"{d.dim_value}")
            if d.HasField("dim_param") and d.dim_param:
                if sym.setdefault(d.dim_param, n) != n:
                    raise P2UError(f"--shape: dimension {d.dim_param!r} is given two sizes, "
                                   f"{sym[d.dim_param]} and {n}")
    images = [vi.name for vi in inputs
              if _np_type(vi.type.tensor_type.elem_type).kind == "f"
              and len(vi.type.tensor_type.shape.dim) >= 3]
    if images and spatial is None:
        spatial = _spatial_size(model, images, _DEFAULT_DIMS["spatial"])
    spec: dict[str, dict[str, Any]] = {}
    # images first: a symbol they share with other inputs gets the spatial size
    for vi in sorted(inputs, key=lambda v: v.name not in images):
        tt = vi.type.tensor_type
        dtype = _np_type(tt.elem_type)
        if vi.name in given:
            shape = list(given[vi.name])
        else:
            shape = []
            hw = spatial if isinstance(spatial, tuple) else (spatial, spatial)
            open_dims = 0  # of this image, after the batch
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(int(d.dim_value))
                    continue
                if d.HasField("dim_param") and d.dim_param in sym:
                    shape.append(sym[d.dim_param])
                    continue
                if i and vi.name in images:
                    size = hw[0] if not open_dims else hw[1]
                    open_dims += 1
                else:
                    size = batch if i == 0 else seq if seq is not None else _DEFAULT_DIMS["seq"]
                if d.HasField("dim_param") and d.dim_param:
                    sym[d.dim_param] = size
                shape.append(size)
        entry: dict[str, Any] = {"shape": shape}
        lname = vi.name.lower()
        if dtype.kind == "b" or (dtype.kind in "iu" and "mask" in lname):
            entry["fill"] = 1
        elif dtype.kind in "iu" and ("type" in lname or "segment" in lname
                                     or "position" in lname):
            entry["fill"] = 0
        elif dtype.kind in "iu":
            limit = _index_limit(model, vi.name)
            if limit:
                entry["high"] = int(limit)
            elif dtype.itemsize == 1 or "byte" in lname:
                entry["high"] = 256 if dtype.kind == "u" else 128
        spec[vi.name] = entry
    return {name: spec[name] for name in names}


class _Arg:
    """An input description as :func:`p2u_onnx.probe.synthesize_inputs` reads it."""

    def __init__(self, name: str, type: str, shape: list | None):
        self.name, self.type, self.shape = name, type, shape  # None: rank unknown


def input_args(model: ModelProto) -> list[_Arg]:
    """The model's graph inputs (initializers excluded) as onnxruntime describes them."""
    from .probe import _NUMPY_TYPES

    by_dtype = {np.dtype(v): k for k, v in _NUMPY_TYPES.items()}
    init = {t.name for t in model.graph.initializer}
    args = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        kind = "non-tensor"
        if vi.type.HasField("tensor_type"):
            try:
                kind = by_dtype.get(_np_type(tt.elem_type), f"tensor(type {tt.elem_type})")
            except Exception:  # noqa: BLE001 - a type numpy has no dtype for
                kind = f"tensor(type {tt.elem_type})"
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in tt.shape.dim] if tt.HasField("shape") else None
        args.append(_Arg(vi.name, kind, shape))
    return args


def _open_sizes(model: ModelProto, shapes: Mapping[str, Sequence[int]] | Sequence = ()
                ) -> tuple[bool, bool]:
    """(an image has a spatial size left to guess, another input has a size after its first
    left to guess): images are float inputs of rank 3 or more; ``shapes`` fixes inputs."""
    given = dict(shapes)
    init = {t.name for t in model.graph.initializer}
    images = sequences = False
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        if vi.name in init or vi.name in given or not vi.type.HasField("tensor_type"):
            continue
        open_dims = any(not (d.HasField("dim_value") and d.dim_value > 0)
                        for d in tt.shape.dim[1:])
        if len(tt.shape.dim) >= 3 and _np_type(tt.elem_type).kind == "f":
            images |= open_dims
        else:
            sequences |= open_dims
    return images, sequences


def has_open_images(model: ModelProto, shapes: Mapping[str, Sequence[int]] | Sequence = ()
                    ) -> bool:
    """Whether some float input of rank 3 or more has a spatial size left to guess."""
    return _open_sizes(model, shapes)[0]


def has_open_sequences(model: ModelProto, shapes: Mapping[str, Sequence[int]] | Sequence = ()
                       ) -> bool:
    """Whether some input that is not an image has a size after its first one left to guess
    (a sequence length)."""
    return _open_sizes(model, shapes)[1]


def retry_sizes(model: ModelProto, shapes: Mapping[str, Sequence[int]] | Sequence = ()
                ) -> list[dict[str, Any]]:
    """Keyword arguments of :func:`input_spec` / :func:`synthesize_feeds` to try, in order,
    when the sizes first implied do not run: other image sizes, other sequence lengths."""
    images, sequences = _open_sizes(model, shapes)
    return [{"spatial": s} for s in RETRY_SPATIAL] * images + \
        [{"seq": s} for s in RETRY_SEQ] * sequences


def fallback_sizes(model: ModelProto, shapes: Mapping[str, Sequence[int]] | Sequence = (),
                   large_images: bool = True) -> list[dict[str, Any]]:
    """What calibration and ``p2u eval --synth`` try, in order, when the sizes first implied do
    not run: :func:`retry_sizes` (without 640x640 images unless ``large_images``), then one
    sample at a time, then one sample at the first retry size."""
    sizes = [r for r in retry_sizes(model, shapes) if large_images or r.get("spatial") != 640]
    return sizes + [{"batch": 1}] + [{**r, "batch": 1} for r in sizes[:1]]


def synthesize_feeds(model: ModelProto, batches: int = 1, seed: int = 0,
                     shapes: Mapping[str, Sequence[int]] | Sequence = (),
                     spatial: int | tuple[int, int] | None = None, seq: int | None = None,
                     batch: int | None = None) -> list[dict[str, np.ndarray]]:
    """Deterministic inputs from the input signature and what the graph implies (see
    :func:`input_spec`; batch :data:`_DEFAULT_DIMS` ``batch`` unless given), made by the
    probe's :func:`p2u_onnx.probe.synthesize_inputs` with unit-normal floats."""
    from .probe import synthesize_inputs

    spec = input_spec(model, shapes, batch=batch or _DEFAULT_DIMS["batch"], spatial=spatial,
                      seq=seq)
    args = input_args(model)
    try:
        return [synthesize_inputs(args, 100, spec, seed=seed + b, floats="normal")
                for b in range(batches)]
    except ValueError as e:
        raise P2UError(f"{e}; pass --inputs inputs.npz") from None


def probe_inputs(model: ModelProto, calib: str | None,
                 shapes: Mapping[str, Sequence[int]] | Sequence = ()) -> dict[str, Any]:
    """Keyword arguments for :func:`p2u_onnx.probe.record_probe`: the input spec (batch 1) and
    the first batch of the user's inputs, if any. Raises :class:`P2UError` for bad ``shapes``
    or ``calib``."""
    out: dict[str, Any] = {}
    try:
        out["spec"] = input_spec(model, shapes, batch=1)
        retry = retry_sizes(model, shapes)
        if retry:
            out["retry"] = [input_spec(model, shapes, batch=1, **r) for r in retry]
    except P2UError:
        if shapes:
            raise
    if calib:
        out["feed"] = load_feeds(calib, model)[0]
    return out


def check_npz_file(path: str | Path) -> Path:
    """``path`` if it starts like an .npz (a zip); else :class:`P2UError`, one line saying
    what it is instead (a lone .npy, anything else) and what is expected."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise P2UError(f"{p}: cannot read the inputs ({e.strerror or e})") from None
    if not magic.startswith(b"PK\x03\x04"):
        what = "a single .npy array" if magic.startswith(b"\x93NUMPY") else "not an .npz file"
        raise P2UError(f"{p}: {what}; expected an .npz with one array per model input "
                       "(numpy.savez(path, input_name=array, ...))")
    return p


def load_feeds(path: str | Path, model: ModelProto) -> list[dict[str, np.ndarray]]:
    """Inputs from an .npz: keys are input names; arrays with a leading batch axis (the length
    of the first input's) are split into batches of 8 along it. Raises :class:`P2UError` with
    one line for a file that is not an .npz of arrays fitting the model's inputs."""
    from .probe import check_feed

    p = check_npz_file(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - a damaged zip, object arrays...
        text = str(e).strip().splitlines()
        raise P2UError(f"{p}: cannot read the inputs "
                       f"({text[0][:200] if text else type(e).__name__})") from None
    args = input_args(model)
    names = [a.name for a in args]
    missing = [n for n in names if n not in data]
    if missing:
        raise P2UError(f"{p}: no array for input(s) {', '.join(missing)} (it holds "
                       f"{', '.join(sorted(data)) or 'nothing'})")
    data = {n: data[n] for n in names}
    for a in args:  # an input of unknown rank takes any
        if a.shape is None:
            a.shape = [None] * np.ndim(data[a.name])
    try:
        check_feed(args, data)
    except P2UError as e:
        raise P2UError(f"{p}: {e}") from None
    n = len(data[names[0]]) if names and np.ndim(data[names[0]]) else 1
    if n == 0:
        raise P2UError(f"{p}: the arrays hold no rows")
    split = [k for k in names if np.ndim(data[k]) and len(data[k]) == n]
    return [{k: data[k][i:i + 8] if k in split else data[k] for k in names}
            for i in range(0, n, 8)]


def _activation_input(c: Consumer) -> tuple[str, str] | None:
    """(activation name, op kind) for a weight consumed as MatMul/Gemm B or Conv W."""
    op, i = c.node.op_type, c.input_index
    if op in ("MatMul", "Gemm") and i == 1:
        return c.node.input[0], op
    if op == "Conv" and i == 1:
        return c.node.input[0], op
    return None


@dataclasses.dataclass
class Calibration:
    """Measurements on one model with a set of coded main-graph weights (see module doc)."""

    importance: dict[str, np.ndarray]
    measurable: set[str]
    _session: Any
    _weights: dict[str, np.ndarray]
    _feeds: list[dict[str, np.ndarray]]
    _reference: list[list[np.ndarray]]
    _outputs: list[str]
    checks: list[OutputCheck]  # how each output (or column) is read, with its target
    _weight: np.ndarray  # per check: target error unit / the check's error at its target
    _bf16: frozenset = frozenset()  # keys of bfloat16 weights: fed as float32, Cast in-graph
    extra_feeds: int = 0  # feeds synthesized beyond the first, for regression outputs' spread
    empty: list = dataclasses.field(default_factory=list)  # float outputs with no finite value

    def _feed(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _weight_feed(weights, self._bf16)

    @classmethod
    def build(cls, model: ModelProto, weights: Mapping[str, np.ndarray],
              feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
              why: list[str] | None = None, *, quality: float | None = None,
              more_feeds: Callable[[int], Mapping[str, np.ndarray]] | None = None,
              ) -> Calibration | None:
        """Prepare; returns None when the model does not run on the inputs (and appends the
        reason to ``why``).

        ``weights`` maps slot keys of main-graph initializers to their values in storage
        dtype (bfloat16 as uint16 bits: fed as float32 and cast to bfloat16 in the graph, since
        numpy has no bfloat16). ``quality``: the target of every output (None: each kind's
        default, :data:`~p2u_onnx.output_metrics.DEFAULT_TARGETS`). ``more_feeds(i)`` makes
        the i-th extra feed (synthesized inputs) when a regression output has fewer than
        :data:`MIN_SAMPLES` values to measure its spread on.
        """
        def fail(reason: str) -> None:
            if why is not None:
                why.append(reason)

        import onnxruntime as ort

        # The caller has taken the weights' bytes out of ``model`` (see encoder): this copy is
        # the graph structure plus the small tensors only.
        m = ModelProto()
        m.CopyFrom(model)
        g = m.graph
        names = set(weights)
        keep = [t for t in g.initializer if t.name not in names]
        moved = [t for t in g.initializer if t.name in names]
        del g.initializer[:]
        g.initializer.extend(keep)
        bf16 = frozenset(t.name for t in moved if t.data_type == TensorProto.BFLOAT16)
        if bf16:
            keep_in = [vi for vi in g.input if vi.name not in bf16]
            del g.input[:]
            g.input.extend(keep_in)
            casts = [helper.make_node("Cast", [_bf16_input(n)], [n], to=TensorProto.BFLOAT16,
                                      name=f"{n}__p2u_cast") for n in sorted(bf16)]
            old = list(g.node)
            del g.node[:]
            g.node.extend(casts + old)
        inputs_now = {vi.name for vi in g.input}
        for t in moved:
            if t.name in bf16:
                g.input.append(helper.make_tensor_value_info(_bf16_input(t.name),
                                                             TensorProto.FLOAT, list(t.dims)))
            elif t.name not in inputs_now:
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        users = consumers_by_name(m).get(id(g), {})
        acts: dict[str, tuple[str, str, Consumer]] = {}
        for key in names - bf16:  # a weight read as bfloat16 itself: no activation statistics
            for c in users.get(key, []):
                a = _activation_input(c)
                if a and c.node in g.node:
                    acts[key] = (a[0], a[1], c)
                    break
        outputs = [o.name for o in g.output]
        extra = sorted({a for a, _, _ in acts.values()} - set(outputs) - set(weights))
        # an activation multiplied by a weight has the weight's type (MatMul, Gemm, Conv)
        act_type = {a: weights[k].dtype for k, (a, _, _) in acts.items()}
        for name in extra:
            elem = helper.np_dtype_to_tensor_dtype(act_type[name])
            g.output.append(helper.make_tensor_value_info(name, elem, None))
        if feeds is None:
            try:
                feeds = synthesize_feeds(model)
            except P2UError as e:
                return fail(str(e))
        feeds = list(feeds)
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 4  # a failure is reported in a note, not on stderr
            sess = ort.InferenceSession(m.SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])
            fetch = outputs + extra
            fed = _weight_feed(weights, bf16)
            runs = [_values(sess.run(fetch, {**f, **fed})) for f in feeds]
        except Exception as e:  # the model does not run on these inputs: no calibration
            text = str(e).strip().splitlines()
            return fail(f"the model fails on them ({text[0][:200] if text else type(e).__name__})")
        float_out = [i for i, o in enumerate(outputs)
                     if all(np.issubdtype(np.asarray(r[i]).dtype, np.floating) for r in runs)]
        if not float_out:
            return fail("the model has no float output to compare")
        producer = {o: n for n in g.node for o in n.output}
        batched = _batched_outputs(model, [outputs[i] for i in float_out])
        added = 0

        def read(runs: list) -> list[OutputCheck]:
            return [c for j, i in enumerate(float_out) for c in checks_for(
                outputs[i], j, [np.asarray(r[i], np.float64) for r in runs], producer,
                batched[j]) if c.count]  # an empty output (no finite value) says nothing

        checks = read(runs)
        # a regression head's spread and class margins need several inputs: more synthesized
        # feeds if few, fewer when feeds are large
        size = sum(np.asarray(v).nbytes for v in feeds[0].values())
        limit = MAX_EXTRA_LARGE if size > LARGE_FEED else MAX_EXTRA_FEEDS
        while more_feeds is not None and added < limit and any(
                c.kind == "regression" and c.count < MIN_SAMPLES or
                c.kind in ("classes", "decisions") and c.sampled.size < MIN_ROWS
                for c in checks):
            try:
                f = more_feeds(added + 1)
                r = _values(sess.run(fetch, {**f, **fed}))
            except Exception:  # noqa: BLE001 - keep what was measured
                break
            feeds.append(f)
            runs.append(r)
            added += 1
            checks = read(runs)
        importance = {}
        for key, (aname, op, c) in acts.items():
            idx = fetch.index(aname)
            stat = _channel_power([r[idx] for r in runs], op)
            imp = _broadcast_importance(stat, op, c, tuple(weights[key].shape))
            if imp is not None:
                importance[key] = imp
        reference = [[np.asarray(r[i], np.float64) for i in float_out] for r in runs]
        if not checks:
            return fail("no output has a finite value on them")
        empty = [outputs[i] for j, i in enumerate(float_out)
                 if not any(c.index == j for c in checks)]
        unit = 2 * (1 - (quality if quality is not None else DEFAULT_QUALITY))
        # a recurrent state passed back (an output shaped as a float input: LSTM h and c) is
        # read through the next call's task outputs: held to the agreement target, not 0.995
        shapes = {np.asarray(v).shape for v in feeds[0].values()
                  if np.asarray(v).dtype.kind == "f" and np.ndim(v) >= 2}
        for c in checks:
            c.target = quality if quality is not None else DEFAULT_TARGETS[c.kind]
            if quality is None and c.kind == "cosine" and c.column is None and \
                    np.shape(runs[0][float_out[c.index]]) in shapes:
                c.target = DEFAULT_QUALITY
        cos_target = quality if quality is not None else DEFAULT_TARGETS["cosine"]
        weight = np.array([unit / target_error(c, c.target, cos_target) for c in checks])
        return cls(importance, names, sess, fed, feeds, reference,
                   [outputs[i] for i in float_out], checks, weight, bf16, added, empty)

    def _run(self, overrides: Mapping[str, np.ndarray]) -> list[list[np.ndarray]]:
        return [[np.asarray(v, np.float64) for v in _values(self._session.run(
            self._outputs, {**feed, **self._weights, **self._feed(overrides)}))]
            for feed in self._feeds]

    def output_errors(self, overrides: Mapping[str, np.ndarray],
                      runs: list[list[np.ndarray]] | None = None) -> np.ndarray:
        """Normalized squared error of each check (:class:`OutputCheck`) with ``overrides``
        in place (a non-finite value where the original is finite counts as a large error)."""
        runs = self._run(overrides) if runs is None else runs
        num = np.zeros(len(self.checks))
        for got, ref in zip(runs, self._reference):
            for i, c in enumerate(self.checks):
                g, r = c.part(got[c.index]), c.part(ref[c.index])
                fin = np.isfinite(r)
                diff = np.where(fin & np.isfinite(g), g - r, np.where(fin, np.abs(r) + 1, 0))
                num[i] += float(np.sum(diff * diff))
        return num / np.array([c.den for c in self.checks])

    def output_error(self, overrides: Mapping[str, np.ndarray]) -> float:
        """The worst check's error with ``overrides`` in place, weighted so that the target
        error unit (``2 * (1 - quality)``) is where it just reaches its target: a small output
        that matters (a probability beside large recurrent states) is not drowned out."""
        errs = self._weight * self.output_errors(overrides)
        return float(errs.max()) if len(errs) else 0.0

    def estimate(self, errors: Sequence[float]) -> list[float]:
        """Each check's estimated quality for its (normalized) errors."""
        return [c.quality(e) for c, e in zip(self.checks, errors)]

    def measure(self, overrides: Mapping[str, np.ndarray]) -> tuple[list[float], np.ndarray]:
        """Each check's quality, measured on the calibration inputs with ``overrides`` in
        place, and its normalized squared error."""
        runs = self._run(overrides)
        measured = [c.measure([r[c.index] for r in self._reference], [g[c.index] for g in runs])
                    for c in self.checks]
        return measured, self.output_errors(overrides, runs)


def _values(outputs: Sequence[Any]) -> list[Any]:
    """A run's outputs, class-probability maps read as arrays (:func:`probe.read_output`)."""
    return [read_output(v) for v in outputs]


def _batched_outputs(model: ModelProto, names: Sequence[str]) -> list[bool]:
    """Per output: whether its first dimension is symbolic (runs over the inputs' batch)."""
    declared = {o.name: o for o in model.graph.output}
    out = []
    for n in names:
        o = declared.get(n)
        dims = list(o.type.tensor_type.shape.dim) if o is not None else []
        out.append(bool(dims) and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0))
    return out


def _bf16_input(name: str) -> str:
    return f"{name}__p2u_f32"


def _weight_feed(weights: Mapping[str, np.ndarray], bf16: frozenset) -> dict[str, np.ndarray]:
    """Graph-input values for ``weights``: bfloat16 bits widened to float32 (exact)."""
    out = {}
    for k, v in weights.items():
        if k in bf16:
            bits = np.asarray(v, np.uint16).astype(np.uint32) << 16
            out[_bf16_input(k)] = bits.view(np.float32)
        else:
            out[k] = v
    return out


def _channel_power(values: list[np.ndarray], op: str) -> np.ndarray:
    """Mean square per channel: the last axis for MatMul/Gemm, axis 1 for Conv."""
    acc = None
    n = 0
    for v in values:
        v = np.asarray(v, np.float32)
        if op == "Conv":
            v = np.moveaxis(v, 1, -1)
        rows = v.reshape(-1, v.shape[-1])
        if len(rows) > _MAX_ACTIVATION_SAMPLES:
            rows = rows[:: len(rows) // _MAX_ACTIVATION_SAMPLES]
        s = np.sum(np.square(rows, dtype=np.float64), axis=0)
        acc = s if acc is None else acc + s
        n += len(rows)
    return (acc / max(n, 1)).astype(np.float32)


def _broadcast_importance(power: np.ndarray, op: str, c: Consumer,
                          shape: tuple[int, ...]) -> np.ndarray | None:
    """Per-input-channel power laid out to broadcast against the weight's shape."""
    attrs = {a.name: helper.get_attribute_value(a) for a in c.node.attribute}
    if op == "MatMul" and len(shape) >= 2 and power.shape[0] == shape[-2]:
        return power.reshape((shape[-2], 1))
    if op == "Gemm" and len(shape) == 2:
        k_axis = 1 if attrs.get("transB", 0) else 0
        if power.shape[0] != shape[k_axis]:
            return None
        return power.reshape((1, -1)) if k_axis == 1 else power.reshape((-1, 1))
    if op == "Conv" and len(shape) >= 3:
        groups = int(attrs.get("group", 1))
        out_ch, in_per_group = shape[0], shape[1]
        if power.shape[0] != groups * in_per_group:
            return None
        per_group = power.reshape(groups, in_per_group)
        rows = np.repeat(per_group, out_ch // groups, axis=0)  # [O, I/g]
        return rows.reshape((out_ch, in_per_group) + (1,) * (len(shape) - 2))
    return None
