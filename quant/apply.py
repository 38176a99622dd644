"""The per-mode application steps: onnxruntime's quantizers on the chosen nodes."""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import onnx

from moeport.quant import calibration as calib
from moeport.quant.modes import QuantMode
from moeport.quant.passes import gemms_as_matmuls, topological
from moeport.quant.router import find_expert_matmuls
from moeport.quant.schemes import FLOAT

DEFAULT_BLOCK_SIZE = 32


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
    with without_log_message("doesn't support int4 data type", "onnxruntime.quantization.matmul_nbits_quantizer"):
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


def apply(mode: QuantMode, source: Path, proto: onnx.ModelProto, staged: Path, *, scheme, weight_nodes,
           exclude, data, layout, overrides) -> onnx.ModelProto:
    """Run the onnxruntime tool for ``mode.kind``; returns the quantized model (also in ``staged`` for QDQ)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    names = [n.name for n in weight_nodes]
    if mode.kind == "qdq_static":
        prepared = _pre_processed(source, staged)
        # 16-bit Q/DQ (the down-projection inputs) needs opset 21: onnxruntime raises the opset itself and
        # logs a warning asking to verify the result -- which quantize() does (checker, parity, report);
        # the report notes the new opset instead.
        with without_log_message("does not support 16-bit integer quantization natively"):
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
        gemms_as_matmuls(source_proto, {n.name for n in weight_nodes if n.op_type == "Gemm"})
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
        return topological(converted)
    if mode.kind == "nbits":
        source_proto = copy.deepcopy(proto)  # every step rewrites the graph in place
        gemms_as_matmuls(source_proto, {n.name for n in weight_nodes if n.op_type == "Gemm"})
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
