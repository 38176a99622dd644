"""A model folder's tokenizer, read with the ``tokenizers`` library (no transformers, no torch).

``load_tokenizer(directory)`` reads ``tokenizer.json`` (what transformers' fast tokenizers save, and what
transformers.js and onnxruntime-genai read too), the special tokens of ``tokenizer_config.json`` and the end
ids of ``generation_config.json`` / ``config.json``. Encoding follows ``tokenizer.json``'s own post-processor
(so a BOS is added where the tokenizer adds one); decoding keeps special tokens, as transformers'
``decode`` does by default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeport.errors import MoeportError

TOKENIZER_JSON = "tokenizer.json"
# Files that mean "this folder has a tokenizer", whether or not it is one we can read.
TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(directory: str | os.PathLike) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise MoeportError(f"{path} is not readable JSON ({type(exc).__name__}); re-save the tokenizer") from exc
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


@dataclass
class Tokenizer:
    """Text <-> token ids for one model folder. ``eos_token_ids``: every id that ends generation."""

    source: Path
    backend: object  # tokenizers.Tokenizer
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Raw text bytes -> ids ``[n] int64``, no special tokens (calibration and perplexity text)."""
        return np.asarray(self.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False), dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in ``directory``; a folder without a readable ``tokenizer.json`` is a user error."""
    import tokenizers

    directory = Path(directory)
    path = directory / TOKENIZER_JSON
    if not path.is_file():
        other = [name for name in TOKENIZER_FILES[1:] if (directory / name).is_file()]
        hint = (f" (it has {', '.join(other)}; re-save the tokenizer with transformers' save_pretrained, which writes "
                f"{TOKENIZER_JSON})") if other else ""
        raise MoeportError(f"no {TOKENIZER_JSON} in {directory}{hint}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for every malformed file
        raise MoeportError(f"cannot load the tokenizer {path}: {exc}") from exc
    config = _json(directory / "tokenizer_config.json")
    generation = _json(directory / "generation_config.json")
    model_config = _json(directory / "config.json")
    eos = _ids(generation.get("eos_token_id")) or _ids(model_config.get("eos_token_id"))
    if not eos and isinstance(config.get("eos_token"), str):
        token_id = backend.token_to_id(config["eos_token"])
        eos = [] if token_id is None else [token_id]
    pad = generation.get("pad_token_id", model_config.get("pad_token_id"))
    return Tokenizer(directory, backend, tuple(eos), None if pad is None else int(_ids(pad)[0]))
