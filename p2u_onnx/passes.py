"""Graph passes: model in, model out. Each works on weight slots from :mod:`graph`.

* :func:`lift_constants` turns weight-sized Constant nodes of graphs into initializers.
* :func:`alias_duplicates` keeps one copy of main-graph initializers that are equal bit for bit.
* :func:`normalize` is the two above: what the encoder codes and the source digest covers.
* :func:`select_weights` decides which slots are coded, and with which block layout.
* :func:`to_base` rewrites coded slots into low-bit tensors + DequantizeLinear.
* :func:`raise_opset` lifts the default-domain opset when low-bit types need it, or reports why not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, TensorProto, helper

from .config import QuantConfig
from .dtypes import FLOAT_TYPES, dtype_info
from .graph import (Consumer, Slot, consumers_by_name, default_opset, iter_containers, iter_slots,
                    set_default_opset)
from .quantizers import Layout

__all__ = ["lift_constants", "alias_duplicates", "normalize", "select_weights", "Selected", "to_base", "raise_opset",
           "choose_layout"]

_FLOAT_ONNX = {d.onnx_type for d in FLOAT_TYPES.values()}

# Inputs whose values act as shapes, scales, indices or bounds: kept exact whatever their size.
EXACT_INPUTS: dict[str, set[int]] = {
    "Resize": {1, 2, 3}, "Upsample": {1}, "Clip": {1, 2}, "Pad": {1, 2, 3},
    "QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2}, "Range": {0, 1, 2},
    "ConstantOfShape": {0}, "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Slice": {1, 2, 3, 4},
    "TopK": {1}, "OneHot": {1, 2}, "Pow": {1}, "CumSum": {1}, "Gather": {1},
    "GatherElements": {1}, "GatherND": {1}, "ScatterND": {1}, "ScatterElements": {1},
    "NonMaxSuppression": {2, 3, 4}, "RoiAlign": {1, 2}, "Where": {0}, "Squeeze": {1},
    "Unsqueeze": {1}, "Split": {1}, "Trilu": {1}, "BatchNormalization": {3, 4},
    "InstanceNormalization": set(), "MaxRoiPool": {1}, "GridSample": {1},
    "AffineGrid": {0, 1}, "Bernoulli": {0}, "RandomNormalLike": {0}, "Multinomial": {0},
    "QLinearConv": {1, 2, 4, 5, 6, 7}, "QLinearMatMul": {1, 2, 4, 5, 6, 7},
}


def _float_tensor(t: TensorProto) -> bool:
    return t.data_type in _FLOAT_ONNX


def _numel(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1


def lift_constants(model: ModelProto, min_elements: int) -> int:
    """Move float Constant nodes of ``min_elements`` or more into their graph's initializers.

    Function bodies keep their Constant nodes (functions have no initializers). Returns how many
    nodes were lifted. In place.
    """
    lifted = 0
    # Deepest containers first: rewriting a parent's node list copies its subgraphs.
    for slot in sorted(iter_slots(model), key=lambda s: -s.path.count("/")):
        if slot.kind != "constant" or not isinstance(slot.container, GraphProto):
            continue
        if not _float_tensor(slot.tensor) or _numel(slot.tensor) < min_elements:
            continue
        t = TensorProto()
        t.CopyFrom(slot.tensor)
        t.name = slot.name
        slot.container.node.remove(slot.node)
        slot.container.initializer.append(t)
        lifted += 1
    return lifted


def alias_duplicates(model: ModelProto, min_elements: int) -> tuple[int, int]:
    """Replace each main-graph initializer of ``min_elements`` or more that equals an earlier
    one bit for bit (same type, dimensions and bytes) by an ``Identity`` node of that one.

    Exporters that do not share tensors write one copy per use: the torch dynamo exporter
    writes a layer's weights once per layer even where the layers are copies of one another,
    and tied weights twice. Coded as separate tensors each copy costs its own bytes, where zstd
    of the file finds the repeat. The graph computes the same values (onnxruntime folds the
    Identity into an initializer). Initializers that are also graph inputs (a user may feed
    them) and tensors in external files are left alone. Returns ``(aliased, bytes saved)``.
    In place.
    """
    import hashlib

    g = model.graph
    inputs = {i.name for i in g.input}
    first: dict[tuple, str] = {}
    drop: list[int] = []
    aliases: list[onnx.NodeProto] = []
    saved = 0
    for i, t in enumerate(g.initializer):
        if t.name in inputs or _numel(t) < min_elements or not t.HasField("raw_data") or \
                t.data_location == TensorProto.EXTERNAL:
            continue
        key = (t.data_type, tuple(t.dims), hashlib.sha256(t.raw_data).digest())
        if key not in first:
            first[key] = t.name
            continue
        drop.append(i)
        saved += len(t.raw_data)
        aliases.append(helper.make_node("Identity", [first[key]], [t.name],
                                        name=f"p2u_alias/{t.name}"))
    if not drop:
        return 0, 0
    dropped = set(drop)
    keep = [t for i, t in enumerate(g.initializer) if i not in dropped]
    nodes = aliases + list(g.node)
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.node[:]
    g.node.extend(nodes)
    return len(drop), saved


def normalize(model: ModelProto, min_elements: int) -> tuple[int, int]:
    """:func:`lift_constants`, then :func:`alias_duplicates`: the model an encoder codes and
    whose weights the source digest covers. Returns what :func:`alias_duplicates` returns."""
    lift_constants(model, min_elements)
    return alias_duplicates(model, min_elements)


@dataclasses.dataclass
class Selected:
    slot: Slot
    layout: Layout
    shape: tuple[int, ...]


def _weight_axes(c: Consumer, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(output-channel axis, reduction axis) of a weight read by ``c``, or None if unknown."""
    op, i, rank = c.node.op_type, c.input_index, len(shape)
    attrs = {a.name: helper.get_attribute_value(a) for a in c.node.attribute}
    if rank < 2:
        return None
    if op in ("MatMul", "MatMulInteger", "FusedMatMul"):
        return (rank - 1, rank - 2) if i == 1 else (rank - 2, rank - 1)
    if op == "Gemm" and rank == 2:
        if i == 1:
            return (0, 1) if attrs.get("transB", 0) else (1, 0)
        if i == 0:
            return (1, 0) if attrs.get("transA", 0) else (0, 1)
    if op in ("Conv", "ConvInteger", "FusedConv", "NhwcConv") and i == 1:
        # reduce along the longest of input channels and kernel axes (a 1 x 256 filter bank
        # blocks along its taps, a 64-channel 3x3 conv along its channels)
        return (0, max(range(1, rank), key=lambda a: shape[a]))
    if op == "ConvTranspose" and i == 1:
        return (1, max([0] + list(range(2, rank)), key=lambda a: shape[a]))
    if op == "Gather" and i == 0 and rank == 2:
        return (0, 1)
    if op in ("LSTM", "GRU", "RNN") and i in (1, 2) and rank == 3:
        return (1, 2)
    return None


