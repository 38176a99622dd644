"""Dispatch strategies: how the experts of an MoE layer become ONNX. One registry, checked at registration.

A model family describes each MoE layer's experts as an ``ExpertsSite``, as data: the module holding them,
an ``ExpertBank`` (per-expert weights in ``x @ W`` layout, optional biases, the family's own gate function),
which attribute of the module runs them, and any other attribute that must change while a strategy runs.
``use_strategy`` attaches the bank's weights to the module as buffers (so torch.export lifts them to named
2-D ONNX initializers) and sets that attribute to the strategy's dispatch
``(x [tokens, hidden], expert_idx [tokens, k] int64, expert_weight [tokens, k]) -> [tokens, hidden]``, all
through one ``patching.Patcher``, which puts the model back as it was on exit.

- ``sorted``: sort the tokens*k slots by expert, one contiguous segment per expert (the
  ``moeport::segment_split`` / ``segment_concat`` custom ops around the per-expert MatMuls), put the results
  back with the inverse permutation and sum over k. Compute grows with k, not with the number of experts.
  Each expert's gate and up are one MatMul; the family's gate function runs once over all experts' rows
  (segments concatenated, gated, cut again for the down projections): a decode step then launches two
  kernels per expert instead of five, most of them on an expert's zero rows. The default for top-k routers.
- ``gather``: gather each slot's expert weight matrices and multiply; cheapest for one or a few
  tokens, memory-bound for long prompts.
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
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moeport.exporter import custom_ops
from moeport.exporter.patching import Patch, Patcher
from moeport.registry import Registry

_PREFIX = "moeport_"


@dataclass
class ExpertBank:
    """One MoE layer's experts: ``y = gate(x @ gate_up[e] + gate_up_bias[e]) @ down[e] + down_bias[e]``.

    ``gate_up``: E tensors ``[hidden, G]`` (G = 2*inter for gated experts, in the family's own column
    order); ``down``: E tensors ``[inter, hidden]``; biases ``[E, G]`` / ``[E, hidden]`` or None;
    ``apply_gate``: ``[rows, G] -> [rows, inter]`` (GLU, plain activation, or a family's custom gate).
    ``glu_act``: set when ``apply_gate(h)`` is exactly ``glu_act(h[:, :inter]) * h[:, inter:]`` (columns
    ``[gate | up]``, the common SwiGLU layout); the dense and capacity strategies then keep gate and up as two
    weights ``[hidden, inter]`` and run two MatMuls instead of one MatMul and a Split of its result (the sorted
    strategy keeps one weight: it splits the rows of all experts at once).
    """

    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]
    apply_gate: Callable[[torch.Tensor], torch.Tensor]
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    glu_act: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def num_experts(self) -> int:
        return len(self.gate_up)


Dispatch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, idx, weight) -> out


def _as_is(dispatch: Dispatch) -> Callable:
    return dispatch


@dataclass
class ExpertsSite:
    """Where a family runs one layer's experts, as data: while a strategy is active, ``module.<attribute>``
    is ``call(dispatch)`` and every patch in ``patches`` holds."""

    module: nn.Module  # buffers are attached here; initializer names follow its path in the model
    bank: Callable[[], ExpertBank]
    attribute: str  # the attribute of ``module`` that runs the experts
    # dispatch(x, idx, weight) -> the callable ``attribute`` holds, in the family's own call signature
    call: Callable[[Dispatch], Callable] = _as_is
    patches: tuple[Patch, ...] = ()  # other attributes set while a strategy is active (a config switch)


@dataclass(frozen=True)
class StrategyOptions:
    capacity_factor: float | None = None  # capacity only; None -> num_experts / top_k (drops nothing)


@dataclass(frozen=True)
class DispatchStrategy:
    name: str
    description: str
    stacked: bool  # weights as [E, ...] stacks (gather) instead of one 2-D tensor per expert
    dispatch: Callable[..., torch.Tensor]  # (weights, x, idx, weight, *, options) -> [tokens, hidden]
    extra_outputs: tuple[str, ...] = ()  # per-layer outputs besides experts/weights, with --with-routing
    # (num_experts, expert_idx, options) -> {name: tensor}: a pure function of the routing, so the export
    # wrapper computes it without the dispatch keeping state on the module.
    compute_extras: Callable[..., dict[str, torch.Tensor]] | None = None
    # the gate function once over all experts' rows (each expert's gate and up as one weight), not per expert
    gate_per_layer: bool = False


_STRATEGIES: Registry[DispatchStrategy] = Registry("strategy", reserved=("auto",))


def register_strategy(strategy: DispatchStrategy) -> DispatchStrategy:
    if not callable(strategy.dispatch):
        raise TypeError(f"strategy {strategy.name!r} needs a callable dispatch")
    if bool(strategy.extra_outputs) != (strategy.compute_extras is not None):
        raise ValueError(f"strategy {strategy.name!r}: extra_outputs and compute_extras go together")
    return _STRATEGIES.add(strategy.name, strategy)


def strategy_names() -> list[str]:
    return _STRATEGIES.names()


def get_strategy(name: str) -> DispatchStrategy:
    return _STRATEGIES.get(name)


class _Weights:
    """Read access, at dispatch time, to the bank tensors attached to a site's module as buffers."""

    def __init__(self, module: nn.Module, num_experts: int, apply_gate: Callable, glu_act: Callable | None,
                 layer_gate: Callable):
        self.module, self.num_experts, self.apply_gate = module, num_experts, apply_gate
        self.glu_act = glu_act  # set when gate and up are separate buffers (see ExpertBank.glu_act)
        # [rows, G] -> [rows, inter] over the rows of every expert at once (strategies with gate_per_layer)
        self.layer_gate = layer_gate

    def per_expert(self, kind: str) -> list[torch.Tensor]:
        return [getattr(self.module, f"{_PREFIX}{kind}_{e}") for e in range(self.num_experts)]

    def stacked(self, kind: str) -> torch.Tensor:
        return getattr(self.module, f"{_PREFIX}{kind}")

    def bias(self, kind: str) -> torch.Tensor | None:
        return getattr(self.module, f"{_PREFIX}{kind}_bias", None)


def _splits_glu(bank: ExpertBank, strategy: DispatchStrategy) -> bool:
    return bank.glu_act is not None and not strategy.stacked and not strategy.gate_per_layer


def _layer_gate(bank: ExpertBank) -> Callable:
    """The bank's gate over ``[rows, G]``; for the common SwiGLU layout written as one Split of the rows into their
    ``[gate | up]`` halves, the form ``quant.expert_forms`` reads (a family's own code may use two Slices)."""
    if bank.glu_act is None:
        return bank.apply_gate

    def halves(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.split(h.shape[-1] // 2, dim=-1)
        return bank.glu_act(gate) * up

    return halves


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``tensor`` that shares no memory with it (``contiguous()`` alone returns a contiguous
    tensor itself: the buffer would alias the model's parameter)."""
    return tensor.clone(memory_format=torch.contiguous_format)


def _bank_buffers(bank: ExpertBank, strategy: DispatchStrategy) -> dict[str, torch.Tensor]:
    """The module buffers the traced graph reads: one copy per expert weight (bank tensors may be views of the
    model's parameters, which the graph must not alias)."""
    if strategy.stacked:
        buffers = {f"{_PREFIX}gate_up": torch.stack(bank.gate_up), f"{_PREFIX}down": torch.stack(bank.down)}
    elif _splits_glu(bank, strategy):
        inter = bank.gate_up[0].shape[1] // 2
        buffers = {f"{_PREFIX}gate_{e}": _own(w[:, :inter]) for e, w in enumerate(bank.gate_up)}
        buffers.update({f"{_PREFIX}up_{e}": _own(w[:, inter:]) for e, w in enumerate(bank.gate_up)})
        buffers.update({f"{_PREFIX}down_{e}": _own(w) for e, w in enumerate(bank.down)})
    else:
        buffers = {f"{_PREFIX}gate_up_{e}": _own(w) for e, w in enumerate(bank.gate_up)}
        buffers.update({f"{_PREFIX}down_{e}": _own(w) for e, w in enumerate(bank.down)})
    if bank.gate_up_bias is not None:
        if _splits_glu(bank, strategy):
            inter = bank.gate_up_bias.shape[1] // 2
            buffers[f"{_PREFIX}gate_bias"] = _own(bank.gate_up_bias[:, :inter])
            buffers[f"{_PREFIX}up_bias"] = _own(bank.gate_up_bias[:, inter:])
        else:
            buffers[f"{_PREFIX}gate_up_bias"] = _own(bank.gate_up_bias)
    if bank.down_bias is not None:
        buffers[f"{_PREFIX}down_bias"] = _own(bank.down_bias)
    return buffers


def _projection(weights: _Weights, x: torch.Tensor, kind: str, e: int) -> torch.Tensor:
    h = x @ weights.per_expert(kind)[e]
    if (bias := weights.bias(kind)) is not None:
        h = h + bias[e]
    return h


def _expert_ffn(weights: _Weights, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e`` on rows ``x [rows, hidden]`` with the per-expert 2-D weights."""
    if weights.glu_act is not None:
        hidden = weights.glu_act(_projection(weights, x, "gate", e)) * _projection(weights, x, "up", e)
    else:
        hidden = weights.apply_gate(_projection(weights, x, "gate_up", e))
    return _projection(weights, hidden, "down", e)


def sorted_dispatch(weights: _Weights, x, expert_idx, expert_weight, *, options):
    tokens, hidden = x.shape
    k = expert_idx.shape[1]
    num_slots = tokens * k
    flat_expert = expert_idx.reshape(-1)
    slot = torch.arange(num_slots, device=x.device)
    # Unique keys make the sort stable and identical on every runtime: slot s belongs to token s // k.
    order = torch.argsort(flat_expert * num_slots + slot)
    counts = F.one_hot(flat_expert, weights.num_experts).sum(0)
    # The token of each sorted slot, looked up in the slot -> token table (slot s belongs to token s // k):
    # a Gather, where ``order // k`` exports as a float Div with sign fix-ups (7 nodes).
    token_of_slot = torch.arange(tokens, device=x.device)[:, None].expand(tokens, k).reshape(-1)
    sorted_x = x.index_select(0, token_of_slot.index_select(0, order))
    segments = torch.ops.moeport.segment_split(sorted_x, counts)
    # Each expert's MatMuls run on its own rows only. The gate function is row by row, so it runs once over the
    # concatenated [S, G] projections: traced per expert it was 3 (SwiGLU) or more kernels per expert and
    # layer, launched at every decode step for the experts that got no row.
    projected = torch.ops.moeport.segment_concat(
        [_projection(weights, rows, "gate_up", e) for e, rows in enumerate(segments)], sorted_x)
    gated = torch.ops.moeport.segment_split(weights.layer_gate(projected), counts)
    y = torch.ops.moeport.segment_concat([_projection(weights, rows, "down", e) for e, rows in enumerate(gated)],
                                         sorted_x)
    y = y * expert_weight.reshape(-1).index_select(0, order)[:, None]
    # Back to slot order with the inverse permutation, then sum each token's k slots: no scatter-add,
    # which some providers (OpenVINO) refuse.
    inverse = torch.zeros_like(order).scatter(0, order, slot)
    return y.index_select(0, inverse).reshape(tokens, k, hidden).sum(dim=1)


def gather_dispatch(weights: _Weights, x, expert_idx, expert_weight, *, options):
    tokens, hidden = x.shape
    gate_up = weights.stacked("gate_up")[expert_idx]  # [tokens, k, hidden, G]
    h = (x[:, None, None, :] @ gate_up).squeeze(2)  # [tokens, k, G]
    if (bias := weights.bias("gate_up")) is not None:
        h = h + bias[expert_idx]
    a = weights.apply_gate(h.reshape(-1, h.shape[-1])).reshape(tokens, -1, 1, weights.stacked("down").shape[1])
    y = (a @ weights.stacked("down")[expert_idx]).squeeze(2)  # [tokens, k, hidden]
    if (bias := weights.bias("down")) is not None:
        y = y + bias[expert_idx]
    return (y * expert_weight[..., None]).sum(dim=1)


def dense_dispatch(weights: _Weights, x, expert_idx, expert_weight, *, options):
    dense_weight = x.new_zeros(x.shape[0], weights.num_experts).scatter(1, expert_idx, expert_weight)
    out = x.new_zeros(x.shape)
    for e in range(weights.num_experts):
        out = out + _expert_ffn(weights, x, e) * dense_weight[:, e : e + 1]
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


def capacity_dispatch(weights: _Weights, x, expert_idx, expert_weight, *, options):
    tokens, hidden = x.shape
    num_experts, k = weights.num_experts, expert_idx.shape[1]
    num_slots = tokens * k
    flat_expert, position, kept, capacity = _capacity_plan(expert_idx, num_experts, options)
    slot = torch.arange(num_slots, device=x.device)
    # Dropped slots go to private rows after the E*C buffer rows, so every scatter index is unique.
    dest = torch.where(kept, flat_expert * capacity + position, num_experts * capacity + slot)
    buffer = x.new_zeros(num_experts * capacity + num_slots, hidden)
    buffer = buffer.index_put((dest,), x[slot // k])
    outputs = [_expert_ffn(weights, buffer[e * capacity : (e + 1) * capacity], e) for e in range(num_experts)]
    outputs.append(x.new_zeros(num_slots, hidden))
    slot_y = torch.cat(outputs)[dest] * (expert_weight.reshape(-1) * kept)[:, None]
    return slot_y.reshape(tokens, k, hidden).sum(dim=1)


def capacity_extras(num_experts: int, expert_idx: torch.Tensor, options: StrategyOptions) -> dict[str, torch.Tensor]:
    _, _, kept, _ = _capacity_plan(expert_idx, num_experts, options)
    return {"dropped": (~kept).sum()}


register_strategy(DispatchStrategy("sorted", "sort slots by expert; one segment per expert (compute ~ k)",
                                   False, sorted_dispatch, gate_per_layer=True))
register_strategy(DispatchStrategy("gather", "gather each token's expert weights (for 1-few tokens)",
                                   True, gather_dispatch))
register_strategy(DispatchStrategy("dense", "every expert on every token, zero weight when unselected",
                                   False, dense_dispatch))
register_strategy(DispatchStrategy("capacity", "static [E, C, hidden] buffer with a capacity factor",
                                   False, capacity_dispatch, extra_outputs=("dropped",),
                                   compute_extras=capacity_extras))


def _site_patches(site: ExpertsSite, strategy: DispatchStrategy, options: StrategyOptions) -> list[Patch]:
    """The patches that run ``site``'s experts with ``strategy``: the bank's weights as buffers of the site's
    module, the dispatch on its attribute, then the site's own patches."""
    with torch.no_grad():  # export-time copies of the weights, not trainable parameters
        bank = site.bank()
        buffers = _bank_buffers(bank, strategy)
    weights = _Weights(site.module, bank.num_experts, bank.apply_gate,
                       bank.glu_act if _splits_glu(bank, strategy) else None, _layer_gate(bank))
    dispatch = functools.partial(strategy.dispatch, weights, options=options)
    return [*(Patch(site.module, name, tensor, buffer=True) for name, tensor in buffers.items()),
            Patch(site.module, site.attribute, site.call(dispatch)), *site.patches]


@contextlib.contextmanager
def use_strategy(
    sites: list[ExpertsSite], strategy: DispatchStrategy, options: StrategyOptions = StrategyOptions(),
    patches: Iterable[Patch] = (),
) -> Iterator[None]:
    """Apply ``patches`` (the family's export patches), then attach every site's expert weights and install
    ``strategy``; on exit, also on an error, the model is restored as it was (``patching.Patcher``)."""
    with Patcher(patches) as patcher:
        for site in sites:
            patcher.apply(*_site_patches(site, strategy, options))
        yield


def translation_table() -> dict:
    """Custom-op ONNX translations every export passes to torch.onnx.export."""
    return dict(custom_ops.CUSTOM_TRANSLATIONS)
