"""The restoration pipeline, read like the paper: score → gate → encode → mix → sample → decode → finish.

    pipeline = Pipeline.from_engines("engines/sd21-fp16", backend="ort-cpu")
    result = pipeline.restore(image, seed=0)          # uint8 HxWx3/4 numpy array or PIL image
    result.image, result.score, result.label, result.k, result.w, result.timings

One pipeline may be used from several threads at once: it holds no per-call state, and the same seeds
give the same results as sequential calls.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import __version__
from .arguments import check_arguments
from .backends import Engines
from .colorfix import color_fix as apply_color_fix
from .errors import EngineError, InputError
from .gating import Gate, gate
from .image_io import LoadedImage, from_array, resize_alpha, to_array
from .manifest import Manifest
from .musiq_patches import batch_feeds, extract_tokens
from .preprocess import Geometry, finish, plan_geometry, prepare, to_model_range, to_uint8
from .sampler import NoiseSource, Schedule, sample
from .tiling import LATENT_TILE, TILE_ABOVE_PIXELS, Tile, blend, tiles

Progress = Callable[[int, int], None]


@dataclass
class Timings:
    """Seconds per stage of one call, plus the time spent inside engine calls (the rest is overhead)."""

    stages: dict[str, float] = field(default_factory=dict)
    engine: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def to_dict(self) -> dict[str, float]:
        return {**{f"{k}_s": round(v, 6) for k, v in self.stages.items()},
                "engine_s": round(self.engine.get("engine_s", 0.0), 6)}


@dataclass
class LatentResult:
    """Steps 3–6 on an already padded float image."""

    final_latent: np.ndarray  # [1,4,h,w]
    decoded: np.ndarray  # [1,3,H,W], unclipped
    image_u8: np.ndarray  # HxWx3, clipped and truncated
    gate: Gate
    seed: int | None
    steps: int
    tiled: bool


@dataclass
class Result:
    image: Any  # same kind as the input: uint8 numpy HxWx3/4 or PIL image
    score: float | None  # MUSIQ score (None when given by the caller)
    label: str  # severe | medium | mild
    k: float
    w: float
    seed: int
    steps: int
    timings: dict[str, float]
    sizes: dict[str, list[int]]
    tiled: bool
    warnings: list[str] = field(default_factory=list)
    backend: str = "ort-cpu"
    precision: str = "fp32"  # what the UNet, encoders and decoder computed in (MUSIQ: always fp32)

    def record(self) -> dict[str, Any]:
        return {"score": self.score, "class": self.label, "k": self.k, "w": self.w, "seed": self.seed,
                "steps": self.steps, "sizes": self.sizes, "tiled": self.tiled, "timings": self.timings,
                "warnings": self.warnings, "backend": self.backend, "compute_precision": self.precision}


class Pipeline:
    def __init__(self, engines: Engines, tile_above_pixels: int = TILE_ABOVE_PIXELS,
                 context: np.ndarray | None = None):
        """`context` [1,77,C] replaces the directory's empty-prompt context (golden tests, custom prompts)."""
        self.engines = engines
        self.manifest = engines.manifest
        self.capabilities = self.manifest.capabilities
        self.context = np.ascontiguousarray(_load_context(self.manifest) if context is None else context,
                                            dtype=np.float32)
        self.tile_above_pixels = tile_above_pixels

    @classmethod
    def from_engines(cls, path: str | Path, backend: str = "ort-cpu", threads: int | None = None,
                     verify: bool = True, precision: str | None = None) -> Pipeline:
        """`precision`: OpenVINO's inference precision, bf16 or f32 (default: bf16 where the CPU has it)."""
        return cls(Engines.load(path, backend=backend, threads=threads, verify=verify, precision=precision))

    @property
    def identity(self) -> str:
        return self.manifest.identity

    # ------------------------------------------------------------------------- 3. score and gate

    def score(self, padded_u8: np.ndarray, timings: Timings | None = None) -> float:
        """MUSIQ on the padded uint8 image (patches in numpy, exactly pyiqa's tensor)."""
        if not self.engines.has("musiq"):
            raise InputError("this engine directory has no MUSIQ graph: give the score (--score S)")
        n_max = self.manifest.musiq.n_max
        tokens = extract_tokens(padded_u8, self.manifest.musiq.longer_side_lengths)
        if len(tokens.mask) > n_max:
            raise InputError(f"image too large for MUSIQ: {len(tokens.mask)} tokens, the engines serve at most "
                             f"{n_max}; rebuild with a larger --musiq-n-max or downscale the input")
        (score,) = self.engines.run("musiq", batch_feeds([tokens]), timings.engine if timings else None)
        return float(score[0])

    def decide(self, score: float, k: float | None = None, w: float | None = None) -> Gate:
        """The gating rule, overrides, and the honest degradation of a checkpoint without a part."""
        gated = gate(score)
        k = gated.k if k is None else float(k)
        w = gated.w if w is None else float(w)
        if not self.capabilities.has_restoration_encoder:
            k = 1.0
        if not self.capabilities.has_csft:
            w = 0.0
        return Gate(gated.score, k, w, gated.label)

    # ---------------------------------------------------------------------- 4. encode and mix

    def encode(self, x: np.ndarray, tiled: int | None, timings: Timings) -> tuple[np.ndarray, np.ndarray]:
        """Dual encoder: z_restore, z_identity [1,4,h,w] in the diffusion latent space."""
        h, w = x.shape[2] // 8, x.shape[3] // 8

        def run(tile: Tile) -> np.ndarray:
            window = np.ascontiguousarray(tile.of(x, scale=8))
            z_restore, z_identity = self.engines.run("dual_encoder", {"image": window}, timings.engine)
            return np.concatenate([z_restore, z_identity], axis=1)

        both = blend(run, self._grid(h, w, tiled), (1, 8, h, w))
        return both[:, :4], both[:, 4:]

    @staticmethod
    def mix(z_restore: np.ndarray, z_identity: np.ndarray, k: float) -> np.ndarray:
        """cond = (1 − k)·z_restore + k·z_identity (k a Python float; each factor rounded to float32)."""
        return z_restore * np.float32(1 - k) + z_identity * np.float32(k)

    # --------------------------------------------------------------------------------- 5. sample

    def eps_model(self, cond: np.ndarray, w: float, tiled: int | None, timings: Timings):
        """The UNet-with-controls as the sampler's `eps(x, t)`, on blended latent tiles when tiled."""
        context = self.context
        w_in = np.array([w], dtype=np.float32)
        grid = self._grid(cond.shape[2], cond.shape[3], tiled)

        def eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            def run(tile: Tile) -> np.ndarray:
                feeds = {"x": np.ascontiguousarray(tile.of(x)), "t": t, "context": context,
                         "cond": np.ascontiguousarray(tile.of(cond)), "w": w_in}
                return self.engines.run("unet", feeds, timings.engine)[0]

            return blend(run, grid, x.shape)

        return eps

    # -------------------------------------------------------------------------------- 6. decode

    def decode(self, latent: np.ndarray, tiled: int | None, timings: Timings) -> np.ndarray:
        h, w = latent.shape[2:]

        def run(tile: Tile) -> np.ndarray:
            return self.engines.run("decoder", {"latent": np.ascontiguousarray(tile.of(latent))}, timings.engine)[0]

        return blend(run, self._grid(h, w, tiled), (1, 3, 8 * h, 8 * w), scale=8)

    @staticmethod
    def _grid(h: int, w: int, tile_latent: int | None) -> list[Tile]:
        if not tile_latent:
            return [Tile(0, 0, h, w)]
        return tiles(h, w, tile_latent, tile_latent // 2)  # 512 px tiles overlap by 256 px

    def tile_plan(self, padded: tuple[int, int], tile_size: int | None) -> int | None:
        """Latent tile size to use, or None for one untiled pass. `tile_size` in pixels: None = automatic
        (512 px tiles above the pixel threshold), 0 = never tile."""
        if tile_size is None:
            return LATENT_TILE if padded[0] * padded[1] > self.tile_above_pixels else None
        if tile_size == 0:
            return None
        return tile_size // 8 if max(padded) > tile_size else None

    # ------------------------------------------------------------------------------- the whole

    def restore_latent(self, x: np.ndarray, decision: Gate, *, steps: int = 50, seed: int | None = None,
                       x_T: np.ndarray | None = None, noise: np.ndarray | None = None, color_fix: str = "none",
                       tile_size: int | None = None, progress: Progress | None = None,
                       timings: Timings | None = None) -> LatentResult:
        """Steps 4–6 on a padded float image x [1,3,H,W] in [-1,1] (H, W multiples of 64), for a decided gate.

        `x_T` [1,4,h,w] and `noise` [steps,1,4,h,w] replace the seeded draws (golden tests).
        """
        check_arguments(steps=steps, seed=seed, color_fix=color_fix, tile_size=tile_size)
        timings = timings or Timings()
        if x.ndim != 4 or x.shape[:2] != (1, 3) or x.shape[2] % 64 or x.shape[3] % 64:
            raise InputError(f"expected a padded image [1,3,H,W] with H, W multiples of 64, got {list(x.shape)}")
        tiled = self.tile_plan(x.shape[2:], tile_size)
        if seed is None and (x_T is None or noise is None):
            seed = secrets.randbits(63)
        with timings.stage("encode"):
            z_restore, z_identity = self.encode(x, tiled, timings)
            cond = self.mix(z_restore, z_identity, decision.k)
        schedule = Schedule.from_manifest(self.manifest.schedule, steps)
        source = NoiseSource(seed or 0, cond.shape)
        start = source.draw() if x_T is None else x_T.astype(np.float32)
        noise_at = (lambda i: source.draw()) if noise is None else (lambda i: noise[i])
        with timings.stage("sample"):
            latent = sample(self.eps_model(cond, decision.w, tiled, timings), start, schedule, noise_at, progress)
        with timings.stage("decode"):
            decoded = self.decode(latent, tiled, timings)
            if color_fix != "none":
                decoded = apply_color_fix(decoded, self.decode(cond, tiled, timings), color_fix)
        return LatentResult(latent, decoded, to_uint8(decoded), decision, seed, steps, tiled is not None)

    def restore_float(self, x: np.ndarray, *, score: float | None = None, k: float | None = None,
                      w: float | None = None, **options: Any) -> LatentResult:
        """Steps 3–6 on an already padded float image x [1,3,H,W] in [-1,1]: score (unless given), gate,
        encode and mix, sample, decode. `options` go to `restore_latent` (steps, seed, x_T, noise, ...)."""
        check_arguments(score=score, k=k, w=w)
        timings = options.setdefault("timings", Timings())
        if score is None:
            # MUSIQ reads the uint8 image; this inverts `to_model_range` exactly for uint8-born inputs
            u8 = np.clip(np.rint((x[0].transpose(1, 2, 0).astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
            with timings.stage("musiq"):
                score = self.score(u8, timings)
        return self.restore_latent(x, self.decide(score, k, w), **options)

    def restore(self, image: np.ndarray | Image.Image | LoadedImage, *, seed: int | None = None, steps: int = 50,
                score: float | None = None, k: float | None = None, w: float | None = None, sr_scale: float = 1.0,
                resize_back: bool = True, color_fix: str = "none", tile_size: int | None = None,
                progress: Progress | None = None) -> Result:
        """Restore one image; returns it in the input's kind, with score, class, k, w, seed and timings.

        Every argument is checked before any engine runs (`ArgumentError`, see `runtime/arguments.py`)."""
        notes = check_arguments(steps=steps, seed=seed, score=score, k=k, w=w, sr_scale=sr_scale,
                                color_fix=color_fix, tile_size=tile_size)
        timings = Timings()
        started = time.perf_counter()
        loaded = image if isinstance(image, LoadedImage) else from_array(image)
        seed = secrets.randbits(63) if seed is None else int(seed)
        with timings.stage("preprocess"):
            geometry = plan_geometry(*loaded.rgb.shape[:2], sr_scale=sr_scale, resize_back=resize_back)
            padded = prepare(loaded.rgb, geometry, sr_scale)
        measured = None
        if score is None:
            with timings.stage("musiq"):
                measured = self.score(padded, timings)
        decision = self.decide(measured if score is None else float(score), k, w)
        latent = self.restore_latent(to_model_range(padded), decision, steps=steps, seed=seed, color_fix=color_fix,
                                     tile_size=tile_size, progress=progress, timings=timings)
        with timings.stage("postprocess"):
            rgb = finish(latent.image_u8, geometry)
            out = self._like_input(image, loaded, rgb)
        timings.stages["total"] = time.perf_counter() - started
        if measured is not None and measured < 0:  # the reference asserts this away; random weights do it
            notes.append(f"negative MUSIQ score {measured:.3f} (random weights?): treated as severe")
        return Result(out, measured, decision.label, decision.k, decision.w, seed, steps, timings.to_dict(),
                      _sizes(geometry), latent.tiled, notes, self.engines.backend, self.engines.compute_precision)

    @staticmethod
    def _like_input(image: Any, loaded: LoadedImage, rgb: np.ndarray) -> Any:
        alpha = None if loaded.alpha is None else resize_alpha(loaded.alpha, rgb.shape[:2])
        if isinstance(image, Image.Image):
            out = Image.fromarray(to_array(rgb, alpha))
            if loaded.icc_profile:
                out.info["icc_profile"] = loaded.icc_profile
            return out
        if isinstance(image, LoadedImage):
            return LoadedImage(rgb, alpha, loaded.icc_profile, loaded.exif, loaded.source, loaded.mode)
        return to_array(rgb, alpha)

    def describe(self) -> dict[str, Any]:
        return {"engines": str(self.manifest.directory), "engine_id": self.identity, "backend": self.engines.backend,
                "precision": self.manifest.precision, "compute_precision": self.engines.compute_precision,
                "runtime": __version__}


def _load_context(manifest: Manifest) -> np.ndarray:
    """The directory's [1,77,C] float32 context: a plain .npy (never a pickle) of the recorded shape."""
    path = manifest.context_path
    try:
        context = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise EngineError(f"{path}: not a plain float32 .npy array ({err}); rebuild the engine directory") from err
    if context.dtype != np.float32 or context.shape != manifest.context.shape:
        raise EngineError(f"{path}: {context.dtype} {list(context.shape)}, the manifest records float32 "
                          f"{list(manifest.context.shape)}; rebuild the engine directory")
    return context


def _sizes(g: Geometry) -> dict[str, list[int]]:
    return {"input": list(g.input), "processing": list(g.processing), "padded": list(g.padded),
            "output": list(g.output)}
