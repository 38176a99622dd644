"""Deployable model folders: one registry of layouts, each the folder one runtime loads with no edits.

A text-generation-with-past export (``exporter.tasks``) plus what its runtime reads beside it:

| layout | model file | beside it | quantized variants |
|---|---|---|---|
| ``genai`` (onnxruntime-genai) | ``model.onnx`` | ``genai_config.json`` (``type: "decoder"``, KV name patterns, head_size, num_key_value_heads, ``past_present_share_buffer``: false for the Concat cache, true for ``--kv-cache shared``), config.json, generation_config.json, tokenizer | ``model_<mode>.onnx`` (load one with ``og.Config.overlay``, see ``genai_overlay``) |
| ``transformers.js`` | ``onnx/model.onnx`` | config.json (with ``transformers.js_config``), generation_config.json, tokenizer | ``onnx/model_<dtype suffix>.onnx``: ``_q4`` int4, ``_int8`` int8, ``_quantized`` int8-dynamic, ``_fp16`` fp16 |
| ``optimum`` (``ORTModelForCausalLM``) | ``model.onnx`` | config.json, generation_config.json, tokenizer | ``model_<mode>.onnx`` (``file_name=``) |

External data, where there is any, is named ``<model file>_data`` (``model.onnx_data``): the only name
transformers.js reads (and only when config.json's ``transformers.js_config.use_external_data_format`` says so)
and the one Optimum fetches.

config.json is the checkpoint's with ``model_type`` set to one the runtime accepts: its own name for a family
the layout lists in ``native_model_types`` (checked by the tests), else the layout's ``generic_model_type``
(a plain decoder the runtime has: every graph input and the cache are in the ONNX file, so only the name
changes). A layout without a generic type refuses the families it does not list, in one line.

The tokenizer files are the checkpoint's, in a form transformers 4 and 5, the ``tokenizers`` library,
transformers.js and onnxruntime-genai all read: ``tokenizer_class`` ``TokenizersBackend`` (what transformers 5
writes; transformers 4 refuses it) becomes ``PreTrainedTokenizerFast``, and ``add_bos_token`` /
``add_eos_token`` are written out as what ``tokenizer.json`` does (transformers.js adds a BOS only when
``add_bos_token`` says so).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moeport._fs import check_output_directory, load_model_proto, staged_directory
from moeport.contract import (ATTENTION_MASK, INPUT_IDS, KV_CACHE_CONCAT, KV_CACHE_SHARED, KV_PARTS, LOGITS,
                              POSITION_IDS, is_cache_input, metadata_props, optional_model_info, past_name,
                              past_name_pattern, present_name, present_name_pattern)
from moeport.errors import MoeportError
from moeport.registry import Registry
from moeport.runtime.tokenizer import TOKENIZER_JSON, load_tokenizer

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_SUFFIX = "_data"
WITH_PAST_TASK = "text-generation-with-past"
CONFIG, GENERATION_CONFIG, TOKENIZER_CONFIG = "config.json", "generation_config.json", "tokenizer_config.json"
GENAI_CONFIG = "genai_config.json"
TRANSFORMERS_JS_CONFIG = "transformers.js_config"
# Copied as they are when the checkpoint has them (tokenizer.json and tokenizer_config.json are rewritten).
TOKENIZER_EXTRAS = ("special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json")
# tokenizer_class values only transformers 5 knows -> the class every reader of tokenizer.json accepts.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
TRANSFORMERS5_TOKENIZER_CLASSES = ("TokenizersBackend",)
# Variant file suffixes by quantization mode for runtimes that take any file name (``model_int4.onnx``).
MODE_SUFFIXES = {mode: f"_{mode}" for mode in ("int4", "int8", "int8-dynamic", "int8-blocks", "fp16")}
DEFAULT_CONTEXT_LENGTH = 4096  # genai's context_length when config.json names no max_position_embeddings


@dataclass(frozen=True)
class FolderSource:
    """What a layout writes from: the checkpoint's config files and the exported graph's KV cache."""

    config: dict
    generation: dict
    vocab_size: int
    num_layers: int  # cache layers: past_key_values.{i}.key for i < num_layers
    kv_heads: int
    head_size: int
    model_file: str  # relative to the folder, posix separators
    kv_cache: str  # contract KV_CACHES: concat, or shared (one buffer for past and present)


@dataclass(frozen=True)
class Layout:
    """One runtime's folder. ``model_dir``: where model files go ("" = the folder itself); ``variant_suffixes``:
    quantization mode -> suffix of the model file's stem; ``marker``: (file, JSON key or "") whose presence
    identifies a folder of this layout; ``files``: the layout's own JSON files and config.json changes,
    ``(Layout, FolderSource, external data) -> {relative path: JSON object}``; ``kv_caches``: the cache kinds (contract
    ``KV_CACHES``) the runtime can drive."""

    name: str
    description: str
    model_dir: str
    variant_suffixes: dict[str, str]
    native_model_types: frozenset[str]
    generic_model_type: str | None
    marker: tuple[str, str]
    files: Callable[["Layout", FolderSource, bool], dict[str, dict]]
    runtime: str = ""  # the package that loads it, for messages
    kv_caches: tuple[str, ...] = (KV_CACHE_CONCAT,)
    # Whether the onnxruntime the runtime ships runs moeport's QMoE node (quant.passes.FuseExpertsPass): its
    # variants keep per-expert MatMulNBits when not.
    fused_experts: bool = True
    # Whether that onnxruntime runs moeport's GroupQueryAttention node (runtime.fusions): its variants keep the
    # exported attention when not.
    fused_attention: bool = True
    # The variant ``moeport quantize DIR`` writes without --mode; None: the target's default mode
    # (moeport.quant.schemes.default_mode), which must then be among variant_suffixes.
    default_mode: str | None = None

    def __post_init__(self):
        if self.default_mode is not None and self.default_mode not in self.variant_suffixes:
            raise ValueError(f"layout {self.name!r}: default_mode {self.default_mode!r} has no variant suffix")

    def check_kv_cache(self, kv_cache: str) -> None:
        if kv_cache not in self.kv_caches:
            raise MoeportError(f"{self.runtime or self.name} cannot drive a {kv_cache} KV cache; the {self.name} "
                               f"layout takes --kv-cache {' or '.join(self.kv_caches)}")

    def model_file(self, stem: str = "model") -> str:
        return f"{self.model_dir}/{stem}.onnx" if self.model_dir else f"{stem}.onnx"

    def variant_file(self, mode: str) -> str:
        if mode not in self.variant_suffixes:
            raise MoeportError(f"the {self.name} layout has no file name for --mode {mode}; it names "
                               f"{', '.join(self.variant_suffixes)}")
        return self.model_file("model" + self.variant_suffixes[mode])

    def model_type(self, model_type: str) -> str:
        """The model_type this runtime is given for a checkpoint's ``model_type``."""
        if model_type in self.native_model_types:
            return model_type
        if self.generic_model_type is None:
            raise MoeportError(f"{self.runtime or self.name} does not load {model_type!r} models; the {self.name} "
                               f"layout supports {', '.join(sorted(self.native_model_types))}")
        return self.generic_model_type


