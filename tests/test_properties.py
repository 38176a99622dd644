"""Property and fuzz tests (hypothesis), bounded for CI and derandomized so a failure reproduces.

- ``test_random_configs_match_pytorch``: random sample-family configs (experts 1-16, top-k 1..E, router
  kind, shared experts, sizes), exported in-process with routing outputs, agree with PyTorch on random
  batch/sequence shapes: max abs error <= 1e-4 and routing agreement 1.0 (on tie-free inputs: a router
  near-tie may legitimately flip).
- ``test_fuzz_*``: mutated .onnx, config.json and .safetensors files fed to the loaders; the only
  exception that may come out is MoeportError (anything else is a bug to fix, not to catch here).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moeport.errors import MoeportError
from moeport.exporter import families
from moeport.exporter.export import export_model
from moeport.runtime.compare import Comparator
from moeport.runtime.session import create_session
from moeport.samples.model import ROUTER_KINDS, LMConfig, MoEConfig, MoELM

PROPERTY = settings(max_examples=8, deadline=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def lm_configs(draw):
    num_experts = draw(st.integers(1, 16))
    router = draw(st.sampled_from(ROUTER_KINDS))
    top_k = num_experts if router == "soft" else draw(st.integers(1, num_experts))
    num_heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, router=router, norm_topk_prob=draw(st.booleans()),
                    intermediate_size=draw(st.sampled_from([8, 16, 32])),
                    num_shared_experts=draw(st.integers(0, 1)),
                    routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])))
    return LMConfig(vocab_size=draw(st.integers(8, 96)), hidden_size=num_heads * head_dim,
                    num_layers=draw(st.integers(1, 2)), num_heads=num_heads,
                    num_kv_heads=draw(st.sampled_from([k for k in (1, 2, 4) if num_heads % k == 0])), moe=moe)


@PROPERTY
@given(config=lm_configs(), seed=st.integers(0, 2**16),
       shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 40)), min_size=1, max_size=3))
def test_random_configs_match_pytorch(tmp_path_factory, config, seed, shapes):
    moe = config.moe
    event(f"{moe.router} E={moe.num_experts} k={moe.top_k} shared={moe.num_shared_experts}")  # --hypothesis-show-statistics
    torch.manual_seed(seed)
    model = MoELM(config).eval()
    with torch.no_grad():  # non-zero correction biases, so sigmoid selection by score + bias is exercised
        for name, buffer in model.named_buffers():
            if name.endswith("score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape) * 0.1)
    loaded = families.from_module("moeport_lm", model, config.to_dict())
    out = tmp_path_factory.mktemp("prop") / "m.onnx"
    export_model(loaded, out, with_routing=True, validate=False)  # checked here, on other shapes
    session = create_session(out, "cpu")
    names = [o.name for o in session.get_outputs()]
    comparator = Comparator(atol=1e-4, min_routing_agreement=1.0)
    for i, (batch, seq) in enumerate(shapes):
        inputs = families.tie_free_inputs(loaded, batch, seq, seed + i)
        comparison = comparator.compare(families.reference_outputs(loaded, inputs),
                                        dict(zip(names, session.run(None, inputs))), loaded.info.layers)
        assert comparison.max_abs_err <= 1e-4, (config, batch, seq, comparison.to_dict())
        assert comparison.routing_agreement == 1.0, (config, batch, seq, comparison.to_dict())
        assert comparison.passed


# -- fuzzing the loaders ------------------------------------------------------------------------------

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def mutations(draw, size: int, hot: int):
    """A list of byte edits to a file of ``size`` bytes; most land in the first or last ``hot`` bytes
    (headers, graph structure, ONNX metadata at the end), where a flipped byte changes meaning rather
    than one weight."""
    edits = []
    for _ in range(draw(st.integers(1, 8))):
        region = draw(st.sampled_from(["head", "tail", "anywhere"]))
        low = max(0, size - hot) if region == "tail" else 0
        high = min(hot, size) if region == "head" else size
        position = draw(st.integers(low, max(low, high - 1)))
        edits.append((draw(st.sampled_from(["flip", "set", "truncate", "delete", "insert"])), position,
                      draw(st.integers(0, 255))))
    return edits


def mutate(data: bytes, edits, allow_growth: bool = True) -> bytes:
    out = bytearray(data)
    for kind, position, value in edits:
        position = min(position, max(len(out) - 1, 0))
        if not out:
            break
        if kind == "flip":
            out[position] ^= 1 << (value % 8)
        elif kind == "set":
            out[position] = value
        elif kind == "truncate":
            del out[position:]
        elif kind == "delete":
            del out[position]
        elif allow_growth:
            out.insert(position, value)
    return bytes(out)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A small exported model with routing outputs: the .onnx to mutate, plus its checkpoint pieces."""
    torch.manual_seed(0)
    config = LMConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=8))
    loaded = families.from_module("moeport_lm", MoELM(config).eval(), config.to_dict())
    root = tmp_path_factory.mktemp("fuzz")
    export_model(loaded, root / "m.onnx", with_routing=True, validate=False)
    from moeport.samples.checkpoint import save_checkpoint

    save_checkpoint(loaded.model, config.to_dict(), root / "ckpt")
    return root


