"""moeport.quant: every mode on the random ``topk`` sample, router protection, schemes, user errors."""

from __future__ import annotations

import importlib
import json
import platform
import re
import subprocess
import sys
import warnings
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from moeport import contract
from moeport.cli import main
from moeport.errors import MoeportError
from moeport.exporter.export import export_checkpoint
from moeport.exporter.reference import CheckpointReference
from tiny_hf import save_char_tokenizer
from moeport.quant import apply, core, get_mode, modes, quantize, register_mode
from moeport.quant.calibration import starvation_threshold
from moeport.quant.apply import ApplyStep
from moeport.quant.modes import QuantMode
from moeport.quant import schemes
from moeport.quant.schemes import NBitsLayout, choose_scheme, cpu_flags
from moeport.quant.quality import RouterSession
from moeport.runtime.moe_graph import find_expert_matmuls, find_routers, top_k_as_qmoe
from moeport.runtime.placement import cpu_has_float16_matmul, measure_placement
from moeport.runtime.session import create_session, resolve_provider
from moeport.samples import TRAINED_DIR

# The module, not the function ``moeport.quant.modes`` that the package exports under the same name.
modes_module = importlib.import_module("moeport.quant.modes")

TEXT = (b"def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 40)


@pytest.fixture(scope="module")
def topk(exported):
    return exported("topk", with_routing=True)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant-text") / "text.txt"
    path.write_bytes(TEXT)
    return path


@pytest.fixture(scope="module")
def quantized(topk, sample_checkpoint, text_file, tmp_path_factory):
    """quantized(mode, **options) -> QuantizeResult on the topk sample, cached per (mode, options)."""
    cache = {}
    out_dir = tmp_path_factory.mktemp("quant-out")

    def make(mode: str, **options):
        key = (mode, tuple(sorted(options.items())))
        if key not in cache:
            if mode == "int8" and "calibration" not in options and "random_calibration" not in options:
                options["calibration"] = text_file
            cache[key] = quantize(topk.output, out_dir / f"{mode}-{len(cache)}.onnx", mode=mode,
                                  reference=CheckpointReference.load(sample_checkpoint("topk")), heldout=text_file,
                                  latency_runs=2,
                                  parity_shapes=((2, 16),), **options)
        return cache[key]

    return make


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _experts(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every expert MatMul (found structurally: MatMuls below a per-expert segment of the sorted rows)."""
    return [node for nodes in find_expert_matmuls(model).values() for node in nodes]


def test_router_plan_on_exported_sample(topk):
    plan = find_routers(onnx.load(topk.output))
    assert len(plan.routers) == len(topk.info.layers) == 2
    assert plan.op_types == {"Div": 2, "Gemm": 2, "ReduceSum": 2, "Reshape": 2, "Softmax": 2, "TopK": 2}
    assert [r.indices_output for r in plan.routers] == ["routing.0.experts", "routing.1.experts"]


def test_router_plan_sigmoid_with_bias(exported):
    plan = find_routers(onnx.load(exported("sigmoid-shared").output))
    assert len(plan.routers) == 2
    # score + correction bias -> TopK, weights gathered from the plain scores, renormalised, scaled
    for op in ("Sigmoid", "Add", "TopK", "GatherElements", "ReduceSum", "Div"):
        assert plan.op_types.get(op, 0) >= 2, (op, plan.op_types)
    assert "MatMul" not in plan.op_types  # expert MatMuls are never part of the router


@pytest.mark.parametrize(("mode", "target"), [("int8", "nnapi"), ("int8", "cpu"), ("int8-dynamic", "cpu"),
                                              ("int4", "cpu")])
def test_shared_experts_quantized_router_reads_float(exported, tmp_path, mode, target):
    """sigmoid-shared: the shared experts' Gemm reads the same hidden states as the router gate."""
    model = exported("sigmoid-shared").output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = quantize(model, tmp_path / "s.onnx", mode=mode, target=target, random_calibration=mode == "int8",
                          calibration_samples=4, latency_runs=0, perplexity=False)
    out = onnx.load(result.output)
    producers = _producers(out)
    shared = [n for n in out.graph.node if n.op_type == "Gemm" and n.name not in set(find_routers(out).nodes)]
    if target == "nnapi":  # 8-bit QDQ keeps Gemm, with int8 weights
        assert len(shared) == 6 and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in shared)
    else:  # rewritten as MatMul first (16-bit QDQ has no Gemm kernel on the CPU provider), then quantized
        assert not shared
    gates = [n for n in out.graph.node if n.name in {r.gate for r in find_routers(out).routers}]
    assert len(gates) == 2 and result.router_kept_float["Sigmoid"] == 2
    for gate in gates:
        assert gate.op_type in ("Gemm", "MatMul")
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in gate.input)


def test_int8_quantizes_experts_not_router(quantized, topk):
    """Static int8 with its experts per expert (``fused_experts=False``; the transformers.js form): every expert
    MatMul quantized, the routers float."""
    result = quantized("int8", fused_experts=False)
    model = onnx.load(result.output)
    onnx.checker.check_model(model, full_check=True)
    producers = _producers(model)
    inits = {i.name: i for i in model.graph.initializer}
    experts = _experts(model)
    # 2 layers x 8 experts x 2 MatMuls (gate and up as one, down)
    assert len(experts) == len(_experts(onnx.load(topk.output))) == 32
    assert all(producers[n.input[0]].op_type == "DequantizeLinear" for n in experts)  # activations quantized
    for name in find_routers(onnx.load(topk.output)).nodes:
        node = next(n for n in model.graph.node if n.name == name)
        assert not any(i in producers and producers[i].op_type == "DequantizeLinear" for i in node.input), name
    gate_weights = [n.input[1] for n in model.graph.node if n.name in set(find_routers(model).nodes)
                    and n.op_type in ("Gemm", "MatMul")]
    assert len(gate_weights) == 2 and all(inits[w].data_type == TensorProto.FLOAT for w in gate_weights)
    assert result.router_kept_float == {"Div": 2, "Gemm": 2, "ReduceSum": 2, "Reshape": 2, "Softmax": 2, "TopK": 2}
    # the CPU default: every expert a MatMulNBits over 8-bit blocks of 32 along K (uint8 codes [N, K/32, 32], a
    # float16 scale per block cast to float32), every activation 16-bit, the embedding table in 8-bit blocks
    for node in experts:
        attributes = _attributes(node)
        k, n = attributes["K"], attributes["N"]
        assert node.op_type == "MatMulNBits" and len(node.input) == 3
        assert attributes == {"K": k, "N": n, "bits": 8, "block_size": 32, "accuracy_level": 4}
        codes, scale = inits[node.input[1]], inits[producers[node.input[2]].input[0]]
        assert list(codes.dims) == [n, k // 32, 32] and codes.data_type == TensorProto.UINT8
        assert list(scale.dims) == [n, k // 32] and scale.data_type == TensorProto.FLOAT16
    assert _activation_bits(model, experts) == {"gate_up": {TensorProto.UINT16}, "down": {TensorProto.UINT16}}
    assert result.scheme.activation_type == "QUInt16" and result.scheme.down_activation_type is None
    assert "scheme: activations QUInt16, weights QInt8, in blocks of 32 (" in result.render()
    assert "for target cpu, int8-blocks decodes about twice as fast: this file runs every expert's" in result.render()
    assert [n.op_type for n in model.graph.node if n.name == "node_embedding"] == ["GatherBlockQuantized"]


def _eight_bit_qmoe_file(result, topk) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """The model ``result`` wrote for the topk sample and its initializers, after checking that it is valid and that
    each MoE layer's experts are one QMoE in 8-bit blocks of 64 (the topk sample's expert width of 64 halves the
    default block of 128: IntScheme.with_expert_widths), with no expert MatMul left."""
    model = onnx.load(result.output)
    onnx.checker.check_model(model, full_check=True)
    inits = {i.name: i for i in model.graph.initializer}
    assert not _experts(model)
    qmoe = [n for n in model.graph.node if n.op_type == "QMoE"]
    assert result.scheme.expert_block_size == 64 and len(qmoe) == len(topk.info.layers) == 2
    for node in qmoe:
        attributes = _attributes(node)
        assert attributes["expert_weight_bits"] == 8 and attributes["block_size"] == 64
        assert inits[node.input[2]].data_type == TensorProto.UINT8  # fc1's codes
    return model, inits


def test_int8_on_cpu_fuses_experts_into_qmoe(quantized, topk):
    """The CPU default of static int8: each MoE layer's experts one QMoE in 8-bit blocks (as int8-blocks writes
    them), the other MatMuls calibrated 16-bit Q/DQ into MatMulNBits, the routers float; smaller than the
    per-expert form, and within the mode's size, routing and perplexity targets."""
    result, per_expert = quantized("int8"), quantized("int8", fused_experts=False)
    model, inits = _eight_bit_qmoe_file(result, topk)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    producers = _producers(model)
    assert nbits and all(producers[n.input[0]].op_type == "DequantizeLinear" for n in nbits)  # calibrated inputs
    assert {inits[producers[n.input[0]].input[2]].data_type for n in nbits} == {TensorProto.UINT16}
    assert result.router_kept_float == {"Div": 2, "Gemm": 2, "ReduceSum": 2, "Softmax": 2, "TopK": 2}
    assert "in blocks of 32; routed experts one QMoE per layer, 8-bit blocks of 64 (" in result.render()
    assert "routed experts" not in per_expert.render() and per_expert.scheme.expert_block_size is None
    assert result.quality.size_after < per_expert.quality.size_after
    assert all(result.targets_met().values()), result.render()


def _activation_bits(model, experts) -> dict[str, set[int]]:
    """Zero-point types of the activations each kind of expert MatMul reads (down: weights named *down*)."""
    producers, inits = _producers(model), {i.name: i for i in model.graph.initializer}
    bits: dict[str, set[int]] = {"gate_up": set(), "down": set()}
    for node in experts:
        weight = node.input[1] if node.op_type == "MatMulNBits" else producers[node.input[1]].input[0]
        kind = "down" if "down" in weight else "gate_up"
        bits[kind].add(inits[producers[node.input[0]].input[2]].data_type)
    return bits


@pytest.mark.parametrize(("options", "down"), [
    (dict(activations="int8"), TensorProto.UINT16),  # 8-bit activations but the down projections' (auto)
    (dict(activations="int8", down_activations="int8"), TensorProto.UINT8),
    (dict(target="nnapi"), TensorProto.UINT8),  # no 16-bit activations on NNAPI: auto keeps 8
])
def test_int8_activation_options(quantized, options, down):
    result = quantized("int8", **options)
    model = onnx.load(result.output)
    onnx.checker.check_model(model, full_check=True)
    producers, inits = _producers(model), {i.name: i for i in model.graph.initializer}
    experts = _experts(model)
    assert _activation_bits(model, experts) == {"gate_up": {TensorProto.UINT8}, "down": {down}}
    assert result.scheme.activation_type == "QUInt8" and result.scheme.weight_block_size is None
    # 8-bit activations keep per-channel weights (blocks would be mis-run by onnxruntime: benchmarks/blocked_qdq.py);
    # NNAPI's are per tensor
    for node in experts:
        dq = producers[node.input[1]]
        scales = [inits[dq.input[0]].dims[1]] if result.scheme.per_channel else []
        assert "block_size" not in _attributes(dq) and list(inits[dq.input[1]].dims) == scales
    # standard ops only: the embedding table QDQ per tensor
    assert [n.op_type for n in model.graph.node if n.name == "node_embedding"] == ["Gather"]
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]


def test_int8_int16_activations_on_qnn_keep_standard_ops(quantized):
    """QNN runs 16-bit activations with 8-bit weights (A16W8) as they are: no blocks, standard ops only."""
    result = quantized("int8", target="qnn", activations="int16")
    model = onnx.load(result.output)
    assert result.scheme.activation_type == "QUInt16" and result.scheme.weight_block_size is None
    assert _activation_bits(model, _experts(model)) == {"gate_up": {TensorProto.UINT16}, "down": {TensorProto.UINT16}}
    assert not any(r.name == "BlockWeightsPass" for r in result.passes)
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert not [n for n in model.graph.node if n.op_type == "DequantizeLinear" and "block_size" in _attributes(n)]


def test_int8_on_cpu_runs_block_kernels_and_is_closer(quantized, topk):
    """Static int8 for CPU targets: 16-bit activations and 8-bit weights in blocks of 32, written as MatMulNBits
    (onnxruntime fused a blocked DequantizeLinear + MatMul into the same kernel at load, and a process kept the
    memory fusing took: BENCHMARKS.md); with 8-bit activations the MatMuls run as MatMulIntegerToFloat, with one
    activation scale per tensor. The logits of the 16-bit file are closer to the fp32 model's, and the block
    weights are within half a step of the fp32 weights. Experts per expert here (``fused_experts=False``), so that
    every quantized MatMul is one of these; the default's QMoE: test_int8_on_cpu_fuses_experts_into_qmoe."""
    wide, narrow = quantized("int8", fused_experts=False), quantized("int8", activations="int8")
    record = next(r for r in wide.passes if r.name == "BlockWeightsPass")
    # every quantized MatMul: 32 experts', 8 attention projections, the lm_head
    assert record.modified and record.note == ("rewrote 41 MatMul(s) as MatMulNBits reading 41 weight(s) stored in "
                                               "8-bit blocks of 32")
    assert not any(r.name == "BlockWeightsPass" for r in narrow.passes)

    fp32 = onnx.load(topk.output)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in fp32.graph.initializer}
    model = onnx.load(wide.output)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = _producers(model)
    checked = 0
    # each layer's q, k and v are one MatMulNBits (StackProjectionsPass, exact: test_quant_passes.py); the others
    # are checked against their fp32 weights
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len([n for n in nbits if n.name.endswith("_stacked")]) == 2
    for node in (n for n in nbits if not n.name.endswith("_stacked")):
        k, n = _attributes(node)["K"], _attributes(node)["N"]
        # [N, K/32, 32] uint8 (code + 128) -> [K, N] codes; [N, K/32] scales -> one per weight, [K, N]
        codes = (inits[node.input[1]].astype(np.int16) - 128).reshape(n, k).T
        step = np.repeat(inits[producers[node.input[2]].input[0]].astype(np.float32).T, 32, axis=0)
        original = weights[node.input[1].removesuffix("_quantized_b32")]
        assert np.all(np.abs(codes) <= 127) and np.all(np.abs(codes * step - original) <= step / 2 * (1 + 1e-6))
        checked += 1
    assert checked == 41 - 6  # 32 experts', 2 output projections, the lm_head
    # the MatMuls' outputs stay float (FloatOutputsPass ran before they became MatMulNBits)
    assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear" and producers.get(n.input[0])
                and producers[n.input[0]].op_type == "MatMulNBits"]

    def kernels(path) -> set[str]:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(path.with_name(path.stem + ".optimized.onnx"))
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}

    assert "MatMulIntegerToFloat" not in kernels(wide.output)
    assert "MatMulIntegerToFloat" in kernels(narrow.output)

    feeds = contract.random_inputs(topk.info, 2, 9, seed=3)  # not the export's shape
    reference = create_session(topk.output).run(["logits"], feeds)[0]
    errors = [np.abs(create_session(r.output).run(["logits"], feeds)[0] - reference).mean() for r in (wide, narrow)]
    assert errors[0] < 0.95 * errors[1], errors  # 0.0061 against 0.0070 when written


