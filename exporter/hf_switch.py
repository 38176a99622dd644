"""Switch Transformers (transformers ``switch_transformers``): encoder-decoder, top-1 router, experts not on
the experts interface, so this family has its own small adapter.

Call convention (as every family): ``forward(input_ids [batch, seq], attention_mask [batch, seq] = None)``
-> ``(logits [batch, seq, vocab], [(expert_idx [tokens, 1], expert_weight [tokens, 1]) per sparse layer])``.
The decoder reads ``input_ids`` shifted right (teacher forcing: position t predicts token t), so one graph
with the same two inputs as the decoder-only families covers encoder and decoder. Sparse layers are
labelled ``encoder.<block>`` / ``decoder.<block>``; encoder layers come first (that is the call order).

The router keeps its expert capacity: a token past its expert's capacity (per sequence) is dropped by
the model, which we report as weight 0 on the argmax expert, so dispatch and reference agree.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from moeport.errors import MoeportError
from moeport.exporter import families
from moeport.contract import ATTENTION_MASK, INPUT_IDS, MoELayerInfo
from moeport.exporter.families import FamilySpec, LoadedModel, register_family
from moeport.exporter.hf import _has_safetensors, _transformers, load_error, quiet_loading
from moeport.exporter.patching import Patch
from moeport.exporter.strategies import ExpertBank, ExpertsSite

MODEL_TYPE = "switch_transformers"


def _is_experts(module: nn.Module) -> bool:
    return type(module).__name__ == "SwitchTransformersExperts"


def _routing(selected: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' inputs ``selected [tokens, 1, E]`` (one-hot, all zero when dropped for capacity) and
    ``weights [tokens, 1]`` -> ``(expert_idx [tokens, 1] int64, expert_weight [tokens, 1])``."""
    one_hot = selected[:, 0, :]
    kept = one_hot.sum(-1, keepdim=True).to(weights.dtype)
    return one_hot.argmax(-1, keepdim=True), weights * kept


