"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (never pickle).

Reading is strict and every failure is a ``MoeportError`` naming the file and the fix, because a
checkpoint is user input.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from torch import nn

from moeport._fs import staged_directory, writing
from moeport.errors import MoeportError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """Return ``path`` as a checkpoint directory, or raise a user error saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise MoeportError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise MoeportError(f"checkpoint must be a directory holding config.json, got a file: {path}")
    if not (path / CONFIG_NAME).is_file():
        raise MoeportError(f"no {CONFIG_NAME} in {path}: not a checkpoint directory")
    return path


def read_config(path: str | os.PathLike) -> dict:
    """Parse ``config.json`` of a checkpoint directory into a dict."""
    config_path = checkpoint_dir(path) / CONFIG_NAME
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MoeportError(f"cannot read {config_path}: {exc}") from exc
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MoeportError(f"{config_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(config, dict):
        raise MoeportError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config


def load_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Load ``model.safetensors`` into ``model`` strictly: every key present, every shape equal."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = checkpoint_dir(path) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise MoeportError(f"no {WEIGHTS_NAME} in {weights_path.parent}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MoeportError(f"{weights_path} is not a readable safetensors file ({exc})") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise MoeportError(
            f"{weights_path} does not match its config: missing {len(missing)} weight(s), first {missing[0]!r}"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise MoeportError(f"{weights_path} does not match its config: unexpected weight {unexpected[0]!r}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise MoeportError(
                f"{weights_path} does not match its config: {name!r} has shape {tuple(state[name].shape)}, "
                f"the config needs {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)


def save_checkpoint(model: nn.Module, config: dict, path: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``path`` atomically (temp dir + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise MoeportError(f"output directory {path} is not empty; choose a new directory")
    with staged_directory(path) as staging, writing(path):
        state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_NAME))
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 over the config and every weight file of a checkpoint directory, in name order."""
    path = checkpoint_dir(path)
    digest = hashlib.sha256()
    files = [path / CONFIG_NAME] + sorted(path.glob("*.safetensors"))
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
