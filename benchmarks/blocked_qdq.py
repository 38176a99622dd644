"""Does onnxruntime's CPU provider run a QDQ MatMul whose weight is dequantized in blocks correctly?
``python benchmarks/blocked_qdq.py`` (seconds; exit status 1 when any case differs).

Why: static ``int8`` (calibrated QDQ) for CPU targets stores its weights in blocks of 32, as llama.cpp's Q8_0 does
(``passes.BlockWeightsPass``), but only with 16-bit activations. A ``DequantizeLinear`` with ``block_size``
(opset 21) behind 8-bit activations is mis-run: in onnxruntime 1.32 the CPU provider fuses ``Q -> DQ`` (8-bit
activations) + blocked ``DQ`` (8-bit weight) + ``MatMul`` into ``MatMulIntegerToFloat``, whose result does not
match the graph's; with 16-bit activations the group becomes ``MatMulNBits`` and is right. So ``--activations
int8`` keeps per-channel weights. This script builds that group alone, [1, 1024] @ [1024, 512] with seeded
values, for several block sizes and activation types, and compares the optimized session with an unoptimized one
(which runs the ops as written). Run it on a new onnxruntime to see whether 8-bit activations could take blocked
weights too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N = 1024, 512
ACTIVATIONS = {"int8": (np.int8(0), 0.05), "uint8": (np.uint8(128), 0.05), "int16": (np.int16(0), 2e-4)}


def _model(block_size: int, activation: str, weight: np.ndarray) -> onnx.ModelProto:
    """x [1, K] float -> QuantizeLinear/DequantizeLinear (per-tensor, ``activation``) -> MatMul with
    ``weight`` [K, N] as int8 in blocks of ``block_size`` along K (symmetric, scale [K / block_size, N])."""
    blocks = weight.reshape(K // block_size, block_size, N)
    scale = (np.abs(blocks).max(axis=1) / 127).astype(np.float32)
    quantized = np.clip(np.round(blocks / scale[:, None, :]), -127, 127).astype(np.int8).reshape(K, N)
    zero_point, x_scale = ACTIVATIONS[activation]
    initializers = [numpy_helper.from_array(quantized, "w_q"), numpy_helper.from_array(scale, "w_scale"),
                    numpy_helper.from_array(np.float32(x_scale), "x_scale"),
                    numpy_helper.from_array(zero_point, "x_zero_point")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero_point"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_dq"], axis=0, block_size=block_size),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    graph = helper.make_graph(nodes, "blocked_qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: bool, saved: Path) -> tuple[np.ndarray, list[str]]:
    """The output for ``x``, and the op types of the graph onnxruntime ran (written to ``saved``)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.optimized_model_filepath = str(saved)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    output = session.run(None, {"x": x})[0]
    return output, [node.op_type for node in onnx.load(saved).graph.node]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-sizes", default="32,128")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((1, K)).astype(np.float32)
    print(f"onnxruntime {ort.__version__}, CPU provider, [1, {K}] @ [{K}, {N}]")
    print(f"{'block':>5} {'activations':>11} {'max |optimized - as written|':>29} {'max |as written|':>16}  optimized graph")
    wrong = 0
    with tempfile.TemporaryDirectory() as scratch:
        saved = Path(scratch) / "optimized.onnx"
        for block_size in (int(b) for b in args.block_sizes.split(",")):
            for activation in ACTIVATIONS:
                model = _model(block_size, activation, weight)
                reference, _ = _run(model, x, optimized=False, saved=saved)
                output, ops = _run(model, x, optimized=True, saved=saved)
                difference = float(np.abs(output - reference).max())
                # MatMulNBits at accuracy level 4 quantizes its input to 8 bits per block: ~1% of the output's
                # scale is that rounding; a wrong scale or block is tens of percent.
                is_wrong = difference > 0.05 * float(np.abs(reference).max())
                wrong += is_wrong
                print(f"{block_size:>5} {activation:>11} {difference:>29.4g} {float(np.abs(reference).max()):>16.4g}  "
                      f"{' '.join(ops)}{'  WRONG' if is_wrong else ''}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
