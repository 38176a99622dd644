"""The architecture's rules, checked on the code itself and by running the torch-free commands.

- ``moeport.runtime`` and ``moeport.quant`` import neither torch, transformers nor ``moeport.exporter``
  (read from the source, and imported in a process where those are unimportable);
- no function-local imports of moeport modules anywhere in the package (dependencies are visible at the top);
- with torch and transformers unimportable, ``run``, ``inspect``, ``generate``, ``quantize`` and ``package``
  work on exported files, and a command that needs torch says so in one line.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeport.exporter import families, hf, hf_switch
from moeport.exporter.export import export_checkpoint
from tiny_hf import save_char_tokenizer, save_tiny_mixtral

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"moeport": ROOT / "src" / "moeport", "moeport.exporter": ROOT / "exporter",
                "moeport.runtime": ROOT / "runtime", "moeport.quant": ROOT / "quant", "moeport.samples": ROOT / "samples"}
TORCH_FREE = ("moeport.runtime", "moeport.quant")
FORBIDDEN = ("torch", "transformers", "moeport.exporter")
# Prepended to a child interpreter: torch and transformers cannot be imported there (None in sys.modules
# makes ``import torch`` raise ModuleNotFoundError, as on a machine without them).
BLOCK = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "


def _modules(package: str) -> list[tuple[str, Path]]:
    return [(f"{package}.{path.stem}" if path.stem != "__init__" else package, path)
            for path in sorted(PACKAGE_DIRS[package].glob("*.py"))]


def _imports(tree: ast.AST):
    """(module name, node, is top level) of every import statement in ``tree``."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node, id(node) in top


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("package", TORCH_FREE)
def test_torch_free_packages_do_not_import_torch_or_the_exporter(package):
    found = []
    for module, path in _modules(package):
        for name, node, _ in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if any(_matches(name, forbidden) for forbidden in FORBIDDEN):
                found.append(f"{module}:{node.lineno} imports {name}")
    assert not found, found


def test_no_function_local_imports_of_moeport_modules():
    found = []
    for package in PACKAGE_DIRS:
        for module, path in _modules(package):
            for name, node, top_level in _imports(ast.parse(path.read_text(encoding="utf-8"))):
                if _matches(name, "moeport") and not top_level:
                    found.append(f"{module}:{node.lineno} imports {name} inside a function or block")
    assert not found, found


def test_every_runtime_and_quant_module_imports_without_torch():
    modules = [name for package in TORCH_FREE for name, _ in _modules(package)]
    code = BLOCK + "import importlib; [importlib.import_module(m) for m in %r]; " \
                   "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') " \
                   "and sys.modules[m] is not None))" % modules
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def exported_files(tmp_path_factory, exported):
    """A logits export of the topk sample (the run's shared one) and a with-past export of a tiny Mixtral with a
    tokenizer; the commands write their outputs into ``root``."""

    root = tmp_path_factory.mktemp("torch-free")
    logits = exported("topk", with_routing=True).output
    checkpoint = save_tiny_mixtral(root / "mixtral")
    save_char_tokenizer(checkpoint, " abcdefghijklmnopqrstuvwxyz")  # 28 tokens, within the 64-token vocabulary
    with_past = export_checkpoint(checkpoint, root / "mixtral-past.onnx", task="text-generation-with-past").output
    np.savez(root / "inputs.npz", input_ids=np.array([[1, 2, 3, 4]], dtype=np.int64))
    return root, logits, with_past, checkpoint


