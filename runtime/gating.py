"""MUSIQ score → (k, w, class): the reference rule, in one place for the exporter's manifest and the runtime.

`k = s/100`; `k ≤ 0.4 → k = 0`; `k > 0.7 → k = 0.7`; `w = k/0.7`. Classes: severe `s ≤ 40`, medium
`40 < s < 70`, mild `s ≥ 70`. A negative score (possible with random weights; the reference asserts it
away) counts as severe.
"""

from __future__ import annotations

from dataclasses import dataclass

RULE = {
    "k_per_score": 0.01,
    "k_zero_at_or_below": 0.4,
    "k_max": 0.7,
    "w_full_at_k": 0.7,
    "severe_at_or_below": 40.0,
    "mild_at_or_above": 70.0,
    "rule": "k = s/100; k <= 0.4 -> 0; k > 0.7 -> 0.7; w = k/0.7",
}


@dataclass(frozen=True)
class Gate:
    score: float
    k: float
    w: float
    label: str  # "severe" | "medium" | "mild"


def classify(score: float) -> str:
    if score <= RULE["severe_at_or_below"]:
        return "severe"
    return "mild" if score >= RULE["mild_at_or_above"] else "medium"


def gate(score: float) -> Gate:
    """Python-float arithmetic exactly as the reference (`k = musiq / 100` in float64)."""
    k = float(score) / 100
    if k <= RULE["k_zero_at_or_below"]:
        k = 0.0
    elif k > RULE["k_max"]:
        k = RULE["k_max"]
    return Gate(float(score), k, k / RULE["w_full_at_k"], classify(float(score)))
