"""Greedy decoding on onnxruntime with a ``text-generation-with-past`` graph (a file or a model folder of
``runtime.layouts``): what ``moeport generate`` runs.

The prompt is run once (prefill, empty past); every new token is then one decode step that feeds back
the ``present.*`` tensors as ``past_key_values.*`` (and a hybrid model's ``present_{kind}.*`` recurrent states as
``past_{kind}.*``) -- the prompt is never recomputed. Prompts of
different lengths are left-padded; ``attention_mask`` marks the padding and ``position_ids`` follow the
mask, as transformers' ``generate`` does. ``CachedDecoder`` runs the steps: the cache stays in onnxruntime's memory,
a shared buffer (``--kv-cache shared``) bound in place as onnxruntime-genai binds it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeport.contract import (ATTENTION_MASK, INPUT_IDS, KV_CACHE_SHARED, LOGITS, POSITION_IDS, is_cache_input,
                              metadata_of_map, past_names, present_for, vocab_size)
from moeport.errors import MoeportError, UsageError
from moeport.runtime.layouts import model_and_tokenizer, model_file
from moeport.runtime.session import create_session
from moeport.runtime.tokenizer import load_tokenizer

PAD_ID = 0


def empty_past(session_inputs, batch: int, session_outputs=(), capacity: int = 0) -> dict[str, np.ndarray]:
    """The cache before the prompt, per cache input of a with-past session (``contract.is_cache_input``), in the
    session's order: float32 zeros with ``batch`` rows -- ``[batch, kv_heads, capacity, head_dim]`` for a KV cache
    (``capacity``: 0 for a Concat cache, the buffer length for a shared one, contract ``KV_CACHE_SHARED``), the
    fixed shape of a recurrent state (all zeros, as transformers starts it). Axes the graph leaves free (a past's
    kv_heads and head_dim, contract ``PAST_KV_HEADS_AXIS``) are read from the matching present output, or from the
    past input where it fixes them (files exported before they were freed); an axis known from neither is 0 (an
    empty past adds nothing to the cache whatever its other sizes)."""
    presents = {spec.name: spec.shape for spec in session_outputs}

    def size(spec, axis: int) -> int:
        if axis == 2 and spec.name.startswith("past_key_values.") and spec.name.endswith((".key", ".value")):
            return capacity  # a KV cache's sequence axis (an indexer key cache grows along axis 1)
        for shape in (spec.shape, presents.get(present_for(spec.name))):
            if shape is not None and isinstance(shape[axis], int):
                return shape[axis]
        return 0

    return {spec.name: np.zeros([batch] + [size(spec, axis) for axis in range(1, len(spec.shape))], dtype=np.float32)
            for spec in session_inputs if is_cache_input(spec.name)}


def decoder_feeds(attention_mask: np.ndarray, input_ids: np.ndarray,
                  past: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds of one with-past step. ``attention_mask [batch, past + seq]`` covers past and new tokens;
    ``input_ids [batch, seq]``; ``past``: the cache inputs by name, or a KV cache alone as the list
    [key_0, value_0, key_1, ...] each ``[batch, kv_heads, past, head_dim]``. Positions count only unmasked tokens
    (padded slots get 1, as in transformers)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions[attention_mask == 0] = 1
    feeds = {INPUT_IDS: input_ids.astype(np.int64), ATTENTION_MASK: attention_mask.astype(np.int64),
             POSITION_IDS: positions[:, -input_ids.shape[1]:].astype(np.int64)}
    feeds.update(past.items() if isinstance(past, Mapping) else zip(past_names(len(past) // 2), past))
    return feeds


def has_shared_cache(session) -> bool:
    """Whether an onnxruntime session's model records its KV cache as one shared buffer (``KV_CACHE_SHARED``)."""
    return metadata_of_map(session.get_modelmeta().custom_metadata_map).get("kv_cache") == KV_CACHE_SHARED


