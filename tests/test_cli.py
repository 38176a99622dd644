"""The CLI: output format, exit codes and one-line messages of the failure cases."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeport import _lazy
from moeport._fs import staged_file
from moeport.cli import main
from tiny_hf import TINY_MIXTRAL, save_tiny_mixtral


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_samples_list_prints_one_name_per_line(capsys):
    code, out, _ = run_cli(capsys, "samples", "list")
    assert code == 0
    assert out.splitlines()[:3] == ["topk", "topk-raw", "switch"]
    assert "trained" in out.splitlines()


def test_samples_create(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "samples", "create", "switch", str(tmp_path / "s"))
    assert code == 0 and (tmp_path / "s" / "model.safetensors").is_file()


def test_export_and_verify_json(capsys, tmp_path, sample_checkpoint):
    checkpoint = sample_checkpoint("sigmoid-shared")
    model = tmp_path / "m.onnx"
    code, out, _ = run_cli(capsys, "export", str(checkpoint), "-o", str(model), "--with-routing", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["strategy"] == "sorted" and result["with_routing"] and result["validation"]["passed"]
    code, out, _ = run_cli(capsys, "verify", str(model), "--checkpoint", str(checkpoint), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["passed"] is True
    assert report["max_abs_err"] <= 1e-4
    assert report["routing_agreement"] == 1.0
    assert report["argmax_agreement"] == 1.0
    assert [s["shape"] for s in report["shapes"]] == ["1x1", "3x7", "2x64"]


def test_export_fused_attention_prints_what_it_fused(capsys, tmp_path):
    """``--fused-attention``: the `attention:` line says how many layers became GroupQueryAttention."""
    checkpoint = save_tiny_mixtral(tmp_path / "mixtral")
    code, out, _ = run_cli(capsys, "export", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--task",
                           "text-generation-with-past", "--kv-cache", "shared", "--fused-attention")
    assert code == 0, out
    layers = TINY_MIXTRAL["num_hidden_layers"]
    assert f"attention: fused the attention of {layers} layer(s) into GroupQueryAttention" in out.splitlines()
    assert "validated against PyTorch" in out


def test_verify_fails_with_exit_1_beyond_tolerance(capsys, exported, sample_checkpoint):
    model = exported("topk", with_routing=True).output
    code, out, _ = run_cli(capsys, "verify", str(model), "--checkpoint", str(sample_checkpoint("topk")),
                           "--atol", "0", "--shapes", "2x8")
    assert code == 1
    assert "FAILED" in out


def test_verify_without_routing_reports_null(capsys, exported, sample_checkpoint):
    model = exported("switch").output
    code, out, _ = run_cli(capsys, "verify", str(model), "--checkpoint", str(sample_checkpoint("switch")), "--json")
    assert code == 0 and json.loads(out)["routing_agreement"] is None


@pytest.mark.parametrize("case, args, exit_code, message", [
    ("missing directory", ["export", "{tmp}/nope", "-o", "{tmp}/x.onnx"], 1,
     "error: checkpoint directory not found: {tmp}/nope"),
    ("file, not directory", ["export", "{tmp}/file.txt", "-o", "{tmp}/x.onnx"], 1,
     "error: checkpoint must be a directory holding config.json, got a file: {tmp}/file.txt"),
    ("no config.json", ["export", "{tmp}/empty", "-o", "{tmp}/x.onnx"], 1,
     "error: no config.json in {tmp}/empty: not a checkpoint directory"),
    ("unknown family", ["export", "{tmp}/unknown", "-o", "{tmp}/x.onnx"], 1,
     "error: {tmp}/unknown/config.json names no known model family (family='llama-dense'); "
     "known families: moeport_lm, moeport_ensemble, transformers, switch_transformers"),
    ("config not JSON", ["export", "{tmp}/notjson", "-o", "{tmp}/x.onnx"], 1,
     "error: {tmp}/notjson/config.json is not valid JSON (Expecting property name enclosed in double quotes at line 1)"),
    ("shapes that do not parse", ["verify", "{tmp}/x.onnx", "--checkpoint", "{tmp}", "--shapes", "1x1,3by7"], 2,
     "error: cannot parse shape '3by7' in '1x1,3by7': expected BATCHxSEQ[,BATCHxSEQ...] with positive sizes, "
     "e.g. 1x1,3x7,2x64"),
    ("zero-size shape", ["verify", "{tmp}/x.onnx", "--checkpoint", "{tmp}", "--shapes", "0x4"], 2,
     "error: cannot parse shape '0x4' in '0x4': expected BATCHxSEQ[,BATCHxSEQ...] with positive sizes, "
     "e.g. 1x1,3x7,2x64"),
    ("missing model", ["verify", "{tmp}/none.onnx", "--checkpoint", "{tmp}"], 1,
     "error: model file not found: {tmp}/none.onnx"),
    ("not an onnx file", ["verify", "{tmp}/file.txt", "--checkpoint", "{tmp}"], 1,
     "error: {tmp}/file.txt is not a readable ONNX model (DecodeError)"),
    ("unknown strategy", ["export", "{tmp}", "-o", "{tmp}/x.onnx", "--strategy", "magic"], 2,
     "error: Invalid value for '--strategy': 'magic' is not one of 'auto', 'sorted', 'gather', 'dense', "
     "'capacity'. (see moeport --help)"),
    ("unknown sample", ["samples", "create", "nope", "{tmp}/s"], 1,
     "error: unknown sample 'nope'; choose one of topk, topk-raw, switch, sigmoid-shared, soft, ensemble, "
     "ensemble-fixed, trained"),
])
def test_failure_cases_print_one_line(capsys, tmp_path, case, args, exit_code, message):
    (tmp_path / "file.txt").write_text("not onnx")
    (tmp_path / "empty").mkdir()
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text('{"family": "llama-dense"}')
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "config.json").write_text("{family: moeport_lm")
    code, out, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == exit_code, case
    expected = message.format(tmp=tmp_path)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0] == expected
    assert "Traceback" not in err and not out
    assert not (tmp_path / "x.onnx").exists()


def test_model_without_moeport_metadata(capsys, tmp_path, sample_checkpoint):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "plain.onnx")
    code, _, err = run_cli(capsys, "verify", str(tmp_path / "plain.onnx"), "--checkpoint",
                           str(sample_checkpoint("topk")))
    assert code == 1
    assert err.strip() == (f"error: {tmp_path / 'plain.onnx'} has no moeport metadata (family, experts); "
                           "export it with `moeport export`")


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--debug", "export", str(tmp_path / "nope"), "-o", str(tmp_path / "x.onnx"))
    assert code == 1 and "Traceback" in err and err.strip().endswith(f"checkpoint directory not found: {tmp_path / 'nope'}")


def test_console_script_entry_point(tmp_path):
    """The installed `moeport` command runs (version) and keeps stdout clean."""
    result = subprocess.run([sys.executable, "-m", "moeport.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "0.1.0" in result.stdout


def test_demo_exports_verifies_benches_and_quantizes(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "demo", "--workdir", str(tmp_path / "demo"), "--sample", "switch", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["verify"]["passed"] is True and report["verify"]["routing_agreement"] == 1.0
    shapes = [r["shape"] for r in report["bench"]["results"]]
    assert shapes == ["1x1", "1x64"]
    assert all(r["ort_ms"] > 0 and r["torch_ms"] > 0 and r["speedup"] > 0 for r in report["bench"]["results"])
    blocks, int4 = report["quantized"]
    assert (blocks["mode"]["name"], int4["mode"]["name"]) == ("int8-blocks", "int4")
    for q in (blocks, int4):
        assert Path(q["output"]).is_file() and q["router"]["kept_float_nodes"] > 0
        quality = q["quality"]
        assert quality["perplexity_after"] > 0 and quality["latency_before_ms"] > 0 and quality["latency_after_ms"] > 0
        assert quality["parity"]["routing_agreement"] is not None
    assert blocks["quality"]["size_ratio"] < 0.4 and int4["quality"]["size_ratio"] < 0.3
    assert blocks["quality"]["parity"]["routing_agreement"] >= 0.95
    # a second run reuses the checkpoint and replaces its own model
    code, out, _ = run_cli(capsys, "demo", "--workdir", str(tmp_path / "demo"), "--sample", "switch", "--json",
                           "--no-quantize")
    assert code == 0 and json.loads(out)["quantized"] == []


@pytest.mark.parametrize("signum, code, message", [(signal.SIGINT, 1, "error: aborted"),
                                                   (signal.SIGTERM, 143, "error: terminated")], ids=["ctrl-c", "kill"])
def test_a_signal_during_export_prints_one_line_and_leaves_nothing(tmp_path, sample_checkpoint, signum, code, message):
    """SIGINT (Ctrl-C) or SIGTERM (kill, a job scheduler) while exporting (torch import, tracing or validation):
    one line, no traceback, no file and no staging directory (Python's own SIGTERM ends the process on the spot)."""
    out = tmp_path / "m.onnx"
    # SIGINT as in a terminal: a test run started in the background (nohup) would hand its ignored SIGINT down
    process = subprocess.Popen([sys.executable, "-c", "from moeport.cli import main; main()", "export",
                                str(sample_checkpoint("topk")), "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(3)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == message, err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_quantize_removes_its_work_directory(capsys, monkeypatch, exported, tmp_path):
    """quantize writes a prepared copy of the model (as large as the model) into a hidden work directory beside
    the output; a SIGTERM in the middle removes it with the staging directory, and says so in one line."""
    from moeport.quant import core

    model = exported("topk").output
    out = tmp_path / "q.onnx"
    save_model, seen = core.save_model, []

    def save_then_get_killed(model_ir, path, **options):
        save_model(model_ir, path, **options)
        seen.extend(p.name for p in tmp_path.iterdir())
        signal.raise_signal(signal.SIGTERM)  # what `kill PID` does, through the CLI's handler

    monkeypatch.setattr(core, "save_model", save_then_get_killed)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Python's default, as in any process
    try:
        code, _, err = run_cli(capsys, "quantize", str(model), "-o", str(out), "--mode", "int4",
                               "--latency-runs", "0")
        handler_after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert any(".q.onnx.work." in name for name in seen), seen  # the work directory was there when it came
    assert code == 143 and err.strip() == "error: terminated", err
    assert list(tmp_path.iterdir()) == []
    assert handler_after is signal.SIG_DFL


def test_scratch_a_killed_run_left_beside_the_output_is_named_with_its_size(capsys, exported, tmp_path):
    """A process killed outright (SIGKILL, the out-of-memory killer) cannot remove its hidden staging and work
    directories; the next command writing that output says where they are and how large, and leaves them."""
    model = exported("topk").output
    work = tmp_path / ".q.onnx.work.ab3_x9zq"
    (work / ".prepared.onnx.data.tug0h_sr").mkdir(parents=True)
    (work / ".prepared.onnx.data.tug0h_sr" / "prepared.onnx.data").write_bytes(b"\0" * 3_000_000)
    (tmp_path / ".q.onnx.kd83_1ab").mkdir()
    (tmp_path / ".other.onnx.kd83_1ab").mkdir()  # another output's: not named
    code, _, err = run_cli(capsys, "quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--mode", "int4",
                           "--latency-runs", "0", "--json")
    assert code == 0, err
    warning = [line for line in err.splitlines() if "hidden scratch" in line]
    assert warning == [f"warning: 2 hidden scratch directories beside {tmp_path / 'q.onnx'} (3.0 MB: .q.onnx.kd83_1ab, "
                       f".q.onnx.work.ab3_x9zq) left by a moeport run that was killed (out of memory?); delete them "
                       f"unless another command is writing {tmp_path / 'q.onnx'} now"], err
    assert work.is_dir() and (tmp_path / "q.onnx").is_file()
    # once they are gone: no warning
    for leftover in (work, tmp_path / ".q.onnx.kd83_1ab"):
        shutil.rmtree(leftover)
    code, _, err = run_cli(capsys, "quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--mode", "int4",
                           "--latency-runs", "0", "--json", "--force")
    assert code == 0 and "hidden scratch" not in err, err


def _raise_wrapped_interrupt(*args, **kwargs):
    """What torch.onnx does when Ctrl-C lands while torch._dynamo is half imported: a library error from it."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        try:
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'")
        except AttributeError as inner:
            raise RuntimeError("Failed to export the model with torch.export") from inner


def test_ctrl_c_wrapped_by_a_library_is_still_aborted(capsys, monkeypatch, sample_checkpoint, tmp_path):
    monkeypatch.setattr(_lazy.export, "export_checkpoint", _raise_wrapped_interrupt)
    code, _, err = run_cli(capsys, "export", str(sample_checkpoint("topk")), "-o", str(tmp_path / "m.onnx"))
    assert code == 1 and err.strip() == "error: aborted"


def test_a_bug_without_an_interrupt_keeps_its_traceback(monkeypatch, sample_checkpoint, tmp_path):
    def fail(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(_lazy.export, "export_checkpoint", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["export", str(sample_checkpoint("topk")), "-o", str(tmp_path / "m.onnx")])


def test_a_ctrl_c_a_library_swallows_still_stops_before_anything_is_written(capsys, monkeypatch, sample_checkpoint,
                                                                          tmp_path):
    """torch.onnx once caught a KeyboardInterrupt, retried its capture another way and finished: the SIGINT the CLI
    recorded still aborts the command, and the staged output is not moved into place."""
    out = tmp_path / "m.onnx"

    def export_that_swallows_ctrl_c(checkpoint, output, **options):
        with staged_file(output) as staging:
            (staging / Path(output).name).write_bytes(b"onnx")
            try:
                signal.raise_signal(signal.SIGINT)  # what the user's Ctrl-C does, through the CLI's handler
            except KeyboardInterrupt:
                pass  # the library carries on

    monkeypatch.setattr(_lazy.export, "export_checkpoint", export_that_swallows_ctrl_c)
    # Python's own handler, as in a terminal (a CI job started in the background inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, _, err = run_cli(capsys, "export", str(sample_checkpoint("topk")), "-o", str(out))
        handler_after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 1 and err.strip() == "error: aborted"
    assert list(tmp_path.iterdir()) == []
    # the handler is the previous one again, and nothing remembers the interrupt: the next write goes through
    assert handler_after is signal.default_int_handler
    with staged_file(out) as staging:
        (staging / out.name).write_bytes(b"onnx")
    assert out.read_bytes() == b"onnx"
