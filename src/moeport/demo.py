"""``moeport demo``: the main job end to end on a bundled sample.

Locate (or create) the sample checkpoint, export it with routing outputs, verify parity against
PyTorch, end with a short onnxruntime-vs-PyTorch bench, and return the three reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moeport.exporter.export import ExportResult, export_checkpoint
from moeport.runtime.bench import BenchReport, bench
from moeport.runtime.verify import DEFAULT_SHAPES, VerifyReport, verify
from moeport.samples.catalog import create_sample


@dataclass
class DemoReport:
    checkpoint: Path
    export: ExportResult
    verify: VerifyReport
    bench: BenchReport | None = None

    @property
    def passed(self) -> bool:
        return self.verify.passed

    def to_dict(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "export": self.export.to_dict(), "verify": self.verify.to_dict(),
                "bench": None if self.bench is None else self.bench.to_dict()}


def run_demo(workdir: str | os.PathLike = "moeport-demo", sample: str = "trained",
             shapes=DEFAULT_SHAPES, bench_shapes: str | None = "1x1,1x64") -> DemoReport:
    """Export and verify ``sample`` under ``workdir`` (reusing a checkpoint already there)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / sample
    if not (checkpoint / "config.json").is_file():
        create_sample(sample, checkpoint)
    model = workdir / f"{sample}.onnx"
    # The demo owns its work directory, so re-running it replaces its own model.
    exported = export_checkpoint(checkpoint, model, with_routing=True, force=True)
    report = verify(model, checkpoint, shapes=shapes)
    # A short timing against PyTorch eager, to show what the export buys; bench_shapes=None skips it.
    timing = None if bench_shapes is None else bench(model, checkpoint=checkpoint, shapes=bench_shapes,
                                                     warmup=2, runs=10)
    return DemoReport(checkpoint, exported, report, timing)
