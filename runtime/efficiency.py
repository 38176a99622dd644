"""How close the expert MatMuls of an exported MoE graph get to this machine's MatMul speed.

Expert MatMuls are found by graph structure (``moeport.runtime.moe_graph.find_expert_matmuls``, the finder
quantization uses too): per MoE layer, one group per projection (gate_up, or gate and up, and down), every
expert's MatMul on a 2-D weight ``[K, N]``. MoE layers appear in the graph in model order, so the i-th layer of
groups is ``ModelInfo.layers[i]`` (the counts must match) and brings its own top-k. Their FLOP rate is taken
from an onnxruntime profile of one run: each layer does ``2 * tokens * k_layer * sum(K * N)`` FLOPs in them,
whatever the routing. The reference is a plain onnxruntime MatMul graph of the same sizes (``[tokens * k_layer,
K] @ [K, N]`` for each distinct shape) timed on the same provider and threads. The fraction is expert rate /
plain rate.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moeport._fs import load_model_proto
from moeport.contract import model_info
from moeport.errors import MoeportError
from moeport.runtime.moe_graph import expert_layers
from moeport.runtime.profile import kernel_events
from moeport.runtime.session import create_session
from moeport.runtime.timing import time_runs


@dataclass
class ExpertEfficiency:
    shape: str
    expert_gflops: float  # work done in expert MatMuls per run, GFLOP
    expert_ms: float  # their summed kernel time, median over runs
    expert_gflop_s: float
    plain_gflop_s: float  # plain MatMuls of the same sizes
    fraction: float  # expert_gflop_s / plain_gflop_s

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExpertProjection:
    """One projection of one MoE layer: its experts' MatMul nodes, their weight ``[K, N]``, the layer's top-k."""

    layer: str  # the layer's label (ModelInfo)
    top_k: int
    k: int
    n: int
    nodes: tuple[str, ...]

    def flops(self, tokens: int) -> int:
        """FLOPs of this projection for ``tokens`` tokens: each picks ``top_k`` experts."""
        return 2 * tokens * self.top_k * self.k * self.n


def expert_projections(model: str | os.PathLike) -> list[ExpertProjection]:
    """Every expert projection of the moeport export ``model`` with its layer's own top-k (module docstring)."""
    info, _ = model_info(model)
    proto = load_model_proto(model)  # the graph; weights stay on disk
    layers = expert_layers(proto)
    if not layers:
        raise MoeportError(f"{model} has no per-expert MatMul weights (was it exported by moeport with sorted, "
                           "dense or capacity dispatch?)")
    if len(layers) != len(info.layers):
        raise MoeportError(f"{model}: the graph has expert MatMuls for {len(layers)} MoE layers but its metadata "
                           f"lists {len(info.layers)}; cannot give each layer its top-k")
    dims = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    projections = []
    for layer, groups in zip(info.layers, layers):
        for nodes in groups.values():
            # Float MatMuls on 2-D initializers, one shape for all experts (a quantized file is not measured).
            shapes = {dims.get(node.input[1], ()) if node.op_type == "MatMul" else () for node in nodes}
            if len(shapes) == 1 and len(shape := shapes.pop()) == 2:
                projections.append(ExpertProjection(layer.label, layer.top_k, *shape, tuple(n.name for n in nodes)))
    return projections


def _plain_matmul_rate(problems: list[tuple[int, int, int]], threads: int | None, runs: int) -> float:
    """GFLOP/s of ``[rows, K] @ [K, N]`` for the distinct (rows, K, N), in one plain ONNX graph."""
    from onnx import TensorProto, helper, numpy_helper, save

    nodes, inputs, outputs, inits = [], [], [], []
    rng = np.random.default_rng(0)
    for i, (rows, k, n) in enumerate(problems):
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [rows, k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, n]))
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
    graph = helper.make_graph(nodes, "plain", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    feeds = {f"x{i}": rng.standard_normal((rows, k)).astype(np.float32) for i, (rows, k, _) in enumerate(problems)}
    flops = sum(2 * rows * k * n for rows, k, n in problems)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plain.onnx"
        save(model, path)
        session = create_session(path, "cpu", threads=threads)
        times = time_runs(lambda: session.run(None, feeds), runs=runs, warmup=3)
    return flops / float(np.median(times)) / 1e9


def expert_efficiency(model: str | os.PathLike, feeds: dict[str, np.ndarray], *, ep: str = "cpu",
                      threads: int | None = None, runs: int = 10) -> ExpertEfficiency:
    """Profile ``runs`` runs of ``model`` on ``feeds`` and compare its expert MatMul rate with a plain MatMul."""
    model = Path(model)
    projections = expert_projections(model)
    experts = {name for p in projections for name in p.nodes}
    tokens = int(np.prod(feeds["input_ids"].shape))
    # Every slot passes through each projection of its layer once, whatever the routing.
    flops = sum(p.flops(tokens) for p in projections)
    with tempfile.TemporaryDirectory() as tmp:
        session = create_session(model, ep, threads=threads, profile_dir=tmp)
        for _ in range(runs):
            session.run(None, feeds)
        per_run: dict[int, float] = {}
        for event in kernel_events(session.end_profiling()):
            if event.node in experts:
                per_run[event.run] = per_run.get(event.run, 0.0) + event.seconds
    expert_seconds = float(np.median(list(per_run.values())))
    plain = _plain_matmul_rate(sorted({(tokens * p.top_k, p.k, p.n) for p in projections}), threads, runs)
    rate = flops / expert_seconds / 1e9
    shape = "x".join(map(str, feeds["input_ids"].shape))
    return ExpertEfficiency(shape, flops / 1e9, expert_seconds * 1e3, rate, plain, rate / plain)
