"""Parity of an exported model against the model it came from: what ``moeport verify`` runs.

The reference is any ``contract.Reference`` (the exporter's ``CheckpointReference`` runs a PyTorch
checkpoint; this module never imports torch). Both run on the same seeded ``input_ids`` at each requested
``(batch, seq)`` shape; every output the graph shares with the reference is compared by one ``Comparator``
(per-output stats, argmax agreement for logits, routing agreement and expert load per MoE layer when the
model was exported ``--with-routing``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeport._fs import load_npz
from moeport.contract import (ATTENTION_MASK, INPUT_IDS, POSITION_IDS, ModelInfo, Reference, model_info,
                              quantization_mode, random_inputs, routing_name)
from moeport.errors import MoeportError, UsageError
from moeport.runtime._io import TensorSpec, check_inputs, group_per_layer
from moeport.runtime.compare import Comparator, Comparison, OutputStats
from moeport.runtime.generate import decoder_feeds, empty_past
from moeport.runtime.layouts import model_file
from moeport.runtime.session import create_session

DEFAULT_SHAPES = ((1, 1), (3, 7), (2, 64))
_SHAPE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"1x1,3x7"`` -> ``[(1, 1), (3, 7)]``; anything else is a usage error naming the bad part."""
    shapes = []
    for part in text.split(","):
        match = _SHAPE.match(part)
        if not match or min(int(match[1]), int(match[2])) < 1:
            raise UsageError(
                f"cannot parse shape {part.strip()!r} in {text!r}: expected BATCHxSEQ[,BATCHxSEQ...] "
                "with positive sizes, e.g. 1x1,3x7,2x64"
            )
        shapes.append((int(match[1]), int(match[2])))
    return shapes


@dataclass
class ShapeResult:
    shape: tuple[int, int]
    comparison: Comparison
    dropped: dict[str, int] = field(default_factory=dict)  # capacity strategy: dropped slots per layer

    def to_dict(self) -> dict:
        return {"shape": f"{self.shape[0]}x{self.shape[1]}", **self.comparison.to_dict(), "dropped": self.dropped}


@dataclass
class VerifyReport:
    model: Path
    checkpoint: Path
    ep: str
    strategy: str
    results: list[ShapeResult]
    warnings: list[str] = field(default_factory=list)

    @property
    def overall(self) -> Comparison:
        """Every shape's outputs and routing in one Comparison: its aggregates are the report's."""
        return Comparison(outputs=[o for r in self.results for o in r.comparison.outputs],
                          routing=[x for r in self.results for x in r.comparison.routing],
                          missing=sorted({m for r in self.results for m in r.comparison.missing}))

    @property
    def passed(self) -> bool:
        return self.overall.passed

    @property
    def max_abs_err(self) -> float:
        return self.overall.max_abs_err

    @property
    def routing_agreement(self) -> float | None:
        return self.overall.routing_agreement

    @property
    def argmax_agreement(self) -> float | None:
        return self.overall.argmax_agreement

    def to_dict(self) -> dict:
        return {
            **self.overall.summary(),
            "model": str(self.model),
            "checkpoint": str(self.checkpoint),
            "ep": self.ep,
            "strategy": self.strategy,
            "warnings": self.warnings,
            "shapes": [r.to_dict() for r in self.results],
        }

    def render(self) -> str:
        """A plain-text report: one table of outputs per shape, then routing per layer."""
        lines = [f"verify {self.model} against {self.checkpoint} on {self.ep} (strategy {self.strategy})"]
        lines += [f"warning: {w}" for w in self.warnings]
        header = f"  {'output':<28} {'max_abs':>9} {'mean_abs':>9} {'p99_abs':>9} {'max_rel':>9} {'cosine':>9} {'argmax':>7}  ok"
        for result in self.results:
            lines.append(f"shape {result.shape[0]}x{result.shape[1]}")
            lines.append(header)
            # A with-past model's 48 presents as two rows, present.{0..23}.key and .value, each the worst of its
            # layers in every column (--json keeps every output).
            lines += [_output_row(name, group) for name, group in
                      group_per_layer(result.comparison.outputs, lambda o: (o.name, o.argmax_agreement))]
            for name in result.comparison.missing:
                lines.append(f"  {name:<28} missing from the model's outputs  NO")
            for r in result.comparison.routing:
                dropped = f" dropped {result.dropped[r.label]}" if r.label in result.dropped else ""
                dropped += f" near-ties {r.near_ties}" if r.near_ties else ""
                lines.append(f"  routing layer {r.label}: agreement {r.agreement:.4f} over {r.tokens} tokens, "
                             f"load {r.load_actual}{dropped}  {'yes' if r.passed else 'NO'}")
        routing = "n/a (export --with-routing to compare routing)" if self.routing_agreement is None \
            else f"{self.routing_agreement:.4f}"
        argmax = "n/a" if self.argmax_agreement is None else f"{self.argmax_agreement:.4f}"
        lines.append(f"{'PASSED' if self.passed else 'FAILED'}: max abs error {self.max_abs_err:.3g}, "
                     f"routing agreement {routing}, argmax agreement {argmax}")
        return "\n".join(lines)


