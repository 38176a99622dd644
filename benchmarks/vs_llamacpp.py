"""moeport against llama.cpp on a granite-3.0-1b-a400m-shaped MoE: decode speed, prefill, size and quality.

Not part of CI (it needs ~21 GB of memory at 24 layers and llama-cpp-python). What it does, each stage
skipped when its output is already in ``--out`` (so a long run can be resumed):

1. ``build``: a random-weight ``GraniteMoeForCausalLM`` (seeded) with the dimensions of granite-3.0-1b-a400m
   (hidden 1024, 16 heads, 8 KV heads, 32 experts top-8, expert intermediate 512, vocab 49155, tied
   embeddings; ``--layers`` of them) saved with ``save_pretrained``, plus a sentencepiece tokenizer trained
   on local text (Python standard-library sources), which llama.cpp's converter reads as ``tokenizer.model``.
   ``tokenizer``: the same tokenizer as ``tokenizer.json`` (transformers' conversion of ``tokenizer.model``,
   checked to give sentencepiece's ids on held-out text), what ``moeport quantize --tokenizer`` reads to
   calibrate from text and measure perplexity.
2. ``export`` / ``quantize``: ``moeport export --task text-generation-with-past --kv-cache concat|shared
   [--fused-attention]`` (``--kv-cache``, ``--fused-attention``; redone when the file there was made otherwise),
   then ``moeport.quant.quantize`` in every mode (int8 calibrated from an .npz of ``input_ids`` rows of training
   text; for the CPU target the integer modes get onnxruntime's fused attention, which writes a shared buffer in
   place; ``--quantize-kv-cache shared`` records a Concat export's quantized files as shared-buffer models). The
   timing steps as ``moeport generate`` does (``moeport_step_runner``: ``runtime.generate.CachedDecoder``): the
   cache stays in onnxruntime's memory, a shared buffer bound as both past and present of every step, as
   onnxruntime-genai does with ``past_present_share_buffer``; llama.cpp's cache is written in place too.
3. ``gguf``: llama.cpp's own converter (``vendor/llama.cpp/convert_hf_to_gguf.py`` of the llama-cpp-python
   sdist, ``--llama-src``) to F32, then llama.cpp's quantizer (``llama_model_quantize``) to Q8_0 and Q4_0.
4. ``time``: every system in its own process, ``--rounds`` rounds, systems alternating within a round; each
   process loads its model, warms up, then times a prefill of ``--prompt`` tokens and ``--decode`` greedy
   decode steps with ``--threads`` threads. Medians over rounds.
5. ``quality``: next-token distributions on ``--positions`` positions of held-out text (files no tokenizer
   or model saw): mean KL divergence from PyTorch fp32 and top-1 agreement, per system. (A random
   tied-embedding model copies its input, so top-1 alone cannot tell systems apart.)
6. ``interleaved`` (with ``--interleaved``): each moeport mode and the llama.cpp type of the same bits in ONE
   process, blocks of ``--block`` decode steps taking turns (a pause between blocks lets each runtime's spinning
   threads go idle before the other runs), ``--decode`` steps each per round, both back to the prompt's cache
   every round; medians of the steps after the first of each block. This machine's speed drifts by 20-40% from
   minute to minute; taking turns every few hundred milliseconds puts both runtimes under the same drift, which
   separate processes (stage 4) cannot. A model loaded later in a process decodes faster (up to 10% here), so
   each round loads every system afresh, a different one first each round (``worker_interleaved``): give at least
   as many ``--rounds`` as systems. llama-cpp-python is imported from ``--llama-python``'s site-packages.
7. ``genai`` (with ``--genai``): the onnxruntime-genai folder a user deploys, ``out/genai``: the fp32 export placed
   by the genai layout, then ``moeport quantize DIR --mode M`` for each mode; each ``genai:M`` is timed through
   onnxruntime-genai's own generator (``append_tokens``, ``get_logits``) in stages 4 and 6 beside the others. Its
   quality row is that of the file it loads, run by moeport's runner (genai's generator returns the last
   position's logits only).

Every child process reports its peak resident memory (``ru_maxrss``); export and quantize peaks are printed as
multiples of the fp32 model's size. Results go to ``--out``/results.json and a markdown table on stdout.

    python benchmarks/vs_llamacpp.py --out /tmp/vs --llama-src /path/llama_cpp_python-0.3.36 \
        --llama-python /path/venv-llama/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

GRANITE_1B_A400M = dict(vocab_size=49155, hidden_size=1024, intermediate_size=512, num_attention_heads=16,
                        num_key_value_heads=8, num_local_experts=32, num_experts_per_tok=8, tie_word_embeddings=True,
                        max_position_embeddings=4096, rope_theta=10000.0, embedding_multiplier=12.0,
                        logits_scaling=6.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                        rms_norm_eps=1e-6)
# moeport mode -> its file; llama.cpp type -> its file. "fp32" is the export itself.
MOEPORT_MODES = ("fp32", "int8", "int8-dynamic", "int8-blocks", "int4")
LLAMA_TYPES = {"F32": None, "Q8_0": 7, "Q4_0": 2}  # llama_ftype values (LLAMA_FTYPE_MOSTLY_Q8_0 = 7, Q4_0 = 2)
SAME_BITS = {"int4": "Q4_0", "int8": "Q8_0", "int8-dynamic": "Q8_0", "int8-blocks": "Q8_0", "fp32": "F32"}
SPM_VOCAB = 8000


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def stdlib_files() -> list[Path]:
    """Python standard-library sources: every 10th is held out (never used for the tokenizer or calibration)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def corpus(held_out: bool) -> str:
    files = [f for i, f in enumerate(stdlib_files()) if (i % 10 == 0) == held_out]
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


