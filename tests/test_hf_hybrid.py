"""Hybrid MoE families: linear-attention, Mamba or short-convolution token mixers beside attention
(exporter/hf_mixers.py), and multimodal wrappers' language models with past.

Each family's tiny random checkpoint exports with dynamic batch and sequence; the with-past graph carries the
mixers' states (``past_conv.{i}``, ``past_recurrent.{i}`` / ``past_ssm.{i}``) beside the attention layers' KV cache,
and greedy decoding on onnxruntime gives transformers' ``generate`` tokens (32, one prompt and a left-padded
batch). Logits parity at 1x1, 2x9 and 3x33 (left padding too) with routing agreement 1.0 is checked for every
supported family by tests/test_hf_families.py, these included. One export per family and task on a 2-core
machine: all but ``EVERY_RUN`` are ``slow``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

import hf_families  # noqa: E402  (tests/, on sys.path)
from moeport import contract  # noqa: E402
from moeport.exporter import families, hf_mixers, strategies  # noqa: E402
from moeport.exporter.export import export_checkpoint  # noqa: E402
from moeport.exporter.hf import CausalLMAdapter  # noqa: E402
from moeport.exporter.patching import Patcher  # noqa: E402
from moeport.errors import MoeportError  # noqa: E402
from moeport.runtime.generate import decoder_feeds, empty_past, generate  # noqa: E402
from moeport.runtime.layouts import layout_names, write_folder  # noqa: E402
from moeport.runtime.session import create_session  # noqa: E402
from test_hf_families import assert_parity  # noqa: E402
from tiny_hf import PADDED, PROMPT, transformers_generate  # noqa: E402

# The default run exports two: a Gated DeltaNet model with past (the most common hybrid on devices) and a Mamba2
# model's logits (another recurrence); the rest under -m slow (one export each, 15-50 s on a 2-core machine).
EVERY_RUN = {"text-generation-with-past": "qwen3_5_moe_text", "logits": "granitemoehybrid"}
# With past: every hybrid that has it (hf_families.LIMITS), and multimodal wrappers (their language model's cache,
# the wrapper's own generate).
WITH_PAST = [t for t in (*hf_families.HYBRID, "qwen3_5_moe", "qwen4_exp", "gemma4", "dots3_note")
             if not any(limit.task == "text-generation-with-past" for limit in hf_families.limits(t))]
CASES = [pytest.param(t, marks=[] if t == EVERY_RUN["text-generation-with-past"] else [pytest.mark.slow])
         for t in WITH_PAST]


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """hybrid(model_type, task) -> (ExportResult, checkpoint dir, eager transformers model), cached."""
    root = tmp_path_factory.mktemp("hybrid")
    made: dict = {}

    def make(model_type: str, task: str):
        if (model_type, task) not in made:
            checkpoint = root / model_type
            model = hf_families.random_model(model_type)
            if not checkpoint.exists():
                model.save_pretrained(checkpoint)
            result = export_checkpoint(checkpoint, root / f"{model_type}.{task}.onnx", task=task,
                                       with_routing=task == "logits")
            assert result.validation.passed, result.validation.to_dict()
            made[model_type, task] = (result, checkpoint, model)
        return made[model_type, task]

    return make


def test_hybrid_logits_parity(hybrid):
    """The every-run representative (every hybrid: tests/test_hf_families.py under -m slow)."""
    result, checkpoint, _ = hybrid(EVERY_RUN["logits"], "logits")
    assert result.strategy == "sorted"
    assert_parity(result.output, checkpoint)


@pytest.mark.parametrize("model_type", CASES)
def test_hybrid_with_past_generates_like_transformers(hybrid, model_type):
    result, _, model = hybrid(model_type, "text-generation-with-past")
    graph = onnx.load(str(result.output), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    outputs = {o.name for o in graph.graph.output}
    layout = families.load_checkpoint(result.output.parent / model_type).model.cache_layout()
    assert [name for name in inputs if contract.is_cache_input(name)] == [entry.past for entry in layout]
    assert {contract.present_for(entry.past) for entry in layout} <= outputs
    states = [entry for entry in layout if entry.part in contract.STATE_KINDS]
    assert any(entry.part == "key" for entry in layout)
    if (hf_families.text_model_type(model_type) or model_type) in hf_families.HYBRID:
        assert states, "a hybrid's cache has recurrent states beside the KV cache"
    for entry in states:  # fixed shape after a symbolic batch axis
        assert inputs[entry.past][0] == "batch" and inputs[entry.past][1:] == list(entry.shape)
    for prompts in ([PROMPT], PADDED):
        assert generate(result.output, prompts, max_new_tokens=32).token_ids == transformers_generate(model, prompts)


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=[] if t in EVERY_RUN.values() else [pytest.mark.slow])
                                        for t in hf_families.HYBRID])
def test_the_tiny_models_recurrence_matters(model_type, monkeypatch):
    """The recurrence's share of the tiny model's logits is far above the parity tolerance, so a scan wrong by more
    than a percent of it fails parity (with the default initializer range some tiny models' share stays below the
    tolerance)."""
    model = hf_families.random_model(model_type)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])
    scan, scanned = hf_mixers.scan_tokens, []

    def without_output(*args):
        scanned.append(True)
        state, out = scan(*args)
        return state, out * 0

    with torch.no_grad(), Patcher(hf_mixers.mixer_patches(model)):
        logits = model(input_ids=ids).logits
        monkeypatch.setattr(hf_mixers, "scan_tokens", without_output)
        without = model(input_ids=ids).logits
    if not scanned:
        pytest.skip(f"{model_type}'s mixer has no recurrence (a convolution only)")
    assert (logits - without).abs().max() > 100 * families.get_family("transformers").tolerance


def test_every_registered_mixer_is_in_a_tested_hybrid_family():
    found = {type(m).__name__ for t in hf_families.HYBRID for m in hf_families.random_model(t).modules()}
    assert set(hf_mixers.MIXERS) <= found
    for model_type in hf_families.HYBRID:
        assert hf_mixers.mixer_patches(hf_families.random_model(model_type)), f"{model_type}: no mixer to patch"


def test_mixer_patches_are_restored_and_compute_what_transformers_does():
    model = hf_families.random_model("qwen3_next")
    loaded = families.from_module("transformers", CausalLMAdapter(model))
    mixers = [m for m in model.modules() if hf_mixers.mixer_of(m) is not None]
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with strategies.use_strategy(loaded.sites, strategies.get_strategy("sorted"), strategies.StrategyOptions(),
                                     families.export_patches(loaded)):
            assert all("forward" in vars(m) for m in mixers)
            patched = model(input_ids=ids).logits
    assert not any("forward" in vars(m) for m in mixers)
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [1, 9, 70])
@pytest.mark.parametrize("with_state", [False, True])
def test_gated_delta_rule_matches_transformers(length, with_state):
    """The per-token recurrence equals transformers' chunked form (chunks of 64: 70 tokens cross a chunk boundary),
    with grouped value heads, from zeros or from a given state."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    generator = torch.Generator().manual_seed(length)
    q, k = (torch.randn(2, length, 2, 8, generator=generator) for _ in range(2))
    v = torch.randn(2, length, 4, 8, generator=generator)
    g = -torch.rand(2, length, 4, generator=generator)
    beta = torch.rand(2, length, 4, generator=generator)
    state = torch.randn(2, 4, 8, 8, generator=generator) if with_state else None
    expected, expected_state = torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                            output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, final = hf_mixers.delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, expected_state, atol=1e-5, rtol=1e-5)


