"""How close two outputs are: the one PSNR rule of the project (export parity, benchmarks, GPU check, tests)."""

from __future__ import annotations

import math

import numpy as np


def psnr(actual: np.ndarray, expected: np.ndarray, peak: float) -> float | None:
    """PSNR in dB of `actual` against `expected` for the given peak value; None when they are equal."""
    mse = float(np.mean((np.asarray(actual, np.float64) - np.asarray(expected, np.float64)) ** 2))
    if mse == 0:
        return None
    return 10 * math.log10(peak**2 / mse) if math.isfinite(mse) and peak > 0 else -math.inf


def psnr_over_range(actual: np.ndarray, expected: np.ndarray) -> float | None:
    """PSNR over the expected output's range, or its magnitude for a single value (a score)."""
    expected = np.asarray(expected, np.float64)
    return psnr(actual, expected, max(float(np.ptp(expected)), float(np.abs(expected).max()), 1e-12))


def output_errors(actual: list[np.ndarray], expected: list[np.ndarray]) -> tuple[float, float, float] | None:
    """(max abs, max rel, worst PSNR over the range, inf when exact) over the outputs; None when a shape
    differs or a value is not finite."""
    max_abs, max_rel, worst = 0.0, 0.0, math.inf
    for a, e in zip(actual, expected, strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if a.shape != e.shape or not np.all(np.isfinite(a)):
            return None
        err = float(np.abs(a - e).max())
        max_abs, max_rel = max(max_abs, err), max(max_rel, err / max(float(np.abs(e).max()), 1e-12))
        worst = min(worst, psnr_over_range(a, e) or math.inf)
    return max_abs, max_rel, worst
