"""The MoE structure of an ONNX graph, from the graph alone (no torch, no weights): routers and expert MatMuls.

Shared by quantization (keep routers float, treat experts and their down projections apart) and the runtime's
expert-efficiency measurement, so both see the same experts. Works on exported fp32 graphs and on quantized
ones (it looks through QuantizeLinear/DequantizeLinear/Cast and knows the quantized MatMul ops).

Routers (``find_routers``): a router is a node that selects experts -- TopK over float scores, or ArgMax --
whose scores come from a gate projection (MatMul/Gemm with a constant weight) through anything but another
projection, within ``_MAX_ROUTER_NODES`` nodes. That covers the shapes of every supported family:
``gate -> Softmax -> TopK`` (Mixtral, Qwen, OLMoE ...), ``gate -> Sigmoid [+ correction bias] -> TopK``,
``gate -> TopK -> Softmax`` over the picked logits (GraniteMoE, gpt-oss), grouped top-k (DeepSeek-V3, GLM-4:
a TopK over group scores masks the scores of a final TopK) and phimoe's sparsemixer (two ArgMax, the second
over the scores with the first pick masked), and in a quantized graph a QMoE that picks from the gate's logits
itself (``routes_in_kernel``). A selection inside another's chain (a group pick, a first pick)
belongs to that router; a TopK over integers (the sorted dispatch's argsort) is no router. Its protected set
is the chain from gate to selection plus every node downstream whose dynamic inputs all come from the router
and whose outputs are float or boolean masks (the top-k weight normalisation: Softmax of picked logits,
ReduceSum/Div, GatherElements of sigmoid scores, scaling Mul, the Reshape feeding the dispatch). The walk
stops at integer tensors (expert ids go on into the dispatch's sort keys, which no quantizer touches) and at
any node that also reads a non-router tensor (the expert MatMuls, the weighted combine), so the dispatch
itself stays quantizable. Tensors computed from constants and shapes alone (``Shape`` -> ``Gather`` ->
``Concat`` ...) count as constants throughout.

Why keep routers in float: onnxruntime's default QDQ op list quantizes the Softmax output to a fixed [0, 1]
uint8 grid, which creates ties that TopK breaks toward the lowest index. Measured on random MoE layers
(onnxruntime 1.32, CPU): the same expert set for 98.6% of tokens with E=8, k=2; 74.5% with E=64, k=8; 67.1%
with E=128, k=8. Quantizing only the layer feeding the router still flipped ~2% of tokens.

Experts (``find_expert_matmuls``, ``expert_layers``): see ``find_expert_matmuls``.
"""
from __future__ import annotations

import functools
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moeport._fs import SHAPE_VALUE_BYTES, check_single_links, load_model_proto

_SCORE_OPS = ("Softmax", "Sigmoid")
# Ops the closure never crosses: they do the experts' compute, not the routing arithmetic.
_COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "MatMulInteger", "MatMulNBits", "QLinearMatMul"})
# Quantizer-inserted ops a backward walk may look through when analysing an already quantized graph.
_TRANSPARENT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast"})
_MAX_WALK = 12  # nodes walked from an expert MatMul to its segment or its routing weight (SwiGLU needs 5)
# The ops that pick experts, and how many nodes may lie between a gate and its pick (grouped top-k needs ~15).
_SELECTION_OPS = frozenset({"TopK", "ArgMax"})
# onnxruntime's QMoE picks experts itself from router_probs (input 1) when it has no router_weights (input 14):
# moeport writes it so for routers whose weights are the softmax of the top-k logits (quant.passes.FuseExpertsPass).
_QMOE_ROUTER_WEIGHTS = 14
_MAX_ROUTER_NODES = 64
_SHAPE_OPS = frozenset({"Shape", "Size"})
_FOUR_BIT_TYPES = frozenset({TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1})
# The MatMuls that may carry an expert's weight, float or quantized.
_EXPERT_OPS = frozenset({"MatMul", "MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul"})
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})


@dataclass
class Router:
    """One router: its gate projection, its Softmax/Sigmoid ("" when it ranks raw logits and normalises
    nothing), the node that selects the experts (TopK, or the last ArgMax of a sparsemixer) and their tensors."""

    gate: str
    score: str
    selection: str
    scores_output: str  # the tensor the selection ranks: [tokens, E] float
    indices_output: str  # the selected experts: [tokens, k] int64 ("" when a QMoE selects them inside)
    num_experts: int | None = None  # E, where shape inference knows the scores' last axis


