"""The one data-dependent step of a sparse MoE as a pair of torch custom ops with hand-written ONNX translations.

``torch.ops.moeport.segment_split(x, counts) -> [segment_0, ..., segment_{E-1}]``

- ``x``: ``[S, hidden]`` rows already sorted by expert (S = tokens * k slots);
- ``counts``: ``[E]`` int64, how many consecutive rows of ``x`` belong to each expert, in expert order;
- ``segment_e``: ``[counts[e], hidden]``, the rows of expert ``e`` (possibly empty).

``torch.ops.moeport.segment_concat(segments, rows_like) -> [S, out]``: the segments stacked back in order;
``rows_like`` (any tensor with S rows) only tells torch the result has S rows again.

Why custom ops: a segment's length depends on the routing, and tracing a per-expert loop over a Python
split bakes the example input's routing into the graph. Torch sees each segment with an unbacked
(data-dependent) row count, so the expert code between the two ops -- the family's own MatMuls and biases,
one copy per expert -- is traced as ordinary torch. The ONNX side is one ``Split`` by the counts and one
``Concat``: standard ops, and each expert works only on its own rows (compute grows with k, not with the
number of experts). The sorted dispatch uses the pair twice per layer, around the gate-and-up projections and
around the down projections, with the gate function once over the concatenated rows between them.
"""

from __future__ import annotations

from typing import List

import torch


@torch.library.custom_op("moeport::segment_split", mutates_args=())
def segment_split(x: torch.Tensor, counts: torch.Tensor) -> List[torch.Tensor]:
    # Custom ops may not return views of their inputs.
    return [segment.clone() for segment in torch.split(x, counts.tolist())]


@segment_split.register_fake
def _segment_split_fake(x, counts):
    ctx = torch.library.get_ctx()
    return [x.new_empty(ctx.new_dynamic_size(), *x.shape[1:]) for _ in range(counts.shape[0])]


@torch.library.custom_op("moeport::segment_concat", mutates_args=())
def segment_concat(segments: List[torch.Tensor], rows_like: torch.Tensor) -> torch.Tensor:
    return torch.cat(segments)


@segment_concat.register_fake
def _segment_concat_fake(segments, rows_like):
    return segments[0].new_empty(rows_like.shape[0], *segments[0].shape[1:])


def segment_split_onnx(x, counts):
    """onnxscript translation of ``moeport::segment_split``: one Split by the counts."""
    from onnxscript import opset18 as op

    # torch.onnx needs num_outputs to know how many values the node has; ONNX forbids it next to the
    # ``split`` input, so the ``DropSplitNumOutputs`` pass (exporter/passes.py) removes it from the finished graph.
    return op.Split(x, counts, axis=0, num_outputs=counts.shape[0])


def segment_concat_onnx(segments, rows_like):
    from onnxscript import opset18 as op

    return op.Concat(*segments, axis=0)


CUSTOM_TRANSLATIONS = {
    torch.ops.moeport.segment_split.default: segment_split_onnx,
    torch.ops.moeport.segment_concat.default: segment_concat_onnx,
}
