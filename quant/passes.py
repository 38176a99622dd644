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
- ``StackProjectionsPass``: ``MatMulNBits`` nodes that read one input with one layout (a layer's query, key and
  value projections) as one over their stacked weights and a ``Split``;
- ``FloatOutputsPass(names)``: the named MatMuls' outputs (the logits among them) freed of the activation Q/DQ
  pairs a QDQ quantizer put after them;
- ``BlockWeightsPass(names, source, block_size, accuracy_level)``: the named QDQ MatMuls as ``MatMulNBits`` over
  their weights again from the fp32 ``source``, in symmetric 8-bit blocks with float16 scales (16-bit activations
  on CPU targets);
- ``RaiseOpsetPass(opset)``: onnxscript's version converter on the graph (16-bit Q/DQ need opset 21);
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
import importlib
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

from moeport._scoped import logger_kept
from moeport.errors import MoeportError
from moeport.contract import ATTENTION_MASK, INPUT_IDS, KV_CACHE_SHARED, METADATA_PREFIX, QUANTIZATION_KEY
from moeport.runtime.fusions import (add_constant, cache_layers, constant_ints, fuse_group_query_attention, fused_note,
                                     only_user, unfused_layers)
from moeport.runtime.moe_graph import ROUTER_INDICES_KEY
from moeport.quant.expert_forms import GatedExpert, Projection, gated_expert

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


def _outcome(model: ir.Model, done: str | None, idle: str, left: list[str], left_label: str) -> Rewritten:
    """A pass's result: ``done`` (what it changed) or, when it changed nothing, ``idle`` (why); then the nodes it
    left alone and why, after ``left_label``."""
    note = done or idle
    if left:
        note += f"; {left_label}: " + ", ".join(left)
    return Rewritten(model, done is not None, note)


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

class RaiseOpsetPass(QuantPass):
    """Convert the graph to ``opset`` with onnxscript's version converter (on the graph; weights stay where they
    are), for what an apply step will write: 16-bit QuantizeLinear/DequantizeLinear need 21. Done here, not by
    onnxruntime's quantizer: it converts through protobuf in memory (fails past 2 GB), and given a part of the
    model it would raise that part only."""

    def __init__(self, opset: int):
        super().__init__()
        self.opset = opset

    def call(self, model: ir.Model) -> Rewritten:
        from onnxscript.version_converter import ConvertVersionPass

        before = model.opset_imports.get("", 1)
        if before >= self.opset:
            return Rewritten(model, False, f"the model is at opset {before} already (>= {self.opset})")
        ConvertVersionPass(target_version=self.opset, fallback=False)(model)
        return Rewritten(model, True, f"converted the graph from opset {before} to {self.opset}")


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
        idle = "no Gemm among the nodes to quantize" if not self.names else "no named Gemm in the plain form"
        return _outcome(model, f"rewrote {rewritten} Gemm as MatMul" if rewritten else None, idle, left, "left as Gemm")


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


class FloatOutputsPass(QuantPass):
    """Keep the outputs of the named MatMuls float in a QDQ model: remove the activation ``QuantizeLinear ->
    DequantizeLinear`` pairs that onnxruntime's static quantizer puts on the output of every MatMul it quantizes.
    Each MatMul keeps its quantized input and weight; a consumer that read the pair's output reads the MatMul's.
    A graph output (the logits) keeps its name.

    Why, on onnxruntime's CPU provider (the cpu and arm targets): there the output pair is rounding and two kernels,
    not what runs the product. Without it the provider runs an 8-bit-input MatMul as ``MatMulIntegerToFloat`` and a
    16-bit-input one (the expert down projections) as ``MatMulNBits`` over its 8-bit weight; with it, the 16-bit ones
    had no kernel, so their weights were dequantized at every run. And the lm_head's pair put the logits on an 8-bit
    grid with one scale for the whole tensor, most of the mode's error. At granite-3.0-1b-a400m size (24 layers,
    benchmarks/vs_llamacpp.py): decode 1.3 -> 26 tokens/s, mean next-token KL from PyTorch 1.66e-5 -> 5.6e-6
    (BENCHMARKS.md). Not for NNAPI and QNN: they run a QDQ node group on the accelerator only when its output is
    quantized too."""

    def __init__(self, names: set[str]):
        super().__init__()
        self.names = frozenset(names)

    def call(self, model: ir.Model) -> Rewritten:
        graph = model.graph
        freed, pairs, logits = 0, 0, []
        for node in [n for n in graph if n.op_type == "MatMul" and n.name in self.names]:
            product, before = node.outputs[0], pairs
            for quantize in list(product.consumers()):
                codes = quantize.outputs[0]
                dequantizes = list(codes.consumers())
                if (quantize.op_type != "QuantizeLinear" or codes.is_graph_output() or not dequantizes
                        or any(d.op_type != "DequantizeLinear" for d in dequantizes)):
                    continue
                for dequantize in dequantizes:
                    restored = dequantize.outputs[0]
                    output_name = restored.name if restored.is_graph_output() else None
                    restored.replace_all_uses_with(product, replace_graph_outputs=True)
                    if output_name is not None:  # the graph output keeps its name ("logits"), type and shape
                        restored.name, product.name = f"{output_name}_quantized", output_name
                        product.type, product.shape = product.type or restored.type, product.shape or restored.shape
                        logits.append(output_name)
                graph.remove([quantize, *dequantizes], safe=True)
                pairs += len(dequantizes)
            freed += pairs > before
        if freed:
            outputs = f" (graph output {', '.join(logits)} among them)" if logits else ""
            return Rewritten(model, True, f"kept the outputs of {freed} MatMul(s) float{outputs}: removed {pairs} "
                                          "QuantizeLinear/DequantizeLinear pair(s)")
        why = "no quantized MatMul named" if not self.names else "no QuantizeLinear reads a quantized MatMul's output"
        return Rewritten(model, False, why)


