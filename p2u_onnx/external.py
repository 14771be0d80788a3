"""ONNX external data, checked by p2u before onnxruntime sees a graph (device side: no onnx).

A package's ``base.onnx`` and its skeleton graph (``graph.onnx``, carried by stage 1) keep
their tensors in external-data files. onnxruntime resolves an external ``location`` itself,
and what it accepts depends on its version (absolute paths, ``..``, symbolic links, its
in-memory address tag). So p2u reads every tensor of the graph first, with the few lines of
protobuf wire format below (:func:`external_tensors`: initializers, Constant and other tensor
attributes, sparse tensors, subgraphs of If/Loop/Scan, function bodies and training graphs),
and refuses the graph unless every external tensor points where the package says:

* ``base.onnx``: only ``base.bin``, inside it; each coded tensor's integer codes
  (``<tensor>__p2u_q``), scales (``__p2u_s``) and zero points (``__p2u_zp``) exactly at the
  manifest's spans, with the element type and dimensions the manifest implies
  (:func:`check_base_graph`);
* the skeleton: ``base.bin`` (inside it) or ``weights.bin`` exactly at a coded tensor's
  ``weights`` span, with that tensor's name, element type and dimensions; every coded tensor
  is there (:func:`check_skeleton`).

Every failure is one :class:`~p2u_onnx.errors.FormatError` line naming the tensor.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from .errors import FormatError

__all__ = ["ExternalTensor", "external_tensors", "check_base_graph", "check_skeleton",
           "graph_size_limit"]

_MAX_NESTING = 64  # subgraphs inside subgraphs
_FLOAT_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16, "float64": 11}
_SCALE_TYPES = {"float32": 1, "float16": 10, "bfloat16": 1, "float64": 1}
_PACKED = {21: 4, 22: 4, 25: 2, 26: 2}  # INT4/UINT4/INT2/UINT2: bits
_UINT8 = 2
_DIGITS = re.compile(r"[0-9]{1,20}")


@dataclasses.dataclass
class ExternalTensor:
    """A tensor of a graph whose data is external (or that names external-data keys)."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    location: str | None
    offset: int
    length: int | None
    keys: dict[str, str]


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise FormatError("truncated or malformed protobuf")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message: an int for varints and fixed
    fields, (start, end) for length-delimited ones."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + n), pos + n
        else:
            raise FormatError(f"malformed protobuf (wire type {wire})")
        if pos > end:
            raise FormatError("truncated protobuf")
        yield field, wire, value


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("malformed protobuf (a string is not UTF-8)") from None


def _tensor(buf: memoryview, start: int, end: int) -> ExternalTensor | None:
    dims: list[int] = []
    name, data_type, location, keys = "", 0, 0, {}
    for field, wire, v in _fields(buf, start, end):
        if field == 1:  # dims: packed or not
            if wire == 2:
                pos = v[0]
                while pos < v[1]:
                    d, pos = _varint(buf, pos, v[1])
                    dims.append(d - (1 << 64) if d >> 63 else d)
            else:
                dims.append(v - (1 << 64) if v >> 63 else v)
        elif field == 2 and wire == 0:
            data_type = v
        elif field == 8 and wire == 2:
            name = _text(buf, v)
        elif field == 13 and wire == 2:  # StringStringEntryProto
            k = val = ""
            for f2, w2, v2 in _fields(buf, *v):
                if w2 == 2 and f2 == 1:
                    k = _text(buf, v2)
                elif w2 == 2 and f2 == 2:
                    val = _text(buf, v2)
            if k in keys:  # loaders differ on which one they take
                raise FormatError(f"tensor {name!r}: external-data key {k!r} is given twice")
            keys[k] = val
        elif field == 14 and wire == 0:
            location = v
    if location != 1 and not keys:
        return None
    # plain ASCII digits only: int() also takes " 1", "+1", "1_0" and other scripts' digits,
    # which another loader may read differently from the span checked here
    for key in ("offset", "length"):
        if key in keys and not _DIGITS.fullmatch(keys[key]):
            raise FormatError(f"tensor {name!r}: external-data {key} {keys[key][:40]!r} is "
                              "not a plain number")
    offset = int(keys.get("offset", "0"))
    length = int(keys["length"]) if "length" in keys else None
    return ExternalTensor(name, data_type, tuple(dims), keys.get("location"), offset, length,
                          keys)