# --- workers: each runs in its own process and prints one JSON line -----------------------------------------

def worker_build(out: Path, layers: int) -> dict:
    import sentencepiece as spm
    import torch
    import transformers

    text = out / "train.txt"
    text.write_text(corpus(held_out=False), encoding="utf-8")
    checkpoint = out / "checkpoint"
    checkpoint.mkdir(exist_ok=True)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(checkpoint / "tokenizer"), vocab_size=SPM_VOCAB,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, input_sentence_size=2_000_000,
                                   shuffle_input_sentence=True, minloglevel=2)
    config = transformers.GraniteMoeConfig(num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                           **GRANITE_1B_A400M)
    torch.manual_seed(0)
    model = transformers.GraniteMoeForCausalLM(config).eval()
    model.save_pretrained(checkpoint)
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_prefix_space": True}))
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "checkpoint": str(checkpoint)}


def worker_tokenizer(out: Path) -> dict:
    """``tokenizer.json`` beside the checkpoint's ``tokenizer.model``: what moeport (and every reader of fast
    tokenizers) loads, the same tokenizer as the sentencepiece model llama.cpp's converter reads."""
    import sentencepiece as spm
    import transformers

    checkpoint = out / "checkpoint"
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    sample = corpus(held_out=True)[:400_000]
    expected = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model")).encode(sample)
    converted = tokenizer.encode(sample, add_special_tokens=False)
    if converted != expected:  # whitespace rules and byte fallback must convert, or text ids would differ
        first = next((i for i, (a, b) in enumerate(zip(expected, converted)) if a != b),
                     min(len(expected), len(converted)))
        raise SystemExit(f"the converted tokenizer differs from sentencepiece at token {first} of {len(expected)}")
    # Only tokenizer.json: the tokenizer_config.json written by the build (add_bos_token false) stays llama.cpp's.
    tokenizer.backend_tokenizer.save(str(checkpoint / "tokenizer.json"))
    return {"tokens_checked": len(expected)}


def _encode(out: Path, held_out: bool, count: int) -> np.ndarray:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "checkpoint" / "tokenizer.model"))
    ids = np.asarray(sp.encode(corpus(held_out)[: 400 * count]), dtype=np.int64)
    if ids.size < count:
        raise SystemExit(f"only {ids.size} tokens of text, need {count}")
    return ids[:count]


def worker_export(out: Path, kv_cache: str, fused_attention: str) -> dict:
    from moeport.exporter.export import export_checkpoint

    target = out / "moeport" / "fp32.onnx"
    target.parent.mkdir(exist_ok=True)
    result = export_checkpoint(out / "checkpoint", target, task="text-generation-with-past", kv_cache=kv_cache,
                               fused_attention=fused_attention == "fused", force=True)
    return {"seconds": result.seconds, "size_bytes": result.size_bytes, "peak_rss": peak_rss_bytes()}


