"""The data-dependent part of a sparse MoE as one torch custom op with a hand-written ONNX translation.

``torch.ops.moeport.sorted_experts(x, expert_idx, expert_weight, gate_up, down, activation)``

- ``x``: ``[tokens, hidden]`` float; ``expert_idx``: ``[tokens, k]`` int64; ``expert_weight``: ``[tokens, k]``
- ``gate_up``: E tensors ``[hidden, 2 * inter]`` (gate columns first, then up); ``down``: E tensors
  ``[inter, hidden]`` -- one 2-D weight per expert, so quantizers see plain 2-D MatMul initializers.
- returns ``[tokens, hidden]``: ``sum_j expert_weight[t, j] * expert_{expert_idx[t, j]}(x[t])``.

Why a custom op: tracing a per-expert loop over ``nonzero()`` bakes the example input's routing into the
graph. Torch only sees this op's fake implementation (output shaped like ``x``), and the ONNX side is
written by hand in standard ops:

1. the ``tokens * k`` slots are sorted by expert (TopK on the unique key ``expert * S + slot``, so the
   sort is stable and deterministic on every runtime);
2. each expert runs on its own contiguous segment (Slice with bounds from CumSum of the per-expert
   counts): compute grows with k, not with the number of experts;
3. the results are put back in slot order by Gather with the inverse permutation (ScatterElements of
   a range, no reduction) and summed over the k slots -- no scatter-add, which some providers refuse.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu_glu",)


@torch.library.custom_op("moeport::sorted_experts", mutates_args=())
def sorted_experts(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    expert_weight: torch.Tensor,
    gate_up: List[torch.Tensor],
    down: List[torch.Tensor],
    activation: str = "silu_glu",
) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e in range(len(gate_up)):
        token, slot = torch.nonzero(expert_idx == e, as_tuple=True)
        if token.numel():
            gate, up = (x[token] @ gate_up[e]).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ down[e]
            out.index_add_(0, token, y * expert_weight[token, slot, None])
    return out


@sorted_experts.register_fake
def _sorted_experts_fake(x, expert_idx, expert_weight, gate_up, down, activation="silu_glu"):
    return torch.empty_like(x)


def sorted_experts_onnx(x, expert_idx, expert_weight, gate_up, down, activation: str = "silu_glu"):
    """onnxscript translation of ``moeport::sorted_experts`` (traced: the expert loop unrolls)."""
    from onnxscript import opset18 as op

    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported expert activation {activation!r}")
    num_experts = len(gate_up)
    axis0 = op.Constant(value_ints=[0])
    k = op.Shape(expert_idx, start=1, end=2)
    hidden = op.Shape(x, start=1, end=2)
    flat_expert = op.Reshape(expert_idx, op.Constant(value_ints=[-1]))  # [S], S = tokens * k
    num_slots = op.Shape(flat_expert)
    slots = op.Range(op.Constant(value_int=0), op.Squeeze(num_slots), op.Constant(value_int=1))

    _, order = op.TopK(op.Add(op.Mul(flat_expert, num_slots), slots), num_slots, largest=0, sorted=1)
    sorted_x = op.Gather(x, op.Div(order, k), axis=0)  # slot s belongs to token s // k
    sorted_weight = op.Gather(op.Reshape(expert_weight, op.Constant(value_ints=[-1])), order, axis=0)

    # Per-expert slot counts -> segment bounds in the sorted order.
    one_hot = op.Equal(op.Unsqueeze(flat_expert, op.Constant(value_ints=[1])),
                       op.Constant(value_ints=list(range(num_experts))))
    counts = op.ReduceSum(op.Cast(one_hot, to=7), axis0, keepdims=0)  # 7 = INT64
    ends = op.CumSum(counts, op.Constant(value_int=0))
    starts = op.Sub(ends, counts)

    segments = []
    for e in range(num_experts):
        lo, hi = op.Constant(value_ints=[e]), op.Constant(value_ints=[e + 1])
        segment = op.Slice(sorted_x, op.Slice(starts, lo, hi), op.Slice(ends, lo, hi), axis0)
        gate, up = op.Split(op.MatMul(segment, gate_up[e]), num_outputs=2, axis=-1)
        segments.append(op.MatMul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), down[e]))
    sorted_y = op.Mul(op.Concat(*segments, axis=0), op.Unsqueeze(sorted_weight, op.Constant(value_ints=[1])))

    inverse = op.ScatterElements(slots, order, slots, axis=0)  # inverse[order[s]] = s
    slot_y = op.Gather(sorted_y, inverse, axis=0)  # [S, hidden], slot order
    per_token = op.Reshape(slot_y, op.Concat(op.Constant(value_ints=[-1]), k, hidden, axis=0))
    return op.ReduceSum(per_token, op.Constant(value_ints=[1]), keepdims=0)


CUSTOM_TRANSLATIONS = {torch.ops.moeport.sorted_experts.default: sorted_experts_onnx}
