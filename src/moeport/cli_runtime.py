"""Runtime commands of the ``moeport`` CLI: run, bench, inspect, package.

Each command parses its options, calls one library function in ``moeport.runtime``, and prints that
result's ``render()`` (or ``to_dict()`` with ``--json``). ``register(cli)`` adds them to the group. None of
them needs PyTorch, except ``bench --checkpoint`` (the PyTorch side of the comparison).
"""

from __future__ import annotations

import click

from moeport import _lazy
from moeport.cli_common import EP, FALLBACK, JSON, LazyChoice, emit

_run = _lazy.LazyModule("moeport.runtime.run", "run")
_bench = _lazy.LazyModule("moeport.runtime.bench", "bench")
_inspect = _lazy.LazyModule("moeport.runtime.inspect", "inspect")
_package = _lazy.LazyModule("moeport.runtime.package", "package")
_io = _lazy.LazyModule("moeport.runtime._io", "package")


@click.command("run")
@click.argument("model", metavar="MODEL_OR_DIR", type=click.Path())
@click.option("--inputs", required=True, type=click.Path(),
              help=".npz file with one array per model input (a with-past model also takes a prompt alone: "
                   "input_ids, with or without its attention_mask, run as its prefill from an empty cache).")
@click.option("-o", "--output", type=click.Path(), default=None, help=".npz file to write the outputs to.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@EP
@FALLBACK
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@JSON
def run_cmd(model, inputs, output, force, ep, fallback, threads, as_json):
    """Run MODEL once on the arrays in --inputs; report outputs and where each node ran."""
    result = _run.run_model(model, inputs, output=output, force=force, ep=ep, fallback=fallback, threads=threads)
    emit(result, as_json)


@click.command("bench")
@click.argument("model", metavar="MODEL_OR_DIR", type=click.Path())
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Also time this checkpoint in PyTorch eager (needs PyTorch).")
@click.option("--shapes", default="1x1,1x128,4x128", show_default=True, help="BATCHxSEQ list to time.")
@EP
@FALLBACK
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads for onnxruntime and PyTorch alike (default: all cores).")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed runs per shape.")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per shape.")
@click.option("--plot", type=click.Path(), default=None, help="Write a latency bar chart (needs matplotlib).")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--expert-efficiency", is_flag=True,
              help="Also profile the expert MatMuls: their FLOP rate as a fraction of a plain MatMul's.")
@click.option("--decode-steps", type=click.IntRange(min=1), default=32, show_default=True,
              help="A with-past model: decode steps timed after each prefill.")
@JSON
def bench_cmd(model, checkpoint, shapes, ep, fallback, threads, warmup, runs, plot, no_progress, expert_efficiency,
              decode_steps, as_json):
    """Latency percentiles, tokens/s and peak memory of MODEL; with --checkpoint, against PyTorch. A with-past
    model: its prefill at each shape, then decode steps (tokens/s)."""
    reference = None if checkpoint is None else _lazy.reference.CheckpointReference.load(checkpoint)
    report = _bench.bench(model, reference=reference, shapes=shapes, ep=ep, fallback=fallback, threads=threads,
                          warmup=warmup, runs=runs, plot=plot, progress=not no_progress,
                          expert_efficiency=expert_efficiency, decode_steps=decode_steps)
    emit(report, as_json)


@click.command("inspect")
@click.argument("model", metavar="MODEL_OR_DIR", type=click.Path())
@EP
@FALLBACK
@click.option("--no-placement", is_flag=True, help="Skip the profiled run that measures node placement.")
@JSON
def inspect_cmd(model, ep, fallback, no_placement, as_json):
    """Metadata, ops, parameters, dynamic axes and provider coverage of MODEL."""
    report = _inspect.inspect_model(model, ep=ep, fallback=fallback, placement=not no_placement)
    emit(report, as_json)


@click.command("package")
@click.argument("model", type=click.Path())
@click.option("--target", required=True, type=LazyChoice(lambda: _package.TARGETS.names()),
              help="Device family the bundle is for.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option("--shape", "shape_items", multiple=True, metavar="NAME=D0xD1",
              help="Fix an input's shape, e.g. input_ids=1x64 (repeatable).")
@click.option("--force", is_flag=True, help="Replace an existing bundle directory.")
@JSON
def package_cmd(model, target, output, shape_items, force, as_json):
    """Convert MODEL to ORT format for TARGET with a reduced-build operator config and bundle.json."""
    result = _package.package_model(model, target, output, shapes=_io.parse_fixed_shapes(shape_items), force=force)
    emit(result, as_json)


def register(cli: click.Group) -> None:
    """Add the runtime commands to the top-level ``moeport`` group."""
    for command in (run_cmd, bench_cmd, inspect_cmd, package_cmd):
        cli.add_command(command)
