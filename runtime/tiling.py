"""Tiled UNet, encoder and decoder so that peak memory is bounded by the tile size, not the image.

Tiles are counted in latent units here; the plan (`runtime/plan.py`) converts the pixel tile size once and
hands `Stages` its grid. The UNet runs on latent tiles overlapping by half a tile (512 px tiles: 64 latent
units, overlap 32 = 256 px) and the tiles' eps are blended with Gaussian weights into the full latent before
each sampler step. The encoder and the decoder run on
overlapping tiles blended the same way. Tiled VAE GroupNorm statistics are per tile (one ONNX graph
cannot share them across tiles): a documented approximation, measured against the untiled result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TILE_PX = 512  # the default tile: SD 2.1-base's own resolution
TILE_ABOVE_PIXELS = 768 * 768  # on backends whose memory is not predicted, padded images larger than this are tiled


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` overlapping by at least `overlap`."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def gaussian_weights(height: int, width: int, var: float = 0.01) -> np.ndarray:
    """Separable Gaussian tile weights [height, width], peak in the centre, never zero."""

    def axis(n: int) -> np.ndarray:
        mid = (n - 1) / 2
        x = np.arange(n, dtype=np.float64)
        return np.exp(-((x - mid) ** 2) / (n * n) / (2 * var)) / np.sqrt(2 * np.pi * var)

    return np.outer(axis(height), axis(width)).astype(np.float32)


@dataclass(frozen=True)
class Tile:
    y: int
    x: int
    h: int
    w: int

    def of(self, array: np.ndarray, scale: int = 1) -> np.ndarray:
        """The tile's window of an NCHW array whose spatial size is `scale` × the tiled grid."""
        s = scale
        return array[:, :, self.y * s : (self.y + self.h) * s, self.x * s : (self.x + self.w) * s]


def tiles(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    th, tw = min(tile, height), min(tile, width)
    return [Tile(y, x, th, tw) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def grid(height: int, width: int, tile: int | None) -> tuple[Tile, ...]:
    """The tiles covering a `height` × `width` latent: one window of it all when `tile` is None, else tiles of
    `tile` overlapping by half a tile."""
    if not tile:
        return (Tile(0, 0, height, width),)
    return tuple(tiles(height, width, tile, tile // 2))


def blend(fn: Callable[[Tile], np.ndarray], windows: tuple[Tile, ...], out_shape: tuple[int, ...], scale: int = 1
          ) -> np.ndarray:
    """Run `fn` per tile and blend its NCHW outputs (of `scale` × the tile size) with Gaussian weights."""
    if len(windows) == 1:  # one tile covers everything: no blending, exactly the untiled result
        return fn(windows[0])
    total = np.zeros(out_shape, dtype=np.float32)
    weight_sum = np.zeros(out_shape[-2:], dtype=np.float32)
    for tile in windows:
        out = fn(tile)
        weights = gaussian_weights(tile.h * scale, tile.w * scale)
        ys, xs = slice(tile.y * scale, (tile.y + tile.h) * scale), slice(tile.x * scale, (tile.x + tile.w) * scale)
        total[:, :, ys, xs] += out * weights
        weight_sum[ys, xs] += weights
    return total / weight_sum
