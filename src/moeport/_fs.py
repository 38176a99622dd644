"""File guards shared by every command: the one atomic writer, output checks, .npz reading, safe ONNX reading.

``staged_file(target)`` / ``staged_directory(target)``: the one way moeport writes an output. The caller
writes into a staging directory beside the target; only when its block succeeds is the result renamed into
place (a file and its companions such as external data, the target itself last; or a whole directory). Any
exception removes the staging directory, so a failed or interrupted write leaves nothing behind and never a
half-written target; an ``OSError`` (disk full, permission denied, read-only file system) becomes a one-line
``MoeportError`` naming the target (``writing(target)`` does that conversion on its own).

``work_directory(target)``: hidden scratch beside an output for the files of the work, removed in every case. A
process killed outright (SIGKILL, out of memory) cannot remove its staging or work directory; the next command
writing that output warns of them (``warn_leftover_scratch``). SIGTERM is handled like Ctrl-C (cli.main).

``load_model_proto(path)`` parses an ONNX file *without* its external data and then checks every
external-data location: an ONNX file is user input, and a location such as ``../../etc/passwd`` or an
absolute path would make onnx/onnxruntime read any file on the machine into a tensor. Only files inside
the model's own directory are accepted, before onnx or onnxruntime opens them.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from moeport.errors import MoeportError, MoeportWarning


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


def check_output_file(path: str | os.PathLike, force: bool) -> Path:
    """User errors for an output file we must not or cannot write; returns it as a Path. Warns
    (``MoeportWarning``) of scratch that a killed run left beside it (``warn_leftover_scratch``)."""
    path = Path(path)
    warn_leftover_scratch(path)
    if path.is_dir():
        raise MoeportError(f"output {path} is a directory; give a file name inside it")
    if path.exists() and not force:
        raise MoeportError(f"output {path} already exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise MoeportError(f"output directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):  # say so before the work, not after computing the outputs
        raise MoeportError(f"output directory {path.parent} is not writable")
    return path


def leftover_scratch(target: Path) -> list[Path]:
    """The staging and work directories beside ``target`` (``.NAME.XXXXXXXX``, ``.NAME.work.XXXXXXXX``: the names
    ``_staging_beside`` and ``work_directory`` give) that are not this process's own -- each removed when its command
    ends, unless the process was killed (SIGKILL, the out-of-memory killer) -- or another command's writing ``target``
    right now."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(work\.)?[a-z0-9_]{{8}}")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []  # a missing or unreadable directory: the output checks say so
    return sorted(Path(e.path) for e in entries if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                  and Path(e.path) not in _live_scratch)


def _tree_bytes(directory: Path) -> int:
    total = 0
    try:
        for path in directory.rglob("*"):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    except OSError:
        pass  # removed while being read: another command's scratch, its work just over
    return total


def warn_leftover_scratch(target: Path) -> None:
    """A ``MoeportWarning`` naming the hidden scratch directories beside ``target`` and their size: a quantize of a
    large model that ran out of memory leaves one as large as the model, and every retry adds another."""
    leftovers = leftover_scratch(target)
    if leftovers:
        size = sum(_tree_bytes(d) for d in leftovers)
        size_text = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
        warnings.warn(f"{len(leftovers)} hidden scratch director{'y' if len(leftovers) == 1 else 'ies'} beside "
                      f"{target} ({size_text}: {', '.join(d.name for d in leftovers)}) left by a moeport run "
                      f"that was killed (out of memory?); delete them unless another command is writing {target} "
                      "now", MoeportWarning, stacklevel=3)


def check_output_directory(path: str | os.PathLike, force: bool, is_ours, not_ours: str) -> Path:
    """User errors for an output directory: it may be absent or empty; with ``force`` it may also hold a previous
    output of ours (``is_ours(path)``), never an arbitrary directory (``not_ours`` says what it lacks, e.g.
    "holds no bundle.json"). Returns it as a Path. Warns of scratch a killed run left beside it."""
    path = Path(path)
    warn_leftover_scratch(path)
    if path.exists() and not path.is_dir():
        raise MoeportError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise MoeportError(f"output directory {path} is not empty; pass --force to replace it")
        if not is_ours(path):
            raise MoeportError(f"output directory {path} is not empty and {not_ours}; refusing to replace it even "
                               "with --force")
    if not path.parent.is_dir():
        raise MoeportError(f"output directory {path.parent} does not exist")
    return path


