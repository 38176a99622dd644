"""``quantize(model, out, mode=...)``: what ``moeport quantize`` runs.

A pipeline: read the fp32 model's graph and find its routers and the nodes to quantize (``_read``); run the
calibration samples through it when the mode calibrates (``_calibrate``); write the quantized model
(``_write``: passes that prepare the graph, the mode's apply step, passes that finish it, the checker); measure
what it cost (``_measure``). The apply steps (``moeport.quant.apply``) are onnxruntime's tools:

- ``qdq_static`` (int8): ``quantize_static`` in QDQ format, per-channel weights, MinMax calibration (for CPU
  targets 16-bit activations and the weights then in blocks: ``IntScheme.with_activations``);
- ``dynamic`` (int8-dynamic): ``quantize_dynamic`` (weights int8, activations quantized per run; for CPU targets
  the other MatMuls and the table in 8-bit blocks, the routed experts one QMoE per layer:
  ``IntScheme.with_fused_experts``);
- ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with ``keep_io_types``;
- ``nbits`` (int4): ``MatMulNBitsQuantizer`` (MatMul -> MatMulNBits), asymmetric blocks along K (a 4-bit
  zero point per block): expert weights in 4-bit blocks of ``block_size``, the other MatMuls (attention,
  lm_head) in ``dense_bits`` blocks of ``dense_block_size`` (attention's key and value projections in
  ``kv_projection_bits``, the lm_head in ``head_bits``); the embedding Gather as GatherBlockQuantized in
  8-bit (or, with ``embedding_bits=4``, 4-bit) blocks. See ``NBitsLayout``.

Which nodes: the weight-carrying ones -- MatMul/Gemm whose second input is a 2-D initializer (the
per-expert weights, e.g. gate_up ``[hidden, 2*inter]`` and down ``[inter, hidden]``, attention
projections, lm_head) and Gather over an initializer (the embedding ``[vocab, hidden]``).
Activation x activation MatMuls (attention scores) stay float. With ``keep_router`` (the default) the
nodes of ``moeport.runtime.moe_graph.find_routers`` are excluded from every tool, so the gate projection,
Softmax/Sigmoid, TopK and weight normalisation stay float32.

Models of any size: the graph is read without its weights, every step hands the next a file whose weights
are in external data, and the output keeps its weights in ``<out>.data`` when the input had external data.
The output is written to a staging directory beside ``out`` and moved into place once it passes the checker.
"""


from __future__ import annotations

import functools
import os
import platform
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from moeport._fs import check_output_file, staged_file, work_directory, writing
from moeport.contract import (KV_CACHE_CONCAT, KV_CACHES, ModelInfo, Reference, is_cache_input, metadata_of_map,
                              metadata_props, optional_model_info, quantization_mode)
from moeport.errors import MoeportError
from moeport.quant import calibration as calib
from moeport.quant import quality as qual
from moeport.quant import ranges
from moeport.quant.apply import NBITS_ACCURACY_LEVEL, QuantJob
from moeport.quant.modes import QuantMode, get_mode, modes
from moeport.quant.passes import (CLEAR_METADATA, REMOVE_UNUSED, SHAPE_INFERENCE, TOPOLOGICAL_SORT,
                                  BlockWeightsPass, ExpertLayer, FloatOutputsPass, FuseAttentionPass, GemmAsMatMulPass,
                                  InlineSmallTensorsPass, MarkPreProcessedPass, PassRecord, RaiseOpsetPass,
                                  ShareCacheBufferPass, StackProjectionsPass, StampQuantizationPass,
                                  UntieTransposedWeightPass, external_data_name, node_metadata_bytes, run_passes,
                                  save_model)
from moeport.quant.result import QuantizeResult, QuantizeWarning
from moeport.quant.schemes import TARGETS, IntScheme, NBitsLayout, choose_scheme, default_mode
from moeport.runtime.fusions import cache_layers, unfused_layers
from moeport.runtime.inspect import graph_specs
from moeport.runtime.moe_graph import (ExpertGroup, RouterPlan, find_expert_matmuls, find_routers, float_router_nodes,
                                      load_graph, weight_bytes)
from moeport.runtime.placement import cpu_has_float16_matmul
from moeport.runtime.verify import check_reference, reference_warnings
from moeport.samples import TRAINED_DIR

DEFAULT_CALIBRATION_SAMPLES = 64
DEFAULT_LATENCY_RUNS = 20
# Weights below this (bytes) stay in a CPU's caches: the report explains a quantized model that is slower there.
SMALL_WEIGHTS = 32 * 2**20
# What quantization adds to a graph (the report counts them).
_QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul",
              "MatMulNBits", "GatherBlockQuantized", "QMoE", "GroupQueryAttention", "Cast")


def bundled_text(name: str) -> Path | None:
    """``samples/trained/<name>`` (calibration.txt, heldout.txt) when the trained sample is installed."""
    path = TRAINED_DIR / name
    return path if path.is_file() else None


@dataclass
class _Settings:
    """The user's choices, checked: the mode, its 8-bit scheme or int4 layout, whether routers stay float."""

    mode: QuantMode
    target: str
    keep_router: bool
    scheme: IntScheme | None
    layout: NBitsLayout | None
    fused_attention: bool = False  # attention as onnxruntime's GroupQueryAttention (passes.FuseAttentionPass)
    share_cache: bool = False  # a Concat cache recorded as a shared buffer (passes.ShareCacheBufferPass)

    @property
    def on_cpu(self) -> bool:
        """Whether the target runs on onnxruntime's CPU provider (``schemes.QuantTarget.cpu``)."""
        return TARGETS.get(self.target).cpu

    def to_dict(self) -> dict:
        """What the output's ``moeport.quantization`` metadata records."""
        return {"mode": self.mode.name, "target": self.target, "keep_router": self.keep_router,
                "scheme": None if self.scheme is None else self.scheme.to_dict(),
                "nbits_layout": None if self.layout is None else self.layout.to_dict(),
                "fused_attention": self.fused_attention, "share_cache": self.share_cache}


