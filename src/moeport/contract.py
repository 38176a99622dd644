"""The model contract: what an exported moeport file says about itself, read and written by every layer.

Torch-free (numpy and onnx only), so the exporter that writes a file and the runtime and quantizer that read
it share one definition:

- graph I/O names: ``input_ids``, ``attention_mask``, ``position_ids``, ``logits``, the KV cache
  ``past_key_values.{i}.key|value`` -> ``present.{i}.key|value`` (``[batch, kv_heads, past_sequence, head_dim]``
  -> ``[batch, kv_heads, past_sequence + sequence, head_dim]``; the past's kv_heads and head_dim axes are free
  in the graph, see ``PAST_KV_HEADS_AXIS``), the recurrent states of hybrid models' linear-attention / Mamba
  layers ``past_{kind}.{i}`` -> ``present_{kind}.{i}`` (``STATE_KINDS``, fixed shapes ``[batch, ...]``), and per
  MoE layer ``routing.{label}.{part}``
  (``experts [batch*sequence, k] int64``, ``weights [batch*sequence, k] float32``, strategy extras such as
  ``dropped``, an int64 scalar);
- ``metadata_props`` under ``moeport.``: ``version``, ``family``, ``source_sha256``, ``num_experts``,
  ``top_k``, ``strategy``, ``task``, ``with_routing``, ``model_info`` (the ``ModelInfo`` as JSON),
  ``capacity_factor``, ``quantization``;
- ``ModelInfo`` / ``MoELayerInfo``: the model's MoE layers as the graph names them;
- ``TIE_MARGIN``: when two router scores count as a tie;
- ``Reference``: what a parity check needs from the model the file was exported from (the exporter provides
  one for a PyTorch checkpoint; runtime and quant take it as an argument and never import torch).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from moeport._fs import load_model_proto
from moeport.errors import MoeportError

METADATA_PREFIX = "moeport."
# The keys export writes (without the prefix); quantize adds QUANTIZATION_KEY.
METADATA_KEYS = ("version", "family", "source_sha256", "num_experts", "top_k", "strategy", "task", "with_routing",
                 "model_info", "capacity_factor", "kv_cache")
QUANTIZATION_KEY = "quantization"

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
ROUTING_PARTS = ("experts", "weights")
KV_PARTS = ("key", "value")
# An attention layer with a token indexer (Qwen4-Exp's QSA) also caches the indexer's keys:
# ``past_key_values.{i}.indexer_key [batch, past_sequence, index_head_dim]`` -> ``present.{i}.indexer_key``.
INDEXER_KEY = "indexer_key"

# Two experts whose selection scores are closer than this are a tie: torch and onnxruntime may break it
# differently (both correctly), and everything downstream of that token then differs.
TIE_MARGIN = 1e-5


def routing_name(label: str, part: str) -> str:
    """``routing.{label}.{part}``: the output holding ``part`` (experts, weights, dropped ...) of one MoE layer."""
    return f"routing.{label}.{part}"


def past_name(layer: int, part: str) -> str:
    """``past_key_values.{layer}.{part}``, ``part`` in ``KV_PARTS`` or ``INDEXER_KEY``: a KV-cache input."""
    return f"past_key_values.{layer}.{part}"


def present_name(layer: int, part: str) -> str:
    """``present.{layer}.{part}``: the KV-cache output that feeds ``past_name(layer, part)`` at the next step."""
    return f"present.{layer}.{part}"


def past_name_pattern(part: str) -> str:
    """``past_key_values.%d.{part}``: the past input names as a printf pattern (how onnxruntime-genai's config
    names them, the layer number standing for ``%d``)."""
    return past_name(0, part).replace(".0.", ".%d.")


def present_name_pattern(part: str) -> str:
    """``present.%d.{part}``: the present output names as a printf pattern (see ``past_name_pattern``)."""
    return present_name(0, part).replace(".0.", ".%d.")


def past_names(num_layers: int) -> list[str]:
    return [past_name(i, part) for i in range(num_layers) for part in KV_PARTS]


def present_names(num_layers: int) -> list[str]:
    return [present_name(i, part) for i in range(num_layers) for part in KV_PARTS]


# The free axes of a past input besides batch and past_sequence: a runtime that builds the first, empty past from
# its own reading of config.json (Optimum takes num_attention_heads for model types outside its own list) must
# not trip over them. An empty past adds nothing to the cache; once past_sequence > 0 the graph's own presents
# (``[batch, kv_heads, past_sequence, head_size]``) are fed back.
PAST_KV_HEADS_AXIS, PAST_HEAD_SIZE_AXIS = "past_kv_heads", "past_head_size"

# How a with-past graph keeps its cache (metadata ``kv_cache``). ``concat``: each present is the past with the new
# tokens appended (``[batch, kv_heads, past_sequence + sequence, head_dim]``). ``shared``: past and present are one
# buffer of a fixed length (``[batch, kv_heads, max_sequence, head_dim]``) that the step writes its tokens into at
# columns ``attention_mask.shape[1] - sequence ..`` and hands back, so a runtime can bind both to the same memory
# (onnxruntime-genai's ``past_present_share_buffer``); the attention mask covers only the columns written so far.
KV_CACHE_CONCAT, KV_CACHE_SHARED = "concat", "shared"
KV_CACHES = (KV_CACHE_CONCAT, KV_CACHE_SHARED)


# Recurrent states of hybrid models, one tensor of a fixed shape per layer and kind, named as transformers.js names
# them (configs.js getCacheNames; modeling_utils.js maps present_* back to past_*): ``conv`` the short convolution's
# last inputs ``[batch, channels, kernel]`` (Qwen3-Next / Qwen3.5 linear attention, Mamba, LFM2), ``recurrent`` a
# linear-attention state (Qwen3-Next / Qwen3.5 Gated DeltaNet ``[batch, heads, key_dim, value_dim]``), ``ssm`` a
# Mamba state (Granite-4.0-H). ``{i}`` is the model's layer index, as in ``past_key_values.{i}.key``. (onnxruntime-genai's
# Qwen3.5 builder names the same tensors ``past_key_values.{i}.conv_state`` / ``.recurrent_state``, keeping
# kernel - 1 convolution columns; one graph cannot carry both names.)
STATE_KINDS = ("conv", "recurrent", "ssm")


def state_past_name(layer: int, kind: str) -> str:
    """``past_{kind}.{layer}``, ``kind`` in ``STATE_KINDS``: a recurrent-state input."""
    if kind not in STATE_KINDS:
        raise ValueError(f"unknown state kind {kind!r}; one of {STATE_KINDS}")
    return f"past_{kind}.{layer}"


def state_present_name(layer: int, kind: str) -> str:
    """``present_{kind}.{layer}``: the state output that feeds ``state_past_name(layer, kind)`` at the next step."""
    return "present" + state_past_name(layer, kind)[len("past"):]


def is_cache_input(name: str) -> bool:
    """A KV-cache (``past_key_values.*``) or recurrent-state (``past_{kind}.*``) input of a with-past graph."""
    return name.startswith("past_key_values.") or any(name.startswith(f"past_{kind}.") for kind in STATE_KINDS)


def present_for(past: str) -> str:
    """The present output that feeds the past input ``past`` (``past_key_values.3.key`` -> ``present.3.key``,
    ``past_conv.0`` -> ``present_conv.0``)."""
    if past.startswith("past_key_values."):
        return "present." + past[len("past_key_values."):]
    if is_cache_input(past):
        return "present" + past[len("past"):]
    raise ValueError(f"{past!r} is not a past_key_values or recurrent-state input")


@dataclass(frozen=True)
class MoELayerInfo:
    """One MoE layer as the exported graph names it (``routing.{label}.experts``)."""

    label: str
    num_experts: int
    top_k: int
    router: str


@dataclass(frozen=True)
class ModelInfo:
    family: str
    vocab_size: int
    layers: tuple[MoELayerInfo, ...]
    input_names: tuple[str, ...] = (INPUT_IDS,)
    model_type: str = ""  # the transformers model_type, for Hugging Face checkpoints

    @property
    def num_experts(self) -> int:
        return max(layer.num_experts for layer in self.layers)

    @property
    def top_k(self) -> int:
        return max(layer.top_k for layer in self.layers)

    @property
    def all_soft(self) -> bool:
        """True when every layer weights all of its experts (dense soft MoE)."""
        return all(layer.top_k == layer.num_experts for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "vocab_size": self.vocab_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "layers": [vars(layer) for layer in self.layers],
            "input_names": list(self.input_names),
            "model_type": self.model_type,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelInfo":
        return cls(data["family"], int(data["vocab_size"]), tuple(MoELayerInfo(**d) for d in data["layers"]),
                   tuple(data.get("input_names", (INPUT_IDS,))), data.get("model_type", ""))


def output_names(info: ModelInfo, with_routing: bool, extra_outputs: tuple[str, ...] = ()) -> list[str]:
    """Graph output names of the logits task: ``logits``, then per MoE layer ``routing.{label}.experts|weights|<extra>``."""
    names = [LOGITS]
    if with_routing:
        for layer in info.layers:
            names += [routing_name(layer.label, part) for part in (*ROUTING_PARTS, *extra_outputs)]
    return names


def random_inputs(info: ModelInfo, batch: int, seq: int, seed: int, left_padding: bool = False) -> dict[str, np.ndarray]:
    """Seeded model inputs: ``input_ids [batch, seq]`` in ``[0, vocab)`` and, where the model takes it,
    ``attention_mask`` (all ones, or with ``left_padding`` row r starting with min(r, seq - 1) pads)."""
    inputs = {INPUT_IDS: np.random.default_rng(seed).integers(0, info.vocab_size, size=(batch, seq), dtype=np.int64)}
    if ATTENTION_MASK in info.input_names:
        mask = np.ones((batch, seq), dtype=np.int64)
        if left_padding:
            for row in range(batch):
                mask[row, : min(row, seq - 1)] = 0
        inputs[ATTENTION_MASK] = mask
    return inputs


def metadata_props(proto) -> dict[str, str]:
    """The ``moeport.*`` metadata of a ModelProto, keys without the prefix."""
    return metadata_of_map({p.key: p.value for p in proto.metadata_props})


def read_metadata(model: str | os.PathLike) -> dict[str, str]:
    """The ``moeport.*`` metadata of an ONNX file (without loading its weights), keys without the prefix."""
    return metadata_props(load_model_proto(model))  # also refuses external data outside the model's directory


def parse_model_info(raw: "str | bytes", model: str | os.PathLike) -> ModelInfo:
    """The ``moeport.model_info`` metadata value of ``model`` as a ModelInfo; a damaged value is a user error."""
    try:
        return ModelInfo.from_dict(json.loads(raw))
    # ValueError covers JSONDecodeError and UnicodeDecodeError (protobuf hands over bytes that are not UTF-8).
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise MoeportError(f"{model} has damaged moeport metadata (model_info: {type(exc).__name__}); "
                           "re-export it with `moeport export`") from exc


def optional_model_info(metadata: dict[str, str], model: str | os.PathLike) -> ModelInfo | None:
    """The ModelInfo of ``metadata`` (from ``read_metadata``), None for a file moeport did not export."""
    raw = metadata.get("model_info")
    return None if raw is None else parse_model_info(raw, model)


def metadata_of_map(props: dict[str, str]) -> dict[str, str]:
    """The ``moeport.*`` entries of a metadata map with prefixed keys (onnxruntime's ``custom_metadata_map``),
    keys without the prefix."""
    return {k[len(METADATA_PREFIX):]: v for k, v in props.items() if k.startswith(METADATA_PREFIX)}


def quantization_mode(metadata: dict[str, str]) -> str | None:
    """The mode ``moeport quantize`` recorded in ``metadata`` (the ``moeport.*`` entries, keys without the prefix),
    e.g. ``"int4"``; ``"quantized"`` for a record that names none; None for a file that was not quantized."""
    record = metadata.get(QUANTIZATION_KEY)
    if record is None:
        return None
    try:
        parsed = json.loads(record)
    except ValueError:  # a record some other tool wrote over ours: still a quantized file
        return "quantized"
    mode = parsed.get("mode") if isinstance(parsed, dict) else None
    return str(mode) if mode else "quantized"


def vocab_size(props: dict[str, str], model: str | os.PathLike = "the model") -> int | None:
    """The vocabulary size in a metadata map with prefixed keys (onnxruntime's ``custom_metadata_map``); None
    for a file moeport did not export."""
    info = optional_model_info(metadata_of_map(props), model)
    return None if info is None else info.vocab_size


def model_info(model: str | os.PathLike) -> tuple[ModelInfo, dict[str, str]]:
    """``(ModelInfo, metadata)`` of a moeport export; a file without moeport metadata is a user error."""
    metadata = read_metadata(model)
    info = optional_model_info(metadata, model)
    if info is None:
        raise MoeportError(f"{model} has no moeport metadata (family, experts); export it with `moeport export`")
    return info, metadata


class Reference(Protocol):
    """The model an ONNX file was exported from, as a parity check uses it (arrays in, arrays out).

    ``outputs(feeds)`` returns ``{graph output name: array}`` for the same feeds the ONNX model gets (names as
    the graph has them: ``logits``, ``routing.{label}.experts`` ...); ``margins(feeds)`` per MoE layer, per
    token ``[batch*seq]``, the gap between the k-th and (k+1)-th selection score (inf when k == E).
    """

    info: ModelInfo
    tolerance: float  # default max abs error of the family
    source: Path  # the checkpoint directory, for reports
    source_sha256: str  # of its config and weights, compared with the file's ``moeport.source_sha256``

    def outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def margins(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...
