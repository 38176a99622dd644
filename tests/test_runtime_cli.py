"""moeport run / bench / inspect / package: the library functions and their CLI commands.

Models are the ``topk`` sample (8 experts, top-2, vocab 256) exported with routing outputs (sorted
dispatch) and with the capacity strategy. Inputs are seeded ``input_ids [batch, seq] int64``; no test
asserts on timings.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from moeport.cli import main
from moeport.errors import MoeportError, UsageError
from moeport.exporter import families
from moeport.runtime._io import TensorSpec, check_inputs, parse_fixed_shapes, save_npz
from moeport.runtime.placement import placement_from_profile

VOCAB = 256


def invoke(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``moeport ARGS`` through ``main`` (the real entry point); return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def routed(exported):
    return exported("topk", with_routing=True).output


@pytest.fixture(scope="module")
def capacity(exported):
    return exported("topk", strategy="capacity").output


@pytest.fixture(scope="module")
def loaded(sample_checkpoint):
    return families.load_checkpoint(sample_checkpoint("topk"))


@pytest.fixture
def ids() -> np.ndarray:
    return np.random.default_rng(7).integers(0, VOCAB, size=(2, 5), dtype=np.int64)


@pytest.fixture
def inputs_npz(tmp_path, ids):
    path = tmp_path / "in.npz"
    np.savez(path, input_ids=ids)
    return path


# --- run ------------------------------------------------------------------------------------------

def test_run_writes_outputs_matching_pytorch(capsys, tmp_path, routed, loaded, ids, inputs_npz):
    out = tmp_path / "out.npz"
    code, stdout, _ = invoke(capsys, "run", routed, "--inputs", inputs_npz, "-o", out, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["ep"] == "cpu" and report["output_file"] == str(out)
    reference = families.reference_outputs(loaded, {"input_ids": ids})
    with np.load(out) as saved:
        assert sorted(saved.files) == sorted(reference)
        np.testing.assert_allclose(saved["logits"], reference["logits"], atol=1e-4, rtol=0)
        for label in ("0", "1"):
            got = np.sort(saved[f"routing.{label}.experts"], axis=-1)
            np.testing.assert_array_equal(got, np.sort(reference[f"routing.{label}.experts"], axis=-1))
    logits = next(o for o in report["outputs"] if o["name"] == "logits")
    assert logits["shape"] == [2, 5, VOCAB] and logits["dtype"] == "float32"
    assert logits["max"] == pytest.approx(float(reference["logits"].max()), abs=1e-4)
    assert not list(tmp_path.glob(".out.npz.*")), "the temporary file of the atomic write was left behind"


def test_run_reports_placement_per_op_and_provider(capsys, routed, inputs_npz):
    code, stdout, _ = invoke(capsys, "run", routed, "--inputs", inputs_npz, "--json")
    assert code == 0
    placement = json.loads(stdout)["placement"]
    assert placement["requested"] == "CPUExecutionProvider"
    assert placement["providers"] == {"CPUExecutionProvider": placement["nodes"]}
    assert sum(n for per_ep in placement["ops"].values() for n in per_ep.values()) == placement["nodes"]
    # The graph's expert MatMuls and the router's TopK must have run (and been counted) on the CPU.
    assert placement["ops"]["MatMul"]["CPUExecutionProvider"] >= 8
    assert placement["ops"]["TopK"]["CPUExecutionProvider"] >= 2
    code, text, _ = invoke(capsys, "run", routed, "--inputs", inputs_npz)
    assert code == 0 and f"CPUExecutionProvider {placement['nodes']}/{placement['nodes']} (100%)" in text


def test_run_refuses_to_overwrite_without_force(capsys, tmp_path, routed, inputs_npz):
    out = tmp_path / "out.npz"
    out.write_bytes(b"keep me")
    code, _, err = invoke(capsys, "run", routed, "--inputs", inputs_npz, "-o", out)
    assert code == 1
    assert err == f"error: output {out} already exists; pass --force to overwrite it\n"
    assert out.read_bytes() == b"keep me"
    code, _, _ = invoke(capsys, "run", routed, "--inputs", inputs_npz, "-o", out, "--force")
    assert code == 0
    with np.load(out) as saved:
        assert saved["logits"].shape == (2, 5, VOCAB)


@pytest.mark.parametrize("arrays, message", [
    ({"input_ids": np.zeros((2, 3, 4), np.int64)},
     "input 'input_ids' has shape (2, 3, 4); the model expects [batch, sequence] (rank 2)"),
    ({"input_ids": np.zeros((1, 3), np.int32)},
     "input 'input_ids' has dtype int32; the model expects int64 with shape [batch, sequence]"),
    ({"input_ids": np.array([[1, 2, VOCAB]], np.int64)},
     f"input 'input_ids' holds token id {VOCAB} at (0, 2), outside the vocabulary [0, {VOCAB})"),
    ({"input_ids": np.array([[-1, 2]], np.int64)},
     f"input 'input_ids' holds token id -1 at (0, 0), outside the vocabulary [0, {VOCAB})"),
    ({"tokens": np.zeros((1, 3), np.int64)},
     "input 'input_ids' is missing; the model expects inputs 'input_ids' and got 'tokens'"),
    ({"input_ids": np.zeros((1, 3), np.int64), "mask": np.ones((1, 3), np.int64)},
     "input 'mask' is not an input of the model; it expects 'input_ids'"),
])
def test_run_rejects_bad_inputs_with_one_line(capsys, tmp_path, routed, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    code, stdout, err = invoke(capsys, "run", routed, "--inputs", path)
    assert (code, stdout, err) == (1, "", f"error: {message}\n")


def test_run_unreadable_inputs_file(capsys, tmp_path, routed):
    code, _, err = invoke(capsys, "run", routed, "--inputs", tmp_path / "none.npz")
    assert (code, err) == (1, f"error: inputs file not found: {tmp_path / 'none.npz'}\n")
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    code, _, err = invoke(capsys, "run", routed, "--inputs", junk)
    assert code == 1 and err.startswith(f"error: {junk} is not a readable .npz file") and err.count("\n") == 1


def test_run_missing_provider_names_available_ones(capsys, routed, inputs_npz):
    code, stdout, err = invoke(capsys, "run", routed, "--inputs", inputs_npz, "--ep", "cuda")
    available = ", ".join(p for p in ("cpu",) if "CPUExecutionProvider" in ort.get_available_providers())
    assert (code, stdout) == (1, "")
    assert err == (f"error: execution provider 'cuda' is not available in this onnxruntime; available: {available} "
                   "(pass --fallback cpu to run on cpu instead)\n")
    code, stdout, err = invoke(capsys, "run", routed, "--inputs", inputs_npz, "--ep", "cuda", "--fallback", "cpu")
    assert code == 0
    assert stdout.splitlines()[0] == ("warning: execution provider 'cuda' is not available in this onnxruntime; "
                                      "falling back to 'cpu'")
    assert "ran " in stdout and " on cpu with input_ids [2, 5]" in stdout


def test_run_fixed_dims_of_a_packaged_model(capsys, tmp_path, bundle):
    bad = tmp_path / "short.npz"
    np.savez(bad, input_ids=np.zeros((1, 32), np.int64))
    code, _, err = invoke(capsys, "run", bundle["dir"] / "model.ort", "--inputs", bad)
    assert (code, err) == (1, "error: input 'input_ids' has shape (1, 32); the model expects [1, 64] (dim 1 must be 64)\n")


# --- inspect --------------------------------------------------------------------------------------

def test_parameter_stats_count_4bit_values_as_half_bytes():
    """A 4-bit initializer (a 4-bit embedding table, GatherBlockQuantized) is stored two values a byte; inspect's
    bytes said one a value."""
    from moeport.runtime.inspect import parameter_stats

    graph = onnx.helper.make_graph([], "g", [], [], initializer=[
        onnx.helper.make_tensor("codes", onnx.TensorProto.UINT4, [5], [1, 2, 3, 4, 5]),
        numpy_helper.from_array(np.zeros((2, 3), np.float32), "scales")])
    assert parameter_stats(graph) == (11, 3 + 24)


def test_inspect_json(capsys, routed):
    code, stdout, _ = invoke(capsys, "inspect", routed, "--json")
    assert code == 0
    report = json.loads(stdout)
    proto = onnx.load(str(routed))
    assert (report["family"], report["num_experts"], report["top_k"], report["strategy"]) == ("moeport_lm", 8, 2, "sorted")
    assert (report["opset"], report["ir_version"]) == (20, proto.ir_version)
    assert report["nodes"] == len(proto.graph.node) == sum(report["op_histogram"].values())
    assert report["op_histogram"]["TopK"] == sum(n.op_type == "TopK" for n in proto.graph.node)
    weights = [numpy_helper.to_array(i) for i in proto.graph.initializer]
    assert report["parameters"] == sum(w.size for w in weights)
    assert report["parameter_bytes"] == sum(w.nbytes for w in weights)
    assert report["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"],
                                 "dynamic_axes": {"0": "batch", "1": "sequence"}}]
    logits = report["outputs"][0]
    assert logits["name"] == "logits" and logits["shape"] == ["batch", "sequence", VOCAB]
    coverage = {c["ep"]: c for c in report["mobile_coverage"]}
    assert set(coverage) == {"nnapi", "coreml", "coreml-neuralnetwork"}
    for c in coverage.values():
        assert 0 <= c["supported_nodes"] <= c["nodes"] and c["partitions"] == len(c["partition_sizes"])
        assert "ai.onnx:TopK" in c["unsupported_ops"]  # NNAPI, CoreML and XNNPACK take no TopK: it falls back to CPU
        # Dynamic shapes keep most nodes off NNAPI/CoreML; fixing them would let more in.
        assert c["unsupported_due_to_dynamic_shape"] > 0
        assert c["if_shapes_fixed"]["supported_nodes"] > c["supported_nodes"]
    assert report["placement"]["providers"] == {"CPUExecutionProvider": report["placement"]["nodes"]}


def test_inspect_a_model_with_external_data(capsys, tmp_path, routed):
    # The mobile checker reads an optimized copy of the graph; with the weights outside the model file, that copy
    # once pointed at a data file that was not beside it, and inspect crashed. Same report as the inline file's.
    outside = tmp_path / "outside.onnx"
    onnx.save_model(onnx.load(str(routed)), str(outside), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="outside.onnx.data")
    reports = []
    for model in (routed, outside):
        code, stdout, _ = invoke(capsys, "inspect", model, "--json", "--no-placement")
        assert code == 0
        reports.append(json.loads(stdout))
    inline, external = reports
    assert external["parameters"] == inline["parameters"] > 0
    assert external["mobile_coverage"] == inline["mobile_coverage"]
    assert {c["ep"] for c in external["mobile_coverage"]} == {"nnapi", "coreml", "coreml-neuralnetwork"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside.onnx", "outside.onnx.data"]  # nothing left


def test_inspect_text_names_a_cache_input_of_every_layer_once():
    """A with-past model's 96 cache inputs and outputs (24 layers) read as one line per kind; a layer whose cache
    differs (a hybrid's recurrent layers, another head size) keeps a line of its own."""
    from moeport.runtime.inspect import per_layer_groups

    kv = ("batch", "kv_heads", "past_sequence", 64)
    specs = [TensorSpec("input_ids", "int64", ("batch", "sequence")),
             TensorSpec("past_conv.0", "float32", ("batch", 64, 4)),
             *[TensorSpec(f"past_key_values.{i}.{part}", "float32", kv)
               for i in (1, 2, 3, 5) for part in ("key", "value")],
             TensorSpec("past_key_values.4.key", "float32", ("batch", "kv_heads", "past_sequence", 128)),
             TensorSpec("layer.7", "float32", (1,))]
    assert [(name, spec.shape) for name, spec in per_layer_groups(specs)] == [
        ("input_ids", ("batch", "sequence")), ("past_conv.0", ("batch", 64, 4)),
        ("past_key_values.{1..3,5}.key", kv), ("past_key_values.{1..3,5}.value", kv),
        ("past_key_values.4.key", ("batch", "kv_heads", "past_sequence", 128)), ("layer.7", (1,))]


def test_inspect_text_and_errors(capsys, tmp_path, routed):
    code, stdout, _ = invoke(capsys, "inspect", routed, "--no-placement")
    assert code == 0
    assert "family moeport_lm, 8 experts, top-2, strategy sorted" in stdout
    assert "input input_ids: int64 [batch, sequence] (dynamic axes: 0=batch, 1=sequence)" in stdout
    assert "placement on" not in stdout
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    code, _, err = invoke(capsys, "inspect", junk)
    assert code == 1 and err.startswith(f"error: {junk} is not a readable ONNX model")


# --- bench ----------------------------------------------------------------------------------------

def test_bench_json_against_pytorch(capsys, routed, sample_checkpoint):
    code, stdout, err = invoke(capsys, "bench", routed, "--checkpoint", sample_checkpoint("topk"),
                               "--shapes", "1x1,2x8", "--warmup", "1", "--runs", "3", "--threads", "1", "--json")
    assert code == 0
    assert "bench" in err  # the tqdm progress bar goes to stderr, stdout stays JSON
    report = json.loads(stdout)
    assert report["threads"] == 1 and report["ep"] == "cpu"
    assert [r["shape"] for r in report["results"]] == ["1x1", "2x8"]
    for r, tokens in zip(report["results"], (1, 16)):
        assert r["tokens"] == tokens and r["runs"] == 3
        assert 0 < r["ort_ms"] <= r["ort_p90_ms"] <= r["ort_p99_ms"]
        assert 0 < r["torch_ms"] <= r["torch_p90_ms"] <= r["torch_p99_ms"]
        assert r["speedup"] == pytest.approx(r["torch_ms"] / r["ort_ms"])
        assert r["ort_tokens_per_s"] == pytest.approx(tokens / (r["ort_ms"] / 1e3))
        assert r["peak_rss_mb"] > 10


def test_bench_without_checkpoint_and_errors(capsys, tmp_path, routed, capacity, sample_checkpoint):
    code, stdout, _ = invoke(capsys, "bench", routed, "--shapes", "1x4", "--runs", "2", "--warmup", "0",
                             "--no-progress", "--json")
    assert code == 0
    result = json.loads(stdout)["results"][0]
    assert result["torch_ms"] is None and result["speedup"] is None and result["ort_ms"] > 0
    code, _, err = invoke(capsys, "bench", routed, "--shapes", "1x0")
    assert code == 2 and err.startswith("error: cannot parse shape '1x0'")
    plot = tmp_path / "latency.png"
    code, _, err = invoke(capsys, "bench", routed, "--shapes", "1x2", "--runs", "1", "--no-progress", "--plot", plot)
    if importlib.util.find_spec("matplotlib") is None:
        assert (code, err) == (1, "error: --plot needs matplotlib, which is not installed; pip install matplotlib\n")
        assert not plot.exists()
    else:
        assert code == 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- package --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory, capacity):
    """The capacity-strategy topk model packaged for android with input_ids fixed to 1x64."""
    work = tmp_path_factory.mktemp("package")
    source = work / "model.onnx"
    source.write_bytes(capacity.read_bytes())
    out = work / "bundle"
    with pytest.raises(SystemExit) as exit_info:
        main(["package", str(source), "--target", "android", "-o", str(out), "--shape", "input_ids=1x64", "--json"])
    assert exit_info.value.code == 0
    return {"dir": out, "source": source}


