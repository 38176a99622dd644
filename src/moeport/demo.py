"""``moeport demo``: the main job end to end on a bundled sample.

Locate (or create) the sample checkpoint, export it with routing outputs, verify parity against
PyTorch, run a short onnxruntime-vs-PyTorch bench, quantize the export in the two modes a CPU deployment
uses (int8-blocks, the cpu target's default, and int4) with their quality reports, and return all the reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from moeport.exporter.export import ExportResult, export_checkpoint
from moeport.exporter.reference import CheckpointReference
from moeport.quant.core import QuantizeResult, quantize
from moeport.runtime.bench import BenchReport, bench
from moeport.runtime.verify import DEFAULT_SHAPES, VerifyReport, verify
from moeport.samples.catalog import create_sample


@dataclass
class DemoReport:
    checkpoint: Path
    export: ExportResult
    verify: VerifyReport
    bench: BenchReport | None = None
    quantized: list[QuantizeResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """The export's parity with PyTorch; the quantization targets are reported, not enforced."""
        return self.verify.passed

    def to_dict(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "export": self.export.to_dict(), "verify": self.verify.to_dict(),
                "bench": None if self.bench is None else self.bench.to_dict(),
                "quantized": [q.to_dict() for q in self.quantized]}


# The modes that are smaller and faster on the machine the demo runs on (a CPU); the calibrated QDQ int8 and fp16
# modes are for NNAPI/QNN and GPUs/Core ML, where their latency here would say nothing.
DEMO_QUANT_MODES = ("int8-blocks", "int4")
# Timed runs of each file for the quantize report's latency (10 turns of 5, about 2 s a mode). With 10 (2 turns),
# int8-blocks' 1x128 latency came out at 0.81-1.62x fp32's over seven demos of this 7 MB model; with 50 at
# 0.99-1.11x over four (int4 1.04-1.16x; BENCHMARKS.md).
DEMO_LATENCY_RUNS = 50


def run_demo(workdir: str | os.PathLike = "moeport-demo", sample: str = "trained",
             shapes=DEFAULT_SHAPES, bench_shapes: str | None = "1x1,1x64",
             quant_modes: tuple[str, ...] = DEMO_QUANT_MODES) -> DemoReport:
    """Export, verify, bench and quantize ``sample`` under ``workdir`` (reusing a checkpoint already there).

    ``bench_shapes=None`` skips the bench, ``quant_modes=()`` the quantization.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / sample
    if not (checkpoint / "config.json").is_file():
        create_sample(sample, checkpoint)
    model = workdir / f"{sample}.onnx"
    # The demo owns its work directory, so re-running it replaces its own model.
    exported = export_checkpoint(checkpoint, model, with_routing=True, force=True)
    reference = CheckpointReference.load(checkpoint)
    report = verify(model, reference, shapes=shapes)
    # A short timing against PyTorch eager, to show what the export buys; bench_shapes=None skips it.
    timing = None if bench_shapes is None else bench(model, reference=reference, shapes=bench_shapes,
                                                     warmup=2, runs=10)
    quantized = []
    for mode in quant_modes:
        # Perplexity and routing on text use the held-out text shipped with the trained sample (byte-level, like
        # every sample); parity and routing agreement are measured against the PyTorch checkpoint.
        quantized.append(quantize(model, workdir / f"{sample}.{mode}.onnx", mode=mode, reference=reference,
                                  tokenizer=checkpoint, latency_runs=DEMO_LATENCY_RUNS, force=True))
    return DemoReport(checkpoint, exported, report, timing, quantized)
