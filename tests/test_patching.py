"""The exporter's one way to change a model and change it back (exporter/patching.py), and what uses it.

The Patcher on tiny in-process objects: reverse-order restore, a failing patch in the middle, an exception
or KeyboardInterrupt in the block, attributes shared by several sites, restore failures. Then the
exporter's use of it: after exporting a sample, DeepSeek-V2 (complex rotary) or Switch Transformers, a site
failing midway, an error in the block, the model object, its config and the modeling module's functions are
exactly as they were.
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch
from torch import nn

from moeport.exporter import families, hf, hf_switch, strategies
from moeport.exporter.export import export_checkpoint, export_model
from moeport.exporter.hf import CausalLMAdapter
from moeport.exporter.patching import Patch, Patcher
from moeport.samples import model as sample_model
import hf_families  # noqa: E402  (tests/, on sys.path)
from tiny_hf import save_tiny_mixtral, tiny_switch_config  # noqa: E402


class Logged:
    """A plain object that records every attribute write and delete, to see the order of restores."""

    def __init__(self, log: list, **attributes):
        object.__setattr__(self, "log", log)
        for name, value in attributes.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        self.log.append(("set", name, value))
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self.log.append(("del", name))
        object.__delattr__(self, name)


class Guarded:
    """``locked`` refuses every write; deleting ``stuck`` fails: real failures for the patcher to meet."""

    @property
    def locked(self):
        return "as built"

    @locked.setter
    def locked(self, value):
        raise ValueError(f"locked refuses {value!r}")

    def __delattr__(self, name):
        if name == "stuck":
            raise RuntimeError("stuck cannot be deleted")
        object.__delattr__(self, name)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        return self.proj(x) * self.scale


def test_restores_every_attribute_last_applied_first():
    log: list = []
    first, second = Logged(log), Logged(log, z=0)
    modeling = types.ModuleType("tiny_modeling")
    modeling.rotate = original_rotate = lambda x: x
    patches = [Patch(first, "x", 1), Patch(second, "y", 2), Patch(second, "z", 3), Patch(modeling, "rotate", abs)]
    with Patcher(patches):
        assert (first.x, second.y, second.z, modeling.rotate) == (1, 2, 3, abs)
        del log[:]
    assert log == [("set", "z", 0), ("del", "y"), ("del", "x")]  # modeling.rotate, not Logged, went first
    assert vars(first) == {"log": log} and vars(second) == {"log": log, "z": 0}
    assert modeling.rotate is original_rotate


def test_module_attributes_buffers_and_forward_come_back():
    module = Tiny()
    x = torch.randn(2, 4)
    expected = module(x)
    before = dict(vars(module)), dict(module._buffers), set(module._non_persistent_buffers_set)
    replacement = torch.zeros(4)
    with Patcher([Patch(module, "forward", lambda x: x), Patch(module, "extra", torch.ones(3), buffer=True),
                  Patch(module, "scale", replacement, buffer=True)]):
        assert torch.equal(module(x), x)
        assert module.extra.shape == (3,) and module.scale is replacement
        assert {"extra", "scale"} <= module._non_persistent_buffers_set  # neither is in the state dict
        assert "scale" not in module.state_dict()
    assert (dict(vars(module)), dict(module._buffers), set(module._non_persistent_buffers_set)) == before
    assert "forward" not in vars(module) and "scale" in module.state_dict()  # persistent again
    assert torch.equal(module(x), expected)


def test_a_failing_patch_restores_only_those_before_it_and_raises_the_original_error():
    log: list = []
    first, second, guarded = Logged(log), Logged(log, y="kept"), Guarded()
    patcher = Patcher([Patch(first, "x", 1), Patch(second, "y", 2), Patch(guarded, "locked", "new"),
                       Patch(first, "never", 4)])
    with pytest.raises(ValueError) as failure:
        with patcher:
            pytest.fail("the block must not run when a patch fails")
    assert type(failure.value) is ValueError and str(failure.value) == "locked refuses 'new'"
    assert not getattr(failure.value, "__notes__", [])  # nothing else went wrong, so nothing was added
    assert log == [("set", "x", 1), ("set", "y", 2), ("set", "y", "kept"), ("del", "x")]
    assert vars(first) == {"log": log} and second.y == "kept" and guarded.locked == "as built"


def test_a_failing_patch_in_a_later_apply_restores_what_the_patcher_applied():
    module = Tiny()
    taken = Logged([])
    with pytest.raises(KeyError) as failure:
        with Patcher([Patch(module, "extra", torch.ones(1), buffer=True)]) as patcher:
            patcher.apply(Patch(taken, "x", 1))
            # ``proj`` is a submodule: register_buffer refuses the name.
            patcher.apply(Patch(module, "proj", torch.ones(1), buffer=True))
    assert failure.value.args == ("attribute 'proj' already exists",)
    assert "extra" not in module._buffers and "x" not in vars(taken)
    assert isinstance(module.proj, nn.Linear)


@pytest.mark.parametrize("error", [RuntimeError("boom in the block"), KeyboardInterrupt()])
def test_an_exception_in_the_block_restores_and_propagates_unchanged(error):
    module, log = Tiny(), []
    target = Logged(log)
    with pytest.raises(type(error)) as failure:
        with Patcher([Patch(target, "x", 1), Patch(module, "forward", lambda x: x)]):
            raise error
    assert failure.value is error
    assert vars(target) == {"log": log} and "forward" not in vars(module)


@pytest.mark.parametrize("order", ["as_declared", "reversed"])
def test_sites_sharing_a_config_restore_it_whatever_their_order(order):
    """transformers layers share one config object: every experts site patches the same attribute of it."""
    config = types.SimpleNamespace(experts_implementation="eager", hidden=32)
    layers = [nn.Module(), nn.Module()]
    sites = [[Patch(config, "experts_implementation", "moeport"), Patch(layer, "dispatch", i),
              Patch(config, f"seen_by_{i}", True)] for i, layer in enumerate(layers)]
    if order == "reversed":
        sites.reverse()
    with Patcher() as patcher:
        for site in sites:
            patcher.apply(*site)
        assert config.experts_implementation == "moeport"
        assert config.seen_by_0 and config.seen_by_1
    assert vars(config) == {"experts_implementation": "eager", "hidden": 32}
    assert all("dispatch" not in vars(layer) for layer in layers)


def test_nested_patchers_of_one_attribute_restore_each_level():
    config = types.SimpleNamespace(implementation="eager")
    with Patcher([Patch(config, "implementation", "outer")]):
        with Patcher([Patch(config, "implementation", "inner"), Patch(config, "implementation", "again")]):
            assert config.implementation == "again"
        assert config.implementation == "outer"
    assert vars(config) == {"implementation": "eager"}


def test_a_property_patch_is_set_back_through_the_property():
    """A transformers config's ``_experts_implementation`` is a property over an internal field."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1)
    config._experts_implementation = "eager"
    before = dict(vars(config))
    with Patcher([Patch(config, "_experts_implementation", "moeport")]):
        assert config._experts_implementation == "moeport"
    assert vars(config) == before


