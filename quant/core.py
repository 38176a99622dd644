"""``quantize(model, out, mode=...)``: what ``moeport quantize`` runs.

The work is done by onnxruntime's tools, chosen by the mode's kind:

- ``qdq_static`` (int8): ``quantize_static`` in QDQ format, per-channel weights, MinMax calibration;
- ``dynamic`` (int8-dynamic): ``quantize_dynamic`` (weights int8, activations quantized per run);
- ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with ``keep_io_types``;
- ``nbits`` (int4): ``MatMulNBitsQuantizer`` (MatMul -> MatMulNBits), asymmetric blocks along K (a 4-bit
  zero point per block): expert weights in blocks of ``block_size``, the other MatMuls in blocks of
  ``dense_block_size``; the embedding Gather in 8 bits via ``quantize_dynamic`` (or, with
  ``embedding_bits=4``, GatherBlockQuantized). See ``NBitsLayout``.

Which nodes: the weight-carrying ones -- MatMul/Gemm whose second input is a 2-D initializer (the
per-expert weights, e.g. gate_up ``[hidden, 2*inter]`` and down ``[inter, hidden]``, attention
projections, lm_head) and Gather over an initializer (the embedding ``[vocab, hidden]``).
Activation x activation MatMuls (attention scores) stay float. With ``keep_router`` (the default) the
nodes of ``router.find_routers`` are excluded from every tool, so the gate projection, Softmax/Sigmoid,
TopK and weight normalisation stay float32.

The output is written to a temporary file beside ``out`` and renamed into place once it loads.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from moeport._fs import check_output_file, staged_file, writing
from moeport.contract import METADATA_PREFIX, QUANTIZATION_KEY, Reference, optional_model_info, read_metadata
from moeport.errors import MoeportError
from moeport.quant import calibration as calib
from moeport.quant import quality as qual
from moeport.quant.modes import QuantMode, get_mode
from moeport.quant.router import ExpertGroup, RouterPlan, _Graph, find_expert_matmuls, find_routers
from moeport.quant.schemes import DEFAULT_MODE, FLOAT, TARGETS, IntScheme, choose_scheme
from moeport.samples import TRAINED_DIR

METADATA_KEY = METADATA_PREFIX + QUANTIZATION_KEY


class QuantizeWarning(UserWarning):
    """What quantize warns about (starved experts, no router found ...); every one is also in the result."""

DEFAULT_CALIBRATION_SAMPLES = 64
DEFAULT_BLOCK_SIZE = 32
DEFAULT_DENSE_BLOCK_SIZE = 16
DEFAULT_LATENCY_RUNS = 10
_ROUTER_QDQ_OPS = ("Softmax", "Sigmoid")  # quantized only with keep_router=False


def bundled_text(name: str) -> Path | None:
    """``samples/trained/<name>`` (calibration.txt, heldout.txt) when the trained sample is installed."""
    path = TRAINED_DIR / name
    return path if path.is_file() else None


@dataclass(frozen=True)
class NBitsLayout:
    """int4: block sizes and the embedding's width.

    Expert weights (most of an MoE's parameters) use ``expert_block_size``; the other MatMuls (attention,
    dense MLPs, lm_head: a small share of the parameters that every token goes through) the finer
    ``dense_block_size``; the embedding table is stored at ``embedding_bits`` (8: int8 per tensor, 4: 4-bit
    blocks). Measured on the trained sample's held-out text (first 64 windows of 128 bytes, BENCHMARKS.md):
    all at 4 bits / block 32, worst-layer routing agreement 0.947 at 0.181 of the fp32 size; embedding at
    8 bits 0.951 / 0.183; plus dense block 16: 0.958 / 0.187.
    """

    expert_block_size: int
    dense_block_size: int
    embedding_bits: int

    def validate(self) -> None:
        for label, size in (("block size", self.expert_block_size), ("dense block size", self.dense_block_size)):
            if size < 16 or size & (size - 1):
                raise MoeportError(f"{label} must be a power of two >= 16, got {size}")
        if self.embedding_bits not in (4, 8):
            raise MoeportError(f"embedding bits must be 4 or 8, got {self.embedding_bits}")

    def describe(self) -> str:
        embedding = "int8 per tensor" if self.embedding_bits == 8 else f"4-bit blocks of {self.expert_block_size}"
        return (f"expert weights 4-bit blocks of {self.expert_block_size}, other MatMuls 4-bit blocks of "
                f"{self.dense_block_size}, embedding {embedding}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizeResult:
    """What ``quantize`` did and what it cost. Sizes in bytes, latency in ms for ``[1, 128]`` ids."""

    input: Path
    output: Path
    mode: QuantMode
    target: str
    scheme: IntScheme | None
    keep_router: bool
    router: RouterPlan
    router_kept_float: dict[str, int]  # op type -> router nodes computing in float32 in the output
    quantized_nodes: dict[str, int]  # nodes handed to the quantizer, by op type
    output_ops: dict[str, int]  # quantization ops in the output (DequantizeLinear, MatMulNBits, ...)
    casts_added: int
    calibration: dict | None
    quality: qual.QualityReport
    seconds: float
    warnings: list[str] = field(default_factory=list)
    layout: NBitsLayout | None = None

    def targets_met(self) -> dict[str, bool | None]:
        """Each of the mode's targets: True/False, None when not measured."""
        q, m = self.quality, self.mode
        routing = q.parity.routing_agreement if q.parity else None
        ppl = q.perplexity_change
        return {
            "size": q.size_ratio <= m.max_size_ratio,
            "routing": None if routing is None else routing >= m.min_routing_agreement,
            "perplexity": None if ppl is None else ppl <= m.max_perplexity_increase,
        }

    def to_dict(self) -> dict:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "mode": self.mode.to_dict(),
            "target": self.target,
            "scheme": None if self.scheme is None else self.scheme.to_dict(),
            "nbits_layout": None if self.layout is None else self.layout.to_dict(),
            "keep_router": self.keep_router,
            "router": {**self.router.to_dict(), "kept_float": self.router_kept_float,
                       "kept_float_nodes": sum(self.router_kept_float.values())},
            "quantized_nodes": self.quantized_nodes,
            "output_ops": self.output_ops,
            "casts_added": self.casts_added,
            "calibration": self.calibration,
            "quality": self.quality.to_dict(),
            "targets_met": self.targets_met(),
            "seconds": round(self.seconds, 2),
            "warnings": self.warnings,
        }

    def render(self) -> str:
        q, m = self.quality, self.mode
        met = self.targets_met()
        mark = {True: "yes", False: "NO", None: "n/a"}
        lines = [f"quantized {self.input} -> {self.output} ({m.name}, target {self.target}, {self.seconds:.1f}s)"]
        if self.scheme is not None:
            s = self.scheme
            down = "" if s.down_activation_type is None else (
                ", expert down-projection inputs float (their weights 8-bit blocks)" if s.down_activation_type == FLOAT
                else f", expert down-projection inputs {s.down_activation_type}")
            lines.append(f"scheme: activations {s.activation_type}{down}, weights {s.weight_type}, "
                         f"{'per-channel' if s.per_channel else 'per-tensor'}"
                         f"{', reduce_range' if s.reduce_range else ''} ({s.reason})")
        if self.layout is not None:
            lines.append(f"layout: {self.layout.describe()}")
        lines.append("nodes quantized: " + ", ".join(f"{k} {v}" for k, v in self.quantized_nodes.items())
                     + "; output ops: " + ", ".join(f"{k} {v}" for k, v in self.output_ops.items()))
        if self.keep_router:
            ops = ", ".join(f"{k} {v}" for k, v in self.router_kept_float.items())
            lines.append(f"router kept float32: {sum(self.router_kept_float.values())} nodes in {len(self.router.routers)} "
                         f"routers ({ops}); casts added: {self.casts_added}")
        else:
            lines.append(f"router NOT protected (--no-keep-router); casts added: {self.casts_added}")
        if self.calibration:
            c = self.calibration
            borrowed = f"; {c['borrowed_ranges']} starved expert inputs use their layer's range" \
                if c["borrowed_ranges"] else ""
            lines.append(f"calibration: {c['samples']} samples, {c['tokens']} tokens from {c['source']}{borrowed}")
            for cov in c["coverage"]:
                starved = f"  starved: {cov['starved']}" if cov["starved"] else ""
                lines.append(f"  tokens per expert, {cov['label']}: {cov['counts']}{starved}")
        lines.append(f"  {'metric':<34} {'before':>12} {'after':>12} {'change':>10}  target")
        lines.append(f"  {'file size (MB, fp32 w/o debug meta)':<34} {(q.size_before - q.debug_metadata) / 1e6:12.3f} "
                     f"{q.size_after / 1e6:12.3f} {q.size_ratio:9.3f}x  <= {m.max_size_ratio:.2f}x {mark[met['size']]}")
        lines.append(f"  {'weights only (MB)':<34} {q.weights_before / 1e6:12.3f} {q.weights_after / 1e6:12.3f} "
                     f"{q.weights_ratio:9.3f}x")
        if q.debug_metadata:
            lines.append(f"  (input file {q.size_before / 1e6:.3f} MB includes {q.debug_metadata / 1e6:.3f} MB of "
                         "torch.onnx per-node debug metadata, not written to the output)")
        if q.perplexity_before is not None:
            lines.append(f"  {f'perplexity ({q.heldout_tokens} held-out bytes)':<34} {q.perplexity_before:12.4f} "
                         f"{q.perplexity_after:12.4f} {q.perplexity_change:+9.2%}  <= +{m.max_perplexity_increase:.1%} "
                         f"{mark[met['perplexity']]}")
        if q.latency_before_ms is not None:
            lines.append(f"  {'CPU latency 1x128 (ms, median)':<34} {q.latency_before_ms:12.2f} "
                         f"{q.latency_after_ms:12.2f} {q.latency_after_ms / q.latency_before_ms:9.2f}x")
        if q.parity is not None:
            p = q.parity
            lines.append(f"  parity vs PyTorch fp32 on {','.join(p.shapes)} ({p.inputs}): max abs err "
                         f"{p.max_abs_err:.4g}, mean abs err {p.mean_abs_err:.4g}, argmax agreement "
                         f"{p.argmax_agreement:.4f}")
            if p.routing_agreement is not None:
                layers = ", ".join(f"{k}: {v:.4f}" for k, v in p.routing_per_layer.items())
                lines.append(f"  routing agreement {p.routing_agreement:.4f} (worst layer) >= "
                             f"{m.min_routing_agreement} {mark[met['routing']]}; per layer {layers}")
        if q.heldout_routing:
            layers = ", ".join(f"{k}: {v:.4f}" for k, v in q.heldout_routing.items())
            lines.append(f"  routing agreement on held-out text vs fp32 ONNX: {layers}")
            layers = ", ".join(f"{k}: {v:.4f}" for k, v in q.heldout_top1.items())
            lines.append(f"  top-1 expert agreement on held-out text: {layers}")
        lines += [f"  note: {n}" for n in q.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _weight_nodes(model: onnx.ModelProto, exclude: set[str]) -> list[onnx.NodeProto]:
    """MatMul/Gemm with a 2-D initializer weight and Gather over an initializer, minus ``exclude``."""
    inits = {i.name: i for i in model.graph.initializer}
    chosen = []
    for node in model.graph.node:
        if node.name in exclude:
            continue
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and len(inits.get(node.input[1], _NO).dims) == 2:
            chosen.append(node)
        elif node.op_type == "Gather" and len(inits.get(node.input[0], _NO).dims) == 2:
            chosen.append(node)
    return chosen


_NO = onnx.TensorProto()  # stands in for "not an initializer" (no dims)


def _expert_inputs(model: onnx.ModelProto, weight_nodes: list[onnx.NodeProto]) -> dict[ExpertGroup, dict[int, str]]:
    """Per expert group (``router.find_expert_matmuls``): {expert: activation tensor ``[tokens_e, K]`` its
    MatMul reads}, for the targeted MatMuls only."""
    targeted = {n.name for n in weight_nodes}
    return {key: {e: node.input[0] for e, node in enumerate(nodes) if node.name in targeted}
            for key, nodes in find_expert_matmuls(model).items()}


def _wide_down_inputs(overrides: dict, groups, quant_type: str) -> dict[str, list[dict]]:
    """``overrides`` plus ``quant_type`` for every expert down-projection input (the MatMuls reached after
    crossing one of the expert's own MatMuls: ``down(silu(gate) * up)``)."""
    from onnxruntime.quantization import QuantType

    widened = dict(overrides)
    for group, experts in groups.items():
        if not group.is_down_projection:
            continue
        for name in experts.values():
            widened[name] = [{**widened.get(name, [{}])[0], "quant_type": QuantType[quant_type]}]
    return widened


def _borrowed_ranges(ranges: dict[str, list], groups) -> dict[str, list[dict]]:
    """TensorQuantOverrides giving starved experts' inputs their layer's range.

    Why: onnxruntime calibrates a tensor that never held a value to scale 1.0, zero point 0 -- an
    expert no calibration token chose would then clip every negative input to 0 at run time. An expert
    with under 10% of an even share gets the union of its layer's observed ranges instead.
    """
    overrides = {}
    for experts in groups.values():
        rows = {e: ranges[name][2] for e, name in experts.items()}
        seen = [ranges[name] for name in experts.values() if ranges[name][2]]
        if not seen:
            continue
        low, high = min(r[0] for r in seen), max(r[1] for r in seen)
        limit = calib.starvation_threshold(sum(rows.values()), len(experts))
        for e, name in experts.items():
            if rows[e] < limit:
                overrides[name] = [{"rmin": np.float32(low), "rmax": np.float32(high)}]
    return overrides


def _coverage(model_path: Path, plan: RouterPlan, data: calib.CalibrationSet, labels: list[str] | None,
              expert_inputs: dict[tuple, dict[int, str]]):
    """Run the fp32 model on the calibration samples: TopK selections per expert and router, and
    ``{expert input tensor: [min, max, rows]}`` for ``_borrowed_ranges``."""
    tensors = tuple(name for experts in expert_inputs.values() for name in experts.values())
    if not plan.routers and not tensors:
        return [], {}
    session = qual.RouterSession(model_path, [r.indices_output for r in plan.routers], tensors)
    ranges = {name: [np.inf, -np.inf, 0] for name in tensors}
    proto = onnx.load(str(model_path), load_external_data=False)
    shapes = {}
    for value in onnx.shape_inference.infer_shapes(proto).graph.value_info:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = dims[-1].dim_value if dims else 0
    num_experts = [shapes.get(r.scores_output, 0) for r in plan.routers]
    outputs = []
    for sample in data.samples:  # one pass: TopK ids first, then the expert inputs
        runs = session.session.run([*session.index_names, *tensors], sample)
        indices, values = runs[:len(session.index_names)], runs[len(session.index_names):]
        outputs.append(indices)
        for r, ids in enumerate(indices):  # infer E from the ids when shape inference did not
            if ids.size:
                num_experts[r] = max(num_experts[r], int(ids.max()) + 1)
        for name, value in zip(tensors, values):
            if value.size:
                ranges[name] = [min(ranges[name][0], float(value.min())), max(ranges[name][1], float(value.max())),
                                ranges[name][2] + value.shape[0]]
    if not plan.routers:
        return [], ranges
    if labels is None or len(labels) != len(plan.routers):
        labels = [f"router{i}" for i in range(len(plan.routers))]
    return calib.expert_coverage(outputs, labels, num_experts), ranges


def _check_paths(model: Path, out: Path, force: bool) -> None:
    if not model.is_file():
        raise MoeportError(f"model file not found: {model}")
    if out.resolve() == model.resolve():
        raise MoeportError(f"output {out} is the input model; choose another file name")
    check_output_file(out, force)


def _stamp(proto: onnx.ModelProto, source: onnx.ModelProto, info: dict) -> None:
    """Carry the source's moeport metadata over (verify needs it) and record how it was quantized."""
    have = {p.key for p in proto.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in have:
            proto.metadata_props.add(key=prop.key, value=prop.value)
    for prop in list(proto.metadata_props):
        if prop.key == METADATA_KEY:
            proto.metadata_props.remove(prop)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(info, sort_keys=True))


def float_router_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count of router nodes in ``model`` that compute in float32: no float16 output and no
    input from a DequantizeLinear. Found again on the output because quantize_dynamic rewrites a Gemm gate
    as a (renamed, still float) MatMul and fp16 adds Casts at the router's edges."""
    g = _Graph(model)
    names = set(find_routers(model).nodes)
    counts: Counter = Counter()
    for node in g.nodes:
        if node.name not in names:
            continue
        outputs_fp32 = all(g.elem_type.get(o) != onnx.TensorProto.FLOAT16 for o in node.output if o)
        dequantized = any(g.producer.get(i) is not None and g.producer[i].op_type == "DequantizeLinear"
                          for i in node.input)
        if outputs_fp32 and not dequantized and node.op_type != "Cast":  # Casts are counted on their own
            counts[node.op_type] += 1
    return dict(sorted(counts.items()))


def _gemms_as_matmuls(proto: onnx.ModelProto, names: set[str]) -> int:
    """Rewrite the named ``Gemm(A, B[, C])`` with a constant B as ``MatMul(A, B')`` [+ ``Add(C)``], in place.

    Why: MatMulNBitsQuantizer and quantize_dynamic skip Gemm, and torch exports a 2-D ``nn.Linear`` (shared
    experts, routers) as Gemm. Only the plain form (alpha = beta = 1, transA = 0) is rewritten; B is
    stored transposed when transB = 1, so the MatMul weight is ``[K, N]``. Returns how many were rewritten.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    rewritten = 0
    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.name not in names or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            array = np.ascontiguousarray(onnx.numpy_helper.to_array(inits[weight]).T)
            weight = f"{weight}_kn"
            proto.graph.initializer.append(onnx.numpy_helper.from_array(array, weight))
        product = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{node.output[0]}_matmul"
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if product != node.output[0]:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                               name=f"{node.name}_bias"))
        rewritten += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {i for n in proto.graph.node for i in n.input}
    for init in [i for i in proto.graph.initializer if i.name not in used]:
        proto.graph.initializer.remove(init)  # the [N, K] originals of transposed weights
    return rewritten


def _topological(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir
    from onnx_ir.passes.common import TopologicalSortPass

    model = ir.from_proto(proto)
    TopologicalSortPass()(model)
    return ir.to_proto(model)


def _strip_debug_metadata(proto: onnx.ModelProto) -> int:
    """Drop torch.onnx's per-node provenance (stack traces, FX node text); returns the bytes saved.

    It is a third of a small exported file and nothing reads it at run time.
    """
    before = proto.ByteSize()
    for node in proto.graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props
                if not (p.key.startswith("pkg.torch.") or p.key == "namespace")]
        if len(keep) != len(node.metadata_props):
            node.ClearField("metadata_props")
            for key, value in keep:
                node.metadata_props.add(key=key, value=value)
    return before - proto.ByteSize()


@contextlib.contextmanager
def _without_log_message(fragment: str, logger_name: str = ""):
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


def _nbits(proto: onnx.ModelProto, chosen: set[str], exclude: set[str], *, bits: int,
           block_size: int) -> onnx.ModelProto:
    """onnxruntime's MatMulNBitsQuantizer on the ``chosen`` MatMul/Gather nodes of ``proto`` (changed in place)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # nodes_to_include only adds to op_types_to_quantize, so everything not chosen is excluded.
    skip = {n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gather")} - chosen
    quantizer = MatMulNBitsQuantizer(
        proto,
        # Asymmetric blocks: on the trained sample's held-out text, int4 routing agreement 0.947 vs 0.943 for
        # symmetric at 0.179 vs 0.174 of the fp32 size (BENCHMARKS.md).
        bits=bits, block_size=block_size, is_symmetric=False, nodes_to_exclude=sorted(exclude | skip),
        op_types_to_quantize=("MatMul", "Gather"),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    # Like quantize_static's 16-bit case: the quantizer raises the opset to 21 itself; the report notes it.
    with _without_log_message("doesn't support int4 data type", "onnxruntime.quantization.matmul_nbits_quantizer"):
        quantizer.process()
    return quantizer.model.model


def _pre_processed(model: Path | onnx.ModelProto, staged: Path) -> Path:
    """onnxruntime's recommended pre-processing of ``model`` before its quantizers, written next to ``staged``.

    ONNX shape inference only: onnxruntime's symbolic shape inference fails on the routed Split
    (data-dependent counts), and its graph optimisation would write onnxruntime-specific fused ops into the
    file. Measured on the trained sample: same ranges, routing agreement and perplexity as without it.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = staged.with_name(f"prepared.{staged.name}")
    quant_pre_process(model if isinstance(model, onnx.ModelProto) else str(model), str(prepared),
                      skip_optimization=True, skip_symbolic_shape=True)
    return prepared


def _apply(mode: QuantMode, source: Path, proto: onnx.ModelProto, staged: Path, *, scheme, weight_nodes,
           exclude, data, layout, overrides) -> onnx.ModelProto:
    """Run the onnxruntime tool for ``mode.kind``; returns the quantized model (also in ``staged`` for QDQ)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    names = [n.name for n in weight_nodes]
    if mode.kind == "qdq_static":
        prepared = _pre_processed(source, staged)
        # 16-bit Q/DQ (the down-projection inputs) needs opset 21: onnxruntime raises the opset itself and
        # logs a warning asking to verify the result -- which quantize() does (checker, parity, report);
        # the report notes the new opset instead.
        with _without_log_message("does not support 16-bit integer quantization natively"):
            quantize_static(
                str(prepared), str(staged), calib.as_reader(data), quant_format=QuantFormat.QDQ,
                # Only the targeted nodes' types: calibration covers every tensor of these types, and the
                # attention Softmax input (-inf masked scores) would otherwise yield NaN zero points.
                op_types_to_quantize=sorted({n.op_type for n in weight_nodes}), per_channel=scheme.per_channel,
                reduce_range=scheme.reduce_range, activation_type=QuantType[scheme.activation_type],
                weight_type=QuantType[scheme.weight_type], nodes_to_quantize=names, nodes_to_exclude=sorted(exclude),
                calibrate_method=CalibrationMethod.MinMax,
                # DedicatedQDQPair: a tensor read by both a quantized node and the router (the shared experts'
                # Gemm and the gate read the same normed hidden states) gets its own Q/DQ per quantized
                # consumer; without it the router would read the dequantized copy.
                extra_options={"ActivationSymmetric": scheme.symmetric_activations, "WeightSymmetric": True,
                               "TensorQuantOverrides": overrides, "DedicatedQDQPair": True},
            )
        return onnx.load(str(staged))
    if mode.kind == "dynamic":
        # There is no dynamic Gemm kernel: targeted Gemms become MatMuls first.
        source_proto = copy.deepcopy(proto)
        _gemms_as_matmuls(source_proto, {n.name for n in weight_nodes if n.op_type == "Gemm"})
        down = set()
        if scheme.down_activation_type == FLOAT:
            down = {n.name for group, nodes in find_expert_matmuls(source_proto).items()
                    if group.is_down_projection for n in nodes} & set(names)
        quantize_dynamic(
            str(_pre_processed(source_proto, staged)), str(staged), op_types_to_quantize=["MatMul", "Gather"],
            per_channel=scheme.per_channel, reduce_range=scheme.reduce_range, weight_type=QuantType[scheme.weight_type],
            nodes_to_quantize=sorted(set(names) - down), nodes_to_exclude=sorted(exclude),
        )
        quantized = onnx.load(str(staged))
        if down:
            # Float inputs, 8-bit weights: onnxruntime's block quantizer at 8 bits (MatMulNBits).
            quantized = _nbits(quantized, down, exclude, bits=8, block_size=DEFAULT_BLOCK_SIZE)
        return quantized
    if mode.kind == "fp16":
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        converted = convert_float_to_float16(copy.deepcopy(proto), keep_io_types=True,
                                             op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=sorted(exclude))
        # The converter appends the Casts it adds for initializers after their consumers; ORT and the
        # checker need topological order.
        return _topological(converted)
    if mode.kind == "nbits":
        source_proto = copy.deepcopy(proto)  # every step rewrites the graph in place
        _gemms_as_matmuls(source_proto, {n.name for n in weight_nodes if n.op_type == "Gemm"})
        experts = {n.name for nodes in find_expert_matmuls(source_proto).values() for n in nodes}
        gathers = {n.name for n in weight_nodes if n.op_type == "Gather"}
        matmuls = set(names) - gathers
        if layout.embedding_bits == 8 and gathers:
            # onnxruntime's n-bit quantizer packs Gather at 4 bits only; quantize_dynamic stores the table in
            # 8 bits (int8 table, Gather, DequantizeLinear of the gathered rows).
            quantize_dynamic(str(_pre_processed(source_proto, staged)), str(staged),
                             op_types_to_quantize=["Gather"], nodes_to_quantize=sorted(gathers),
                             weight_type=QuantType.QInt8)
            source_proto, gathers = onnx.load(str(staged)), set()
        steps = ((matmuls - experts, layout.dense_block_size), (matmuls & experts, layout.expert_block_size),
                 (gathers, layout.expert_block_size))
        for chosen, block_size in steps:
            if chosen:
                source_proto = _nbits(source_proto, chosen, exclude, bits=mode.bits, block_size=block_size)
        return source_proto
    raise AssertionError(f"mode kind {mode.kind!r} has no implementation")  # registry validation prevents this


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
    block_size: int = DEFAULT_BLOCK_SIZE,
    dense_block_size: int = DEFAULT_DENSE_BLOCK_SIZE,
    embedding_bits: int = 8,
    down_activations: str = "auto",
    latency_runs: int = DEFAULT_LATENCY_RUNS,
    perplexity: bool = True,
    parity_shapes=qual.PARITY_SHAPES,
    force: bool = False,
) -> QuantizeResult:
    """Quantize the ONNX file ``model`` into ``out`` and measure what it cost (see the module docstring).

    ``calibration``: text/JSONL/.npz path (int8 only); None uses the bundled ``calibration.txt`` of the
    trained sample; ``random_calibration=True`` uses random ids (with a warning). ``heldout``: text for
    perplexity (default: the bundled ``heldout.txt``). ``reference``: the model ``model`` was exported from,
    for parity (the exporter's ``CheckpointReference`` runs a PyTorch checkpoint). ``tokenizer``: a directory
    with the model's ``tokenizer.json`` (e.g. the checkpoint) for text calibration and perplexity.
    ``block_size``, ``dense_block_size``, ``embedding_bits`` (int4): see ``NBitsLayout``.
    ``down_activations`` (int8, int8-dynamic): auto|int8|int16|float, how the expert down-projection
    inputs are kept (auto: int16 for int8 and float for int8-dynamic where the target runs it, see
    ``IntScheme``). ``latency_runs=0`` skips the latency
    measurement, ``perplexity=False`` the held-out text pass.
    """
    started = time.perf_counter()
    model, out = Path(model), Path(out)
    if target not in TARGETS:
        raise MoeportError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    spec = get_mode(mode or DEFAULT_MODE[target])
    layout = None
    if spec.kind == "nbits":
        layout = NBitsLayout(block_size, dense_block_size, embedding_bits)
        layout.validate()
    if not spec.needs_calibration and (calibration is not None or random_calibration):
        raise MoeportError(f"mode {spec.name} uses no calibration data; drop --calibration/--random-calibration")
    _check_paths(model, out, force)

    metadata = read_metadata(model)  # also refuses external data outside the model's directory
    info = optional_model_info(metadata, model)
    vocab = info.vocab_size if info else None
    labels = [layer.label for layer in info.layers] if info else None
    proto = onnx.load(str(model))
    plan = find_routers(proto)
    exclude = set(plan.nodes) if keep_router else set()
    targeted = _weight_nodes(proto, exclude)
    if not keep_router and spec.kind == "qdq_static":
        # Unprotected means "as onnxruntime's defaults would do": Softmax/Sigmoid get Q/DQ too (Softmax on
        # a fixed [0, 1] grid), which is what makes TopK see ties.
        router_nodes = set(plan.nodes)
        targeted += [n for n in proto.graph.node if n.name in router_nodes and n.op_type in _ROUTER_QDQ_OPS]
    result_warnings: list[str] = []
    if not plan.routers:
        result_warnings.append("no MoE router (gate -> Softmax/Sigmoid -> TopK) found in the graph")
    scheme = choose_scheme(target) if spec.kind in ("qdq_static", "dynamic") else None
    if scheme is not None:
        scheme = scheme.with_down_activations(down_activations, target, spec.kind)
    elif down_activations != "auto":
        raise MoeportError(f"--down-activations applies to int8 and int8-dynamic, not {spec.name}")

    @functools.cache
    def encoder() -> calib.TextEncoder | None:
        # The checkpoint's tokenizer when it has one (read once, and only when text is encoded).
        return calib.text_encoder(vocab, tokenizer)

    data, calibration_info, overrides = None, None, {}
    if spec.needs_calibration:
        input_names = [i.name for i in proto.graph.input if i.name not in {x.name for x in proto.graph.initializer}]
        if random_calibration:
            if calibration is not None:
                raise MoeportError("give either --calibration or --random-calibration, not both")
            source = calib.RANDOM
        elif calibration is not None:
            source = calibration
        else:
            source = bundled_text("calibration.txt")
            if source is None:
                raise MoeportError("int8 needs calibration data: pass --calibration FILE (text, .jsonl or .npz), "
                                   "or --random-calibration to accept random tokens")
        data = calib.load_calibration(source, input_names=input_names, vocab_size=vocab,
                                      samples=calibration_samples, encoder=encoder())
        result_warnings += data.warnings
        expert_inputs = _expert_inputs(proto, targeted)
        coverage, ranges = _coverage(model, plan, data, labels, expert_inputs)
        overrides = _borrowed_ranges(ranges, expert_inputs)
        borrowed = len(overrides)
        if scheme.down_activation_type is not None:  # static: a 16-bit type
            overrides = _wide_down_inputs(overrides, expert_inputs, scheme.down_activation_type)
        for cov in coverage:
            if cov.starved:
                result_warnings.append(
                    f"experts {cov.starved} of layer {cov.label} got under 10% of an even share of the "
                    f"{sum(cov.counts)} calibration slots; their activation ranges rest on few tokens")
        calibration_info = {"source": data.source, "samples": len(data.samples), "tokens": data.tokens,
                            "coverage": [c.to_dict() for c in coverage],
                            "borrowed_ranges": borrowed}
        if borrowed:
            result_warnings.append(f"{borrowed} expert input tensors saw too few calibration tokens; they use "
                                   "their layer's activation range instead of their own")
    for message in result_warnings:
        warnings.warn(message, QuantizeWarning, stacklevel=2)

    with staged_file(out) as staging:  # nothing is written when a step fails
        staged = staging / out.name
        with writing(out):  # onnxruntime's quantizers write the staged file themselves
            quantized = _apply(spec, model, proto, staged, scheme=scheme, weight_nodes=targeted, exclude=exclude,
                               data=data, layout=layout, overrides=overrides)
        _stamp(quantized, proto, {"mode": spec.name, "target": target, "keep_router": keep_router,
                                  "scheme": None if scheme is None else scheme.to_dict(),
                                  "nbits_layout": None if layout is None else layout.to_dict()})
        _strip_debug_metadata(quantized)
        with writing(out):
            onnx.save(quantized, str(staged))
        onnx.checker.check_model(str(staged))

    before_ops = Counter(n.op_type for n in proto.graph.node)
    after_ops = Counter(n.op_type for n in quantized.graph.node)
    float_kept = float_router_nodes(quantized) if keep_router else {}
    quant_ops = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "DynamicQuantizeMatMul", "MatMulNBits", "GatherBlockQuantized", "Cast")
    output_ops = {op: after_ops[op] - before_ops[op] for op in quant_ops if after_ops[op] - before_ops[op]}

    report = qual.QualityReport(qual.model_size(model), qual.model_size(out), qual.weight_bytes(proto),
                                qual.weight_bytes(quantized), _strip_debug_metadata(copy.deepcopy(proto)))
    text_path = Path(heldout) if heldout is not None else bundled_text("heldout.txt")
    if text_path is not None and not text_path.is_file():
        raise MoeportError(f"held-out text not found: {text_path}")
    heldout_ids = None if text_path is None or encoder() is None else encoder().encode(text_path.read_bytes())
    if reference is not None:
        # On held-out text when there is some: routing is judged on data like the deployment's (random ids
        # route unlike any text the model will see; they are the fallback).
        windows = None if heldout_ids is None else qual.parity_windows(heldout_ids, list(reference.info.input_names))
        report.parity = qual.parity(out, reference, spec.min_routing_agreement, parity_shapes, windows)
    opsets = [{o.domain or "ai.onnx": o.version for o in m.opset_import}.get("ai.onnx") for m in (proto, quantized)]
    if opsets[0] != opsets[1]:
        report.notes.append(f"opset {opsets[0]} -> {opsets[1]}: onnxruntime's quantizer needs it for the ops it wrote")
    if not perplexity:
        report.notes.append("perplexity not measured (skipped on request)")
    elif encoder() is not None:
        if heldout_ids is None:
            report.notes.append("no perplexity: no held-out text (pass --heldout FILE)")
        else:
            ppl = qual.heldout_quality(model, out, heldout_ids, [r.indices_output for r in plan.routers])
            report.perplexity_before, report.perplexity_after, report.heldout_tokens, routing, top1 = ppl
            if labels and len(labels) == len(routing):
                routing, top1 = dict(zip(labels, routing.values())), dict(zip(labels, top1.values()))
            report.heldout_routing, report.heldout_top1 = routing, top1
    else:
        report.notes.append("no perplexity: the model is not byte-level and no tokenizer was given (--tokenizer DIR, "
                            "or --checkpoint with the checkpoint's tokenizer)")
    if latency_runs > 0:
        report.latency_before_ms = qual.latency_ms(model, vocab or 2, latency_runs)
        report.latency_after_ms = qual.latency_ms(out, vocab or 2, latency_runs)

    return QuantizeResult(
        input=model, output=out, mode=spec, target=target, scheme=scheme, keep_router=keep_router, router=plan,
        router_kept_float=float_kept, quantized_nodes=dict(Counter(n.op_type for n in targeted)),
        output_ops=output_ops, casts_added=after_ops["Cast"] - before_ops["Cast"], calibration=calibration_info,
        quality=report, seconds=time.perf_counter() - started, warnings=result_warnings, layout=layout,
    )
