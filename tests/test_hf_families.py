"""Every transformers MoE family on the experts interface: tiny random checkpoint -> ONNX -> parity.

The twelve families of issue 3 and their MoE config variants run on every test run (variants that only
change top-k, and the other discovered families, are ``slow``: one export each, ~15-30 s on the 2-core
test machine). Families recorded as unsupported are re-checked: the recorded reason must still hold.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")

from moeport import contract  # noqa: E402
from moeport.exporter import families  # noqa: E402
import hf_families  # noqa: E402  (tests/, on sys.path)
from tiny_hf import tiny_switch_config  # noqa: E402
from moeport.exporter.export import export_checkpoint  # noqa: E402
from moeport.exporter.hf import CausalLMAdapter  # noqa: E402
from moeport.exporter.reference import verify_checkpoint  # noqa: E402
from moeport.runtime.session import create_session  # noqa: E402
from locked import is_locked, locked_versions  # noqa: E402

ISSUE_3 = list(hf_families.EVERY_RUN)
DISCOVERED = [f.model_type for f in hf_families.interface_families()]
OTHERS_SUPPORTED = [t for t in DISCOVERED if t not in ISSUE_3 and hf_families.get_family(t).supported]
UNSUPPORTED = sorted(hf_families.UNSUPPORTED)
# Variants that only change top-k run under -m slow: top-1 and top-4 are already exported by every run.
SLOW_VARIANTS = {("mixtral", "top4"), ("gpt_oss", "top1"), ("granitemoe", "top1"), ("hunyuan_v1_moe", "top1")}
VARIANT_CASES = [pytest.param(t, name, id=f"{t}-{name}", marks=[pytest.mark.slow] if (t, name) in SLOW_VARIANTS else [])
                 for t in ISSUE_3 for name in hf_families.VARIANTS.get(t, {})]
SHAPES = "1x1,2x9,3x33"
README = Path(__file__).resolve().parents[1] / "README.md"
# The README table is generated from the locked transformers (constraints.txt); its model_type column is the
# record of which families that version has. A newer release's additions are reported, not failed on.
RECORDED = {line.split("`")[1] for line in README.read_text(encoding="utf-8").splitlines()
            if line.startswith("| `")}


def _report_if_new(model_type: str):
    """Marks for a family the locked transformers does not have: an expected failure, named in the summary."""
    if model_type in RECORDED:
        return []
    import transformers

    return [pytest.mark.xfail(strict=False, reason=f"{model_type} is new in transformers {transformers.__version__} "
                              f"(not in the README table for the locked {locked_versions()['transformers']})")]


def assert_parity(model, checkpoint, shapes=SHAPES, paddings=(True, False)):
    for left_padding in paddings:
        report = verify_checkpoint(model, checkpoint, shapes=shapes, left_padding=left_padding)
        assert report.passed, report.render()
        assert report.max_abs_err <= 1e-4, report.render()
        assert report.routing_agreement == 1.0, report.render()


def check_family(hf_export, model_type):
    result, checkpoint = hf_export(model_type)
    assert result.validation is not None and result.validation.passed
    assert result.strategy == "sorted"
    assert_parity(result.output, checkpoint)
    # The tie-margin hook found every layer's router (else verify could not tell ties from bugs).
    loaded = families.load_checkpoint(checkpoint)
    margins = families.routing_margins(loaded, contract.random_inputs(loaded.info, 2, 5, seed=0))
    found = all(np.isfinite(m).all() for m in margins)
    assert found == (model_type not in hf_families.NO_TIE_MARGINS), f"{model_type}: router logits found: {found}"


def test_discovery_is_derived_and_covers_issue_3():
    import importlib.util

    assert set(ISSUE_3) <= set(DISCOVERED)
    for family in hf_families.interface_families():
        origin = importlib.util.find_spec(f"transformers.models.{family.module}.modeling_{family.module}").origin
        assert hf_families.DECORATOR in Path(origin).read_text(encoding="utf-8")
    # Every recorded override, variant and unsupported entry names a discovered family (no stale rows).
    for table in (hf_families.OVERRIDES, hf_families.VARIANTS, hf_families.UNSUPPORTED, hf_families.NO_TIE_MARGINS):
        assert set(table) <= set(DISCOVERED)


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=_report_if_new(t)) for t in DISCOVERED])
def test_every_discovered_family_has_a_tiny_model(model_type, tmp_path):
    config = hf_families.tiny_config(model_type)
    text = config.get_text_config()
    assert text.hidden_size <= 64 and text.vocab_size <= 256
    assert hf_families.parameter_count(config) < hf_families.TINY_PARAMETER_BOUND
    model = hf_families.random_model(model_type)
    if hf_families.text_model_type(model_type):
        # A multimodal wrapper: its checkpoint, as moeport reads it, is the language model alone.
        model.save_pretrained(tmp_path)
        model = families.load_checkpoint(tmp_path).model.model
        assert model.config.model_type == hf_families.text_model_type(model_type)
    adapter = CausalLMAdapter(model)
    assert adapter.experts, f"{model_type}: the tiny config builds no experts module"
    assert all(m.num_experts >= 4 for m in adapter.experts)
    assert sum(p.numel() for p in adapter.parameters()) < hf_families.TINY_PARAMETER_BOUND
    import torch

    with torch.no_grad():
        logits, routing = adapter(torch.arange(6).reshape(2, 3) % text.vocab_size)
    assert logits.shape[:2] == (2, 3) and len(routing) == len(adapter.experts)


def test_unknown_family_or_option_is_a_one_line_user_error():
    from moeport.errors import MoeportError

    with pytest.raises(MoeportError, match="configs have no option norm_topk"):
        hf_families.tiny_config("mixtral", norm_topk=True)
    with pytest.raises(MoeportError, match="'llama' is not a transformers causal LM on the experts interface"):
        hf_families.tiny_config("llama")


@pytest.mark.parametrize("model_type", ISSUE_3)
def test_issue_3_family_exports_with_parity(hf_export, model_type):
    check_family(hf_export, model_type)


@pytest.mark.parametrize("model_type,variant", VARIANT_CASES)
def test_moe_variant_exports_with_parity(hf_export, model_type, variant):
    options = hf_families.VARIANTS[model_type][variant]
    config = hf_families.tiny_config(model_type, **options)
    assert all(getattr(config, key) == value for key, value in options.items()), "variant option was ignored"
    result, checkpoint = hf_export(model_type, variant, validate=False)
    assert_parity(result.output, checkpoint, shapes="1x1,3x33", paddings=(True,))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", OTHERS_SUPPORTED)
def test_other_family_exports_with_parity(hf_export, model_type):
    check_family(hf_export, model_type)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [t for t in OTHERS_SUPPORTED if hf_families.text_model_type(t)])
def test_multimodal_wrapper_exports_the_wrappers_own_text_logits(hf_export, model_type):
    """A wrapper checkpoint as saved by its *ForConditionalGeneration class exports its language model: the logits
    are the wrapper's own (transformers, text only), with and without left padding."""
    import torch
    import transformers

    result, checkpoint = hf_export(model_type)
    assert result.info.model_type == hf_families.text_model_type(model_type)
    wrapper = hf_families.random_model(model_type)  # the same seeded weights the checkpoint was saved from
    session = create_session(result.output)
    for i, (batch, seq) in enumerate([(1, 1), (2, 9), (3, 33)]):
        feeds = contract.random_inputs(result.info, batch, seq, seed=i, left_padding=True)
        with torch.no_grad():
            expected = wrapper(input_ids=torch.from_numpy(feeds["input_ids"]),
                               attention_mask=torch.from_numpy(feeds["attention_mask"]), use_cache=False).logits
        logits = session.run(["logits"], feeds)[0]
        kept = feeds["attention_mask"].astype(bool)  # padded positions' logits mean nothing
        np.testing.assert_allclose(logits[kept], expected.numpy()[kept], atol=1e-4, rtol=0)
    assert isinstance(wrapper, transformers.PreTrainedModel)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [t for t in UNSUPPORTED if hf_families.UNSUPPORTED[t].stage == "export"])
