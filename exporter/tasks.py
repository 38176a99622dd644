"""Export tasks: what graph is traced from a loaded model, with which I/O, and how it is validated.

- ``logits``: one forward pass. Inputs ``input_ids [batch, sequence]`` (+ ``attention_mask`` for
  transformers models); outputs ``logits [batch, sequence, vocab]`` and, with routing, per MoE layer
  ``routing.{label}.experts|weights [batch*sequence, k]`` (+ strategy extras such as ``dropped``).
- ``text-generation-with-past``: one decoder graph for prefill and decode with a KV cache, with the I/O
  names of the Optimum / transformers.js convention: ``input_ids [batch, sequence]``,
  ``attention_mask [batch, past_sequence + sequence]``, ``position_ids [batch, sequence]``,
  ``past_key_values.{i}.key|value [batch, kv_heads, past_sequence, head_dim]`` -> ``logits``,
  ``present.{i}.key|value [batch, kv_heads, past_sequence + sequence, head_dim]``. Prefill feeds an empty
  past (``past_sequence = 0``). transformers models only.

One registry, like the others; a task says why it does not apply to a model instead of failing later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from moeport.errors import MoeportError
from moeport.exporter import families, strategies
from moeport.exporter.families import LoadedModel
from moeport.runtime.generate import decoder_feeds


@dataclass
class TaskGraph:
    """Everything ``torch.onnx.export`` needs, plus the validation of the written file."""

    module: nn.Module
    args: tuple
    dynamic_shapes: dict
    input_names: list[str]
    output_names: list[str]
    validate: Callable  # (session, shapes) -> (Comparison, dropped slots or None)
    input_dim_names: dict[str, dict[int, str]] = field(default_factory=dict)  # names for automatic axes


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    unsupported_reason: Callable[[LoadedModel], str | None]
    build: Callable[..., TaskGraph]  # (loaded, with_routing, strategy, options, example_shape, seed)


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    return list(_TASKS)


def get_task(name: str, loaded: LoadedModel) -> Task:
    if name not in _TASKS:
        raise MoeportError(f"unknown task {name!r}; choose one of: {', '.join(_TASKS)}")
    task = _TASKS[name]
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
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        logits, routing = self.model(**inputs)
        if not self.with_routing:
            return (logits,)
        return (logits, *_routing_outputs(self.layers, routing, self.strategy, self.options))


def _compare_runs(loaded, session, strategy, options, runs) -> tuple:
    """Compare onnxruntime with PyTorch (same strategy, eager) on each (inputs, reference fn) run."""
    from moeport.runtime.compare import Comparator, Comparison

    comparator = Comparator(atol=families.get_family(loaded.info.family).tolerance)
    merged, dropped = Comparison(), 0
    names = [o.name for o in session.get_outputs()]
    with strategies.use_strategy(loaded.sites, strategy, options, families.export_patches(loaded)):
        for feeds, reference_fn in runs():
            reference = reference_fn(feeds)
            if strategy.compute_extras is not None:
                for layer in loaded.info.layers:
                    idx = torch.from_numpy(reference[f"routing.{layer.label}.experts"])
                    dropped += int(strategy.compute_extras(layer.num_experts, idx, options)["dropped"])
            actual = dict(zip(names, session.run(None, feeds)))
            result = comparator.compare(reference, actual, loaded.info.layers)
            merged.outputs += result.outputs
            merged.routing += result.routing
            merged.missing += result.missing
    return merged, (dropped if strategy.extra_outputs else None)


def _build_logits(loaded, with_routing, strategy, options, example_shape, seed) -> TaskGraph:
    example = families.random_inputs(loaded.info, *example_shape, seed=seed)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")

    def validate(session, shapes):
        def runs():
            for i, (b, s) in enumerate(shapes):
                # Inputs without router near-ties: at a tie either expert is right, and outputs would differ.
                yield families.tie_free_inputs(loaded, b, s, seed=1000 + i), \
                    lambda feeds: families.reference_outputs(loaded, feeds)

        return _compare_runs(loaded, session, strategy, options, runs)

    return TaskGraph(
        module=LogitsModule(loaded, with_routing, strategy, options).eval(),
        args=tuple(torch.from_numpy(example[name]) for name in loaded.info.input_names),
        dynamic_shapes={name: {0: batch, 1: sequence} for name in loaded.info.input_names},
        input_names=list(loaded.info.input_names),
        output_names=families.output_names(loaded.info, with_routing, strategy.extra_outputs),
        validate=validate,
    )


register_task(Task("logits", "one forward pass: input_ids -> logits", lambda loaded: None, _build_logits))


class WithPastModule(nn.Module):
    """Decoder step with a KV cache. forward(input_ids, attention_mask, position_ids, past_key_values)
    -> (logits, present.0.key, present.0.value, ..., then routing outputs if asked)."""

    def __init__(self, loaded: LoadedModel, with_routing: bool, strategy, options):
        super().__init__()
        self.adapter = loaded.model  # exporter.hf.CausalLMAdapter
        self.layers = loaded.info.layers
        self.with_routing = with_routing
        self.strategy, self.options = strategy, options

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        logits, presents, routing = self.adapter.step(input_ids, attention_mask, position_ids, past_key_values)
        outputs = [logits, *presents]
        if self.with_routing:
            outputs += _routing_outputs(self.layers, routing, self.strategy, self.options)
        return tuple(outputs)


def _with_past_unsupported(loaded: LoadedModel) -> str | None:
    if not hasattr(loaded.model, "step"):
        return "it has no KV cache (export it with --task logits)"
    return None


def _build_with_past(loaded, with_routing, strategy, options, example_shape, seed) -> TaskGraph:
    adapter = loaded.model
    batch_size, seq_len = example_shape
    past_len = 3  # >= 2 so that torch.export keeps the past length symbolic
    shapes = adapter.cache_shapes()
    generator = torch.Generator().manual_seed(seed)
    past = [torch.randn(batch_size, heads, past_len, dim, generator=generator) for heads, dim in shapes]
    input_ids = torch.from_numpy(families.random_inputs(loaded.info, batch_size, seq_len, seed)["input_ids"])
    mask = np.ones((batch_size, past_len + seq_len), dtype=np.int64)
    feeds = decoder_feeds(mask, input_ids.numpy(), [p.numpy() for p in past])
    batch, sequence, past_sequence = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past_sequence")
    names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{part}" for i in range(len(shapes) // 2) for part in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{part}" for i in range(len(shapes) // 2) for part in ("key", "value")]
    if with_routing:
        outputs += families.output_names(loaded.info, True, strategy.extra_outputs)[1:]

    def reference(feeds):
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        past_in = [tensors[n] for n in names[3:]]
        with torch.no_grad():
            logits, presents, routing = adapter.step(tensors["input_ids"], tensors["attention_mask"],
                                                     tensors["position_ids"], past_in)
        result = {"logits": logits.numpy()}
        result.update({name: p.numpy() for name, p in zip(outputs[1:], presents)})
        for layer, (idx, weight) in zip(loaded.info.layers, routing):
            result[f"routing.{layer.label}.experts"] = idx.numpy()
            result[f"routing.{layer.label}.weights"] = weight.numpy()
        return result

    def validate(session, _shapes):
        def runs():
            # Prefill with an empty past, left-padded second row; then one decode step on its presents.
            prompt = families.tie_free_inputs(loaded, 2, 6, seed=1000)
            mask = np.ones((2, 6), dtype=np.int64)
            mask[1, :2] = 0
            empty = [np.zeros((2, heads, 0, dim), dtype=np.float32) for heads, dim in shapes]
            prefill = decoder_feeds(mask, prompt["input_ids"], empty)
            yield prefill, reference
            ref = reference(prefill)
            next_ids = ref["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
            yield decoder_feeds(mask, next_ids, [ref[n] for n in outputs[1:1 + len(shapes)]]), reference

        return _compare_runs(loaded, session, strategy, options, runs)

    return TaskGraph(
        module=WithPastModule(loaded, with_routing, strategy, options).eval(),
        args=(input_ids, torch.from_numpy(mask), torch.from_numpy(feeds["position_ids"]), past),
        dynamic_shapes={
            "input_ids": {0: batch, 1: sequence},
            "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},  # past_sequence + sequence
            "position_ids": {0: batch, 1: sequence},
            "past_key_values": [{0: batch, 2: past_sequence} for _ in shapes],
        },
        input_names=names,
        output_names=outputs,
        validate=validate,
        input_dim_names={"attention_mask": {1: "past_sequence + sequence"}},
    )


register_task(Task("text-generation-with-past", "decoder step with KV cache (prefill and decode)",
                   _with_past_unsupported, _build_with_past))
