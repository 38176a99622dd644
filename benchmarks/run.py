"""Issue 6 targets in one command: ``python benchmarks/run.py [--out DIR] [--quick]``.

Everything runs in this process on the CPU provider with the same intra-op thread count (2 by default) for
onnxruntime and PyTorch, each with its default threading; backends take turns, each turn settling untimed
(>= 3 runs and 50 ms, so no backend is timed while the other's idle threads still spin) before 5 timed
runs, and medians are compared, so machine noise hits both alike. Models are built from configs with
seeded random weights (nothing is downloaded). Results are printed as a markdown table (figure, target,
met?) and written to ``DIR/results.json``.

Reference model: transformers Mixtral, vocab 1000, hidden 256, intermediate 512, 4 layers, 8 heads,
4 KV heads, 8 experts, top-2. PyTorch baseline: the faster of transformers' ``eager`` and ``grouped_mm``
experts implementations, per shape.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REFERENCE = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048)


def alternate(fns: dict, runs: int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each callable, the backends taking turns (moeport.runtime.bench.alternate: every backend
    with its default threading, settled untimed at the start of each turn, then timed)."""
    from moeport.runtime.timing import alternate as take_turns

    times = take_turns(fns, runs=runs, warmup=warmup)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def session(path, threads):
    from moeport.runtime.session import create_session

    return create_session(path, "cpu", threads=threads)  # onnxruntime's default session options


def reference_checkpoint(root: Path):
    import transformers

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**REFERENCE)).eval()
    model.save_pretrained(root / "mixtral")
    return root / "mixtral", model


def logits_targets(root: Path, threads: int, runs: int, rows: list) -> None:
    from moeport.exporter.export import export_checkpoint

    checkpoint, model = reference_checkpoint(root)
    ours = export_checkpoint(checkpoint, root / "mixtral.onnx", validate=True, force=True)
    sess = session(ours.output, threads)

    # The export users get today: plain dynamo export with transformers' batched_mm experts.
    model.config._experts_implementation = "batched_mm"
    ids = torch.randint(0, REFERENCE["vocab_size"], (2, 16))

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    plain_path = root / "plain_batched_mm.onnx"
    torch.onnx.export(Logits(model).eval(), (ids, torch.ones_like(ids)), str(plain_path), dynamo=True, verbose=False,
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    plain = session(plain_path, threads)

    for shape in [(1, 1), (1, 2), (1, 128), (4, 128)]:
        ids = torch.randint(0, REFERENCE["vocab_size"], shape, generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

        def torch_with(impl):
            def run():
                model.config._experts_implementation = impl
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            return run

        fns = {"ours": lambda: sess.run(None, feeds), "torch_eager": torch_with("eager"),
               "torch_grouped_mm": torch_with("grouped_mm")}
        if shape == (1, 128):
            fns["plain_batched_mm"] = lambda: plain.run(None, feeds)
        ms = alternate(fns, runs)
        baseline = min(ms["torch_eager"], ms["torch_grouped_mm"])
        label = f"{shape[0]}x{shape[1]}"
        target = 2.0 if shape[1] <= 2 else 1.5
        rows.append(dict(name=f"logits {label}: ORT vs fastest PyTorch", figure=baseline / ms["ours"], target=target,
                         unit="x", detail=ms))
        if "plain_batched_mm" in ms:
            rows.append(dict(name="1x128: ours vs plain dynamo export (batched_mm)",
                             figure=ms["plain_batched_mm"] / ms["ours"], target=10.0, unit="x", detail=ms))
    model.config._experts_implementation = "eager"


def decode_target(root: Path, threads: int, rows: list, new_tokens: int = 32) -> None:
    import transformers

    from moeport.exporter.export import export_checkpoint
    from moeport.runtime.generate import generate

    checkpoint = root / "mixtral"
    result = export_checkpoint(checkpoint, root / "mixtral-past.onnx", task="text-generation-with-past", force=True)
    model = transformers.MixtralForCausalLM.from_pretrained(checkpoint).eval()
    model.generation_config.eos_token_id = None
    prompt = [list(range(3, 19))]
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                           eos_token_id=None)
    best = {"ours": [], "torch_eager": [], "torch_grouped_mm": []}
    for _ in range(5):
        ours = generate(result.output, prompt, max_new_tokens=new_tokens, threads=threads)
        best["ours"].append(ours.tokens_per_s)
        for impl in ("eager", "grouped_mm"):
            model.config._experts_implementation = impl
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(torch.tensor(prompt), generation_config=config)
            best[f"torch_{impl}"].append(new_tokens / (time.perf_counter() - start))
    tps = {k: float(np.median(v)) for k, v in best.items()}
    rows.append(dict(name="with-past decode: tokens/s vs PyTorch generate (KV cache)",
                     figure=tps["ours"] / max(tps["torch_eager"], tps["torch_grouped_mm"]), target=2.0, unit="x",
                     detail=tps))


def sparsity_target(root: Path, threads: int, runs: int, rows: list) -> None:
    from moeport.exporter import families
    from moeport.exporter.export import export_model
    from moeport.samples.model import LMConfig, MoEConfig, MoELM

    sessions = {}
    for experts in (8, 64):
        torch.manual_seed(0)
        cfg = LMConfig(hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=4,
                       moe=MoEConfig(num_experts=experts, top_k=2, intermediate_size=512))
        loaded = families.from_module("moeport_lm", MoELM(cfg).eval(), cfg.to_dict())
        out = export_model(loaded, root / f"sample-e{experts}.onnx", validate=False, force=True)
        sessions[experts] = session(out.output, threads)
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 256, (1, 512), dtype=np.int64)}
    latency = alternate({experts: (lambda s=s: s.run(None, feeds)) for experts, s in sessions.items()}, runs)
    rows.append(dict(name="sparsity: 1x512 prefill latency, 64 vs 8 experts (top-2)",
                     figure=latency[64] / latency[8], target=1.5, unit="x (lower is better)", lower_is_better=True,
                     detail={"e8_ms": latency[8], "e64_ms": latency[64]}))


