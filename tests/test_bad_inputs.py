"""Bad input to every command: one line naming the problem, the right exit code, nothing left behind.

Each ``Case`` builds its bad input in a fresh directory and runs ``moeport.cli.main`` on it. The test
asserts the exit code (2 usage, 1 otherwise), exactly one stderr line starting ``error:``, no traceback,
and that the directory is byte-for-byte as it was (no partial output, no overwritten output).

The same cases generate docs/errors.md; ``test_errors_table_is_current`` fails when the file differs.
Regenerate it with ``python -m pytest tests/test_bad_inputs.py --regen``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

from moeport.cli import main

from tiny_hf import TINY_MIXTRAL, save_tiny_mixtral

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


@dataclass(frozen=True)
class Artifacts:
    checkpoint: Path  # sample "topk"
    other_checkpoint: Path  # sample "switch": different MoE layers
    model: Path  # "topk" exported with default options
    folder: Path  # a tiny Mixtral exported with --layout genai (conftest ``deployed``)


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    bad_input: str
    setup: Callable[[Path, Artifacts, pytest.MonkeyPatch], list[str]]  # (dir, artifacts, mp) -> argv
    exit_code: int
    expect: str  # part of the message


# -- building bad inputs ------------------------------------------------------------------------------


def ckpt(d: Path, art: Artifacts, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(art.checkpoint, d / name))


def other_ckpt(d: Path, art: Artifacts) -> Path:
    return Path(shutil.copytree(art.other_checkpoint, d / "other"))


def model(d: Path, art: Artifacts, name: str = "m.onnx") -> Path:
    return Path(shutil.copyfile(art.model, d / name))


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def edit_weights(path: Path, edit: Callable[[dict], None]) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))
    return path


def no_metadata_model(path: Path) -> Path:
    """An ONNX model with the exported models' I/O names but no moeport metadata."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "plain",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


def traversal_model(d: Path, art: Artifacts, location: str = "../outside.data") -> Path:
    """The exported model with its largest weight moved to external data at ``location`` (outside its dir).

    The target file exists and holds the right bytes: the model must be refused for where it points,
    not because the read fails.
    """
    proto = onnx.load(str(art.model))
    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    target = Path(location) if os.path.isabs(location) else d / "model" / location
    if not os.path.isabs(location):
        write(target, tensor.raw_data)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(tensor.raw_data)))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    path = d / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    onnx.save(proto, str(path))
    return path


def oversized_model(d: Path, art: Artifacts) -> Path:
    """The exported model with one more weight of 2.4 GB (unused) in external data: a sparse file, so nothing of
    that size is written or read."""
    proto = onnx.load(str(art.model))
    count = 600_000_000  # float32: 2.4 GB
    big = proto.graph.initializer.add(name="unused_weight", data_type=onnx.TensorProto.FLOAT, dims=[count])
    for key, value in (("location", "m.onnx.data"), ("offset", "0"), ("length", str(4 * count))):
        big.external_data.add(key=key, value=value)
    big.data_location = onnx.TensorProto.EXTERNAL
    path = d / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    with open(path.parent / "m.onnx.data", "wb") as data:
        data.truncate(4 * count)
    onnx.save(proto, str(path))
    return path


def linked_data_model(d: Path, art: Artifacts) -> Path:
    """``traversal_model`` with its weight in ``m.onnx.data`` next to it, as a symbolic link to a file elsewhere
    (a Hugging Face cache snapshot links its files to blobs)."""
    path = traversal_model(d, art, "m.onnx.data")
    blob = d / "blobs" / "weights"
    blob.parent.mkdir(exist_ok=True)
    (path.parent / "m.onnx.data").rename(blob)
    (path.parent / "m.onnx.data").symlink_to(blob)
    return path


def hard_linked_data_model(d: Path, art: Artifacts) -> Path:
    """``traversal_model`` with its weight in ``m.onnx.data`` next to it, that file with a second hard link."""
    path = traversal_model(d, art, "m.onnx.data")
    os.link(path.parent / "m.onnx.data", d / "second-link.data")
    return path


def raise_oserror(code: int):
    def fail(*_args, **_kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def disk_full(mp: pytest.MonkeyPatch, target, name: str) -> None:
    """Make the writer ``target.name`` fail as a full disk does."""
    mp.setattr(target, name, raise_oserror(errno.ENOSPC))


def deny_access(mp: pytest.MonkeyPatch, directory: Path) -> None:
    """``directory`` reads as not writable (tests may run as root, for whom chmod changes nothing)."""
    real = os.access
    mp.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK and Path(p) == directory
               else real(p, mode, **kw))


def deny_mkdtemp(mp: pytest.MonkeyPatch, directory: Path) -> None:
    """Creating anything in ``directory`` fails with EACCES (the write itself, not a pre-check)."""
    real = tempfile.mkdtemp

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if dir is not None and Path(dir) == directory:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real(suffix, prefix, dir)

    mp.setattr(tempfile, "mkdtemp", mkdtemp)




def pickle_checkpoint(d: Path) -> Path:
    path = d / "hf"
    write(path / "config.json", json.dumps({"model_type": "mixtral", **TINY_MIXTRAL}))
    write(path / "pytorch_model.bin", b"not read: pickle is refused before any loading")
    return path


def hf_ckpt(d: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """A tiny transformers Mixtral checkpoint (config.json + model.safetensors), its weights edited."""
    pytest.importorskip("transformers")
    save_tiny_mixtral(d / "hf")
    if edit is not None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(d / "hf" / "model.safetensors"))
        edit(state)
        save_file(state, str(d / "hf" / "model.safetensors"), metadata={"format": "pt"})
    return d / "hf"


