"""Hostile checkpoints: pickle weights that run code when loaded, configs that point at remote code.

A checkpoint directory is user input from the internet. Unpickling can run any code, so pickle weights
are refused unless ``--trust-pickle`` (and even then torch.load(weights_only=True) refuses arbitrary
objects); ``trust_remote_code`` is never enabled, so a config's ``auto_map`` never imports the
directory's Python files.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moeport.cli import main  # noqa: E402
from moeport.errors import MoeportError  # noqa: E402
from moeport.exporter import families  # noqa: E402
from tiny_hf import TINY_MIXTRAL, save_tiny_mixtral  # noqa: E402



class CreatesFile:
    """Unpickling this object calls ``open(path, "w")``: a stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_checkpoint(root, marker):
    """A transformers-style directory: a real MoE config.json and only a pickle pytorch_model.bin."""
    directory = root / "hf"
    transformers.MixtralConfig(**TINY_MIXTRAL).save_pretrained(directory)
    torch.save({"model.embed_tokens.weight": CreatesFile(marker)}, directory / "pytorch_model.bin")
    return directory


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


def test_the_planted_pickle_really_runs_code(tmp_path):
    """The fixture is a real threat: a plain unpickle creates the file (so its absence below means something)."""
    marker = tmp_path / "pwned"
    directory = pickle_checkpoint(tmp_path, marker)
    torch.load(directory / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_export_refuses_pickle_weights_without_trust_pickle(tmp_path, capsys):
    marker = tmp_path / "pwned"
    directory = pickle_checkpoint(tmp_path, marker)
    code, err = run_cli(capsys, "export", str(directory), "-o", str(tmp_path / "m.onnx"))
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "pickle can run code" in err and "--trust-pickle" in err
    assert not marker.exists()
    assert not (tmp_path / "m.onnx").exists()


def test_trust_pickle_still_never_unpickles_arbitrary_objects(tmp_path, capsys):
    """--trust-pickle loads with weights_only=True: the object is refused, the code does not run."""
    marker = tmp_path / "pwned"
    directory = pickle_checkpoint(tmp_path, marker)
    code, err = run_cli(capsys, "export", str(directory), "-o", str(tmp_path / "m.onnx"), "--trust-pickle")
    assert code == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not marker.exists()
    assert not (tmp_path / "m.onnx").exists()


REMOTE_CODE = """
import pathlib
pathlib.Path(__file__).with_name("pwned").write_text("remote code ran")
from transformers import MixtralConfig, MixtralForCausalLM
class EvilConfig(MixtralConfig):
    pass
class EvilForCausalLM(MixtralForCausalLM):
    pass
"""


def test_auto_map_remote_code_is_never_imported(tmp_path):
    """A known model_type with an ``auto_map`` to code in the directory: the library class is used instead."""
    directory = save_tiny_mixtral(tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(REMOTE_CODE)
    loaded = families.load_checkpoint(directory)
    assert type(loaded.model.model) is transformers.MixtralForCausalLM
    assert not (directory / "pwned").exists()


def test_unknown_model_type_with_remote_code_is_refused(tmp_path):
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "evil_moe", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                               "AutoModelForCausalLM": "evil.EvilForCausalLM"}}))
    (directory / "evil.py").write_text(REMOTE_CODE)
    with pytest.raises(MoeportError, match="names no known model family"):
        families.load_checkpoint(directory)
    assert not (directory / "pwned").exists()