def test_int8_report(quantized):
    result = quantized("int8")
    q = result.quality
    assert q.weights_ratio < 0.30 and q.size_after < q.size_before
    assert q.parity.routing_agreement >= 0.9 and q.parity.argmax_agreement >= 0.9
    assert set(q.parity.routing_per_layer) == {"0", "1"}
    assert q.perplexity_before > 1 and abs(q.perplexity_change) < 0.05
    assert q.latency_before_ms > 0 and q.latency_after_ms > 0 and q.latency_of == "1x128"  # no cache: a whole run
    assert q.prefill_before_ms is None and q.prefill_of == ""  # ... which is its prefill
    coverage = result.calibration["coverage"]
    assert [c["label"] for c in coverage] == ["0", "1"]
    assert all(sum(c["counts"]) == result.calibration["tokens"] * 2 for c in coverage)  # top-2 slots
    data = json.loads(json.dumps(result.to_dict()))
    # 10: the routers' Reshapes that fed the routing weights to the experts went with them into QMoE
    assert data["mode"]["name"] == "int8" and data["router"]["kept_float_nodes"] == 10
    text = result.render()
    assert "router kept float32: 10 nodes" in text and "perplexity" in text and "routing agreement" in text
    # the 16-bit down-projection Q/DQ needs opset 21; onnxruntime's warning about it is replaced by this note
    assert "opset 20 -> 21" in text
    assert "for target cpu, int8-blocks is a little faster and closer, without calibration" in text
    assert json.loads(onnx.load(result.output).metadata_props[-1].value)["mode"] == "int8"


def test_int8_dynamic_on_cpu_fuses_experts_into_qmoe(quantized, topk):
    """The CPU default of int8-dynamic: each MoE layer's experts one QMoE in 8-bit blocks (as int8-blocks writes
    them; the kernel quantizes its float input as it runs), every other MatMul 8-bit blocks with float inputs, the
    table in 8-bit blocks, the routers float; nothing left for the dynamic quantizer's per-tensor scales."""
    result, per_expert = quantized("int8-dynamic"), quantized("int8-dynamic", fused_experts=False)
    model, inits = _eight_bit_qmoe_file(result, topk)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    # the routers float32, as int8-blocks leaves them (this export has routing outputs, so they stay whole)
    assert result.output_ops["QMoE"] == 2 and result.router_kept_float == quantized("int8-blocks").router_kept_float
    assert result.router_kept_float["TopK"] == result.router_kept_float["Softmax"] == 2
    text = result.render()
    assert "8-bit block weights for every MatMul but an unfused layer's expert gate and up projections" in text
    assert "routed experts one QMoE per layer, 8-bit blocks of 64 (" in text
    assert "routed experts" not in per_expert.render() and per_expert.scheme.expert_block_size is None
    assert "int8-blocks decodes about twice as fast" not in text
    assert result.quality.parity.routing_agreement >= 0.9
    assert all(result.targets_met().values()), text


def test_int8_dynamic_per_expert(quantized, topk):
    result = quantized("int8-dynamic", fused_experts=False)
    model = onnx.load(result.output)
    onnx.checker.check_model(model, full_check=True)
    groups = find_expert_matmuls(model)
    gate_up = [n for group, nodes in groups.items() if not group.is_down_projection for n in nodes]
    down = [n for group, nodes in groups.items() if group.is_down_projection for n in nodes]
    assert len(gate_up) == 16 and {n.op_type for n in gate_up} <= {"MatMulInteger", "DynamicQuantizeMatMul"}
    # CPU default: the down projections read float inputs with 8-bit block weights
    assert len(down) == 16 and {n.op_type for n in down} == {"MatMulNBits"}
    assert {onnx.helper.get_attribute_value(a) for n in down for a in n.attribute if a.name == "bits"} == {8}
    # ... and so do the lm_head (the one MatMul over the vocabulary), and the embedding table is in 8-bit blocks
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    heads = [n for n in model.graph.node if n.op_type == "MatMulNBits"
             and onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "N")) == topk.info.vocab_size]
    assert len(heads) == 1
    # ... and so does every MatMul over weights outside the experts (attention): only the experts' gate and up
    # projections keep one int8 scale per input tensor (attention's scores and values are MatMuls of activations)
    weights = set(inits) | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    assert not [n for n in model.graph.node if n.op_type in ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul")
                and n not in gate_up and n.input[1] in weights]
    assert len([n for n in model.graph.node if n.op_type == "MatMulNBits"]) > len(down) + 1
    tables = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(tables) == 1 and inits[tables[0].input[0]][0] == topk.info.vocab_size
    assert not [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                and inits[n.input[0]][:1] == [topk.info.vocab_size]]
    assert "float inputs with 8-bit block weights for every MatMul but the experts' gate and up" in result.render()
    assert "for target cpu, int8-blocks decodes about twice as fast: this file runs every expert's" in result.render()
    assert sum(result.router_kept_float.values()) == 12
    assert result.quality.parity.routing_agreement >= 0.9
    assert result.quality.weights_ratio < 0.3


