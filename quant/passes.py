"""Graph surgery around onnxruntime's quantizers: Gemm as MatMul, debug metadata, topological order, stamping."""

from __future__ import annotations

import json

import numpy as np
import onnx

from moeport.contract import METADATA_PREFIX, QUANTIZATION_KEY

METADATA_KEY = METADATA_PREFIX + QUANTIZATION_KEY


def stamp(proto: onnx.ModelProto, source: onnx.ModelProto, info: dict) -> None:
    """Carry the source's moeport metadata over (verify needs it) and record how it was quantized."""
    have = {p.key for p in proto.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in have:
            proto.metadata_props.add(key=prop.key, value=prop.value)
    for prop in list(proto.metadata_props):
        if prop.key == METADATA_KEY:
            proto.metadata_props.remove(prop)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(info, sort_keys=True))


def gemms_as_matmuls(proto: onnx.ModelProto, names: set[str]) -> int:
    """Rewrite the named ``Gemm(A, B[, C])`` with a constant B as ``MatMul(A, B')`` [+ ``Add(C)``], in place.

    Why: MatMulNBitsQuantizer and quantize_dynamic skip Gemm, and torch exports a 2-D ``nn.Linear`` (shared
    experts, routers) as Gemm. Only the plain form (alpha = beta = 1, transA = 0) is rewritten; B is
    stored transposed when transB = 1, so the MatMul weight is ``[K, N]``. Returns how many were rewritten.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    rewritten = 0
    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.name not in names or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            array = np.ascontiguousarray(onnx.numpy_helper.to_array(inits[weight]).T)
            weight = f"{weight}_kn"
            proto.graph.initializer.append(onnx.numpy_helper.from_array(array, weight))
        product = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{node.output[0]}_matmul"
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if product != node.output[0]:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                               name=f"{node.name}_bias"))
        rewritten += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {i for n in proto.graph.node for i in n.input}
    for init in [i for i in proto.graph.initializer if i.name not in used]:
        proto.graph.initializer.remove(init)  # the [N, K] originals of transposed weights
    return rewritten


def topological(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir
    from onnx_ir.passes.common import TopologicalSortPass

    model = ir.from_proto(proto)
    TopologicalSortPass()(model)
    return ir.to_proto(model)


def strip_debug_metadata(proto: onnx.ModelProto) -> int:
    """Drop torch.onnx's per-node provenance (stack traces, FX node text); returns the bytes saved.

    It is a third of a small exported file and nothing reads it at run time.
    """
    before = proto.ByteSize()
    for node in proto.graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props
                if not (p.key.startswith("pkg.torch.") or p.key == "namespace")]
        if len(keep) != len(node.metadata_props):
            node.ClearField("metadata_props")
            for key, value in keep:
                node.metadata_props.add(key=key, value=value)
    return before - proto.ByteSize()
