"""Token mixers of hybrid transformers families (linear attention, Mamba), rewritten so they export.

transformers' reference code for these mixers loops in Python over the tokens, or over chunks of the example's
length, so ``torch.export`` fixes the sequence axis to the example's size. Here every mixer is two pieces whose
length follows the input:

- ``causal_conv``: the short depthwise causal convolution, its left context the layer's convolution state
  (zeros without a cache);
- ``scan_tokens``: the recurrence over the tokens, a ``torch.scan`` while exporting (an ONNX ``Scan`` whose trip
  count is the sequence length), a plain loop over the same step in eager PyTorch.

The same arithmetic as transformers' recurrent (decode) path, so the exported graph agrees with transformers'
chunked prefill to float32 rounding. Each rewritten forward is installed on its module instance as a ``Patch``
of ``forward`` (``mixer_patches``), applied for the export and restored after it; the modeling modules' own
functions are never replaced.

States, as the with-past task carries them (``[batch, ...]``, the layout of transformers' cache):

- convolution: ``[batch, channels, kernel]``, the last ``kernel`` inputs of the convolution;
- gated delta rule (Gated DeltaNet): ``[batch, value_heads, key_head_dim, value_head_dim]``.
"""

from __future__ import annotations

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


def scan_tokens(step: Callable, state: torch.Tensor, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``step(state, *token slices) -> (state, out)`` over axis 1 of every ``[batch, seq, ...]`` tensor in
    ``sequences``. Returns (final state, outputs ``[batch, seq, ...]``).

    While exporting this is ``torch.scan`` (the ONNX ``Scan`` runs as many steps as the input has tokens); in eager
    PyTorch the same step in a loop (``torch.scan`` would compile itself there).
    """
    if torch.compiler.is_exporting():
        from torch._higher_order_ops.scan import scan

        # scan's outputs may not alias its inputs: the step's results are fresh tensors.
        final, outs = scan(lambda carry, xs: step(carry, *xs), state, [x.transpose(0, 1).contiguous() for x in sequences])
        return final, outs.transpose(0, 1)
    outs = []
    for t in range(sequences[0].shape[1]):
        state, out = step(state, *(x[:, t] for x in sequences))
        outs.append(out)
    return state, torch.stack(outs, dim=1)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x`` over its last axis to unit length, as the flash-linear-attention kernels (and transformers) do."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _delta_step(state, query, key, value, decay, beta):
    """One token of the gated delta rule. ``state [batch, heads, dk, dv]``; ``query``/``key [batch, heads, dk]``,
    ``value [batch, heads, dv]``, ``decay``/``beta [batch, heads]`` (decay already ``exp(g)``)."""
    # Products and sums rather than matmuls: a matmul's decomposition inside the scan body makes torch.onnx trip
    # over the symbolic batch size (the body then returns a SymInt).
    state = state * decay[..., None, None]
    remembered = (state * key.unsqueeze(-1)).sum(dim=-2)  # what the state predicts for this key [batch, heads, dv]
    delta = (value - remembered) * beta[..., None]
    state = state + key.unsqueeze(-1) * delta.unsqueeze(-2)
    return state, (state * query.unsqueeze(-1)).sum(dim=-2)


def gated_delta_rule(query, key, value, g, beta, state: torch.Tensor | None):
    """The gated delta rule over a sequence, queries and keys L2-normalised.

    ``query``/``key [batch, seq, k_heads, dk]``, ``value [batch, seq, v_heads, dv]``, ``g`` (log decay, <= 0) and
    ``beta [batch, seq, v_heads]``, ``state [batch, v_heads, dk, dv]`` or None (zeros). Returns (output
    ``[batch, seq, v_heads, dv]`` in the input dtype, final state float32).
    """
    dtype = query.dtype
    v_heads, k_heads = value.shape[-2], key.shape[-2]
    if v_heads != k_heads:  # each query/key head serves v_heads // k_heads consecutive value heads
        query = query.repeat_interleave(v_heads // k_heads, dim=2)
        key = key.repeat_interleave(v_heads // k_heads, dim=2)
    query, key, value, g, beta = (x.float() for x in (query, key, value, g, beta))
    query = l2norm(query) * query.shape[-1] ** -0.5
    key = l2norm(key)
    if state is None:
        state = value.new_zeros(value.shape[0], v_heads, key.shape[-1], value.shape[-1])
    state, out = scan_tokens(_delta_step, state.float(), [query, key, value, g.exp(), beta])
    return out.to(dtype), state


# ---------------------------------------------------------------------------------------------------------------
# Cache access. The with-past task seeds transformers' cache with the graph's past states (``seed_state``); the
# rewritten forwards read them and store the new ones by plain assignment into the cache layer (no in-place copy
# into a graph input); the task reads the presents back (``state_of``). transformers' own forwards work on the
# same seeded cache, so the unpatched model is the reference for a with-past graph too.


def cached_states(cache, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(convolution state, recurrent state) of one layer in ``cache``; (None, None) without a cache."""
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


def layer_states(cache_layer, recurrent_kind: str) -> list[tuple[str, torch.Tensor]]:
    """The states a transformers cache layer holds after a forward, as ``(kind, tensor)``: ``conv``, then the
    recurrent state as ``recurrent_kind``. Nothing for an attention-only layer."""
    states = []
    conv = getattr(cache_layer, "conv_states", {}).get(0)
    recurrent = getattr(cache_layer, "recurrent_states", {}).get(0)
    if conv is not None:
        states.append(("conv", conv))
    if recurrent is not None:
        states.append((recurrent_kind, recurrent))
    return states


def seed_state(cache, layer_idx: int, kind: str, tensor: torch.Tensor) -> None:
    """Start layer ``layer_idx``'s state ``kind`` from ``tensor`` (a copy: transformers' own decode path updates
    its states in place, and the tensor is the caller's input)."""
    if kind == "conv":
        store_states(cache, layer_idx, conv=tensor.clone())
    else:
        store_states(cache, layer_idx, recurrent=tensor.clone())


def state_of(cache, layer_idx: int, kind: str) -> torch.Tensor:
    """Layer ``layer_idx``'s state ``kind`` in ``cache`` after a forward."""
    conv, recurrent = cached_states(cache, layer_idx)
    return conv if kind == "conv" else recurrent


# ---------------------------------------------------------------------------------------------------------------
# Gated DeltaNet (Qwen3-Next, Qwen3.5-MoE, Qwen4-Exp, Lara-Mini).


def _gdn_projections_fused(self, hidden_states):
    """Qwen3-Next: ``in_proj_qkvz`` and ``in_proj_ba`` interleave the heads; the module's own reordering splits them.
    Returns (mixed q|k|v ``[batch, seq, conv_dim]``, z ``[batch, seq, v_heads, dv]``, b, a ``[batch, seq, v_heads]``)."""
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
        out, recurrent_state = gated_delta_rule(query, key, value, g, beta, recurrent_state)
        store_states(cache, self.layer_idx, conv_state, recurrent_state)
        out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(out.reshape(batch, seq, -1))

    return forward


# ---------------------------------------------------------------------------------------------------------------
# The registry: transformers mixer class name -> its export forward and what its states are called.


@dataclass(frozen=True)
class Mixer:
    """How one transformers token-mixer class exports. ``forward``: unbound, the module's forward signature;
    ``recurrent``: the name of its recurrent state in the with-past graph (``contract.state_name`` kind)."""

    forward: Callable
    recurrent: str = "recurrent"


_GDN_FUSED, _GDN_SPLIT = _gated_delta_net(_gdn_projections_fused), _gated_delta_net(_gdn_projections_split)
MIXERS: dict[str, Mixer] = {
    "Qwen3NextGatedDeltaNet": Mixer(_GDN_FUSED),
    "Qwen3_5MoeGatedDeltaNet": Mixer(_GDN_SPLIT),
    "LaraMiniGatedDeltaNet": Mixer(_GDN_SPLIT),
}


def mixer_of(module: nn.Module) -> Mixer | None:
    return MIXERS.get(type(module).__name__)


def recurrent_kinds(model: nn.Module) -> dict[int, str]:
    """Layer index -> the name kind of that layer's recurrent state, for the registered mixers of ``model``."""
    return {module.layer_idx: mixer.recurrent for module in model.modules() if (mixer := mixer_of(module)) is not None}


def mixer_patches(model: nn.Module) -> list[Patch]:
    """A ``forward`` patch on every token-mixer module of ``model`` that has an export forward."""
    return [Patch(module, "forward", types.MethodType(mixer.forward, module))
            for module in model.modules() if (mixer := mixer_of(module)) is not None]
