"""PyTorch MoE -> ONNX. Importing the package registers the built-in model families."""

from moeport.exporter import families, hf

__all__ = ["families", "hf"]
