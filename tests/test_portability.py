"""Portability of the default fp32 export: the ONNX reference evaluator, and the OpenVINO provider.

The OpenVINO check is opt-in (`python -m pytest -m openvino`): the `onnxruntime-openvino` wheel replaces
the `onnxruntime` module, so it runs in its own virtual environment, taken from MOEPORT_OPENVINO_PYTHON or
built once at `.venv-openvino` (pip install onnxruntime-openvino numpy).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from moeport.exporter import families
from moeport.runtime.compare import Comparator
from moeport.samples.catalog import list_samples
from venvs import venv_python

SAMPLES = [s.name for s in list_samples()]
SHAPES = [(1, 1), (3, 7), (2, 64)]
ROOT = Path(__file__).resolve().parent.parent


def test_reference_evaluator_runs_the_tiny_sample(exported, sample_checkpoint):
    """onnx.reference (pure Python, op by op from the spec) gives PyTorch's answers on the export."""
    from onnx.reference import ReferenceEvaluator

    result = exported("switch", with_routing=True)
    loaded = families.load_checkpoint(sample_checkpoint("switch"))
    evaluator = ReferenceEvaluator(str(result.output))
    for batch, seq in [(1, 1), (2, 5)]:
        inputs = families.tie_free_inputs(loaded, batch, seq, seed=3)
        names = [o.name for o in evaluator.proto_.graph.output]
        actual = dict(zip(names, evaluator.run(None, inputs)))
        comparison = Comparator(atol=1e-4).compare(families.reference_outputs(loaded, inputs), actual,
                                                   loaded.info.layers)
        assert comparison.passed, comparison.to_dict()
        assert comparison.routing_agreement == 1.0


def _openvino_python() -> str:
    return venv_python("MOEPORT_OPENVINO_PYTHON", ROOT / ".venv-openvino", ["onnxruntime-openvino", "numpy"])


@pytest.mark.openvino
def test_every_sample_on_the_openvino_provider(exported, sample_checkpoint, tmp_path):
    python = _openvino_python()
    cases, expected = [], []
    for name in SAMPLES:
        result = exported(name, with_routing=True)
        loaded = families.load_checkpoint(sample_checkpoint(name))
        for i, (batch, seq) in enumerate(SHAPES):
            inputs = families.tie_free_inputs(loaded, batch, seq, seed=10 + i)
            stem = tmp_path / f"{name}-{batch}x{seq}"
            np.savez(f"{stem}.in.npz", **inputs)
            cases.append({"model": str(result.output), "inputs": f"{stem}.in.npz", "outputs": f"{stem}.out.npz"})
            expected.append((name, (batch, seq), loaded, families.reference_outputs(loaded, inputs)))
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    subprocess.run([python, str(ROOT / "tests" / "openvino_runner.py"), str(cases_file)], check=True)
    placements = json.loads(Path(f"{cases_file}.result").read_text())
    for case, (name, shape, loaded, reference), placement in zip(cases, expected, placements):
        assert placement["providers"][0] == "OpenVINOExecutionProvider"
        assert placement["kernels"].get("OpenVINOExecutionProvider", 0) > 0, (name, placement)
        with np.load(case["outputs"]) as data:
            actual = {k: data[k] for k in data.files}
        comparison = Comparator(atol=1e-4).compare(reference, actual, loaded.info.layers)
        assert comparison.passed, (name, shape, comparison.max_abs_err, comparison.routing_agreement)
        assert comparison.routing_agreement == 1.0, (name, shape)
