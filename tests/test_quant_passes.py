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

from moeport.quant.passes import (CLEAR_METADATA, METADATA_KEY, REMOVE_UNUSED, SHAPE_INFERENCE, TOPOLOGICAL_SORT,
                                  BlockWeightsPass, GemmAsMatMulPass, InlineSmallTensorsPass, MarkPreProcessedPass,
                                  QuantPass, SplicePass, StackProjectionsPass, StampQuantizationPass,
                                  UntieTransposedWeightPass, _block_quantize, node_metadata_bytes, run_passes, save_model,
                                  serialize)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((5, 8)).astype(np.float32)


def _weights(*shape: int, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes, initializers, width: int = 8) -> onnx.ModelProto:
    """x [n, 8] -> ``nodes`` -> y [n, width]."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _outputs(model: onnx.ModelProto | str) -> list[np.ndarray]:
    """Run a model (in memory, or a file with its external data) on ``X``."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": X})


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
    before = _model([helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transB=1)], [_weights(4, 8, name="w")],
                    width=4)
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


def _tied() -> onnx.ModelProto:
    """x [n, 8] -> lm: MatMul(x, Transpose(table)) [n, 16] -> back: MatMul(., table) -> y [n, 8]; ``table`` [16, 8]
    read twice, as a tied embedding is (Gather and lm_head)."""
    return _model([helper.make_node("Transpose", ["table"], ["table_t"], name="t", perm=[1, 0]),
                   helper.make_node("MatMul", ["x", "table_t"], ["h"], name="lm"),
                   helper.make_node("MatMul", ["h", "table"], ["y"], name="back")], [_weights(16, 8, name="table")])


def test_untie_gives_the_named_matmul_its_own_transposed_weight():
    before = _tied()
    after, records = _apply(before, [UntieTransposedWeightPass({"lm"}), REMOVE_UNUSED])
    onnx.checker.check_model(after, full_check=True)
    assert _ops(after) == {"MatMul": 2}  # the Transpose is gone
    nodes = {n.name: list(n.input) for n in after.graph.node}
    assert nodes == {"lm": ["x", "table_kn"], "back": ["h", "table"]}
    inits = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}
    np.testing.assert_array_equal(inits["table_kn"], inits["table"].T)
    assert records[0].note == "gave 1 MatMul over a transposed initializer its own [K, N] weight (table)"


@pytest.mark.parametrize(("names", "note"), [({"back"}, "no MatMul to quantize reads a transposed initializer"),
                                             (set(), "no MatMul to quantize reads a transposed initializer")])
def test_untie_says_why_it_did_nothing(names, note):
    before = _tied()
    after, records = _apply(before, [UntieTransposedWeightPass(names)])
    assert _ops(after) == _ops(before) and [(r.modified, r.note) for r in records] == [(False, note)]


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


def _reshaping() -> onnx.ModelProto:
    """x [n, 8] -> MatMul w [8, 12] -> Reshape to [-1, 4] (shape from an initializer) -> Relu -> Reshape back."""
    shapes = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for v, n in (([-1, 4], "s1"), ([-1, 12], "s2"))]
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="m"),
                   helper.make_node("Reshape", ["h", "s1"], ["r"], name="r1"),
                   helper.make_node("Relu", ["r"], ["a"], name="relu"),
                   helper.make_node("Reshape", ["a", "s2"], ["y"], name="r2")], [_weights(8, 12, name="w"), *shapes],
                  width=12)


def test_inline_small_tensors_reads_them_from_external_data(tmp_path):
    before = _reshaping()
    expected = _outputs(before)[0]
    onnx.save(before, str(tmp_path / "m.onnx"), save_as_external_data=True, size_threshold=0, location="m.onnx.data")
    model = ir.load(tmp_path / "m.onnx")
    records = run_passes(model, [InlineSmallTensorsPass(limit=64)])
    external = {v.name for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}
    assert external == {"w"} and records[0].note == "read 2 tensors of at most 64 bytes in from external data"
    save_model(model, tmp_path / "out.onnx", external_data=True)
    after = onnx.load(str(tmp_path / "out.onnx"))
    assert _ops(after) == _ops(before) == {"MatMul": 1, "Reshape": 2, "Relu": 1}
    np.testing.assert_allclose(_outputs(str(tmp_path / "out.onnx"))[0], expected, rtol=1e-6)
    again = run_passes(ir.from_proto(_reshaping()), [InlineSmallTensorsPass(limit=64)])
    assert not again[0].modified and again[0].note == "no tensor of at most 64 bytes is stored in external data"