def choose_layout(shape: tuple[int, ...], consumers: list[Consumer],
                  config: QuantConfig) -> Layout:
    """Blocks aligned with output channels, along the axis the consumer reduces over."""
    rank = len(shape)
    if config.granularity == "tensor" or rank == 0:
        return Layout(shape, "tensor")
    axes = next((a for c in consumers if (a := _weight_axes(c, shape))), None)
    if axes is None:
        axes = (0, rank - 1) if rank >= 2 else (0, 0)
    out_axis, red_axis = axes
    if rank == 1:
        return Layout(shape, "block", 0, config.block_size) \
            if config.granularity == "block" else Layout(shape, "tensor")
    if config.granularity == "channel" or shape[red_axis] < config.block_size:
        return Layout(shape, "channel", out_axis)
    return Layout(shape, "block", red_axis, config.block_size)


def select_weights(model: ModelProto, config: QuantConfig) -> list[Selected]:
    """Float slots to code: big enough, not 1-D unless asked, never read as shape/scale/index."""
    users = consumers_by_name(model)
    chosen: list[Selected] = []
    for slot in iter_slots(model):
        t = slot.tensor
        if not _float_tensor(t) or _numel(t) < config.min_elements:
            continue
        if len(t.dims) < 2 and not config.quantize_vectors:
            continue
        cons = users.get(id(slot.container), {}).get(slot.name, [])
        if any(c.input_index in EXACT_INPUTS.get(c.node.op_type, ()) for c in cons):
            continue
        shape = tuple(int(d) for d in t.dims)
        chosen.append(Selected(slot, choose_layout(shape, cons, config), shape))
    return chosen