_LAYOUTS: Registry[Layout] = Registry("layout")


def register_layout(layout: Layout) -> Layout:
    """Add ``layout``; a duplicate name or an inconsistent spec is a programming error (ValueError)."""
    if layout.model_dir.startswith("/") or ".." in layout.model_dir.split("/"):
        raise ValueError(f"layout {layout.name!r}: model_dir must stay inside the folder, got {layout.model_dir!r}")
    stems = [layout.model_file("model" + suffix) for suffix in layout.variant_suffixes.values()]
    if len(set(stems)) != len(stems) or layout.model_file() in stems or not all(layout.variant_suffixes.values()):
        raise ValueError(f"layout {layout.name!r}: every variant needs its own file name, not the model's")
    if layout.generic_model_type is None and not layout.native_model_types:
        raise ValueError(f"layout {layout.name!r} accepts no model type")
    if not layout.marker[0]:
        raise ValueError(f"layout {layout.name!r} needs a marker file")
    return _LAYOUTS.add(layout.name, layout)


def layout_names() -> list[str]:
    return _LAYOUTS.names()


def layouts() -> list[Layout]:
    return _LAYOUTS.values()


def get_layout(name: str) -> Layout:
    return _LAYOUTS.get(name)


# -- reading what a folder is made from ---------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MoeportError(f"{path} is not readable JSON ({type(exc).__name__}); {what}") from exc
    if not isinstance(data, dict):
        raise MoeportError(f"{path} must hold a JSON object; {what}")
    return data


