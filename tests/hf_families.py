"""Test support: which transformers MoE families moeport exports, derived from the installed transformers, and
the tiny random models the tests export them from (not part of the library: nothing in moeport imports it).

- ``interface_families()``: every causal-LM ``model_type`` whose modeling source decorates its experts with
  ``@use_experts_implementation`` (read from the installed package, not a hand-kept list).
- ``tiny_config(model_type, **variant)``: a tiny random config of that family (hidden 32, 2 layers, 8 experts,
  vocab 128, 4 heads / 2 kv heads) for tests: generic sizes applied to the keys the family's config has,
  then the family's row of ``OVERRIDES``, then the variant.
- ``VARIANTS``: per family, the config options that change its MoE (top-k, normalised top-k weights,
  grouped routing, shared experts, dense-then-MoE schedules, biases), each exported by the tests.
- ``UNSUPPORTED``: families that do not export, with the reason measured on this transformers; ``LIMITS``:
  what a supported family's tiny model does not show (config options or a task that fail, measured); the tests
  check that each reason still holds, so the table cannot rot.
- ``coverage_markdown()``: the README table; ``python tests/hf_families.py`` prints it.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

from moeport.errors import MoeportError
from moeport.exporter.hf import _transformers

DECORATOR = "@use_experts_implementation"

# Tiny sizes, applied only to the keys a family's default config has (families name the same thing
# differently: num_local_experts / num_experts / n_routed_experts / moe_num_experts ...).
GENERIC = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "num_local_experts": 8,
    "num_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k_experts": 2,
    # Multi-head latent attention (DeepSeek-V2/V3, GLM-MoE-DSA ...).
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 8,
    "n_shared_experts": 1,
    # Ungrouped routing and every layer MoE by default; the variants switch these on.
    "n_group": 1,
    "topk_group": 1,
    "num_expert_group": 1,
    "first_k_dense_replace": 0,
    "num_dense_layers": 0,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    # Special token ids must exist in the tiny vocabulary (an out-of-range padding_idx fails at build).
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

# A tiny model stays under this many parameters (the tests check it for every discovered family).
TINY_PARAMETER_BOUND = 5_000_000

# When the generic sizes still leave a family above the bound (a transformers release added a family, or a
# size field, that GENERIC does not name yet: e.g. 5.24's `unpadded_vocab_size` and `swa_head_dim`), every
# other integer field whose name ends in one of these is cut to the tiny value. Only as a fallback, so the
# tiny models of families that already fit stay exactly as they were.
SIZE_SUFFIXES = {"vocab_size": 128, "head_dim": 8, "intermediate_size": 32, "hidden_size": 32, "lora_rank": 16}

# Multi-head latent attention expands keys to every head itself; eager attention's GQA repeat must not.
LATENT_ATTENTION = {"num_key_value_heads": GENERIC["num_attention_heads"]}

# Hybrid families: small linear-attention heads (their defaults, 16-32 heads of 128x128 states, would dominate the
# tiny model); a linear-attention or Mamba layer beside an attention layer, so that a with-past graph carries both
# kinds of cache (transformers' cache also needs one attention layer to count the past); and weights drawn 5x
# wider than the default 0.02, else the recurrence's share of the logits stays near or below the parity tolerance
# (measured at 0.02: 1.3e-5 in granitemoehybrid, 2.5e-4 in jamba; a broken scan would pass). At 0.1 the smallest
# share is 0.13 (granitemoehybrid); at 0.2 float32 rounding alone reached 7e-5 of the 1e-4 tolerance (qwen3_next).
_HYBRID = {"initializer_range": 0.1}
_GATED_DELTANET = {**_HYBRID, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
                   "linear_num_value_heads": 4}
_KIMI_DELTA = {**_HYBRID, "linear_head_dim": 8, "linear_num_heads": 4, "mlp_layer_types": ["sparse", "sparse"]}
_LINEAR_THEN_ATTENTION = {"layer_types": ["linear_attention", "full_attention"]}

# Per family: what the generic sizes do not cover. One dict per model_type, nothing else.
OVERRIDES: dict[str, dict] = {
    "bailing_hybrid": {**_KIMI_DELTA, **_LINEAR_THEN_ATTENTION},
    "beam": {"mlp_layer_types": ["sparse", "sparse"]},
    "ernie4_5_moe": {"moe_layer_start_index": 0, "moe_layer_end_index": 1},
    "gemma4_text": {"enable_moe_block": True, "moe_intermediate_size": 32, "vocab_size_per_layer_input": 128,
                    "hidden_size_per_layer_input": 8, "per_layer_config": {}},
    "granitemoehybrid": {**_HYBRID, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16,
                         "mamba_chunk_size": 16, "layer_types": ["mamba", "attention"]},
    # Mamba on layer 0, attention on layer 1, experts on both.
    "jamba": {**_HYBRID, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1,
              "expert_layer_offset": 0},
    "kimi_linear": {**_KIMI_DELTA, **_LINEAR_THEN_ATTENTION},
    "lara_mini": _GATED_DELTANET,  # its tiny layers: linear attention, sliding-window attention
    "lfm2_moe": {**_HYBRID, "layer_types": ["conv", "full_attention"]},
    "minimax": _HYBRID,  # its tiny layers: attention, lightning attention
    # Its default layers: Mamba2, experts, attention, dense MLP; the Mamba2 mixer's default width is 8192. Its
    # recurrence's share of the logits: 6e-4 at an initializer range of 0.1, 0.025 at 0.2.
    "nemotron_h": {"initializer_range": 0.2, "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 16,
                   "n_groups": 2, "chunk_size": 16},
    "qwen3_5_moe_text": {**_GATED_DELTANET, **_LINEAR_THEN_ATTENTION},
    "qwen3_next": {**_GATED_DELTANET, **_LINEAR_THEN_ATTENTION},
    # A Gated DeltaNet layer, then an attention layer with its QSA indexer (as Qwen4-Exp configs have it). The
    # indexer's block scores must not tie, as the reference's top-k (torch on CPU) breaks ties in no defined order:
    # 16 index heads (with 2, a block's relu-summed score is exactly 0 for about a quarter of the blocks), and no
    # padding token (its embedding row would be zero, and so would the query of a generated padding token).
    "qwen4_exp_text": {**_GATED_DELTANET, "layer_types": ["linear_attention", "indexed_attention"],
                       "indexer_n_heads": 16, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 4,
                       "indexer_compress_ratio": 2, "pad_token_id": None},
    "zaya": {"num_experts_per_tok": 1},
}

# Per family: the config options that change the MoE, each exported with parity by the tests. Options
# that combine go into one variant (one export each on a 2-core test machine is what we can afford).
_GROUPED_RAW_DENSE_FIRST = {"n_group": 4, "topk_group": 2, "norm_topk_prob": False, "first_k_dense_replace": 1,
                            "num_hidden_layers": 3}
VARIANTS: dict[str, dict[str, dict]] = {
    "mixtral": {"top1": {"num_experts_per_tok": 1}, "top4": {"num_experts_per_tok": 4}},
    # MoE on every second layer only (layer 1 of 0..2), normalised top-k weights.
    "qwen2_moe": {"normalised_sparse_step_2": {"norm_topk_prob": True, "decoder_sparse_step": 2,
                                               "num_hidden_layers": 3}},
    "qwen3_moe": {"normalised_dense_first": {"norm_topk_prob": True, "mlp_only_layers": [0]}},
    "olmoe": {"normalised_top4": {"norm_topk_prob": True, "num_experts_per_tok": 4}},
    "deepseek_v2": {"group_limited_normalised_dense_first": {
        "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
        "routed_scaling_factor": 2.0, "first_k_dense_replace": 1, "num_hidden_layers": 3}},
    "deepseek_v3": {"grouped_raw_dense_first": _GROUPED_RAW_DENSE_FIRST},
    "gpt_oss": {"top1": {"num_experts_per_tok": 1}},
    "granitemoe": {"top1": {"num_experts_per_tok": 1}},
    "ernie4_5_moe": {"no_shared_dense_first": {"moe_num_shared_experts": 0, "moe_layer_start_index": 1,
                                               "moe_layer_end_index": 2, "num_hidden_layers": 3}},
    "glm4_moe": {"grouped_raw_dense_first": _GROUPED_RAW_DENSE_FIRST},
    "hunyuan_v1_moe": {"top1": {"moe_topk": 1}},
}

# Hybrid families (issue 16): token mixers other than attention, exported through exporter/hf_mixers.py; their
# with-past graphs carry recurrent states (tests/test_hf_hybrid.py).
HYBRID = ("bailing_hybrid", "granitemoehybrid", "jamba", "kimi_linear", "lara_mini", "lfm2_moe", "minimax",
          "nemotron_h", "qwen3_5_moe_text", "qwen3_next", "qwen4_exp_text")

# Exported with parity on every test run (GitHub issue 3); the other supported families under ``-m slow``.
EVERY_RUN = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe",
             "granitemoe", "ernie4_5_moe", "glm4_moe", "hunyuan_v1_moe")


@dataclass(frozen=True)
class Unsupported:
    """Why a family does not export. ``stage``: ``export`` (exporting the tiny model raises an error containing
    ``match``) or ``unverified`` (no result either way in the time a test can take); ``reason``: the table's
    words."""

    stage: str
    reason: str
    match: str = ""


# Families whose router logits the tie-margin hook (hf.routing_margins) cannot read, and why;
# verify then cannot tell a near-tie from a bug for them. The tests check both ways.
NO_TIE_MARGINS: dict[str, str] = {
    "zaya": "its router scores E+1 classes (a skip expert) and ranks softmax + balancing biases",
}

# Families that do not export, and why (measured; tests/test_hf_families.py re-checks each reason).
UNSUPPORTED: dict[str, Unsupported] = {}


@dataclass(frozen=True)
class Limit:
    """What a supported family's tiny model does not show: exporting it with the config ``options`` and ``task``
    raises an error containing ``match`` (measured; tests/test_hf_families.py re-checks it). ``reason``: the
    table's words."""

    reason: str
    options: dict
    task: str
    match: str