def worker_quantize(out: Path, mode: str, kv_cache: str) -> dict:
    from moeport.quant import quantize

    options = {} if kv_cache == "export" else {"kv_cache": kv_cache}
    if mode == "int8":
        calibration = out / "calibration.npz"
        np.savez(calibration, input_ids=_encode(out, False, 32 * 128).reshape(32, 128))
        options |= {"calibration": calibration, "calibration_samples": 32}
    result = quantize(out / "moeport" / "fp32.onnx", out / "moeport" / f"{mode}.onnx", mode=mode, latency_runs=0,
                      perplexity=False, force=True, **options)
    return {"seconds": result.seconds, "size_bytes": result.quality.size_after, "peak_rss": peak_rss_bytes(),
            "router_kept_float": result.router_kept_float, "warnings": result.warnings}


def worker_genai(out: Path, mode: str) -> dict:
    """The onnxruntime-genai folder ``out/genai`` as a user makes it: the fp32 export placed with its genai_config
    (``runtime.layouts.write_folder``, what ``moeport export --layout genai`` writes after its export), then
    ``moeport quantize DIR --mode MODE``, which adds the variant genai loads with ``layouts.genai_overlay``."""
    from moeport.cli import main as moeport
    from moeport.runtime.layouts import write_folder

    folder = out / "genai"
    if not (folder / "genai_config.json").is_file():
        write_folder("genai", out / "moeport" / "fp32.onnx", out / "checkpoint", folder)
    if mode == "fp32":
        return {"peak_rss": peak_rss_bytes()}
    try:
        moeport(["quantize", str(folder), "--mode", mode, "--no-perplexity", "--latency-runs", "0", "--force"])
    except SystemExit as done:  # the command's exit: 0 (or None) when it wrote the variant
        if done.code not in (0, None):
            raise
    return {"peak_rss": peak_rss_bytes()}


def worker_quantize_gguf(out: Path, kind: str) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_TYPES[kind]
    params.nthread = 2
    source, target = out / "llama" / "F32.gguf", out / "llama" / f"{kind}.gguf"
    started = time.perf_counter()
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise SystemExit(f"llama_model_quantize returned {status}")
    return {"seconds": time.perf_counter() - started, "size_bytes": target.stat().st_size, "peak_rss": peak_rss_bytes()}


def _moeport_session(path: Path, threads: int):
    from moeport.runtime.session import create_session

    return create_session(path, "cpu", threads=threads)


# Columns of a shared KV buffer (contract KV_CACHE_SHARED): llama.cpp's n_ctx below.
SHARED_CAPACITY = 1024


def moeport_step_runner(session):
    """(prefill(ids [1, n]) -> logits [1, n, vocab], decode(next id) -> logits [1, 1, vocab]) over one session.

    Steps with ``moeport.runtime.generate.CachedDecoder``, what ``moeport generate`` runs: the cache stays in
    onnxruntime's memory; a shared buffer (``--kv-cache shared``) of ``SHARED_CAPACITY`` tokens is bound as both past
    and present of every step, as onnxruntime-genai does with ``past_present_share_buffer``, so a kernel that writes
    in place (GroupQueryAttention) moves only the new tokens' keys and values."""
    from moeport.runtime.generate import CachedDecoder

    decoder, state = CachedDecoder(session, 1, capacity=SHARED_CAPACITY), {}

    def step(ids: np.ndarray) -> np.ndarray:
        state["mask"] = np.ones((1, state["mask"].shape[1] + ids.shape[1]), dtype=np.int64)
        return decoder.step(ids, state["mask"])

    def prefill(ids: np.ndarray) -> np.ndarray:
        decoder.reset()
        state["mask"] = np.ones((1, 0), dtype=np.int64)
        return step(ids)

    return prefill, lambda token: step(np.array([[token]], dtype=np.int64))


def _llama(path: Path, threads: int, logits_all: bool):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                           logits_all=logits_all, verbose=False)


