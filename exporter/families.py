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

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from moeport.errors import MoeportError
from moeport.exporter.patching import Patch
from moeport.exporter.strategies import ExpertBank, ExpertsSite
from moeport.samples import checkpoint as ckpt


@dataclass(frozen=True)
class MoELayerInfo:
    """One MoE layer as the exported graph names it (``routing.{label}.experts``)."""

    label: str
    num_experts: int
    top_k: int
    router: str


@dataclass(frozen=True)
class ModelInfo:
    family: str
    vocab_size: int
    layers: tuple[MoELayerInfo, ...]
    input_names: tuple[str, ...] = ("input_ids",)
    model_type: str = ""  # the transformers model_type, for Hugging Face checkpoints

    @property
    def num_experts(self) -> int:
        return max(layer.num_experts for layer in self.layers)

    @property
    def top_k(self) -> int:
        return max(layer.top_k for layer in self.layers)

    @property
    def all_soft(self) -> bool:
        """True when every layer weights all of its experts (dense soft MoE)."""
        return all(layer.top_k == layer.num_experts for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "vocab_size": self.vocab_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "layers": [vars(layer) for layer in self.layers],
            "input_names": list(self.input_names),
            "model_type": self.model_type,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelInfo":
        return cls(data["family"], int(data["vocab_size"]), tuple(MoELayerInfo(**d) for d in data["layers"]),
                   tuple(data.get("input_names", ("input_ids",))), data.get("model_type", ""))


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
    build: Callable[[dict], nn.Module]  # config dict -> randomly initialised model (raises ValueError)
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


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    if spec.name in _FAMILIES:
        raise ValueError(f"model family {spec.name!r} is already registered")
    for attr in ("matches", "build", "moe_layers", "describe", "experts_sites", "routing_margins", "export_patches"):
        if not callable(getattr(spec, attr)):
            raise TypeError(f"family {spec.name!r}: {attr} must be callable")
    _FAMILIES[spec.name] = spec
    return spec


def families() -> list[FamilySpec]:
    return list(_FAMILIES.values())


def get_family(name: str) -> FamilySpec:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise MoeportError(f"unknown model family {name!r}; known families: {', '.join(_FAMILIES)}") from None


def find_family(config: dict, where: str = "config.json") -> FamilySpec:
    for spec in _FAMILIES.values():
        if spec.matches(config):
            return spec
    named = config.get("family", config.get("model_type"))
    raise MoeportError(
        f"{where} names no known model family (family={named!r}); known families: {', '.join(_FAMILIES)}"
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
    except (TypeError, ValueError, KeyError) as exc:
        raise MoeportError(f"{path / ckpt.CONFIG_NAME} is not a valid {spec.name} config: {exc}") from exc
    ckpt.load_weights(path, model)
    loaded = from_module(spec.name, model, config)
    loaded.source = path
    return loaded


def output_names(info: ModelInfo, with_routing: bool, extra_outputs: tuple[str, ...] = ()) -> list[str]:
    """Graph output names: ``logits``, then per MoE layer ``routing.{label}.experts|weights|<extra>``."""
    names = ["logits"]
    if with_routing:
        for layer in info.layers:
            names += [f"routing.{layer.label}.{part}" for part in ("experts", "weights", *extra_outputs)]
    return names


def reference_outputs(loaded: LoadedModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch eager outputs (reference dispatch) named as the exported graph names them."""
    with torch.no_grad():
        logits, routing = loaded.model(**{name: torch.from_numpy(a) for name, a in inputs.items()})
    outputs = {"logits": logits.numpy()}
    for layer, (idx, weight) in zip(loaded.info.layers, routing):
        outputs[f"routing.{layer.label}.experts"] = idx.numpy()
        outputs[f"routing.{layer.label}.weights"] = weight.numpy()
    return outputs


# Two experts whose selection scores are closer than this are a tie: torch and onnxruntime may break it
# differently (both correctly), and everything downstream of that token then differs.
TIE_MARGIN = 1e-5


def export_patches(loaded: LoadedModel) -> list[Patch]:
    """The patches ``loaded``'s family applies while exporting it (``FamilySpec.export_patches``)."""
    return get_family(loaded.info.family).export_patches(loaded.model)


def routing_margins(loaded: LoadedModel, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Per MoE layer, per token ``[batch*seq]``: k-th minus (k+1)-th selection score (inf when k == E)."""
    return get_family(loaded.info.family).routing_margins(loaded, inputs)


def random_inputs(info: ModelInfo, batch: int, seq: int, seed: int, left_padding: bool = False) -> dict[str, np.ndarray]:
    """Seeded model inputs: ``input_ids [batch, seq]`` in ``[0, vocab)`` and, where the model takes it,
    ``attention_mask`` (all ones, or with ``left_padding`` row r starting with min(r, seq - 1) pads)."""
    inputs = {"input_ids": np.random.default_rng(seed).integers(0, info.vocab_size, size=(batch, seq), dtype=np.int64)}
    if "attention_mask" in info.input_names:
        mask = np.ones((batch, seq), dtype=np.int64)
        if left_padding:
            for row in range(batch):
                mask[row, : min(row, seq - 1)] = 0
        inputs["attention_mask"] = mask
    return inputs


def tie_free_inputs(loaded: LoadedModel, batch: int, seq: int, seed: int, tries: int = 50) -> dict[str, np.ndarray]:
    """Seeded inputs whose reference routing has no near-tie (first seed from ``seed`` on that works)."""
    for attempt in range(tries):
        inputs = random_inputs(loaded.info, batch, seq, seed + 7919 * attempt)
        if all(m.size == 0 or m.min() > TIE_MARGIN for m in routing_margins(loaded, inputs)):
            return inputs
    raise RuntimeError(f"no tie-free input of shape {batch}x{seq} in {tries} tries; the router scores are degenerate")


def _sample_build(config: dict) -> nn.Module:
    from moeport.samples.catalog import build_model
    from moeport.samples.model import EnsembleConfig, LMConfig

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    cls = EnsembleConfig if config.get("family") == "moeport_ensemble" else LMConfig
    return build_model(cls(**config))


def _selection_margin(scores: torch.Tensor, top_k: int) -> np.ndarray:
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


def _sample_routing_margins(loaded: LoadedModel, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Capture each router's gate logits and rebuild the score its top-k selects on."""
    logits: list[torch.Tensor] = []
    run_with_hooks([(moe.router.gate, lambda _m, _i, out: logits.append(out)) for moe in loaded.moe_layers],
                   lambda: loaded.model(torch.from_numpy(inputs["input_ids"])))
    margins = []
    for moe, gate_logits in zip(loaded.moe_layers, logits):
        if moe.cfg.router == "sigmoid_topk":
            scores = torch.sigmoid(gate_logits) + moe.router.score_correction_bias
        else:
            scores = torch.softmax(gate_logits, dim=-1)
        margins.append(_selection_margin(scores, moe.cfg.top_k))
    return margins


def _silu_glu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _sample_bank(moe: nn.Module) -> ExpertBank:
    gate_up, down = moe.expert_weights()
    return ExpertBank(gate_up, down, _silu_glu, glu_act=torch.nn.functional.silu)


def _sample_dispatch(dispatch: Callable) -> Callable:
    """A strategy's ``dispatch(x, idx, weight)`` as the sample MoE calls its ``dispatch`` attribute:
    ``self.dispatch(self, x, idx, weight)`` (a plain attribute, so it gets the module explicitly)."""
    return lambda _moe, x, idx, weight: dispatch(x, idx, weight)


def _sample_sites(moe_layers: list[nn.Module]) -> list[ExpertsSite]:
    """The sample MoE runs its experts through its ``dispatch`` attribute."""
    return [ExpertsSite(moe, functools.partial(_sample_bank, moe), "dispatch", _sample_dispatch) for moe in moe_layers]


def _sample_describe(model: nn.Module, moe_layers: list[nn.Module]) -> list[MoELayerInfo]:
    if hasattr(model, "members"):
        labels = [f"m{j}.{i}" for j, member in enumerate(model.members) for i in range(len(member.layers))]
    else:
        labels = [str(i) for i in range(len(model.layers))]
    return [MoELayerInfo(label, moe.cfg.num_experts, moe.cfg.top_k, moe.cfg.router)
            for label, moe in zip(labels, moe_layers)]


register_family(FamilySpec(
    name="moeport_lm",
    description="moeport sample decoder LM (samples/model.py)",
    matches=lambda c: c.get("family") == "moeport_lm",
    build=_sample_build,
    moe_layers=lambda m: m.moe_layers(),
    describe=_sample_describe,
    experts_sites=_sample_sites,
    routing_margins=_sample_routing_margins,
))
register_family(FamilySpec(
    name="moeport_ensemble",
    description="ensemble of moeport sample LMs mixed by fixed or learned weights",
    matches=lambda c: c.get("family") == "moeport_ensemble",
    build=_sample_build,
    moe_layers=lambda m: m.moe_layers(),
    describe=_sample_describe,
    experts_sites=_sample_sites,
    routing_margins=_sample_routing_margins,
))