class BlockWeightsPass(QuantPass):
    """The named QDQ MatMuls over a per-channel int8 weight ``[K, N]`` as onnxruntime's ``MatMulNBits``
    (com.microsoft; ``bits=8``, ``block_size``, ``accuracy_level``) over that weight quantized again from the
    float weight of the same name in ``source`` (the fp32 model the quantizer read; onnxruntime's static quantizer
    names a weight ``W``'s codes ``W_quantized``): symmetric, one scale per ``block_size`` values along K, codes
    stored as uint8 ``[N, K / block_size, block_size]`` (the int8 code + 128: the kernel's default zero point for
    8 bits), scales ``[N, K / block_size]`` stored as float16 and cast to float32 by a ``Cast`` that onnxruntime
    folds at load: 8.5 bits a weight at blocks of 32, as llama.cpp's Q8_0. The MatMul's input keeps its
    calibrated 16-bit Q/DQ.

    Why blocks: per-channel scales span all K inputs of a column, so one large weight coarsens the column's every
    step; a scale per 32 is what Q8_0 stores. At granite-3.0-1b-a400m size (24 layers, 256 held-out positions):
    mean next-token KL from PyTorch 1.72e-6, llama.cpp Q8_0 1.81e-6 (BENCHMARKS.md). Only with 16-bit
    activations on onnxruntime's CPU provider (``IntScheme.with_activations``): behind 8-bit activations
    onnxruntime 1.32 fuses a blocked QDQ weight into ``MatMulIntegerToFloat`` and computes a wrong product
    (``benchmarks/blocked_qdq.py``).

    Why ``MatMulNBits`` in the file rather than a blocked ``DequantizeLinear``: onnxruntime fuses the latter into
    this same kernel at load (the logits are identical), and a process that opened it kept the memory that fusing
    took: 3.8 GB resident for the 24-layer granite-shaped model's 1.48 GB file, against 2.1 GB written this way
    (BENCHMARKS.md). A weight whose K is not a whole number of blocks, or without a float original of its shape,
    keeps its channels (the note says which)."""

    def __init__(self, names: set[str], source: str | os.PathLike, block_size: int, accuracy_level: int):
        super().__init__()
        self.names, self.source, self.block_size = frozenset(names), Path(source), block_size
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> Rewritten:
        graph = model.graph
        floats = ir.load(self.source).graph.initializers  # external weights are read when used
        blocked, left = 0, []
        stored: dict[str, tuple[ir.Value, ir.Value]] = {}  # codes name -> (blocks, float32 scales)
        for node in [n for n in graph if n.op_type == "MatMul" and n.name in self.names]:
            dequantize = node.inputs[1].producer() if node.inputs[1] is not None else None
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue  # not a quantized weight
            codes = dequantize.inputs[0]
            if codes.const_value is None or codes.dtype != ir.DataType.INT8 or len(codes.shape) != 2 \
                    or dequantize.attributes.get_int("block_size", 0):
                continue
            base = codes.name.removesuffix("_quantized")
            original = floats.get(base)
            k, n = (int(d) for d in codes.shape)
            if original is None or original.const_value is None or tuple(original.shape) != (k, n):
                left.append(f"{node.name} (no float weight {base} of shape {[k, n]})")
                continue
            if k % self.block_size:
                left.append(f"{node.name} (K {k} is not a multiple of {self.block_size})")
                continue
            widened = []
            if codes.name not in stored:  # one blocked weight for every MatMul that reads it
                blocks = k // self.block_size
                compute = _ComputedOnce(functools.partial(_nbits_blocks, original.const_value, self.block_size), 2)
                weight, scale = _lazy_initializers(
                    graph, compute, [(f"{codes.name}_b{self.block_size}", ir.DataType.UINT8,
                                      [n, blocks, self.block_size]),
                                     (f"{codes.name}_b{self.block_size}_scale", ir.DataType.FLOAT16, [n, blocks])])
                widened = [ir.node("Cast", [scale], attributes={"to": ir.DataType.FLOAT},
                                   name=f"{dequantize.name}_scale")]
                stored[codes.name] = weight, widened[0].outputs[0]
            weight, scale = stored[codes.name]
            product = ir.node("MatMulNBits", [node.inputs[0], weight, scale], domain="com.microsoft",
                              attributes={"K": k, "N": n, "bits": 8, "block_size": self.block_size,
                                          "accuracy_level": self.accuracy_level}, name=node.name)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [*widened, product],
                                                    [node.outputs[0]], [product.outputs[0]])
            blocked += 1
        if blocked:
            model.opset_imports.setdefault("com.microsoft", 1)
        done = (f"rewrote {blocked} MatMul(s) as MatMulNBits reading {len(stored)} weight(s) stored in 8-bit blocks "
                f"of {self.block_size}") if blocked else None
        return _outcome(model, done, "no per-channel int8 MatMul weight among the named nodes", left,
                        "kept per channel")


