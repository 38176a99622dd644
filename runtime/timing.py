"""Timing loops shared by bench, the expert-efficiency measurement, quantize's latency and the benchmarks."""

from __future__ import annotations

import time
from typing import Callable


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