class CreatesFile:
    """Unpickling this object creates a file: a stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _export_trusted_pickle_with_code(d, art, mp):
    """--trust-pickle, and the pickle holds code: weights_only=True refuses it (the snapshot sees no new file)."""
    import torch

    path = pickle_checkpoint(d)
    torch.save({"model.embed_tokens.weight": CreatesFile(d / "pwned")}, path / "pytorch_model.bin")
    return _export(path, d, "--trust-pickle")


def _hf_missing(state):
    del state["model.embed_tokens.weight"]


def _hf_wrong_shape(state):
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:10].clone()


def _samples_trained_enospc(d, art, mp):
    disk_full(mp, shutil, "copyfile")
    return ["samples", "create", "trained", str(d / "s")]


def _samples_enospc(d, art, mp):
    import safetensors.torch

    disk_full(mp, safetensors.torch, "save_file")
    return ["samples", "create", "topk", str(d / "s")]


def _samples_not_empty(d, art, mp):
    write(d / "s" / "notes.txt", "mine")
    return ["samples", "create", "topk", str(d / "s")]


def _samples_unwritable(d, art, mp):
    deny_mkdtemp(mp, d)
    return ["samples", "create", "topk", str(d / "s")]


def _export(checkpoint: Path, d: Path, *extra: str) -> list[str]:
    return ["export", str(checkpoint), "-o", str(d / "out.onnx"), *extra]


def _export_output_exists(d, art, mp):
    write(d / "out.onnx", "an earlier export")
    return _export(ckpt(d, art), d)


def _export_unwritable(d, art, mp):
    deny_access(mp, d / "ro")
    (d / "ro").mkdir()
    return ["export", str(ckpt(d, art)), "-o", str(d / "ro" / "out.onnx")]


def _export_enospc(d, art, mp):
    import onnx_ir

    disk_full(mp, onnx_ir, "save")
    return _export(ckpt(d, art), d, "--no-validate")


def _missing_key(state):
    del state["embed.weight"]


def _wrong_shape(state):
    state["embed.weight"] = state["embed.weight"][:10].clone()


def _corrupt_header(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")  # header length far beyond the file
    path.write_bytes(bytes(data))
    return path


def _run(d, art, inputs: dict | None = None, *extra: str, model_path: Path | None = None) -> list[str]:
    m = model_path or model(d, art)
    inputs = {"input_ids": np.zeros((1, 4), np.int64)} if inputs is None else inputs
    return ["run", str(m), "--inputs", str(npz(d / "in.npz", **inputs)), *extra]


def _run_enospc(d, art, mp):
    argv = _run(d, art, None, "-o", str(d / "out.npz"))
    disk_full(mp, np, "savez")  # after writing the inputs with it
    return argv


def _run_output_exists(d, art, mp):
    write(d / "out.npz", "earlier outputs")
    return _run(d, art, None, "-o", str(d / "out.npz"))


def _run_unwritable(d, art, mp):
    (d / "ro").mkdir()
    deny_access(mp, d / "ro")
    return _run(d, art, None, "-o", str(d / "ro" / "out.npz"))


def _bench_plot_enospc(d, art, mp):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    disk_full(mp, matplotlib.figure.Figure, "savefig")
    return ["bench", str(model(d, art)), "--shapes", "1x2", "--runs", "1", "--warmup", "0", "--no-progress",
            "--plot", str(d / "plot.png")]


def _package(d, art, *extra: str, model_path: Path | None = None) -> list[str]:
    return ["package", str(model_path or model(d, art)), "--target", "android", "-o", str(d / "bundle"), *extra]


def unsorted_model(d: Path, art: Artifacts) -> Path:
    """The exported model with its first two nodes swapped: a graph onnx's checker refuses (a node reads a value no
    node before it made), while protobuf still parses it."""
    proto = onnx.load(str(art.model))
    first, second = onnx.NodeProto(), onnx.NodeProto()
    first.CopyFrom(proto.graph.node[0])
    second.CopyFrom(proto.graph.node[1])
    proto.graph.node[0].CopyFrom(second)
    proto.graph.node[1].CopyFrom(first)
    path = d / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    onnx.save(proto, str(path))
    return path


def _package_enospc(d, art, mp):
    disk_full(mp, onnx, "save")
    return _package(d, art, "--shape", "input_ids=1x8")


def _package_not_empty(d, art, mp):
    write(d / "bundle" / "mine.txt", "not a bundle")
    return _package(d, art, "--force")


def _quantize(d, art, *extra: str, model_path: Path | None = None) -> list[str]:
    return ["quantize", str(model_path or model(d, art)), "-o", str(d / "q.onnx"), "--no-perplexity",
            "--latency-runs", "0", *extra]


def _quantize_enospc(d, art, mp):
    disk_full(mp, onnx, "save")
    return _quantize(d, art, "--mode", "fp16")


def _quantize_output_exists(d, art, mp):
    write(d / "q.onnx", "an earlier quantized model")
    return _quantize(d, art, "--mode", "fp16")


def _quantize_unwritable(d, art, mp):
    (d / "ro").mkdir()
    deny_access(mp, d / "ro")
    return ["quantize", str(model(d, art)), "-o", str(d / "ro" / "q.onnx"), "--mode", "fp16"]


def _generate(model_path: Path, *extra: str) -> list[str]:
    return ["generate", str(model_path), *extra]


def folder(d: Path, art: Artifacts, edit: Callable[[Path], None] | None = None) -> Path:
    """A copy of the genai model folder, changed by ``edit``."""
    path = Path(shutil.copytree(art.folder, d / "folder"))
    if edit is not None:
        edit(path)
    return path


def _edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = json.loads((path / name).read_text())
        change(data)
        (path / name).write_text(json.dumps(data))

    return edit


def _layout_export(checkpoint: Path, d: Path, *extra: str) -> list[str]:
    return ["export", str(checkpoint), "-o", str(d / "out"), "--task", "text-generation-with-past", "--layout",
            "genai", *extra]


def _hf_ckpt_with_big_tokenizer(d: Path) -> Path:
    """The tiny Mixtral (64 tokens) with a 128-token tokenizer saved beside it: they do not belong together."""
    from tiny_hf import save_bpe_tokenizer

    path = hf_ckpt(d)
    save_bpe_tokenizer(path, vocab_size=128)
    return path


def _layout_output_not_empty(d, art, mp):
    write(d / "out" / "notes.txt", "mine")
    checkpoint = ckpt(d, art)
    shutil.copyfile(art.folder / "tokenizer.json", checkpoint / "tokenizer.json")  # a checkpoint fit for a folder
    return _layout_export(checkpoint, d)


def _quantize_quantized(d, art, mp):
    """The exported model with the record ``moeport quantize`` leaves in a file it wrote."""
    proto = onnx.load(str(art.model))
    proto.metadata_props.add(key="moeport.quantization", value='{"mode": "int4", "target": "cpu"}')
    onnx.save(proto, str(d / "int4.onnx"))
    return _quantize(d, art, "--mode", "int8-blocks", model_path=d / "int4.onnx")


def _quantize_variant_exists(d, art, mp):
    path = folder(d, art)
    write(path / "model_fp16.onnx", "an earlier variant")
    return ["quantize", str(path), "--mode", "fp16", "--no-perplexity", "--latency-runs", "0"]


C = Case
CASES = [
    # samples create
    C("samples-unknown", "samples create", "unknown sample name",
      lambda d, a, mp: ["samples", "create", "nope", str(d / "s")], 1, "unknown sample 'nope'"),
    C("samples-not-empty", "samples create", "output directory not empty", _samples_not_empty, 1, "is not empty"),
    C("samples-unwritable", "samples create", "output directory not writable", _samples_unwritable, 1,
      "permission denied"),
    C("samples-enospc", "samples create", "disk full while writing the weights", _samples_enospc, 1,
      "no space left on device"),
    C("samples-trained-enospc", "samples create", "disk full while copying the shipped checkpoint",
      _samples_trained_enospc, 1, "no space left on device"),
    # export
    C("export-missing", "export", "checkpoint path does not exist",
      lambda d, a, mp: _export(d / "nope", d), 1, "checkpoint directory not found"),
    C("export-file", "export", "checkpoint is a file, not a directory",
      lambda d, a, mp: _export(write(d / "ckpt.json", "{}"), d), 1, "must be a directory"),
    C("export-no-config", "export", "directory without config.json",
      lambda d, a, mp: _export(write(d / "ckpt" / "model.safetensors", b"").parent, d), 1, "no config.json"),
    C("export-config-not-json", "export", "config.json is not JSON",
      lambda d, a, mp: _export(write(d / "ckpt" / "config.json", "{not json").parent, d), 1, "is not valid JSON"),
    C("export-config-not-object", "export", "config.json holds a list, not an object",
      lambda d, a, mp: _export(write(d / "ckpt" / "config.json", "[1, 2]").parent, d), 1, "must hold a JSON object"),
    C("export-unknown-family", "export", "config.json names an unknown family",
      lambda d, a, mp: _export(write(d / "ckpt" / "config.json", '{"family": "nope"}').parent, d), 1,
      "names no known model family"),
    C("export-bad-config-value", "export", "config.json value out of range (num_heads 0)",
      lambda d, a, mp: _export(edit_config(ckpt(d, a), num_heads=0), d), 1, "is not a valid moeport_lm config"),
    C("export-no-weights", "export", "model.safetensors missing",
      lambda d, a, mp: _export((ckpt(d, a) / "model.safetensors").unlink() or d / "ckpt", d), 1,
      "no model.safetensors"),
    C("export-truncated-weights", "export", "truncated model.safetensors",
      lambda d, a, mp: _export(truncated(ckpt(d, a) / "model.safetensors").parent, d), 1,
      "is not a readable safetensors file"),
    C("export-corrupt-weights", "export", "corrupted model.safetensors header",
      lambda d, a, mp: _export(_corrupt_header(ckpt(d, a) / "model.safetensors").parent, d), 1,
      "is not a readable safetensors file"),
    C("export-missing-key", "export", "weights lack a tensor the config needs",
      lambda d, a, mp: _export(edit_weights(ckpt(d, a), _missing_key), d), 1, "does not match its config: missing"),
    C("export-wrong-shape", "export", "a weight's shape differs from the config's",
      lambda d, a, mp: _export(edit_weights(ckpt(d, a), _wrong_shape), d), 1, "has shape (10, 64)"),
    C("export-pickle-only", "export", "only pickle weights (pytorch_model.bin), no --trust-pickle",
      lambda d, a, mp: _export(pickle_checkpoint(d), d), 1, "pickle can run code"),
    C("export-trusted-pickle-with-code", "export", "--trust-pickle, and the pickle holds code, not tensors",
      _export_trusted_pickle_with_code, 1, "objects other than tensors"),
    C("export-hf-bad-config", "export", "transformers config.json with sizes that make no model (head size 0)",
      lambda d, a, mp: _export(edit_config(hf_ckpt(d), num_attention_heads=32), d), 1,
      "does not describe a model transformers can build"),
    C("export-hf-truncated-weights", "export", "transformers checkpoint: truncated model.safetensors",
      lambda d, a, mp: _export(truncated(hf_ckpt(d) / "model.safetensors").parent, d), 1, "is not readable"),
    C("export-hf-missing-key", "export", "transformers checkpoint: a weight missing",
      lambda d, a, mp: _export(hf_ckpt(d, _hf_missing), d), 1, "missing weight 'model.embed_tokens.weight'"),
    C("export-hf-wrong-shape", "export", "transformers checkpoint: a weight of the wrong shape",
      lambda d, a, mp: _export(hf_ckpt(d, _hf_wrong_shape), d), 1, "has shape (10, 16), the config needs (64, 16)"),
    C("export-output-exists", "export", "output exists, no --force", _export_output_exists, 1,
      "already exists; pass --force"),
    C("export-output-dir-missing", "export", "output directory does not exist",
      lambda d, a, mp: ["export", str(ckpt(d, a)), "-o", str(d / "no" / "out.onnx")], 1, "does not exist"),
    C("export-output-unwritable", "export", "output directory not writable", _export_unwritable, 1,
      "is not writable"),
    C("export-enospc", "export", "disk full while writing the model", _export_enospc, 1,
      "no space left on device writing"),
    C("export-bad-opset", "export", "unsupported --opset",
      lambda d, a, mp: _export(ckpt(d, a), d, "--opset", "5"), 1, "opset 5 is not supported"),
    C("export-bad-strategy", "export", "unknown --strategy",
      lambda d, a, mp: _export(ckpt(d, a), d, "--strategy", "nope"), 2, "Invalid value for '--strategy'"),
    C("export-layout-unknown", "export", "unknown --layout",
      lambda d, a, mp: _layout_export(ckpt(d, a), d)[:-1] + ["nope"], 2, "Invalid value for '--layout'"),
    C("export-layout-logits-task", "export", "--layout without --task text-generation-with-past",
      lambda d, a, mp: ["export", str(ckpt(d, a)), "-o", str(d / "out"), "--layout", "genai"], 1,
      "add --task text-generation-with-past"),
    C("export-layout-no-tokenizer", "export", "--layout: the checkpoint has no tokenizer",
      lambda d, a, mp: _layout_export(hf_ckpt(d), d), 1, "has no tokenizer.json: a runtime folder needs"),
    C("export-layout-tokenizer-too-big", "export", "--layout: the checkpoint's tokenizer has more tokens than its model",
      lambda d, a, mp: _layout_export(_hf_ckpt_with_big_tokenizer(d), d), 1,
      "has 128 tokens but the model's vocabulary is 64"),
    C("export-layout-output-not-empty", "export", "--layout: output directory holds other files",
      _layout_output_not_empty, 1, "is not empty; pass --force"),
    C("export-layout-shared-cache", "export", "--kv-cache shared for a runtime that cannot drive it",
      lambda d, a, mp: _layout_export(ckpt(d, a), d)[:-1] + ["transformers.js", "--kv-cache", "shared"], 1,
      "transformers.js cannot drive a shared KV cache"),
    C("export-kv-cache-logits", "export", "--kv-cache for the logits task",
      lambda d, a, mp: _export(ckpt(d, a), d, "--kv-cache", "shared", "--no-validate"), 1,
      "--kv-cache applies to --task text-generation-with-past"),
    C("export-layout-fused-attention", "export", "--fused-attention for a runtime that does not run it",
      lambda d, a, mp: _layout_export(ckpt(d, a), d)[:-1] + ["transformers.js", "--fused-attention"], 1,
      "transformers.js does not run onnxruntime's GroupQueryAttention"),
    C("export-fused-attention-logits", "export", "--fused-attention for the logits task",
      lambda d, a, mp: _export(ckpt(d, a), d, "--fused-attention", "--no-validate"), 1,
      "--fused-attention applies to --task text-generation-with-past"),
    # verify
    C("verify-model-missing", "verify", "model path does not exist",
      lambda d, a, mp: ["verify", str(d / "nope.onnx"), "--checkpoint", str(ckpt(d, a))], 1, "model file not found"),
    C("verify-truncated", "verify", "truncated .onnx",
      lambda d, a, mp: ["verify", str(truncated(model(d, a))), "--checkpoint", str(ckpt(d, a))], 1,
      "is not a readable ONNX model"),
    C("verify-not-onnx", "verify", "a text file named .onnx",
      lambda d, a, mp: ["verify", str(write(d / "m.onnx", "hello, not a model\n")), "--checkpoint", str(ckpt(d, a))],
      1, "is not a readable ONNX model"),
    C("verify-no-metadata", "verify", "ONNX model without moeport metadata",
      lambda d, a, mp: ["verify", str(no_metadata_model(d / "m.onnx")), "--checkpoint", str(ckpt(d, a))], 1,
      "has no moeport metadata"),
    C("verify-traversal", "verify", "external data location ../outside.data",
      lambda d, a, mp: ["verify", str(traversal_model(d, a)), "--checkpoint", str(ckpt(d, a))], 1,
      "outside the model's directory"),
    C("verify-bad-shapes", "verify", "--shapes 0x3",
      lambda d, a, mp: ["verify", str(model(d, a)), "--checkpoint", str(ckpt(d, a)), "--shapes", "0x3"], 2,
      "cannot parse shape '0x3'"),
    C("verify-unknown-provider", "verify", "unknown --ep",
      lambda d, a, mp: ["verify", str(model(d, a)), "--checkpoint", str(ckpt(d, a)), "--ep", "nope"], 1,
      "unknown execution provider 'nope'"),
    C("verify-checkpoint-missing", "verify", "checkpoint path does not exist",
      lambda d, a, mp: ["verify", str(model(d, a)), "--checkpoint", str(d / "nope")], 1,
      "checkpoint directory not found"),
    C("verify-wrong-checkpoint", "verify", "checkpoint is not the one the model came from",
      lambda d, a, mp: ["verify", str(model(d, a)), "--checkpoint", str(other_ckpt(d, a))], 1,
      "have different MoE layers"),
    # run
    C("run-model-missing", "run", "model path does not exist",
      lambda d, a, mp: _run(d, a, None, model_path=d / "nope.onnx"), 1, "model file not found"),
    C("run-truncated", "run", "truncated .onnx",
      lambda d, a, mp: _run(d, a, None, model_path=truncated(model(d, a))), 1, "is not a readable ONNX model"),
    C("run-traversal-absolute", "run", "external data location /etc/hostname",
      lambda d, a, mp: _run(d, a, None, model_path=traversal_model(d, a, "/etc/hostname")), 1,
      "outside the model's directory"),
    C("run-inputs-missing", "run", "--inputs file does not exist",
      lambda d, a, mp: ["run", str(model(d, a)), "--inputs", str(d / "nope.npz")], 1, "inputs file not found"),
    C("run-inputs-not-npz", "run", "--inputs is not an .npz",
      lambda d, a, mp: ["run", str(model(d, a)), "--inputs", str(write(d / "in.npz", "text"))], 1,
      "is not a readable .npz file (not a zip archive)"),
    C("run-input-name", "run", "input array under the wrong name",
      lambda d, a, mp: _run(d, a, {"ids": np.zeros((1, 4), np.int64)}), 1, "input 'input_ids' is missing"),
    C("run-input-extra", "run", "an extra input array",
      lambda d, a, mp: _run(d, a, {"input_ids": np.zeros((1, 4), np.int64), "mask": np.ones((1, 4), np.int64)}), 1,
      "input 'mask' is not an input of the model"),
    C("run-wrong-rank", "run", "input_ids of rank 1",
      lambda d, a, mp: _run(d, a, {"input_ids": np.zeros(4, np.int64)}), 1, "(rank 2)"),
    C("run-wrong-dtype", "run", "input_ids as float32",
      lambda d, a, mp: _run(d, a, {"input_ids": np.zeros((1, 4), np.float32)}), 1, "has dtype float32"),
    C("run-empty", "run", "input_ids with a zero-length sequence",
      lambda d, a, mp: _run(d, a, {"input_ids": np.zeros((1, 0), np.int64)}), 1, "dim 1 is empty"),
    C("run-token-too-big", "run", "token id >= vocabulary size",
      lambda d, a, mp: _run(d, a, {"input_ids": np.array([[1, 2, 256]], np.int64)}), 1, "outside the vocabulary"),
    C("run-token-negative", "run", "negative token id",
      lambda d, a, mp: _run(d, a, {"input_ids": np.array([[1, -1]], np.int64)}), 1, "outside the vocabulary"),
    C("run-prompt-mask-shape", "run", "with-past model, a prompt whose attention_mask is not the ids' shape",
      lambda d, a, mp: _run(d, a, {"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 3), np.int64)},
                            model_path=a.folder), 1, "a mask covers the ids"),
    C("run-prompt-mask-values", "run", "with-past model, a prompt's attention_mask holding 2s",
      lambda d, a, mp: _run(d, a, {"input_ids": np.ones((1, 4), np.int64),
                                   "attention_mask": np.full((1, 4), 2, np.int64)}, model_path=a.folder), 1,
      "holds values other than 0 and 1"),
    C("run-prompt-part-of-cache", "run", "with-past model, position_ids given but no past",
      lambda d, a, mp: _run(d, a, {"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64),
                                   "position_ids": np.arange(4)[None]}, model_path=a.folder), 1,
      "input 'past_key_values.0.key' is missing"),
    C("run-unknown-provider", "run", "unknown --ep",
      lambda d, a, mp: _run(d, a, None, "--ep", "nope"), 1, "unknown execution provider 'nope'"),
    C("run-output-exists", "run", "output exists, no --force", _run_output_exists, 1, "already exists"),
    C("run-output-unwritable", "run", "output directory not writable", _run_unwritable, 1, "is not writable"),
    C("run-enospc", "run", "disk full while writing the outputs", _run_enospc, 1, "no space left on device writing"),
    # bench
    C("bench-model-missing", "bench", "model path does not exist",
      lambda d, a, mp: ["bench", str(d / "nope.onnx")], 1, "model file not found"),
    C("bench-truncated", "bench", "truncated .onnx",
      lambda d, a, mp: ["bench", str(truncated(model(d, a)))], 1, "is not a readable ONNX model"),
    C("bench-bad-shapes", "bench", "--shapes 1xq",
      lambda d, a, mp: ["bench", str(model(d, a)), "--shapes", "1xq"], 2, "cannot parse shape '1xq'"),
    C("bench-not-a-model-folder", "bench", "a directory that is no model folder",
      lambda d, a, mp: ["bench", str(write(d / "dir" / "notes.txt", "x").parent)], 1, "is not a model folder"),
    C("bench-unknown-provider", "bench", "unknown --ep",
      lambda d, a, mp: ["bench", str(model(d, a)), "--ep", "nope"], 1, "unknown execution provider 'nope'"),
    C("bench-wrong-checkpoint", "bench", "--checkpoint is not the one the model came from",
      lambda d, a, mp: ["bench", str(model(d, a)), "--checkpoint", str(other_ckpt(d, a)), "--shapes", "1x2"], 1,
      "have different MoE layers; was it exported from this checkpoint?"),
    C("bench-plot-enospc", "bench", "disk full while writing --plot", _bench_plot_enospc, 1,
      "no space left on device writing"),
    # inspect
    C("inspect-model-missing", "inspect", "model path does not exist",
      lambda d, a, mp: ["inspect", str(d / "nope.onnx")], 1, "model file not found"),
    C("inspect-not-onnx", "inspect", "a text file named .onnx",
      lambda d, a, mp: ["inspect", str(write(d / "m.onnx", "hello, not a model\n"))], 1,
      "is not a readable ONNX model"),
    C("inspect-traversal", "inspect", "external data location ../outside.data",
      lambda d, a, mp: ["inspect", str(traversal_model(d, a))], 1, "outside the model's directory"),
    C("inspect-linked-data", "inspect", "external data next to the model as a symbolic link",
      lambda d, a, mp: ["inspect", str(linked_data_model(d, a))], 1,
      "is a symbolic link, which onnx refuses to read; copy the file itself next to the model (cp -L)"),
    C("inspect-unknown-provider", "inspect", "unknown --ep",
      lambda d, a, mp: ["inspect", str(model(d, a)), "--ep", "nope"], 1, "unknown execution provider 'nope'"),
    # package
    C("package-model-missing", "package", "model path does not exist",
      lambda d, a, mp: _package(d, a, model_path=d / "nope.onnx"), 1, "model file not found"),
    C("package-truncated", "package", "truncated .onnx",
      lambda d, a, mp: _package(d, a, model_path=truncated(model(d, a))), 1, "is not a readable ONNX model"),
    C("package-traversal", "package", "external data location ../outside.data",
      lambda d, a, mp: _package(d, a, model_path=traversal_model(d, a)), 1, "outside the model's directory"),
    C("package-over-2gb", "package", "a model with more weights than an ORT-format file holds",
      lambda d, a, mp: _package(d, a, model_path=oversized_model(d, a)), 1,
      "but an ORT-format bundle holds at most 2.15 GB; quantize it first"),
    C("package-invalid-graph", "package", "a graph onnx's checker refuses (nodes out of order)",
      lambda d, a, mp: _package(d, a, model_path=unsorted_model(d, a)), 1, "is not a valid ONNX model: "),
    C("package-bad-shape", "package", "--shape that does not parse",
      lambda d, a, mp: _package(d, a, "--shape", "input_ids=1xq"), 2, "cannot parse shape"),
    C("package-shape-unknown-input", "package", "--shape names no input of the model",
      lambda d, a, mp: _package(d, a, "--shape", "ids=1x8"), 2, "which the model does not have"),
    C("package-shape-wrong-rank", "package", "--shape of the wrong rank",
      lambda d, a, mp: _package(d, a, "--shape", "input_ids=8"), 1, "has 1 dims"),
    C("package-bad-target", "package", "unknown --target",
      lambda d, a, mp: ["package", str(model(d, a)), "--target", "nope", "-o", str(d / "b")], 2,
      "Invalid value for '--target'"),
    C("package-not-empty", "package", "output directory holds other files, even with --force", _package_not_empty,
      1, "holds no bundle.json"),
    C("package-enospc", "package", "disk full while writing the bundle", _package_enospc, 1,
      "no space left on device writing"),
    # quantize
    C("quantize-model-missing", "quantize", "model path does not exist",
      lambda d, a, mp: _quantize(d, a, model_path=d / "nope.onnx"), 1, "model file not found"),
    C("quantize-not-onnx", "quantize", "a text file named .onnx",
      lambda d, a, mp: _quantize(d, a, model_path=write(d / "m.onnx", "hello, not a model\n")), 1,
      "is not a readable ONNX model"),
    C("quantize-quantized", "quantize", "a file quantize wrote, quantized again", _quantize_quantized, 1,
      "is already quantized (int4); quantize the float32 file it was made from"),
    C("quantize-block-too-big", "quantize", "--block-size above what onnxruntime's block kernels take",
      lambda d, a, mp: _quantize(d, a, "--mode", "int4", "--block-size", "512"), 1,
      "block size must be a power of two from 16 to 256 (onnxruntime's block kernels), got 512"),
    C("quantize-traversal", "quantize", "external data location ../outside.data",
      lambda d, a, mp: _quantize(d, a, model_path=traversal_model(d, a)), 1, "outside the model's directory"),
    C("quantize-bad-mode", "quantize", "unknown --mode",
      lambda d, a, mp: _quantize(d, a, "--mode", "int3"), 2, "Invalid value for '--mode'"),
    C("quantize-output-is-input", "quantize", "-o is the input model",
      lambda d, a, mp: ["quantize", str(model(d, a)), "-o", str(d / "m.onnx")], 1, "is the input model"),
    C("quantize-output-exists", "quantize", "output exists, no --force", _quantize_output_exists, 1,
      "already exists; pass --force"),
    C("quantize-output-unwritable", "quantize", "output directory not writable", _quantize_unwritable, 1,
      "is not writable"),
    C("quantize-calibration-missing", "quantize", "--calibration file does not exist",
      lambda d, a, mp: _quantize(d, a, "--calibration", str(d / "nope.txt")), 1, "calibration file not found"),
    C("quantize-calibration-names", "quantize", "calibration .npz with the wrong array names",
      lambda d, a, mp: _quantize(d, a, "--calibration", str(npz(d / "c.npz", ids=np.zeros((2, 8), np.int64)))), 1,
      "does not fit the model"),
    C("quantize-calibration-vocab", "quantize", "calibration .npz with token ids outside the vocabulary",
      lambda d, a, mp: _quantize(d, a, "--calibration",
                                 str(npz(d / "c.npz", input_ids=np.full((2, 8), 999, np.int64)))), 1,
      "does not fit the model"),
    C("quantize-calibration-text-no-metadata", "quantize", "calibration text for a model without moeport metadata",
      lambda d, a, mp: _quantize(d, a, "--calibration", str(write(d / "c.txt", "some text")),
                                 model_path=no_metadata_model(d / "m.onnx")), 1, "needs the model's vocabulary size"),
    C("quantize-enospc", "quantize", "disk full while writing the model", _quantize_enospc, 1,
      "no space left on device writing"),
    C("quantize-file-no-output", "quantize", "a model file without -o",
      lambda d, a, mp: ["quantize", str(model(d, a)), "--mode", "fp16"], 2, "give -o FILE"),
    C("quantize-folder-with-output", "quantize", "a model folder with -o",
      lambda d, a, mp: ["quantize", str(folder(d, a)), "-o", str(d / "q.onnx"), "--mode", "fp16"], 2,
      "-o is not taken with a model folder"),
    C("quantize-folder-model-missing", "quantize", "model folder whose model file is missing",
      lambda d, a, mp: ["quantize", str(folder(d, a, lambda p: (p / "model.onnx").unlink())), "--mode", "fp16"], 1,
      "is a genai folder but its model file model.onnx is missing"),
    C("quantize-folder-variant-exists", "quantize", "model folder that already has the variant, no --force",
      _quantize_variant_exists, 1, "already exists; pass --force"),
    C("quantize-hard-linked-data", "quantize", "external data with a second hard link",
      lambda d, a, mp: _quantize(d, a, "--mode", "int4", model_path=hard_linked_data_model(d, a)), 1,
      "has 2 hard links, which onnx_ir refuses to read"),
    C("quantize-folder-kv-cache", "quantize", "a model folder with --kv-cache",
      lambda d, a, mp: ["quantize", str(folder(d, a)), "--mode", "int4", "--kv-cache", "shared"], 2,
      "--kv-cache is not taken with a model folder: its runtime's config fixes the cache"),
    C("quantize-kv-cache-no-cache", "quantize", "--kv-cache shared for a model without a KV cache",
      lambda d, a, mp: _quantize(d, a, "--mode", "int4", "--kv-cache", "shared"), 1,
      "--kv-cache applies to text-generation-with-past exports"),
    C("quantize-kv-cache-not-fused", "quantize", "--kv-cache shared for fp16 (no fused attention)",
      lambda d, a, mp: _quantize(d, a, "--mode", "fp16", "--kv-cache", "shared",
                                 model_path=folder(d, a) / "model.onnx"), 1,
      "--kv-cache shared on a Concat-cache export needs its attention fused"),
    # generate
    C("generate-model-missing", "generate", "model path does not exist",
      lambda d, a, mp: _generate(d / "nope.onnx", "--prompt-ids", "1,2"), 1, "model file not found"),
    C("generate-not-onnx", "generate", "a text file named .onnx",
      lambda d, a, mp: _generate(write(d / "m.onnx", "hello, not a model\n"), "--prompt-ids", "1,2"), 1,
      "is not a readable ONNX model"),
    C("generate-bad-prompt", "generate", "--prompt-ids that do not parse",
      lambda d, a, mp: _generate(model(d, a), "--prompt-ids", "1,x"), 2, "cannot parse --prompt-ids"),
    C("generate-token-too-big", "generate", "prompt token id >= vocabulary size",
      lambda d, a, mp: _generate(model(d, a), "--prompt-ids", "1,999"), 1, "outside the model's vocabulary"),
    C("generate-no-kv-cache", "generate", "a logits model (no KV-cache inputs)",
      lambda d, a, mp: _generate(model(d, a), "--prompt-ids", "1,2"), 1, "has no KV-cache inputs"),
    C("generate-unknown-provider", "generate", "unknown --ep",
      lambda d, a, mp: _generate(model(d, a), "--prompt-ids", "1,2", "--ep", "nope"), 1,
      "unknown execution provider 'nope'"),
    C("generate-zero-tokens", "generate", "--max-new-tokens 0",
      lambda d, a, mp: _generate(model(d, a), "--prompt-ids", "1,2", "--max-new-tokens", "0"), 2,
      "--max-new-tokens must be at least 1"),
    C("generate-prompt-no-tokenizer", "generate", "--prompt for a model file outside a model folder, no --checkpoint",
      lambda d, a, mp: _generate(Path(shutil.copyfile(a.folder / "model.onnx", d / "m.onnx")), "--prompt", "hi"), 2,
      "--prompt needs a tokenizer"),
    C("generate-not-a-folder", "generate", "a directory that is no model folder",
      lambda d, a, mp: _generate(write(d / "dir" / "notes.txt", "x").parent, "--prompt", "hi"), 1,
      "is not a model folder"),
    C("generate-folder-model-missing", "generate", "model folder whose model file is missing",
      lambda d, a, mp: _generate(folder(d, a, lambda p: (p / "model.onnx").unlink()), "--prompt", "hi"), 1,
      "is a genai folder but its model file model.onnx is missing"),
    C("generate-folder-no-tokenizer", "generate", "model folder without tokenizer.json",
      lambda d, a, mp: _generate(folder(d, a, lambda p: (p / "tokenizer.json").unlink()), "--prompt", "hi"), 1,
      "has no tokenizer.json"),
    C("generate-folder-genai-config", "generate", "model folder whose genai_config.json does not fit the model",
      lambda d, a, mp: _generate(folder(d, a, _edit_json("genai_config.json",
                                                         lambda c: c["model"]["decoder"].update(head_size=64))),
                                 "--prompt", "hi"), 1, "decoder.head_size is 64, the model's is 8"),
    C("generate-folder-config-vocab", "generate", "model folder whose config.json names another vocabulary",
      lambda d, a, mp: _generate(folder(d, a, _edit_json("config.json", lambda c: c.update(vocab_size=99))),
                                 "--prompt", "hi"), 1, "does not match"),
]


# -- running them -------------------------------------------------------------------------------------


#: Files above this size are compared by size and modification time instead of a hash of their content: the
#: oversized-model case's 2.4 GB sparse weight file took most of its case's 20 s to hash, twice.
SNAPSHOT_HASH_LIMIT = 64 << 20


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with its content hash (size and mtime above
    ``SNAPSHOT_HASH_LIMIT``): what must not change."""
    files = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if not path.is_file():
            files[key] = "dir"
            continue
        stat = path.stat()
        if stat.st_size > SNAPSHOT_HASH_LIMIT:
            files[key] = f"{stat.st_size} bytes, modified {stat.st_mtime_ns}"
            continue
        with open(path, "rb") as handle:
            files[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return files


@dataclass
class Outcome:
    code: int
    stderr: str
    before: dict
    after: dict
    directory: Path

    @property
    def message(self) -> str:
        """The stderr line as the table shows it: the case's directory as DIR."""
        return self.stderr.strip().replace(str(self.directory), "DIR")


_OUTCOMES: dict[str, Outcome] = {}


def run_case(case: Case, root: Path, artifacts: Artifacts, capsys) -> Outcome:
    directory = root / case.id
    directory.mkdir()
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        argv = case.setup(directory, artifacts, mp)
        before = snapshot(directory)
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
    err = capsys.readouterr().err
    outcome = Outcome(exit_info.value.code, err, before, snapshot(directory), directory)
    _OUTCOMES[case.id] = outcome
    return outcome


@pytest.fixture(scope="module")
def artifacts(sample_checkpoint, exported, deployed) -> Artifacts:
    return Artifacts(sample_checkpoint("topk"), sample_checkpoint("switch"), exported("topk").output,
                     deployed("mixtral").folder)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, artifacts, tmp_path, capsys):
    outcome = run_case(case, tmp_path, artifacts, capsys)
    lines = outcome.stderr.strip().splitlines()
    assert "Traceback" not in outcome.stderr
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert case.expect in lines[0], lines[0]
    assert outcome.code == case.exit_code, lines[0]
    assert outcome.after == outcome.before, "files were left behind or changed"


