"""moeport.runtime.moe_graph: one torch-free expert finder for every dispatch, used by quant and by the
expert-efficiency measurement (which gives each MoE layer its own top-k)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

from moeport.contract import METADATA_PREFIX
from moeport.errors import MoeportError
from moeport.runtime.efficiency import expert_efficiency, expert_projections
from moeport.runtime.moe_graph import ExpertGroup, expert_layers, find_expert_matmuls

# The exporter's names for per-expert weights: a cross-check here only, the finder reads the graph's structure.
EXPERT_WEIGHT = re.compile(r"moeport_(gate_up|gate|up|down)_\d+$")


@pytest.mark.parametrize("strategy", ["sorted", "capacity", "dense"])
def test_expert_finder_sees_every_dispatch(exported, strategy):
    model = onnx.load(exported("topk", strategy=strategy, with_routing=True).output)
    layers = expert_layers(model)
    assert len(layers) == 2
    # SwiGLU experts, 8 a layer. Sorted: gate and up as one MatMul (depth 0) before the layer's one gate function,
    # then down (depth 1) on the gated rows cut again; the others: separate gate and up (depth 0, index 0 and 1).
    depths = [(0, 0), (1, 0)] if strategy == "sorted" else [(0, 0), (0, 1), (1, 0)]
    for groups in layers:
        assert sorted((g.crossed, g.index) for g in groups) == depths
        assert all(len(nodes) == 8 for nodes in groups.values())
        assert len({g.rows for g in groups}) == 1
    found = {n.name: n for groups in layers for nodes in groups.values() for n in nodes}
    named = {n.name for n in model.graph.node if n.op_type == "MatMul" and EXPERT_WEIGHT.search(n.input[1])}
    assert set(found) == named and len(named) == 2 * 8 * len(depths)
    downs = {n.input[1] for g, nodes in find_expert_matmuls(model).items() if g.is_down_projection for n in nodes}
    assert len(downs) == 16 and all("moeport_down_" in w for w in downs)


def _with_layers(source, path, edit) -> str:
    """A copy of the model file ``source`` whose ModelInfo layers went through ``edit(list of dicts)``."""
    proto = onnx.load(source)
    for prop in proto.metadata_props:
        if prop.key == METADATA_PREFIX + "model_info":
            info = json.loads(prop.value)
            info["layers"] = edit(info["layers"])
            prop.value = json.dumps(info)
    onnx.save(proto, str(path))
    return str(path)


def test_efficiency_gives_each_layer_its_own_top_k(exported, tmp_path):
    model = exported("topk", with_routing=True).output
    projections = expert_projections(model)
    # per layer: each expert's gate and up as one projection, then down
    assert [(p.layer, p.top_k, len(p.nodes)) for p in projections] == [(label, 2, 8) for label in "0011"]
    assert [(p.k, p.n) for p in projections[:2]] == [(64, 128), (64, 64)]
    mixed = _with_layers(model, tmp_path / "mixed.onnx", lambda layers: [layers[0], {**layers[1], "top_k": 1}])
    mixed_projections = expert_projections(mixed)
    assert [p.top_k for p in mixed_projections] == [2, 2, 1, 1]
    tokens = 16
    per_layer = [sum(p.flops(tokens) for p in projections if p.layer == label) for label in "01"]
    assert sum(p.flops(tokens) for p in mixed_projections) == per_layer[0] + per_layer[1] // 2
    three = _with_layers(model, tmp_path / "three.onnx", lambda layers: [*layers, {**layers[1], "label": "2"}])
    with pytest.raises(MoeportError, match="expert MatMuls for 2 MoE layers but its metadata lists 3"):
        expert_projections(three)


def test_expert_efficiency_measures_the_found_experts(exported):
    model = exported("topk", with_routing=True).output
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 256, (1, 16), dtype=np.int64)}
    result = expert_efficiency(model, feeds, runs=3)
    assert result.expert_gflops == pytest.approx(sum(p.flops(16) for p in expert_projections(model)) / 1e9)
    assert result.expert_ms > 0 and result.plain_gflop_s > 0 and result.fraction > 0


def test_expert_group_down_projection():
    assert ExpertGroup("rows", 1, 0).is_down_projection and not ExpertGroup("rows", 0, 1).is_down_projection
