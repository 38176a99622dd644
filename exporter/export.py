"""Export an MoE checkpoint to one ONNX file that is exact at every batch size and sequence length.

``export_checkpoint(checkpoint_dir, "model.onnx")`` is what ``moeport export`` runs. Steps:

1. load the checkpoint with its family (``families.load_checkpoint``);
2. pick the dispatch strategy (``auto``: ``dense`` when every layer is a soft MoE, else ``sorted``);
3. trace with ``torch.onnx.export(dynamo=True)`` under ``use_strategy`` with dynamic ``batch`` and
   ``sequence`` axes; the sorted dispatch is a custom op translated by hand (custom_ops.py);
4. stamp IR version / metadata, refuse custom domains, run the full ``onnx.checker``;
5. write to a temporary file beside the output, validate it against PyTorch on shapes other than the
   example's, and only then rename it into place (a failed export leaves nothing behind).

Graph I/O: ``input_ids [batch, sequence] int64`` -> ``logits [batch, sequence, vocab] float32``; with
``with_routing``, per MoE layer ``routing.{label}.experts [batch*sequence, k] int64`` and
``routing.{label}.weights [batch*sequence, k] float32`` (plus ``routing.{label}.dropped`` int64 scalar
for the capacity strategy).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import moeport
from moeport.errors import MoeportError
from moeport.exporter import families, strategies
from moeport.exporter.families import LoadedModel, ModelInfo
from moeport.samples.checkpoint import checkpoint_hash

DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 23
# onnxruntime 1.20 reads IR version 10 at most (onnx 1.17); opset 23 needs IR 11.
ORT_1_20_IR_VERSION = 10
# Protobuf cannot hold more than 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
METADATA_PREFIX = "moeport."
EXAMPLE_SHAPE = (2, 16)
VALIDATION_SHAPES = ((1, 5), (3, 11))


@dataclass
class ExportResult:
    output: Path
    family: str
    strategy: str
    strategy_reason: str
    opset: int
    ir_version: int
    info: ModelInfo
    with_routing: bool
    output_names: list[str]
    size_bytes: int
    external_data: bool
    source_sha256: str
    seconds: float
    validation: "object | None" = None  # runtime.compare.Comparison
    validation_shapes: list[tuple[int, int]] = field(default_factory=list)
    dropped_slots: int | None = None  # capacity strategy: slots dropped on the validation inputs

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "family": self.family,
            "strategy": self.strategy,
            "strategy_reason": self.strategy_reason,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "num_experts": self.info.num_experts,
            "top_k": self.info.top_k,
            "moe_layers": len(self.info.layers),
            "with_routing": self.with_routing,
            "outputs": self.output_names,
            "size_bytes": self.size_bytes,
            "external_data": self.external_data,
            "source_sha256": self.source_sha256,
            "seconds": round(self.seconds, 2),
            "validation": None if self.validation is None else {
                "shapes": [f"{b}x{s}" for b, s in self.validation_shapes], **self.validation.to_dict()},
            "dropped_slots": self.dropped_slots,
        }


class ExportModule(nn.Module):
    """What is traced: ``input_ids`` -> (logits, then experts/weights[/extras] of every MoE layer)."""

    def __init__(self, loaded: LoadedModel, with_routing: bool, strategy: strategies.DispatchStrategy,
                 options: strategies.StrategyOptions):
        super().__init__()
        self.model = loaded.model
        self.layers = loaded.info.layers
        self.with_routing = with_routing
        self.strategy, self.options = strategy, options

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        inputs = {"input_ids": input_ids} if attention_mask is None else {"input_ids": input_ids,
                                                                        "attention_mask": attention_mask}
        logits, routing = self.model(**inputs)
        outputs = [logits]
        if self.with_routing:
            for layer, (idx, weight) in zip(self.layers, routing):
                outputs += [idx, weight]
                if self.strategy.compute_extras is not None:
                    extras = self.strategy.compute_extras(layer.num_experts, idx, self.options)
                    outputs += [extras[name] for name in self.strategy.extra_outputs]
        return tuple(outputs)


def choose_strategy(info: ModelInfo, requested: str = "auto") -> tuple[strategies.DispatchStrategy, str]:
    """The strategy to export with, and why."""
    if requested != "auto":
        return strategies.get_strategy(requested), "requested"
    if info.all_soft:
        return strategies.get_strategy("dense"), "auto: soft MoE weights every expert, so dense dispatch is exact and cheapest"
    return strategies.get_strategy("sorted"), (
        f"auto: top-{info.top_k} of {info.num_experts} experts; sorted dispatch runs each expert on its own "
        "tokens, so compute grows with k, not with the number of experts"
    )


def check_output_path(output: Path, force: bool) -> None:
    """User errors for an output we must not or cannot write."""
    if output.is_dir():
        raise MoeportError(f"output {output} is a directory; give a file name such as {output / 'model.onnx'}")
    if output.exists() and not force:
        raise MoeportError(f"output {output} already exists; pass --force to overwrite it")
    parent = output.parent
    if not parent.is_dir():
        raise MoeportError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise MoeportError(f"output directory {parent} is not writable")


def _check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise MoeportError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")


def _trace(module: ExportModule, example: dict[str, torch.Tensor], opset: int, output_names: list[str]):
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # The exporter reports progress on stdout; keep it for the error message, not for the user's terminal
    # (``--json`` output must stay parseable).
    captured = io.StringIO()
    # torch.onnx logs a warning per missing torchvision op at first use; nothing to do with our model.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(captured), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations, not actionable here
        program = torch.onnx.export(
            module,
            (),
            kwargs=example,
            dynamo=True,
            input_names=list(example),
            output_names=output_names,
            opset_version=opset,
            dynamic_shapes={name: {0: batch, 1: sequence} for name in example},
            custom_translation_table=strategies.translation_table(),
            optimize=True,
            verbose=False,
        )
    return program.model  # onnx_ir.Model


def _finish(model, *, loaded: LoadedModel, strategy: str, opset: int, with_routing: bool,
            source_sha256: str, capacity_factor: float | None) -> None:
    """Stamp metadata and the IR version; refuse anything outside the standard domain."""
    model.ir_version = min(model.ir_version, ORT_1_20_IR_VERSION if opset <= 22 else 11)
    custom = sorted(d for d in model.opset_imports if d not in ("", "ai.onnx"))
    if custom or len(model.functions):
        # A bug in our translations, not a user error: keep the traceback.
        raise RuntimeError(f"export produced non-standard domains {custom} / {len(model.functions)} functions")
    model.producer_name, model.producer_version = "moeport", moeport.__version__
    info = loaded.info
    props = {
        "version": moeport.__version__,
        "family": info.family,
        "source_sha256": source_sha256,
        "num_experts": str(info.num_experts),
        "top_k": str(info.top_k),
        "strategy": strategy,
        "with_routing": str(with_routing).lower(),
        "model_info": json.dumps(info.to_dict(), sort_keys=True),
    }
    if capacity_factor is not None:
        props["capacity_factor"] = repr(capacity_factor)
    model.metadata_props.update({METADATA_PREFIX + k: v for k, v in props.items()})


def _save(model, path: Path) -> bool:
    """Write ``model`` to ``path``; external data (``<name>.data``) when the weights exceed protobuf's limit."""
    import onnx_ir as ir

    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    ir.save(model, path, external_data=f"{path.name}.data" if external else None)
    return external


