"""PyTorch MoE -> ONNX. Importing the package registers the built-in model families."""

from moeport.exporter import families, hf, hf_switch

__all__ = ["families", "hf", "hf_switch"]
