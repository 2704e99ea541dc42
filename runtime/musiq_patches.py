"""MUSIQ multi-scale patch extraction in numpy, reproducing pyiqa 0.1.16's `get_multiscale_patches`.

pyiqa's MUSIQ forward does, in eval mode: `x' = (x - 0.5) * 2`, then for each longer side L in (224, 384)
an aspect-preserving bicubic resize (PyTorch `F.interpolate(mode='bicubic', align_corners=False)`), 32x32
patches with stride 32 and TensorFlow "SAME" zero padding, and finally the patches of the original
resolution. The network itself (exported separately) consumes the patches plus three per-token indices;
this module produces them as the graph inputs `patches`, `spatial_idx`, `scale_idx` and `mask`.

numpy only: the runtime must never import torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .sizes import describe_size

__all__ = [
    "FIXED_TOKENS",
    "MusiqTokens",
    "batch_feeds",
    "bicubic_resize",
    "extract_tokens",
    "pad_tokens",
    "token_count",
]

FIXED_TOKENS = 193  # 49 + 144: the 224 and 384 scales are always padded/cut to ceil(L/32)^2 rows

_A = np.float32(-0.75)  # PyTorch's cubic convolution coefficient
_F32 = np.float32


@dataclass(frozen=True)
class MusiqTokens:
    """The token sequence of one image (N rows; pyiqa's [N, 3075] tensor split into its columns)."""

    patches: np.ndarray  # float32 [N, 3072], each row a 32x32 patch flattened (c, y, x)
    spatial_idx: np.ndarray  # int64 [N], hashed spatial index 10*hh + ww in [0, grid^2)
    scale_idx: np.ndarray  # int64 [N], 0 / 1 for the resized scales, 2 for the original resolution
    mask: np.ndarray  # float32 [N], 1 = real token, 0 = padding

    def __len__(self) -> int:
        return int(self.patches.shape[0])


# ----------------------------------------------------------------------------------------------------------
# bicubic resize
# ----------------------------------------------------------------------------------------------------------


def _fma(a: np.ndarray | np.float32, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 fused multiply-add `a*b + c` with a single rounding, emulated in float64.

    The float64 product of two float32 values is exact, so only the sum is rounded twice (to float64, then to
    float32); that can differ from a true FMA only when the float64 result lands exactly on a float32 tie.
    """
    f64 = np.float64
    return (np.asarray(a, dtype=f64) * np.asarray(b, dtype=f64) + np.asarray(c, dtype=f64)).astype(_F32)


def _cubic_table(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices int64 [out, 4] and weights float32 [out, 4] of PyTorch's bicubic along one axis.

    ATen's `HelperInterpCubic::compute_indices_weights`, in float32 and in its order of operations. PyTorch's
    x86-64 CPU kernels are compiled with FMA contraction, which changes the source coordinate by an ulp (about
    3e-5 at 300 px, enough to move a weight by 1e-5), so the contractions it makes are reproduced with `_fma`
    (found by matching torch 2.x bit for bit).
    """
    scale = _F32(in_size) / _F32(out_size)  # area_pixel_compute_scale: float(in) / out
    dst = np.arange(out_size, dtype=_F32)
    src = _fma(scale, dst + _F32(0.5), _F32(-0.5))  # align_corners=False; no clamp at 0 for cubic
    idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)  # guard_index_and_lambda
    t = np.clip(src - idx.astype(_F32), _F32(0), _F32(1))

    def conv1(x: np.ndarray) -> np.ndarray:  # |x| <= 1: ((A+2)x - (A+3)) x x + 1
        return _fma(_A + _F32(2), x, -(_A + _F32(3))) * x * x + _F32(1)

    def conv2(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2: ((A x - 5A) x + 8A) x - 4A
        return _fma(_fma(_A, x, -_F32(5) * _A), x, _F32(8) * _A) * x - _F32(4) * _A

    u = _F32(1) - t
    weights = np.stack([conv2(t + _F32(1)), conv1(t), conv1(u), conv2(u + _F32(1))], axis=1).astype(_F32)
    # Border taps are clamped (replicate), not zero: out-of-range taps read the edge pixel.
    indices = np.clip(idx[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return indices, weights


def _taps(values: list[np.ndarray], weights: list[np.ndarray]) -> np.ndarray:
    """sum_k values[k] * weights[k] in the order (and with the FMAs) of ATen's compiled loop.

    `out = t0*w0; out += t1*w1; ...` compiles to fma(t0, w0, t1*w1), then fma(t2, w2, .), fma(t3, w3, .).
    """
    out = _fma(values[0], weights[0], values[1] * weights[1])
    for k in (2, 3):
        out = _fma(values[k], weights[k], out)
    return out


def bicubic_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize a float32 CHW image [C, H, W] -> float32 [C, out_h, out_w] like PyTorch's bicubic.

    Semantics of `F.interpolate(x, (out_h, out_w), mode='bicubic', align_corners=False)`: A = -0.75, no
    antialias (downscaling just samples the 4x4 neighbourhood), source indices clamped at the borders.
    Separable with precomputed index/weight tables: the width pass, then the height pass - ATen's CPU kernel
    evaluates `out = sum_j wy_j * (sum_k wx_k * in[y_j, x_k])` in that order, which is reproduced exactly.
    """
    image = np.asarray(image, dtype=_F32)
    if image.ndim != 3:
        raise ValueError(f"bicubic_resize expects a CHW array, got shape {image.shape}")
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"bicubic_resize: output size must be positive, got {out_h}x{out_w}")
    _, in_h, in_w = image.shape
    iy, wy = _cubic_table(in_h, out_h)
    ix, wx = _cubic_table(in_w, out_w)

    # Width pass only on the rows the height pass reads (far fewer than H when downscaling).
    rows, inverse = np.unique(iy, return_inverse=True)
    src = image[:, rows, :]
    tmp = _taps([src[:, :, ix[:, k]] for k in range(4)], [wx[:, k] for k in range(4)])  # [C, len(rows), out_w]
    ry = inverse.reshape(iy.shape)
    return _taps([tmp[:, ry[:, j], :] for j in range(4)], [wy[:, j, None] for j in range(4)])


# ----------------------------------------------------------------------------------------------------------
# patches and positions
# ----------------------------------------------------------------------------------------------------------


def _nearest_grid(grid: int, count: int) -> np.ndarray:
    """pyiqa's hash grid coordinate of each of `count` patches: `F.interpolate(arange(grid), count, 'nearest')`.

    ATen's `nearest_idx`: identity when count == grid, `i >> 1` when count == 2*grid, otherwise
    `min(floorf(i * float(grid) / count), grid - 1)` in float32 - reproduced bit for bit.
    """
    i = np.arange(count, dtype=np.int64)
    if count == grid:
        return i
    if count == 2 * grid:
        return i >> 1
    scale = _F32(grid) / _F32(count)
    return np.minimum(np.floor(i.astype(_F32) * scale).astype(np.int64), grid - 1)


def _image_patches(image: np.ndarray, patch: int) -> tuple[np.ndarray, int, int]:
    """CHW float32 -> (patches float32 [ch*cw, C*patch*patch], ch, cw), like pyiqa's `extract_image_patches`.

    TF "SAME" padding with kernel == stride: total pad `ceil(n/p)*p - n`, half (rounded down) before and the
    rest after; rows in row-major patch order, each flattened (c, y, x) like `F.unfold`.
    """
    c, h, w = image.shape
    ch, cw = math.ceil(h / patch), math.ceil(w / patch)
    pad_h, pad_w = ch * patch - h, cw * patch - w
    if pad_h or pad_w:
        padded = np.zeros((c, ch * patch, cw * patch), dtype=_F32)
        padded[:, pad_h // 2 : pad_h // 2 + h, pad_w // 2 : pad_w // 2 + w] = image
    else:
        padded = image
    blocks = padded.reshape(c, ch, patch, cw, patch).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(blocks).reshape(ch * cw, c * patch * patch), ch, cw


def _scale_tokens(image: np.ndarray, patch: int, grid: int, scale_id: int, max_len: int) -> MusiqTokens:
    """Tokens of one scale, padded with zero rows (mask 0, indices 0) or cut to `max_len` when `max_len >= 0`."""
    patches, ch, cw = _image_patches(image, patch)
    hh, ww = _nearest_grid(grid, ch), _nearest_grid(grid, cw)
    spatial = (hh[:, None] * grid + ww[None, :]).reshape(-1)
    n = patches.shape[0]
    tokens = MusiqTokens(
        patches=patches,
        spatial_idx=spatial,
        scale_idx=np.full(n, scale_id, dtype=np.int64),
        mask=np.ones(n, dtype=_F32),
    )
    if max_len < 0:
        return tokens
    if n >= max_len:
        return MusiqTokens(*(a[:max_len] for a in _fields(tokens)))
    return pad_tokens(tokens, max_len)


def _fields(t: MusiqTokens) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return t.patches, t.spatial_idx, t.scale_idx, t.mask


def _resized_size(h: int, w: int, longer: int) -> tuple[int, int]:
    """pyiqa's `resize_preserve_aspect_ratio` size: Python float64 ratio and Python round (half to even)."""
    ratio = longer / max(h, w)
    return round(h * ratio), round(w * ratio)


def extract_tokens(
    rgb_u8: np.ndarray,
    longer_side_lengths: Sequence[int] = (224, 384),
    patch_size: int = 32,
    grid: int = 10,
) -> MusiqTokens:
    """Multi-scale MUSIQ tokens of one uint8 RGB image [H, W, 3] (HWC, as from Pillow).

    Returns N = sum(ceil(L/p)^2) + ceil(H/p)*ceil(W/p) rows: for each L in sorted(longer_side_lengths) the
    resized image's patches padded/cut to ceil(L/p)^2 rows (scale index = position in the sorted list), then
    every patch of the original resolution (scale index = len(longer_side_lengths)).
    """
    rgb_u8 = np.asarray(rgb_u8)
    if rgb_u8.dtype != np.uint8 or rgb_u8.ndim != 3 or rgb_u8.shape[2] != 3:
        raise InputError(
            f"MUSIQ expects a uint8 RGB image of shape (H, W, 3); got dtype {rgb_u8.dtype}, shape {rgb_u8.shape}."
            " Convert it first (e.g. Pillow's image.convert('RGB'))."
        )
    h, w = int(rgb_u8.shape[0]), int(rgb_u8.shape[1])
    if h == 0 or w == 0:
        raise InputError(f"MUSIQ cannot score an empty image ({describe_size(h, w)}).")
    # float32(u8)/255 then (x - 0.5) * 2, each step in float32 as torch does; CHW for the resize/unfold.
    x = rgb_u8.transpose(2, 0, 1).astype(_F32) / _F32(255)
    x = (x - _F32(0.5)) * _F32(2)

    parts: list[MusiqTokens] = []
    scales = sorted(longer_side_lengths)  # pyiqa sorts: the scale index follows the sorted order
    for scale_id, longer in enumerate(scales):
        rh, rw = _resized_size(h, w, longer)
        if rh == 0 or rw == 0:
            raise InputError(
                f"image {describe_size(h, w)} is too elongated for MUSIQ: at longer side {longer} it would be "
                f"{describe_size(rh, rw)} pixels."
                " Pad or crop it to a less extreme aspect ratio."
            )
        resized = x if (rh, rw) == (h, w) else bicubic_resize(x, rh, rw)
        parts.append(_scale_tokens(resized, patch_size, grid, scale_id, math.ceil(longer / patch_size) ** 2))
    parts.append(_scale_tokens(x, patch_size, grid, len(scales), -1))
    return MusiqTokens(*(np.concatenate(cols) for cols in zip(*(_fields(p) for p in parts), strict=True)))


# ----------------------------------------------------------------------------------------------------------
# padding and batching
# ----------------------------------------------------------------------------------------------------------


def token_count(height: int, width: int, patch_size: int = 32, longer_side_lengths: Sequence[int] = (224, 384)) -> int:
    """Number of tokens `extract_tokens` yields for an H x W image: 193 + ceil(H/32)*ceil(W/32) by default."""
    fixed = sum(math.ceil(length / patch_size) ** 2 for length in longer_side_lengths)
    return fixed + math.ceil(height / patch_size) * math.ceil(width / patch_size)


def pad_tokens(tokens: MusiqTokens, n: int) -> MusiqTokens:
    """Pad `tokens` to exactly n rows with masked tokens (all zeros, mask 0), as pyiqa pads its scales.

    Masked tokens do not change the score (the network masks their attention logits), so a fixed-N engine
    can score any image with at most n tokens. Raises InputError when the image already needs more.
    """
    have = len(tokens)
    if have > n:
        raise InputError(
            f"image is too large for the MUSIQ engine: it needs N = {have} tokens ({FIXED_TOKENS} fixed +"
            f" {have - FIXED_TOKENS} patches of 32x32 at original resolution), but the engine's N_max is {n}."
            f" Downscale the image to at most {max(n - FIXED_TOKENS, 0)} patches, or rebuild the engine with"
            f" N_max >= {have}."
        )
    if have == n:
        return tokens
    extra = n - have
    return MusiqTokens(
        patches=np.concatenate([tokens.patches, np.zeros((extra, tokens.patches.shape[1]), dtype=_F32)]),
        spatial_idx=np.concatenate([tokens.spatial_idx, np.zeros(extra, dtype=np.int64)]),
        scale_idx=np.concatenate([tokens.scale_idx, np.zeros(extra, dtype=np.int64)]),
        mask=np.concatenate([tokens.mask, np.zeros(extra, dtype=_F32)]),
    )


def batch_feeds(tokens: list[MusiqTokens], n: int | None = None) -> dict[str, np.ndarray]:
    """Stack token sequences into the MUSIQ graph inputs, each padded to the longest (or to n):

    `patches` float32 [B, N, 3072], `spatial_idx` int64 [B, N], `scale_idx` int64 [B, N], `mask` float32 [B, N].
    """
    if not tokens:
        raise ValueError("batch_feeds needs at least one token sequence")
    if n is None:
        n = max(len(t) for t in tokens)
    padded = [pad_tokens(t, n) for t in tokens]
    return {
        "patches": np.stack([t.patches for t in padded]).astype(_F32, copy=False),
        "spatial_idx": np.stack([t.spatial_idx for t in padded]).astype(np.int64, copy=False),
        "scale_idx": np.stack([t.scale_idx for t in padded]).astype(np.int64, copy=False),
        "mask": np.stack([t.mask for t in padded]).astype(_F32, copy=False),
    }