def _graph_cache(model: Path) -> tuple[int, int, int, int, str]:
    """(vocab size, cache layers, kv_heads, head_size, kv cache kind) of a with-past graph, from its present
    outputs and metadata."""
    proto = load_model_proto(model)
    inputs = {value.name for value in proto.graph.input}
    states = sorted(name for name in inputs if is_cache_input(name) and not name.startswith("past_key_values."))
    if states:
        # The folders' runtime configs describe a KV cache only; a runtime given one would not feed the states.
        raise MoeportError(f"{model} carries recurrent states ({states[0]}, ...) that no runtime folder layout "
                           "describes yet; run the .onnx file itself (moeport generate)")
    if past_name(0, "key") not in inputs or POSITION_IDS not in inputs:
        raise MoeportError(f"{model} has no KV-cache inputs; a runtime folder needs --task {WITH_PAST_TASK}")
    outputs = {value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
               for value in proto.graph.output}
    layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    shapes = {tuple(outputs.get(present_name(i, part), [None] * 4)[1::2]) for i in range(layers) for part in KV_PARTS}
    if len(shapes) != 1 or None in next(iter(shapes)):
        # A cache whose layers or values differ in shape: genai sizes every present from one head_size.
        raise MoeportError(f"{model}: its KV cache tensors differ in shape ({sorted(map(str, shapes))}); export the "
                           "folder with `moeport export --layout`, which stores one cache shape")
    kv_heads, head_size = next(iter(shapes))
    metadata = metadata_props(proto)
    info = optional_model_info(metadata, model)
    vocab = info.vocab_size if info else outputs.get(LOGITS, [None] * 3)[-1]
    if not vocab:
        raise MoeportError(f"{model} names no vocabulary size (no moeport metadata, no fixed logits axis)")
    return int(vocab), layers, int(kv_heads), int(head_size), metadata.get("kv_cache", KV_CACHE_CONCAT)


def _check_tokenizer(checkpoint: Path, vocab_size: int | None = None) -> None:
    if not (checkpoint / TOKENIZER_JSON).is_file():
        raise MoeportError(f"{checkpoint} has no {TOKENIZER_JSON}: a runtime folder needs the checkpoint's tokenizer "
                           "(save it beside the weights with transformers' save_pretrained)")
    tokenizer = load_tokenizer(checkpoint)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise MoeportError(f"the tokenizer in {checkpoint} has {tokenizer.vocab_size} tokens but the model's "
                           f"vocabulary is {vocab_size}: they do not belong together")


def check_export(layout: str, checkpoint: str | os.PathLike, output: str | os.PathLike, task: str,
                 force: bool = False, kv_cache: str | None = None, fused_attention: bool = False) -> Layout:
    """User errors of ``moeport export --layout`` that need no export to find: the task, the KV cache kind, fused
    attention, the checkpoint's config and tokenizer, the model type, the output folder."""
    spec = get_layout(layout)
    if task != WITH_PAST_TASK:
        raise MoeportError(f"--layout writes a runtime folder around a KV-cache decoder; add --task {WITH_PAST_TASK}")
    spec.check_kv_cache(kv_cache or KV_CACHE_CONCAT)
    if fused_attention and not spec.fused_attention:
        raise MoeportError(f"{spec.runtime or spec.name} does not run onnxruntime's GroupQueryAttention; export the "
                           f"{spec.name} layout without --fused-attention")
    checkpoint = Path(checkpoint)
    if (checkpoint / CONFIG).is_file():  # a missing config.json is the exporter's error to give
        config = _read_json(checkpoint / CONFIG, "re-save the checkpoint")
        spec.model_type(str(config.get("model_type", "")))
        _check_tokenizer(checkpoint, config.get("vocab_size"))
    _check_output(Path(output), force)
    return spec