def test_recorded_export_failure_still_holds(hf_export, model_type):
    entry = hf_families.UNSUPPORTED[model_type]
    with pytest.raises(Exception) as failure:
        hf_export(model_type)
    messages = [str(failure.value)] + [str(cause) for cause in _causes(failure.value)]
    assert any(entry.match in message for message in messages), messages


LIMIT_CASES = [pytest.param(t, i, id=f"{t}-{i}") for t in DISCOVERED for i in range(len(hf_families.limits(t)))]


@pytest.mark.slow
@pytest.mark.parametrize("model_type,index", LIMIT_CASES)
def test_recorded_limit_still_holds(tmp_path, model_type, index):
    limit = hf_families.limits(model_type)[index]
    hf_families.random_model(model_type, **limit.options).save_pretrained(tmp_path / "checkpoint")
    with pytest.raises(Exception) as failure:
        export_checkpoint(tmp_path / "checkpoint", tmp_path / "model.onnx", task=limit.task)
    messages = [str(failure.value)] + [str(cause) for cause in _causes(failure.value)]
    assert any(limit.match in message for message in messages), messages


def _causes(exc: BaseException):
    while (exc := exc.__cause__ or exc.__context__) is not None:
        yield exc


def test_switch_transformers_exports_with_parity(tmp_path):
    """Encoder-decoder top-1 with a capacity small enough that 3x33 drops tokens (weight 0 in the routing)."""
    import torch
    import transformers

    torch.manual_seed(0)
    checkpoint = tmp_path / "switch"
    transformers.SwitchTransformersForConditionalGeneration(tiny_switch_config(expert_capacity=3)).save_pretrained(checkpoint)
    result = export_checkpoint(checkpoint, tmp_path / "switch.onnx", with_routing=True, validate=False)
    assert result.family == "switch_transformers" and result.strategy == "sorted"
    assert [layer.label for layer in result.info.layers] == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    loaded = families.load_checkpoint(checkpoint)
    reference = families.reference_outputs(loaded, contract.random_inputs(loaded.info, 3, 33, seed=2))
    assert (reference["routing.encoder.0.weights"] == 0).any(), "expected capacity drops at 3x33"
    assert_parity(result.output, checkpoint, shapes="1x1,3x33")


