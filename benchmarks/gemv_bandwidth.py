"""How fast onnxruntime's CPU MatMul streams float32 weights for one token (M = 1: a decode step's products), at
the shapes of a granite-3.0-1b-a400m-shaped model: ``python benchmarks/gemv_bandwidth.py [--threads 2]``.

Why: an fp32 decode step reads every weight it uses once (1.72 GB a token for that model: 24 layers of attention
and 8 of 32 experts, and the tied 49155 x 1024 lm_head), so its speed is bounded by how fast the MatMul kernel
streams weights from memory. This script times graphs of nothing but such MatMuls (each weight its own
initializer, larger together than the CPU's caches) and prints GB/s per shape; dividing a system's decode
tokens/s into the bytes per token gives its own rate to compare (BENCHMARKS.md).

``--layouts`` times the expert's shape in other ways onnxruntime could run the same product: its weight stored
``[n, k]`` under ``Gemm(transB=1)`` (the row-dot-product layout llama.cpp's kernels read), either with onnxruntime's
weight prepacking switched off, and the weight on the left (``[n, k] @ [k, 1]``); all the cases' sessions are open
at once (about 10.6 GB).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (K, N, how many): an expert's projection, the attention's query/output projection, the lm_head
SHAPES = ((1024, 512, 256), (1024, 1024, 128), (1024, 49155, 4))


# How the product is written: MatMul(x [1, k], W [k, n]); Gemm(x, W^T [n, k], transB=1); MatMul(W^T, x^T [k, 1]).
LAYOUTS = ("matmul", "gemm-transb", "weight-left")


def _graph(k: int, n: int, count: int, layout: str = "matmul") -> bytes:
    """``count`` products of one [1, k] input with their own [k, n] float32 weights (seeded), written as
    ``layout``, every product an output (so none is pruned)."""
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((k, n)) * 0.01).astype(np.float32) for _ in range(count)]
    nodes, shape = [], [1, n]
    if layout == "matmul":
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(count)]
    else:
        weights = [np.ascontiguousarray(w.T) for w in weights]
        if layout == "gemm-transb":
            nodes += [helper.make_node("Gemm", ["x", f"w{i}"], [f"y{i}"], transB=1) for i in range(count)]
        else:
            nodes.append(helper.make_node("Transpose", ["x"], ["x_t"], perm=[1, 0]))
            nodes += [helper.make_node("MatMul", [f"w{i}", "x_t"], [f"y{i}"]) for i in range(count)]
            shape = [n, 1]
    initializers = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, shape) for i in range(count)]
    graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _cases(layouts: bool):
    """(row label, k, n, count, layout, prepacking) to time."""
    for k, n, count in SHAPES:
        yield f"1x{k} @ {k}x{n}", k, n, count, "matmul", True
    if layouts:
        k, n, count = SHAPES[0]
        yield f"1x{k} @ {k}x{n}, prepacking off", k, n, count, "matmul", False
        for prepacked in (True, False):
            yield (f"Gemm(1x{k}, {n}x{k}, transB=1){'' if prepacked else ', prepacking off'}", k, n, count,
                   "gemm-transb", prepacked)
        yield f"{n}x{k} @ {k}x1 (weight on the left)", k, n, count, "weight-left", True


def measure(threads: int, runs: int, layouts: bool = False) -> list[dict]:
    """Median time of ``runs`` runs of every case, the cases taking turns run by run (this machine's speed drifts
    from one minute to the next) on one process-wide pool of ``threads`` threads (a pool per session would keep
    spinning threads that take the cores from the next session's run)."""
    ort.capi._pybind_state.set_global_thread_pool_sizes(threads, 1)
    cases = list(_cases(layouts))
    sessions = []
    for _, k, n, count, layout, prepacked in cases:
        options = ort.SessionOptions()
        options.use_per_session_threads = False
        if not prepacked:
            options.add_session_config_entry("session.disable_prepacking", "1")
        sessions.append(ort.InferenceSession(_graph(k, n, count, layout), options,
                                             providers=["CPUExecutionProvider"]))
    feeds = [{"x": np.ones((1, k), np.float32)} for _, k, *_ in cases]
    for session, feed in zip(sessions, feeds):
        for _ in range(3):
            session.run(None, feed)
    seconds = [[] for _ in cases]
    for _ in range(runs):
        for session, feed, times in zip(sessions, feeds, seconds):
            started = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - started)
    rows = []
    for (label, k, n, count, _, _), times in zip(cases, seconds):
        median = float(np.median(times))
        rows.append({"shape": label, "count": count, "ms": median * 1e3,
                     "gb_per_s": k * n * 4 * count / median / 1e9, "us_each": median / count * 1e6})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--layouts", action="store_true", help="also the expert's shape in other layouts")
    args = parser.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, median of {args.runs} runs, the cases taking turns")
    print("| MatMul | in one graph | ms a run | GB/s | us each |")
    print("|---|---|---|---|---|")
    for row in measure(args.threads, args.runs, args.layouts):
        print(f"| {row['shape']} | {row['count']} | {row['ms']:.2f} | {row['gb_per_s']:.1f} | {row['us_each']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