@dataclass
class RouterPlan:
    """Every router of a graph and the node names to keep in float32."""

    routers: list[Router] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # graph order
    op_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"routers": len(self.routers), "nodes": len(self.nodes), "op_types": self.op_types}


class _Graph:
    """Producer/consumer maps of a graph, with constants marked: initializers, Constant outputs, and whatever is
    computed from constants and shapes alone (``Shape``/``Size`` outputs, shape arithmetic on them, a
    ConstantOfShape of it, a Cast or DequantizeLinear of an initializer)."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.model = model
        self.nodes = list(graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.constants = set(self.initializers)
        changed = True
        while changed:  # one pass for a topologically sorted graph; the second confirms it
            changed = False
            for node in self.nodes:
                if node.output[0] in self.constants:
                    continue
                inputs = [i for i in node.input if i]
                if node.op_type in _SHAPE_OPS or (inputs and all(i in self.constants for i in inputs)) or \
                        (node.op_type == "Constant"):
                    self.constants.update(o for o in node.output if o)
                    changed = True

    @functools.cached_property
    def _inferred(self) -> list[onnx.ValueInfoProto]:
        """Shape inference on the graph without its weights (a protobuf over 2 GB cannot be inferred, and
        weights add nothing to it)."""
        try:
            inferred = onnx.shape_inference.infer_shapes(weightless(self.model), strict_mode=False, data_prop=False)
            graph = inferred.graph
        except onnx.shape_inference.InferenceError:
            # Without types the float test below falls back to "unknown = float": the plan only grows.
            graph = self.model.graph
        return [v for v in (*graph.value_info, *graph.output, *graph.input) if v.type.HasField("tensor_type")]

    @functools.cached_property
    def elem_type(self) -> dict[str, int]:
        """Tensor name -> ONNX element type, where shape inference could tell."""
        return {v.name: v.type.tensor_type.elem_type for v in self._inferred}

    def last_dim(self, name: str) -> int | None:
        """The size of the last axis of ``name`` when shape inference knows it."""
        dims = next((v.type.tensor_type.shape.dim for v in self._inferred if v.name == name), None)
        return dims[-1].dim_value or None if dims else None

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

    def is_float_or_mask(self, name: str) -> bool:
        return self.is_float(name) or self.elem_type.get(name) == TensorProto.BOOL

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant held in the graph (an initializer with its data, a Constant node); None
        when it is not one or its data is not loaded."""
        init = self.initializers.get(name)
        if init is not None:
            if init.data_location == TensorProto.EXTERNAL or (not init.raw_data and not _typed_data(init)):
                return None
            return numpy_helper.to_array(init)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None


def load_graph(path: str | os.PathLike, single_links: bool = False) -> onnx.ModelProto:
    """The graph of the ONNX file ``path`` without its weights: what every analysis here needs, at any model size.

    Initializers keep name, type and dims; their data only when small (shapes, axes, biases: shape inference
    and ``_Graph.value`` read those), loaded from external data where they live there. External-data locations
    are checked before anything is read (``moeport._fs.load_model_proto``); ``single_links`` also refuses external
    data files with several hard links (``moeport._fs.check_single_links``: onnx_ir will not read them).
    """
    proto = load_model_proto(path, inline_up_to=SHAPE_VALUE_BYTES)
    if single_links:
        check_single_links(proto, path)  # before ``weightless`` drops the locations
    return weightless(proto)


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers over ``SHAPE_VALUE_BYTES`` carry name, type, dims and data
    location only (no data, in the proto or outside it); nodes, I/O, value info, functions and metadata are
    copied."""
    skeleton = onnx.ModelProto()
    for field_name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(skeleton, field_name, getattr(model, field_name))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.metadata_props.extend(model.metadata_props)
    skeleton.functions.extend(model.functions)
    graph, source = skeleton.graph, model.graph
    graph.name = source.name
    for field_name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field_name).extend(getattr(source, field_name))
    for init in source.initializer:
        if tensor_nbytes(init) <= SHAPE_VALUE_BYTES:
            graph.initializer.append(init)
        else:
            # Where the data lives is kept (an external model's output is written with external data too).
            graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims,
                                  data_location=init.data_location)
    return skeleton


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of ``tensor``'s data from its type and dims (whether the data is loaded, external or stripped);
    4-bit types pack two values a byte."""
    count = math.prod(tensor.dims)
    if tensor.data_type in _FOUR_BIT_TYPES:
        return (count + 1) // 2
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return tensor.ByteSize()
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def weight_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the initializers' data, from their types and dims (the graph may be loaded without weights)."""
    return sum(tensor_nbytes(init) for init in proto.graph.initializer)