def test_quantization_mode_reads_the_record_quantize_leaves(quantized):
    from moeport.contract import metadata_of_map, quantization_mode

    model = onnx.load(quantized("int8-dynamic").output, load_external_data=False)
    assert quantization_mode(metadata_of_map({p.key: p.value for p in model.metadata_props})) == "int8-dynamic"
    assert quantization_mode({}) is None  # an export
    # a record some other tool rewrote: still a quantized file
    assert quantization_mode({"quantization": "not json"}) == quantization_mode({"quantization": "[1]"}) == "quantized"


def test_verify_of_a_quantized_model_says_why_the_float_tolerance_fails_it(quantized, sample_checkpoint, capsys):
    """verify judged a quantized file at the family's float32 tolerance without a word: "FAILED" on every output."""
    model, checkpoint = quantized("int8-dynamic").output, sample_checkpoint("topk")
    runs = {}
    for extra in ([], ["--atol", "100"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["verify", str(model), "--checkpoint", str(checkpoint), "--shapes", "2x5", *extra])
        runs[bool(extra)] = exit_info.value.code, capsys.readouterr().out
    code, out = runs[False]
    assert code == 1 and out.splitlines()[-1].startswith("FAILED: max abs error")
    assert ("warning: this model is quantized (int8-dynamic): its outputs differ from PyTorch's float32 by the "
            "quantization, so the float tolerance (0.0001) fails it") in out
    code, out = runs[True]  # a tolerance of the user's own: judged by it, nothing to explain
    assert code in (0, None) and "warning" not in out and out.splitlines()[-1].startswith("PASSED")


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic", "int4"])
def test_quantizers_are_pre_processed_and_log_no_onnxruntime_hints(topk, text_file, tmp_path, caplog, mode):
    """onnxruntime's quantize_static and quantize_dynamic ask for pre-processing, and 16-bit Q/DQ and n-bit
    ops warn about the opset-21 upgrade; quantize does the first (shape inference) and reports the second,
    so neither reaches the log."""
    import logging

    calibration = {"calibration": text_file} if mode == "int8" else {}
    with caplog.at_level(logging.WARNING):
        result = quantize(topk.output, tmp_path / "q.onnx", mode=mode, latency_runs=0, perplexity=False,
                          **calibration)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "pre-processing" in m or "opset" in m], messages
    assert "opset 20 -> 21" in result.render()
    assert not list(tmp_path.glob("*prepared*")) and not list(tmp_path.glob(".q.onnx.*"))  # staging cleaned up


