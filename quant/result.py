"""What ``quantize`` returns: the result and its report (``to_dict``, ``render``).

``QuantizeResult`` holds what was quantized, how many router nodes stayed float, calibration coverage and the
quality report; ``QuantizeWarning`` is the category of everything ``quantize`` warns about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moeport.quant import quality as qual
from moeport.quant.modes import QuantMode
from moeport.quant.passes import PassRecord
from moeport.runtime.moe_graph import RouterPlan
from moeport.quant.schemes import FLOAT, IntScheme, NBitsLayout


class QuantizeWarning(UserWarning):
    """What quantize warns about (starved experts, no router found ...); every one is also in the result."""


@dataclass
class QuantizeResult:
    """What ``quantize`` did and what it cost. Sizes in bytes, latency in ms (``quality.latency_of`` says of what)."""

    input: Path
    output: Path
    mode: QuantMode
    target: str
    scheme: IntScheme | None
    keep_router: bool
    router: RouterPlan
    router_kept_float: dict[str, int]  # op type -> router nodes computing in float32 in the output
    quantized_nodes: dict[str, int]  # nodes handed to the quantizer, by op type
    output_ops: dict[str, int]  # quantization ops in the output (DequantizeLinear, MatMulNBits, ...)
    casts_added: int
    calibration: dict | None
    quality: qual.QualityReport
    seconds: float
    warnings: list[str] = field(default_factory=list)
    layout: NBitsLayout | None = None
    passes: list[PassRecord] = field(default_factory=list)  # the graph rewrites around the quantizer

    def targets_met(self) -> dict[str, bool | None]:
        """Each of the mode's targets: True/False, None when not measured."""
        q, m = self.quality, self.mode
        routing = q.parity.routing_agreement if q.parity else None
        ppl = q.perplexity_change
        return {
            "size": q.size_ratio <= m.max_size_ratio,
            "routing": None if routing is None else routing >= m.min_routing_agreement,
            "perplexity": None if ppl is None else ppl <= m.max_perplexity_increase,
        }

    def to_dict(self) -> dict:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "mode": self.mode.to_dict(),
            "target": self.target,
            "scheme": None if self.scheme is None else self.scheme.to_dict(),
            "nbits_layout": None if self.layout is None else self.layout.to_dict(),
            "keep_router": self.keep_router,
            "router": {**self.router.to_dict(), "kept_float": self.router_kept_float,
                       "kept_float_nodes": sum(self.router_kept_float.values())},
            "quantized_nodes": self.quantized_nodes,
            "output_ops": self.output_ops,
            "casts_added": self.casts_added,
            "calibration": self.calibration,
            "quality": self.quality.to_dict(),
            "targets_met": self.targets_met(),
            "seconds": round(self.seconds, 2),
            "passes": [p.to_dict() for p in self.passes],
            "warnings": self.warnings,
        }

    def render(self) -> str:
        q, m = self.quality, self.mode
        met = self.targets_met()
        mark = {True: "yes", False: "NO", None: "n/a"}
        lines = [f"quantized {self.input} -> {self.output} ({m.name}, target {self.target}, {self.seconds:.1f}s)"]
        if self.scheme is not None:
            s = self.scheme
            # int8-dynamic's per-tensor activations are for the experts' gate and up projections, and with its
            # experts in QMoE only for those of a layer FuseExpertsPass left
            unfused = "an unfused layer's expert" if s.expert_block_size else "the experts'"
            down = "" if s.down_activation_type is None else (
                f", float inputs with 8-bit block weights for every MatMul but {unfused} gate and up projections, "
                "embedding in 8-bit blocks" if s.down_activation_type == FLOAT
                else f", expert down-projection inputs {s.down_activation_type}")
            weights = (f"in blocks of {s.weight_block_size}" if s.weight_block_size
                       else "per-channel" if s.per_channel else "per-tensor")
            experts = f"; routed experts one QMoE per layer, 8-bit blocks of {s.expert_block_size}" \
                if s.expert_block_size else ""
            lines.append(f"scheme: activations {s.activation_type}{down}, weights {s.weight_type}, {weights}"
                         f"{', reduce_range' if s.reduce_range else ''}{experts} ({s.reason})")
        if self.layout is not None:
            lines.append(f"layout: {self.layout.describe()}")
        lines.append("graph passes: " + "; ".join(f"{p.name}: {p.note}" for p in self.passes))
        # Casts are counted on their own (casts_added, which is negative when the rewrites dropped some): a
        # "Cast -4" among the ops quantize wrote read as a count of written nodes.
        written = ", ".join(f"{k} {v}" for k, v in self.output_ops.items() if k != "Cast")
        lines.append("nodes quantized: " + ", ".join(f"{k} {v}" for k, v in self.quantized_nodes.items())
                     + f"; ops written: {written or 'none'}")
        casts = f"casts added: {self.casts_added}" if self.casts_added >= 0 else f"casts removed: {-self.casts_added}"
        if self.keep_router:
            ops = ", ".join(f"{k} {v}" for k, v in self.router_kept_float.items())
            if "QMoE" in self.router_kept_float:
                ops += ": QMoE's own top-k and softmax over the float32 logits"
            lines.append(f"router kept float32: {sum(self.router_kept_float.values())} nodes in {len(self.router.routers)} "
                         f"routers ({ops}); {casts}")
        else:
            lines.append(f"router NOT protected (--no-keep-router); {casts}")
        if self.calibration:
            c = self.calibration
            borrowed = f"; {c['borrowed_ranges']} starved expert inputs use their layer's range" \
                if c["borrowed_ranges"] else ""
            lines.append(f"calibration: {c['samples']} samples, {c['tokens']} tokens from {c['source']}{borrowed}")
            for cov in c["coverage"]:
                starved = f"  starved: {cov['starved']}" if cov["starved"] else ""
                lines.append(f"  tokens per expert, {cov['label']}: {cov['counts']}{starved}")
        lines.append(f"  {'metric':<34} {'before':>12} {'after':>12} {'change':>10}  target")
        lines.append(f"  {'file size (MB, fp32 w/o debug meta)':<34} {(q.size_before - q.debug_metadata) / 1e6:12.3f} "
                     f"{q.size_after / 1e6:12.3f} {q.size_ratio:9.3f}x  <= {m.max_size_ratio:.2f}x {mark[met['size']]}")
        lines.append(f"  {'weights only (MB)':<34} {q.weights_before / 1e6:12.3f} {q.weights_after / 1e6:12.3f} "
                     f"{q.weights_ratio:9.3f}x")
        if q.debug_metadata:
            lines.append(f"  (input file {q.size_before / 1e6:.3f} MB includes {q.debug_metadata / 1e6:.3f} MB of "
                         "torch.onnx per-node debug metadata, not written to the output)")
        if q.perplexity_before is not None:
            lines.append(f"  {f'perplexity ({q.heldout_tokens} held-out tokens)':<34} {q.perplexity_before:12.4f} "
                         f"{q.perplexity_after:12.4f} {q.perplexity_change:+9.2%}  <= +{m.max_perplexity_increase:.1%} "
                         f"{mark[met['perplexity']]}")
        if q.latency_before_ms is not None:
            label = f"CPU latency {q.latency_of or '1x128'} (ms, median)"
            lines.append(f"  {label:<34} {q.latency_before_ms:12.2f} "
                         f"{q.latency_after_ms:12.2f} {q.latency_after_ms / q.latency_before_ms:9.2f}x")
        if q.prefill_before_ms is not None:
            label = f"CPU latency {q.prefill_of} (ms, median)"
            lines.append(f"  {label:<34} {q.prefill_before_ms:12.2f} "
                         f"{q.prefill_after_ms:12.2f} {q.prefill_after_ms / q.prefill_before_ms:9.2f}x")
        if q.parity is not None:
            p = q.parity
            lines.append(f"  parity vs PyTorch fp32 on {','.join(p.shapes)} ({p.inputs}): max abs err "
                         f"{p.max_abs_err:.4g}, mean abs err {p.mean_abs_err:.4g}, argmax agreement "
                         f"{p.argmax_agreement:.4f}")
            if p.routing_agreement is not None:
                layers = ", ".join(f"{k}: {v:.4f}" for k, v in p.routing_per_layer.items())
                lines.append(f"  routing agreement {p.routing_agreement:.4f} (worst layer) >= "
                             f"{m.min_routing_agreement} {mark[met['routing']]}; per layer {layers}")
        if q.heldout_routing:
            layers = ", ".join(f"{k}: {v:.4f}" for k, v in q.heldout_routing.items())
            lines.append(f"  routing agreement on held-out text vs fp32 ONNX: {layers}")
            layers = ", ".join(f"{k}: {v:.4f}" for k, v in q.heldout_top1.items())
            lines.append(f"  top-1 expert agreement on held-out text: {layers}")
        lines += [f"  note: {n}" for n in q.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)
