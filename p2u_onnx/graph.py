"""ONNX graph traversal, written once: every graph (subgraphs included) and every weight slot.

A *weight slot* is a place that holds a constant tensor: an initializer of the main graph or of an
If/Loop/Scan body, or the ``value`` attribute of a Constant node (in a graph or in a model-local
function). Passes work on slots and never walk graphs themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import onnx
from onnx import AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, TensorProto

__all__ = ["Container", "Consumer", "Slot", "iter_containers", "iter_slots", "consumers_by_name"]

Container = GraphProto | FunctionProto

# Op domains whose semantics onnxruntime knows.
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc",
                 "ai.onnx.preview.training", "com.ms.internal.nhwc", "ai.onnx.training"}


@dataclasses.dataclass
class Consumer:
    node: NodeProto
    input_index: int


@dataclasses.dataclass
class Slot:
    """One constant tensor in the model."""

    key: str  # unique within the model
    name: str  # tensor name in its container
    container: Container
    path: str  # where the container sits, for messages ("main", "main/If_0:then_branch", ...)
    kind: str  # "initializer" or "constant"
    tensor: TensorProto
    node: NodeProto | None = None  # the Constant node, when kind == "constant"


def _subgraphs(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def iter_containers(model: ModelProto) -> Iterator[tuple[Container, str]]:
    """The main graph, every nested subgraph, and every model-local function (with paths)."""

    def walk(nodes, path: str):
        for i, node in enumerate(nodes):
            for attr_name, g in _subgraphs(node):
                sub = f"{path}/{node.name or node.op_type + str(i)}:{attr_name}"
                yield g, sub
                yield from walk(g.node, sub)

    yield model.graph, "main"
    yield from walk(model.graph.node, "main")
    for f in model.functions:
        fpath = f"function {f.domain}:{f.name}"
        yield f, fpath
        yield from walk(f.node, fpath)


def iter_slots(model: ModelProto) -> Iterator[Slot]:
    """Every initializer and every Constant-node tensor, in a stable order."""
    seen: dict[str, int] = {}
    for container, path in iter_containers(model):
        if isinstance(container, GraphProto):
            for t in container.initializer:
                yield _slot(seen, t.name, container, path, "initializer", t, None)
        for node in container.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value" and a.type == AttributeProto.TENSOR:
                        yield _slot(seen, node.output[0], container, path, "constant", a.t, node)


def _slot(seen, name, container, path, kind, tensor, node) -> Slot:
    key = name
    if key in seen:  # same name in another scope (functions have their own namespace)
        seen[name] += 1
        key = f"{name}@{path}#{seen[name]}"
    else:
        seen[name] = 0
    return Slot(key, name, container, path, kind, tensor, node)


class _ByContainer(dict):
    """A dict keyed by ``id(container)`` that keeps those containers alive: protobuf hands out
    one Python object per subgraph only while it is referenced, so an id is only meaningful
    (and only matches the objects :func:`iter_containers` yields) while its object lives."""

    def __init__(self) -> None:
        super().__init__()
        self.containers: list[Container] = []


def consumers_by_name(model: ModelProto) -> dict[int, dict[str, list[Consumer]]]:
    """For each container (by ``id``), which nodes read each name, nested subgraphs included.

    A name read inside a subgraph counts for every enclosing container that may define it.
    The result keeps the containers alive, so their ids stay theirs while it is in use.
    """
    result = _ByContainer()

    def walk(container, nodes, scopes: list[int]):
        result.containers.append(container)
        table = result.setdefault(id(container), {})
        for node in nodes:
            for i, name in enumerate(node.input):
                if name:
                    for s in scopes + [id(container)]:
                        result.setdefault(s, {}).setdefault(name, []).append(Consumer(node, i))
            for _, g in _subgraphs(node):
                walk(g, g.node, scopes + [id(container)])
        return table

    walk(model.graph, model.graph.node, [])
    for f in model.functions:
        walk(f, f.node, [])
    return result


def op_domains(model: ModelProto) -> set[str]:
    """Every op domain used by a node anywhere in the model."""
    return {n.domain for c, _ in iter_containers(model) for n in c.node}


def check_domains(model: ModelProto) -> list[str]:
    """Domains neither standard nor defined by the model's own functions."""
    local = {f.domain for f in model.functions}
    return sorted(d for d in op_domains(model) if d not in KNOWN_DOMAINS and d not in local)


def default_opset(model: ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def set_default_opset(model: ModelProto, version: int) -> None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = version
            return
    model.opset_import.append(onnx.helper.make_opsetid("", version))