def test_quantizing_leaves_a_fresh_processs_logging_alone(topk, tmp_path):
    """In a process that configured no logging (as the CLI runs), quantizing in every mode leaves the root logger
    at its WARNING level and writes no library INFO line to stderr (onnxruntime's n-bit quantizer module configures the root
    logger at INFO when imported; then onnx_ir's passes printed their INFO records)."""
    script = (
        "import logging, sys\n"
        "from moeport.quant import quantize\n"
        "for mode in ('int8-blocks', 'int4', 'int8-dynamic', 'int8-blocks'):\n"
        "    quantize(sys.argv[1], f'{sys.argv[2]}/{mode}.onnx', mode=mode, latency_runs=0, perplexity=False,"
        " force=True)\n"
        "root = logging.getLogger()\n"
        "print(logging.getLevelName(root.level))\n")
    done = subprocess.run([sys.executable, "-c", script, str(topk.output), str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    # (onnxruntime's quantizer also calls logging.info() itself, which adds a WARNING-level stderr handler)
    assert done.stdout.split() == ["WARNING"]
    assert "[INFO]" not in done.stderr and "Removed" not in done.stderr, done.stderr


def test_log_filter_is_removed_and_only_drops_its_message(caplog):
    import logging

    root = logging.getLogger()
    filters = list(root.filters)
    with caplog.at_level(logging.WARNING), apply.without_log_message("natively"):
        logging.warning("does not support 16-bit integer quantization natively")
        logging.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    assert root.filters == filters


def test_int8_dynamic_down_activations_int8(quantized):
    result = quantized("int8-dynamic", down_activations="int8")
    model = onnx.load(result.output)
    experts = _experts(model)
    assert len(experts) == 32 and {n.op_type for n in experts} <= {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert result.scheme.down_activation_type is None
    # standard ONNX ops only: no onnxruntime contrib operator for the head or the embedding either
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}


def test_fp16_streams_the_weights_into_what_the_converter_writes_in_memory(topk, tmp_path):
    """run_fp16 converts on the graph without its weights, then streams them; the file must be the one
    onnxruntime's converter makes with every weight in memory: same nodes, same value types, same tensors (the
    router's weights kept float32, the rest float16)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    source = tmp_path / "source.onnx"
    model = onnx.load(str(topk.output))
    # every tensor external (a small sample's weights would otherwise stay inline and not take the streamed path)
    onnx.save_model(model, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="source.onnx.data", size_threshold=0)
    router = set(find_routers(model).nodes)
    job = apply.QuantJob(source=source, output=tmp_path / "fp16.onnx", targets=[], exclude=router, experts=set(),
                         down=set(), bits=16)
    apply.run_fp16(job)
    in_memory = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, disable_shape_infer=True,
                                         op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=sorted(router))
    streamed = onnx.load(str(job.output))
    assert [(n.op_type, list(n.input), list(n.output)) for n in streamed.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in in_memory.graph.node]
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    written = {t.name: onnx.numpy_helper.to_array(t) for t in streamed.graph.initializer}
    assert written.keys() == expected.keys()
    for name, values in expected.items():
        assert written[name].dtype == values.dtype and np.array_equal(written[name], values), name
    assert {a.dtype for a in written.values()} >= {np.dtype(np.float16), np.dtype(np.float32)}
    graph_only = onnx.load(str(job.output), load_external_data=False).graph
    assert all(t.data_location == TensorProto.EXTERNAL for t in graph_only.initializer)
    assert {(v.name, str(v.type)) for v in streamed.graph.value_info} == {
        (v.name, str(v.type)) for v in in_memory.graph.value_info}


def test_fp16_keeps_io_and_router_float32(quantized):
    result = quantized("fp16")
    model = onnx.load(result.output)
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64), value.name
    inits = {i.name: i for i in model.graph.initializer}
    experts = _experts(model)
    assert len(experts) == 32 and all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in experts)
    router = find_routers(model)
    gates = [n for n in model.graph.node if n.name in set(router.nodes) and n.op_type in ("Gemm", "MatMul")]
    producers = _producers(model)
    # the converter feeds blocked nodes through a Cast(to=float32) even when the initializer stays float32
    weights = [producers[n.input[1]].input[0] if n.input[1] in producers else n.input[1] for n in gates]
    assert len(gates) == 2 and all(inits[w].data_type == TensorProto.FLOAT for w in weights)
    assert result.router_kept_float["TopK"] == 2 and result.router_kept_float["Softmax"] == 2
    assert result.casts_added > 0
    # random router logits have near-ties; fp16 may flip one of 32 tokens
    assert result.quality.parity.routing_agreement >= 0.95 and result.quality.parity.argmax_agreement == 1.0
    assert result.quality.size_ratio < 0.6


def test_fp16_for_a_cpu_says_the_cpu_runs_it_as_float32(quantized, topk, tmp_path):
    """onnxruntime's CPU provider (1.32 on x86) has no float16 MatMul kernel: it casts a float16 file back to float32
    (at granite-3.0-1b-a400m size: decode 0.77x fp32's, fp32's memory). The report says so for a CPU target, and not
    the small-model note that blames block-quantized kernels; a GPU target gets no such note. ``moeport inspect``'s
    placement counts the Casts onnxruntime inserted for it."""
    result = quantized("fp16")
    said = [note for note in result.quality.notes if "no float16 MatMul kernel" in note]
    assert bool(said) == (not cpu_has_float16_matmul())
    if platform.machine() in ("x86_64", "AMD64"):
        assert said and said[0].startswith(f"for target cpu: onnxruntime's CPU provider on this machine "
                                           f"({platform.machine()}) has no float16 MatMul kernel")
    assert "block-quantized" not in result.render()
    gpu = quantize(topk.output, tmp_path / "cuda.onnx", mode="fp16", target="cuda", latency_runs=0, perplexity=False)
    assert not [note for note in gpu.quality.notes if "float16 MatMul" in note]
    # what inspect's placement shows of it: the Casts onnxruntime put in, counted apart
    feeds = contract.random_inputs(topk.info, 1, 8, seed=0)
    placement = measure_placement(result.output, feeds, resolve_provider("cpu"))
    assert (placement.inserted_casts > 0) == (not cpu_has_float16_matmul())
    assert placement.inserted_casts <= dict(placement.counts).get(("Cast", "CPUExecutionProvider"), 0)
    assert (f"{placement.inserted_casts} of the Casts were inserted by onnxruntime" in placement.render()) == bool(
        placement.inserted_casts)
    assert measure_placement(topk.output, feeds, resolve_provider("cpu")).inserted_casts == 0  # the float32 file


def _block_sizes(nodes) -> set[int]:
    return {onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "block_size"}


def _attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _bits(nodes) -> set[int]:
    return {_attributes(n)["bits"] for n in nodes}


def test_int4_fuses_each_layers_experts_into_one_qmoe(quantized):
    """The default int4: each MoE layer's experts are one QMoE node, with the same numbers as per-expert
    MatMulNBits (the parity and perplexity targets hold, see test_quality_targets...)."""
    fused, apart = quantized("int4"), quantized("int4", fused_experts=False)
    model = onnx.load(fused.output)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    # attention (per layer: q, k and v stacked into one, o) + lm_head
    assert ops.count("QMoE") == 2 and ops.count("MatMulNBits") == 5 and not _experts(model)
    qmoe = next(n for n in model.graph.node if n.op_type == "QMoE")
    assert {k: v for k, v in _attributes(qmoe).items() if k in ("k", "expert_weight_bits", "block_size",
                                                                 "normalize_routing_weights")} == {
        "k": 2, "expert_weight_bits": 4, "block_size": 64, "normalize_routing_weights": 0}
    assert fused.layout.describe().startswith("expert weights one QMoE per layer, 4-bit blocks of 64")
    assert fused.quality.parity.routing_agreement == apart.quality.parity.routing_agreement
    assert abs(fused.quality.perplexity_after - apart.quality.perplexity_after) < 1e-3 * apart.quality.perplexity_after


def test_int4_routes_in_qmoe_where_the_router_is_a_top_k_softmax(exported, text_file, tmp_path, monkeypatch):
    """Exported without routing outputs, the sample's router (Softmax -> TopK -> renormalised: the softmax of the
    top-k logits) is QMoE's own routing: QMoE reads the gate's logits, and the TopK, the Softmax and the tensors
    that hand QMoE the router's choice are gone. Same numbers and same experts as those tensors give, and the
    report still compares routing with fp32 (experts picked from the kernel's router_probs by its rule)."""
    source = exported("topk").output
    inside = quantize(source, tmp_path / "inside.onnx", mode="int4", heldout=text_file, latency_runs=0)
    monkeypatch.setattr(importlib.import_module("moeport.quant.passes"), "_top_k_softmax_logits", lambda *_: None)
    generic = quantize(source, tmp_path / "generic.onnx", mode="int4", heldout=text_file, latency_runs=0)
    ops = [[n.op_type for n in onnx.load(r.output).graph.node] for r in (inside, generic)]
    assert ops[0].count("QMoE") == 2 and "TopK" not in ops[0] and "ScatterElements" not in ops[0]
    assert ops[1].count("QMoE") == 2 and ops[1].count("TopK") == 2 and ops[1].count("ScatterElements") == 4
    assert len(ops[1]) - len(ops[0]) == 2 * 13  # a layer's Softmax, TopK, ReduceSum, Div and the nine
    note = next(r.note for r in inside.passes if r.name == "FuseExpertsPass")
    assert note.endswith("; 2 of them route in the kernel (their routers are a top-k softmax)")
    routers = find_routers(onnx.load(inside.output)).routers
    assert [(r.selection, r.indices_output) for r in routers] == [("moeport_qmoe_0", ""), ("moeport_qmoe_1", "")]
    assert inside.router_kept_float.get("QMoE") == 2 and "TopK" not in inside.router_kept_float
    assert "QMoE 2: QMoE's own top-k and softmax over the float32 logits" in inside.render()

    names = [r.indices_output for r in find_routers(onnx.load(source)).routers]
    ids = np.random.default_rng(3).integers(0, 256, (3, 40))  # not the export's shapes
    (logits_inside, experts_inside), (logits_generic, experts_generic) = (
        RouterSession(r.output, names).run(ids) for r in (inside, generic))
    np.testing.assert_allclose(logits_inside, logits_generic, atol=1e-5)
    assert len(experts_inside) == 2
    for a, b in zip(experts_inside, experts_generic):
        np.testing.assert_array_equal(np.sort(a, -1), np.sort(b, -1))
    assert inside.quality.heldout_routing == generic.quality.heldout_routing
    assert min(inside.quality.heldout_routing.values()) > 0.9


def _expert_marking_qmoe(experts: int, k: int, hidden: int = 32, inter: int = 16, block: int = 16) -> onnx.ModelProto:
    """A QMoE over ``x [n, hidden]`` and ``router_probs [n, experts]`` whose experts' weights are all zero and whose
    expert e adds ``e_e`` (its down-projection bias), so ``y[:, :experts]`` is nonzero exactly at the experts the
    kernel chose."""
    zero = np.uint8(128)  # 8-bit symmetric blocks: 128 is 0
    bias = np.zeros((experts, hidden), np.float32)
    bias[np.arange(experts), np.arange(experts)] = 1.0
    weights = {"w1": np.full((experts, 2 * inter, hidden), zero),
               "s1": np.ones((experts, 2 * inter, hidden // block), np.float32),
               "w2": np.full((experts, hidden, inter), zero),
               "s2": np.ones((experts, hidden, inter // block), np.float32), "b2": bias}
    node = onnx.helper.make_node("QMoE", ["x", "p", "w1", "s1", "", "w2", "s2", "b2"], ["y"], domain="com.microsoft",
                                 k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                                 activation_beta=0.0, normalize_routing_weights=0, expert_weight_bits=8,
                                 block_size=block)
    graph = onnx.helper.make_graph(
        [node], "qmoe_ties", [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", hidden]),
                              onnx.helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", experts])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", hidden])],
        [onnx.numpy_helper.from_array(array, name) for name, array in weights.items()])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                        onnx.helper.make_opsetid("com.microsoft", 1)])


def test_top_k_as_qmoe_picks_what_the_qmoe_kernel_picks():
    """The quality report reads an in-kernel router's experts with top_k_as_qmoe; it must agree with onnxruntime's
    QMoE kernel where scores tie (the kernel keeps the higher index; TopK would keep the lower)."""
    scores = np.array([[0.1, 0.7, 0.7, 0.2], [0.5, 0.5, 0.5, 0.5], [3, 3, 1, 3], [0, 0, 0, 0], [0.2, 0.1, 0.9, 0.3]],
                      dtype=np.float32)
    rows, experts = scores.shape
    model = _expert_marking_qmoe(experts, 2)
    hidden = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    marked = session.run(None, {"x": np.zeros((rows, hidden), np.float32), "p": scores})[0][:, :experts]
    chosen_by_kernel = [sorted(np.flatnonzero(row).tolist()) for row in marked]
    assert chosen_by_kernel == [[1, 2], [2, 3], [1, 3], [2, 3], [2, 3]]
    picked = top_k_as_qmoe(scores, 2)
    assert [sorted(row) for row in picked.tolist()] == chosen_by_kernel
    np.testing.assert_array_equal(picked[:2], [[2, 1], [3, 2]])  # largest first


def test_expert_block_size_defaults_by_width(quantized):
    """Without --block-size, int4's experts are 4-bit blocks of 256 and int8-blocks' 8-bit blocks of 128, halved to
    the sample's expert input widths (64) (schemes.DEFAULT_EXPERT_BLOCK_SIZES); the embedding has its own blocks
    of 32 (--embedding-block-size); a given size is used as given."""
    for mode, options, expected, table in (("int4", {}, 64, 32), ("int8-blocks", {}, 64, 32),
                                           ("int4", {"block_size": 32}, 32, 32),
                                           ("int8-blocks", {"embedding_block_size": 16}, 64, 16)):
        result = quantized(mode, **options)
        model = onnx.load(result.output)
        experts = [n for n in model.graph.node if n.op_type == "QMoE"]
        embedding = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
        assert len(experts) == 2 and _block_sizes(experts) == {expected}, (mode, options)
        assert len(embedding) == 1 and _block_sizes(embedding) == {table}, (mode, options)
        assert (result.layout.expert_block_size, result.layout.embedding_block_size) == (expected, table)
        layout = json.loads(model.metadata_props[-1].value)["nbits_layout"]
        assert (layout["expert_block_size"], layout["embedding_block_size"]) == (expected, table)
        bits = 4 if mode == "int4" else 8
        assert layout["expert_bits"] == bits
        assert result.layout.describe().startswith(f"expert weights one QMoE per layer, {bits}-bit blocks of {expected}")


def test_default_block_sizes():
    """The default expert block is halved until it divides every expert input width and the embedding's rows, so small
    models' experts still fuse; a given size is kept (and refused later if it does not divide)."""
    default = NBitsLayout(None, 32, 8)
    assert default.resolved_for(4, {1024, 512}, {1024}).expert_block_size == 256
    assert default.resolved_for(4, {1024, 384}, {1024}).expert_block_size == 128
    assert default.resolved_for(4, {1024, 512}, {1024}, on_cpu=False).expert_block_size == 128  # cuda: unmeasured
    assert default.resolved_for(4, {1024, 192}, {1024}).expert_block_size == 64
    assert default.resolved_for(4, {32, 64}, {1024}).expert_block_size == 32
    assert default.resolved_for(4, {48}, {1024}).expert_block_size == 16
    # nothing fits: the smallest (the pass then says why it left the experts)
    assert default.resolved_for(4, {40}, {1024}).expert_block_size == 16
    assert default.resolved_for(8, {1024, 512}, {1024}).expert_block_size == 128
    assert default.resolved_for(8, {1024, 512}, {1024}).embedding_block_size == 32  # no table widths: the default
    assert default.resolved_for(4, {1024}, {1024}, {48}).embedding_block_size == 16  # fitted to the table's rows
    assert default.resolved_for(4, set(), set()).expert_block_size == 256
    assert NBitsLayout(128, 32, 8).resolved_for(4, {32}, {32}).expert_block_size == 128
    # the other MatMuls: 128 where they are 8-bit in a 4-bit mode, 64 for 4-bit attention with 8-bit key/value
    # projections and lm_head, else 32, fitted to their widths; a given size stays
    unset = NBitsLayout(None, None, 8)
    assert unset.resolved_for(4, {1024}, {1024, 512}).dense_block_size == 128
    assert unset.resolved_for(4, {1024}, {1024, 64}).dense_block_size == 64
    assert replace(unset, dense_bits=4).resolved_for(4, {1024}, {1024}).dense_block_size == 64
    assert replace(unset, dense_bits=4, kv_projection_bits=4).resolved_for(4, {1024}, {1024}).dense_block_size == 32
    # the lm_head: the mode's width unless given; 128 when 8-bit, 32 when 4-bit (fitted to the widths too); a given
    # size stays
    int4 = unset.resolved_for(4, {1024}, {1024})
    assert (int4.head_bits, int4.dense_block_size, int4.head_block_size) == (4, 128, 32)
    int8 = unset.resolved_for(8, {1024}, {1024})
    assert (int8.head_bits, int8.dense_block_size, int8.head_block_size) == (8, 32, 128)
    assert unset.resolved_for(8, {1024}, {1024, 64}).head_block_size == 64
    assert replace(unset, head_bits=8).resolved_for(4, {1024}, {1024}).head_block_size == 128
    assert unset.resolved_for(4, {1024}, {1024, 16}).head_block_size == 16
    assert replace(unset, head_block_size=64).resolved_for(4, {1024}, {1024}).head_block_size == 64
    assert unset.resolved_for(8, {1024}, {1024}).dense_block_size == 32
    assert default.resolved_for(4, {1024}, {64}).dense_block_size == 32


def test_int4_matmulnbits_for_experts(quantized):
    result = quantized("int4", block_size=32, fused_experts=False)
    model = onnx.load(result.output)
    onnx.checker.check_model(model, full_check=True)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # each expert's gate and up are one MatMul in the export; StackProjectionsPass stacks each layer's q, k and v
    # (they read the normed hidden states): 2 layers x 8 experts x (gate and up, down) + 2 x (q, k and v, o) + the
    # lm_head
    assert len(nbits) == 37, [n.name for n in nbits]
    experts = _experts(model)
    assert len(experts) == 32 and all(n.op_type == "MatMulNBits" for n in experts)
    assert len([n for n in nbits if n.name.endswith("_stacked")]) == 2
    # experts: 4-bit blocks of --block-size; attention: 8-bit blocks of the dense block size (int4's default for
    # 8-bit ones: 128, halved to 64, the sample's hidden width); the lm_head (the 256-byte vocabulary): 4-bit blocks
    # of 32, int4's default
    dense = [n for n in nbits if n not in experts]
    head = [n for n in dense if _attributes(n)["N"] == 256]
    attention = [n for n in dense if n not in head]
    assert _block_sizes(experts) == {32} and _block_sizes(attention) == {64} and _block_sizes(head) == {32}
    assert _bits(experts) == {4} and _bits(attention) == {8} and len(head) == 1 and _bits(head) == {4}
    # every MatMulNBits runs the int8-activation kernels (accuracy_level 4)
    assert {onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "accuracy_level"} == {4}
    gates = [n for n in model.graph.node if n.name in set(find_routers(model).nodes) and n.op_type in ("Gemm", "MatMul")]
    assert len(gates) == 2  # the router gates stay float Gemm/MatMul
    # the embedding table in 8-bit blocks of --block-size: GatherBlockQuantized over uint8 with a scale per block
    inits = {i.name: i for i in model.graph.initializer}
    embedding = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(embedding) == 1 and not [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                                        and len(inits[n.input[0]].dims) == 2]
    table, scales = (inits[name] for name in (embedding[0].input[0], embedding[0].input[2]))
    assert table.data_type == TensorProto.UINT8 and list(scales.dims) == [table.dims[0], table.dims[1] // 32]
    assert _attributes(embedding[0]) == {"bits": 8, "block_size": 32, "gather_axis": 0, "quantize_axis": 1}
    assert result.layout.describe() == ("expert weights 4-bit blocks of 32, other MatMuls 8-bit blocks of 64 "
                                        "(key/value projections 8-bit, lm_head 4-bit blocks of 32), "
                                        "embedding 8-bit blocks of 32")
    # the graph passes around the quantizer, each with what it did or why it did nothing
    assert [p.name for p in result.passes] == [
        "InlineSmallTensorsPass", "ClearMetadataAndDocStringPass", "UntieTransposedWeightPass", "GemmAsMatMulPass",
        "RemoveUnusedNodesPass", "ShapeInferencePass", "MarkPreProcessedPass", "GatherBlockQuantizedPass",
        "RemoveUnusedNodesPass", "StackProjectionsPass", "RemoveUnusedNodesPass", "StampQuantizationPass",
        "TopologicalSortPass"]
    assert all(p.note for p in result.passes) and "graph passes: InlineSmallTensorsPass" in result.render()
    # the report lists the ops quantize wrote as counts of nodes (Casts, which rewrites also drop, on their own)
    lines = result.render().splitlines()
    written = next(line for line in lines if line.startswith("nodes quantized:")).split("; ops written: ")[1]
    assert written.startswith("MatMulNBits ") and "Cast" not in written and "-" not in written, written
    router_line = next(line for line in lines if line.startswith("router kept float32:"))
    assert router_line.endswith(f"casts removed: {-result.casts_added}" if result.casts_added < 0
                                else f"casts added: {result.casts_added}")
    assert result.quality.weights_ratio < 0.2


def test_int4_layout_options(quantized):
    result = quantized("int4", block_size=64, dense_block_size=16, embedding_bits=4, dense_bits=4, head_bits=4,
                       head_block_size=32, kv_projection_bits=4, fused_experts=False)
    model = onnx.load(result.output)
    experts = _experts(model)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    head = [n for n in nbits if n.output[0] in {o.name for o in model.graph.output}]
    dense = [n for n in nbits if n not in experts and n not in head]
    assert len(head) == 1 and _block_sizes(head) == {32}
    assert _block_sizes(experts) == {64} and _block_sizes(dense) == {16} and _bits(nbits) == {4}
    embedding = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(embedding) == 1 and _attributes(embedding[0]).get("bits", 4) == 4  # 4: the default
    assert json.loads(model.metadata_props[-1].value)["nbits_layout"] == {
        "expert_block_size": 64, "dense_block_size": 16, "embedding_bits": 4, "dense_bits": 4, "fused_experts": False,
        "head_bits": 4, "kv_projection_bits": 4, "embedding_block_size": 32, "expert_bits": 4, "head_block_size": 32}


def _feeds_second_operand_of_a_float_matmul(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """Whether ``node``'s output reaches, through anything but a MatMul-like node, the second operand of a MatMul
    between two activations (attention's keys in ``q @ k^T``, values in ``probs @ v``)."""
    inits = {i.name for i in model.graph.initializer}
    users: dict[str, list] = {}
    for user in model.graph.node:
        for index, name in enumerate(user.input):
            users.setdefault(name, []).append((user, index))
    seen, frontier = set(), list(node.output)
    while frontier:
        for user, index in users.get(frontier.pop(), []):
            if user.op_type == "MatMul" and not inits & set(user.input):
                if index == 1:
                    return True
            elif user.op_type not in ("MatMul", "MatMulNBits", "Gemm", "QMoE", "Softmax") and user.name not in seen:
                seen.add(user.name)
                frontier.extend(user.output)
    return False


def test_int4_4bit_attention_keeps_key_and_value_projections_8bit(quantized):
    """--dense-bits 4: queries and output projections 4-bit, keys and values 8-bit (what routing is sensitive to),
    in the default block of 64 for that layout (the sample's hidden width); the lm_head int4's 4-bit blocks of 32."""
    result = quantized("int4", dense_bits=4, fused_experts=False)
    model = onnx.load(result.output)
    experts = _experts(model)
    dense = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n not in experts]
    vocab = max(_attributes(n)["N"] for n in dense)  # the lm_head's output width (the sample's 256 bytes)
    head = [n for n in dense if _attributes(n)["N"] == vocab]
    attention = [n for n in dense if n not in head]
    # 2 layers x q, o and k, v stacked into one (StackProjectionsPass: same input, same layout)
    assert len(head) == 1 and _bits(head) == {4} and len(attention) == 6
    keys_values = [n for n in attention if _feeds_second_operand_of_a_float_matmul(model, n)]
    assert len(keys_values) == 2 and _bits(keys_values) == {8}
    assert all(n.name.endswith("_stacked") and [c.op_type for c in model.graph.node if n.output[0] in c.input]
               == ["Split"] for n in keys_values)
    assert _bits(n for n in attention if n not in keys_values) == {4}
    assert _block_sizes(attention) == {64} and _block_sizes(head) == {32}
    assert result.layout.describe() == ("expert weights 4-bit blocks of 64, other MatMuls 4-bit blocks of 64 "
                                        "(key/value projections 8-bit, lm_head 4-bit blocks of 32), "
                                        "embedding 8-bit blocks of 32")


def _assert_same_outputs(model, expected_model, tolerance: float) -> None:
    """Both ONNX files give the same outputs (within ``tolerance``) on seeded ids [2, 24]."""
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 24), dtype=np.int64)
    got, want = (ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
                 for m in (model, expected_model))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


@pytest.fixture(scope="module")
def topk_external(topk, tmp_path_factory):
    """The topk export re-saved with every tensor in external data (``model.onnx.data``), as a big model is."""
    path = tmp_path_factory.mktemp("external") / "model.onnx"
    onnx.save(onnx.load(topk.output), str(path), save_as_external_data=True, size_threshold=0,
              location="model.onnx.data")
    return path


@pytest.mark.parametrize("mode", [m.name for m in modes()])
def test_models_with_external_data_stream_through_every_mode(topk, topk_external, text_file, tmp_path, mode):
    """Weights in external data (any model over 2 GB): the output keeps its weights in ``<out>.data``, passes
    the checker by path, and computes what the quantized in-memory model computes."""
    options = dict(mode=mode, latency_runs=0, perplexity=False)
    options.update({"calibration": text_file} if mode == "int8" else {})
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    inline = quantize(topk.output, tmp_path / "a" / "q.onnx", **options)
    external = quantize(topk_external, tmp_path / "b" / "q.onnx", **options)
    out = external.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.onnx.data"]  # no scratch left behind
    assert sorted(p.name for p in inline.output.parent.iterdir()) == ["q.onnx"]  # a one-file input stays one file
    # full_check infers shapes too; onnxruntime's float16 converter leaves value_info types that inference
    # disagrees with (as it did before the output had external data; onnxruntime runs the file).
    onnx.checker.check_model(str(out), full_check=mode != "fp16")
    # most weight bytes are in the data file (tensors up to 1 KiB, such as this tiny model's scales, stay inline)
    assert (tmp_path / "b" / "q.onnx.data").stat().st_size > 0.5 * external.quality.weights_after
    assert external.quantized_nodes == inline.quantized_nodes and external.output_ops == inline.output_ops
    assert external.router_kept_float == inline.router_kept_float
    assert external.quality.weights_after == inline.quality.weights_after
    _assert_same_outputs(external.output, inline.output, tolerance=1e-5)


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8"])
def test_quantizing_in_parts_changes_nothing(topk, text_file, tmp_path, monkeypatch, mode):
    """The dynamic and static quantizers are given the model in parts and the results are spliced back: the same
    graph and outputs as in one piece."""
    options = dict(mode=mode, latency_runs=0, perplexity=False)
    if mode == "int8":
        options["calibration"] = text_file
    whole = quantize(topk.output, tmp_path / "whole.onnx", **options)
    monkeypatch.setattr(apply, "PART_BYTES", 1)  # one part per activation and its readers
    parts = quantize(topk.output, tmp_path / "parts.onnx", **options)
    assert parts.output_ops == whole.output_ops and parts.quality.weights_after == whole.quality.weights_after
    _assert_same_outputs(parts.output, whole.output, tolerance=0.0)


def test_every_registered_mode_is_exercised(quantized):
    for mode in modes():
        assert quantized(mode.name).output.is_file()


def test_cli_choices_come_from_the_registries():
    from moeport import cli_quant
    from moeport.quant import TARGETS

    choices = {p.name: p.type.choices for p in cli_quant.quantize_cmd.params if hasattr(p.type, "choices")}
    assert choices["mode"] == tuple(m.name for m in modes())
    assert list(choices["target"]) == TARGETS.names() == ["cpu", "cuda", "arm", "nnapi", "coreml", "qnn"]
    assert {target.default_mode for target in TARGETS.values()} <= {m.name for m in modes()}  # every default is a mode
    assert choices["down_activations"] == schemes.DOWN_ACTIVATIONS
    assert choices["activations"] == schemes.ACTIVATIONS


def test_mode_registry_validates():
    with pytest.raises(ValueError, match="already registered"):
        register_mode(get_mode("int8"))
    with pytest.raises(ValueError, match="kind must be one of"):
        register_mode(QuantMode("int3", "magic", "", False, 0.1, 0.9, 0.1))
    with pytest.raises(ValueError, match="only static quantization needs calibration"):
        register_mode(QuantMode("int8-x", "dynamic", "", True, 0.3, 0.9, 0.1))
    with pytest.raises(MoeportError, match="unknown quantization mode 'int9'; choose one of int8, int8-dynamic"):
        get_mode("int9")


def test_a_new_mode_is_one_registration(topk, tmp_path, monkeypatch):
    """A mode carries its apply step: reusing a registered step takes its kind's name; nothing else changes."""
    monkeypatch.setattr(modes_module, "_MODES", modes_module._MODES.copy())
    mode = register_mode(QuantMode("int8-wide", "nbits", "8-bit block weights", False, 0.40, 0.95, 0.05, bits=8))
    assert mode.step is get_mode("int4").step and get_mode("int8-wide") is mode
    result = quantize(topk.output, tmp_path / "b.onnx", mode="int8-wide", latency_runs=0, perplexity=False)
    graph = onnx.load(result.output).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    qmoe = [n for n in graph.node if n.op_type == "QMoE"]
    assert len(nbits) == 5 and {_attributes(n)["bits"] for n in nbits} == {8}  # attention (q, k, v stacked), lm_head
    assert len(qmoe) == 2 and {_attributes(n)["expert_weight_bits"] for n in qmoe} == {8}  # the experts
    assert result.to_dict()["mode"]["kind"] == "nbits"


def test_mode_registry_validates_steps(monkeypatch):
    monkeypatch.setattr(modes_module, "_MODES", modes_module._MODES.copy())
    with pytest.raises(ValueError, match=r"kind must be one of \('qdq_static', 'dynamic', 'fp16', 'nbits'\)"):
        register_mode(QuantMode("int3", "magic", "", False, 0.1, 0.9, 0.1))
    with pytest.raises(ValueError, match="kind 'nbits' must name its step 'fp16'"):
        register_mode(QuantMode("int3", "nbits", "", False, 0.1, 0.9, 0.1, step=get_mode("fp16").step))
    with pytest.raises(ValueError, match="kind 'nbits' already names another registered step"):
        register_mode(QuantMode("int3", "nbits", "", False, 0.1, 0.9, 0.1, step=ApplyStep("nbits", lambda job: None)))
    with pytest.raises(ValueError, match="run must be a function"):
        ApplyStep("nbits2", None)
    with pytest.raises(ValueError, match=r"mode 'int3': its step runs on \['tpu'\], which are not quantization "
                                         r"targets \(cpu, cuda, arm, nnapi, coreml, qnn\)"):
        register_mode(QuantMode("int3", "blocks3", "", False, 0.1, 0.9, 0.1,
                                step=ApplyStep("blocks3", lambda job: None, targets=("cpu", "tpu"))))
    assert "int3" not in [m.name for m in modes()]


def test_schemes_follow_cpu_and_target(tmp_path):
    no_vnni = choose_scheme("cpu", machine="x86_64", flags={"avx2", "fma"})
    assert no_vnni.reduce_range and no_vnni.weight_type == "QInt8"
    vnni = choose_scheme("cpu", machine="x86_64", flags={"avx2", "avx512_vnni"})
    assert not vnni.reduce_range and "avx512_vnni" in vnni.reason
    assert not choose_scheme("cpu", machine="aarch64").reduce_range
    assert choose_scheme("nnapi").weight_type == "QUInt8" and not choose_scheme("nnapi").per_channel
    assert choose_scheme("cuda").symmetric_activations
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx_vnni\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx_vnni"}
    with pytest.raises(MoeportError, match="unknown target 'tpu'"):
        choose_scheme("tpu")


def test_int8_dynamic_fuses_experts_only_where_its_inputs_stay_float():
    """QMoE for int8-dynamic's experts where the target runs onnxruntime's CPU kernels (float inputs into 8-bit
    blocks), not where the mode keeps standard ops (other targets, or --down-activations int8)."""
    def dynamic(target: str, down: str = "auto"):
        return choose_scheme(target).with_down_activations(down, target, schemes.DYNAMIC_DOWN)

    for target in ("cpu", "arm"):
        assert dynamic(target).with_fused_experts(True).expert_block_size == schemes.DEFAULT_EXPERT_BLOCK_SIZES[8]
        assert dynamic(target).with_fused_experts(False).expert_block_size is None
        assert dynamic(target, "int8").with_fused_experts(True).expert_block_size is None
    for target in ("cuda", "nnapi", "coreml", "qnn"):
        assert dynamic(target).with_fused_experts(True).expert_block_size is None


def test_starvation_threshold():
    assert starvation_threshold(1600, 8) == 20.0


def test_random_calibration_warns(topk, tmp_path):
    with pytest.warns(UserWarning, match="calibrating on random tokens"):
        result = quantize(topk.output, tmp_path / "r.onnx", mode="int8", random_calibration=True,
                          calibration_samples=4, latency_runs=0, perplexity=False)
    assert result.calibration["source"] == "random" and result.calibration["tokens"] == 4 * 128


def test_starved_experts_warn(topk, tmp_path):
    """Experts that calibration starved: warned about, and given their layer's range, where the experts are
    quantized per expert at calibrated ranges (``fused_experts=False``). The CPU default's QMoE reads its float
    input, so there the coverage is reported but nothing is said of ranges."""
    ids = np.zeros((2, 8), dtype=np.int64)  # one repeated byte: a few experts get every token
    np.savez(tmp_path / "same.npz", input_ids=ids)
    with warnings.catch_warnings(record=True) as fused_caught:
        warnings.simplefilter("always")
        fused = quantize(topk.output, tmp_path / "f.onnx", mode="int8", calibration=tmp_path / "same.npz",
                         latency_runs=0, perplexity=False)
    assert fused.calibration["coverage"][0]["starved"] and fused.scheme.expert_block_size
    assert not [w for w in fused_caught if "range" in str(w.message)] and not fused.warnings
    # no range was borrowed for an expert that went into a QMoE, and the report does not say so
    assert fused.calibration["borrowed_ranges"] == 0 and "use their layer's range" not in fused.render()
    with pytest.warns(UserWarning) as caught:  # every warning, so none leaks into the run's summary
        result = quantize(topk.output, tmp_path / "s.onnx", mode="int8", calibration=tmp_path / "same.npz",
                          latency_runs=0, perplexity=False, fused_experts=False)
    messages = [str(warning.message) for warning in caught]
    for layer in (0, 1):
        assert any(re.search(rf"experts \[.*\] of layer {layer} got under 10% of an even share", m) for m in messages)
    assert any("use their layer's activation range" in m for m in messages)
    assert result.calibration["coverage"][0]["starved"] and result.calibration["borrowed_ranges"] > 0
    assert f"{result.calibration['borrowed_ranges']} starved expert inputs use their layer's range" in result.render()
    # onnxruntime would give an expert that saw no token scale 1.0 / zero point 0 (negative inputs -> 0)
    model = onnx.load(result.output)
    producers = _producers(model)
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    expert_inputs = [producers[n.input[0]] for n in _experts(model)]
    assert len(expert_inputs) == 32 and all(float(scales[dq.input[1]]) < 0.5 for dq in expert_inputs)


def test_range_warnings_only_for_layers_left_per_expert():
    """When some layers' experts went into a QMoE and others stayed per expert, the starved-expert warnings and
    the borrowed-range count cover only the experts whose inputs the written file still reads."""
    calibrated = core._Calibrated(
        data=None, report={}, overrides={}, warnings=[], observed=None,
        starved=[("experts [1] of layer 0 starved", frozenset({"x0.e1", "x0.e2"})),
                 ("experts [2] of layer 1 starved", frozenset({"x1.e1", "x1.e2"}))],
        borrowed=frozenset({"x0.e1", "x1.e1", "x1.e2"}))
    per_expert = [onnx.helper.make_node("MatMul", [name, "w"], [f"y.{name}"]) for name in ("x1.e1", "x1.e2")]
    written = onnx.helper.make_model(onnx.helper.make_graph(per_expert, "layer 1 per expert", [], []))
    assert calibrated.about_ranges(written) == ([
        "experts [2] of layer 1 starved",
        "2 expert input tensors saw too few calibration tokens; they use their layer's activation range instead of "
        "their own"], 2)


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: np.savez(d / "c.npz", tokens=np.zeros((2, 8), dtype=np.int64)),
     "does not fit the model: it has arrays ['tokens'], the model needs ['input_ids']"),
    (lambda d: np.savez(d / "c.npz", input_ids=np.full((2, 8), 300, dtype=np.int64)),
     "does not fit the model: 'input_ids' holds ids in [300, 300] but the vocabulary has 256 tokens"),
    (lambda d: np.savez(d / "c.npz", input_ids=np.zeros((2, 8), dtype=np.float32)),
     "array 'input_ids' is float32 [2, 8], expected integer token ids [samples, seq]"),
])
def test_calibration_that_does_not_fit(topk, tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(MoeportError) as info:
        quantize(topk.output, tmp_path / "o.onnx", mode="int8", calibration=tmp_path / "c.npz", latency_runs=0)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o.onnx").exists()


def test_a_report_that_fails_leaves_no_output(topk, tmp_path, monkeypatch):
    """The measurement runs after the file is written: when it fails, the file and its weights go too."""
    from moeport.quant import quality

    def fail(*args, **kwargs):
        raise RuntimeError("latency run failed")

    monkeypatch.setattr(quality, "latency_ms", fail)
    with pytest.raises(RuntimeError, match="latency run failed"):
        quantize(topk.output, tmp_path / "o.onnx", mode="int4", latency_runs=1, perplexity=False)
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_tokenizer_is_reported_before_the_model_is_quantized(topk, tmp_path, monkeypatch):
    """A --tokenizer folder without tokenizer.json (a sentencepiece-only checkpoint) is a user error raised before
    the quantizer runs: at granite-3.0-1b-a400m size it came after a minute of work and 8 GB of memory."""
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "tokenizer.model").write_bytes(b"sentencepiece")

    def never(*args, **kwargs):
        raise AssertionError("the model was quantized before the tokenizer was read")

    monkeypatch.setattr(core, "_write", never)
    with pytest.raises(MoeportError, match=r"no tokenizer.json in .*tok \(it has tokenizer_config.json, "
                                           r"tokenizer.model; re-save"):
        quantize(topk.output, tmp_path / "o.onnx", mode="fp16", tokenizer=folder, latency_runs=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def _block_size_error(label: str, size: int) -> str:
    return re.escape(f"{label} must be a power of two from 16 to 256 (onnxruntime's block kernels), got {size}")


def test_user_errors(topk, tmp_path, monkeypatch):
    cases = [
        (dict(model=tmp_path / "none.onnx", mode="int8"), "model file not found"),
        (dict(mode="fp16", calibration="x.txt"), "mode fp16 uses no calibration data"),
        (dict(mode="int4", block_size=24), _block_size_error("block size", 24)),
        (dict(mode="int4", block_size=512), _block_size_error("block size", 512)),
        (dict(mode="int4", dense_block_size=8), _block_size_error("dense block size", 8)),
        (dict(mode="int4", head_block_size=48), _block_size_error("head block size", 48)),
        (dict(mode="int8-blocks", embedding_block_size=24), _block_size_error("embedding block size", 24)),
        (dict(mode="int4", embedding_bits=2), "embedding bits must be 4 or 8, got 2"),
        (dict(mode="int4", dense_bits=2), "dense bits must be 4 or 8, got 2"),
        (dict(mode="int4", head_bits=3), "head bits must be 4 or 8, got 3"),
        (dict(mode="int4", kv_projection_bits=2), "key/value projection bits must be 4 or 8, got 2"),
        (dict(mode="int4", target="nnapi"), re.escape("mode int4 writes onnxruntime contrib operators (MatMulNBits, "
                                                      "QMoE, GatherBlockQuantized) that target nnapi cannot run; use "
                                                      "one of int8, int8-dynamic, fp16 (int4 runs on: cpu, arm, cuda)")),
        (dict(mode="int8", calibration=tmp_path / "missing.txt"), "calibration file not found"),
        (dict(mode="int8", target="tpu"), "unknown target 'tpu'"),
        (dict(mode="int8", target="nnapi", down_activations="int16"), "target nnapi cannot run int16 down-projection"),
        (dict(mode="int8", down_activations="float"), "--down-activations float does not apply to int8 \\(static\\)"),
        (dict(mode="int8-dynamic", down_activations="int16"), "--down-activations int16 does not apply to int8-dynamic"),
        (dict(mode="int8", down_activations="int4"), "unknown down-projection activation width 'int4'"),
        (dict(mode="fp16", down_activations="int16"), "--down-activations applies to int8"),
        (dict(mode="int8", down_activations="int8"), re.escape(
            "--down-activations int8 does not apply when every activation is int16 (--activations int16, the "
            "default for cpu and arm); add --activations int8 to choose it")),
        (dict(mode="int8", target="nnapi", activations="int16"), "target nnapi cannot run int16 activations"),
        (dict(mode="int8", activations="int4"), "unknown activation width 'int4'"),
        (dict(mode="int8-dynamic", activations="int16"), "--activations applies to int8, not int8-dynamic"),
    ]
    for options, message in cases:
        model = options.pop("model", topk.output)
        with pytest.raises(MoeportError, match=message):
            quantize(model, tmp_path / "o.onnx", latency_runs=0, **options)
    monkeypatch.setattr(core, "bundled_text", lambda name: None)
    with pytest.raises(MoeportError, match="int8 needs calibration data: pass --calibration FILE"):
        quantize(topk.output, tmp_path / "o.onnx", mode="int8", latency_runs=0)
    (tmp_path / "exists.onnx").write_bytes(b"")
    with pytest.raises(MoeportError, match="already exists; pass --force"):
        quantize(topk.output, tmp_path / "exists.onnx", mode="fp16", latency_runs=0)


def test_cli(topk, tmp_path, capsys, sample_checkpoint):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(topk.output), "-o", str(tmp_path / "a.onnx"), "--mode", "int9"])
    assert exit_info.value.code == 2
    assert "Invalid value for '--mode'" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", tokens=np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(topk.output), "-o", str(tmp_path / "a.onnx"), "--calibration", str(tmp_path / "bad.npz")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: calibration file") and err.count("\n") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as exit_info:
            main(["quantize", str(topk.output), "-o", str(tmp_path / "f.onnx"), "--mode", "fp16", "--json",
                  "--latency-runs", "0", "--no-perplexity", "--checkpoint", str(sample_checkpoint("topk"))])
    assert exit_info.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"]["name"] == "fp16" and data["quality"]["parity"]["routing_agreement"] >= 0.95
    assert data["targets_met"]["routing"] is True