def efficiency_target(root: Path, threads: int, rows: list) -> None:
    from moeport.runtime.efficiency import expert_efficiency

    feeds = {"input_ids": np.random.default_rng(0).integers(0, 1000, (1, 512), dtype=np.int64),
             "attention_mask": np.ones((1, 512), dtype=np.int64)}
    result = expert_efficiency(root / "mixtral.onnx", feeds, threads=threads, runs=10)
    rows.append(dict(name="1x512: expert MatMul FLOP rate / plain MatMul of the same size", figure=result.fraction,
                     target=0.7, unit="", detail=result.to_dict()))


def big_export_target(root: Path, rows: list) -> None:
    """Export a ~1B-parameter random MoE in a child process and record its peak RSS and time."""
    script = f"""
import resource, time, torch, json
from moeport.exporter import families
from moeport.exporter.export import export_model
from moeport.samples.model import LMConfig, MoEConfig, MoELM
torch.manual_seed(0)
cfg = LMConfig(vocab_size=32000, hidden_size=2048, num_layers=4, num_heads=16, num_kv_heads=8,
               moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=4096))
with torch.no_grad():
    model = MoELM(cfg).eval()
params = sum(p.numel() for p in model.parameters())
loaded = families.from_module("moeport_lm", model, cfg.to_dict())
start = time.perf_counter()
result = export_model(loaded, r"{root / 'big.onnx'}", validate=False, force=True)
print(json.dumps(dict(params=params, seconds=time.perf_counter() - start, external=result.external_data,
                      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    model_gb = data["params"] * 4 / 2**30
    rows.append(dict(name=f"export of a {data['params'] / 1e9:.2f}B-parameter MoE: peak RSS / fp32 size",
                     figure=data["peak_rss_gb"] / model_gb, target=2.5, unit="x (lower is better)",
                     lower_is_better=True, detail={**data, "model_gb": model_gb}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where models and results.json go (default: temp)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--skip-big", action="store_true", help="skip the ~1B-parameter export")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="moeport-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started = time.perf_counter()
    logits_targets(root, args.threads, args.runs, rows)
    decode_target(root, args.threads, rows)
    sparsity_target(root, args.threads, args.runs, rows)
    efficiency_target(root, args.threads, rows)
    if not args.skip_big:
        big_export_target(root, rows)
    for row in rows:
        lower = row.get("lower_is_better", False)
        row["met"] = row["figure"] <= row["target"] if lower else row["figure"] >= row["target"]
    print("| target | figure | goal | met |\n|---|---|---|---|")
    for row in rows:
        goal = f"{'≤' if row.get('lower_is_better') else '≥'} {row['target']}"
        print(f"| {row['name']} | {row['figure']:.2f} | {goal} | {'yes' if row['met'] else 'NO'} |")
    summary = {"threads": args.threads, "runs": args.runs, "seconds": time.perf_counter() - started,
               "cpu": _cpu_name(), "rows": rows}
    (root / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(f"\n{len(rows)} figures in {summary['seconds']:.0f}s; details in {root / 'results.json'}")
    return 0 if all(r["met"] for r in rows) else 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


if __name__ == "__main__":
    sys.exit(main())
