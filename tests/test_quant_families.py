"""Router protection for every family of the README's supported table that is exported on every run
(``hf_families.EVERY_RUN``): one router per MoE layer is found, and int8-dynamic and int4 leave every router's
gate, Softmax/Sigmoid and TopK (or ArgMax) in float32 while the experts are quantized.

The exports are the session's ``hf_export`` ones (tests/conftest.py), shared with tests/test_hf_families.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

pytest.importorskip("transformers")

import hf_families  # noqa: E402  (tests/, on sys.path)
from moeport.contract import present_for, random_inputs, read_metadata  # noqa: E402
from moeport.exporter.export import export_checkpoint  # noqa: E402
from moeport.quant import core as quant_core  # noqa: E402
from moeport.quant import quantize  # noqa: E402
from moeport.quant.passes import REMOVE_UNUSED, FuseAttentionPass  # noqa: E402
from moeport.runtime.generate import CachedDecoder, decoder_feeds, empty_past  # noqa: E402
from moeport.runtime.moe_graph import expert_layers, find_routers, float_router_nodes  # noqa: E402
from moeport.runtime.session import create_session  # noqa: E402

MODES = ("int8-dynamic", "int4")


def _router_ops(op_types: dict[str, int]) -> dict[str, int]:
    """Gates (a Gemm gate may come out as MatMul), score ops and selections among router node counts; a QMoE
    that routes in the kernel does its router's softmax and top-k (over the float32 logits)."""
    in_kernel = op_types.get("QMoE", 0)
    return {"gate": op_types.get("Gemm", 0) + op_types.get("MatMul", 0),
            "score": op_types.get("Softmax", 0) + op_types.get("Sigmoid", 0) + in_kernel,
            "selection": op_types.get("TopK", 0) + op_types.get("ArgMax", 0) + in_kernel}