def _walk(buf: memoryview, start: int, end: int, kind: str, depth: int,
          visit: Callable[[tuple[int, int], str, int], None]) -> None:
    """Call ``visit(span, kind, field)`` for every tensor in the message of ``kind`` at
    ``buf[start:end]`` and in every message it holds (``kind`` and ``field``: where the
    tensor is, e.g. ``"graph", 5`` for an initializer)."""
    if depth > _MAX_NESTING:
        raise FormatError(f"graph nests subgraphs more than {_MAX_NESTING} deep")
    for field, wire, v in _fields(buf, start, end):
        if wire != 2:
            continue
        sub = _CHILDREN[kind].get(field)
        if sub == "tensor":
            visit(v, kind, field)
        elif sub is not None:
            _walk(buf, v[0], v[1], sub, depth + 1, visit)


_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function", 20: "training"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse",
                  23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def external_tensors(model: bytes | bytearray | memoryview) -> list[ExternalTensor]:
    """Every tensor of a serialized ``ModelProto`` whose data is external, in the main graph,
    subgraphs, functions and training graphs. :class:`FormatError` for malformed bytes."""
    buf = memoryview(model).cast("B")
    out: list[ExternalTensor] = []

    def visit(span: tuple[int, int], kind: str, field: int) -> None:
        t = _tensor(buf, *span)
        if t is not None:
            out.append(t)

    _walk(buf, 0, len(buf), "model", 0, visit)
    return out


def initializer_names(model: bytes | bytearray | memoryview) -> list[str]:
    """The name of every initializer of a serialized model, in the main graph and in
    subgraphs, in order (a name that occurs twice is shared across scopes)."""
    buf = memoryview(model).cast("B")
    out: list[str] = []

    def visit(span: tuple[int, int], kind: str, field: int) -> None:
        if kind == "graph" and field == 5:
            out.append(_text(buf, next((v for f, w, v in _fields(buf, *span)
                                        if f == 8 and w == 2), (0, 0))))

    _walk(buf, 0, len(buf), "model", 0, visit)
    return out


_FLOAT_NUMPY = {1: "<f4", 10: "<f2", 11: "<f8", 16: "<u2"}  # bfloat16 as its bit patterns


def main_initializers(model: bytes | bytearray | memoryview, base_bin=None
                      ) -> dict[str, Any]:
    """The float initializers of a serialized model's main graph, by name: a callable per name
    that returns its value (numpy, its dims; bfloat16 as uint16), read from the tensor's
    ``raw_data``, its packed ``float_data`` / ``double_data``, or its external span of
    ``base_bin`` (bytes-like). Device side (no onnx): what an update takes from a session's
    skeleton for tensors the package kept in its graph. A tensor held another way (external
    elsewhere, typed fields of another kind) raises KeyError when asked for."""
    import numpy as np

    buf = memoryview(model).cast("B")
    out: dict[str, Any] = {}
    for field, wire, v in _fields(buf, 0, len(buf)):
        if field != 7 or wire != 2:  # ModelProto.graph
            continue
        for f2, w2, t in _fields(buf, *v):
            if f2 != 5 or w2 != 2:  # GraphProto.initializer
                continue
            dims: list[int] = []
            name, dtype, raw, packed, ext = "", 0, None, None, None
            keys: dict[str, str] = {}
            for f3, w3, x in _fields(buf, *t):
                if f3 == 1:
                    if w3 == 2:
                        pos = x[0]
                        while pos < x[1]:
                            d, pos = _varint(buf, pos, x[1])
                            dims.append(d)
                    else:
                        dims.append(x)
                elif f3 == 2 and w3 == 0:
                    dtype = x
                elif f3 == 8 and w3 == 2:
                    name = _text(buf, x)
                elif f3 == 9 and w3 == 2:
                    raw = x
                elif f3 in (4, 10) and w3 == 2:  # packed float_data / double_data
                    packed = (f3, x)
                elif f3 == 13 and w3 == 2:
                    k = val = ""
                    for f4, w4, y in _fields(buf, *x):
                        if w4 == 2 and f4 == 1:
                            k = _text(buf, y)
                        elif w4 == 2 and f4 == 2:
                            val = _text(buf, y)
                    keys[k] = val
                elif f3 == 14 and w3 == 0 and x == 1:
                    ext = True
            if dtype not in _FLOAT_NUMPY or not name:
                continue

            def value(dtype=dtype, dims=tuple(dims), raw=raw, packed=packed, ext=ext,
                      keys=dict(keys)):
                n = _numel(dims)
                if n < 0:
                    raise KeyError("negative dimension")
                if ext:
                    if keys.get("location") != "base.bin" or base_bin is None or not \
                            _DIGITS.fullmatch(keys.get("offset", "0")) or \
                            not _DIGITS.fullmatch(keys.get("length", "")):
                        raise KeyError("external data outside base.bin")
                    off, length = int(keys.get("offset", "0")), int(keys["length"])
                    data = bytes(memoryview(base_bin)[off:off + length])
                elif raw is not None:
                    data = bytes(buf[raw[0]:raw[1]])
                elif packed is not None and (packed[0] == 4 and dtype == 1 or
                                             packed[0] == 10 and dtype == 11):
                    data = bytes(buf[packed[1][0]:packed[1][1]])
                else:
                    raise KeyError("values held in fields p2u does not read")
                dt = np.dtype(_FLOAT_NUMPY[dtype])
                if len(data) != n * dt.itemsize:
                    raise KeyError("size does not match the dims")
                return np.frombuffer(data, dt).astype(dt.newbyteorder("="), copy=False) \
                    .reshape(dims)

            out.setdefault(name, value)
    return out


