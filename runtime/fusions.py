"""onnxruntime's fused attention for a with-past graph: each layer's attention as one ``GroupQueryAttention``.

``fuse_group_query_attention(model)`` rewrites an ``onnx_ir`` model in place (``moeport quantize`` calls it for CPU
targets through ``quant.passes.FuseAttentionPass``) and returns how many layers it fused and, for the layers it
left alone, why. ``only_user`` and ``add_constant`` are the graph helpers it shares with the expert fusion
(``quant.passes.FuseExpertsPass``).

Why: a decode step of the exported attention is ~30 small kernels per layer (three Reshape/Transpose pairs, two
rotary embeddings of six ops each, the Concat of each cache, the score MatMul, scale, mask, floor, Softmax, the
value MatMul and the Reshape/Transpose back), 700 kernel launches per step on the 24-layer granite-shaped model.
onnxruntime's ``GroupQueryAttention`` (com.microsoft) does the cache append, the grouped-query scores, the mask and
the softmax in one kernel, and ``RotaryEmbedding`` (com.microsoft) each rotation in one. Measured on that model's
int4 file (benchmarks/decode_ab.py, BENCHMARKS.md): decode +5-9% at a 128-token context with the Concat cache
(none at 512: the kernel still copies the past into the present), and with a shared buffer bound as both past and
present, which the kernel writes in place, another +11% at 128 tokens and +15% at 512.

What it matches, per layer (with or without ``SharedKeyValueHeads``):

- ``present.{i}.key = Concat(past_key_values.{i}.key, rot(Transpose(Reshape(k_lin))), axis=2)`` and
  ``present.{i}.value = Concat(past_key_values.{i}.value, Transpose(Reshape(v_lin)), axis=2)`` (the ``concat``
  cache), or the same new columns scattered into a fixed-length buffer (``ScatterND`` between Transposes, read
  through a Slice of the first ``T`` columns: the ``shared`` cache, contract ``KV_CACHE_SHARED``), where
  ``q_lin``/``k_lin``/``v_lin`` are ``[B, S, heads * D]`` projections and ``rot`` is transformers'
  ``x * cos + rotate_half(x) * sin`` with ``cos = Cos(Concat(f, f))`` (``sin`` alike) unsqueezed on the heads axis;
- ``scores = MatMul(q, Transpose(present.key))`` (``q = rot(Transpose(Reshape(q_lin)))``, grouped into
  ``[B, kvh, rep * S, D]`` rows by a Reshape when kvh < heads), times a constant scale, plus an additive mask
  ``[B, 1, S, T]`` (tiled over the groups' rows when grouped), floored (``FloorAttentionScores``), Softmax over
  the keys (after a subtraction of the row maximum or not: the same probabilities), ``MatMul(probs,
  present.value)`` and back to ``[B, S, heads * D]``;
- gpt-oss's variants of both: the rotation written on the halves (``x1, x2 = Split(x)``, ``Concat(x1 * cos - x2 *
  sin, x2 * cos + x1 * sin)`` with ``cos = Cos(f) * scaling``, YaRN's attention factor), and attention sinks: a
  ``[1, heads, 1, 1]`` logit per head expanded and concatenated to the masked scores as one more key, the softmax
  (after a subtraction of the row maximum) and the sinks' column dropped. The sinks become the kernel's
  ``head_sink``: they add to each row's softmax denominator, as the dropped column did;
- the pairwise rotation: ``x * cos2 + rotate_every_two(x) * sin2`` with ``rotate_every_two(x) = stack((-x[...,
  1::2], x[..., ::2]), -1).flatten(-2)`` and ``cos2 = repeat_interleave(cos[..., :D/2], 2)`` (GLM's rope style,
  ERNIE 4.5) or ``Cos(repeat_interleave(f, 2))`` (Cohere), ``sin2`` alike: ``RotaryEmbedding`` with
  ``interleaved=1``;
- a partial rotary (GLM-4.5, Qwen3-Next): ``Concat(rot(x[..., :rd]), x[..., rd:])`` with transformers' rotation or its
  pairwise form on the first ``rd`` columns: ``RotaryEmbedding`` with ``rotary_embedding_dim=rd``;
- any of these on the heads per token ``[B, S, heads, D]`` (cos/sin unsqueezed on axis 2) before they move to
  ``[B, heads, S, D]`` (Gemma 4), and over cos/sin rows built other than by one Cos/Sin but with equal halves,
  ``Concat(c, c)`` (Qwen3.5's multimodal rope): the kernel's rotation needs nothing more.

Heads normed after they moved to ``[B, heads, S, D]`` (EXAONE's q/k norm) are moved back by a Transpose for the
kernel's rotation. A query or key whose rotation is none of these (no position embedding at all, as granite-4.0's
attention layers; a norm after the rotation) is handed to the kernel as the graph computes it, its own nodes kept:
the kernel's softmax, mask and cache do not care how the keys were made.

It becomes ``RotaryEmbedding`` on ``q_lin`` and ``k_lin`` and ``GroupQueryAttention(q, k, v_lin, past_key,
past_value, seqlens_k, total_sequence_length, attention_bias=mask[, head_sink=sinks])`` whose outputs are the
layer's attention output and its presents. Every row's ``seqlens_k`` is ``T - 1`` (``T = attention_mask.shape[1]``)
and the model's own mask is the bias, so left padding, sliding windows and the causal rule are the model's, exactly.
The rotations read the model's own cos/sin rows (whatever rope scaling made them), one row per token: their "cache"
is the ``[B * S, D / 2]`` first half of ``cos`` and the position of token ``(b, s)`` is ``b * S + s``
(GroupQueryAttention's own rotary takes its prompt positions from the slots, not ``position_ids``, which is wrong
for left-padded rows). A concat cache's past inputs are reshaped to ``[B, kvh, -1, D]`` first: the contract's empty
past may be ``[B, 0, 0, 0]``, which the kernel refuses. A shared buffer goes in as it is: a runtime that binds one
buffer as both past and present (onnxruntime-genai's ``past_present_share_buffer``) has the kernel write the new
columns in place instead of copying the cache each step. Outputs equal the unfused graph's to float32 rounding.

One thing the fused graph does not do that the exported one does: onnxruntime's CPU kernel takes several new
tokens after a past (chunked prefill, speculative steps) for a batch of one row only ("batch_size must be 1 when
sequence_length > 1 and past context is given"). Prompts of any batch and decode steps of one token per row run.

Anything else (scores with terms other than the scale, the mask and sinks, such as a soft cap; keys and values of
different head sizes, as DeepSeek's latent attention has) is left alone, with the reason. The old nodes are left
for ``RemoveUnusedNodesPass``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from moeport.contract import ATTENTION_MASK

PLAIN = ("", "ai.onnx")


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in PLAIN else None


def only_user(value: ir.Value, op_type: str) -> ir.Node | None:
    """The one node that reads ``value``, when there is exactly one and it is a standard ``op_type``."""
    users = [user for user, _ in value.uses()]
    return users[0] if len(users) == 1 and users[0].op_type == op_type and users[0].domain in PLAIN else None


def add_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """``array`` as a new initializer ``name`` of ``graph``."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    return node.attributes.get_ints("perm")


