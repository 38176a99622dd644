"""A tiny transformers Mixtral: the one real Hugging Face checkpoint the tests build (random weights, seed 0).

Test files import it as ``from tiny_hf import ...`` (pytest puts this rootless tests/ folder on sys.path).
"""

from __future__ import annotations

from pathlib import Path

TINY_MIXTRAL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


def save_tiny_mixtral(directory: Path) -> Path:
    """``save_pretrained`` a seeded tiny MixtralForCausalLM (config.json + model.safetensors) to ``directory``."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY_MIXTRAL)).save_pretrained(directory)
    return directory
