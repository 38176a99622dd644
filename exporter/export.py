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
import gc
import itertools
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

import moeport
from moeport._fs import check_output_file, staged_file, work_directory, writing
from moeport._scoped import logger_level
from moeport.contract import KV_CACHE_CONCAT, METADATA_KEYS, METADATA_PREFIX, ModelInfo
from moeport.errors import MoeportError
from moeport.exporter import families, passes, strategies, tasks
from moeport.exporter.families import LoadedModel
from moeport.runtime.compare import Comparison
from moeport.runtime import layouts
from moeport.runtime.session import create_session
from moeport.samples.checkpoint import checkpoint_hash

DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 23
# onnxruntime 1.20 reads IR version 10 at most (onnx 1.17); opset 23 needs IR 11.
ORT_1_20_IR_VERSION = 10
# Protobuf cannot hold more than 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
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
    validation: Comparison | None = None
    validation_shapes: list[tuple[int, int]] = field(default_factory=list)
    dropped_slots: int | None = None  # capacity strategy: slots dropped on the validation inputs
    passes: list[dict] = field(default_factory=list)  # per graph pass: what it changed, or why nothing
    layout: str | None = None  # the runtime folder layout ``output`` is (runtime.layouts), None for one file

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "layout": self.layout,
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
            "passes": self.passes,
        }


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


def _check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise MoeportError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")


def _trace(graph: tasks.TaskGraph, opset: int):
    # The exporter reports progress on stdout; keep it for the error message, not for the user's terminal
    # (``--json`` output must stay parseable).
    captured = io.StringIO()
    # torch.onnx logs a warning per missing torchvision op at first use; nothing to do with our model.
    with logger_level("torch.onnx._internal.exporter._registration", logging.ERROR), \
            contextlib.redirect_stdout(captured), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations, not actionable here
        # One Dim object shared by several inputs is the intent, not a conflict.
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis")
        # Without autograd: the exporter's passes otherwise take a scan (hybrid mixers' recurrence over the tokens)
        # whose inputs need gradients through its training path, which fails on the symbolic batch size.
        with torch.no_grad():
            program = torch.onnx.export(
                graph.module,
                graph.args,
                dynamo=True,
                input_names=graph.input_names,
                output_names=graph.output_names,
                opset_version=opset,
                dynamic_shapes=graph.dynamic_shapes,
                custom_translation_table=strategies.translation_table(),
                optimize=True,
                verbose=False,
            )
    model = program.model  # onnx_ir.Model
    import onnx_ir as ir

    # Some models' code (fixed-length scans, Python ints taken from shapes) makes torch.export specialise
    # an axis to the example's size; the graph would then fail on any other length.
    for value in model.graph.inputs:
        if value.name == "input_ids":
            for axis, label in ((0, "batch"), (1, "sequence")):
                if isinstance(value.shape[axis], int):
                    raise MoeportError(
                        f"this model's code fixes the {label} axis to {value.shape[axis]} while tracing, so the "
                        f"graph would only run at that {label} size; moeport cannot export it with dynamic shapes")

    # Axes torch.export had to name itself (e.g. past_sequence + sequence) get the task's names.
    for value in model.graph.inputs:
        for axis, name in graph.input_dim_names.get(value.name, {}).items():
            dims = list(value.shape)
            dims[axis] = ir.SymbolicDim(name)
            value.shape = ir.Shape(dims)
    return model


def _finish(model, *, loaded: LoadedModel, strategy: str, task: str, opset: int, with_routing: bool,
            source_sha256: str, capacity_factor: float | None, kv_cache: str | None = None) -> None:
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
        "task": task,
        "with_routing": str(with_routing).lower(),
        "model_info": json.dumps(info.to_dict(), sort_keys=True),
    }
    if capacity_factor is not None:
        props["capacity_factor"] = repr(capacity_factor)
    if kv_cache is not None:
        props["kv_cache"] = kv_cache
    assert set(props) <= set(METADATA_KEYS), f"metadata keys outside the contract: {set(props) - set(METADATA_KEYS)}"
    model.metadata_props.update({METADATA_PREFIX + k: v for k, v in props.items()})


def _release_weights(module: torch.nn.Module) -> None:
    """Let go of every parameter and buffer of ``module`` (a model nothing else will run again)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        tensor.data = torch.empty(0, dtype=tensor.dtype)
    gc.collect()


def _save(model, path: Path) -> bool:
    """Write ``model`` to ``path``; external data (``<name>.data``) when the weights exceed protobuf's limit."""
    import onnx_ir as ir

    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    ir.save(model, path, external_data=f"{path.name}.data" if external else None)
    return external