def constant_scalar(value: ir.Value | None) -> float | None:
    """A one-element constant's value; None when ``value`` is not one."""
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(()))


def _axis(node: ir.Node, rank: int = 4) -> int:
    axis = node.attributes.get_int("axis", 0)
    return axis + rank if axis < 0 else axis


def constant_ints(value: ir.Value | None) -> list[int] | None:
    """A constant's values as a flat list of ints; None when ``value`` is not a constant."""
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


@dataclass
class _Heads:
    """Heads ``[B, S, heads, D]`` moved to ``[B, heads, S, D]`` by ``Transpose(per_token, [0, 2, 1, 3])``:
    ``per_token`` is a projection split by a Reshape, or something computed per head after it (Qwen3's q/k norm).
    ``per_token`` is None for heads computed after they moved (EXAONE's and HunYuan-3's q/k norm on
    ``[B, heads, S, D]``): the fusion moves ``split`` back itself."""

    per_token: ir.Value | None  # [B, S, heads, D]
    split: ir.Value  # the Transpose's output [B, heads, S, D]

    @property
    def projection(self) -> ir.Value | None:
        """The ``[B, S, heads * D]`` tensor the Reshape split, when ``per_token`` is just that split."""
        reshape = _producer(self.per_token, "Reshape") if self.per_token is not None else None
        return reshape.inputs[0] if reshape is not None else None


def _heads(value: ir.Value) -> _Heads | None:
    transpose = _producer(value, "Transpose")
    if transpose is None or _perm(transpose) != (0, 2, 1, 3):
        return None
    return _Heads(transpose.inputs[0], transpose.outputs[0])


def _heads_at(value: ir.Value) -> _Heads:
    """Heads ``value`` ``[B, heads, S, D]``: moved there by a Transpose (``_heads``), or computed after it (a q/k norm
    over the last axis; ``per_token`` None: the fusion moves them back)."""
    return _heads(value) or _Heads(None, value)


def _rotated_heads(value: ir.Value) -> _Heads | None:
    """The heads ``[B, heads, S, D]`` a rotation reads (``_heads_at``): a computed ``value`` must be rank 4 (the
    rotation's cos/sin rows, unsqueezed on axis 1, then say its axes are ``[B, heads, S, D]``)."""
    heads = _heads_at(value)
    shape = value.shape
    return heads if heads.per_token is not None or (shape is not None and len(shape) == 4) else None


@dataclass
class _Rotary:
    """``x * Unsqueeze(cos, 1) + rotate_half(x) * Unsqueeze(sin, 1)`` on ``x = heads.split``, or with ``interleaved``
    the pairwise rotation ``x * repeat_interleave(cos[..., :D/2], 2) + rotate_every_two(x) * (sin alike)``."""

    heads: _Heads
    cos: ir.Value  # [B, S, D] = Cos(Concat(f, f)), or [B, S, D / 2] = Cos(f) * scaling (the split-half form)
    sin: ir.Value
    interleaved: bool = False  # pairs (x0, x1), (x2, x3), ... rotated (GLM's rope style, ERNIE 4.5, Cohere)
    paired_rows: bool = False  # cos/sin hold each angle twice side by side (Cos(repeat_interleave(f, 2)), Cohere)
    rotary_dim: int | None = None  # only the first rotary_dim columns of each head rotate (GLM-4.5, Qwen3-Next)


def _slice_on_axis(node: ir.Node, axis: int, rank: int = 4, step: int = 1) -> tuple[int, int | None] | None:
    """``(start, end)`` of ``node``, a Slice from a constant start along ``axis`` alone by ``step``, else None;
    ``end`` is None when it is computed (a shared cache is read up to the mask's length)."""
    starts, ends, axes, steps = (constant_ints(node.inputs[i]) if len(node.inputs) > i else None for i in range(1, 5))
    if starts is None or len(starts) != 1 or (ends is not None and len(ends) != 1):
        return None
    if axes not in ([axis], [axis - rank]) or steps not in (([step], None) if step == 1 else ([step],)):
        return None
    return starts[0], ends[0] if ends is not None else None


def _last_size(value: ir.Value, rank: int = 4) -> int | None:
    """The size of a rank-``rank`` ``value``'s last axis when the graph knows it."""
    shape = value.shape
    return shape[-1] if shape is not None and len(shape) == rank and isinstance(shape[-1], int) else None