def _with_past_refused(state: str) -> Limit:
    """A with-past export refused because the model's cache holds ``state`` that no graph input carries yet
    (measured on the tiny models: the export stops with one line naming it; ``--task logits`` exports)."""
    return Limit(f"with past: {state}, which moeport does not carry between steps yet (logits only)", {},
                 "text-generation-with-past", "cannot carry between steps yet")


_CONV_BESIDE_ATTENTION = _with_past_refused("its attention layers also keep short-convolution states")

# Per family (a multimodal wrapper inherits its language model's): limits of its support.
LIMITS: dict[str, tuple[Limit, ...]] = {
    "deepseek_v4": (_with_past_refused("its compressed attention keeps compressor buffers beside the keys and "
                                       "values"),),
    "inkling_text": (_CONV_BESIDE_ATTENTION,),
    "inkling2_text": (_CONV_BESIDE_ATTENTION,),
    "inkling2_loop_text": (_CONV_BESIDE_ATTENTION,),
    "zaya": (_with_past_refused("its layers keep convolution and recurrent states beside attention's keys and "
                                "values"),),
    "qwen4_exp_text": (
        Limit("configs with per-layer n-gram embeddings (`ple_layer_ids`) do not export: their hashing takes a "
              "`cummax`, which has no ONNX translation", {"ple_layer_ids": [1], "eos_token_id": 2,
                                                         "ngram_vocab_size_base": 256, "split_ngram_parts": 1},
              "logits", "aten.cummax"),
    ),
}