def test_shape_inference_records_types_and_the_pre_processing_mark():
    before = _reshaping()
    after, records = _apply(before, [SHAPE_INFERENCE, MarkPreProcessedPass()])
    assert _ops(after) == _ops(before)
    typed = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in after.graph.value_info}
    assert typed["h"][1:] == [12] and typed["r"][1:] == [4] and not before.graph.value_info
    assert [r.modified for r in records] == [True, True]
    assert {p.key: p.value for p in after.metadata_props}.get("onnx.quant.pre_process") == "onnxruntime.quant"
    _, again = _apply(after, [SHAPE_INFERENCE, MarkPreProcessedPass()])
    assert [(r.modified, r.note) for r in again] == [
        (False, "shape inference added nothing (or failed; onnx_ir logs why)"),
        (False, "already marked as pre-processed")]


@pytest.mark.parametrize("external", [True, False])
def test_save_model_writes_external_data_or_one_file(tmp_path, external):
    source, before = tmp_path / "src.onnx", _reshaping()
    expected = _outputs(before)[0]
    onnx.save(before, str(source), save_as_external_data=True, size_threshold=0, location="src.onnx.data")
    save_model(ir.load(source), tmp_path / "out.onnx", external_data=external)
    assert (tmp_path / "out.onnx.data").exists() is external
    np.testing.assert_allclose(_outputs(str(tmp_path / "out.onnx"))[0], expected, rtol=1e-6)


def test_splice_replaces_nodes_with_a_graph():
    weights = _weights(8, 8, name="w")
    before = _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="m"),
                     helper.make_node("Relu", ["h"], ["y"], name="r")], [weights])
    # the same product another way: MatMul by a copy of w, plus zero; reads x, writes h
    copy = numpy_helper.from_array(numpy_helper.to_array(weights), "w2")
    zero = numpy_helper.from_array(np.zeros(8, np.float32), "zero")
    part = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w2"], ["p"], name="m2"),
         helper.make_node("Add", ["p", "zero"], ["h"], name="a")],
        "part", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", 8])], [copy, zero]),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    after, records = _apply(before, [SplicePass({"m"}, ir.from_proto(part))])
    onnx.checker.check_model(after, full_check=True)
    assert _ops(before) == {"MatMul": 1, "Relu": 1} and _ops(after) == {"MatMul": 1, "Add": 1, "Relu": 1}
    assert [n.name for n in after.graph.node] == ["m2", "a", "r"]
    assert sorted(i.name for i in after.graph.initializer) == ["w2", "zero"]  # w was read by m alone
    assert {o.domain: o.version for o in after.opset_import}["com.microsoft"] == 1
    assert records[0].note == "replaced 1 nodes with 2"
    with pytest.raises(ir.passes.PassError):
        run_passes(ir.from_proto(before), [SplicePass({"missing"}, ir.from_proto(part))])



