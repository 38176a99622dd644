"""Graph passes run on the finished ONNX graph (an ``onnx_ir`` model, changed in place), as onnx_ir passes.

Each pass is an ``onnx_ir.passes.InPlacePass`` (``PassResult(model, modified)``) with post-conditions
(``ensures``); ``ExportPass`` adds what it changed (``changed``) and, when it changed nothing, why
(``reason``). ``EXPORT_PASSES`` is the exporter's list, run in that order by ``run_export_passes`` through an
``onnx_ir`` ``PassManager`` (a failing pass is re-raised naming it).

``FloorAttentionScores``: attention probabilities without subnormal numbers.

Masked attention scores are the row's real scores plus a huge negative number (transformers adds
``finfo.min``; the sample family writes ``-inf``). onnxruntime's CPU ``Softmax`` (MLAS) clamps
``score - row_max`` to about -88.4 before its exponential, so inside the kernel every masked entry becomes
``exp(-88.4) ~= 4e-39`` -- a subnormal float (the output is 0 again after the division by the row sum).
Arithmetic on subnormals takes a slow microcode path on x86: measured here,
``Softmax`` over a causal [4, 8, 128, 128] block took 0.66 ms against 0.10 ms for the same block without
masked entries. (onnxruntime's ``session.set_denormal_as_zero`` only covers its own pool threads, not the
calling thread that shares the work.)

The pass raises each score to at least ``row_max - 60`` before the Softmax: ``exp(-60) ~= 8.8e-27`` stays a
normal float even divided by a million keys, and it is ~1e-19 of the float32 resolution of the row's largest
probability, so the result is the same to float32 precision (masked keys get ~1e-26 instead of ~1e-39).
Measured on the same block: 0.23 ms with the three extra nodes (ReduceMax, Add, Max).

``SharedKeyValueHeads``: grouped-query attention on the key/value heads as they are (see its docstring).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from moeport.runtime.fusions import fuse_group_query_attention, fused_note

# exp(-60) is a normal float32 (min normal ~1.2e-38) even after dividing by 1e6 keys.
SCORE_FLOOR = -60.0


def _attention_softmaxes(model):
    """Softmax nodes whose probabilities feed a MatMul (attention's ``probs @ V``); routers feed TopK."""
    for node in model.graph.all_nodes():
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
            continue
        users = [user for user, _ in node.outputs[0].uses()]
        if users and all(user.op_type == "MatMul" for user in users):
            yield node


class ExportPass(ir.passes.InPlacePass):
    """An in-place rewrite that counts what it changed (``changed``) and says why when that is nothing."""

    #: Why a graph may have nothing for this pass to do (reported when it changed nothing).
    nothing_to_do = ""

    def __init__(self):
        self.changed = 0
        self.reason: str | None = None

    def rewrite(self, model: ir.Model) -> int:
        """Change ``model`` in place; return how many places were rewritten."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.changed = self.rewrite(model)
        self.reason = None if self.changed else self.nothing_to_do
        return ir.passes.PassResult(model, modified=self.changed > 0)

    def report(self) -> dict:
        return {"pass": type(self).__name__, "changed": self.changed, "reason": self.reason}


class FloorAttentionScores(ExportPass):
    """Insert ``x = Max(x, ReduceMax(x, axis) + floor)`` before each attention Softmax (see the module doc)."""

    nothing_to_do = "no Softmax feeds a MatMul (no attention probabilities in this graph)"

    def __init__(self, floor: float = SCORE_FLOOR):
        super().__init__()
        self.floor = floor

    def rewrite(self, model: ir.Model) -> int:
        return _floor_attention_scores(model, self.floor)

    def ensures(self, model: ir.Model) -> None:
        for node in _attention_softmaxes(model):
            producer = node.inputs[0].producer()
            if producer is None or producer.op_type != "Max":
                raise ir.passes.PostconditionError(f"{type(self).__name__}: attention Softmax {node.name!r} does not "
                                                   "read floored scores")


class ReciprocalSqrtAsDiv(ExportPass):
    """``Mul(x, Reciprocal(Sqrt(v)))`` -> ``Div(x, Sqrt(v))`` (see ``_reciprocal_sqrt_as_div``)."""

    nothing_to_do = "no Mul of a Reciprocal(Sqrt(.)) (no RMSNorm written with rsqrt)"

    def rewrite(self, model: ir.Model) -> int:
        return _reciprocal_sqrt_as_div(model)


class DropSplitNumOutputs(ExportPass):
    """Remove ``num_outputs`` from Splits that also have a ``split`` input.

    ONNX forbids both on one Split, but torch.onnx needs ``num_outputs`` to count a custom op's outputs
    (the sorted dispatch's routed Split, exporter/custom_ops.py); the finished graph must not keep it.
    """

    nothing_to_do = "no Split with both a split input and num_outputs (no routed dispatch in this graph)"

    def rewrite(self, model: ir.Model) -> int:
        changed = 0
        for node in _split_with_sizes(model):
            if node.attributes.pop("num_outputs", None) is not None:
                changed += 1
        return changed

    def ensures(self, model: ir.Model) -> None:
        if any("num_outputs" in node.attributes for node in _split_with_sizes(model)):
            raise ir.passes.PostconditionError(f"{type(self).__name__}: a Split keeps num_outputs next to its split "
                                               "input")


class SharedKeyValueHeads(ExportPass):
    """Grouped-query attention on each key/value head as it is, instead of on a copy per query head.

    transformers' ``repeat_kv`` exports as ``Reshape(Expand(Unsqueeze(kv, 2), [B, kvh, rep, T, D]), [B, H, T, D])``
    for keys and values: every forward pass writes the whole key and value cache ``rep`` times over and attention
    reads the copies (the 24-layer granite-shaped model, 8 KV heads for 16 query heads: 2 x 2 x 24 x 512 x 512
    floats, 100 MB, written and read again per decode step at a 512-token context). The pass gives each group's
    query heads to its key/value head as rows instead:

    - query ``[B, H, S, D]`` -> ``[B, kvh, rep * S, D]`` (query head ``g * rep + r`` at position ``s`` becomes
      group ``g``, row ``r * S + s``; a Reshape, no copy);
    - scores ``[B, kvh, rep * S, T]`` against the un-repeated keys; an operand with a row per query position
      (the mask ``[B, 1, S, T]``) is tiled ``rep`` times along the rows, once per model;
    - probabilities times the un-repeated values ``[B, kvh, rep * S, D]`` -> ``[B, H, S, D]``.

    The same dot products and sums as before, so the outputs are equal to float32 rounding; all standard ops.
    Measured on that model's int4 file (benchmarks/decode_ab.py, see BENCHMARKS.md): decode +1-5% at a 128-token
    context, +15% at 512, prefill of 128 tokens -7%. An operand with a row per query head and position (gpt-oss's
    attention sinks, expanded to ``[B, H, S, 1]`` and concatenated to the scores) is grouped like the query. Left
    alone, with the reason: other nodes between the two MatMuls than elementwise ops and ReduceMax, Softmax,
    Concat and Slice over the keys; per-head operands that broadcast over the rows; other axes.
    """

    nothing_to_do = "no repeated key/value heads (Unsqueeze -> Expand -> Reshape) feed attention"

    def __init__(self):
        super().__init__()
        self.left: list[str] = []

    def rewrite(self, model: ir.Model) -> int:
        self.left = []
        return _shared_key_value_heads(model, self.left)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if not self.changed and self.left:
            self.reason = "repeated key/value heads left as they were: " + "; ".join(self.left)
        return result

    def report(self) -> dict:
        return {**super().report(), "left": list(self.left)}

    def ensures(self, model: ir.Model) -> None:
        missed = [node.name for node in model.graph if node.op_type == "Transpose"
                  and isinstance(_grouped_attention(node), _GroupedAttention)]
        if missed:
            raise ir.passes.PostconditionError(f"{type(self).__name__}: attention still reads repeated key/value "
                                               f"heads through {missed}")


class ClearNodeMetadata(ExportPass):
    """Drop the per-node provenance torch.onnx writes (FX node, stack trace, module path).

    Useful to debug the exporter, but a tenth to a third of a small model's file, it names paths of the exporting
    machine, and quantizers drop it anyway. The model's own ``metadata_props`` are stamped afterwards.
    """

    nothing_to_do = "no node carries metadata"

    def rewrite(self, model: ir.Model) -> int:
        changed = 0
        for node in model.graph.all_nodes():
            if node.metadata_props:
                node.metadata_props.clear()
                changed += 1
        return changed


#: Nodes that may sit between the scores MatMul and the probabilities' MatMul of an attention block: elementwise
#: (scale, mask, soft-capping, the score floor), the row reduction of the floor, the Softmax over the keys, and a
#: Concat / Slice along the keys (gpt-oss's attention sinks: one more column per row, dropped after the Softmax).
_SCORE_OPS = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Where", "Tanh", "Cast", "Identity", "ReduceMax", "Softmax",
              "Concat", "Slice"}
#: Inputs of those that are axes or positions, not tensors laid out like the scores.
_INDEX_INPUTS = {"ReduceMax": {1}, "Slice": {1, 2, 3, 4}}


@dataclasses.dataclass
class _Repeat:
    """``Reshape(Expand(Unsqueeze(kv, 2), [B, kvh, rep, T, D]), [B, kvh * rep, T, D])``: ``kv`` repeated per query
    head (transformers' ``repeat_kv``); ``nodes`` are the three nodes, ``heads`` = kvh * rep."""

    kv: ir.Value
    nodes: tuple[ir.Node, ir.Node, ir.Node]
    kv_heads: int
    heads: int

    @property
    def repeated(self) -> ir.Value:
        return self.nodes[-1].outputs[0]


def _repeat_of(value: ir.Value | None) -> _Repeat | None:
    """The ``_Repeat`` that produces ``value``, or None."""
    reshape = value.producer() if value is not None else None
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain not in ("", "ai.onnx"):
        return None
    expand = reshape.inputs[0].producer()
    if expand is None or expand.op_type != "Expand":
        return None
    unsqueeze = expand.inputs[0].producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.inputs) < 2:
        return None
    axes = ir.convenience.get_const_tensor(unsqueeze.inputs[1]) if unsqueeze.inputs[1] is not None else None
    kv, out = unsqueeze.inputs[0], reshape.outputs[0]
    if axes is None or axes.numpy().tolist() != [2] or kv.shape is None or out.shape is None:
        return None
    if kv.shape.rank() != 4 or out.shape.rank() != 4:
        return None
    kv_heads, heads = kv.shape[1], out.shape[1]
    if not (isinstance(kv_heads, int) and isinstance(heads, int) and heads > kv_heads and heads % kv_heads == 0):
        return None
    if any(len(n.outputs[0].uses()) != 1 for n in (unsqueeze, expand)):
        return None
    return _Repeat(kv, (unsqueeze, expand, reshape), kv_heads, heads)


@dataclasses.dataclass
class _GroupedAttention:
    """One attention block to rewrite: the scores MatMul ``q @ Transpose(keys)``, the nodes up to the
    probabilities' MatMul ``probs @ values``, and the operands from outside that need their rows tiled (shared
    by the heads) or grouped like the query (one row per query head and position)."""

    scores: ir.Node
    key_transpose: ir.Node
    keys: _Repeat
    region: list[ir.Node]
    tiled: list[tuple[ir.Node, int]]  # (node, input index) of [B, 1, S, T] operands such as the mask
    grouped: list[tuple[ir.Node, int]]  # (node, input index) of [B, H, S, T] operands such as gpt-oss's sinks
    probs_values: ir.Node
    values: _Repeat


def _grouped_attention(transpose: ir.Node) -> _GroupedAttention | str | None:
    """The block whose keys ``transpose`` transposes, the reason it cannot be rewritten, or None (not a key)."""
    keys = _repeat_of(transpose.inputs[0])
    if keys is None or tuple(transpose.attributes.get_ints("perm", ())) != (0, 1, 3, 2):
        return None
    uses = transpose.outputs[0].uses()
    if len(keys.repeated.uses()) != 1 or len(uses) != 1 or uses[0].node.op_type != "MatMul" or uses[0].idx != 1:
        return "the repeated keys feed more than the scores MatMul"
    scores = uses[0].node
    query = scores.inputs[0]
    if query.shape is None or query.shape.rank() != 4 or query.shape[1] != keys.heads:
        return f"the query is not [batch, {keys.heads} heads, sequence, head size]"
    region, tiled, grouped, ends, frontier = [], [], [], [], [scores.outputs[0]]
    inside = {scores}
    while frontier:
        value = frontier.pop()
        if value.is_graph_output():
            return f"{value.name!r}, between the scores and the probabilities, is a graph output"
        for use in value.uses():
            node = use.node
            if node in inside:
                continue
            if node.op_type == "MatMul" and use.idx == 0:
                ends.append(node)
                continue
            if node.op_type not in _SCORE_OPS or node.domain not in ("", "ai.onnx") or len(region) > 32:
                return f"{node.op_type} node {node.name!r} between the scores and the probabilities"
            inside.add(node)
            region.append(node)
            frontier.extend(node.outputs)
    if len(ends) != 1:
        return f"the scores reach {len(ends)} MatMuls, not one probabilities @ values"
    values = _repeat_of(ends[0].inputs[1])
    if values is None or values.kv_heads != keys.kv_heads or values.heads != keys.heads:
        return "the probabilities do not multiply values repeated like the keys"
    if len(values.repeated.uses()) != 1:
        return "the repeated values feed more than the probabilities' MatMul"
    for node in region:
        reason = _last_axis_only(node)
        if reason:
            return reason
        for index, operand in enumerate(node.inputs):
            if operand is None or operand.producer() in inside or index in _INDEX_INPUTS.get(node.op_type, ()):
                continue
            layout = _operand_layout(operand, keys.heads)
            if layout == "tile":
                tiled.append((node, index))
            elif layout == "group":
                grouped.append((node, index))
            elif layout is not None:
                return f"{node.op_type} node {node.name!r}: {layout}"
    return _GroupedAttention(scores, transpose, keys, region, tiled, grouped, ends[0], values)


def _last_axis_only(node: ir.Node) -> str | None:
    """Why ``node`` works on another axis than the keys' (None when it works on the last axis or elementwise)."""
    if node.op_type in ("Softmax", "Concat"):
        axes = [node.attributes.get_int("axis", -1)]
    elif node.op_type in ("ReduceMax", "Slice"):
        position = 1 if node.op_type == "ReduceMax" else 3
        value = node.inputs[position] if len(node.inputs) > position else None
        tensor = ir.convenience.get_const_tensor(value) if value is not None else None
        if tensor is None:
            return f"{node.op_type} node {node.name!r} has no constant axes"
        axes = tensor.numpy().reshape(-1).tolist()
    else:
        return None
    if all(axis in (-1, 3) for axis in axes):
        return None
    return f"{node.op_type} node {node.name!r} works on axes {axes}, not only the keys'"


def _operand_layout(operand: ir.Value, heads: int) -> str | None:
    """How an operand from outside the scores ``[B, H, S, T]`` goes with grouped rows ``[B, kvh, rep * S, T]``:
    None when it broadcasts over heads and rows as it is, ``"tile"`` when it has a row per query position but is
    shared by the heads (the mask: tiled once per query head of a group), ``"group"`` when it has a row per
    query position and head (gpt-oss's sinks: grouped like the query), else why it cannot be used."""
    tensor = ir.convenience.get_const_tensor(operand)
    if tensor is not None and tensor.size == 1:
        return None
    if operand.shape is None:
        return f"operand {operand.name!r} has no known shape"
    dims = [1] * (4 - operand.shape.rank()) + list(operand.shape)
    if len(dims) != 4:
        return f"operand {operand.name!r} of shape {list(operand.shape)} has more axes than the scores"
    if dims[1] == 1:
        if dims[2] == 1:
            return None
        return "tile" if operand.shape.rank() == 4 else (
            f"operand {operand.name!r} of shape {list(operand.shape)} has rows but no batch and head axes")
    if dims[1] == heads and dims[2] != 1 and operand.shape.rank() == 4:
        return "group"
    return f"operand {operand.name!r} of shape {list(operand.shape)} is not laid out per query position"


def _shared_key_value_heads(model: ir.Model, left: list[str]) -> int:
    graph = model.graph
    tiles: dict[tuple[ir.Value, int], ir.Value] = {}  # (operand, rep) -> its tiled rows, shared by the layers

    def constant(name: str, values: list[int]) -> ir.Value:
        value = graph.initializers.get(name)
        if value is None:
            value = ir.Value(name=name, const_value=ir.tensor(np.array(values, dtype=np.int64)))
            graph.register_initializer(value)
        return value

    changed = 0
    for transpose in [node for node in graph if node.op_type == "Transpose" and node.domain in ("", "ai.onnx")]:
        block = _grouped_attention(transpose)
        if block is None:
            continue
        if isinstance(block, str):
            left.append(f"{transpose.name}: {block}")
            continue
        kv_heads, heads = block.keys.kv_heads, block.keys.heads
        rep = heads // kv_heads
        query = block.scores.inputs[0]
        # [B, H, S, D] -> [B, kvh, rep * S, D]: 0 keeps an axis as it is, -1 takes the rest
        to_groups = constant(f"moeport_gqa_rows_{kv_heads}", [0, kv_heads, -1, 0])
        group_rows = ir.node("Reshape", [query, to_groups], name=f"{block.scores.name}_grouped_query")
        graph.insert_before(block.scores, group_rows)
        block.scores.replace_input_with(0, group_rows.outputs[0])
        block.key_transpose.replace_input_with(0, block.keys.kv)
        for node, index in block.tiled:
            operand = node.inputs[index]
            tiled = tiles.get((operand, rep))
            if tiled is None:
                tile = ir.node("Tile", [operand, constant(f"moeport_gqa_tile_{rep}", [1, 1, rep, 1])],
                               name=f"{operand.name}_tiled_{rep}")
                graph.insert_before(node, tile)
                tiled = tiles[(operand, rep)] = tile.outputs[0]
            node.replace_input_with(index, tiled)
        for node, index in block.grouped:
            operand = node.inputs[index]
            rows = ir.node("Reshape", [operand, to_groups], name=f"{node.name}_grouped_{index}")
            graph.insert_before(node, rows)
            node.replace_input_with(index, rows.outputs[0])
        # Rows are now (query head in the group, position): the shapes torch.onnx recorded no longer hold.
        for node in [block.scores, block.key_transpose, *block.region]:
            for value in node.outputs:
                value.shape = None
        probs_values = block.probs_values
        output = probs_values.outputs[0]
        probs_values.replace_input_with(1, block.values.kv)
        uses = list(output.uses())
        heads_back = ir.node("Reshape", [output, constant(f"moeport_gqa_heads_{heads}", [0, heads, -1, 0])],
                             name=f"{probs_values.name}_query_heads")
        heads_back.outputs[0].shape, heads_back.outputs[0].type = output.shape, output.type
        output.shape = None
        graph.insert_after(probs_values, heads_back)
        for use in uses:
            use.node.replace_input_with(use.idx, heads_back.outputs[0])
        if output.is_graph_output():  # the graph's output keeps its name and its [B, H, S, D] layout
            graph.outputs[graph.outputs.index(output)] = heads_back.outputs[0]
            name, output.name = output.name, f"{output.name}_grouped"
            heads_back.outputs[0].name = name
        for repeat in (block.keys, block.values):
            for node in reversed(repeat.nodes):
                graph.remove(node, safe=True)
        changed += 1
    if changed:
        # The Expand's shape computations are left without users.
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return changed


def _split_with_sizes(model: ir.Model):
    for node in model.graph.all_nodes():
        if node.op_type == "Split" and node.domain == "" and len(node.inputs) > 1 and node.inputs[1] is not None:
            yield node


class FuseAttention(ExportPass):
    """Each layer's attention of a with-past graph as onnxruntime's ``GroupQueryAttention`` (``runtime.fusions``),
    then the standard ops it replaced removed; opt-in (``export --fused-attention``). Why: the exported attention
    is ~30 standard ops a layer; on the 24-layer granite-shaped model fp32 decode went from 16.1 to 19.8 tokens/s on
    the shared buffer, which the kernel writes in place (18.3 -> 18.6 on the Concat cache; BENCHMARKS.md). A layer
    it does not match keeps its ops; its report's reason says what was fused and why the rest was not."""

    def __init__(self):
        super().__init__()
        self.left: list[str] = []

    def rewrite(self, model: ir.Model) -> int:
        fused, self.left = fuse_group_query_attention(model)
        if fused:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return fused

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        # Unlike the other passes, the report says what was done too: the CLI prints it as the `attention:` line.
        self.reason = "; ".join(filter(None, [fused_note(self.changed) if self.changed else "", *self.left]))
        return result


def export_passes() -> list[ExportPass]:
    """The exporter's passes, in the order they run (fresh instances: each records its own counts)."""
    return [DropSplitNumOutputs(), FloorAttentionScores(), SharedKeyValueHeads(), ReciprocalSqrtAsDiv(),
            ClearNodeMetadata()]


def run_export_passes(model: ir.Model, chosen: list[ExportPass] | None = None) -> list[dict]:
    """Run ``chosen`` (default ``export_passes()``) on ``model`` in place; per pass ``{"pass", "changed",
    "reason"}``."""
    chosen = export_passes() if chosen is None else chosen
    ir.passes.PassManager(chosen)(model)
    return [p.report() for p in chosen]


def _floor_attention_scores(model, floor: float = SCORE_FLOOR) -> int:
    changed = 0
    for node in list(_attention_softmaxes(model)):
        graph = node.graph
        scores = node.inputs[0]
        dtype = scores.dtype or ir.DataType.FLOAT
        axis = node.attributes["axis"].value if "axis" in node.attributes else -1
        name = node.name or f"softmax_{changed}"
        axes = ir.Value(name=f"{name}_floor_axes", const_value=ir.tensor(np.array([axis], dtype=np.int64)))
        offset = ir.Value(name=f"{name}_floor_offset",
                          const_value=ir.tensor(np.array(floor, dtype=dtype.numpy())))
        graph.register_initializer(axes)
        graph.register_initializer(offset)
        row_max = ir.node("ReduceMax", [scores, axes], attributes={"keepdims": 1}, name=f"{name}_row_max")
        lowest = ir.node("Add", [row_max.outputs[0], offset], name=f"{name}_floor")
        floored = ir.node("Max", [scores, lowest.outputs[0]], name=f"{name}_floored")
        graph.insert_before(node, [row_max, lowest, floored])
        node.replace_input_with(0, floored.outputs[0])
        changed += 1
    return changed


def _reciprocal_sqrt_as_div(model) -> int:
    """Rewrite ``Mul(x, Reciprocal(Sqrt(v)))`` as ``Div(x, Sqrt(v))``; returns how many.

    torch exports ``rsqrt`` (RMSNorm: ``x * rsqrt(mean(x^2) + eps)``) as Sqrt + Reciprocal + Mul.
    onnxruntime recognises RMSNorm only in the ``x / Sqrt(...)`` form and then runs one fused kernel instead
    of seven elementwise/reduce nodes (measured on the reference Mixtral: 4x128 prefill 22.6 -> 22.2 ms).
    The graph stays standard ONNX; x / s and x * (1 / s) differ by at most one rounding.
    """
    changed = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        for position, operand in enumerate(node.inputs):
            reciprocal = operand.producer() if operand is not None else None
            if reciprocal is None or reciprocal.op_type != "Reciprocal" or len(operand.uses()) != 1:
                continue
            sqrt = reciprocal.inputs[0].producer()
            if sqrt is None or sqrt.op_type != "Sqrt":
                continue
            other = node.inputs[1 - position]
            node.op_type = "Div"
            node.replace_input_with(0, other)
            node.replace_input_with(1, reciprocal.inputs[0])
            reciprocal.graph.remove(reciprocal, safe=True)
            changed += 1
            break
    return changed
