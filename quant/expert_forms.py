"""What one expert of a sorted-dispatch MoE layer computes, read from the graph, for ``passes.FuseExpertsPass``.

QMoE (onnxruntime, com.microsoft) runs one gated form on CPU: ``down(act(gate(x), up(x)))`` with
``act(g, u) = g' * sigmoid(alpha * g') * (u' + beta)``, ``g' = min(g, limit)``, ``u' = clip(u, -limit, limit)``
(no clipping without a limit), each projection with an optional bias. That covers SwiGLU (alpha 1, beta 0, no
limit: Mixtral, Qwen, DeepSeek, GraniteMoE, ...) and the clamped SwiGLU of gpt-oss, HunYuan-V4 and MiniMax-M3.
Gate and up are read wherever the export put them: two MatMuls on the expert's rows, or one MatMul over their
concatenated weights cut in halves by a Split or into even and odd columns by two Slices (gpt-oss). The gate
function may run per expert or once over all experts' projections (concatenated, gated, then cut by the routing's
counts for the down projections: the sorted dispatch of ``moeport.exporter.strategies``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from moeport.runtime.fusions import constant_ints, constant_scalar, only_user

# Slice ends at or beyond this are "to the end" (torch exports ``x[..., ::2]`` with INT64_MAX).
_TO_THE_END = 2 ** 31 - 1


@dataclass(frozen=True)
class Projection:
    """``x @ weight[:, columns] + bias[columns]`` (no bias when ``bias`` is None): ``weight`` a 2-D initializer
    ``[K, N]``, ``bias`` one of ``N`` values; ``columns`` selects all of them, or a half or every other one where
    gate and up are one matrix."""

    weight: ir.Value
    bias: ir.Value | None
    columns: slice
    bias_row: int | None = None  # the bias is this row of a 2-D table (a Gather at a constant index)

    @property
    def shape(self) -> tuple[int, int]:
        """``[K, width]`` of the columns used (-1 for a dimension that is not static)."""
        rows, width = (int(d) if isinstance(d, int) else -1 for d in self.weight.shape)
        return rows, len(range(*self.columns.indices(max(width, 0))))

    def matrix(self) -> np.ndarray:
        """The ``[K, width]`` weight of the columns used."""
        return self.weight.const_value.numpy()[:, self.columns]

    def bias_vector(self) -> np.ndarray:
        """The ``[width]`` bias of the columns used, zeros when there is none."""
        if self.bias is None:
            return np.zeros(self.shape[1], np.float32)
        table = self.bias.const_value.numpy()
        vector = table[self.bias_row] if self.bias_row is not None else table
        return vector.reshape(-1)[self.columns].astype(np.float32)


@dataclass(frozen=True)
class GatedExpert:
    """One expert: ``output = down(act(gate(x), up(x)))`` with ``act`` as in the module doc."""

    x: ir.Value  # the expert's rows [rows, K]
    gate: Projection
    up: Projection
    down: Projection
    output: ir.Value  # down's output, or its bias Add's
    alpha: float
    beta: float
    limit: float | None

    @property
    def activation(self) -> tuple[float, float, float | None]:
        return self.alpha, self.beta, self.limit


def gated_expert(down: ir.Node) -> GatedExpert | str:
    """The expert whose down projection is the MatMul ``down``, or why it is not in QMoE's gated form (a reason
    naming the ops it computes)."""
    product, expert = _producer(down.inputs[0]), None
    if product is not None and _is_routed_split(product):
        # the gated rows of all experts, cut by the routing's counts: this expert's projections are its inputs
        # of the Concat before the gate function
        expert, product = list(product.outputs).index(down.inputs[0]), _producer(product.inputs[0])
    if product is not None and product.op_type == "Mul":
        for gated_value, linear_value in (tuple(product.inputs), tuple(reversed(product.inputs))):
            gated = _gated(gated_value)
            linear = gated and _linear(linear_value, gated[2])
            if not linear:
                continue
            gate, up = _projection(gated[0], expert), _projection(linear[0], expert)
            if gate is None or up is None or gate[0] is not up[0]:
                continue
            down_projection = _down(down)
            if down_projection is None:
                break
            return GatedExpert(gate[0], gate[1], up[1], *down_projection, alpha=gated[1], beta=linear[1],
                               limit=gated[2])
    return (f"the expert computes {_ops_between(down)} between its projections, not down(silu(gate(x)) * up(x)) "
            "or its clamped form, the gated forms QMoE's kernel runs")


def _producer(value: ir.Value | None) -> ir.Node | None:
    return value.producer() if value is not None else None


def _gated(value: ir.Value) -> tuple[ir.Value, float, float | None] | None:
    """(gate, alpha, limit) where ``value`` is ``g * sigmoid(alpha * g)`` and ``g = min(gate, limit)`` (``g = gate``
    and limit None without a Clip)."""
    node = _producer(value)
    if node is None or node.op_type != "Mul":
        return None
    for g, sigmoid_value in (tuple(node.inputs), tuple(reversed(node.inputs))):
        sigmoid = _producer(sigmoid_value)
        if sigmoid is None or sigmoid.op_type != "Sigmoid" or g is None:
            continue
        argument, alpha = sigmoid.inputs[0], 1.0
        scaled = _producer(argument)
        if argument is not g and scaled is not None and scaled.op_type == "Mul":
            for operand, factor in (tuple(scaled.inputs), tuple(reversed(scaled.inputs))):
                if operand is g and constant_scalar(factor) is not None:
                    argument, alpha = g, constant_scalar(factor)
        if argument is not g:
            continue
        clip = _producer(g)
        if clip is not None and clip.op_type == "Clip":
            low = clip.inputs[1] if len(clip.inputs) > 1 else None
            limit = constant_scalar(clip.inputs[2]) if len(clip.inputs) > 2 else None
            if low is not None or limit is None:  # QMoE clamps the gate from above only
                return None
            return clip.inputs[0], alpha, limit
        return g, alpha, None
    return None


def _linear(value: ir.Value, limit: float | None) -> tuple[ir.Value, float] | None:
    """(up, beta) where ``value`` is ``clip(up, -limit, limit) + beta`` (no Clip without a limit; beta 0 without
    the Add)."""
    node, beta = _producer(value), 0.0
    if node is not None and node.op_type == "Add":
        for operand, constant in (tuple(node.inputs), tuple(reversed(node.inputs))):
            if constant_scalar(constant) is not None and operand is not None and operand.const_value is None:
                value, beta = operand, constant_scalar(constant)
                break
    if limit is None:
        return value, beta
    clip = _producer(value)
    if clip is None or clip.op_type != "Clip" or len(clip.inputs) < 3 \
            or (constant_scalar(clip.inputs[1]), constant_scalar(clip.inputs[2])) != (-limit, limit):
        return None
    return clip.inputs[0], beta


def _projection(value: ir.Value, expert: int | None = None) -> tuple[ir.Value, Projection] | None:
    """(x, the projection) where ``value`` is ``x @ W + b`` or a half (Split) or the even or odd columns (Slice with
    step 2) of it, along the last axis; with ``expert``, ``x @ W + b`` is that input of a Concat of all experts'."""
    node, part = _producer(value), None
    if node is not None and node.op_type == "Split":
        if len(node.outputs) != 2 or not _last_axis(node.attributes.get_int("axis", 0), node.inputs[0]):
            return None
        sizes = constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        part, value = ("half", list(node.outputs).index(value), sizes), node.inputs[0]
    elif node is not None and node.op_type == "Slice":
        starts, ends, axes, steps = (constant_ints(node.inputs[i]) if len(node.inputs) > i else None
                                     for i in range(1, 5))
        if starts not in ([0], [1]) or steps != [2] or ends is None or ends[0] < _TO_THE_END or axes is None \
                or not _last_axis(axes[0], node.inputs[0]):
            return None
        part, value = ("every other", starts[0], None), node.inputs[0]
    if expert is not None:
        concat = _producer(value)
        if concat is None or concat.op_type != "Concat" or concat.attributes.get_int("axis", 0) != 0 \
                or expert >= len(concat.inputs):
            return None
        value = concat.inputs[expert]
    node, bias = _producer(value), None
    if node is not None and node.op_type == "Add":
        biases = [_constant_vector(v) for v in node.inputs]
        if len(node.inputs) != 2 or (biases[0] is None) == (biases[1] is None):
            return None
        bias, value = (biases[0], node.inputs[1]) if biases[0] is not None else (biases[1], node.inputs[0])
        node = _producer(value)
    weight = _matmul_weight(node)
    if weight is None:
        return None
    width = int(weight.shape[1])
    if bias is not None and bias[2] != width:
        return None
    if part is None:
        columns = slice(0, width)
    elif part[0] == "half":
        if width % 2 or (part[2] is not None and part[2] != [width // 2] * 2):
            return None
        columns = slice(0, width // 2) if part[1] == 0 else slice(width // 2, width)
    else:
        columns = slice(part[1], width, 2)
    return node.inputs[0], _with_bias(weight, bias, columns)


def _down(down: ir.Node) -> tuple[Projection, ir.Value] | None:
    """(the down projection, the expert's output): down's output, or the Add of a constant bias after it."""
    weight = _matmul_weight(down)
    if weight is None:
        return None
    width, output, bias = int(weight.shape[1]), down.outputs[0], None
    add = only_user(output, "Add")
    if add is not None and len(add.inputs) == 2:
        other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
        bias = _constant_vector(other)
        if bias is not None and bias[2] == width:
            output = add.outputs[0]
        else:
            bias = None
    return _with_bias(weight, bias, slice(0, width)), output


def _matmul_weight(node: ir.Node | None) -> ir.Value | None:
    """The weight of the MatMul ``node`` when it is a 2-D initializer with a static width."""
    if node is None or node.op_type != "MatMul":
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.shape or ()) != 2 \
            or not isinstance(weight.shape[1], int):
        return None
    return weight


def _constant_vector(value: ir.Value | None) -> tuple[ir.Value, int | None, int] | None:
    """(initializer, row, length) where ``value`` is a constant vector (row None) or the row of a 2-D initializer
    picked by a Gather at a constant index (how the export keeps gpt-oss's per-expert biases at real size)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value, None, int(value.const_value.numpy().size)
    gather = value.producer()
    if gather is None or gather.op_type != "Gather" or gather.attributes.get_int("axis", 0) != 0:
        return None
    table, index = gather.inputs
    row = index.const_value.numpy() if index is not None and index.const_value is not None else None
    if table is None or table.const_value is None or len(table.shape or ()) != 2 or row is None or row.shape != ():
        return None
    return table, int(row), int(table.shape[1])


def _with_bias(weight: ir.Value, bias: tuple[ir.Value, int | None, int] | None, columns: slice) -> Projection:
    if bias is None:
        return Projection(weight, None, columns)
    return Projection(weight, bias[0], columns, bias_row=bias[1])


def _last_axis(axis: int, value: ir.Value | None) -> bool:
    rank = len(value.shape) if value is not None and value.shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _ops_between(down: ir.Node) -> str:
    """The op types between an expert's first projections and its down projection, for a reason."""
    ops, frontier, seen = set(), [down.inputs[0]], set()
    while frontier:
        node = _producer(frontier.pop())
        # the Concat of all experts' projections and the cut of the gated rows by the routing's counts are the
        # dispatch around a gate function run once for all experts, not the expert's compute
        if node is None or node.op_type in ("MatMul", "Gather", "Concat") or id(node) in seen:
            continue
        seen.add(id(node))
        if _is_routed_split(node):
            frontier.append(node.inputs[0])
            continue
        ops.add(node.op_type)
        frontier.extend(node.inputs)
    return ", ".join(sorted(ops)) if ops else "no op"


def _is_routed_split(node: ir.Node) -> bool:
    """A Split by sizes computed in the graph (the routing's counts), not constants."""
    return node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None \
        and constant_ints(node.inputs[1]) is None