def test_package_ort_runs_like_onnx(bundle):
    ort_file = bundle["dir"] / "model.ort"
    assert ort_file.is_file()
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(1, 64), dtype=np.int64)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    packaged = ort.InferenceSession(str(ort_file), options, providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(bundle["source"]), options, providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in packaged.get_inputs()] == [("input_ids", [1, 64])]
    got = packaged.run(None, {"input_ids": ids})
    want = original.run(None, {"input_ids": ids})
    assert len(got) == len(want) == 1 and got[0].shape == (1, 64, VOCAB)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)


def test_package_operator_config_and_bundle(bundle):
    out = bundle["dir"]
    config = (out / "required_operators.config").read_text()
    ops = {}
    for line in config.splitlines():
        if line and not line.startswith("#"):
            domain, opset, names = line.split(";")
            ops.setdefault(domain, set()).update(names.split(","))
    assert {"TopK", "MatMul", "ScatterND", "CumSum"} <= ops["ai.onnx"]  # capacity dispatch
    assert f".{out.name}." not in config and str(out.resolve()) in config  # the header names the bundle, not a temp dir
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["target"] == "android" and meta["target_platform"] == "arm"
    assert meta["model"]["strategy"] == "capacity" and meta["model"]["num_experts"] == "8"
    assert meta["fixed_shapes"] == {"input_ids": [1, 64]}
    assert meta["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [1, 64], "dynamic_axes": {}}]
    assert meta["outputs"][0]["shape"] == [1, 64, VOCAB]
    for kind in ("ort", "onnx", "operator_config"):
        entry = meta["files"][kind]
        assert (out / entry["path"]).stat().st_size == entry["bytes"]
    import hashlib
    assert hashlib.sha256((out / "model.ort").read_bytes()).hexdigest() == meta["files"]["ort"]["sha256"]
    for ep in ("nnapi", "coreml"):
        c = meta["coverage"][ep]
        assert 0 < c["supported_nodes"] < c["nodes"]  # TopK/ScatterND stay on the CPU
        assert c["node_share"] == pytest.approx(c["supported_nodes"] / c["nodes"], abs=1e-4)
        assert c["unsupported_due_to_dynamic_shape"] == 0  # the shapes are fixed
        assert 0 < c["matmul_flops_share"] <= 1
        assert "ai.onnx:TopK" in c["unsupported_ops"]
    assert meta["check"]["max_abs_diff"] <= 1e-5
    assert meta["warnings"] == []
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "model.onnx", "model.ort",
                                                     "required_operators.config"]


