"""How much a quantized model lost: size, parity with PyTorch, perplexity, routing on text, latency.

Every number compares the fp32 ONNX file (``before``) with the quantized one (``after``) on the same
inputs. Perplexity is for byte-level LMs (vocabulary 256): the held-out text's bytes are cut into
non-overlapping windows ``[batch, window]``; the logits ``[batch, window, 256]`` at position t score byte
t+1 (the first byte of each window has no context and is not scored).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from moeport.contract import LOGITS, Reference, is_cache_input, present_for
from moeport.errors import MoeportError
from moeport.quant.calibration import text_feeds
from moeport.runtime._io import TensorSpec
from moeport.runtime.generate import CachedDecoder, decoder_feeds, empty_past, has_shared_cache
from moeport.runtime.moe_graph import find_routers, kernel_routed_indices, load_graph, top_k_as_qmoe
from moeport.runtime.session import create_session
from moeport.runtime.timing import alternate
from moeport.runtime.verify import verify

PARITY_SHAPES = ((1, 1), (3, 7), (4, 128))
# Parity on held-out text: this many windows of PARITY_WINDOW tokens (128: the trained sample's context).
PARITY_WINDOWS, PARITY_WINDOW = 8, 128
PPL_WINDOW = 256
PPL_BATCH = 8
# Logits per perplexity run, at most: a run's logits and the activations behind them stay in both sessions' arenas.
# 8 windows of a 49k vocabulary (~400 MB of logits a run) put quantize of the 24-layer granite-shaped model past 2x
# its size (stopped at 2.05x); one window a run there: 1.44x.
PPL_LOGITS_BYTES = 64 << 20
# Perplexity reads at most this many tokens, in evenly spaced windows: 256 windows of 256, the whole of the trained
# sample's 64 KiB held-out file. The whole of a 400,000-character held-out file (93,597 tokens) took over 8 minutes
# at 24 layers of the granite-shaped model, in both sessions.
PPL_MAX_TOKENS = 256 * PPL_WINDOW
LATENCY_SHAPE = (1, 128)


@dataclass
class Parity:
    """Quantized ONNX vs PyTorch fp32 (``moeport.runtime.verify``), merged over the shapes."""

    shapes: list[str]
    inputs: str  # "held-out text" or "random ids"
    max_abs_err: float
    mean_abs_err: float  # logits
    argmax_agreement: float | None  # logits, over all tokens of all shapes
    routing_agreement: float | None  # worst layer, over all tokens of all shapes
    routing_per_layer: dict[str, float]


@dataclass
class QualityReport:
    size_before: int  # files as written (the input keeps torch.onnx's per-node debug metadata)
    size_after: int
    weights_before: int  # initializer bytes only: the part quantization shrinks
    weights_after: int
    debug_metadata: int  # bytes of per-node torch.onnx provenance in the input; the output drops them
    parity: Parity | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    heldout_tokens: int = 0  # scored by perplexity
    heldout_text_tokens: int = 0  # in the held-out text (perplexity reads at most quantize's heldout_tokens of them)
    heldout_routing: dict[str, float] = field(default_factory=dict)  # per router, same expert set as fp32 ONNX
    heldout_top1: dict[str, float] = field(default_factory=dict)  # per router, same top expert as fp32 ONNX
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    latency_of: str = ""  # what was timed (latency_kind)
    # with-past models: the prompt's prefill as well (1x128 with an empty cache), the step a user waits for first
    prefill_before_ms: float | None = None
    prefill_after_ms: float | None = None
    prefill_of: str = ""  # e.g. "prefill 1x128"
    notes: list[str] = field(default_factory=list)  # why a measurement is missing or reads as it does

    @property
    def size_ratio(self) -> float:
        """Output file / input file without its debug metadata: the same content, fp32 vs quantized."""
        return self.size_after / (self.size_before - self.debug_metadata)

    @property
    def weights_ratio(self) -> float:
        return self.weights_after / max(self.weights_before, 1)

    @property
    def perplexity_change(self) -> float | None:
        if self.perplexity_before is None or self.perplexity_after is None:
            return None
        return self.perplexity_after / self.perplexity_before - 1.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["size_ratio"] = self.size_ratio
        data["weights_ratio"] = self.weights_ratio
        data["perplexity_change"] = self.perplexity_change
        return data


def model_size(path: str | os.PathLike) -> int:
    """Bytes of the model file plus its external data files, if any."""
    path = Path(path)
    size = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value for init in proto.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data if entry.key == "location"
    }
    return size + sum((path.parent / loc).stat().st_size for loc in locations)


def parity_windows(ids: np.ndarray, count: int = PARITY_WINDOWS, window: int = PARITY_WINDOW) -> np.ndarray:
    """Up to ``count`` evenly spaced windows ``[n, window]`` int64 of encoded text ``ids [tokens]``."""
    window = min(window, ids.size)
    starts = np.unique(np.linspace(0, ids.size - window, num=count).astype(np.int64))
    return np.stack([ids[s:s + window] for s in starts]).astype(np.int64)


def parity(model: Path, reference: Reference, min_routing_agreement: float, shapes=PARITY_SHAPES,
           text_ids: np.ndarray | None = None) -> Parity:
    """verify() against ``reference`` (e.g. the PyTorch checkpoint) with no error tolerance (quantized outputs
    never meet fp32's); routing sets the pass. ``text_ids [n, seq]`` (e.g. ``parity_windows`` of held-out
    text) replace the random ids at ``shapes``."""
    token_inputs = [TensorSpec(name, "int64", ("batch", "sequence")) for name in reference.info.input_names]
    inputs = None if text_ids is None else text_feeds(text_ids, token_inputs, "held-out text")
    report = verify(model, reference, shapes=list(shapes), atol=math.inf, inputs=inputs,
                    min_routing_agreement=min_routing_agreement)
    shapes = [result.shape for result in report.results]
    agree: dict[str, list[float]] = {}
    for result in report.results:
        for r in result.comparison.routing:
            agree.setdefault(r.label, [0.0, 0.0])
            agree[r.label][0] += r.agreement * r.tokens
            agree[r.label][1] += r.tokens
    per_layer = {label: total / max(n, 1) for label, (total, n) in agree.items()}
    logits = [o for r in report.results for o in r.comparison.outputs if o.name == "logits"]
    tokens = [math.prod(o.shape[:-1]) for o in logits]
    mean_abs = sum(o.mean_abs * n for o, n in zip(logits, tokens)) / max(sum(tokens), 1)
    return Parity(
        shapes=[f"{b}x{s}" for b, s in shapes],
        inputs="random ids" if inputs is None else "held-out text",
        max_abs_err=report.max_abs_err,
        mean_abs_err=mean_abs,
        argmax_agreement=None if not logits else
        sum(o.argmax_agreement * n for o, n in zip(logits, tokens)) / max(sum(tokens), 1),  # token-weighted
        # Worst layer over all tokens of all shapes (not report.routing_agreement, whose per-shape minimum
        # lets a 1-token shape swing it between 0 and 1).
        routing_agreement=min(per_layer.values(), default=None),
        routing_per_layer=per_layer,
    )


class RouterSession:
    """A CPU session that also returns every router's TopK indices and the ``float_outputs`` tensors (added as
    outputs to the graph it hands onnxruntime; the weights are read from the model's own files). A router whose
    TopK a QMoE took over (``moe_graph.kernel_routed_indices``) is read as the QMoE's ``router_probs``, and its
    experts are picked from it by the kernel's own rule (``moe_graph.top_k_as_qmoe``)."""

    def __init__(self, model: Path, index_names: list[str] | None = None, float_outputs: tuple[str, ...] = ()):
        graph = load_graph(model)
        if index_names is None:
            index_names = [r.indices_output for r in find_routers(graph).routers if r.indices_output]
        produced = {o for node in graph.graph.node for o in node.output}
        in_kernel = kernel_routed_indices(graph)
        self.index_names = [n for n in index_names if n in produced or n in in_kernel]
        self._picked_inside = {n: in_kernel[n] for n in self.index_names if n not in produced}
        self._fetched = [n for n in self.index_names if n not in self._picked_inside]
        extra = {name: onnx.TensorProto.INT64 for name in self._fetched}
        extra.update({probs: onnx.TensorProto.FLOAT for probs, _ in self._picked_inside.values()})
        extra.update({name: onnx.TensorProto.FLOAT for name in float_outputs})
        self.session = create_session(model, "cpu", extra_outputs=extra)
        logits = next((o.shape for o in self.session.get_outputs() if o.name == LOGITS), None)
        self.vocab = logits[-1] if logits and isinstance(logits[-1], int) else None  # None: a free axis

    def run(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids ``[batch, seq]`` -> (logits ``[batch, seq, vocab]``, TopK indices ``[tokens, k]`` per router)."""
        feeds = text_feeds(ids, self.session.get_inputs(), "held-out text", self.session.get_outputs())
        probs = sorted({probs for probs, _ in self._picked_inside.values()})
        names = ["logits", *self._fetched, *probs]
        outputs = dict(zip(names, self.session.run(names, feeds)))
        indices = [top_k_as_qmoe(outputs[self._picked_inside[n][0]], self._picked_inside[n][1])
                   if n in self._picked_inside else outputs[n] for n in self.index_names]
        return outputs["logits"], indices


def _nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[:, 1:] under logits[:, :-1] (float64), and the count."""
    scores = logits[:, :-1].astype(np.float64)
    scores -= scores.max(-1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    target = ids[:, 1:]
    picked = np.take_along_axis(log_probs, target[..., None], -1)[..., 0]
    return float(-picked.sum()), int(target.size)


def heldout_windows(ids: np.ndarray, window: int = PPL_WINDOW, max_tokens: int | None = PPL_MAX_TOKENS) -> np.ndarray:
    """The non-overlapping windows ``[n, window]`` of encoded text ``ids [tokens]`` that perplexity reads: all of
    them, or ``max_tokens // window`` of them evenly spaced over the text (first and last included) when there are
    more."""
    count = ids.size // window
    if count == 0:
        raise MoeportError(f"the held-out text has {ids.size} tokens, fewer than one window of {window}")
    windows = ids[:count * window].reshape(count, window)
    keep = count if max_tokens is None else max(1, max_tokens // window)
    if keep < count:
        windows = windows[np.unique(np.linspace(0, count - 1, num=keep).round().astype(np.int64))]
    return windows


def heldout_quality(before: Path, after: Path, ids: np.ndarray, routers_before: list[str] | None = None,
                    window: int = PPL_WINDOW, batch: int = PPL_BATCH, max_tokens: int | None = PPL_MAX_TOKENS):
    """(ppl before, ppl after, scored tokens, per-router agreement of the TopK sets after vs before, and of
    the top-1 expert). ``ids`` (the encoded text, ``[n]``) are cut into windows (``heldout_windows``: at most
    ``max_tokens`` of them, None: all) run ``[batch, window]`` at a time (fewer rows where the vocabulary would make a
    run's logits exceed ``PPL_LOGITS_BYTES``; the figures do not depend on it); routers are matched by TopK output
    name."""
    windows = heldout_windows(ids, window, max_tokens)
    count = len(windows)
    fp32 = RouterSession(before, routers_before)
    quant = RouterSession(after, fp32.index_names)
    vocab = fp32.vocab or quant.vocab
    if vocab:
        batch = max(1, min(batch, PPL_LOGITS_BYTES // (window * vocab * 4)))
    nll = [0.0, 0.0]
    tokens = 0
    same = np.zeros(len(fp32.index_names))
    same_top1 = np.zeros(len(fp32.index_names))
    slots = 0
    for start in range(0, count, batch):
        chunk = windows[start:start + batch]
        logits_a, idx_a = fp32.run(chunk)
        logits_b, idx_b = quant.run(chunk)
        for i, logits in enumerate((logits_a, logits_b)):
            value, n = _nll(logits, chunk)
            nll[i] += value
        tokens += n
        if len(idx_b) == len(idx_a):
            for r, (a, b) in enumerate(zip(idx_a, idx_b)):
                same[r] += np.all(np.sort(a, -1) == np.sort(b, -1), -1).sum()
                same_top1[r] += (a[:, 0] == b[:, 0]).sum()  # TopK sorts by score: column 0 is the top expert
        slots += chunk.size
    agreement, top1 = {}, {}
    if len(quant.index_names) == len(fp32.index_names):
        agreement = {f"router{r}": float(same[r] / slots) for r in range(len(fp32.index_names))}
        top1 = {f"router{r}": float(same_top1[r] / slots) for r in range(len(fp32.index_names))}
    return math.exp(nll[0] / tokens), math.exp(nll[1] / tokens), tokens, agreement, top1


def _timed_calls(session, ids: np.ndarray) -> dict[str, Callable[[], object]]:
    """What a deployment runs, as calls by ``latency_kind``: for a with-past graph one decode step (the last id)
    after a prefill of the others, its cache fed back, and the prefill of all ``ids`` from an empty cache (the step
    a user waits for first); else the whole ``ids [1, seq]``. A shared-buffer graph (contract ``KV_CACHE_SHARED``)
    is stepped as ``moeport generate`` steps it, its buffers bound as past and present (``CachedDecoder``): each
    call writes the same columns again, so every run times the same step."""
    names = [i.name for i in session.get_inputs()]
    inputs = [name for name in names if is_cache_input(name)]
    kind = latency_kind(names, ids.shape[1])
    if not inputs:
        return {kind: functools.partial(session.run, None, text_feeds(ids, session.get_inputs(), "latency ids"))}
    mask, prompt, last = np.ones_like(ids), ids[:, :-1], ids[:, -1:]
    if has_shared_cache(session):
        decoder = CachedDecoder(session, 1, capacity=ids.shape[1])
        decoder.step(prompt, mask[:, :-1])
        return {kind: functools.partial(decoder.step, last, mask),
                prefill_kind(ids.shape[1]): functools.partial(decoder.step, ids, mask)}
    empty = empty_past(session.get_inputs(), 1, session.get_outputs())
    outputs = [present_for(name) for name in inputs]
    presents = session.run(outputs, decoder_feeds(mask[:, :-1], prompt, empty))
    feeds = decoder_feeds(mask, last, dict(zip(inputs, presents)))
    return {kind: functools.partial(session.run, [LOGITS], feeds),
            prefill_kind(ids.shape[1]): functools.partial(session.run, [LOGITS], decoder_feeds(mask, ids, empty))}


def latency_kind(input_names: list[str], seq: int) -> str:
    """What ``latency_ms`` times first for a model with graph inputs ``input_names``, short: ``decode@127`` (one
    decode step after 127 tokens) or ``1x128``."""
    return f"decode@{seq - 1}" if any(is_cache_input(n) for n in input_names) else f"1x{seq}"


def prefill_kind(seq: int) -> str:
    """What ``latency_ms`` times second for a with-past model: the prefill of ``seq`` tokens from an empty cache."""
    return f"prefill 1x{seq}"


def latency_ms(before: Path, after: Path, ids: np.ndarray, runs: int) -> dict[str, tuple[float, float]]:
    """Median CPU wall times (ms, before and after) of ``runs`` runs of each model on token ids ``[1, seq]``, by
    what was timed (``_timed_calls``: for with-past graphs a decode step, then the prefill), side by side: both
    sessions open with the same threads, taking turns (``moeport.runtime.timing.alternate``), so that the
    machine's load changes hit both alike. Timed one after the other, the fp32 median of the trained sample
    varied from 2.1 to 3.8 ms between reports of one run."""
    calls = {name: _timed_calls(create_session(path, "cpu"), ids) for name, path in (("before", before),
                                                                                       ("after", after))}
    medians = {}
    for kind in calls["before"]:
        times = alternate({name: by_kind[kind] for name, by_kind in calls.items()}, runs=runs, warmup=2)
        medians[kind] = (statistics.median(times["before"]) * 1e3, statistics.median(times["after"]) * 1e3)
    return medians