@dataclass
class _Source:
    """The fp32 model as the pipeline sees it: the file, its graph, metadata, routers and the nodes to quantize."""

    path: Path
    proto: onnx.ModelProto  # the graph, without its weights (moe_graph.load_graph)
    metadata: dict[str, str]  # every metadata_props entry, prefixes kept
    info: ModelInfo | None  # None: not a moeport export
    plan: RouterPlan
    experts: dict[ExpertGroup, list[onnx.NodeProto]]
    targets: list[onnx.NodeProto]
    exclude: set[str]  # node names no tool may touch (the routers, with keep_router)
    warnings: list[str] = field(default_factory=list)

    @property
    def external(self) -> bool:
        """The weights are in external data files (then the output's are too)."""
        return any(init.data_location == onnx.TensorProto.EXTERNAL for init in self.proto.graph.initializer)

    @property
    def labels(self) -> list[str] | None:
        return None if self.info is None else [layer.label for layer in self.info.layers]

    @property
    def vocab(self) -> int | None:
        return None if self.info is None else self.info.vocab_size


@dataclass
class _Calibrated:
    """The calibration samples, what they covered, and the range overrides they lead to."""

    data: calib.CalibrationSet
    report: dict  # QuantizeResult.calibration
    overrides: dict  # onnxruntime TensorQuantOverrides
    warnings: list[str]
    observed: object  # onnxruntime TensorsData: the observed range of every activation to quantize
    # Per router: the experts calibration starved (a warning) and the input tensors of the experts it routes
    starved: list[tuple[str, frozenset[str]]]
    borrowed: frozenset[str]  # the expert input tensors given their layer's range (overrides)

    def about_ranges(self, written: onnx.ModelProto) -> tuple[list[str], int]:
        """What the coverage means for the experts' own activation ranges in the file ``written``: (warnings, how many
        expert inputs use their layer's range). Only experts still quantized per expert at calibrated ranges count:
        an expert whose inputs ``written`` no longer reads went into a QMoE, which quantizes its float input itself."""
        read = {name for node in written.graph.node for name in node.input}
        messages = [message for message, tensors in self.starved if tensors & read]
        borrowed = len(self.borrowed & read)
        if borrowed:
            messages.append(f"{borrowed} expert input tensors saw too few calibration tokens; they use their "
                            "layer's activation range instead of their own")
        return messages, borrowed


def _settings(mode: str | None, target: str, keep_router: bool, down_activations: str, layout: NBitsLayout,
              calibration, random_calibration: bool, fused_attention: bool = False,
              activations: str = "auto") -> _Settings:
    on_cpu = TARGETS.get(target).cpu
    spec = get_mode(mode or default_mode(target, calibration is not None or random_calibration))
    step = spec.step
    if step.targets is not None and target not in step.targets:
        standard = ", ".join(m.name for m in modes() if m.step.targets is None)
        raise MoeportError(f"mode {spec.name} writes onnxruntime contrib operators (MatMulNBits, QMoE, "
                           f"GatherBlockQuantized) that target {target} cannot run; use one of {standard} "
                           f"({spec.name} runs on: {', '.join(step.targets)})")
    if step.layout:
        layout.validate()
    if not spec.needs_calibration and (calibration is not None or random_calibration):
        raise MoeportError(f"mode {spec.name} uses no calibration data; drop --calibration/--random-calibration")
    scheme = None
    if step.down is not None:  # an 8-bit step
        scheme = choose_scheme(target)
        if step.calibrated:
            scheme = scheme.with_activations(activations, target, step.down, on_cpu=on_cpu,
                                              fused_experts=layout.fused_experts)
        scheme = scheme.with_down_activations(down_activations, target, step.down)
        if not step.calibrated:
            scheme = scheme.with_fused_experts(layout.fused_experts)
    elif down_activations != "auto":
        takers = " and ".join(m.name for m in modes() if m.step.down is not None)
        raise MoeportError(f"--down-activations applies to {takers}, not {spec.name}")
    if activations != "auto" and not (step.down is not None and step.calibrated):
        takers = " and ".join(m.name for m in modes() if m.step.down is not None and m.step.calibrated)
        raise MoeportError(f"--activations applies to {takers}, not {spec.name}")
    # GroupQueryAttention's CPU kernel is float32/float16; its CUDA kernel takes no float32, and NNAPI, QNN and
    # Core ML have none: only integer-weight modes for CPUs get it.
    fused = fused_attention and on_cpu and step.integer_weights
    return _Settings(spec, target, keep_router, scheme, layout if step.layout else None, fused)