def limits(model_type: str) -> tuple[Limit, ...]:
    return LIMITS.get(model_type) or LIMITS.get(text_model_type(model_type) or "", ())


@dataclass(frozen=True)
class Family:
    """One discovered family: its ``model_type``, the ``AutoModelForCausalLM`` class name, the modeling module."""

    model_type: str
    causal_lm: str
    module: str

    @property
    def status(self) -> str:
        if self.model_type in UNSUPPORTED:
            return f"unsupported: {UNSUPPORTED[self.model_type].reason}"
        status = "supported" if self.model_type in EVERY_RUN else "supported (tested with `-m slow`)"
        if self.model_type in HYBRID:
            status += "; hybrid: with-past carries its recurrent states"
        if text_model_type(self.model_type):
            status += f"; its language model (`{text_model_type(self.model_type)}`) from the wrapper checkpoint"
        for limit in limits(self.model_type):
            status += f"; {limit.reason}"
        return status

    @property
    def supported(self) -> bool:
        return self.model_type not in UNSUPPORTED


@functools.cache
def interface_families() -> tuple[Family, ...]:
    """Every causal-LM model_type of the installed transformers whose experts are on the experts interface.

    Read from the modeling sources (no model module is imported): a family is in when its
    ``modeling_<module>.py`` applies ``@use_experts_implementation``. Sorted by model_type.
    """
    _transformers()
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        module = model_type_to_module_name(model_type)
        spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
        if spec is None or spec.origin is None:
            continue
        with open(spec.origin, encoding="utf-8") as source:
            if DECORATOR in source.read():
                found.append(Family(model_type, class_name, module))
    return tuple(sorted(found, key=lambda f: f.model_type))


