"""Router protection for every family of the README's supported table that is exported on every run
(``hf_families.EVERY_RUN``): one router per MoE layer is found, and int8-dynamic and int4 leave every router's
gate, Softmax/Sigmoid and TopK (or ArgMax) in float32 while the experts are quantized.

The exports are the session's ``hf_export`` ones (tests/conftest.py), shared with tests/test_hf_families.py.
"""

from __future__ import annotations

import onnx
import pytest

pytest.importorskip("transformers")

import hf_families  # noqa: E402  (tests/, on sys.path)
from moeport.quant import quantize  # noqa: E402
from moeport.runtime.moe_graph import expert_layers, find_routers, float_router_nodes  # noqa: E402

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