def test_causal_conv_continues_from_its_state():
    """Two calls, the second from the first's state, give one call's output over the whole sequence."""
    from transformers.models.qwen3_next.modeling_qwen3_next import causal_conv1d_fn

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, generator=generator)
    weight, bias = torch.randn(6, 4, generator=generator), torch.randn(6, generator=generator)
    whole, _ = hf_mixers.causal_conv(x, None, weight, bias, "silu")
    torch.testing.assert_close(whole, causal_conv1d_fn(x, weight, bias, activation="silu"))
    first, state = hf_mixers.causal_conv(x[..., :2], None, weight, bias, "silu")  # shorter than the kernel
    second, _ = hf_mixers.causal_conv(x[..., 2:], state, weight, bias, "silu")
    torch.testing.assert_close(torch.cat([first, second], dim=-1), whole)


def test_state_names_follow_transformers_js():
    assert contract.state_past_name(3, "conv") == "past_conv.3"
    assert contract.state_present_name(3, "recurrent") == "present_recurrent.3"
    assert contract.present_for("past_ssm.0") == "present_ssm.0"
    assert contract.present_for("past_key_values.2.value") == "present.2.value"
    assert contract.is_cache_input("past_recurrent.1") and not contract.is_cache_input("past_something.1")
    with pytest.raises(ValueError, match="unknown state kind 'kv'"):
        contract.state_past_name(0, "kv")
    with pytest.raises(ValueError, match="is not a past_key_values or recurrent-state input"):
        contract.present_for("attention_mask")


