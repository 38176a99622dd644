"""The PyTorch checkpoint as a parity reference (``contract.Reference``) for verify, bench and quantize.

The runtime and the quantizer never import torch: they take a ``Reference``, and this is the one that runs a
checkpoint directory in PyTorch eager. ``verify_checkpoint(model, checkpoint)`` is ``moeport verify``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from moeport.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, model_info
from moeport.exporter import families
from moeport.runtime.layouts import model_file
from moeport.runtime.verify import VerifyReport, verify
from moeport.samples.checkpoint import checkpoint_hash


class CheckpointReference:
    """A checkpoint directory run in PyTorch eager, with the reference dispatch.

    ``outputs(feeds)`` takes the feeds of either task: ``input_ids [batch, seq]`` (+ ``attention_mask``) for
    ``logits`` models, or a decoder step (``input_ids``, ``attention_mask [batch, past + seq]``,
    ``position_ids``, the cache inputs ``past_key_values.{i}.key|value`` / ``past_{kind}.{i}``) for
    ``text-generation-with-past`` models, which also returns the presents.
    """

    def __init__(self, loaded: families.LoadedModel, source: Path, source_sha256: str):
        self.loaded = loaded
        self.info = loaded.info
        self.tolerance = families.get_family(loaded.info.family).tolerance
        self.source = source
        self.source_sha256 = source_sha256

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, trust_pickle: bool = False) -> "CheckpointReference":
        loaded = families.load_checkpoint(checkpoint, trust_pickle=trust_pickle)
        return cls(loaded, Path(checkpoint), checkpoint_hash(checkpoint))

    def outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if POSITION_IDS not in feeds:
            return families.reference_outputs(self.loaded, feeds)
        tensors = {name: torch.from_numpy(array) for name, array in feeds.items()}
        layout = self.loaded.model.cache_layout()
        with torch.no_grad():
            logits, presents, routing = self.loaded.model.step(tensors[INPUT_IDS], tensors[ATTENTION_MASK],
                                                               tensors[POSITION_IDS], [tensors[e.past] for e in layout])
        return {LOGITS: logits.numpy(), **{entry.present: p.numpy() for entry, p in zip(layout, presents)},
                **families.routing_arrays(self.info, routing)}

    def margins(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if POSITION_IDS in feeds:
            return []  # the tie-margin hooks run a plain forward; a decoder step has no such view
        return families.routing_margins(self.loaded, feeds)

    @contextlib.contextmanager
    def timed_forward(self, feeds: dict[str, np.ndarray], threads: int):
        """Yield a no-argument callable running one eager forward on ``feeds`` with ``threads`` intra-op
        threads (what bench times beside onnxruntime); torch's thread count is restored on exit."""
        previous = torch.get_num_threads()
        tensors = {name: torch.from_numpy(array) for name, array in feeds.items()}
        torch.set_num_threads(threads)

        def forward():
            with torch.no_grad():
                return self.loaded.model(**tensors)

        try:
            yield forward
        finally:
            torch.set_num_threads(previous)


def verify_checkpoint(model: str | os.PathLike, checkpoint: str | os.PathLike, **options) -> VerifyReport:
    """``verify(model, CheckpointReference.load(checkpoint), **options)``: what ``moeport verify`` runs."""
    model = model_file(model)
    model_info(model)  # a bad model file is reported before the (slower) checkpoint load
    return verify(model, CheckpointReference.load(checkpoint), **options)
