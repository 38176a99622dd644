"""Resident memory of one session of a with-past model: after load, and after a prefill and decode steps.

``python benchmarks/resident.py MODEL.onnx [--direct] [--threads 2] [--prompt 128] [--steps 48]``

Opens MODEL with ``moeport.runtime.create_session`` (``--direct``: ``onnxruntime.InferenceSession`` from the path,
nothing else), prints ``/proc/self/status``'s resident set (VmRSS: RssAnon + RssFile) and its peak (VmHWM) after
load, then steps a prefill of ``--prompt`` tokens and ``--steps`` greedy decode steps as ``moeport generate`` does
(``benchmarks/vs_llamacpp.moeport_step_runner``) and prints them again. Linux only (``/proc``). One model per
process: what a process held before is in the figures (the baseline line shows it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vs_llamacpp import moeport_step_runner  # a sibling script: run as python benchmarks/resident.py


def resident_gb() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in GB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key] = round(int(value.split()[0]) * 1024 / 1e9, 2)  # kB
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--direct", action="store_true", help="onnxruntime.InferenceSession, not create_session")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    import onnxruntime as ort

    from moeport.runtime.session import create_session

    print("baseline", resident_gb())
    if args.direct:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = args.threads, 3
        session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    else:
        session = create_session(args.model, "cpu", threads=args.threads)
    print("after load", resident_gb())
    prefill, decode = moeport_step_runner(session)
    logits = prefill(np.arange(3, 3 + args.prompt, dtype=np.int64)[None])
    for _ in range(args.steps):
        logits = decode(int(logits[0, -1].argmax()))
    print(f"after a {args.prompt}-token prefill and {args.steps} decode steps", resident_gb())


if __name__ == "__main__":
    main()