def test_empty_past_gives_zero_states_and_empty_kv():
    class Spec:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    specs = [Spec("input_ids", ["batch", "sequence"]), Spec("past_key_values.1.key", ["batch", 2, "past_sequence", 8]),
             Spec("past_conv.0", ["batch", 64, 4]), Spec("past_recurrent.0", ["batch", 4, 8, 8])]
    past = empty_past(specs, 3)
    assert {name: a.shape for name, a in past.items()} == {
        "past_key_values.1.key": (3, 2, 0, 8), "past_conv.0": (3, 64, 4), "past_recurrent.0": (3, 4, 8, 8)}
    assert not any(a.any() for a in past.values())


def test_with_past_graph_refuses_a_state_of_the_wrong_shape(hybrid):
    """A recurrent state's shape is fixed in the graph: onnxruntime rejects another one before running."""
    result, _, _ = hybrid(EVERY_RUN["text-generation-with-past"], "text-generation-with-past")
    session = create_session(result.output)
    past = empty_past(session.get_inputs(), 1)
    name = next(n for n in past if n.startswith("past_recurrent."))
    past[name] = np.zeros((1, *np.array(past[name].shape[1:]) + 1), dtype=np.float32)
    with pytest.raises(Exception, match="dimension|Got invalid dimensions"):
        session.run(None, decoder_feeds(np.ones((1, 2), np.int64), np.array([[1, 2]]), past))


def test_a_state_no_mixer_carries_is_refused_in_one_line(monkeypatch):
    """A layer whose state moeport does not know how to carry refuses the with-past task instead of exporting a
    graph that forgets it."""
    monkeypatch.delitem(hf_mixers.MIXERS, "Lfm2MoeShortConv")
    adapter = CausalLMAdapter(hf_families.random_model("lfm2_moe"))
    with pytest.raises(MoeportError, match="Lfm2MoeForCausalLM: layer 0 keeps a recurrent state that moeport cannot "
                                           "carry between steps yet; export it with --task logits"):
        adapter.cache_layout()


def test_a_cache_layer_with_state_beside_its_keys_is_refused_in_one_line(tmp_path):
    """DeepSeek-V4's attention cache keeps its compressor's buffers beside the keys and values: the with-past task
    stops in one line naming them (torch.export failed on them before), and nothing is written."""
    checkpoint = tmp_path / "deepseek_v4"
    hf_families.random_model("deepseek_v4").save_pretrained(checkpoint)
    message = (r"^DeepseekV4ForCausalLM: layer 0's cache \(DeepseekV4HCACache\) keeps state beside its keys and values "
               r"\(buffer_gate, buffer_kv, compressed_kv\) that moeport cannot carry between steps yet; export it with "
               r"--task logits$")
    with pytest.raises(MoeportError, match=message):
        export_checkpoint(checkpoint, tmp_path / "model.onnx", task="text-generation-with-past")
    assert not (tmp_path / "model.onnx").exists()


def test_runtime_folders_refuse_recurrent_states(hybrid, tmp_path):
    """No folder layout's runtime config describes recurrent states yet: writing one is refused in one line, and
    nothing is written."""
    result, checkpoint, _ = hybrid(EVERY_RUN["text-generation-with-past"], "text-generation-with-past")
    for layout in layout_names():
        with pytest.raises(MoeportError, match=r"carries recurrent states \(past_(conv|recurrent|ssm)\.\d+, \.\.\.\) "
                                               r"that no runtime folder layout describes yet; run the \.onnx file"):
            write_folder(layout, result.output, checkpoint, tmp_path / layout)
    assert list(tmp_path.iterdir()) == []
