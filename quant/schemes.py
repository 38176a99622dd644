"""How numbers are laid out: the 8-bit scheme per deployment target and, for x86 CPUs, per CPU feature
(``IntScheme``, ``choose_scheme``), and the int4 block layout (``NBitsLayout``).

Why this exists: on x86 without VNNI, onnxruntime's fused u8s8 kernels accumulate pairs in int16
(``vpmaddubsw``) and saturate. Measured on an AMD EPYC with AVX2 and no VNNI (onnxruntime 1.32, graph
optimisations on): top-k expert agreement 80.2% and relative error 18.5% on a toy MoE, against 96.7% / 2.9%
with optimisations off. ``reduce_range`` (7-bit weights; 96.4% / 3.2%) or u8u8 avoids it. With AVX512-VNNI / AVX-VNNI the int32 dot product
has no such limit, so full-range u8s8 is right.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from moeport.errors import MoeportError
from moeport.registry import Registry


@dataclass(frozen=True)
class QuantTarget:
    """What a quantized model is for (``quantize --target``): the mode it gets when none is asked for, and whether
    it runs on onnxruntime's CPU provider (its contrib kernels and fused attention; QDQ there runs as many small
    kernels)."""

    name: str
    default_mode: str  # a registered quantization mode (tests/test_quant.py checks every target's)
    cpu: bool
    description: str


TARGETS: Registry[QuantTarget] = Registry("target")


def register_target(target: QuantTarget) -> QuantTarget:
    return TARGETS.add(target.name, target)


# The mode each target gets when none is asked for. CPUs (x86, arm): 8-bit blocks in onnxruntime's own kernels
# (QMoE, MatMulNBits, GatherBlockQuantized). On a granite-3.0-1b-a400m-shaped model, 2 threads (BENCHMARKS.md):
# 55-68 decode tokens/s and a next-token KL of 1.5-1.65e-6 from PyTorch, with no calibration data; calibrated QDQ
# int8 decodes 53-62 tokens/s at a KL of 1.72e-6 (16-bit activations, weights in blocks, experts one QMoE a layer:
# IntScheme.with_activations; 29-30 tokens/s with QDQ experts, 1.4 with 8-bit activations and outputs). NNAPI and
# QNN run QDQ natively; GPUs and Core ML run fp16.
for _target in (
    QuantTarget("cpu", "int8-blocks", True, "x86 or arm CPUs, onnxruntime's CPU provider"),
    QuantTarget("cuda", "fp16", False, "NVIDIA GPUs"),
    QuantTarget("arm", "int8-blocks", True, "arm CPUs (phones, boards), onnxruntime's CPU provider"),
    QuantTarget("nnapi", "int8", False, "Android Neural Networks API (runs QDQ natively)"),
    QuantTarget("coreml", "fp16", False, "Apple Core ML"),
    QuantTarget("qnn", "int8", False, "Qualcomm AI Engine Direct (runs QDQ natively)"),
):
    register_target(_target)

# What a user who gives calibration data and no mode asks for: the calibrated mode.
CALIBRATED_MODE = "int8"

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
DOWN_ACTIVATIONS = ("auto", "int8", "int16", "float")
# Static int8's activation width (quantize --activations).
ACTIVATIONS = ("auto", "int8", "int16")
# Static int8's weights per scale where its activations are 16-bit on a CPU target (passes.BlockWeightsPass): 32,
# llama.cpp Q8_0's block.
QDQ_WEIGHT_BLOCK_SIZE = 32
# 16-bit activation type matching an 8-bit one's signedness (onnxruntime QuantType names).
WIDE = {"QUInt8": "QUInt16", "QInt8": "QInt16"}
FLOAT = "float"


def default_mode(target: str, calibrated: bool) -> str:
    """The mode for ``target`` when none is given; ``calibrated``: calibration data was given."""
    return CALIBRATED_MODE if calibrated else TARGETS.get(target).default_mode


@dataclass(frozen=True)
class WideDown:
    """How far an 8-bit kind of mode may widen the expert down-projection inputs: to ``wide`` ("int16" or
    ``FLOAT``), on ``targets`` only. ``label`` names the kind in messages."""

    label: str
    wide: str
    targets: tuple[str, ...]


# Static QDQ at 16 bits runs on onnxruntime's CPU provider (MatMulNBits over the 8-bit weight once the MatMul's output
# is float, passes.FloatOutputsPass; for cpu and arm written so, passes.BlockWeightsPass) and QNN HTP (A16W8);
# dynamic int8 keeps them float with 8-bit block weights (MatMulNBits: CPU builds of onnxruntime).
# NNAPI, TensorRT and Core ML have neither.
STATIC_DOWN = WideDown("int8 (static)", "int16", ("cpu", "arm", "qnn"))
DYNAMIC_DOWN = WideDown("int8-dynamic", FLOAT, ("cpu", "arm"))


@dataclass(frozen=True)
class IntScheme:
    """8-bit scheme: types are onnxruntime QuantType names (QUInt8, QInt8; static int8's activations are
    QUInt16 on CPU targets, ``with_activations``).

    ``down_activation_type``: how the expert down-projection inputs (``silu(gate) * up``) are kept when not
    at 8 bits: a 16-bit QuantType (static int8) or ``"float"`` (dynamic int8: float activations, 8-bit block
    weights). Those products have the widest range of any activation in an MoE layer; at 8 bits per tensor
    they were the main source of changed expert choices downstream (trained sample, first 64 held-out
    windows, worst-layer routing agreement: static 0.975 at 8 bits, 0.984 at 16, 0.990 with the down
    projections left in float; dynamic 0.977 at 8 bits, 0.993 float). Weights stay 8-bit everywhere.
    """

    activation_type: str
    weight_type: str
    reduce_range: bool
    per_channel: bool
    symmetric_activations: bool
    reason: str
    down_activation_type: str | None = None
    # Weights in blocks of this many (MatMuls along K, embedding tables along a row) instead of per channel / tensor
    weight_block_size: int | None = None
    # The routed experts of each MoE layer as one onnxruntime QMoE node, weights in 8-bit blocks of this many
    # (passes.FuseExpertsPass; CPU targets with 16-bit activations, with_activations); None: QDQ MatMuls per expert.
    expert_block_size: int | None = None

    @property
    def wide_activations(self) -> bool:
        """Every activation at 16 bits (static int8 on CPU targets, ``with_activations``)."""
        return self.activation_type in WIDE.values()

    def with_activations(self, width: str, target: str, down: WideDown, on_cpu: bool,
                         fused_experts: bool = True) -> "IntScheme":
        """Static int8's activation width. ``width``: auto (16 bits where the target runs on onnxruntime's CPU
        provider, ``on_cpu``), int8, or int16 (the targets of ``down`` that run 16-bit Q/DQ). 16 bits on a CPU
        target also stores the weights in 8-bit blocks of ``QDQ_WEIGHT_BLOCK_SIZE`` as ``MatMulNBits``
        (``passes.BlockWeightsPass``, the embedding tables ``GatherBlockQuantized``) and, with ``fused_experts``,
        each MoE layer's routed experts as one ``QMoE`` in 8-bit blocks (``expert_block_size``:
        ``DEFAULT_EXPERT_BLOCK_SIZES[8]``, fitted to the model by ``with_expert_widths``); 8 bits keeps the mode to
        standard ONNX ops.

        Why 16 bits on CPUs: onnxruntime's CPU provider runs a QDQ MatMul with 16-bit inputs and a float output
        as ``MatMulNBits`` over its 8-bit weight, whose kernel quantizes each row's activations to 8 bits per
        block of 32 at run time (as llama.cpp's Q8_0 does), so the calibrated 16-bit Q/DQ only clips to the observed
        range. 8-bit inputs run as ``MatMulIntegerToFloat`` with one activation scale per tensor, and those
        scales' error adds up over the layers. On the 4-layer granite-shaped model (256 held-out positions), mean
        next-token KL from PyTorch: 8-bit activations with per-channel weights 2.5e-6 (1.65e-6 with the table in
        blocks), 16-bit with the weights and the table in blocks of 32 5.9e-7, llama.cpp Q8_0 6.4e-7; decode 125
        against 124 tokens/s (BENCHMARKS.md)."""
        if width not in ACTIVATIONS:
            raise MoeportError(f"unknown activation width {width!r}; choose one of {', '.join(ACTIVATIONS)}")
        if width == "int16" and target not in down.targets:
            raise MoeportError(f"target {target} cannot run int16 activations; use --activations int8 or auto "
                               f"(int16 targets: {', '.join(down.targets)})")
        if width == "int16" or (width == "auto" and on_cpu):
            return replace(self, activation_type=WIDE[self.activation_type], down_activation_type=None,
                           weight_block_size=QDQ_WEIGHT_BLOCK_SIZE if on_cpu else None,
                           expert_block_size=DEFAULT_EXPERT_BLOCK_SIZES[8] if on_cpu and fused_experts else None)
        return self

    def with_fused_experts(self, fused_experts: bool) -> "IntScheme":
        """Dynamic int8 whose inputs stay float where the target runs onnxruntime's CPU kernels
        (``down_activation_type`` ``FLOAT``, ``with_down_activations``): with ``fused_experts``, each MoE layer's
        routed experts as one ``QMoE`` in 8-bit blocks (``DEFAULT_EXPERT_BLOCK_SIZES[8]``, fitted to the model by
        ``with_expert_widths``), whose kernel quantizes its float input to 8 bits as it runs: still int8 weights
        with activations quantized at run time. Any other scheme is returned as it is.

        Why: per expert, the gate and up projections run as onnxruntime's dynamically quantized MatMul for every
        expert, also those that got no row. At granite-3.0-1b-a400m size, 2 threads (BENCHMARKS.md): 33.4 against
        52.8 decode tokens/s as QMoE in one process, a next-token KL from PyTorch of 1.49e-6 against 1.51e-6;
        llama.cpp Q8_0 45.9-49.9 tokens/s at 1.81e-6."""
        if not fused_experts or self.down_activation_type != FLOAT:
            return self
        return replace(self, expert_block_size=DEFAULT_EXPERT_BLOCK_SIZES[8])

    def with_expert_widths(self, widths: Iterable[int]) -> "IntScheme":
        """This scheme (``expert_block_size`` set) with ``expert_block_size`` halved (down to MIN_BLOCK_SIZE) until
        it divides every expert weight's input width ``widths``."""
        return replace(self, expert_block_size=fitted_block_size(self.expert_block_size, widths))

    def with_down_activations(self, width: str, target: str, down: WideDown) -> "IntScheme":
        """``width``: auto (the widest ``down`` allows on the target), int8, int16 or float. With every
        activation at 16 bits already (``with_activations``), only auto and int16 apply."""
        if width not in DOWN_ACTIVATIONS:
            raise MoeportError(f"unknown down-projection activation width {width!r}; choose one of "
                               f"{', '.join(DOWN_ACTIVATIONS)}")
        wide, targets = down.wide, down.targets
        if width not in ("auto", "int8", wide):
            raise MoeportError(f"--down-activations {width} does not apply to {down.label}; choose auto, int8 "
                               f"or {wide}")
        if self.wide_activations:
            if width == "int8":
                raise MoeportError(f"--down-activations {width} does not apply when every activation is int16 "
                                   "(--activations int16, the default for cpu and arm); add --activations int8 to "
                                   "choose it")
            return self
        if width == wide and target not in targets:
            raise MoeportError(f"target {target} cannot run {wide} down-projection inputs; use --down-activations "
                               f"int8 or auto ({wide} targets: {', '.join(targets)})")
        if width == "int8" or (width == "auto" and target not in targets):
            return replace(self, down_activation_type=None)
        return replace(self, down_activation_type=WIDE[self.activation_type] if wide == "int16" else FLOAT)

    @property
    def opset(self) -> int | None:
        """The least opset the scheme's Q/DQ types need (16-bit: 21), None when any will do."""
        types = (self.activation_type, self.weight_type, self.down_activation_type)
        return 21 if any(t in WIDE.values() for t in types) else None

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The flags of the first CPU in ``cpuinfo`` (empty when the file does not exist: not Linux)."""
    path = Path(cpuinfo)
    if not path.is_file():
        return set()
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("flags") or line.startswith("Features"):  # x86 | ARM
            return set(line.split(":", 1)[1].split())
    return set()


def choose_scheme(target: str, *, machine: str | None = None, flags: set[str] | None = None) -> IntScheme:
    """The int8 scheme for ``target``; for ``cpu`` it depends on this machine (or the given one)."""
    TARGETS.get(target)  # an unknown target is a user error naming the known ones
    if target == "cpu":
        machine = (machine or platform.machine()).lower()
        if machine in ("x86_64", "amd64", "i686", "x86"):
            flags = cpu_flags() if flags is None else flags
            vnni = sorted(f for f in VNNI_FLAGS if f in flags)
            if vnni:
                return IntScheme("QUInt8", "QInt8", False, True, False,
                                 f"x86 with {'/'.join(vnni)}: full-range u8s8 (int32 dot products)")
            return IntScheme("QUInt8", "QInt8", True, True, False,
                             "x86 without VNNI: u8s8 with reduce_range (7-bit weights) so int16 accumulation "
                             "in the fused kernels cannot saturate")
        return IntScheme("QUInt8", "QInt8", False, True, False, f"{machine}: u8s8 (int32 accumulation)")
    if target == "arm":
        return IntScheme("QUInt8", "QInt8", False, True, False, "ARM: u8s8 per-channel (NEON int32 dot products)")
    if target == "nnapi":
        return IntScheme("QUInt8", "QUInt8", False, False, False,
                         "NNAPI: uint8 activations and weights, per-tensor (TENSOR_QUANT8_ASYMM)")
    if target == "qnn":
        return IntScheme("QUInt8", "QUInt8", False, True, False, "QNN HTP: uint8 activations and weights")
    if target == "cuda":
        return IntScheme("QInt8", "QInt8", False, True, True,
                         "CUDA/TensorRT: symmetric int8 activations and weights (fp16 is the default mode here)")
    return IntScheme("QUInt8", "QInt8", False, True, False, "Core ML: u8s8 (fp16 is the default mode here)")


# Expert weights per block by width. 4-bit: blocks of 256, the largest onnxruntime's block kernels take (0.517 bytes
# per weight with the float32 scale and the 4-bit zero point, under llama.cpp's Q4_0 at 0.5625). QMoE's CPU kernel
# pays per block as well as per byte: on the 24-layer granite-shaped model (BENCHMARKS.md) its time a layer went
# from 254 us at 128 to 207 us at 256 (profiles of 24 decode steps); decode +3.5% to +7.2% in four runs of
# benchmarks/decode_ab.py (both orders, the files loaded in turn), prefill 5-7% shorter, mean KL from PyTorch
# 4.39e-5 against 4.32e-5 at 128 (Q4_0: 1.19e-4). Those are random weights: a trained checkpoint's outliers cost
# more in a larger block (the trained sample, whose widths of 128 cannot show 256, lost 0.006 of routing agreement
# from 64 to 128), so `--block-size 128` (the group size of AWQ and GPTQ)
# or smaller is the choice where the quantize report's routing agreement or perplexity says so. Earlier steps:
# 64 against 32: 70.0 vs 66.9 and 69.7 vs 63.8 tokens/s; 128 against 64: +1.3% to +5%, the trained sample's
# routing agreement 0.962 vs 0.968 and perplexity +0.99% vs +0.72% (targets 0.95, +5%). 8-bit: blocks of 128 (1.04
# bytes per weight against 1.16 at 32; Q8_0: 1.06): 53.7 vs 49.5 and 59.5 vs 54.1 tokens/s, KL 1.52e-6 as at 32
# (Q8_0: 1.81e-6) once the embedding kept its own blocks of 32 (with the embedding in blocks of 128 too the KL was
# 1.79e-6: the table, not the experts, carried that error); 256 gave +3.5% and -4.3% in two runs: noise, not taken.
# The arm target runs the same CPU kernel (not measured on arm). A model whose widths the size does not divide gets
# it halved (down to 16): resolved_for.
DEFAULT_EXPERT_BLOCK_SIZES = {4: 256, 8: 128}
# Targets that do not run onnxruntime's CPU provider (cuda) keep 4-bit experts in blocks of 128: the gain of 256 is
# the CPU kernel's, and no GPU was at hand to measure or check 256 on.
NON_CPU_EXPERT_BLOCK_SIZE = 128
# onnxruntime's block quantizer (MlasQuantizeBlockwise) and kernels take blocks of 16 to 256 values.
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 256
# The embedding table's values per block. A token reads one row of the table, so the size of its blocks costs no
# decode time, only file size; small blocks keep its error (which every position carries) small.
DEFAULT_EMBEDDING_BLOCK_SIZE = 32


def fitted_block_size(size: int, widths: Iterable[int]) -> int:
    """``size`` halved (down to MIN_BLOCK_SIZE) until it divides every one of ``widths``: a small model still gets
    blocks (experts fused, no padded half-empty blocks)."""
    widths = set(widths)
    while size > MIN_BLOCK_SIZE and any(width % size for width in widths):
        size //= 2
    return size


def dense_block_default(bits: int, dense_bits: int, kv_projection_bits: int = 8) -> int:
    """Weights per block for the MatMuls outside the experts but the lm_head (attention, dense MLPs), before
    resolved_for fits it to their widths. 128 where they are 8-bit in a 4-bit mode: 1.03 bytes per weight against 1.16
    at 32, so an int4 decode step reads 4% fewer bytes; measured on the 24-layer granite-shaped model (BENCHMARKS.md),
    steps interleaved in one process, +6%, +1% and +2% decode in three runs, KL 5.7e-6 against 5.3e-6 (Q4_0:
    1.2e-4); the trained sample's routing agreement 0.958. 4-bit attention with 8-bit key/value projections gets 64
    (0.57 bytes per 4-bit weight, 1.07 per 8-bit one). Everything 4-bit keeps 32 (in blocks of 128: KL 2.1e-4
    against 1.8e-4 in blocks of 64), and so does int8-blocks (its blocks of 64 / 128 raised its KL to 2.0e-6, above
    Q8_0's 1.8e-6)."""
    if bits == 4 and kv_projection_bits == 8:
        return {8: 128, 4: 64}[dense_bits]
    return 32


# A 4-bit lm_head's values per block. The lm_head is where the next-token distribution is made, so its error is
# not averaged away by later layers: on the 24-layer granite-shaped model (int4, attention 8-bit blocks of 128) a
# 4-bit lm_head in blocks of 32 gave a mean KL of 4.2e-5, in blocks of 64 5.2e-5 (8-bit blocks of 128: 5.5e-6;
# llama.cpp Q4_0, whose tied output is Q6_K: 1.2e-4), both 7% faster than the 8-bit lm_head (BENCHMARKS.md).
HEAD_BLOCK_SIZE_4BIT = 32
# An 8-bit lm_head's values per block: 128 (1.04 bytes a weight against 1.16 in blocks of 32; the lm_head is 50M of
# the granite-shaped model's weights and read whole at every step). int8-blocks on the 24-layer granite-shaped
# model, its lm_head in blocks of 128 against the dense block of 32 it had (BENCHMARKS.md): decode +2.0% to +6.1%
# in four runs of benchmarks/decode_ab.py (both orders), mean KL 1.65e-6 against 1.51e-6 (Q8_0: 1.81e-6).
HEAD_BLOCK_SIZE_8BIT = 128


@dataclass(frozen=True)
class NBitsLayout:
    """int4: block sizes and the widths of what is not an expert.

    Expert weights (most of an MoE's parameters) are 4-bit blocks of ``expert_block_size``; the other MatMuls
    (attention, dense MLPs, lm_head: a small share of the parameters that every token goes through) are
    ``dense_bits`` blocks of ``dense_block_size``, but attention's key and value projections
    (``kv_projection_bits``) and the lm_head (``head_bits`` blocks of ``head_block_size``); the embedding table is
    stored in ``embedding_bits`` blocks of ``embedding_block_size`` (GatherBlockQuantized).

    Measured (BENCHMARKS.md). Trained sample, held-out text (first 64 windows of 128 bytes): all at 4 bits /
    block 32, worst-layer routing agreement 0.947 at 0.181 of the fp32 size; embedding at 8 bits 0.951 / 0.183;
    plus dense block 16: 0.958 / 0.187. Granite-shaped model (hidden 1024, 32 experts top-8, vocab 49155, 4
    layers, benchmarks/vs_llamacpp.py), mean next-token KL divergence from PyTorch fp32 over 256 held-out
    positions, per-tensor int8 embedding: everything outside the experts at 4 bits (dense block 16) 3.2e-5; 8-bit
    dense blocks of 32 2.1e-6 at the same decode speed (8-bit MatMulNBits runs the int8 kernels as 4-bit does);
    experts at 8 bits as well 1.5e-6: the experts were not where the error was.
    """

    expert_block_size: int | None  # None: DEFAULT_EXPERT_BLOCK_SIZES for the mode's width (resolved_for)
    dense_block_size: int | None  # None: dense_block_default (resolved_for)
    embedding_bits: int
    dense_bits: int = 8
    fused_experts: bool = True  # each MoE layer's experts as one onnxruntime QMoE node (passes.FuseExpertsPass)
    # The lm_head's width (head_block_size blocks); None: the mode's width (resolved_for). int4's 4-bit lm_head:
    # the 24-layer granite-shaped model's mean KL 5.5e-6 -> 4.2e-5 (llama.cpp Q4_0: 1.2e-4) for 7% faster decode;
    # trained sample's perplexity +0.30% -> +0.72%, its routing unchanged (the lm_head is after every router).
    head_bits: int | None = None
    # Attention's key and value projections' width (dense_block_size blocks). With dense_bits=4 they stay 8-bit by
    # default, as llama.cpp's Q4_K_M keeps attn_v wider: on the trained sample the keys and values are what the
    # routing is sensitive to. Routing agreement with 4-bit attention but one kind of projection kept 8-bit: v 0.951,
    # k and v 0.952-0.956, o 0.943, q 0.945; all 4-bit 0.942; all 8-bit (the default) 0.958-0.960; target 0.95.
    kv_projection_bits: int = 8
    embedding_block_size: int | None = None  # None: DEFAULT_EMBEDDING_BLOCK_SIZE (resolved_for)
    expert_bits: int | None = None  # the mode's width, filled in by resolved_for (for the report and metadata)
    # None: HEAD_BLOCK_SIZE_8BIT for an 8-bit lm_head, HEAD_BLOCK_SIZE_4BIT for a 4-bit one (resolved_for)
    head_block_size: int | None = None

    def resolved_for(self, bits: int, expert_widths: Iterable[int], dense_widths: Iterable[int],
                     table_widths: Iterable[int] = (), on_cpu: bool = True) -> NBitsLayout:
        """This layout with the block sizes filled in where none was given: DEFAULT_EXPERT_BLOCK_SIZES for a
        ``bits``-wide mode's experts (at most NON_CPU_EXPERT_BLOCK_SIZE where the target is not ``on_cpu``),
        ``dense_block_default`` for the other MatMuls, DEFAULT_EMBEDDING_BLOCK_SIZE
        for the embedding, each halved (down to 16) until it divides every width it applies to (``expert_widths``:
        the expert weights' input widths; ``dense_widths``: the other MatMuls' input widths; ``table_widths``: the
        embedding's row length), so a small model still gets blocks (experts fused, no padded half-empty blocks)."""

        layout = replace(self, expert_bits=bits)
        if layout.head_bits is None:
            layout = replace(layout, head_bits=bits)
        if layout.expert_block_size is None:
            default = DEFAULT_EXPERT_BLOCK_SIZES[bits]
            if not on_cpu:
                default = min(default, NON_CPU_EXPERT_BLOCK_SIZE)
            layout = replace(layout, expert_block_size=fitted_block_size(default, expert_widths))
        if layout.dense_block_size is None:
            default = dense_block_default(bits, layout.dense_bits, layout.kv_projection_bits)
            layout = replace(layout, dense_block_size=fitted_block_size(default, dense_widths))
        if layout.head_block_size is None:
            default = HEAD_BLOCK_SIZE_8BIT if layout.head_bits == 8 else HEAD_BLOCK_SIZE_4BIT
            layout = replace(layout, head_block_size=fitted_block_size(default, dense_widths))
        if layout.embedding_block_size is None:
            layout = replace(layout, embedding_block_size=fitted_block_size(DEFAULT_EMBEDDING_BLOCK_SIZE, table_widths))
        return layout

    def validate(self) -> None:
        for label, size in (("block size", self.expert_block_size), ("dense block size", self.dense_block_size),
                            ("head block size", self.head_block_size),
                            ("embedding block size", self.embedding_block_size)):
            if size is None:  # the default, resolved_for the model
                continue
            if not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE or size & (size - 1):
                raise MoeportError(f"{label} must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} "
                                   f"(onnxruntime's block kernels), got {size}")
        for label, bits in (("embedding bits", self.embedding_bits), ("dense bits", self.dense_bits),
                            ("head bits", self.head_bits), ("key/value projection bits", self.kv_projection_bits)):
            if bits is not None and bits not in (4, 8):  # None: the default, resolved_for the mode
                raise MoeportError(f"{label} must be 4 or 8, got {bits}")

    def describe(self) -> str:
        experts = "one QMoE per layer, " if self.fused_experts else ""
        return (f"expert weights {experts}{self.expert_bits}-bit blocks of {self.expert_block_size}, "
                f"other MatMuls {self.dense_bits}-bit blocks of {self.dense_block_size} "
                f"(key/value projections {self.kv_projection_bits}-bit, "
                f"lm_head {self.head_bits}-bit blocks of {self.head_block_size}), "
                f"embedding {self.embedding_bits}-bit blocks of {self.embedding_block_size}")

    def to_dict(self) -> dict:
        return asdict(self)
