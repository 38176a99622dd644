"""The apply steps: how each kind of quantization mode runs onnxruntime's tools on the chosen nodes.

An ``ApplyStep`` is a function ``run(job: QuantJob) -> onnx.ModelProto`` plus what the pipeline must know
about it (does it calibrate, does it take an 8-bit ``IntScheme`` and how far the expert down-projection
inputs may be widened, does it use the int4 ``NBitsLayout``, what it quantizes in an unprotected router, does
it skip Gemm). A ``QuantMode`` (``moeport.quant.modes``) carries its step; the built-in steps are
``QDQ_STATIC`` (int8), ``DYNAMIC`` (int8-dynamic), ``FP16`` and ``NBITS`` (int4).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx

from moeport.quant import calibration as calib
from moeport.runtime.moe_graph import find_expert_matmuls
from moeport.quant.schemes import DYNAMIC_DOWN, FLOAT, STATIC_DOWN, IntScheme, NBitsLayout, WideDown

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


@dataclass
class QuantJob:
    """What an apply step gets: the fp32 model (``source`` file; ``proto``: prepared by the pipeline's passes,
    the step may change it), where to write
    (``staged``), the nodes to quantize (``targets``) and to leave alone (``exclude``: the routers), and the
    mode's settings (``bits``, ``scheme`` for 8-bit steps, ``layout`` for int4, ``calibration`` and its
    ``overrides`` (onnxruntime TensorQuantOverrides) for static quantization)."""

    source: Path
    proto: onnx.ModelProto
    staged: Path
    targets: list[onnx.NodeProto]
    exclude: set[str]
    bits: int
    scheme: IntScheme | None = None
    layout: NBitsLayout | None = None
    calibration: calib.CalibrationSet | None = None
    overrides: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.targets]

    def names_of(self, op_type: str) -> set[str]:
        return {n.name for n in self.targets if n.op_type == op_type}


_STEP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ApplyStep:
    """How one kind of mode quantizes: ``run(job)`` returns the quantized model.

    ``calibrated``: the step runs calibration samples through the model (``job.calibration`` is set).
    ``down``: the step takes an 8-bit ``IntScheme`` (``job.scheme``) and how far it may widen the expert
    down-projection inputs; None for steps without one. ``layout``: the step uses ``job.layout``.
    ``unprotected_ops``: router op types it also quantizes when the router is not protected (QDQ puts Q/DQ on
    Softmax/Sigmoid like onnxruntime's defaults). ``gemms_as_matmuls``: the tool skips Gemm, so the pipeline
    rewrites the targeted Gemms as MatMul before it runs (``passes.GemmAsMatMulPass``).
    """

    name: str
    run: Callable[[QuantJob], onnx.ModelProto]
    calibrated: bool = False
    down: WideDown | None = None
    layout: bool = False
    unprotected_ops: tuple[str, ...] = ()
    gemms_as_matmuls: bool = False

    def __post_init__(self):
        if not _STEP_NAME.match(self.name):
            raise ValueError(f"apply step names are lower-case identifiers: {self.name!r}")
        if not callable(self.run):
            raise ValueError(f"apply step {self.name!r}: run must be a function of a QuantJob")


def run_qdq_static(job: QuantJob) -> onnx.ModelProto:
    """``quantize_static`` in QDQ format: per-channel weights, MinMax-calibrated activations."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    scheme = job.scheme
    prepared = _pre_processed(job.proto, job.staged)
    # 16-bit Q/DQ (the down-projection inputs) needs opset 21: onnxruntime raises the opset itself and
    # logs a warning asking to verify the result -- which quantize() does (checker, parity, report);
    # the report notes the new opset instead.
    with without_log_message("does not support 16-bit integer quantization natively"):
        quantize_static(
            str(prepared), str(job.staged), calib.as_reader(job.calibration), quant_format=QuantFormat.QDQ,
            # Only the targeted nodes' types: calibration covers every tensor of these types, and the
            # attention Softmax input (-inf masked scores) would otherwise yield NaN zero points.
            op_types_to_quantize=sorted({n.op_type for n in job.targets}), per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range, activation_type=QuantType[scheme.activation_type],
            weight_type=QuantType[scheme.weight_type], nodes_to_quantize=job.names,
            nodes_to_exclude=sorted(job.exclude), calibrate_method=CalibrationMethod.MinMax,
            # DedicatedQDQPair: a tensor read by both a quantized node and the router (the shared experts'
            # Gemm and the gate read the same normed hidden states) gets its own Q/DQ per quantized
            # consumer; without it the router would read the dequantized copy.
            extra_options={"ActivationSymmetric": scheme.symmetric_activations, "WeightSymmetric": True,
                           "TensorQuantOverrides": job.overrides, "DedicatedQDQPair": True},
        )
    return onnx.load(str(job.staged))


def run_dynamic(job: QuantJob) -> onnx.ModelProto:
    """``quantize_dynamic``: int8 weights, activations quantized per run; down projections optionally float
    with 8-bit block weights (``MatMulNBits``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    scheme = job.scheme
    source = job.proto
    down = set()
    if scheme.down_activation_type == FLOAT:
        down = {n.name for group, nodes in find_expert_matmuls(source).items()
                if group.is_down_projection for n in nodes} & set(job.names)
    quantize_dynamic(
        str(_pre_processed(source, job.staged)), str(job.staged), op_types_to_quantize=["MatMul", "Gather"],
        per_channel=scheme.per_channel, reduce_range=scheme.reduce_range, weight_type=QuantType[scheme.weight_type],
        nodes_to_quantize=sorted(set(job.names) - down), nodes_to_exclude=sorted(job.exclude),
    )
    quantized = onnx.load(str(job.staged))
    if down:
        # Float inputs, 8-bit weights: onnxruntime's block quantizer at 8 bits (MatMulNBits).
        quantized = _nbits(quantized, down, job.exclude, bits=8, block_size=DEFAULT_BLOCK_SIZE)
    return quantized


def run_fp16(job: QuantJob) -> onnx.ModelProto:
    """``onnxruntime.transformers.float16``: float16 weights and compute, float32 graph inputs and outputs."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # The converter appends the Casts it adds for initializers after their consumers; quantize() puts the
    # nodes back in topological order (ORT and the checker need it).
    return convert_float_to_float16(job.proto, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                    node_block_list=sorted(job.exclude))


def run_nbits(job: QuantJob) -> onnx.ModelProto:
    """``MatMulNBitsQuantizer`` at ``job.bits``: experts and the other MatMuls in their blocks (``NBitsLayout``),
    the embedding in 8 bits (``quantize_dynamic``) or 4-bit blocks (GatherBlockQuantized)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    layout = job.layout
    source = job.proto
    experts = {n.name for nodes in find_expert_matmuls(source).values() for n in nodes}
    gathers = job.names_of("Gather")
    matmuls = set(job.names) - gathers
    if layout.embedding_bits == 8 and gathers:
        # onnxruntime's n-bit quantizer packs Gather at 4 bits only; quantize_dynamic stores the table in
        # 8 bits (int8 table, Gather, DequantizeLinear of the gathered rows).
        quantize_dynamic(str(_pre_processed(source, job.staged)), str(job.staged),
                         op_types_to_quantize=["Gather"], nodes_to_quantize=sorted(gathers),
                         weight_type=QuantType.QInt8)
        source, gathers = onnx.load(str(job.staged)), set()
    blocks = ((matmuls - experts, layout.dense_block_size), (matmuls & experts, layout.expert_block_size),
              (gathers, layout.expert_block_size))
    for chosen, block_size in blocks:
        if chosen:
            source = _nbits(source, chosen, job.exclude, bits=job.bits, block_size=block_size)
    return source


QDQ_STATIC = ApplyStep("qdq_static", run_qdq_static, calibrated=True, down=STATIC_DOWN,
                       unprotected_ops=("Softmax", "Sigmoid"))
DYNAMIC = ApplyStep("dynamic", run_dynamic, down=DYNAMIC_DOWN, gemms_as_matmuls=True)  # no dynamic Gemm kernel
FP16 = ApplyStep("fp16", run_fp16)
NBITS = ApplyStep("nbits", run_nbits, layout=True, gemms_as_matmuls=True)