class CachedDecoder:
    """Steps one with-past session, keeping its cache in onnxruntime's memory between steps.

    ``step(input_ids [batch, seq], attention_mask [batch, past + seq]) -> logits [batch, seq, vocab]`` (numpy);
    ``reset()`` empties the cache (the next step is a prefill). A Concat cache (contract ``KV_CACHE_CONCAT``): each
    step's presents are the next step's pasts, handed back as onnxruntime values (never copied through numpy). A
    shared buffer (``KV_CACHE_SHARED``): one ``[batch, kv_heads, capacity, head_dim]`` buffer per KV tensor, bound as
    both past and present of every step, as onnxruntime-genai does with ``past_present_share_buffer``, so a kernel
    that writes in place (GroupQueryAttention) moves only the new tokens' keys and values; ``capacity`` must cover
    the prompt and every new token. Recurrent states (hybrids) are fed back like a Concat cache in both."""

    def __init__(self, session, batch: int, capacity: int = 0):
        import onnxruntime as ort

        self._ort, self._session, self._batch = ort, session, batch
        self._past = [i.name for i in session.get_inputs() if is_cache_input(i.name)]
        shared = has_shared_cache(session)
        if shared and capacity < 1:
            raise ValueError("a shared KV cache needs a capacity: the longest prompt plus the new tokens")
        self.capacity = capacity if shared else 0
        # Shared: bound in place. Everything else is carried from step to step as an onnxruntime value.
        self._in_place = [n for n in self._past if shared and n.startswith("past_key_values.")]
        self._carried = [n for n in self._past if n not in self._in_place]
        self._binding = session.io_binding()
        empty = empty_past(session.get_inputs(), batch, session.get_outputs(), self.capacity)
        self._cache = {name: ort.OrtValue.ortvalue_from_numpy(empty[name]) for name in self._in_place}
        for name in self._in_place:
            self._binding.bind_ortvalue_input(name, self._cache[name])
        # The logits go into an array of ours, bound once per shape: a decode step of the 24-layer granite-shaped
        # int4 model spent about 0.5 ms (4%) of 12 ms in Python around its run when every output was bound afresh
        # and fetched each step, 0.27-0.35 ms with the bindings kept (BENCHMARKS.md). None: the vocabulary axis is
        # not fixed in the graph (or the logits are not float32), so onnxruntime allocates them every step.
        logits = next(o for o in session.get_outputs() if o.name == LOGITS)
        self._vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) and logits.type == "tensor(float)" else None
        # Outputs bound once per shape: nothing carried and the logits in an array of ours. Otherwise bound and
        # fetched every step.
        self._outputs_kept = not self._carried and self._vocab is not None
        self._logits: np.ndarray | None = None
        self._logits_value = None  # the OrtValue over self._logits that the binding writes to
        self._bound_shape: tuple | None = None
        self.reset()

    @property
    def cache(self) -> dict:
        """The cache inputs of the next step by name (onnxruntime values; a shared buffer is the bound one)."""
        return dict(self._cache)

    def reset(self) -> None:
        """Empty the cache (the next step is a prefill): the carried tensors back to ``empty_past``'s zeros; the
        shared buffers stay, since the columns a new prompt does not overwrite lie past its mask: never read."""
        empty = empty_past(self._session.get_inputs(), self._batch, self._session.get_outputs())
        self._cache.update((name, self._ort.OrtValue.ortvalue_from_numpy(empty[name])) for name in self._carried)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        binding = self._binding
        if self._in_place and attention_mask.shape[1] > self.capacity:
            raise ValueError(f"the shared KV cache holds {self.capacity} tokens; this step needs "
                             f"{attention_mask.shape[1]}")
        # kept until the run is over, in case onnxruntime binds the arrays' memory rather than a copy
        self._feeds = decoder_feeds(attention_mask, input_ids, {})
        for name, value in self._feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self._carried:
            binding.bind_ortvalue_input(name, self._cache[name])
        shape = (*input_ids.shape, self._vocab)
        if not self._outputs_kept or shape != self._bound_shape:
            self._bind_outputs(shape)
        self._session.run_with_iobinding(binding)
        if not self._outputs_kept:
            logits, *presents = binding.get_outputs()[:1 + len(self._carried)]
            self._cache.update(zip(self._carried, presents))
            if self._vocab is None:
                return logits.numpy()
        return self._logits.copy()  # the array is the next step's output buffer too

    def _bind_outputs(self, shape: tuple) -> None:
        """Bind the logits (``shape`` [batch, seq, vocab]) into an array of ours where the vocabulary is known, then
        each carried present afresh (their lengths change) and each shared buffer in place. get_outputs() lists
        the outputs in binding order, so they are bound in a known order: logits, then the carried presents."""
        binding = self._binding
        binding.clear_binding_outputs()
        if self._vocab is None:
            binding.bind_output(LOGITS)
        else:
            self._logits = np.empty(shape, dtype=np.float32)
            self._logits_value = self._ort.OrtValue.ortvalue_from_numpy(self._logits)
            binding.bind_ortvalue_output(LOGITS, self._logits_value)
        for name in self._carried:
            binding.bind_output(present_for(name))
        for name in self._in_place:
            binding.bind_ortvalue_output(present_for(name), self._cache[name])
        self._bound_shape = shape


