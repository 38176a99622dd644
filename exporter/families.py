"""Model families: one registry that finds the loader for a checkpoint directory from its config.json.

A family is a small spec object; what differs between families lives in its fields, not in
``isinstance`` checks in generic code. Every family loads to a ``LoadedModel``: the eval-mode module,
its MoE layers (modules with a swappable ``dispatch`` and ``expert_weights()``), and a ``ModelInfo``.

Model call convention (all families): ``model(**inputs)`` with ``input_ids [batch, seq] int64`` (and,
where the family's ``input_names`` say so, ``attention_mask [batch, seq] int64``, 0 = padding) returns
``(logits [batch, seq, vocab], [(expert_idx [tokens, k] int64, expert_weight [tokens, k]) per MoE layer])``
with ``tokens = batch * seq``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from moeport.contract import LOGITS, TIE_MARGIN, ModelInfo, MoELayerInfo, random_inputs, routing_name
from moeport.errors import MoeportError
from moeport.exporter.patching import Patch
from moeport.exporter.strategies import ExpertsSite
from moeport.registry import Registry
from moeport.samples import checkpoint as ckpt


@dataclass
class LoadedModel:
    model: nn.Module
    moe_layers: list[nn.Module]  # the family's MoE blocks, in model order (for its own spec functions)
    sites: list[ExpertsSite]  # where each MoE layer's experts run (for the dispatch strategies)
    info: ModelInfo
    source: Path | None = None
    config: dict = field(default_factory=dict)


def _no_patches(model: nn.Module) -> list[Patch]:
    return []


@dataclass(frozen=True)
class FamilySpec:
    """How to recognise, build and describe one family of checkpoints."""

    name: str
    description: str
    matches: Callable[[dict], bool]  # config.json dict -> is this family
    # config dict -> randomly initialised model; a config it cannot build from raises ValueError or KeyError
    # (a user error); anything else it raises is a bug and keeps its traceback
    build: Callable[[dict], nn.Module]
    moe_layers: Callable[[nn.Module], list[nn.Module]]  # the MoE blocks, in model order
    describe: Callable[[nn.Module, list[nn.Module]], list[MoELayerInfo]]  # one per MoE block
    experts_sites: Callable[[list[nn.Module]], list[ExpertsSite]]  # one per MoE block
    # (loaded, inputs) -> per MoE layer, per token: gap between the k-th and (k+1)-th selection score
    routing_margins: Callable[["LoadedModel", dict[str, np.ndarray]], list[np.ndarray]]
    tolerance: float = 1e-4  # default max abs error for export validation and verify
    input_names: tuple[str, ...] = ("input_ids",)
    # (checkpoint dir, trust_pickle) -> LoadedModel, for families with their own loader; default:
    # build from config.json, then load model.safetensors strictly.
    load: Callable[[Path, bool], "LoadedModel"] | None = None
    # model -> patches (attribute, value) that make its code traceable, applied with the dispatch strategy
    # for the whole export (tracing and validation) and restored after it; none by default.
    export_patches: Callable[[nn.Module], list[Patch]] = _no_patches

    @classmethod
    def from_module(cls, module, **fields) -> "FamilySpec":
        """The spec of a family whose module defines its hooks as functions named like the fields above
        (``FAMILY_HOOKS``; ``load`` and ``export_patches`` only when it has its own), plus the other ``fields``
        (name, description, matches, input_names, tolerance)."""
        hooks = {hook: getattr(module, hook) for hook in FAMILY_HOOKS if hasattr(module, hook)}
        return cls(**hooks, **fields)


# The FamilySpec fields a family module may define as functions of the same name (FamilySpec.from_module).
FAMILY_HOOKS = ("build", "moe_layers", "describe", "experts_sites", "routing_margins", "load", "export_patches")


_FAMILIES: Registry[FamilySpec] = Registry("model family")


def register_family(spec: FamilySpec) -> FamilySpec:
    for attr in ("matches", *FAMILY_HOOKS):
        hook = getattr(spec, attr)
        if not (callable(hook) or (attr == "load" and hook is None)):  # no load: the default loader
            raise TypeError(f"family {spec.name!r}: {attr} must be callable")
    return _FAMILIES.add(spec.name, spec)


def families() -> list[FamilySpec]:
    return _FAMILIES.values()


def get_family(name: str) -> FamilySpec:
    return _FAMILIES.get(name)


def find_family(config: dict, where: str = "config.json") -> FamilySpec:
    for spec in _FAMILIES.values():
        if spec.matches(config):
            return spec
    named = config.get("family", config.get("model_type"))
    raise MoeportError(
        f"{where} names no known model family (family={named!r}); known families: {', '.join(_FAMILIES.names())}"
    )


def from_module(spec_name: str, model: nn.Module, config: dict | None = None) -> LoadedModel:
    """Wrap an in-memory model of a registered family (tests and samples use this)."""
    spec = get_family(spec_name)
    model.eval()
    moe_layers = spec.moe_layers(model)
    info = ModelInfo(spec.name, int(model.config.vocab_size), tuple(spec.describe(model, moe_layers)),
                     spec.input_names, getattr(model.config, "model_type", "") or "")
    return LoadedModel(model, moe_layers, spec.experts_sites(moe_layers), info, None, config or {})


def load_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> LoadedModel:
    """Load a checkpoint directory with the family its config.json names. User errors are MoeportError."""
    path = ckpt.checkpoint_dir(path)
    config = ckpt.read_config(path)
    spec = find_family(config, where=str(path / ckpt.CONFIG_NAME))
    if spec.load is not None:
        return spec.load(path, trust_pickle)
    try:
        model = spec.build(config)
    except (ValueError, KeyError) as exc:
        raise MoeportError(f"{path / ckpt.CONFIG_NAME} is not a valid {spec.name} config: {exc}") from exc
    ckpt.load_weights(path, model)
    loaded = from_module(spec.name, model, config)
    loaded.source = path
    return loaded


def reference_outputs(loaded: LoadedModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch eager outputs (reference dispatch) named as the exported graph names them."""
    with torch.no_grad():
        logits, routing = loaded.model(**{name: torch.from_numpy(a) for name, a in inputs.items()})
    return {LOGITS: logits.numpy(), **routing_arrays(loaded.info, routing)}


