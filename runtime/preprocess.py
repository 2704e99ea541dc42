"""Pre- and post-processing around the diffusion (reference `scale_auto`): SR pre-scale, short side up
to 512, edge padding to the engine directory's multiple (`Latent.pad_multiple`, 64 for SD); then clip +
truncate to uint8, crop, resize back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import InputError
from .sizes import describe_size

MIN_SHORT_SIDE = 512
PAD_MULTIPLE = 64  # SD's: the VAE downsamples 8×, the UNet 8× more (the manifest records it)
MAX_PROCESSING_PIXELS = 8192 * 8192  # beyond this even tiled restoration is impractical: refuse clearly


@dataclass(frozen=True)
class Geometry:
    """Sizes (height, width) of one image through the pipeline."""

    input: tuple[int, int]  # as read
    processing: tuple[int, int]  # after SR pre-scale and short-side upscaling
    padded: tuple[int, int]  # processing size edge-padded to the pad multiple
    output: tuple[int, int]  # what is written: input × sr_scale, or the processing size
    sr_scale: float = 1.0

    def journey(self) -> str:
        """For people: the input size → the processing size and why, and the written size where it is another:
        `640×480 → 683×512 (W×H; short side raised to 512, as the paper does; written 640×480)`."""
        why = [f"sr_scale {self.sr_scale:g}"] if self.sr_scale != 1 else []
        scaled = (math.ceil(self.input[0] * self.sr_scale), math.ceil(self.input[1] * self.sr_scale))
        if self.processing != scaled:
            why.append(f"short side raised to {MIN_SHORT_SIDE}, as the paper does")
        if self.output != self.processing:
            why.append(f"written {_wxh(self.output)}")
        if self.processing == self.input:
            return f"{_wxh(self.input)} (W×H; processed at its own size" + "".join(f"; {w}" for w in why) + ")"
        return f"{_wxh(self.input)} → {_wxh(self.processing)} (W×H; {'; '.join(why)})"


def _resize(rgb: np.ndarray, size_hw: tuple[int, int], resample: int) -> np.ndarray:
    if rgb.shape[:2] == size_hw:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size_hw[1], size_hw[0]), resample))


def plan_geometry(height: int, width: int, sr_scale: float = 1.0, resize_back: bool = True,
                  pad_multiple: int = PAD_MULTIPLE) -> Geometry:
    if not sr_scale > 0:
        raise InputError(f"sr_scale must be positive, not {sr_scale}")
    h, w = (math.ceil(height * sr_scale), math.ceil(width * sr_scale)) if sr_scale != 1 else (height, width)
    target = (h, w)
    if min(h, w) < MIN_SHORT_SIDE:
        ratio = MIN_SHORT_SIDE / min(h, w)
        h, w = math.ceil(h * ratio), math.ceil(w * ratio)
    padded = (-(-h // pad_multiple) * pad_multiple, -(-w // pad_multiple) * pad_multiple)
    if padded[0] * padded[1] > MAX_PROCESSING_PIXELS:
        raise InputError(
            f"a {describe_size(height, width)} input becomes {describe_size(*padded)} for processing (the short "
            f"side is raised to {MIN_SHORT_SIDE}, then × sr_scale), above the {MAX_PROCESSING_PIXELS // 2**20} Mpx "
            "limit; crop or resize it first"
        )
    return Geometry((height, width), (h, w), padded, target if resize_back else (h, w), sr_scale)


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[1]}×{size[0]}"


def prepare(rgb: np.ndarray, geometry: Geometry, sr_scale: float = 1.0) -> np.ndarray:
    """uint8 HxWx3 → the padded uint8 image the models see (bicubic resizes, edge padding)."""
    if sr_scale != 1:
        rgb = _resize(rgb, (math.ceil(rgb.shape[0] * sr_scale), math.ceil(rgb.shape[1] * sr_scale)),
                      Image.Resampling.BICUBIC)
    rgb = _resize(rgb, geometry.processing, Image.Resampling.BICUBIC)
    ph, pw = geometry.padded[0] - rgb.shape[0], geometry.padded[1] - rgb.shape[1]
    return np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")


def to_model_range(rgb_u8: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 → float32 [1,3,H,W] in [-1,1], computed as the reference: float64, then cast."""
    x = (rgb_u8.astype(np.float64) / 255.0 * 2.0 - 1.0).astype(np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def from_model_range(x: np.ndarray) -> np.ndarray:
    """float32 [1,3,H,W] in [-1,1] → uint8 HxWx3, rounding: exactly inverts `to_model_range` on uint8-born
    images (MUSIQ reads the uint8 image)."""
    return np.clip(np.rint((x[0].transpose(1, 2, 0).astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """float32 [1,3,H,W] nominally in [-1,1] → uint8 HxWx3: clip, then truncate (as the reference)."""
    x = decoded[0].transpose(1, 2, 0).astype(np.float32) * np.float32(127.5) + np.float32(127.5)
    return np.clip(x, 0, 255).astype(np.uint8)


def finish(rgb_u8: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Crop the padding and resize (LANCZOS) to the output size."""
    h, w = geometry.processing
    return _resize(np.ascontiguousarray(rgb_u8[:h, :w]), geometry.output, Image.Resampling.LANCZOS)
