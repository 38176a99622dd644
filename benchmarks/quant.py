"""Issue 4 targets in one command: ``python benchmarks/quant.py [--out DIR]``.

On the shipped trained sample (CPU provider): export with routing outputs, quantize to every mode, and
measure for each the file size vs fp32, routing agreement with PyTorch fp32 on held-out text (``moeport
verify --inputs``: every 128-byte window of ``heldout.txt``, 65,536 tokens, worst MoE layer), the
perplexity change on held-out text (from the quantize report), and prefill latency at 1x256 against the
fp32 model (the backends taking turns, ``moeport.runtime.bench.alternate``, medians). Prints a markdown
table and writes ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

TARGETS = {  # size ratio <=, routing agreement >=, perplexity change <=
    "int8": (0.30, 0.98, 0.02),
    "int8-dynamic": (0.30, 0.98, 0.02),
    "fp16": (0.52, 0.995, 0.001),
    "int4": (0.20, 0.95, 0.05),
}
INT8_LATENCY_TARGET = 0.6  # int8 prefill latency at 1x256 <= 0.6x fp32


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where models and results.json go (default: temp)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)

    from moeport.exporter.export import export_checkpoint
    from moeport.quant import quantize
    from moeport.runtime.timing import alternate
    from moeport.runtime.session import create_session
    from moeport.exporter.reference import verify_checkpoint as verify
    from moeport.samples.catalog import TRAINED_DIR

    root = args.out or Path(tempfile.mkdtemp(prefix="moeport-quant-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = Path(TRAINED_DIR)
    model = export_checkpoint(checkpoint, root / "trained.onnx", with_routing=True, force=True).output
    # Every 128-byte window of heldout.txt: 128 is the sample's training context (training.json "seq");
    # beyond it positions are out of distribution and every mode, fp16 included, agrees less.
    text = (checkpoint / "heldout.txt").read_bytes()
    windows = len(text) // 128
    heldout = {"input_ids": np.frombuffer(text[:windows * 128], np.uint8).reshape(windows, 128).astype(np.int64)}
    ids = np.random.default_rng(0).integers(0, 256, (1, 256), dtype=np.int64)
    fp32 = create_session(model, "cpu", threads=args.threads)

    rows = []
    for mode, (max_size, min_routing, max_ppl) in TARGETS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantize's own warnings (also in result.warnings): a readable table
            result = quantize(model, root / f"trained.{mode}.onnx", mode=mode, latency_runs=0, force=True)
        report = verify(result.output, checkpoint, inputs=heldout, atol=100.0, min_routing_agreement=0.0)
        session = create_session(result.output, "cpu", threads=args.threads)
        ms = alternate({"fp32": lambda: fp32.run(None, {"input_ids": ids}),
                        mode: lambda: session.run(None, {"input_ids": ids})}, runs=args.runs)
        latency = {name: float(np.median(t)) * 1e3 for name, t in ms.items()}
        q = result.quality
        per_layer = {r.label: r.agreement for r in report.overall.routing}
        rows.append(dict(mode=mode, size_ratio=q.size_ratio, routing=report.routing_agreement,
                         routing_per_layer=per_layer, perplexity_before=q.perplexity_before,
                         perplexity_after=q.perplexity_after, perplexity_change=q.perplexity_change,
                         fp32_ms=latency["fp32"], ms=latency[mode], latency_ratio=latency[mode] / latency["fp32"],
                         met={"size": q.size_ratio <= max_size, "routing": report.routing_agreement >= min_routing,
                              "perplexity": q.perplexity_change <= max_ppl}))
    int8 = next(r for r in rows if r["mode"] == "int8")
    int8["met"]["latency"] = int8["latency_ratio"] <= INT8_LATENCY_TARGET

    def mark(ok):
        return "yes" if ok else "**no**"

    print("| mode | size vs fp32 | routing agreement (worst layer) | perplexity change | latency 1x256 vs fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        size_t, routing_t, ppl_t = TARGETS[r["mode"]]
        latency = f"{r['latency_ratio']:.2f} ({r['ms']:.2f} vs {r['fp32_ms']:.2f} ms)"
        if r["mode"] == "int8":
            latency += f", ≤ {INT8_LATENCY_TARGET} {mark(r['met']['latency'])}"
        print(f"| {r['mode']} | {r['size_ratio']:.3f} (≤ {size_t} {mark(r['met']['size'])}) | {r['routing']:.4f} "
              f"(≥ {routing_t} {mark(r['met']['routing'])}) | {r['perplexity_change']:+.2%} (≤ +{ppl_t:.1%} "
              f"{mark(r['met']['perplexity'])}) | {latency} |")
    print("\nrouting agreement per layer: " + "; ".join(
        f"{r['mode']} " + " / ".join(f"{v:.3f}" for v in r["routing_per_layer"].values()) for r in rows))
    summary = {"threads": args.threads, "runs": args.runs, "seconds": time.perf_counter() - started, "rows": rows}
    (root / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(f"\n{len(rows)} modes in {summary['seconds']:.0f}s; details in {root / 'results.json'}")
    return 0 if all(all(r["met"].values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