def test_package_refuses_and_replaces(capsys, tmp_path, bundle):
    source, out = bundle["source"], bundle["dir"]
    code, _, err = invoke(capsys, "package", source, "--target", "ios", "-o", out, "--shape", "input_ids=1x64")
    assert (code, err) == (1, f"error: output directory {out} is not empty; pass --force to replace it\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    code, _, err = invoke(capsys, "package", source, "--target", "ios", "-o", other, "--force")
    assert code == 1 and "holds no bundle.json" in err and (other / "keep.txt").exists()
    code, _, err = invoke(capsys, "package", source, "--target", "ios", "-o", tmp_path / "b", "--shape", "input_ids=64")
    assert (code, err) == (1, "error: --shape input_ids=64 has 1 dims; input 'input_ids' is [batch, sequence] (rank 2)\n")
    code, _, err = invoke(capsys, "package", source, "--target", "ios", "-o", tmp_path / "b", "--shape", "ids=1x4")
    assert (code, err) == (2, "error: --shape names input 'ids', which the model does not have; inputs: input_ids\n")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))
    code, stdout, err = invoke(capsys, "package", source, "--target", "arm64-linux", "-o", tmp_path / "b")
    assert code == 0 and "packaged for arm64-linux" in stdout
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert meta["inputs"][0]["shape"] == ["batch", "sequence"] and meta["fixed_shapes"] == {}