def test_perplexity_reads_at_most_heldout_tokens_in_evenly_spaced_windows(topk, tmp_path, capsys):
    from moeport.quant import quality as qual

    ids = np.arange(10 * qual.PPL_WINDOW + 7)
    assert qual.heldout_windows(ids, max_tokens=None).shape == (10, qual.PPL_WINDOW)
    four = qual.heldout_windows(ids, max_tokens=4 * qual.PPL_WINDOW + 100)
    assert [row[0] // qual.PPL_WINDOW for row in four] == [0, 3, 6, 9]  # first and last window kept
    assert len(qual.heldout_windows(ids, max_tokens=1)) == 1
    with pytest.raises(MoeportError, match="the held-out text has 7 tokens, fewer than one window of 256"):
        qual.heldout_windows(ids[:7])

    text = tmp_path / "heldout.txt"
    text.write_bytes(TEXT)  # byte-level model: one token a byte
    windows = len(TEXT) // qual.PPL_WINDOW
    assert windows > 3
    capped = quantize(topk.output, tmp_path / "capped.onnx", mode="fp16", heldout=text, heldout_tokens=768,
                      latency_runs=0)
    whole = quantize(topk.output, tmp_path / "whole.onnx", mode="fp16", heldout=text, heldout_tokens=0,
                     latency_runs=0)
    assert capped.quality.heldout_tokens == 3 * (qual.PPL_WINDOW - 1)
    assert whole.quality.heldout_tokens == windows * (qual.PPL_WINDOW - 1)
    assert capped.quality.heldout_text_tokens == whole.quality.heldout_text_tokens == len(TEXT)
    assert f"perplexity read 768 of the held-out text's {len(TEXT)} tokens, in evenly spaced windows of 256 " \
           "(--heldout-tokens to read more)" in capped.quality.notes
    assert not any("perplexity read" in note for note in whole.quality.notes)
    # The default reads the trained sample's whole held-out file, so its figures do not change.
    assert qual.PPL_MAX_TOKENS >= (TRAINED_DIR / "heldout.txt").stat().st_size
    with pytest.raises(MoeportError, match="heldout tokens 100: perplexity reads windows of 256 tokens; give at "
                                           "least 256, or 0 for the whole text"):
        quantize(topk.output, tmp_path / "few.onnx", mode="fp16", heldout=text, heldout_tokens=100)
    with pytest.raises(MoeportError, match="heldout tokens -1: "):
        quantize(topk.output, tmp_path / "few.onnx", mode="fp16", heldout=text, heldout_tokens=-1)
    assert not (tmp_path / "few.onnx").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(topk.output), "-o", str(tmp_path / "few.onnx"), "--mode", "fp16", "--heldout-tokens",
              "100"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: heldout tokens 100") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"[default: {qual.PPL_MAX_TOKENS}]" in help_text  # the help states the library's default


def test_calibration_sources(tmp_path):
    from moeport.quant.calibration import load_calibration
    from moeport.runtime._io import TensorSpec

    IDS_ONLY = [TensorSpec("input_ids", "int64", ("batch", "sequence"))]

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "import os"}\n\n{"text": "x = 1"}\n', encoding="utf-8")
    data = load_calibration(jsonl, inputs=IDS_ONLY, vocab_size=256, samples=3, seq=4)
    assert [s["input_ids"].shape for s in data.samples] == [(1, 4)] * 3
    assert bytes(data.samples[0]["input_ids"][0].astype("uint8")) == b"impo"
    text = tmp_path / "c.txt"
    text.write_bytes(TEXT)
    windows = load_calibration(text, inputs=IDS_ONLY, vocab_size=256, samples=5, seq=32).samples
    assert len(windows) == 5 and windows[-1]["input_ids"][0, -1] == TEXT[-1]  # evenly spaced, to the end
    with pytest.raises(MoeportError, match="needs a tokenizer: the model's vocabulary is 32000 .not bytes. and no "
                                           "tokenizer was found; give a directory holding one .--checkpoint, "
                                           "--tokenizer., or a .npz of token ids"):
        load_calibration(text, inputs=IDS_ONLY, vocab_size=32000, samples=1)
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n', encoding="utf-8")
    with pytest.raises(MoeportError, match=r"bad.jsonl:1 has no string \"text\" field"):
        load_calibration(tmp_path / "bad.jsonl", inputs=IDS_ONLY, vocab_size=256, samples=1)


