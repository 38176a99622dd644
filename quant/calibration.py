"""Calibration inputs for static int8 quantization, and how many of their tokens each expert saw.

Sources (``load_calibration``):

- a text file (``.txt`` or anything not below): token ids from the checkpoint's tokenizer when it has one
  (``TextEncoder``), else bytes for a byte-level model (vocab 256);
- a JSONL file (``.jsonl``): one JSON object per line, its ``"text"`` field, encoded the same way;
- a ``.npz`` file: one array per graph input, named as the input, ``[samples, seq]`` integer ids; where the
  graph takes token ids (``input_ids``, an ``attention_mask``, and a with-past graph's cache), ``input_ids`` alone
  or with its ``attention_mask`` (0/1; all ones when absent): a with-past graph runs each row as a prefill from the
  empty cache;
- ``"random"``: seeded uniform token ids; only when asked for explicitly, with a warning (random bytes
  route unlike real text, so the activation ranges and per-expert coverage are not representative).

Every sample is a dict ``{input name: array [1, seq] int64}`` -- one window per ``session.run``; text
windows also feed an all-ones ``attention_mask`` when the graph takes one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from moeport._fs import load_npz
from moeport.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, is_cache_input
from moeport.errors import MoeportError
from moeport.runtime._io import check_prompt_mask
from moeport.runtime.tokenizer import has_tokenizer, load_tokenizer
from moeport.runtime.verify import model_feeds

BYTE_VOCAB = 256
DEFAULT_SEQ = 128
RANDOM = "random"


@dataclass
class CalibrationSet:
    """Samples plus where they came from. ``samples[i]``: ``{input name: [1, seq] int64}``."""

    source: str
    samples: list[dict[str, np.ndarray]]
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(sum(next(iter(s.values())).size for s in self.samples))


@dataclass
class TextEncoder:
    """Text -> token ids ``[n] int64`` for one model: its checkpoint's tokenizer, or bytes (vocab 256)."""

    name: str
    encode: Callable[[bytes], np.ndarray]


def text_encoder(vocab_size: int | None, directory: str | os.PathLike | None = None) -> TextEncoder | None:
    """How text becomes ids for a model of ``vocab_size``: the ``tokenizer.json`` saved in ``directory`` (a
    checkpoint or model folder) when there is a tokenizer, else bytes when the vocabulary is 256; None when
    neither fits."""
    if directory is not None and has_tokenizer(directory):
        tokenizer = load_tokenizer(directory)
        if vocab_size is not None and tokenizer.vocab_size > vocab_size:
            raise MoeportError(f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model's "
                               f"vocabulary is {vocab_size}: they do not belong together")
        return TextEncoder(f"tokenizer of {directory}", tokenizer.encode_bytes)
    if vocab_size == BYTE_VOCAB:
        return TextEncoder("bytes", lambda data: np.frombuffer(data, dtype=np.uint8).astype(np.int64))
    return None


def _starts_from_ids(input_names: list[str]) -> bool:
    """A text-generation-with-past graph: token ids alone make its prefill step."""
    return POSITION_IDS in input_names and any(is_cache_input(name) for name in input_names)


def text_feeds(ids: np.ndarray, inputs, source: str, outputs=()) -> dict[str, np.ndarray]:
    """Feeds for token ids ``[batch, seq]`` of a graph with ``inputs`` (specs with ``.name`` and ``.shape``:
    onnxruntime's or ``TensorSpec``): ``input_ids`` plus an all-ones ``attention_mask`` if the graph has one; for a
    text-generation-with-past graph, its prefill step from the empty cache the specs (and the matching ``outputs``)
    give (``verify.model_feeds``: the graph's kv_heads and head_dim, which a fused attention checks even on an empty
    past; a hybrid's recurrent states at their fixed shapes)."""
    input_names = [spec.name for spec in inputs]
    if _starts_from_ids(input_names):
        return model_feeds({INPUT_IDS: ids}, inputs, outputs)
    other = [n for n in input_names if n not in ("input_ids", "attention_mask")]
    if "input_ids" not in input_names and len(input_names) == 1:
        return {input_names[0]: ids}  # a graph with one differently named id input
    if other or "input_ids" not in input_names:
        raise MoeportError(f"{source} gives token ids only, but the model has inputs {input_names}; pass a .npz "
                           "with one array per input")
    feeds = {"input_ids": ids}
    if "attention_mask" in input_names:
        feeds["attention_mask"] = np.ones_like(ids)
    return feeds