@pytest.mark.parametrize("model_type", hf_families.EVERY_RUN)
def test_every_family_keeps_its_routers_float(hf_export, tmp_path, model_type):
    result, _ = hf_export(model_type)
    layers = len(result.info.layers)
    graph = onnx.load(result.output, load_external_data=False)
    plan = find_routers(graph)
    assert len(plan.routers) == layers, f"{model_type}: {len(plan.routers)} routers for {layers} MoE layers"
    assert all(r.num_experts == layer.num_experts for r, layer in zip(plan.routers, result.info.layers))
    before = _router_ops(plan.op_types)
    assert before["gate"] == layers and before["score"] >= layers and before["selection"] >= layers, before
    experts = expert_layers(graph)
    assert len(experts) == layers and all(any(g.is_down_projection for g in groups) for groups in experts)
    for mode in MODES:
        quantized = quantize(result.output, tmp_path / f"{mode}.onnx", mode=mode, latency_runs=0, perplexity=False)
        assert len(quantized.router.routers) == layers and not quantized.warnings, quantized.warnings
        assert {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul"} & set(quantized.output_ops)  # experts
        out = onnx.load(quantized.output)
        assert len(find_routers(out).routers) == layers
        # every router's gate, Softmax/Sigmoid and selection computes in float32, as many as before
        assert _router_ops(float_router_nodes(out)) == before, f"{model_type} {mode}"


@pytest.mark.parametrize("mode", ("int8-dynamic", "int4", "int8"))
def test_a_tied_lm_head_gets_its_own_quantized_weight(tmp_path, mode):
    """granitemoe with tied embeddings (as granite-3.0-1b-a400m ships): the lm_head reads the embedding table
    through a Transpose. Quantized, it is a quantized MatMul of its own, and nothing dequantizes the whole table."""
    checkpoint = tmp_path / "tied"
    # a table over the exporter's constant-folding limit (8192 elements), as every real one is: smaller ones
    # come out already untied (the Transpose folded into a second initializer)
    hf_families.random_model("granitemoe", tie_word_embeddings=True, vocab_size=512).save_pretrained(checkpoint)
    source = export_checkpoint(checkpoint, tmp_path / "m.onnx", task="text-generation-with-past", validate=False)
    graph = onnx.load(source.output, load_external_data=False)
    table = next(n.input[0] for n in graph.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    assert [n.op_type for n in graph.graph.node if table in n.input] == ["Gather", "Transpose"]  # tied
    options = {}
    if mode == "int8":  # calibrated from rows of token ids, as a user of a with-past model would
        np.savez(tmp_path / "ids.npz", input_ids=np.random.default_rng(0).integers(3, 512, (4, 16)))
        options = {"calibration": tmp_path / "ids.npz"}
    quantized = quantize(source.output, tmp_path / f"{mode}.onnx", mode=mode, latency_runs=0, perplexity=False,
                         **options)
    untie = next(r for r in quantized.passes if r.name == "UntieTransposedWeightPass")
    assert untie.modified and table in untie.note
    out = onnx.load(quantized.output, load_external_data=False)
    produced_by = {o: n for n in out.graph.node for o in n.output}
    inits = {i.name: tuple(i.dims) for i in out.graph.initializer}
    vocab = graph.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    # no node outputs a whole [vocab, hidden] (or [hidden, vocab]) float table at run time
    assert not [n.name for n in out.graph.node if n.op_type in ("DequantizeLinear", "Transpose")
                and any(inits.get(i, ())[:1] == (vocab,) or inits.get(i, ())[-1:] == (vocab,) for i in n.input)]
    logits = produced_by["logits"]
    while logits.op_type in ("Add", "Mul", "Cast", "Reshape", "QuantizeLinear", "DequantizeLinear") \
            and logits.input[0] in produced_by:
        logits = produced_by[logits.input[0]]  # scale factors, casts and Q/DQ of activations after the lm_head
    assert logits.op_type in ("MatMulNBits", "MatMulInteger", "MatMul"), logits.op_type
    lm_inputs = set(logits.input) | {i for n in out.graph.node if n.output[0] in logits.input for i in n.input}
    assert any(i.startswith(table + "_kn") for i in lm_inputs), sorted(lm_inputs)


def test_latency_of_a_with_past_model_is_a_decode_step_and_its_prefill(with_past, tmp_path):
    """A with-past model is deployed decoding: the report times one decode step after a 127-token prompt, and the
    128-token prompt's prefill from an empty cache, fp32 and quantized side by side (a model without a cache: the
    whole 1x128 run only, tests/test_quant.py)."""
    source = with_past("granitemoe")
    result = quantize(source.output, tmp_path / "q.onnx", mode="int8-blocks", latency_runs=3, perplexity=False)
    quality = result.quality
    assert quality.latency_of == "decode@127" and quality.latency_before_ms > 0 and quality.latency_after_ms > 0
    assert quality.prefill_of == "prefill 1x128" and quality.prefill_before_ms > 0 and quality.prefill_after_ms > 0
    rendered = result.render()
    assert "CPU latency decode@127 (ms, median)" in rendered and "CPU latency prefill 1x128 (ms, median)" in rendered
    # the prefill runs all 128 ids where the decode step runs one: on the same fp32 file it takes longer
    assert quality.prefill_before_ms > quality.latency_before_ms


def test_a_prefill_slower_than_fp32_is_explained(with_past, tmp_path, monkeypatch):
    """A model too large for the CPU's caches whose quantized prefill is slower than fp32's gets a note saying why
    and what measures it (the timings are given: which way a real run goes depends on the CPU)."""
    source = with_past("granitemoe")
    monkeypatch.setattr(quant_core, "SMALL_WEIGHTS", 0)
    monkeypatch.setattr(quant_core.qual, "latency_ms",
                        lambda *args: {"decode@127": (2.0, 1.0), "prefill 1x128": (10.0, 15.0)})
    result = quantize(source.output, tmp_path / "q.onnx", mode="int8-blocks", latency_runs=3, perplexity=False)
    assert (result.quality.prefill_before_ms, result.quality.prefill_after_ms) == (10.0, 15.0)
    row = [line.split() for line in result.render().splitlines() if "CPU latency prefill 1x128 (ms, median)" in line]
    assert row and row[0][-3:] == ["10.00", "15.00", "1.50x"]
    assert [note for note in result.quality.notes if note.startswith("the prefill 1x128 is slower than fp32's here")
            and "benchmarks/nbits_rows.py" in note]


@pytest.mark.parametrize("timed, why", (
    ({"decode@127": (1.0, 2.0), "prefill 1x128": (10.0, 9.0)}, "its time goes to per-kernel overhead"),
    ({"1x128": (1.0, 2.0)}, "at many rows onnxruntime's block-quantized kernels compute slower than float SGEMM"),
))
def test_a_small_model_slower_than_fp32_is_explained_by_what_was_timed(tiny_export, tmp_path, monkeypatch, timed,
                                                                       why):
    """A model whose weights fit in the CPU's caches, quantized slower than fp32: the note gives the reason for what
    was timed, a decode step (one row: the kernels' own cost) or a whole sequence (many rows: compute). The timings
    are given; which way a real run goes depends on the CPU."""
    # a logits graph is timed on the whole sequence, a with-past one by its decode step
    source = tiny_export("granitemoe", "logits" if "1x128" in timed else "text-generation-with-past")
    monkeypatch.setattr(quant_core.qual, "latency_ms", lambda *args: timed)
    result = quantize(source.output, tmp_path / "q.onnx", mode="int8-blocks", latency_runs=3, perplexity=False)
    kind = next(iter(timed))
    assert result.quality.latency_of == kind
    notes = [note for note in result.quality.notes if note.startswith(f"slower than fp32 here (latency {kind})")]
    assert len(notes) == 1 and "fit in the CPU's caches, so reading fewer bytes gains nothing" in notes[0], notes
    assert why in notes[0] and "BENCHMARKS.md" in notes[0]
    assert not [note for note in result.quality.notes if "prefill 1x128 is slower" in note]  # a small model's


@pytest.mark.parametrize("model_type, in_kernel", (("mixtral", True), ("deepseek_v3", False), ("qwen2_moe", False),
                                                   ("phimoe", False), ("beam", False)))
def test_int4_fuses_each_layers_experts_into_one_qmoe(hf_export, tmp_path, model_type, in_kernel):
    """int4 runs each MoE layer's experts as one QMoE node (softmax top-k, renormalised: QMoE's own routing;
    grouped sigmoid with bias, the unnormalised top-k of qwen2_moe with shared experts beside, and PhiMoE's
    sparsemixer, two ArgMax picks concatenated: moeport's; beam's gate and up as one MatMul cut by a Split):
    the same numbers as the per-expert MatMulNBits graph, far fewer nodes, routers float."""
    result, _ = hf_export(model_type)
    layers = len(result.info.layers)
    fused = quantize(result.output, tmp_path / "fused.onnx", mode="int4", latency_runs=0, perplexity=False)
    apart = quantize(result.output, tmp_path / "apart.onnx", mode="int4", latency_runs=0, perplexity=False,
                     fused_experts=False)
    record = next(r for r in fused.passes if r.name == "FuseExpertsPass")
    assert record.note == f"fused the experts of {layers} MoE layer(s) into QMoE (4-bit blocks of 32)" + (
        f"; {layers} of them route in the kernel (their routers are a top-k softmax)" if in_kernel else "")
    graph = onnx.load(fused.output, load_external_data=False)
    qmoe = [n for n in graph.graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == layers and fused.output_ops["QMoE"] == layers
    assert "layout: expert weights one QMoE per layer, 4-bit" in fused.render()
    assert not expert_layers(graph)  # no per-expert MatMul is left
    apart_graph = onnx.load(apart.output, load_external_data=False)
    expert_matmuls = sum(len(nodes) for groups in expert_layers(apart_graph) for nodes in groups.values())
    # at least the per-expert MatMuls and their activations go; QMoE and its 10 routing-tensor nodes come
    assert len(graph.graph.node) <= len(apart_graph.graph.node) - expert_matmuls * 5 // 3 + 10 * layers
    assert _router_ops(float_router_nodes(graph)) == _router_ops(find_routers(onnx.load(result.output)).op_types)
    feeds = random_inputs(result.info, 2, 9, seed=0)
    outputs = [create_session(q.output).run(["logits"], feeds)[0] for q in (fused, apart)]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4, rtol=0)


def test_int4_leaves_experts_it_cannot_fuse_and_says_why(hf_export, tmp_path):
    """Gemma 4's experts are a GELU-gated MLP, which QMoE's CPU kernel does not run: they stay per-expert
    MatMulNBits, the note names what they compute, and the report's layout line says what was written (it had
    claimed one QMoE per layer)."""
    result, _ = hf_export("gemma4_text")
    fused = quantize(result.output, tmp_path / "q.onnx", mode="int4", latency_runs=0, perplexity=False)
    record = next(r for r in fused.passes if r.name == "FuseExpertsPass")
    layers = ", ".join(str(number) for number in range(len(result.info.layers)))
    assert not record.modified and record.note == (
        f"no MoE layer's experts are in a form QMoE runs; left as MatMuls: layers {layers} (the expert computes Gelu, "
        "Mul, Split between its projections, not down(silu(gate(x)) * up(x)) or its clamped form, the gated forms "
        "QMoE's kernel runs)")
    assert "QMoE" not in fused.output_ops and fused.output_ops["MatMulNBits"] > 0
    assert not fused.layout.fused_experts and not fused.to_dict()["nbits_layout"]["fused_experts"]
    assert "layout: expert weights 4-bit blocks of " in fused.render()  # a fused file's: the test above


def test_a_clamped_swiglu_with_biases_fuses_with_its_limit(tmp_path):
    """gpt-oss's experts (gate and up interleaved in one biased MatMul, split by two Slices; the gate clamped from
    above at 7, alpha 1.702, up clamped to +-7 plus 1; a biased down projection) run as one QMoE per layer with its
    biases, alpha, beta and swiglu_limit. The expert weights are scaled up so that the clamp is active: the fused
    file gives the per-expert file's logits, and without the limit it would not. At this expert width the export
    keeps the per-expert biases as Gathers at constant indices, as at real size: they are read as bias rows, and
    are not taken for embeddings (two Gathers of one table had crashed the per-expert file's quantization)."""
    import torch

    model = hf_families.random_model("gpt_oss", intermediate_size=1024)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".experts." in name:
                parameter.mul_(40.0)
    model.save_pretrained(tmp_path / "gpt_oss")
    source = export_checkpoint(tmp_path / "gpt_oss", tmp_path / "gpt_oss.onnx", validate=False)
    exported = onnx.load(source.output)
    initializers = {i.name for i in exported.graph.initializer}
    assert any(n.op_type == "Gather" and n.input[1] in initializers | {c.output[0] for c in exported.graph.node
                                                                       if c.op_type == "Constant"}
               for n in exported.graph.node)  # the biases' rows, picked at constant indices
    fused = quantize(source.output, tmp_path / "fused.onnx", mode="int8-blocks", latency_runs=0, perplexity=False)
    apart = quantize(source.output, tmp_path / "apart.onnx", mode="int8-blocks", latency_runs=0, perplexity=False,
                     fused_experts=False)
    layers = len(source.info.layers)
    assert next(r for r in fused.passes if r.name == "FuseExpertsPass").note == (
        f"fused the experts of {layers} MoE layer(s) into QMoE (8-bit blocks of 32); {layers} of them route in the "
        "kernel (their routers are a top-k softmax)")
    graph = onnx.load(fused.output)
    qmoe = [node for node in graph.graph.node if node.op_type == "QMoE"]
    assert len(qmoe) == layers
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe[0].attribute}
    assert (attributes["swiglu_limit"], attributes["activation_beta"]) == (7.0, 1.0)
    assert attributes["activation_alpha"] == pytest.approx(1.702)
    assert qmoe[0].input[4] and qmoe[0].input[7]  # fc1 and fc2 biases
    assert apart.output_ops["GatherBlockQuantized"] == 1  # the embedding; the bias tables stay float

    feeds = random_inputs(source.info, 2, 11, seed=0)
    per_expert = create_session(apart.output).run(["logits"], feeds)[0]
    # the two files' kernels quantize the experts' inputs to 8 bits in their own blocks (accuracy level 4), which at
    # these scaled-up activations moves the logits by up to 1e-4
    np.testing.assert_allclose(create_session(fused.output).run(["logits"], feeds)[0], per_expert, atol=1e-3, rtol=0)
    for node in qmoe:
        node.attribute.remove(next(a for a in node.attribute if a.name == "swiglu_limit"))
    onnx.save(graph, tmp_path / "unclamped.onnx")
    unclamped = create_session(tmp_path / "unclamped.onnx").run(["logits"], feeds)[0]
    assert np.abs(unclamped - per_expert).max() > 2e-2


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """tiny_export(model_type, task="text-generation-with-past", kv_cache="concat") -> ExportResult: the tiny random
    checkpoint of ``model_type`` (``hf_families.random_model``, seeded) exported for ``task`` (a with-past export
    with ``kv_cache``), without validation, once per module (exports are most of this file's time); every export of
    a family comes from one checkpoint, ``result.output.parent / model_type``. Tests read these files and write
    their own elsewhere."""
    root = tmp_path_factory.mktemp("tiny_exports")
    made = {}

    def make(model_type: str, task: str = "text-generation-with-past", kv_cache: str | None = "concat"):
        kv_cache = kv_cache if task == "text-generation-with-past" else None  # a logits graph has no cache
        checkpoint = root / model_type
        if not checkpoint.exists():
            hf_families.random_model(model_type).save_pretrained(checkpoint)
        key = (model_type, task, kv_cache)
        if key not in made:
            made[key] = export_checkpoint(checkpoint, root / f"{model_type}.{task}.{kv_cache}.onnx", task=task,
                                          kv_cache=kv_cache, validate=False)
        return made[key]

    return make


@pytest.fixture(scope="module")
def with_past(tiny_export):
    """with_past(model_type, kv_cache="concat") -> ExportResult: ``tiny_export``'s with-past export."""
    return lambda model_type, kv_cache="concat": tiny_export(model_type, "text-generation-with-past", kv_cache)


def _decode(path, steps, capacity: int = 0):
    """Logits [batch, seq, vocab] of each (attention_mask, input_ids) step of ``steps``, each step's presents fed
    back as the next one's past (the empty past first; ``capacity``: a shared buffer's length)."""
    session = create_session(path)
    names = [o.name for o in session.get_outputs()]
    past = empty_past(session.get_inputs(), steps[0][1].shape[0], session.get_outputs(), capacity)
    logits = []
    for mask, ids in steps:
        outputs = dict(zip(names, session.run(None, decoder_feeds(mask, ids, past))))
        past = {name: outputs[present_for(name)] for name in past}
        logits.append(outputs["logits"])
    return logits


def _steps(seed: int = 0, batch: int = 2):
    """A batch of prompts of 6 tokens (the second one left-padded to 4), then two decode steps; a batch of one
    then takes three tokens at once (onnxruntime's GroupQueryAttention takes several new tokens after a past
    for one row only)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, 6), np.int64)
    mask[1:, :2] = 0
    steps = [(mask, rng.integers(3, 100, (batch, 6)))]
    for new in (1, 1) + ((3,) if batch == 1 else ()):
        mask = np.concatenate([mask, np.ones((batch, new), np.int64)], axis=1)
        steps.append((mask, rng.integers(3, 100, (batch, new))))
    return steps


def _assert_close_on_tokens(logits_a, logits_b, atol: float):
    """Each step's logits of two ``_decode`` runs of ``_steps`` agree within ``atol``, except at the padded row's
    first two prompt positions (no tokens: no prediction to compare)."""
    for a, b in zip(logits_a, logits_b, strict=True):
        valid = np.ones(a.shape[:2], bool)
        if a.shape[1] == 6:  # the prompt step
            valid[1:, :2] = False
        np.testing.assert_allclose(a[valid], b[valid], atol=atol, rtol=0)


@pytest.mark.parametrize("kv_cache", ["concat", "shared"])
def test_cached_decoder_keeps_the_cache_in_onnxruntime(with_past, tmp_path, kv_cache):
    """``CachedDecoder`` (what ``moeport generate`` steps with) gives the logits of feeding each step's presents
    back through numpy; a shared buffer is written in place: after the steps its columns hold the keys of every
    token so far and zeros beyond, and it is the same buffer object throughout; ``reset`` starts a new prompt."""
    source = with_past("mixtral", kv_cache)
    quantized = quantize(source.output, tmp_path / "q.onnx", mode="int4", latency_runs=0, perplexity=False)
    capacity = 16 if kv_cache == "shared" else 0
    for path in (source.output, quantized.output):  # standard ops, and GroupQueryAttention writing in place
        for steps in (_steps(seed=7), _steps(seed=8, batch=1)):
            decoder = CachedDecoder(create_session(path), steps[0][1].shape[0], capacity=capacity)
            buffer = decoder.cache["past_key_values.0.key"]
            logits = [decoder.step(ids, mask) for mask, ids in steps]
            _assert_close_on_tokens(logits, _decode(path, steps, capacity), atol=1e-5)
            key = decoder.cache["past_key_values.0.key"].numpy()
            length = steps[-1][0].shape[1]
            if kv_cache == "shared":
                assert decoder.cache["past_key_values.0.key"] is buffer and key.shape[2] == capacity
                assert (np.abs(key[0, :, :length]).max(axis=-1) > 0).all()  # row 0 is not padded
                assert not key[:, :, length:].any()
            else:
                assert key.shape[2] == length
            decoder.reset()
            again = [decoder.step(ids, mask) for mask, ids in steps]
            _assert_close_on_tokens(again, logits, atol=0)


@pytest.mark.parametrize(("model_type", "kv_cache"), [("mixtral", "concat"), ("qwen3_moe", "concat"),
                                                     ("granitemoe", "concat"), ("mixtral", "shared"),
                                                     ("ernie4_5_moe", "concat"), ("cohere2_moe", "concat"),
                                                     ("glm4_moe", "concat")])
def test_fused_attention_gives_the_exported_numbers(with_past, tmp_path, model_type, kv_cache):
    """Each layer's attention as one GroupQueryAttention (with RotaryEmbedding): grouped query heads (mixtral),
    q/k norms per head (qwen3_moe), an unwritten scale of 1 (granitemoe), the shared buffer cache, the pairwise
    (interleaved) rotation over halves of the angle rows (ERNIE 4.5) and over pairwise repeated angles (Cohere),
    a rotation of the first half of each head (GLM-4.5). Equal to the exported graph on a left-padded batch, decode
    steps and a several-token step after a past."""
    source = with_past(model_type, kv_cache)
    layers = len(source.info.layers)
    model = ir.load(source.output)
    record = FuseAttentionPass()(model)
    assert record.modified and record.note == f"fused the attention of {layers} layer(s) into GroupQueryAttention"
    REMOVE_UNUSED(model)
    ir.save(model, tmp_path / "fused.onnx")
    graph = onnx.load(tmp_path / "fused.onnx")
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("GroupQueryAttention") == layers and ops.count("RotaryEmbedding") == 2 * layers
    producers = {out: node.op_type for node in graph.graph.node for out in node.output}
    assert {producers[o.name] for o in graph.graph.output if o.name.startswith("present.")} == {"GroupQueryAttention"}
    assert not {"Neg", "ScatterND"} & set(ops)  # rotate_half and a shared buffer's scatter went with them
    rotations = [{a.name: a.i for a in node.attribute} for node in graph.graph.node
                 if node.op_type == "RotaryEmbedding"]
    assert {r["interleaved"] for r in rotations} == {int(model_type in ("ernie4_5_moe", "cohere2_moe"))}
    config = hf_families.tiny_config(model_type)
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotated = head_size // 2 if model_type == "glm4_moe" else head_size  # GLM-4.5: partial_rotary_factor 0.5
    assert {r.get("rotary_embedding_dim", head_size) for r in rotations} == {rotated}
    one_token = [(np.ones((1, 1), np.int64), np.array([[5]])), (np.ones((1, 2), np.int64), np.array([[9]]))]
    for steps in (_steps(), _steps(batch=1), one_token):  # a one-token prompt: a mask of one column
        capacity = 16 if kv_cache == "shared" else 0
        _assert_close_on_tokens(_decode(tmp_path / "fused.onnx", steps, capacity),
                                _decode(source.output, steps, capacity), atol=1e-5)


@pytest.mark.parametrize("model_type", ["gemma4_text", "qwen3_5_moe_text", "exaone_moe", "mimo_v2_flash"])
def test_fused_attention_rotates_per_token_heads_and_built_rows(with_past, tmp_path, model_type):
    """RotaryEmbedding also for a rotation done before the heads move to [B, heads, S, D] (Gemma 4: cos/sin
    unsqueezed on axis 2), for cos/sin rows built other than by one Cos/Sin (Qwen3.5's multimodal rope, whose
    equal halves are all the kernel needs), beside linear-attention layers, and for heads normed after they moved
    to [B, heads, S, D] (EXAONE's q/k norm: no Transpose right before the rotation); every layer fused where the
    softmax is made safe by hand, with sinks and without (MiMo-V2's sliding and full layers). Equal to the
    exported graph."""
    source = with_past(model_type)
    outputs = onnx.load(source.output, load_external_data=False).graph.output
    layers = sum(o.name.startswith("present.") and o.name.endswith(".key") for o in outputs)  # attention layers
    model = ir.load(source.output)
    assert FuseAttentionPass()(model).modified
    REMOVE_UNUSED(model)
    ir.save(model, tmp_path / "fused.onnx")
    ops = [node.op_type for node in onnx.load(tmp_path / "fused.onnx").graph.node]
    assert (ops.count("GroupQueryAttention"), ops.count("RotaryEmbedding")) == (layers, 2 * layers)
    for steps in (_steps(), _steps(batch=1)):
        _assert_close_on_tokens(_decode(tmp_path / "fused.onnx", steps), _decode(source.output, steps), atol=1e-5)


@pytest.mark.parametrize(("model_type", "kv_cache"), [("granitemoehybrid", "concat"), ("hunyuan_v1_moe", "shared")])
def test_fused_attention_takes_heads_as_the_graph_computes_them(with_past, tmp_path, model_type, kv_cache):
    """Queries and keys whose rotation RotaryEmbedding cannot do go into GroupQueryAttention as computed: none at
    all (granite-4.0's hybrid: its one attention layer, beside a Mamba layer), a norm after the rotation (HunYuan,
    on the shared buffer). Equal to the exported graph."""
    source = with_past(model_type, kv_cache)
    outputs = onnx.load(source.output, load_external_data=False).graph.output
    layers = sum(o.name.startswith("present.") and o.name.endswith(".key") for o in outputs)  # attention layers
    model = ir.load(source.output)
    record = FuseAttentionPass()(model)
    assert record.modified and record.note == f"fused the attention of {layers} layer(s) into GroupQueryAttention"
    REMOVE_UNUSED(model)
    ir.save(model, tmp_path / "fused.onnx")
    ops = [node.op_type for node in onnx.load(tmp_path / "fused.onnx").graph.node]
    assert (ops.count("GroupQueryAttention"), ops.count("RotaryEmbedding")) == (layers, 0)
    capacity = 16 if kv_cache == "shared" else 0
    for steps in (_steps(), _steps(batch=1)):
        _assert_close_on_tokens(_decode(tmp_path / "fused.onnx", steps, capacity),
                                _decode(source.output, steps, capacity), atol=1e-5)


@pytest.mark.parametrize("kv_cache", ["concat", "shared"])
def test_fused_attention_takes_gpt_oss_sinks(tmp_path, kv_cache):
    """gpt-oss: its attention sinks (a logit per head concatenated to the scores, dropped after the softmax) become
    GroupQueryAttention's head_sink, its rotary written on the split halves with YaRN's scaling becomes
    RotaryEmbedding; a window of 3 tokens makes its sliding layer's mask cut keys within these steps. Equal to the
    exported graph; with the sinks' logits changed the numbers move, so the sinks are what the kernel reads."""
    checkpoint = tmp_path / "gpt_oss"
    hf_families.random_model("gpt_oss", sliding_window=3).save_pretrained(checkpoint)
    source = export_checkpoint(checkpoint, tmp_path / "gpt_oss.onnx", task="text-generation-with-past",
                               kv_cache=kv_cache, validate=False)
    model = ir.load(source.output)
    record = FuseAttentionPass()(model)
    assert record.modified and record.note == "fused the attention of 2 layer(s) into GroupQueryAttention"
    REMOVE_UNUSED(model)
    ir.save(model, tmp_path / "fused.onnx")
    graph = onnx.load(tmp_path / "fused.onnx")
    fused = [node for node in graph.graph.node if node.op_type == "GroupQueryAttention"]
    assert len(fused) == 2 and all(len(node.input) == 12 and node.input[11] for node in fused)  # head_sink
    softmaxes = [[node.op_type for node in g.graph.node].count("Softmax")
                 for g in (onnx.load(source.output, load_external_data=False), graph)]
    assert softmaxes[1] == softmaxes[0] - 2  # each layer's attention softmax is in its kernel; the routers' stay
    capacity = 16 if kv_cache == "shared" else 0
    for steps in (_steps(), _steps(batch=1)):
        fused_logits = _decode(tmp_path / "fused.onnx", steps, capacity)
        _assert_close_on_tokens(fused_logits, _decode(source.output, steps, capacity), atol=1e-5)
    sinks = {node.input[11] for node in fused}
    for initializer in graph.graph.initializer:
        if initializer.name in sinks:
            initializer.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(initializer) + 3,
                                                              initializer.name))
    onnx.save(graph, tmp_path / "moved.onnx")
    moved = _decode(tmp_path / "moved.onnx", steps, capacity)
    assert max(float(np.abs(a - b).max()) for a, b in zip(moved, fused_logits)) > 1e-2


@pytest.mark.parametrize("kv_cache", ["concat", "shared"])
def test_export_with_fused_attention(with_past, tmp_path, kv_cache):
    """``export(..., fused_attention=True)``: GroupQueryAttention in every layer of the fp32 file, validated against
    PyTorch on the export's own shapes (a left-padded batch's real tokens), and the same numbers as the standard-ops
    export on other shapes (a padded batch of 2, decode steps, several tokens after a past for one row)."""
    source = with_past("mixtral", kv_cache)
    layers = len(source.info.layers)
    fused = export_checkpoint(source.output.parent / "mixtral", tmp_path / "fused.onnx",
                              task="text-generation-with-past", kv_cache=kv_cache, fused_attention=True)
    assert fused.validation is not None and fused.validation.passed
    report = next(r for r in fused.passes if r["pass"] == "FuseAttention")
    assert report["changed"]
    assert report["reason"] == f"fused the attention of {layers} layer(s) into GroupQueryAttention"
    ops = [node.op_type for node in onnx.load(fused.output).graph.node]
    assert ops.count("GroupQueryAttention") == layers and not {"Neg", "ScatterND"} & set(ops)
    capacity = 16 if kv_cache == "shared" else 0
    for steps in (_steps(seed=3), _steps(seed=4, batch=1)):
        _assert_close_on_tokens(_decode(fused.output, steps, capacity), _decode(source.output, steps, capacity),
                                atol=1e-5)
    # int4 of the fused export: quantize leaves its attention as it is, and says so; the same numbers as int4 of the
    # standard-ops export, whose attention quantize fuses itself
    options = {"mode": "int4", "latency_runs": 0, "perplexity": False}
    from_fused = quantize(fused.output, tmp_path / "from-fused.int4.onnx", **options)
    record = next(r for r in from_fused.passes if r.name == "FuseAttentionPass")
    assert not record.modified
    assert record.note == f"layers {', '.join(map(str, range(layers)))}: already GroupQueryAttention (exported with " \
                          "--fused-attention)"
    assert [node.op_type for node in onnx.load(from_fused.output).graph.node].count("GroupQueryAttention") == layers
    from_standard = quantize(source.output, tmp_path / "from-standard.int4.onnx", **options)
    pairs = zip(_decode(from_fused.output, _steps(1), capacity), _decode(from_standard.output, _steps(1), capacity))
    for a, b in pairs:
        np.testing.assert_allclose(a[:, -1], b[:, -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["mixtral", "granitemoe", "gpt_oss"])
def test_quantize_turns_a_concat_cache_into_a_shared_buffer(with_past, tmp_path, model_type):
    """``kv_cache="shared"`` on a Concat-cache export (int4, cpu): recorded as a shared buffer, and driven as one
    (a 16-column buffer as past and present) it gives the logits of int4 of the shared-buffer export; driven as a
    Concat cache it still gives the Concat int4's (a padded batch of 2 with decode steps; several tokens after a
    past for one row)."""
    concat = with_past(model_type)
    shared = with_past(model_type, "shared")
    options = {"mode": "int4", "latency_runs": 0, "perplexity": False}
    turned = quantize(concat.output, tmp_path / "turned.onnx", kv_cache="shared", **options)
    record = next(r for r in turned.passes if r.name == "ShareCacheBufferPass")
    assert record.modified and "read(s) of the past's length now attention_mask's minus the step's" in record.note
    assert read_metadata(turned.output)["kv_cache"] == "shared"
    from_shared = quantize(shared.output, tmp_path / "shared.int4.onnx", **options)
    from_concat = quantize(concat.output, tmp_path / "concat.int4.onnx", **options)
    # only the Concat file is told about --kv-cache shared
    assert [any("--kv-cache shared records it as one buffer" in note for note in result.quality.notes)
            for result in (from_concat, turned, from_shared)] == [True, False, False]
    for steps in (_steps(seed=5), _steps(seed=6, batch=1)):
        for capacity, other in ((16, from_shared.output), (0, from_concat.output)):
            _assert_close_on_tokens(_decode(turned.output, steps, capacity), _decode(other, steps, capacity),
                                    atol=1e-4)


def test_quantize_kv_cache_user_errors(with_past, tmp_path):
    from moeport.errors import MoeportError

    concat = with_past("mixtral")
    options = {"latency_runs": 0, "perplexity": False}
    needs = ("^--kv-cache shared on a Concat-cache export needs its attention fused into onnxruntime's "
             "GroupQueryAttention \\(an integer mode, --target cpu or arm, without --no-fused-attention\\); else "
             "export with --kv-cache shared$")
    for extra in ({"mode": "fp16"}, {"mode": "int4", "fused_attention": False}, {"mode": "int4", "target": "cuda"}):
        with pytest.raises(MoeportError, match=needs):
            quantize(concat.output, tmp_path / "x.onnx", kv_cache="shared", **options, **extra)
    latent = with_past("deepseek_v2")  # latent attention: no GroupQueryAttention for it
    with pytest.raises(MoeportError, match="^--kv-cache shared needs every layer's attention fused into "
                                           "GroupQueryAttention \\(layers 0, 1: the key cache is read other than "
                                           "by one Transpose into the scores\\); export with --kv-cache shared "
                                           "instead$"):
        quantize(latent.output, tmp_path / "x.onnx", mode="int4", kv_cache="shared", **options)
    shared = with_past("mixtral", "shared")
    with pytest.raises(MoeportError, match="keeps a shared buffer; a Concat cache needs an export with --kv-cache "
                                           "concat$"):
        quantize(shared.output, tmp_path / "x.onnx", mode="int4", kv_cache="concat", **options)
    with pytest.raises(MoeportError, match="^unknown KV cache 'paged'; choose one of concat, shared$"):
        quantize(concat.output, tmp_path / "x.onnx", mode="int4", kv_cache="paged", **options)
    assert not (tmp_path / "x.onnx").exists() and not list(tmp_path.glob("x.onnx*"))


def test_export_fused_attention_user_errors(tmp_path):
    from moeport.errors import MoeportError

    hf_families.random_model("mixtral").save_pretrained(tmp_path / "mixtral")
    with pytest.raises(MoeportError, match="^--fused-attention applies to --task text-generation-with-past$"):
        export_checkpoint(tmp_path / "mixtral", tmp_path / "m.onnx", fused_attention=True)
    with pytest.raises(MoeportError, match="^transformers.js does not run onnxruntime's GroupQueryAttention; export "
                                           "the transformers.js layout without --fused-attention$"):
        export_checkpoint(tmp_path / "mixtral", tmp_path / "folder", layout="transformers.js",
                          task="text-generation-with-past", fused_attention=True)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "folder").exists()


@pytest.mark.parametrize(("model_type", "reason"), [
    ("deepseek_v3", "the key cache is read other than by one Transpose into the scores")])
def test_fused_attention_leaves_what_it_cannot_fuse_and_says_why(with_past, tmp_path, model_type, reason):
    """DeepSeek's latent attention reads its key cache in parts (a rotated and an unrotated one): it keeps its
    exported attention."""
    source = with_past(model_type)
    model = ir.load(source.output)
    before = ir.to_proto(model).SerializeToString()
    record = FuseAttentionPass()(model)
    assert not record.modified and record.note == f"layers 0, 1: {reason}"
    assert ir.to_proto(model).SerializeToString() == before


@pytest.mark.parametrize("fused", [False, True])
def test_quantize_times_a_shared_buffer_export_as_generate_steps_it(with_past, tmp_path, fused):
    """The report's latency of a --kv-cache shared export: its buffers bound as past and present (an empty past
    of no columns cannot take the prompt: onnxruntime's ScatterND refused it), with and without fused attention."""
    exported = with_past("mixtral", kv_cache="shared")
    result = quantize(exported.output, tmp_path / "int4.onnx", mode="int4", fused_attention=fused, latency_runs=2,
                      perplexity=False)
    quality = result.quality
    assert (quality.latency_of, quality.prefill_of) == ("decode@127", "prefill 1x128")
    assert min(quality.latency_before_ms, quality.latency_after_ms, quality.prefill_before_ms,
               quality.prefill_after_ms) > 0
    assert read_metadata(result.output)["kv_cache"] == "shared"


def test_quantize_fuses_attention_for_cpu_targets_only(with_past, tmp_path):
    """int4 of a with-past model: GroupQueryAttention in every layer by default (recorded in the quantization
    metadata), none with fused_attention=False or for a target whose provider has no float32 kernel (cuda)."""
    source = with_past("mixtral")
    layers = len(source.info.layers)
    options = {"mode": "int4", "latency_runs": 0, "perplexity": False}
    fused = quantize(source.output, tmp_path / "fused.onnx", **options)
    record = next(r for r in fused.passes if r.name == "FuseAttentionPass")
    assert record.modified and fused.output_ops["GroupQueryAttention"] == layers
    assert json.loads(onnx.load(fused.output).metadata_props[-1].value)["fused_attention"] is True
    for name, extra in (("off", {"fused_attention": False}), ("cuda", {"target": "cuda"})):
        result = quantize(source.output, tmp_path / f"{name}.onnx", **options, **extra)
        assert "GroupQueryAttention" not in result.output_ops and not any(
            r.name == "FuseAttentionPass" for r in result.passes), name
    # the quantized graph decodes the padded batch and the steps after it like the unfused one, to int4 noise
    unfused = _decode(tmp_path / "off.onnx", _steps(1))
    for a, b in zip(_decode(fused.output, _steps(1)), unfused):
        assert np.abs(a[:, -1] - b[:, -1]).max() < 0.05 * np.abs(b).max()


def test_quantize_with_a_checkpoint_measures_a_with_past_model_against_pytorch(with_past, tmp_path):
    """``quantize --checkpoint`` on a with-past export: parity runs decoder steps (a prompt from the empty cache)
    through PyTorch and the quantized file. A checkpoint whose files differ from the export's is named in a
    warning; one of another model type or with other MoE layers is refused before anything is quantized, and
    nothing is written."""
    from moeport.errors import MoeportError
    from moeport.exporter.reference import CheckpointReference

    source = with_past("granitemoe")
    checkpoint = source.output.parent / "granitemoe"
    result = quantize(source.output, tmp_path / "q.onnx", mode="int4", reference=CheckpointReference.load(checkpoint),
                      latency_runs=0, perplexity=False)
    parity = result.quality.parity
    assert parity.shapes == [f"{b}x{s}" for b, s in quant_core.qual.PARITY_SHAPES] and parity.inputs == "random ids"
    assert 0 < parity.max_abs_err < 0.5 and parity.argmax_agreement > 0.8, parity
    assert not result.warnings

    reseeded = tmp_path / "reseeded"
    hf_families.random_model("granitemoe", seed=1).save_pretrained(reseeded)
    with pytest.warns(quant_core.QuantizeWarning, match="differ from the ones this model was exported from"):
        other = quantize(source.output, tmp_path / "other.onnx", mode="int4",
                         reference=CheckpointReference.load(reseeded), latency_runs=0, perplexity=False)
    assert other.warnings == [f"the checkpoint's files ({reseeded}) differ from the ones this model was exported from"]
    assert other.quality.parity.max_abs_err > 10 * parity.max_abs_err  # measured against another model's weights
    # verify says the same of the fp32 file
    from moeport.runtime.verify import verify
    assert other.warnings[0] in verify(source.output, CheckpointReference.load(reseeded), shapes=[(1, 4)]).warnings

    mixtral = tmp_path / "mixtral"
    hf_families.random_model("mixtral").save_pretrained(mixtral)
    with pytest.raises(MoeportError, match="was exported from a granitemoe checkpoint but .*mixtral is mixtral$"):
        quantize(source.output, tmp_path / "refused.onnx", mode="int4", reference=CheckpointReference.load(mixtral),
                 latency_runs=0, perplexity=False)
    deeper = tmp_path / "deeper"
    hf_families.random_model("granitemoe", num_hidden_layers=3).save_pretrained(deeper)
    with pytest.raises(MoeportError, match="have different MoE layers; was it exported from this checkpoint"):
        quantize(source.output, tmp_path / "refused.onnx", mode="int4", reference=CheckpointReference.load(deeper),
                 latency_runs=0, perplexity=False)
    assert not (tmp_path / "refused.onnx").exists()


def test_a_with_past_model_is_calibrated_from_ids_and_their_attention_mask(with_past, tiny_export, tmp_path):
    """Static int8 of a with-past export calibrated from an .npz of token ids, as a tokenizer writes them: with or
    without their ``attention_mask`` (each row a prefill from the empty past, its positions from the mask). A mask
    of ones calibrates exactly as no mask; a mask that is not 0/1, hides a whole row or does not cover the ids is
    refused in one line. A logits export (ids and mask) takes the ids alone too, and routes them the same."""
    from moeport.errors import MoeportError

    source = with_past("granitemoe")
    ids = np.random.default_rng(0).integers(3, 128, (4, 16))
    results = {}
    for name, arrays in (("ids", {"input_ids": ids}), ("ones", {"input_ids": ids, "attention_mask": np.ones_like(ids)})):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        results[name] = quantize(source.output, tmp_path / f"{name}.onnx", mode="int8",
                                 calibration=tmp_path / f"{name}.npz", latency_runs=0, perplexity=False)
    assert results["ones"].calibration["tokens"] == results["ids"].calibration["tokens"] == ids.size
    assert results["ones"].calibration["coverage"] == results["ids"].calibration["coverage"]
    padded = np.ones_like(ids)
    padded[0, :5] = 0  # left padding, as a batch of prompts of different lengths
    np.savez(tmp_path / "padded.npz", input_ids=ids, attention_mask=padded)
    assert quantize(source.output, tmp_path / "padded.onnx", mode="int8", calibration=tmp_path / "padded.npz",
                    latency_runs=0, perplexity=False).calibration["tokens"] == ids.size
    for bad, message in ((np.full_like(ids, 2), "'attention_mask' holds values other than 0 and 1"),
                         (np.vstack([np.zeros_like(ids[:1]), padded[1:]]),
                          r"'attention_mask' masks every token of row\(s\) \[0\]"),
                         (padded[:, 1:], r"'attention_mask' is \[4, 15\] but 'input_ids' is \[4, 16\]")):
        np.savez(tmp_path / "bad.npz", input_ids=ids, attention_mask=bad)
        with pytest.raises(MoeportError, match=message):
            quantize(source.output, tmp_path / "bad.onnx", mode="int8", calibration=tmp_path / "bad.npz",
                     latency_runs=0, perplexity=False)
        assert not (tmp_path / "bad.onnx").exists()
    # A logits export takes input_ids and attention_mask: ids alone get a mask of ones, as text windows do.
    logits = tiny_export("granitemoe", "logits")
    assert [i.name for i in onnx.load(logits.output, load_external_data=False).graph.input] == \
        ["input_ids", "attention_mask"]
    by_ids = quantize(logits.output, tmp_path / "logits-int8.onnx", mode="int8", calibration=tmp_path / "ids.npz",
                      latency_runs=0, perplexity=False)
    assert by_ids.calibration["coverage"] == results["ids"].calibration["coverage"]
