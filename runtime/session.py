"""onnxruntime sessions, with execution providers known by short name in one registry.

``create_session(model, ep="cpu")`` is the one way moeport opens a model. Asking for a provider the
installed onnxruntime lacks is a user error that lists what is available, unless ``fallback="cpu"``,
in which case a warning says so.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from moeport._fs import SHAPE_VALUE_BYTES, load_model_proto
from moeport.errors import MoeportError
from moeport.registry import Registry


@dataclass(frozen=True)
class ExecutionProvider:
    name: str  # short name used on the command line
    ort_name: str  # onnxruntime's provider name
    description: str
    options: dict = field(default_factory=dict)  # default provider options
    needs_static_shapes: bool = False


_PROVIDERS: Registry[ExecutionProvider] = Registry("execution provider")


def register_provider(provider: ExecutionProvider) -> ExecutionProvider:
    if not provider.ort_name.endswith("ExecutionProvider"):
        raise ValueError(f"{provider.ort_name!r} is not an onnxruntime provider name")
    return _PROVIDERS.add(provider.name, provider)


for _provider in (
    ExecutionProvider("cpu", "CPUExecutionProvider", "onnxruntime's default CPU kernels"),
    ExecutionProvider("cuda", "CUDAExecutionProvider", "NVIDIA GPUs through CUDA"),
    ExecutionProvider("tensorrt", "TensorrtExecutionProvider", "NVIDIA TensorRT", needs_static_shapes=False),
    ExecutionProvider("openvino", "OpenVINOExecutionProvider", "Intel OpenVINO (onnxruntime-openvino wheel)",
                      {"device_type": "CPU"}),
    ExecutionProvider("nnapi", "NnapiExecutionProvider", "Android Neural Networks API", needs_static_shapes=True),
    ExecutionProvider("coreml", "CoreMLExecutionProvider", "Apple Core ML", needs_static_shapes=True),
    ExecutionProvider("xnnpack", "XnnpackExecutionProvider", "XNNPACK (ARM/x86 mobile CPUs)"),
    ExecutionProvider("qnn", "QNNExecutionProvider", "Qualcomm AI Engine Direct", needs_static_shapes=True),
    ExecutionProvider("dml", "DmlExecutionProvider", "DirectML (Windows GPUs)"),
    ExecutionProvider("webgpu", "WebGpuExecutionProvider", "WebGPU"),
):
    register_provider(_provider)


def providers() -> list[ExecutionProvider]:
    return _PROVIDERS.values()


def provider_names() -> list[str]:
    return _PROVIDERS.names()


def available_providers() -> list[str]:
    """Short names of the registered providers the installed onnxruntime has."""
    import onnxruntime as ort

    installed = set(ort.get_available_providers())
    return [p.name for p in _PROVIDERS.values() if p.ort_name in installed]


def resolve_provider(name: str, fallback: str | None = None) -> ExecutionProvider:
    """The provider to use for ``name``; a missing one raises, or falls back with a warning."""
    provider = _PROVIDERS.get(name)
    available = available_providers()
    if name in available:
        return provider
    if fallback is not None:
        if fallback not in available:
            raise MoeportError(f"fallback provider {fallback!r} is not available either; available: {', '.join(available)}")
        warnings.warn(f"execution provider {name!r} is not available in this onnxruntime; falling back to {fallback!r}",
                      stacklevel=2)
        return _PROVIDERS.get(fallback)
    raise MoeportError(
        f"execution provider {name!r} is not available in this onnxruntime; available: {', '.join(available)} "
        f"(pass --fallback cpu to run on cpu instead)"
    )


def create_session(
    model: str | os.PathLike,
    ep: "str | ExecutionProvider" = "cpu",
    *,
    fallback: str | None = None,
    threads: int | None = None,
    optimization: str = "all",
    profile_dir: str | os.PathLike | None = None,
    config: dict[str, str] | None = None,
    extra_outputs: dict[str, int] | None = None,
):
    """Open ``model`` with onnxruntime on provider ``ep`` (a short name, or an already resolved provider).

    ``optimization``: all|extended|basic|disabled. ``profile_dir``: record an onnxruntime profile there
    (the placement report reads it). ``config``: session config entries (``add_session_config_entry``).
    ``extra_outputs``: intermediate tensors to return as well, name -> ONNX element type (after the graph's
    own outputs); the weights are still read from the model's files, not copied.
    """
    import onnx
    import onnxruntime as ort

    path = Path(model)
    if not path.is_file():
        raise MoeportError(f"model file not found: {path}")
    if extra_outputs and path.suffix == ".ort":
        raise ValueError("extra_outputs needs an ONNX file; an .ort file cannot gain outputs")
    source: str | bytes = str(path)
    if path.suffix != ".ort":  # ORT-format files are flatbuffers with no external data to check
        # Refuses external data outside the model's directory before ORT reads it. Small tensors are read in:
        # onnxruntime infers shapes from constant inputs before it resolves external data for a graph handed
        # over in memory.
        proto = load_model_proto(path, inline_up_to=SHAPE_VALUE_BYTES if extra_outputs else 0)
        if not extra_outputs:
            del proto  # a model without external data is all in it: not held while onnxruntime loads its own copy
        else:
            present = {o.name for o in proto.graph.output}
            proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, elem_type, None)
                                      for name, elem_type in extra_outputs.items() if name not in present)
            source = proto.SerializeToString()  # the graph; its external data stays where it is, found here:
            config = {**(config or {}), "session.model_external_initializers_file_folder_path": str(path.parent)}
    provider = ep if isinstance(ep, ExecutionProvider) else resolve_provider(ep, fallback)
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "moeport_profile")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    chosen = [(provider.ort_name, dict(provider.options))]
    if provider.name != "cpu":
        chosen.append(("CPUExecutionProvider", {}))
    state = ort.capi.onnxruntime_pybind11_state
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=chosen)
    except (state.InvalidProtobuf, state.InvalidGraph, state.Fail, state.NoSuchFile, state.InvalidArgument,
            state.NotImplemented) as exc:  # InvalidArgument/NotImplemented: a bad opset or a type ORT lacks
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoeportError(f"onnxruntime cannot load {path}: {first_line}") from exc
    except UnicodeDecodeError as exc:
        # A corrupted name in the graph: onnxruntime's error message quotes it and pybind11 cannot decode it.
        raise MoeportError(f"onnxruntime cannot load {path}: it holds text that is not UTF-8 (a corrupted "
                           "file?); re-export it") from exc
    return_freed_heap()
    return session


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other C libraries have no libc.so.6 (nor malloc_trim)
        return None
    return getattr(libc, "malloc_trim", None)


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the system, where the C library can (glibc's ``malloc_trim``).

    Why: loading a model without external data, ``create_session``'s check parses it whole (its weights too) and
    frees the parse, and onnxruntime frees its own working copies of the weights (after prepacking them, say).
    Freeing such large blocks raises glibc's threshold for serving allocations from their own mappings, so later
    ones come from the heap, which keeps its pages resident after they are freed (how much differs from run to
    run). 4-layer granite-shaped model, resident after a prefill and decode steps: static int8 (a 340 MB file)
    0.80-0.98 GB before, 0.60 GB after, as onnxruntime opening it directly; fp32 (1.06 GB) 1.46 -> 1.41 GB, where
    onnxruntime directly held 1.38 GB in one run and 2.21 GB in the next (BENCHMARKS.md). A model in external data
    is mostly read into large blocks of their own."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
