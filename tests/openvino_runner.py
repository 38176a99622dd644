"""Run ONNX models on onnxruntime-openvino's OpenVINO provider and save their outputs.

Runs inside the onnxruntime-openvino venv (that wheel replaces the `onnxruntime` module), so it imports
nothing of moeport. Usage: python openvino_runner.py CASES.json, where CASES.json lists
{"model", "inputs" (.npz), "outputs" (.npz to write)}; writes CASES.json.result with per-case provider
node counts from an onnxruntime profile.
"""

import json
import os
import sys
from collections import Counter

import numpy as np
import onnxruntime as ort


def main(cases_path: str) -> None:
    with open(cases_path) as handle:
        cases = json.load(handle)
    results = []
    for case in cases:
        options = ort.SessionOptions()
        options.enable_profiling = True
        # The profile goes beside the case's outputs (the test's own temporary folder) and is removed once read:
        # a mkdtemp() folder per case was left behind in /tmp by every run.
        options.profile_file_prefix = os.path.join(os.path.dirname(os.path.abspath(case["outputs"])), "ov")
        session = ort.InferenceSession(case["model"], options,
                                       providers=[("OpenVINOExecutionProvider", {"device_type": "CPU"}),
                                                  "CPUExecutionProvider"])
        with np.load(case["inputs"]) as data:
            feeds = {name: data[name] for name in data.files}
        outputs = session.run(None, feeds)
        np.savez(case["outputs"], **{o.name: v for o, v in zip(session.get_outputs(), outputs)})
        profile = session.end_profiling()
        with open(profile) as handle:
            events = json.load(handle)
        os.remove(profile)
        placed = Counter(e["args"].get("provider", "?") for e in events
                         if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"))
        results.append({"model": case["model"], "providers": session.get_providers(), "kernels": dict(placed),
                        "ort_version": ort.__version__})
    with open(cases_path + ".result", "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