def _negated_and_plain_slices(negated: ir.Value, plain: ir.Value, x: ir.Value) -> tuple[ir.Node, ir.Node] | None:
    """(the Slice in ``negated`` = ``Neg(Slice(x))``, the Slice ``plain`` = ``Slice(x)``): the two halves every
    rotation form joins, one negated; None unless both slice ``x`` itself."""
    neg = _producer(negated, "Neg")
    first, second = _producer(neg.inputs[0], "Slice") if neg else None, _producer(plain, "Slice")
    if first is None or second is None or first.inputs[0] is not x or second.inputs[0] is not x:
        return None
    return first, second


def _half_rotation(value: ir.Value, x: ir.Value) -> bool:
    """Whether ``value`` is transformers' ``rotate_half(x)``: ``Concat(-x[..., D/2:], x[..., :D/2], axis=-1)``."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or _axis(concat) != 3:
        return False
    slices = _negated_and_plain_slices(concat.inputs[0], concat.inputs[1], x)
    if slices is None:
        return False
    first, second = slices
    head_size = _last_size(x)
    upper, lower = _slice_on_axis(first, 3), _slice_on_axis(second, 3)
    if head_size is None or upper is None or lower is None or upper[1] is None:
        return False
    # x[..., D/2:] (its end may be any number past the last column) and x[..., :D/2]
    return upper[0] == head_size // 2 and upper[1] >= head_size and lower == (0, head_size // 2)


def _last_axis(node: ir.Node, rank: int) -> bool:
    """Whether ``node`` (Concat, or Unsqueeze by its axes input) works on the last of ``rank`` axes."""
    if node.op_type == "Unsqueeze":
        return constant_ints(node.inputs[1]) in ([rank - 1], [-1])
    return _axis(node, rank) == rank - 1


def _interleaved_rotation(value: ir.Value, x: ir.Value) -> bool:
    """Whether ``value`` is ``rotate_every_two(x)``: ``stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)``, as
    ``Reshape(Concat(Unsqueeze(Neg(Slice(x, 1, step 2)), -1), Unsqueeze(Slice(x, 0, step 2), -1), axis=-1))``."""
    reshape = _producer(value, "Reshape")
    concat = _producer(reshape.inputs[0], "Concat") if reshape is not None else None
    if concat is None or len(concat.inputs) != 2 or not _last_axis(concat, 5):
        return False
    first, second = _producer(concat.inputs[0], "Unsqueeze"), _producer(concat.inputs[1], "Unsqueeze")
    if first is None or second is None or not _last_axis(first, 5) or not _last_axis(second, 5):
        return False
    slices = _negated_and_plain_slices(first.inputs[0], second.inputs[0], x)
    if slices is None:
        return False
    odd, even = slices
    odd_bounds, even_bounds = _slice_on_axis(odd, 3, step=2), _slice_on_axis(even, 3, step=2)
    head_size = _last_size(x)
    return head_size is not None and odd_bounds is not None and even_bounds is not None \
        and odd_bounds[0] == 1 and even_bounds[0] == 0 \
        and all(end is not None and end >= head_size for end in (odd_bounds[1], even_bounds[1]))


# How a rotation's cos/sin rows hold the angles f [B, S, D / 2]: function(Concat(f, f)) (transformers' rotate_half
# form), function(repeat_interleave(f, 2)) (Cohere's pairwise form), function(f) (gpt-oss's halves).
HALVES, PAIRS, HALF = "halves", "pairs", "half"


@dataclass(frozen=True)
class _Angles:
    """``Unsqueeze(function(angles) [* scaling], [1])``: a rotation's cos or sin rows before the heads axis."""

    rows: ir.Value  # what multiplies the heads, before the Unsqueeze: [B, S, D] (HALVES, PAIRS) or [B, S, D / 2]
    angles: ir.Value  # [B, S, D / 2] f, the function's input with its duplication taken off
    scaling: float  # YaRN's attention factor; 1 when there is none
    layout: str  # HALVES, PAIRS or HALF
    traced: bool = True  # angles is the trig function's input; False: rows built otherwise, angles = their half


def _repeated_pairs(value: ir.Value, rank: int) -> ir.Value | None:
    """``x`` when ``value`` is ``repeat_interleave(x, 2, dim=-1)`` of a rank-``rank`` ``x``, as torch exports it:
    ``Reshape(Expand(Unsqueeze(x, -1), [1, ..., 1, 2]))``."""
    reshape = _producer(value, "Reshape")
    expand = _producer(reshape.inputs[0], "Expand") if reshape is not None else None
    unsqueeze = _producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if unsqueeze is None or not _last_axis(unsqueeze, rank + 1):
        return None
    repeats = constant_ints(expand.inputs[1])
    if repeats is None or len(repeats) != rank + 1 or repeats[-1] != 2 or any(r != 1 for r in repeats[:-1]):
        return None
    return unsqueeze.inputs[0]


def _scaled_trig(rows: ir.Value, function: str) -> tuple[ir.Node, float] | None:
    """(the ``function`` node, scaling) when ``rows`` is ``function(...)`` or ``function(...) * constant``."""
    if (trig := _producer(rows, function)) is not None:
        return trig, 1.0
    mul = _producer(rows, "Mul")
    for angle, factor in (tuple(mul.inputs), tuple(reversed(mul.inputs))) if mul is not None else ():
        trig, scaling = _producer(angle, function), constant_scalar(factor)
        if trig is not None and scaling is not None:
            return trig, scaling
    return None


def _angles(value: ir.Value, function: str, heads_axis: int = 1) -> _Angles | None:
    """``value`` as the cos (``function="Cos"``) or sin rows of a rotation, unsqueezed on ``heads_axis`` (1 for
    heads ``[B, heads, S, D]``, 2 for ``[B, S, heads, D]``), or None."""
    unsqueeze = _producer(value, "Unsqueeze")
    if unsqueeze is None or constant_ints(unsqueeze.inputs[1]) != [heads_axis]:
        return None
    rows = unsqueeze.inputs[0]
    if (scaled := _scaled_trig(rows, function)) is None:
        concat = _producer(rows, "Concat")
        if concat is not None and len(concat.inputs) == 2 and concat.inputs[0] is concat.inputs[1] \
                and _axis(concat, 3) == 2:
            # Rows built other than by one trig function (Qwen3.5's multimodal rope takes each column from its own
            # position section): whatever they hold, x * rows + rotate_half(x) * (sin rows) is the kernel's
            # rotation as long as both halves are equal, which Concat(c, c) makes them.
            return _Angles(rows, concat.inputs[0], 1.0, HALVES, traced=False)
        return None
    trig, scaling = scaled
    concat = _producer(trig.inputs[0], "Concat")
    if concat is not None and len(concat.inputs) == 2 and concat.inputs[0] is concat.inputs[1]:
        return _Angles(rows, concat.inputs[0], scaling, HALVES)
    if (paired := _repeated_pairs(trig.inputs[0], 3)) is not None:
        return _Angles(rows, paired, scaling, PAIRS)
    return _Angles(rows, trig.inputs[0], scaling, HALF)