def _typed_data(tensor: onnx.TensorProto) -> bool:
    return any(len(getattr(tensor, f)) for f in ("float_data", "int32_data", "int64_data", "double_data",
                                                  "uint64_data", "string_data"))


def routes_in_kernel(node: onnx.NodeProto) -> bool:
    """``node`` is a QMoE that selects and weights the experts itself, from its ``router_probs`` (no
    ``router_weights``): its router's TopK and Softmax are inside the kernel, computed in float32."""
    return node.op_type == "QMoE" and (len(node.input) <= _QMOE_ROUTER_WEIGHTS or not node.input[_QMOE_ROUTER_WEIGHTS])


#: Node metadata on a QMoE that routes in the kernel: the name of the selected-experts tensor ([tokens, k]) of the
#: router it replaced, so that routing can still be compared with the model it was quantized from.
ROUTER_INDICES_KEY = "moeport.router_indices"


def kernel_routed_indices(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """The selections made inside QMoE kernels: replaced TopK indices name -> (the kernel's router_probs, k)."""
    found = {}
    for node in model.graph.node:
        indices = next((p.value for p in node.metadata_props if p.key == ROUTER_INDICES_KEY), None)
        if indices and routes_in_kernel(node):
            k = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "k")
            found[indices] = (node.input[1], int(k))
    return found


def top_k_as_qmoe(router_probs: np.ndarray, k: int) -> np.ndarray:
    """The experts a QMoE picks from ``router_probs [tokens, E]``: ``[tokens, k]`` int64, largest first, equal
    scores to the higher index, as onnxruntime's CPU kernel does (test_quant checks it against the kernel)."""
    experts = router_probs.shape[-1]
    reversed_order = np.argsort(-router_probs.reshape(-1, experts)[:, ::-1], axis=-1, kind="stable")[:, :k]
    return (experts - 1 - reversed_order).astype(np.int64)


def _scores_of(select: onnx.NodeProto) -> str:
    """The tensor a selection ranks: a QMoE's router_probs, else its first input."""
    return select.input[1] if select.op_type == "QMoE" else select.input[0]


def _selection_region(g: _Graph, select: onnx.NodeProto) -> tuple[list[onnx.NodeProto], set[str]] | None:
    """The gate projections a selection's scores come from and every node between them and the selection
    (walking back from its scores through anything but a projection; constants and shape arithmetic are not
    walked); None when the scores are not a router's: not float, not from a projection with a constant
    weight, also from an activation x activation product or a graph input, or farther than
    ``_MAX_ROUTER_NODES``."""
    if not g.is_float(_scores_of(select)):
        return None  # a sort of integer keys (the sorted dispatch's argsort), not a choice among scores
    gates: list[onnx.NodeProto] = []
    region: set[str] = set()
    pending = [_scores_of(select)]
    while pending:
        value = pending.pop()
        node = g.producer.get(value)
        if node is None:
            return None  # straight from a graph input
        if node.name in region or node in gates:
            continue
        if node.op_type in _COMPUTE_OPS:
            weight = node.input[3] if node.op_type == "QLinearMatMul" else node.input[1]
            if weight not in g.constants:
                return None  # attention-like: scores of activations against activations
            gates.append(node)
            continue
        region.add(node.name)
        if len(region) > _MAX_ROUTER_NODES:
            return None
        pending += g.dynamic_inputs(node)
    return (gates, region) if gates else None


def _indices_of(g: _Graph, select: onnx.NodeProto, chain: set[str]) -> str:
    """The selected experts ``[tokens, k]``: TopK's indices; for ArgMax selections (phimoe's sparsemixer picks
    top-2 as two ArgMax, the second over scores with the first masked), the Concat of the chain's ArgMax
    outputs when there is one."""
    if select.op_type == "QMoE":
        return ""  # chosen inside the kernel: no tensor holds them
    if select.op_type == "TopK":
        return select.output[1]
    argmax = {node.output[0] for node in g.nodes if node.op_type == "ArgMax" and (node.name in chain or node is select)}
    for consumer in g.consumers.get(select.output[0], []):
        if consumer.op_type == "Concat" and all(i in argmax for i in consumer.input):
            return consumer.output[0]
    return select.output[0]