def get_family(model_type: str) -> Family:
    for family in interface_families():
        if family.model_type == model_type:
            return family
    raise MoeportError(f"{model_type!r} is not a transformers causal LM on the experts interface; "
                       f"known: {', '.join(f.model_type for f in interface_families())}")


def text_model_type(model_type: str) -> str | None:
    """The language model's model_type of a multimodal wrapper family (its config has a ``text_config``), else None."""
    sub_configs = _transformers().CONFIG_MAPPING[model_type].sub_configs or {}
    return sub_configs["text_config"].model_type if "text_config" in sub_configs else None


def tiny_config(model_type: str, **variant):
    """A tiny config of ``model_type``: generic sizes for the keys it has, its overrides, then ``variant``.

    When that is still above ``TINY_PARAMETER_BOUND`` parameters, the family's other size fields are cut
    too (``SIZE_SUFFIXES``), before its overrides and the variant, which always have the last word.
    A multimodal wrapper gets its text model's tiny config (``variant`` applies there) and tiny towers.
    """
    get_family(model_type)
    if text_model_type(model_type):
        return _tiny_wrapper_config(model_type, tiny_config(text_model_type(model_type), **variant))
    transformers = _transformers()
    config_class = transformers.CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    # Passed to the constructor (not set afterwards) so derived fields (layer_types, ...) follow the sizes.
    kwargs = {key: value for key, value in GENERIC.items() if key in defaults}
    if "kv_lora_rank" in defaults:
        kwargs.update(LATENT_ATTENTION)
    # A misspelt option would become a silently ignored attribute; the config's own fields are the options.
    unknown = sorted(set(OVERRIDES.get(model_type, {})) - set(defaults) | set(variant) - set(defaults))
    if unknown:
        raise MoeportError(f"{model_type} configs have no option {', '.join(unknown)}")
    explicit = {**OVERRIDES.get(model_type, {}), **variant}
    key = f"{model_type}{sorted(variant.items())!r}"
    if key not in _GENERIC_TOO_BIG:  # building on the meta device takes ~0.3 s; tests ask many times
        _GENERIC_TOO_BIG[key] = parameter_count(_configured(config_class, {**kwargs, **explicit})) > TINY_PARAMETER_BOUND
    if _GENERIC_TOO_BIG[key]:
        kwargs.update(_size_fields(defaults, kwargs))
    return _configured(config_class, {**kwargs, **explicit})


_GENERIC_TOO_BIG: dict[str, bool] = {}

# A multimodal wrapper's vision / audio towers, tiny: one layer, width 16, few experts; projections into the
# language model sized to its hidden size, projections out of a tower to the tower's width.
TOWER = {"depth": 1, "num_hidden_layers": 1, "num_layers": 1, "hidden_size": 16, "intermediate_size": 32,
         "num_heads": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
         "num_position_embeddings": 64, "per_layer_config": {}, "downsample_hidden_size": 8, "feature_size": 16,
         "num_local_experts": 4, "moe_intermediate_size": 16, "num_experts_per_tok": 2}