def _interleaved_angles(value: ir.Value, function: str, heads_axis: int = 1) -> _Angles | None:
    """``value`` if it is ``repeat_interleave(U[..., :D/2], 2, dim=-1)`` of ``U = Unsqueeze(function(Concat(f, f)),
    [1])``, as ``Reshape(Expand(Unsqueeze(Slice(U, 0, D/2, axis=-1), -1), [1, 1, 1, 1, 2]))`` -> ``U``'s angles."""
    paired = _repeated_pairs(value, 4)
    first_half = _producer(paired, "Slice") if paired is not None else None
    angles = _angles(first_half.inputs[0], function, heads_axis) if first_half is not None else None
    if angles is None or angles.layout != HALVES:
        return None
    head_size, bounds = _last_size(angles.rows, rank=3), _slice_on_axis(first_half, 3)
    return angles if head_size is not None and bounds == (0, head_size // 2) else None


def _same_rotation(cos: _Angles | None, sin: _Angles | None, layouts: tuple[str, ...]) -> bool:
    """Whether ``cos`` and ``sin`` are rows of the same angles and scaling, laid out alike in one of ``layouts``."""
    if cos is None or sin is None or cos.layout != sin.layout or cos.layout not in layouts:
        return False
    if not cos.traced or not sin.traced:  # built rows: nothing to compare them by, and the kernel needs nothing
        return cos.traced == sin.traced
    return cos.angles is sin.angles and cos.scaling == sin.scaling


def _other_factor(mul: ir.Node | None, x: ir.Value) -> ir.Value | None:
    """The input of the two-input ``mul`` that is not ``x``, when ``x`` is one of them."""
    if mul is None or len(mul.inputs) != 2 or all(v is not x for v in mul.inputs):
        return None
    return mul.inputs[1] if mul.inputs[0] is x else mul.inputs[0]


def _is_product(value: ir.Value, a: ir.Value, b: ir.Value) -> bool:
    """Whether ``value`` is ``Mul(a, b)`` or ``Mul(b, a)``."""
    return _other_factor(_producer(value, "Mul"), a) is b


def _split_half_rotary(value: ir.Value) -> _Rotary | None:
    """gpt-oss's rotary: ``x1, x2 = Split(x, 2, axis=-1)``, ``Concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)``
    with ``cos = Unsqueeze(Cos(f) * scaling, 1)`` (``sin`` alike) -- the same rotation as ``rotate_half``'s over
    ``cat(f, f)``, written on the halves."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or _axis(concat) != 3:
        return None
    sub, add = _producer(concat.inputs[0], "Sub"), _producer(concat.inputs[1], "Add")
    if sub is None or add is None:
        return None
    first, second = _producer(sub.inputs[0], "Mul"), _producer(sub.inputs[1], "Mul")
    split = next((node for node in map(lambda v: _producer(v, "Split"), first.inputs) if node is not None), None) \
        if first is not None else None
    if split is None or len(split.outputs) != 2 or _axis(split) != 3:
        return None
    sizes = constant_ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
    if sizes is not None and (len(sizes) != 2 or sizes[0] != sizes[1]):
        return None  # not two equal halves
    x1, x2 = split.outputs
    cos, sin = _other_factor(first, x1), _other_factor(second, x2)
    if cos is None or sin is None or not any(_is_product(a, x2, cos) and _is_product(b, x1, sin)
                                             for a, b in (tuple(add.inputs), tuple(reversed(add.inputs)))):
        return None
    heads = _heads(split.inputs[0])
    cos_angles, sin_angles = _angles(cos, "Cos"), _angles(sin, "Sin")
    if heads is None or not _same_rotation(cos_angles, sin_angles, (HALF,)):
        return None  # also when cos and sin are of different angles or scalings
    return _Rotary(heads, cos_angles.rows, sin_angles.rows)


# The ``x * cos + rotation(x) * sin`` forms: (RotaryEmbedding's ``interleaved``, the cos/sin matcher, the rotation
# matcher, the rows' layouts): rotate_half over Concat(f, f); rotate_every_two over repeat_interleave(cos[..., :D/2])
# (ERNIE 4.5) or over Cos(repeat_interleave(f)) (Cohere).
_ROTATIONS = ((False, _angles, _half_rotation, (HALVES,)),
              (True, _interleaved_angles, _interleaved_rotation, (HALVES,)),
              (True, _angles, _interleaved_rotation, (PAIRS,)))


def _rotary(value: ir.Value) -> _Rotary | None:
    """``value`` as a rotation ``RotaryEmbedding`` can do: transformers' ``x * cos + rotate_half(x) * sin`` over
    ``cat(f, f)`` (or over rows built with equal halves), its pairwise form (``rotate_every_two``, the kernel's
    ``interleaved``), either on the first columns of each head only (a partial rotary) and on the heads as
    ``[B, heads, S, D]`` or per token before they move there, or gpt-oss's split-half form; None for anything else
    (the heads are then taken as computed)."""
    if (split_half := _split_half_rotary(value)) is not None:
        return split_half
    moved = _producer(value, "Transpose")
    if moved is not None and _perm(moved) == (0, 2, 1, 3):  # rotated per token [B, S, heads, D] (Gemma 4), then moved
        return _rotation(moved.inputs[0], lambda x: _Heads(x, value), heads_axis=2)
    return _rotation(value, _rotated_heads, heads_axis=1)


def _rotation(value: ir.Value, heads_of, heads_axis: int) -> _Rotary | None:
    """``_rotary``'s ``x * cos + rotation(x) * sin`` forms on ``value``, the heads ``x`` on axis ``heads_axis``;
    ``heads_of(x)``: ``x`` as ``_Heads`` (None: not heads the kernel can take)."""
    whole, rotary_dim = None, None
    concat = _producer(value, "Concat")
    if concat is not None and len(concat.inputs) == 2 and _axis(concat) == 3:
        # a partial rotary: Concat(rot(x[..., :rd]), x[..., rd:]) -- the rotation below reads x[..., :rd]
        kept = _producer(concat.inputs[1], "Slice")
        bounds = _slice_on_axis(kept, 3) if kept is not None else None
        head_size = _last_size(kept.inputs[0]) if kept is not None else None
        if bounds is None or head_size is None or bounds[1] is None or bounds[1] < head_size \
                or not 0 < bounds[0] < head_size:
            return None
        whole, rotary_dim, value = kept.inputs[0], bounds[0], concat.inputs[0]
    add = _producer(value, "Add")
    for straight, rotated in (tuple(add.inputs), tuple(reversed(add.inputs))) if add is not None else ():
        straight_mul, rotated_mul = _producer(straight, "Mul"), _producer(rotated, "Mul")
        if straight_mul is None or rotated_mul is None:
            continue
        for x, cos in (tuple(straight_mul.inputs), tuple(reversed(straight_mul.inputs))):
            if whole is not None:  # x must be the rotated columns x[..., :rd] of the heads
                rotated_part = _producer(x, "Slice")
                if rotated_part is None or rotated_part.inputs[0] is not whole \
                        or _slice_on_axis(rotated_part, 3) != (0, rotary_dim):
                    continue
            heads = heads_of(whole if whole is not None else x)
            if heads is None:
                continue
            for interleaved, angles_of, is_rotation, layouts in _ROTATIONS:
                if (cos_angles := angles_of(cos, "Cos", heads_axis)) is None:
                    continue
                for rotated_x, sin in (tuple(rotated_mul.inputs), tuple(reversed(rotated_mul.inputs))):
                    sin_angles = angles_of(sin, "Sin", heads_axis)
                    if _same_rotation(cos_angles, sin_angles, layouts) and is_rotation(rotated_x, x):
                        return _Rotary(heads, cos_angles.rows, sin_angles.rows, interleaved,
                                       cos_angles.layout == PAIRS, rotary_dim)
    return None


@dataclass
class _Computed:
    """Query or key heads that the graph computes itself and the kernel takes as they are (no rotary that
    ``RotaryEmbedding`` can take over: none at all as in granite-4.0's attention layers, or a norm after it):
    ``heads`` is ``[B, heads, S, D]``, or ``[B, S, heads, D]`` when ``per_token``."""

    heads: ir.Value
    per_token: bool = False

    @property
    def shape(self) -> ir.Shape | None:
        """``[B, heads, S, D]``."""
        shape = self.heads.shape
        if shape is None or len(shape) != 4 or not self.per_token:
            return shape
        return ir.Shape([shape[0], shape[2], shape[1], shape[3]])


def _positioned(value: ir.Value, per_token: bool = False) -> _Rotary | _Computed:
    """The query or key heads ``value`` as a rotary the kernels can do (``_Rotary``), else as computed."""
    rotary = None if per_token else _rotary(value)
    return rotary if rotary is not None else _Computed(value, per_token)


def _head_shape(side: _Rotary | _Computed) -> ir.Shape | None:
    return side.heads.split.shape if isinstance(side, _Rotary) else side.shape


@dataclass
class _Layer:
    number: int
    query: _Rotary | _Computed
    key: _Rotary | _Computed
    value: _Computed
    scale: float
    mask: ir.Value  # additive [B, 1 or heads, S, T]
    output: ir.Value  # the attention output [B, S, heads * D] the rest of the graph reads
    present_key: ir.Value
    present_value: ir.Value
    past_key: ir.Value
    past_value: ir.Value
    heads: int
    kv_heads: int
    head_size: int
    shared_buffer: bool  # the cache is one fixed-length buffer (contract KV_CACHE_SHARED), else Concat
    sinks: np.ndarray | None = None  # [heads] attention-sink logits (gpt-oss), GroupQueryAttention's head_sink


@dataclass
class _CacheWrite:
    """How a layer's present comes from its past: ``past`` input, the ``new`` ``[B, kv_heads, S, D]`` entries,
    and ``read``: the value attention reads (the present itself for the concat cache; for the shared buffer, the
    Slice of its first ``T`` columns)."""

    past: ir.Value
    new: ir.Value
    read: ir.Value
    new_per_token: bool = False  # ``new`` is ``[B, S, kv_heads, D]`` (torch folded the two Transposes into one)


def _cache_write(present: ir.Value, past_names: set[str]) -> _CacheWrite | None:
    """The concat cache, ``Concat(past, new, axis=2)``, or the shared buffer,
    ``Transpose(ScatterND(Transpose(past), columns, Transpose(new)))`` read through ``Slice(present, 0, T, axis=2)``
    (contract ``KV_CACHE_SHARED``); None for anything else."""
    concat = _producer(present, "Concat")
    if concat is not None:
        if len(concat.inputs) != 2 or _axis(concat) != 2 or concat.inputs[0].name not in past_names:
            return None
        return _CacheWrite(concat.inputs[0], concat.inputs[1], present)
    back = _producer(present, "Transpose")
    scatter = _producer(back.inputs[0], "ScatterND") if back is not None else None
    if scatter is None:
        return None
    into, new = _producer(scatter.inputs[0], "Transpose"), _producer(scatter.inputs[2], "Transpose")
    perms = [_perm(node) for node in (into, new, back)] if into is not None and new is not None else None
    if perms is None or perms[0] != (2, 0, 1, 3) or perms[2] != (1, 2, 0, 3) \
            or perms[1] not in (perms[0], (1, 0, 2, 3)) or into.inputs[0].name not in past_names:
        return None  # not a scatter of whole [B, kv_heads, D] columns along the sequence axis
    readers = [user for user, _ in present.uses()]
    if len(readers) != 1 or readers[0].op_type != "Slice" or readers[0].domain not in PLAIN:
        return None
    first_columns = _slice_on_axis(readers[0], 2)
    if first_columns is None or first_columns[0] != 0:
        return None
    return _CacheWrite(into.inputs[0], new.inputs[0], readers[0].outputs[0], perms[1] == (1, 0, 2, 3))


def _sink_logits(concat: ir.Node, scores: ir.Value) -> np.ndarray | str:
    """The ``[heads]`` logits of ``Concat(scores, sinks, axis=-1)``, gpt-oss's attention sinks: one extra key per
    head that every query attends to and whose value is zero. ``sinks`` is a ``[1, heads, 1, 1]`` constant expanded
    to ``[B, heads, S, 1]`` (grouped like the scores by a Reshape under ``SharedKeyValueHeads``)."""
    if len(concat.inputs) != 2 or concat.inputs[0] is not scores or _axis(concat) != 3:
        return "the masked scores are concatenated with something other than one sink column"
    column = concat.inputs[1]
    grouped = _producer(column, "Reshape")
    expand = _producer(grouped.inputs[0] if grouped is not None else column, "Expand")
    source = expand.inputs[0] if expand is not None else None
    shape = source.shape if source is not None and source.const_value is not None else None
    if shape is None or len(shape) != 4 or (shape[0], shape[2], shape[3]) != (1, 1, 1):
        return "the column concatenated to the scores is not one constant sink logit per head"
    return source.const_value.numpy().reshape(-1)


def _max_shifted(value: ir.Value) -> ir.Value:
    """``Sub(value, ReduceMax(value, [-1], keepdims))``'s output when that is what reads ``value`` (a softmax made
    safe by hand: the Softmax after it gives the same numbers without it), else ``value``."""
    for user, _ in value.uses():
        if user.op_type != "Sub" or user.domain not in PLAIN or user.inputs[0] is not value:
            continue
        peak = _producer(user.inputs[1], "ReduceMax")
        axes = constant_ints(peak.inputs[1]) if peak is not None and len(peak.inputs) > 1 else None
        if peak is not None and peak.inputs[0] is value and axes in ([3], [-1]) \
                and peak.attributes.get_int("keepdims", 1) == 1:
            return user.outputs[0]
    return value


def _drops_last_column(node: ir.Node | None) -> bool:
    """Whether ``node`` is ``Slice(x, [0], [-1], [-1 or 3])``: x[..., :-1]."""
    return node is not None and _slice_on_axis(node, 3) == (0, -1)


def _match(number: int, graph: ir.Graph, outputs: dict[str, ir.Value], past_names: set[str]) -> _Layer | str:
    """One layer's attention as ``_Layer``, or why it does not match (a string)."""
    present_key, present_value = outputs[f"present.{number}.key"], outputs[f"present.{number}.value"]
    if (producer := present_key.producer()) is not None and producer.op_type == "GroupQueryAttention":
        return "already GroupQueryAttention (exported with --fused-attention)"
    key_write, value_write = _cache_write(present_key, past_names), _cache_write(present_value, past_names)
    if key_write is None or value_write is None:
        return "its presents are neither Concat(past, new) nor a shared buffer's scatter of the new columns"
    key = _positioned(key_write.new, key_write.new_per_token)
    value = _Computed(value_write.new, value_write.new_per_token)
    key_users = [user for user, _ in key_write.read.uses()]
    transposes = [user for user in key_users if user.op_type == "Transpose" and _perm(user) == (0, 1, 3, 2)]
    if len(key_users) != 1 or len(transposes) != 1:
        return "the key cache is read other than by one Transpose into the scores"
    scores = only_user(transposes[0].outputs[0], "MatMul")
    if scores is None or scores.inputs[1] is not transposes[0].outputs[0]:
        return "the transposed keys do not feed one score MatMul"
    grouped = _producer(scores.inputs[0], "Reshape")
    query = _positioned(grouped.inputs[0] if grouped is not None else scores.inputs[0])
    if isinstance(query, _Rotary) and isinstance(key, _Rotary) and (
            query.cos is not key.cos or query.sin is not key.sin or query.interleaved != key.interleaved
            or query.rotary_dim != key.rotary_dim):
        return "query and key are rotated by different angles"
    # scale, mask, floor, Softmax: nothing else between the scores and the probabilities
    scaled = only_user(scores.outputs[0], "Mul") or only_user(scores.outputs[0], "Div")
    if scaled is None:  # a scale of 1 (granitemoe's attention_multiplier = 1) is not written
        scale, scaled = 1.0, scores
    else:
        factor = constant_scalar(scaled.inputs[1])
        if factor is None or scaled.inputs[0] is not scores.outputs[0]:
            return "the scores are not scaled by one constant"
        scale = factor if scaled.op_type == "Mul" else 1.0 / factor
    masked = only_user(scaled.outputs[0], "Add")
    if masked is None:
        return "no additive mask after the scaled scores"
    mask = masked.inputs[1] if masked.inputs[0] is scaled.outputs[0] else masked.inputs[0]
    if grouped is not None:  # SharedKeyValueHeads tiled the [B, 1, S, T] mask over the grouped rows
        tile = _producer(mask, "Tile")
        if tile is None:
            return "the grouped scores' mask is not a tiled [B, 1, S, T] mask"
        mask = tile.inputs[0]
    probabilities_input, sinks = masked.outputs[0], None
    if (sink_column := only_user(probabilities_input, "Concat")) is not None:
        sinks = _sink_logits(sink_column, probabilities_input)
        if isinstance(sinks, str):
            return sinks
        probabilities_input = sink_column.outputs[0]
    # the row maximum subtracted by hand (gpt-oss, and MiMo-V2's layers with and without sinks)
    probabilities_input = _max_shifted(probabilities_input)
    floor = [user for user, _ in probabilities_input.uses() if user.op_type == "Max"]
    if floor:  # FloorAttentionScores: Max(x, ReduceMax(x) + floor) -- the kernel's softmax needs no floor
        probabilities_input = floor[0].outputs[0]
    softmax = only_user(probabilities_input, "Softmax")
    if softmax is None or _axis(softmax) != 3:
        return "the masked scores do not go into a Softmax over the keys (other terms in between)"
    probabilities = softmax.outputs[0]
    if sinks is not None:  # the sinks' column dropped after the softmax: they only add to its denominator
        drop = only_user(probabilities, "Slice")
        if not _drops_last_column(drop):
            return "the sinks' column is not dropped from the probabilities"
        probabilities = drop.outputs[0]
    weighted = only_user(probabilities, "MatMul")
    if weighted is None or weighted.inputs[1] is not value_write.read or len(list(value_write.read.uses())) != 1:
        return "the probabilities do not multiply the value cache alone"
    back = weighted.outputs[0]
    if grouped is not None:
        ungroup = only_user(back, "Reshape")
        if ungroup is None:
            return "the grouped attention output is not reshaped back to the query heads"
        back = ungroup.outputs[0]
    transpose = only_user(back, "Transpose")
    merge = only_user(transpose.outputs[0], "Reshape") if transpose is not None else None
    if transpose is None or _perm(transpose) != (0, 2, 1, 3) or merge is None:
        return "the attention output is not transposed and reshaped back to [B, S, heads * D]"
    shape = _head_shape(query), _head_shape(key)
    if any(s is None or len(s) != 4 or not isinstance(s[1], int) or not isinstance(s[3], int) for s in shape):
        return "the number of heads or the head size is not known from the graph"
    heads, head_size = shape[0][1], shape[0][3]
    kv_heads = shape[1][1]
    if shape[1][3] != head_size or heads % kv_heads:
        return f"{heads} query heads of {head_size} do not group over {kv_heads} key/value heads of {shape[1][3]}"
    if (value_shape := value.shape) is None or len(value_shape) != 4 or \
            (value_shape[1], value_shape[3]) != (kv_heads, head_size):
        return f"the values are not {kv_heads} heads of {head_size} as the keys are (the kernel needs both alike)"
    if (grouped is not None) != (heads > kv_heads):
        return "the scores' query is reshaped other than into the key/value heads' groups"
    if sinks is not None and sinks.size != heads:
        return f"{sinks.size} sink logits for {heads} query heads"
    return _Layer(number, query, key, value, scale, mask, merge.outputs[0], present_key, present_value,
                  key_write.past, value_write.past, heads, kv_heads, head_size, key_write.read is not present_key,
                  sinks)


class _Shared:
    """The per-model inputs of the fused nodes, made once: cache lengths and each rotary's row caches."""

    def __init__(self, graph: ir.Graph, mask_input: ir.Value, anchor: ir.Node):
        self.graph, self.anchor, self.rows = graph, anchor, {}
        self.tokens = self.constant("moeport_gqa_tokens", np.array([0, 0, -1], np.int64))  # [B, S, heads * D]
        # T = attention_mask.shape[1]; every row's seqlens_k = T - 1 (padding is the model's own mask's business)
        total = self.add("Shape", [mask_input], {"start": 1, "end": 2})
        self.total = self.add("Cast", [self.add("Squeeze", [total])], {"to": ir.DataType.INT32})
        last = self.add("Sub", [self.total, self.constant("moeport_gqa_one", np.array(1, np.int32))])
        self.seqlens = self.add("Expand", [last, self.add("Shape", [mask_input], {"start": 0, "end": 1})])

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        return add_constant(self.graph, name, array)

    def add(self, op_type: str, inputs, attributes=None, domain: str = "", outputs: int = 1):
        node = ir.node(op_type, inputs, attributes=attributes or {}, domain=domain, num_outputs=outputs)
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0] if outputs == 1 else node.outputs

    def merged(self, heads: _Heads) -> ir.Value:
        """``heads`` as ``[B, S, heads * D]``, the kernels' layout: the projection they were split from when there
        is one, else the heads per token (moved back by a Transpose where only ``[B, heads, S, D]`` is known)
        merged."""
        if heads.projection is not None:
            return heads.projection
        per_token = heads.per_token if heads.per_token is not None else \
            self.add("Transpose", [heads.split], {"perm": [0, 2, 1, 3]})
        return self.add("Reshape", [per_token, self.tokens])

    def flat(self, computed: _Computed) -> ir.Value:
        """``computed``'s heads as ``[B, S, heads * D]`` (``merged``)."""
        if computed.per_token:
            return self.add("Reshape", [computed.heads, self.tokens])
        return self.merged(_heads_at(computed.heads))

    def rotary_rows(self, rotary: _Rotary, head_size: int) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(cos_cache, sin_cache [B * S, head_size / 2], positions [B, S] = b * S + s) for the angles of ``rotary``;
        ``head_size``: the columns of a head that rotate (all of them but in a partial rotary)."""
        if rotary.cos not in self.rows:
            start, last = self.constant(f"moeport_rope_start_{len(self.rows)}", np.array([0], np.int64)), \
                self.constant(f"moeport_rope_axis_{len(self.rows)}", np.array([2], np.int64))
            rows = self.constant(f"moeport_rope_rows_{len(self.rows)}", np.array([-1, head_size // 2], np.int64))
            if rotary.paired_rows:  # each angle twice side by side: every other column
                bounds = [start, self.constant(f"moeport_rope_end_{len(self.rows)}", np.array([head_size], np.int64)),
                          last, self.constant(f"moeport_rope_pairs_{len(self.rows)}", np.array([2], np.int64))]
            else:
                bounds = [start, self.constant(f"moeport_rope_half_{len(self.rows)}",
                                               np.array([head_size // 2], np.int64)), last]
            caches = [self.add("Reshape", [self.add("Slice", [angle, *bounds]), rows])
                      for angle in (rotary.cos, rotary.sin)]
            batch_and_sequence = self.add("Shape", [rotary.cos], {"start": 0, "end": 2})
            count = self.add("ReduceProd", [batch_and_sequence], {"keepdims": 1})
            flat = self.add("Range", [self.constant(f"moeport_rope_zero_{len(self.rows)}", np.array(0, np.int64)),
                                      self.add("Squeeze", [count]),
                                      self.constant(f"moeport_rope_step_{len(self.rows)}", np.array(1, np.int64))])
            self.rows[rotary.cos] = (*caches, self.add("Reshape", [flat, batch_and_sequence]))
        return self.rows[rotary.cos]


def cache_layers(graph: ir.Graph) -> list[int]:
    """The layer numbers ``i`` of a with-past graph's ``present.{i}.key`` / ``present.{i}.value`` output pairs."""
    names = {value.name for value in graph.outputs}
    return sorted(int(name.split(".")[1]) for name in names
                  if name.startswith("present.") and name.endswith(".key") and f"present.{name.split('.')[1]}.value"
                  in names)


