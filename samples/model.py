"""The moeport sample MoE family: a small, readable decoder LM in plain PyTorch.

One file, one dataclass config, each block a small module. Layouts: token ids are ``[batch, seq]``
int64, hidden states ``[batch, seq, hidden]``; inside the MoE feed-forward the tokens are flattened to
``[tokens, hidden]`` with ``tokens = batch * seq``. A router returns ``(expert_idx [tokens, k] int64,
expert_weight [tokens, k] float32)``; the k slots of a token are ordered by descending score.

Router kinds (``MoEConfig.router``):

- ``softmax_topk``: softmax over all experts, keep the top k (Mixtral: renormalised; Qwen-MoE: raw).
- ``sigmoid_topk``: independent sigmoid scores, top k chosen on score + correction bias, weights from
  the plain scores, optional renormalisation and scaling (DeepSeek-V3 style); usually with shared experts.
- ``soft``: dense soft MoE; every expert weighted by the softmax gate. ``top_k`` must equal the number
  of experts; ``expert_idx`` is then ``0..E-1`` for every token.

The MoE layer's ``dispatch`` attribute runs the experts; the default is the readable reference loop
below. The exporter swaps it for an exportable strategy inside a context manager.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_KINDS = ("softmax_topk", "sigmoid_topk", "soft")


def _check_numbers(config, positive: tuple[str, ...]) -> None:
    for name in positive:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_sizes(config, positive: tuple[str, ...], non_negative: tuple[str, ...]) -> None:
    for name in positive + non_negative:
        value = getattr(config, name)
        low = 1 if name in positive else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class MoEConfig:
    """The MoE feed-forward of every layer."""

    num_experts: int = 8
    top_k: int = 2
    router: str = "softmax_topk"
    norm_topk_prob: bool = True
    intermediate_size: int = 64
    num_shared_experts: int = 0
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        # A config is user input (config.json): wrong types and non-positive sizes are ValueErrors here,
        # not ZeroDivisionErrors or negative-dimension errors from torch later.
        _check_sizes(self, ("num_experts", "top_k", "intermediate_size"), ("num_shared_experts",))
        _check_numbers(self, ("routed_scaling_factor",))
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"norm_topk_prob must be true or false, got {self.norm_topk_prob!r}")
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {self.router!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts={self.num_experts}, got {self.top_k}")
        if self.router == "soft" and self.top_k != self.num_experts:
            raise ValueError("a soft router weights every expert: top_k must equal num_experts")


@dataclass
class LMConfig:
    """A sample decoder LM. ``family`` is what config.json records to find the loader."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    moe: MoEConfig = field(default_factory=MoEConfig)
    family: str = "moeport_lm"

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"moe must be an object of MoE settings, got {type(self.moe).__name__}")
        _check_sizes(self, ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"), ())
        _check_numbers(self, ("rope_theta", "rms_eps"))
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head size must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with rotary positions and grouped KV heads. x: [batch, seq, hidden]."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)

        positions = torch.arange(seq, device=x.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq[None, :]  # [seq, head_dim/2]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        # Grouped KV heads: each KV head serves num_heads/num_kv_heads query heads.
        groups = self.num_heads // self.num_kv_heads
        k = k[:, :, None].expand(batch, self.num_kv_heads, groups, seq, self.head_dim)
        v = v[:, :, None].expand(batch, self.num_kv_heads, groups, seq, self.head_dim)
        k = k.reshape(batch, self.num_heads, seq, self.head_dim)
        v = v.reshape(batch, self.num_heads, seq, self.head_dim)

        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        # The causal mask as one additive [seq, seq] tensor (Trilu): masked_fill on the [batch, heads, seq, seq]
        # scores exports as a Where that took 2 ms per layer at 1x512 in onnxruntime, the broadcast Add 0.5 ms.
        scores = scores + torch.full((seq, seq), float("-inf"), device=x.device).triu(1)
        out = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class Expert(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). x: [tokens, hidden]."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate = nn.Linear(hidden, intermediate, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Router(nn.Module):
    """Scores tokens against experts. x: [tokens, hidden] -> (idx [tokens, k] int64, weight [tokens, k])."""

    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(hidden, cfg.num_experts, bias=False)
        if cfg.router == "sigmoid_topk":
            # Shifts which experts are chosen, not how they are weighted (DeepSeek-V3 load balancing).
            self.register_buffer("score_correction_bias", torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logits = self.gate(x)
        if cfg.router == "soft":
            weight = torch.softmax(logits, dim=-1)
            idx = torch.arange(cfg.num_experts, device=x.device).expand(x.shape[0], cfg.num_experts)
            return idx, weight
        if cfg.router == "softmax_topk":
            scores = torch.softmax(logits, dim=-1)
            weight, idx = torch.topk(scores, cfg.top_k, dim=-1)
        else:  # sigmoid_topk
            scores = torch.sigmoid(logits)
            _, idx = torch.topk(scores + self.score_correction_bias, cfg.top_k, dim=-1)
            weight = torch.gather(scores, 1, idx)
        if cfg.norm_topk_prob:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return idx, weight * cfg.routed_scaling_factor


def reference_dispatch(moe: "MoE", x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Readable eager dispatch: each expert runs on the tokens that chose it. Not traceable (nonzero)."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        token, slot = torch.nonzero(idx == e, as_tuple=True)
        if token.numel():
            out.index_add_(0, token, expert(x[token]) * weight[token, slot, None])
    return out


class MoE(nn.Module):
    """Routed experts plus optional always-on shared experts. x: [tokens, hidden]."""

    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(hidden, cfg)
        self.experts = nn.ModuleList(Expert(hidden, cfg.intermediate_size) for _ in range(cfg.num_experts))
        self.shared_experts = nn.ModuleList(
            Expert(hidden, cfg.intermediate_size) for _ in range(cfg.num_shared_experts)
        )
        # Swapped by moeport.exporter.strategies.use_strategy; a plain attribute, not a submodule.
        self.dispatch: Callable[..., torch.Tensor] = reference_dispatch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        idx, weight = self.router(x)
        out = self.dispatch(self, x, idx, weight)
        for shared in self.shared_experts:
            out = out + shared(x)
        return out, (idx, weight)

    def expert_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-expert 2-D weights in ``x @ W`` layout: gate_up ``[hidden, 2*inter]`` (gate columns first),
        down ``[inter, hidden]``. Fresh contiguous copies, for export."""
        gate_up = [torch.cat([e.gate.weight.T, e.up.weight.T], dim=1).contiguous() for e in self.experts]
        down = [e.down.weight.T.contiguous() for e in self.experts]
        return gate_up, down


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.moe_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.moe = MoE(cfg.hidden_size, cfg.moe)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        x = x + self.attn(self.attn_norm(x))
        batch, seq, hidden = x.shape
        moe_out, routing = self.moe(self.moe_norm(x).reshape(batch * seq, hidden))
        return x + moe_out.reshape(batch, seq, hidden), routing


class MoELM(nn.Module):
    """Decoder LM. forward(input_ids [batch, seq]) -> (logits [batch, seq, vocab], routing per layer)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        x = self.embed(input_ids)
        routing = []
        for layer in self.layers:
            x, layer_routing = layer(x)
            routing.append(layer_routing)
        return self.lm_head(self.norm(x)), routing

    def moe_layers(self) -> list[MoE]:
        return [layer.moe for layer in self.layers]


@dataclass
class EnsembleConfig:
    """N member LMs over one vocabulary, mixed per token.

    ``combine="fixed"``: logits = sum_n fixed_weights[n] * logits_n.
    ``combine="learned"``: a per-token gate, softmax(gate_embed[input_ids]) over members, weights the
    member logits -- a mixture of models routed by the input, exported as one graph.
    """

    members: list[LMConfig] = field(default_factory=list)
    combine: str = "learned"
    fixed_weights: list[float] | None = None
    family: str = "moeport_ensemble"

    def __post_init__(self) -> None:
        if not isinstance(self.members, list) or not all(isinstance(m, (dict, LMConfig)) for m in self.members):
            raise ValueError("members must be a list of member LM configs")
        self.members = [LMConfig(**m) if isinstance(m, dict) else m for m in self.members]
        if len(self.members) < 2:
            raise ValueError("an ensemble needs at least two members")
        if len({m.vocab_size for m in self.members}) != 1:
            raise ValueError("ensemble members must share one vocabulary")
        if self.combine not in ("fixed", "learned"):
            raise ValueError(f"combine must be 'fixed' or 'learned', got {self.combine!r}")
        if self.combine == "fixed":
            if not isinstance(self.fixed_weights, list) or len(self.fixed_weights) != len(self.members):
                raise ValueError("combine='fixed' needs one fixed weight per member")
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in self.fixed_weights):
                raise ValueError(f"fixed weights must be numbers, got {self.fixed_weights!r}")

    @property
    def vocab_size(self) -> int:
        return self.members[0].vocab_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class EnsembleLM(nn.Module):
    """forward(input_ids [batch, seq]) -> (logits [batch, seq, vocab], routing of every member's layers)."""

    def __init__(self, cfg: EnsembleConfig):
        super().__init__()
        self.config = cfg
        self.members = nn.ModuleList(MoELM(m) for m in cfg.members)
        if cfg.combine == "learned":
            self.gate_embed = nn.Embedding(cfg.vocab_size, len(cfg.members))
        else:
            self.register_buffer("fixed_weights", torch.tensor(cfg.fixed_weights, dtype=torch.float32))

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        member_logits, routing = [], []
        for member in self.members:
            logits, member_routing = member(input_ids)
            member_logits.append(logits)
            routing.extend(member_routing)
        stacked = torch.stack(member_logits, dim=-1)  # [batch, seq, vocab, members]
        if self.config.combine == "learned":
            mix = torch.softmax(self.gate_embed(input_ids), dim=-1)[:, :, None, :]
        else:
            mix = self.fixed_weights
        return (stacked * mix).sum(-1), routing

    def moe_layers(self) -> list[MoE]:
        return [moe for member in self.members for moe in member.moe_layers()]
