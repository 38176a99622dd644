"""Shared fixtures: sample checkpoints and exported models, built once per test session.

Exports take seconds each, so tests ask for them through these caching factories instead of
exporting the same thing again.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest

from moeport.exporter.export import export_checkpoint
from moeport.samples.catalog import create_sample
from tiny_hf import DEPLOYED, save_bpe_tokenizer

@dataclass(frozen=True)
class Deployed:
    checkpoint: Path  # config.json, model.safetensors, generation_config.json, tokenizer (save_pretrained)
    folder: Path  # `moeport export --layout genai` of it
    model: object  # the transformers model (eval mode)
    tokenizer: object  # its transformers tokenizer

    @property
    def onnx(self) -> Path:
        return self.folder / "model.onnx"

import hf_families  # tests/hf_families.py


@pytest.fixture(scope="session", autouse=True)
def _no_transformers_progress_bars():
    """Tests save tiny checkpoints with save_pretrained, whose progress bars would land in the captured output
    that the one-line-error tests read (moeport turns them off only while it loads, and puts them back)."""
    try:
        from transformers.utils import logging
    except ImportError:
        yield
        return
    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture(scope="session", autouse=True)
def _worker_threads():
    """Under pytest-xdist, each worker's torch and onnxruntime sessions get this worker's share of the cores
    (one each for two workers on two cores). By default each takes every core, and onnxruntime's threads spin
    while they wait: two workers then run four or more busy threads on two cores, and the exports' tracing,
    which is single-threaded Python, waits for a core. A session given a thread count keeps it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not workers:
        yield
        return
    import onnxruntime as ort
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // workers)
    threads_before = torch.get_num_threads()
    open_session = ort.InferenceSession.__init__

    def open_with_share(self, path_or_bytes, sess_options=None, *args, **kwargs):
        sess_options = sess_options or ort.SessionOptions()
        if not sess_options.intra_op_num_threads:  # 0: onnxruntime's default, every core
            sess_options.intra_op_num_threads = share
        open_session(self, path_or_bytes, sess_options, *args, **kwargs)

    torch.set_num_threads(share)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ort.InferenceSession, "__init__", open_with_share)
        yield
    torch.set_num_threads(threads_before)


def _shared_directory(tmp_path_factory, name: str) -> Path:
    """A directory of this test run that every pytest-xdist worker sees (created if missing)."""
    basetemp = tmp_path_factory.getbasetemp()
    # a worker's basetemp is <run>/popen-gwN: the run's directory is the one every worker sees
    root = (basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp) / name
    root.mkdir(exist_ok=True)
    return root


def _built_once(root: Path, name: str, build):
    """``build()``'s result, built by the first pytest-xdist worker to ask, under the file lock ``root/name.lock``,
    and left pickled beside its files (``root/name.result.pickle``); the other workers wait for the lock and read
    it. A build that raises leaves nothing, so the next to ask builds again."""
    from filelock import FileLock  # torch's own dependency

    pickled = root / f"{name}.result.pickle"
    with FileLock(root / f"{name}.lock"):
        if pickled.exists():
            return pickle.loads(pickled.read_bytes())
        result = build()
        pickled.write_bytes(pickle.dumps(result))
        return result


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moeport")


@pytest.fixture(scope="session")
def sample_checkpoint(tmp_path_factory):
    """sample_checkpoint(name) -> Path of that sample's checkpoint directory (created once a test run, under a
    file lock: the pytest-xdist workers share it, like ``hf_export``'s files)."""
    root = _shared_directory(tmp_path_factory, "checkpoints")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = _built_once(root, name, lambda: create_sample(name, root / name))
        return made[name]

    return make