def _output_row(name: str, group: list[OutputStats]) -> str:
    """The report's row for the outputs ``group`` (one, or one per layer) under ``name``: the worst of them in
    every column."""
    def worst(field: str, pick=max) -> float:
        return pick(getattr(o, field) for o in group)

    argmax = "" if group[0].argmax_agreement is None else f"{group[0].argmax_agreement:.4f}"
    return (f"  {name:<28} {worst('max_abs'):9.2e} {worst('mean_abs'):9.2e} {worst('p99_abs'):9.2e} "
            f"{worst('max_rel'):9.2e} {worst('cosine', min):9.6f} {argmax:>7}  "
            f"{'yes' if all(o.passed for o in group) else 'NO'}")


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file, integer ids as int64."""
    return {k: (v.astype(np.int64) if v.dtype.kind in "iu" else v) for k, v in load_npz(path).items()}


def verify(
    model: str | os.PathLike,
    reference: Reference,
    *,
    shapes: list[tuple[int, int]] | str = DEFAULT_SHAPES,
    ep: str = "cpu",
    fallback: str | None = None,
    atol: float | None = None,
    rtol: float = 0.0,
    min_routing_agreement: float = 1.0,
    seed: int = 0,
    threads: int | None = None,
    left_padding: bool = False,
    inputs: dict[str, np.ndarray] | None = None,
) -> VerifyReport:
    """Run ``model`` (onnxruntime) and ``reference`` (e.g. the exporter's ``CheckpointReference``: PyTorch
    eager) on the same inputs and compare.

    Inputs are seeded random token ids at each of ``shapes``, or, with ``inputs``, the given arrays
    (``input_ids [batch, seq]`` int64 ...) as one run -- real text routes like the model was trained for.
    """
    if isinstance(shapes, str):
        shapes = parse_shapes(shapes)
    model = model_file(model)
    info, metadata = model_info(model)
    checkpoint = reference.source
    report_warnings = []
    check_reference(model, info, reference)
    report_warnings += reference_warnings(metadata, reference)
    quantized = quantization_mode(metadata)
    if atol is None and quantized is not None:
        report_warnings.append(quantized_tolerance_warning(quantized, reference.tolerance))
    comparator = Comparator(atol=reference.tolerance if atol is None else atol, rtol=rtol,
                            min_routing_agreement=min_routing_agreement)
    session = create_session(model, ep, fallback=fallback, threads=threads)
    names = [o.name for o in session.get_outputs()]
    results = []
    runs = [inputs] if inputs is not None else [
        random_inputs(info, batch, seq, seed=seed + i, left_padding=left_padding)
        for i, (batch, seq) in enumerate(shapes)]
    for given in runs:
        # The arrays the user gave (or the seeded ones), checked as the model's token inputs before the
        # reference or onnxruntime see them.
        check_inputs(given, [TensorSpec(name, "int64", ("batch", "sequence")) for name in info.input_names],
                     info.vocab_size)
        feeds = model_feeds(given, session.get_inputs(), session.get_outputs())
        batch, seq = feeds[INPUT_IDS].shape
        expected = reference.outputs(feeds)
        margins = dict(zip((layer.label for layer in info.layers), reference.margins(feeds)))
        actual = dict(zip(names, session.run(None, feeds)))
        dropped = {
            layer.label: int(np.asarray(actual[routing_name(layer.label, "dropped")]))
            for layer in info.layers if routing_name(layer.label, "dropped") in actual
        }
        comparison = comparator.compare(expected, actual, info.layers, margins)
        results.append(ShapeResult((batch, seq), comparison, dropped))
        tied = sum(r.disagreements_at_ties for r in comparison.routing)
        if tied:
            report_warnings.append(
                f"at {batch}x{seq}, {tied} token(s) whose router scores nearly tie chose different experts; either "
                "choice is correct and later tokens inherit the difference (try another --seed)")
    return VerifyReport(Path(model), Path(checkpoint), ep, metadata.get("strategy", "?"), results, report_warnings)


def model_feeds(inputs: dict[str, np.ndarray], session_inputs, session_outputs=(),
                capacity: int = 0) -> dict[str, np.ndarray]:
    """The session's feeds for ``input_ids`` (+ ``attention_mask``) ``[batch, seq]``: those arrays for a logits
    model; for a text-generation-with-past model, its prefill step (positions from the mask, empty past;
    ``capacity``: a shared buffer's length, ``generate.empty_past``)."""
    names = [spec.name for spec in session_inputs]
    if POSITION_IDS not in names:
        return {name: inputs[name] for name in names}
    ids = inputs[INPUT_IDS]
    mask = inputs.get(ATTENTION_MASK, np.ones_like(ids))
    return decoder_feeds(mask, ids, empty_past(session_inputs, ids.shape[0], session_outputs, capacity))


def quantized_tolerance_warning(mode: str, tolerance: float) -> str:
    """What verify says of a model quantized in ``mode`` judged at the float tolerance ``tolerance``: it differs
    from PyTorch by design, so it fails that tolerance."""
    return (f"this model is quantized ({mode}): its outputs differ from PyTorch's float32 by the quantization, so "
            f"the float tolerance ({tolerance:g}) fails it; judge it by the argmax (and, exported --with-routing, "
            "routing) agreement, give --atol, or see the quality report of moeport quantize --checkpoint")


def reference_warnings(metadata: dict[str, str], reference: Reference) -> list[str]:
    """What a report should say when ``reference`` may not be the checkpoint a model with ``metadata`` (its
    ``moeport.*`` entries, keys without the prefix) was exported from: its config and weights hash differently
    from the ones recorded at export. A warning, not an error: the same weights saved again (another shard size,
    safetensors instead of a pickle) hash differently too."""
    recorded = metadata.get("source_sha256")
    if recorded and recorded != reference.source_sha256:
        return [f"the checkpoint's files ({reference.source}) differ from the ones this model was exported from"]
    return []


def check_reference(model: str | os.PathLike, info: ModelInfo, reference: Reference) -> None:
    """User errors when ``reference`` is not the model ``model`` (with ``info``) was exported from."""
    if reference.info.family != info.family:
        raise MoeportError(f"{model} was exported from a {info.family} model but {reference.source} is "
                           f"{reference.info.family}")
    if info.model_type and reference.info.model_type and reference.info.model_type != info.model_type:
        raise MoeportError(f"{model} was exported from a {info.model_type} checkpoint but {reference.source} is "
                           f"{reference.info.model_type}")
    if reference.info.vocab_size != info.vocab_size:
        raise MoeportError(f"{model} has a vocabulary of {info.vocab_size} tokens but {reference.source} has "
                           f"{reference.info.vocab_size}; was it exported from this checkpoint?")
    if reference.info.layers != info.layers:
        raise MoeportError(f"{model} and {reference.source} have different MoE layers; was it exported from this "
                           "checkpoint?")
