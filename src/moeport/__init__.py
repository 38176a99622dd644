"""moeport: export Mixture-of-Experts models to ONNX and run them on onnxruntime.

Subpackages: ``moeport.exporter`` (PyTorch -> ONNX), ``moeport.runtime`` (onnxruntime sessions,
comparison, verification), ``moeport.quant`` (quantization), ``moeport.samples`` (reference MoE models).
"""

from moeport.errors import MoeportError, UsageError

__version__ = "0.1.0"

__all__ = ["MoeportError", "UsageError", "__version__"]
