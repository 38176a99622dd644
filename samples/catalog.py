"""The named samples behind ``moeport samples list|create``: one registry, seeded and deterministic."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from moeport._fs import staged_directory, writing
from moeport.errors import MoeportError
from moeport.registry import Registry
from moeport.samples import TRAINED_DIR
from moeport.samples.checkpoint import save_checkpoint
from moeport.samples.model import EnsembleConfig, EnsembleLM, LMConfig, MoEConfig, MoELM



@dataclass(frozen=True)
class Sample:
    """A named sample: what it shows, and how to build its config."""

    name: str
    description: str
    build_config: Callable[[], LMConfig | EnsembleConfig] | None  # None: a shipped checkpoint
    seed: int = 0


_SAMPLES: Registry[Sample] = Registry("sample")


def register_sample(sample: Sample) -> Sample:
    if not sample.name.replace("-", "").isalnum():
        raise ValueError(f"sample names are letters, digits and '-': {sample.name!r}")
    return _SAMPLES.add(sample.name, sample)


def _lm(**moe) -> Callable[[], LMConfig]:
    return lambda: LMConfig(moe=MoEConfig(**moe))


register_sample(Sample("topk", "Mixtral-style: 8 experts, softmax router, top-2, renormalised weights",
                       _lm(num_experts=8, top_k=2, router="softmax_topk", norm_topk_prob=True)))
register_sample(Sample("topk-raw", "8 experts, softmax router, top-2, raw (not renormalised) weights",
                       _lm(num_experts=8, top_k=2, router="softmax_topk", norm_topk_prob=False), seed=1))
register_sample(Sample("switch", "Switch-style top-1 router over 8 experts",
                       _lm(num_experts=8, top_k=1, router="softmax_topk", norm_topk_prob=False), seed=2))
register_sample(Sample("sigmoid-shared",
                       "DeepSeek/Qwen-MoE-style: sigmoid scores with correction bias, top-2 of 8, 1 shared expert",
                       _lm(num_experts=8, top_k=2, router="sigmoid_topk", norm_topk_prob=True,
                           num_shared_experts=1, routed_scaling_factor=1.5), seed=3))
register_sample(Sample("soft", "dense soft MoE: all 4 experts weighted by a softmax gate",
                       _lm(num_experts=4, top_k=4, router="soft"), seed=4))
register_sample(Sample("ensemble", "3 member MoE LMs (top-2, top-1, sigmoid) mixed by a learned per-token gate",
                       lambda: EnsembleConfig(members=[
                           LMConfig(num_layers=1, moe=MoEConfig(num_experts=4, top_k=2)),
                           LMConfig(num_layers=1, moe=MoEConfig(num_experts=4, top_k=1, norm_topk_prob=False)),
                           LMConfig(num_layers=1, moe=MoEConfig(num_experts=4, top_k=2, router="sigmoid_topk",
                                                                num_shared_experts=1)),
                       ], combine="learned"), seed=5))
register_sample(Sample("ensemble-fixed", "2 member MoE LMs mixed by fixed weights 0.7 / 0.3",
                       lambda: EnsembleConfig(members=[
                           LMConfig(num_layers=1, moe=MoEConfig(num_experts=4, top_k=2)),
                           LMConfig(num_layers=1, moe=MoEConfig(num_experts=6, top_k=3)),
                       ], combine="fixed", fixed_weights=[0.7, 0.3]), seed=6))
register_sample(Sample("trained", "byte-level LM trained on Python standard-library sources (shipped)", None))


def list_samples() -> list[Sample]:
    return _SAMPLES.values()


def get_sample(name: str) -> Sample:
    return _SAMPLES.get(name)


def build_model(config: LMConfig | EnsembleConfig) -> nn.Module:
    return EnsembleLM(config) if isinstance(config, EnsembleConfig) else MoELM(config)


def build_sample(name: str) -> tuple[nn.Module, dict]:
    """Build a seeded sample in memory: (model in eval mode, its config dict)."""
    sample = get_sample(name)
    if sample.build_config is None:
        raise MoeportError(f"sample {name!r} is a shipped checkpoint; use create_sample to copy it")
    config = sample.build_config()
    torch.manual_seed(sample.seed)
    model = build_model(config)
    # Seeded, non-zero correction biases so the sample exercises selection by score + bias.
    generator = torch.Generator().manual_seed(sample.seed + 1000)
    for name_, buffer in model.named_buffers():
        if name_.endswith("score_correction_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return model.eval(), config.to_dict()


def create_sample(name: str, directory: str | os.PathLike) -> Path:
    """Write sample ``name`` as a checkpoint directory (config.json + model.safetensors)."""
    sample = get_sample(name)
    directory = Path(directory)
    if sample.build_config is None:
        if directory.exists() and any(directory.iterdir()):
            raise MoeportError(f"output directory {directory} is not empty; choose a new directory")
        if not (TRAINED_DIR / "model.safetensors").is_file():
            raise MoeportError(f"the shipped checkpoint is missing from {TRAINED_DIR}; reinstall moeport")
        # Copied into a staging directory beside the destination and renamed, so a full disk never
        # leaves a half-copied checkpoint.
        with staged_directory(directory) as staging, writing(directory):
            for file in ("config.json", "model.safetensors"):
                shutil.copyfile(TRAINED_DIR / file, staging / file)
        return directory
    model, config = build_sample(name)
    return save_checkpoint(model, config, directory)