def _router_forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``SwitchTransformersTop1Router.forward`` in eval mode, without its ``self.classifier.to(dtype)``:
    moving a module inside forward swaps its parameters, which torch.export refuses, and would change the
    caller's model. The classifier's weights are cast as tensors instead (a no-op when they already have the
    router's dtype). Same outputs: (one-hot dispatch [batch, seq, E] masked by capacity, top-1 probability
    [batch, seq, 1], logits)."""
    classifier = self.classifier
    bias = None if classifier.bias is None else classifier.bias.to(self.dtype)
    router_logits = nn.functional.linear(hidden_states.to(self.dtype), classifier.weight.to(self.dtype), bias)
    router_probs = nn.functional.softmax(router_logits, dim=-1, dtype=self.dtype).to(hidden_states.dtype)
    expert_index = nn.functional.one_hot(torch.argmax(router_probs, dim=-1), num_classes=self.num_experts)
    # Capacity is per sequence: a token past its expert's capacity gets an all-zero row (dropped).
    expert_index = expert_index * (torch.cumsum(expert_index, dim=-2) <= self.expert_capacity)
    return expert_index, torch.max(router_probs, dim=-1).values.unsqueeze(-1), router_logits


class SwitchAdapter(nn.Module):
    """A ``SwitchTransformersForConditionalGeneration`` in moeport's call convention (see the module doc)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        named = [(name, m) for name, m in model.named_modules() if _is_experts(m)]
        self.experts = [m for _, m in named]
        self.labels = [_label(name) for name, _ in named]
        # transformers 5 keeps it in the generation config; T5-style models start the decoder with the pad id.
        start = getattr(model.config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
        self.decoder_start_token_id = int(model.config.pad_token_id if start is None else start)

    def _shift_right(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Decoder inputs ``[batch, seq]``: the start token, then ``input_ids`` without its last column."""
        start = torch.full_like(input_ids[:, :1], self.decoder_start_token_id)
        return torch.cat([start, input_ids[:, :-1]], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        records: list = []

        def hook(_module, args):
            records.append(_routing(args[1], args[2]))

        handles = [m.register_forward_pre_hook(hook) for m in self.experts]
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             decoder_input_ids=self._shift_right(input_ids),
                             decoder_attention_mask=attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return out.logits, records


def _label(path: str) -> str:
    """``encoder.block.3.layer.1.mlp.experts`` -> ``encoder.3``."""
    match = re.search(r"(encoder|decoder)\.block\.(\d+)\.", path)
    if match is None:
        raise RuntimeError(f"unexpected Switch Transformers experts path {path!r}")
    return f"{match[1]}.{match[2]}"


def _bank(experts: nn.Module) -> ExpertBank:
    """Per expert ``wi.weight.T [d_model, d_ff]`` and ``wo.weight.T [d_ff, d_model]``; no GLU, the expert's act."""
    members = [experts[f"expert_{e}"] for e in range(experts.num_experts)]
    return ExpertBank([m.wi.weight.detach().T.clone() for m in members],
                      [m.wo.weight.detach().T.clone() for m in members], members[0].act)


def _experts_forward(dispatch: Callable) -> Callable:
    """A strategy's ``dispatch(x, idx, weight)`` as the experts module's forward (an instance attribute):
    ``forward(hidden_states, selected_experts [tokens, 1, E], routing_weights [tokens, 1])``."""

    def forward(hidden_states, selected_experts, routing_weights):
        return dispatch(hidden_states, *_routing(selected_experts, routing_weights))

    return forward


def experts_sites(modules: list[nn.Module]) -> list[ExpertsSite]:
    return [ExpertsSite(module, functools.partial(_bank, module), "forward", _experts_forward) for module in modules]


def _is_router(module: nn.Module) -> bool:
    return type(module).__name__ == "SwitchTransformersTop1Router"


def export_patches(adapter: SwitchAdapter) -> list[Patch]:
    """Every router runs ``_router_forward`` (an instance ``forward``) while the model is exported."""
    return [Patch(module, "forward", _router_forward.__get__(module)) for module in adapter.model.modules()
            if _is_router(module)]


def describe(adapter: SwitchAdapter, experts: list[nn.Module]) -> list[MoELayerInfo]:
    return [MoELayerInfo(label, int(m.num_experts), 1, "switch_top1") for label, m in zip(adapter.labels, experts)]


def routing_margins(loaded: LoadedModel, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Per sparse layer, the gap between the best and second router logit (top-1: the only tie that matters)."""
    adapter: SwitchAdapter = loaded.model
    logits: list[torch.Tensor] = []
    routers = [m for m in adapter.model.modules() if _is_router(m)]
    families.run_with_hooks(
        [(r, lambda _m, _a, out: logits.append(out[2].reshape(-1, out[2].shape[-1]))) for r in routers],
        lambda: adapter(**{name: torch.from_numpy(a) for name, a in inputs.items()}))
    margins = []
    for layer_logits in logits:
        top = torch.topk(layer_logits.float(), 2, dim=-1).values
        margins.append((top[:, 0] - top[:, 1]).numpy())
    return margins


def build(config: dict) -> nn.Module:
    transformers = _transformers()
    cfg = transformers.AutoConfig.for_model(**config)
    cfg._attn_implementation = "eager"
    return SwitchAdapter(transformers.SwitchTransformersForConditionalGeneration(cfg).eval())


def load(path: str | os.PathLike, trust_pickle: bool = False) -> LoadedModel:
    """Load a Switch Transformers checkpoint directory offline (safetensors; no remote code), float32."""
    transformers = _transformers()
    path = Path(path)
    if not _has_safetensors(path) and not trust_pickle:
        raise MoeportError(f"no *.safetensors weights in {path} (pickle weights need --trust-pickle)")
    try:
        with quiet_loading():
            model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
                path, local_files_only=True, trust_remote_code=False, dtype=torch.float32, attn_implementation="eager",
                use_safetensors=_has_safetensors(path))
    except (OSError, ValueError, KeyError) as exc:
        raise load_error(path, exc) from exc
    adapter = SwitchAdapter(model.eval())
    if not adapter.experts:
        raise MoeportError(f"{path}: this Switch Transformers config has no sparse layers")
    loaded = families.from_module(SPEC.name, adapter, model.config.to_dict())
    loaded.source = path
    return loaded


def moe_layers(adapter: SwitchAdapter) -> list[nn.Module]:
    return adapter.experts


SPEC = register_family(FamilySpec.from_module(
    sys.modules[__name__], name="switch_transformers", input_names=(INPUT_IDS, ATTENTION_MASK),
    description="Hugging Face Switch Transformers (encoder-decoder, top-1 router with expert capacity)",
    matches=lambda config: config.get("model_type") == MODEL_TYPE and "family" not in config))
