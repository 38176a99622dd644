"""Where a model's nodes run: measured placement on this machine, and estimated mobile coverage.

``measure_placement`` / ``profiled_session``: onnxruntime does not expose the node -> provider
assignment through its Python API, but its profiler records ``args.provider`` and ``args.op_name`` for
every kernel it runs. So we open the session with profiling on, run once, and count the
``*_kernel_time`` events per (op type, provider). These are the nodes of the *optimized* graph (fused
ops such as ``FusedMatMul`` appear under their fused name), and only nodes that actually ran are seen.

``mobile_coverage``: NNAPI and CoreML do not exist on this machine, so their share is estimated with
onnxruntime's own mobile usability checker (``onnxruntime.tools.mobile_helpers.usability_checker``), on
the model optimized to BASIC level as the ORT-format conversion does. On top of its node counts and
partitions we add the share of MatMul/Gemm FLOPs each provider would take (needs fixed shapes).
"""

from __future__ import annotations

import functools
import os
import pathlib
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeport.runtime.profile import kernel_events
from moeport.runtime.session import ExecutionProvider, create_session, resolve_provider

def resolve_with_warnings(ep: str, fallback: str | None) -> tuple[ExecutionProvider, list[str]]:
    """``resolve_provider`` with its fallback warning returned as text instead of printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        provider = resolve_provider(ep, fallback)
    return provider, [str(w.message) for w in caught]


def profiled_session(model: str | os.PathLike, provider: ExecutionProvider, *, threads: int | None = None,
                     profile_dir: str | os.PathLike):
    """A session that records a profile (for ``run_profiled``) into ``profile_dir``."""
    return create_session(model, provider, threads=threads, profile_dir=profile_dir)


@dataclass
class Placement:
    """Nodes of the optimized graph per (op type, provider), from one profiled run."""

    counts: dict[tuple[str, str], int]  # (op_type, onnxruntime provider name) -> nodes
    requested: str  # the onnxruntime provider name asked for
    # Casts onnxruntime put around nodes whose float16 kernel the provider lacks (it runs them in float32; among
    # the Casts counted above)
    inserted_casts: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def per_provider(self) -> dict[str, int]:
        totals: Counter = Counter()
        for (_, provider), n in self.counts.items():
            totals[provider] += n
        return dict(totals.most_common())

    def to_dict(self) -> dict:
        ops: dict[str, dict[str, int]] = {}
        for (op, provider), n in sorted(self.counts.items()):
            ops.setdefault(op, {})[provider] = n
        return {"requested": self.requested, "nodes": self.total, "providers": self.per_provider, "ops": ops,
                "inserted_casts": self.inserted_casts}

    def render(self) -> str:
        """One line per provider: its share of the nodes, then its node count per op type."""
        lines = [f"placement on {self.requested} (nodes of the optimized graph, one profiled run):"]
        if not self.counts:
            lines.append("  no nodes ran")
        for provider, n in self.per_provider.items():
            ops = sorted(((op, k) for (op, p), k in self.counts.items() if p == provider), key=lambda x: (-x[1], x[0]))
            lines.append(f"  {provider} {n}/{self.total} ({n / self.total:.0%}): "
                         + ", ".join(f"{op} {k}" for op, k in ops))
        if self.inserted_casts:
            lines.append(f"  {self.inserted_casts} of the Casts were inserted by onnxruntime: the provider has no "
                         "float16 kernel for the nodes around them and runs them in float32")
        return "\n".join(lines)


def placement_from_profile(profile_file: str | os.PathLike, requested: str) -> Placement:
    """Count the kernel events of an onnxruntime profile (Chrome trace JSON) per op type and provider."""
    # A node that ran several times (several runs, or a loop body) is one node.
    seen = {event.node: (event.op_type, event.provider) for event in kernel_events(profile_file)}
    inserted = sum(1 for node in seen if node.startswith(_INSERTED_CAST_PREFIX))
    return Placement(dict(Counter(seen.values())), requested, inserted)


# The name onnxruntime gives the Casts it inserts to run a float16 node on a float32 kernel (its
# InsertCastTransformer)
_INSERTED_CAST_PREFIX = "InsertedPrecisionFreeCast"


def run_profiled(session, feeds: dict[str, np.ndarray], requested: str) -> tuple[list[np.ndarray], Placement]:
    """Run ``session`` (opened by ``profiled_session``) once; return its outputs and the placement."""
    outputs = session.run(None, feeds)
    profile = session.end_profiling()
    try:
        placement = placement_from_profile(profile, requested)
    finally:
        Path(profile).unlink(missing_ok=True)
    return outputs, placement


def measure_placement(model: str | os.PathLike, feeds: dict[str, np.ndarray], provider: ExecutionProvider,
                      threads: int | None = None) -> Placement:
    with tempfile.TemporaryDirectory(prefix="moeport-profile-") as tmp:
        session = profiled_session(model, provider, threads=threads, profile_dir=tmp)
        return run_profiled(session, feeds, provider.ort_name)[1]


# --- estimated coverage of mobile providers -------------------------------------------------------

# The checker's op lists, by the name we report. CoreML has two model formats with different op lists.
MOBILE_EPS = (
    ("nnapi", "NNAPI", None),
    ("coreml", "CoreML MLProgram", "coreml_supported_mlprogram_ops.md"),
    ("coreml-neuralnetwork", "CoreML NeuralNetwork", "coreml_supported_neuralnetwork_ops.md"),
)


@dataclass
class EpCoverage:
    ep: str
    label: str
    nodes: int
    supported_nodes: int
    partitions: int
    partition_sizes: list[int]
    unsupported_ops: list[str]
    unsupported_dynamic: int  # nodes refused only because an input has a dynamic shape
    suitability: str  # the checker's verdict: YES / MAYBE / NO
    matmul_flops_share: float | None  # None when shapes are dynamic (FLOPs unknown)
    if_shapes_fixed: dict | None = None  # the same figures with shapes assumed fixed (inspect only)

    @property
    def node_share(self) -> float:
        return self.supported_nodes / self.nodes if self.nodes else 0.0

    def to_dict(self) -> dict:
        return {"ep": self.ep, "label": self.label, "nodes": self.nodes, "supported_nodes": self.supported_nodes,
                "node_share": round(self.node_share, 4), "partitions": self.partitions,
                "partition_sizes": self.partition_sizes, "unsupported_ops": self.unsupported_ops,
                "unsupported_due_to_dynamic_shape": self.unsupported_dynamic, "suitability": self.suitability,
                "matmul_flops_share": None if self.matmul_flops_share is None else round(self.matmul_flops_share, 4),
                "if_shapes_fixed": self.if_shapes_fixed}

    def render(self) -> str:
        flops = "" if self.matmul_flops_share is None else f", {self.matmul_flops_share:.0%} of MatMul FLOPs"
        line = (f"{self.label:<21} {self.supported_nodes}/{self.nodes} nodes ({self.node_share:.0%}){flops} in "
                f"{self.partitions} partitions -> {self.suitability}")
        if self.unsupported_ops:
            line += f"; unsupported: {', '.join(op.removeprefix('ai.onnx:') for op in self.unsupported_ops)}"
        if self.unsupported_dynamic:
            line += f"; {self.unsupported_dynamic} nodes refused for dynamic shapes"
        if self.if_shapes_fixed:
            fixed = self.if_shapes_fixed
            line += f" (with fixed shapes: {fixed['supported_nodes']}/{fixed['nodes']} nodes, {fixed['partitions']} partitions)"
        return line


def _shape_table(graph) -> dict[str, list]:
    """value name -> dims (int or None) from graph inputs, outputs, value_info and initializers."""
    table: dict[str, list] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            table[value.name] = [d.dim_value if d.HasField("dim_value") else None
                                 for d in value.type.tensor_type.shape.dim]
    for init in graph.initializer:
        table[init.name] = list(init.dims)
    return table


def matmul_flops(node, shapes: dict[str, list]) -> int | None:
    """2*M*N*K (times batch dims) of a MatMul/Gemm node, or None when a shape is unknown."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not a or not out or any(d is None for d in a + out):
        return None
    trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
    k = a[0] if (node.op_type == "Gemm" and trans_a) else a[-1]
    return 2 * int(np.prod(out, dtype=np.int64)) * int(k)


