"""Dispatch strategies: how the experts of an MoE layer become ONNX. One registry, checked at registration.

Every strategy is a dispatch function ``(moe, x [tokens, hidden], expert_idx [tokens, k] int64,
expert_weight [tokens, k]) -> [tokens, hidden]`` that reads the per-expert weights ``prepare`` attached
to the MoE module as buffers (so torch.export lifts them to named ONNX initializers).

- ``sorted``: sort slots by expert, one contiguous segment per expert (custom op, see custom_ops).
  Compute grows with k, not with the number of experts. The default for top-k routers.
- ``gather``: gather each token's k expert weight matrices and multiply; cheapest for one or a few
  tokens, memory-bound and slow for long prompts.
- ``dense``: every expert on every token, weights scattered into a [tokens, E] matrix with zeros for
  unselected experts. Exact for soft MoE (where every expert is selected anyway).
- ``capacity``: a static-shape dispatch buffer [E, C, hidden] with C = ceil(factor * tokens * k / E); slots
  past an expert's capacity are dropped (their contribution is zero) and counted. For static-shape
  accelerators; with factor >= E / k nothing can be dropped.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moeport.errors import MoeportError
from moeport.exporter import custom_ops

_PREFIX = "moeport_"


@dataclass(frozen=True)
class StrategyOptions:
    capacity_factor: float | None = None  # capacity only; None -> num_experts / top_k (drops nothing)


@dataclass(frozen=True)
class DispatchStrategy:
    name: str
    description: str
    prepare: Callable[[nn.Module], dict[str, torch.Tensor]]  # buffers to attach to the MoE module
    dispatch: Callable[..., torch.Tensor]  # (moe, x, idx, weight, *, options) -> [tokens, hidden]
    extra_outputs: tuple[str, ...] = ()  # per-layer outputs besides experts/weights, with --with-routing
    # (moe, expert_idx, options) -> {name: tensor} for extra_outputs; a pure function of the routing, so the
    # export wrapper can compute it without the dispatch keeping state on the module.
    compute_extras: Callable[..., dict[str, torch.Tensor]] | None = None


_STRATEGIES: dict[str, DispatchStrategy] = {}


def register_strategy(strategy: DispatchStrategy) -> DispatchStrategy:
    if bool(strategy.extra_outputs) != (strategy.compute_extras is not None):
        raise ValueError(f"strategy {strategy.name!r}: extra_outputs and compute_extras go together")
    if strategy.name in _STRATEGIES or strategy.name == "auto":
        raise ValueError(f"dispatch strategy {strategy.name!r} is already registered (or reserved)")
    if not callable(strategy.prepare) or not callable(strategy.dispatch):
        raise TypeError(f"strategy {strategy.name!r} needs callable prepare and dispatch")
    _STRATEGIES[strategy.name] = strategy
    return strategy


def strategy_names() -> list[str]:
    return list(_STRATEGIES)


def get_strategy(name: str) -> DispatchStrategy:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise MoeportError(f"unknown strategy {name!r}; choose auto or one of: {', '.join(_STRATEGIES)}") from None


def _buffers(moe: nn.Module, kind: str) -> list[torch.Tensor]:
    count = len(moe.experts)
    return [getattr(moe, f"{_PREFIX}{kind}_{e}") for e in range(count)]


def _per_expert(moe: nn.Module) -> dict[str, torch.Tensor]:
    gate_up, down = moe.expert_weights()
    buffers = {f"{_PREFIX}gate_up_{e}": w for e, w in enumerate(gate_up)}
    buffers.update({f"{_PREFIX}down_{e}": w for e, w in enumerate(down)})
    return buffers


def _stacked(moe: nn.Module) -> dict[str, torch.Tensor]:
    gate_up, down = moe.expert_weights()
    return {f"{_PREFIX}gate_up": torch.stack(gate_up), f"{_PREFIX}down": torch.stack(down)}


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


def sorted_dispatch(moe, x, expert_idx, expert_weight, *, options):
    return torch.ops.moeport.sorted_experts(
        x, expert_idx, expert_weight, _buffers(moe, "gate_up"), _buffers(moe, "down"), "silu_glu"
    )


def gather_dispatch(moe, x, expert_idx, expert_weight, *, options):
    gate_up = getattr(moe, f"{_PREFIX}gate_up")[expert_idx]  # [tokens, k, hidden, 2*inter]
    down = getattr(moe, f"{_PREFIX}down")[expert_idx]  # [tokens, k, inter, hidden]
    gate, up = (x[:, None, None, :] @ gate_up).chunk(2, dim=-1)  # [tokens, k, 1, inter] each
    y = ((F.silu(gate) * up) @ down).squeeze(2)  # [tokens, k, hidden]
    return (y * expert_weight[..., None]).sum(dim=1)


def dense_dispatch(moe, x, expert_idx, expert_weight, *, options):
    num_experts = len(moe.experts)
    dense_weight = x.new_zeros(x.shape[0], num_experts).scatter(1, expert_idx, expert_weight)
    out = x.new_zeros(x.shape)
    for e, (gate_up, down) in enumerate(zip(_buffers(moe, "gate_up"), _buffers(moe, "down"))):
        out = out + _swiglu(x, gate_up, down) * dense_weight[:, e : e + 1]
    return out


def _capacity_plan(expert_idx: torch.Tensor, num_experts: int, options: StrategyOptions):
    """(flat expert [S], rank of each slot within its expert [S], kept [S] bool, capacity C) for S = tokens*k."""
    tokens, k = expert_idx.shape
    factor = Fraction(options.capacity_factor or Fraction(num_experts, k)).limit_denominator(1000)
    # capacity = ceil(factor * slots / E), in integers so it stays symbolic in the token count.
    capacity = (factor.numerator * tokens * k + factor.denominator * num_experts - 1) // (
        factor.denominator * num_experts
    )
    flat_expert = expert_idx.reshape(-1)
    one_hot = F.one_hot(flat_expert, num_experts)  # [S, E]
    position = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1)
    return flat_expert, position, position < capacity, capacity


def capacity_dispatch(moe, x, expert_idx, expert_weight, *, options):
    tokens, hidden = x.shape
    num_experts, k = len(moe.experts), expert_idx.shape[1]
    num_slots = tokens * k
    flat_expert, position, kept, capacity = _capacity_plan(expert_idx, num_experts, options)
    slot = torch.arange(num_slots, device=x.device)
    # Dropped slots go to private rows after the E*C buffer rows, so every scatter index is unique.
    dest = torch.where(kept, flat_expert * capacity + position, num_experts * capacity + slot)
    buffer = x.new_zeros(num_experts * capacity + num_slots, hidden)
    buffer = buffer.index_put((dest,), x[slot // k])
    outputs = [
        _swiglu(buffer[e * capacity : (e + 1) * capacity], gate_up, down)
        for e, (gate_up, down) in enumerate(zip(_buffers(moe, "gate_up"), _buffers(moe, "down")))
    ]
    outputs.append(x.new_zeros(num_slots, hidden))
    slot_y = torch.cat(outputs)[dest] * (expert_weight.reshape(-1) * kept)[:, None]
    return slot_y.reshape(tokens, k, hidden).sum(dim=1)


def capacity_extras(moe, expert_idx, options):
    _, _, kept, _ = _capacity_plan(expert_idx, len(moe.experts), options)
    return {"dropped": (~kept).sum()}


register_strategy(DispatchStrategy("sorted", "sort slots by expert; one segment per expert (compute ~ k)",
                                   _per_expert, sorted_dispatch))
register_strategy(DispatchStrategy("gather", "gather each token's expert weights (for 1-few tokens)",
                                   _stacked, gather_dispatch))
register_strategy(DispatchStrategy("dense", "every expert on every token, zero weight when unselected",
                                   _per_expert, dense_dispatch))
register_strategy(DispatchStrategy("capacity", "static [E, C, hidden] buffer with a capacity factor",
                                   _per_expert, capacity_dispatch, extra_outputs=("dropped",),
                                   compute_extras=capacity_extras))


@contextlib.contextmanager
def use_strategy(
    moe_layers: list[nn.Module], strategy: DispatchStrategy, options: StrategyOptions = StrategyOptions()
) -> Iterator[None]:
    """Swap every layer's ``dispatch`` for ``strategy`` and attach its weights; restore both on exit."""
    patched: list[tuple[nn.Module, Callable, list[str]]] = []
    try:
        for moe in moe_layers:
            names = []
            with torch.no_grad():  # export-time copies of the weights, not trainable parameters
                prepared = strategy.prepare(moe)
            for name, tensor in prepared.items():
                moe.register_buffer(name, tensor, persistent=False)
                names.append(name)
            patched.append((moe, moe.dispatch, names))
            moe.dispatch = functools.partial(strategy.dispatch, options=options)
        yield
    finally:
        for moe, dispatch, names in patched:
            moe.dispatch = dispatch
            for name in names:
                delattr(moe, name)


def translation_table() -> dict:
    """Custom-op ONNX translations every export passes to torch.onnx.export."""
    return dict(custom_ops.CUSTOM_TRANSLATIONS)
