"""Colour correction of the decoded image against a reference decode, in [-1, 1] (off by default)."""

from __future__ import annotations

import numpy as np

METHODS = ("none", "adain", "wavelet")


def adain(image: np.ndarray, reference: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Match per-channel mean and std (unbiased variance + eps) of `image` [B,C,H,W] to `reference`."""
    axes = (2, 3)

    def stats(x):
        mean = x.mean(axis=axes, keepdims=True)
        std = np.sqrt(x.var(axis=axes, ddof=1, keepdims=True) + eps)
        return mean, std

    m_i, s_i = stats(image.astype(np.float32))
    m_r, s_r = stats(reference.astype(np.float32))
    return ((image - m_i) / s_i * s_r + m_r).astype(np.float32)


def _blur(x: np.ndarray, dilation: int) -> np.ndarray:
    """3×3 kernel [1,2,1]⊗[1,2,1]/16 with dilation, replicate padding (separable)."""
    pad = dilation
    p = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
    rows = (p[:, :, : -2 * pad or None] + 2 * p[:, :, pad:-pad] + p[:, :, 2 * pad :]) / 4
    return ((rows[..., : -2 * pad or None] + 2 * rows[..., pad:-pad] + rows[..., 2 * pad :]) / 4).astype(np.float32)


def wavelet_decomposition(x: np.ndarray, levels: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) frequencies: low = blurred `levels` times with dilation 2^i; high = x − low."""
    high, low = np.zeros_like(x), x
    for i in range(levels):
        blurred = _blur(low, 2**i)
        high += low - blurred
        low = blurred
    return high, low


def wavelet(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """High frequencies of `image` + low frequencies of `reference`."""
    high, _ = wavelet_decomposition(image.astype(np.float32))
    _, low = wavelet_decomposition(reference.astype(np.float32))
    return high + low


def color_fix(image: np.ndarray, reference: np.ndarray, method: str) -> np.ndarray:
    if method not in METHODS:
        raise ValueError(f"colour fix must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "none":
        return image
    return adain(image, reference) if method == "adain" else wavelet(image, reference)