def _check_output(output: Path, force: bool) -> None:
    # --force replaces a previous model folder, never an arbitrary directory.
    check_output_directory(output, force, lambda path: detect(path) is not None, "is no model folder")


# -- writing a folder -----------------------------------------------------------------------------------


def _tokenizer_config(checkpoint: Path, config: dict) -> dict:
    """The checkpoint's tokenizer_config.json, readable by every runtime (see the module docstring)."""
    path = checkpoint / TOKENIZER_CONFIG
    data = _read_json(path, "re-save the tokenizer") if path.is_file() else {}
    if data.get("tokenizer_class") in (None, *TRANSFORMERS5_TOKENIZER_CLASSES):
        data["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    data.pop("backend", None)  # transformers 5's note of which backend wrote it; nothing else reads it
    # What the graph takes: transformers 4's PreTrainedTokenizerFast otherwise adds token_type_ids, which its
    # generate() refuses.
    data.setdefault("model_input_names", [INPUT_IDS, ATTENTION_MASK])
    backend = load_tokenizer(checkpoint).backend
    probe = "a"
    plain, special = backend.encode(probe, add_special_tokens=False).ids, backend.encode(probe).ids
    data["add_bos_token"] = len(special) > len(plain) and special[: 1] != plain[: 1]
    data["add_eos_token"] = len(special) > len(plain) and special[-1:] != plain[-1:]
    for key in ("bos", "eos", "pad"):
        token_id = config.get(f"{key}_token_id")
        name = f"{key}_token"
        if name not in data and isinstance(token_id, int) and backend.id_to_token(token_id) is not None:
            data[name] = backend.id_to_token(token_id)
    return data


def _generation_config(checkpoint: Path, config: dict) -> dict:
    path = checkpoint / GENERATION_CONFIG
    if path.is_file():
        return _read_json(path, "re-save the checkpoint")
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(key) is not None}


def _place_model(model: Path, target: Path, external_data: bool | None) -> bool:
    """Copy ``model`` to ``target``; its weights go to ``target.name + EXTERNAL_DATA_SUFFIX`` when the source
    keeps them outside or ``external_data`` asks for it. Returns whether the target has external data."""
    import onnx
    import onnx_ir as ir

    proto = load_model_proto(model)  # refuses external data outside the model's directory
    has_external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    external = has_external if external_data is None else external_data
    target.parent.mkdir(parents=True, exist_ok=True)
    if not external and not has_external:
        shutil.copyfile(model, target)
        return False
    # onnx_ir reads each external weight when it writes it: a model of several GB is copied in bounded memory.
    ir.save(ir.load(model), target, external_data=target.name + EXTERNAL_DATA_SUFFIX if external else None,
            size_threshold_bytes=1024)
    return external


