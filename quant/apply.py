"""The apply steps: how each kind of quantization mode runs onnxruntime's tools on the chosen nodes.

An ``ApplyStep`` is a function ``run(job: QuantJob)`` that reads the prepared fp32 model file ``job.source``
and writes the quantized one to ``job.output`` (weights in ``<output>.data`` beside it), plus what the pipeline
must know about it (does it calibrate, does it take an 8-bit ``IntScheme`` and how far the expert
down-projection inputs may be widened, does it use the int4 ``NBitsLayout``, what it quantizes in an
unprotected router, does it skip Gemm). A ``QuantMode`` (``moeport.quant.modes``) carries its step; the
built-in steps are ``QDQ_STATIC`` (int8), ``DYNAMIC`` (int8-dynamic), ``FP16`` and ``NBITS`` (int4).

Files in, files out, always with external data: a model over protobuf's 2 GB cannot be handed over in memory,
and onnxruntime's tools take ``use_external_data_format`` for that. The integer tools load the weights they
quantize into memory, in parts where they would hold copies (``_in_parts``); the float16 converter gets the graph
without its weights, which are then converted one at a time (``run_fp16``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir

from moeport._fs import subgraphs
from moeport._scoped import logger_level
from moeport.quant import calibration as calib
from moeport.quant.passes import (REMOVE_UNUSED, ExpertLayer, FuseExpertsPass, GatherBlockQuantizedPass, SplicePass,
                                  external_data_name, nbits_quantizer_module, run_passes, save_model)
from moeport.quant.schemes import (DEFAULT_EMBEDDING_BLOCK_SIZE, DYNAMIC_DOWN, FLOAT, STATIC_DOWN, IntScheme,
                                   NBitsLayout, WideDown)
from moeport.runtime.moe_graph import tensor_nbytes

DEFAULT_BLOCK_SIZE = 32
# Weights handed to onnxruntime's dynamic quantizer at once (it holds three copies of them, see _on_part).
PART_BYTES = 256 * 2**20


@dataclass
class QuantJob:
    """What an apply step gets.

    ``source``: the prepared fp32 model file (graph passes applied, shapes inferred, weights in
    ``<source>.data``); ``output``: the file to write; scratch files go beside ``source`` (``scratch``).
    ``targets``: the nodes to quantize; ``exclude``: node names to leave alone (the routers); ``experts``: the
    expert MatMul names, and ``down``: those of the down projections (``moeport.runtime.moe_graph``).
    ``bits``: the mode's weight width; ``scheme`` (8-bit steps), ``layout`` (int4), ``calibration``, the
    activation ranges ``observed`` on it and the ``overrides`` (onnxruntime TensorQuantOverrides) of static
    quantization; ``layers``: the MoE layers, for steps
    that fuse a layer's experts (``passes.FuseExpertsPass``).
    """

    source: Path
    output: Path
    targets: list[onnx.NodeProto]
    exclude: set[str]
    experts: set[str]
    down: set[str]
    bits: int
    scheme: IntScheme | None = None
    layout: NBitsLayout | None = None
    calibration: calib.CalibrationSet | None = None
    overrides: dict = field(default_factory=dict)
    observed: object = None  # onnxruntime TensorsData: calibrated activation ranges (moeport.quant.ranges)
    layers: list[ExpertLayer] = field(default_factory=list)
    records: list = field(default_factory=list)  # the passes the step ran (passes.PassRecord), for the report
    head: set[str] = field(default_factory=set)  # the lm_head MatMul(s)
    kv: set[str] = field(default_factory=set)  # attention's key and value projection MatMuls

    @property
    def names(self) -> set[str]:
        return {n.name for n in self.targets}

    def names_of(self, op_type: str) -> set[str]:
        return {n.name for n in self.targets if n.op_type == op_type}

    def scratch(self, name: str) -> Path:
        return self.source.with_name(name)


_STEP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ApplyStep:
    """How one kind of mode quantizes: ``run(job)`` writes ``job.output``.

    ``calibrated``: the step runs calibration samples through the model (``job.calibration`` is set).
    ``down``: the step takes an 8-bit ``IntScheme`` (``job.scheme``) and how far it may widen the expert
    down-projection inputs; None for steps without one. ``layout``: the step uses ``job.layout``.
    ``unprotected_ops``: router op types it also quantizes when the router is not protected (QDQ puts Q/DQ on
    Softmax/Sigmoid like onnxruntime's defaults). ``gemms_as_matmuls``: the tool skips Gemm, so the pipeline
    rewrites the targeted Gemms as MatMul before it runs (``passes.GemmAsMatMulPass``). ``integer_weights``: the
    step stores MatMul weights as integers, so a MatMul over a transposed initializer shared with a Gather (a tied
    lm_head) gets its own weight first (``passes.UntieTransposedWeightPass``); a float step leaves the tie, which
    onnxruntime folds at load at no cost per step. ``targets``: the deployment targets whose runtimes run what the
    step writes (names of ``schemes.TARGETS``, checked when a mode using the step registers; None: every target;
    onnxruntime's contrib operators run on its CPU and CUDA providers only). ``quantizes_outputs``: the step's tool
    also quantizes the outputs of the nodes it quantizes (QDQ); for CPU targets the pipeline takes that off the
    MatMuls' outputs (``passes.FloatOutputsPass``).
    """

    name: str
    run: Callable[[QuantJob], None]
    calibrated: bool = False
    down: WideDown | None = None
    layout: bool = False
    unprotected_ops: tuple[str, ...] = ()
    gemms_as_matmuls: bool = False
    integer_weights: bool = True
    targets: tuple[str, ...] | None = None
    quantizes_outputs: bool = False

    def __post_init__(self):
        if not _STEP_NAME.match(self.name):
            raise ValueError(f"apply step names are lower-case identifiers: {self.name!r}")
        if not callable(self.run):
            raise ValueError(f"apply step {self.name!r}: run must be a function of a QuantJob")


@contextlib.contextmanager
def without_log_message(fragment: str, logger_name: str = ""):
    """Drop records containing ``fragment`` logged to ``logger_name`` (default: the root logger, which
    onnxruntime's quantize_static logs through) while the block runs; the filter is removed afterwards."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return fragment not in record.getMessage()

    logger, drop = logging.getLogger(logger_name), _Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def write_external(proto: onnx.ModelProto, path: Path) -> None:
    """Save a model held in memory to ``path``, its tensors over 1 KiB in ``<path>.data`` (what onnxruntime's
    ``use_external_data_format`` writes)."""
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=external_data_name(path), size_threshold=1024, convert_attribute=False)


def _part_of(proto: onnx.ModelProto, names: set[str]) -> onnx.ModelProto | None:
    """A model holding only the nodes ``names`` of ``proto`` (a graph loaded without its external data), the
    initializers they read (still pointing at their external data), their other inputs as graph inputs and
    what they produce as outputs, typed from the graph's value info; None when a type is not known."""
    graph = proto.graph
    nodes = [node for node in graph.node if node.name in names]
    initializers = {init.name: init for init in graph.initializer}
    types = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output) if v.type.HasField("tensor_type")}
    produced = [out for node in nodes for out in node.output if out]
    read = list(dict.fromkeys(name for node in nodes for name in node.input if name))
    inputs = [name for name in read if name not in produced and name not in initializers]
    if any(name not in types for name in (*inputs, *produced)):
        return None
    part = onnx.helper.make_graph(nodes, "part", [types[n] for n in inputs], [types[n] for n in produced],
                                  [initializers[n] for n in read if n in initializers])
    model = onnx.helper.make_model(part, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    model.metadata_props.extend(proto.metadata_props)  # the pre-processed mark among them
    return model


def _parts(proto: onnx.ModelProto, names: set[str], budget: int) -> list[set[str]]:
    """The nodes ``names`` of ``proto`` in parts of at most ``budget`` bytes of weights (a single node may be
    more), graph order; all named readers of one activation share a part (onnxruntime quantizes an
    activation once for all its readers, under names derived from the activation's)."""
    initializers = {init.name: tensor_nbytes(init) for init in proto.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}  # activation -> the named nodes reading it
    for node in proto.graph.node:
        if node.name in names:
            activation = next((i for i in node.input if i and i not in initializers), node.name)
            readers.setdefault(activation, []).append(node)
    parts: list[set[str]] = []
    size = budget
    for nodes in readers.values():
        weight = sum(initializers.get(i, 0) for node in nodes for i in node.input)
        if size + weight > budget:
            parts.append(set())
            size = 0
        parts[-1].update(node.name for node in nodes)
        size += weight
    return parts


def _on_part(source: Path, names: set[str], tool: Callable[[Path, Path], None], label: str) -> Path:
    """Run ``tool(model file, output file)`` on the part of the model file ``source`` made of the nodes
    ``names`` and splice its output in; returns the spliced model file beside ``source``.

    Why: onnxruntime's dynamic quantizer copies the model it is given twice over in memory (a deep copy and
    a reload for shape inference), three times its weights at once; given the embedding alone, that is three
    times the embedding. No weight is copied on disk either: the part and the spliced model point at the
    external data files beside them. Falls back to the whole model when the part's I/O types are unknown.
    """
    part = _part_of(onnx.load(str(source), load_external_data=False), names)
    if part is None:
        whole = source.with_name(f"{label}.onnx")
        tool(source, whole)
        return whole
    part_path, quantized, spliced = (source.with_name(f"{label}.{kind}.onnx")
                                     for kind in ("part", "quantized", "model"))
    onnx.save(part, str(part_path))
    tool(part_path, quantized)
    model = ir.load(source)
    run_passes(model, [SplicePass(names, ir.load(quantized))])
    ir.save(model, spliced)  # in the same directory, external tensors keep pointing at their files
    return spliced


def _in_parts(source: Path, graph: onnx.ModelProto, names: set[str], tool_for: Callable[[set[str]],
              Callable[[Path, Path], None]], label: str, output: Path) -> None:
    """Quantize the nodes ``names`` of the model file ``source`` (``graph``: its graph without weights) part by
    part (``_parts``, ``PART_BYTES``), ``tool_for(part)`` quantizing each (``_on_part``), into ``output`` in the
    same directory (its external data stays where the file points)."""
    model = source
    for i, part in enumerate(_parts(graph, names, PART_BYTES)):
        model = _on_part(model, part, tool_for(part), f"{label}{i}")
    os.replace(model, output)


_NBITS_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"
# MatMulNBits' accuracy_level 4 (every MatMulNBits moeport writes: the n-bit modes', static int8's on CPU targets):
# the CPU kernels quantize each row of activations to int8 per block and use integer dot products (as llama.cpp's
# Q4_0 x Q8_0), instead of dequantizing the weights to float32 first. Measured on
# this repo's 2-core AVX512-VNNI machine, onnxruntime 1.32, one decode row (M = 1), median of 200 runs:
# [1024 x 1024] 4-bit blocks of 32: 29 -> 12 us; 8-bit: 458 -> 12 us; lm_head [1024 x 49155] 4-bit: 1333 -> 554 us.
# Builds without those kernels (GPU providers) ignore it.
NBITS_ACCURACY_LEVEL = 4


def _nbits(source: Path, output: Path, blocks: list[tuple[set[str], int, int]], exclude: set[str]) -> None:
    """onnxruntime's MatMulNBitsQuantizer on the model file ``source``, once per ``(MatMul/Gather names, bits,
    block size)`` of ``blocks`` (one load, one write), into ``output``."""
    quantizer_class = nbits_quantizer_module().MatMulNBitsQuantizer
    proto = onnx.load(str(source))
    merged: dict[tuple[int, int], set[str]] = {}  # one quantizer pass per (bits, block size)
    for chosen, bits, block_size in blocks:
        merged.setdefault((bits, block_size), set()).update(chosen)
    for (bits, block_size), chosen in merged.items():
        # nodes_to_include only adds to op_types_to_quantize, so everything not chosen is excluded.
        skip = {n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gather")} - chosen
        quantizer = quantizer_class(
            proto,
            # Asymmetric blocks: on the trained sample's held-out text, int4 routing agreement 0.947 vs 0.943 for
            # symmetric at 0.179 vs 0.174 of the fp32 size (BENCHMARKS.md).
            bits=bits, block_size=block_size, is_symmetric=False, nodes_to_exclude=sorted(exclude | skip),
            accuracy_level=NBITS_ACCURACY_LEVEL,
            op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
        # Like quantize_static's 16-bit case: the quantizer raises the opset to 21 itself; the report notes it.
        # Its own INFO records (a line per node) are kept out for this call only (and its import leaves the root
        # logger as it was: passes.nbits_quantizer_module).
        with without_log_message("doesn't support int4 data type", _NBITS_LOGGER), \
                logger_level(_NBITS_LOGGER, logging.WARNING):
            quantizer.process()
        proto = quantizer.model.model
    write_external(proto, output)


def _tensors_of(proto: onnx.ModelProto, names: set[str]) -> set[str]:
    return {t for node in proto.graph.node if node.name in names for t in (*node.input, *node.output)}


def _rewritten(job: QuantJob, rewrites: list, name: str) -> Path:
    """``job.source`` with the graph passes ``rewrites`` (then ``REMOVE_UNUSED``) applied, written to the scratch
    file ``<name>.onnx`` with external data (the weights it does not change are streamed over, not loaded). The
    model is not kept: the weights the passes computed (their ``LazyTensor`` caches) go with it before the
    quantizer that comes next loads the file."""
    model = ir.load(job.source)
    job.records += run_passes(model, rewrites + [REMOVE_UNUSED])
    path = job.scratch(f"{name}.onnx")
    save_model(model, path, external_data=True)
    return path


def _experts_and_tables(job: QuantJob, expert_bits: int, expert_block_size: int | None, tables: set[str],
                        table_block_size: int) -> tuple[Path, frozenset[str]]:
    """``job.source`` with each MoE layer's routed experts as one ``QMoE`` in ``expert_bits`` blocks of
    ``expert_block_size`` (``passes.FuseExpertsPass``; None: the experts stay as they are) and the embedding Gathers
    ``tables`` in 8-bit blocks of ``table_block_size`` (``passes.GatherBlockQuantizedPass``), as a scratch file
    (``_rewritten``); ``job.source`` itself when there is neither. Also the Gathers stored in blocks (a table whose
    rows are not a whole number of blocks is left a Gather; each mode decides what becomes of it)."""
    rewrites = []
    if expert_block_size and job.layers:
        rewrites.append(FuseExpertsPass(job.layers, expert_bits, expert_block_size, NBITS_ACCURACY_LEVEL))
    table_pass = GatherBlockQuantizedPass(tables, table_block_size) if tables else None
    if table_pass is not None:
        rewrites.append(table_pass)
    if not rewrites:
        return job.source, frozenset()
    return _rewritten(job, rewrites, "rewritten"), table_pass.stored if table_pass is not None else frozenset()


def run_qdq_static(job: QuantJob) -> None:
    """``quantize_static`` in QDQ format: per-channel weights (``passes.BlockWeightsPass`` puts them in blocks
    afterwards for a scheme with ``weight_block_size``), activations at the ranges calibration observed
    (``job.observed``, handed over as onnxruntime's calibration cache), in parts of the model
    (``_on_part``): memory stays at one part's weights, at any model size. With a scheme whose weights are in
    blocks (``IntScheme.weight_block_size``: 16-bit activations on a CPU target) the embedding tables are stored
    in 8-bit blocks of that size (``GatherBlockQuantized``) instead, and with ``IntScheme.expert_block_size`` each
    MoE layer's routed experts are one ``QMoE`` in 8-bit blocks (``passes.FuseExpertsPass``, as int8-blocks writes
    them), which reads its float input and quantizes it to 8 bits itself as it runs (its 8-bit kernel does at
    every ``accuracy_level``; ``benchmarks/qmoe_arithmetic.py``): no calibrated range is used for the experts.
    Why: calibrated QDQ experts run every expert's kernels, also those that got no row (29-30 decode tokens/s at
    granite-3.0-1b-a400m size, 2 threads; 53-58 as QMoE, at a next-token KL of 1.72e-6 from PyTorch either way;
    BENCHMARKS.md).

    Why the tables: QDQ stores a table with one scale for all of it. With 16-bit activations
    (``IntScheme.with_activations``) that scale was most of what was left of the mode's error (4-layer
    granite-shaped model: mean next-token KL from PyTorch 1.74e-6 with the table as QDQ uint8, 6.1e-7 with it
    float, 8.0e-7 in blocks); and onnxruntime gathers straight from an 8-bit table only when the Gather's output
    Q/DQ is 8-bit too, so at 16 bits it would dequantize the whole table at every run. A table whose rows are not a
    whole number of blocks stays float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    scheme = job.scheme
    cache = job.scratch("calibration.json")
    save_tensors_data(job.observed, cache)
    tables = job.names_of("Gather") if scheme.weight_block_size else set()
    source, _ = _experts_and_tables(job, 8, scheme.expert_block_size, tables, scheme.weight_block_size)
    names = job.names - tables  # the tables the pass left alone stay float
    # The prepare passes raised the opset for 16-bit types (IntScheme.opset), so onnxruntime converts nothing.
    graph = onnx.load(str(source), load_external_data=False)
    names = names & {node.name for node in graph.graph.node}  # the experts FuseExpertsPass put in QMoE nodes are gone

    def static(names: set[str]) -> Callable[[Path, Path], None]:
        present = _tensors_of(graph, names)  # onnxruntime refuses overrides for tensors the part lacks
        overrides = {name: value for name, value in job.overrides.items() if name in present}
        return lambda model, output: quantize_static(
            str(model), str(output), None, quant_format=QuantFormat.QDQ,
            # Only the targeted nodes' types: the attention Softmax input (-inf masked scores) would
            # otherwise yield NaN zero points.
            op_types_to_quantize=sorted({n.op_type for n in job.targets if n.name in names}),
            per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range, activation_type=QuantType[scheme.activation_type],
            weight_type=QuantType[scheme.weight_type], nodes_to_quantize=sorted(names),
            nodes_to_exclude=sorted(job.exclude), calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=str(cache), use_external_data_format=True,
            # DedicatedQDQPair: a tensor read by both a quantized node and the router (the shared experts'
            # Gemm and the gate read the same normed hidden states) gets its own Q/DQ per quantized
            # consumer; without it the router would read the dequantized copy.
            extra_options={"ActivationSymmetric": scheme.symmetric_activations, "WeightSymmetric": True,
                           "TensorQuantOverrides": overrides, "DedicatedQDQPair": True},
        )

    _in_parts(source, graph, names, static, "static", job.output)


def run_dynamic(job: QuantJob) -> None:
    """``quantize_dynamic``: int8 weights, activations quantized per run. With a float down-projection scheme (the
    targets that run onnxruntime's CPU contrib kernels), only the routed experts' gate and up projections get one
    int8 activation scale per tensor: every other MatMul (the expert down projections, attention, dense MLPs and
    shared experts, the lm_head) keeps float inputs with 8-bit block weights (``MatMulNBits``, which quantizes its
    input per block of a row), and the embedding table is stored in 8-bit blocks (``GatherBlockQuantized``)
    instead of with one scale for the whole table. With ``IntScheme.expert_block_size`` as well
    (``IntScheme.with_fused_experts``) each MoE layer's routed experts are one ``QMoE`` in 8-bit blocks
    (``passes.FuseExpertsPass``, as int8-blocks writes them), whose kernel quantizes its float input per block as
    it runs; the experts of a layer the pass leaves stay as above.

    Why: on the 4-layer granite-shaped model (benchmarks/vs_llamacpp.py, 256 held-out positions) int8-dynamic's
    mean next-token KL from PyTorch was 3.4e-6 with everything but the down projections per tensor, 1.5e-6 with
    the lm_head left float and 2.3e-6 with the embedding left float; with both in blocks 0.9e-6. On the 24-layer
    model that left 3.2e-6, 1.8x llama.cpp Q8_0's 1.81e-6: the per-tensor scales of attention's inputs add up over
    the layers. With attention in blocks too: 1.49e-6, decode 31.2 against 29.4 tokens/s (decode_ab, one run).
    The experts' gate and up projections in blocks as well (per expert, ``MatMulNBits``) gave 1.46e-6 and 35.5
    tokens/s but a 9% larger file and prefill 377 against 276 ms; as one QMoE a layer, which runs only the chosen
    experts: 52.8 against 33.4 tokens/s per expert (decode_ab), 1.11-1.31x llama.cpp Q8_0, KL 1.51e-6
    (BENCHMARKS.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    scheme = job.scheme
    blocks = scheme.down_activation_type == FLOAT
    # Everything the scheme widens: the MatMuls that are not a routed expert's, and the experts' down projections.
    wide = ((job.names_of("MatMul") - job.experts) | job.down) & job.names if blocks else set()
    tables = job.names_of("Gather") if blocks else set()
    # A table the pass left (its rows not a whole number of blocks) stays a Gather for the dynamic quantizer.
    source, tables = _experts_and_tables(job, 8, scheme.expert_block_size, tables, DEFAULT_EMBEDDING_BLOCK_SIZE)
    graph = onnx.load(str(source), load_external_data=False)
    left = {node.name for node in graph.graph.node}
    names, wide = job.names & left, wide & left  # the experts FuseExpertsPass put in QMoE nodes are gone
    first = job.scratch("dynamic.onnx") if wide else job.output

    def dynamic(names: set[str]) -> Callable[[Path, Path], None]:
        return lambda model, output: quantize_dynamic(
            str(model), str(output), op_types_to_quantize=["MatMul", "Gather"], per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range, weight_type=QuantType[scheme.weight_type],
            nodes_to_quantize=sorted(names), nodes_to_exclude=sorted(job.exclude), use_external_data_format=True)

    # In parts: the dynamic quantizer holds three copies of what it is given (see _on_part).
    _in_parts(source, graph, names - wide - tables, dynamic, "dynamic", first)
    if wide:
        _nbits(first, job.output, [(wide, 8, DEFAULT_BLOCK_SIZE)], job.exclude)


def run_fp16(job: QuantJob) -> None:
    """``onnxruntime.transformers.float16``: float16 weights and compute, float32 graph inputs and outputs.

    Streamed: the converter decides the graph (which nodes run in float16, where Casts go, which initializers
    become float16) on the graph without its weights, each external float32 initializer standing in as one value
    (``_ExternalWeights``); then the weights are converted (the converter's own ``convert_np_to_float16``) and
    written one at a time. In memory the converter held the float32 weights and their float16 copies at once: 1.52x
    the fp32 file at granite-3.0-1b-a400m size (BENCHMARKS.md, Memory)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16, convert_np_to_float16

    graph = onnx.load(str(job.source), load_external_data=False)
    weights = _ExternalWeights.stand_in(graph, job.source.parent)
    # disable_shape_infer: the prepared file carries its inferred shapes already. The converter appends the Casts
    # it adds for initializers after their consumers; quantize() puts the nodes back in topological order
    # (onnxruntime and the checker need it).
    converted = convert_float_to_float16(graph, keep_io_types=True, disable_shape_infer=True,
                                         op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                         node_block_list=sorted(job.exclude))
    weights.write(converted, job.output, to_float16=convert_np_to_float16)


@dataclass
class _ExternalWeights:
    """The external-data initializers of a model loaded without its weights, for a converter that must not load
    them: ``stand_in`` swaps each for a one-value tensor of its name and type (the shape it had and where its
    bytes are kept here); ``write`` puts the real weights back, streamed into ``<output>.data``, in the dtype the
    converter left each stand-in in."""

    base: Path
    kept: dict[str, tuple[list[int], int, dict[str, str]]]  # name -> (dims, data type, external data entries)

    @classmethod
    def stand_in(cls, model: onnx.ModelProto, base: Path) -> "_ExternalWeights":
        kept = {}
        for graph in [model.graph, *subgraphs(model.graph.node)]:
            for tensor in graph.initializer:
                if tensor.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                if tensor.name in kept:
                    raise ValueError(f"two external initializers named {tensor.name!r}: cannot stand them in")
                kept[tensor.name] = (list(tensor.dims), tensor.data_type,
                                     {entry.key: entry.value for entry in tensor.external_data})
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                del tensor.dims[:]
                tensor.dims.append(1)
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = np.zeros(1, dtype).tobytes()
        return cls(base, kept)

    def write(self, model: onnx.ModelProto, output: Path, to_float16: Callable[[np.ndarray], np.ndarray]) -> None:
        """Write ``model`` to ``output``, each stood-in weight read from its own file and converted to float16
        where the converter made its stand-in float16 (one tensor in memory at a time)."""
        location = external_data_name(output)
        offset = 0
        with open(output.with_name(location), "wb") as data:
            for graph in [model.graph, *subgraphs(model.graph.node)]:
                stood_in = {tensor.name for tensor in graph.initializer if tensor.name in self.kept}
                # The converter typed each float16 stand-in in value_info with its one-value shape: the real one.
                for info in graph.value_info:
                    if info.name in stood_in and info.type.HasField("tensor_type"):
                        shape = info.type.tensor_type.shape
                        del shape.dim[:]
                        for size in self.kept[info.name][0]:
                            shape.dim.add(dim_value=size)
                for tensor in graph.initializer:
                    if tensor.name not in stood_in:
                        continue
                    dims, dtype, external = self.kept[tensor.name]
                    values = self._read(dims, dtype, external)  # flat, as the converter reads raw data
                    if tensor.data_type == onnx.TensorProto.FLOAT16 and dtype == onnx.TensorProto.FLOAT:
                        values = to_float16(values)
                    raw = values.tobytes()
                    data.write(raw)
                    tensor.ClearField("raw_data")
                    del tensor.dims[:]
                    tensor.dims.extend(dims)
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                        tensor.external_data.add(key=key, value=value)
                    offset += len(raw)
        onnx.save_model(model, str(output))

    def _read(self, dims: list[int], dtype: int, external: dict[str, str]) -> np.ndarray:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        count = int(np.prod(dims, dtype=np.int64))
        values = np.fromfile(self.base / external["location"], dtype=np_dtype, count=count,
                             offset=int(external.get("offset", 0)))
        if values.size != count:
            raise ValueError(f"{external['location']} holds {values.size} of the {count} values of a weight")
        return values


def run_nbits(job: QuantJob) -> None:
    """``MatMulNBitsQuantizer`` at ``job.bits``: experts and the other MatMuls in their blocks and widths
    (``NBitsLayout``), the embedding in 8-bit or 4-bit blocks (GatherBlockQuantized)."""
    layout = job.layout
    gathers = job.names_of("Gather")
    matmuls = job.names - gathers
    # onnxruntime's n-bit quantizer packs Gather at 4 bits only: 8-bit blocks are GatherBlockQuantizedPass's (a table
    # it leaves stays float).
    tables = gathers if layout.embedding_bits == 8 else set()
    source, _ = _experts_and_tables(job, job.bits, layout.expert_block_size if layout.fused_experts else None,
                                    tables, layout.embedding_block_size)
    gathers = gathers - tables
    dense = matmuls - job.experts - job.head
    blocks = [(dense - job.kv, layout.dense_bits, layout.dense_block_size),
              (dense & job.kv, layout.kv_projection_bits, layout.dense_block_size),
              (matmuls & job.head, layout.head_bits, layout.head_block_size),
              (matmuls & job.experts, job.bits, layout.expert_block_size),
              (gathers, job.bits, layout.embedding_block_size)]
    _nbits(source, job.output, [block for block in blocks if block[0]], job.exclude)


QDQ_STATIC = ApplyStep("qdq_static", run_qdq_static, calibrated=True, down=STATIC_DOWN,
                       unprotected_ops=("Softmax", "Sigmoid"), quantizes_outputs=True)
# quantize_dynamic has no Gemm kernel, MatMulNBitsQuantizer skips Gemm: both get the Gemms as MatMuls.
DYNAMIC = ApplyStep("dynamic", run_dynamic, down=DYNAMIC_DOWN, gemms_as_matmuls=True)
FP16 = ApplyStep("fp16", run_fp16, integer_weights=False)
# MatMulNBits, QMoE and GatherBlockQuantized: onnxruntime's CPU (x86, arm) and CUDA kernels.
NBITS = ApplyStep("nbits", run_nbits, layout=True, gemms_as_matmuls=True, targets=("cpu", "arm", "cuda"))
