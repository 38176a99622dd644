"""Find the MoE routers of an ONNX graph by structure, so quantizers can leave them in float32.

A router is recognised as ``gate (MatMul|Gemm with a constant weight) [-> Add bias] -> Softmax|Sigmoid
[-> Add correction bias] -> TopK``. Its protected set is those nodes plus every node downstream of them
whose dynamic inputs all come from the router and whose outputs are float (the top-k weight
normalisation: ReduceSum/Div, GatherElements of sigmoid scores, scaling Mul, the Reshape feeding the
dispatch). The walk stops at integer tensors (expert ids go on into the dispatch's sort keys, which no
quantizer touches) and at any node that also reads a non-router tensor (the expert MatMuls, the
weighted combine), so the dispatch itself stays quantizable.

Why keep routers in float (PITFALLS.md): quantizing Softmax to a fixed [0, 1] uint8 grid creates ties
that TopK breaks toward the lowest index; with 64 experts, top-8 only ~75% of tokens keep their expert
set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import onnx
from onnx import TensorProto

_GATE_OPS = ("MatMul", "Gemm")
_SCORE_OPS = ("Softmax", "Sigmoid")
# Ops the closure never crosses: they do the experts' compute, not the routing arithmetic.
_COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "MatMulInteger", "MatMulNBits", "QLinearMatMul"})
# Quantizer-inserted ops a backward walk may look through when analysing an already quantized graph.
_TRANSPARENT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast"})
_MAX_WALK = 12  # nodes walked back from an expert MatMul to its segment (SwiGLU needs 5)
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})


@dataclass
class Router:
    """One router: its gate, score and TopK nodes (names) and the TopK outputs (values, indices)."""

    gate: str
    score: str
    topk: str
    scores_output: str  # tensor TopK ranks: [tokens, E] float
    indices_output: str  # TopK indices: [tokens, k] int64


@dataclass
class RouterPlan:
    """Every router of a graph and the node names to keep in float32."""

    routers: list[Router] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # graph order
    op_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"routers": len(self.routers), "nodes": len(self.nodes), "op_types": self.op_types}


class _Graph:
    """Producer/consumer maps of a graph, with constants (initializers, Constant outputs) marked."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.nodes = list(graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output if out}
        self.constants = {init.name for init in graph.initializer}
        self.constants |= {out for node in self.nodes if node.op_type == "Constant" for out in node.output}
        # A Cast or DequantizeLinear of constants is constant too (fp16 conversion casts router biases).
        for node in self.nodes:
            if node.op_type in _TRANSPARENT_OPS and all(i in self.constants for i in node.input if i):
                self.constants.update(o for o in node.output if o)
        self.elem_type: dict[str, int] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
            values = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
        except onnx.shape_inference.InferenceError:
            # Without types the float test below falls back to "unknown = float": the plan only grows.
            values = list(graph.value_info) + list(graph.output) + list(graph.input)
        for value in values:
            if value.type.HasField("tensor_type"):
                self.elem_type[value.name] = value.type.tensor_type.elem_type

    def source(self, name: str, transparent: bool = True) -> onnx.NodeProto | None:
        """The node producing ``name``, looking through Q/DQ/Cast when ``transparent``."""
        node = self.producer.get(name)
        while transparent and node is not None and node.op_type in _TRANSPARENT_OPS:
            node = self.producer.get(node.input[0])
        return node

    def dynamic_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [name for name in node.input if name and name not in self.constants]

    def is_float(self, name: str) -> bool:
        return self.elem_type.get(name, TensorProto.FLOAT) in _FLOAT_TYPES


def _match_router(g: _Graph, topk: onnx.NodeProto) -> tuple[Router, list[str]] | None:
    """The router ending at ``topk``, with the names of its chain nodes; None when it is not one."""
    chain = [topk.name]
    node = g.source(topk.input[0])
    if node is not None and node.op_type == "Add" and any(i in g.constants for i in node.input):
        chain.append(node.name)  # score + correction bias (DeepSeek-style selection)
        node = g.source(next(i for i in node.input if i not in g.constants))
    if node is None or node.op_type not in _SCORE_OPS:
        return None
    score = node
    chain.append(score.name)
    node = g.source(score.input[0])
    if node is not None and node.op_type == "Add" and any(i in g.constants for i in node.input):
        chain.append(node.name)  # gate bias of a MatMul + Add projection
        node = g.source(next(i for i in node.input if i not in g.constants))
    if node is None or node.op_type not in _GATE_OPS or len(node.input) < 2:
        return None
    weight = node.input[1]
    weight_node = g.producer.get(weight)
    if weight not in g.constants and not (weight_node is not None and weight_node.op_type in _TRANSPARENT_OPS):
        return None  # an activation x activation product (attention), not a gate projection
    chain.append(node.name)
    return Router(node.name, score.name, topk.name, topk.input[0], topk.output[1]), chain