def test_restore_failures_are_reported_never_dropped():
    log: list = []
    target, guarded = Logged(log), Guarded()
    # The block raised: its exception propagates, the restore failure is a note on it, the rest is restored.
    error = LookupError("the real problem")
    with pytest.raises(LookupError) as failure:
        with Patcher([Patch(target, "x", 1), Patch(guarded, "stuck", 2), Patch(target, "y", 3)]):
            raise error
    assert failure.value is error
    assert failure.value.__notes__ == ["restoring Patch(Guarded.stuck, attribute) failed: RuntimeError: stuck "
                                       "cannot be deleted"]
    assert vars(target) == {"log": log}
    # No exception in the block: the restore failure itself is raised, after the others were restored.
    guarded = Guarded()
    with pytest.raises(RuntimeError, match="^stuck cannot be deleted$"):
        with Patcher([Patch(guarded, "stuck", 2), Patch(target, "x", 1)]):
            pass
    assert vars(target) == {"log": log}


def test_an_interrupt_while_restoring_still_restores_the_rest():
    class Interrupting:
        def __delattr__(self, name):
            raise KeyboardInterrupt

    log: list = []
    target = Logged(log)
    with pytest.raises(KeyboardInterrupt):
        with Patcher([Patch(target, "x", 1), Patch(Interrupting(), "stuck", 2), Patch(target, "y", 3)]):
            raise LookupError("interrupted while restoring after this")
    assert vars(target) == {"log": log} and log[-2:] == [("del", "y"), ("del", "x")]