def export_model(
    loaded: LoadedModel,
    output: str | os.PathLike,
    *,
    strategy: str = "auto",
    task: str = "logits",
    opset: int = DEFAULT_OPSET,
    with_routing: bool = False,
    capacity_factor: float | None = None,
    example_shape: tuple[int, int] = EXAMPLE_SHAPE,
    example_seed: int = 0,
    validate: bool = True,
    validation_shapes: tuple[tuple[int, int], ...] = VALIDATION_SHAPES,
    source_sha256: str = "",
    force: bool = False,
    uniform_kv: bool = False,
    kv_cache: str | None = None,
    fused_attention: bool = False,
    release_model: bool = False,
) -> ExportResult:
    """Export an already loaded model (see ``export_checkpoint``). text-generation-with-past only: ``uniform_kv``
    stores every value cache with its key's head size, ``kv_cache`` (concat|shared) how the cache is kept
    (contract ``KV_CACHES``; default concat), ``fused_attention`` runs each layer's attention as onnxruntime's
    ``GroupQueryAttention`` (``runtime.fusions``; onnxruntime's CPU provider: its CUDA kernel takes float16 only).
    ``release_model``: the model's weights may be let go once validation has PyTorch's outputs
    (``export_checkpoint``, which loaded it; never a caller's own model)."""
    started = time.perf_counter()
    output = Path(output)
    _check_opset(opset)
    check_output_file(output, force)
    if min(example_shape) < 2:
        # torch.export specialises a dimension whose example size is 0 or 1 to that constant.
        raise MoeportError(f"example shape must be at least 2x2 to keep batch and sequence dynamic, got {example_shape}")
    if capacity_factor is not None and capacity_factor <= 0:
        raise MoeportError(f"capacity factor must be positive, got {capacity_factor}")
    export_task = tasks.get_task(task, loaded)
    chosen, reason = choose_strategy(loaded.info, strategy)
    options = strategies.StrategyOptions(capacity_factor=capacity_factor)
    task_options = {"uniform_kv": True} if uniform_kv else {}
    if kv_cache is not None or task == tasks.WITH_PAST:
        if task != tasks.WITH_PAST:
            raise MoeportError(f"--kv-cache applies to --task {tasks.WITH_PAST}")
        task_options["kv_cache"] = kv_cache = kv_cache or KV_CACHE_CONCAT
    if fused_attention and task != tasks.WITH_PAST:
        raise MoeportError(f"--fused-attention applies to --task {tasks.WITH_PAST}")
    graph = export_task.build(loaded, with_routing, chosen, options, example_shape, example_seed, **task_options)

    with strategies.use_strategy(loaded.sites, chosen, options, families.export_patches(loaded)):
        model = _trace(graph, opset)
    pass_reports = passes.run_export_passes(model)
    _finish(model, loaded=loaded, strategy=chosen.name, task=task, opset=opset, with_routing=with_routing,
            source_sha256=source_sha256, capacity_factor=capacity_factor if chosen.name == "capacity" else None,
            kv_cache=kv_cache)
    if fused_attention:
        # After _finish's check that every op is standard: onnxruntime's fused ops are the one exception, asked for.
        pass_reports += passes.run_export_passes(model, [passes.FuseAttention()])

    with staged_file(output) as staging:
        staged = staging / output.name
        with writing(output):
            external = _save(model, staged)
        onnx.checker.check_model(str(staged), full_check=True)
        # The graph in memory holds the weights the trace made (per-expert slices of the checkpoint's stacked
        # expert tensors: most of the model); the file has them now, and onnxruntime is about to load its own.
        # torch.onnx keeps its own references to the graph's values after the export, so the weights are let go
        # value by value (``del model`` alone freed nothing).
        ir_version = model.ir_version
        for value in model.graph.initializers.values():
            value.const_value = None
        del model
        gc.collect()
        validation, dropped = None, None
        if validate:
            def open_session():
                # PyTorch's reference outputs are computed by now: a model only this export holds can go first.
                if release_model:
                    _release_weights(loaded.model)
                # Without prepacking: onnxruntime would keep a second, packed copy of every MatMul weight, which
                # only speeds up repeated runs; validation runs a few shapes once.
                return create_session(staged, "cpu", config={"session.disable_prepacking": "1"})

            validation, dropped = graph.validate(open_session, validation_shapes)
            if not validation.passed:
                raise MoeportError(
                    f"exported graph does not match PyTorch (max abs error {validation.max_abs_err:.3g}, routing "
                    f"agreement {validation.routing_agreement}); nothing was written. This is a moeport bug: please "
                    "report it with the checkpoint's config.json"
                )
        size = sum(path.stat().st_size for path in staging.iterdir())  # the model and its external data

    return ExportResult(
        output=output, family=loaded.info.family, strategy=chosen.name, strategy_reason=reason, opset=opset,
        ir_version=ir_version, info=loaded.info, with_routing=with_routing, output_names=graph.output_names,
        size_bytes=size, external_data=external, source_sha256=source_sha256,
        seconds=time.perf_counter() - started, validation=validation,
        validation_shapes=list(validation_shapes) if validate else [], dropped_slots=dropped, passes=pass_reports,
    )


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *, trust_pickle: bool = False,
                      layout: str | None = None, **options) -> ExportResult:
    """Export the checkpoint directory ``checkpoint`` to the ONNX file ``output``.

    ``trust_pickle``: allow pickle weights (Hugging Face ``*.bin``), loaded with ``weights_only=True``.
    ``layout`` (``runtime.layouts``: genai, transformers.js, optimum): ``output`` is a folder that runtime
    loads as it is (model, configs, the checkpoint's tokenizer); needs ``task="text-generation-with-past"``.
    Options: ``strategy`` (auto|sorted|gather|dense|capacity), ``task`` (logits|text-generation-with-past),
    ``opset``, ``with_routing``,
    ``capacity_factor``, ``example_shape``, ``example_seed``, ``validate``, ``force``.
    """
    if layout is not None:
        # Everything that can be said about the folder before the minutes of tracing.
        layouts.check_export(layout, checkpoint, output, options.get("task", "logits"), options.get("force", False),
                             options.get("kv_cache"), options.get("fused_attention", False))
    loaded = families.load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    if layout is None:
        return export_model(loaded, output, source_sha256=checkpoint_hash(checkpoint), release_model=True, **options)
    output = Path(output)
    with work_directory(output) as scratch:
        result = export_model(loaded, scratch / layouts.MODEL_FILE, source_sha256=checkpoint_hash(checkpoint),
                              uniform_kv=True, release_model=True, **{**options, "force": False})
        layouts.write_folder(layout, result.output, checkpoint, output, force=options.get("force", False))
    result.output, result.layout = output, layout
    result.size_bytes = sum(path.stat().st_size for path in output.rglob("*.onnx*"))
    return result