# A Ctrl-C that a library swallows must still stop the command before it writes anything: torch.onnx retries its
# capture with another strategy when the first one fails, and a KeyboardInterrupt raised while it imported
# torch._dynamo came back as such a failure -- the retry succeeded and the export was written. The CLI's SIGINT
# (and SIGTERM) handler (``record_interrupt``) remembers the interrupt here, and every staged write checks it before
# moving its output into place.
_interrupted = threading.Event()
_interrupt_signal: int | None = None


def record_interrupt(signum: int | None = None, frame=None) -> None:
    """Handler of SIGINT and SIGTERM: remember the signal, then raise KeyboardInterrupt as Python's default SIGINT
    handler does, so that staging and work directories are removed on the way out (Python's default for SIGTERM
    ends the process at once and left gigabytes of hidden scratch beside the output)."""
    global _interrupt_signal
    _interrupt_signal = signal.SIGINT if signum is None else signum
    _interrupted.set()
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a SIGINT or SIGTERM was recorded since ``clear_interrupt``."""
    return _interrupted.is_set()


def interrupt_signal() -> int | None:
    """The signal ``record_interrupt`` recorded last (SIGINT or SIGTERM), None when none was."""
    return _interrupt_signal if _interrupted.is_set() else None


def clear_interrupt() -> None:
    global _interrupt_signal
    _interrupt_signal = None
    _interrupted.clear()


def raise_if_interrupted() -> None:
    """KeyboardInterrupt when a SIGINT was recorded, even if whatever it interrupted carried on."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


# The scratch directories this process has beside its outputs now: not a killed run's (``leftover_scratch``).
_live_scratch: set[Path] = set()


def _staging_beside(target: Path) -> Path:
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


@contextlib.contextmanager
def _staged(target: Path, commit: Callable[[Path], None]):
    """Yield a staging directory beside ``target``; when the block succeeds (and no Ctrl-C was recorded),
    ``commit(staging)`` moves the result into place; the staging directory is removed in every case."""
    staging = _staging_beside(target)
    _live_scratch.add(staging)
    try:
        yield staging
        raise_if_interrupted()
        with writing(target):
            commit(staging)
    finally:
        _live_scratch.discard(staging)
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def work_directory(target: str | os.PathLike):
    """Yield a scratch directory beside the output ``target`` (``.NAME.work.XXXXXXXX``: on the output's file system,
    where a model as large as the output fits) for the intermediate files of the work; removed in every case."""
    target = Path(target)
    with writing(target), tempfile.TemporaryDirectory(prefix=f".{target.name}.work.", dir=target.parent) as work:
        _live_scratch.add(Path(work))
        try:
            yield Path(work)
        finally:
            _live_scratch.discard(Path(work))


@contextlib.contextmanager
def staged_file(target: str | os.PathLike):
    """Yield a staging directory beside the file ``target``; write ``staging / target.name`` there, with its
    companions named ``target.name + suffix`` (e.g. its external data ``model.onnx.data``). On success the
    companions are moved next to ``target``, then ``target`` itself (it is what points at them); anything
    else in the staging directory is scratch and goes with it. On any exception nothing is moved."""
    target = Path(target)

    def commit(staging: Path) -> None:
        for companion in sorted(staging.glob(f"{glob.escape(target.name)}?*")):
            os.replace(companion, target.parent / companion.name)
        os.replace(staging / target.name, target)

    with _staged(target, commit) as staging:
        yield staging


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, replace: bool = False):
    """Yield a staging directory beside the directory ``target``; on success it becomes ``target`` in one
    rename. ``replace``: an existing ``target`` is removed first (rename cannot replace a non-empty
    directory: a short window without it, never a mixed one); otherwise only an empty one may exist."""
    target = Path(target)

    def commit(staging: Path) -> None:
        staging.chmod(0o755)  # mkdtemp makes it private; an output is an ordinary directory
        if target.exists() and replace:
            shutil.rmtree(target)
        elif target.exists():
            target.rmdir()  # only an empty directory may be there; rename replaces that one
        os.replace(staging, target)

    with _staged(target, commit) as staging:
        yield staging