def _symmetric_blocks(weight: ir.TensorProtocol, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` [K, N] as int8 codes [K, N] and float16 scales [K / block_size, N]: symmetric, one scale per
    ``block_size`` values of a column, the largest magnitude mapping to at most 127. Each value is within half its
    block's scale of the original."""
    values = weight.numpy().astype(np.float32)
    k, n = values.shape
    blocks = values.reshape(k // block_size, block_size, n)
    exact = np.abs(blocks).max(axis=1) / 127
    scales = exact.astype(np.float16)
    # Rounded to float16 the scale may come out below the largest magnitude's: one step up keeps the codes in range
    # (so every value within half a step). The smallest subnormal stands in for a scale float16 cannot hold.
    low = scales.astype(np.float32) < exact
    scales[low] = np.nextafter(scales[low], np.float16(np.inf))
    scales[exact == 0] = 1  # an all-zero block: any scale gives codes 0
    wide = scales.astype(np.float32)
    codes = np.clip(np.rint(blocks / wide[:, None, :]), -127, 127).astype(np.int8)
    return codes.reshape(k, n), scales


def _nbits_blocks(weight: ir.TensorProtocol, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``_symmetric_blocks`` in ``MatMulNBits``' 8-bit layout: uint8 codes ``[N, K / block_size, block_size]``
    (code + 128) and float16 scales ``[N, K / block_size]``."""
    codes, scales = _symmetric_blocks(weight, block_size)
    k, n = codes.shape
    shifted = (codes.astype(np.int16) + 128).astype(np.uint8)
    return np.ascontiguousarray(shifted.T.reshape(n, k // block_size, block_size)), np.ascontiguousarray(scales.T)


class _ComputedOnce:
    """``compute()`` evaluated once for ``parts`` readers (the initializers of one weight) and released after the
    last has read it, so a model's worth of computed weights is never held at once (computed again if read again)."""

    def __init__(self, compute: Callable[[], tuple[np.ndarray, ...]], parts: int):
        self.compute, self.parts = compute, parts
        self.value: tuple[np.ndarray, ...] | None = None
        self.reads = 0

    def __call__(self) -> tuple[np.ndarray, ...]:
        if self.value is None:
            self.value, self.reads = self.compute(), 0
        value = self.value
        self.reads += 1
        if self.reads >= self.parts:
            self.value = None
        return value


def nbits_quantizer_module():
    """onnxruntime's ``matmul_nbits_quantizer`` module, imported with the root logger left as it was.

    Why: the module calls ``logging.basicConfig(level=INFO)`` when first imported. In a process that had not
    configured logging (the CLI), every library's INFO records then reached stderr -- ``moeport demo`` printed
    onnx_ir's "Removed 417 unused nodes" after its first n-bit mode. The root logger's level and handlers are
    recorded before the import and put back after it (``_scoped.logger_kept``)."""
    with logger_kept():
        return importlib.import_module("onnxruntime.quantization.matmul_nbits_quantizer")


def _block_quantize(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A MatMul weight ``[K, N]`` quantized by onnxruntime's MatMulNBits block kernel (asymmetric, ``block_size``
    along K, per column): (packed uint8 ``[N, K * bits / 8]``, scales ``[N, K / block]``, zero points
    ``[N, ceil(K / block * bits / 8)]``)."""
    nbits = nbits_quantizer_module()
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits)
    packed, scales, zero_points = nbits.DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight))
    rows = packed.shape[0]
    return packed.reshape(rows, -1), scales.reshape(rows, -1), zero_points.reshape(rows, -1)


def _lazy_initializers(graph: ir.Graph, compute: Callable[[], tuple[np.ndarray, ...]],
                       specs: list[tuple[str, ir.DataType, list[int]]]) -> list[ir.Value]:
    """One initializer per ``(name, dtype, shape)`` of ``specs``, the i-th holding ``compute()[i]``, computed when
    the model is written (``compute`` should cache: every tensor calls it)."""
    made = []
    for i, (name, dtype, shape) in enumerate(specs):
        lazy = ir.LazyTensor(lambda i=i: ir.tensor(compute()[i]), dtype=dtype, shape=ir.Shape(shape), name=name)
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=lazy)
        graph.register_initializer(value)
        made.append(value)
    return made


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
    ``block_size`` is left alone (the note says so); ``stored`` names the Gathers the last run rewrote.
    """

    def __init__(self, names: set[str], block_size: int):
        super().__init__()
        self.names, self.block_size = frozenset(names), block_size
        self.stored: frozenset[str] = frozenset()

    def call(self, model: ir.Model) -> Rewritten:
        graph = model.graph
        rewritten, left, stored = [], [], {}
        for node in [n for n in graph
                     if n.op_type == "Gather" and n.domain in ("", "ai.onnx") and n.name in self.names]:
            table = node.inputs[0]
            axis = node.attributes.get("axis")
            if table is None or table.const_value is None or len(table.shape or ()) != 2 or (axis and axis.value):
                left.append(f"{node.name} (not a row Gather over a 2-D initializer)")
                continue
            vocab, hidden = (int(d) for d in table.shape)
            if hidden % self.block_size:
                left.append(f"{node.name} (row length {hidden} is not a multiple of {self.block_size})")
                continue
            if table.name not in stored:  # one quantized table for every Gather that reads it
                # The table transposed makes each of its rows one MatMul column, blocked along H.
                compute = functools.cache(lambda table=table.const_value: _block_quantize(table.numpy().T, 8,
                                                                                          self.block_size))
                blocks = hidden // self.block_size
                stored[table.name] = _lazy_initializers(
                    graph, compute, [(f"{table.name}_q8", ir.DataType.UINT8, [vocab, hidden]),
                                     (f"{table.name}_scales", table.dtype, [vocab, blocks]),
                                     (f"{table.name}_zero_points", ir.DataType.UINT8, [vocab, blocks])])
            inputs = stored[table.name]
            gathered = ir.node("GatherBlockQuantized", [inputs[0], node.inputs[1], inputs[1], inputs[2]],
                               attributes={"bits": 8, "block_size": self.block_size, "gather_axis": 0,
                                           "quantize_axis": 1},
                               domain="com.microsoft", name=node.name)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [gathered], [node.outputs[0]],
                                                    [gathered.outputs[0]])
            rewritten.append(node.name)
        self.stored = frozenset(rewritten)
        if rewritten:
            model.opset_imports.setdefault("com.microsoft", 1)
        done = (f"stored {len(stored)} table(s) read by {len(rewritten)} Gather(s) in 8-bit blocks of {self.block_size}"
                if rewritten else None)
        return _outcome(model, done, "no named Gather to store in blocks", left, "left alone")


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


class FuseAttentionPass(QuantPass):
    """Each layer's attention of a with-past graph as onnxruntime's ``GroupQueryAttention`` and
    ``RotaryEmbedding`` (com.microsoft; ``moeport.runtime.fusions``): the cache append, scores, mask and softmax in
    one kernel instead of ~30. Layers it cannot fuse keep their standard ops, with the reason in the note."""

    def __init__(self):
        super().__init__()
        self.left: list[str] = []  # why layers were left alone, per reason (ShareCacheBufferPass quotes it)

    def call(self, model: ir.Model) -> Rewritten:
        fused, left = fuse_group_query_attention(model)
        self.left = left
        done = fused_note(fused) if fused else None
        return _outcome(model, done, "; ".join(left), left if fused else [], "left as standard ops")


class ShareCacheBufferPass(QuantPass):
    """A Concat-cache with-past graph whose every layer's attention is ``GroupQueryAttention`` (after
    ``FuseAttentionPass``) as a shared-buffer model (metadata ``kv_cache``, contract ``KV_CACHE_SHARED``).

    The kernel writes the step's keys and values at columns ``T - S .. T - 1`` of the past it is given (``T`` the
    attention mask's length, ``S`` the step's tokens) and returns a present as long as that past: given a Concat
    cache's past (``T - S`` columns) it appends; given one buffer bound as both past and present it writes that
    buffer in place -- the shared contract. What else reads the past is its length (``Shape(past)[2]``, for the
    causal mask and the positions), which a shared buffer does not have: the pass reads it as ``T - S`` instead, the
    same number under both contracts. Then the metadata tells runtimes to bind one buffer (onnxruntime-genai's
    ``past_present_share_buffer``, ``moeport generate``, the benchmarks). A layer left in standard ops, or a past
    read any other way, is refused as a user error naming it (nothing is written). ``fusion``: the
    ``FuseAttentionPass`` that ran before, whose reasons the error quotes."""

    def __init__(self, fusion: FuseAttentionPass | None = None):
        super().__init__()
        self.fusion = fusion

    def call(self, model: ir.Model) -> Rewritten:
        graph = model.graph
        layers = cache_layers(graph)
        if not layers:  # a bug: quantize only asks for it on a with-past graph
            raise ValueError("ShareCacheBufferPass on a graph without present.{i}.key/value outputs")
        unfused = unfused_layers(graph)
        if unfused:
            why = "; ".join(self.fusion.left) if self.fusion is not None and self.fusion.left else \
                f"layer(s) {', '.join(map(str, unfused))} keep standard ops"
            raise MoeportError(f"--kv-cache shared needs every layer's attention fused into GroupQueryAttention "
                               f"({why}); export with --kv-cache shared instead")
        inputs = {value.name: value for value in graph.inputs}
        past_length = None  # T - S, built once
        lengths = 0
        for value in [v for v in graph.inputs if v.name.startswith("past_key_values.")]:
            for user, _ in list(value.uses()):
                if user.op_type == "Reshape" and all(u.op_type == "GroupQueryAttention"
                                                     for u, _ in user.outputs[0].uses()):
                    continue  # FuseAttentionPass's view of a Concat past as [B, kv_heads, -1, D]
                axes = _shape_axes(user)
                if axes is not None and 2 not in axes:
                    continue  # batch, heads or head size: the same in a shared buffer
                if axes != [2]:
                    raise MoeportError(f"--kv-cache shared: {value.name} is read by a {user.op_type} node "
                                       f"({user.name}), not only by its layer's GroupQueryAttention and Shapes of "
                                       "its axes; export with --kv-cache shared instead")
                if past_length is None:
                    past_length = _mask_minus_tokens(graph, inputs)
                user.outputs[0].replace_all_uses_with(past_length)
                graph.remove(user, safe=True)
                lengths += 1
        model.metadata_props[f"{METADATA_PREFIX}kv_cache"] = KV_CACHE_SHARED
        return Rewritten(model, True, f"recorded the {len(layers)} layers' cache as one shared buffer for past and "
                                      f"present (their GroupQueryAttention writes it in place when bound as both); "
                                      f"{lengths} read(s) of the past's length now attention_mask's minus the step's")


def _shape_axes(node: ir.Node, rank: int = 4) -> list[int] | None:
    """The axes of a ``[B, kv_heads, T, D]`` cache that a ``Shape`` node reads (``past.shape[2]`` is ``Shape(start=2,
    end=3)`` as torch.export writes it), None for any other node."""
    if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
        return None
    start, end = node.attributes.get("start"), node.attributes.get("end")
    return list(range(rank))[slice(start.value if start is not None else None, end.value if end is not None else None)]


def _mask_minus_tokens(graph: ir.Graph, inputs: dict[str, ir.Value]) -> ir.Value:
    """``[T - S]`` (int64, shape [1]) from the ``attention_mask [B, T]`` and ``input_ids [B, S]`` inputs, at the
    start of ``graph``."""
    if ATTENTION_MASK not in inputs or INPUT_IDS not in inputs:
        raise MoeportError(f"--kv-cache shared needs {ATTENTION_MASK} and {INPUT_IDS} inputs; export with --kv-cache "
                           "shared instead")
    total = ir.node("Shape", [inputs[ATTENTION_MASK]], attributes={"start": 1, "end": 2}, name="moeport_total_length")
    step = ir.node("Shape", [inputs[INPUT_IDS]], attributes={"start": 1, "end": 2}, name="moeport_step_length")
    past = ir.node("Sub", [total.outputs[0], step.outputs[0]], name="moeport_past_length")
    past.outputs[0].name = "moeport_past_length"
    past.outputs[0].dtype, past.outputs[0].shape = ir.DataType.INT64, ir.Shape([1])
    graph.insert_before(graph[0], [total, step, past])
    return past.outputs[0]


class StackProjectionsPass(QuantPass):
    """``MatMulNBits`` nodes (com.microsoft) that read the same input with the same layout (``K``, ``bits``,
    ``block_size``, ``accuracy_level``, the same optional inputs) as one ``MatMulNBits`` over their weights stacked
    along N and a ``Split`` of its output: a layer's query, key and value projections (or a dense MLP's gate and
    up) are one kernel reading one weight instead of three. Exact: each output column has its own blocks (they run
    along K), and every weight-side input is N-major (packed ``[N, blocks, blob]``, scales ``[N * blocks]``, zero
    points ``[N * ...]``), so the stacked tensors are the nodes' own, one after the other (computed when the model
    is written). Nodes with a group index or a bias are left alone.

    Static int8 on CPU targets (``BlockWeightsPass``) gives each node its own 16-bit Q/DQ pair of the shared input
    (onnxruntime's ``DedicatedQDQPair``) and its scales behind a ``Cast`` from float16: nodes whose pairs quantize
    the same tensor with the same constants read the same input here, and scales behind a ``Cast`` of a constant
    are stacked as the constants, under one ``Cast``. The other nodes' pairs are left for ``REMOVE_UNUSED``."""

    def call(self, model: ir.Model) -> Rewritten:
        graph = model.graph
        groups: dict[tuple, list[ir.Node]] = {}
        for node in graph:
            if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or len(node.inputs) > 4:
                continue
            weights = [_constant_behind_cast(v) for v in node.inputs[1:]]
            if any(w is False for w in weights):
                continue
            layout = tuple(sorted((k, a.value) for k, a in node.attributes.items() if k != "N"))
            casts = tuple(None if w is None else w[1] for w in weights)
            groups.setdefault((_read_input(node.inputs[0]), layout, casts), []).append((node, weights))
        stacked = []
        for members in (g for g in groups.values() if len(g) > 1):
            nodes = [node for node, _ in members]
            present = [i for i, v in enumerate(nodes[0].inputs) if i and v is not None]
            # the tensors themselves: the nodes and their initializers leave the graph before it is written
            sources = [[weights[i - 1] for _, weights in members] for i in present]
            parts = [[constant.const_value for constant, _ in column] for column in sources]
            compute = functools.cache(lambda parts=parts: tuple(np.concatenate([t.numpy() for t in tensors])
                                                                for tensors in parts))
            specs = []
            for i, column in zip(present, sources):
                first = column[0][0]
                rows = sum(int(constant.shape[0]) for constant, _ in column)
                specs.append((f"{nodes[0].name}_stacked_{i}", first.dtype, [rows, *first.shape[1:]]))
            weights, casts = [], []
            for value, (_, to) in zip(_lazy_initializers(graph, compute, specs), (column[0] for column in sources)):
                if to is not None:
                    casts.append(ir.node("Cast", [value], attributes={"to": to}))
                    value = casts[-1].outputs[0]
                weights.append(value)
            widths = [n.attributes["N"].value for n in nodes]
            attributes = {k: a.value for k, a in nodes[0].attributes.items()} | {"N": sum(widths)}
            merged = ir.node("MatMulNBits", [nodes[0].inputs[0], *weights],
                             attributes=attributes, domain="com.microsoft", name=f"{nodes[0].name}_stacked")
            sizes = add_constant(graph, f"{nodes[0].name}_stacked_widths", np.array(widths, np.int64))
            split = ir.node("Split", [merged.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(nodes))
            graph.insert_before(nodes[0], [*casts, merged, split])
            for node, part in zip(nodes, split.outputs):
                old = node.outputs[0]
                part.shape, part.type = old.shape, old.type
                old.replace_all_uses_with(part, replace_graph_outputs=True)
                part.name, old.name = old.name, f"{old.name}_unstacked"
            graph.remove(nodes, safe=True)
            stacked.append(len(nodes))
        done = (f"stacked {sum(stacked)} MatMulNBits that share their input into {len(stacked)}"
                if stacked else None)
        return _outcome(model, done, "no two MatMulNBits read the same input with the same layout", [], "")


def _constant_behind_cast(value: ir.Value | None):
    """For a weight-side input of ``MatMulNBits``: ``(constant, None)`` for a constant, ``(constant, to)`` for a
    ``Cast(to)`` of one, None for an absent input, False for anything else (computed in the graph)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value, None
    cast = value.producer()
    if cast is not None and cast.op_type == "Cast" and cast.domain in ("", "ai.onnx") \
            and cast.inputs[0] is not None and cast.inputs[0].const_value is not None:
        return cast.inputs[0], cast.attributes["to"].value
    return False


def _read_input(value: ir.Value):
    """What a node reading ``value`` reads, for grouping: the tensor a ``QuantizeLinear`` -> ``DequantizeLinear``
    pair with constant scales and zero points round-trips, with those constants (two pairs of the same tensor and
    constants give the same values), else ``value`` itself."""
    dequantize = value.producer()
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.domain not in ("", "ai.onnx"):
        return value
    quantize = dequantize.inputs[0].producer()
    if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.domain not in ("", "ai.onnx"):
        return value
    constants = []
    for node in (quantize, dequantize):
        for operand in node.inputs[1:]:
            if operand is not None and operand.const_value is None:
                return value
            constants.append(None if operand is None else
                             (operand.dtype, operand.const_value.numpy().tobytes()))
        constants.append(tuple(sorted((k, a.value) for k, a in node.attributes.items())))
    return quantize.inputs[0], tuple(constants)


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
        except MoeportError:  # the user's model cannot take what was asked: one line, no traceback
            raise
        except Exception as exc:  # a bug in a pass: re-raised, naming it (the traceback is kept)
            raise ir.passes.PassError(f"quantize pass {quant_pass.name} failed") from exc
        records.append(PassRecord(quant_pass.name, result.modified, result.note))
    return records


def external_data_name(path: str | os.PathLike) -> str:
    """The file name of the weights that ``save_model`` (and ``apply.write_external``) put beside ``path``."""
    return f"{Path(path).name}.data"


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool) -> None:
    """Write ``model`` to ``path``; with ``external_data``, its initializers over 1 KiB go to ``<name>.data``
    beside it (tensor by tensor: tensors that live in another file are streamed, never all in memory), else
    every tensor goes into the one file (only for models under protobuf's 2 GB)."""
    path = Path(path)
    if external_data:
        ir.external_data.unload_from_model(model, path.parent, external_data_name(path), size_threshold_bytes=1024)
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


def _last_axis(node: ir.Node, attribute: str = "axis") -> bool:
    """``node``'s axis attribute (Softmax, TopK: default -1) names the last axis of its rank-2 input."""
    axis = node.attributes.get_int(attribute, -1)
    return axis == -1 or (axis == 1 and node.inputs[0].shape is not None and len(node.inputs[0].shape) == 2)


def _top_k_softmax_logits(indices: ir.Value, routing_weights: ir.Value) -> ir.Value | None:
    """The router logits ``[tokens, E]`` when the routing weights are the softmax of the top-k logits that
    selected ``indices`` -- what ``QMoE`` computes itself from ``router_probs`` -- else None. Two spellings:
    ``Softmax(TopK(logits).values)`` (GraniteMoE) and ``v / ReduceSum(v)`` with ``v = TopK(Softmax(logits)).values``
    (Mixtral, the sample; the same numbers: p_i / sum_k p_j = exp(l_i) / sum_k exp(l_j))."""
    top_k = indices.producer()
    if top_k is None or top_k.op_type != "TopK" or top_k.outputs[1] is not indices:
        return None
    if top_k.attributes.get_int("largest", 1) != 1 or not _last_axis(top_k):
        return None
    values, node = top_k.outputs[0], routing_weights.producer()
    if node is None:
        return None
    logits = None
    if node.op_type == "Softmax" and node.inputs[0] is values and _last_axis(node):
        logits = top_k.inputs[0]
    elif node.op_type == "Div" and node.inputs[0] is values and node.inputs[1] is not None:
        total, scores = node.inputs[1].producer(), top_k.inputs[0].producer()
        if (total is not None and total.op_type == "ReduceSum" and total.inputs[0] is values
                and total.attributes.get_int("keepdims", 1) == 1
                and (len(total.inputs) < 2 or constant_ints(total.inputs[1]) in ([-1], [1]))
                and scores is not None and scores.op_type == "Softmax" and _last_axis(scores)):
            logits = scores.inputs[0]
    if logits is None or logits.shape is None or len(logits.shape) != 2:
        return None  # QMoE takes router_probs [rows, E], the rows of its input
    return logits


def _selected_per_token(indices: ir.Value) -> int | None:
    """How many experts each token is routed to, from the router's selected-experts tensor ``[tokens, k]``: a
    TopK's constant k, 1 for an ArgMax, else the tensor's static last axis (PhiMoE's sparsemixer concatenates two
    ArgMax picks); None when none of these is known."""
    selection = indices.producer()
    if selection is not None and selection.op_type == "TopK" and selection.inputs[1] is not None \
            and selection.inputs[1].const_value is not None:
        return int(selection.inputs[1].const_value.numpy().reshape(-1)[0])
    if selection is not None and selection.op_type == "ArgMax":
        return 1
    last = indices.shape[-1] if indices.shape is not None and len(indices.shape) else None
    return last if isinstance(last, int) else None


@dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer as ``FuseExpertsPass`` is told it: its experts' down-projection MatMuls in expert order and
    the router's selected-experts tensor ``[tokens, k]``."""

    downs: tuple[str, ...]
    indices: str


class FuseExpertsPass(QuantPass):
    """Replace each named MoE layer's per-expert MatMuls with one onnxruntime ``QMoE`` (com.microsoft) node over
    block-quantized expert weights, keeping the routing moeport's own.

    Why: ``QMoE`` runs a layer's selected experts in one kernel, where the export runs every expert's MatMuls
    (32 experts x 2 per layer on the granite-shaped model, most of them on zero rows) between a Split and a
    Concat. Measured at edge size (BENCHMARKS.md): int4 decode +22-28% (PhiMoE-shaped) and +65-69%
    (gpt-oss-shaped) over per-expert MatMulNBits. The idle experts' kernels are little of that: an empty
    MatMulNBits costs 0.5-0.8 us without the profiler (``benchmarks/empty_kernels.py``; the profiler shows about
    5): 1,344 idle ones, 0.7-1.1 ms of a 12 ms int4 step at 24 layers. The rest is what the per-expert form
    runs for the experts with rows, not broken down further.

    What it matches (the sorted dispatch ``moeport.exporter.strategies`` writes): the layer's rows
    ``X [tokens, H]`` gathered in expert order and cut by one Split; expert e in QMoE's gated form
    (``expert_forms``: ``down_e(silu(gate_e(x)) * up_e(x))``, or gpt-oss's clamped form, biases included); the
    expert outputs concatenated, scaled by the routing weights ``[tokens, k]`` (gathered in the same order), put
    back in token order and summed over k (Gather, Reshape, ReduceSum) into ``Y [tokens, H]``. ``Y`` then comes
    from ``QMoE(X, router_probs, ...)`` where ``router_probs`` is 1 at the router's selected experts and 0
    elsewhere (so QMoE's own top-k selects exactly them) and ``router_weights`` holds the routing weights at
    those experts: QMoE's softmax and normalisation are not used, so sigmoid, grouped or biased routers stay
    exact. Where the routing weights are the softmax of the top-k logits (``_top_k_softmax_logits``: GraniteMoE,
    Mixtral, the sample), which QMoE computes from ``router_probs`` itself, ``router_probs`` is the router's logits
    and there is no ``router_weights``: the router's TopK and softmax and the nine kernels that build those two
    tensors go (11 fewer kernels a layer for GraniteMoE, 13 for Mixtral; int4 decode +1 to +7% on the 24-layer
    granite-shaped model, BENCHMARKS.md). The numbers are the same to float rounding and the experts the same but
    where two scores are exactly equal: TopK picks the lower index, QMoE the higher (and over logits rather than
    probabilities, which rounding can make equal). The QMoE node's metadata names the TopK output it replaced
    (``moe_graph.ROUTER_INDICES_KEY``), for the routing comparisons of the quality report. Gate and up are
    interleaved into fc1 (``swiglu_fusion=1``; ``activation_alpha``, ``activation_beta`` and ``swiglu_limit`` the
    expert's: 1, 0 and none for silu(gate) * up), down is fc2, their biases fc1's and fc2's; weights are quantized
    by onnxruntime's block kernel (asymmetric, ``block_size`` along K, computed when the model is written). The
    kernel quantizes its float input to 8 bits as it runs, as ``MatMulNBits`` at ``accuracy_level`` 4 does: at 8
    bits whatever the ``accuracy_level`` (onnxruntime 1.32's CPU kernel), at 4 bits at level 4, float at 0
    (``benchmarks/qmoe_arithmetic.py``). A layer that does not match is left alone, with the reason in the note;
    the old nodes are left for ``REMOVE_UNUSED``.
    """

    def __init__(self, layers: list[ExpertLayer], bits: int, block_size: int, accuracy_level: int):
        super().__init__()
        self.layers, self.bits, self.block_size, self.accuracy_level = layers, bits, block_size, accuracy_level

    def _match(self, layer: ExpertLayer, nodes: dict[str, ir.Node], values: dict[str, ir.Value]):
        """Everything ``call`` needs for one layer, or the reason it does not match (a string)."""
        downs = [nodes.get(name) for name in layer.downs]
        if None in downs or any(d.op_type != "MatMul" for d in downs):
            return "its down projections are not all float MatMuls"
        experts = [gated_expert(down) for down in downs]
        reason = next((e for e in experts if isinstance(e, str)), None)
        if reason is not None:
            return reason
        split = experts[0].x.producer()
        if split is None or split.op_type != "Split" or any(
                expert.x is not split.outputs[e] for e, expert in enumerate(experts)):
            return "the experts' rows do not come from one Split in expert order"
        rows = split.inputs[0].producer()
        if rows is None or rows.op_type != "Gather" or (rows.attributes.get("axis") and rows.attributes["axis"].value):
            return "the sorted rows are not a Gather of the layer's input"
        hidden, inter = experts[0].down.shape[1], experts[0].down.shape[0]
        if any(projection.shape != (hidden, inter) for e in experts for projection in (e.gate, e.up)) or any(
                e.down.shape != (inter, hidden) for e in experts):
            return "the experts' weights do not all have the first expert's shapes"
        if len({e.activation for e in experts}) > 1:
            return "the experts' activations differ (alpha, beta or limit)"
        if hidden % self.block_size or inter % self.block_size:
            return f"hidden {hidden} or expert width {inter} is not a multiple of the block size {self.block_size}"
        concat = only_user(experts[0].output, "Concat")
        if concat is None or list(concat.inputs) != [e.output for e in experts]:
            return "the expert outputs are not concatenated in expert order"
        scale = only_user(concat.outputs[0], "Mul")
        unsorted = scale and only_user(scale.outputs[0], "Gather")
        reshaped = unsorted and only_user(unsorted.outputs[0], "Reshape")
        summed = reshaped and only_user(reshaped.outputs[0], "ReduceSum")
        if not summed:
            return "the weighted expert outputs are not put back in token order and summed over k"
        factor = scale.inputs[1] if scale.inputs[0] is concat.outputs[0] else scale.inputs[0]
        chain = factor.producer()
        for op in ("Unsqueeze", "Gather", "Reshape"):
            if chain is None or chain.op_type != op:
                return "the routing weights that scale the expert outputs were not found"
            routing_weights = chain.inputs[0]
            chain = routing_weights.producer()
        indices = values.get(layer.indices)
        if indices is None:
            return f"the router's selected experts {layer.indices!r} are not in the graph"
        k = _selected_per_token(indices)
        if k is None:
            return f"the router's selected experts {layer.indices!r} have no constant k (a TopK's k or a last axis)"
        return rows.inputs[0], indices, routing_weights, summed.outputs[0], experts, hidden, inter, k

    def _stacked(self, matrices: list[Projection], interleave: list[Projection] | None):
        """A function computing (packed [E, N, K * bits / 8], scales [E, N, K / block], zero points
        [E, N, ceil(K / block * bits / 8)]) once: each expert's ``[K, N]`` weight (gate and up interleaved column
        by column when ``interleave`` is given) quantized by onnxruntime's MatMulNBits block kernel."""

        @functools.cache
        def compute():
            parts = []
            for e, matrix in enumerate(matrices):
                weight = matrix.matrix()
                if interleave is not None:
                    up = interleave[e].matrix()
                    fused = np.empty((weight.shape[0], 2 * weight.shape[1]), dtype=weight.dtype)
                    fused[:, 0::2], fused[:, 1::2] = weight, up
                    weight = fused
                parts.append(_block_quantize(weight, self.bits, self.block_size))
            return tuple(np.stack(arrays) for arrays in zip(*parts))

        return compute

    @staticmethod
    def _initializers(graph: ir.Graph, name: str, compute, shapes) -> list[ir.Value]:
        return _lazy_initializers(graph, compute, [(f"{name}_{suffix}", dtype, shape) for suffix, dtype, shape in zip(
            ("q", "scales", "zero_points"), (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8), shapes)])

    @staticmethod
    def _biases(graph: ir.Graph, number: int, gated: list[GatedExpert]) -> tuple[ir.Value | None, ir.Value | None]:
        """QMoE's fc1 bias ``[E, 2 * inter]`` (gate and up interleaved as fc1's rows are) and fc2 bias ``[E, hidden]``,
        each None where no expert has one (an expert without one among those that do gets zeros)."""
        fc1 = fc2 = None
        if any(e.gate.bias is not None or e.up.bias is not None for e in gated):
            gate, up = np.stack([e.gate.bias_vector() for e in gated]), np.stack([e.up.bias_vector() for e in gated])
            interleaved = np.empty((len(gated), 2 * gate.shape[1]), np.float32)
            interleaved[:, 0::2], interleaved[:, 1::2] = gate, up
            fc1 = add_constant(graph, f"moeport_qmoe_{number}_fc1_bias", interleaved)
        if any(e.down.bias is not None for e in gated):
            fc2 = add_constant(graph, f"moeport_qmoe_{number}_fc2_bias",
                               np.stack([e.down.bias_vector() for e in gated]))
        return fc1, fc2

    @staticmethod
    def _routing_tensors(graph: ir.Graph, number: int, x: ir.Value, indices: ir.Value, routing_weights: ir.Value,
                         experts: int, k: int) -> tuple[ir.Value, ir.Value, list[ir.Node]]:
        """(router_probs, router_weights, the nodes computing them): ``[tokens, E]`` tensors holding 1 / the
        routing weight at each token's selected experts and 0 elsewhere, for any router."""

        def const(name: str, array: np.ndarray) -> ir.Value:
            return add_constant(graph, f"moeport_qmoe_{number}_{name}", array)

        tokens = ir.node("Shape", [x], attributes={"start": 0, "end": 1})
        size = ir.node("Concat", [tokens.outputs[0], const("experts", np.array([experts], np.int64))],
                       attributes={"axis": 0})
        zeros = ir.node("ConstantOfShape", [size.outputs[0]], attributes={"value": ir.tensor(np.zeros(1, np.float32))})
        rows_k = const("rows_k", np.array([-1, k], np.int64))
        chosen = ir.node("Reshape", [indices, rows_k])
        scales = ir.node("Reshape", [routing_weights, rows_k])
        shape_of_chosen = ir.node("Shape", [chosen.outputs[0]])
        ones = ir.node("Expand", [const("one", np.ones(1, np.float32)), shape_of_chosen.outputs[0]])
        probs = ir.node("ScatterElements", [zeros.outputs[0], chosen.outputs[0], ones.outputs[0]],
                        attributes={"axis": 1})
        mixing = ir.node("ScatterElements", [zeros.outputs[0], chosen.outputs[0], scales.outputs[0]],
                         attributes={"axis": 1})
        return probs.outputs[0], mixing.outputs[0], [tokens, size, zeros, chosen, scales, shape_of_chosen, ones, probs,
                                                     mixing]

    def call(self, model: ir.Model) -> Rewritten:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        values = {value.name: value for node in graph for value in node.outputs}
        fused, in_kernel, left = 0, 0, {}  # left: reason -> the layers it kept unfused
        for number, layer in enumerate(self.layers):
            match = self._match(layer, nodes, values)
            if isinstance(match, str):
                left.setdefault(match, []).append(number)
                continue
            x, indices, routing_weights, y, gated, hidden, inter, k = match
            experts = len(gated)
            blocks_in, blocks_mid = hidden // self.block_size, inter // self.block_size
            per_byte = 8 // self.bits
            fc1 = self._initializers(graph, f"moeport_qmoe_{number}_fc1", self._stacked(
                [e.gate for e in gated], [e.up for e in gated]),
                [[experts, 2 * inter, hidden // per_byte], [experts, 2 * inter, blocks_in],
                 [experts, 2 * inter, -(-blocks_in // per_byte)]])
            fc2 = self._initializers(graph, f"moeport_qmoe_{number}_fc2", self._stacked(
                [e.down for e in gated], None),
                [[experts, hidden, inter // per_byte], [experts, hidden, blocks_mid],
                 [experts, hidden, -(-blocks_mid // per_byte)]])

            logits = _top_k_softmax_logits(indices, routing_weights)
            if logits is not None:
                # QMoE's own top-k and softmax over router_probs are the router's: the TopK, the Softmax and
                # the tensors below are not needed
                probs, mixing, added = logits, None, []
                in_kernel += 1
            else:
                probs, mixing, added = self._routing_tensors(graph, number, x, indices, routing_weights,
                                                             experts, k)
            fc1_bias, fc2_bias = self._biases(graph, number, gated)
            inputs = [x, probs, fc1[0], fc1[1], fc1_bias, fc2[0], fc2[1], fc2_bias, None, None, None, fc1[2], fc2[2],
                      None, mixing]
            alpha, beta, limit = gated[0].activation
            attributes = {"k": k, "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": alpha,
                          "activation_beta": beta, "normalize_routing_weights": 0, "expert_weight_bits": self.bits,
                          "block_size": self.block_size, "accuracy_level": self.accuracy_level,
                          "weights_prepacked": 0}
            if limit is not None:
                attributes["swiglu_limit"] = limit
            qmoe = ir.node("QMoE", inputs[:-1] if mixing is None else inputs, attributes=attributes,
                           domain="com.microsoft", name=f"moeport_qmoe_{number}")
            if mixing is None:
                qmoe.metadata_props[ROUTER_INDICES_KEY] = indices.name
            added.append(qmoe)
            graph.insert_before(y.producer(), added)
            y_replacement = qmoe.outputs[0]
            y_replacement.shape, y_replacement.type = y.shape, y.type
            ir.convenience.replace_all_uses_with(y, y_replacement)
            if y.is_graph_output():
                index = graph.outputs.index(y)
                y_replacement.name, y.name = y.name, f"{y.name}_unfused"
                graph.outputs[index] = y_replacement
            fused += 1
        if fused:
            model.opset_imports.setdefault("com.microsoft", 1)
        done = f"fused the experts of {fused} MoE layer(s) into QMoE ({self.bits}-bit blocks of {self.block_size})"
        if in_kernel:
            done += f"; {in_kernel} of them route in the kernel (their routers are a top-k softmax)"
        idle = "no MoE layer to fuse" if not self.layers else "no MoE layer's experts are in a form QMoE runs"
        kept = [f"layer{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))} ({reason})"
                for reason, numbers in left.items()]
        return _outcome(model, done if fused else None, idle, kept, "left as MatMuls")
