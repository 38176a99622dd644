"""Which integer scheme to quantize with, per deployment target and, for x86 CPUs, per CPU feature.

Why this exists (PITFALLS.md): on x86 without VNNI, onnxruntime's fused u8s8 kernels accumulate pairs in
int16 (``vpmaddubsw``) and saturate; measured top-k expert agreement fell to 80% on a toy MoE. Either
``reduce_range`` (7-bit weights) or u8u8 avoids it. With AVX512-VNNI / AVX-VNNI the int32 dot product
has no such limit, so full-range u8s8 is right.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from moeport.errors import MoeportError

TARGETS = ("cpu", "cuda", "arm", "nnapi", "coreml", "qnn")
# The mode each target gets when none is asked for: GPUs and Core ML run fp16 natively.
DEFAULT_MODE = {"cpu": "int8", "arm": "int8", "nnapi": "int8", "qnn": "int8", "cuda": "fp16", "coreml": "fp16"}
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
DOWN_ACTIVATIONS = ("auto", "int8", "int16")


# 16-bit activation type matching an 8-bit one's signedness (onnxruntime QuantType names).
WIDE = {"QUInt8": "QUInt16", "QInt8": "QInt16"}
# Targets whose runtimes execute 16-bit QDQ activations: onnxruntime's CPU provider (as dequantize ->
# float MatMul) and QNN HTP (A16W8 natively). NNAPI, TensorRT and Core ML have no 16-bit activations.
WIDE_DOWN_TARGETS = ("cpu", "arm", "qnn")


@dataclass(frozen=True)
class IntScheme:
    """8-bit scheme: types are onnxruntime QuantType names (QUInt8, QInt8).

    ``down_activation_type``: the type of the expert down-projection inputs (``silu(gate) * up``), 16-bit
    on targets that run it. Those products have the widest range of any activation in an MoE layer; at 8
    bits per tensor they were the main source of changed expert choices downstream (trained sample,
    held-out text: worst-layer routing agreement 0.975 with them at 8 bits, 0.984 at 16, 0.990 with the
    down projections left in float). Weights stay 8-bit everywhere.
    """

    activation_type: str
    weight_type: str
    reduce_range: bool
    per_channel: bool
    symmetric_activations: bool
    reason: str
    down_activation_type: str | None = None

    @property
    def down_type(self) -> str:
        return self.down_activation_type or self.activation_type

    def with_down_activations(self, bits: str, target: str) -> "IntScheme":
        """``bits``: auto (16-bit where the target runs it), int8 or int16."""
        if bits not in DOWN_ACTIVATIONS:
            raise MoeportError(f"unknown down-projection activation width {bits!r}; choose one of "
                               f"{', '.join(DOWN_ACTIVATIONS)}")
        if bits == "int16" and target not in WIDE_DOWN_TARGETS:
            raise MoeportError(f"target {target} cannot run 16-bit activations; use --down-activations int8 "
                               f"or auto (16-bit targets: {', '.join(WIDE_DOWN_TARGETS)})")
        wide = bits == "int16" or (bits == "auto" and target in WIDE_DOWN_TARGETS)
        return replace(self, down_activation_type=WIDE[self.activation_type] if wide else None)

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
    if target not in TARGETS:
        raise MoeportError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
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
