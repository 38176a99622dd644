"""``moeport bench``: latency of a model on onnxruntime, optionally against PyTorch eager.

Each shape ``BATCHxSEQ`` feeds seeded ``input_ids [batch, seq] int64``. A with-past model (``--task
text-generation-with-past``) is timed as it is used: each run is a prefill of ``seq`` tokens, then ``decode_steps``
decode steps of one token per row, stepped as ``moeport generate`` steps (``runtime.generate.CachedDecoder``: the cache
in onnxruntime's memory, a shared buffer bound in place); the shape's latency is the prefill's, and the decode
steps get their own percentiles and tokens/s. With a reference (the exporter's
``CheckpointReference``; this module never imports torch), the PyTorch model runs on the same inputs in the same process with the same thread count; ORT and PyTorch take
turns (``alternate``) so that machine noise (other jobs, frequency changes) hits both alike, and the
comparison uses medians. Peak memory is the largest resident set size (psutil) seen after any run of a shape, so it
includes whatever the process held before (the model weights of both backends).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import psutil
from tqdm import tqdm

from moeport._fs import check_output_file, staged_file, writing
from moeport.contract import (ATTENTION_MASK, INPUT_IDS, Reference, is_cache_input, metadata_of_map,
                              optional_model_info, vocab_size)
from moeport.errors import MoeportError, UsageError
from moeport.runtime._io import session_specs
from moeport.runtime.placement import resolve_with_warnings
from moeport.runtime.run import example_feeds
from moeport.runtime.session import create_session
from moeport.runtime.timing import alternate
from moeport.runtime.efficiency import expert_efficiency as measure_expert_efficiency
from moeport.runtime.generate import CachedDecoder
from moeport.runtime.layouts import model_file
from moeport.runtime.verify import check_reference, parse_shapes

DEFAULT_SHAPES = "1x1,1x128,4x128"
DEFAULT_DECODE_STEPS = 32


def _ms_stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "min": float(ms.min())}


@dataclass
class ShapeBench:
    shape: tuple[int, int]
    ort: dict[str, float]  # latency stats in ms: p50 p90 p99 mean min
    torch: dict[str, float] | None
    peak_rss_mb: float
    runs: int
    expert_efficiency: dict | None = None  # runtime.efficiency.ExpertEfficiency.to_dict()
    decode: dict[str, float] | None = None  # a with-past model's decode steps: latency stats in ms, as ``ort``

    @property
    def tokens(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def speedup(self) -> float | None:
        """PyTorch median / ORT median: above 1 means onnxruntime is faster."""
        return None if self.torch is None else self.torch["p50"] / self.ort["p50"]

    def to_dict(self) -> dict:
        return {
            "shape": f"{self.shape[0]}x{self.shape[1]}", "tokens": self.tokens, "runs": self.runs,
            "ort_ms": self.ort["p50"], "ort_p90_ms": self.ort["p90"], "ort_p99_ms": self.ort["p99"],
            "ort_tokens_per_s": self.tokens / (self.ort["p50"] / 1e3),
            "torch_ms": None if self.torch is None else self.torch["p50"],
            "torch_p90_ms": None if self.torch is None else self.torch["p90"],
            "torch_p99_ms": None if self.torch is None else self.torch["p99"],
            "torch_tokens_per_s": None if self.torch is None else self.tokens / (self.torch["p50"] / 1e3),
            "speedup": self.speedup, "peak_rss_mb": self.peak_rss_mb,
            "expert_matmul_fraction": None if self.expert_efficiency is None else self.expert_efficiency["fraction"],
            "expert_efficiency": self.expert_efficiency,
            "decode_step_ms": None if self.decode is None else self.decode["p50"],
            "decode_step_p90_ms": None if self.decode is None else self.decode["p90"],
            "decode_tokens_per_s": None if self.decode is None else self.shape[0] / (self.decode["p50"] / 1e3),
        }


@dataclass
class BenchReport:
    model: Path
    checkpoint: Path | None
    ep: str
    threads: int
    warmup: int
    results: list[ShapeBench]
    warnings: list[str] = field(default_factory=list)
    plot: Path | None = None
    decode_steps: int = 0  # a with-past model's decode steps per run (0: a logits model)

    def to_dict(self) -> dict:
        return {"model": str(self.model), "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
                "ep": self.ep, "threads": self.threads, "warmup": self.warmup, "warnings": self.warnings,
                "plot": None if self.plot is None else str(self.plot), "decode_steps": self.decode_steps,
                "results": [r.to_dict() for r in self.results]}

    def render(self) -> str:
        lines = [f"warning: {w}" for w in self.warnings]
        lines.append(f"bench {self.model} on {self.ep}, {self.threads} threads, {self.warmup} warmup runs"
                     + (f", against PyTorch eager ({self.checkpoint})" if self.checkpoint else ""))
        if self.decode_steps:
            lines.append(f"  with past: each run is a prefill of the shape, then {self.decode_steps} decode steps of one "
                         "token per row")
            lines.append(f"  {'shape':<9} {'prefill p50':>11} {'p90':>9} {'tok/s':>10} {'step p50':>9} {'p90':>9} "
                         f"{'decode tok/s':>12} {'peak RSS':>9}")
            for r in self.results:
                d = r.to_dict()
                lines.append(f"  {d['shape']:<9} {d['ort_ms']:11.3f} {d['ort_p90_ms']:9.3f} {d['ort_tokens_per_s']:10.0f} "
                             f"{d['decode_step_ms']:9.3f} {d['decode_step_p90_ms']:9.3f} "
                             f"{d['decode_tokens_per_s']:12.1f} {r.peak_rss_mb:7.0f}MB")
            lines.append("latencies in ms; decode tok/s = batch / median step")
            return "\n".join(lines)
        lines.append(f"  {'shape':<9} {'ort p50':>9} {'p90':>9} {'p99':>9} {'tok/s':>10} {'torch p50':>10} "
                     f"{'speedup':>8} {'peak RSS':>9}")
        for r in self.results:
            d = r.to_dict()
            torch_ms = "" if r.torch is None else f"{d['torch_ms']:.3f}"
            speedup = "" if r.speedup is None else f"{r.speedup:.2f}x"
            lines.append(f"  {d['shape']:<9} {d['ort_ms']:9.3f} {d['ort_p90_ms']:9.3f} {d['ort_p99_ms']:9.3f} "
                         f"{d['ort_tokens_per_s']:10.0f} {torch_ms:>10} {speedup:>8} {r.peak_rss_mb:7.0f}MB")
        for r in self.results:
            if r.expert_efficiency is not None:
                e = r.expert_efficiency
                lines.append(f"  expert MatMuls at {e['shape']}: {e['expert_gflop_s']:.1f} GFLOP/s = "
                             f"{e['fraction']:.0%} of a plain MatMul of the same size ({e['plain_gflop_s']:.1f} GFLOP/s)")
        lines.append("latencies in ms; speedup = PyTorch median / onnxruntime median")
        if self.plot is not None:
            lines.append(f"plot written to {self.plot}")
        return "\n".join(lines)


def bench(
    model: str | os.PathLike,
    *,
    reference: Reference | None = None,
    shapes: str | list[tuple[int, int]] = DEFAULT_SHAPES,
    ep: str = "cpu",
    fallback: str | None = None,
    threads: int | None = None,
    warmup: int = 3,
    runs: int = 20,
    plot: str | os.PathLike | None = None,
    progress: bool = False,
    seed: int = 0,
    expert_efficiency: bool = False,
    decode_steps: int = DEFAULT_DECODE_STEPS,
) -> BenchReport:
    """Time ``model`` (and ``reference``, e.g. a checkpoint in PyTorch eager) at each shape; see the module
    docstring. ``threads`` defaults to the machine's CPU count, for both backends. ``decode_steps``: the decode
    steps after each prefill of a with-past model."""
    if isinstance(shapes, str):
        shapes = parse_shapes(shapes)
    if runs < 1 or warmup < 0:
        raise UsageError(f"--runs must be at least 1 and --warmup at least 0 (got {runs} and {warmup})")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {threads})")
    threads = threads or os.cpu_count() or 1
    plot = None if plot is None else Path(plot)
    if plot is not None:
        check_output_file(plot, force=True)
        _pyplot()  # fail before the measurements, not after
    model = model_file(model)
    provider, notes = resolve_with_warnings(ep, fallback)
    session = create_session(model, provider, threads=threads)
    input_specs, _ = session_specs(session)
    metadata = session.get_modelmeta().custom_metadata_map
    names = [s.name for s in input_specs]
    with_past = any(is_cache_input(name) for name in names)
    if with_past:
        if reference is not None:
            raise UsageError("--checkpoint compares a logits export with PyTorch; a with-past model's prefill and "
                             "decode are timed on onnxruntime alone")
        if expert_efficiency:
            raise UsageError("--expert-efficiency profiles a logits export (--task logits)")
        if decode_steps < 1:
            raise UsageError(f"--decode-steps must be at least 1 (got {decode_steps})")
    elif names not in (["input_ids"], ["input_ids", "attention_mask"]):
        raise MoeportError(f"{model} takes inputs {names}; bench feeds input_ids (and attention_mask), or a KV cache "
                           "too: export with --task logits or text-generation-with-past")
    if reference is not None:
        info = optional_model_info(metadata_of_map(metadata), model)
        if info is not None:
            check_reference(model, info, reference)
    process = psutil.Process()
    results = []
    total = len(shapes) * (1 if reference is None else 2) * runs  # timed runs; settling runs are extra
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=not progress) as bar:
        for i, (batch, seq) in enumerate(shapes):
            if with_past:
                rng = np.random.default_rng(seed + i)
                ids = rng.integers(0, vocab_size(metadata, model) or 2, size=(batch, seq + decode_steps))
                prefill_s, step_s, peak_rss = _time_decoding(session, ids, seq, runs, warmup, process, bar)
                results.append(ShapeBench((batch, seq), _ms_stats(prefill_s), None, peak_rss / 2**20, runs,
                                          decode=_ms_stats(step_s)))
                continue
            feeds = example_feeds(input_specs, vocab_size(metadata, model), batch, seq, seed=seed + i)
            if ATTENTION_MASK in feeds:
                feeds[ATTENTION_MASK] = np.ones_like(feeds[INPUT_IDS])  # no padding
            peak = 0

            def sample_memory() -> None:
                nonlocal peak
                peak = max(peak, process.memory_info().rss)

            with contextlib.ExitStack() as stack:
                backends = {"ort": lambda: session.run(None, feeds)}
                if reference is not None:
                    # The same intra-op threads as the ORT session: a fair comparison.
                    backends["torch"] = stack.enter_context(reference.timed_forward(feeds, threads))
                times = alternate(backends, runs=runs, warmup=warmup, after_run=sample_memory)
            ort_times, torch_times = times["ort"], times.get("torch", [])
            bar.update(len(ort_times) + len(torch_times))
            efficiency = None
            if expert_efficiency:
                efficiency = measure_expert_efficiency(model, feeds, ep=provider.name, threads=threads,
                                                       runs=max(runs // 2, 3)).to_dict()
            results.append(ShapeBench((batch, seq), _ms_stats(ort_times),
                                      _ms_stats(torch_times) if torch_times else None, peak / 2**20, runs, efficiency))
    report = BenchReport(model, None if reference is None else reference.source, provider.name, threads, warmup,
                         results, notes, decode_steps=decode_steps if with_past else 0)
    if plot is not None:
        write_plot(report, plot)
        report.plot = plot
    return report


def _time_decoding(session, ids: np.ndarray, prompt: int, runs: int, warmup: int, process, bar):
    """Seconds of each timed prefill of ``ids[:, :prompt]`` and of each decode step after it (teacher-forced:
    the next columns of ``ids``, so every run steps through the same tokens and experts), and the peak resident
    memory; ``warmup`` untimed runs first."""
    batch, steps = ids.shape[0], ids.shape[1] - prompt
    decoder = CachedDecoder(session, batch, capacity=ids.shape[1])
    prefill_s, step_s, peak = [], [], 0
    for run in range(warmup + runs):
        decoder.reset()
        started = time.perf_counter()
        decoder.step(ids[:, :prompt], np.ones((batch, prompt), dtype=np.int64))
        prefill = time.perf_counter() - started
        steps_s = []
        for k in range(prompt, prompt + steps):
            started = time.perf_counter()
            decoder.step(ids[:, k:k + 1], np.ones((batch, k + 1), dtype=np.int64))
            steps_s.append(time.perf_counter() - started)
        peak = max(peak, process.memory_info().rss)
        if run >= warmup:
            prefill_s.append(prefill)
            step_s += steps_s
            bar.update(1)
    return prefill_s, step_s, peak


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MoeportError("--plot needs matplotlib, which is not installed; pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def write_plot(report: BenchReport, path: Path) -> None:
    """A bar chart of median latency per shape (ORT, and PyTorch when measured; a with-past model's prefill),
    written atomically."""
    plt = _pyplot()
    labels = [f"{r.shape[0]}x{r.shape[1]}" for r in report.results]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    try:
        with_torch = all(r.torch is not None for r in report.results)
        width = 0.4 if with_torch else 0.6
        ax.bar(x - (width / 2 if with_torch else 0), [r.ort["p50"] for r in report.results], width,
               label=f"onnxruntime ({report.ep})")
        if with_torch:
            ax.bar(x + width / 2, [r.torch["p50"] for r in report.results], width, label="PyTorch eager")
        ax.set_xticks(x, labels)
        ax.set_xlabel("batch x sequence")
        ax.set_ylabel("median prefill latency (ms)" if report.decode_steps else "median latency (ms)")
        ax.set_title(f"{report.model.name}, {report.threads} threads")
        ax.legend()
        fig.tight_layout()
        with staged_file(path) as staging, writing(path):
            fig.savefig(staging / path.name, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
