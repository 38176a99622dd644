"""Token mixers of hybrid transformers families (linear attention, Mamba, short convolutions), rewritten to export.

transformers' reference code for these mixers loops in Python over the tokens, or over chunks of the example's
length, so ``torch.export`` fixes the sequence axis to the example's size. Here every mixer is built from two
pieces whose length follows the input:

- ``causal_conv``: the short depthwise causal convolution, its left context the layer's convolution state
  (zeros without a cache);
- ``scan_tokens``: the recurrence over the tokens, a ``torch.scan`` while exporting (an ONNX ``Scan`` whose trip
  count is the sequence length), a plain loop over the same step in eager PyTorch.

The arithmetic is transformers' recurrent (decode) path, so the exported graph agrees with transformers' chunked
prefill to float32 rounding. Mixers: Gated DeltaNet (Qwen3-Next, Qwen3.5-MoE, Qwen4-Exp, Lara-Mini), Kimi Delta
Attention (Kimi-Linear, Bailing-Hybrid), Mamba2 (Granite-4.0-H, Nemotron-H), Mamba (Jamba), lightning attention
(MiniMax), LFM2's gated short convolution; and Qwen4-Exp's QSA indexer (the key selection of its attention layers,
without its per-query loop). Each is listed in ``MIXERS`` by transformers class name and installed on every module
instance of that class as a ``Patch`` of ``forward`` (``mixer_patches``), applied for the export and restored
after it; the modeling modules' own functions are never replaced.

States, as the with-past task carries them (``[batch, ...]``, the layout of transformers' cache; the graph's
names are ``contract.state_past_name``):

- convolution: ``[batch, channels, kernel]``, the last ``kernel`` inputs of the convolution;
- delta rule (Gated DeltaNet, Kimi Delta Attention) and lightning attention: ``[batch, heads, key_dim,
  value_dim]``;
- Mamba2 SSM: ``[batch, heads, head_dim, state_size]``; Mamba SSM: ``[batch, intermediate, state_size]``.
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeport.exporter.patching import Patch


def _activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN

    return (lambda x: x) if name is None else ACT2FN[name]


def mask_padding(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``hidden_states [batch, seq, dim]`` with padded positions zeroed; ``attention_mask [batch, >= seq]`` (its last
    ``seq`` columns are this call's tokens; a 4-D or missing mask masks nothing, as in transformers)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return hidden_states
    mask = attention_mask[:, -hidden_states.shape[1]:]
    return (hidden_states * mask[:, :, None]).to(hidden_states.dtype)


def causal_conv(x: torch.Tensor, state: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                activation: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution of ``x [batch, channels, seq]`` with ``weight [channels, kernel]``, continuing
    from ``state [batch, channels, kernel]`` (the previous inputs; None: zeros). Returns the activated output
    ``[batch, channels, seq]`` and the new state (the last ``kernel`` inputs, older state columns included)."""
    kernel = weight.shape[-1]
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], kernel)
    full = torch.cat([state.to(x.dtype), x], dim=-1)
    out = F.conv1d(full, weight.unsqueeze(1), bias, groups=x.shape[1])[..., 1:]
    return _activation(activation)(out), full[..., -kernel:]


def scan_tokens(step: Callable, state: torch.Tensor,
                sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``step(state, *token slices) -> (state, out)`` over axis 1 of every ``[batch, seq, ...]`` tensor in
    ``sequences``. Returns (final state, outputs ``[batch, seq, ...]``).

    While exporting this is ``torch.scan`` (the ONNX ``Scan`` runs as many steps as the input has tokens); in eager
    PyTorch the same step in a loop (``torch.scan`` would compile itself there). The step may close over tensors
    without size-1 axes only: the scan traces such a tensor with fresh symbolic sizes, and a size-1 axis then no
    longer broadcasts (pass it as a sequence instead).
    """
    if torch.compiler.is_exporting():
        from torch._higher_order_ops.scan import scan

        # scan's outputs may not alias its inputs: the step's results are fresh tensors.
        final, outs = scan(lambda carry, xs: step(carry, *xs), state,
                           [x.transpose(0, 1).contiguous() for x in sequences])
        return final, outs.transpose(0, 1)
    outs = []
    for t in range(sequences[0].shape[1]):
        state, out = step(state, *(x[:, t] for x in sequences))
        outs.append(out)
    return state, torch.stack(outs, dim=1)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x`` over its last axis to unit length, as the flash-linear-attention kernels (and Qwen's code) do."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def l2norm_divide(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``l2norm`` as Kimi's code writes it (a square root and a division: the same up to rounding)."""
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)


# The per-token steps multiply and sum rather than matmul: a matmul's decomposition inside the scan body makes
# torch.onnx trip over the symbolic batch size (the body then returns a SymInt).


def _delta_step(state, query, key, value, decay, beta):
    """One token of the gated delta rule. ``state [batch, heads, dk, dv]``; ``query``/``key [batch, heads, dk]``,
    ``value [batch, heads, dv]``, ``decay`` (``exp(g)``) ``[batch, heads, 1, 1]`` per head or
    ``[batch, heads, dk, 1]`` per key channel, ``beta [batch, heads]``."""
    state = state * decay
    remembered = (state * key.unsqueeze(-1)).sum(dim=-2)  # what the state predicts for this key [batch, heads, dv]
    delta = (value - remembered) * beta[..., None]
    state = state + key.unsqueeze(-1) * delta.unsqueeze(-2)
    return state, (state * query.unsqueeze(-1)).sum(dim=-2)


def delta_rule(query, key, value, g, beta, state: torch.Tensor | None, normalize: Callable = l2norm):
    """The gated delta rule over a sequence, queries and keys normalised by ``normalize`` and queries scaled by
    ``dk ** -0.5`` (Gated DeltaNet; Kimi Delta Attention with a decay per key channel).

    ``query``/``key [batch, seq, k_heads, dk]``, ``value [batch, seq, v_heads, dv]``, ``g`` (log decay, <= 0)
    ``[batch, seq, v_heads]`` or ``[batch, seq, v_heads, dk]``, ``beta [batch, seq, v_heads]``, ``state [batch,
    v_heads, dk, dv]`` or None (zeros). Returns (output ``[batch, seq, v_heads, dv]`` in the input dtype, final
    state float32).
    """
    dtype = query.dtype
    v_heads, k_heads = value.shape[-2], key.shape[-2]
    if v_heads != k_heads:  # each query/key head serves v_heads // k_heads consecutive value heads
        query = query.repeat_interleave(v_heads // k_heads, dim=2)
        key = key.repeat_interleave(v_heads // k_heads, dim=2)
    query, key, value, g, beta = (x.float() for x in (query, key, value, g, beta))
    query = normalize(query) * query.shape[-1] ** -0.5
    key = normalize(key)
    decay = g.exp()[..., None] if g.dim() == 4 else g.exp()[..., None, None]
    if state is None:
        state = value.new_zeros(value.shape[0], v_heads, key.shape[-1], value.shape[-1])
    state, out = scan_tokens(_delta_step, state.float(), [query, key, value, decay, beta])
    return out.to(dtype), state


def _ssm_step(state, decay, inputs, b, c):
    """One token of a diagonal state-space recurrence: ``state [..., P, N] * decay + inputs [..., P] (x) b [..., N]``,
    read out against ``c [..., N]`` -> ``[..., P]`` (Mamba's selective scan, MiniMax's lightning attention)."""
    state = state * decay + inputs.unsqueeze(-1) * b.unsqueeze(-2)
    return state, (state * c.unsqueeze(-2)).sum(dim=-1)


def mamba2_scan(x, dt, A, B, C, D, dt_bias, dt_limit, state: torch.Tensor | None):
    """Mamba2's selective scan. ``x [batch, seq, heads, head_dim]``, ``dt [batch, seq, heads]`` (before
    ``dt_bias`` and softplus), ``A``/``D``/``dt_bias [heads]``, ``B``/``C [batch, seq, groups, state_size]``,
    ``state [batch, heads, head_dim, state_size]`` or None (zeros). Returns (output ``[batch, seq, heads,
    head_dim]`` float32, final state)."""
    heads, groups = x.shape[2], B.shape[2]
    dt = torch.clamp(F.softplus(dt + dt_bias), min=dt_limit[0], max=dt_limit[1])
    x, B, C = x.float(), B.float(), C.float()
    B, C = (t.repeat_interleave(heads // groups, dim=2) for t in (B, C))
    if state is None:
        state = x.new_zeros(x.shape[0], heads, x.shape[-1], B.shape[-1])
    decay = torch.exp(dt * A)[..., None, None]
    state, out = scan_tokens(_ssm_step, state.float(), [decay, x * dt[..., None], B, C])
    return out + x * D[:, None], state


# ---------------------------------------------------------------------------------------------------------------
# Cache access. The with-past task seeds transformers' cache with the graph's past states (``StateStore.seed``);
# the rewritten forwards read them and store the new ones by plain assignment (no in-place copy into a graph
# input); the task reads the presents back (``StateStore.get``). transformers' own forwards work on the same seeded
# cache, so the unpatched model is the reference for a with-past graph too.


def cached_states(cache, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(convolution state, recurrent state) of one layer in transformers' cache; (None, None) without a cache."""
    if cache is None:
        return None, None
    return cache.get_conv_state(layer_idx), cache.get_recurrent_state(layer_idx)


def store_states(cache, layer_idx: int, conv: torch.Tensor | None = None,
                 recurrent: torch.Tensor | None = None) -> None:
    """Put a layer's new states into transformers' linear-attention cache layer (nothing without a cache)."""
    if cache is None:
        return
    layer = cache.layers[layer_idx]
    if conv is not None:
        layer.conv_states[0] = conv
        layer.conv_kernel_size[0] = conv.shape[-1]
        layer.is_conv_states_initialized[0] = True
        # transformers' own forward then continues from this state (concatenates it before new tokens)
        layer.has_previous_state[0] = True
    if recurrent is not None:
        layer.recurrent_states[0] = recurrent
        layer.is_recurrent_states_initialized[0] = True
    if layer.device is None:
        layer.device, layer.dtype = (conv if conv is not None else recurrent).device, torch.float32


class LayerStates:
    """States in transformers' linear-attention cache layers (``cache.layers[i].conv_states`` /
    ``recurrent_states``): a convolution state, then the recurrent state named ``recurrent``."""

    def __init__(self, recurrent: str = "recurrent"):
        self.recurrent = recurrent

    def found(self, cache, layer_idx: int) -> list[tuple[str, torch.Tensor]]:
        """The ``(kind, tensor)`` states layer ``layer_idx`` holds in ``cache`` after a forward."""
        layer = cache.layers[layer_idx]
        conv, recurrent = layer.conv_states.get(0), layer.recurrent_states.get(0)
        return [(kind, t) for kind, t in (("conv", conv), (self.recurrent, recurrent)) if t is not None]

    def seed(self, cache, layer_idx: int, kind: str, tensor: torch.Tensor) -> None:
        """Start a state from ``tensor`` (a copy: transformers' own decode path updates its states in place, and
        the tensor is the caller's input)."""
        if kind == "conv":
            store_states(cache, layer_idx, conv=tensor.clone())
        else:
            store_states(cache, layer_idx, recurrent=tensor.clone())

    def get(self, cache, layer_idx: int, kind: str) -> torch.Tensor:
        conv, recurrent = cached_states(cache, layer_idx)
        return conv if kind == "conv" else recurrent


class ListStates:
    """MiniMax's cache: one linear-attention state per layer in ``cache.linear_cache`` (no convolution)."""

    def found(self, cache, layer_idx: int) -> list[tuple[str, torch.Tensor]]:
        state = cache.get_linear_cache(layer_idx)
        return [("recurrent", state)] if torch.is_tensor(state) else []

    def seed(self, cache, layer_idx: int, kind: str, tensor: torch.Tensor) -> None:
        cache.set_linear_cache(layer_idx, tensor.clone())

    def get(self, cache, layer_idx: int, kind: str) -> torch.Tensor:
        return cache.get_linear_cache(layer_idx)


# ---------------------------------------------------------------------------------------------------------------
# Gated DeltaNet (Qwen3-Next, Qwen3.5-MoE, Qwen4-Exp, Lara-Mini).


def _gdn_projections_fused(self, hidden_states):
    """Qwen3-Next: ``in_proj_qkvz`` and ``in_proj_ba`` interleave the heads; the module's own reordering splits
    them. Returns (mixed q|k|v ``[batch, seq, conv_dim]``, z ``[batch, seq, v_heads, dv]``, b, a ``[batch, seq,
    v_heads]``)."""
    query, key, value, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(hidden_states),
                                                                   self.in_proj_ba(hidden_states))
    mixed = torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value)], dim=-1)
    return mixed, z, b, a


def _gdn_projections_split(self, hidden_states):
    """Qwen3.5 and later: one projection each for q|k|v, z, b and a (same outputs as ``_gdn_projections_fused``)."""
    batch, seq = hidden_states.shape[:2]
    z = self.in_proj_z(hidden_states).reshape(batch, seq, -1, self.head_v_dim)
    return self.in_proj_qkv(hidden_states), z, self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)


def _gated_delta_net(projections: Callable) -> Callable:
    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        """Gated DeltaNet: ``hidden_states [batch, seq, hidden]`` -> ``[batch, seq, hidden]``; with a cache, reads
        and stores the layer's convolution and recurrent states."""
        hidden_states = mask_padding(hidden_states, attention_mask)
        batch, seq = hidden_states.shape[:2]
        conv_state, recurrent_state = cached_states(cache, self.layer_idx)
        mixed, z, b, a = projections(self, hidden_states)
        mixed, conv_state = causal_conv(mixed.transpose(1, 2), conv_state, self.conv1d.weight.squeeze(1),
                                        self.conv1d.bias, self.activation)
        query, key, value = torch.split(mixed.transpose(1, 2), [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        query = query.reshape(batch, seq, -1, self.head_k_dim)
        key = key.reshape(batch, seq, -1, self.head_k_dim)
        value = value.reshape(batch, seq, -1, self.head_v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        out, recurrent_state = delta_rule(query, key, value, g, beta, recurrent_state)
        store_states(cache, self.layer_idx, conv_state, recurrent_state)
        out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(out.reshape(batch, seq, -1))

    return forward


# ---------------------------------------------------------------------------------------------------------------
# Kimi Delta Attention (Kimi-Linear, Bailing-Hybrid): the delta rule with a decay per key channel.


def _kimi_delta_attention(output_gate: Callable) -> Callable:
    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        """Kimi Delta Attention: ``hidden_states [batch, seq, hidden]`` -> ``[batch, seq, hidden]``; with a cache,
        reads and stores the layer's convolution and recurrent states."""
        hidden_states = mask_padding(hidden_states, attention_mask)
        batch, seq = hidden_states.shape[:2]
        shape = (batch, seq, -1, self.head_dim)
        conv_state, recurrent_state = cached_states(cache, self.layer_idx)
        mixed = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], dim=-1)
        mixed, conv_state = causal_conv(mixed.transpose(1, 2), conv_state, self.conv1d.weight.squeeze(1),
                                        self.conv1d.bias, self.activation)
        query, key, value = (x.reshape(shape) for x in torch.split(mixed.transpose(1, 2), [self.qkv_dim] * 3, dim=-1))
        beta = torch.sigmoid(self.b_proj(hidden_states))
        out, recurrent_state = delta_rule(query, key, value, self.forget_gate(hidden_states), beta, recurrent_state,
                                          normalize=l2norm_divide)
        store_states(cache, self.layer_idx, conv_state, recurrent_state)
        out = self.o_norm(out, output_gate(self, hidden_states).reshape(shape)).reshape(batch, seq, -1)
        return self.o_proj(out)

    return forward


# ---------------------------------------------------------------------------------------------------------------
# Mamba (Jamba) and Mamba2 (Granite-4.0-H, Nemotron-H): a selective state space after the convolution.


def _mamba2_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Granite-4.0-H's and Nemotron-H's Mamba2 layer (the same attributes): ``hidden_states [batch, seq, hidden]``
    -> ``[batch, seq, hidden]``; with a cache, reads and stores the layer's convolution and SSM states."""
    batch, seq = hidden_states.shape[:2]
    dtype = hidden_states.dtype
    conv_state, ssm_state = cached_states(cache, self.layer_idx)
    hidden_states = mask_padding(hidden_states, attention_mask)
    gate, mixed, dt = self.in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, self.num_heads],
                                                        dim=-1)
    mixed, conv_state = causal_conv(mixed.transpose(1, 2), conv_state, self.conv1d.weight.squeeze(1),
                                    self.conv1d.bias, self.activation)
    mixed = mask_padding(mixed.transpose(1, 2), attention_mask)
    groups = self.n_groups * self.ssm_state_size
    x, B, C = torch.split(mixed, [self.intermediate_size, groups, groups], dim=-1)
    out, ssm_state = mamba2_scan(x.reshape(batch, seq, self.num_heads, self.head_dim), dt,
                                 -torch.exp(self.A_log.float()), B.reshape(batch, seq, self.n_groups, -1),
                                 C.reshape(batch, seq, self.n_groups, -1), self.D, self.dt_bias, self.time_step_limit,
                                 ssm_state)
    store_states(cache, self.layer_idx, conv_state, ssm_state)
    out = self.norm(out.reshape(batch, seq, -1), gate)
    return self.out_proj(out.to(dtype))


