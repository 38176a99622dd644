"""The quantization modes: one registry of small spec objects, validated at registration.

A mode says which onnxruntime tool does the work (``kind``), whether it needs calibration data, and
the quality it is expected to keep on the trained sample (used by the report to say "meets target").
The functions that apply each kind live in ``moeport.quant.core``; a mode is data, not code.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from moeport.errors import MoeportError

KINDS = ("qdq_static", "dynamic", "fp16", "nbits")


@dataclass(frozen=True)
class QuantMode:
    """One ``--mode`` value.

    Targets (trained sample, CPU): ``max_size_ratio`` of the fp32 file, ``min_routing_agreement`` with
    PyTorch fp32, ``max_perplexity_increase`` as a fraction (0.02 = +2%).
    """

    name: str
    kind: str
    description: str
    needs_calibration: bool
    max_size_ratio: float
    min_routing_agreement: float
    max_perplexity_increase: float
    bits: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


_MODES: dict[str, QuantMode] = {}
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def register_mode(mode: QuantMode) -> QuantMode:
    """Add ``mode``; programming errors (duplicate, bad field) raise ValueError at import time."""
    if mode.name in _MODES:
        raise ValueError(f"quantization mode {mode.name!r} is already registered")
    if not _NAME.match(mode.name):
        raise ValueError(f"mode names are lower-case letters, digits and '-': {mode.name!r}")
    if mode.kind not in KINDS:
        raise ValueError(f"mode {mode.name!r}: kind must be one of {KINDS}, got {mode.kind!r}")
    if mode.needs_calibration != (mode.kind == "qdq_static"):
        raise ValueError(f"mode {mode.name!r}: only static quantization needs calibration")
    if not 0 < mode.max_size_ratio <= 1 or not 0 < mode.min_routing_agreement <= 1:
        raise ValueError(f"mode {mode.name!r}: size ratio and routing agreement must be in (0, 1]")
    if mode.max_perplexity_increase < 0:
        raise ValueError(f"mode {mode.name!r}: perplexity increase must be non-negative")
    if mode.bits not in (4, 8, 16):
        raise ValueError(f"mode {mode.name!r}: bits must be 4, 8 or 16")
    _MODES[mode.name] = mode
    return mode


def modes() -> list[QuantMode]:
    return list(_MODES.values())


def get_mode(name: str) -> QuantMode:
    try:
        return _MODES[name]
    except KeyError:
        raise MoeportError(f"unknown quantization mode {name!r}; choose one of {', '.join(_MODES)}") from None


register_mode(QuantMode("int8", "qdq_static", "static int8 QDQ, per-channel weights, calibrated activations",
                        True, 0.30, 0.98, 0.02))
register_mode(QuantMode("int8-dynamic", "dynamic", "int8 weights, activations quantized at run time (no calibration)",
                        False, 0.30, 0.98, 0.02))
register_mode(QuantMode("fp16", "fp16", "float16 weights and compute; graph inputs/outputs stay float32",
                        False, 0.52, 0.995, 0.001, bits=16))
register_mode(QuantMode("int4", "nbits", "4-bit block-quantized weights (MatMulNBits), float activations",
                        False, 0.20, 0.95, 0.05, bits=4))