def routing_arrays(info: ModelInfo, routing) -> dict[str, np.ndarray]:
    """``routing.{label}.experts|weights`` arrays of the ``(expert_idx, expert_weight)`` pairs a model returns."""
    arrays = {}
    for layer, (idx, weight) in zip(info.layers, routing):
        arrays[routing_name(layer.label, "experts")] = idx.numpy()
        arrays[routing_name(layer.label, "weights")] = weight.numpy()
    return arrays


def export_patches(loaded: LoadedModel) -> list[Patch]:
    """The patches ``loaded``'s family applies while exporting it (``FamilySpec.export_patches``)."""
    return get_family(loaded.info.family).export_patches(loaded.model)


def routing_margins(loaded: LoadedModel, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Per MoE layer, per token ``[batch*seq]``: k-th minus (k+1)-th selection score (inf when k == E)."""
    return get_family(loaded.info.family).routing_margins(loaded, inputs)


def tie_free_inputs(loaded: LoadedModel, batch: int, seq: int, seed: int, tries: int = 50) -> dict[str, np.ndarray]:
    """Seeded inputs whose reference routing has no near-tie (first seed from ``seed`` on that works)."""
    for attempt in range(tries):
        inputs = random_inputs(loaded.info, batch, seq, seed + 7919 * attempt)
        if all(m.size == 0 or m.min() > TIE_MARGIN for m in routing_margins(loaded, inputs)):
            return inputs
    # The checkpoint's routers score (nearly) every expert the same: a property of the user's weights, not a bug.
    raise MoeportError(f"no tie-free input of shape {batch}x{seq} in {tries} tries: the model's router scores are "
                       f"degenerate (experts tie within {TIE_MARGIN}); check the checkpoint's router weights")


def selection_margin(scores: torch.Tensor, top_k: int) -> np.ndarray:
    """Per token: the k-th minus the (k+1)-th of ``scores [tokens, E]`` (a soft layer: top-1 minus top-2)."""
    if top_k >= scores.shape[-1]:
        # Soft layers select every expert; what can tie is the top expert that routing agreement compares.
        top = torch.topk(scores, min(2, scores.shape[-1]), dim=-1).values
        return (top[:, 0] - top[:, -1]).numpy() if scores.shape[-1] > 1 else np.full(len(scores), np.inf)
    top = torch.topk(scores, top_k + 1, dim=-1).values
    return (top[:, top_k - 1] - top[:, top_k]).numpy()


def run_with_hooks(hooks: list[tuple[nn.Module, Callable]], run: Callable[[], object]) -> None:
    """Call ``run()`` without autograd while each ``(module, hook)`` is a forward hook; the hooks are removed
    afterwards, also when ``run`` raises. How the routing-margin functions read router outputs."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
