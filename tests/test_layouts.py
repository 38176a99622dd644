"""Deployable model folders (runtime/layouts.py), loaded by the real runtimes with no edits.

Every family in tiny_hf.DEPLOYED is exported once per session as a genai folder (``deployed``); the other
layouts are written from that same graph with ``write_folder``. Each runtime's greedy tokens for text prompts
(batch 1, and a left-padded batch of 2) must equal transformers' ``generate(do_sample=False)``; rows are
compared up to their first end-of-sequence token (after it each runtime pads its own way).

- onnxruntime-genai (pip, in the default test environment): every family, and the int4, int8 and fp16
  variants that ``moeport quantize DIR`` adds;
- transformers.js in Node (``-m transformersjs``): installed on first use into the ignored ``.transformersjs/``
  (``npm install @huggingface/transformers@TRANSFORMERS_JS``), or taken from MOEPORT_TRANSFORMERS_JS_DIR;
- Optimum ``ORTModelForCausalLM`` (``-m optimum``): optimum-onnx pins transformers 4.57, so it runs in its
  own venv, ``.venv-optimum`` (built on first use) or MOEPORT_OPTIMUM_PYTHON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
import pytest
import torch

from moeport.cli import main
from moeport.runtime import layouts
from moeport.runtime.layouts import Layout, get_layout, open_folder, register_layout, write_folder
from tiny_hf import DEPLOYED
from venvs import venv_python

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = list(DEPLOYED)
PROMPTS = ["the quick brown fox", "hello world! experts route tokens"]
NEW_TOKENS = 20
VARIANT_MODES = ("int4", "int8", "int8-dynamic", "fp16", None)  # None: no --mode, the cpu default (int8-blocks)
TRANSFORMERS_JS = "4.3.2"
OPTIMUM_ONNX = "0.1.0"


def until_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    """Each row up to its first end-of-sequence token (genai leaves that token out of the sequence, the others
    keep it and then pad: what comes before it is what all of them generated)."""
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def transformers_greedy(deployed, prompts: list[str], new_tokens: int = NEW_TOKENS) -> tuple[list, list]:
    """(prompt ids, new tokens) of transformers' own greedy generate, prompts left-padded."""
    tokenizer = deployed.tokenizer
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        output = deployed.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    width = inputs["input_ids"].shape[1]
    return inputs["input_ids"].tolist(), until_eos(output[:, width:].tolist(), tokenizer.eos_token_id)


