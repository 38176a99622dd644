"""moeport.quant.passes: each graph rewrite on a small seeded model -- the outputs stay equal, the graph
changes exactly as intended, and a pass that does nothing says why."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moeport.quant.passes import (CLEAR_METADATA, METADATA_KEY, REMOVE_UNUSED, TOPOLOGICAL_SORT, GemmAsMatMulPass,
                                  QuantPass, StampQuantizationPass, node_metadata_bytes, run_passes, serialize)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((5, 8)).astype(np.float32)


def _weights(*shape: int, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes, initializers, width: int = 8) -> onnx.ModelProto:
    """x [n, 8] -> ``nodes`` -> y [n, width]."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _outputs(proto: onnx.ModelProto) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})


def _ops(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _apply(proto: onnx.ModelProto, passes: list[QuantPass]):
    model = ir.from_proto(proto)
    records = run_passes(model, passes)
    after = serialize(model)
    np.testing.assert_allclose(_outputs(after)[0], _outputs(proto)[0], rtol=1e-5, atol=1e-5)
    return after, records


def _gemms() -> onnx.ModelProto:
    """x [n, 8] -> g1 (transB, bias) -> g2 (no bias) -> g3 (alpha 2) -> g4 -> y [n, 4]."""
    return _model([
        helper.make_node("Gemm", ["x", "w1", "c1"], ["h1"], name="g1", transB=1),
        helper.make_node("Gemm", ["h1", "w2"], ["h2"], name="g2"),
        helper.make_node("Gemm", ["h2", "w3"], ["h3"], name="g3", alpha=2.0),
        helper.make_node("Gemm", ["h3", "w4"], ["y"], name="g4"),
    ], [_weights(16, 8, name="w1"), _weights(16, name="c1"), _weights(16, 4, name="w2"), _weights(4, 4, name="w3"),
        _weights(4, 4, name="w4")], width=4)


def test_gemm_as_matmul_rewrites_the_named_plain_gemms():
    before = _gemms()
    after, records = _apply(before, [GemmAsMatMulPass({"g1", "g2", "g3"}), REMOVE_UNUSED])
    onnx.checker.check_model(after, full_check=True)
    assert _ops(before) == {"Gemm": 4}
    assert _ops(after) == {"MatMul": 2, "Add": 1, "Gemm": 2}  # g1 -> MatMul + Add, g2 -> MatMul; g3, g4 stay
    nodes = {n.name: n for n in after.graph.node}
    assert nodes["g1"].op_type == "MatMul" and nodes["g2"].op_type == "MatMul" and nodes["g3"].op_type == "Gemm"
    inits = {i.name: list(i.dims) for i in after.graph.initializer}
    assert inits == {"w1_kn": [8, 16], "c1": [16], "w2": [16, 4], "w3": [4, 4], "w4": [4, 4]}  # w1 [16, 8] is gone
    assert [(r.name, r.modified) for r in records] == [("GemmAsMatMulPass", True), ("RemoveUnusedNodesPass", True)]
    assert records[0].note == "rewrote 2 Gemm as MatMul; left as Gemm: g3 (alpha or beta is not 1)"


def test_gemm_as_matmul_keeps_a_graph_output_name():
    before = _model([helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transB=1)], [_weights(4, 8, name="w")], width=4)
    after, _ = _apply(before, [GemmAsMatMulPass({"g"}), REMOVE_UNUSED])
    assert _ops(after) == {"MatMul": 1} and [o.name for o in after.graph.output] == ["y"]


@pytest.mark.parametrize(("names", "note"), [(set(), "no Gemm among the nodes to quantize"),
                                             ({"g3"}, "no named Gemm in the plain form; left as Gemm: g3 (alpha or "
                                                      "beta is not 1)")])
def test_gemm_as_matmul_says_why_it_did_nothing(names, note):
    before = _gemms()
    after, records = _apply(before, [GemmAsMatMulPass(names), REMOVE_UNUSED])
    assert _ops(after) == _ops(before) == {"Gemm": 4}
    assert [(r.modified, r.note) for r in records] == [(False, note), (False, "every node and initializer is used")]


def test_clear_metadata_drops_node_metadata_and_doc_strings():
    before = _model([helper.make_node("Relu", ["x"], ["y"], name="r", doc_string="from torch")], [])
    before.graph.node[0].metadata_props.add(key="pkg.torch.onnx.stack_trace", value="File model.py, line 1" * 20)
    assert node_metadata_bytes(before) > 400
    after, records = _apply(before, [CLEAR_METADATA])
    assert _ops(after) == _ops(before) == {"Relu": 1}
    assert node_metadata_bytes(after) == 0 and not after.graph.node[0].doc_string
    assert records[0].modified and records[0].note == "dropped node and graph metadata and doc strings"
    _, again = _apply(after, [CLEAR_METADATA])
    assert not again[0].modified and again[0].note == "no node or graph carried metadata or a doc string"


def test_remove_unused_drops_dead_nodes():
    before = _model([helper.make_node("Relu", ["x"], ["y"], name="r"),
                     helper.make_node("MatMul", ["x", "w"], ["dead"], name="m")], [_weights(8, 4, name="w")])
    after, records = _apply(before, [REMOVE_UNUSED])
    assert _ops(before) == {"Relu": 1, "MatMul": 1} and _ops(after) == {"Relu": 1}
    assert not after.graph.initializer and records[0].modified


def test_topological_sort_orders_nodes():
    before = _model([helper.make_node("Neg", ["h"], ["y"], name="second"),
                     helper.make_node("Relu", ["x"], ["h"], name="first")], [])
    after, records = _apply(before, [TOPOLOGICAL_SORT])
    assert [n.name for n in after.graph.node] == ["first", "second"] and _ops(after) == _ops(before)
    assert records[0].modified and records[0].note == "put the nodes in topological order"
    onnx.checker.check_model(after, full_check=True)
    _, again = _apply(after, [TOPOLOGICAL_SORT])
    assert not again[0].modified and again[0].note == "the nodes were already in topological order"


def test_stamp_carries_metadata_and_records_the_quantization_last():
    before = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [])
    source = {"moeport.family": "moeport_lm", "moeport.with_routing": "true", "other.tool": "x"}
    after, records = _apply(before, [StampQuantizationPass(source, {"mode": "int8"})])
    assert _ops(after) == {"Relu": 1}
    props = [(p.key, p.value) for p in after.metadata_props]
    assert dict(props) == {**source, METADATA_KEY: '{"mode": "int8"}'}
    assert props[-1][0] == METADATA_KEY and json.loads(props[-1][1]) == {"mode": "int8"}
    assert records[0].note == "carried 3 metadata keys over; recorded the quantization"


def test_a_failing_pass_is_named():
    class Broken(QuantPass):
        def call(self, model):
            raise RuntimeError("boom")

    with pytest.raises(ir.passes.PassError, match="quantize pass Broken failed"):
        run_passes(ir.from_proto(_gemms()), [TOPOLOGICAL_SORT, Broken()])
