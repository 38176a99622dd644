"""The ``moeport`` command line: each command parses, calls one library function, prints, exits.

Exit codes: 0 success, 1 a failed check or a user error, 2 a usage error. User errors print one line
(``error: ...``) and no traceback; pass ``--debug`` (or set MOEPORT_DEBUG=1) to see it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
import warnings

import click

from moeport import _fs, _lazy
from moeport.cli_common import LazyChoice, echo_json
from moeport.cli_quant import register as _register_quant
from moeport.cli_runtime import register as _register_runtime
from moeport.errors import MoeportError, MoeportWarning, UsageError

_strategies = _lazy.LazyModule("moeport.exporter.strategies", "export")
_tasks = _lazy.LazyModule("moeport.exporter.tasks", "export")
_verify = _lazy.LazyModule("moeport.runtime.verify", "verify")
_generate = _lazy.LazyModule("moeport.runtime.generate", "generate")
_layouts = _lazy.LazyModule("moeport.runtime.layouts", "layouts")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moeport")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors too.")
def cli(debug: bool) -> None:
    """Export Mixture-of-Experts models to ONNX and run them on onnxruntime."""


@cli.group()
def samples() -> None:
    """The bundled sample MoE models."""


@samples.command("list")
@click.option("--verbose", "-v", is_flag=True, help="Also print what each sample shows.")
def samples_list(verbose: bool) -> None:
    """Print one sample name per line."""
    for sample in _lazy.catalog.list_samples():
        click.echo(f"{sample.name}\t{sample.description}" if verbose else sample.name)


@samples.command("create")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False))
def samples_create(name: str, directory: str) -> None:
    """Write sample NAME as a checkpoint directory (config.json + model.safetensors)."""
    click.echo(_lazy.catalog.create_sample(name, directory))


@cli.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(),
              help="ONNX file to write (with --layout: the folder).")
@click.option("--strategy", default="auto", show_default=True,
              type=LazyChoice(lambda: ["auto", *_strategies.strategy_names()]), help="MoE dispatch strategy.")
@click.option("--task", default="logits", show_default=True, type=LazyChoice(lambda: _tasks.task_names()),
              help="logits: one forward pass; text-generation-with-past: decoder with KV cache (transformers).")
@click.option("--layout", default=None, type=LazyChoice(lambda: _layouts.layout_names()),
              help="Write a folder this runtime loads as it is (needs --task text-generation-with-past).")
@click.option("--kv-cache", default=None, type=click.Choice(["concat", "shared"]),
              help="text-generation-with-past: concat (default) appends to the past; shared writes into one "
                   "fixed-length buffer that past and present share (onnxruntime-genai's past_present_share_buffer).")
@click.option("--fused-attention", is_flag=True,
              help="text-generation-with-past: each layer's attention as onnxruntime's GroupQueryAttention (its "
                   "CPU provider; with --kv-cache shared it writes the buffer in place). A batch then takes one new "
                   "token per row after a past.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 20; 18..23).")
@click.option("--with-routing", is_flag=True, help="Add each MoE layer's selected experts and weights as outputs.")
@click.option("--capacity-factor", type=float, default=None,
              help="capacity strategy: slots per expert = factor * tokens * k / E (default E/k: drops nothing).")
@click.option("--no-validate", is_flag=True, help="Skip the post-export parity check against PyTorch.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow pickle weights (*.bin); loaded with torch.load(weights_only=True).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_cmd(checkpoint, output, strategy, task, layout, kv_cache, fused_attention, opset, with_routing,
               capacity_factor, no_validate, force, trust_pickle, as_json):
    """Export the MoE checkpoint directory CHECKPOINT to ONNX."""
    result = _lazy.export.export_checkpoint(checkpoint, output, strategy=strategy, task=task, layout=layout,
                                            kv_cache=kv_cache, fused_attention=fused_attention,
                                            opset=opset or _lazy.export.DEFAULT_OPSET,
                                            with_routing=with_routing, capacity_factor=capacity_factor,
                                            validate=not no_validate, force=force, trust_pickle=trust_pickle)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(f"exported {result.family} ({len(result.info.layers)} MoE layers, {result.info.num_experts} experts, "
               f"top-{result.info.top_k}) to {result.output} [{result.size_bytes / 1e6:.2f} MB, opset {result.opset}, "
               f"IR {result.ir_version}] in {result.seconds:.1f}s")
    if result.layout is not None:
        click.echo(f"layout: {result.layout} folder")
    click.echo(f"strategy: {result.strategy} ({result.strategy_reason})")
    for report in result.passes:
        if report["pass"] == "FuseAttention":
            click.echo(f"attention: {report['reason']}")
    if result.validation is not None:
        shapes = ", ".join(f"{b}x{s}" for b, s in result.validation_shapes)
        click.echo(f"validated against PyTorch at {shapes}: max abs error {result.validation.max_abs_err:.3g}")
    if result.dropped_slots is not None:
        click.echo(f"capacity: {result.dropped_slots} token slots dropped on the validation inputs")


@cli.command("verify")
@click.argument("model", type=click.Path())
@click.option("--checkpoint", required=True, type=click.Path(), help="The checkpoint the model was exported from.")
@click.option("--shapes", default="1x1,3x7,2x64", show_default=True, help="BATCHxSEQ list to test.")
@click.option("--ep", default="cpu", show_default=True, help="Execution provider short name.")
@click.option("--fallback", default=None, help="Provider to use when --ep is not available (e.g. cpu).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default: the family's, 1e-4).")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="Relative tolerance.")
@click.option("--min-routing-agreement", type=float, default=1.0, show_default=True,
              help="Lowest routing agreement that passes (quantized models need less than 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random input_ids.")
@click.option("--left-padding", is_flag=True, help="Left-pad the rows of each batch (models with attention_mask).")
@click.option("--inputs", "inputs_file", default=None, type=click.Path(),
              help="An .npz of real inputs (input_ids [batch, seq], ...) to use instead of random ids.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_cmd(model, checkpoint, shapes, ep, fallback, atol, rtol, min_routing_agreement, seed, left_padding,
               inputs_file, as_json):
    """Compare MODEL on onnxruntime with CHECKPOINT in PyTorch; exit 1 if they differ."""
    report = _lazy.reference.verify_checkpoint(
        model, checkpoint, shapes=_verify.parse_shapes(shapes), ep=ep, fallback=fallback, atol=atol, rtol=rtol,
        min_routing_agreement=min_routing_agreement, seed=seed, left_padding=left_padding,
        inputs=None if inputs_file is None else _verify.load_inputs(inputs_file))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.render())
    sys.exit(0 if report.passed else 1)


@cli.command("generate")
@click.argument("model", metavar="MODEL_OR_DIR", type=click.Path())
@click.option("--prompt-ids", default=None, help="Comma-separated prompt token ids, e.g. 1,2,3.")
@click.option("--prompt", default=None, help="Prompt text (a model folder's tokenizer, or --checkpoint's).")
@click.option("--checkpoint", default=None, type=click.Path(),
              help="Directory holding the tokenizer (default: the model folder's).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--ep", default="cpu", show_default=True, help="Execution provider short name.")
@click.option("--fallback", default=None, help="Provider to use when --ep is not available (e.g. cpu).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime intra-op threads (default: onnxruntime's, all cores).")
@click.option("--json", "as_json", is_flag=True,
              help="Print {token_ids, tokens_per_s, prefill_ms, decode_tokens_per_s} as JSON.")
def generate_cmd(model, prompt_ids, prompt, checkpoint, max_new_tokens, ep, fallback, threads, as_json):
    """Greedy-decode with a text-generation-with-past model (an ONNX file or a model folder) on onnxruntime,
    using its KV cache."""
    if (prompt_ids is None) == (prompt is None):
        raise UsageError("give exactly one of --prompt-ids and --prompt")
    options = {"max_new_tokens": max_new_tokens, "ep": ep, "fallback": fallback, "threads": threads}
    if prompt is not None:
        result = _generate.generate_text(model, prompt, checkpoint, **options)
    else:
        result = _generate.generate(model, [_generate.parse_prompt_ids(prompt_ids)], **options)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(result.text[0] if result.text else ",".join(map(str, result.token_ids[0])))
    speed = f"{len(result.token_ids[0])} tokens, {result.tokens_per_s:.1f} tokens/s"
    if result.decode_tokens_per_s is not None:  # more than one step: the prompt's and the new tokens' apart
        speed += f" (prefill {result.prefill_seconds * 1e3:.0f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s)"
    click.echo(speed, err=True)


@cli.command("demo")
@click.option("--workdir", default="moeport-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the sample checkpoint and model go.")
@click.option("--sample", default="trained", show_default=True, help="Which sample to use.")
@click.option("--quantize/--no-quantize", default=True, show_default=True,
              help="Also quantize the export to int8 and fp16 and report what each costs.")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
def demo_cmd(workdir, sample, quantize, as_json):
    """Export the bundled sample with routing outputs, verify parity, bench, quantize; print the reports."""
    report = _lazy.demo.run_demo(workdir, sample, quant_modes=_lazy.demo.DEMO_QUANT_MODES if quantize else ())
    if as_json:
        echo_json(report.to_dict())
    else:
        result = report.export
        click.echo(f"checkpoint: {report.checkpoint}")
        click.echo(f"exported: {result.output} ({result.size_bytes / 1e6:.2f} MB, strategy {result.strategy}, "
                   f"{result.seconds:.1f}s)")
        click.echo(report.verify.render())
        if report.bench is not None:
            click.echo(report.bench.render())
        for quantized in report.quantized:
            click.echo(quantized.render())
    sys.exit(0 if report.passed else 1)


_register_runtime(cli)
_register_quant(cli)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is anywhere in the exception's cause/context chain."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt):
            return True
        pending += [current.__cause__, current.__context__]
    return False


def _one_line_warnings(show):
    """A ``warnings.showwarning`` printing moeport's own warnings as one ``warning:`` line; the others go to
    ``show`` (Python's format, as before)."""

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, MoeportWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning


def _report_interrupt() -> int:
    """Print the one line of a stopped command; its exit code: 143 (128 + SIGTERM) after a SIGTERM, as shells and
    job schedulers expect of a terminated process, else 1 ("aborted": Ctrl-C)."""
    if _fs.interrupt_signal() == signal.SIGTERM:
        click.echo("error: terminated", err=True)
        return 128 + signal.SIGTERM
    click.echo("error: aborted", err=True)
    return 1


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or os.environ.get("MOEPORT_DEBUG") == "1"
    _fs.clear_interrupt()
    # Ctrl-C (and a kill's SIGTERM) is recorded as well as raised, so that one a library swallows still stops the
    # command (_fs), and every staging and work directory is removed on the way out. Only over Python's own
    # handlers: a process started with SIGINT ignored (nohup, a background job) stays so.
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(signum) is default:
                previous_handlers[signum] = signal.signal(signum, _fs.record_interrupt)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            warnings.simplefilter("always", MoeportWarning)  # each command says it, even twice in one process
            code = cli.main(args=args, prog_name="moeport", standalone_mode=False)
        if _fs.interrupted():
            raise KeyboardInterrupt
    except (click.exceptions.Abort, KeyboardInterrupt):
        # click turns Ctrl-C inside a command into Abort; one that lands outside click's own handler (while
        # click unwinds, or in a library's cleanup) arrives as KeyboardInterrupt: the same one line.
        code = _report_interrupt()
    except click.ClickException as exc:  # usage errors: bad option, missing argument, bad choice
        click.echo(f"error: {exc.format_message()} (see moeport --help)", err=True)
        code = exc.exit_code
    except MoeportError as exc:
        if debug:
            traceback.print_exc()
        if _fs.interrupted():
            code = _report_interrupt()
        else:
            click.echo(f"error: {exc}", err=True)
            code = exc.exit_code
    except Exception as exc:
        # A Ctrl-C that lands inside a library's import or error handler can come back wrapped: torch.onnx
        # caught the KeyboardInterrupt raised while torch._dynamo was half imported, failed in its own `except`
        # clause, and raised TorchExportError from that. The user asked to stop, so it is still "aborted";
        # any other exception is a bug and keeps its traceback.
        if not (_caused_by_interrupt(exc) or _fs.interrupted()):
            raise
        if debug:
            traceback.print_exc()
        code = _report_interrupt()
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        _fs.clear_interrupt()  # the library, called on its own afterwards, starts clean
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