def test_package_of_a_model_in_external_data_writes_a_self_contained_onnx(capsys, tmp_path, bundle):
    """The weights stay on disk while the graph's shapes are fixed and are read in to write the bundle's .onnx,
    one file whose initializers are the source's; the source is left as it was."""
    source = onnx.load(str(bundle["source"]))
    weights = {t.name: numpy_helper.to_array(t).tobytes() for t in source.graph.initializer}
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    onnx.save(source, str(external), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in external.parent.iterdir()}
    code, _, err = invoke(capsys, "package", external, "--target", "android", "-o", tmp_path / "b",
                          "--shape", "input_ids=1x64")
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in external.parent.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["bundle.json", "model.onnx", "model.ort",
                                                                 "required_operators.config"]
    bundled = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in bundled.graph.initializer)
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in bundled.graph.initializer} == weights
    assert [d.dim_value for d in bundled.graph.output[0].type.tensor_type.shape.dim] == [1, 64, VOCAB]
    assert json.loads((tmp_path / "b" / "bundle.json").read_text())["check"]["max_abs_diff"] <= 1e-5


# --- helpers --------------------------------------------------------------------------------------

def test_parse_fixed_shapes():
    assert parse_fixed_shapes(["input_ids=1x64", "mask = 2X3"]) == {"input_ids": [1, 64], "mask": [2, 3]}
    for bad in ("input_ids", "=1x2", "input_ids=1xa", "input_ids=0x4"):
        with pytest.raises(UsageError, match="expected NAME=D0xD1"):
            parse_fixed_shapes([bad])


