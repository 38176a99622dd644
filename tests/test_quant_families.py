"""Router protection for every family of the README's supported table that is exported on every run
(``hf_families.EVERY_RUN``): one router per MoE layer is found, and int8-dynamic and int4 leave every router's
gate, Softmax/Sigmoid and TopK (or ArgMax) in float32 while the experts are quantized.

The exports are the session's ``hf_export`` ones (tests/conftest.py), shared with tests/test_hf_families.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")

import hf_families  # noqa: E402  (tests/, on sys.path)
from moeport.contract import random_inputs  # noqa: E402
from moeport.exporter.export import export_checkpoint  # noqa: E402
from moeport.quant import quantize  # noqa: E402
from moeport.runtime.moe_graph import expert_layers, find_routers, float_router_nodes  # noqa: E402
from moeport.runtime.session import create_session  # noqa: E402

MODES = ("int8-dynamic", "int4")


def _router_ops(op_types: dict[str, int]) -> dict[str, int]:
    """Gates (a Gemm gate may come out as MatMul), score ops and selections among router node counts."""
    return {"gate": op_types.get("Gemm", 0) + op_types.get("MatMul", 0),
            "score": op_types.get("Softmax", 0) + op_types.get("Sigmoid", 0),
            "selection": op_types.get("TopK", 0) + op_types.get("ArgMax", 0)}


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
    # no node outputs a whole [vocab, hidden] (or [hidden, vocab]) float table at run time (in QDQ, int8, every
    # weight has its DequantizeLinear: onnxruntime fuses it into the MatMul / Gather kernels at load)
    assert mode == "int8" or not [n.name for n in out.graph.node if n.op_type in ("DequantizeLinear", "Transpose")
                and any(inits.get(i, ())[:1] == (vocab,) or inits.get(i, ())[-1:] == (vocab,) for i in n.input)]
    logits = produced_by["logits"]
    while logits.op_type in ("Add", "Mul", "Cast", "Reshape", "QuantizeLinear", "DequantizeLinear") \
            and logits.input[0] in produced_by:
        logits = produced_by[logits.input[0]]  # scale factors, casts and Q/DQ of activations after the lm_head
    assert logits.op_type in ("MatMulNBits", "MatMulInteger", "MatMul"), logits.op_type
    lm_inputs = set(logits.input) | {i for n in out.graph.node if n.output[0] in logits.input for i in n.input}
    assert any(i.startswith(table + "_kn") for i in lm_inputs), sorted(lm_inputs)


def test_latency_of_a_with_past_model_is_a_decode_step(tmp_path):
    """A with-past model is deployed decoding: the report times one decode step after a 127-token prompt, fp32 and
    quantized side by side (a model without a cache: the whole 1x128 run, tests/test_quant.py)."""
    checkpoint = tmp_path / "ckpt"
    hf_families.random_model("granitemoe").save_pretrained(checkpoint)
    source = export_checkpoint(checkpoint, tmp_path / "m.onnx", task="text-generation-with-past", validate=False)
    result = quantize(source.output, tmp_path / "q.onnx", mode="int8-blocks", latency_runs=3, perplexity=False)
    quality = result.quality
    assert quality.latency_of == "decode@127" and quality.latency_before_ms > 0 and quality.latency_after_ms > 0
    assert "CPU latency decode@127 (ms, median)" in result.render()


@pytest.mark.parametrize("model_type", ("mixtral", "deepseek_v3", "qwen2_moe"))
def test_int4_fuses_each_layers_experts_into_one_qmoe(hf_export, tmp_path, model_type):
    """int4 runs each MoE layer's experts as one QMoE node (moeport's own routing: softmax top-k, grouped
    sigmoid with bias, shared experts beside): the same numbers as the per-expert MatMulNBits graph, far fewer
    nodes, routers float."""
    result, _ = hf_export(model_type)
    layers = len(result.info.layers)
    fused = quantize(result.output, tmp_path / "fused.onnx", mode="int4", latency_runs=0, perplexity=False)
    apart = quantize(result.output, tmp_path / "apart.onnx", mode="int4", latency_runs=0, perplexity=False,
                     fused_experts=False)
    record = next(r for r in fused.passes if r.name == "FuseExpertsPass")
    assert record.note == f"fused the experts of {layers} MoE layer(s) into QMoE (4-bit blocks of 32)"
    graph = onnx.load(fused.output, load_external_data=False)
    qmoe = [n for n in graph.graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == layers and fused.output_ops["QMoE"] == layers
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
    """gpt-oss's experts are a clamped SwiGLU with biases, not silu(gate) * up: they stay per-expert MatMulNBits."""
    result, _ = hf_export("gpt_oss")
    fused = quantize(result.output, tmp_path / "q.onnx", mode="int4", latency_runs=0, perplexity=False)
    record = next(r for r in fused.passes if r.name == "FuseExpertsPass")
    assert not record.modified and "left as MatMuls: layer 0 (" in record.note
    assert "QMoE" not in fused.output_ops and fused.output_ops["MatMulNBits"] > 0
