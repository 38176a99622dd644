"""Calibration ranges for static int8: observed ranges, expert coverage, borrowed ranges, 16-bit overrides.

The calibration samples run once through the fp32 model (``coverage``), one sample at a time, and only running
minima and maxima are kept: the range of every activation the quantized nodes read or write
(``activation_tensors``; ``tensors_data`` hands them to onnxruntime as a calibration cache), TopK selections per
expert for the coverage report, and the rows each expert's input ``[tokens_e, K]`` held, which let
``borrowed_ranges`` give an expert that saw too few tokens its layer's range. ``wide_down_inputs`` adds the 16-bit
type for the expert down-projection inputs. Both are onnxruntime ``TensorQuantOverrides`` (tensor name -> list
of dicts).

Why not onnxruntime's calibrator: it keeps every sample's statistics, writes an augmented copy of the model and
loads the model once more for it; on a 4-layer granite-shaped model its peak was 9.9x the model's size, and past
2 GB its in-memory opset conversion fails. Here the memory is one onnxruntime session plus one sample's tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

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


def activation_tensors(targets: list[onnx.NodeProto], initializers: set[str]) -> tuple[str, ...]:
    """The float activations the nodes ``targets`` read or write (graph order, once each): what static
    quantization puts Q/DQ on. Initializers are weights (quantized from their own values); a Gather's indices
    are integers."""
    names = []
    for node in targets:
        read = node.input[:1] if node.op_type == "Gather" else node.input
        names += [name for name in (*read, *node.output) if name and name not in initializers]
    return tuple(dict.fromkeys(names))


def tensors_data(observed: dict[str, list], names: tuple[str, ...]):
    """onnxruntime ``TensorsData`` (MinMax) of the ``names`` from ``coverage``'s running ranges. A tensor that
    never held a value gets [0, 0] (scale 1, zero point 0: what onnxruntime's own calibrator gives it)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    data = {}
    for name in names:
        low, high, rows = observed[name]
        low, high = (low, high) if rows else (0.0, 0.0)
        data[name] = TensorData(lowest=np.array(low, dtype=np.float32), highest=np.array(high, dtype=np.float32))
    return TensorsData(CalibrationMethod.MinMax, data)


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
              expert_inputs: dict[tuple, dict[int, str]], observe: tuple[str, ...] = ()):
    """Run the fp32 model on the calibration samples: TopK selections per expert and router, and
    ``{tensor: [min, max, rows]}`` over the expert inputs (for ``borrowed_ranges``) and the ``observe`` tensors."""
    experts = (name for experts in expert_inputs.values() for name in experts.values())
    tensors = tuple(dict.fromkeys((*observe, *experts)))
    if not plan.routers and not tensors:
        return [], {}
    session = qual.RouterSession(model_path, [r.indices_output for r in plan.routers], tensors)
    ranges = {name: [np.inf, -np.inf, 0] for name in tensors}
    num_experts = [r.num_experts or 0 for r in plan.routers]
    outputs = []
    for sample in tqdm(data.samples, desc="calibrating", unit="sample", leave=False):  # one pass, one sample at a time
        runs = session.session.run([*session.index_names, *tensors], sample)
        indices, values = runs[:len(session.index_names)], runs[len(session.index_names):]
        outputs.append(indices)
        for r, ids in enumerate(indices):  # infer E from the ids when shape inference did not
            if ids.size:
                num_experts[r] = max(num_experts[r], int(ids.max()) + 1)
        for name, value in zip(tensors, values):
            if value.size:  # rows: the first axis (an expert's tokens); a range only needs some value
                ranges[name] = [min(ranges[name][0], float(value.min())), max(ranges[name][1], float(value.max())),
                                ranges[name][2] + value.shape[0]]
        del runs, values  # one sample's tensors at a time
    if not plan.routers:
        return [], ranges
    if labels is None or len(labels) != len(plan.routers):
        labels = [f"router{i}" for i in range(len(plan.routers))]
    return calib.expert_coverage(outputs, labels, num_experts), ranges
