"""``moeport package``: an ONNX model as an on-device bundle (ORT format + reduced-build config).

Steps, each done by onnxruntime's own tools:
1. fix dynamic input shapes (``onnxruntime.tools.onnx_model_utils.make_input_shape_fixed``), then re-run
   ONNX shape inference so every intermediate value and output has a static shape: NNAPI and CoreML only take
   nodes with static shapes. This is done on the graph without its weights, which are read in only to write
   the bundle's ``.onnx`` (one file) and otherwise stay on disk;
2. estimate NNAPI/CoreML coverage (nodes, partitions, share of MatMul FLOPs) with the mobile usability
   checker (see ``placement.mobile_coverage``);
3. convert to ORT format with ``convert_onnx_models_to_ort`` for the ARM target platform (so no
   x86-only layout transforms are baked in), which also writes ``required_operators.config`` for a
   reduced onnxruntime build;
4. check that the ``.ort`` file loads and gives the outputs of the ``.onnx`` on a seeded input;
5. write ``bundle.json``: metadata, I/O specs, files with sizes and hashes, coverage, the check.

An exported model's input is ``input_ids [batch, sequence] int64``; ``--shape input_ids=1x64`` makes it
``[1, 64]``. The bundle directory is built next to the destination and renamed into place at the end,
so a failure never leaves a half-written bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeport._fs import SHAPE_VALUE_BYTES, check_output_directory, load_model_proto, staged_directory, writing
from moeport._scoped import logger_level
from moeport.contract import metadata_of_map, vocab_size
from moeport.errors import MoeportError, UsageError
from moeport.registry import Registry
from moeport.runtime._io import TensorSpec, session_specs, shapes_text
from moeport.runtime.inspect import graph_specs, value_spec
from moeport.runtime.layouts import model_file
from moeport.runtime.moe_graph import weight_bytes
from moeport.runtime.placement import EpCoverage, mobile_coverage
from moeport.runtime.run import example_feeds
from moeport.runtime.session import create_session, provider_names, return_freed_heap

BUNDLE_FORMAT = "moeport-bundle/1"
OPERATOR_CONFIG = "required_operators.config"
MAX_BUNDLE_BYTES = 2**31 - 1  # a flatbuffer's and a protobuf's limit


@dataclass(frozen=True)
class Target:
    name: str
    ort_platform: str  # convert_onnx_models_to_ort --target_platform
    providers: tuple[str, ...]  # providers an app on this target would register, best first
    description: str


TARGETS: Registry[Target] = Registry("target")


def register_target(target: Target) -> Target:
    """Add a device ``target``; providers that are not registered ones are a programming error (ValueError)."""
    unknown = [name for name in target.providers if name not in provider_names()]
    if unknown or not target.providers:
        raise ValueError(f"target {target.name!r}: providers must be registered execution providers, got "
                         f"{list(target.providers)}")
    return TARGETS.add(target.name, target)


for _target in (
    Target("android", "arm", ("nnapi", "xnnpack", "cpu"), "Android phones (arm64-v8a)"),
    Target("ios", "arm", ("coreml", "xnnpack", "cpu"), "iPhones and iPads (arm64)"),
    Target("arm64-linux", "arm", ("xnnpack", "cpu"), "64-bit ARM Linux boards"),
):
    register_target(_target)


@dataclass
class PackageResult:
    output: Path
    target: Target
    ort_file: Path
    onnx_file: Path
    operator_config: Path
    bundle_file: Path
    fixed_shapes: dict[str, list[int]]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    coverage: list[EpCoverage]
    check: dict  # max abs difference .ort vs .onnx per output, on a seeded input
    operators: list[str]  # lines of the operator config (domain;opset;op,op...)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json.loads(self.bundle_file.read_text()) | {"output": str(self.output)}

    def render(self) -> str:
        lines = [f"warning: {w}" for w in self.warnings]
        shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in self.fixed_shapes.items()) or "none fixed"
        lines.append(f"packaged for {self.target.name} ({self.target.description}) into {self.output}; shapes: {shapes}")
        for path in (self.ort_file, self.onnx_file, self.operator_config, self.bundle_file):
            lines.append(f"  {path.name:<32} {path.stat().st_size / 1e6:8.3f} MB")
        lines.append("estimated mobile provider coverage (onnxruntime usability checker):")
        lines += [f"  {c.render()}" for c in self.coverage]
        lines.append(f".ort vs .onnx on {shapes_text(self.check['inputs'])}: max abs difference "
                     f"{self.check['max_abs_diff']:.3g}")
        return "\n".join(lines)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fix_shapes(proto, shapes: dict[str, list[int]]):
    """Fix the named inputs' shapes in ``proto`` (in place), then return it with inferred value shapes, its
    outputs' shapes fixed where the inputs fix them. ``proto`` may come without its large weights (external data
    not read in): only shapes, and small values such as Reshape's target shapes, are looked at."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed

    names = [v.name for v in proto.graph.input]
    for name, dims in shapes.items():
        if name not in names:
            raise UsageError(f"--shape names input {name!r}, which the model does not have; inputs: {', '.join(names)}")
        current = value_spec(next(v for v in proto.graph.input if v.name == name))
        if len(current.shape) != len(dims):
            raise MoeportError(f"--shape {name}={'x'.join(map(str, dims))} has {len(dims)} dims; input {name!r} is "
                               f"{current.shape_text()} (rank {len(current.shape)})")
        try:
            make_input_shape_fixed(proto.graph, name, dims)
        except ValueError as exc:  # rank mismatch or a fixed dim that differs: the user's shape is wrong
            raise MoeportError(f"cannot fix input {name!r} to {'x'.join(map(str, dims))}: {exc}") from exc
    # Shape inference again so every intermediate value is static too: the usability checker (and NNAPI/CoreML)
    # look at each node's input shapes, not just the graph's. It also gives the graph's outputs the shapes the
    # fixed inputs make (what onnxruntime's fix_output_shapes does, whose model check would look for the external
    # data beside the working directory).
    del proto.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MoeportError(f"the model does not accept the fixed shapes {shapes}: {first}") from exc