def write_folder(layout: str, model: str | os.PathLike, checkpoint: str | os.PathLike, output: str | os.PathLike,
                 *, force: bool = False, external_data: bool | None = None) -> Path:
    """Write the ``layout`` folder ``output`` for the with-past ONNX file ``model`` exported from
    ``checkpoint`` (its config.json, generation_config.json and tokenizer are read from there).

    ``external_data``: None keeps what ``model`` has; True / False stores the weights outside / inside the
    model file. Written atomically (``staged_directory``); ``force`` replaces a previous model folder.
    """
    spec = get_layout(layout)
    model, checkpoint, output = Path(model), Path(checkpoint), Path(output)
    if not checkpoint.is_dir():
        raise MoeportError(f"checkpoint directory not found: {checkpoint}")
    config = _read_json(checkpoint / CONFIG, "re-save the checkpoint") if (checkpoint / CONFIG).is_file() else None
    if config is None:
        raise MoeportError(f"no {CONFIG} in {checkpoint}")
    vocab, layers, kv_heads, head_size, kv_cache = _graph_cache(model)
    spec.check_kv_cache(kv_cache)
    _check_tokenizer(checkpoint, vocab)
    if config.get("vocab_size") not in (None, vocab):
        raise MoeportError(f"{checkpoint / CONFIG} says vocab_size {config['vocab_size']} but {model} has {vocab}; "
                           "was it exported from this checkpoint?")
    spec.model_type(str(config.get("model_type", "")))
    _check_output(output, force)
    source = FolderSource(config, _generation_config(checkpoint, config), vocab, layers, kv_heads, head_size,
                          spec.model_file(), kv_cache)
    with staged_directory(output, replace=force) as staging:
        external = _place_model(model, staging / spec.model_file(), external_data)
        files = {CONFIG: {**config, "model_type": spec.model_type(str(config.get("model_type", "")))},
                 GENERATION_CONFIG: source.generation,
                 TOKENIZER_CONFIG: _tokenizer_config(checkpoint, config)}
        files.update(spec.files(spec, source, external))
        for name, data in files.items():
            (staging / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(checkpoint / TOKENIZER_JSON, staging / TOKENIZER_JSON)
        for name in TOKENIZER_EXTRAS:
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, staging / name)
    return output


# -- reading a folder back -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Folder:
    """A model folder on disk: its layout, its model file and where its tokenizer is."""

    layout: Layout
    directory: Path

    @property
    def model(self) -> Path:
        return self.directory / self.layout.model_file()

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory

    def variant(self, mode: str) -> Path:
        """Where ``moeport quantize DIR --mode MODE`` writes its variant in this folder."""
        return self.directory / self.layout.variant_file(mode)


def detect(directory: str | os.PathLike) -> Layout | None:
    """The layout whose marker ``directory`` holds (registration order decides ties), None for none."""
    directory = Path(directory)
    for spec in _LAYOUTS.values():
        path = directory / spec.marker[0]
        if not path.is_file():
            continue
        if not spec.marker[1]:
            return spec
        try:
            if spec.marker[1] in json.loads(path.read_text(encoding="utf-8")):
                return spec
        except (OSError, ValueError, TypeError):
            continue
    return None


