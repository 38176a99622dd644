"""Calibration ranges for static int8: expert coverage, borrowed ranges for starved experts, 16-bit overrides.

The calibration samples run once through the fp32 model (``coverage``): TopK selections per expert give the
coverage report, and the observed range of every expert's input ``[tokens_e, K]`` lets ``borrowed_ranges``
give an expert that saw too few tokens its layer's range. ``wide_down_inputs`` adds the 16-bit type for the
expert down-projection inputs. Both are onnxruntime ``TensorQuantOverrides`` (tensor name -> list of dicts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from moeport.quant import calibration as calib
from moeport.quant import quality as qual
from moeport.runtime.moe_graph import ExpertGroup, RouterPlan


def expert_inputs(groups: dict[ExpertGroup, list[onnx.NodeProto]],
                  weight_nodes: list[onnx.NodeProto]) -> dict[ExpertGroup, dict[int, str]]:
    """Per expert group (``moeport.runtime.moe_graph.find_expert_matmuls``): {expert: activation tensor
    ``[tokens_e, K]`` its MatMul reads}, for the targeted MatMuls only."""
    targeted = {n.name for n in weight_nodes}
    return {key: {e: node.input[0] for e, node in enumerate(nodes) if node.name in targeted}
            for key, nodes in groups.items()}


def wide_down_inputs(overrides: dict, groups, quant_type: str) -> dict[str, list[dict]]:
    """``overrides`` plus ``quant_type`` for every expert down-projection input (the MatMuls reached after
    crossing one of the expert's own MatMuls: ``down(silu(gate) * up)``)."""
    from onnxruntime.quantization import QuantType

    widened = dict(overrides)
    for group, experts in groups.items():
        if not group.is_down_projection:
            continue
        for name in experts.values():
            widened[name] = [{**widened.get(name, [{}])[0], "quant_type": QuantType[quant_type]}]
    return widened


def borrowed_ranges(ranges: dict[str, list], groups) -> dict[str, list[dict]]:
    """TensorQuantOverrides giving starved experts' inputs their layer's range.

    Why: onnxruntime calibrates a tensor that never held a value to scale 1.0, zero point 0 -- an
    expert no calibration token chose would then clip every negative input to 0 at run time. An expert
    with under 10% of an even share gets the union of its layer's observed ranges instead.
    """
    overrides = {}
    for experts in groups.values():
        rows = {e: ranges[name][2] for e, name in experts.items()}
        seen = [ranges[name] for name in experts.values() if ranges[name][2]]
        if not seen:
            continue
        low, high = min(r[0] for r in seen), max(r[1] for r in seen)
        limit = calib.starvation_threshold(sum(rows.values()), len(experts))
        for e, name in experts.items():
            if rows[e] < limit:
                overrides[name] = [{"rmin": np.float32(low), "rmax": np.float32(high)}]
    return overrides


def coverage(model_path: Path, plan: RouterPlan, data: calib.CalibrationSet, labels: list[str] | None,
              expert_inputs: dict[tuple, dict[int, str]]):
    """Run the fp32 model on the calibration samples: TopK selections per expert and router, and
    ``{expert input tensor: [min, max, rows]}`` for ``borrowed_ranges``."""
    tensors = tuple(name for experts in expert_inputs.values() for name in experts.values())
    if not plan.routers and not tensors:
        return [], {}
    session = qual.RouterSession(model_path, [r.indices_output for r in plan.routers], tensors)
    ranges = {name: [np.inf, -np.inf, 0] for name in tensors}
    num_experts = [r.num_experts or 0 for r in plan.routers]
    outputs = []
    for sample in data.samples:  # one pass: TopK ids first, then the expert inputs
        runs = session.session.run([*session.index_names, *tensors], sample)
        indices, values = runs[:len(session.index_names)], runs[len(session.index_names):]
        outputs.append(indices)
        for r, ids in enumerate(indices):  # infer E from the ids when shape inference did not
            if ids.size:
                num_experts[r] = max(num_experts[r], int(ids.max()) + 1)
        for name, value in zip(tensors, values):
            if value.size:
                ranges[name] = [min(ranges[name][0], float(value.min())), max(ranges[name][1], float(value.max())),
                                ranges[name][2] + value.shape[0]]
    if not plan.routers:
        return [], ranges
    if labels is None or len(labels) != len(plan.routers):
        labels = [f"router{i}" for i in range(len(plan.routers))]
    return calib.expert_coverage(outputs, labels, num_experts), ranges