_INTO_TEXT = ("out_dim", "out_hidden_size", "output_dim", "projection_dim")
_TOWER_INPUT = ("in_dim", "input_size")


def _tiny_wrapper_config(model_type: str, text):
    """The wrapper config of ``model_type`` around the tiny ``text`` config, with tiny towers; its output
    embedding tied as the text config says (the wrapper ties by its own flag)."""
    config_class = _transformers().CONFIG_MAPPING[model_type]
    towers = {}
    for name, tower_class in config_class.sub_configs.items():
        if name == "text_config":
            continue
        defaults = tower_class().to_dict()
        sizes = {key: value for key, value in TOWER.items() if key in defaults}
        sizes.update({key: text.hidden_size for key in defaults if key.endswith(_INTO_TEXT)})
        width = sizes.get("hidden_size", TOWER["hidden_size"])
        sizes.update({key: width for key in defaults if key.endswith(_TOWER_INPUT)})
        towers[name] = tower_class(**sizes)
    return _configured(config_class, {"text_config": text, **towers, "tie_word_embeddings": text.tie_word_embeddings})


def _build(config):
    """A model of ``config``: a wrapper's own (image-)text-to-text class, which holds the towers its checkpoints
    have; otherwise ``AutoModelForCausalLM``'s class."""
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if text_model_type(config.model_type):
        return getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[config.model_type])(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def _configured(config_class, kwargs: dict):
    config = config_class(**kwargs)
    config._experts_implementation = "eager"
    config._attn_implementation = "eager"
    return config


def _size_fields(defaults: dict, generic: dict) -> dict:
    """The integer fields of ``defaults`` not in ``generic`` whose name ends in a ``SIZE_SUFFIXES`` key, cut."""
    cut = {}
    for key, value in defaults.items():
        if key in generic or isinstance(value, bool) or not isinstance(value, int):
            continue
        tiny = next((size for suffix, size in SIZE_SUFFIXES.items() if key.endswith(suffix)), None)
        if tiny is not None and value > tiny:
            cut[key] = tiny
    return cut


def parameter_count(config) -> int:
    """Parameters of a model of ``config`` (``_build``), counted on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = _build(config)
    return sum(parameter.numel() for parameter in model.parameters())


def random_model(model_type: str, seed: int = 0, **variant):
    """A random-weight model of ``tiny_config(model_type, **variant)`` (a wrapper's own class for a multimodal
    wrapper, whose checkpoint then holds its towers too), in eval mode.

    Some families initialise their router matrices to zero (every expert ties, so routing is arbitrary);
    any weight matrix that initialises to a constant is redrawn from N(0, initializer_range) so the tiny
    model routes like a trained one: by clear margins.
    """
    import torch

    config = tiny_config(model_type, **variant)
    torch.manual_seed(seed)
    model = _build(config)
    std = float(getattr(config.get_text_config(), "initializer_range", 0.02) or 0.02)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and parameter.is_floating_point() and bool((parameter == parameter.flatten()[0]).all()):
                parameter.normal_(0.0, std)
    return model.eval()


def variants(model_type: str) -> dict[str, dict]:
    """``{"default": {}, name: options, ...}`` for one family."""
    return {"default": {}, **VARIANTS.get(model_type, {})}


def coverage_markdown() -> str:
    """The README table: one row per discovered family (model_type, causal-LM class, status, variants)."""
    transformers = _transformers()
    lines = [
        f"Discovered from transformers {transformers.__version__}: causal LMs whose experts use "
        "`@use_experts_implementation` (`python tests/hf_families.py` regenerates this table).",
        "",
        "| model_type | ForCausalLM class | status | variants exported |",
        "|---|---|---|---|",
    ]
    for family in interface_families():
        names = ", ".join(f"`{name}`" for name in VARIANTS.get(family.model_type, {})) if family.supported else ""
        lines.append(f"| `{family.model_type}` | `{family.causal_lm}` | {family.status} | {names or '-'} |")
    lines += ["", "Not on the interface, with its own adapter (`exporter/hf_switch.py`): `switch_transformers` "
              "(`SwitchTransformersForConditionalGeneration`, encoder-decoder, top-1 with expert capacity)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(coverage_markdown(), end="")
