"""Greedy generation with Optimum's ORTModelForCausalLM on moeport model folders.

Runs inside the Optimum venv (optimum-onnx pins transformers 4.57, which moeport's transformers 5 cannot share),
so it imports nothing of moeport. Usage: python optimum_runner.py CASES.json, where CASES.json lists
{"folder", "prompts": [text, ...], "max_new_tokens"}; writes CASES.json.result with the prompt ids and the
new tokens of each row, and the versions that ran.
"""

import json
import sys
from importlib.metadata import version

import torch
import transformers
from optimum.onnxruntime import ORTModelForCausalLM


def main(cases_path: str) -> None:
    with open(cases_path) as handle:
        cases = json.load(handle)
    results = []
    for case in cases:
        tokenizer = transformers.AutoTokenizer.from_pretrained(case["folder"])
        tokenizer.padding_side = "left"
        model = ORTModelForCausalLM.from_pretrained(case["folder"], provider="CPUExecutionProvider")
        inputs = tokenizer(case["prompts"], return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=case["max_new_tokens"], do_sample=False)
        width = inputs["input_ids"].shape[1]
        results.append({"folder": case["folder"], "prompt_ids": inputs["input_ids"].tolist(),
                        "tokens": output[:, width:].tolist(), "model_type": model.config.model_type,
                        "versions": {"transformers": transformers.__version__,
                                     "optimum-onnx": version("optimum-onnx"),
                                     "onnxruntime": version("onnxruntime")}})
    with open(cases_path + ".result", "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
