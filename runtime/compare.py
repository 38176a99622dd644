"""Numeric comparison as one object: used by ``verify``, by export validation and by the tests.

A ``Comparator`` holds per-output tolerances and the routing threshold. ``compare(reference, actual,
layers)`` takes two ``{output name: array}`` dicts (names as the exported graph has them) and returns a
``Comparison`` with, per float output, max/mean/p99 absolute and relative error, cosine similarity and
the smallest atol that would pass; for ``logits`` the argmax agreement; per MoE layer the routing
agreement and expert load histograms.

Pass rule per float output (as ``numpy.allclose``): every element satisfies
``|actual - reference| <= atol + rtol * |reference|``. A routing layer passes when its agreement is at
least ``min_routing_agreement``. Routing agreement = fraction of tokens whose *set* of selected experts
equals the reference's; for a soft layer (every expert selected) it is the agreement of the top expert.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from moeport.contract import LOGITS, ROUTING_PARTS, TIE_MARGIN, MoELayerInfo, routing_name

_REL_FLOOR = 1e-6  # denominators below this make relative error meaningless


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float = 0.0


@dataclass
class OutputStats:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    cosine: float
    min_passing_atol: float  # the smallest atol that passes with this rtol
    tolerance: Tolerance
    passed: bool
    argmax_agreement: float | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


@dataclass
class RoutingStats:
    label: str
    agreement: float
    tokens: int
    load_reference: list[int]
    load_actual: list[int]
    passed: bool
    near_ties: int = 0  # tokens whose reference k-th and (k+1)-th scores nearly tie (either choice is right)
    disagreements_at_ties: int = 0  # of the disagreeing tokens, how many are such near-ties

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Comparison:
    outputs: list[OutputStats] = field(default_factory=list)
    routing: list[RoutingStats] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # reference outputs the model did not produce

    @property
    def passed(self) -> bool:
        return not self.missing and all(o.passed for o in self.outputs) and all(r.passed for r in self.routing)

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def routing_agreement(self) -> float | None:
        return min((r.agreement for r in self.routing), default=None)

    @property
    def argmax_agreement(self) -> float | None:
        values = [o.argmax_agreement for o in self.outputs if o.argmax_agreement is not None]
        return min(values, default=None)

    def summary(self) -> dict:
        """The verdict and its aggregates (what reports lead with)."""
        return {"passed": self.passed, "max_abs_err": self.max_abs_err, "routing_agreement": self.routing_agreement,
                "argmax_agreement": self.argmax_agreement}

    def to_dict(self) -> dict:
        return {
            **self.summary(),
            "outputs": [o.to_dict() for o in self.outputs],
            "routing": [r.to_dict() for r in self.routing],
            "missing": self.missing,
        }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a.ravel(), b.ravel()) / norm)


def expert_load(expert_idx: np.ndarray, num_experts: int) -> list[int]:
    """How many token slots chose each expert: histogram of ``expert_idx`` over ``0..E-1``."""
    return np.bincount(expert_idx.reshape(-1), minlength=num_experts)[:num_experts].astype(int).tolist()


def routing_agreement(
    reference_idx: np.ndarray, actual_idx: np.ndarray, reference_weight: np.ndarray, actual_weight: np.ndarray,
    soft: bool,
) -> np.ndarray:
    """Per-token bool ``[tokens]``: same expert set (top-k) or same top expert (soft)."""
    if soft:
        return np.argmax(reference_weight, axis=-1) == np.argmax(actual_weight, axis=-1)
    return np.all(np.sort(reference_idx, axis=-1) == np.sort(actual_idx, axis=-1), axis=-1)


class Comparator:
    """Compares named outputs of a model under test against a reference."""

    def __init__(
        self,
        atol: float = 1e-4,
        rtol: float = 0.0,
        per_output: dict[str, Tolerance] | None = None,
        min_routing_agreement: float = 1.0,
        logits_outputs: Iterable[str] = (LOGITS,),
    ):
        if atol < 0 or rtol < 0:
            raise ValueError("tolerances must be non-negative")
        self.default = Tolerance(atol, rtol)
        self.per_output = dict(per_output or {})
        self.min_routing_agreement = min_routing_agreement
        self.logits_outputs = set(logits_outputs)

    def tolerance_for(self, name: str) -> Tolerance:
        return self.per_output.get(name, self.default)

    def compare_tensor(self, name: str, reference: np.ndarray, actual: np.ndarray) -> OutputStats:
        reference = np.asarray(reference, dtype=np.float64)
        actual = np.asarray(actual, dtype=np.float64)
        if reference.shape != actual.shape:
            raise ValueError(f"output {name!r}: shape {actual.shape} differs from the reference {reference.shape}")
        tol = self.tolerance_for(name)
        with np.errstate(invalid="ignore", over="ignore"):
            abs_err = np.abs(actual - reference)
            # Equal elements (inf == inf) have no error; any other NaN/inf mismatch is an infinite error.
            abs_err = np.where(actual == reference, 0.0, np.nan_to_num(abs_err, nan=np.inf))
            rel_err = abs_err / np.maximum(np.abs(np.nan_to_num(reference)), _REL_FLOOR)
            excess = abs_err - tol.rtol * np.abs(np.nan_to_num(reference))
            empty = abs_err.size == 0
            stats = OutputStats(
                name=name,
                shape=tuple(reference.shape),
                max_abs=0.0 if empty else float(abs_err.max()),
                mean_abs=0.0 if empty else float(abs_err.mean()),
                p99_abs=0.0 if empty else float(np.quantile(abs_err, 0.99)),
                max_rel=0.0 if empty else float(rel_err.max()),
                mean_rel=0.0 if empty else float(rel_err.mean()),
                p99_rel=0.0 if empty else float(np.quantile(rel_err, 0.99)),
                cosine=_cosine(np.nan_to_num(reference), np.nan_to_num(actual)),
                min_passing_atol=0.0 if empty else float(max(excess.max(), 0.0)),
                tolerance=tol,
                passed=bool(np.all(excess <= tol.atol)),
            )
        if name in self.logits_outputs and reference.ndim >= 1 and reference.size:
            stats.argmax_agreement = float(np.mean(np.argmax(reference, -1) == np.argmax(actual, -1)))
        return stats

    def compare_routing(
        self, layer: MoELayerInfo, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray],
        margins: np.ndarray | None = None,
    ) -> tuple[RoutingStats, OutputStats]:
        """Agreement and load for one layer, plus the weight error on tokens whose experts agree."""
        experts, weights = (routing_name(layer.label, part) for part in ROUTING_PARTS)
        soft = layer.top_k == layer.num_experts
        agree = routing_agreement(reference[experts], actual[experts], reference[weights], actual[weights], soft)
        stats = RoutingStats(
            label=layer.label,
            agreement=float(agree.mean()) if agree.size else 1.0,
            tokens=int(agree.size),
            load_reference=expert_load(reference[experts], layer.num_experts),
            load_actual=expert_load(actual[experts], layer.num_experts),
            passed=(float(agree.mean()) if agree.size else 1.0) >= self.min_routing_agreement,
        )
        if margins is not None:
            ties = margins < TIE_MARGIN
            stats.near_ties = int(ties.sum())
            stats.disagreements_at_ties = int((ties & ~agree).sum())
        # Compare weights slot by slot in expert order, on the tokens that chose the same experts.
        order_ref = np.argsort(reference[experts][agree], axis=-1, kind="stable")
        order_act = np.argsort(actual[experts][agree], axis=-1, kind="stable")
        weight_stats = self.compare_tensor(
            weights,
            np.take_along_axis(reference[weights][agree], order_ref, -1),
            np.take_along_axis(actual[weights][agree], order_act, -1),
        )
        return stats, weight_stats

    def compare(
        self, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], layers: Iterable[MoELayerInfo] = (),
        margins: dict[str, np.ndarray] | None = None,
    ) -> Comparison:
        """Compare every reference output; ``margins`` (per layer label, per token) flags router near-ties."""
        result = Comparison()
        layers = list(layers)
        routing_names = {
            routing_name(layer.label, part) for layer in layers for part in ROUTING_PARTS
        }
        for name, ref in reference.items():
            if name in routing_names:
                continue
            if name not in actual:
                result.missing.append(name)
                continue
            result.outputs.append(self.compare_tensor(name, ref, actual[name]))
        for layer in layers:
            names = {routing_name(layer.label, part) for part in ROUTING_PARTS}
            if names <= set(actual) and names <= set(reference):
                routing, weight_stats = self.compare_routing(layer, reference, actual,
                                                             (margins or {}).get(layer.label))
                result.routing.append(routing)
                result.outputs.append(weight_stats)
        return result