def _llama_runner(llm, logits_all: bool):
    """(prefill, decode) over a llama-cpp-python model: all positions' logits with ``logits_all``, else the last's."""
    import llama_cpp

    def last() -> np.ndarray:
        # Without logits_all llama-cpp-python fills no scores (its buffer then has n_batch rows of stale values);
        # the context keeps the last token's logits.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()[None, None]

    def prefill(ids: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval(ids[0].tolist())
        # A copy: llm.scores is the context's buffer, rewritten by the next evaluation.
        return np.array(llm.scores[: llm.n_tokens])[None] if logits_all else last()

    def decode(token: int) -> np.ndarray:
        llm.eval([token])
        return np.array(llm.scores[llm.n_tokens - 1])[None, None] if logits_all else last()

    return prefill, decode


def _genai_file(out: Path, mode: str) -> Path:
    """The model file of ``out/genai`` for ``mode``: the folder's model.onnx for fp32, else its variant."""
    from moeport.runtime.layouts import open_folder

    folder = open_folder(out / "genai")
    return folder.model if mode == "fp32" else folder.variant(mode)


def _genai_runner(out: Path, mode: str, threads: int):
    """(prefill, decode) over onnxruntime-genai's own generator loop on the folder ``out/genai`` (its ``mode``
    file), the last position's logits ``[1, 1, vocab]`` of each; its cache is ``SHARED_CAPACITY`` tokens long, as
    moeport's and llama.cpp's."""
    import onnxruntime_genai as og

    from moeport.runtime.layouts import genai_overlay

    config = og.Config(str(out / "genai"))
    overlay = json.loads(genai_overlay(_genai_file(out, mode).name))
    overlay["model"]["decoder"]["session_options"] = {"intra_op_num_threads": threads}
    config.overlay(json.dumps(overlay))
    model, state = og.Model(config), {}

    def logits() -> np.ndarray:  # the last appended token's
        return np.asarray(state["generator"].get_logits()).reshape(-1)[-GRANITE_1B_A400M["vocab_size"]:][None, None]

    def prefill(ids: np.ndarray) -> np.ndarray:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=SHARED_CAPACITY, do_sample=False)
        state["generator"] = og.Generator(model, params)
        state["generator"].append_tokens(ids[0].astype(np.int32))  # one sequence: its ids
        return logits()

    def decode(token: int) -> np.ndarray:
        state["generator"].append_tokens(np.array([token], dtype=np.int32))
        return logits()

    return prefill, decode


def _runner(system: str, out: Path, threads: int, logits_all: bool = False):
    family, variant = system.split(":")
    if family == "moeport":
        return moeport_step_runner(_moeport_session(out / "moeport" / f"{variant}.onnx", threads))
    if family == "genai" and logits_all:
        # genai's generator gives the last position's logits only: the quality stage runs the file it loads
        return moeport_step_runner(_moeport_session(_genai_file(out, variant), threads))
    if family == "genai":
        return _genai_runner(out, variant, threads)
    return _llama_runner(_llama(out / "llama" / f"{variant}.gguf", threads, logits_all), logits_all)


def worker_time(out: Path, system: str, threads: int, prompt: int, decode_steps: int) -> dict:
    prefill, decode = _runner(system, out, threads)
    ids = _encode(out, True, prompt)[None]
    # Warm-up: one prefill and a few decode steps (allocators, thread pools, caches).
    logits = prefill(ids)
    for _ in range(4):
        logits = decode(int(logits[0, -1].argmax()))
    started = time.perf_counter()
    logits = prefill(ids)
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(decode_steps):
        logits = decode(int(logits[0, -1].argmax()))
    decode_s = time.perf_counter() - started
    return {"prefill_ms": prefill_s * 1e3, "decode_tokens_per_s": decode_steps / decode_s, "peak_rss": peak_rss_bytes()}


def turned(items: list, by: int) -> list:
    """``items`` turned left by ``by`` places: each item first in turn as ``by`` counts up (the load and turn
    orders of worker_interleaved and decode_ab.py)."""
    by %= len(items)
    return items[by:] + items[:by]


