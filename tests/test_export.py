"""Export parity and graph checks for every sample and every strategy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from moeport import contract
from moeport.exporter import families
from moeport.exporter.export import export_checkpoint
from moeport.exporter.strategies import strategy_names
from moeport.runtime.session import create_session
from moeport.exporter.reference import verify_checkpoint
from moeport.samples.catalog import list_samples

from tiny_hf import save_tiny_mixtral

SAMPLES = [s.name for s in list_samples()]
MUST_SHOW_SHAPES = [(1, 1), (3, 7), (2, 64)]
STANDARD_DOMAINS = {"", "ai.onnx"}


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_exports_and_verifies(name, exported, sample_checkpoint):
    result = exported(name, with_routing=True)
    assert result.validation is not None and result.validation.passed
    report = verify_checkpoint(result.output, sample_checkpoint(name), shapes=MUST_SHOW_SHAPES)
    assert report.passed, report.render()
    assert report.max_abs_err <= 1e-4
    assert report.routing_agreement == 1.0
    assert report.argmax_agreement == 1.0
    # every MoE layer reported at every shape, with a full load histogram
    for shape_result in report.results:
        assert len(shape_result.comparison.routing) == len(result.info.layers)
        for layer, routing in zip(result.info.layers, shape_result.comparison.routing):
            tokens = shape_result.shape[0] * shape_result.shape[1]
            assert sum(routing.load_actual) == tokens * layer.top_k


@pytest.mark.parametrize("name", SAMPLES)
def test_graph_is_standard_onnx(name, exported):
    result = exported(name, with_routing=True)
    model = onnx.load(str(result.output))
    onnx.checker.check_model(model, full_check=True)
    assert {imp.domain for imp in model.opset_import} <= STANDARD_DOMAINS
    assert all(node.domain in STANDARD_DOMAINS for node in model.graph.node)
    assert model.ir_version <= 10  # loads on onnxruntime >= 1.20
    ops = {node.op_type for node in model.graph.node}
    assert "MatMul" in ops
    if not result.info.all_soft:
        assert "TopK" in ops
    assert ops & {"Gather", "GatherElements", "ScatterND", "ScatterElements"}
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["moeport.family"] == result.family
    assert meta["moeport.num_experts"] == str(result.info.num_experts)
    assert meta["moeport.top_k"] == str(result.info.top_k)
    assert meta["moeport.strategy"] == result.strategy
    assert len(meta["moeport.source_sha256"]) == 64
    assert meta["moeport.version"]


def test_dynamic_axes_are_batch_and_sequence(exported):
    model = onnx.load(str(exported("topk", with_routing=True).output))
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]


def test_auto_picks_sorted_for_topk_and_dense_for_soft(exported):
    topk, soft = exported("topk", with_routing=True), exported("soft", with_routing=True)
    assert topk.strategy == "sorted" and "grows with k" in topk.strategy_reason
    assert soft.strategy == "dense" and "soft" in soft.strategy_reason


def test_sorted_graph_is_sparse(exported, routed_segments):
    """Sorted dispatch: TopK sort, one routed segment per expert feeding its MatMuls, inverse-permutation gather."""
    result = exported("topk", with_routing=True)
    ops = op_types(result.output)
    assert {"TopK", "Split", "Gather", "ScatterElements", "Concat"} <= ops
    info = result.info
    assert routed_segments(onnx.load(str(result.output))) == [layer.num_experts for layer in info.layers]
    assert "ScatterND" not in ops  # combine without scatter-add (OpenVINO refuses reduction=add)


def test_sorted_graph_gates_each_layer_once(exported, sample_checkpoint):
    """Each expert's gate and up are one MatMul, and the SwiGLU runs once per layer over all experts' rows: at a
    decode step the experts that got no row cost two empty MatMuls each, not five kernels. The numbers are
    PyTorch's at a batch and length the export did not see."""
    result = exported("topk")
    model = onnx.load(str(result.output))
    layers = len(result.info.layers)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Sigmoid") == layers  # the sample's silu; its routers are softmax
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and "moeport_" in n.input[1]}
    gate_up = {inits[w] for w in weights if "moeport_gate_up_" in w}
    down = {inits[w] for w in weights if "moeport_down_" in w}
    assert len(weights) == 2 * sum(layer.num_experts for layer in result.info.layers)
    (inter, hidden), = down
    assert gate_up == {(hidden, 2 * inter)}
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    halves = [n for n in model.graph.node if n.op_type == "Split" and producers.get(n.input[0]) == "Concat"]
    assert len(halves) == layers and all(len(n.output) == 2 for n in halves)  # [gate | up] of all experts' rows
    report = verify_checkpoint(result.output, sample_checkpoint("topk"), shapes=[(3, 11), (1, 1)], seed=5)
    assert report.passed, report


