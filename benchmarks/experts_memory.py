"""Where the sparsity target's extra time goes: ``python benchmarks/experts_memory.py [--threads 2]``.

The sparsity target (benchmarks/run.py) compares our sample with 64 and with 8 experts (top-2, hidden 256,
expert intermediate 512, 2 layers) at 1x512. This script times only the expert part of one or two such
layers, as the sorted dispatch exports it (rows split by expert with one Split, per expert
``down(silu(x @ gate) * (x @ up))``, one Concat), on 1024 rows (512 tokens x top-2) split over the experts by a
seeded multinomial draw, with onnxruntime's CPU provider (median of 40 runs). It also measures how fast this
machine reads buffers of growing size (torch ``sum`` on the same thread count), because at 16 rows per expert
the 64 experts' MatMuls read each fp32 weight for only 16 rows, so their time follows the bytes they read:
64 experts x 3 x 512 KiB = 96 MiB per layer, 8 experts 12 MiB. For comparison it also times onnxruntime's
own fused MoE kernel (``com.microsoft.MoE``, a contrib op moeport does not emit) with 8 and 64 experts.
"""

from __future__ import annotations

import argparse

import numpy as np

HIDDEN, INTERMEDIATE, ROWS = 256, 512, 1024


def expert_layers_model(num_experts: int, num_layers: int, rows_per_expert: list[int], seed: int = 0):
    """ONNX graph x [ROWS, HIDDEN] -> y [ROWS, HIDDEN]: ``num_layers`` expert blocks applied in turn."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array(rows_per_expert, np.int64), "rows_per_expert")]
    nodes = []
    for layer in range(num_layers):
        names = [f"x{layer}_e{e}" for e in range(num_experts)]
        nodes.append(helper.make_node("Split", [f"x{layer}", "rows_per_expert"], names))
        for e, rows in enumerate(names):
            p = f"{layer}_{e}"
            for kind, shape in (("gate", (HIDDEN, INTERMEDIATE)), ("up", (HIDDEN, INTERMEDIATE)),
                                ("down", (INTERMEDIATE, HIDDEN))):
                weight = (rng.standard_normal(shape) * 0.05).astype(np.float32)
                inits.append(numpy_helper.from_array(weight, f"{kind}{p}"))
            nodes += [helper.make_node("MatMul", [rows, f"gate{p}"], [f"g{p}"]),
                      helper.make_node("MatMul", [rows, f"up{p}"], [f"u{p}"]),
                      helper.make_node("Sigmoid", [f"g{p}"], [f"sg{p}"]),
                      helper.make_node("Mul", [f"g{p}", f"sg{p}"], [f"silu{p}"]),
                      helper.make_node("Mul", [f"silu{p}", f"u{p}"], [f"h{p}"]),
                      helper.make_node("MatMul", [f"h{p}", f"down{p}"], [f"y{p}"])]
        nodes.append(helper.make_node("Concat", [f"y{layer}_{e}" for e in range(num_experts)], [f"x{layer + 1}"],
                                      axis=0))
    graph = helper.make_graph(
        nodes, "experts", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [ROWS, HIDDEN])],
        [helper.make_tensor_value_info(f"x{num_layers}", TensorProto.FLOAT, [ROWS, HIDDEN])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def contrib_moe_model(num_experts: int, seed: int = 0):
    """onnxruntime's fused ``com.microsoft.MoE`` (CPU kernel: interleaved SwiGLU) on one layer, for
    comparison only (moeport emits standard ops): x [ROWS // 2 tokens, HIDDEN], router logits -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    tokens = ROWS // 2
    fc1 = (rng.standard_normal((num_experts, 2 * INTERMEDIATE, HIDDEN)) * 0.05).astype(np.float32)
    fc2 = (rng.standard_normal((num_experts, HIDDEN, INTERMEDIATE)) * 0.05).astype(np.float32)
    node = helper.make_node("MoE", ["x0", "router", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=2,
                            activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                            swiglu_limit=1e9, activation_alpha=1.0, activation_beta=0.0)
    graph = helper.make_graph(
        [node], "moe", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [tokens, HIDDEN]),
                        helper.make_tensor_value_info("router", TensorProto.FLOAT, [tokens, num_experts])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, HIDDEN])],
        initializer=[numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def median_ms(model, threads: int, runs: int = 40) -> float:
    import onnxruntime as ort

    from moeport.runtime.timing import time_runs

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
             for i in session.get_inputs()}
    return float(np.median(time_runs(lambda: session.run(None, feeds), runs=runs, warmup=10))) * 1e3


def read_bandwidth_gbs(mib: int, threads: int) -> float:
    import torch

    from moeport.runtime.timing import time_runs

    torch.set_num_threads(threads)
    buffer = torch.ones(mib * 2**20 // 4)
    return mib / 1024 / float(np.median(time_runs(buffer.sum, runs=10, warmup=3)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print("| experts | layers | expert weights | expert part | per layer |\n|---|---|---|---|---|")
    for experts in (8, 64):
        rows = [int(r) for r in rng.multinomial(ROWS, [1 / experts] * experts)]
        for layers in (1, 2):
            ms = median_ms(expert_layers_model(experts, layers, rows), args.threads)
            mib = experts * layers * 3 * HIDDEN * INTERMEDIATE * 4 / 2**20
            print(f"| {experts} | {layers} | {mib:.0f} MiB | {ms:.2f} ms | {ms / layers:.2f} ms |")
    print("\nonnxruntime's fused com.microsoft.MoE, one layer, 512 tokens, top-2, routing included (comparison):")
    for experts in (8, 64):
        print(f"- {experts} experts: {median_ms(contrib_moe_model(experts), args.threads):.2f} ms")
    print(f"\n| buffer | read rate, {args.threads} threads |\n|---|---|")
    for mib in (16, 64, 128, 256, 512):
        print(f"| {mib} MiB | {read_bandwidth_gbs(mib, args.threads):.1f} GiB/s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