_TENSOR_DATA = {4, 5, 6, 7, 9, 10, 11, 13, 14}  # TensorProto's value fields
_MODEL_SEMANTICS = {7, 8, 25}  # ModelProto: graph, opset_import, functions


def graph_structure(model: bytes | bytearray | memoryview, given: set[str] | frozenset[str]
                    ) -> bytes:
    """What a skeleton graph computes, apart from values a session takes from elsewhere: a
    digest of the model's graph, opsets and functions in which the main graph's initializers
    named in ``given`` (handed to onnxruntime by name) keep their name, type and dims but not
    their values, and ``base.bin`` tensors keep their length but not their offset (another
    package lays its ``base.bin`` out differently). Two skeletons with the same digest differ
    only in those values, and in the bytes of their other ``base.bin`` tensors, which the
    caller compares."""
    import hashlib

    buf = memoryview(model).cast("B")
    h = hashlib.sha256()

    def walk(start: int, end: int, kind: str, depth: int, main: bool) -> None:
        if depth > _MAX_NESTING:
            raise FormatError(f"graph nests subgraphs more than {_MAX_NESTING} deep")
        for field, wire, v in _fields(buf, start, end):
            if kind == "model" and field not in _MODEL_SEMANTICS:
                continue
            sub = _CHILDREN[kind].get(field) if wire == 2 else None
            if sub == "tensor":
                tensor(v, main and kind == "graph" and field == 5)
            elif sub is not None:
                h.update(b"<%d" % field)
                walk(v[0], v[1], sub, depth + 1, main and kind == "model")
                h.update(b">")
            else:
                h.update(b"%d:%d:" % (field, wire))
                h.update(bytes(buf[v[0]:v[1]]) if wire == 2 else b"%d" % v)
                h.update(b";")

    def tensor(span: tuple[int, int], main_initializer: bool) -> None:
        ext = _tensor(buf, *span)
        name = _text(buf, next((v for f, w, v in _fields(buf, *span) if f == 8 and w == 2),
                               (0, 0)))
        skip_values = main_initializer and name in given
        h.update(b"<t")
        for field, wire, v in _fields(buf, *span):
            if skip_values and field in _TENSOR_DATA:
                continue
            if field == 13 and ext is not None and ext.location == "base.bin" and wire == 2:
                key = next((_text(buf, v2) for f2, w2, v2 in _fields(buf, *v)
                            if f2 == 1 and w2 == 2), "")
                if key == "offset":
                    continue
            h.update(b"%d:%d:" % (field, wire))
            h.update(bytes(buf[v[0]:v[1]]) if wire == 2 else b"%d" % v)
            h.update(b";")
        h.update(b">")

    walk(0, len(buf), "model", 0, True)
    return h.digest()


def _main_graph(model: bytes | bytearray | memoryview, field: int
                ) -> Iterator[tuple[memoryview, tuple[int, int]]]:
    """The spans of one repeated message field of the main graph (1: nodes, 5: initializers,
    11: inputs), with the buffer they index."""
    buf = memoryview(model).cast("B")
    for f, wire, v in _fields(buf, 0, len(buf)):
        if f == 7 and wire == 2:  # ModelProto.graph
            for f2, w2, span in _fields(buf, *v):
                if f2 == field and w2 == 2:
                    yield buf, span


