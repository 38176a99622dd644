"""Quantize exported MoE models with onnxruntime's tools, keeping the routers in float32.

``quantize(model, out, mode="int8"|"int8-dynamic"|"fp16"|"int4", ...)`` -> ``QuantizeResult`` (``to_dict()``,
``render()``): what was quantized, how many router nodes stayed float, calibration coverage per expert,
and a quality report (size, parity with PyTorch, perplexity, routing agreement, latency).
Modes are registered in ``moeport.quant.modes``; routers and experts are found by ``moeport.runtime.moe_graph``.
"""

from moeport.quant.core import quantize
from moeport.quant.modes import QuantMode, get_mode, modes, register_mode
from moeport.quant.result import QuantizeResult, QuantizeWarning
from moeport.quant.schemes import TARGETS, QuantTarget, choose_scheme, register_target

__all__ = [
    "TARGETS",
    "QuantMode",
    "QuantTarget",
    "QuantizeResult",
    "QuantizeWarning",
    "choose_scheme",
    "get_mode",
    "modes",
    "quantize",
    "register_mode",
    "register_target",
]
