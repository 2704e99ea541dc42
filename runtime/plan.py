"""How a restore will run, decided before any engine runs: sizes, MUSIQ tokens, tiled or not and why, and the
predicted peak memory against a budget (`adaptbir plan`, `Pipeline.plan`).

One untiled pass is the reference's result; tiles (512 px, blended) are an approximation taken only when the
untiled pass would not fit the memory budget, or when asked for (`tile_size`). The budget defaults to
`BUDGET_FRACTION` of the memory this process can reach: what it holds plus what the system (or its cgroup)
still makes available.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from .errors import ArgumentError, InputError
from .manifest import Manifest
from .memory import (
    IMAGE_BYTES_PER_PIXEL,
    PROCESS_BYTES,
    GiB,
    available_bytes,
    musiq_bytes,
    rss_bytes,
    unet_call_bytes,
    vae_call_bytes,
    weights_bytes,
)
from .musiq_patches import token_count
from .preprocess import Geometry
from .sizes import describe_size
from .tiling import LATENT_TILE, TILE_ABOVE_PIXELS, tiles

BUDGET_FRACTION = 0.85  # of RSS + available: room for the caller's own memory and the estimate's error
STAGES = ("musiq", "encode", "sample", "decode")


@dataclass(frozen=True)
class RestorePlan:
    geometry: Geometry
    tokens: int | None  # MUSIQ's token count; None when the score is given (or there is no MUSIQ)
    tile_px: int | None  # tile size in pixels; None = one untiled pass
    tiles: int
    reason: str  # why tiled or not
    stages: dict[str, int]  # predicted peak RSS of the process during each stage, bytes
    budget: int | None  # bytes; None where the available memory cannot be read
    backend: str
    precision: str

    @property
    def tiled(self) -> bool:
        return self.tile_px is not None

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.__getitem__)

    @property
    def peak_bytes(self) -> int:
        return self.stages[self.peak_stage]

    def record(self) -> dict:
        g = self.geometry
        return {"sizes": {"input": list(g.input), "processing": list(g.processing), "padded": list(g.padded)},
                "musiq_tokens": self.tokens, "tiled": self.tiled, "tile_px": self.tile_px, "tiles": self.tiles,
                "why": self.reason, "predicted_peak_gib": round(self.peak_bytes / GiB, 2),
                "peak_stage": self.peak_stage, "stages_gib": {k: round(v / GiB, 2) for k, v in self.stages.items()},
                "budget_gib": None if self.budget is None else round(self.budget / GiB, 2),
                "backend": self.backend, "precision": self.precision}

    def summary(self) -> str:
        g = self.geometry
        how = f"{self.tiles} tiles of {self.tile_px} px" if self.tiled else "untiled"
        tokens = "score given" if self.tokens is None else f"{self.tokens} MUSIQ tokens"
        return (f"processing {describe_size(*g.processing)}, padded {describe_size(*g.padded)}, {tokens}; {how}: "
                f"{self.reason}; predicted peak {self.peak_bytes / GiB:.1f} GiB ({self.peak_stage})")


def default_budget() -> int | None:
    """`BUDGET_FRACTION` of what this process holds plus what it can still allocate; None if unknown."""
    available, held = available_bytes(), rss_bytes()
    if available is None or held is None:
        return None
    return int(BUDGET_FRACTION * (available + held))


def parse_bytes(text: str) -> int:
    """`12G`, `12GiB`, `800M`, `800MiB`, `0.5g` (binary units; a bare number is GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise ArgumentError(f"memory size {text!r}: write it as e.g. 12G, 12GiB or 800M")
    power = {"k": 1, "m": 2, "g": 3, "t": 4, "": 3}[match.group(2).lower()]
    size = int(float(match.group(1)) * 1024**power)
    if size < 1:
        raise ArgumentError(f"memory size {text!r} is below one byte")
    return size


def bytes_argument(text: str) -> int:
    """`parse_bytes` as an argparse type, so a bad size is a usage error."""
    try:
        return parse_bytes(text)
    except ArgumentError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def predicted_stages(manifest: Manifest, backend: str, precision: str, padded: tuple[int, int],
                     tile: int | None, tokens: int | None) -> dict[str, int]:
    """Peak RSS of the process during each stage of one restore of a `padded` image, `tile` latent tiles."""
    hp = manifest.hyperparameters
    lat_h, lat_w = padded[0] // 8, padded[1] // 8
    th, tw = (min(tile, lat_h), min(tile, lat_w)) if tile else (lat_h, lat_w)
    weights = weights_bytes(sum(manifest.graph_bytes(name) for name in manifest.graphs), backend, precision)
    held = PROCESS_BYTES + weights + IMAGE_BYTES_PER_PIXEL * padded[0] * padded[1]
    unet = manifest.graphs.get("unet")
    stages = {
        "encode": vae_call_bytes(hp["vae"], th, tw),
        "sample": unet_call_bytes(hp["unet"], th, tw, unet.attention_heads_at_once if unet else None),
        "decode": vae_call_bytes(hp["vae"], th, tw),
    }
    if tokens is not None:
        stages = {"musiq": musiq_bytes(tokens, padded[0] * padded[1], hp["musiq"]), **stages}
    return {name: held + value for name, value in stages.items()}


def plan_restore(manifest: Manifest, geometry: Geometry, *, backend: str = "ort-cpu", precision: str | None = None,
                 tile_size: int | None = None, score_given: bool = False, memory_budget: int | None = None
                 ) -> RestorePlan:
    """The plan of one restore of an image whose sizes are `geometry` (`preprocess.plan_geometry`).
    `tile_size` in pixels forces the choice (0 = never tile, else tiles of that size when the image is
    larger); otherwise untiled whenever the predicted peak fits `memory_budget` (bytes; default
    `default_budget()`), 512 px tiles when only they fit. Raises InputError when not even the tiles fit."""
    precision = precision or manifest.precision
    padded = geometry.padded
    tokens = None
    if not score_given and "musiq" in manifest.graphs:
        tokens = token_count(*padded, manifest.musiq.patch_size, manifest.musiq.longer_side_lengths)
    budget = default_budget() if memory_budget is None else memory_budget

    def plan(tile: int | None, reason: str) -> RestorePlan:
        stages = predicted_stages(manifest, backend, precision, padded, tile, tokens)
        count = len(tiles(padded[0] // 8, padded[1] // 8, tile, tile // 2)) if tile else 1
        return RestorePlan(geometry, tokens, tile * 8 if tile else None, count, reason, stages, budget, backend,
                           precision)

    if tile_size is not None:
        tile = tile_size // 8 if tile_size and max(padded) > tile_size else None
        return plan(tile, f"tile size {tile_size} px given" if tile_size else "tiling turned off (tile size 0)")
    if backend in ("trt", "ort-trt", "ort-cuda"):  # device memory is not modelled: the former pixel rule
        large = padded[0] * padded[1] > TILE_ABOVE_PIXELS
        return plan(LATENT_TILE if large else None,
                    f"{backend}: device memory is not predicted; tiles above {describe_size(768, 768)}")
    if budget is None:
        return plan(None, "untiled (the available memory cannot be read here)")
    untiled = plan(None, f"its predicted peak fits the {budget / GiB:.1f} GiB memory budget")
    if untiled.peak_bytes <= budget:
        return untiled
    tiled = plan(LATENT_TILE, f"untiled would need {untiled.peak_bytes / GiB:.1f} GiB "
                              f"({untiled.peak_stage}), over the {budget / GiB:.1f} GiB memory budget")
    if tiled.peak_bytes > budget:
        stage = tiled.peak_stage
        hint = "give the score (--score S) or downscale it" if stage == "musiq" else "downscale it"
        raise InputError(f"a {describe_size(*geometry.input)} image needs about {tiled.peak_bytes / GiB:.1f} GiB "
                         f"even in {LATENT_TILE * 8} px tiles ({stage}), over the {budget / GiB:.1f} GiB budget; "
                         f"{hint}, or raise the budget (--memory-budget) on a machine with more memory")
    return tiled
