"""PyTorch MoE -> ONNX. Importing the package registers the built-in model families."""

from moeport.exporter import families, sample_family, hf, hf_switch  # registration order: samples first

__all__ = ["families", "hf", "hf_switch", "sample_family"]
