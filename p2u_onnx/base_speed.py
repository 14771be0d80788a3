"""Graph passes that keep the base fast in stock onnxruntime, without changing its values.

:func:`~p2u_onnx.passes.to_base` gives every coded weight one ``DequantizeLinear``. onnxruntime
folds ``DequantizeLinear -> MatMul`` into its low-bit ``MatMulNBits`` kernel; any other
consumer dequantizes the whole weight on every run. Three patterns cost the most:

* **lookup tables** (``Gather`` on axis 0: token and position embeddings). Dequantizing a
  30522 x 384 table took 40 of MiniLM's 91 ms per run. :func:`gather_then_dequantize` gathers
  the integer rows first and dequantizes only those (packed 4- and 2-bit rows are gathered as
  bytes and unpacked with bit operations);
* **MatMul + Add** whose shapes onnxruntime knows: its ``MatMulAddFusion`` turns the pair into
  ``Gemm`` before the ``MatMulNBits`` fusion sees the ``MatMul``, so the weight is dequantized
  every run (6 x 4096 x 4096 layers: 91 ms -> 11 ms per run without it).
  :func:`keep_matmul_add` writes that ``Add`` as the equivalent two-input ``Sum``;
* **weights of every other op** (Conv, Gemm with ``transB``, LSTM/GRU/RNN, ConvTranspose,
  MatMuls onnxruntime does not fuse or that are small, shared weights): onnxruntime has no
  low-bit kernel for them and never constant-folds ``DequantizeLinear`` (unless
  ``session.disable_quant_qdq=1``, which also turns every MatMul back to float), so each run
  dequantized them again (a 4-layer 1024 x 1024 Gemm MLP: 9.8 ms per run instead of 0.5).
  :func:`dequantize_at_load` writes their ``DequantizeLinear`` as the same arithmetic in
  plain ops (``Cast``, ``Sub``, ``Mul``; bit operations unpack 4- and 2-bit codes), which
  onnxruntime's constant folding computes once, when the session is created: the session then
  holds float weights for those ops, as the original model does, and runs at its speed.

All three compute the same float values as the graph they rewrite (``DequantizeLinear`` of the
same codes and scales; ``Sum(a, b)`` is ``a + b``), so the base's outputs and the stages'
exactness are unchanged. They touch only the base graph, never ``graph.onnx``. What folding
costs in memory: the session holds those weights in float (as the original does); while it
is created, onnxruntime keeps every intermediate of the folded ops until its folding pass
ends (about 20 bytes per folded 4-bit weight, 13 per 8-bit one; a 12 MB Gemm MLP peaked at
87-95 MB, the original at 28 MB), and glibc keeps their pages until ``malloc_trim``
(:func:`~p2u_onnx._base_session.open_base_session` calls it).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from .graph import consumers_by_name, default_opset, iter_containers

__all__ = ["dequantize_at_load", "gather_then_dequantize", "keep_matmul_add",
           "speed_up_base"]

_PACKED = {  # packed code type -> (bits, signed)
    TensorProto.INT4: (4, True), TensorProto.UINT4: (4, False),
    TensorProto.INT2: (2, True), TensorProto.UINT2: (2, False),
}
_BYTE_CODES = (TensorProto.INT8, TensorProto.UINT8)


def speed_up_base(model: ModelProto) -> int:
    """Apply the three passes to a base model in place; returns how many nodes were rewritten.
    Tables first (a table read only by Gather is gathered, not dequantized whole), then the
    weights without a low-bit kernel (folded at load), then the Adds of the MatMuls whose
    weights keep their DequantizeLinear."""
    return gather_then_dequantize(model) + dequantize_at_load(model) + keep_matmul_add(model)


def _attrs(node: NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def gather_then_dequantize(model: ModelProto) -> int:
    """``Gather(DequantizeLinear(q, s), ids)`` -> the rows ``Gather(q, ids)`` dequantized with
    ``Gather(s, ids)`` (see :func:`_gathered`), for 2-D tables read only by ``Gather`` on axis
    0, quantized per tensor or in blocks along rows (main graph and subgraphs; in place).
    Returns how many Gathers were rewritten.
    """
    opset = default_opset(model)
    done = 0
    for g, inits, own, table, outputs, inputs in _graphs_deepest_first(model):
        replace: dict[int, list[NodeProto]] = {}
        drop: set[int] = set()
        for dq in g.node:
            plan = _lookup_plan(dq, inits, table, own, outputs, inputs, opset)
            if plan is None:
                continue
            for k, c in enumerate(table[dq.output[0]]):
                gather = c.node
                replace[id(gather)] = _gathered(dq, gather, inits, plan,
                                               f"{dq.output[0]}__p2u_gather{k}")
                done += 1
            drop.add(id(dq))
            if plan["bits"] < 8:  # the packed codes become rows of bytes
                q = inits[dq.input[0]]
                per = 8 // plan["bits"]
                q.data_type = TensorProto.UINT8
                q.dims[1] //= per
        _splice(g, replace, drop)
    return done


def _graphs_deepest_first(model: ModelProto) -> Iterator[tuple]:
    """Every graph of ``model``, deepest first (rewriting a graph's node list copies the
    subgraphs inside it), as ``(graph, initializers by name, ids of its own nodes, readers of
    each name (:func:`~p2u_onnx.graph.consumers_by_name`), output names, input names)``."""
    users = consumers_by_name(model)
    graphs = [(g, path) for g, path in iter_containers(model) if isinstance(g, GraphProto)]
    for g, _ in sorted(graphs, key=lambda gp: -gp[1].count("/")):
        yield (g, {t.name: t for t in g.initializer}, {id(n) for n in g.node},
               users.get(id(g), {}), {o.name for o in g.output}, {i.name for i in g.input})


def _splice(g: GraphProto, replace: dict[int, list[NodeProto]], drop: set[int] = frozenset()
            ) -> None:
    """Replace nodes of ``g`` by id (``replace``), remove others (``drop``), keeping order."""
    if not replace and not drop:
        return
    nodes = []
    for n in g.node:
        if id(n) not in drop:
            nodes.extend(replace.get(id(n), [n]))
    del g.node[:]
    g.node.extend(nodes)


def _lookup_plan(dq, inits, users, own, outputs, inputs, opset) -> dict | None:
    """How to rewrite the Gathers of ``dq``'s table, or None. ``users``: readers of each name
    (subgraphs included, :func:`~p2u_onnx.graph.consumers_by_name`); ``own``: ids of the
    graph's own nodes."""
    if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    q = inits.get(dq.input[0])
    s = inits.get(dq.input[1]) if len(dq.input) > 1 else None
    if q is None or s is None or len(q.dims) != 2:
        return None
    out = dq.output[0]
    readers = users.get(out, [])
    if out in outputs or not readers:
        return None
    if len(users.get(q.name, [])) != 1 or q.name in inputs:
        return None  # the codes are read elsewhere too (or can be fed): leave them as they are
    for c in readers:
        if id(c.node) not in own or c.node.op_type != "Gather" or c.input_index != 0 or \
                _attrs(c.node).get("axis", 0) not in (0, -2):
            return None
    a = _attrs(dq)
    if "block_size" in a:
        if a.get("axis", 1) not in (1, -1) or q.dims[1] % a["block_size"]:
            return None
        mode = "block"
    elif len(s.dims) == 0 or (len(s.dims) == 1 and s.dims[0] == 1):
        mode = "tensor"
    else:
        return None
    zp = len(dq.input) > 2 and dq.input[2] != ""
    if q.data_type in _BYTE_CODES:
        bits, signed = 8, q.data_type == TensorProto.INT8
    elif q.data_type in _PACKED:
        bits, signed = _PACKED[q.data_type]
        if zp or q.dims[1] % (8 // bits) or opset < 18:  # bitwise ops: opset 18
            return None
        if q.data_location != TensorProto.EXTERNAL and not q.raw_data:
            return None  # packed codes in typed fields: the bytes are not a UINT8 table as is
    else:
        return None
    return {"mode": mode, "bits": bits, "signed": signed, "block": a.get("block_size"),
            "zp": zp}


def _const(name: str, value) -> NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=numpy_helper.from_array(np.asarray(value), name))