def test_graph_uses_sorted_dispatch(hf_export, routed_segments):
    result, _ = hf_export("mixtral")
    model = onnx.load(str(result.output))
    ops = {node.op_type for node in model.graph.node}
    assert {"TopK", "Split", "MatMul"} <= ops
    assert routed_segments(model) == [layer.num_experts for layer in result.info.layers]
    domains = {imp.domain for imp in model.opset_import} | {node.domain for node in model.graph.node}
    assert "com.microsoft" not in domains and domains <= {"", "ai.onnx"}


def test_graph_passes_apply_to_transformers_attention(hf_export):
    """transformers' eager attention and RMSNorm get the exporter's graph passes (exporter/passes.py)."""
    result, _ = hf_export("mixtral")
    model = onnx.load(str(result.output))
    producers = {out: node for node in model.graph.node for out in node.output}
    softmaxes = [node for node in model.graph.node if node.op_type == "Softmax"]
    attention = [node for node in softmaxes if producers[node.input[0]].op_type == "Max"]
    assert len(attention) == len(result.info.layers)  # one floored attention Softmax per layer
    assert len(softmaxes) - len(attention) == len(result.info.layers)  # the routers' Softmax, untouched
    assert "Reciprocal" not in {node.op_type for node in model.graph.node}
    # 4 query heads on 2 key/value heads: attention reads the 2 heads, not a copy per query head
    shared = {p["pass"]: p for p in result.passes}["SharedKeyValueHeads"]
    assert shared["changed"] == len(result.info.layers) and shared["left"] == []
    assert [node.op_type for node in model.graph.node].count("Tile") == 1  # the mask's rows, once per model


def test_tiny_config_cuts_size_fields_only_when_the_generic_sizes_are_too_big():
    """transformers 5.24's inkling2 families name sizes GENERIC does not (a 200,058-row lm_head from
    ``unpadded_vocab_size``); the fallback cuts those, and leaves families that already fit as they were."""
    if "inkling2_text" not in DISCOVERED:
        pytest.skip("transformers without inkling2_text (added in 5.24)")
    config = hf_families.tiny_config("inkling2_text")
    assert config.unpadded_vocab_size == 128 and config.swa_head_dim == 8
    assert hf_families.parameter_count(config) < hf_families.TINY_PARAMETER_BOUND
    # inkling_text fits with the generic sizes, so its own swa_head_dim is untouched.
    assert hf_families.tiny_config("inkling_text").swa_head_dim == 128


def test_readme_table_is_generated():
    if not is_locked("transformers"):
        import transformers

        pytest.skip(f"the README table is for the locked transformers {locked_versions()['transformers']}, "
                    f"this is {transformers.__version__}")
    text = README.read_text(encoding="utf-8")
    assert "## Hugging Face families" in text
    section = text.split("## Hugging Face families", 1)[1]
    assert hf_families.coverage_markdown() in section


def test_module_entry_prints_the_table():
    out = subprocess.run([sys.executable, str(Path(hf_families.__file__))], capture_output=True, text=True,
                         check=True).stdout
    assert out == hf_families.coverage_markdown()
