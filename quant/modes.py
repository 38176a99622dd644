"""The quantization modes: one registry of small spec objects, validated at registration.

A mode carries the step that applies it (``step``, an ``moeport.quant.apply.ApplyStep``: the onnxruntime tool
and what it needs), whether it needs calibration data, and the quality it is expected to keep on the trained
sample (used by the report to say "meets target"). ``kind`` names the step. Adding a mode is one
``register_mode(QuantMode(...))`` call: with a new ``ApplyStep``, or, to reuse the step of a registered mode,
with that step's name as ``kind`` (e.g. ``"nbits"`` for another n-bit width).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from moeport.quant.apply import DYNAMIC, FP16, NBITS, QDQ_STATIC, ApplyStep
from moeport.quant.schemes import TARGETS
from moeport.registry import Registry


@dataclass(frozen=True)
class QuantMode:
    """One ``--mode`` value.

    ``kind``: the name of the step that applies it; ``step``: that ``ApplyStep`` (None: the step of a registered
    mode of the same kind, filled in by ``register_mode``). Targets (trained sample, CPU): ``max_size_ratio`` of
    the fp32 file, ``min_routing_agreement`` with PyTorch fp32, ``max_perplexity_increase`` as a fraction
    (0.02 = +2%). ``bits``: the weight width the step writes (the n-bit step reads it).
    """

    name: str
    kind: str
    description: str
    needs_calibration: bool
    max_size_ratio: float
    min_routing_agreement: float
    max_perplexity_increase: float
    bits: int = 8
    step: ApplyStep | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "description": self.description,
                "needs_calibration": self.needs_calibration, "max_size_ratio": self.max_size_ratio,
                "min_routing_agreement": self.min_routing_agreement,
                "max_perplexity_increase": self.max_perplexity_increase, "bits": self.bits}


_MODES: Registry[QuantMode] = Registry("quantization mode")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def kinds() -> dict[str, ApplyStep]:
    """The steps of the registered modes by name: what a new mode's ``kind`` may name without its own step."""
    return {mode.kind: mode.step for mode in _MODES.values()}


def _step_of(mode: QuantMode) -> ApplyStep:
    known = kinds()
    if mode.step is None:
        if mode.kind not in known:
            raise ValueError(f"mode {mode.name!r}: kind must be one of {tuple(known)} (the steps of registered "
                             f"modes), or come with its own ApplyStep; got {mode.kind!r}")
        return known[mode.kind]
    if not isinstance(mode.step, ApplyStep):
        raise ValueError(f"mode {mode.name!r}: step must be an ApplyStep, got {type(mode.step).__name__}")
    if mode.kind != mode.step.name:
        raise ValueError(f"mode {mode.name!r}: kind {mode.kind!r} must name its step {mode.step.name!r}")
    if known.get(mode.kind, mode.step) is not mode.step:
        raise ValueError(f"mode {mode.name!r}: kind {mode.kind!r} already names another registered step")
    return mode.step


def register_mode(mode: QuantMode) -> QuantMode:
    """Add ``mode`` (its ``step`` filled in from ``kind`` when not given) and return what was registered;
    programming errors (duplicate, unknown kind, bad field) raise ValueError at import time."""
    if not _NAME.match(mode.name):
        raise ValueError(f"mode names are lower-case letters, digits and '-': {mode.name!r}")
    step = _step_of(mode)
    if mode.needs_calibration != step.calibrated:
        raise ValueError(f"mode {mode.name!r}: needs_calibration must be {step.calibrated}, as its step {step.name} "
                         f"{'calibrates' if step.calibrated else 'takes no calibration data'} (of the built-in "
                         "kinds, only static quantization needs calibration)")
    if not 0 < mode.max_size_ratio <= 1 or not 0 < mode.min_routing_agreement <= 1:
        raise ValueError(f"mode {mode.name!r}: size ratio and routing agreement must be in (0, 1]")
    if mode.max_perplexity_increase < 0:
        raise ValueError(f"mode {mode.name!r}: perplexity increase must be non-negative")
    if mode.bits not in (4, 8, 16):
        raise ValueError(f"mode {mode.name!r}: bits must be 4, 8 or 16")
    unknown = [target for target in step.targets or () if target not in TARGETS]
    if unknown:
        raise ValueError(f"mode {mode.name!r}: its step runs on {unknown}, which are not quantization targets "
                         f"({', '.join(TARGETS.names())})")
    return _MODES.add(mode.name, replace(mode, step=step))


def modes() -> list[QuantMode]:
    return _MODES.values()


def get_mode(name: str) -> QuantMode:
    return _MODES.get(name)


register_mode(QuantMode("int8", "qdq_static", "static int8 QDQ, calibrated activations (16-bit on CPU targets), "
                        "per-channel weights (blocks of 32 on CPU targets, the routed experts one QMoE per layer)",
                        True, 0.30, 0.98, 0.02, step=QDQ_STATIC))
register_mode(QuantMode("int8-dynamic", "dynamic", "int8 weights, activations quantized at run time (no calibration; "
                        "on CPU targets 8-bit blocks, the routed experts one QMoE per layer)",
                        False, 0.30, 0.98, 0.02, step=DYNAMIC))
register_mode(QuantMode("fp16", "fp16", "float16 weights and compute; graph inputs/outputs stay float32",
                        False, 0.52, 0.995, 0.001, bits=16, step=FP16))
register_mode(QuantMode("int4", "nbits", "4-bit block-quantized expert weights (QMoE / MatMulNBits), 8-bit blocks "
                        "elsewhere, int8 activations at run time", False, 0.20, 0.95, 0.05, bits=4, step=NBITS))
# The n-bit step at 8 bits: every weight in 8-bit blocks (onnxruntime's CPU and CUDA contrib kernels), the fast
# 8-bit mode where those run (int8-dynamic keeps standard ONNX ops for the other targets).
register_mode(QuantMode("int8-blocks", "nbits", "8-bit block-quantized weights (QMoE / MatMulNBits), int8 "
                        "activations at run time", False, 0.32, 0.98, 0.02, bits=8))
