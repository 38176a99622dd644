"""A logits model's forward pass on several files side by side, and where it goes by op type:
``python benchmarks/forward_profile.py A.onnx B.onnx [...] [--shape 1x128] [--threads 2] [--runs 60] [--top 6]``.

Why: ``moeport quantize`` times a logits model (the bundled samples have no KV cache) on one sequence of 128
tokens, and a quantized file of a model small enough for the CPU's caches can come out slower than fp32; this
says which kernels take the time. First the files take turns run by run (``moeport.runtime.timing.alternate``,
as the quantize report times them; medians), then each is profiled (onnxruntime's profiler adds a few
microseconds to every kernel: the table is for where the time goes, the medians above it for speed). Token ids
are seeded random ids (the same for every file whose vocabulary has 200 tokens or more); an ``attention_mask``
input gets ones (a with-past file runs the ids' prefill).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from moeport.contract import vocab_size
from moeport.runtime.profile import kernel_events
from moeport.runtime.session import create_session
from moeport.runtime.timing import alternate
from moeport.runtime.verify import model_feeds


def _feeds(session, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Seeded ids ``[3, 200)`` of ``shape`` (below the model's vocabulary) and a mask of ones, as the session's inputs
    (``verify.model_feeds``: a with-past file's prefill)."""
    vocab = vocab_size(session.get_modelmeta().custom_metadata_map) or 200
    ids = np.random.default_rng(0).integers(3, min(200, vocab), size=shape, dtype=np.int64)
    return model_feeds({"input_ids": ids, "attention_mask": np.ones_like(ids)}, session.get_inputs(),
                       session.get_outputs())


def compare(paths: list[Path], shape: tuple[int, int], threads: int, runs: int) -> dict[str, float]:
    """Median ms of each file's forward pass on ids of ``shape``, the files taking turns."""
    calls = {}
    for path in paths:
        session = create_session(path, "cpu", threads=threads)
        calls[str(path)] = lambda session=session, feeds=_feeds(session, shape): session.run(["logits"], feeds)
    times = alternate(calls, runs=runs, warmup=3)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def profile(path: Path, shape: tuple[int, int], threads: int, runs: int) -> list[tuple[str, int, float]]:
    """(op type, kernels a run, kernel ms a run) of ``path``'s forward pass, the op types taking most time first."""
    with tempfile.TemporaryDirectory() as scratch:
        session = create_session(path, "cpu", threads=threads, profile_dir=scratch)
        feeds = _feeds(session, shape)
        for _ in range(runs + 1):
            session.run(["logits"], feeds)
        kernels = defaultdict(list)
        for event in kernel_events(session.end_profiling()):
            if event.run >= 1:  # run 0 warms up
                kernels[event.op_type].append(event.seconds)
    rows = [(op, len(t) // runs, sum(t) / runs * 1e3) for op, t in kernels.items()]
    return sorted(rows, key=lambda row: -row[2])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--shape", default="1x128", help="BATCHxSEQ")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--top", type=int, default=6, help="op types per file in the profile")
    args = parser.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split("x"))
    print(f"forward pass {args.shape}, {args.threads} threads, {args.runs} runs each, taking turns; medians (ms)")
    for name, ms in compare(args.models, shape, args.threads, args.runs).items():
        print(f"  {name}: {ms:.2f}")
    print("profiled, kernel ms a run by op type (kernels a run)")
    for path in args.models:
        rows = profile(path, shape, args.threads, min(args.runs, 20))
        print(f"  {path}: " + ", ".join(f"{op} {ms:.2f} ({n})" for op, n, ms in rows[:args.top]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