def parse_prompt_ids(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; anything else is a usage error."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"cannot parse --prompt-ids {text!r}: expected comma-separated token ids, e.g. 1,2,3") from None
    if not ids:
        raise UsageError("--prompt-ids is empty: give at least one token id")
    return ids


@dataclass
class GenerateResult:
    token_ids: list[list[int]]  # the new tokens of each prompt
    seconds: float  # decode loop wall time, prefill included
    text: list[str] | None = None
    step_seconds: list[float] = field(default_factory=list)  # per step: the prefill, then each decode step

    @property
    def tokens_per_s(self) -> float:
        return sum(len(t) for t in self.token_ids) / self.seconds if self.seconds > 0 else float("inf")

    @property
    def prefill_seconds(self) -> float | None:
        return self.step_seconds[0] if self.step_seconds else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second of the decode steps alone (one new token per row each), the prefill left out."""
        decode = self.step_seconds[1:]
        return len(decode) * len(self.token_ids) / sum(decode) if decode and sum(decode) > 0 else None

    def to_dict(self) -> dict:
        single = len(self.token_ids) == 1
        data = {"token_ids": self.token_ids[0] if single else self.token_ids,
                "tokens_per_s": round(self.tokens_per_s, 2), "seconds": round(self.seconds, 4),
                "prefill_ms": None if self.prefill_seconds is None else round(self.prefill_seconds * 1e3, 3),
                "decode_tokens_per_s": None if self.decode_tokens_per_s is None else round(self.decode_tokens_per_s, 2)}
        if self.text is not None:
            data["text"] = self.text[0] if single else self.text
        return data


def generate(
    model: str | os.PathLike,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 32,
    ep: str = "cpu",
    fallback: str | None = None,
    threads: int | None = None,
    eos_token_id: int | None = None,
) -> GenerateResult:
    """Greedy-decode ``max_new_tokens`` after each prompt (stops a row early only at ``eos_token_id``).

    ``model``: an ONNX file or a model folder (``runtime.layouts``: its model file)."""
    model = model_file(model)
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token id")
    session = create_session(model, ep, fallback=fallback, threads=threads)
    inputs = {i.name: i for i in session.get_inputs()}
    # The prompt first: a bad token id is the user's input, whatever the model (checked before onnxruntime).
    props = session.get_modelmeta().custom_metadata_map
    vocab = vocab_size(props, model)
    for prompt in prompts:
        bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise MoeportError(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    if not any(is_cache_input(n) for n in inputs):
        raise MoeportError(f"{model} has no KV-cache inputs; export it with --task text-generation-with-past")
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    input_ids = np.full((batch, longest), PAD_ID, dtype=np.int64)
    mask = np.zeros((batch, longest), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    # A shared cache is one buffer per tensor, long enough for the prompt and every new token.
    decoder = CachedDecoder(session, batch, capacity=longest + max_new_tokens)

    new_tokens = np.zeros((batch, 0), dtype=np.int64)
    finished = np.zeros(batch, dtype=bool)
    started = time.perf_counter()
    steps = []
    for _ in range(max_new_tokens):
        step_started = time.perf_counter()
        logits = decoder.step(input_ids, mask)
        steps.append(time.perf_counter() - step_started)
        next_ids = logits[:, -1].argmax(-1)
        if eos_token_id is not None:
            next_ids = np.where(finished, eos_token_id, next_ids)
            finished |= next_ids == eos_token_id
        new_tokens = np.concatenate([new_tokens, next_ids[:, None]], axis=1)
        if finished.all():
            break
        input_ids = next_ids[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    seconds = time.perf_counter() - started
    return GenerateResult([row.tolist() for row in new_tokens], seconds, step_seconds=steps)


def generate_text(model: str | os.PathLike, prompt: str, tokenizer_dir: str | os.PathLike | None = None,
                  **options) -> GenerateResult:
    """``generate`` with the ``tokenizer.json`` saved in ``tokenizer_dir`` (a checkpoint or model folder; by
    default the model folder's own, ``model`` being a folder or a file inside one): text in, text out.
    Generation stops at the tokenizer folder's first end-of-sequence id."""
    model, own = model_and_tokenizer(model)
    tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else own
    if tokenizer_dir is None:
        raise UsageError("--prompt needs a tokenizer: give a model folder, or --checkpoint DIR with the tokenizer")
    if not Path(tokenizer_dir).is_dir():
        raise MoeportError(f"tokenizer directory not found: {tokenizer_dir}")
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    result = generate(model, [tokenizer.encode(prompt)], eos_token_id=eos, **options)
    result.text = [tokenizer.decode(ids) for ids in result.token_ids]
    return result
