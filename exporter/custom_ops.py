"""The one data-dependent step of a sparse MoE as a torch custom op with a hand-written ONNX translation.

``torch.ops.moeport.segment_matmul(x, counts, weights) -> y``

- ``x``: ``[S, in]`` rows already sorted by expert (S = tokens * k slots);
- ``counts``: ``[E]`` int64, how many consecutive rows of ``x`` belong to each expert, in expert order;
- ``weights``: E tensors ``[in, out]`` -- one 2-D weight per expert, so quantizers see plain 2-D MatMul
  initializers;
- ``y``: ``[S, out]``, row r multiplied by the weight of the expert whose segment holds r.

Why a custom op: a segment's bounds depend on the routing, and tracing a per-expert loop bakes the
example input's routing into the graph. Torch only sees the fake implementation (shape ``[S, out]``);
the ONNX side is Slice-by-CumSum-bounds, MatMul, Concat per expert -- standard ops, and every expert
works only on its own rows, so compute grows with k, not with the number of experts. Everything around
it (sorting, gathering, the gate activation, biases, combining) stays ordinary traced torch code, so a
model family's own gate function exports unchanged.
"""

from __future__ import annotations

from typing import List

import torch


@torch.library.custom_op("moeport::segment_matmul", mutates_args=())
def segment_matmul(x: torch.Tensor, counts: torch.Tensor, weights: List[torch.Tensor]) -> torch.Tensor:
    out = x.new_empty(x.shape[0], weights[0].shape[1])
    start = 0
    for count, weight in zip(counts.tolist(), weights):
        out[start : start + count] = x[start : start + count] @ weight
        start += count
    return out


@segment_matmul.register_fake
def _segment_matmul_fake(x, counts, weights):
    return x.new_empty(x.shape[0], weights[0].shape[1])


def segment_matmul_onnx(x, counts, weights):
    """onnxscript translation of ``moeport::segment_matmul`` (traced: the expert loop unrolls)."""
    from onnxscript import opset18 as op

    axis0 = op.Constant(value_ints=[0])
    ends = op.CumSum(counts, op.Constant(value_int=0))
    starts = op.Sub(ends, counts)
    segments = []
    for e, weight in enumerate(weights):
        lo, hi = op.Constant(value_ints=[e]), op.Constant(value_ints=[e + 1])
        rows = op.Slice(x, op.Slice(starts, lo, hi), op.Slice(ends, lo, hi), axis0)
        segments.append(op.MatMul(rows, weight))
    return op.Concat(*segments, axis=0)


CUSTOM_TRANSLATIONS = {torch.ops.moeport.segment_matmul.default: segment_matmul_onnx}