def load_npz(path: str | os.PathLike, what: str = "inputs") -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file by name (no pickles: an npz of tensors never needs them); ``what`` names
    the file in errors ("inputs", "calibration")."""
    path = Path(path)
    if not path.is_file():
        raise MoeportError(f"{what} file not found: {path}")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as exc:
        raise MoeportError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    if not zipfile.is_zipfile(path) and magic != b"\x93NUMPY":
        # np.load would try to unpickle anything else and say "allow_pickle=...": the wrong advice here.
        raise MoeportError(f"{path} is not a readable .npz file (not a zip archive); save the {what} with "
                           "np.savez(path, input_ids=...)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise MoeportError(f"{path} is a single .npy array; save the {what} with np.savez(path, input_ids=...)")
            return {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise MoeportError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc})") from exc


def subgraphs(nodes):
    """Every graph held in the attributes of ``nodes`` (``If`` branches, ``Loop`` and ``Scan`` bodies) and in theirs,
    depth first."""
    for node in nodes:
        for attribute in node.attribute:
            for graph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield graph
                yield from subgraphs(graph.node)


def _external_tensors(proto):
    """(tensor name, location) of every tensor stored as external data, subgraphs and functions included."""
    import onnx

    def all_tensors():
        function_nodes = [node for function in proto.functions for node in function.node]
        graphs = [proto.graph, *subgraphs(proto.graph.node), *subgraphs(function_nodes)]
        for graph in graphs:
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield sparse.values
                yield sparse.indices
        for node in [*function_nodes, *(node for graph in graphs for node in graph.node)]:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors

    for tensor in all_tensors():
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            yield tensor.name, location


def check_external_data(proto, path: str | os.PathLike) -> None:
    """Refuse external-data locations outside the directory of the model file ``path``, or missing."""
    path = Path(path)
    base = path.parent.resolve()
    for name, location in _external_tensors(proto):
        if location and not os.path.isabs(location) and (base / location).is_symlink():
            # onnx refuses to read external data through a link (a link could point anywhere); say so, rather than
            # "outside the model's directory" about a file the user sees right there (a Hugging Face cache's
            # snapshot folder is links to its blobs).
            raise MoeportError(f"{path}: external data file {location!r} of tensor {name!r} is a symbolic link, "
                               "which onnx refuses to read; copy the file itself next to the model (cp -L)")
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


def check_single_links(proto, path: str | os.PathLike) -> None:
    """Refuse external data files with more than one hard link: onnx_ir (which ``quantize`` reads and writes the
    weights with) refuses them as a possible hard-link attack, deep inside the work; say so before it starts."""
    base = Path(path).parent
    for location in sorted({location for _, location in _external_tensors(proto) if location}):
        links = (base / location).stat().st_nlink
        if links > 1:
            raise MoeportError(f"{path}: its external data file {location!r} has {links} hard links, which onnx_ir "
                               "refuses to read (a guard against hard-link attacks); copy it (cp) so the model's "
                               "data is a file of its own")


# Initializers at most this many bytes hold values that a graph's shapes depend on (Reshape's shape, axes,
# scalars): they are read in when a graph is loaded without its weights, for shape inference and graph analyses
# (onnx_ir's shape inference keeps 1000 bytes for the same reason).
SHAPE_VALUE_BYTES = 1024


def load_model_proto(path: str | os.PathLike, inline_up_to: int = 0):
    """The ModelProto of the ONNX file ``path`` without external data, its external data locations checked.

    ``inline_up_to``: initializers stored outside whose data is at most this many bytes are read in (shapes,
    axes: what shape inference needs the values of); larger ones stay on disk.
    """
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import load_external_data_for_tensor

    path = Path(path)
    if not path.is_file():
        raise MoeportError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError) as exc:
        # DecodeError: bytes that are not a ModelProto (a truncated download, or not an ONNX file at all).
        raise MoeportError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from exc
    check_external_data(proto, path)
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL and _external_length(init) <= inline_up_to:
            load_external_data_for_tensor(init, str(path.parent))
    return proto


def _external_length(tensor) -> int:
    """The byte length an external tensor records (its ``length`` entry; without one, the whole file)."""
    length = next((e.value for e in tensor.external_data if e.key == "length"), None)
    return int(length) if length is not None and length.isdigit() else 1 << 62
