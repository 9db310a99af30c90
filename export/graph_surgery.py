"""Node-level edits of ONNX graphs for the FP16 variants, and the dependency analysis TensorRT shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx


def derived_only_from(
    nodes: Sequence[tuple[Sequence[str], Sequence[str]]], sources: set[str], constants: set[str]
) -> tuple[set[int], set[int]]:
    """(derived, constant) node indices of a topologically ordered graph given as (inputs, outputs) pairs.

    ``derived``: nodes computed from ``sources`` and constants only, with at least one source-derived input
    (for the denoiser: the timestep embedding and the per-block embedding projections). ``constant``: nodes
    computed from constants only. Shared by the FP16 ONNX conversion and the TensorRT precision pins.
    """
    derived_tensors, constant_tensors = set(sources), set(constants)
    derived, constant = set(), set()
    for index, (inputs, outputs) in enumerate(nodes):
        used = [name for name in inputs if name]
        if all(name in constant_tensors for name in used):
            constant.add(index)
            constant_tensors.update(outputs)
        elif all(name in constant_tensors or name in derived_tensors for name in used):
            derived.add(index)
            derived_tensors.update(outputs)
    return derived, constant


def fp32_island(model: onnx.ModelProto, sources: Sequence[str]) -> list[str]:
    """Names of the weight-free nodes computed only from ``sources`` (for the denoiser: t, t·f, sin, cos,
    concat), plus the Constant nodes they read. Nodes reading weights are left out: fp16 embedding MLPs
    measured as accurate (golden ADM: max |Δ| 7.4e-4 vs 8.2e-4 with them fp32) at half the bytes."""
    graph = model.graph
    edges = [(list(node.input), list(node.output)) for node in graph.node]
    derived, constant = derived_only_from(edges, set(sources), set())
    read = {name for i in derived for name in graph.node[i].input}
    feeding = {i for i in constant if read.intersection(graph.node[i].output)}
    return [graph.node[i].name for i in sorted(derived | feeding)]


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names: the FP16 converter's block list works by name."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _cast_target(node: onnx.NodeProto) -> int | None:
    return next((attr.i for attr in node.attribute if attr.name == "to"), None)


def drop_cast_round_trips(model: onnx.ModelProto) -> int:
    """Remove the converter's fp32 → fp16 → fp32 casts between two kept-fp32 nodes; returns how many.

    The converter puts every output of a blocked node through fp16 before the next node casts it back, so a
    chain of fp32 nodes would still be rounded to fp16 at each step. Only converter-inserted casts (named
    ``*_cast_to_fp16_node`` / ``*_cast_to_fp32_node``, always from float32) are touched.
    """
    from onnx import TensorProto

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or not node.name.endswith("_cast_to_fp32_node"):
            continue
        source = producer.get(node.input[0])
        if (
            _cast_target(node) == TensorProto.FLOAT
            and source is not None
            and source.op_type == "Cast"
            and source.name.endswith("_cast_to_fp16_node")
            and _cast_target(source) == TensorProto.FLOAT16
        ):
            rename[node.output[0]] = source.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    _prune_dead_casts(graph)
    return len(rename)


def _prune_dead_casts(graph: onnx.GraphProto) -> None:
    """Drop Cast nodes whose outputs nothing reads (repeat: removing one may orphan its producer cast)."""
    outputs = {out.name for out in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not read.intersection(n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
        gone = {out for node in dead for out in node.output}
        for info in [v for v in graph.value_info if v.name in gone]:
            graph.value_info.remove(info)