def _moeport(*args: str) -> subprocess.CompletedProcess:
    code = BLOCK + "from moeport.cli import main; main(%r)" % list(args)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_commands_run_without_torch(exported_files):
    root, logits, with_past, checkpoint = exported_files
    ran = _moeport("run", str(logits), "--inputs", str(root / "inputs.npz"), "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["outputs"][0]["name"] == "logits"

    inspected = _moeport("inspect", str(logits), "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["metadata"]["family"] == "moeport_lm"

    benched = _moeport("bench", str(logits), "--shapes", "1x4", "--runs", "2", "--warmup", "1", "--no-progress")
    assert benched.returncode == 0, benched.stderr

    quantized = _moeport("quantize", str(logits), "-o", str(root / "topk.int8.onnx"), "--mode", "int8-dynamic",
                         "--latency-runs", "0", "--no-perplexity", "--json")
    assert quantized.returncode == 0, quantized.stderr
    assert json.loads(quantized.stdout)["router"]["kept_float_nodes"] > 0

    packaged = _moeport("package", str(logits), "--target", "arm64-linux", "-o", str(root / "bundle"), "--json")
    assert packaged.returncode == 0, packaged.stderr
    assert (root / "bundle" / "bundle.json").is_file()

    generated = _moeport("generate", str(with_past), "--prompt", "hello", "--checkpoint", str(checkpoint),
                         "--max-new-tokens", "4", "--json")
    assert generated.returncode == 0, generated.stderr
    assert len(json.loads(generated.stdout)["token_ids"]) == 4


@pytest.mark.parametrize("args", [["export", "{ckpt}", "-o", "{root}/x.onnx"], ["verify", "{model}", "--checkpoint", "{ckpt}"],
                                  ["samples", "list"], ["demo"]])
def test_commands_that_need_torch_say_so_in_one_line(exported_files, args):
    root, logits, _, checkpoint = exported_files
    result = _moeport(*[a.format(root=root, ckpt=checkpoint, model=logits) for a in args])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs PyTorch" in lines[0] and "pip install" in lines[0], result.stderr


def test_a_family_module_registers_the_hooks_it_defines():
    """``FamilySpec.from_module``: the hooks are the module's functions named like the spec's fields; ``load`` and
    ``export_patches`` keep their defaults where the module has none. The transformers adapter and Switch
    Transformers register this way."""
    required = ("build", "moe_layers", "describe", "experts_sites", "routing_margins")
    module = type(sys)("tiny_family")
    for hook in required:
        setattr(module, hook, lambda *args, hook=hook: hook)
    spec = families.FamilySpec.from_module(module, name="tiny", description="a family", matches=bool)
    assert [getattr(spec, hook)() for hook in required] == list(required)
    assert spec.load is None and spec.export_patches is families._no_patches and spec.input_names == ("input_ids",)
    # registration checks every hook (load may be absent: the default loader), and registers nothing it refuses
    for hook, value in (("describe", None), ("load", "not a function")):
        with pytest.raises(TypeError, match=f"family 'tiny': {hook} must be callable"):
            families.register_family(dataclasses.replace(spec, **{hook: value}))
    assert "tiny" not in [f.name for f in families.families()]
    for family in (hf, hf_switch):
        assert [getattr(family.SPEC, hook) for hook in families.FAMILY_HOOKS] == [
            getattr(family, hook) for hook in families.FAMILY_HOOKS]
        assert family.SPEC.input_names == ("input_ids", "attention_mask")


def test_every_extension_point_is_one_registry():
    """Families, strategies, tasks, quant modes, providers, device targets, folder layouts and samples share one
    Registry: a
    duplicate (or reserved) name is refused at registration, an unknown one is a user error naming the choices."""
    import importlib

    from moeport.errors import MoeportError
    from moeport.registry import Registry

    points = {"moeport.exporter.families": "_FAMILIES", "moeport.exporter.strategies": "_STRATEGIES",
              "moeport.exporter.tasks": "_TASKS", "moeport.quant.modes": "_MODES",
              "moeport.runtime.session": "_PROVIDERS", "moeport.runtime.layouts": "_LAYOUTS",
              "moeport.samples.catalog": "_SAMPLES", "moeport.runtime.package": "TARGETS",
              "moeport.quant.schemes": "TARGETS"}
    for module, name in points.items():
        registry = getattr(importlib.import_module(module), name)
        assert isinstance(registry, Registry) and registry.names(), module

    registry = Registry("widget", reserved=("auto",))
    assert registry.add("a", 1) == 1 and registry.add("b", 2) == 2
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.add("a", 3)
    with pytest.raises(ValueError, match=r"widget 'auto' is already registered \(or reserved\)"):
        registry.add("auto", 3)
    with pytest.raises(MoeportError, match="unknown widget 'c'; choose one of auto, a, b"):
        registry.get("c")
    from moeport.runtime.package import Target, register_target

    with pytest.raises(ValueError, match=r"target 'tpu-board': providers must be registered execution providers, got "
                                         r"\['tpu'\]"):
        register_target(Target("tpu-board", "arm", ("tpu",), "a board"))
    twin = registry.copy()
    twin.add("c", 3)
    assert "c" in twin and "c" not in registry and registry.values() == [1, 2] and twin.values() == [1, 2, 3]