def _windows(ids: np.ndarray, seq: int, count: int, inputs, outputs, source: str) -> list[dict[str, np.ndarray]]:
    """``count`` evenly spaced windows of ``seq`` ids from a 1-D stream (fewer if it is short)."""
    if ids.size < seq:
        seq = int(ids.size)
    starts = np.unique(np.linspace(0, ids.size - seq, num=max(count, 1)).astype(np.int64))
    return [text_feeds(ids[s:s + seq][None, :].astype(np.int64), inputs, source, outputs) for s in starts[:count]]


def _text_bytes(path: Path) -> bytes:
    if path.suffix == ".jsonl":
        chunks = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoeportError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise MoeportError(f"{path}:{lineno} has no string \"text\" field")
            chunks.append(record["text"].encode("utf-8"))
        return b"\n".join(chunks)
    return path.read_bytes()


def _from_npz(path: Path, inputs, outputs, vocab_size: int | None, count: int) -> list[dict[str, np.ndarray]]:
    archive = load_npz(path, what="calibration")
    input_names = [spec.name for spec in inputs]
    tokens = {INPUT_IDS, ATTENTION_MASK}
    with_past = _starts_from_ids(input_names)
    if INPUT_IDS in archive and set(archive) <= tokens and (with_past or set(input_names) <= tokens):
        # Rows of ids, with their attention mask where a tokenizer padded them (all ones where there is none): a
        # with-past graph runs each row as a prefill from the empty past, as text would be.
        rows = _npz_rows(path, archive, [n for n in (INPUT_IDS, ATTENTION_MASK) if n in archive], vocab_size, count)
        if ATTENTION_MASK in archive:
            check_prompt_mask(archive[ATTENTION_MASK], archive[INPUT_IDS], f"calibration file {path}:")
        for row in rows:
            row.setdefault(ATTENTION_MASK, np.ones_like(row[INPUT_IDS]))
        # model_feeds: a logits graph's own inputs of the row; a with-past graph's prefill from the empty cache
        return [model_feeds(row, inputs, outputs) for row in rows]
    missing = [n for n in input_names if n not in archive]
    if missing:
        raise MoeportError(f"calibration file {path} does not fit the model: it has arrays "
                           f"{sorted(archive)}, the model needs {input_names}")
    return _npz_rows(path, archive, input_names, vocab_size, count)


def _npz_rows(path: Path, archive, names: list[str], vocab_size: int | None, count: int) -> list[dict[str, np.ndarray]]:
    """The first ``count`` samples of the arrays ``names`` of ``archive``, each ``{name: [1, seq] int64}``, checked
    as token ids ``[samples, seq]`` of a vocabulary of ``vocab_size``."""
    arrays = {n: archive[n] for n in names}
    rows = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
    for name, array in arrays.items():
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise MoeportError(f"calibration file {path} does not fit the model: array {name!r} is "
                               f"{array.dtype} {list(array.shape)}, expected integer token ids [samples, seq]")
        if vocab_size is not None and array.size and (array.min() < 0 or array.max() >= vocab_size):
            raise MoeportError(f"calibration file {path} does not fit the model: {name!r} holds ids in "
                               f"[{array.min()}, {array.max()}] but the vocabulary has {vocab_size} tokens")
    if len(rows) != 1:
        raise MoeportError(f"calibration file {path}: its arrays have different numbers of samples")
    total = rows.pop()
    return [{n: arrays[n][i:i + 1].astype(np.int64) for n in names} for i in range(min(total, count))]