def _gathered(dq: NodeProto, gather: NodeProto, inits, plan: dict, stem: str) -> list[NodeProto]:
    """Nodes that compute ``gather``'s output from the codes' rows.

    The rows are dequantized with Cast, Sub and Mul in float32, as ``DequantizeLinear`` does
    (``float(code - zero_point) * scale``, one rounding, then to the scale's type): not with a
    ``DequantizeLinear`` node, which would make onnxruntime take a following ``MatMul`` for a
    quantized pair and skip its low-bit kernel for the MatMul's weight.
    """
    ids, scale = gather.input[1], inits[dq.input[1]]
    nodes: list[NodeProto] = []

    def add(op: str, inputs: list[str], **attrs) -> str:
        out = f"{stem}_{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(value) -> str:
        out = f"{stem}_{len(nodes)}"
        nodes.append(_const(out, value))
        return out

    bits = plan["bits"]
    rows = add("Gather", [dq.input[0], ids], axis=0)
    # leading dims of the rows (Shape's `end` needs opset 15: packed and block plans have 18+)
    lead = add("Shape", [rows], end=-1) if bits < 8 or plan["mode"] == "block" else ""
    width = int(inits[dq.input[0]].dims[1])  # codes per row (dims are still the codes')
    codes = rows
    if bits < 8:  # rows of packed bytes -> one code per byte, low bits first
        per, axis = 8 // bits, const(np.array([-1], np.int64))
        mask = const(np.uint8((1 << bits) - 1))
        parts = []
        for i in range(per):
            part = add("BitShift", [rows, const(np.uint8(bits * i))], direction="RIGHT") \
                if i else rows
            parts.append(add("Unsqueeze", [add("BitwiseAnd", [part, mask]), axis]))
        codes = add("Reshape", [add("Concat", parts, axis=-1),
                                add("Concat", [lead, const(np.array([width], np.int64))],
                                    axis=0)])
        if plan["signed"]:  # two's complement of `bits` bits: (u ^ half) - half, in float
            half = 1 << (bits - 1)
            codes = add("BitwiseXor", [codes, const(np.uint8(half))])
    values = add("Cast", [codes], to=TensorProto.FLOAT)
    if bits < 8 and plan["signed"]:  # exact in float (onnxruntime 1.20 has no int8 Sub)
        values = add("Sub", [values, const(np.float32(1 << (bits - 1)))])
    zp = dq.input[2] if plan["zp"] else None
    s = dq.input[1]
    if plan["mode"] == "block":  # [..., width] -> [..., blocks, block] against [..., blocks, 1]
        block, last = plan["block"], const(np.array([-1], np.int64))
        values = add("Reshape", [values, add("Concat", [
            lead, const(np.array([width // block, block], np.int64))], axis=0)])
        s = add("Unsqueeze", [add("Gather", [s, ids], axis=0), last])
        if zp is not None:
            zp = add("Unsqueeze", [add("Gather", [zp, ids], axis=0), last])
    if zp is not None:
        values = add("Sub", [values, add("Cast", [zp], to=TensorProto.FLOAT)])
    if scale.data_type != TensorProto.FLOAT:
        s = add("Cast", [s], to=TensorProto.FLOAT)
    values = add("Mul", [values, s])
    if plan["mode"] == "block":
        values = add("Reshape", [values, add("Concat", [
            lead, const(np.array([width], np.int64))], axis=0)])
    nodes.append(helper.make_node("Cast", [values], list(gather.output), to=scale.data_type,
                                  name=f"{stem}_out"))
    return nodes


def keep_matmul_add(model: ModelProto) -> int:
    """Write ``Add`` as ``Sum`` where it is the only consumer of a ``MatMul`` whose weight is a
    ``DequantizeLinear`` of an initializer and whose other input has a shape that onnxruntime's
    ``MatMulAddFusion`` accepts (2-D, or every dimension known); in place. Returns how many
    were rewritten. Where the shape is dynamic the fusion does not apply and the ``Add`` stays,
    with the fusions that need it (bias + activation, skip + layer norm)."""
    if default_opset(model) < 8:  # Sum broadcasts from opset 8 on
        return 0
    users = consumers_by_name(model)
    pairs = []  # (MatMul, its only consumer: an Add) with a dequantized weight
    for g, _ in iter_containers(model):
        if not isinstance(g, GraphProto):
            continue
        inits = {t.name for t in g.initializer}
        producer = {o: n for n in g.node for o in n.output}
        table = users.get(id(g), {})
        for n in g.node:
            if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
                continue
            dq = producer.get(n.input[1])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            after = table.get(n.output[0], [])
            if len(after) == 1 and after[0].node.op_type == "Add" and \
                    after[0].node.domain in ("", "ai.onnx"):
                pairs.append((n, after[0].node))
    if not pairs:
        return 0
    shapes = _known_shapes(model)  # shape inference only when there is something to decide
    done = 0
    for matmul, add in pairs:
        dims = shapes.get(matmul.input[0])
        if dims is not None and (len(dims) == 2 or None not in dims):
            add.op_type = "Sum"
            done += 1
    return done


def _known_shapes(model: ModelProto) -> dict[str, list[int | None]]:
    """Inferred shapes of the model's values by name (None for an unknown dimension)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is best effort: no shapes, no rewrite
        return {}
    out: dict[str, list[int | None]] = {}
    for g, _ in iter_containers(inferred):
        if not isinstance(g, GraphProto):
            continue
        for v in [*g.input, *g.value_info, *g.output]:
            t = v.type.tensor_type
            if t.HasField("shape"):
                out[v.name] = [d.dim_value if d.HasField("dim_value") else None
                               for d in t.shape.dim]
    return out


# Code types left to onnxruntime's DequantizeLinear -> MatMulNBits fusion. It takes 2, 4 and
# 8 bits in onnxruntime 1.32, but 4 bits only in 1.20 (an 8-bit MatMul weight was dequantized
# on every run there), so 8-bit codes are folded to float at load; 2-bit codes need opset 25,
# which only recent versions load.
_NBITS_CODES = (TensorProto.INT4, TensorProto.UINT4, TensorProto.INT2, TensorProto.UINT2)


def dequantize_at_load(model: ModelProto) -> int:
    """Write each ``DequantizeLinear`` of initializers whose weight onnxruntime would
    dequantize on every run as plain ops it constant-folds when the session is created; in
    place (main graph and subgraphs). Returns how many were rewritten.

    Left as they are: weights onnxruntime turns into ``MatMulNBits`` (see
    :func:`low_bit_matmul`), tables the Gather pass rewrote, and anything whose codes are not
    initializers of the same graph.
    The folded ops compute what ``DequantizeLinear`` does, ``float(code - zero_point) *
    scale`` rounded once (then to the scale's type), so the session holds the same float
    weights the base graph computes.
    """
    opset = default_opset(model)
    if opset < 13:  # Unsqueeze/Slice with input axes; DequantizeLinear axis: 13+
        return 0
    done = 0
    for g, inits, own, table, outputs, inputs in _graphs_deepest_first(model):
        taken = set(inits) | {o for n in g.node for o in n.output} | inputs
        shared: dict[tuple, str] = {}  # small constants, one initializer per value
        replace: dict[int, list[NodeProto]] = {}
        for dq in g.node:
            plan = _fold_plan(dq, inits, table, own, outputs, inputs, opset)
            if plan is None:
                continue
            nodes, tensors = _folded(dq, inits, plan, taken, shared)
            replace[id(dq)] = nodes
            g.initializer.extend(tensors)
            done += 1
        _splice(g, replace)
    return done


# MatMul weights smaller than this (elements) are folded to float even where onnxruntime would
# run them as MatMulNBits: its fixed cost per call exceeds fp32's below about 256 x 256 (1 row:
# 64 x 128 1.05x, 128 x 128 1.05x, 256 x 256 0.93x of fp32; 16 rows: 1.15x, 1.08x, 1.04x;
# onnxruntime 1.32, AVX2), and the float copy costs at most 256 KB.
SMALL_MATMUL = 1 << 16


def low_bit_matmul(dq: NodeProto, q: TensorProto, s: TensorProto, readers,
                   users: dict | None = None, outputs: set[str] = frozenset()) -> bool:
    """Whether onnxruntime fuses ``dq`` with its one reader (a
    :class:`~p2u_onnx.graph.Consumer`) into ``MatMulNBits``, and it is worth it (at least
    :data:`SMALL_MATMUL` elements): 2-D codes of 2 or 4 bits in
    blocks along axis 0 (a power of two, 16 or more), float32 scales, read once, as input B of
    a ``MatMul`` (onnxruntime 1.32 also fuses 8-bit codes and Gemm without transposes, 1.20
    neither: those are folded, fast in both). onnxruntime 1.32 also refuses a
    MatMul whose only consumer is a ``Relu`` or ``Clip`` that feeds exactly one other node (it
    keeps that pair for a QuantizeLinear that is not there): ``users`` (readers by name) and
    ``outputs`` (the graph's outputs) let that be checked."""
    a = _attrs(dq)
    block = a.get("block_size", 0)
    if len(q.dims) != 2 or a.get("axis", 1) not in (0, -2) or block < 16 or block & (block - 1):
        return False
    if q.dims[0] * q.dims[1] < SMALL_MATMUL:
        return False
    if q.data_type not in _NBITS_CODES or s.data_type != TensorProto.FLOAT:
        return False
    if len(readers) != 1:
        return False
    c = readers[0]
    n = c.node
    # Gemm without transposes is fused in 1.32, not in 1.20: folded, it runs at fp32 speed in both
    if n.domain not in ("", "ai.onnx") or c.input_index != 1 or n.op_type != "MatMul":
        return False
    if users is not None:
        after = users.get(n.output[0], [])
        if len(after) == 1 and after[0].node.op_type in ("Relu", "Clip") and \
                n.output[0] not in outputs:
            act = after[0].node
            if len(users.get(act.output[0], [])) == 1 and act.output[0] not in outputs:
                return False
    return True


def _fold_plan(dq, inits, users, own, outputs, inputs, opset) -> dict | None:
    """How to write ``dq`` as foldable ops, or None to leave it."""
    if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    q = inits.get(dq.input[0])
    s = inits.get(dq.input[1]) if len(dq.input) > 1 else None
    zp_name = dq.input[2] if len(dq.input) > 2 else ""
    zp = inits.get(zp_name) if zp_name else None
    if q is None or s is None or (zp_name and zp is None):
        return None
    if any(n in inputs for n in (q.name, s.name, zp_name)):
        return None  # can be fed at run time: not a constant
    out = dq.output[0]
    readers = users.get(out, [])
    if out in outputs or not readers:
        return None
    if all(id(c.node) in own for c in readers) and \
            low_bit_matmul(dq, q, s, readers, users, outputs):
        return None
    a = _attrs(dq)
    rank = len(q.dims)
    axis = a.get("axis", 1)
    axis = axis + rank if axis < 0 else axis
    if "block_size" in a:
        mode = "block"
        if not 0 <= axis < rank or a["block_size"] < 1:
            return None
    elif len(s.dims) == 0 or (len(s.dims) == 1 and s.dims[0] == 1):
        mode = "tensor"
    elif len(s.dims) == 1 and 0 <= axis < rank and s.dims[0] == q.dims[axis]:
        mode = "channel"
    else:
        return None
    if q.data_type in _BYTE_CODES:
        bits, signed = 8, q.data_type == TensorProto.INT8
    elif q.data_type in _PACKED:
        bits, signed = _PACKED[q.data_type]
        if opset < 18:  # bitwise ops: opset 18
            return None
        for t in (q, zp):  # read as bytes: the codes must be raw bytes, read only here
            if t is None:
                continue
            if t.data_location != TensorProto.EXTERNAL and not t.raw_data:
                return None
            if len(users.get(t.name, [])) != 1:
                return None
    else:
        return None
    if s.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
        return None
    return {"mode": mode, "axis": axis, "block": a.get("block_size"), "bits": bits,
            "signed": signed}


def _folded(dq: NodeProto, inits, plan: dict, taken: set[str], shared: dict[tuple, str]
            ) -> tuple[list[NodeProto], list[TensorProto]]:
    """Nodes (and the small constants they need, new ones only: ``shared`` maps each value
    already made in this graph to its initializer) that compute ``dq``'s output from its
    codes with ops onnxruntime constant-folds: the codes as float (``Cast``; packed codes
    unpacked from their bytes first), minus the zero point, times the scale broadcast to the
    weight's shape (``Unsqueeze`` / ``Expand`` / ``Reshape`` / ``Slice``), ``Cast`` to the
    scale's type."""
    q, s = inits[dq.input[0]], inits[dq.input[1]]
    zp = inits[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else None
    shape = [int(d) for d in q.dims]
    stem = f"{dq.output[0]}__p2u_load"
    nodes: list[NodeProto] = []
    tensors: list[TensorProto] = []

    def fresh() -> str:
        name = f"{stem}_{len(nodes) + len(tensors)}"
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    def add(op: str, inputs: list[str], **attrs) -> str:
        out = fresh()
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(value) -> str:
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in shared:
            shared[key] = fresh()
            tensors.append(numpy_helper.from_array(value, shared[key]))
        return shared[key]

    bits, signed = plan["bits"], plan["signed"]

    def codes_of(t: TensorProto, dims: list[int]) -> str:
        """``t``'s codes as int8 / uint8 values of shape ``dims``; packed signed codes come
        out as ``code + 2**(bits - 1)`` (uint8: the sign bit of each field flipped), which
        the caller takes back in float (onnxruntime 1.20 has no int8 ``Sub``)."""
        if bits == 8:
            return t.name
        count = int(np.prod(dims, dtype=np.int64))
        per = 8 // bits
        t.data_type = TensorProto.UINT8  # the same bytes, declared as bytes
        del t.dims[:]
        t.dims.append(-(-count // per))
        mask = const(np.uint8((1 << bits) - 1))
        packed = t.name
        if signed:  # two's complement -> offset binary, every field of the byte at once
            flip = sum((1 << (bits - 1)) << (bits * i) for i in range(per))
            packed = add("BitwiseXor", [packed, const(np.uint8(flip))])
        column = add("Reshape", [packed, const(np.array([-1, 1], np.int64))])
        parts = [add("BitwiseAnd", [add("BitShift", [column, const(np.uint8(bits * i))],
                                        direction="RIGHT") if i else column, mask])
                 for i in range(per)]  # low bits first
        flat = add("Reshape", [add("Concat", parts, axis=1), const(np.array([-1], np.int64))])
        if count % per:
            flat = add("Slice", [flat, const(np.array([0], np.int64)),
                                 const(np.array([count], np.int64))])
        return add("Reshape", [flat, const(np.array(dims, np.int64))])

    def spread(name: str) -> str:
        """A per-tensor, per-channel or per-block tensor broadcast against the weight."""
        mode, axis, rank = plan["mode"], plan["axis"], len(shape)
        if mode == "tensor":
            return name
        if mode == "channel":
            dims = [1] * rank
            dims[axis] = shape[axis]
            return add("Reshape", [name, const(np.array(dims, np.int64))])
        block = plan["block"]
        blocks = -(-shape[axis] // block)
        ones = [1] * (rank + 1)
        ones[axis + 1] = block
        wide = add("Expand", [add("Unsqueeze", [name, const(np.array([axis + 1], np.int64))]),
                              const(np.array(ones, np.int64))])
        padded = list(shape)
        padded[axis] = blocks * block
        out = add("Reshape", [wide, const(np.array(padded, np.int64))])
        if padded[axis] != shape[axis]:
            out = add("Slice", [out, const(np.array([0], np.int64)),
                                const(np.array([shape[axis]], np.int64)),
                                const(np.array([axis], np.int64))])
        return out

    # Blocks that tile their axis exactly: the codes are read as [..., blocks, block, ...]
    # and the scales broadcast against them, then one Reshape: the fewest weight-sized
    # temporaries while onnxruntime folds (it keeps them all until its folding pass ends).
    axis = plan["axis"]
    tiled = plan["mode"] == "block" and shape[axis] % plan["block"] == 0
    dims = shape[:axis] + [shape[axis] // plan["block"], plan["block"]] + shape[axis + 1:] \
        if tiled else shape
    if bits == 8 and tiled:
        values = add("Reshape", [q.name, const(np.array(dims, np.int64))])
    else:
        values = codes_of(q, dims)
    values = add("Cast", [values], to=TensorProto.FLOAT)
    along = const(np.array([axis + 1], np.int64)) if tiled else ""

    def widen(name: str) -> str:
        return add("Unsqueeze", [name, along]) if tiled else spread(name)

    if zp is not None:  # codes and zero point share their type, and so their offset
        zdims = [int(d) for d in s.dims]
        zero = add("Cast", [codes_of(zp, zdims)], to=TensorProto.FLOAT)
        values = add("Sub", [values, widen(zero)])
    elif bits < 8 and signed:  # offset binary back to two's complement: exact in float
        values = add("Sub", [values, const(np.float32(1 << (bits - 1)))])
    scale = s.name if s.data_type == TensorProto.FLOAT else \
        add("Cast", [s.name], to=TensorProto.FLOAT)
    values = add("Mul", [values, widen(scale)])
    if tiled:
        values = add("Reshape", [values, const(np.array(shape, np.int64))])
    if s.data_type != TensorProto.FLOAT:
        values = add("Cast", [values], to=s.data_type)
    nodes[-1].output[0] = dq.output[0]  # the last node computes the weight
    nodes[-1].name = f"{stem}_out"
    return nodes, tensors
