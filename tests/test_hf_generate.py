"""KV-cache decoder export of transformers MoE models, and greedy generation on onnxruntime."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")

from moeport.cli import main  # noqa: E402
from moeport.exporter.export import export_checkpoint  # noqa: E402
from moeport.runtime.generate import generate  # noqa: E402
from tiny_hf import PADDED, PROMPT, transformers_generate  # noqa: E402

# The families test_layouts.py also deploys (conftest's session-wide ``deployed`` exports each once).
MODEL_TYPES = ("mixtral", "qwen3_moe", "deepseek_v3")


@pytest.fixture(scope="module")
def with_past(deployed):
    """model_type -> (checkpoint dir, with-past ONNX path, eager transformers model)."""

    def make(model_type):
        source = deployed(model_type)
        return source.checkpoint, source.onnx, source.model

    return make


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_tokens_match_transformers(with_past, model_type):
    _, model_path, model = with_past(model_type)
    single = generate(model_path, [PROMPT], max_new_tokens=32)
    assert single.token_ids == transformers_generate(model, [PROMPT])
    assert len(single.token_ids[0]) == 32
    padded = generate(model_path, PADDED, max_new_tokens=32)
    assert padded.token_ids == transformers_generate(model, PADDED)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_with_past_graph_io_and_sparse_dispatch(with_past, model_type, routed_segments):
    _, model_path, model = with_past(model_type)
    graph = onnx.load(str(model_path))
    onnx.checker.check_model(graph, full_check=True)
    names = [i.name for i in graph.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    layers = model.config.num_hidden_layers
    assert names[3:] == [f"past_key_values.{i}.{p}" for i in range(layers) for p in ("key", "value")]
    outputs = [o.name for o in graph.graph.output]
    assert outputs == ["logits"] + [f"present.{i}.{p}" for i in range(layers) for p in ("key", "value")]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims["attention_mask"] == ["batch", "past_sequence + sequence"]
    assert dims["past_key_values.0.key"] == ["batch", "past_kv_heads", "past_sequence", "past_head_size"]
    # The presents fix what the past leaves free: one (kv_heads, head_dim) for every tensor (values padded).
    cache = {(o.type.tensor_type.shape.dim[1].dim_value, o.type.tensor_type.shape.dim[3].dim_value)
             for o in graph.graph.output if o.name.startswith("present.")}
    assert len(cache) == 1 and min(next(iter(cache))) > 0, cache
    ops = [n.op_type for n in graph.graph.node]
    # sparse: per MoE layer one sort (TopK) of the slots and one routed segment per expert feeding its
    # MatMuls; an all-experts fallback would have no routed Split.
    moe_layers = sum(1 for m in model.modules() if hasattr(m, "is_transposed") and hasattr(m, "has_gate"))
    assert ops.count("TopK") >= 2 * moe_layers  # the router's top-k and the slot sort
    assert routed_segments(graph) == [8] * moe_layers  # every deployed tiny model has 8 routed experts
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)


def test_generate_cli_json(with_past, capsys):
    _, model_path, model = with_past("mixtral")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(model_path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "8",
              "--json"])
    assert exit_info.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    assert result["token_ids"] == transformers_generate(model, [PROMPT], 8)[0]
    assert result["tokens_per_s"] > 0 and result["prefill_ms"] > 0 and result["decode_tokens_per_s"] > 0


def test_generate_cli_threads_and_speed_line(with_past, capsys, monkeypatch):
    """``--threads`` reaches the session (the tokens do not change); the speed line on stderr gives the prefill and
    the decode steps apart."""
    from moeport.runtime import generate as generate_module

    _, model_path, model = with_past("mixtral")
    create_session, threads = generate_module.create_session, []

    def spy(*args, **options):
        threads.append(options.get("threads"))
        return create_session(*args, **options)

    monkeypatch.setattr(generate_module, "create_session", spy)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(model_path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "8",
              "--threads", "1"])
    assert exit_info.value.code in (0, None)
    out, err = capsys.readouterr()
    assert out.strip() == ",".join(map(str, transformers_generate(model, [PROMPT], 8)[0])) and threads == [1]
    assert re.fullmatch(r"8 tokens, [0-9.]+ tokens/s \(prefill [0-9]+ ms, decode [0-9.]+ tokens/s\)", err.strip()), err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(model_path), "--prompt-ids", "1,2", "--threads", "0"])
    assert exit_info.value.code == 2
    assert "--threads" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,x"], "error: cannot parse --prompt-ids '1,x': expected comma-separated token ids, e.g. 1,2,3"),
    (["--prompt-ids", "1,500"], "error: prompt token id 500 is outside the model's vocabulary [0, 128)"),
    ([], "error: give exactly one of --prompt-ids and --prompt"),
])
def test_generate_cli_errors(with_past, capsys, args, message):
    _, model_path, _ = with_past("mixtral")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(model_path), *args])
    assert exit_info.value.code in (1, 2)
    assert capsys.readouterr().err.strip() == message


def test_generate_refuses_a_logits_graph(exported, capsys):
    model = exported("switch").output
    with pytest.raises(SystemExit):
        main(["generate", str(model), "--prompt-ids", "1,2"])
    assert capsys.readouterr().err.strip() == (
        f"error: {model} has no KV-cache inputs; export it with --task text-generation-with-past")


def test_with_past_task_refused_for_sample_family(sample_checkpoint, tmp_path):
    from moeport import MoeportError

    with pytest.raises(MoeportError, match="task 'text-generation-with-past' does not apply to this moeport_lm "
                                           "model: it has no KV cache"):
        export_checkpoint(sample_checkpoint("topk"), tmp_path / "x.onnx", task="text-generation-with-past")
    assert not (tmp_path / "x.onnx").exists()


def test_prefill_and_decode_match_logits_of_full_forward(with_past):
    """Decoding token by token with the cache gives the logits of one full forward pass."""
    from moeport.runtime.generate import decoder_feeds, empty_past
    from moeport.runtime.session import create_session

    _, model_path, model = with_past("qwen3_moe")
    session = create_session(model_path)
    names = [o.name for o in session.get_outputs()]
    ids = np.array([PROMPT], dtype=np.int64)
    past = empty_past(session.get_inputs(), 1, session.get_outputs())
    assert past["past_key_values.0.key"].shape == (1, model.config.num_key_value_heads, 0, 8)  # from the presents
    prefill = dict(zip(names, session.run(None, decoder_feeds(np.ones((1, 4), np.int64), ids[:, :4], past))))
    step = dict(zip(names, session.run(None, decoder_feeds(
        np.ones((1, 5), np.int64), ids[:, 4:5], [prefill[n] for n in names[1:]]))))
    with torch.no_grad():
        full = model(torch.from_numpy(ids[:, :5])).logits.numpy()
    np.testing.assert_allclose(step["logits"][0, 0], full[0, 4], atol=1e-4, rtol=0)
    np.testing.assert_allclose(prefill["logits"][0], full[0, :4], atol=1e-4, rtol=0)


def test_bench_times_prefill_and_decode_of_a_with_past_model(with_past, capsys):
    """``moeport bench`` on a with-past model: each run a prefill of the shape, then ``--decode-steps`` steps of one
    token per row through the cache; the decode steps have their own median and tokens/s (batch / median step)."""
    checkpoint, model_path, _ = with_past("mixtral")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(model_path), "--shapes", "1x4,2x3", "--runs", "2", "--warmup", "1", "--decode-steps", "5",
              "--no-progress", "--json"])
    assert exit_info.value.code in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert report["decode_steps"] == 5
    assert [r["shape"] for r in report["results"]] == ["1x4", "2x3"]
    for row, batch in zip(report["results"], (1, 2)):
        assert row["ort_ms"] > 0 and row["decode_step_ms"] > 0 and row["torch_ms"] is None
        assert row["decode_tokens_per_s"] == pytest.approx(batch / (row["decode_step_ms"] / 1e3))
    with pytest.raises(SystemExit):
        main(["bench", str(model_path), "--shapes", "1x4", "--runs", "1", "--warmup", "0", "--no-progress"])
    assert "decode tok/s" in capsys.readouterr().out
    for extra, message in ((["--checkpoint", str(checkpoint)], "a with-past model's prefill and decode are timed on "
                                                               "onnxruntime alone"),
                           (["--expert-efficiency"], "--expert-efficiency profiles a logits export")):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", str(model_path), "--no-progress", *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_run_takes_a_prompt_alone_for_a_with_past_model(with_past, capsys, tmp_path):
    """``moeport run`` of a with-past model on ``input_ids`` (and its mask) alone runs the prompt's prefill from an
    empty cache: the logits of the unmasked positions are transformers' for the same left-padded batch, the report
    names the inputs it filled in, and a mask that cannot be the prompt's is refused in one line, nothing written."""
    from moeport.runtime.compare import Comparator

    _, model_path, model = with_past("mixtral")
    width = max(map(len, PADDED))
    ids = np.array([[0] * (width - len(row)) + row for row in PADDED], dtype=np.int64)
    mask = np.array([[0] * (width - len(row)) + [1] * len(row) for row in PADDED], dtype=np.int64)
    np.savez(tmp_path / "prompt.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "out.npz"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(model_path), "--inputs", str(tmp_path / "prompt.npz"), "-o", str(out), "--json"])
    assert exit_info.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    layers = model.config.num_hidden_layers
    assert result["filled"] == ["position_ids"] + [f"past_key_values.{i}.{p}" for i in range(layers)
                                                   for p in ("key", "value")]
    assert result["inputs"]["past_key_values.0.key"][2] == 0
    with np.load(out) as saved:
        logits = saved["logits"]
        assert saved["present.0.key"].shape[2] == width  # the prompt's keys, nothing before them
    with torch.no_grad():
        expected = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    kept = mask.astype(bool)
    comparison = Comparator(atol=1e-4).compare({"logits": expected[kept]}, {"logits": logits[kept]}, [])
    assert comparison.passed and comparison.argmax_agreement == 1.0, comparison.to_dict()

    np.savez(tmp_path / "ids.npz", input_ids=ids[1:])  # a mask of ones, then printed with what was filled in
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(model_path), "--inputs", str(tmp_path / "ids.npz")])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    assert (f"a prompt alone: ran as its prefill from an empty cache; filled in attention_mask, position_ids, "
            f"the empty cache's {2 * layers} inputs") in text
    # the cache's inputs and outputs once per kind, for every layer
    assert f"past_key_values.{{0..{layers - 1}}}.value [1, 2, 0, 8]" in text and "past_key_values.0." not in text
    rows = [line.split()[0] for line in text.splitlines() if line.startswith("  ") and "present" in line]
    assert rows == [f"present.{{0..{layers - 1}}}.key", f"present.{{0..{layers - 1}}}.value"]

    for bad, message in ((mask[:, 1:], "input 'attention_mask' is [2, 5] but 'input_ids' is [2, 6]; a mask covers "
                                       "the ids"),
                         (mask * 2, "input 'attention_mask' holds values other than 0 and 1"),
                         (mask * [[0], [1]], "input 'attention_mask' masks every token of row(s) [0]"),
                         (mask.astype(np.int32), "input 'attention_mask' has dtype int32; the model expects int64 "
                                                 "with shape [batch, past_sequence + sequence]")):
        np.savez(tmp_path / "bad.npz", input_ids=ids, attention_mask=bad)
        with pytest.raises(SystemExit) as exit_info:
            main(["run", str(model_path), "--inputs", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "bad-out.npz")])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err == f"error: {message}\n"
        assert not (tmp_path / "bad-out.npz").exists()
    # Part of a cache is not a prompt: the usual input check names what is missing.
    np.savez(tmp_path / "part.npz", input_ids=ids, attention_mask=mask, position_ids=mask)
    with pytest.raises(SystemExit):
        main(["run", str(model_path), "--inputs", str(tmp_path / "part.npz")])
    assert capsys.readouterr().err.startswith("error: input 'past_key_values.0.key' is missing")