def find_routers(model: onnx.ModelProto) -> RouterPlan:
    """Every router in ``model`` and the nodes to keep in float32 (see the module docstring)."""
    g = _Graph(model)
    plan = RouterPlan()
    protected: set[str] = set()
    for node in g.nodes:
        if node.op_type == "TopK":
            match = _match_router(g, node)
            if match is not None:
                plan.routers.append(match[0])
                protected.update(match[1])
    # Tensors produced by the router: outputs of protected nodes, plus chain intermediates.
    produced = {out for node in g.nodes if node.name in protected for out in node.output}
    changed = True
    while changed:  # graphs are topologically sorted, so this settles in one or two passes
        changed = False
        for node in g.nodes:
            if node.name in protected or node.op_type in _COMPUTE_OPS:
                continue
            inputs = g.dynamic_inputs(node)
            if inputs and all(i in produced for i in inputs) and all(g.is_float(o) for o in node.output if o):
                protected.add(node.name)
                produced.update(o for o in node.output if o)
                changed = True
    plan.nodes = [node.name for node in g.nodes if node.name in protected]
    plan.op_types = dict(sorted(Counter(node.op_type for node in g.nodes if node.name in protected).items()))
    return plan


class ExpertGroup(NamedTuple):
    """Key of one group of expert MatMuls (one per expert, same projection, same layer).

    ``rows``: the expert-sorted rows tensor the experts' segments are cut from; ``crossed``: how many of the
    expert's own MatMuls lie between those rows and this MatMul (0: gate/up, 1: down); ``index``: numbers the
    MatMuls of one expert at the same depth (SwiGLU experts' separate gate and up).
    """

    rows: str
    crossed: int
    index: int

    @property
    def is_down_projection(self) -> bool:
        """The MatMul reads the expert's own hidden state (``down(silu(gate) * up)``), not its input rows."""
        return self.crossed > 0


def find_expert_matmuls(model: onnx.ModelProto) -> dict[ExpertGroup, list[onnx.NodeProto]]:
    """Expert MatMuls grouped per layer and projection, in expert order.

    The sorted dispatch cuts the expert-sorted rows with one ``Split`` by routing-computed counts and
    gives every expert ``MatMul(segment_e, W_e)`` with a 2-D ``W_e``; the capacity dispatch (and earlier
    moeport graphs) use ``MatMul(Slice(rows, start_e, end_e), W_e)``. A later projection of the same
    expert reads that MatMul's result through elementwise ops (``down(silu(gate) * up)``). The key is an
    ``ExpertGroup``, found by walking back along first inputs. Looks through Q/DQ/Cast, so
    it also works on quantized graphs. Groups of one MatMul are not experts and are left out.
    """
    g = _Graph(model)
    matmuls = ("MatMul", "MatMulInteger", "MatMulNBits")
    # (rows, crossed) -> expert -> MatMuls in graph order
    found: dict[tuple[str, int], dict[int, list[onnx.NodeProto]]] = {}
    slice_position = {node.name: i for i, node in enumerate(g.nodes) if node.op_type == "Slice"}
    for node in g.nodes:
        if node.op_type not in matmuls or len(node.input) < 2:
            continue
        crossed, value = 0, node.input[0]
        for _ in range(_MAX_WALK):
            source = g.producer.get(value)
            while source is not None and source.op_type in _TRANSPARENT_OPS:
                value = source.input[0]
                source = g.producer.get(value)
            if source is None:
                break
            if source.op_type == "Slice" or _is_routed_split(g, source):
                # One expert: its Slice node, or its output of the routed Split.
                expert = slice_position[source.name] if source.op_type == "Slice" else list(source.output).index(value)
                found.setdefault((source.input[0], crossed), {}).setdefault(expert, []).append(node)
                break
            crossed += source.op_type in matmuls
            if not source.input:
                break
            value = source.input[0]
    groups: dict[ExpertGroup, list[onnx.NodeProto]] = {}
    for (rows, crossed), experts in found.items():
        for expert in sorted(experts):
            for j, node in enumerate(experts[expert]):
                groups.setdefault(ExpertGroup(rows, crossed, j), []).append(node)
    return {key: nodes for key, nodes in groups.items() if len(nodes) > 1}


def _is_routed_split(g: _Graph, node: onnx.NodeProto) -> bool:
    """A Split whose sizes are computed in the graph (the routing's per-expert counts), not constants."""
    return node.op_type == "Split" and len(node.input) > 1 and bool(node.input[1]) and node.input[1] not in g.constants


def float_router_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count of router nodes in ``model`` that compute in float32: no float16 output and no
    input from a DequantizeLinear. Found again on the output because quantize_dynamic rewrites a Gemm gate
    as a (renamed, still float) MatMul and fp16 adds Casts at the router's edges."""
    g = _Graph(model)
    names = set(find_routers(model).nodes)
    counts: Counter = Counter()
    for node in g.nodes:
        if node.name not in names:
            continue
        outputs_fp32 = all(g.elem_type.get(o) != onnx.TensorProto.FLOAT16 for o in node.output if o)
        dequantized = any(g.producer.get(i) is not None and g.producer[i].op_type == "DequantizeLinear"
                          for i in node.input)
        if outputs_fp32 and not dequantized and node.op_type != "Cast":  # Casts are counted on their own
            counts[node.op_type] += 1
    return dict(sorted(counts.items()))
