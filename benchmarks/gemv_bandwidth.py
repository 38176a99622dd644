"""How fast onnxruntime's CPU MatMul streams float32 weights for one token (M = 1: a decode step's products), at
the shapes of a granite-3.0-1b-a400m-shaped model: ``python benchmarks/gemv_bandwidth.py [--threads 2]``.

Why: an fp32 decode step reads every weight it uses once (1.72 GB a token for that model: 24 layers of attention
and 8 of 32 experts, and the tied 49155 x 1024 lm_head), so its speed is bounded by how fast the MatMul kernel
streams weights from memory. This script times graphs of nothing but such MatMuls (each weight its own
initializer, larger together than the CPU's caches) and prints GB/s per shape; dividing a system's decode
tokens/s into the bytes per token gives its own rate to compare (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (K, N, how many): an expert's projection, the attention's query/output projection, the lm_head
SHAPES = ((1024, 512, 256), (1024, 1024, 128), (1024, 49155, 4))


def _graph(k: int, n: int, count: int) -> bytes:
    """``count`` MatMuls of one [1, k] input with their own [k, n] float32 weights (seeded), every product an
    output (so none is pruned)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((k, n)) * 0.01).astype(np.float32), f"w{i}")
               for i in range(count)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(count)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(count)]
    graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def measure(threads: int, runs: int) -> list[dict]:
    rows = []
    for k, n, count in SHAPES:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(_graph(k, n, count), options, providers=["CPUExecutionProvider"])
        feeds = {"x": np.ones((1, k), np.float32)}
        for _ in range(3):
            session.run(None, feeds)
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            session.run(None, feeds)
            seconds.append(time.perf_counter() - started)
        median = float(np.median(seconds))
        rows.append({"shape": f"1x{k} @ {k}x{n}", "count": count, "ms": median * 1e3,
                     "gb_per_s": k * n * 4 * count / median / 1e9, "us_each": median / count * 1e6})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, median of {args.runs} runs")
    print("| MatMul | in one graph | ms a run | GB/s | us each |")
    print("|---|---|---|---|---|")
    for row in measure(args.threads, args.runs):
        print(f"| {row['shape']} | {row['count']} | {row['ms']:.2f} | {row['gb_per_s']:.1f} | {row['us_each']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
