"""Graph rewrites around onnxruntime's quantizers, as ``onnx_ir`` passes.

Every pass here is an in-place ``onnx_ir`` pass whose ``call`` returns ``Rewritten(model, modified, note)``:
``note`` says what it changed or, when ``modified`` is False, why it changed nothing. ``run_passes`` runs a
list of them in order and returns one ``PassRecord`` per pass (the quantize report lists them); a pass that
raises is re-raised as ``onnx_ir.passes.PassError`` naming it.

- ``GemmAsMatMulPass(names)``: the named plain ``Gemm`` nodes with a constant B as ``MatMul`` [+ ``Add``];
- ``UntieTransposedWeightPass(names)``: the named ``MatMul(A, Transpose(W))`` (a tied lm_head) get their own
  ``W^T`` initializer, so they are quantized as MatMuls and the embedding table is not dequantized per step;
- ``GatherBlockQuantizedPass(names, block_size)``: the named embedding Gathers as ``GatherBlockQuantized`` over
  8-bit blocks (one scale and zero point per block of a row);
- ``StampQuantizationPass(metadata, info)``: the source's moeport metadata carried over, plus how it was quantized;
- ``CLEAR_METADATA``: onnx_ir's ``ClearMetadataAndDocStringPass`` (node and graph metadata such as torch.onnx's
  per-node provenance, and doc strings; the model's own metadata stays);
- ``REMOVE_UNUSED``: onnx_ir's ``RemoveUnusedNodesPass`` (e.g. the ``[N, K]`` originals of transposed weights);
- ``TOPOLOGICAL_SORT``: onnx_ir's ``TopologicalSortPass`` (onnxruntime and the checker need node order);
- ``InlineSmallTensorsPass``: small initializers read in from external data (shape inference needs them);
- ``SHAPE_INFERENCE``: onnx_ir's ``ShapeInferencePass`` (ONNX shape inference on the graph without its large
  weights, so it works past protobuf's 2 GB) and ``MarkPreProcessedPass``: together what onnxruntime's
  ``quant_pre_process`` does with ``skip_optimization`` and ``skip_symbolic_shape``, without loading the model.

``save_model`` writes the result, with its weights in ``<name>.data`` beside it when asked.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (ClearMetadataAndDocStringPass, RemoveUnusedNodesPass, ShapeInferencePass,
                                   TopologicalSortPass)

from moeport.contract import METADATA_PREFIX, QUANTIZATION_KEY

METADATA_KEY = METADATA_PREFIX + QUANTIZATION_KEY


@dataclass
class Rewritten(ir.passes.PassResult):
    """A pass result that says what changed, or why nothing did."""

    note: str = ""


@dataclass(frozen=True)
class PassRecord:
    """One pass as it ran: its name, whether it changed the model, and its note."""

    name: str
    modified: bool
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


class QuantPass(ir.passes.InPlacePass):
    """Base of the passes here: ``call`` returns ``Rewritten``; ``name`` is how reports call the pass."""

    @property
    def name(self) -> str:
        return type(self).__name__


class Explained(QuantPass):
    """A stock onnx_ir pass with the notes it does not give: ``changed`` when it modified the model,
    ``unchanged`` (why nothing was to do) when it did not."""

    def __init__(self, stock: ir.passes.PassBase, changed: str, unchanged: str):
        super().__init__()
        self.stock, self.changed, self.unchanged = stock, changed, unchanged

    @property
    def name(self) -> str:
        return type(self.stock).__name__

    def call(self, model: ir.Model) -> Rewritten:
        result = self.stock(model)
        return Rewritten(result.model, result.modified, self.changed if result.modified else self.unchanged)


CLEAR_METADATA = Explained(ClearMetadataAndDocStringPass(), "dropped node and graph metadata and doc strings",
                           "no node or graph carried metadata or a doc string")
REMOVE_UNUSED = Explained(RemoveUnusedNodesPass(), "removed nodes and initializers nothing reads",
                          "every node and initializer is used")
TOPOLOGICAL_SORT = Explained(TopologicalSortPass(), "put the nodes in topological order",
                             "the nodes were already in topological order")

# strict_mode off: a node it cannot type (a custom op) leaves that node's outputs untyped instead of the whole graph.
SHAPE_INFERENCE = Explained(ShapeInferencePass(strict_mode=False), "recorded inferred shapes and types",
                            "shape inference added nothing (or failed; onnx_ir logs why)")


class InlineSmallTensorsPass(QuantPass):
    """Read initializers of at most ``limit`` bytes in from external data (shapes, axes, scalars): shape
    inference needs their values, and onnx cannot read them from outside the model it is given."""

    def __init__(self, limit: int = 1024):
        super().__init__()
        self.limit = limit

    def call(self, model: ir.Model) -> Rewritten:
        small = [value for value in model.graph.initializers.values()
                 if isinstance(value.const_value, ir.ExternalTensor) and value.const_value.nbytes <= self.limit]
        for value in small:
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
        if small:
            return Rewritten(model, True,
                             f"read {len(small)} tensors of at most {self.limit} bytes in from external data")
        return Rewritten(model, False, f"no tensor of at most {self.limit} bytes is stored in external data")


class MarkPreProcessedPass(QuantPass):
    """Mark the model as pre-processed for onnxruntime's quantizers (the metadata ``quant_pre_process``
    leaves; without it they log a hint to run it). The pre-processing is ``SHAPE_INFERENCE``: ONNX shape
    inference only -- onnxruntime's symbolic shape inference fails on the routed Split (data-dependent
    counts), and its graph optimisation would write onnxruntime-specific fused ops into the file. Measured on
    the trained sample: same ranges, routing agreement and perplexity as without pre-processing."""

    def call(self, model: ir.Model) -> Rewritten:
        from onnxruntime.quantization.quant_utils import add_pre_process_metadata

        marker = onnx.ModelProto()
        add_pre_process_metadata(marker)  # onnxruntime's own mark, whatever its keys are
        marks = {p.key: p.value for p in marker.metadata_props}
        if all(model.metadata_props.get(key) == value for key, value in marks.items()):
            return Rewritten(model, False, "already marked as pre-processed")
        model.metadata_props.update(marks)
        return Rewritten(model, True, "marked as pre-processed (ONNX shape inference) for onnxruntime's quantizers")


class GemmAsMatMulPass(QuantPass):
    """Rewrite the named ``Gemm(A, B[, C])`` with a constant B as ``MatMul(A, B')`` [+ ``Add(C)``].

    Why: MatMulNBitsQuantizer and quantize_dynamic skip Gemm, and torch exports a 2-D ``nn.Linear`` (shared
    experts, routers) as Gemm. Only the plain form (alpha = beta = 1, transA = 0, B an initializer) is
    rewritten; B ``[N, K]`` is stored transposed when transB = 1, so the MatMul weight is ``[K, N]``. The
    MatMul keeps the Gemm's name (the quantizers are told node names); the old B is left for
    ``REMOVE_UNUSED``. The note lists Gemms left alone and why.
    """

    def __init__(self, names: set[str]):
        super().__init__()
        self.names = frozenset(names)

    @staticmethod
    def _why_not(node: ir.Node) -> str | None:
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return "alpha or beta is not 1"
        if attrs.get("transA", 0):
            return "transA is set"
        if node.inputs[1] is None or node.inputs[1].const_value is None:
            return "B is not an initializer"
        return None

    def call(self, model: ir.Model) -> Rewritten:
        graph = model.graph
        rewritten, left = 0, []
        for node in [n for n in graph if n.op_type == "Gemm" and n.name in self.names]:
            reason = self._why_not(node)
            if reason is not None:
                left.append(f"{node.name} ({reason})")
                continue
            x, weight = node.inputs[0], node.inputs[1]
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if node.attributes.get("transB") is not None and node.attributes["transB"].value:
                transposed = np.ascontiguousarray(weight.const_value.numpy().T)
                weight = ir.Value(name=f"{weight.name}_kn", shape=ir.Shape(transposed.shape),
                                  type=ir.TensorType(weight.dtype), const_value=ir.tensor(transposed))
                graph.register_initializer(weight)
            new_nodes = [ir.node("MatMul", [x, weight], name=node.name)]
            if bias is not None:
                new_nodes.append(ir.node("Add", [new_nodes[0].outputs[0], bias], name=f"{node.name}_bias"))
            ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]],
                                                    [new_nodes[-1].outputs[0]])
            rewritten += 1
        if rewritten:
            note = f"rewrote {rewritten} Gemm as MatMul"
        elif not self.names:
            note = "no Gemm among the nodes to quantize"
        else:
            note = "no named Gemm in the plain form"
        if left:
            note += "; left as Gemm: " + ", ".join(left)
        return Rewritten(model, bool(rewritten), note)


class UntieTransposedWeightPass(QuantPass):
    """Give each named ``MatMul(A, Transpose(W))``, W a 2-D initializer, its own initializer ``W^T``.

    Why: a model with tied embeddings computes its lm_head as ``MatMul(hidden, Transpose(table))`` over the
    embedding Gather's table. Quantized, the shared table becomes one int8/int4 tensor that is dequantized whole
    (and transposed) at every step -- 40% of an int4 decode step on a 49k x 1024 vocabulary -- and the lm_head
    MatMul stays float. With its own ``[K, N]`` weight the lm_head is quantized like any MatMul and the table is
    read only by the Gather. The new weight is computed when the model is written (``ir.LazyTensor``), one tensor
    at a time; the Transpose is left for ``REMOVE_UNUSED``.
    """

    def __init__(self, names: set[str]):
        super().__init__()
        self.names = frozenset(names)

    @staticmethod
    def transposed_weight(node: ir.Node) -> ir.Value | None:
        """W when ``node`` is ``MatMul(A, Transpose(W, perm=[1, 0]))`` with W a 2-D initializer, else None."""
        producer = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
            return None
        perm = producer.attributes.get("perm")
        weight = producer.inputs[0]
        if weight is None or weight.const_value is None or len(weight.shape or ()) != 2:
            return None
        return weight if perm is None or list(perm.value) == [1, 0] else None

    def call(self, model: ir.Model) -> Rewritten:
        graph = model.graph
        made: dict[str, ir.Value] = {}
        untied = []
        for node in [n for n in graph if n.op_type == "MatMul" and n.name in self.names]:
            weight = self.transposed_weight(node)
            if weight is None:
                continue
            if weight.name not in made:
                source = weight.const_value
                rows, cols = (int(d) for d in weight.shape)
                lazy = ir.LazyTensor(lambda source=source: ir.tensor(np.ascontiguousarray(source.numpy().T)),
                                     dtype=weight.dtype, shape=ir.Shape([cols, rows]), name=f"{weight.name}_kn")
                made[weight.name] = ir.Value(name=lazy.name, shape=ir.Shape([cols, rows]),
                                             type=ir.TensorType(weight.dtype), const_value=lazy)
                graph.register_initializer(made[weight.name])
            node.replace_input_with(1, made[weight.name])
            untied.append(node.name)
        if untied:
            return Rewritten(model, True, f"gave {len(untied)} MatMul over a transposed initializer its own "
                                          f"[K, N] weight ({', '.join(sorted(made))})")
        return Rewritten(model, False, "no MatMul to quantize reads a transposed initializer")


class GatherBlockQuantizedPass(QuantPass):
    """Store the tables of the named ``Gather(table [V, H], ids)`` nodes in 8-bit blocks: onnxruntime's
    ``GatherBlockQuantized`` (com.microsoft) over uint8 ``[V, H]`` with a float32 scale and a uint8 zero point
    per ``block_size`` values of a row (``[V, H / block_size]`` each), gathered rows dequantized as
    ``(q - zero_point) * scale``.

    Why: onnxruntime's n-bit quantizer packs a Gather at 4 bits only, and ``quantize_dynamic`` stores a table in
    int8 with one scale for the whole tensor; on a granite-shaped embedding (49k x 1024, 4 layers) that one scale
    made the table the largest source of next-token KL divergence of the int4 model (BENCHMARKS.md). The blocks
    are quantized by onnxruntime's own kernel (``quantize_matmul_8bits``, the one behind 8-bit MatMulNBits), once
    per table, when the model is written (``ir.LazyTensor``). A table whose row length is not a multiple of
    ``block_size`` is left alone (the note says so).
    """

    def __init__(self, names: set[str], block_size: int):
        super().__init__()
        self.names, self.block_size = frozenset(names), block_size

    def _quantized(self, table: ir.TensorProtocol) -> Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """A function computing (uint8 [V, H], scales [V, H / block], zero points [V, H / block]) once."""

        @functools.cache
        def compute():
            from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                         DefaultWeightOnlyQuantizer)

            config = DefaultWeightOnlyQuantConfig(block_size=self.block_size, is_symmetric=False, bits=8)
            # The kernel quantizes a MatMul weight [K, N] per column in blocks along K: the table transposed
            # makes each row of the table one column, blocked along H.
            packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
                np.ascontiguousarray(table.numpy().T))
            rows = packed.shape[0]
            return packed.reshape(rows, -1), scales.reshape(rows, -1), zero_points.reshape(rows, -1)

        return compute

    def call(self, model: ir.Model) -> Rewritten:
        graph = model.graph
        rewritten, left = [], []
        for node in [n for n in graph if n.op_type == "Gather" and n.domain in ("", "ai.onnx") and n.name in self.names]:
            table = node.inputs[0]
            axis = node.attributes.get("axis")
            if table is None or table.const_value is None or len(table.shape or ()) != 2 or (axis and axis.value):
                left.append(f"{node.name} (not a row Gather over a 2-D initializer)")
                continue
            vocab, hidden = (int(d) for d in table.shape)
            if hidden % self.block_size:
                left.append(f"{node.name} (row length {hidden} is not a multiple of {self.block_size})")
                continue
            compute = self._quantized(table.const_value)
            blocks = hidden // self.block_size
            inputs = []
            for i, (suffix, dtype, shape) in enumerate([("q8", ir.DataType.UINT8, [vocab, hidden]),
                                                        ("scales", table.dtype, [vocab, blocks]),
                                                        ("zero_points", ir.DataType.UINT8, [vocab, blocks])]):
                lazy = ir.LazyTensor(lambda i=i: ir.tensor(compute()[i]), dtype=dtype, shape=ir.Shape(shape),
                                     name=f"{table.name}_{suffix}")
                value = ir.Value(name=lazy.name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=lazy)
                graph.register_initializer(value)
                inputs.append(value)
            gathered = ir.node("GatherBlockQuantized", [inputs[0], node.inputs[1], inputs[1], inputs[2]],
                               attributes={"bits": 8, "block_size": self.block_size, "gather_axis": 0,
                                           "quantize_axis": 1},
                               domain="com.microsoft", name=node.name)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [gathered], [node.outputs[0]],
                                                    [gathered.outputs[0]])
            rewritten.append(node.name)
        if rewritten:
            model.opset_imports.setdefault("com.microsoft", 1)
            note = f"stored {len(rewritten)} Gather table(s) in 8-bit blocks of {self.block_size}"
        else:
            note = "no named Gather to store in blocks"
        if left:
            note += "; left alone: " + ", ".join(left)
        return Rewritten(model, bool(rewritten), note)


class StampQuantizationPass(QuantPass):
    """Carry the source's metadata over (verify needs the ``moeport.*`` keys; some quantizers drop them) and
    record how the model was quantized under ``moeport.quantization`` (JSON of ``info``, the last key)."""

    def __init__(self, source_metadata: dict[str, str], info: dict):
        super().__init__()
        self.source_metadata, self.info = source_metadata, info

    def call(self, model: ir.Model) -> Rewritten:
        props = model.metadata_props
        carried = [key for key in self.source_metadata if key not in props and key != METADATA_KEY]
        props.update({key: self.source_metadata[key] for key in carried})
        props.pop(METADATA_KEY, None)  # a re-quantized file: the new record replaces the old, last in the list
        props[METADATA_KEY] = json.dumps(self.info, sort_keys=True)
        return Rewritten(model, True, f"carried {len(carried)} metadata keys over; recorded the quantization")


class SplicePass(QuantPass):
    """Replace the nodes ``names`` with the graph of ``replacement``: its graph inputs are the model's values of
    the same names, its outputs take the place of the model's values of the same names, its initializers
    join the model's (tensors that live in external data keep pointing there), and initializers only the
    replaced nodes read are dropped. Opset imports are merged (the higher version wins)."""

    def __init__(self, names: set[str], replacement: ir.Model):
        super().__init__()
        self.names, self.replacement = frozenset(names), replacement

    def call(self, model: ir.Model) -> Rewritten:
        graph, part = model.graph, self.replacement.graph
        old = [node for node in graph if node.name in self.names]
        if len(old) != len(self.names):
            raise ValueError(f"nodes to replace not in the graph: {sorted(self.names - {n.name for n in old})}")
        values = {v.name: v for v in (*graph.inputs, *graph.initializers.values())}
        values.update((o.name, o) for node in graph for o in node.outputs)
        inputs = {v: values[v.name] for v in part.inputs}
        outputs = {values[v.name]: v for v in part.outputs}
        read = {v for node in old for v in node.inputs if v is not None and v.is_initializer()}
        new = list(part)
        part.outputs.clear()
        for node in new:
            part.remove(node)
            for index, value in enumerate(node.inputs):
                if value in inputs:
                    node.replace_input_with(index, inputs[value])
        for name in list(part.initializers):
            graph.register_initializer(part.initializers.pop(name))
        graph.insert_before(old[0], new)
        for before, after in outputs.items():
            name = before.name
            before.replace_all_uses_with(after, replace_graph_outputs=True)
            after.name = name
        graph.remove(old, safe=True)
        for value in read:
            if not value.uses() and not value.is_graph_output():
                del graph.initializers[value.name]
        for domain, version in self.replacement.opset_imports.items():
            model.opset_imports[domain] = max(model.opset_imports.get(domain, version), version)
        return Rewritten(model, True, f"replaced {len(old)} nodes with {len(new)}")


def run_passes(model: ir.Model, passes: list[QuantPass]) -> list[PassRecord]:
    """Run ``passes`` on ``model`` in order (in place); one record per pass."""
    records = []
    for quant_pass in passes:
        try:
            result = quant_pass(model)
        except Exception as exc:  # a bug in a pass: re-raised, naming it (the traceback is kept)
            raise ir.passes.PassError(f"quantize pass {quant_pass.name} failed") from exc
        records.append(PassRecord(quant_pass.name, result.modified, result.note))
    return records


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool) -> None:
    """Write ``model`` to ``path``; with ``external_data``, its initializers over 1 KiB go to ``<name>.data``
    beside it (tensor by tensor: tensors that live in another file are streamed, never all in memory), else
    every tensor goes into the one file (only for models under protobuf's 2 GB)."""
    path = Path(path)
    if external_data:
        ir.external_data.unload_from_model(model, path.parent, f"{path.name}.data", size_threshold_bytes=1024)
    else:  # tensors read lazily from another file would be written as references to it
        ir.external_data.load_to_model(model)
    onnx.save(serialize(model), str(path))


def serialize(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a ModelProto with the quantization record last among the metadata, where moeport has always
    written it (onnx_ir serializes metadata sorted by key)."""
    proto = ir.to_proto(model)
    props = [(p.key, p.value) for p in proto.metadata_props]
    props.sort(key=lambda kv: kv[0] == METADATA_KEY)  # stable: the others keep their order
    del proto.metadata_props[:]
    for key, value in props:
        proto.metadata_props.add(key=key, value=value)
    return proto


def node_metadata_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of per-node metadata and doc strings in ``proto`` (what ``CLEAR_METADATA`` drops): torch.onnx
    annotates every node with its FX node and stack trace, a third of a small exported file."""
    total = 0
    for node in proto.graph.node:
        if node.metadata_props or node.doc_string:
            bare = onnx.NodeProto()
            bare.CopyFrom(node)
            bare.ClearField("metadata_props")
            bare.ClearField("doc_string")
            total += node.ByteSize() - bare.ByteSize()
    return total
