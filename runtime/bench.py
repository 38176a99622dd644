"""``moeport bench``: latency of a model on onnxruntime, optionally against PyTorch eager.

Each shape ``BATCHxSEQ`` feeds seeded ``input_ids [batch, seq] int64``. With a checkpoint, the PyTorch
model runs on the same inputs in the same process with the same thread count; ORT and PyTorch take
turns (``alternate``) so that machine noise (other jobs, frequency changes) hits both alike, and the
comparison uses medians. Peak memory is the largest resident set size (psutil) seen after any run of a shape, so it
includes whatever the process held before (the model weights of both backends).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from moeport.errors import MoeportError, UsageError
from moeport.runtime._io import atomic_path, check_new_file, session_specs
from moeport.runtime.placement import resolve_with_warnings
from moeport.runtime.session import create_session
from moeport.runtime.run import example_feeds
from moeport.runtime.verify import parse_shapes

DEFAULT_SHAPES = "1x1,1x128,4x128"


def time_runs(fn: Callable[[], object], *, runs: int, warmup: int = 3) -> list[float]:
    """Seconds of ``runs`` timed calls of ``fn`` after ``warmup`` untimed ones (one backend, nothing to alternate)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def alternate(backends: dict[str, Callable[[], object]], *, runs: int, warmup: int = 3, per_turn: int = 5,
              settle_runs: int = 3, settle_s: float = 0.05,
              after_run: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds of ``runs`` timed calls of each backend, the backends taking turns.

    Every backend keeps its default threading. onnxruntime's and PyTorch's (OpenMP) worker threads both
    busy-wait for a while after a run, and measured here a run that follows the other backend's is
    slowed for several milliseconds (up to tens) while those threads still hold the cores. So each turn
    first runs a backend untimed until it has settled (at least ``settle_runs`` calls and ``settle_s``
    seconds), then times ``per_turn`` calls; the same rule for every backend. Turns rotate
    (a, b, c, a, b, c, ...) so that noise over time still hits all of them alike. ``after_run`` is
    called after every call (e.g. to sample memory).
    """
    if per_turn < 1 or settle_runs < 0:
        raise ValueError("per_turn must be at least 1 and settle_runs at least 0")
    times: dict[str, list[float]] = {name: [] for name in backends}
    for fn in backends.values():
        for _ in range(warmup):
            fn()
            if after_run is not None:
                after_run()
    while any(len(t) < runs for t in times.values()):
        for name, fn in backends.items():
            if len(times[name]) >= runs:
                continue
            turn_start, settled = time.perf_counter(), 0
            while settled < settle_runs or time.perf_counter() - turn_start < settle_s:
                fn()
                settled += 1
                if after_run is not None:
                    after_run()
            for _ in range(min(per_turn, runs - len(times[name]))):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                if after_run is not None:
                    after_run()
    return times


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

    def to_dict(self) -> dict:
        return {"model": str(self.model), "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
                "ep": self.ep, "threads": self.threads, "warmup": self.warmup, "warnings": self.warnings,
                "plot": None if self.plot is None else str(self.plot),
                "results": [r.to_dict() for r in self.results]}

    def render(self) -> str:
        lines = [f"warning: {w}" for w in self.warnings]
        lines.append(f"bench {self.model} on {self.ep}, {self.threads} threads, {self.warmup} warmup runs"
                     + (f", against PyTorch eager ({self.checkpoint})" if self.checkpoint else ""))
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


def _torch_model(checkpoint, model_metadata: dict[str, str], model: Path):
    """The checkpoint's PyTorch model, after checking it is the one ``model`` was exported from."""
    from moeport.exporter import families

    loaded = families.load_checkpoint(checkpoint)
    raw = model_metadata.get("moeport.model_info")
    if raw is not None:
        from moeport.runtime.verify import parse_model_info  # checks the metadata is intact

        info = parse_model_info(raw, model)
        if info.family != loaded.info.family or info.layers != loaded.info.layers:
            raise MoeportError(f"{model} was not exported from {checkpoint} (family or MoE layers differ)")
    return loaded.model


def bench(
    model: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
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
) -> BenchReport:
    """Time ``model`` (and ``checkpoint`` in PyTorch eager) at each shape; see the module docstring."""
    import psutil
    import torch
    from tqdm import tqdm

    if isinstance(shapes, str):
        shapes = parse_shapes(shapes)
    if runs < 1 or warmup < 0:
        raise UsageError(f"--runs must be at least 1 and --warmup at least 0 (got {runs} and {warmup})")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {threads})")
    threads = threads or min(os.cpu_count() or 1, torch.get_num_threads())
    plot = None if plot is None else Path(plot)
    if plot is not None:
        check_new_file(plot, force=True)
        _pyplot()  # fail before the measurements, not after
    model = Path(model)
    provider, notes = resolve_with_warnings(ep, fallback)
    session = create_session(model, provider, threads=threads)
    input_specs, _ = session_specs(session)
    metadata = session.get_modelmeta().custom_metadata_map
    names = [s.name for s in input_specs]
    if names not in (["input_ids"], ["input_ids", "attention_mask"]):
        raise MoeportError(f"{model} takes inputs {names}; bench feeds input_ids (and attention_mask) only: "
                           "export with --task logits")
    torch_model = None
    if checkpoint is not None:
        torch_model = _torch_model(checkpoint, metadata, model)
        torch.set_num_threads(threads)  # the same intra-op threads as the ORT session: a fair comparison
    process = psutil.Process()
    results = []
    total = len(shapes) * (1 if checkpoint is None else 2) * runs  # timed runs; settling runs are extra
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=not progress) as bar, torch.no_grad():
        for i, (batch, seq) in enumerate(shapes):
            feeds = example_feeds(input_specs, metadata, batch, seq, seed=seed + i)
            if "attention_mask" in feeds:
                feeds["attention_mask"] = np.ones_like(feeds["input_ids"])  # no padding
            torch_feeds = {name: torch.from_numpy(array) for name, array in feeds.items()}
            peak = 0

            def sample_memory() -> None:
                nonlocal peak
                peak = max(peak, process.memory_info().rss)

            backends = {"ort": lambda: session.run(None, feeds)}
            if torch_model is not None:
                backends["torch"] = lambda: torch_model(**torch_feeds)
            times = alternate(backends, runs=runs, warmup=warmup, after_run=sample_memory)
            ort_times, torch_times = times["ort"], times.get("torch", [])
            bar.update(len(ort_times) + len(torch_times))
            efficiency = None
            if expert_efficiency:
                from moeport.runtime.efficiency import expert_efficiency as measure

                top_k = int(metadata.get("moeport.top_k", "0")) or 1
                efficiency = measure(model, feeds, top_k=top_k, ep=provider.name, threads=threads,
                                     runs=max(runs // 2, 3)).to_dict()
            results.append(ShapeBench((batch, seq), _ms_stats(ort_times),
                                      _ms_stats(torch_times) if torch_times else None, peak / 2**20, runs, efficiency))
    report = BenchReport(model, None if checkpoint is None else Path(checkpoint), provider.name, threads, warmup,
                         results, notes)
    if plot is not None:
        write_plot(report, plot)
        report.plot = plot
    return report


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MoeportError("--plot needs matplotlib, which is not installed; pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def write_plot(report: BenchReport, path: Path) -> None:
    """A bar chart of median latency per shape (ORT, and PyTorch when measured), written atomically."""
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
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"{report.model.name}, {report.threads} threads")
        ax.legend()
        fig.tight_layout()
        from moeport._fs import writing

        with writing(path), atomic_path(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
