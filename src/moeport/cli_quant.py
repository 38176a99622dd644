"""``moeport quantize``: one call to ``moeport.quant.quantize``, then the report as text or JSON.

Registered on the main group by ``register(cli)`` (kept in its own file so cli.py stays small). Needs no
PyTorch, except ``--checkpoint`` (parity against the PyTorch checkpoint).
"""

from __future__ import annotations

import os
import warnings

import click

from moeport import _lazy
from moeport.cli_common import LazyChoice, emit
from moeport.errors import UsageError

_quant = _lazy.LazyModule("moeport.quant", "quantize")
_modes = _lazy.LazyModule("moeport.quant.modes", "quantize")
_schemes = _lazy.LazyModule("moeport.quant.schemes", "quantize")
_layouts = _lazy.LazyModule("moeport.runtime.layouts", "quantize")


@click.command("quantize")
@click.argument("model", metavar="MODEL_OR_DIR", type=click.Path())
@click.option("-o", "--output", default=None, type=click.Path(),
              help="Quantized ONNX file to write (not for a model folder: the variant goes into it, named as its "
                   "runtime expects).")
@click.option("--mode", default=None, type=LazyChoice(lambda: [m.name for m in _modes.modes()]),
              help="Quantization mode (default: int8-blocks for --target cpu/arm, int8 for nnapi/qnn or when "
                   "calibration data is given, fp16 for cuda/coreml).")
@click.option("--target", default="cpu", show_default=True, type=LazyChoice(lambda: _schemes.TARGETS.names()),
              help="Where the model will run: picks the int8 scheme (cpu: by this CPU's VNNI support).")
@click.option("--calibration", type=click.Path(), default=None,
              help="int8: calibration text (bytes), .jsonl ({\"text\": ...} per line) or .npz of input arrays "
                   "(or input_ids alone, with its attention_mask if padded) (default: the trained sample's "
                   "calibration.txt).")
@click.option("--calibration-samples", type=int, default=64, show_default=True,
              help="int8: number of 128-token calibration windows.")
