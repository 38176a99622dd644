"""moeport's reference MoE models: the sample family (model.py), checkpoints (checkpoint.py), the catalog.

This package's own namespace is torch-free: ``TRAINED_DIR`` (the shipped trained sample, whose
``calibration.txt`` and ``heldout.txt`` quantize reads) is importable without PyTorch.
"""

from pathlib import Path

TRAINED_DIR = Path(__file__).parent / "trained"