def _tiny_mixtral_checkpoint(tmp_path):
    """A seeded 2-layer Mixtral (vocab 128, 4 experts top-2) saved with save_pretrained, and its char tokenizer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=256)
    checkpoint = tmp_path / "mixtral"
    transformers.MixtralForCausalLM(config).eval().save_pretrained(checkpoint)
    return checkpoint, save_char_tokenizer(checkpoint)


def test_text_calibration_uses_the_checkpoints_tokenizer(tmp_path):
    """A transformers checkpoint with a tokenizer: calibration and perplexity text go through it, and the
    graph's attention_mask is fed alongside the ids."""
    checkpoint, tokenizer = _tiny_mixtral_checkpoint(tmp_path)
    model = export_checkpoint(checkpoint, tmp_path / "m.onnx", with_routing=True).output
    text = tmp_path / "calib.txt"
    text.write_bytes(TEXT)
    # Without the checkpoint there is no tokenizer, and a 128-token vocabulary is not bytes.
    with pytest.raises(MoeportError, match="needs a tokenizer: the model's vocabulary is 128"):
        quantize(model, tmp_path / "x.onnx", mode="int8", calibration=text, latency_runs=0, perplexity=False)
    result = quantize(model, tmp_path / "q.onnx", mode="int8", calibration=text, calibration_samples=4,
                      reference=CheckpointReference.load(checkpoint), tokenizer=checkpoint, heldout=text,
                      latency_runs=0)
    calibration = result.calibration
    assert calibration["source"] == f"{text} (tokenizer of {checkpoint})"
    assert calibration["tokens"] == 4 * 128 and sum(calibration["coverage"][0]["counts"]) == 4 * 128 * 2
    q = result.quality
    expected_tokens = (len(tokenizer.encode(TEXT.decode(), add_special_tokens=False)) // 256) * 255
    assert q.heldout_tokens == expected_tokens > 0 and q.perplexity_after > 1
    assert q.parity is not None and q.parity.routing_agreement is not None


def test_a_shared_buffer_export_is_calibrated_and_measured_like_its_concat_export(tmp_path, monkeypatch):
    """Text calibration and held-out perplexity start a with-past graph from the empty cache its own specs give:
    a shared-buffer export (``--kv-cache shared --fused-attention``, whose GroupQueryAttention checks the cache's
    kv_heads even when it is empty) is calibrated and measured exactly as the Concat export of the same
    checkpoint. Before, every mode failed on it in onnxruntime as soon as it had held-out text."""
    checkpoint, _ = _tiny_mixtral_checkpoint(tmp_path)
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    results = {}
    for kv_cache in ("concat", "shared"):
        model = export_checkpoint(checkpoint, tmp_path / f"{kv_cache}.onnx", task="text-generation-with-past",
                                  kv_cache=kv_cache, fused_attention=kv_cache == "shared", validate=False).output
        for mode in ("int8", "int4"):
            results[kv_cache, mode] = quantize(
                model, tmp_path / f"{kv_cache}-{mode}.onnx", mode=mode, tokenizer=checkpoint, heldout=text,
                latency_runs=0, **({"calibration": text, "calibration_samples": 4} if mode == "int8" else {}))
    concat, shared = results["concat", "int8"], results["shared", "int8"]
    assert shared.calibration["tokens"] == concat.calibration["tokens"] == 4 * 128
    assert shared.calibration["coverage"] == concat.calibration["coverage"]  # the same experts saw the same tokens
    for mode in ("int8", "int4"):
        concat, shared = results["concat", mode].quality, results["shared", mode].quality
        assert shared.heldout_tokens == concat.heldout_tokens > 0
        assert shared.perplexity_before == pytest.approx(concat.perplexity_before, rel=1e-6)
        assert shared.perplexity_after == pytest.approx(concat.perplexity_after, rel=1e-4)
    # A large vocabulary runs fewer windows at a time (bounded logits); the figures are the same.
    from moeport.quant import quality as qual
    from moeport.runtime.tokenizer import load_tokenizer

    ids = load_tokenizer(checkpoint).encode_bytes(TEXT)
    shared_int4 = results["shared", "int4"]
    by_eight = qual.heldout_quality(tmp_path / "shared.onnx", shared_int4.output, ids)
    monkeypatch.setattr(qual, "PPL_LOGITS_BYTES", 1)
    one_by_one = qual.heldout_quality(tmp_path / "shared.onnx", shared_int4.output, ids)
    assert ids.size // qual.PPL_WINDOW > 1 and one_by_one[2] == by_eight[2]
    assert one_by_one[:2] == pytest.approx(by_eight[:2], rel=1e-6)
    assert one_by_one[0] == pytest.approx(shared_int4.quality.perplexity_before, rel=1e-6)


def test_random_calibration_feeds_every_input_a_text_window_would(tmp_path):
    """--random-calibration on a Hugging Face export (input_ids and attention_mask) and on its with-past export:
    random ids fed as text would be, not refused for having more than one input."""
    checkpoint, _ = _tiny_mixtral_checkpoint(tmp_path)
    for task in ("logits", "text-generation-with-past"):
        model = export_checkpoint(checkpoint, tmp_path / f"{task}.onnx", task=task, validate=False).output
        with pytest.warns(UserWarning, match="calibrating on random tokens"):
            result = quantize(model, tmp_path / f"{task}-int8.onnx", mode="int8", random_calibration=True,
                              calibration_samples=3, latency_runs=0, perplexity=False)
        assert result.calibration["source"] == "random" and result.calibration["tokens"] == 3 * 128
        assert sum(result.calibration["coverage"][0]["counts"]) == 3 * 128 * 2  # top-2 of every token


def test_a_hybrid_with_past_export_is_calibrated_and_measured_from_text(tmp_path):
    """A hybrid's with-past graph also takes recurrent states (fixed shapes its specs give): its prefill from token
    ids starts them at zeros, as transformers does, so text calibrates it and measures its perplexity -- the same
    perplexity as its logits-only export's. Before, token ids alone were refused for such a graph."""
    import hf_families

    checkpoint = tmp_path / "granitemoehybrid"
    hf_families.random_model("granitemoehybrid").save_pretrained(checkpoint)
    save_char_tokenizer(checkpoint)
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    measured = {}
    for task in ("logits", "text-generation-with-past"):
        model = export_checkpoint(checkpoint, tmp_path / f"{task}.onnx", task=task, validate=False).output
        measured[task] = quantize(model, tmp_path / f"{task}-int8.onnx", mode="int8", calibration=text,
                                  calibration_samples=4, tokenizer=checkpoint, heldout=text, latency_runs=0)
    logits_only, with_past = measured["logits"], measured["text-generation-with-past"]
    assert with_past.calibration["tokens"] == 4 * 128
    assert with_past.calibration["coverage"] == logits_only.calibration["coverage"]
    assert with_past.quality.heldout_tokens == logits_only.quality.heldout_tokens > 0
    assert with_past.quality.perplexity_before == pytest.approx(logits_only.quality.perplexity_before, rel=1e-5)


@pytest.fixture(scope="module")
def trained_export(exported):
    """The bundled trained sample (a copy of ``TRAINED_DIR``), exported with its routing outputs: the run's shared
    export, which tests/test_export.py verifies."""
    return exported("trained", with_routing=True)


@pytest.mark.parametrize("mode", ["int4", "int8-blocks"])
def test_block_modes_meet_their_targets_on_the_trained_sample(trained_export, tmp_path, mode):
    """The trained sample's size, routing-agreement and perplexity targets hold for the block modes (experts
    fused into QMoE), measured against the PyTorch checkpoint on held-out text."""
    source = trained_export
    result = quantize(source.output, tmp_path / "q.onnx", mode=mode, reference=CheckpointReference.load(TRAINED_DIR),
                      latency_runs=0)
    assert result.output_ops["QMoE"] == len(source.info.layers)
    assert result.targets_met() == {"size": True, "routing": True, "perplexity": True}, result.render()


def test_lm_head_blocks_go_to_the_lm_head_only_when_other_weights_are_as_wide(trained_export, tmp_path):
    """The trained sample's vocabulary (256 bytes) is as wide as its experts' gate and up (128 x 256). Only the
    MatMul that makes the logits is the lm_head: per-expert int4 keeps every expert in the experts' blocks (those
    gate and up products had gone into the lm_head's 4-bit blocks of 32)."""
    source = trained_export
    result = quantize(source.output, tmp_path / "q.onnx", mode="int4", fused_experts=False, latency_runs=0,
                      perplexity=False)
    model = onnx.load(result.output)
    experts = _experts(model)
    head = _producers(model)["logits"]
    assert head.op_type == "MatMulNBits" and _attributes(head)["N"] == source.info.vocab_size
    assert len(experts) == 2 * 8 * len(source.info.layers) and _bits(experts) == {4}
    assert _block_sizes(experts) == {result.layout.expert_block_size} == {128}
    assert _block_sizes([head]) == {result.layout.head_block_size} == {32}


@pytest.mark.parametrize(("target", "float_outputs"), [("cpu", True), ("nnapi", False)])
def test_int8_keeps_matmul_outputs_and_logits_float_on_cpu_targets(quantized, topk, target, float_outputs):
    """onnxruntime's static quantizer quantizes the output of every MatMul it quantizes. On its CPU provider that
    kept the 16-bit-input down projections from any kernel (their weights were dequantized at every run), and put
    the logits on an 8-bit grid with one scale (most of the mode's error; BENCHMARKS.md). For CPU targets the
    outputs stay float (``FloatOutputsPass``); NNAPI runs a QDQ node group on the accelerator only with its output
    quantized, so there they stay 8-bit."""
    result = quantized("int8", target=target)
    model = onnx.load(result.output)
    onnx.checker.check_model(model, full_check=True)
    producers = _producers(model)
    # QDQ MatMuls; on CPU targets MatMulNBits over 8-bit blocks (16-bit activations, BlockWeightsPass)
    quantized_matmuls = [n for n in model.graph.node if n.op_type == "MatMulNBits" or (
        n.op_type == "MatMul" and n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear")]
    readers = {n.name: {r.op_type for r in model.graph.node if n.output[0] in r.input} for n in quantized_matmuls}
    head = producers["logits"]
    while head.op_type not in ("MatMul", "MatMulNBits"):  # back through scale factors and the logits' own Q/DQ
        head = producers[head.input[0]]
    record = [r for r in result.passes if r.name == "FloatOutputsPass"]
    feeds = contract.random_inputs(topk.info, 2, 9, seed=3)
    logits = create_session(result.output).run(["logits"], feeds)[0]
    # the lm_head and 8 attention projections, on CPU targets each layer's q, k and v stacked into one
    # (StackProjectionsPass); for NNAPI also 32 experts' (gate and up as one, down), which on CPU targets are QMoE
    # nodes (test_int8_on_cpu_fuses_experts_into_qmoe)
    assert len(quantized_matmuls) == (5 if target == "cpu" else 41) and head in quantized_matmuls
    if float_outputs:
        assert not any("QuantizeLinear" in types for types in readers.values())
        assert [model.graph.output[0].name] == ["logits"] and producers["logits"] is head
        assert record[0].modified and record[0].note.startswith(  # 9: before q, k and v were stacked
            "kept the outputs of 9 MatMul(s) float (graph output logits among them)")
        assert np.unique(logits).size > 256  # not on an 8-bit grid
    else:
        assert all(types == {"QuantizeLinear"} for types in readers.values()) and not record
        assert np.unique(logits).size <= 256