def test_debug_shows_the_traceback(artifacts, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--debug", "export", str(tmp_path / "nope"), "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: checkpoint directory not found")


def render_table(outcomes: dict[str, Outcome]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "# Errors",
        "",
        "What each `moeport` command prints for bad input. Every message is one line on stderr, without a",
        "traceback (`moeport --debug ...` shows it); exit code 2 is a usage error, 1 any other error. No",
        "command leaves a partial output behind or overwrites an existing one without `--force`. Ctrl-C prints",
        "`error: aborted` (exit code 1), a SIGTERM (`kill`, a job scheduler) `error: terminated` (143); both remove",
        "the command's staging and work directories. A process killed outright (SIGKILL, out of memory) cannot: the",
        "next command writing that output warns of its hidden directories, with their size.",
        "",
        "Generated from the cases in `tests/test_bad_inputs.py` (`DIR` is the case's directory); regenerate",
        "with `python -m pytest tests/test_bad_inputs.py --regen`.",
        "",
        "| command | bad input | message the user sees | exit code |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        outcome = outcomes[case.id]
        # Double backticks: some messages quote a command in single backticks.
        lines.append(f"| `{case.command}` | {cell(case.bad_input)} | `` {cell(outcome.message)} `` | {outcome.code} |")
    return "\n".join(lines) + "\n"


def test_errors_table_is_current(artifacts, tmp_path, capsys, request):
    """docs/errors.md is what the cases produce (cases not run in this session run here)."""
    for case in CASES:
        if case.id not in _OUTCOMES:
            run_case(case, tmp_path, artifacts, capsys)
    table = render_table(_OUTCOMES)
    if request.config.getoption("--regen"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(table)
    assert DOC.is_file(), "docs/errors.md is missing: python -m pytest tests/test_bad_inputs.py --regen"
    assert DOC.read_text() == table, "docs/errors.md is out of date: python -m pytest tests/test_bad_inputs.py --regen"