STRATEGY_OPTIONS = {"capacity": {"capacity_factor": 4.0}}  # E/k = 8/2: nothing can be dropped


@pytest.mark.parametrize("strategy", strategy_names())
def test_every_strategy_same_parity_on_topk(strategy, exported, sample_checkpoint):
    result = exported("topk", strategy=strategy, with_routing=True, **STRATEGY_OPTIONS.get(strategy, {}))
    assert result.strategy == strategy
    report = verify_checkpoint(result.output, sample_checkpoint("topk"), shapes=MUST_SHOW_SHAPES)
    assert report.passed, report.render()
    assert report.max_abs_err <= 1e-4
    assert report.routing_agreement == 1.0
    if strategy == "capacity":
        assert all(result_.dropped == {"0": 0, "1": 0} for result_ in report.results)


def test_capacity_drops_and_reports_when_factor_is_small(workdir, sample_checkpoint):
    result = export_checkpoint(sample_checkpoint("topk"), workdir / "cap-small.onnx", strategy="capacity",
                               capacity_factor=0.5, with_routing=True)
    assert result.dropped_slots > 0  # validated against the same dropping in PyTorch, and reported
    report = verify_checkpoint(result.output, sample_checkpoint("topk"), shapes=[(2, 64)])
    assert not report.passed  # dropping changes the answer; verify must say so
    assert sum(report.results[0].dropped.values()) > 0


def test_graph_does_not_freeze_the_example_routing(workdir, sample_checkpoint):
    """Two exports from different example inputs give identical results on a third input."""
    checkpoint = sample_checkpoint("topk")
    first = export_checkpoint(checkpoint, workdir / "ex-a.onnx", with_routing=True, example_shape=(2, 3), example_seed=1)
    second = export_checkpoint(checkpoint, workdir / "ex-b.onnx", with_routing=True, example_shape=(4, 33),
                               example_seed=2)
    loaded = families.load_checkpoint(checkpoint)
    third = contract.random_inputs(loaded.info, 3, 17, seed=99)
    outputs = []
    for result in (first, second):
        session = create_session(result.output)
        outputs.append(session.run(None, third))
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)
    reference = families.reference_outputs(loaded, third)
    np.testing.assert_allclose(outputs[0][0], reference["logits"], atol=1e-4, rtol=0)
    # the third input routes differently from both example inputs in at least one token
    assert not np.array_equal(outputs[0][1][:6], families.reference_outputs(
        loaded, contract.random_inputs(loaded.info, 2, 3, seed=1))["routing.0.experts"])


def test_sorted_handles_expert_with_no_tokens(exported, sample_checkpoint):
    """A single token leaves most experts empty: zero-row segments must work."""
    result = exported("switch", with_routing=True)
    report = verify_checkpoint(result.output, sample_checkpoint("switch"), shapes=[(1, 1), (1, 2)])
    assert report.passed and report.routing_agreement == 1.0