def test_check_inputs_fixed_dim():
    spec = [TensorSpec("input_ids", "int64", (1, "sequence"))]
    check_inputs({"input_ids": np.zeros((1, 9), np.int64)}, spec, vocab_size=4)
    with pytest.raises(MoeportError, match=r"^input 'input_ids' has shape \(2, 9\); the model expects \[1, sequence\] "
                                           r"\(dim 0 must be 1\)$"):
        check_inputs({"input_ids": np.zeros((2, 9), np.int64)}, spec)


def test_save_npz_is_atomic_and_respects_force(tmp_path):
    path = tmp_path / "a.npz"
    save_npz(path, {"x": np.arange(3)})
    with pytest.raises(MoeportError, match="already exists"):
        save_npz(path, {"x": np.arange(4)})
    save_npz(path, {"x": np.arange(5)}, force=True)
    with np.load(path) as data:
        assert data["x"].tolist() == [0, 1, 2, 3, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]


def test_kernel_events_belong_to_their_run_and_know_idle_kernels(tmp_path):
    """onnxruntime writes a run's ``model_run`` event after that run's kernels: each kernel is counted in the run
    whose span holds it (0, 1, 2 in call order), with its input shapes; a kernel whose input had no rows is idle."""
    from onnx import TensorProto, helper

    from moeport.runtime.profile import kernel_events
    from moeport.runtime.session import create_session

    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
                               helper.make_node("Relu", ["y"], ["z"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["rows", 3])], [weight])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    session = create_session(path, "cpu", profile_dir=tmp_path)
    for rows in (2, 0, 5):
        session.run(None, {"x": np.ones((rows, 4), np.float32)})
    events = [e for e in kernel_events(session.end_profiling()) if e.node in ("mm", "relu")]
    assert sorted((e.run, e.node) for e in events) == [(r, n) for r in range(3) for n in ("mm", "relu")]
    matmuls = sorted((e for e in events if e.node == "mm"), key=lambda e: e.run)
    assert [e.input_shapes[0] for e in matmuls] == [(2, 4), (0, 4), (5, 4)]
    assert [e.idle for e in matmuls] == [False, True, False]


def test_placement_from_profile_counts_each_node_once(tmp_path):
    events = [
        {"cat": "Session", "name": "model_run"},
        {"cat": "Node", "name": "mm_1_kernel_time", "args": {"op_name": "MatMul", "provider": "CPUExecutionProvider"}},
        {"cat": "Node", "name": "mm_1_kernel_time", "args": {"op_name": "MatMul", "provider": "CPUExecutionProvider"}},
        {"cat": "Node", "name": "mm_2_kernel_time", "args": {"op_name": "MatMul", "provider": "XnnpackExecutionProvider"}},
        {"cat": "Node", "name": "topk_kernel_time", "args": {"op_name": "TopK", "provider": "CPUExecutionProvider"}},
        {"cat": "Node", "name": "topk_fence_before", "args": {"op_name": "TopK"}},
    ]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(events))
    placement = placement_from_profile(profile, "XnnpackExecutionProvider")
    assert placement.total == 3
    assert placement.per_provider == {"CPUExecutionProvider": 2, "XnnpackExecutionProvider": 1}
    assert placement.to_dict()["ops"] == {"MatMul": {"CPUExecutionProvider": 1, "XnnpackExecutionProvider": 1},
                                          "TopK": {"CPUExecutionProvider": 1}}