def _strings(buf: memoryview, span: tuple[int, int], field: int) -> list[str]:
    return [_text(buf, x) for f, w, x in _fields(buf, *span) if f == field and w == 2]


def main_float_types(model: bytes | bytearray | memoryview) -> dict[str, int]:
    """The ONNX element type of each float initializer of the main graph, by name."""
    out: dict[str, int] = {}
    for buf, t in _main_graph(model, 5):
        name, dtype = "", 0
        for f3, w3, x in _fields(buf, *t):
            if f3 == 2 and w3 == 0:
                dtype = x
            elif f3 == 8 and w3 == 2:
                name = _text(buf, x)
        if dtype in _FLOAT_NUMPY and name:
            out.setdefault(name, dtype)
    return out


def graph_inputs(model: bytes | bytearray | memoryview) -> set[str]:
    """The names of the main graph's inputs."""
    return {n for buf, vi in _main_graph(model, 11) for n in _strings(buf, vi, 1)}


def node_outputs(model: bytes | bytearray | memoryview) -> list[str]:
    """The output names of the main graph's nodes, in order."""
    return [n for buf, node in _main_graph(model, 1) for n in _strings(buf, node, 2)]


def _external(model: bytes | bytearray | memoryview, where: str) -> list[ExternalTensor]:
    """:func:`external_tensors`, its errors naming the graph (``where``)."""
    try:
        return external_tensors(model)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None


def _read(path: str | os.PathLike) -> bytes:
    from .format import open_regular

    try:
        with open_regular(path) as f:
            return f.read()
    except OSError as e:
        raise FormatError(f"cannot read {path}: {e.strerror or e}") from e


def _numel(dims: tuple[int, ...]) -> int:
    return math.prod(dims) if all(d >= 0 for d in dims) else -1


def _located(t: ExternalTensor, where: str, allowed: dict[str, int]) -> None:
    """``t`` points inside one of the ``allowed`` files (name -> size) with a length."""
    if t.location not in allowed:
        raise FormatError(f"{where}: tensor {t.name!r} keeps its data in {t.location!r}; only "
                          f"{' or '.join(sorted(allowed))} may be used (refused before loading)")
    if t.length is None or t.offset < 0 or t.length < 0 or \
            t.offset + t.length > allowed[t.location]:
        raise FormatError(f"{where}: tensor {t.name!r} points at {t.location}[{t.offset}:+"
                          f"{t.length}], outside that file ({allowed[t.location]} bytes)")
    extra = set(t.keys) - {"location", "offset", "length", "checksum"}
    if extra:
        raise FormatError(f"{where}: tensor {t.name!r} has unknown external-data keys "
                          f"{sorted(extra)}")


def _disjoint(tensors: list[ExternalTensor], location: str, where: str) -> None:
    """No two tensors read overlapping bytes of ``location``: what a graph makes onnxruntime
    load is then bounded by the size of that file."""
    spans = sorted((t.offset, t.offset + (t.length or 0), t.name) for t in tensors
                   if t.location == location)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise FormatError(f"{where}: tensors {a!r} and {b!r} read overlapping bytes of "
                              f"{location}")