def test_opset_option_and_bad_opset(workdir, sample_checkpoint):
    from moeport import MoeportError

    result = export_checkpoint(sample_checkpoint("switch"), workdir / "opset18.onnx", opset=18)
    model = onnx.load(str(result.output))
    assert {imp.domain: imp.version for imp in model.opset_import}[""] == 18
    with pytest.raises(MoeportError, match="opset 9 is not supported"):
        export_checkpoint(sample_checkpoint("switch"), workdir / "opset9.onnx", opset=9)


def test_export_refuses_to_overwrite_without_force(exported, sample_checkpoint):
    from moeport import MoeportError

    result = exported("switch", with_routing=True)
    before = result.output.read_bytes()
    with pytest.raises(MoeportError, match="already exists; pass --force"):
        export_checkpoint(sample_checkpoint("switch"), result.output)
    assert result.output.read_bytes() == before


def test_export_is_deterministic(workdir, sample_checkpoint):
    a = export_checkpoint(sample_checkpoint("topk-raw"), workdir / "det-a.onnx", validate=False)
    b = export_checkpoint(sample_checkpoint("topk-raw"), workdir / "det-b.onnx", validate=False)
    assert a.output.read_bytes() == b.output.read_bytes()


def test_near_ties_are_avoided_in_validation_and_explained_by_verify(sample_checkpoint, exported):
    """topk at 3x11 with seed 1001 has a router near-tie (logits 0.9806717 vs 0.9806719 in layer 1).

    Export validation must not pick such inputs; verify on them must name the tie, not hide it.
    """
    loaded = families.load_checkpoint(sample_checkpoint("topk"))
    tied = contract.random_inputs(loaded.info, 3, 11, 1001)
    margins = families.routing_margins(loaded, tied)
    assert margins[1].min() < contract.TIE_MARGIN
    chosen = families.tie_free_inputs(loaded, 3, 11, 1001)
    assert all(m.min() > contract.TIE_MARGIN for m in families.routing_margins(loaded, chosen))
    result = exported("topk", strategy="gather", with_routing=True)
    assert result.validation.passed
    report = verify_checkpoint(result.output, sample_checkpoint("topk"), shapes=[(3, 11)], seed=1001)
    routing = report.results[0].comparison.routing[1]
    assert routing.near_ties >= 1
    if routing.agreement < 1.0:  # gather breaks this tie differently from torch on this machine
        assert routing.disagreements_at_ties == round((1 - routing.agreement) * routing.tokens)
        assert any("nearly tie" in w for w in report.warnings)


def test_export_with_external_data_is_deterministic_and_self_contained(workdir, sample_checkpoint, monkeypatch):
    """Weights in ``<name>.data`` beside the model: both files byte-identical across exports, location relative."""
    import moeport.exporter.export as export_module
    from moeport._fs import load_model_proto

    monkeypatch.setattr(export_module, "EXTERNAL_DATA_THRESHOLD", 0)  # force external data on a tiny model
    outputs = []
    for name in ("ext-a", "ext-b"):
        (workdir / name).mkdir()
        result = export_checkpoint(sample_checkpoint("topk-raw"), workdir / name / "m.onnx", validate=False)
        assert result.external_data
        outputs.append(result.output)
    a, b = outputs
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "m.onnx.data").read_bytes() == (b.parent / "m.onnx.data").read_bytes()
    assert sorted(p.name for p in a.parent.iterdir()) == ["m.onnx", "m.onnx.data"]  # no staging leftovers
    load_model_proto(a)  # its locations pass our own path-traversal check


def test_transformers_export_is_deterministic(tmp_path):
    pytest.importorskip("transformers")
    save_tiny_mixtral(tmp_path / "ckpt")
    a = export_checkpoint(tmp_path / "ckpt", tmp_path / "a.onnx", validate=False)
    b = export_checkpoint(tmp_path / "ckpt", tmp_path / "b.onnx", validate=False)
    assert a.output.read_bytes() == b.output.read_bytes()