def open_folder(directory: str | os.PathLike) -> Folder:
    """The model folder ``directory``, checked: its model file is there and its config files and tokenizer
    fit that model (bad folders are user errors, one line each)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MoeportError(f"model folder not found: {directory}")
    spec = detect(directory)
    if spec is None:
        raise MoeportError(f"{directory} is not a model folder: it has none of "
                           f"{', '.join(sorted({s.marker[0] for s in _LAYOUTS.values()}))}; export one with "
                           "`moeport export --layout`")
    folder = Folder(spec, directory)
    if not folder.model.is_file():
        raise MoeportError(f"{directory} is a {spec.name} folder but its model file {spec.model_file()} is missing")
    vocab, layers, kv_heads, head_size, kv_cache = _graph_cache(folder.model)
    if not (directory / CONFIG).is_file():
        raise MoeportError(f"{directory} is a {spec.name} folder without {CONFIG}; re-export the folder")
    config = _read_json(directory / CONFIG, "re-export the folder")
    if config.get("vocab_size") not in (None, vocab):
        raise MoeportError(f"{directory / CONFIG} does not match {folder.model}: vocab_size {config['vocab_size']} "
                           f"vs the model's {vocab}; re-export the folder")
    if spec.marker[0] == GENAI_CONFIG:
        genai = _read_json(directory / GENAI_CONFIG, "re-export the folder")
        decoder = genai.get("model", {}).get("decoder", {})
        share = genai.get("search", {}).get("past_present_share_buffer", False)
        for key, value, found in (("decoder.num_hidden_layers", layers, decoder.get("num_hidden_layers")),
                                  ("decoder.num_key_value_heads", kv_heads, decoder.get("num_key_value_heads")),
                                  ("decoder.head_size", head_size, decoder.get("head_size")),
                                  ("search.past_present_share_buffer", kv_cache == KV_CACHE_SHARED, share)):
            if found != value:
                raise MoeportError(f"{directory / GENAI_CONFIG} does not match {folder.model}: {key} is {found}, the "
                                   f"model's is {value}; re-export the folder")
    if not (directory / TOKENIZER_JSON).is_file():
        raise MoeportError(f"{directory} has no {TOKENIZER_JSON}; re-export the folder from a checkpoint with its "
                           "tokenizer")
    _check_tokenizer(directory, vocab)
    return folder


def model_file(path: str | os.PathLike) -> Path:
    """The ONNX file ``path`` names: a model folder's model file (the folder checked, ``open_folder``), else
    ``path`` itself. What the commands that need no tokenizer resolve their model argument with."""
    path = Path(path)
    return open_folder(path).model if path.is_dir() else path


def model_and_tokenizer(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(model file, tokenizer folder or None)`` for a model folder or an ONNX file: a file inside a model
    folder (a quantized variant) gets that folder's tokenizer."""
    path = Path(path)
    if path.is_dir():
        folder = open_folder(path)
        return folder.model, folder.tokenizer_dir
    for parent in (path.parent, path.parent.parent):
        spec = detect(parent)
        if spec is not None and path.parent == (parent / spec.model_file()).parent:
            return path, parent if (parent / TOKENIZER_JSON).is_file() else None
    return path, None


def variant_target(directory: str | os.PathLike, mode: str | None,
                   target_default: str) -> tuple[str, Path, Path, Path, Layout]:
    """``(mode, model file, variant file, tokenizer folder, layout)`` for quantizing the model folder ``directory``
    to ``mode`` -- None: the layout's ``default_mode``, else ``target_default`` (the target's default mode). The
    variant gets the name the folder's runtime looks for (``Layout.variant_suffixes``); the layout says what that
    runtime runs (``Layout.fused_experts``)."""
    folder = open_folder(directory)
    mode = mode or folder.layout.default_mode or target_default
    return mode, folder.model, folder.variant(mode), folder.tokenizer_dir, folder.layout


def genai_overlay(model_file: str) -> str:
    """The ``og.Config.overlay`` JSON that makes onnxruntime-genai load ``model_file`` (a variant) instead of
    the folder's model.onnx."""
    return json.dumps({"model": {"decoder": {"filename": model_file}}})


# -- the layouts ---------------------------------------------------------------------------------------


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _genai_files(spec: Layout, source: FolderSource, external: bool) -> dict[str, dict]:
    config, generation = source.config, source.generation
    eos = _ids(generation.get("eos_token_id", config.get("eos_token_id")))
    bos = _ids(generation.get("bos_token_id", config.get("bos_token_id")))
    pad = _ids(generation.get("pad_token_id", config.get("pad_token_id")))
    context = int(config.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH)
    model = {
        # genai's "decoder" is the type that runs a graph by the names below; the builder's own types
        # (mixtral, qwen3moe ...) are refused by its runtime.
        "type": spec.generic_model_type,
        "bos_token_id": bos[0] if bos else 0,
        "eos_token_id": eos,
        # genai masks every prompt position holding this id when it pads a batch.
        "pad_token_id": pad[0] if pad else (eos[0] if eos else 0),
        "vocab_size": source.vocab_size,
        "context_length": context,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": source.model_file,
            "head_size": source.head_size,
            "hidden_size": int(config.get("hidden_size") or 0),
            "num_attention_heads": int(config.get("num_attention_heads") or source.kv_heads),
            "num_key_value_heads": source.kv_heads,
            "num_hidden_layers": source.num_layers,
            "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": POSITION_IDS,
                       "past_key_names": past_name_pattern("key"), "past_value_names": past_name_pattern("value")},
            "outputs": {"logits": LOGITS, "present_key_names": present_name_pattern("key"),
                        "present_value_names": present_name_pattern("value")},
        },
    }
    search = {
        "do_sample": bool(generation.get("do_sample", False)),
        "num_beams": int(generation.get("num_beams", 1)),
        "num_return_sequences": 1,
        "min_length": 0,
        "max_length": context,
        "temperature": float(generation.get("temperature", 1.0)),
        "top_k": int(generation.get("top_k", 50)),
        "top_p": float(generation.get("top_p", 1.0)),
        "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
        "length_penalty": 1.0,
        "early_stopping": True,
        "no_repeat_ngram_size": 0,
        "diversity_penalty": 0.0,
        # A Concat cache makes a fresh present each step, so genai must hand over separate past and present
        # tensors; a shared cache writes into its past buffer (max_length long), which genai then binds as the
        # present too.
        "past_present_share_buffer": source.kv_cache == KV_CACHE_SHARED,
    }
    return {GENAI_CONFIG: {"model": model, "search": search}}