def _share_cache(source: _Source, settings: _Settings, kv_cache: str | None) -> bool:
    """Whether the output is to record a Concat-cache export's cache as a shared buffer (``kv_cache="shared"``);
    refuses what cannot be done, before any work."""
    if kv_cache is None:
        return False
    if kv_cache not in KV_CACHES:
        raise MoeportError(f"unknown KV cache {kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
    exported = metadata_of_map(source.metadata).get("kv_cache")
    if exported is None:
        raise MoeportError(f"--kv-cache applies to text-generation-with-past exports; {source.path} has no KV cache")
    if kv_cache == exported:
        return False
    if kv_cache == KV_CACHE_CONCAT:
        raise MoeportError(f"{source.path} keeps a shared buffer; a Concat cache needs an export with --kv-cache "
                           "concat")
    if not settings.fused_attention:
        raise MoeportError("--kv-cache shared on a Concat-cache export needs its attention fused into onnxruntime's "
                           "GroupQueryAttention (an integer mode, --target cpu or arm, without --no-fused-attention); "
                           "else export with --kv-cache shared")
    return True


def _copies_its_cache(source: _Source, quantized: onnx.ModelProto) -> bool:
    """A Concat-cache export whose every layer's attention the output runs as GroupQueryAttention: what
    ``kv_cache="shared"`` would take (``passes.ShareCacheBufferPass``)."""
    if metadata_of_map(source.metadata).get("kv_cache") != KV_CACHE_CONCAT:
        return False
    graph = ir.from_proto(quantized.graph)  # the graph alone (its weights stay on disk)
    return bool(cache_layers(graph)) and not unfused_layers(graph)


def _block_widths(source: _Source) -> tuple[set[int], set[int], set[int]]:
    """The widths block sizes must divide: (each expert weight's input width, each other MatMul weight's input
    width, the embedding table's row length), from ``_matmul_weights`` and the Gathers."""
    expert_nodes = {node.name for nodes in source.experts.values() for node in nodes}
    dims = {init.name: list(init.dims) for init in source.proto.graph.initializer}
    tables = {dims[node.input[0]][1] for node in source.targets if node.op_type == "Gather"}
    experts, dense = set(), set()
    for name, (width, _) in _matmul_weights(source).items():
        (experts if name in expert_nodes else dense).add(width)
    return experts, dense, tables


def _check_paths(model: Path, out: Path, force: bool) -> None:
    if not model.is_file():
        raise MoeportError(f"model file not found: {model}")
    if out.resolve() == model.resolve():
        raise MoeportError(f"output {out} is the input model; choose another file name")
    check_output_file(out, force)


def _read(model: Path, settings: _Settings) -> _Source:
    """The model's graph (weights stay on disk) and metadata, its routers and experts, and the nodes to quantize."""
    # also refuses external data outside the model's directory, and files onnx_ir will not read (hard links)
    graph = load_graph(model, single_links=True)
    plan = find_routers(graph)
    exclude = set(plan.nodes) if settings.keep_router else set()
    targets = _weight_nodes(graph, exclude)
    if not settings.keep_router:
        # Unprotected means "as onnxruntime's defaults would do": QDQ puts Q/DQ on Softmax/Sigmoid too (Softmax
        # on a fixed [0, 1] grid), which is what makes TopK see ties.
        router_nodes = set(plan.nodes)
        targets += [n for n in graph.graph.node
                    if n.name in router_nodes and n.op_type in settings.mode.step.unprotected_ops]
    found = [] if plan.routers else ["no MoE router (a TopK or ArgMax over scores from a gate projection) found in "
                                     "the graph"]
    return _Source(model, graph, {p.key: p.value for p in graph.metadata_props},
                   optional_model_info(metadata_props(graph), model), plan, find_expert_matmuls(graph), targets,
                   exclude, found)


def _matmul_weights(source: "_Source") -> dict[str, tuple[int, int]]:
    """The MatMuls among the targets, by name: their weight's shape ``(K, N)`` (a tied lm_head's read through
    the Transpose of the ``[N, K]`` embedding table)."""
    inits = {i.name: list(i.dims) for i in source.proto.graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in source.proto.graph.node if n.op_type == "Transpose"}
    shapes = {}
    for node in source.targets:
        if node.op_type == "MatMul" and len(node.input) > 1:
            if len(inits.get(node.input[1], ())) == 2:
                shapes[node.name] = tuple(inits[node.input[1]])
            elif len(inits.get(transposed.get(node.input[1]), ())) == 2:
                shapes[node.name] = tuple(reversed(inits[transposed[node.input[1]]]))
    return shapes


def _head_names(source: "_Source") -> set[str]:
    """The lm_head: the MatMuls among the targets whose weight has a vocabulary-sized axis (directly, or through
    the Transpose of a tied embedding) and whose output reaches a graph output through no other MatMul-like node.
    Why both: a small model's vocabulary can be as wide as other weights (the bundled sample's 256 bytes, and its
    experts' gate and up, 128 x 256), and those went into the lm_head's blocks."""
    if source.vocab is None:
        return set()
    wide = {name for name, shape in _matmul_weights(source).items() if source.vocab in shape}
    graph = source.proto.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {output.name for output in graph.output}

    def reaches_an_output(node: onnx.NodeProto) -> bool:
        seen, frontier = set(), list(node.output)
        while frontier:
            name = frontier.pop()
            if name in outputs:
                return True
            for reader in readers.get(name, ()):
                if reader.op_type not in _PRODUCT_OPS and id(reader) not in seen:
                    seen.add(id(reader))
                    frontier.extend(reader.output)
        return False

    return {node.name for node in graph.node if node.name in wide and reaches_an_output(node)}


# Nodes that multiply by a weight: a walk to the logits that meets one has left the lm_head behind.
_PRODUCT_OPS = {"MatMul", "Gemm", "MatMulNBits", "QMoE", "MoE", "MatMulInteger", "FusedMatMul"}


#: Ops between a key/value projection and attention's MatMuls: head layout, rotary embedding, the KV cache.
_KV_PATH_OPS = {"Reshape", "Transpose", "Concat", "Unsqueeze", "Squeeze", "Expand", "Tile", "Mul", "Add", "Sub",
                "Neg", "Split", "Slice", "Cast", "Identity", "ScatterND"}


def _kv_projection_names(source: "_Source") -> set[str]:
    """The MatMuls among the targets that project attention's keys and values: those reached backwards from the
    second operand of a MatMul between two activations (``q @ k^T``, ``probs @ v``) through head layout, rotary
    and cache ops only (``_KV_PATH_OPS``). The queries (first operand) and the output projection are not."""
    targets = {node.name for node in source.targets if node.op_type == "MatMul"}
    inits = {init.name for init in source.proto.graph.initializer}
    producers = {out: node for node in source.proto.graph.node for out in node.output}
    found, seen = set(), set()
    frontier = [node.input[1] for node in source.proto.graph.node
                if node.op_type == "MatMul" and len(node.input) == 2 and not inits & set(node.input)]
    while frontier:
        value = frontier.pop()
        node = producers.get(value)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.name in targets:
            found.add(node.name)
        elif node.op_type in _KV_PATH_OPS and node.domain in ("", "ai.onnx"):
            frontier.extend(i for i in node.input if i and i not in inits)
    return found


def _weight_nodes(model: onnx.ModelProto, exclude: set[str]) -> list[onnx.NodeProto]:
    """MatMul/Gemm with a 2-D initializer weight (for a MatMul, also one read through a 2-D Transpose: a tied
    lm_head, see ``UntieTransposedWeightPass``) and Gather over an initializer at indices computed by the graph
    (an embedding lookup), minus ``exclude``. A Gather at a constant index picks a fixed row (gpt-oss's per-expert
    biases at real size, where the export does not fold them): one row is read, so storing the table in fewer
    bits saves no time and only costs precision."""
    inits = {i.name: i for i in model.graph.initializer}
    constants = set(inits) | {n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output}
    transposed = {n.output[0]: n.input[0] for n in model.graph.node
                  if n.op_type == "Transpose" and n.domain in ("", "ai.onnx")
                  and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([], [[1, 0]])}
    chosen = []
    for node in model.graph.node:
        if node.name in exclude:
            continue
        weight = node.input[1] if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
        if node.op_type == "MatMul" and weight in transposed:
            weight = transposed[weight]
        if weight is not None and len(inits.get(weight, _NO).dims) == 2:
            chosen.append(node)
        elif node.op_type == "Gather" and len(inits.get(node.input[0], _NO).dims) == 2 \
                and node.input[1] not in constants:
            chosen.append(node)
    return chosen


_NO = onnx.TensorProto()  # stands in for "not an initializer" (no dims)


def _calibration_source(calibration, random_calibration: bool):
    if random_calibration:
        if calibration is not None:
            raise MoeportError("give either --calibration or --random-calibration, not both")
        return calib.RANDOM
    if calibration is not None:
        return calibration
    source = bundled_text("calibration.txt")
    if source is None:
        raise MoeportError("int8 needs calibration data: pass --calibration FILE (text, .jsonl or .npz), "
                           "or --random-calibration to accept random tokens")
    return source


def _calibrate(source: _Source, settings: _Settings, calibration, random_calibration: bool, samples: int,
               encoder: calib.TextEncoder | None) -> _Calibrated:
    """Load the calibration samples, run them through the fp32 model (coverage per expert, observed ranges) and
    derive the range overrides: borrowed ranges for starved experts, 16-bit down-projection inputs."""
    graph = source.proto.graph
    initializers = {x.name for x in graph.initializer}
    inputs, outputs = graph_specs(graph)
    data = calib.load_calibration(_calibration_source(calibration, random_calibration), inputs=inputs,
                                  outputs=outputs, vocab_size=source.vocab, samples=samples, encoder=encoder)
    found = list(data.warnings)
    expert_inputs = ranges.expert_inputs(source.experts, source.targets)
    activations = ranges.activation_tensors(source.targets, initializers)
    coverage, observed = ranges.coverage(source.path, source.plan, data, source.labels, expert_inputs, activations)
    overrides = ranges.borrowed_ranges(observed, expert_inputs)
    borrowed = frozenset(overrides)
    if settings.scheme.down_activation_type is not None:  # static: a 16-bit type
        overrides = ranges.wide_down_inputs(overrides, expert_inputs, settings.scheme.down_activation_type)
    routed = _routed_expert_inputs(source, expert_inputs)
    starved = [(f"experts {cov.starved} of layer {cov.label} got under 10% of an even share of the "
                f"{sum(cov.counts)} calibration slots; their activation ranges rest on few tokens",
                routed.get(router.indices_output, frozenset()))
               for router, cov in zip(source.plan.routers, coverage) if cov.starved]
    report = {"source": data.source, "samples": len(data.samples), "tokens": data.tokens,
              "coverage": [c.to_dict() for c in coverage], "borrowed_ranges": len(borrowed)}
    return _Calibrated(data, report, overrides, found, ranges.tensors_data(observed, activations), starved, borrowed)


def _routed_expert_inputs(source: _Source, expert_inputs: dict) -> dict[str, frozenset[str]]:
    """{router's selected-experts tensor: the input tensors of every expert MatMul of the layer it routes}
    (``expert_inputs``: ``ranges.expert_inputs``). A layer is its experts' dispatch (``ExpertGroup.rows``)."""
    rows_of_down = {nodes[0].name: group.rows for group, nodes in source.experts.items() if nodes}
    inputs_of_rows: dict[str, set[str]] = {}
    for group, inputs in expert_inputs.items():
        inputs_of_rows.setdefault(group.rows, set()).update(inputs.values())
    return {layer.indices: frozenset(inputs_of_rows.get(rows_of_down[layer.downs[0]], ()))
            for layer in _expert_layers(source)}


def _float16_note(target: str) -> str:
    """Why a float16 file for a CPU ``target`` is no faster there, where onnxruntime's CPU provider has no float16
    MatMul kernel (``runtime.placement.cpu_has_float16_matmul``)."""
    return (f"for target {target}: onnxruntime's CPU provider on this machine ({platform.machine()}) has no float16 "
            "MatMul kernel, so it casts the weights back to float32 when it loads the file and each product's input at "
            "every run: half fp32's size on disk, but fp32's memory and slower (granite-3.0-1b-a400m size, 2 threads: "
            "decode 11.9 against fp32's 15.5 tokens/s, 5.5 GB resident either way, 8.0 GB at load against 5.7; "
            "BENCHMARKS.md). On a CPU, int8-blocks and int4 are smaller and faster; fp16 is for --target cuda or "
            "coreml")


def _eight_bit_note(target: str, calibrated: bool, fused: bool) -> str | None:
    """What int8-blocks would do instead, for an int8 (``calibrated``) or int8-dynamic file for a CPU ``target``;
    ``fused``: its experts are QMoE nodes. None where int8-blocks would do no better (int8-dynamic with QMoE
    experts)."""
    if fused and not calibrated:
        return None
    if fused:
        return (f"for target {target}, int8-blocks is a little faster and closer, without calibration: at "
                "granite-3.0-1b-a400m size, 2 threads, int8 decoded 53-62 tokens/s at a next-token KL of 1.72e-6 "
                "from PyTorch, int8-blocks 55-70 at 1.65e-6, llama.cpp Q8_0 47-52 at 1.81e-6 (BENCHMARKS.md)")
    return (f"for target {target}, int8-blocks decodes about twice as fast: this file runs every expert's MatMuls, "
            "also those of experts that got no row, where int8-blocks (and this mode with --fused-experts, its "
            "default outside transformers.js folders) runs each MoE layer's chosen experts in one QMoE "
            "(granite-3.0-1b-a400m size, 2 threads: int8-dynamic per expert 31-34 decode tokens/s, as QMoE 53-56; "
            "int8 per expert 29-31; int8-blocks 55-66; llama.cpp Q8_0 46-52; BENCHMARKS.md)")


def _expert_layers(source: _Source) -> list[ExpertLayer]:
    """The MoE layers: each layer's down projections in expert order, with the selected-experts tensor of the
    router before it in graph order (a router precedes the dispatch it feeds, and follows the previous layer's)."""
    order = {node.name: i for i, node in enumerate(source.proto.graph.node)}
    routers = sorted(source.plan.routers, key=lambda router: order.get(router.selection, -1))
    layers = []
    for group, nodes in sorted(source.experts.items(), key=lambda item: order.get(item[1][0].name, -1)):
        if not group.is_down_projection or not nodes:
            continue
        before = [r for r in routers if order.get(r.selection, len(order)) < order[nodes[0].name]]
        if before:
            layers.append(ExpertLayer(tuple(n.name for n in nodes), before[-1].indices_output))
    return layers


def _write(source: _Source, out: Path, settings: _Settings,
           calibrated: _Calibrated | None) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Prepare the graph (passes), run the mode's apply step, finish the result (passes) and check it. Files all
    the way, weights in external data (never a protobuf over 2 GB, never two copies of the model in memory);
    the output has external data when the input had. Written to a staging directory and moved to ``out`` only
    when every step succeeded. Returns the output's graph (without weights) and what the passes did."""
    step = settings.mode.step
    matmuls = {n.name for n in source.targets if n.op_type == "MatMul"}
    prepare = [InlineSmallTensorsPass(), CLEAR_METADATA]
    if step.integer_weights:
        prepare += [UntieTransposedWeightPass(matmuls)]
    # With 16-bit activations onnxruntime's CPU provider has no QDQ Gemm kernel (it would dequantize the weight
    # at every run); a MatMul over the same weight becomes MatMulNBits (BlockWeightsPass).
    if step.gemms_as_matmuls or (settings.scheme is not None and settings.scheme.wide_activations):
        prepare += [GemmAsMatMulPass({n.name for n in source.targets if n.op_type == "Gemm"})]
    prepare += [REMOVE_UNUSED]
    if settings.scheme is not None and settings.scheme.opset is not None:
        prepare += [RaiseOpsetPass(settings.scheme.opset)]
    prepare += [SHAPE_INFERENCE, MarkPreProcessedPass()]
    finish = [StampQuantizationPass(source.metadata, settings.to_dict()), TOPOLOGICAL_SORT]
    float_outputs = [FloatOutputsPass(matmuls)] if step.quantizes_outputs and settings.on_cpu else []
    if step.layout or (settings.scheme is not None and settings.scheme.weight_block_size):
        # after the attention fusion (below), which matches what the projections feed; static int8's MatMulNBits
        # come from BlockWeightsPass (before the fusion)
        finish = [StackProjectionsPass(), REMOVE_UNUSED] + finish
    if settings.fused_attention and any(is_cache_input(i.name) for i in source.proto.graph.input):
        # after the apply step: the quantizers see the attention as exported
        fusion = FuseAttentionPass()
        finish = [fusion, REMOVE_UNUSED] + ([ShareCacheBufferPass(fusion)] if settings.share_cache else []) + finish
    expert_names = {name for nodes in source.experts.values() for name in (n.name for n in nodes)}
    down_names = {n.name for group, nodes in source.experts.items() if group.is_down_projection for n in nodes}
    with staged_file(out) as staging, writing(out), work_directory(out) as work:
        # writing(out): onnxruntime's tools write files too; a full disk is a user error about ``out``.
        prepared, quantized, staged = Path(work) / "prepared.onnx", Path(work) / "quantized.onnx", staging / out.name
        model = ir.load(source.path)  # external weights are read when written, one tensor at a time
        records = run_passes(model, prepare)
        save_model(model, prepared, external_data=True)
        del model
        job = QuantJob(prepared, quantized, source.targets, source.exclude, expert_names, down_names,
                       settings.mode.bits, scheme=settings.scheme, layout=settings.layout,
                       calibration=None if calibrated is None else calibrated.data,
                       overrides={} if calibrated is None else calibrated.overrides,
                       observed=None if calibrated is None else calibrated.observed, layers=_expert_layers(source),
                       head=_head_names(source), kv=_kv_projection_names(source))
        step.run(job)
        records += job.records
        if settings.scheme is not None and settings.scheme.weight_block_size:
            # After FloatOutputsPass, which finds the MatMuls this turns into MatMulNBits; the fp32 weights are still
            # in ``prepared``.
            finish = [BlockWeightsPass(matmuls, prepared, settings.scheme.weight_block_size, NBITS_ACCURACY_LEVEL),
                      REMOVE_UNUSED] + finish
        finish = float_outputs + finish
        model = ir.load(quantized)
        records += run_passes(model, finish)
        save_model(model, staged, external_data=source.external)
        del model
        onnx.checker.check_model(str(staged))  # the path: a model over 2 GB cannot be checked in memory
        written = load_graph(staged)
    return written, records


def _measure(source: _Source, out: Path, quantized: onnx.ModelProto, settings: _Settings, *,
             reference: Reference | None, encoder, heldout, perplexity: bool, heldout_tokens: int | None,
             latency_runs: int, parity_shapes) -> qual.QualityReport:
    """Size, parity with ``reference``, perplexity and routing on held-out text, latency: before vs after.
    ``heldout_tokens``: perplexity reads at most this many tokens of the text (None: all of it)."""
    model, graph, spec = source.path, source.proto, settings.mode
    report = qual.QualityReport(qual.model_size(model), qual.model_size(out), weight_bytes(graph),
                                weight_bytes(quantized), node_metadata_bytes(graph))
    text_path = Path(heldout) if heldout is not None else bundled_text("heldout.txt")
    if text_path is not None and not text_path.is_file():
        raise MoeportError(f"held-out text not found: {text_path}")
    heldout_ids = None if text_path is None or encoder() is None else encoder().encode(text_path.read_bytes())
    if reference is not None:
        # On held-out text when there is some: routing is judged on data like the deployment's (random ids
        # route unlike any text the model will see). Random ids when there is no text, or at the
        # parity_shapes the caller asked for.
        on_text = parity_shapes is None and heldout_ids is not None
        report.parity = qual.parity(out, reference, spec.min_routing_agreement, parity_shapes or qual.PARITY_SHAPES,
                                    qual.parity_windows(heldout_ids) if on_text else None)
    opsets = [{o.domain or "ai.onnx": o.version for o in m.opset_import}.get("ai.onnx") for m in (graph, quantized)]
    if opsets[0] != opsets[1]:
        report.notes.append(f"opset {opsets[0]} -> {opsets[1]}: onnxruntime's quantizer needs it for the ops it wrote")
    if not perplexity:
        report.notes.append("perplexity not measured (skipped on request)")
    elif encoder() is None:
        report.notes.append("no perplexity: the model is not byte-level and no tokenizer was found (give a "
                            "directory holding one: --checkpoint, --tokenizer)")
    elif heldout_ids is None:
        report.notes.append("no perplexity: no held-out text (pass --heldout FILE)")
    else:
        ppl = qual.heldout_quality(model, out, heldout_ids, [r.indices_output for r in source.plan.routers],
                                   max_tokens=heldout_tokens)
        report.perplexity_before, report.perplexity_after, report.heldout_tokens, routing, top1 = ppl
        report.heldout_text_tokens = int(heldout_ids.size)
        read = report.heldout_tokens // (qual.PPL_WINDOW - 1) * qual.PPL_WINDOW  # each window scores all but its first
        if read < heldout_ids.size - qual.PPL_WINDOW:  # more than the partial window at the end was left out
            report.notes.append(f"perplexity read {read} of the held-out text's {heldout_ids.size} tokens, in evenly "
                                f"spaced windows of {qual.PPL_WINDOW} (--heldout-tokens to read more)")
        labels = source.labels
        if labels and len(labels) == len(routing):
            routing, top1 = dict(zip(labels, routing.values())), dict(zip(labels, top1.values()))
        report.heldout_routing, report.heldout_top1 = routing, top1
    if latency_runs > 0:
        # Held-out text when there is some (an MoE's experts, and so its time, depend on what it routes), the
        # seeded random ids otherwise.
        ids = (heldout_ids[:qual.LATENCY_SHAPE[1]][None].astype(np.int64)
               if heldout_ids is not None and heldout_ids.size >= qual.LATENCY_SHAPE[1] else
               np.random.default_rng(0).integers(0, source.vocab or 2, size=qual.LATENCY_SHAPE, dtype=np.int64))
        timed = qual.latency_ms(model, out, ids, latency_runs)
        report.latency_of = qual.latency_kind([i.name for i in graph.graph.input], ids.shape[1])
        report.latency_before_ms, report.latency_after_ms = timed[report.latency_of]
        # A with-past model's prefill too: at many rows the quantized kernels can be slower than float SGEMM
        # (BENCHMARKS.md, benchmarks/nbits_rows.py), which the decode step hides.
        if (prefill := qual.prefill_kind(ids.shape[1])) in timed:
            report.prefill_of = prefill
            report.prefill_before_ms, report.prefill_after_ms = timed[prefill]
        # (A float16 file for a CPU has its own note: quantize's _float16_note.)
        if (report.latency_after_ms > report.latency_before_ms and report.weights_before < SMALL_WEIGHTS
                and settings.mode.step.integer_weights):
            # Why, by what was timed. One row (a decode step): little compute, so the kernels' own cost. Many rows:
            # compute; the bundled sample's 1x128 profile has its 4 QMoE nodes alone slower than all 85 float
            # MatMuls of the fp32 file (BENCHMARKS.md, "The demo's quantized latency").
            why = (" and its time goes to per-kernel overhead, which quantized kernels add to"
                   if report.latency_of.startswith("decode") else
                   ", and at many rows onnxruntime's block-quantized kernels compute slower than float SGEMM "
                   "(benchmarks/nbits_rows.py)")
            report.notes.append(
                f"slower than fp32 here (latency {report.latency_of}): this model's "
                f"{report.weights_before / 2**20:.1f} MiB of weights fit in the CPU's caches, so reading fewer bytes "
                f"gains nothing{why}; on a 1.3B-parameter MoE the 8-bit and 4-bit block modes decoded 2.5-4.3x "
                "and 3.2-6.1x faster than fp32 (BENCHMARKS.md)")
        elif (report.prefill_of and report.weights_before >= SMALL_WEIGHTS
              and report.prefill_after_ms > report.prefill_before_ms):
            report.notes.append(
                f"the {report.prefill_of} is slower than fp32's here: with many rows a product is compute-bound, and "
                "onnxruntime's block-quantized kernels can compute slower than float SGEMM on a CPU where they decode "
                "one row faster (benchmarks/nbits_rows.py times them on this machine)")
    return report


def quantize(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mode: str | None = None,
    target: str = "cpu",
    calibration: str | os.PathLike | None = None,
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    random_calibration: bool = False,
    keep_router: bool = True,
    reference: Reference | None = None,
    tokenizer: str | os.PathLike | None = None,
    heldout: str | os.PathLike | None = None,
    block_size: int | None = None,
    dense_block_size: int | None = None,
    embedding_bits: int = 8,
    dense_bits: int = 8,
    head_bits: int | None = None,
    head_block_size: int | None = None,
    kv_projection_bits: int = 8,
    embedding_block_size: int | None = None,
    fused_experts: bool = True,
    fused_attention: bool = True,
    kv_cache: str | None = None,
    down_activations: str = "auto",
    activations: str = "auto",
    latency_runs: int = DEFAULT_LATENCY_RUNS,
    perplexity: bool = True,
    heldout_tokens: int = qual.PPL_MAX_TOKENS,
    parity_shapes: tuple[tuple[int, int], ...] | None = None,
    force: bool = False,
) -> QuantizeResult:
    """Quantize the ONNX file ``model`` into ``out`` and measure what it cost (see the module docstring).

    ``mode``: a registered mode (``moeport.quant.modes``); None: the ``target``'s default
    (``schemes.default_mode``: int8-blocks for cpu/arm, int8 for nnapi/qnn or when calibration data is given,
    fp16 for cuda/coreml).
    ``calibration``: text/JSONL/.npz path (int8 only); None uses the bundled ``calibration.txt`` of the
    trained sample; ``random_calibration=True`` uses random ids (with a warning). ``heldout``: text for
    perplexity (default: the bundled ``heldout.txt``). ``reference``: the model ``model`` was exported from,
    for parity (the exporter's ``CheckpointReference`` runs a PyTorch checkpoint). ``tokenizer``: a directory
    with the model's ``tokenizer.json`` (e.g. the checkpoint) for text calibration and perplexity.
    ``block_size``, ``dense_block_size``, ``dense_bits``, ``head_bits``, ``head_block_size``, ``kv_projection_bits``,
    ``embedding_bits``, ``embedding_block_size``, ``fused_experts`` (int4, int8-blocks): see ``NBitsLayout``;
    ``fused_experts`` also applies to int8 with 16-bit activations on cpu/arm (``IntScheme.with_activations``) and to
    int8-dynamic with float down-projection inputs on cpu/arm (``IntScheme.with_fused_experts``);
    ``fused_attention``: each layer's attention of a with-past model as onnxruntime's ``GroupQueryAttention``
    (``passes.FuseAttentionPass``; integer modes for cpu/arm targets only, others ignore it). ``kv_cache``
    (contract ``KV_CACHES``; None keeps the export's): ``shared`` turns a Concat-cache export into a shared-buffer
    model (``passes.ShareCacheBufferPass``: needs every layer's attention fused).
    ``head_bits=None`` takes the mode's width (int4: 4, int8-blocks: 8); ``block_size=None`` the mode's width's
    default (``schemes.DEFAULT_EXPERT_BLOCK_SIZES``: int4 256 on CPU targets, 128 for cuda; int8-blocks 128),
    ``embedding_block_size=None`` ``schemes.DEFAULT_EMBEDDING_BLOCK_SIZE`` (32), ``dense_block_size=None``
    ``schemes.dense_block_default`` (int4: 128 for 8-bit attention, 64 for 4-bit attention with 8-bit key/value
    projections; else 32), ``head_block_size=None`` ``schemes.HEAD_BLOCK_SIZE_8BIT`` (128) for an 8-bit lm_head,
    ``schemes.HEAD_BLOCK_SIZE_4BIT`` (32) for a 4-bit one.
    ``down_activations`` (int8, int8-dynamic): auto|int8|int16|float, how the expert down-projection
    inputs are kept (auto: int16 for int8 and float for int8-dynamic where the target runs it, see
    ``IntScheme``). ``activations`` (int8): auto|int8|int16, the width of every activation Q/DQ (auto: int16
    for cpu/arm targets, int8 elsewhere; ``IntScheme.with_activations``). ``parity_shapes``: random-id shapes
    for parity (default: held-out text windows when there is text, else ``quality.PARITY_SHAPES``).
    ``latency_runs=0`` skips the latency
    measurement, ``perplexity=False`` the held-out text pass; ``heldout_tokens``: perplexity reads at most this many
    tokens of the held-out text (``quality.heldout_windows``; 0: all of it).
    """
    started = time.perf_counter()
    model, out = Path(model), Path(out)
    settings = _settings(mode, target, keep_router, down_activations,
                         NBitsLayout(block_size, dense_block_size, embedding_bits, dense_bits, fused_experts, head_bits,
                                     kv_projection_bits, embedding_block_size, head_block_size=head_block_size),
                         calibration,
                         random_calibration, fused_attention, activations)
    if heldout_tokens < 0 or 0 < heldout_tokens < qual.PPL_WINDOW:
        raise MoeportError(f"heldout tokens {heldout_tokens}: perplexity reads windows of {qual.PPL_WINDOW} tokens; "
                           f"give at least {qual.PPL_WINDOW}, or 0 for the whole text")
    _check_paths(model, out, force)
    source = _read(model, settings)
    done = quantization_mode(metadata_of_map(source.metadata))
    if done is not None:
        # Its MatMuls are quantizer ops already: quantizing it again found nothing to do and wrote a copy whose
        # report named the new mode's layout.
        raise MoeportError(f"{model} is already quantized ({done}); quantize the float32 file it was made from")
    if reference is not None and source.info is not None:
        # Before the minutes of quantizing: a checkpoint of another model is an error; one whose files hash
        # differently from the export's, a warning in the result.
        check_reference(model, source.info, reference)
        source.warnings += reference_warnings(metadata_of_map(source.metadata), reference)
    settings.share_cache = _share_cache(source, settings, kv_cache)
    if settings.layout is not None:
        settings.layout = settings.layout.resolved_for(settings.mode.bits, *_block_widths(source),
                                                       on_cpu=settings.on_cpu)
    elif settings.scheme is not None and settings.scheme.expert_block_size:  # int8's and int8-dynamic's QMoE experts
        settings.scheme = settings.scheme.with_expert_widths(_block_widths(source)[0])

    @functools.cache
    def encoder() -> calib.TextEncoder | None:
        # The checkpoint's tokenizer when it has one (read once, and only when text is encoded).
        return calib.text_encoder(source.vocab, tokenizer)

    if perplexity or settings.mode.needs_calibration:
        encoder()  # a tokenizer that cannot be read is reported now, not after the model is quantized
    calibrated = None
    if settings.mode.needs_calibration:
        calibrated = _calibrate(source, settings, calibration, random_calibration, calibration_samples, encoder())
    found = source.warnings + ([] if calibrated is None else calibrated.warnings)
    for message in found:
        warnings.warn(message, QuantizeWarning, stacklevel=2)
    quantized, passes = _write(source, out, settings, calibrated)
    if calibrated is not None:
        about_ranges, calibrated.report["borrowed_ranges"] = calibrated.about_ranges(quantized)
        for message in about_ranges:
            warnings.warn(message, QuantizeWarning, stacklevel=2)
        found += about_ranges
    try:
        report = _measure(source, out, quantized, settings, reference=reference, encoder=encoder, heldout=heldout,
                          perplexity=perplexity, heldout_tokens=heldout_tokens or None,  # 0: all of it
                          latency_runs=latency_runs,
                          parity_shapes=parity_shapes)
    except BaseException:
        # A file whose report failed (a parity run that could not start, an interrupt) is not left as if done.
        for path in (out, out.with_name(external_data_name(out))):
            path.unlink(missing_ok=True)
        raise
    if settings.fused_attention and not settings.share_cache and _copies_its_cache(source, quantized):
        report.notes.append("its KV cache is a Concat cache, which the fused attention copies whole at every step; "
                            "--kv-cache shared records it as one buffer written in place (int4 at granite-3.0-1b-a400m "
                            "size: decode 3-7% faster at a 128-token context, 15% at 512; BENCHMARKS.md), and the file "
                            "still runs as a Concat cache too (a model folder: export it with --kv-cache shared)")
    before, after = (Counter(n.op_type for n in m.graph.node) for m in (source.proto, quantized))
    if settings.on_cpu and settings.mode.step.down is not None:  # int8, int8-dynamic
        note = _eight_bit_note(target, settings.mode.step.calibrated, fused=bool(after["QMoE"]))
        if note:
            report.notes.append(note)
    if settings.on_cpu and not settings.mode.step.integer_weights and not cpu_has_float16_matmul():  # fp16
        report.notes.append(_float16_note(target))
    layout = settings.layout
    if layout is not None and layout.fused_experts and not after["QMoE"]:
        # The report states the layout written: no layer's experts fit QMoE (FuseExpertsPass says why).
        layout = replace(layout, fused_experts=False)
    scheme = settings.scheme
    if scheme is not None and scheme.expert_block_size and not after["QMoE"]:
        scheme = replace(scheme, expert_block_size=None)  # as the layout's: what was written
    return QuantizeResult(
        input=model, output=out, mode=settings.mode, target=target, scheme=scheme, keep_router=keep_router,
        router=source.plan, router_kept_float=float_router_nodes(quantized) if keep_router else {},
        quantized_nodes=dict(Counter(n.op_type for n in source.targets)),
        output_ops={op: after[op] - before[op] for op in _QUANT_OPS if after[op] != before[op]},
        casts_added=after["Cast"] - before["Cast"], calibration=None if calibrated is None else calibrated.report,
        quality=report, seconds=time.perf_counter() - started, warnings=found, layout=layout, passes=passes,
    )