def worker_interleaved(out: Path, mine: str, theirs: str, threads: int, prompt: int, decode_steps: int, block: int,
                       rounds: int, llama_site: str) -> dict:
    """``mine`` (a moeport system, or several separated by commas) and ``theirs`` (a llama.cpp one) in this
    process, decode steps in turns of ``block`` (see stage 6): per system the median step (seconds) over the steps
    after each block's first.

    Each round loads every system afresh, in an order turned by one each round, and each block's turns go in an
    order turned by one too. Why: in one process the model loaded later decodes faster. Three sessions of the same
    int4 file, loaded one after the other, took 12.5, 12.0 and 11.5 ms a step, and a session loaded into the memory
    a freed first one had held was as slow as that one (so it is where its weights lie, not onnxruntime's thread
    pools); int4 against Q4_0 read 0.98x and 1.15x with moeport loaded first, 1.12x and 1.25x with llama.cpp loaded
    first (2026-12-05, BENCHMARKS.md). Turning the orders gives each system each place."""
    import gc

    sys.path.append(llama_site)  # appended: this interpreter's own packages (numpy, onnxruntime) come first
    ids = _encode(out, True, prompt)[None]
    names = [*mine.split(","), theirs]
    steps, turn = {name: [] for name in names}, 0
    for round_number in range(rounds):
        runners = {name: _runner(name, out, threads) for name in turned(names, round_number)}
        logits = {name: runners[name][0](ids) for name in names}
        for start in range(0, decode_steps, block):
            turn += 1
            for name in turned(names, turn):
                time.sleep(0.2)  # the other runtime's threads stop spinning
                for i in range(min(block, decode_steps - start)):
                    started = time.perf_counter()
                    logits[name] = runners[name][1](int(logits[name][0, -1].argmax()))
                    if i:  # the first step of a block wakes the threads: not a step of continuous decoding
                        steps[name].append(time.perf_counter() - started)
        del runners, logits
        gc.collect()  # this round's models are freed before the next round loads its own
    return {name: {"step_s": statistics.median(t), "steps": len(t)} for name, t in steps.items()}


def worker_reference(out: Path, positions: int) -> dict:
    """PyTorch fp32 next-token log-probabilities on held-out windows of 128 tokens (``reference.npy``)."""
    import torch
    import transformers

    windows = _encode(out, True, positions).reshape(-1, 128)
    model = transformers.GraniteMoeForCausalLM.from_pretrained(out / "checkpoint", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(w[None])).logits[0] for w in windows])
    np.save(out / "reference.npy", torch.log_softmax(logits, -1).numpy())
    return {"positions": int(logits.shape[0]), "peak_rss": peak_rss_bytes()}


def worker_quality(out: Path, system: str, threads: int, positions: int) -> dict:
    prefill, _ = _runner(system, out, threads, logits_all=True)
    windows = _encode(out, True, positions).reshape(-1, 128)
    reference = np.load(out / "reference.npy")  # [positions, vocab] log-probabilities
    logits = np.concatenate([prefill(w[None])[0] for w in windows]).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    log_p = reference.astype(np.float64)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return {"mean_kl": float(kl.mean()), "top1_agreement": float((log_p.argmax(-1) == log_q.argmax(-1)).mean()),
            "positions": int(kl.size)}


WORKERS = {"build": worker_build, "tokenizer": worker_tokenizer, "export": worker_export, "quantize": worker_quantize,
           "quantize_gguf": worker_quantize_gguf, "time": worker_time, "reference": worker_reference,
           "quality": worker_quality, "interleaved": worker_interleaved, "genai": worker_genai}


# --- driver ---------------------------------------------------------------------------------------------------

def _kv_cache_of(path: Path) -> str | None:
    """The moeport file's KV cache kind (metadata ``kv_cache``), None when there is no such file."""
    from moeport.contract import read_metadata

    return read_metadata(path).get("kv_cache") if path.is_file() else None


def _attention_of(path: Path) -> str | None:
    """"fused" when the moeport file's attention is onnxruntime's GroupQueryAttention, else "standard"; None when
    there is no such file (the graph only: its weights stay on disk)."""
    import onnx

    if not path.is_file():
        return None
    ops = {node.op_type for node in onnx.load(path, load_external_data=False).graph.node}
    return "fused" if "GroupQueryAttention" in ops else "standard"


