"""The comparison object: its numbers, pass rule and routing agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeport.contract import MoELayerInfo
from moeport.runtime.compare import Comparator, Tolerance, expert_load, routing_agreement


def test_stats_and_pass_rule():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    got = ref + np.array([0.0, 1e-5, -2e-5, 0.0])
    stats = Comparator(atol=1e-4).compare_tensor("y", ref, got)
    assert stats.passed
    assert stats.max_abs == pytest.approx(2e-5)
    assert stats.mean_abs == pytest.approx(0.75e-5)
    assert stats.cosine == pytest.approx(1.0)
    failing = Comparator(atol=1e-5).compare_tensor("y", ref, got)
    assert not failing.passed
    assert failing.min_passing_atol == pytest.approx(2e-5)


def test_rtol_and_per_output_tolerance():
    comparator = Comparator(atol=0.0, rtol=0.0, per_output={"loose": Tolerance(0.0, 0.1)})
    ref, got = np.array([10.0]), np.array([10.5])
    assert not comparator.compare_tensor("strict", ref, got).passed
    assert comparator.compare_tensor("loose", ref, got).passed


def test_nan_is_an_infinite_error():
    stats = Comparator(atol=1.0).compare_tensor("y", np.array([1.0, 2.0]), np.array([1.0, np.nan]))
    assert not stats.passed and stats.max_abs == np.inf


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        Comparator().compare_tensor("y", np.zeros((2, 3)), np.zeros((3, 2)))


def test_argmax_agreement_on_logits():
    ref = np.array([[[0.0, 1.0], [1.0, 0.0]]])
    got = np.array([[[0.0, 1.0], [0.0, 1.0]]])
    assert Comparator(atol=10).compare_tensor("logits", ref, got).argmax_agreement == 0.5


def test_routing_agreement_compares_sets_not_order():
    ref = np.array([[1, 2], [3, 4], [0, 5]])
    got = np.array([[2, 1], [3, 5], [0, 5]])
    w = np.full((3, 2), 0.5)
    assert routing_agreement(ref, got, w, w, soft=False).tolist() == [True, False, True]


def test_routing_agreement_soft_uses_top_expert():
    idx = np.tile(np.arange(3), (2, 1))
    ref_w = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    got_w = np.array([[0.4, 0.41, 0.19], [0.1, 0.2, 0.7]])
    assert routing_agreement(idx, idx, ref_w, got_w, soft=True).tolist() == [False, True]


def test_compare_routing_layers_and_threshold():
    layer = MoELayerInfo("0", num_experts=4, top_k=2, router="softmax_topk")
    ref = {"logits": np.zeros((1, 2, 3)), "routing.0.experts": np.array([[0, 1], [2, 3]]),
           "routing.0.weights": np.array([[0.6, 0.4], [0.7, 0.3]])}
    got = dict(ref, **{"routing.0.experts": np.array([[1, 0], [2, 1]]),
                       "routing.0.weights": np.array([[0.4, 0.6], [0.7, 0.3]])})
    strict = Comparator().compare(ref, got, [layer])
    assert strict.routing_agreement == 0.5 and not strict.passed
    # weights are compared per expert on agreeing tokens: [0.6, 0.4] for experts (0, 1) either way
    weights = next(o for o in strict.outputs if o.name == "routing.0.weights")
    assert weights.passed and weights.max_abs == 0.0
    assert Comparator(min_routing_agreement=0.5).compare(ref, got, [layer]).passed
    assert strict.routing[0].load_reference == [1, 1, 1, 1]
    assert strict.routing[0].load_actual == [1, 2, 1, 0]


def test_missing_output_fails():
    result = Comparator().compare({"logits": np.zeros(2), "extra": np.zeros(1)}, {"logits": np.zeros(2)})
    assert result.missing == ["extra"] and not result.passed


def test_expert_load():
    assert expert_load(np.array([[0, 2], [2, 3]]), 5) == [1, 0, 2, 1, 0]


def test_verify_text_shows_each_per_layer_output_once_at_its_worst():
    """A 24-layer with-past model has 48 presents; the text report gives one row per kind, the worst layer in every
    column and NO if any layer fails (its JSON keeps every output)."""
    from moeport.runtime.verify import ShapeResult, VerifyReport

    rng = np.random.default_rng(0)
    ref = {"logits": rng.standard_normal((1, 2, 5)),
           **{f"present.{i}.{part}": rng.standard_normal((1, 2, 2, 4)) for i in range(3) for part in ("key", "value")}}
    got = {name: value + (0.5 if name == "present.1.value" else 1e-6) for name, value in ref.items()}
    comparison = Comparator(atol=1e-4).compare(ref, got, [])
    report = VerifyReport(Path("m.onnx"), Path("ckpt"), "cpu", "sorted", [ShapeResult((1, 2), comparison)])
    rows = {line.split()[0]: line.split() for line in report.render().splitlines()[3:-1]}
    assert list(rows) == ["logits", "present.{0..2}.key", "present.{0..2}.value"]
    values = {o.name: o for o in comparison.outputs}
    assert float(rows["present.{0..2}.value"][1]) == pytest.approx(values["present.1.value"].max_abs, rel=1e-2)
    assert float(rows["present.{0..2}.value"][5]) == pytest.approx(min(values[f"present.{i}.value"].cosine
                                                                       for i in range(3)), abs=1e-6)
    assert (rows["present.{0..2}.key"][-1], rows["present.{0..2}.value"][-1]) == ("yes", "NO")
    assert len(report.to_dict()["shapes"][0]["outputs"]) == 7