def code_type(bits: int, opset: int, signed: bool = True) -> tuple[int, int]:
    """(ONNX integer type holding ``bits``-bit codes, the opset it needs)."""
    if bits <= 2 and opset >= 25:
        return (TensorProto.INT2 if signed else TensorProto.UINT2), 25
    if bits <= 4 and opset >= 21:
        return (TensorProto.INT4 if signed else TensorProto.UINT4), 21
    return (TensorProto.INT8 if signed else TensorProto.UINT8), 13


def raise_opset(model: ModelProto, target: int, untyped: set[str] = frozenset()) -> str | None:
    """Convert ``model`` (structure only: tensors must be external) to ``target`` opset in place.

    The converter infers value types on the way; inferred types for the names in ``untyped``
    (outputs of our DequantizeLinear nodes, which it gets wrong for float16) are dropped.
    Returns None on success, else the reason the conversion failed (the model is left as it was).
    """
    current = default_opset(model)
    if current >= target:
        return None
    # A value_info entry that names a graph input or output says nothing the input or output
    # does not, and may contradict it (float16 conversions with keep_io_types leave an fp16
    # entry beside a float output): the converter would copy it onto the output.
    for container, _ in iter_containers(model):
        if isinstance(container, GraphProto):
            io = {v.name for v in container.input} | {v.name for v in container.output}
            keep = [v for v in container.value_info if v.name not in io]
            if len(keep) != len(container.value_info):
                del container.value_info[:]
                container.value_info.extend(keep)
    io_types = {v.name: v.type for v in list(model.graph.input) + list(model.graph.output)}
    # the converter adds the types it inferred for every value: onnxruntime infers them again
    # when it loads the model, and they made a small base.onnx larger (swift-f0: 356 entries,
    # 11 KB, 1.4 KB compressed, in a package whose model compresses to 85 KB)
    declared = {v.name for container, _ in iter_containers(model)
                if isinstance(container, GraphProto) for v in container.value_info}
    untyped = set(untyped)
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as e:  # the converter raises plain RuntimeError/ValueError
        return f"opset {current} -> {target} conversion failed: {str(e).splitlines()[0][:200]}"
    functions = list(model.functions)  # the converter drops model-local functions
    model.CopyFrom(converted)
    set_default_opset(model, target)
    del model.functions[:]
    model.functions.extend(functions)
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in io_types and v.type != io_types[v.name]:
            v.type.CopyFrom(io_types[v.name])  # the model's own signature, not an inferred one
    for container, _ in iter_containers(model):
        if isinstance(container, GraphProto):
            keep = [v for v in container.value_info
                    if v.name not in untyped and v.name in declared]
            if len(keep) != len(container.value_info):
                del container.value_info[:]
                container.value_info.extend(keep)
    for f in model.functions:
        for o in f.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < target:
                o.version = target
    return None