def test_apply_outside_the_block_and_bad_buffers_are_refused():
    module = Tiny()
    with pytest.raises(RuntimeError, match="needs an active patcher"):
        Patcher().apply(Patch(module, "x", 1))
    with pytest.raises(TypeError, match="a buffer patch needs a tensor, got str"):
        with Patcher([Patch(module, "extra", "not a tensor", buffer=True)]):
            pass
    assert "x" not in vars(module) and "extra" not in module._buffers


# --- the exporter's use of it, on real models -------------------------------------------------------------


def module_state(model: nn.Module) -> dict:
    """Per submodule: its instance attributes (hook dicts by content), parameters, buffers, persistence."""
    state = {}
    for path, module in model.named_modules():
        attributes = {name: dict(value) if isinstance(value, dict) else value for name, value in vars(module).items()
                      if name not in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")}
        state[path] = (attributes, dict(module._parameters), dict(module._buffers),
                       set(module._non_persistent_buffers_set), list(module._modules))
    return state


def same(a, b) -> bool:
    """Equal values; tensors (and what holds them) must be the very same objects."""
    if a is b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and type(a) is type(b):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b


def assert_same_state(before: dict, after: dict) -> None:
    assert list(after) == list(before), "submodules changed"
    for path, (attrs, params, buffers, non_persistent, children) in before.items():
        attrs_now, params_now, buffers_now, non_persistent_now, children_now = after[path]
        assert list(attrs_now) == list(attrs), f"{path or 'model'}: instance attributes changed"
        for name, value in attrs.items():
            assert same(value, attrs_now[name]), f"{path or 'model'}.{name}: {value!r} -> {attrs_now[name]!r}"
        assert params_now.keys() == params.keys() and all(params_now[k] is params[k] for k in params), path
        assert buffers_now.keys() == buffers.keys() and all(buffers_now[k] is buffers[k] for k in buffers), path
        assert (non_persistent_now, children_now) == (non_persistent, children), path


def functions_of(module: types.ModuleType) -> dict:
    return {name: value for name, value in vars(module).items() if callable(value)}


@pytest.fixture
def loaded_by_export(monkeypatch):
    """Runs the real ``families.load_checkpoint`` for ``export_checkpoint`` and keeps what it returned, with
    the model's state right after loading (before the export touched it)."""
    seen: list = []
    load = families.load_checkpoint

    def load_and_record(*args, **kwargs):
        loaded = load(*args, **kwargs)
        seen.append((loaded, module_state(loaded.model), dict(vars(loaded.model.config))))
        return loaded

    monkeypatch.setattr(families, "load_checkpoint", load_and_record)
    return seen


def test_sample_export_leaves_the_model_as_it_was(tmp_path, sample_checkpoint, loaded_by_export):
    functions = functions_of(sample_model)
    export_checkpoint(sample_checkpoint("topk"), tmp_path / "topk.onnx")
    (loaded, state, config), = loaded_by_export
    assert_same_state(state, module_state(loaded.model))
    assert dict(vars(loaded.model.config)) == config
    assert all(moe.dispatch is sample_model.reference_dispatch for moe in loaded.moe_layers)
    assert functions_of(sample_model) == functions


def test_a_site_failing_midway_restores_the_sites_before_it(sample_checkpoint):
    loaded = families.load_checkpoint(sample_checkpoint("topk"))
    second = loaded.moe_layers[1]
    second.moeport_gate_up_0 = "taken"  # the name of the first buffer the second site attaches
    state = module_state(loaded.model)
    with pytest.raises(KeyError) as failure:
        with strategies.use_strategy(loaded.sites, strategies.get_strategy("sorted")):
            pytest.fail("the block must not run when a site fails")
    assert failure.value.args == ("attribute 'moeport_gate_up_0' already exists",)
    assert_same_state(state, module_state(loaded.model))
    assert second.moeport_gate_up_0 == "taken"


def test_an_error_while_a_strategy_is_installed_restores_the_model(sample_checkpoint):
    loaded = families.load_checkpoint(sample_checkpoint("topk"))
    state = module_state(loaded.model)
    with pytest.raises(KeyboardInterrupt):
        with strategies.use_strategy(loaded.sites, strategies.get_strategy("gather")):
            assert all(moe.dispatch is not sample_model.reference_dispatch for moe in loaded.moe_layers)
            raise KeyboardInterrupt
    assert_same_state(state, module_state(loaded.model))


def test_complex_rope_export_leaves_model_and_modeling_module_as_they_were(tmp_path, loaded_by_export):
    pytest.importorskip("transformers")
    modeling = importlib.import_module(hf.COMPLEX_ROPE_MODULES["deepseek_v2"])
    functions = functions_of(modeling)
    hf_families.random_model("deepseek_v2").save_pretrained(tmp_path / "ckpt")
    result = export_checkpoint(tmp_path / "ckpt", tmp_path / "deepseek_v2.onnx")
    assert result.validation.passed  # traced and validated with the real-valued rotary
    (loaded, state, config), = loaded_by_export
    assert_same_state(state, module_state(loaded.model))
    assert dict(vars(loaded.model.config)) == config
    assert functions_of(modeling) == functions


def test_complex_rope_patch_is_for_the_exported_model_only():
    """While one DeepSeek-V2 model is exported, another one in the process computes exactly as before."""
    pytest.importorskip("transformers")
    exported = families.from_module("transformers", CausalLMAdapter(hf_families.random_model("deepseek_v2")))
    other = hf_families.random_model("deepseek_v2", seed=1)
    inputs = families.random_inputs(exported.info, 2, 5, seed=0)
    ids = torch.from_numpy(inputs["input_ids"])
    with torch.no_grad():
        other_before = other(input_ids=ids, use_cache=False).logits
        reference = families.reference_outputs(exported, inputs)
        with strategies.use_strategy(exported.sites, strategies.get_strategy("sorted"),
                                     patches=families.export_patches(exported)):
            real_valued = families.reference_outputs(exported, inputs)
            other_during = other(input_ids=ids, use_cache=False).logits
    assert torch.equal(other_during, other_before)
    assert abs(real_valued["logits"] - reference["logits"]).max() < 1e-5


def test_switch_transformers_export_leaves_the_callers_model_unmodified(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(tiny_switch_config()).eval()
    state, config = module_state(model), dict(vars(model.config))
    adapter = hf_switch.SwitchAdapter(model)
    assert_same_state(state, module_state(model))  # wrapping it changes nothing
    loaded = families.from_module("switch_transformers", adapter, model.config.to_dict())
    result = export_model(loaded, tmp_path / "switch.onnx")
    assert result.validation.passed
    assert_same_state(state, module_state(model))
    assert dict(vars(model.config)) == config


def test_loading_a_transformers_checkpoint_leaves_its_logging_settings_as_they_were(tmp_path):
    """moeport quiets transformers' progress bars and logs only while it loads a checkpoint."""
    from transformers.utils import logging

    checkpoint = save_tiny_mixtral(tmp_path / "mixtral")
    logging.enable_progress_bar()
    logging.set_verbosity_info()
    try:
        families.load_checkpoint(checkpoint)
        assert logging.is_progress_bar_enabled() and logging.get_verbosity() == logging.INFO
    finally:
        logging.disable_progress_bar()
        logging.set_verbosity_warning()
