"""Where a decode step of a moeport with-past ONNX file goes, by op type, from onnxruntime's profiler:
``python benchmarks/decode_profile.py MODEL.onnx [--threads 2] [--prompt 128] [--steps 24] [--top 16]``.

The file prefills ``--prompt`` token ids (3, 4, ...: the speed does not depend on them), then decodes ``--steps``
greedy tokens, stepping as ``moeport generate`` does (``vs_llamacpp.moeport_step_runner``: ``CachedDecoder``, a
shared buffer bound in place). Only the decode steps' kernels are counted. Kernels whose input had no elements are
counted apart as idle: the experts no token chose, which a per-expert graph still runs every step. The profiler
adds a few microseconds to every kernel, so its step is slower than an unprofiled one; the table is for where the
time goes, not for speed (``decode_ab.py`` and ``vs_llamacpp.py`` time that).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from moeport.runtime.profile import kernel_events
from moeport.runtime.session import create_session
from vs_llamacpp import moeport_step_runner  # a sibling script: run as python benchmarks/decode_profile.py


def profile_decode(path: Path, threads: int, prompt: int, steps: int) -> dict:
    """Per (op type, idle): kernels and kernel seconds per decode step, and the median kernel; plus the steps'
    median wall time (profiled) and the kernels and kernel time of a whole step."""
    with tempfile.TemporaryDirectory() as scratch:
        session = create_session(path, "cpu", threads=threads, profile_dir=scratch)
        prefill, decode = moeport_step_runner(session)
        logits = prefill(np.arange(3, 3 + prompt, dtype=np.int64)[None])
        wall = []
        for _ in range(steps):
            started = time.perf_counter()
            logits = decode(int(logits[0, -1].argmax()))
            wall.append(time.perf_counter() - started)
        kernels = defaultdict(list)
        for event in kernel_events(session.end_profiling()):
            if event.run >= 1:  # run 0 is the prefill
                kernels[event.op_type, event.idle].append(event.seconds)
    rows = [{"op_type": op, "idle": idle, "per_step": len(times) / steps, "us_per_step": sum(times) / steps * 1e6,
             "median_us": statistics.median(times) * 1e6} for (op, idle), times in kernels.items()]
    rows.sort(key=lambda row: -row["us_per_step"])
    return {"rows": rows, "step_ms": statistics.median(wall) * 1e3,
            "kernels_per_step": sum(row["per_step"] for row in rows),
            "kernel_ms_per_step": sum(row["us_per_step"] for row in rows) / 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--top", type=int, default=16, help="rows of the table (the op types taking most time)")
    args = parser.parse_args(argv)
    result = profile_decode(args.model, args.threads, args.prompt, args.steps)
    print(f"{args.model.name}: {args.threads} threads, {args.steps} decode steps after a {args.prompt}-token prompt; "
          f"{result['kernels_per_step']:.0f} kernels and {result['kernel_ms_per_step']:.2f} ms of kernel time a step "
          f"(profiled step {result['step_ms']:.1f} ms)")
    print("| op type | idle | kernels / step | us / step | median us |")
    print("|---|---|---|---|---|")
    for row in result["rows"][:args.top]:
        print(f"| {row['op_type']} | {'yes' if row['idle'] else ''} | {row['per_step']:.1f} | "
              f"{row['us_per_step']:.0f} | {row['median_us']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
