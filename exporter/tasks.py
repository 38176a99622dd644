"""Export tasks: what graph is traced from a loaded model, with which I/O, and how it is validated.

- ``logits``: one forward pass. Inputs ``input_ids [batch, sequence]`` (+ ``attention_mask`` for
  transformers models); outputs ``logits [batch, sequence, vocab]`` and, with routing, per MoE layer
  ``routing.{label}.experts|weights [batch*sequence, k]`` (+ strategy extras such as ``dropped``).
- ``text-generation-with-past``: one decoder graph for prefill and decode with a KV cache, with the I/O
  names of the Optimum / transformers.js convention: ``input_ids [batch, sequence]``,
  ``attention_mask [batch, past_sequence + sequence]``, ``position_ids [batch, sequence]``,
  ``past_key_values.{i}.key|value [batch, kv_heads, past_sequence, head_dim]`` -> ``logits``,
  ``present.{i}.key|value [batch, kv_heads, past_sequence + sequence, head_dim]``; a hybrid model's
  linear-attention / Mamba layers carry their recurrent states instead, ``past_{kind}.{i}`` -> ``present_{kind}.{i}``
  of a fixed shape (``contract.STATE_KINDS``). Prefill feeds an empty past (``past_sequence = 0``, zero states);
  the past's kv_heads and head_dim axes are left free (contract ``PAST_KV_HEADS_AXIS``) so that a runtime building
  that empty past from its own reading of config.json cannot trip over them. ``uniform_kv=True`` (what deployable
  folders use) stores every value cache with its key's head size, zero-padded (multi-head latent attention has
  value heads narrower than key heads; the runtime that allocates presents itself, onnxruntime-genai, gives values
  the key's shape). ``kv_cache="shared"``: past and present are one fixed-length buffer written in place (contract
  ``KV_CACHE_SHARED``; onnxruntime-genai's ``past_present_share_buffer``). transformers models only.

One registry, like the others; a task says why it does not apply to a model instead of failing later.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from moeport.contract import (ATTENTION_MASK, INPUT_IDS, INDEXER_KEY, KV_CACHE_CONCAT, KV_CACHE_SHARED, KV_CACHES,
                              KV_PARTS, LOGITS, PAST_HEAD_SIZE_AXIS, PAST_KV_HEADS_AXIS, POSITION_IDS, output_names,
                              random_inputs, routing_name)
from moeport.errors import MoeportError
from moeport.exporter import families, strategies
from moeport.exporter.families import LoadedModel
from moeport.registry import Registry
from moeport.runtime.compare import Comparator, Comparison
from moeport.runtime.generate import decoder_feeds


@dataclass
class TaskGraph:
    """Everything ``torch.onnx.export`` needs, plus the validation of the written file."""

    module: nn.Module
    args: tuple
    dynamic_shapes: dict
    input_names: list[str]
    output_names: list[str]
    validate: Callable  # (open_session: () -> onnxruntime session, shapes) -> (Comparison, dropped slots or None)
    input_dim_names: dict[str, dict[int, str]] = field(default_factory=dict)  # names for automatic axes


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    unsupported_reason: Callable[[LoadedModel], str | None]
    build: Callable[..., TaskGraph]  # (loaded, with_routing, strategy, options, example_shape, seed, **task options)


_TASKS: Registry[Task] = Registry("task")


def register_task(task: Task) -> Task:
    return _TASKS.add(task.name, task)


def task_names() -> list[str]:
    return _TASKS.names()


def get_task(name: str, loaded: LoadedModel) -> Task:
    task = _TASKS.get(name)
    reason = task.unsupported_reason(loaded)
    if reason:
        raise MoeportError(f"task {name!r} does not apply to this {loaded.info.family} model: {reason}")
    return task


def _routing_outputs(layers, routing, strategy, options) -> list[torch.Tensor]:
    outputs = []
    for layer, (idx, weight) in zip(layers, routing):
        outputs += [idx, weight]
        if strategy.compute_extras is not None:
            extras = strategy.compute_extras(layer.num_experts, idx, options)
            outputs += [extras[name] for name in strategy.extra_outputs]
    return outputs


class LogitsModule(nn.Module):
    """What the logits task traces: inputs -> (logits, then routing outputs of every MoE layer)."""

    def __init__(self, loaded: LoadedModel, with_routing: bool, strategy, options):
        super().__init__()
        self.model = loaded.model
        self.layers = loaded.info.layers
        self.with_routing = with_routing
        self.strategy, self.options = strategy, options

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        inputs = {INPUT_IDS: input_ids}
        if attention_mask is not None:
            inputs[ATTENTION_MASK] = attention_mask
        logits, routing = self.model(**inputs)
        if not self.with_routing:
            return (logits,)
        return (logits, *_routing_outputs(self.layers, routing, self.strategy, self.options))


def _real_positions(real: np.ndarray, outputs: dict) -> dict:
    """A prompt step's ``outputs`` at the positions ``real`` [batch, seq] only: logits [batch, seq, vocab] -> [n,
    vocab], each KV cache ``present.{i}.key|value`` [batch, kv_heads, >= seq, head_dim] -> [n, kv_heads, head_dim].
    A padding position's cache entries are never read (the mask hides them), and what a later layer makes of a
    padding row depends on how its attention treats a row with nothing to attend to."""
    selected = {LOGITS: outputs[LOGITS][real]}
    for name, array in outputs.items():
        if name.startswith("present.") and name.endswith((".key", ".value")) and array.ndim == 4:
            selected[name] = array[:, :, :real.shape[1]].transpose(0, 2, 1, 3)[real]
    return {**outputs, **selected}


def _compare_runs(loaded, open_session, strategy, options, runs) -> tuple:
    """Compare onnxruntime with PyTorch (same strategy, eager) on each (inputs, reference fn[, select]) run;
    ``select`` takes both sides' outputs to the part that is compared (a prompt's real tokens, not its padding).

    PyTorch's outputs are all computed first and ``open_session()`` is called only then: a caller that owns the
    model can let its weights go in between, so that PyTorch's and onnxruntime's copies of the weights are never
    in memory at once (the export's peak at 24 layers)."""
    comparator = Comparator(atol=families.get_family(loaded.info.family).tolerance)
    merged, dropped = Comparison(), 0
    expected = []
    with strategies.use_strategy(loaded.sites, strategy, options, families.export_patches(loaded)):
        for feeds, reference_fn, *select in runs():
            reference = reference_fn(feeds)
            if strategy.compute_extras is not None:
                for layer in loaded.info.layers:
                    idx = torch.from_numpy(reference[routing_name(layer.label, "experts")])
                    dropped += int(strategy.compute_extras(layer.num_experts, idx, options)["dropped"])
            expected.append((feeds, reference, select[0] if select else (lambda outputs: outputs)))
    session = open_session()
    names = [o.name for o in session.get_outputs()]
    for feeds, reference, select in expected:
        actual = dict(zip(names, session.run(None, feeds)))
        result = comparator.compare(select(reference), select(actual), loaded.info.layers)
        merged.outputs += result.outputs
        merged.routing += result.routing
        merged.missing += result.missing
    return merged, (dropped if strategy.extra_outputs else None)


def _build_logits(loaded, with_routing, strategy, options, example_shape, seed) -> TaskGraph:
    example = random_inputs(loaded.info, *example_shape, seed=seed)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")

    def validate(open_session, shapes):
        def runs():
            for i, (b, s) in enumerate(shapes):
                # Inputs without router near-ties: at a tie either expert is right, and outputs would differ.
                yield families.tie_free_inputs(loaded, b, s, seed=1000 + i), \
                    lambda feeds: families.reference_outputs(loaded, feeds)

        return _compare_runs(loaded, open_session, strategy, options, runs)

    return TaskGraph(
        module=LogitsModule(loaded, with_routing, strategy, options).eval(),
        args=tuple(torch.from_numpy(example[name]) for name in loaded.info.input_names),
        dynamic_shapes={name: {0: batch, 1: sequence} for name in loaded.info.input_names},
        input_names=list(loaded.info.input_names),
        output_names=output_names(loaded.info, with_routing, strategy.extra_outputs),
        validate=validate,
    )


register_task(Task("logits", "one forward pass: input_ids -> logits", lambda loaded: None, _build_logits))


def _uniform_layout(layout: list) -> list:
    """The cache layout with every value given its key's shape (``uniform_kv``)."""
    keys = {entry.layer: entry.shape for entry in layout if entry.part == "key"}
    return [dataclasses.replace(entry, shape=keys[entry.layer]) if entry.part == "value" else entry
            for entry in layout]


class WithPastModule(nn.Module):
    """Decoder step with a cache. forward(input_ids, attention_mask, position_ids, past_key_values: one tensor per
    ``layout`` entry) -> (logits, the presents in that order, then routing outputs if asked).

    ``layout``: the stored cache layout (``adapter.cache_layout()``, or ``_uniform_layout`` of it); where it stores
    a value wider than the model computes it, the value is cut to the model's size going in and zero-padded
    coming out. ``shared``: the KV tensors are fixed-length buffers (contract ``KV_CACHE_SHARED``).
    """

    def __init__(self, loaded: LoadedModel, with_routing: bool, strategy, options, layout: list, shared: bool = False):
        super().__init__()
        self.adapter = loaded.model  # exporter.hf.CausalLMAdapter
        self.layers = loaded.info.layers
        self.with_routing = with_routing
        self.strategy, self.options = strategy, options
        model_widths = {(e.layer, e.part): e.shape[-1] for e in self.adapter.cache_layout()}
        # (stored width, model width) of each entry stored wider than the model computes it
        self.padded = [(e.shape[-1], model_widths[e.layer, e.part]) for e in layout]
        self.shared = shared

    def step(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor],
             shared: bool | None = None):
        """``adapter.step`` on the stored cache layout. ``shared`` (default: the module's) treats the KV tensors
        as buffers."""
        shared = self.shared if shared is None else shared
        past = [t[..., :model] if stored != model else t for t, (stored, model) in zip(past_key_values, self.padded)]
        logits, presents, routing = self.adapter.step(input_ids, attention_mask, position_ids, past,
                                                      shared_buffer=shared)
        presents = [torch.nn.functional.pad(t, (0, stored - model)) if stored != model else t
                    for t, (stored, model) in zip(presents, self.padded)]
        return logits, presents, routing

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        logits, presents, routing = self.step(input_ids, attention_mask, position_ids, past_key_values)
        outputs = [logits, *presents]
        if self.with_routing:
            outputs += _routing_outputs(self.layers, routing, self.strategy, self.options)
        return tuple(outputs)


def _with_past_unsupported(loaded: LoadedModel) -> str | None:
    if not hasattr(loaded.model, "step"):
        return "it has no KV cache (export it with --task logits)"
    return None


def _build_with_past(loaded, with_routing, strategy, options, example_shape, seed, uniform_kv: bool = False,
                     kv_cache: str = KV_CACHE_CONCAT) -> TaskGraph:
    if kv_cache not in KV_CACHES:
        raise MoeportError(f"unknown KV cache {kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
    shared = kv_cache == KV_CACHE_SHARED
    adapter = loaded.model
    layout = adapter.cache_layout()
    if shared and any(entry.part == INDEXER_KEY for entry in layout):
        raise MoeportError(f"{loaded.info.model_type}: --kv-cache {KV_CACHE_SHARED} does not cover its indexer's key "
                           f"cache; export it with --kv-cache {KV_CACHE_CONCAT}")
    if uniform_kv:
        layout = _uniform_layout(layout)
    batch_size, seq_len = example_shape
    past_len = 3  # >= 2 so that torch.export keeps the past length symbolic
    room = seq_len + 2 if shared else 0  # a buffer longer than past + new tokens
    module = WithPastModule(loaded, with_routing, strategy, options, layout, shared).eval()

    def is_buffer(entry) -> bool:
        return shared and entry.part in KV_PARTS

    def shape(entry, rows: int, length: int) -> tuple[int, ...]:
        """An entry's full shape with ``rows`` rows and ``length`` at its growing axis, if any."""
        return (rows, *(length if d is None else d for d in entry.shape))

    generator = torch.Generator().manual_seed(seed)
    past = [torch.randn(shape(entry, batch_size, past_len + (room if is_buffer(entry) else 0)), generator=generator)
            for entry in layout]
    input_ids = torch.from_numpy(random_inputs(loaded.info, batch_size, seq_len, seed)[INPUT_IDS])
    mask = np.ones((batch_size, past_len + seq_len), dtype=np.int64)
    feeds = decoder_feeds(mask, input_ids.numpy(), {entry.past: p.numpy() for entry, p in zip(layout, past)})
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    cache_axis = torch.export.Dim("max_sequence" if shared else "past_sequence")
    names = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + [entry.past for entry in layout]
    outputs = [LOGITS] + [entry.present for entry in layout]
    if with_routing:
        outputs += output_names(loaded.info, True, strategy.extra_outputs)[1:]

    def reference(feeds):
        """PyTorch's outputs for ``feeds`` and its presents in layout order; a shared cache is checked against
        the Concat cache's step on the columns written so far (its logits, states and routing: its KV presents are
        the buffers, compared by their effect on the next step's logits)."""
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        written = feeds[ATTENTION_MASK].shape[1] - feeds[INPUT_IDS].shape[1]
        past_in = [tensors[entry.past][:, :, :written] if is_buffer(entry) else tensors[entry.past]
                   for entry in layout]
        with torch.no_grad():
            logits, presents, routing = module.step(tensors[INPUT_IDS], tensors[ATTENTION_MASK],
                                                    tensors[POSITION_IDS], past_in, shared=False)
        result = {LOGITS: logits.numpy()}
        result.update({entry.present: p.numpy() for entry, p in zip(layout, presents) if not is_buffer(entry)})
        result.update(families.routing_arrays(loaded.info, routing))
        return result, [p.numpy() for p in presents]

    def cache(arrays: list[np.ndarray], capacity: int) -> dict[str, np.ndarray]:
        """The past feeds holding ``arrays`` (layout order, Concat KV): KV written into zeroed buffers of
        ``capacity`` columns when the cache is shared, the rest as they are."""
        feeds = {}
        for entry, array in zip(layout, arrays):
            if is_buffer(entry):
                buffer = np.zeros(shape(entry, array.shape[0], capacity), dtype=np.float32)
                buffer[:, :, :array.shape[2]] = array
                array = buffer
            feeds[entry.past] = array
        return feeds

    def validate(open_session, validation_shapes):
        def runs():
            # Per validation shape (batch x prompt length): prefill with an empty past (zero states), row r
            # left-padded by min(r, length - 1) tokens; then one decode step on its presents.
            for i, (rows, length) in enumerate(validation_shapes):
                prompt = families.tie_free_inputs(loaded, rows, length, seed=1000 + i)
                mask = random_inputs(loaded.info, rows, length, 0, left_padding=True)[ATTENTION_MASK]
                empty = [np.zeros(shape(entry, rows, 0), dtype=np.float32) for entry in layout]
                prefill = decoder_feeds(mask, prompt[INPUT_IDS], cache(empty, length + 3))
                # A left-padded row's padding positions are no tokens: compared are the real ones
                # (onnxruntime's fused GroupQueryAttention, --fused-attention, differs on the others).
                yield prefill, lambda feeds: reference(feeds)[0], functools.partial(_real_positions, mask.astype(bool))
                ref, presents = reference(prefill)
                next_ids = ref[LOGITS][:, -1].argmax(-1)[:, None].astype(np.int64)
                mask = np.concatenate([mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
                yield decoder_feeds(mask, next_ids, cache(presents, length + 3)), lambda feeds: reference(feeds)[0]

        return _compare_runs(loaded, open_session, strategy, options, runs)

    # A KV cache grows along its past axis (or is a buffer of max_sequence columns) and leaves its kv_heads and
    # head_dim axes free; a recurrent state has a fixed shape after the batch.
    free_axes = {1: PAST_KV_HEADS_AXIS, 3: PAST_HEAD_SIZE_AXIS}
    return TaskGraph(
        module=module,
        args=(input_ids, torch.from_numpy(mask), torch.from_numpy(feeds[POSITION_IDS]), past),
        dynamic_shapes={
            INPUT_IDS: {0: batch, 1: sequence},
            ATTENTION_MASK: {0: batch, 1: torch.export.Dim.AUTO},  # past_sequence + sequence
            POSITION_IDS: {0: batch, 1: sequence},
            "past_key_values": [{0: batch, **({1 + entry.shape.index(None): cache_axis}
                                              if None in entry.shape else {})} for entry in layout],
        },
        input_names=names,
        output_names=outputs,
        validate=validate,
        input_dim_names={ATTENTION_MASK: {1: "past_sequence + sequence"},
                         **{entry.past: free_axes for entry in layout if entry.part in KV_PARTS}},
    )


WITH_PAST = "text-generation-with-past"
register_task(Task(WITH_PAST, "decoder step with KV cache (prefill and decode)", _with_past_unsupported,
                   _build_with_past))