def run_worker(python: str, name: str, *args, env: dict | None = None) -> dict:
    command = [python, __file__, "--worker", name, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"worker {name} {args} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # a child process: one stage, its result as one JSON line
        name, *rest = argv[1:]
        converted = [Path(rest[0]), *[int(r) if r.isdigit() else r for r in rest[1:]]]
        print(json.dumps(WORKERS[name](*converted)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--positions", type=int, default=256, help="held-out positions for the KL (multiple of 128)")
    parser.add_argument("--llama-src", type=Path, required=True, help="the unpacked llama-cpp-python sdist")
    parser.add_argument("--llama-python", default=sys.executable, help="a Python with llama-cpp-python installed")
    parser.add_argument("--modes", default=",".join(MOEPORT_MODES))
    parser.add_argument("--kv-cache", default="concat", choices=("concat", "shared"),
                        help="moeport's export: a Concat cache, or one buffer for past and present that the timing "
                             "binds as both, as onnxruntime-genai does (the quantized modes' fused attention writes "
                             "it in place; fp32's standard ops copy it)")
    parser.add_argument("--quantize-kv-cache", choices=("concat", "shared"), default=None,
                        help="moeport quantize --kv-cache for the quantized modes (shared: a Concat export's fused "
                             "attention on one buffer) [default: the export's cache]")
    parser.add_argument("--fused-attention", action="store_true",
                        help="export fp32 with --fused-attention (redone when the file there was made otherwise)")
    parser.add_argument("--interleaved", action="store_true",
                        help="also time each mode against llama.cpp at the same bits in one process (stage 6)")
    parser.add_argument("--block", type=int, default=8, help="decode steps per turn with --interleaved")
    parser.add_argument("--genai", action="store_true",
                        help="also each mode as an onnxruntime-genai folder (out/genai: the fp32 export placed by "
                             "the genai layout, then moeport quantize DIR --mode M), timed through genai's own "
                             "generator loop")
    args = parser.parse_args(argv)

    out, py, results = args.out, sys.executable, {}
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    if saved.is_file():
        results = json.loads(saved.read_text())

    def stage(key: str, done: bool, fn):
        # A stage whose files are there is not run again, even without its record (results.json lost, or the files
        # made by the workers one at a time): the build, export and GGUFs take an hour on 2 cores. Delete the files
        # to measure a stage again.
        if not done:
            results[key] = fn()
            print(f"{key}: {results[key]}", file=sys.stderr)
        elif key not in results:
            results[key] = {"reused": "its files were there, made outside this results.json"}
        saved.write_text(json.dumps(results, indent=2))
        return results[key]

    modes = args.modes.split(",")
    stage("build", (out / "checkpoint" / "tokenizer.model").is_file(), lambda: run_worker(py, "build", out, args.layers))
    stage("tokenizer", (out / "checkpoint" / "tokenizer.json").is_file(), lambda: run_worker(py, "tokenizer", out))
    fp32_bytes = sum(f.stat().st_size for f in (out / "checkpoint").glob("*.safetensors"))
    attention = "fused" if args.fused_attention else "standard"
    fp32_file = out / "moeport" / "fp32.onnx"
    stage("export", (_kv_cache_of(fp32_file), _attention_of(fp32_file)) == (args.kv_cache, attention),
          lambda: run_worker(py, "export", out, args.kv_cache, attention))
    quantized_cache = args.quantize_kv_cache or args.kv_cache
    for mode in modes:
        if mode != "fp32":
            stage(f"quantize:{mode}", _kv_cache_of(out / "moeport" / f"{mode}.onnx") == quantized_cache,
                  lambda mode=mode: run_worker(py, "quantize", out, mode, args.quantize_kv_cache or "export"))
    llama_dir = out / "llama"
    llama_dir.mkdir(exist_ok=True)
    converter = args.llama_src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    gguf_py = args.llama_src / "vendor" / "llama.cpp" / "gguf-py"

    def convert() -> dict:
        started = time.perf_counter()
        done = subprocess.run([py, str(converter), str(out / "checkpoint"), "--outtype", "f32", "--outfile",
                               str(llama_dir / "F32.gguf")], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(gguf_py), "NO_LOCAL_GGUF": ""})
        if done.returncode != 0:
            raise SystemExit(f"convert_hf_to_gguf failed:\n{done.stderr[-4000:]}")
        return {"seconds": time.perf_counter() - started, "size_bytes": (llama_dir / "F32.gguf").stat().st_size}

    stage("gguf:F32", (llama_dir / "F32.gguf").is_file(), convert)
    for kind in ("Q8_0", "Q4_0"):
        stage(f"gguf:{kind}", (llama_dir / f"{kind}.gguf").is_file(),
              lambda kind=kind: run_worker(args.llama_python, "quantize_gguf", out, kind))

    genai = [f"genai:{m}" for m in modes] if args.genai else []
    for name in genai:
        stage(name, (out / "genai" / "genai_config.json").is_file() and _genai_file(out, name[6:]).is_file(),
              lambda name=name: run_worker(py, "genai", out, name[6:]))
    systems = ([(f"moeport:{m}", py) for m in modes] + [(name, py) for name in genai]
               + [(f"llama:{k}", args.llama_python) for k in LLAMA_TYPES])
    timings: dict[str, list[dict]] = {name: [] for name, _ in systems}
    for _ in range(args.rounds):
        for name, python in systems:  # alternating: every round runs each system once, in turn
            timings[name].append(run_worker(python, "time", out, name, args.threads, args.prompt, args.decode))
    stage("reference", (out / "reference.npy").is_file(), lambda: run_worker(py, "reference", out, args.positions))
    quality = {name: run_worker(python, "quality", out, name, args.threads, args.positions) for name, python in systems}
    from moeport.quant.quality import model_size

    sizes = {f"moeport:{m}": model_size(out / "moeport" / f"{m}.onnx") for m in modes}  # its external data too
    sizes.update({name: model_size(_genai_file(out, name[6:])) for name in genai})
    sizes.update({f"llama:{k}": (llama_dir / f"{k}.gguf").stat().st_size for k in LLAMA_TYPES})
    table = {name: {"prefill_ms": statistics.median(t["prefill_ms"] for t in timings[name]),
                    "decode_tokens_per_s": statistics.median(t["decode_tokens_per_s"] for t in timings[name]),
                    "size_bytes": sizes[name], **quality[name]} for name, _ in systems}
    results["table"] = table
    results["rounds"] = timings  # every round's figures, for the spread behind the medians
    results["memory"] = {"fp32_checkpoint_bytes": fp32_bytes,
                         **{key: round(value["peak_rss"] / fp32_bytes, 2) for key, value in results.items()
                            if isinstance(value, dict) and "peak_rss" in value and key.startswith(("export", "quantize:"))}}
    results["settings"] = vars(args) | {"out": str(out), "llama_src": str(args.llama_src)}
    saved.write_text(json.dumps(results, indent=2, default=str))

    fp32 = table["moeport:fp32"]["decode_tokens_per_s"] if "moeport:fp32" in table else None  # --modes without it
    print(f"| system | prefill {args.prompt} tokens (ms) | decode tokens/s | x moeport fp32 | x llama.cpp same bits "
          f"| size (GB) | mean KL vs PyTorch fp32 | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in table.items():
        family, variant = name.split(":")
        peer = table.get(f"llama:{SAME_BITS[variant]}") if family in ("moeport", "genai") else None
        vs_peer = f"{row['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}" if peer else "-"
        vs_fp32 = f"{row['decode_tokens_per_s'] / fp32:.2f}" if fp32 else "-"
        print(f"| {name} | {row['prefill_ms']:.0f} | {row['decode_tokens_per_s']:.1f} | "
              f"{vs_fp32} | {vs_peer} | {row['size_bytes'] / 1e9:.2f} | "
              f"{row['mean_kl']:.3g} | {row['top1_agreement']:.3f} |")
    print(f"peak memory / fp32 checkpoint size: {results['memory']}")
    if args.interleaved:
        interleaved(args, modes, results)
        saved.write_text(json.dumps(results, indent=2, default=str))
    return 0


def interleaved(args, modes: list[str], results: dict) -> None:
    """Stage 6: each moeport mode against llama.cpp at the same bits in one process; into ``results``."""
    site = subprocess.run([args.llama_python, "-c", "import llama_cpp, os; "
                           "print(os.path.dirname(os.path.dirname(llama_cpp.__file__)))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    rows = results.setdefault("interleaved", {})
    for mode in modes:
        mine, theirs = f"moeport:{mode}" + (f",genai:{mode}" if args.genai else ""), f"llama:{SAME_BITS[mode]}"
        rows[mode] = run_worker(sys.executable, "interleaved", args.out, mine, theirs, args.threads, args.prompt,
                                args.decode, args.block, args.rounds, site)
    print(f"\nin one process, turns of {args.block} decode steps, {args.rounds} x {args.decode} steps each "
          "(medians of the steps after each turn's first):")
    print("| system | decode tokens/s | llama.cpp | decode tokens/s | x llama.cpp |")
    print("|---|---|---|---|---|")
    for mode, row in rows.items():
        theirs = row[f"llama:{SAME_BITS[mode]}"]["step_s"]
        for name in (f"moeport:{mode}", f"genai:{mode}"):
            if name in row:
                mine = row[name]["step_s"]
                print(f"| {name} | {1 / mine:.1f} | {SAME_BITS[mode]} | {1 / theirs:.1f} | {theirs / mine:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
