"""How close the expert MatMuls of an exported MoE graph get to this machine's MatMul speed.

Expert MatMuls are the ones whose weight is a per-expert initializer written by the exporter
(``...moeport_gate_up_{e}`` ``[hidden, G]``, or ``...moeport_gate_{e}`` and ``...moeport_up_{e}``
``[hidden, inter]`` for SwiGLU experts, and ``...moeport_down_{e}`` ``[inter, hidden]``). Their FLOP rate
is taken from an onnxruntime profile of one run: each layer does ``2 * tokens * k * (hidden * G + inter *
hidden)`` FLOPs in them, whatever the routing. The reference is a plain onnxruntime MatMul graph of the same
total size (``[tokens * k, hidden] @ [hidden, G]`` and ``[tokens * k, inter] @ [inter, hidden]``) timed on the
same provider and threads. The fraction is expert rate / plain rate.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moeport.runtime.profile import kernel_events
from moeport.runtime.session import create_session
from moeport.runtime.timing import time_runs

_EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.*)moeport_(?P<kind>gate_up|gate|up|down)_\d+$")


@dataclass
class ExpertEfficiency:
    shape: str
    expert_gflops: float  # work done in expert MatMuls per run, GFLOP
    expert_ms: float  # their summed kernel time, median over runs
    expert_gflop_s: float
    plain_gflop_s: float  # a plain MatMul pair of the same total size
    fraction: float  # expert_gflop_s / plain_gflop_s

    def to_dict(self) -> dict:
        return asdict(self)


def _expert_matmuls(model_path: Path) -> dict[str, tuple[str, str, int, int]]:
    """Node name -> (layer prefix, "gate_up"|"gate"|"up"|"down", K, N) of every MatMul on a per-expert 2-D weight."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    dims = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    found = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or len(dims.get(node.input[1], ())) != 2:
            continue
        if match := _EXPERT_WEIGHT.match(node.input[1]):
            found[node.name] = (match["prefix"], match["kind"], *dims[node.input[1]])
    return found


def _plain_matmul_rate(rows: int, shapes: list[tuple[int, int]], threads: int | None, runs: int) -> float:
    """GFLOP/s of [rows, K] @ [K, N] for the distinct (K, N) weight shapes, in one plain ONNX graph."""
    from onnx import TensorProto, helper, numpy_helper, save

    nodes, inputs, outputs, inits = [], [], [], []
    rng = np.random.default_rng(0)
    for i, (k, n) in enumerate(shapes):
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [rows, k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, n]))
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
    graph = helper.make_graph(nodes, "plain", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    feeds = {f"x{i}": rng.standard_normal((rows, k)).astype(np.float32) for i, (k, _) in enumerate(shapes)}
    flops = sum(2 * rows * k * n for k, n in shapes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plain.onnx"
        save(model, path)
        session = create_session(path, "cpu", threads=threads)
        times = time_runs(lambda: session.run(None, feeds), runs=runs, warmup=3)
    return flops / float(np.median(times)) / 1e9


def expert_efficiency(model: str | os.PathLike, feeds: dict[str, np.ndarray], *, top_k: int, ep: str = "cpu",
                      threads: int | None = None, runs: int = 10) -> ExpertEfficiency:
    """Profile ``runs`` runs of ``model`` on ``feeds`` and compare its expert MatMul rate with a plain MatMul."""
    model = Path(model)
    experts = _expert_matmuls(model)
    if not experts:
        raise ValueError(f"{model} has no per-expert MatMul weights (was it exported by moeport with sorted, "
                         "dense or capacity dispatch?)")
    slots = int(np.prod(feeds["input_ids"].shape)) * top_k
    # Every slot passes through one gate_up (or gate and up) and one down MatMul per layer, whatever the routing.
    weight_shapes = {(prefix, kind): (k, n) for prefix, kind, k, n in experts.values()}
    flops = sum(2 * slots * k * n for k, n in weight_shapes.values())
    with tempfile.TemporaryDirectory() as tmp:
        session = create_session(model, ep, threads=threads, profile_dir=tmp)
        for _ in range(runs):
            session.run(None, feeds)
        per_run: dict[int, float] = {}
        for event in kernel_events(session.end_profiling()):
            if event.node in experts:
                per_run[event.run] = per_run.get(event.run, 0.0) + event.seconds
    expert_seconds = float(np.median(list(per_run.values())))
    plain = _plain_matmul_rate(slots, sorted(set(weight_shapes.values())), threads, runs)
    rate = flops / expert_seconds / 1e9
    shape = "x".join(map(str, feeds["input_ids"].shape))
    return ExpertEfficiency(shape, flops / 1e9, expert_seconds * 1e3, rate, plain, rate / plain)