@pytest.fixture(scope="session")
def exported(tmp_path_factory, sample_checkpoint):
    """exported(name, **export options) -> ExportResult, cached per (name, options) for the test run: the first
    pytest-xdist worker to ask exports under a file lock and leaves the result pickled beside the file, as
    ``hf_export`` does (tests read these files and write their own elsewhere)."""
    root = _shared_directory(tmp_path_factory, "models")
    cache: dict = {}

    def export(name: str, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            stem = f"{name}.{'-'.join(f'{k}={v}' for k, v in sorted(options.items())) or 'default'}"
            cache[key] = _built_once(root, stem, lambda: export_checkpoint(sample_checkpoint(name),
                                                                           root / f"{stem}.onnx", **options))
        return cache[key]

    return export


@pytest.fixture(scope="session")
def hf_export(tmp_path_factory):
    """hf_export(model_type, variant="default", validate=True) -> (ExportResult, checkpoint dir) of a tiny random
    transformers checkpoint, cached for the session: the family tests and the quantization tests share them
    (the first caller's ``validate`` decides; the family tests need the validated export).

    Shared by the pytest-xdist workers too: those two test files usually run on different workers, and each
    export takes seconds. The first worker to ask exports under a file lock and leaves the result pickled beside
    the files; the others wait for the lock and read it. Tests read these files and write their own elsewhere."""
    root = _shared_directory(tmp_path_factory, "hf_families")
    cache: dict = {}

    def make(model_type: str, variant: str = "default", validate: bool = True):
        key = (model_type, variant)
        if key not in cache:
            name = f"{model_type}.{variant}"
            checkpoint = root / name

            def build():
                model = hf_families.random_model(model_type, **hf_families.variants(model_type)[variant])
                model.save_pretrained(checkpoint)
                return export_checkpoint(checkpoint, root / f"{name}.onnx", with_routing=True, validate=validate)

            cache[key] = (_built_once(root, name, build), checkpoint)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def deployed(tmp_path_factory):
    """deployed(model_type, kv_cache="concat") -> Deployed: a tiny random checkpoint of that family
    (tests/hf_families.py) with a BPE tokenizer, exported once per test run with ``--task
    text-generation-with-past --layout genai`` (and ``--kv-cache``, sharing the checkpoint).

    Shared by the pytest-xdist workers like ``hf_export``: the first worker to ask exports under a file lock and
    marks the folder once its validation passed (``_built_once``); the others wait for the lock, then build the same seeded
    transformers model and load the saved tokenizer. (Several test files deploy the same families; on different
    workers each had exported them again.)"""
    from filelock import FileLock  # torch's own dependency
    from transformers import PreTrainedTokenizerFast

    root = _shared_directory(tmp_path_factory, "deployed")
    made: dict[str, Deployed] = {}

    def export_once(checkpoint: Path, folder: Path, **options) -> None:
        def build() -> None:  # nothing to keep: the pickle beside the folder says its validation passed
            result = export_checkpoint(checkpoint, folder, task="text-generation-with-past", layout="genai",
                                       **options)
            assert result.validation.passed, result.validation.to_dict()

        _built_once(folder.parent, folder.name, build)

    def make(model_type: str, kv_cache: str = "concat") -> Deployed:
        if kv_cache != "concat":
            key = f"{model_type}-{kv_cache}"
            if key not in made:
                source = make(model_type)
                folder = source.folder.parent / f"genai-{kv_cache}"
                export_once(source.checkpoint, folder, kv_cache=kv_cache)
                made[key] = Deployed(source.checkpoint, folder, source.model, source.tokenizer)
            return made[key]
        if model_type not in made:
            options, bos = DEPLOYED[model_type]
            variant = hf_families.VARIANTS.get(model_type, {}).get(options.get("variant"), {})
            base = root / model_type
            base.mkdir(exist_ok=True)
            checkpoint = base / "checkpoint"
            model = hf_families.random_model(model_type, **variant)  # seeded: the same weights on every worker
            with FileLock(base / "checkpoint.lock"):
                if (checkpoint / "tokenizer.json").exists():
                    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
                else:
                    model.save_pretrained(checkpoint)
                    tokenizer = save_bpe_tokenizer(checkpoint, vocab_size=model.config.vocab_size, bos=bos)
            export_once(checkpoint, base / "genai")
            made[model_type] = Deployed(checkpoint, base / "genai", model, tokenizer)
        return made[model_type]

    return make


@pytest.fixture(scope="session")
def routed_segments():
    """routed_segments(model) -> [outputs of each Split cut by a computed ``split`` input] for an onnx.ModelProto.

    That is the sorted dispatch's footprint: the slots sorted by expert are cut into one segment per expert
    by counts computed from the routing (not a constant), and every segment feeds a MatMul, so each expert
    multiplies only its own rows. A dense or routing-frozen graph has no such Split. One entry per layer: the
    gated rows cut again by the same counts for the down projections are the same layer's.
    """

    def segments(model) -> list[int]:
        graph = model.graph
        constants = {init.name for init in graph.initializer}
        constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
        consumers: dict[str, list[str]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node.op_type)
        found: dict[str, int] = {}  # counts -> segments
        for node in graph.node:
            if node.op_type == "Split" and len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
                assert all("MatMul" in consumers.get(out, []) for out in node.output), "a segment bypasses MatMul"
                assert found.setdefault(node.input[1], len(node.output)) == len(node.output)
        return list(found.values())

    return segments


def pytest_addoption(parser):
    parser.addoption("--regen", action="store_true",
                     help="rewrite generated docs (docs/errors.md) from the test cases instead of only checking them")
