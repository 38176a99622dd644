"""Decode speed of several moeport with-past ONNX files side by side, step by step, in one process:
``python benchmarks/decode_ab.py A.onnx B.onnx [...] [--threads 2] [--prompt 128] [--steps 96] [--restart 32]``.

Why: this machine's speed drifts by 20-40% from one minute to the next, so two files timed one after the other
(even in alternating processes) cannot show a 5-10% change. Here every decode step of file A is followed by the
same step of file B, so drift hits both alike; the table gives each file's median step and its quartiles.

How: all sessions share one onnxruntime thread pool of ``--threads`` threads (per-session pools would each keep
spinning threads that take the cores from the next session's step). Each file prefills the same ``--prompt``
token ids (ids 3, 4, ... : any ids; the speed does not depend on them), then decodes greedily, prefilling the
prompt again every ``--restart`` steps so that the context stays between ``prompt`` and ``prompt + restart``
as in benchmarks/vs_llamacpp.py (whose step runner this uses). The ``--steps`` are split into one part per file;
each part loads the files afresh, a different one first (a file loaded later decodes faster). Numbers are for
comparing files with each other, not with llama.cpp (see vs_llamacpp.py --interleaved for that).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vs_llamacpp import moeport_step_runner, turned  # a sibling script: run as python benchmarks/decode_ab.py


def _decoder(path: Path):
    """(prefill, decode) of vs_llamacpp.moeport_step_runner over a session on the process-wide thread pool."""
    options = ort.SessionOptions()
    options.use_per_session_threads = False  # the process-wide pool set in compare
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if not any(i.name.startswith("past_key_values.") for i in session.get_inputs()):
        raise SystemExit(f"{path} has no past_key_values inputs: export it with --task text-generation-with-past")
    return moeport_step_runner(session)


def compare(paths: list[Path], threads: int, prompt: int, steps: int, restart: int) -> list[dict]:
    """Per file: prefill and decode-step medians (seconds) and the decode quartiles, steps interleaved."""
    ort.capi._pybind_state.set_global_thread_pool_sizes(threads, 1)
    ids = np.arange(3, 3 + prompt, dtype=np.int64)[None]
    logits, prefill_s, step_s = [None] * len(paths), [[] for _ in paths], [[] for _ in paths]
    # A file loaded later in a process decodes faster (three loads of one int4 file: 12.5, 12.0, 11.5 ms a step;
    # vs_llamacpp.worker_interleaved), so the steps are split into one part per file, each part loading every
    # file afresh with a different one first.
    for load in range(len(paths)):
        loaded = {k: _decoder(paths[k]) for k in turned(list(range(len(paths))), load)}
        decoders = [loaded[k] for k in range(len(paths))]
        for k in range(len(paths)):  # warm-up: allocators, caches, the thread pool
            decoders[k][0](ids)
        for step in range(steps // len(paths)):
            for k in range(len(paths)):
                if step % restart == 0:  # back to the prompt: the context stays within prompt + restart
                    started = time.perf_counter()
                    logits[k] = decoders[k][0](ids)
                    prefill_s[k].append(time.perf_counter() - started)
                token = int(logits[k][0, -1].argmax())
                started = time.perf_counter()
                logits[k] = decoders[k][1](token)
                step_s[k].append(time.perf_counter() - started)
        del loaded, decoders
        gc.collect()  # this part's sessions are freed before the next part loads its own
    return [{"file": str(p), "prefill_s": float(np.median(pre)), "step_s": float(np.median(t)),
             "step_p25_s": float(np.percentile(t, 25)), "step_p75_s": float(np.percentile(t, 75))}
            for p, pre, t in zip(paths, prefill_s, step_s)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--restart", type=int, default=32)
    args = parser.parse_args(argv)
    rows = compare(args.models, args.threads, args.prompt, args.steps, args.restart)
    print(f"{args.threads} threads, {args.prompt}-token prompt, {args.steps} decode steps interleaved")
    print("| file | prefill ms | decode tokens/s (median step) | step ms p25 / p75 |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {Path(row['file']).name} | {row['prefill_s'] * 1e3:.0f} | {1 / row['step_s']:.1f} | "
              f"{row['step_p25_s'] * 1e3:.2f} / {row['step_p75_s'] * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
