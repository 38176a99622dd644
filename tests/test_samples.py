"""The sample family: names, determinism, checkpoints, the shipped trained model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from moeport import MoeportError
from moeport.exporter import families
from moeport.samples.catalog import TRAINED_DIR, build_sample, create_sample, list_samples
from moeport.samples.model import LMConfig, MoEConfig, MoELM


def test_samples_cover_the_router_kinds():
    names = {s.name for s in list_samples()}
    assert {"topk", "topk-raw", "switch", "sigmoid-shared", "soft", "ensemble", "ensemble-fixed", "trained"} <= names
    routers = set()
    for name in names - {"trained"}:
        model, _ = build_sample(name)
        routers |= {(m.cfg.router, m.cfg.top_k == 1, m.cfg.num_shared_experts > 0, m.cfg.norm_topk_prob)
                    for m in model.moe_layers()}
    kinds = {r[0] for r in routers}
    assert kinds == {"softmax_topk", "sigmoid_topk", "soft"}
    assert any(r[1] for r in routers)  # top-1 switch
    assert any(r[2] for r in routers)  # shared experts
    assert {r[3] for r in routers if r[0] == "softmax_topk"} == {True, False}  # renormalised and raw


def test_create_is_deterministic(tmp_path):
    a = create_sample("sigmoid-shared", tmp_path / "a")
    b = create_sample("sigmoid-shared", tmp_path / "b")
    for name in ("config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert not list(a.glob("*.pt")) and not list(a.glob("*.bin"))  # no pickle


def test_checkpoint_round_trip(tmp_path):
    path = create_sample("ensemble", tmp_path / "e")
    loaded = families.load_checkpoint(path)
    model, _ = build_sample("ensemble")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], model(ids)[0], rtol=0, atol=0)
    assert [layer.label for layer in loaded.info.layers] == ["m0.0", "m1.0", "m2.0"]


def test_create_refuses_non_empty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(MoeportError, match="is not empty"):
        create_sample("topk", tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_unknown_sample():
    with pytest.raises(MoeportError, match="unknown sample 'nope'; choose one of topk"):
        create_sample("nope", "/tmp/never-written")


def test_weights_that_do_not_match_the_config(tmp_path):
    path = create_sample("switch", tmp_path / "s")
    config = json.loads((path / "config.json").read_text())
    config["moe"]["intermediate_size"] = 32
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoeportError, match="does not match its config: .* has shape"):
        families.load_checkpoint(path)


def test_invalid_config_values(tmp_path):
    path = create_sample("switch", tmp_path / "s")
    config = json.loads((path / "config.json").read_text())
    config["moe"]["top_k"] = 99
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoeportError, match="not a valid moeport_lm config: top_k must be in 1..num_experts=8"):
        families.load_checkpoint(path)


def test_reference_dispatch_matches_dense_math():
    """The readable reference loop equals the plain dense formula sum_j w_j * expert_{i_j}(x)."""
    torch.manual_seed(0)
    model = MoELM(LMConfig(num_layers=1, moe=MoEConfig(num_experts=5, top_k=3, norm_topk_prob=False)))
    moe = model.moe_layers()[0]
    x = torch.randn(7, 64)
    with torch.no_grad():
        out, (idx, weight) = moe(x)
        expected = torch.stack([
            sum(weight[t, j] * moe.experts[int(idx[t, j])](x[t]) for j in range(3)) for t in range(7)
        ])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_trained_sample_is_shipped_small_and_trained(tmp_path):
    weights = TRAINED_DIR / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 10 * 1024 * 1024
    config = json.loads((TRAINED_DIR / "config.json").read_text())
    assert config["vocab_size"] == 256
    path = create_sample("trained", tmp_path / "t")
    loaded = families.load_checkpoint(path)
    # Windows of 129 bytes: the model was trained on 128-byte contexts.
    text = (TRAINED_DIR / "heldout.txt").read_bytes()[: 32 * 129]
    ids = torch.tensor(list(text), dtype=torch.long).reshape(32, 129)
    with torch.no_grad():
        logits, routing = loaded.model(ids[:, :-1])
    perplexity = math.exp(F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1)).item())
    # uniform guessing over 256 bytes is 256; a trained byte-level model on Python source is far below
    assert perplexity < 8, perplexity
    # the load-balancing loss worked: every expert of every layer gets at least a quarter of an even share
    # (a collapsed router would make routing-agreement figures trivially perfect)
    for idx, _ in routing:
        even_share = idx.numel() / 8
        assert torch.bincount(idx.reshape(-1), minlength=8).min() >= 0.25 * even_share