def to_base(model: ModelProto, coded: list[dict]) -> None:
    """Replace every coded slot by integer codes + scale (+ zero point) + DequantizeLinear.

    ``coded`` items carry the slot, layout, dtype and the external-data spans of the codes,
    scale and zero point inside ``base.bin``. Initializers that were also graph inputs stop
    being inputs (the base computes them). In place.
    """
    by_container: dict[int, list[dict]] = {}
    for c in coded:
        by_container.setdefault(id(c["slot"].container), []).append(c)
    # Deepest containers first: rewriting a parent's node list copies its subgraphs.
    for items in sorted(by_container.values(), key=lambda it: -it[0]["slot"].path.count("/")):
        container = items[0]["slot"].container
        new_nodes = []
        drop_inits = set()
        for c in items:
            slot, layout, info = c["slot"], c["layout"], dtype_info(c["dtype"])
            stem = f"{slot.name}__p2u"
            if c.get("palette") is not None:  # exact: Gather(palette, Cast(indices, int32))
                tensors = [_ext_tensor(f"{stem}_idx", TensorProto.UINT8, c["shape"], c["codes"]),
                           _ext_tensor(f"{stem}_pal", info.onnx_type, [c["palette_size"]],
                                       c["palette"])]
            else:
                tensors = [_ext_tensor(f"{stem}_q", c["code_type"], c["shape"], c["codes"]),
                           _ext_tensor(f"{stem}_s", info.scale_onnx_type, layout.scale_shape,
                                       c["scale"])]
            if c.get("palette") is None and c["zero_point"] is not None:
                tensors.append(_ext_tensor(f"{stem}_zp", c["code_type"], layout.scale_shape,
                                           c["zero_point"]))
            attrs = {}
            if layout.mode == "channel":
                attrs["axis"] = layout.axis
            elif layout.mode == "block":
                attrs = {"axis": layout.axis, "block_size": layout.block_size}
            cast = info.scale_onnx_type != info.onnx_type  # float64, bfloat16: DQ to float, Cast
            out = f"{stem}_f32" if cast else slot.name
            nodes = []
            if isinstance(container, GraphProto):
                container.initializer.extend(tensors)
                if slot.kind == "initializer":
                    drop_inits.add(slot.name)
                inputs = [t.name for t in tensors]
            else:
                inputs = []
                for t in tensors:
                    nodes.append(helper.make_node("Constant", [], [t.name], value=t,
                                                  name=f"{t.name}_const"))
                    inputs.append(t.name)
            if c.get("palette") is not None:
                nodes += [helper.make_node("Cast", [inputs[0]], [f"{stem}_idx32"],
                                           to=TensorProto.INT32, name=f"{stem}_cast_idx"),
                          helper.make_node("Gather", [inputs[1], f"{stem}_idx32"], [slot.name],
                                           axis=0, name=f"{stem}_gather")]
                cast = False
            else:
                nodes.append(helper.make_node("DequantizeLinear", inputs, [out],
                                              name=f"{stem}_dq", **attrs))
            if cast:
                nodes.append(helper.make_node("Cast", [out], [slot.name],
                                              to=info.onnx_type, name=f"{stem}_cast"))
            if slot.kind == "constant":
                container.node.remove(slot.node)
            new_nodes.extend(nodes)
        if isinstance(container, GraphProto) and drop_inits:
            keep = [t for t in container.initializer if t.name not in drop_inits]
            del container.initializer[:]
            container.initializer.extend(keep)
            keep_in = [v for v in container.input if v.name not in drop_inits]
            del container.input[:]
            container.input.extend(keep_in)
        old = list(container.node)
        del container.node[:]
        container.node.extend(new_nodes + old)


def _ext_tensor(name: str, data_type: int, shape, span: list[int]) -> TensorProto:
    t = TensorProto(name=name, data_type=data_type, dims=list(shape))
    set_external(t, "base.bin", span)
    return t


def set_external(t: TensorProto, location: str, span: list[int]) -> None:
    """Point ``t`` at ``location`` (ONNX external-data keys) and drop any inline data."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                  "uint64_data", "string_data"):
        t.ClearField(field)
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(span[0])), ("length", str(span[1]))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL
