"""Hugging Face transformers MoE checkpoints, through transformers' own experts interface.

transformers >= 5 runs the experts of its MoE families through one interface
(``transformers.integrations.moe``): an experts module holds stacked weights (``gate_up_proj`` or
``up_proj``, ``down_proj``, optional biases, transposed or not) and its forward is looked up by
``config._experts_implementation`` in ``ALL_EXPERTS_FUNCTIONS``. We register one implementation there,
``"moeport"``, which calls whatever dispatch strategy is installed on that module. So every family on the
interface exports with our sparse dispatch, and each family's router (softmax or sigmoid, grouped top-k,
correction biases, shared experts with their own gates, dense layers mixed in) stays its own code and is
traced as it is.

The ``transformers`` family loads a checkpoint directory (config.json + *.safetensors, sharded too)
offline, never with ``trust_remote_code``; pickle weights only with ``trust_pickle`` (then loaded with
``weights_only=True`` by transformers). Graph inputs: ``input_ids`` and ``attention_mask``
``[batch, sequence]`` int64 (left padding honoured); output ``logits``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from moeport.errors import MoeportError
from moeport.exporter import families, hf_mixers
from moeport.contract import (ATTENTION_MASK, INDEXER_KEY, INPUT_IDS, STATE_KINDS, MoELayerInfo, past_name,
                              present_name, state_past_name, state_present_name)
from moeport.exporter.families import FamilySpec, LoadedModel, register_family
from moeport.exporter.patching import Patch
from moeport.exporter.strategies import ExpertBank, ExpertsSite

IMPLEMENTATION = "moeport"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@contextlib.contextmanager
def quiet_loading():
    """transformers without progress bars and below-error logs while loading, as it was afterwards.

    Our output is one report, not loader bars; and transformers logs its own load report (missing / mismatched
    keys) as a table, where we refuse such checkpoints with one line instead.
    """
    logging = _transformers().utils.logging
    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_error(path: Path, exc: Exception) -> MoeportError:
    """The one-line user error for a checkpoint transformers could not read (its first line of explanation)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MoeportError(f"transformers cannot load {path}: {first}")


# Config fields that are sizes or counts by their name: a string or a negative number there is a config no model
# can be built from (transformers would fail later with a ZeroDivisionError or TypeError deep in its code).
_SIZE_FIELD_SUFFIXES = ("_size", "_heads", "_layers", "_dim", "_experts", "_experts_per_tok")


def check_sizes(config: dict, where: Path) -> None:
    """User errors for sizes no model can be built with, before transformers divides by them."""
    problem = None
    for key, value in config.items():
        if key.endswith(_SIZE_FIELD_SUFFIXES) and (
                isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0)):
            problem = f"{key} is {value!r}"
            break
    hidden, heads, kv_heads = (config.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if problem is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        if not config.get("head_dim") and hidden // heads == 0:
            problem = f"hidden_size {hidden} < num_attention_heads {heads} (head size 0)"
        elif isinstance(kv_heads, int) and kv_heads > 0 and heads % kv_heads:
            problem = f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    if problem is not None:
        raise MoeportError(f"{where} does not describe a model transformers can build ({problem}); check its sizes")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise MoeportError("this is a Hugging Face checkpoint; install transformers: pip install 'moeport[hf]'") from exc
    return transformers


def _routing_arguments(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """``(hidden_states, top_k_index, top_k_weights)`` of one experts call, however the family passed them.

    Families name the parameters their own way (``routing_weights``, ``router_scores`` ...) and may pass
    them by keyword, so bind against the experts class's own forward signature (``@wraps`` keeps it).
    """
    forward = inspect.signature(type(module).forward)
    bound = forward.bind(module, *args, **kwargs)
    values = list(bound.arguments.values())[1:]  # drop self
    if len(values) < 3:
        raise RuntimeError(f"{type(module).__name__}.forward takes {len(values)} routing arguments, expected "
                           "(hidden_states, top_k_index, top_k_weights)")
    return tuple(values[:3])


def _moeport_experts_forward(self, *args, **kwargs):
    """The experts implementation we register: run the strategy installed on this module."""
    dispatch = getattr(self, "_moeport_dispatch", None)
    if dispatch is None:
        raise RuntimeError("experts_implementation 'moeport' is only valid inside moeport's use_strategy")
    return dispatch(*_routing_arguments(self, args, kwargs))


def _register_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _moeport_experts_forward)


def is_experts_module(module: nn.Module) -> bool:
    """A module built by ``@use_experts_implementation`` (it carries the interface's layout flags)."""
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(module, "down_proj")


def _layer_labels(paths: list[str]) -> list[str]:
    """Graph labels for experts modules: the layer numbers of each path (``model.layers.3.mlp.experts`` -> ``3``).

    A family with more than one experts module per layer would get the same label twice (and duplicate
    graph output names), so then every label becomes the path itself.
    """
    labels = []
    for path in paths:
        numbers = re.findall(r"\.(\d+)\.", f".{path}.")
        labels.append(".".join(numbers) if numbers else path)
    return labels if len(set(labels)) == len(labels) else list(paths)


def experts_bank(module: nn.Module) -> ExpertBank:
    """Per-expert 2-D weights in ``x @ W`` layout from the interface's stacked tensors."""
    if getattr(module, "has_post_expert_norm", False):
        raise MoeportError(f"{type(module).__name__}: experts with a post-expert norm are not supported yet")
    stacked_in = module.gate_up_proj if module.has_gate else module.up_proj
    # Not transposed: [E, out, in] (F.linear layout) -> per expert [in, out]; transposed: already [E, in, out].
    if module.is_transposed:
        gate_up = [stacked_in[e] for e in range(stacked_in.shape[0])]
        down = [module.down_proj[e] for e in range(module.down_proj.shape[0])]
    else:
        gate_up = [stacked_in[e].T for e in range(stacked_in.shape[0])]
        down = [module.down_proj[e].T for e in range(module.down_proj.shape[0])]
    gate_up_bias = down_bias = None
    if module.has_bias:
        gate_up_bias = module.gate_up_proj_bias if module.has_gate else module.up_proj_bias
        down_bias = module.down_proj_bias
    # The family's own gate (GLU split, interleaved layouts, clamped activations) or plain activation.
    apply_gate = module._apply_gate if module.has_gate else module.act_fn
    # Views of the model's own tensors: the strategy makes the one contiguous copy per expert that the traced
    # graph holds (cloning here as well doubled the export's memory for the expert weights).
    return ExpertBank([w.detach() for w in gate_up], [w.detach() for w in down], apply_gate,
                      None if gate_up_bias is None else gate_up_bias.detach().clone(),
                      None if down_bias is None else down_bias.detach().clone(),
                      glu_act=module.act_fn if _uses_default_gate(module) else None)


def _uses_default_gate(module: nn.Module) -> bool:
    """The experts class keeps the interface's default gate: ``act_fn(gate) * up`` over ``[gate | up]`` halves."""
    from transformers.integrations import moe

    if not module.has_gate:
        return False
    gate = getattr(type(module), "_apply_gate", None)
    return getattr(moe, "_default_apply_gate", object()) is gate


def experts_sites(modules: list[nn.Module]) -> list[ExpertsSite]:
    """One site per experts module: the dispatch goes to its ``_moeport_dispatch``, and its config names our
    implementation (layers share one config object; the patcher restores it once, as it was)."""
    _register_implementation()
    return [ExpertsSite(module, functools.partial(experts_bank, module), "_moeport_dispatch",
                        patches=(Patch(module.config, "_experts_implementation", IMPLEMENTATION),))
            for module in modules]


@contextlib.contextmanager
def _capture_routing(experts: list[nn.Module], records: list):
    """Record (top_k_index, top_k_weights) of every experts call, in call order."""

    def hook(module, args, kwargs):
        _, idx, weight = _routing_arguments(module, args, kwargs)
        records.append((idx, weight))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in experts]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _real_rope_frequencies(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """A complex rotary embedding's forward, real-valued: ``[batch, seq, rot_dim/2, 2]`` (cos, sin) * scaling.

    Bound to the model's rotary module instance; equal to ``view_as_real(polar(1, freqs) * scaling)``.
    """
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling


def _real_apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_emb`` on (even, odd) channel pairs with real (cos, sin) ``freqs [batch, seq, rot/2, 2]``;
    ``xq``/``xk`` ``[batch, heads, seq, rot]``. Same result as the complex product, without complex tensors."""
    cos, sin = freqs[:, None, ..., 0], freqs[:, None, ..., 1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        real, imag = pairs[..., 0], pairs[..., 1]
        return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


# Families whose rotary embedding computes in complex numbers (``torch.polar``/``view_as_complex``), which
# the ONNX exporter cannot translate: model_type -> the modeling module whose rotary we run real-valued.
COMPLEX_ROPE_MODULES = {"deepseek_v2": "transformers.models.deepseek_v2.modeling_deepseek_v2"}


def _rotary_for(original: Callable) -> Callable:
    """``apply_rotary_emb`` that takes the real (cos, sin) frequencies of ``_real_rope_frequencies`` and hands
    complex ones to ``original``: while it replaces the modeling module's function, any other model of the
    family in the process still gets the complex rotary it always had."""

    def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor):
        if freqs.is_complex():
            return original(xq, xk, freqs)
        return _real_apply_rotary_emb(xq, xk, freqs)

    return apply_rotary_emb


def _real_rope_patches(model: nn.Module) -> list[Patch]:
    """For a complex-RoPE family, the patches that run its rotary real-valued (the same numbers, exportable).

    Each rotary module of this model gets a real-valued ``forward`` of its own (an instance attribute). The
    attention layers call the modeling module's ``apply_rotary_emb`` by its global name, which only a
    module-level patch reaches: it is set once for the export (not per forward) and hands complex
    frequencies, those of every model not being exported, to the original.
    """
    module_name = COMPLEX_ROPE_MODULES.get(getattr(model.config, "model_type", ""))
    if module_name is None:
        return []
    from transformers.modeling_rope_utils import dynamic_rope_update

    modeling = importlib.import_module(module_name)
    real_frequencies = dynamic_rope_update(_real_rope_frequencies)
    rotaries = [m for m in model.modules()
                if type(m).__module__ == module_name and type(m).__name__.endswith("RotaryEmbedding")]
    return [*(Patch(rotary, "forward", real_frequencies.__get__(rotary)) for rotary in rotaries),
            Patch(modeling, "apply_rotary_emb", _rotary_for(modeling.apply_rotary_emb))]


def export_patches(adapter: nn.Module) -> list[Patch]:
    """What a transformers model needs patched while it is exported: the complex-RoPE families' rotary, and the
    token mixers of hybrid families (linear attention, Mamba) in a form whose sequence length stays dynamic."""
    return _real_rope_patches(adapter.model) + hf_mixers.mixer_patches(adapter.model)


@dataclass(frozen=True)
class CacheTensor:
    """One cache tensor of a with-past graph: its input and output names, the model layer it belongs to, its part
    (``key``, ``value``, ``contract.INDEXER_KEY`` or a ``contract.STATE_KINDS`` kind) and its shape after the batch
    axis, ``None`` at the axis that grows by each step's tokens (a KV cache's sequence; a recurrent state has a
    fixed shape)."""

    past: str
    present: str
    layer: int
    part: str
    shape: tuple[int | None, ...]


class CausalLMAdapter(nn.Module):
    """A transformers causal LM in moeport's call convention.

    ``forward(input_ids [batch, seq], attention_mask [batch, seq] = None)`` ->
    ``(logits [batch, seq, vocab], [(expert_idx [tokens, k], expert_weight [tokens, k]) per MoE layer])``.
    The routing is read at each experts module's input, so it is exactly what the experts used.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.experts = [m for m in model.modules() if is_experts_module(m)]
        self.experts_paths = [name for name, m in model.named_modules() if is_experts_module(m)]
        self._cache_layout: list[CacheTensor] | None = None
        self._cache_class = None  # the model's own cache class, found by cache_layout()
        self._position_history: tuple[int, int] | None = None  # (layer, position dims) of indexed positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        records: list = []
        with _capture_routing(self.experts, records):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits, [(idx.reshape(-1, idx.shape[-1]), w.reshape(-1, w.shape[-1])) for idx, w in records]

    def step(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor], shared_buffer: bool = False):
        """One decoder step with a cache (see ``exporter.tasks``). ``past``: one tensor per ``cache_layout()``
        entry, in its order (a KV cache ``[batch, kv_heads, past_sequence, head_dim]``, a recurrent state of its
        fixed shape). Returns (logits [batch, seq, vocab], presents in the same order -- KV caches
        ``[batch, kv_heads, past_sequence + seq, head_dim]``, the states after the step's tokens --, routing).

        ``shared_buffer``: the KV tensors are fixed-length buffers ``[batch, kv_heads, max_seq, head_dim]``
        holding ``attention_mask.shape[1] - seq`` tokens; the new ones are written after them and the presents
        are the whole buffers (contract ``KV_CACHE_SHARED``)."""
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        layout = self.cache_layout()
        stores = hf_mixers.state_stores(self.model)
        cache = self._new_cache()
        # A sliding-window layer keeps the whole past here, as the graph's KV inputs and outputs grow by the
        # step's tokens (a cropped one would cut the past axis at the window, a length the trace cannot know);
        # the sliding-window mask still limits what each token sees.
        cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
        given = {(entry.layer, entry.part): tensor for entry, tensor in zip(layout, past)}
        past_length = attention_mask.shape[1] - input_ids.shape[1]
        for entry in layout:
            if entry.part == "key" and shared_buffer:
                cache.layers[entry.layer] = _buffer_layer_class()(given[entry.layer, "key"],
                                                                  given[entry.layer, "value"], past_length)
            elif entry.part == "key":
                cache.update(given[entry.layer, "key"], given[entry.layer, "value"], entry.layer)
            elif entry.part == INDEXER_KEY:
                cache.layers[entry.layer].update_indexer(given[entry.layer, entry.part])
            elif entry.part in STATE_KINDS:
                stores[entry.layer].seed(cache, entry.layer, entry.part, given[entry.layer, entry.part])
        if self._position_history is not None:
            # The indexer ropes every cached key at its own position, which the model keeps beside the cache: the
            # past positions, as the mask gives them (what generate fed: unmasked tokens counted, padding at 1).
            layer, dims = self._position_history
            past_positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            past_positions = past_positions[:, :past_length]
            cache.layers[layer].indexer_position_ids = past_positions.unsqueeze(0).expand(dims, -1, -1)
        records: list = []
        with _capture_routing(self.experts, records):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **{self._cache_keyword: cache}, use_cache=True)
        presents = [stores[entry.layer].get(cache, entry.layer, entry.part) if entry.part in STATE_KINDS
                    else getattr(cache.layers[entry.layer], f"{entry.part}s") for entry in layout]
        routing = [(idx.reshape(-1, idx.shape[-1]), w.reshape(-1, w.shape[-1])) for idx, w in records]
        return out.logits, presents, routing

    @functools.cached_property
    def _cache_keyword(self) -> str:
        """The name the model's forward takes its cache by (and returns it as): ``cache`` since transformers 5.24,
        whose ``past_key_values`` is deprecated (removed in 5.40), ``past_key_values`` before."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _new_cache(self):
        """An empty cache of the class the model makes for itself (transformers' ``DynamicCache`` laid out by the
        config; MiniMax's own)."""
        cache_class = self._cache_class
        if "config" in inspect.signature(cache_class).parameters:
            return cache_class(config=self.config)
        return cache_class()

    def cache_layout(self) -> list["CacheTensor"]:
        """The cache tensors of one decoder step, layer by layer (key and value of an attention layer and its
        indexer's keys, or the states of a linear-attention / Mamba / convolution layer), read from one probe forward
        the first time it is asked. A layer state that no registered mixer carries is a user error."""
        if self._cache_layout is None:
            with torch.no_grad():
                out = self.model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
                probe = getattr(out, self._cache_keyword)
            self._cache_class = type(probe)
            stores = hf_mixers.state_stores(self.model)
            layout = []
            for i in range(len(probe)):
                layer = probe.layers[i] if i < len(probe.layers) else None
                if getattr(layer, "keys", None) is not None:
                    untracked = _untracked_cache_state(layer)
                    if untracked:
                        raise MoeportError(f"{type(self.model).__name__}: layer {i}'s cache ({type(layer).__name__}) "
                                           f"keeps state beside its keys and values ({', '.join(untracked)}) that "
                                           "moeport cannot carry between steps yet; export it with --task logits")
                    layout += [CacheTensor(past_name(i, part), present_name(i, part), i, part,
                                           (tensor.shape[1], None, tensor.shape[3]))
                               for part, tensor in (("key", layer.keys), ("value", layer.values))]
                if i in stores:
                    layout += [CacheTensor(state_past_name(i, kind), state_present_name(i, kind), i, kind,
                                           tuple(tensor.shape[1:])) for kind, tensor in stores[i].found(probe, i)]
                elif any(t is not None for t in getattr(layer, "conv_states", {}).values()):
                    raise MoeportError(f"{type(self.model).__name__}: layer {i} keeps a recurrent state that moeport "
                                       "cannot carry between steps yet; export it with --task logits")
                indexer_keys = getattr(layer, "indexer_keys", None)
                if torch.is_tensor(indexer_keys):
                    layout.append(CacheTensor(past_name(i, INDEXER_KEY), present_name(i, INDEXER_KEY), i, INDEXER_KEY,
                                              (None, indexer_keys.shape[-1])))
                positions = getattr(layer, "indexer_position_ids", None)
                if torch.is_tensor(positions) and self._position_history is None:
                    self._position_history = (i, positions.shape[0])
            self._cache_layout = layout
        return self._cache_layout

    def moe_layers(self) -> list[nn.Module]:
        return self.experts


# What a transformers cache layer may hold that cache_layout() carries (keys and values, an indexer's keys and
# positions, a hybrid mixer's states) or that is a constant (the sliding window's length as a tensor).
_TRACKED_CACHE_STATE = frozenset({"keys", "values", "indexer_keys", "indexer_position_ids", "conv_states",
                                  "recurrent_states", "_sliding_window_tensor"})


def _untracked_cache_state(layer) -> list[str]:
    """The attributes of a cache layer holding tensors that no graph input would carry (DeepSeek-V4's compressor
    buffers, say): a with-past graph without them would drop state between steps (tracing fails on them)."""
    def holds_tensors(value) -> bool:
        if isinstance(value, dict):
            value = list(value.values())
        return torch.is_tensor(value) or (isinstance(value, (list, tuple)) and any(map(torch.is_tensor, value)))

    return sorted(name for name, value in vars(layer).items()
                  if name not in _TRACKED_CACHE_STATE and holds_tensors(value))


@functools.cache
def _buffer_layer_class():
    """A transformers cache layer over a fixed-length buffer (``CausalLMAdapter.step(shared_buffer=True)``),
    defined on first use: transformers is imported only for Hugging Face checkpoints."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """Keys and values ``[batch, kv_heads, max_seq, head_dim]`` holding ``past_length`` tokens; ``update``
        writes the new ones at ``past_length ..`` (index_copy: ONNX ScatterND, in place when a runtime binds the
        output to the input's memory) and attends over the columns written so far."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, past_length):
            super().__init__()
            self.keys, self.values, self.past_length = keys, values, past_length
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            positions = torch.arange(key_states.shape[-2], device=key_states.device) + self.past_length
            self.keys = self.keys.index_copy(2, positions, key_states)
            self.values = self.values.index_copy(2, positions, value_states)
            total = self.past_length + key_states.shape[-2]
            return self.keys[:, :, :total], self.values[:, :, :total]

        def get_seq_length(self):
            return self.past_length

        def get_mask_sizes(self, query_length):
            return self.past_length + query_length, 0

    return BufferLayer


def describe(adapter: CausalLMAdapter, experts: list[nn.Module]) -> list[MoELayerInfo]:
    """Layer labels from module paths; k from one probe forward (families name it differently)."""
    probe = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        _, routing = adapter(probe)
    if len(routing) != len(experts):
        raise MoeportError(f"{type(adapter.model).__name__}: expected one experts call per MoE layer, "
                           f"saw {len(routing)} for {len(experts)} layers")
    return [MoELayerInfo(label, int(module.num_experts), int(idx.shape[-1]), "hf")
            for label, module, (idx, _) in zip(_layer_labels(adapter.experts_paths), experts, routing)]


_ROUTER_NAME = re.compile(r"(^|\.)(gate|router)(\.|$)")


def routing_margins(loaded: LoadedModel, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Per layer, the gap between the k-th and (k+1)-th router logit of each token.

    Routers differ per family (softmax, sigmoid + correction bias, grouped top-k); the raw logit gap is
    the common proxy for a near-tie. A family whose router module is not found reports no ties (inf).
    """
    adapter: CausalLMAdapter = loaded.model
    logits: dict[int, torch.Tensor] = {}
    hooks = []
    for i, path in enumerate(adapter.experts_paths):
        parent = adapter.model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else adapter.model
        experts = adapter.experts[i]
        # The router is the first module named ``gate`` or ``router`` beside the experts (or inside such a
        # module: ``gate.wg``) that outputs a float tensor [..., num_experts]; families nest it differently.
        candidates = [m for name, m in parent.named_modules() if _ROUTER_NAME.search(name)]

        def hook(_m, _args, out, i=i, num_experts=experts.num_experts):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for tensor in outs:
                if i not in logits and torch.is_tensor(tensor) and tensor.is_floating_point() \
                        and tensor.shape[-1] == num_experts:
                    logits[i] = tensor.reshape(-1, num_experts)
                    return

        hooks += [(m, hook) for m in candidates]
    families.run_with_hooks(hooks, lambda: adapter(**{name: torch.from_numpy(a) for name, a in inputs.items()}))
    tokens = int(np.prod(inputs["input_ids"].shape))
    margins = []
    for i, layer in enumerate(loaded.info.layers):
        if i in logits and layer.top_k < layer.num_experts:
            top = torch.topk(logits[i].float(), layer.top_k + 1, dim=-1).values
            margins.append((top[:, layer.top_k - 1] - top[:, layer.top_k]).numpy())
        else:
            margins.append(np.full(tokens, np.inf))
    return margins


def _has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


def _text_config(config):
    """The language model's config of a multimodal wrapper config (a ``text_config`` among its sub-configs, of a
    model_type that has its own causal LM), else None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if "text_config" not in (getattr(config, "sub_configs", None) or {}):
        return None
    text = config.get_text_config(decoder=True)
    return text if text is not config and text.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None


def _language_model(config, path: Path):
    """``(config, key_mapping)`` to load the causal LM of the checkpoint in ``path`` from.

    A multimodal wrapper checkpoint (Qwen3.5-MoE, Gemma 4 ... ``*ForConditionalGeneration``) keeps its language
    model's weights under a prefix of its own (``model.language_model.``) beside the vision / audio towers. Its
    language model is loaded alone, text-only: its text config, and the prefix found from the weight names
    themselves (the one under which the text model's own weights all are) mapped onto the text model's. The
    towers' weights are left unread. Any other checkpoint: its own config and no mapping.
    """
    text = _text_config(config)
    if text is None:
        return config, None
    # The wrapper ties its output embedding by its own flag (its checkpoint then has no lm_head); the language
    # model loaded alone must do as the wrapper did.
    text.tie_word_embeddings = getattr(config, "tie_word_embeddings", text.tie_word_embeddings)
    transformers = _transformers()
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MoeportError(f"{path} is a multimodal {config.model_type} checkpoint with pickle weights only; convert "
                           "them to safetensors to export its language model")
    stored: set[str] = set()
    for file in files:
        with safe_open(file, "pt") as weights:
            stored.update(weights.keys())
    with torch.device("meta"):
        wanted = transformers.AutoModelForCausalLM.from_config(text)
    base = wanted.base_model_prefix + "."
    names = [name[len(base):] for name in wanted.state_dict() if name.startswith(base)]
    # Every prefix under which the first weight of the text model is stored, ranked by how many of its weights it holds.
    prefixes = {key[:-len(names[0])] for key in stored if key.endswith(names[0])}
    prefix = max(prefixes, key=lambda p: (sum(p + name in stored for name in names), p == base), default=base)
    return text, None if prefix == base else {f"^{re.escape(prefix)}": base}


def load_pretrained(path: str | os.PathLike, trust_pickle: bool = False) -> nn.Module:
    """Load a transformers causal LM from a local directory: offline, no remote code, float32, eager."""
    transformers = _transformers()
    path = Path(path)
    if not _has_safetensors(path):
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
        if not pickles:
            raise MoeportError(f"no *.safetensors weights in {path}")
        if not trust_pickle:
            raise MoeportError(
                f"{path} holds only pickle weights ({pickles[0]}); pickle can run code when loaded. Convert them "
                "to safetensors, or pass --trust-pickle to load them with torch.load(weights_only=True)"
            )
    from safetensors import SafetensorError

    try:
        with quiet_loading():
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise load_error(path, exc) from exc
    config, key_mapping = _language_model(config, path)
    check_sizes(config.to_dict(), path / "config.json")
    config._experts_implementation = "eager"
    try:
        with quiet_loading():
            model, loading = transformers.AutoModelForCausalLM.from_pretrained(
                path, config=config, key_mapping=key_mapping, local_files_only=True, trust_remote_code=False,
                dtype=torch.float32,
                use_safetensors=not trust_pickle or _has_safetensors(path), attn_implementation="eager",
                # Missing weights would be silently random-initialised, mismatched ones raise a RuntimeError
                # that points at the logged table: get both back as data and refuse them below.
                ignore_mismatched_sizes=True, output_loading_info=True,
            )
    except SafetensorError as exc:
        raise MoeportError(f"a *.safetensors file in {path} is not readable ({exc})") from exc
    except pickle.UnpicklingError as exc:
        # torch.load(weights_only=True) met a non-tensor object (possibly code). Its own message advises
        # weights_only=False, which is exactly what must not be done with an untrusted file.
        raise MoeportError(f"{path}: the pickle weights hold objects other than tensors, refused by "
                           "torch.load(weights_only=True); convert them to safetensors from a trusted copy") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise load_error(path, exc) from exc
    problems = [f"missing weight {key!r}" for key in loading["missing_keys"]] + [
        f"{key!r} has shape {tuple(got)}, the config needs {tuple(want)}" for key, got, want in loading["mismatched_keys"]]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MoeportError(f"the weights in {path} do not match its config.json: {problems[0]}{more}")
    return model.eval()


def build(config: dict) -> nn.Module:
    """Random-weight model from a config dict (the loader replaces this path for checkpoints)."""
    transformers = _transformers()
    cfg = transformers.AutoConfig.for_model(**config)
    cfg._experts_implementation = "eager"
    cfg._attn_implementation = "eager"
    return CausalLMAdapter(transformers.AutoModelForCausalLM.from_config(cfg).eval())


def _matches(config: dict) -> bool:
    if "model_type" not in config or "family" in config:
        return False
    try:
        transformers = _transformers()
    except MoeportError:
        return True  # say "install transformers" rather than "unknown family"
    causal_lms = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    text = config.get("text_config")
    return config["model_type"] in causal_lms or (isinstance(text, dict) and text.get("model_type") in causal_lms)


def load(path: str | os.PathLike, trust_pickle: bool = False) -> LoadedModel:
    """Load a Hugging Face MoE checkpoint directory as a ``LoadedModel``."""
    model = load_pretrained(path, trust_pickle)
    adapter = CausalLMAdapter(model)
    if not adapter.experts:
        raise MoeportError(f"{path}: {type(model).__name__} has no experts on transformers' experts interface; "
                           "it is not an MoE model moeport can export")
    loaded = families.from_module("transformers", adapter, model.config.to_dict())
    loaded.source = Path(path)
    return loaded


def moe_layers(adapter: CausalLMAdapter) -> list[nn.Module]:
    return adapter.moe_layers()


SPEC = register_family(FamilySpec.from_module(
    sys.modules[__name__], name="transformers", matches=_matches, input_names=(INPUT_IDS, ATTENTION_MASK),
    description="Hugging Face transformers causal LMs whose experts use transformers.integrations.moe"))