def _scale_shape(t: dict[str, Any]) -> tuple[int, ...]:
    shape, lay = list(t["shape"]), t["layout"]
    if lay["mode"] == "tensor":
        return ()
    if lay["mode"] == "channel":
        return (shape[lay["axis"]],)
    ax = lay["axis"]
    return tuple(-(-d // lay["block_size"]) if i == ax else d for i, d in enumerate(shape))


def check_base_graph(model: bytes | str | os.PathLike, manifest: dict[str, Any],
                     base_bin_size: int, where: str = "base.onnx") -> None:
    """Refuse ``base.onnx`` (bytes or path) unless every external tensor lies inside
    ``base.bin`` and each coded tensor's codes, scales and zero points are exactly at the
    manifest's spans, with matching element types and dimensions."""
    data = model if isinstance(model, (bytes, bytearray, memoryview)) else _read(model)
    ext = _external(data, where)
    # by name and span: a lookup per manifest tensor (a list per name made many tensors of
    # one name quadratic)
    by_span: dict[tuple[str, int, int | None], list[ExternalTensor]] = {}
    for t in ext:
        _located(t, where, {"base.bin": base_bin_size})
        key = (t.name, t.offset, t.length)
        if key in by_span:  # (empty spans never overlap: the same one many times)
            raise FormatError(f"{where}: tensor {t.name!r} is given twice at base.bin"
                              f"[{t.offset}:+{t.length}]")
        by_span[key] = [t]
    _disjoint(ext, "base.bin", where)
    for t in manifest["tensors"]:
        b = t["base"]
        ctype = b["code_type"]
        stem = f"{t['tensor']}__p2u"
        if b.get("kind") == "palette":  # uint8 indices of the tensor's shape + its values
            parts = [("idx", b["codes"], {_UINT8}, tuple(t["shape"])),
                     ("pal", b["palette"], {_FLOAT_TYPES[t["dtype"]]}, (b["size"],))]
        else:
            parts = [("q", b["codes"], {ctype}, tuple(t["shape"])),
                     ("s", b["scale"], {_SCALE_TYPES[t["dtype"]]}, _scale_shape(t))]
            if b.get("zero_point") is not None:
                parts.append(("zp", b["zero_point"], {ctype}, _scale_shape(t)))
        for suffix, span, types, dims in parts:
            name = f"{stem}_{suffix}"
            found = by_span.get((name, span[0], span[1]), [])
            if not found:
                raise FormatError(f"{where}: no tensor {name!r} at base.bin{list(span)} as the "
                                  f"manifest's tensor {t['name']!r} says (manifest and base "
                                  "model disagree)")
            for e in found:
                ok = e.data_type in types and e.dims == dims
                # packed codes read by a Gather (a 2-D table) or unpacked at session load
                # (1-D) are declared as the same bytes in UINT8
                if not ok and suffix in ("q", "zp") and ctype in _PACKED \
                        and e.data_type == _UINT8:
                    ok = len(e.dims) in (1, 2) and _numel(e.dims) == span[1] and \
                        -(-_numel(dims) // (8 // _PACKED[ctype])) == span[1]
                if not ok:
                    raise FormatError(f"{where}: tensor {name!r} is type {e.data_type} with "
                                      f"dims {list(e.dims)}; the manifest's tensor "
                                      f"{t['name']!r} implies type {sorted(types)[0]} with "
                                      f"dims {list(dims)}")


def check_skeleton(model: bytes | bytearray | memoryview, manifest: dict[str, Any],
                   base_bin_size: int, where: str = "graph.onnx") -> None:
    """Refuse the skeleton graph unless every external tensor lies inside ``base.bin`` or is
    exactly a coded tensor's ``weights`` span of ``weights.bin`` (same name, element type and
    dimensions), and every coded tensor is found."""
    wsize = max((sum(t["weights"]) for t in manifest["tensors"]), default=0)
    spans = {tuple(t["weights"]): t for t in manifest["tensors"]}
    seen: set[str] = set()
    ext = _external(model, where)
    for e in ext:
        _located(e, where, {"base.bin": base_bin_size, "weights.bin": wsize})
    _disjoint(ext, "base.bin", where)
    _disjoint(ext, "weights.bin", where)
    for e in ext:
        if e.location != "weights.bin":
            continue
        t = spans.get((e.offset, e.length))
        if t is None:
            raise FormatError(f"{where}: tensor {e.name!r} points at weights.bin[{e.offset}:+"
                              f"{e.length}], which is no coded tensor's span in the manifest")
        # (a Constant node's value tensor may be unnamed: its output names it)
        if (e.name != t["tensor"] and t["kind"] != "constant") or \
                e.data_type != _FLOAT_TYPES[t["dtype"]] or e.dims != tuple(t["shape"]):
            raise FormatError(f"{where}: tensor {e.name!r} (type {e.data_type}, dims "
                              f"{list(e.dims)}) sits at the weights span of the manifest's "
                              f"{t['name']!r} ({t['dtype']}, shape {t['shape']}) (manifest and "
                              "graph disagree)")
        seen.add(t["name"])
    missing = [t["name"] for t in manifest["tensors"] if t["name"] not in seen]
    if missing:
        raise FormatError(f"{where}: no tensor reads the weights of {missing[0]!r} (manifest "
                          "and graph disagree)")


def graph_size_limit(manifest: dict[str, Any]) -> int:
    """The most bytes a skeleton graph may declare: twice ``base.onnx`` and 64 MiB (both hold
    the same structure and small tensors; the base has a few more nodes), at most 2 GiB."""
    files = {f["path"]: f["size"] for f in manifest["base_model"]["files"]}
    if "graph.onnx" in files:  # an update package lists its skeleton's exact size
        return min(files["graph.onnx"], (1 << 31) - 1)
    base = files.get("base.onnx", 0)
    return min(2 * base + (64 << 20), (1 << 31) - 1)
