"""``moeport inspect``: what an ONNX file is and where it could run.

Reads the graph (weights included, unless stored as external data, whose sizes come from the
initializers' dims): moeport metadata (family, experts, top-k, strategy), opset and IR version, op
histogram, parameter count and bytes, the inputs' and outputs' dynamic axes (an exported model has
``input_ids [batch, sequence]`` and ``logits [batch, sequence, vocab]``). Then two views of providers:
the estimated NNAPI/CoreML share from onnxruntime's mobile usability checker, and, unless turned off,
the measured placement of one profiled run on ``ep`` with a seeded ``[1, 8]`` input.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeport._fs import load_model_proto
from moeport.contract import metadata_props, optional_model_info
from moeport.runtime._io import TensorSpec, group_per_layer
from moeport.runtime.layouts import model_file
from moeport.runtime.moe_graph import tensor_nbytes
from moeport.runtime.run import example_feeds
from moeport.runtime.placement import EpCoverage, Placement, measure_placement, mobile_coverage, resolve_with_warnings


def per_layer_groups(specs: list[TensorSpec]) -> list[tuple[str, TensorSpec]]:
    """``specs`` with those that differ only in a layer index (``past_key_values.3.key``) and not in dtype, shape or
    axes as one entry named for all of them (``past_key_values.{0..23}.key``, ``_io.group_per_layer``), at the
    first one's place: a with-past model of 24 layers has 96 cache inputs and outputs."""
    groups = group_per_layer(specs, lambda spec: (spec.name, spec.dtype, spec.shape_text(),
                                                  tuple(spec.dynamic_axes.items())))
    return [(name, members[0]) for name, members in groups]


def value_spec(value) -> TensorSpec:
    """A graph input/output ValueInfoProto as a TensorSpec (dims: int, dim_param name, or None)."""
    from onnx import helper

    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name if tensor.elem_type else "?"
    return TensorSpec(value.name, dtype, dims)


def graph_specs(graph) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A GraphProto's inputs (initializers left out: they are weights, not feeds) and outputs as TensorSpecs."""
    initializers = {i.name for i in graph.initializer}
    return ([value_spec(v) for v in graph.input if v.name not in initializers],
            [value_spec(v) for v in graph.output])


def parameter_stats(graph) -> tuple[int, int]:
    """(element count, bytes) of the initializers, from their dims so external data need not be read; 4-bit
    types (a 4-bit embedding table) count half a byte a value, as they are stored (``moe_graph.tensor_nbytes``)."""
    count = sum(int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1 for init in graph.initializer)
    return count, sum(tensor_nbytes(init) for init in graph.initializer)


@dataclass
class InspectReport:
    model: Path
    metadata: dict[str, str]  # moeport.* properties, prefix removed
    opset: int | None
    ir_version: int
    producer: str
    op_histogram: dict[str, int]
    parameters: int
    parameter_bytes: int
    file_bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    coverage: list[EpCoverage]
    placement: Placement | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> int:
        return sum(self.op_histogram.values())

    def to_dict(self) -> dict:
        md = self.metadata
        return {
            "model": str(self.model),
            "family": md.get("family"), "num_experts": int(md["num_experts"]) if "num_experts" in md else None,
            "top_k": int(md["top_k"]) if "top_k" in md else None, "strategy": md.get("strategy"),
            "opset": self.opset, "ir_version": self.ir_version, "producer": self.producer,
            "nodes": self.nodes, "op_histogram": self.op_histogram,
            "parameters": self.parameters, "parameter_bytes": self.parameter_bytes, "file_bytes": self.file_bytes,
            "inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs],
            "mobile_coverage": [c.to_dict() for c in self.coverage],
            "placement": None if self.placement is None else self.placement.to_dict(),
            "metadata": self.metadata, "warnings": self.warnings,
        }

    def render(self) -> str:
        md = self.metadata
        lines = [f"warning: {w}" for w in self.warnings]
        lines.append(f"{self.model}: {self.file_bytes / 1e6:.2f} MB, opset {self.opset}, IR {self.ir_version}, "
                     f"producer {self.producer}")
        if "family" in md:
            lines.append(f"family {md['family']}, {md.get('num_experts', '?')} experts, top-{md.get('top_k', '?')}, "
                         f"strategy {md.get('strategy', '?')}")
        else:
            lines.append("no moeport metadata (not exported by moeport)")
        lines.append(f"parameters: {self.parameters:,} ({self.parameter_bytes / 1e6:.2f} MB)")
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            for name, s in per_layer_groups(specs):
                axes = ", ".join(f"{k}={v}" for k, v in s.dynamic_axes.items()) or "none"
                lines.append(f"{kind} {name}: {s.dtype} {s.shape_text()} (dynamic axes: {axes})")
        hist = ", ".join(f"{op} {n}" for op, n in self.op_histogram.items())
        lines.append(f"{self.nodes} nodes: {hist}")
        lines.append("mobile providers (onnxruntime usability checker, graph optimized to BASIC):")
        lines += [f"  {c.render()}" for c in self.coverage]
        if self.placement is not None:
            lines.append(self.placement.render())
        return "\n".join(lines)


def inspect_model(model: str | os.PathLike, *, ep: str = "cpu", fallback: str | None = None,
                  placement: bool = True) -> InspectReport:
    """Describe ``model``; with ``placement`` also run it once on ``ep`` to see where its nodes land."""
    path = model_file(model)
    proto = load_model_proto(path)  # also refuses external data outside the model's directory
    graph = proto.graph
    metadata = metadata_props(proto)
    info = optional_model_info(metadata, path)
    vocab = None if info is None else info.vocab_size
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    inputs, outputs = graph_specs(graph)
    count, size = parameter_stats(graph)
    histogram = dict(Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                             for n in graph.node).most_common())
    if placement:  # an unknown or missing provider is an error before the coverage work, not after it
        provider, notes = resolve_with_warnings(ep, fallback)
    coverage = mobile_coverage(path, also_if_fixed=True)
    report = InspectReport(path, metadata, opset, proto.ir_version, proto.producer_name, histogram, count, size,
                           path.stat().st_size, inputs, outputs, coverage)
    if placement:
        report.warnings = notes
        feeds = example_feeds(inputs, vocab, outputs=outputs, kv_cache=metadata.get("kv_cache"))
        report.placement = measure_placement(path, feeds, provider)
    return report