def _validate(path: Path, loaded: LoadedModel, strategy, options, shapes, tolerance: float):
    """Run the file on onnxruntime and PyTorch (same strategy, eager) on shapes unlike the example's."""
    from moeport.runtime.compare import Comparator, Comparison
    from moeport.runtime.session import create_session

    session = create_session(path, "cpu")
    comparator = Comparator(atol=tolerance)
    merged, dropped = Comparison(), 0
    with strategies.use_strategy(loaded.sites, strategy, options):
        for i, (batch, seq) in enumerate(shapes):
            # Inputs without router near-ties: at a tie either expert is right, and the outputs would differ.
            inputs = families.tie_free_inputs(loaded, batch, seq, seed=1000 + i)
            reference = families.reference_outputs(loaded, inputs)
            if strategy.compute_extras is not None:
                for layer in loaded.info.layers:
                    idx = torch.from_numpy(reference[f"routing.{layer.label}.experts"])
                    dropped += int(strategy.compute_extras(layer.num_experts, idx, options)["dropped"])
            names = [o.name for o in session.get_outputs()]
            actual = dict(zip(names, session.run(None, inputs)))
            result = comparator.compare(reference, actual, loaded.info.layers)
            merged.outputs += result.outputs
            merged.routing += result.routing
            merged.missing += result.missing
    return merged, (dropped if strategy.extra_outputs else None)


def export_model(
    loaded: LoadedModel,
    output: str | os.PathLike,
    *,
    strategy: str = "auto",
    opset: int = DEFAULT_OPSET,
    with_routing: bool = False,
    capacity_factor: float | None = None,
    example_shape: tuple[int, int] = EXAMPLE_SHAPE,
    example_seed: int = 0,
    validate: bool = True,
    validation_shapes: tuple[tuple[int, int], ...] = VALIDATION_SHAPES,
    source_sha256: str = "",
    force: bool = False,
) -> ExportResult:
    """Export an already loaded model (see ``export_checkpoint``)."""
    started = time.perf_counter()
    output = Path(output)
    _check_opset(opset)
    check_output_path(output, force)
    if min(example_shape) < 2:
        # torch.export specialises a dimension whose example size is 0 or 1 to that constant.
        raise MoeportError(f"example shape must be at least 2x2 to keep batch and sequence dynamic, got {example_shape}")
    if capacity_factor is not None and capacity_factor <= 0:
        raise MoeportError(f"capacity factor must be positive, got {capacity_factor}")
    chosen, reason = choose_strategy(loaded.info, strategy)
    options = strategies.StrategyOptions(capacity_factor=capacity_factor)
    output_names = families.output_names(loaded.info, with_routing, chosen.extra_outputs)
    module = ExportModule(loaded, with_routing, chosen, options).eval()
    example = {name: torch.from_numpy(a) for name, a in
               families.random_inputs(loaded.info, *example_shape, seed=example_seed).items()}

    with strategies.use_strategy(loaded.sites, chosen, options):
        model = _trace(module, example, opset, output_names)
    _finish(model, loaded=loaded, strategy=chosen.name, opset=opset, with_routing=with_routing,
            source_sha256=source_sha256, capacity_factor=capacity_factor if chosen.name == "capacity" else None)

    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staged = staging / output.name
    try:
        external = _save(model, staged)
        import onnx

        onnx.checker.check_model(str(staged), full_check=True)
        validation, dropped = None, None
        if validate:
            validation, dropped = _validate(staged, loaded, chosen, options, validation_shapes,
                                            families.get_family(loaded.info.family).tolerance)
            if not validation.passed:
                raise MoeportError(
                    f"exported graph does not match PyTorch (max abs error {validation.max_abs_err:.3g}, routing "
                    f"agreement {validation.routing_agreement}); nothing was written. This is a moeport bug: please "
                    "report it with the checkpoint's config.json"
                )
        size = staged.stat().st_size
        if external:
            data = staging / f"{output.name}.data"
            size += data.stat().st_size
            os.replace(data, output.parent / data.name)
        os.replace(staged, output)  # the model last: it is what points to the data
    finally:
        for leftover in staging.glob("*"):
            leftover.unlink()
        staging.rmdir()

    return ExportResult(
        output=output, family=loaded.info.family, strategy=chosen.name, strategy_reason=reason, opset=opset,
        ir_version=model.ir_version, info=loaded.info, with_routing=with_routing, output_names=output_names,
        size_bytes=size, external_data=external, source_sha256=source_sha256,
        seconds=time.perf_counter() - started, validation=validation,
        validation_shapes=list(validation_shapes) if validate else [], dropped_slots=dropped,
    )


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *, trust_pickle: bool = False,
                      **options) -> ExportResult:
    """Export the checkpoint directory ``checkpoint`` to the ONNX file ``output``.

    ``trust_pickle``: allow pickle weights (Hugging Face ``*.bin``), loaded with ``weights_only=True``.
    Options: ``strategy`` (auto|sorted|gather|dense|capacity), ``opset``, ``with_routing``,
    ``capacity_factor``, ``example_shape``, ``example_seed``, ``validate``, ``force``.
    """
    loaded = families.load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    return export_model(loaded, output, source_sha256=checkpoint_hash(checkpoint), **options)
