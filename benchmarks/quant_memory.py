"""Peak memory of ``quantize`` per mode on a synthetic MoE model of a given size, weights in external data:
``python benchmarks/quant_memory.py --size-mb 3000 [--modes int4,fp16] [--out DIR]``.

The model is built directly as ONNX (no torch, no export), streaming each weight to ``model.onnx.data`` as
it is drawn, so building a 5 GB model needs about one tensor of memory: an embedding ``[vocab, hidden]``,
then per layer a router (``Gemm`` -> Softmax -> TopK -> renormalise) and ``experts`` SwiGLU experts in the
dense dispatch form (every expert on every token, its output scaled by its column of the routing weights,
``moeport.runtime.moe_graph`` finds both), then an lm_head ``MatMul``. Layers are added until the weights
reach ``--size-mb``. The file carries moeport metadata (``ModelInfo``) so int8 can calibrate on random ids.

Each mode runs ``quantize`` in its own Python process (``latency_runs=0``, no perplexity, 2 random
calibration windows for int8); the peak resident set size of that process (``ru_maxrss``) is reported with
its time and output size. Prints a markdown table and writes ``DIR/results.json``. onnxruntime's static
calibration also writes an augmented copy of the model to the system temp directory (``TMPDIR``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

MODES = ("int8", "int8-dynamic", "fp16", "int4")
CHILD = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
from moeport.quant import quantize
model, out, mode = sys.argv[1:4]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
result = quantize(model, out, mode=mode, latency_runs=0, perplexity=False, random_calibration=mode == "int8",
                  calibration_samples=2, force=True)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_imports_mb": base / 1024,
    "output_mb": result.quality.size_after / 1e6, "routers": len(result.router.routers),
    "router_kept_float": sum(result.router_kept_float.values())}))
"""


class _Weights:
    """Initializers written one at a time to one external data file, as random float32 (scaled by fan-in)."""

    def __init__(self, data_path: Path, seed: int = 0):
        self.path, self.file, self.offset = data_path, open(data_path, "wb"), 0
        self.rng = np.random.default_rng(seed)
        self.tensors: list[TensorProto] = []

    def add(self, name: str, *shape: int) -> str:
        array = self.rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(shape[0]))
        data = array.tobytes()
        self.file.write(data)
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        self.tensors.append(tensor)
        self.offset += len(data)
        return name

    def close(self) -> None:
        self.file.close()


def _const(nodes: list, name: str, values, dtype=np.int64) -> str:
    nodes.append(helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(values, dtype))))
    return name


def build(path: Path, size_mb: float, hidden: int, inter: int, experts: int, top_k: int, vocab: int) -> dict:
    """Write the synthetic model to ``path`` (+ ``path.data``); returns its shape."""
    per_layer = 4 * (hidden * experts + 3 * experts * hidden * inter)
    fixed = 4 * 2 * vocab * hidden
    layers = max(1, math.ceil((size_mb * 1e6 - fixed) / per_layer))
    weights = _Weights(path.with_name(path.name + ".data"))
    nodes: list = []
    weights.add("embed", vocab, hidden)
    nodes.append(helper.make_node("Gather", ["embed", "input_ids"], ["embedded"], name="embed"))
    x = "x0"
    flat = _const(nodes, "flat_shape", [-1, hidden])
    nodes.append(helper.make_node("Reshape", ["embedded", flat], [x], name="flatten"))
    for layer in range(layers):
        p = f"l{layer}."
        gate = weights.add(p + "router", experts, hidden)
        nodes += [helper.make_node("Gemm", [x, gate], [p + "logits"], name=p + "router", transB=1),
                  helper.make_node("Softmax", [p + "logits"], [p + "probs"], name=p + "softmax", axis=-1),
                  helper.make_node("TopK", [p + "probs", _const(nodes, p + "k", [top_k])], [p + "top", p + "idx"],
                                   name=p + "topk"),
                  helper.make_node("ReduceSum", [p + "top", _const(nodes, p + "axis", [-1])], [p + "sum"],
                                   name=p + "sum", keepdims=1),
                  helper.make_node("Div", [p + "top", p + "sum"], [p + "w"], name=p + "norm"),
                  helper.make_node("Shape", [p + "logits"], [p + "shape"], name=p + "shape"),
                  helper.make_node("ConstantOfShape", [p + "shape"], [p + "zeros"], name=p + "zeros",
                                   value=onnx.numpy_helper.from_array(np.zeros(1, np.float32))),
                  helper.make_node("ScatterElements", [p + "zeros", p + "idx", p + "w"], [p + "dense"],
                                   name=p + "dense", axis=1)]
        acc = x
        for e in range(experts):
            q = f"{p}e{e}."
            g, u, d = (weights.add(q + kind, *shape) for kind, shape in
                       (("gate", (hidden, inter)), ("up", (hidden, inter)), ("down", (inter, hidden))))
            nodes += [helper.make_node("MatMul", [x, g], [q + "g"], name=q + "gate"),
                      helper.make_node("MatMul", [x, u], [q + "u"], name=q + "up"),
                      helper.make_node("Sigmoid", [q + "g"], [q + "sg"], name=q + "sigmoid"),
                      helper.make_node("Mul", [q + "g", q + "sg"], [q + "silu"], name=q + "silu"),
                      helper.make_node("Mul", [q + "silu", q + "u"], [q + "h"], name=q + "glu"),
                      helper.make_node("MatMul", [q + "h", d], [q + "y"], name=q + "down"),
                      helper.make_node("Slice", [p + "dense", _const(nodes, q + "start", [e]),
                                                 _const(nodes, q + "end", [e + 1]), _const(nodes, q + "ax", [1])],
                                       [q + "col"], name=q + "column"),
                      helper.make_node("Mul", [q + "y", q + "col"], [q + "scaled"], name=q + "scale"),
                      helper.make_node("Add", [acc, q + "scaled"], [q + "acc"], name=q + "combine")]
            acc = q + "acc"
        x = acc  # the residual is the first term of the sum
    head = weights.add("lm_head", hidden, vocab)
    nodes += [helper.make_node("MatMul", [x, head], ["flat_logits"], name="lm_head"),
              helper.make_node("Shape", ["input_ids"], ["ids_shape"], name="ids_shape"),
              helper.make_node("Concat", ["ids_shape", _const(nodes, "vocab_dim", [vocab])], ["logits_shape"],
                               name="logits_shape", axis=0),
              helper.make_node("Reshape", ["flat_logits", "logits_shape"], ["logits"], name="unflatten")]
    weights.close()
    graph = helper.make_graph(
        nodes, "synthetic_moe", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])], weights.tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    info = {"family": "synthetic", "vocab_size": vocab, "input_names": ["input_ids"],
            "layers": [{"label": str(i), "num_experts": experts, "top_k": top_k, "router": f"l{i}.router"}
                       for i in range(layers)]}
    helper.set_model_props(model, {"moeport.model_info": json.dumps(info)})
    onnx.save(model, str(path))  # the weights are already in path.data
    onnx.checker.check_model(str(path))
    return {"layers": layers, "hidden": hidden, "inter": inter, "experts": experts, "top_k": top_k, "vocab": vocab,
            "weights_mb": weights.offset / 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, required=True, help="weights to generate (MB); 2100+ tests > 2 GB")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated quantize modes")
    parser.add_argument("--out", type=Path, default=None, help="where the models and results.json go (default: temp)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=512)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="moeport-quant-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    model = root / "model.onnx"
    started = time.perf_counter()
    shape = build(model, args.size_mb, args.hidden, args.inter, args.experts, args.top_k, args.vocab)
    print(f"built {model} in {time.perf_counter() - started:.0f}s: {shape}", file=sys.stderr)
    rows = []
    for mode in args.modes.split(","):
        out = root / f"model.{mode}.onnx"
        child = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), mode], capture_output=True,
                               text=True)
        if child.returncode != 0:
            rows.append({"mode": mode, "error": child.stderr.strip().splitlines()[-1] if child.stderr.strip() else "?"})
        else:
            rows.append({"mode": mode, **json.loads(child.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), file=sys.stderr)
        for path in (out, out.with_name(out.name + ".data")):
            path.unlink(missing_ok=True)  # keep the disk free for the next mode
    print("| mode | weights (MB) | output (MB) | peak RSS (MB) | peak / weights | seconds |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['mode']} | {shape['weights_mb']:.0f} | failed: {row['error']} | | | |")
        else:
            print(f"| {row['mode']} | {shape['weights_mb']:.0f} | {row['output_mb']:.0f} | {row['peak_rss_mb']:.0f} | "
                  f"{row['peak_rss_mb'] / shape['weights_mb']:.2f} | {row['seconds']:.0f} |")
    (root / "results.json").write_text(json.dumps({"model": shape, "modes": rows}, indent=2))
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