def _routers(g: _Graph) -> list[tuple[Router, set[str]]]:
    """Every router of the graph with the names of its chain (gate to selection)."""
    candidates = {}
    for node in g.nodes:
        if node.op_type in _SELECTION_OPS or routes_in_kernel(node):
            found = _selection_region(g, node)
            if found is not None:
                candidates[node.name] = (node, *found)
    # A selection inside another's region picks groups for it (grouped top-k) or is the first pick of a
    # sparsemixer: part of that router, not one of its own.
    inner = set().union(*(region for _, _, region in candidates.values())) if candidates else set()
    # A QMoE that routes itself while the graph keeps its router's TopK (an export with routing outputs): the
    # TopK is the router.
    graph_gates = {gate.name for select, gates, _ in candidates.values() if select.op_type != "QMoE" for gate in gates}
    routers = []
    for name, (select, gates, region) in candidates.items():
        if name in inner or (select.op_type == "QMoE" and graph_gates & {gate.name for gate in gates}):
            continue
        chain = region | {select.name} | {gate.name for gate in gates}
        routers.append((Router(gates[0].name, "", select.name, _scores_of(select), _indices_of(g, select, chain),
                               g.last_dim(_scores_of(select))), chain))
    return routers


def find_routers(model: onnx.ModelProto) -> RouterPlan:
    """Every router in ``model`` and the nodes to keep in float32 (see the module docstring)."""
    return _plan(_Graph(model))


def _plan(g: _Graph) -> RouterPlan:
    plan = RouterPlan()
    protected: set[str] = set()
    found = _routers(g)
    for router, chain in found:
        plan.routers.append(router)
        protected.update(chain)
    # Tensors produced by the router: outputs of protected nodes, plus chain intermediates (not a QMoE's: its
    # output is the experts').
    produced = {out for node in g.nodes if node.name in protected and node.op_type != "QMoE" for out in node.output}
    changed = True
    while changed:  # graphs are topologically sorted, so this settles in one or two passes
        changed = False
        for node in g.nodes:
            if node.name in protected or node.op_type in _COMPUTE_OPS:
                continue
            inputs = g.dynamic_inputs(node)
            if inputs and all(i in produced for i in inputs) and all(g.is_float_or_mask(o) for o in node.output if o):
                protected.add(node.name)
                produced.update(o for o in node.output if o)
                changed = True
    # Each router's score op: the first Softmax/Sigmoid of its chain, or after the selection (TopK over raw
    # logits, then Softmax over the k picked).
    for router, chain in found:
        closure = chain | _downstream(g, chain, protected)
        router.score = next((n.name for n in g.nodes if n.name in closure and n.op_type in _SCORE_OPS), "")
    plan.nodes = [node.name for node in g.nodes if node.name in protected]
    plan.op_types = dict(sorted(Counter(node.op_type for node in g.nodes if node.name in protected).items()))
    return plan


def _downstream(g: _Graph, chain: set[str], protected: set[str]) -> set[str]:
    """The protected nodes reached from ``chain``'s outputs through protected nodes (one router's closure)."""
    reached: set[str] = set()
    pending = [o for node in g.nodes if node.name in chain for o in node.output if o]
    while pending:
        for consumer in g.consumers.get(pending.pop(), []):
            if consumer.name in protected and consumer.name not in chain and consumer.name not in reached:
                reached.add(consumer.name)
                pending += [o for o in consumer.output if o]
    return reached