def _coverage(model_proto, ep: str, label: str, config: str | None, fixed: bool, shapes) -> EpCoverage:
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    if config is None:
        info = uc.check_nnapi_partitions(model_proto, require_fixed_input_sizes=fixed)
    else:
        info = uc.check_coreml_partitions(model_proto, require_fixed_input_sizes=fixed, config_filename=config)
    flops_share = None
    if fixed:
        all_flops = [matmul_flops(n, shapes) for n in model_proto.graph.node if n.op_type in ("MatMul", "Gemm")]
        if all_flops and None not in all_flops and sum(all_flops):
            taken = sum(matmul_flops(n, shapes) or 0 for group in info.supported_groups for n in group)
            flops_share = taken / sum(all_flops)
    return EpCoverage(ep, label, info.num_nodes, info.num_supported_nodes, info.num_partitions,
                      [len(g) for g in info.supported_groups], sorted(info.unsupported_ops),
                      info.nodes_unsupported_due_to_dynamic_input, info.suitability().name, flops_share)


def mobile_coverage(model: str | os.PathLike, *, also_if_fixed: bool = False) -> list[EpCoverage]:
    """NNAPI and CoreML coverage of the ONNX file ``model`` as onnxruntime's usability checker sees it.

    The model is first optimized to BASIC level (constant folding, no hardware-specific fusions), as both
    the checker's own ``analyze_model`` and the ORT-format conversion do. With ``also_if_fixed`` each entry
    also carries the figures the checker gives when it ignores dynamic shapes.
    """
    import onnx
    from onnxruntime.tools.onnx_model_utils import optimize_model

    with tempfile.TemporaryDirectory(prefix="moeport-usability-") as tmp:
        optimized = pathlib.Path(tmp) / "model.onnx"
        # The weights go to a file of their own beside the optimized graph, and only the graph is read back: the
        # checker needs ops and shapes, not weights. (Written inline, a model above 2 GB cannot be saved, and one
        # whose weights were external data kept pointing at its own file's name, which is not in this folder.)
        optimize_model(pathlib.Path(model), optimized, use_external_initializers=True)
        proto = onnx.shape_inference.infer_shapes(onnx.load(str(optimized), load_external_data=False),
                                                  strict_mode=True)
    shapes = _shape_table(proto.graph)
    results = []
    for ep, label, config in MOBILE_EPS:
        coverage = _coverage(proto, ep, label, config, True, shapes)
        if also_if_fixed and coverage.unsupported_dynamic:
            relaxed = _coverage(proto, ep, label, config, False, shapes)
            coverage.if_shapes_fixed = {"supported_nodes": relaxed.supported_nodes, "nodes": relaxed.nodes,
                                        "partitions": relaxed.partitions, "suitability": relaxed.suitability}
        results.append(coverage)
    return results


@functools.cache
def cpu_has_float16_matmul() -> bool:
    """Whether this machine's onnxruntime CPU provider runs a float16 ``MatMul`` in float16. Where it has no such
    kernel, onnxruntime inserts Casts to float32 around the node when it optimizes the session (its
    ``InsertedPrecisionFreeCast`` nodes) and runs the float32 kernel: a one-node graph, optimized, shows which."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    half = [helper.make_tensor_value_info(name, TensorProto.FLOAT16, [1, 8]) for name in ("x", "y")]
    weight = helper.make_tensor("w", TensorProto.FLOAT16, [8, 8], np.eye(8, dtype=np.float16).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "float16_matmul", half[:1], half[1:],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory(prefix="moeport-float16-") as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    return not any(node.name.startswith(_INSERTED_CAST_PREFIX) for node in optimized.graph.node)
