"""What one kernel costs onnxruntime's CPU provider when it has nothing to do, without the profiler:
``python benchmarks/empty_kernels.py [--threads 2] [--nodes 1000] [--runs 50]``.

Why: a decode step of an export runs every expert's MatMuls, most of them on the zero rows of experts no token
chose, and onnxruntime's profiler puts a few microseconds on each kernel (its own cost), so a profile overstates
what they take. Here each case is a graph of ``--nodes`` such kernels and the same graph with one; the difference
of the two medians, divided by ``--nodes - 1``, is one kernel's cost. The cases take turns run by run, so the
machine's drift hits them alike.

Cases: ``MatMul`` of a ``[0, 1024]`` slice (an idle expert's rows) with its own ``[1024, 64]`` float weight;
the same as ``MatMulNBits`` in 8-bit blocks of 32 and 4-bit blocks of 128 (onnxruntime's own quantizer,
``accuracy_level`` 4, as moeport's int8-blocks and int4 write them); ``Add`` of a ``[1, 1024]`` tensor and a
constant, chained (the residual adds, the norms' small operations).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

CASES = ("matmul", "matmul-nbits-8", "matmul-nbits-4", "add")


def _graph(case: str, count: int) -> bytes:
    """``count`` kernels of ``case`` over the input ``x [1, 1024]``, all of them feeding the output."""
    rng = np.random.default_rng(0)
    if case == "add":
        nodes = [helper.make_node("Add", ["x" if i == 0 else f"y{i - 1}", "one"], [f"y{i}"]) for i in range(count)]
        graph = helper.make_graph(nodes, case, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                                  [helper.make_tensor_value_info(f"y{count - 1}", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(np.ones(1024, np.float32), "one")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    empty = [numpy_helper.from_array(np.array([0], np.int64), name) for name in ("start", "end", "axis")]
    weights = [numpy_helper.from_array((rng.standard_normal((1024, 64)) * 0.02).astype(np.float32), f"w{i}")
               for i in range(count)]
    nodes = [helper.make_node("Slice", ["x", "start", "end", "axis"], ["rows"])]  # zero rows, as an idle expert
    nodes += [helper.make_node("MatMul", ["rows", f"w{i}"], [f"y{i}"]) for i in range(count)]
    nodes.append(helper.make_node("Concat", [f"y{i}" for i in range(count)], ["y"], axis=1))
    graph = helper.make_graph(nodes, case, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], empty + weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    if case.startswith("matmul-nbits"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        bits = int(case.rsplit("-", 1)[1])
        quantizer = MatMulNBitsQuantizer(model, block_size=32 if bits == 8 else 128, is_symmetric=False,
                                         accuracy_level=4, bits=bits)
        quantizer.process()
        model = quantizer.model.model
        ops = {node.op_type for node in model.graph.node}
        if "MatMulNBits" not in ops or "MatMul" in ops:
            raise SystemExit(f"{case}: onnxruntime's quantizer wrote {sorted(ops)}, not MatMulNBits")
    return model.SerializeToString()


def measure(threads: int, nodes: int, runs: int) -> dict[str, float]:
    """Microseconds one kernel of each case costs (see the module docstring)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    sessions = {(case, count): ort.InferenceSession(_graph(case, count), options, providers=["CPUExecutionProvider"])
                for case in CASES for count in (1, nodes)}
    x = np.random.default_rng(1).standard_normal((1, 1024)).astype(np.float32)
    times = {key: [] for key in sessions}
    for run in range(runs + 3):  # the first three warm the sessions up
        for key, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {"x": x})
            if run >= 3:
                times[key].append(time.perf_counter() - started)
    return {case: (statistics.median(times[case, nodes]) - statistics.median(times[case, 1])) / (nodes - 1) * 1e6
            for case in CASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, {args.nodes} kernels a graph, median of {args.runs}")
    print("| kernel | us each |\n|---|---|")
    for case, micros in measure(args.threads, args.nodes, args.runs).items():
        print(f"| {case} | {micros:.2f} |")


if __name__ == "__main__":
    main()