ONNX_SIZE_HINT = 4096


@settings(FUZZ, max_examples=1500)
@given(data=st.data())
def test_fuzz_onnx_loaders(small_model, tmp_path_factory, data):
    from moeport.contract import model_info, vocab_size

    original = (small_model / "m.onnx").read_bytes()
    edits = data.draw(mutations(len(original), ONNX_SIZE_HINT))
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    path.write_bytes(mutate(original, edits))
    try:
        model_info(path)
        session = create_session(path, "cpu")
        vocab_size(session.get_modelmeta().custom_metadata_map)
    except MoeportError:
        pass


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_fuzz_config_json(small_model, tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("cfg") / "ckpt"
    shutil.copytree(small_model / "ckpt", directory)
    text = (directory / "config.json").read_bytes()
    if data.draw(st.booleans()):
        # Byte edits without growth: a digit can change, but no size grows by orders of magnitude (memory).
        (directory / "config.json").write_bytes(mutate(text, data.draw(mutations(len(text), len(text))), False))
    else:
        config = json.loads(text)
        small = st.integers(-2, 40)
        values = st.recursive(st.none() | st.booleans() | small | st.floats(-2, 40) | st.text(max_size=8),
                              lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=6)
        for _ in range(data.draw(st.integers(1, 3))):
            nested = isinstance(config.get("moe"), dict) and data.draw(st.booleans())
            target = config["moe"] if nested else config
            key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=6))
            target[key] = data.draw(values)
        (directory / "config.json").write_text(json.dumps(config))
    try:
        families.load_checkpoint(directory)
    except MoeportError:
        pass


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_fuzz_safetensors(small_model, tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("st") / "ckpt"
    shutil.copytree(small_model / "ckpt", directory)
    weights = directory / "model.safetensors"
    original = weights.read_bytes()
    header = 8 + int.from_bytes(original[:8], "little")
    weights.write_bytes(mutate(original, data.draw(mutations(len(original), header))))
    try:
        families.load_checkpoint(directory)
    except MoeportError:
        pass


def test_fuzz_inputs_npz(small_model, tmp_path):
    """run's input checks: arrays of every rank/dtype/range give MoeportError before onnxruntime runs."""
    from moeport.runtime.run import run_model

    rng = np.random.default_rng(0)
    for dtype in (np.int64, np.int32, np.float32, np.bool_, np.uint8):
        for shape in ((), (3,), (1, 0), (2, 3), (1, 2, 3)):
            ids = (rng.integers(-5, 40, size=shape)).astype(dtype)
            try:
                run_model(small_model / "m.onnx", {"input_ids": ids})
            except MoeportError:
                pass
