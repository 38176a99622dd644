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


PRINTABLE_ASCII = "".join(chr(c) for c in range(32, 127))


def save_char_tokenizer(directory: Path, characters: str = PRINTABLE_ASCII):
    """A character-level fast tokenizer (one token per character of ``characters``, then ``[UNK]``) saved like
    a Hugging Face checkpoint's (tokenizer.json + tokenizer_config.json); returns the transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {character: i for i, character in enumerate(characters)}
    vocab["[UNK]"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_switch_config(**overrides):
    """A tiny Switch Transformers config (d_model 32, 2+2 layers all sparse, 8 experts, vocab 128)."""
    import transformers

    options = dict(vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
                   num_experts=8, expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1,
                   relative_attention_num_buckets=8, relative_attention_max_distance=32)
    return transformers.SwitchTransformersConfig(**{**options, **overrides})


# Families exported as runtime folders (tests/test_layouts.py, test_hf_generate.py): the config variant of
# tests/hf_families.py and whether the tokenizer adds a BOS (Llama-style) or not (Qwen-style).
DEPLOYED = {
    "mixtral": ({}, True),
    "qwen3_moe": ({}, False),
    "qwen2_moe": ({}, False),
    "olmoe": ({}, True),
    "deepseek_v3": ({"variant": "grouped_raw_dense_first"}, True),
    "granitemoe": ({}, False),
    "gpt_oss": ({}, False),
}


# The text the test BPE tokenizer is trained on; prompts made of its characters encode without unknown bytes.
BPE_TEXT = ("the quick brown fox jumps over the lazy dog. mixture of experts models route every token to a few "
            "experts, and the experts compute in parallel. hello world! small tests of bpe merges: 0123456789, "
            "tokens, prompts, answers? yes; no.")


def save_bpe_tokenizer(directory: Path, vocab_size: int = 128, bos: bool = True):
    """A byte-level BPE fast tokenizer (GPT-2 style, the kind every runtime's tokenizer reads) trained on
    ``BPE_TEXT`` to ``vocab_size`` tokens, saved like a Hugging Face checkpoint's with transformers'
    ``save_pretrained``. Ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>`` (the tiny configs' pad, bos and eos);
    with ``bos`` every encoding starts with ``<s>`` (Llama/Mixtral style), else none does (Qwen style).
    Returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=[],
                                  show_progress=False)
    backend.train_from_iterator([BPE_TEXT], trainer)
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    return tokenizer


PROMPT = [5, 17, 99, 3, 42, 8]
PADDED = [[7, 8, 9], [1, 2, 3, 4, 5, 6]]


def transformers_generate(model, prompts: list[list[int]], new_tokens: int = 32) -> list[list[int]]:
    """transformers' greedy ``generate`` of ``new_tokens`` after each prompt (left-padded with 0), no EOS stop."""
    import torch
    import transformers

    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    # Plain greedy with no end-of-sequence token: min_new_tokens would instead *suppress* EOS (id 2 in
    # these configs), which is not greedy decoding.
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                           eos_token_id=None)
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None  # else generate()
    try:                                                                                       # merges it back in
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, generation_config=config)
    finally:
        model.generation_config.eos_token_id = eos  # the model may be shared by other tests
    assert out.shape[1] == longest + new_tokens
    return out[:, longest:].tolist()