def _nbits_node(name: str, source: str, output: str, width: int, bits: int, block_size: int, initializers: list):
    """A MatMulNBits ``source [n, 8] -> output [n, width]`` over seeded weights quantized as onnxruntime does."""
    weight = RNG.standard_normal((8, width)).astype(np.float32)
    packed, scales, zero_points = _block_quantize(weight, bits, block_size)
    blocks = -(-8 // block_size)  # K = 8 is padded to one block
    initializers += [numpy_helper.from_array(packed.reshape(width, blocks, -1), f"{name}_q"),
                     numpy_helper.from_array(scales.reshape(-1), f"{name}_scales"),
                     numpy_helper.from_array(zero_points.reshape(-1), f"{name}_zero_points")]
    return helper.make_node("MatMulNBits", [source, f"{name}_q", f"{name}_scales", f"{name}_zero_points"], [output],
                            name=name, domain="com.microsoft", K=8, N=width, bits=bits, block_size=block_size,
                            accuracy_level=4)


def _projections(layouts: list[tuple[int, int, int]]) -> onnx.ModelProto:
    """x [n, 8] -> one MatMulNBits per ``(width, bits, block_size)`` of ``layouts``, all reading x -> Concat -> y."""
    initializers: list = []
    nodes = [_nbits_node(f"p{i}", "x", f"h{i}", *layout, initializers) for i, layout in enumerate(layouts)]
    nodes.append(helper.make_node("Concat", [f"h{i}" for i in range(len(layouts))], ["y"], axis=1))
    model = _model(nodes, initializers, width=sum(width for width, _, _ in layouts))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_stack_projections_makes_one_matmulnbits_of_those_sharing_input_and_layout():
    """q, k, v-like projections (widths 8, 4, 4; one layout) become one MatMulNBits of N 16 and a Split, with the
    same outputs bit for bit; a projection in another layout stays apart."""
    before = _projections([(8, 4, 16), (4, 4, 16), (4, 4, 16), (4, 8, 16)])
    after, records = _apply(before, [StackProjectionsPass(), REMOVE_UNUSED])
    np.testing.assert_array_equal(_outputs(after)[0], _outputs(before)[0])
    assert records[0].note == "stacked 3 MatMulNBits that share their input into 1"
    nbits = [n for n in after.graph.node if n.op_type == "MatMulNBits"]
    stacked = next(n for n in nbits if n.name == "p0_stacked")
    assert len(nbits) == 2 and helper.get_attribute_value(next(a for a in stacked.attribute if a.name == "N")) == 16
    split = next(n for n in after.graph.node if n.op_type == "Split")
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert split.input[0] == stacked.output[0] and list(inits[split.input[1]]) == [8, 4, 4]
    assert list(split.output) == ["h0", "h1", "h2"]  # the projections' own value names
    old = {f"p{i}_{part}" for i in range(3) for part in ("q", "scales", "zero_points")}
    assert not old & set(inits) and "p3_q" in inits  # the stacked nodes' weights are gone


def _qdq_projections(zero_points: list[int]) -> onnx.ModelProto:
    """Static int8's form on CPU targets: x [n, 8] -> per projection its own 16-bit QuantizeLinear ->
    DequantizeLinear pair (zero point ``zero_points[i]``) -> MatMulNBits (width 4, 8-bit blocks of 16) whose
    scales are float16 behind a Cast -> Concat -> y."""
    initializers: list = []
    nodes = []
    for i, zero_point in enumerate(zero_points):
        initializers += [numpy_helper.from_array(np.array(0.01, np.float32), f"s{i}"),
                         numpy_helper.from_array(np.array(zero_point, np.uint16), f"z{i}")]
        nodes += [helper.make_node("QuantizeLinear", ["x", f"s{i}", f"z{i}"], [f"xq{i}"]),
                  helper.make_node("DequantizeLinear", [f"xq{i}", f"s{i}", f"z{i}"], [f"xd{i}"])]
        node = _nbits_node(f"p{i}", f"xd{i}", f"h{i}", 4, 8, 16, initializers)
        scales = next(t for t in initializers if t.name == f"p{i}_scales")
        half = numpy_helper.from_array(numpy_helper.to_array(scales).astype(np.float16), f"p{i}_scales16")
        initializers[initializers.index(scales)] = half
        nodes.append(helper.make_node("Cast", [half.name], [f"p{i}_scales"], to=TensorProto.FLOAT))
        nodes.append(node)
    nodes.append(helper.make_node("Concat", [f"h{i}" for i in range(len(zero_points))], ["y"], axis=1))
    model = _model(nodes, initializers, width=4 * len(zero_points))
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return model


def test_stack_projections_sees_through_static_int8s_own_qdq_pairs_and_cast_scales():
    """Projections that each read their own Q/DQ pair of one tensor with the same constants, their scales float16
    behind a Cast (static int8 on CPU targets), are stacked too: one pair, one Cast of the stacked scales, the same
    outputs bit for bit; a projection whose pair has other constants stays apart."""
    before = _qdq_projections([32768, 32768, 32768, 30000])
    after, records = _apply(before, [StackProjectionsPass(), REMOVE_UNUSED])
    onnx.checker.check_model(after, full_check=True)
    np.testing.assert_array_equal(_outputs(after)[0], _outputs(before)[0])
    assert records[0].note == "stacked 3 MatMulNBits that share their input into 1"
    assert _ops(after) == {"QuantizeLinear": 2, "DequantizeLinear": 2, "Cast": 2, "MatMulNBits": 2, "Split": 1,
                           "Concat": 1}
    stacked = next(n for n in after.graph.node if n.name == "p0_stacked")
    producers = {o: n for n in after.graph.node for o in n.output}
    assert stacked.input[0] == "xd0" and producers[stacked.input[2]].op_type == "Cast"
    inits = {t.name: t for t in after.graph.initializer}
    assert inits[producers[stacked.input[2]].input[0]].data_type == TensorProto.FLOAT16


def test_stack_projections_says_why_it_did_nothing():
    before = _projections([(8, 4, 16), (4, 8, 16)])
    after, records = _apply(before, [StackProjectionsPass()])
    assert (records[0].modified, records[0].note) == (False, "no two MatMulNBits read the same input with the same "
                                                          "layout")
    assert _ops(after) == _ops(before)


def test_gathers_of_one_table_share_its_blocks_and_a_constant_row_is_no_embedding():
    """Two lookups in one table (ids and ids + 1) get one 8-bit block copy of it, not two initializers of one
    name; a Gather at a constant index (a bias row, as gpt-oss's are kept at real size) is not handed to the
    quantizer at all."""
    from moeport.quant.core import _weight_nodes
    from moeport.quant.passes import GatherBlockQuantizedPass

    table = RNG.standard_normal((16, 32)).astype(np.float32)
    graph = helper.make_graph([
        helper.make_node("Gather", ["table", "ids"], ["a"], name="lookup"),
        helper.make_node("Add", ["ids", "one"], ["next_ids"]),
        helper.make_node("Gather", ["table", "next_ids"], ["b"], name="lookup_next"),
        helper.make_node("Gather", ["bias", "row"], ["r"], name="bias_row"),
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Add", ["ab", "r"], ["y"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array(1, np.int64), "one"),
         _weights(4, 32, name="bias"), numpy_helper.from_array(np.array(2, np.int64), "row")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert {n.name for n in _weight_nodes(proto, set())} == {"lookup", "lookup_next"}

    model = ir.from_proto(proto)
    records = run_passes(model, [GatherBlockQuantizedPass({"lookup", "lookup_next"}, 16), REMOVE_UNUSED])
    assert records[0].note == "stored 1 table(s) read by 2 Gather(s) in 8-bit blocks of 16"
    after = serialize(model)
    assert [i.name for i in after.graph.initializer if i.name.startswith("table_")] == [
        "table_q8", "table_scales", "table_zero_points"]
    assert _ops(after)["GatherBlockQuantized"] == 2 and _ops(after)["Gather"] == 1
    ids = np.array([0, 5, 14], np.int64)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
           for m in (after, proto)]
    np.testing.assert_allclose(run[0], run[1], atol=0.05, rtol=0)  # 8-bit blocks of values of about 3


def test_block_weights_share_one_blocked_weight_between_its_matmuls(tmp_path):
    """Two MatMuls reading one int8 weight through their own DequantizeLinear (onnxruntime's static quantizer with
    DedicatedQDQPair) become two MatMulNBits over one blocked weight and one Cast of its scales (registering the
    weight twice would fail), and compute the float product to within the blocks' rounding."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 16)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    source = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "fp32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], [numpy_helper.from_array(weight, "W")]),
        opset_imports=[helper.make_opsetid("", 21)], ir_version=10), source)
    scale = np.abs(weight).max(axis=0) / 127
    codes = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    quantized = helper.make_model(helper.make_graph([
        helper.make_node("DequantizeLinear", ["W_quantized", "W_scale"], ["w1"], name="dq1", axis=1),
        helper.make_node("DequantizeLinear", ["W_quantized", "W_scale"], ["w2"], name="dq2", axis=1),
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="m1"),
        helper.make_node("MatMul", ["x", "w2"], ["m2"], name="m2"),
        helper.make_node("Add", ["m1", "m2"], ["y"]),
    ], "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(codes, "W_quantized"), numpy_helper.from_array(scale, "W_scale")]),
        opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    model = ir.from_proto(quantized)
    records = run_passes(model, [BlockWeightsPass({"m1", "m2"}, source, 32, 4), REMOVE_UNUSED])
    after = serialize(model)
    # one weight read by two MatMuls is stored once
    assert records[0].note == "rewrote 2 MatMul(s) as MatMulNBits reading 1 weight(s) stored in 8-bit blocks of 32"
    nbits = [n for n in after.graph.node if n.op_type == "MatMulNBits"]
    assert [n.name for n in nbits] == ["m1", "m2"] and nbits[0].input[1:] == nbits[1].input[1:]
    assert _ops(after) == {"Cast": 1, "MatMulNBits": 2, "Add": 1}
    assert sorted(t.name for t in after.graph.initializer) == ["W_quantized_b32", "W_quantized_b32_scale"]
    after.graph.output.append(helper.make_tensor_value_info("m1", TensorProto.FLOAT, ["n", 16]))
    y, m1 = ort.InferenceSession(after.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y, 2 * m1)  # both MatMuls compute the same product
    # the float product within 1% of its largest value: the kernel also rounds each row of x to 8 bits per block
    # (a weight transposed the wrong way, or read without the +128 offset, is off by about its whole size)
    reference = x @ weight
    assert np.abs(m1 - reference).max() <= 0.01 * np.abs(reference).max()