def genai_greedy(folder: Path, prompts: list[str], new_tokens: int = NEW_TOKENS,
                 model_file: str | None = None) -> tuple[list, list]:
    """(prompt ids, new tokens) of onnxruntime-genai on ``folder`` (``model_file``: a variant)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if model_file is not None:
        config.overlay(layouts.genai_overlay(model_file))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")  # genai's default leaves BOS/EOS to chat templates
    ids = tokenizer.encode_batch(prompts).as_numpy() if len(prompts) > 1 else tokenizer.encode(prompts[0])[None]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new_tokens, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    rows = [generator.get_sequence(i)[ids.shape[1]:].tolist() for i in range(len(prompts))]
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"][0]
    return ids.tolist(), until_eos(rows, eos)


def strip_pads(rows: list[list[int]], pad: int) -> list[list[int]]:
    """Prompt rows without their padding (genai pads on the right, transformers on the left)."""
    return [[t for t in row if t != pad] for row in rows]


# -- the registry --------------------------------------------------------------------------------------


def test_registry_refuses_inconsistent_layouts():
    base = get_layout("genai")
    fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
    with pytest.raises(ValueError, match="already registered"):
        register_layout(base)
    with pytest.raises(ValueError, match="must stay inside the folder"):
        register_layout(Layout(**{**fields, "name": "x1", "model_dir": "../up"}))
    with pytest.raises(ValueError, match="its own file name"):
        register_layout(Layout(**{**fields, "name": "x2", "variant_suffixes": {"int4": "_a", "int8": "_a"}}))
    with pytest.raises(ValueError, match="default_mode 'int8-blocks' has no variant suffix"):
        Layout(**{**fields, "name": "x4", "variant_suffixes": {"int4": "_q4"}, "default_mode": "int8-blocks"})
    with pytest.raises(ValueError, match="accepts no model type"):
        register_layout(Layout(**{**fields, "name": "x3", "native_model_types": frozenset(),
                                   "generic_model_type": None}))
    assert layouts.layout_names() == ["genai", "transformers.js", "optimum"]


def test_every_layout_is_exercised_by_a_runtime_test():
    tested = {"genai": test_genai_greedy_matches_transformers, "transformers.js": test_transformers_js_greedy,
              "optimum": test_optimum_greedy}
    assert set(tested) == set(layouts.layout_names())


@pytest.mark.parametrize("layout", ["genai", "transformers.js", "optimum"])
def test_folder_contents(deployed, tmp_path, layout):
    """What each runtime reads, as the registry says: model and external-data names, config model_type, tokenizer
    files every reader accepts."""
    source = deployed("mixtral")
    spec = get_layout(layout)
    folder = write_folder(layout, source.onnx, source.checkpoint, tmp_path / layout, external_data=True)
    assert (folder / spec.model_file()).is_file()
    assert (folder / (spec.model_file() + "_data")).is_file()
    assert open_folder(folder).layout is spec
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == spec.model_type("mixtral")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 5 wrote TokenizersBackend
    assert tokenizer_config["add_bos_token"] is True and tokenizer_config["add_eos_token"] is False
    assert (folder / "tokenizer.json").read_bytes() == (source.checkpoint / "tokenizer.json").read_bytes()
    if layout == "transformers.js":
        assert config["transformers.js_config"]["use_external_data_format"] == {"model.onnx": 1}
    if layout == "genai":
        genai = json.loads((folder / "genai_config.json").read_text())
        decoder = genai["model"]["decoder"]
        assert genai["model"]["type"] == "decoder" and genai["search"]["past_present_share_buffer"] is False
        assert (decoder["num_key_value_heads"], decoder["head_size"], decoder["num_hidden_layers"]) == (2, 8, 2)
        assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
        assert decoder["outputs"]["present_value_names"] == "present.%d.value"


def test_model_types_per_layout():
    assert get_layout("transformers.js").model_type("mixtral") == "llama"  # transformers.js 4.3 has no mixtral
    assert get_layout("transformers.js").model_type("qwen3_moe") == "qwen3_moe"
    assert get_layout("optimum").model_type("afmoe") == "llama"  # transformers 4.57 has no afmoe
    assert get_layout("genai").model_type("gpt_oss") == "decoder"


# -- onnxruntime-genai ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
def test_genai_greedy_matches_transformers(deployed, model_type):
    source = deployed(model_type)
    pad = source.tokenizer.pad_token_id
    for prompts in ([PROMPTS[0]], PROMPTS):
        expected_ids, expected = transformers_greedy(source, prompts)
        ids, tokens = genai_greedy(source.folder, prompts)
        assert strip_pads(ids, pad) == strip_pads(expected_ids, pad)
        assert tokens == expected, (model_type, len(prompts))
    assert len(expected[0]) > 1


def test_generate_cli_prints_text_from_a_folder(deployed, capsys):
    source = deployed("qwen3_moe")
    _, expected = transformers_greedy(source, [PROMPTS[0]], 8)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(source.folder), "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--json"])
    assert exit_info.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    assert until_eos([result["token_ids"]], source.tokenizer.eos_token_id) == expected
    assert result["text"] == source.tokenizer.decode(result["token_ids"])
    with pytest.raises(SystemExit):
        main(["generate", str(source.folder), "--prompt", PROMPTS[0], "--max-new-tokens", "3"])
    assert capsys.readouterr().out.strip() == source.tokenizer.decode(expected[0][:3]).strip()


@pytest.fixture(scope="module")
def quantized_genai(deployed, tmp_path_factory):
    """A copy of the Mixtral genai folder with the int4, int8, int8-dynamic and fp16 variants ``moeport quantize DIR``
    added."""
    folder = Path(shutil.copytree(deployed("mixtral").folder, tmp_path_factory.mktemp("variants") / "genai"))
    for mode in VARIANT_MODES:
        chosen = ["--mode", mode, "--calibration-samples", "8"] if mode else []
        with pytest.raises(SystemExit) as exit_info:
            main(["quantize", str(folder), *chosen, "--no-perplexity", "--latency-runs", "0"])
        assert exit_info.value.code in (0, None), mode
    return folder


@pytest.mark.parametrize("mode", VARIANT_MODES)
def test_genai_loads_and_runs_quantized_variants(quantized_genai, mode):
    spec = get_layout("genai")
    mode = mode or "int8-blocks"
    assert (quantized_genai / spec.variant_file(mode)).is_file()
    # genai runs the CPU form: every integer mode's experts one QMoE a layer
    graph = onnx.load(quantized_genai / spec.variant_file(mode), load_external_data=False).graph
    assert ("QMoE" in {n.op_type for n in graph.node}) == (mode != "fp16")
    _, tokens = genai_greedy(quantized_genai, PROMPTS, model_file=spec.variant_file(mode))
    assert all(len(row) >= 1 and all(0 <= t < 128 for t in row) for row in tokens)
    if mode == "fp16":  # float16 weights keep this tiny model's argmax (int4/int8 move it: not compared)
        assert tokens == genai_greedy(quantized_genai, PROMPTS)[1]


@pytest.mark.parametrize("kv_cache", ["concat", "shared"])
def test_genai_runs_the_fused_attention_like_transformers(deployed, tmp_path, kv_cache):
    """The quantize step's GroupQueryAttention fusion (runtime/fusions.py) on the fp32 folder model: genai, with
    its Concat cache or its buffer shared by past and present (written in place by the kernel), gives
    transformers' tokens for one prompt and a padded batch."""
    import onnx_ir as ir

    from moeport.quant.passes import REMOVE_UNUSED, FuseAttentionPass

    source = deployed("mixtral", kv_cache)
    folder = Path(shutil.copytree(source.folder, tmp_path / "genai"))
    model = ir.load(folder / "model.onnx")
    assert FuseAttentionPass()(model).modified
    REMOVE_UNUSED(model)
    ir.save(model, folder / "model_fused.onnx", external_data="model_fused.onnx.data")
    ops = {node.op_type for node in onnx.load(folder / "model_fused.onnx", load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and "ScatterND" not in ops  # the shared buffer's scatter went too
    for prompts in ([PROMPTS[0]], PROMPTS):
        _, expected = transformers_greedy(source, prompts)
        assert genai_greedy(folder, prompts, model_file="model_fused.onnx")[1] == expected, len(prompts)


def test_genai_runs_a_concat_export_turned_into_a_shared_buffer(deployed, tmp_path):
    """What ``quantize --kv-cache shared`` does to a Concat export (FuseAttentionPass, then ShareCacheBufferPass),
    on the fp32 folder model: a genai folder written from that file (``past_present_share_buffer`` from its
    metadata) binds one buffer as past and present and gives transformers' tokens for one prompt and a padded
    batch."""
    import onnx_ir as ir

    from moeport.quant.passes import REMOVE_UNUSED, FuseAttentionPass, ShareCacheBufferPass

    source = deployed("mixtral")
    model = ir.load(source.folder / "model.onnx")
    fusion = FuseAttentionPass()
    assert fusion(model).modified
    REMOVE_UNUSED(model)
    assert ShareCacheBufferPass(fusion)(model).modified
    ir.save(model, tmp_path / "turned.onnx", external_data="turned.onnx.data")
    folder = write_folder("genai", tmp_path / "turned.onnx", source.checkpoint, tmp_path / "genai")
    assert json.loads((folder / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    for prompts in ([PROMPTS[0]], PROMPTS):
        _, expected = transformers_greedy(source, prompts)
        assert genai_greedy(folder, prompts)[1] == expected, len(prompts)


def test_genai_runs_an_export_with_fused_attention(deployed, tmp_path):
    """``moeport export --layout genai --kv-cache shared --fused-attention``: the folder's fp32 model runs
    GroupQueryAttention on genai's shared buffer and gives transformers' tokens for one prompt and a padded batch."""
    source = deployed("mixtral")
    folder = tmp_path / "genai"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(source.checkpoint), "-o", str(folder), "--task", "text-generation-with-past", "--layout",
              "genai", "--kv-cache", "shared", "--fused-attention"])
    assert exit_info.value.code in (0, None)
    ops = {node.op_type for node in onnx.load(folder / "model.onnx", load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and "ScatterND" not in ops
    assert json.loads((folder / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    for prompts in ([PROMPTS[0]], PROMPTS):
        _, expected = transformers_greedy(source, prompts)
        assert genai_greedy(folder, prompts)[1] == expected, len(prompts)


def test_run_bench_and_inspect_take_a_model_folder(deployed, capsys, tmp_path):
    """A model folder stands for its model file in run, bench, inspect and verify, as in generate and quantize."""
    folder = deployed("mixtral").folder
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(folder), "--checkpoint", str(deployed("mixtral").checkpoint), "--shapes", "1x3",
              "--json"])
    assert exit_info.value.code in (0, None)
    assert json.loads(capsys.readouterr().out)["passed"] is True
    model = folder / "model.onnx"
    for args in (["inspect", "--no-placement"], ["bench", "--shapes", "1x3", "--runs", "1", "--warmup", "0",
                                                 "--decode-steps", "2", "--no-progress"]):
        reports = []
        for path in (folder, model):
            with pytest.raises(SystemExit) as exit_info:
                main([args[0], str(path), *args[1:], "--json"])
            assert exit_info.value.code in (0, None)
            reports.append(json.loads(capsys.readouterr().out))
        assert reports[0]["model"] == reports[1]["model"] == str(model), args[0]
        if args[0] == "inspect":
            assert reports[0] == reports[1]
    # a step after one cached token (run refuses empty dims): zeros as that token's keys and values
    ids = {"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1, 1]], "position_ids": [[1, 2, 3]]}
    np.savez(tmp_path / "inputs.npz", **{name: np.array(value, dtype=np.int64) for name, value in ids.items()},
             **_one_token_past(model))
    outputs = []
    for path in (folder, model):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", str(path), "--inputs", str(tmp_path / "inputs.npz"), "-o", str(tmp_path / "out.npz"),
                  "--force", "--json"])
        assert exit_info.value.code in (0, None)
        capsys.readouterr()
        outputs.append(dict(np.load(tmp_path / "out.npz")))
    np.testing.assert_array_equal(outputs[0]["logits"], outputs[1]["logits"])


@pytest.mark.parametrize("kv_cache", ["concat", "shared"])
def test_inspect_and_package_run_a_with_past_model(deployed, capsys, tmp_path, kv_cache):
    """inspect's placement run and package's .ort-against-.onnx check feed a with-past model a prompt and its empty
    cache (a shared buffer as long as the prompt); random values in every input crashed both with onnxruntime's
    Concat error and a traceback."""
    folder = deployed("mixtral", kv_cache).folder
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(folder), "--json"])
    assert exit_info.value.code in (0, None)
    placement = json.loads(capsys.readouterr().out)["placement"]
    assert placement["nodes"] > 0 and placement["providers"] == {"CPUExecutionProvider": placement["nodes"]}
    with pytest.raises(SystemExit) as exit_info:
        main(["package", str(folder), "--target", "arm64-linux", "-o", str(tmp_path / "bundle"), "--json"])
    assert exit_info.value.code in (0, None)
    check = json.loads(capsys.readouterr().out)["check"]
    assert check["max_abs_diff"] == 0.0 and check["inputs"]["past_key_values.0.key"][2] == (8 if kv_cache == "shared"
                                                                                            else 0), check


def _one_token_past(model: Path) -> dict[str, np.ndarray]:
    """A with-past file's KV cache of one token, zeros, by input name (its heads and head size from the presents:
    ``empty_past`` with a one-column buffer)."""
    from moeport.runtime.generate import empty_past
    from moeport.runtime.session import create_session

    session = create_session(model)
    return empty_past(session.get_inputs(), 1, session.get_outputs(), capacity=1)


def test_genai_shared_kv_cache_matches_transformers(deployed, capsys, tmp_path):
    """--kv-cache shared: one fixed-length buffer for past and present, written in place (genai's
    past_present_share_buffer); same tokens as transformers, in genai and in moeport generate."""
    source = deployed("gpt_oss", "shared")  # sliding-window layers too: the mask applies the window
    genai = json.loads((source.folder / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    for prompts in ([PROMPTS[0]], PROMPTS):
        _, expected = transformers_greedy(source, prompts)
        assert genai_greedy(source.folder, prompts)[1] == expected, len(prompts)
    with pytest.raises(SystemExit):
        main(["generate", str(source.folder), "--prompt", PROMPTS[0], "--max-new-tokens", str(NEW_TOKENS), "--json"])
    tokens = json.loads(capsys.readouterr().out)["token_ids"]
    assert until_eos([tokens], source.tokenizer.eos_token_id) == transformers_greedy(source, [PROMPTS[0]])[1]
    with pytest.raises(layouts.MoeportError, match="transformers.js cannot drive a shared KV cache"):
        write_folder("transformers.js", source.onnx, source.checkpoint, tmp_path / "tjs")


# -- transformers.js (Node) ----------------------------------------------------------------------------


def _transformers_js_entry() -> Path:
    directory = Path(os.environ.get("MOEPORT_TRANSFORMERS_JS_DIR", ROOT / ".transformersjs"))
    entry = directory / "node_modules" / "@huggingface" / "transformers" / "dist" / "transformers.node.mjs"
    if not entry.is_file():
        # onnxruntime-node's install script would download GPU binaries; its CPU ones ship in the package.
        subprocess.run(["npm", "install", "--prefix", str(directory), "--no-audit", "--no-fund",
                        f"@huggingface/transformers@{TRANSFORMERS_JS}"], check=True,
                       env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"})
    return entry


def _run_node(cases: list[dict], tmp_path: Path) -> list[dict]:
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    subprocess.run(["node", str(ROOT / "tests" / "transformersjs_runner.mjs"), str(_transformers_js_entry()),
                    str(cases_file)], check=True)
    return json.loads(Path(f"{cases_file}.result").read_text())


@pytest.mark.transformersjs
def test_transformers_js_greedy(deployed, tmp_path):
    cases, expected = [], []
    for i, model_type in enumerate(FAMILIES):
        source = deployed(model_type)
        folder = write_folder("transformers.js", source.onnx, source.checkpoint, tmp_path / model_type,
                              external_data=i == 0)  # one family with its weights in onnx/model.onnx_data
        for prompts in ([PROMPTS[0]], PROMPTS):
            cases.append({"folder": str(folder), "prompts": prompts, "max_new_tokens": NEW_TOKENS, "dtype": "fp32"})
            expected.append((model_type, source, transformers_greedy(source, prompts)))
    for result, (model_type, source, (expected_ids, expected_tokens)) in zip(_run_node(cases, tmp_path), expected):
        native = model_type in get_layout("transformers.js").native_model_types
        print(model_type, result["model_class"], result["tokens"])
        assert (result["model_class"] == "LlamaForCausalLM") != native, result["model_class"]
        assert result["prompt_ids"] == expected_ids, model_type
        assert until_eos(result["tokens"], source.tokenizer.eos_token_id) == expected_tokens, model_type


@pytest.mark.transformersjs
def test_transformers_js_quantized_variants(deployed, tmp_path):
    source = deployed("qwen3_moe")
    folder = write_folder("transformers.js", source.onnx, source.checkpoint, tmp_path / "qwen3_moe")
    # None: no --mode, the layout's default (int8: 8-bit blocks have no transformers.js dtype)
    modes = ("int4", None, "int8-dynamic", "fp16")
    # transformers.js dtype of each variant's suffix (int8-dynamic: _quantized, its lm_head and embedding in 8-bit
    # blocks for the cpu target)
    dtypes = {"int4": "q4", None: "int8", "int8-dynamic": "q8", "fp16": "fp16"}
    for mode in modes:
        chosen = ["--mode", mode] if mode else []
        with pytest.raises(SystemExit) as exit_info:
            main(["quantize", str(folder), *chosen, "--no-perplexity", "--latency-runs", "0",
                  "--calibration-samples", "8"])
        assert exit_info.value.code in (0, None), mode
        assert (folder / get_layout("transformers.js").variant_file(mode or "int8")).is_file()
    # transformers.js's onnxruntime-node cannot load moeport's QMoE node: its int4 keeps per-expert MatMulNBits;
    # the fused attention is not tried there: its variants keep the exported attention
    q4 = onnx.load(folder / get_layout("transformers.js").variant_file("int4"), load_external_data=False)
    ops = {n.op_type for n in q4.graph.node}
    assert "QMoE" not in ops and "MatMulNBits" in ops and "GroupQueryAttention" not in ops
    q8 = onnx.load(folder / get_layout("transformers.js").variant_file("int8-dynamic"), load_external_data=False)
    assert {"GatherBlockQuantized", "MatMulNBits"} <= {n.op_type for n in q8.graph.node}
    # static int8 in its CPU form: 16-bit activations, 8-bit MatMulNBits in blocks of 32, the table
    # GatherBlockQuantized; its experts per expert too (no QMoE), as the int4's
    int8 = onnx.load(folder / get_layout("transformers.js").variant_file("int8"), load_external_data=False)
    assert "QMoE" not in {n.op_type for n in int8.graph.node}
    blocked = [n for n in int8.graph.node if n.op_type == "MatMulNBits"
               and {(a.name, a.i) for a in n.attribute} >= {("bits", 8), ("block_size", 32)}]
    assert blocked and "GatherBlockQuantized" in {n.op_type for n in int8.graph.node}
    assert {i.data_type for i in int8.graph.initializer if i.name.endswith("_zero_point")} >= {TensorProto.UINT16}
    cases = [{"folder": str(folder), "prompts": PROMPTS, "max_new_tokens": NEW_TOKENS, "dtype": dtypes[mode]}
             for mode in modes]
    for mode, result in zip(modes, _run_node(cases, tmp_path)):
        print(mode, result["tokens"])
        assert all(len(row) >= 1 and all(0 <= t < 128 for t in row) for row in result["tokens"]), mode


# -- Optimum (its own venv) ----------------------------------------------------------------------------


def _optimum_python() -> str:
    # The CPU build of torch first (an unpinned torch from PyPI is a multi-GB CUDA build).
    return venv_python("MOEPORT_OPTIMUM_PYTHON", ROOT / ".venv-optimum", ["torch==2.13.0"],
                       [f"optimum-onnx[onnxruntime]=={OPTIMUM_ONNX}"])


@pytest.mark.optimum
def test_optimum_greedy(deployed, tmp_path):
    python = _optimum_python()
    cases, expected = [], []
    for i, model_type in enumerate(FAMILIES):
        source = deployed(model_type)
        folder = write_folder("optimum", source.onnx, source.checkpoint, tmp_path / model_type,
                              external_data=i == 0)  # one family with its weights in model.onnx_data
        for prompts in ([PROMPTS[0]], PROMPTS):
            cases.append({"folder": str(folder), "prompts": prompts, "max_new_tokens": NEW_TOKENS})
            expected.append((model_type, source, transformers_greedy(source, prompts)))
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    subprocess.run([python, str(ROOT / "tests" / "optimum_runner.py"), str(cases_file)], check=True)
    results = json.loads(Path(f"{cases_file}.result").read_text())
    print(results[0]["versions"])
    for result, (model_type, source, (expected_ids, expected_tokens)) in zip(results, expected):
        print(model_type, result["model_type"], result["tokens"])
        assert result["model_type"] == get_layout("optimum").model_type(model_type)
        assert result["prompt_ids"] == expected_ids, model_type
        assert until_eos(result["tokens"], source.tokenizer.eos_token_id) == expected_tokens, model_type
