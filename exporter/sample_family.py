"""The sample family (samples/model.py) in the family registry: ``moeport_lm`` and ``moeport_ensemble``.

How a sample checkpoint is built from its config.json, where its MoE layers run their experts (each
``MoE.dispatch`` attribute), how its layers are labelled (``{layer}``, ``m{member}.{layer}`` in ensembles) and
how its routers' tie margins are read (forward hooks on the gate projections).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch
from torch import nn

from moeport.contract import INPUT_IDS, MoELayerInfo
from moeport.exporter import families
from moeport.exporter.families import LoadedModel
from moeport.exporter.strategies import ExpertBank, ExpertsSite
from moeport.samples.catalog import build_model
from moeport.samples.model import EnsembleConfig, LMConfig


def _sample_build(config: dict) -> nn.Module:
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    cls = EnsembleConfig if config.get("family") == "moeport_ensemble" else LMConfig
    try:
        parsed = cls(**config)
    except TypeError as exc:  # the dataclass's own message: an unknown or missing field of config.json
        raise ValueError(str(exc)) from exc
    return build_model(parsed)


def _sample_routing_margins(loaded: LoadedModel, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Capture each router's gate logits and rebuild the score its top-k selects on."""
    logits: list[torch.Tensor] = []
    families.run_with_hooks([(moe.router.gate, lambda _m, _i, out: logits.append(out)) for moe in loaded.moe_layers],
                   lambda: loaded.model(torch.from_numpy(inputs[INPUT_IDS])))
    margins = []
    for moe, gate_logits in zip(loaded.moe_layers, logits):
        if moe.cfg.router == "sigmoid_topk":
            scores = torch.sigmoid(gate_logits) + moe.router.score_correction_bias
        else:
            scores = torch.softmax(gate_logits, dim=-1)
        margins.append(families.selection_margin(scores, moe.cfg.top_k))
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


# The sample decoder and the ensemble of sample decoders differ only in name and description.
for _name, _description in (("moeport_lm", "moeport sample decoder LM (samples/model.py)"),
                            ("moeport_ensemble", "ensemble of moeport sample LMs mixed by fixed or learned weights")):
    families.register_family(families.FamilySpec(
        name=_name,
        description=_description,
        matches=lambda config, name=_name: config.get("family") == name,
        build=_sample_build,
        moe_layers=lambda model: model.moe_layers(),
        describe=_sample_describe,
        experts_sites=_sample_sites,
        routing_margins=_sample_routing_margins,
    ))
