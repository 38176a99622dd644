"""How onnxruntime's block-quantized MatMul (``MatMulNBits``, accuracy_level 4: int8 activations, as moeport's
int4 and int8-blocks files use it) scales with the number of rows it multiplies, against the float32 MatMul:
``python benchmarks/nbits_rows.py [--threads 2] [--rows 1,4,16,32,128]``.

Why: a decode step gives every projection one row (M = 1); a 128-token prefill gives the attention and the lm_head
128 rows and each of 32 experts about 32 (128 tokens x top-8 / 32). The quantized files' decode speed comes from
the M = 1 kernels; whether their prefill can stay under fp32's depends on how the same kernels do with many rows,
which is onnxruntime's (MLAS) code, not the graph's. This script times graphs of nothing but such products (each
weight its own initializer, 24 of them, larger together than the CPU's caches) and prints microseconds per product
and per row for float32 and for 8-bit and 4-bit blocks of 32 and 128 (asymmetric, with zero points, as
``moeport quantize`` writes them), and for 8-bit weights per channel in onnxruntime's integer GEMM
(``DynamicQuantizeMatMul``). QMoE runs its experts on the block kernels (onnxruntime 1.32). At M = 1 the
products are memory-bound and the float figure swings with the machine's state between runs (gemv_bandwidth.py
measures that case alone); from M = 16 on they are compute-bound and the comparison holds from run to run.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from moeport.runtime.timing import alternate

K = N = 1024  # an expert's stacked gate and up projection of the granite-shaped model: 1024 -> 2 x 512
PRODUCTS = 24
# name -> (bits, block size); None: float32; "channel": int8 per output channel in onnxruntime's
# DynamicQuantizeMatMul (the input quantized per run, one scale per tensor; MLAS's integer GEMM), for comparison:
# moeport's int8-dynamic runs the experts' gate and up projections on that kernel, but its [K, N] weights per
# channel are not the [N, K] blocks that QMoE and MatMulNBits read, so a file cannot hand both kernels one weight.
KINDS = {"float32": None, "8-bit / 32": (8, 32), "8-bit / 128": (8, 128), "4-bit / 32": (4, 32),
         "4-bit / 128": (4, 128), "8-bit / channel": "channel"}


def _graph(kind: tuple[int, int] | str | None) -> bytes:
    """``PRODUCTS`` products of one [M, K] input with their own [K, N] weights (seeded random values: the kernels'
    speed does not depend on them), every product an output (so none is pruned)."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for i in range(PRODUCTS):
        if kind is None:
            weights.append(numpy_helper.from_array((rng.standard_normal((K, N)) * 0.01).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
            continue
        if kind == "channel":
            weights += [numpy_helper.from_array(rng.integers(-127, 128, (K, N), dtype=np.int8), f"w{i}"),
                        numpy_helper.from_array((rng.random(N) * 0.01).astype(np.float32), f"s{i}")]
            nodes.append(helper.make_node("DynamicQuantizeMatMul", ["x", f"w{i}", f"s{i}"], [f"y{i}"],
                                          domain="com.microsoft"))
            continue
        bits, block = kind
        blocks = K // block
        # MatMulNBits' layout: B [N, blocks, block * bits / 8], scales [N * blocks], zero points packed per row
        packed = rng.integers(0, 256, (N, blocks, block * bits // 8), dtype=np.uint8)
        weights += [numpy_helper.from_array(packed, f"w{i}"),
                    numpy_helper.from_array((rng.random(N * blocks) * 0.01).astype(np.float32), f"s{i}"),
                    numpy_helper.from_array(rng.integers(0, 256, N * ((blocks * bits + 7) // 8), dtype=np.uint8),
                                            f"z{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"w{i}", f"s{i}", f"z{i}"], [f"y{i}"],
                                      domain="com.microsoft", K=K, N=N, bits=bits, block_size=block, accuracy_level=4))
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", N]) for i in range(PRODUCTS)]
    graph = helper.make_graph(nodes, "products", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def measure(threads: int, rows: list[int], runs: int) -> list[dict]:
    """Per row count, every kind timed ``runs`` times, taking turns (``moeport.runtime.timing.alternate``: each
    turn first lets the other sessions' spinning pool threads settle); medians."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {name: ort.InferenceSession(_graph(kind), options, providers=["CPUExecutionProvider"])
                for name, kind in KINDS.items()}
    results = []
    for m in rows:
        feeds = {"x": np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)}
        calls = {name: functools.partial(session.run, None, feeds) for name, session in sessions.items()}
        seconds = alternate(calls, runs=runs, warmup=1)
        results.append({"rows": m, "us_each": {name: float(np.median(s)) / PRODUCTS * 1e6
                                               for name, s in seconds.items()}})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,4,16,32,128", help="comma-separated row counts M")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)
    rows = [int(value) for value in args.rows.split(",")]
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, [M x {K}] @ [{K} x {N}], {PRODUCTS} products a "
          f"graph, median of {args.runs} runs; us a product (us a row)")
    print("| rows M | " + " | ".join(KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for result in measure(args.threads, rows, args.runs):
        cells = [f"{us:.0f} ({us / result['rows']:.1f})" for us in result["us_each"].values()]
        print(f"| {result['rows']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