class ExpertGroup(NamedTuple):
    """Key of one group of expert MatMuls (one per expert, same projection, same layer).

    ``rows``: the tensor that identifies the layer's dispatch -- the expert-sorted rows the experts' segments
    are cut from (sorted, capacity), or the routing weights ``[tokens, E]`` that scale each expert's output
    (dense); ``crossed``: how many of the expert's own MatMuls lie between its input and this MatMul (0:
    gate/up, 1: down); ``index``: numbers the MatMuls of one expert at the same depth (SwiGLU experts'
    separate gate and up).
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

    An expert MatMul has a constant weight (an initializer, or a DequantizeLinear/Cast of one, or a
    quantized op's packed weight) and is tied to one expert by the dispatch:

    - sorted: the expert-sorted rows are cut with one ``Split`` by routing-computed counts, and expert e runs
      ``MatMul(segment_e, W_e)``;
    - capacity (and earlier moeport graphs): ``MatMul(Slice(rows, start_e, end_e), W_e)``, a Slice of rows
      (axis 0; a Slice along another axis, such as gpt-oss's interleaved gate/up, is part of the expert);
    - dense: every expert reads all tokens and its output is scaled by column e of the router's weights
      ``[tokens, E]`` (``Mul(y_e, Slice(weights, e, e + 1))``).

    A later projection of the same expert reads that MatMul's result through elementwise ops (``down(silu(gate)
    * up)``). Segments are found by walking back along first inputs, dense columns by walking forward.
    Looks through Q/DQ/Cast, so it also works on quantized graphs. Groups of one MatMul are not experts and
    are left out.
    """
    g = _Graph(model)
    # (rows, crossed) -> expert -> MatMuls in graph order
    found: dict[tuple[str, int], dict[int, list[onnx.NodeProto]]] = {}
    slice_position = {node.name: i for i, node in enumerate(g.nodes) if node.op_type == "Slice"}
    unplaced = []
    for node in g.nodes:
        if node.op_type not in _EXPERT_OPS or len(node.input) < 2 or node.input[1] not in g.constants:
            continue
        segment = _segment_of(g, node, slice_position)
        if segment is None:
            unplaced.append(node)
        else:
            rows, crossed, expert = segment
            found.setdefault((rows, crossed), {}).setdefault(expert, []).append(node)
    protected = set(_plan(g).nodes) if unplaced else set()
    columns = _dense_columns(g, protected) if unplaced else {}
    if columns:
        dense: dict[str, list[tuple[int, int, onnx.NodeProto]]] = {}  # rows -> (MatMuls after, expert, node)
        for node in unplaced:
            placed = _column_of(g, node, columns, protected)
            if placed is not None:
                rows, after, expert = placed
                dense.setdefault(rows, []).append((after, expert, node))
        for rows, members in dense.items():
            depth = max(after for after, _, _ in members)  # the down projection has no expert MatMul after it
            for after, expert, node in members:
                found.setdefault((rows, depth - after), {}).setdefault(expert, []).append(node)
    groups: dict[ExpertGroup, list[onnx.NodeProto]] = {}
    for (rows, crossed), experts in found.items():
        for expert in sorted(experts):
            for j, node in enumerate(experts[expert]):
                groups.setdefault(ExpertGroup(rows, crossed, j), []).append(node)
    return {key: nodes for key, nodes in groups.items() if len(nodes) > 1}


def expert_layers(model: onnx.ModelProto) -> list[dict[ExpertGroup, list[onnx.NodeProto]]]:
    """``find_expert_matmuls`` per MoE layer (the groups that share ``rows``), layers in graph order -- which is
    model order: an exported graph computes layer i before layer i + 1."""
    position = {node.name: i for i, node in enumerate(model.graph.node)}
    layers: dict[str, dict[ExpertGroup, list[onnx.NodeProto]]] = {}
    groups = find_expert_matmuls(model)
    for group in sorted(groups, key=lambda key: min(position[n.name] for n in groups[key])):
        layers.setdefault(group.rows, {})[group] = groups[group]
    return list(layers.values())


def _segment_of(g: _Graph, node: onnx.NodeProto, slice_position: dict[str, int]) -> tuple[str, int, int] | None:
    """(rows, crossed, expert) of an expert MatMul of the sorted or capacity dispatch, walking back along first
    inputs; None when no segment is within reach.

    Where the sorted dispatch gates all experts' rows at once (concatenated, gated, cut again by the same counts),
    a down projection's segment is a cut of the gated rows: the walk goes on through that expert's input of the
    Concat to the segment of the layer's rows, so both projections of an expert get the same rows and expert."""
    crossed, value, expert = 0, node.input[0], None
    for _ in range(_MAX_WALK):
        source = g.producer.get(value)
        while source is not None and source.op_type in _TRANSPARENT_OPS:
            value = source.input[0]
            source = g.producer.get(value)
        if source is None:
            return None
        if _is_routed_split(g, source):
            index = list(source.output).index(value)
            concat = _gated_rows_concat(g, source) if expert is None else None
            if concat is None:
                return source.input[0], crossed, index if expert is None else expert
            expert, value = index, concat.input[index]
            continue
        if _is_row_slice(g, source):
            return source.input[0], crossed, slice_position[source.name]
        crossed += source.op_type in _EXPERT_OPS
        if not source.input:
            return None
        value = source.input[0]
    return None