def _mamba_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Jamba's Mamba layer: ``hidden_states [batch, seq, hidden]`` -> ``[batch, seq, hidden]``; with a cache, reads
    and stores the layer's convolution and SSM (``[batch, intermediate, state_size]``) states."""
    dtype = hidden_states.dtype
    conv_state, ssm_state = cached_states(cache, self.layer_idx)
    hidden_states = mask_padding(hidden_states, attention_mask)
    x, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
    x, conv_state = causal_conv(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.activation)
    x = mask_padding(x.transpose(1, 2), attention_mask)  # [batch, seq, intermediate]
    time_step, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size],
                                  dim=-1)
    time_step, B, C = self.dt_layernorm(time_step), self.b_layernorm(B), self.c_layernorm(C)
    dt = F.softplus(time_step @ self.dt_proj.weight.T + self.dt_proj.bias.float())  # [batch, seq, intermediate]
    A = -torch.exp(self.A_log.float())  # [intermediate, state_size]
    if ssm_state is None:
        ssm_state = x.new_zeros(x.shape[0], *A.shape, dtype=torch.float32)

    def step(state, dt, inputs, b, c):  # the decay exp(dt * A) [batch, intermediate, state_size] per token only
        return _ssm_step(state, torch.exp(dt[..., None] * A), inputs, b, c)

    ssm_state, out = scan_tokens(step, ssm_state.float(), [dt, dt * x.float(), B.float(), C.float()])
    out = (out + x * self.D) * F.silu(gate.transpose(1, 2))
    store_states(cache, self.layer_idx, conv_state, ssm_state)
    return self.out_proj(out.to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# LFM2's gated short convolution: the convolution alone, no recurrence.


def _short_conv_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """LFM2's gated short convolution: ``hidden_states [batch, seq, hidden]`` -> ``[batch, seq, hidden]``; with a
    cache, reads and stores the layer's convolution state."""
    hidden_states = mask_padding(hidden_states, attention_mask)
    b, c, x = self.in_proj(hidden_states).transpose(-1, -2).chunk(3, dim=-2)
    conv_state, _ = cached_states(cache, self.layer_idx)
    out, conv_state = causal_conv(b * x, conv_state, self.conv.weight.squeeze(1), self.conv.bias, None)
    store_states(cache, self.layer_idx, conv=conv_state)
    return self.out_proj((c * out).transpose(-1, -2).contiguous())


# ---------------------------------------------------------------------------------------------------------------
# MiniMax's lightning attention: linear attention whose state decays by a fixed rate per head.


def _lightning_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """MiniMax lightning attention: ``hidden_states [batch, seq, hidden]`` -> (``[batch, seq, hidden]``, the state
    ``[batch, heads, head_dim, head_dim]`` (keys x values)); with a cache, continues from and stores that state."""
    batch, seq = hidden_states.shape[:2]
    qkv = mask_padding(self.act_fn(self.qkv_proj(hidden_states)), attention_mask)
    query, key, value = torch.split(qkv.reshape(batch, seq, self.num_attention_heads, 3 * self.head_dim),
                                    self.head_dim, dim=3)
    state = cache.get_linear_cache(self.layer_idx) if cache is not None else None
    if not torch.is_tensor(state):
        state = value.new_zeros(batch, self.num_attention_heads, self.head_dim, self.head_dim)
    # The fixed decay per head goes in as a sequence, its size-1 axes known (see scan_tokens).
    decay = torch.exp(-self.slope_rate).expand(batch, seq, -1, 1, 1)

    def step(transposed, value, key, query, decay):  # state^T [batch, heads, values, keys] += value (x) key
        return _ssm_step(transposed, decay, value, key, query)

    transposed, out = scan_tokens(step, state.transpose(-1, -2), [value, key, query, decay])
    state = transposed.transpose(-1, -2)
    out = self.norm(out.reshape(batch, seq, -1))
    out = self.out_proj(torch.sigmoid(self.output_gate(hidden_states)) * out)
    if cache is not None:
        cache.set_linear_cache(self.layer_idx, state)
    return out, state


# ---------------------------------------------------------------------------------------------------------------
# Qwen4-Exp's QSA indexer (beside its Gated DeltaNet): which keys each query of an attention layer may see.


def _qsa_indexer_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
    """Qwen4-Exp's QSA token selection without loops: ``[batch, 1, seq, keys]`` bool, True where a query may attend.

    Per query the reference groups its visible keys, in order, into blocks of ``compress_ratio``, scores each
    complete block's pooled key against the query and keeps the ``budget / ratio`` best blocks and the incomplete
    tail; it loops over rows and queries with ``nonzero()``. Under the causal mask of these layers a query sees a
    prefix (in key order) of what its row's last query sees, so the blocks are the same for every query of a row:
    they are pooled once per row, scored by every query at once, and each query picks among the blocks complete
    within its own prefix (the others score -inf; ``budget / ratio`` extra slots that are never complete let the
    top-k run with a fixed k even when a query has fewer blocks). Blocks that score exactly the same (a zero query)
    are a tie the reference's top-k breaks in no defined order; onnxruntime's TopK keeps the first.
    """
    modeling = sys.modules[type(self).__module__]
    batch, seq, _ = hidden_states.shape
    ratio, dim = self.compress_ratio, self.index_head_dim
    full_cos, full_sin = position_embeddings
    query, raw_keys = torch.split(self.index_qk_proj(hidden_states),
                                  [self.index_n_heads * dim, self.index_kv_heads * dim], dim=-1)
    query = self.q_layernorm(query.reshape(batch, seq, -1, dim))
    query = modeling.apply_rotary_pos_emb(query, cos=full_cos[:, -seq:], sin=full_sin[:, -seq:], unsqueeze_dim=2)
    raw_keys = raw_keys.reshape(batch, seq, -1, dim).squeeze(2)
    if cache is not None:
        raw_keys = cache.update_indexer(raw_keys, self.layer_idx)
    visible = (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)[:, 0]  # [b, q, k]
    keys = visible.shape[-1]
    row = visible[:, -1]  # what the row's last query sees [b, k]
    rank = row.long().cumsum(-1) - 1  # a visible key's place among them
    complete = visible.long().sum(-1) // ratio  # complete blocks in each query's prefix [b, q]
    slots = keys // ratio + self.block_topk
    block = torch.where(row, rank // ratio, slots - 1)  # invisible keys: a slot that is never complete
    member = (block.unsqueeze(-1) == torch.arange(slots, device=block.device)) & row.unsqueeze(-1)  # [b, k, slots]
    pooled = self.k_layernorm((member.float().transpose(1, 2) @ raw_keys.float() / ratio).to(raw_keys.dtype))
    first = member & (rank % ratio == 0).unsqueeze(-1)  # each block's first key
    start = (first.long() * torch.arange(keys, device=block.device).unsqueeze(-1)).sum(1)  # [b, slots]
    cos, sin = (t.gather(1, start.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in (full_cos, full_sin))
    block_keys = modeling.apply_rotary_pos_emb(pooled.unsqueeze(2), cos=cos, sin=sin, unsqueeze_dim=2).squeeze(2)
    scores = torch.relu(torch.einsum("bqhd,bsd->bqhs", query.float(), block_keys.float())).sum(2) / math.sqrt(dim)
    valid = torch.arange(slots, device=block.device) < complete.unsqueeze(-1)  # [b, q, slots]
    best = scores.masked_fill(~valid, float("-inf")).topk(self.block_topk, dim=-1).indices
    chosen = torch.zeros_like(valid).scatter(-1, best, True) & valid
    in_chosen = chosen.gather(-1, block.unsqueeze(1).expand(-1, seq, -1))  # [b, q, k]
    tail = rank.unsqueeze(1) >= (complete * ratio).unsqueeze(-1)
    return (visible & (in_chosen | tail)).unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------------
# The registry: transformers mixer class name -> its export forward and what its states are called.


@dataclass(frozen=True)
class Mixer:
    """How one transformers token-mixer class exports. ``forward``: unbound, the module's forward signature;
    ``states``: where its states live in transformers' cache and what the with-past graph calls them (a
    ``contract.STATE_KINDS`` kind each)."""

    forward: Callable
    states: LayerStates | ListStates | None = LayerStates()


_GDN_FUSED, _GDN_SPLIT = _gated_delta_net(_gdn_projections_fused), _gated_delta_net(_gdn_projections_split)
MIXERS: dict[str, Mixer] = {
    "Qwen3NextGatedDeltaNet": Mixer(_GDN_FUSED),
    "Qwen3_5MoeGatedDeltaNet": Mixer(_GDN_SPLIT),
    "LaraMiniGatedDeltaNet": Mixer(_GDN_SPLIT),
    "Qwen4ExpTextGatedDeltaNet": Mixer(_GDN_SPLIT),
    "KimiLinearDeltaAttention": Mixer(_kimi_delta_attention(lambda self, h: self.g_b_proj(self.g_a_proj(h)))),
    "BailingHybridDeltaAttention": Mixer(_kimi_delta_attention(lambda self, h: self.g_proj(h))),
    "GraniteMoeHybridMambaLayer": Mixer(_mamba2_forward, LayerStates(recurrent="ssm")),
    "NemotronHMamba2Mixer": Mixer(_mamba2_forward, LayerStates(recurrent="ssm")),
    "JambaMambaMixer": Mixer(_mamba_forward, LayerStates(recurrent="ssm")),
    "MiniMaxLightningAttention": Mixer(_lightning_forward, ListStates()),
    "Lfm2MoeShortConv": Mixer(_short_conv_forward),
    # Not a token mixer: the key selection of Qwen4-Exp's attention layers; no state of its own.
    "Qwen4ExpTextQSAIndexer": Mixer(_qsa_indexer_forward, states=None),
}


def mixer_of(module: nn.Module) -> Mixer | None:
    return MIXERS.get(type(module).__name__)


def state_stores(model: nn.Module) -> dict[int, LayerStates | ListStates]:
    """Layer index -> where that layer's mixer keeps its states, for the registered mixers of ``model``."""
    return {module.layer_idx: mixer.states for module in model.modules()
            if (mixer := mixer_of(module)) is not None and mixer.states is not None}


def mixer_patches(model: nn.Module) -> list[Patch]:
    """A ``forward`` patch on every token-mixer module of ``model`` that has an export forward."""
    return [Patch(module, "forward", types.MethodType(mixer.forward, module))
            for module in model.modules() if (mixer := mixer_of(module)) is not None]
