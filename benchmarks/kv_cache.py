"""Decode speed of the two KV caches in onnxruntime-genai: ``python benchmarks/kv_cache.py [--threads 2]``.

A random Mixtral (hidden 512, 4 layers, 8 experts top-2, expert intermediate 1024, 8 heads / 2 KV heads of 64,
vocab 4096; seed 0; a WordLevel tokenizer over the vocabulary, since a folder needs one, though the benchmark
feeds token ids) is exported twice with ``--task text-generation-with-past --layout genai``: with the Concat cache (each step's present is a
new tensor, past + new tokens; ``past_present_share_buffer: false``) and with ``--kv-cache shared`` (past and
present are one ``max_length`` buffer the step writes into; ``past_present_share_buffer: true``). For each
context length, genai prefills a 16-token prompt and greedily decodes up to that length; the table gives decode
tokens per second (prefill excluded; median of 3 runs, each system in its own turn) and checks that both caches
produce the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
              max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
PROMPT = 16


def build(root: Path) -> dict[str, Path]:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from moeport.exporter.export import export_checkpoint

    checkpoint = root / "checkpoint"
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**CONFIG)).save_pretrained(checkpoint)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, CONFIG["vocab_size"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                         pad_token="<pad>").save_pretrained(checkpoint)
    folders = {}
    for cache in ("concat", "shared"):
        folders[cache] = export_checkpoint(checkpoint, root / cache, task="text-generation-with-past", layout="genai",
                                           kv_cache=cache).output
    return folders


def decode(folder: Path, length: int, threads: int) -> tuple[float, list[int]]:
    """(decode tokens/s, tokens) of one greedy generation from a seeded 16-token prompt to ``length`` tokens."""
    import json

    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    prompt = np.random.default_rng(0).integers(3, CONFIG["vocab_size"], size=PROMPT).astype(np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)  # the prefill runs here
    started, steps = time.perf_counter(), 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    seconds = time.perf_counter() - started
    return steps / seconds, generator.get_sequence(0)[PROMPT:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", default="128,512,2048")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = build(Path(tmp))
        print("| context (tokens) | Concat cache (tokens/s) | shared buffer (tokens/s) | shared / Concat | same tokens |")
        print("|---|---|---|---|---|")
        for length in map(int, args.lengths.split(",")):
            speeds = {cache: [] for cache in folders}
            tokens = {}
            for _ in range(args.runs):
                for cache, folder in folders.items():
                    speed, tokens[cache] = decode(folder, length, args.threads)
                    speeds[cache].append(speed)
            concat, shared = (statistics.median(speeds[c]) for c in ("concat", "shared"))
            print(f"| {length} | {concat:.1f} | {shared:.1f} | {shared / concat:.2f} | "
                  f"{tokens['concat'] == tokens['shared']} |")


if __name__ == "__main__":
    main()