def unfused_layers(graph: ir.Graph) -> list[int]:
    """The ``cache_layers`` whose present key is not a ``GroupQueryAttention`` output."""
    outputs = {value.name: value for value in graph.outputs}
    return [number for number in cache_layers(graph)
            if (producer := outputs[f"present.{number}.key"].producer()) is None
            or producer.op_type != "GroupQueryAttention"]


def fused_note(fused: int) -> str:
    """What ``fuse_group_query_attention`` did, in the words both ``quantize`` and ``export`` report."""
    return f"fused the attention of {fused} layer(s) into GroupQueryAttention"


def fuse_group_query_attention(model: ir.Model) -> tuple[int, list[str]]:
    """Fuse each layer's attention of a with-past ``model`` (see the module doc); in place.

    Returns (layers fused, why the others were left alone: one "layers i, j: reason" per reason). A graph
    without a KV cache or an ``attention_mask`` input gives (0, [the reason]).
    """
    graph = model.graph
    inputs = {value.name: value for value in graph.inputs}
    outputs = {value.name: value for value in graph.outputs}
    layers = cache_layers(graph)
    if not layers:
        return 0, ["no present.{i}.key/value outputs (not a with-past graph)"]
    if ATTENTION_MASK not in inputs:
        return 0, [f"no {ATTENTION_MASK} input"]
    past_names = {name for name in inputs if name.startswith("past_key_values.")}
    matches = [_match(number, graph, outputs, past_names) for number in layers]
    unfused: dict[str, list[int]] = {}
    for number, match in zip(layers, matches):
        if isinstance(match, str):
            unfused.setdefault(match, []).append(number)
    left = [f"layer{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}: {reason}"
            for reason, numbers in unfused.items()]
    fused = [match for match in matches if not isinstance(match, str)]
    if not fused:
        return 0, left
    shared = _Shared(graph, inputs[ATTENTION_MASK], graph[0])
    for layer in fused:
        shared.anchor = layer.output.producer()
        rotated = []
        for side, heads in ((layer.query, layer.heads), (layer.key, layer.kv_heads)):
            if isinstance(side, _Computed):
                rotated.append(shared.flat(side))
                continue
            cos_cache, sin_cache, positions = shared.rotary_rows(side, side.rotary_dim or layer.head_size)
            rotated.append(shared.add("RotaryEmbedding", [shared.merged(side.heads), positions, cos_cache, sin_cache],
                                      {"num_heads": heads, "interleaved": int(side.interleaved),
                                       **({"rotary_embedding_dim": side.rotary_dim} if side.rotary_dim else {})},
                                      domain="com.microsoft"))
        value = shared.flat(layer.value)
        pasts = [layer.past_key, layer.past_value]
        if not layer.shared_buffer:  # a shared buffer is the real [B, kvh, max, D], and is written in place
            past_shape = shared.constant(f"moeport_gqa_past_{layer.number}",
                                         np.array([0, layer.kv_heads, -1, layer.head_size], np.int64))
            pasts = [shared.add("Reshape", [past, past_shape]) for past in pasts]
        sinks = [] if layer.sinks is None else [
            shared.constant(f"moeport_gqa_sinks_{layer.number}", layer.sinks.astype(np.float32))]
        # inputs: query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
        # position_ids (the rotations are done), attention_bias, head_sink
        output, present_key, present_value = shared.add(
            "GroupQueryAttention",
            [*rotated, value, *pasts, shared.seqlens, shared.total, None, None, None, layer.mask, *sinks],
            {"num_heads": layer.heads, "kv_num_heads": layer.kv_heads, "scale": layer.scale, "do_rotary": 0},
            domain="com.microsoft", outputs=3)
        output.producer().name = f"moeport_gqa_{layer.number}"
        for old, new in ((layer.output, output), (layer.present_key, present_key),
                         (layer.present_value, present_value)):
            new.shape, new.type = old.shape, old.type
            output_name = old.name if old.is_graph_output() else None
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            if output_name is not None:  # the graph output keeps its contract name
                old.name, new.name = f"{output_name}_unfused", output_name
    model.opset_imports.setdefault("com.microsoft", 1)
    return len(fused), left
