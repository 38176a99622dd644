"""Graph passes on the finished export: attention Softmax floor, shared key/value heads and RMSNorm as Div."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from moeport.exporter import passes

TINY = np.finfo(np.float32).tiny  # smallest normal float32


def attention_and_router_graph() -> onnx.ModelProto:
    """probs = Softmax(scores + mask) @ v (attention) next to Softmax(logits) -> TopK (a router)."""
    b, h, s, d, experts = 2, 3, 16, 8, 6
    inputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [b, h, s, s]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, s, s]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [b, h, s, d]),
              helper.make_tensor_value_info("logits", TensorProto.FLOAT, [s, experts])]
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [b, h, s, s]),
               helper.make_tensor_value_info("out", TensorProto.FLOAT, [b, h, s, d]),
               helper.make_tensor_value_info("top", TensorProto.INT64, [s, 2])]
    k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    nodes = [helper.make_node("Add", ["scores", "mask"], ["masked"], name="mask_add"),
             helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="attn_softmax"),
             helper.make_node("MatMul", ["probs", "v"], ["out"], name="attn_v"),
             helper.make_node("Softmax", ["logits"], ["router_probs"], axis=-1, name="router_softmax"),
             helper.make_node("TopK", ["router_probs", "k"], ["top_values", "top"], name="router_topk")]
    graph = helper.make_graph(nodes, "attention", inputs, outputs, initializer=[k])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def ort_session(model, optimized_path=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run(proto: onnx.ModelProto, feeds: dict) -> dict:
    session = ort_session(proto.SerializeToString())
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def causal_feeds(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.triu(np.full((16, 16), np.finfo(np.float32).min, np.float32), 1)[None, None]
    return {"scores": (4 * rng.standard_normal((2, 3, 16, 16))).astype(np.float32), "mask": mask,
            "v": rng.standard_normal((2, 3, 16, 8)).astype(np.float32),
            "logits": rng.standard_normal((16, 6)).astype(np.float32)}


def test_floor_touches_attention_softmax_only_and_removes_subnormals():
    before = attention_and_router_graph()
    model = ir.from_proto(before)
    floor = passes.FloorAttentionScores()
    result = floor(model)
    assert result.modified and floor.changed == 1 and floor.reason is None
    after = ir.to_proto(model)
    onnx.checker.check_model(after, full_check=True)
    producers = {out: node for node in after.graph.node for out in node.output}
    softmaxes = {node.name: node for node in after.graph.node if node.op_type == "Softmax"}
    assert producers[softmaxes["attn_softmax"].input[0]].op_type == "Max"
    assert softmaxes["router_softmax"].input[0] == "logits"  # the router is left alone

    feeds = causal_feeds()
    plain, floored = run(before, feeds), run(after, feeds)
    subnormal = lambda x: np.count_nonzero((x != 0) & (np.abs(x) < TINY))  # noqa: E731
    # Same probabilities to float32 precision, and none of them subnormal (the product with V stays fast).
    assert subnormal(floored["probs"]) == 0
    np.testing.assert_allclose(floored["probs"], plain["probs"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(floored["out"], plain["out"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(floored["top"], plain["top"])
    # masked keys stay negligible: below exp(-60) of the row's largest probability
    causal = np.triu(np.ones((16, 16), bool), 1)
    assert floored["probs"][..., causal].max() <= np.exp(-60) * 1.01


def test_floor_keeps_fully_masked_rows_as_they_were():
    """A row with every key masked (left padding) gives the same result with and without the floor."""
    before = attention_and_router_graph()
    model = ir.from_proto(before)
    passes.FloorAttentionScores()(model)
    feeds = causal_feeds(1)
    feeds["mask"] = feeds["mask"].copy()
    feeds["mask"][..., 0, :] = np.finfo(np.float32).min  # query 0 sees nothing
    np.testing.assert_allclose(run(ir.to_proto(model), feeds)["probs"], run(before, feeds)["probs"], atol=1e-7)


def grouped_query_graph(per_head_bias: bool = False, sinks: bool = False) -> onnx.ModelProto:
    """transformers' eager grouped-query attention as torch.onnx writes it: 4 query heads on 2 key/value heads,
    each repeated by ``Reshape(Expand(Unsqueeze(kv, 2), [B, 2, 2, T, D]), [B, 4, T, D])`` with the sizes read from
    the tensors (batch, query length ``s`` and key length ``t`` stay dynamic); ``per_head_bias`` adds a [1, 4, 1, 1]
    score bias per query head that broadcasts over the rows, which grouped rows cannot take as it is; ``sinks``
    appends gpt-oss's sink logit per head and row ([b, 4, s, 1]) as a last key column, dropped after the Softmax."""
    d = 8
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", 4, "s", d]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", 2, "t", d]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", 2, "t", d]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", 1, "s", "t"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 4, "s", d])]
    ints = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    initializers = [ints("axis2", [2]), ints("rep", [2]), ints("heads", [4]), ints("i0", [0]), ints("i1", [1]),
                    ints("i2", [2]), ints("i4", [4]), helper.make_tensor("scale", TensorProto.FLOAT, [], [0.35]),
                    helper.make_tensor("bias", TensorProto.FLOAT, [1, 4, 1, 1], [0.5, -1.0, 2.0, 0.0])]
    nodes = [helper.make_node("Shape", ["k"], ["kv_shape"]),
             helper.make_node("Slice", ["kv_shape", "i0", "i2"], ["batch_heads"]),
             helper.make_node("Slice", ["kv_shape", "i0", "i1"], ["batch"]),
             helper.make_node("Slice", ["kv_shape", "i2", "i4"], ["length_size"]),
             helper.make_node("Concat", ["batch_heads", "rep", "length_size"], ["expanded_shape"], axis=0),
             helper.make_node("Concat", ["batch", "heads", "length_size"], ["repeated_shape"], axis=0)]
    value_info = []
    for kv in ("k", "v"):
        nodes += [helper.make_node("Unsqueeze", [kv, "axis2"], [f"{kv}_unsqueezed"]),
                  helper.make_node("Expand", [f"{kv}_unsqueezed", "expanded_shape"], [f"{kv}_expanded"]),
                  helper.make_node("Reshape", [f"{kv}_expanded", "repeated_shape"], [f"{kv}_repeated"])]
        value_info.append(helper.make_tensor_value_info(f"{kv}_repeated", TensorProto.FLOAT, ["b", 4, "t", d]))
    nodes += [helper.make_node("Transpose", ["k_repeated"], ["k_t"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "k_t"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "mask"], ["masked"])]
    last = "masked"
    if per_head_bias:
        nodes.append(helper.make_node("Add", ["masked", "bias"], ["biased"]))
        last = "biased"
    if sinks:
        inputs.append(helper.make_tensor_value_info("sinks", TensorProto.FLOAT, ["b", 4, "s", 1]))
        initializers.append(ints("last", [-1]))
        nodes += [helper.make_node("Concat", [last, "sinks"], ["with_sinks"], axis=-1),
                  helper.make_node("Softmax", ["with_sinks"], ["probs_with_sinks"], axis=-1),
                  helper.make_node("Slice", ["probs_with_sinks", "i0", "last", "last"], ["probs"])]
    else:
        nodes.append(helper.make_node("Softmax", [last], ["probs"], axis=-1))
    nodes.append(helper.make_node("MatMul", ["probs", "v_repeated"], ["out"]))
    graph = helper.make_graph(nodes, "gqa", inputs, outputs, initializer=initializers, value_info=value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def gqa_feeds(batch: int, s: int, t: int, seed: int) -> dict:
    """Queries at the last ``s`` of ``t`` positions (a decode step when s == 1), causal mask, first key padded."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, 1, s, t), np.float32)
    mask[..., np.triu(np.ones((s, t), bool), t - s + 1)] = np.finfo(np.float32).min
    mask[0, ..., 0] = np.finfo(np.float32).min
    return {"q": rng.standard_normal((batch, 4, s, 8)).astype(np.float32),
            "k": rng.standard_normal((batch, 2, t, 8)).astype(np.float32),
            "v": rng.standard_normal((batch, 2, t, 8)).astype(np.float32), "mask": mask,
            "sinks": np.broadcast_to(rng.standard_normal((1, 4, 1, 1)), (batch, 4, s, 1)).astype(np.float32)}


@pytest.mark.parametrize("sinks", [False, True], ids=["mask", "mask-and-sinks"])
def test_shared_key_value_heads_gives_the_repeated_heads_results_without_repeating(sinks):
    before = grouped_query_graph(sinks=sinks)
    model = ir.from_proto(before)
    chosen = passes.export_passes()  # after the score floor, as in the exporter
    ir.passes.PassManager(chosen)(model)
    shared = next(p for p in chosen if isinstance(p, passes.SharedKeyValueHeads))
    assert shared.report() == {"pass": "SharedKeyValueHeads", "changed": 1, "reason": None, "left": []}
    after = ir.to_proto(model)
    onnx.checker.check_model(after, full_check=True)
    ops = [node.op_type for node in after.graph.node]
    assert not {"Expand", "Unsqueeze", "Shape"} & set(ops)  # the repeats and their shape arithmetic
    assert ops.count("Concat") == int(sinks)
    producers = {out: node for node in after.graph.node for out in node.output}
    scores, probs_values = [node for node in after.graph.node if node.op_type == "MatMul"]
    assert producers[scores.input[1]].input == ["k"] and probs_values.input[1] == "v"
    assert producers[scores.input[0]].op_type == "Reshape"  # query heads as rows of their group
    assert ops.count("Tile") == 1  # the mask's rows, once for each query head of a group
    # equal on shapes other than any seen so far: batched prefill with padding, and decode steps
    for seed, (batch, s, t) in enumerate([(2, 5, 9), (1, 1, 17), (3, 1, 4), (2, 7, 7)]):
        feeds = gqa_feeds(batch, s, t, seed)
        if not sinks:
            del feeds["sinks"]
        np.testing.assert_allclose(run(after, feeds)["out"], run(before, feeds)["out"], rtol=0, atol=1e-6)


def test_shared_key_value_heads_leaves_per_head_scores_as_they_were_and_says_why():
    before = grouped_query_graph(per_head_bias=True)
    model = ir.from_proto(before)
    shared = passes.SharedKeyValueHeads()
    assert not shared(model).modified
    assert shared.changed == 0 and len(shared.left) == 1
    assert "operand 'bias' of shape [1, 4, 1, 1] is not laid out per query position" in shared.reason
    assert ir.to_proto(model).SerializeToString() == ir.to_proto(ir.from_proto(before)).SerializeToString()


def test_a_pass_with_nothing_to_do_says_why_and_leaves_the_graph_alone():
    """The router-only part of the graph: no attention Softmax, no rsqrt, no routed Split, no node metadata."""
    proto = attention_and_router_graph()
    keep = {"router_softmax", "router_topk"}
    kept = [node for node in proto.graph.node if node.name in keep]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    del proto.graph.output[:2]
    model = ir.from_proto(proto)
    before = ir.to_proto(model).SerializeToString()
    chosen = passes.export_passes()
    result = ir.passes.PassManager(chosen)(model)
    assert not result.modified
    assert all(p.changed == 0 and p.reason for p in chosen), [p.report() for p in chosen]
    assert ir.to_proto(model).SerializeToString() == before


def test_a_broken_post_condition_names_the_pass():
    """``ensures`` is checked after the rewrite: a floor that inserted nothing before its Softmax is caught."""
    class NoFloor(passes.FloorAttentionScores):
        def rewrite(self, model):
            return 1  # claims a change, inserts nothing

    with pytest.raises(ir.passes.PostconditionError, match="NoFloor"):
        NoFloor()(ir.from_proto(attention_and_router_graph()))


def test_sample_export_has_no_reciprocal_and_onnxruntime_fuses_its_rmsnorms(exported, tmp_path):
    result = exported("topk", with_routing=True)
    reports = {p["pass"]: p for p in result.passes}
    norms = 2 * len(result.info.layers) + 1  # attention and MoE norm per block, final norm
    assert reports["ReciprocalSqrtAsDiv"]["changed"] == norms
    assert reports["FloorAttentionScores"]["changed"] == len(result.info.layers)
    # the sorted dispatch's two routed Splits per layer (the rows, then the gated rows for the down projections)
    assert reports["DropSplitNumOutputs"]["changed"] == 2 * len(result.info.layers)
    model = onnx.load(str(result.output))
    ops = [node.op_type for node in model.graph.node]
    assert "Reciprocal" not in ops
    assert ops.count("Sqrt") == norms
    # every attention Softmax (one per block) is floored; routers feed TopK unchanged
    producers = {out: node for node in model.graph.node for out in node.output}
    floored = [n for n in model.graph.node if n.op_type == "Softmax" and producers[n.input[0]].op_type == "Max"]
    assert len(floored) == len(result.info.layers)

    optimized = tmp_path / "optimized.onnx"
    ort_session(str(result.output), optimized)
    fused = [n for n in onnx.load(str(optimized)).graph.node if n.op_type == "SimplifiedLayerNormalization"]
    assert len(fused) == norms


def test_sample_export_masks_attention_with_an_additive_trilu_not_a_where(exported):
    # masked_fill on the [batch, heads, seq, seq] scores exported as a Where that cost 2 ms per layer at 1x512
    model = onnx.load(str(exported("topk").output))
    ops = [node.op_type for node in model.graph.node]
    assert "Where" not in ops
    assert "Trilu" in ops