@click.option("--random-calibration", is_flag=True, help="int8: calibrate on random tokens (not representative).")
@click.option("--keep-router/--no-keep-router", default=True, show_default=True,
              help="Keep gate projection, Softmax/Sigmoid, TopK and weight normalisation in float32.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="PyTorch checkpoint the model came from: adds parity (errors, argmax, routing agreement; needs "
                   "PyTorch) and reads its tokenizer.")
@click.option("--tokenizer", type=click.Path(), default=None,
              help="Directory with the model's tokenizer.json for text calibration and perplexity (default: the "
                   "--checkpoint's).")
@click.option("--heldout", type=click.Path(), default=None,
              help="Held-out text for perplexity of byte-level models (default: the trained sample's heldout.txt).")
@click.option("--down-activations", default="auto", show_default=True, type=LazyChoice(lambda: list(_schemes.DOWN_ACTIVATIONS)),
              help="int8 / int8-dynamic: how the expert down-projection inputs are kept (auto: int16 for int8 "
                   "on cpu/arm/qnn, float for int8-dynamic on cpu/arm, where every MatMul but the experts' gate and "
                   "up projections is 8-bit blocks too and its embedding table 8-bit blocks; int8 elsewhere, and "
                   "standard ops only). Weights stay 8-bit.")
@click.option("--activations", default="auto", show_default=True,
              type=LazyChoice(lambda: list(_schemes.ACTIVATIONS)),
              help="int8: width of the calibrated activations (auto: int16 for --target cpu/arm, where onnxruntime "
                   "runs those MatMuls as 8-bit block kernels, with the weights in blocks of 32 and the embedding "
                   "table in 8-bit blocks; int8 elsewhere, standard ops only). int16 also runs on qnn.")
@click.option("--block-size", type=int, default=None,
              help="int4, int8-blocks: expert weights per quantization block, a power of two from 16 to 256 "
                   "[default: int4 256 (128 for --target cuda), int8-blocks 128, halved to fit smaller widths]. "
                   "Larger blocks decode faster on a CPU; on a trained checkpoint with outlier weights, 128 or 64 "
                   "may keep the routing closer (see the report's routing agreement).")
@click.option("--embedding-block-size", type=int, default=None,
              help="int4, int8-blocks: embedding values per quantization block [default: 32].")
@click.option("--dense-block-size", type=int, default=None,
              help="int4, int8-blocks: weights per block for the MatMuls outside the experts but the lm_head "
                   "(attention, dense MLPs) [default: int4 128, 64 with --dense-bits 4; else 32].")
@click.option("--dense-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="int4: width of the MatMuls outside the experts (attention, dense MLPs) but attention's key and "
                   "value projections and the lm_head.")
@click.option("--kv-projection-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="int4: width of attention's key and value projections.")
@click.option("--head-bits", type=click.Choice(["8", "4"]), default=None,
              help="int4, int8-blocks: width of the lm_head [default: the mode's, 4 for int4, 8 for int8-blocks].")
@click.option("--head-block-size", type=int, default=None,
              help="int4, int8-blocks: lm_head weights per block [default: 128 for an 8-bit lm_head, 32 for a 4-bit "
                   "one, halved to fit smaller widths].")
@click.option("--fused-experts/--no-fused-experts", default=True, show_default=True,
              help="int4, int8-blocks, and for cpu/arm int8 with 16-bit activations and int8-dynamic with float "
                   "down-projection inputs: run each MoE layer's experts as one onnxruntime QMoE node in 8-bit or "
                   "4-bit blocks (only the selected experts run; the routing stays moeport's) instead of per-expert "
                   "MatMuls. A model folder whose runtime cannot load QMoE (transformers.js) always gets per-expert "
                   "MatMuls.")
@click.option("--fused-attention/--no-fused-attention", default=True, show_default=True,
              help="Integer modes for --target cpu/arm: each attention layer of a with-past model as one onnxruntime "
                   "GroupQueryAttention node (cache append, scores, mask, softmax) instead of ~30 standard ops. A "
                   "model folder whose runtime cannot load it (transformers.js) always gets the standard ops.")
@click.option("--kv-cache", type=click.Choice(["concat", "shared"]), default=None,
              help="With-past models: 'shared' records a Concat-cache export's cache as one buffer for past and "
                   "present, which its fused attention (GroupQueryAttention) then writes in place (onnxruntime-genai's "
                   "past_present_share_buffer); needs every layer fused [default: the export's cache].")
@click.option("--embedding-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="int4: width of the embedding table.")
@click.option("--no-perplexity", is_flag=True, help="Skip the held-out perplexity and routing pass.")
@click.option("--heldout-tokens", type=click.IntRange(min=0), default=None,
              help="Perplexity reads at most this many tokens of the held-out text, in evenly spaced windows of 256 "
                   "(0: all of it) [default: 65536].")
@click.option("--latency-runs", type=int, default=10, show_default=True, help="CPU latency runs (0: skip).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def quantize_cmd(model, output, mode, target, calibration, calibration_samples, random_calibration, keep_router,
                 checkpoint, tokenizer, heldout, down_activations, activations, block_size, embedding_block_size,
                 dense_block_size, dense_bits,
                 kv_projection_bits, head_bits, head_block_size, fused_experts, fused_attention, kv_cache,
                 embedding_bits, no_perplexity, heldout_tokens,
                 latency_runs, force,
                 as_json):
    """Quantize the exported ONNX file MODEL (or a model folder's model, adding the variant to the folder) and
    report size, parity, perplexity and latency."""
    if os.path.isdir(model):
        if output is not None:
            raise UsageError("-o is not taken with a model folder: the variant is written into it, under the name "
                             "its runtime looks for")
        if kv_cache is not None:
            raise UsageError("--kv-cache is not taken with a model folder: its runtime's config fixes the cache; "
                             "export the folder with --kv-cache shared")
        mode, model, output, own_tokenizer, layout = _layouts.variant_target(
            model, mode, _schemes.default_mode(target, calibration is not None or random_calibration))
        # what the folder's runtime can load
        fused_experts = fused_experts and layout.fused_experts
        fused_attention = fused_attention and layout.fused_attention
        tokenizer = tokenizer or checkpoint or own_tokenizer
    elif output is None:
        raise UsageError("give -o FILE for the quantized model (or a model folder instead of a file)")
    reference = None if checkpoint is None else _lazy.reference.CheckpointReference.load(checkpoint)
    with warnings.catch_warnings():
        # The result lists quantize's own warnings; print them once, from there. Other libraries' warnings
        # (onnxruntime's ...) still show.
        warnings.simplefilter("ignore", _quant.QuantizeWarning)
        result = _quant.quantize(model, output, mode=mode, target=target, calibration=calibration,
                          calibration_samples=calibration_samples, random_calibration=random_calibration,
                          keep_router=keep_router, reference=reference, tokenizer=tokenizer or checkpoint,
                          heldout=heldout, block_size=block_size, embedding_block_size=embedding_block_size,
                          dense_block_size=dense_block_size,
                          dense_bits=int(dense_bits), head_bits=None if head_bits is None else int(head_bits),
                          head_block_size=head_block_size,
                          kv_projection_bits=int(kv_projection_bits),
                          fused_experts=fused_experts, fused_attention=fused_attention, kv_cache=kv_cache,
                          embedding_bits=int(embedding_bits),
                          down_activations=down_activations, activations=activations, latency_runs=latency_runs,
                          perplexity=not no_perplexity, force=force,
                          # not given: the library's default (the help's)
                          **({} if heldout_tokens is None else {"heldout_tokens": heldout_tokens}))
    emit(result, as_json)


def register(cli: click.Group) -> None:
    cli.add_command(quantize_cmd)