def _gated_rows_concat(g: _Graph, split: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Concat of the experts' first projections where the routed ``split`` cuts rows that were gated once for
    all experts (``strategies.sorted_dispatch``); None where ``split`` cuts anything else.

    The Concat is reached from the split's input through non-expert ops along first inputs, has one input per
    segment, and its first input comes (through one expert MatMul) from a Split by the same counts: a Concat of
    an earlier layer's experts was cut by that layer's own counts."""
    value = split.input[0]
    for _ in range(_MAX_WALK):
        source = g.producer.get(value)
        if source is None or source.op_type in _EXPERT_OPS or _is_routed_split(g, source):
            return None
        if source.op_type == "Concat" and len(source.input) == len(split.output):
            return source if _first_segment_counts(g, source.input[0]) == split.input[1] else None
        if not source.input:
            return None
        value = source.input[0]
    return None


def _first_segment_counts(g: _Graph, value: str) -> str | None:
    """The counts input of the routed Split that ``value`` is computed from, through at most one expert MatMul."""
    crossed = 0
    for _ in range(_MAX_WALK):
        source = g.producer.get(value)
        if source is None or not source.input:
            return None
        if _is_routed_split(g, source):
            return source.input[1]
        crossed += source.op_type in _EXPERT_OPS
        if crossed > 1:
            return None
        value = source.input[0]
    return None


def _is_routed_split(g: _Graph, node: onnx.NodeProto) -> bool:
    """A Split whose sizes are computed in the graph (the routing's per-expert counts), not constants."""
    return node.op_type == "Split" and len(node.input) > 1 and bool(node.input[1]) and node.input[1] not in g.constants


def _is_row_slice(g: _Graph, node: onnx.NodeProto) -> bool:
    """A Slice of rows (axis 0), or of axes the graph does not say."""
    if node.op_type != "Slice":
        return False
    axes = g.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    return axes is None or axes.reshape(-1).tolist() == [0]


def _dense_columns(g: _Graph, protected: set[str]) -> dict[str, tuple[str, int]]:
    """Output of each router-computed ``Slice`` of a router-computed tensor -> (that tensor, its column's order
    among that tensor's Slices): the dense dispatch's per-expert weights ``[tokens, 1]``. ``protected``: the
    routers' nodes."""
    produced = {o for node in g.nodes if node.name in protected for o in node.output}
    columns: dict[str, tuple[str, int]] = {}
    count: Counter = Counter()
    for node in g.nodes:
        if node.op_type == "Slice" and node.name in protected and node.input[0] in produced:
            columns[node.output[0]] = (node.input[0], count[node.input[0]])
            count[node.input[0]] += 1
    return columns


def _column_of(g: _Graph, node: onnx.NodeProto, columns: dict[str, tuple[str, int]],
               protected: set[str]) -> tuple[str, int, int] | None:
    """(rows, expert MatMuls after this one, expert) of a dense expert MatMul: walking forward through at most
    one more of the expert's MatMuls to the ``Mul`` by its routing-weight column; None when there is none.
    The walk never enters a router (``protected``): a MatMul before the MoE layer reaches the columns that way."""
    frontier, seen = [(node.output[0], 0)], set()
    for _ in range(_MAX_WALK):
        reached = []
        for value, after in frontier:
            for consumer in g.consumers.get(value, []):
                if consumer.name in seen or consumer.name in protected:
                    continue
                seen.add(consumer.name)
                column = next((columns[i] for i in consumer.input if i in columns), None)
                if consumer.op_type == "Mul" and column is not None:
                    return column[0], after, column[1]
                crossed = after + (consumer.op_type in _EXPERT_OPS)
                if crossed <= 1:  # an expert has two levels of MatMuls; further on is the next layer
                    reached += [(out, crossed) for out in consumer.output if out]
        frontier = reached
    return None


def float_router_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count of router nodes in ``model`` that compute in float32: no float16 output and no
    input from a DequantizeLinear. Found again on the output because quantize_dynamic rewrites a Gemm gate
    as a (renamed, still float) MatMul and fp16 adds Casts at the router's edges. A QMoE that routes in the
    kernel counts as its router's top-k and softmax: it computes them in float32 from the float32 logits."""
    g = _Graph(model)
    names = set(_plan(g).nodes)
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
