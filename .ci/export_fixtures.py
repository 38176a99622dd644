"""Models for .ci/torch-free, exported with the full install: DIR/topk.onnx (logits, with routing), DIR/inputs.npz,
and DIR/mixtral/ (a tiny transformers Mixtral checkpoint with a character tokenizer) with DIR/mixtral-past.onnx."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_hf import save_char_tokenizer, save_tiny_mixtral  # noqa: E402

from moeport.exporter.export import export_checkpoint  # noqa: E402
from moeport.samples.catalog import create_sample  # noqa: E402

root = Path(sys.argv[1])
export_checkpoint(create_sample("topk", root / "topk"), root / "topk.onnx", with_routing=True)
np.savez(root / "inputs.npz", input_ids=np.array([[1, 2, 3, 4]], dtype=np.int64))
checkpoint = save_tiny_mixtral(root / "mixtral")
save_char_tokenizer(checkpoint, " abcdefghijklmnopqrstuvwxyz")
export_checkpoint(checkpoint, root / "mixtral-past.onnx", task="text-generation-with-past")