def _save_self_contained(proto, weights_dir: Path, path: Path) -> None:
    """Write ``proto`` to ``path`` as one file, its initializers stored in external data (under ``weights_dir``)
    read in; ``proto`` itself is left without them.

    One file, because the bundle's ``.onnx`` stands beside the ``.ort`` on its own. The weights are in memory
    only while this writes (twice: the model and its serialized bytes), not through the whole packaging.
    """
    import onnx

    if not any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in proto.graph.initializer):
        onnx.save(proto, str(path))
        return
    # A copy to read them into: clearing them from ``proto`` afterwards would not give their memory back (a
    # message's memory is released with the message).
    whole = onnx.ModelProto()
    whole.CopyFrom(proto)
    onnx.load_external_data_for_model(whole, str(weights_dir))
    onnx.save(whole, str(path))
    del whole
    return_freed_heap()


def _convert_to_ort(stage: Path, output_dir: Path, platform: str) -> str:
    """Run onnxruntime's converter on the staged model directory; return what it printed."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    printed = io.StringIO()
    # The converter prints progress and its config writer logs at INFO through a DEBUG-level logger of its
    # own; keep our stdout/stderr to our report, and put the logger back as it was afterwards.
    with logger_level("ort_format_model.utils", logging.WARNING), contextlib.redirect_stdout(printed):
        convert_onnx_models_to_ort(stage, output_dir=output_dir, optimization_styles=[OptimizationStyle.Fixed],
                                   target_platform=platform)
    return printed.getvalue()


def _compare_ort(onnx_file: Path, ort_file: Path, metadata: dict[str, str]) -> dict:
    """Max abs difference of each output between the .onnx and the .ort, on one seeded input."""
    # One session at a time: each holds the model's weights (a quantized edge model's 0.8 GB, say).
    reference = create_session(onnx_file, "cpu")
    inputs, outputs = session_specs(reference)
    names = [spec.name for spec in outputs]
    feeds = example_feeds(inputs, vocab_size(metadata, onnx_file), outputs=outputs,
                          kv_cache=metadata_of_map(metadata).get("kv_cache"))
    expected = reference.run(names, feeds)
    del reference
    actual = create_session(ort_file, "cpu").run(names, feeds)
    diffs = {spec.name: float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)), initial=0.0))
             for spec, a, e in zip(outputs, actual, expected)}
    return {"inputs": {k: list(v.shape) for k, v in feeds.items()}, "max_abs_diff": max(diffs.values(), default=0.0),
            "per_output": diffs}


def _prepare_destination(output: Path, force: bool) -> None:
    # --force replaces a previous bundle, never an arbitrary directory.
    check_output_directory(output, force, lambda path: (path / "bundle.json").is_file(), "holds no bundle.json")


def package_model(
    model: str | os.PathLike,
    target: str,
    output: str | os.PathLike,
    *,
    shapes: dict[str, list[int]] | None = None,
    force: bool = False,
) -> PackageResult:
    """Package ``model`` for ``target`` (android, ios, arm64-linux) into the directory ``output``."""
    import onnx
    import onnxruntime as ort

    spec = TARGETS.get(target)
    model, output = model_file(model), Path(output)  # a model folder: its model file
    shapes = dict(shapes or {})
    _prepare_destination(output, force)
    # The graph without its large weights (load_model_proto also refuses external data outside the model's
    # directory): shape inference copies the model it is given twice over, and needs only small values.
    proto = load_model_proto(model, inline_up_to=SHAPE_VALUE_BYTES)
    weights = weight_bytes(proto)
    if weights > MAX_BUNDLE_BYTES:
        # Said before the weights are read: an ORT-format file (a flatbuffer) and the ONNX protobuf copied beside
        # it both stop at 2 GB, and the conversion failed only after loading them all.
        raise MoeportError(f"{model} has {weights / 1e9:.2f} GB of weights, but an ORT-format bundle holds at most "
                           f"{MAX_BUNDLE_BYTES / 1e9:.2f} GB; quantize it first (moeport quantize --mode int4)")
    try:
        onnx.checker.check_model(str(model))  # given the path, the check finds the external data beside the model
    except onnx.checker.ValidationError as exc:
        # The checker's message runs over several lines (the node it names on the next); one line is what we print.
        raise MoeportError(f"{model} is not a valid ONNX model: {' '.join(str(exc).split())}") from exc
    proto = fix_shapes(proto, shapes)
    inputs, outputs = graph_specs(proto.graph)
    notes = []
    dynamic = [s for s in inputs if s.dynamic_axes]
    if dynamic and target in ("android", "ios"):
        notes.append(f"input {dynamic[0].name!r} keeps dynamic axes {dynamic[0].shape_text()}: NNAPI and CoreML "
                     f"take no node with a dynamic shape; pass --shape {dynamic[0].name}=1x64 (for example)")
    metadata = {p.key: p.value for p in proto.metadata_props}
    ours = metadata_of_map(metadata)

    stem = model.stem
    with staged_directory(output, replace=True) as work:
        staged = work / ".stage" / f"{stem}.onnx"
        with writing(output):
            staged.parent.mkdir()
            _save_self_contained(proto, model.parent, staged)
        stage = staged.parent
        # Each step below opens the model in onnxruntime and frees it again; the heap's freed pages go back to the
        # system after each, or the next step's peak can come on top of them (BENCHMARKS.md, "Memory").
        coverage = mobile_coverage(staged)
        return_freed_heap()
        with writing(output):  # the converter writes the .ort and the operator config itself
            _convert_to_ort(stage, work, spec.ort_platform)
        return_freed_heap()
        onnx_file = work / f"{stem}.onnx"
        os.replace(staged, onnx_file)
        shutil.rmtree(stage)
        ort_file, config = work / f"{stem}.ort", work / OPERATOR_CONFIG
        if not ort_file.is_file() or not config.is_file():
            # The converter's naming is its own; if it changes, say so instead of writing a partial bundle.
            raise RuntimeError(f"convert_onnx_models_to_ort wrote {sorted(p.name for p in work.iterdir())}, "
                               f"expected {ort_file.name} and {OPERATOR_CONFIG}")
        # The config's header names the models it came from: our temporary directory, not the bundle's.
        config.write_text(config.read_text().replace(str(work), str(output.resolve())))
        check = _compare_ort(onnx_file, ort_file, metadata)
        operators = [line for line in config.read_text().splitlines() if line and not line.startswith("#")]
        bundle = {
            "format": BUNDLE_FORMAT,
            "target": spec.name,
            "target_platform": spec.ort_platform,
            "providers": list(spec.providers),
            "onnxruntime_version": ort.__version__,
            "source": str(model),
            "model": {
                "family": ours.get("family"),
                "num_experts": ours.get("num_experts"),
                "top_k": ours.get("top_k"),
                "strategy": ours.get("strategy"),
                "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
                "ir_version": proto.ir_version,
                "metadata": ours,
            },
            "fixed_shapes": shapes,
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            "files": {kind: {"path": p.name, "bytes": p.stat().st_size, "sha256": _sha256(p)}
                      for kind, p in (("ort", ort_file), ("onnx", onnx_file), ("operator_config", config))},
            "operators": operators,
            "coverage": {c.ep: c.to_dict() for c in coverage},
            "check": check,
            "warnings": notes,
        }
        with writing(output):
            (work / "bundle.json").write_text(json.dumps(bundle, indent=2) + "\n")
        # _prepare_destination allowed an existing output (empty, or a previous bundle with --force).
    return PackageResult(output, spec, output / ort_file.name, output / onnx_file.name, output / OPERATOR_CONFIG,
                         output / "bundle.json", shapes, inputs, outputs, coverage, check, operators, notes)


__all__ = ["TARGETS", "PackageResult", "Target", "fix_shapes", "package_model", "register_target"]
