"""File guards shared by every command: one-line errors for failed writes, and safe reading of ONNX files.

``writing(target)`` turns an ``OSError`` raised while an output is written (disk full, permission denied,
read-only file system) into a ``MoeportError`` naming the output; the callers write into a temporary
beside the output and remove it on any exception, so the error leaves nothing behind.

``load_model_proto(path)`` parses an ONNX file *without* its external data and then checks every
external-data location: an ONNX file is user input, and a location such as ``../../etc/passwd`` or an
absolute path would make onnx/onnxruntime read any file on the machine into a tensor. Only files inside
the model's own directory are accepted, before onnx or onnxruntime opens them.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from moeport.errors import MoeportError


def write_error(target: str | os.PathLike, exc: OSError) -> MoeportError:
    """The user error for ``exc`` raised while writing ``target`` (the final output, not the temporary)."""
    if exc.errno == errno.ENOSPC:
        return MoeportError(f"no space left on device writing {target}; free some space or choose another output")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return MoeportError(f"cannot write {target}: permission denied; choose a writable output directory")
    return MoeportError(f"cannot write {target}: {exc.strerror or exc}")


@contextlib.contextmanager
def writing(target: str | os.PathLike):
    """Re-raise an ``OSError`` of the block as a one-line ``MoeportError`` about ``target``."""
    try:
        yield
    except OSError as exc:
        raise write_error(target, exc) from exc


def _external_tensors(proto):
    """(tensor name, location) of every tensor stored as external data, subgraphs and functions included."""
    import onnx

    def tensors_of_graph(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            yield from tensors_of_nodes(node)

    def tensors_of_nodes(node):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from tensors_of_graph(attr.g)
            for graph in attr.graphs:
                yield from tensors_of_graph(graph)

    def all_tensors():
        yield from tensors_of_graph(proto.graph)
        for function in proto.functions:
            for node in function.node:
                yield from tensors_of_nodes(node)

    for tensor in all_tensors():
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            yield tensor.name, location


def check_external_data(proto, path: str | os.PathLike) -> None:
    """Refuse external-data locations outside the directory of the model file ``path``, or missing."""
    path = Path(path)
    base = path.parent.resolve()
    for name, location in _external_tensors(proto):
        try:
            target = (base / location).resolve()
            inside = bool(location) and not os.path.isabs(location) and target.is_relative_to(base)
        except (ValueError, OSError):  # a NUL byte or an unresolvable name: not a location we will open
            inside = False
        if not inside:
            raise MoeportError(f"{path}: tensor {name!r} points at external data {location!r} outside the model's "
                               "directory; refusing to read it (keep the .data file next to the model)")
        if not target.is_file():
            raise MoeportError(f"{path}: external data file {location!r} of tensor {name!r} is missing; copy it "
                               "next to the model")


def load_model_proto(path: str | os.PathLike):
    """The ModelProto of the ONNX file ``path`` without external data, its external data locations checked."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise MoeportError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError) as exc:
        # DecodeError: bytes that are not a ModelProto (a truncated download, or not an ONNX file at all).
        raise MoeportError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from exc
    check_external_data(proto, path)
    return proto