def _transformers_js_files(spec: Layout, source: FolderSource, external: bool) -> dict[str, dict]:
    options: dict = {"dtype": "fp32"}  # the file our export writes; a variant is chosen with dtype= at load
    if external:
        # Per file name, so that quantized variants saved without external data are not looked for it.
        options["use_external_data_format"] = {Path(source.model_file).name: 1}
    config = {**source.config, "model_type": spec.model_type(str(source.config.get("model_type", ""))),
              TRANSFORMERS_JS_CONFIG: options}
    return {CONFIG: config}


def _no_files(spec: Layout, source: FolderSource, external: bool) -> dict[str, dict]:
    return {}


# Families each runtime was shown to load under their own model_type (tests/test_layouts.py); any other family
# gets the layout's generic decoder type.
register_layout(Layout(
    name="genai",
    description="onnxruntime-genai: model.onnx + genai_config.json (type decoder, Concat KV cache)",
    model_dir="",
    variant_suffixes=MODE_SUFFIXES,
    native_model_types=frozenset(),
    generic_model_type="decoder",
    marker=(GENAI_CONFIG, ""),
    files=_genai_files,
    runtime="onnxruntime-genai",
    kv_caches=(KV_CACHE_CONCAT, KV_CACHE_SHARED),
))
register_layout(Layout(
    name="transformers.js",
    description="transformers.js: onnx/model.onnx, quantized variants by its dtype suffixes",
    model_dir="onnx",
    variant_suffixes={"int4": "_q4", "int8": "_int8", "int8-dynamic": "_quantized", "fp16": "_fp16"},
    # transformers.js 4.3 registers these; it refuses mixtral, olmoe and granitemoe (run as llama).
    native_model_types=frozenset({"qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"}),
    generic_model_type="llama",
    marker=(CONFIG, TRANSFORMERS_JS_CONFIG),
    files=_transformers_js_files,
    runtime="transformers.js",
    # transformers.js 4.3 ships onnxruntime-node 1.30, whose QMoE has no accuracy_level (it refused the file).
    fused_experts=False,
    # Not tried in transformers.js's onnxruntime-node 1.30 or in onnxruntime-web: its variants keep standard ops.
    fused_attention=False,
    # its 8-bit dtypes are QDQ int8 and int8-dynamic; 8-bit blocks have no transformers.js dtype name
    default_mode="int8",
))
register_layout(Layout(
    name="optimum",
    description="Optimum ORTModelForCausalLM: model.onnx + config.json that transformers 4 reads",
    model_dir="",
    variant_suffixes=MODE_SUFFIXES,
    # transformers 4.57 (which optimum-onnx needs) knows these; a family only transformers 5 knows runs as llama.
    native_model_types=frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "granitemoe",
                                  "gpt_oss"}),
    generic_model_type="llama",
    marker=(MODEL_FILE, ""),
    files=_no_files,
    runtime="Optimum",
))