def load_calibration(
    source: str | os.PathLike,
    *,
    inputs,
    outputs=(),
    vocab_size: int | None,
    samples: int,
    seq: int = DEFAULT_SEQ,
    seed: int = 0,
    encoder: TextEncoder | None = None,
) -> CalibrationSet:
    """Read ``source`` (see the module docstring) into at most ``samples`` windows of ``seq`` tokens, as feeds of a
    graph with ``inputs`` and ``outputs`` (specs with ``.name`` and ``.shape``, e.g. ``inspect.graph_specs``; a
    with-past graph's outputs size its empty cache).

    ``encoder`` turns text into ids (``text_encoder``); None means bytes for a byte-level model.
    """
    if samples < 1:
        raise MoeportError(f"calibration samples must be at least 1, got {samples}")
    if str(source) == RANDOM:
        if vocab_size is None:
            raise MoeportError("random calibration needs the model's vocabulary size, but the model has no moeport "
                               "metadata; pass a .npz of token ids")
        rng = np.random.default_rng(seed)
        # Fed as text windows would be: an attention_mask, or a with-past graph's prefill, where the graph takes one.
        data = [text_feeds(rng.integers(0, vocab_size, size=(1, seq), dtype=np.int64), inputs, "random calibration",
                           outputs) for _ in range(samples)]
        return CalibrationSet(RANDOM, data, [
            "calibrating on random tokens: activation ranges and expert coverage will not match real inputs"])
    path = Path(source)
    if not path.is_file():
        raise MoeportError(f"calibration file not found: {path}")
    if path.suffix == ".npz":
        return CalibrationSet(str(path), _from_npz(path, inputs, outputs, vocab_size, samples))
    if encoder is None:
        if vocab_size is None:
            raise MoeportError(f"calibration text {path} needs the model's vocabulary size, but the model has no "
                               "moeport metadata; pass a .npz of token ids")
        encoder = text_encoder(vocab_size)
        if encoder is None:
            raise MoeportError(f"calibration text {path} needs a tokenizer: the model's vocabulary is {vocab_size} "
                               "(not bytes) and no tokenizer was found; give a directory holding one (--checkpoint, "
                               "--tokenizer), or a .npz of token ids")
    try:
        data = _text_bytes(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise MoeportError(f"cannot read calibration file {path}: {exc}") from exc
    if not data:
        raise MoeportError(f"calibration file {path} is empty")
    ids = encoder.encode(data)
    if vocab_size is not None and ids.size and ids.max() >= vocab_size:
        raise MoeportError(f"calibration text {path} encodes to ids up to {ids.max()}, outside the model's "
                           f"vocabulary of {vocab_size}")
    windows = _windows(ids, seq, samples, inputs, outputs, f"calibration text {path}")
    return CalibrationSet(f"{path} ({encoder.name})", windows)


@dataclass
class ExpertCoverage:
    """Calibration token slots per expert, per router (graph order)."""

    label: str
    counts: list[int]
    starved: list[int]  # experts below the starvation threshold

    def to_dict(self) -> dict:
        return {"label": self.label, "counts": self.counts, "starved": self.starved}


def starvation_threshold(total_slots: int, num_experts: int) -> float:
    """An expert is starved below 10% of an even share (its activation ranges rest on a handful of tokens)."""
    return 0.1 * total_slots / max(num_experts, 1)


def expert_coverage(session_outputs: list[np.ndarray], labels: list[str], num_experts: list[int]) -> list[ExpertCoverage]:
    """Per-router histograms from TopK index outputs ``[tokens, k]`` accumulated over the samples.

    ``session_outputs``: for each sample, the list of index arrays in router order.
    """
    result = []
    for r, (label, experts) in enumerate(zip(labels, num_experts)):
        counts = np.zeros(experts, dtype=np.int64)
        for outputs in session_outputs:
            counts += np.bincount(outputs[r].reshape(-1), minlength=experts)[:experts]
        limit = starvation_threshold(int(counts.sum()), experts)
        result.append(ExpertCoverage(label, counts.tolist(), [e for e in range(experts) if counts[e] < limit]))
    return result
