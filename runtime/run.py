"""``moeport run``: run a model once on inputs from an ``.npz`` file, with a placement report.

Exported models take ``input_ids`` ``[batch, sequence]`` int64 and return ``logits``
``[batch, sequence, vocab]`` float32, plus ``routing.{label}.experts`` ``[batch*sequence, k]`` int64 and
``routing.{label}.weights`` ``[batch*sequence, k]`` float32 when exported ``--with-routing``. The inputs
are checked against the model (names, rank, dtype, fixed dims, token ids against the vocabulary) before
onnxruntime sees them; the outputs go to an ``.npz`` written atomically. A text-generation-with-past model also
takes a prompt alone (``input_ids [batch, seq]``, with or without its 0/1 ``attention_mask``): it runs as the
prompt's prefill from an empty cache, ``position_ids`` from the mask, as ``moeport generate`` starts.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeport._fs import check_output_file, load_npz
from moeport.contract import (ATTENTION_MASK, INPUT_IDS, KV_CACHE_SHARED, is_cache_input, metadata_of_map,
                              vocab_size)
from moeport.runtime._io import (TensorSpec, check_inputs, check_prompt_mask, group_per_layer, save_npz, session_specs,
                                shapes_text)
from moeport.runtime.layouts import model_file
from moeport.runtime.placement import Placement, profiled_session, resolve_with_warnings, run_profiled
from moeport.runtime.verify import model_feeds


@dataclass
class OutputSummary:
    name: str
    dtype: str
    shape: tuple[int, ...]
    min: float | None
    max: float | None
    mean: float | None

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> "OutputSummary":
        numeric = array.size and (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_)
        values = array.astype(np.float64) if numeric else None
        return cls(name, array.dtype.name, tuple(array.shape),
                   None if values is None else float(values.min()),
                   None if values is None else float(values.max()),
                   None if values is None else float(values.mean()))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "min": self.min, "max": self.max, "mean": self.mean}


@dataclass
class RunResult:
    model: Path
    ep: str  # short name of the provider used (after any fallback)
    inputs: dict[str, tuple[int, ...]]
    outputs: list[OutputSummary]
    placement: Placement
    seconds: float  # the one session.run, profiling included
    output_file: Path | None = None
    warnings: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the outputs themselves
    filled: list[str] = field(default_factory=list)  # inputs moeport made for a prompt alone (prompt_feeds)

    def to_dict(self) -> dict:
        return {"model": str(self.model), "ep": self.ep,
                "inputs": {k: list(v) for k, v in self.inputs.items()},
                "outputs": [o.to_dict() for o in self.outputs],
                "output_file": None if self.output_file is None else str(self.output_file),
                "seconds": round(self.seconds, 4), "placement": self.placement.to_dict(),
                "warnings": self.warnings, "filled": self.filled}

    def render(self) -> str:
        lines = [f"warning: {w}" for w in self.warnings]
        lines.append(f"ran {self.model} on {self.ep} with {shapes_text(self.inputs)} in {self.seconds * 1e3:.1f} ms")
        if self.filled:
            made = [name for name in self.filled if not is_cache_input(name)]
            caches = len(self.filled) - len(made)
            made += [f"the empty cache's {caches} input{'s' * (caches != 1)}"] if caches else []
            lines.append(f"a prompt alone: ran as its prefill from an empty cache; filled in {', '.join(made)}")
        # per-layer outputs (a with-past model's cache) once per kind: present.{0..23}.key
        for name, group in group_per_layer(self.outputs, lambda o: (o.name, o.dtype, o.shape)):
            o = group[0]  # the group's outputs have one shape: the mean of their means is theirs
            stats = "" if o.min is None else (f"  min {min(g.min for g in group):.4g} "
                                              f"max {max(g.max for g in group):.4g} "
                                              f"mean {sum(g.mean for g in group) / len(group):.4g}")
            lines.append(f"  {name:<28} {o.dtype:<8} {str(list(o.shape)):<16}{stats}")
        if self.output_file is not None:
            lines.append(f"outputs written to {self.output_file}")
        lines.append(self.placement.render())
        return "\n".join(lines)


def run_model(
    model: str | os.PathLike,
    inputs: str | os.PathLike | dict[str, np.ndarray],
    *,
    output: str | os.PathLike | None = None,
    force: bool = False,
    ep: str = "cpu",
    fallback: str | None = None,
    threads: int | None = None,
) -> RunResult:
    """Run ``model`` once on ``inputs`` (an .npz path or a dict of arrays); optionally save the outputs.

    The session is profiled so that the result also says which provider ran each node.
    """
    model = model_file(model)
    output = None if output is None else Path(output)
    if output is not None:
        check_output_file(output, force)  # before the run: do not compute what cannot be written
    feeds = load_npz(inputs) if not isinstance(inputs, dict) else dict(inputs)
    provider, notes = resolve_with_warnings(ep, fallback)
    with tempfile.TemporaryDirectory(prefix="moeport-profile-") as tmp:
        session = profiled_session(model, provider, threads=threads, profile_dir=tmp)
        input_specs, output_specs = session_specs(session)
        metadata = session.get_modelmeta().custom_metadata_map
        given = list(feeds)
        if is_prompt(feeds, input_specs):
            feeds = prompt_feeds(feeds, input_specs, output_specs, vocab_size(metadata, model),
                                 metadata_of_map(metadata).get("kv_cache"))
        else:
            check_inputs(feeds, input_specs, vocab_size(metadata, model))
        start = time.perf_counter()
        values, placement = run_profiled(session, feeds, provider.ort_name)
        seconds = time.perf_counter() - start
    arrays = {spec.name: value for spec, value in zip(session_specs(session)[1], values)}
    if output is not None:
        save_npz(output, arrays, force=force)
    return RunResult(model, provider.name, {k: tuple(v.shape) for k, v in feeds.items()},
                     [OutputSummary.of(k, v) for k, v in arrays.items()], placement, seconds, output, notes, arrays,
                     [name for name in feeds if name not in given])


def is_prompt(feeds: dict[str, np.ndarray], specs: list[TensorSpec]) -> bool:
    """Whether ``feeds`` is a prompt alone (``input_ids``, with or without its ``attention_mask``) for a with-past
    graph (inputs ``specs``, some of them cache inputs, contract ``is_cache_input``)."""
    names = {spec.name for spec in specs}
    return (any(is_cache_input(name) for name in names) and INPUT_IDS in feeds
            and set(feeds) <= {INPUT_IDS, ATTENTION_MASK} & names)


def prompt_feeds(feeds: dict[str, np.ndarray], input_specs: list[TensorSpec], output_specs: list[TensorSpec],
                 vocab: int | None, kv_cache: str | None) -> dict[str, np.ndarray]:
    """A with-past graph's feeds for the prompt ``feeds`` (``is_prompt``): its prefill from an empty cache
    (``verify.model_feeds``: ``position_ids`` from the mask, a mask of ones when none is given; a shared buffer,
    ``kv_cache`` contract ``KV_CACHE_SHARED``, as long as the prompt). The prompt is checked first, as
    ``check_inputs`` checks whole feeds."""
    check_inputs(feeds, [spec for spec in input_specs if spec.name in feeds], vocab)
    ids = feeds[INPUT_IDS]
    if ATTENTION_MASK in feeds:
        check_prompt_mask(feeds[ATTENTION_MASK], ids, "input")
    return model_feeds(feeds, input_specs, output_specs, ids.shape[1] if kv_cache == KV_CACHE_SHARED else 0)


def example_feeds(specs: list[TensorSpec], vocab: int | None, batch: int = 1, seq: int = 8,
                  seed: int = 0, outputs: list[TensorSpec] = (), kv_cache: str | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs for ``specs``: integer inputs in ``[0, vocab)`` (``[0, 2)`` when the vocabulary is not
    known), float inputs standard normal; dynamic dims set to batch, seq, then 1. A with-past graph (cache
    inputs, ``contract.is_cache_input``) gets a prompt instead: ``seq`` seeded ids per row, its mask and positions,
    and the empty cache (``verify.model_feeds``, sized from ``outputs``, the graph's; a shared buffer
    (``kv_cache``, contract ``KV_CACHE_SHARED``) of ``seq`` columns)."""
    rng = np.random.default_rng(seed)
    vocab = vocab or 2
    if any(is_cache_input(spec.name) for spec in specs):
        ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        return model_feeds({INPUT_IDS: ids}, specs, outputs, seq if kv_cache == KV_CACHE_SHARED else 0)
    feeds = {}
    for spec in specs:
        defaults = iter((batch, seq))
        shape = tuple(d if isinstance(d, int) else next(defaults, 1) for d in spec.shape)
        if np.issubdtype(np.dtype(spec.dtype), np.integer):
            feeds[spec.name] = rng.integers(0, vocab, size=shape, dtype=spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds
