"""What arithmetic onnxruntime's CPU ``QMoE`` does with an 8-bit expert weight:
``python benchmarks/qmoe_arithmetic.py MODEL.onnx [--bits 8] [--tokens 48] [--out DIR]``.

Why: moeport writes each MoE layer's routed experts as one ``QMoE`` (int8-blocks, int4, and static int8 on CPU
targets) and passes it its float input. Whether the kernel multiplies that input in float by the dequantized
weight, or quantizes it to 8 bits first as ``MatMulNBits`` does at ``accuracy_level`` 4 (what moeport writes for
every other MatMul), decides what static int8's experts are, and what the docs may say of them.

How: ``MODEL`` (a float32 moeport export with logits, e.g. the bundled sample exported by ``moeport demo``) is
quantized twice, its experts one ``QMoE`` per layer and per expert (``fused_experts=False``: ``MatMulNBits`` in the
same blocks). Each file then runs on the same random ids with its ``MatMulNBits`` at ``accuracy_level`` 0 (float
arithmetic over the dequantized weight) and at 4 (8-bit activations per block), and with ``QMoE``'s own
``accuracy_level`` set to 0 and to 4. The table gives the max and mean absolute difference of the logits. If
QMoE quantizes its input, its file is close to the per-expert file where that file's experts do too (level 4) and
as far from it as 8-bit activations move the logits where they compute in float (level 0); if QMoE's own level
changes nothing, the kernel ignores it.

Measured (onnxruntime 1.32.0, the bundled sample, BENCHMARKS.md): at 8 bits QMoE quantizes its input at every
``accuracy_level``; at 4 bits only at level 4 (moeport writes 4).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from moeport.quant import quantize


def _session(path: Path, levels: dict[str, int]) -> ort.InferenceSession:
    """``path`` with the ``accuracy_level`` of every node of each op type in ``levels`` set to its value."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type in levels and attribute.name == "accuracy_level":
                attribute.i = levels[node.op_type]
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def compare(model: Path, bits: int, tokens: int, out: Path) -> list[tuple[str, float, float]]:
    """(case, max abs, mean abs) of the logits of the fused and per-expert files, as described above."""
    mode = "int8-blocks" if bits == 8 else "int4"
    fused, apart = out / f"fused-{mode}.onnx", out / f"apart-{mode}.onnx"
    quantize(model, fused, mode=mode, latency_runs=0, perplexity=False, force=True)
    quantize(model, apart, mode=mode, latency_runs=0, perplexity=False, force=True, fused_experts=False)
    vocab_cap = 250  # ids any sample-sized vocabulary holds
    feeds = {"input_ids": np.random.default_rng(0).integers(3, vocab_cap, size=(2, tokens)).astype(np.int64)}

    def logits(path: Path, nbits: int, qmoe: int) -> np.ndarray:
        return _session(path, {"MatMulNBits": nbits, "QMoE": qmoe}).run(["logits"], feeds)[0]

    runs = {(name, nbits, qmoe): logits(path, nbits, qmoe) for name, path in (("fused", fused), ("apart", apart))
            for nbits in (0, 4) for qmoe in ((0, 4) if name == "fused" else (4,))}
    cases = [
        ("QMoE accuracy_level 0 against 4 (the rest at 4)", ("fused", 4, 0), ("fused", 4, 4)),
        ("QMoE against per-expert MatMulNBits, everything else at level 4", ("fused", 4, 4), ("apart", 4, 4)),
        ("QMoE against per-expert MatMulNBits, everything else at level 0", ("fused", 0, 4), ("apart", 0, 4)),
        ("the same, QMoE's own level 0 too (everything in float, if it obeys)", ("fused", 0, 0), ("apart", 0, 4)),
        ("per-expert file, level 0 against 4 (what 8-bit activations change)", ("apart", 0, 4), ("apart", 4, 4)),
    ]
    return [(label, float(np.abs(runs[a] - runs[b]).max()), float(np.abs(runs[a] - runs[b]).mean()))
            for label, a, b in cases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--bits", type=int, choices=(4, 8), default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None, help="where the quantized files go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        rows = compare(args.model, args.bits, args.tokens, out)
    print(f"onnxruntime {ort.__version__}, {args.model}, {args.bits}-bit experts, logits of 2 x {args.tokens} ids")
    print(f"  {'case':<72} {'max abs':>10} {'mean abs':>10}")
    for label, worst, mean in rows:
        print(f"  {label:<72} {worst:10.4g} {mean:10.4g}")


if __name__ == "__main__":
    main()
