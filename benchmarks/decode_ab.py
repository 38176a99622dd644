"""Decode speed of several moeport with-past ONNX files side by side, step by step, in one process:
``python benchmarks/decode_ab.py A.onnx B.onnx [...] [--threads 2] [--prompt 128] [--steps 96] [--restart 32]``.

Why: this machine's speed drifts by 20-40% from one minute to the next, so two files timed one after the other
(even in alternating processes) cannot show a 5-10% change. Here every decode step of file A is followed by the
same step of file B, so drift hits both alike; the table gives each file's median step and its quartiles.

How: all sessions share one onnxruntime thread pool of ``--threads`` threads (per-session pools would each keep
spinning threads that take the cores from the next session's step). Each file prefills the same ``--prompt``
token ids (ids 3, 4, ... : any ids; the speed does not depend on them), then decodes greedily, back to the
prompt's cache every ``--restart`` steps so that the context stays between ``prompt`` and ``prompt + restart``
as in benchmarks/vs_llamacpp.py. Numbers are for comparing files with each other, not with llama.cpp (see
vs_llamacpp.py for that).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moeport.contract import LOGITS, present_for
from moeport.runtime.generate import decoder_feeds, empty_past


def _decoder(path: Path):
    options = ort.SessionOptions()
    options.use_per_session_threads = False  # the process-wide pool set in main
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    presents = [present_for(i.name) for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if not presents:
        raise SystemExit(f"{path} has no past_key_values inputs: export it with --task text-generation-with-past")
    return session, presents


def compare(paths: list[Path], threads: int, prompt: int, steps: int, restart: int) -> list[dict]:
    """Per file: prefill and decode-step medians (seconds) and the decode quartiles, steps interleaved."""
    ort.capi._pybind_state.set_global_thread_pool_sizes(threads, 1)
    decoders = [_decoder(p) for p in paths]
    ids = np.arange(3, 3 + prompt, dtype=np.int64)[None]
    states, prefill_s, step_s = [], [[] for _ in paths], [[] for _ in paths]
    for _ in range(2):  # the first prefill also warms up allocators and caches
        states = []
        for k, (session, presents) in enumerate(decoders):
            mask = np.ones((1, prompt), dtype=np.int64)
            started = time.perf_counter()
            logits, *past = session.run([LOGITS, *presents],
                                        decoder_feeds(mask, ids, empty_past(session.get_inputs(), 1)))
            prefill_s[k].append(time.perf_counter() - started)
            states.append({"start": (past, mask, logits), "now": (past, mask, logits)})
    for step in range(steps):
        for k, (session, presents) in enumerate(decoders):
            past, mask, logits = states[k]["start"] if step % restart == 0 else states[k]["now"]
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            feeds = decoder_feeds(mask, np.array([[int(logits[0, -1].argmax())]], dtype=np.int64), past)
            started = time.perf_counter()
            logits, *past = session.run([LOGITS, *presents], feeds)
            step_s[k].append(time.perf_counter() - started)
            states[k]["now"] = (past, mask, logits)
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
