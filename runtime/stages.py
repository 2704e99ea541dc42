"""The paper's stages over numpy arrays: score → gate → encode and mix → sample → decode.

`Stages` runs the engines of one directory on arrays only: the padded uint8 image for MUSIQ, float32
[1,3,H,W] in [-1,1] (H, W multiples of 64) for the rest. What an image *is* — files, PIL, alpha, ICC and
EXIF, seeds drawn for the caller, argument checks, `Result` — is the API layer's (`runtime/pipeline.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .backend import describe
from .backends import Engines
from .colorfix import color_fix as apply_color_fix
from .errors import InputError
from .gating import Gate, gate
from .memory import GiB, available_bytes
from .musiq_patches import batch_feeds, extract_tokens
from .plan import RestorePlan, musiq_call_bytes, musiq_tokens, plan_image, plan_restore
from .preprocess import Geometry, to_uint8
from .sampler import NoiseSource, SamplerStep, Schedule, StepCallback, sample
from .tiling import Tile, blend

if TYPE_CHECKING:
    from .options import RestoreOptions

Progress = Callable[[int, int], None]  # after sampling step i of n; raising cancels the restore
StageHook = Callable[[str, int], None]  # a stage ("musiq", "encode", "sample", "decode") begins, on N tiles
GateHook = Callable[[Gate, int], None]  # the gate has decided (score, class, k, w) for the image's seed


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
    """Stages 4–6 on an already padded float image."""

    final_latent: np.ndarray  # [1,4,h,w]
    decoded: np.ndarray  # [1,3,H,W], unclipped
    image_u8: np.ndarray  # HxWx3, clipped and truncated
    gate: Gate
    seed: int | None
    steps: int
    plan: RestorePlan

    @property
    def tiled(self) -> bool:
        return self.plan.tiled


class Stages:
    def __init__(self, engines: Engines, context: np.ndarray | None = None, memory_budget: int | None = None):
        """`context` [1,77,C] replaces the directory's empty-prompt context (golden tests, custom prompts);
        `memory_budget` (bytes) decides tiling (default: `plan.default_budget()` at each call)."""
        self.engines = engines
        self.manifest = engines.manifest
        self.capabilities = self.manifest.capabilities
        context = self.manifest.load_context() if context is None else context
        self.context = np.ascontiguousarray(context, dtype=np.float32)
        self.memory_budget = memory_budget

    # ------------------------------------------------------------------------- 3. score and gate

    def score(self, padded_u8: np.ndarray, timings: Timings | None = None) -> float:
        """MUSIQ on the padded uint8 image at its own resolution (patches in numpy, exactly pyiqa's tensor),
        any token count on ONNX Runtime and OpenVINO; checked before any patch is extracted."""
        if not self.engines.has("musiq"):
            raise InputError("this engine directory has no MUSIQ graph: give the score (--score S)")
        h, w = padded_u8.shape[:2]
        self.check_musiq_fits(musiq_tokens(self.manifest, self.engines.backend, (h, w)), (h, w))
        tokens = extract_tokens(padded_u8, self.manifest.musiq.longer_side_lengths)
        (score,) = self.engines.run("musiq", batch_feeds([tokens]), timings.engine if timings else None)
        return float(score[0])

    def check_musiq_fits(self, tokens: int, padded: tuple[int, int]) -> None:
        """On a backend whose memory is predicted, one MUSIQ call (as the plan predicts it on this backend)
        must fit in what this process can still allocate (the token limit is `plan.musiq_tokens`')."""
        if not describe(self.engines.backend).predicts_memory:
            return
        need = musiq_call_bytes(self.manifest, self.engines.backend, tokens, padded)
        available = available_bytes()
        if available is not None and need > available:
            raise InputError(f"MUSIQ on this image needs about {need / GiB:.1f} GiB ({tokens} tokens; the memory "
                             f"grows with their count), {available / GiB:.1f} GiB are available; give the score "
                             "(--score S) or downscale the input")

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

    def encode(self, x: np.ndarray, windows: tuple[Tile, ...], timings: Timings) -> tuple[np.ndarray, np.ndarray]:
        """Dual encoder: z_restore, z_identity [1,4,h,w] in the diffusion latent space."""
        factor, channels = self.manifest.latent.downsample_factor, self.manifest.latent.channels
        lat_h, lat_w = x.shape[2] // factor, x.shape[3] // factor

        def run(window: Tile) -> np.ndarray:
            image = np.ascontiguousarray(window.of(x, scale=factor))
            z_restore, z_identity = self.engines.run("dual_encoder", {"image": image}, timings.engine)
            return np.concatenate([z_restore, z_identity], axis=1)  # blended together

        both = blend(run, windows, (1, 2 * channels, lat_h, lat_w))
        return both[:, :channels], both[:, channels:]

    @staticmethod
    def mix(z_restore: np.ndarray, z_identity: np.ndarray, k: float) -> np.ndarray:
        """cond = (1 − k)·z_restore + k·z_identity (k a Python float; each factor rounded to float32)."""
        return z_restore * np.float32(1 - k) + z_identity * np.float32(k)

    # --------------------------------------------------------------------------------- 5. sample

    def eps_model(self, cond: np.ndarray, csft_w: float, windows: tuple[Tile, ...], timings: Timings):
        """The UNet-with-controls as the sampler's `eps(x, t)`, on blended latent tiles when tiled; the CSFT
        strength goes to the graph's input `w`."""
        context = self.context
        strength = np.array([csft_w], dtype=np.float32)

        def eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            def run(window: Tile) -> np.ndarray:
                feeds = {"x": np.ascontiguousarray(window.of(x)), "t": t, "context": context,
                         "cond": np.ascontiguousarray(window.of(cond)), "w": strength}
                return self.engines.run("unet", feeds, timings.engine)[0]

            return blend(run, windows, x.shape)

        return eps

    # -------------------------------------------------------------------------------- 6. decode

    def decode(self, latent: np.ndarray, windows: tuple[Tile, ...], timings: Timings) -> np.ndarray:
        factor = self.manifest.latent.downsample_factor
        lat_h, lat_w = latent.shape[2:]

        def run(window: Tile) -> np.ndarray:
            return self.engines.run("decoder", {"latent": np.ascontiguousarray(window.of(latent))}, timings.engine)[0]

        return blend(run, windows, (1, 3, factor * lat_h, factor * lat_w), scale=factor)

    # ------------------------------------------------------------------------------- the plan

    def plan(self, size: tuple[int, int], options: RestoreOptions) -> RestorePlan:
        """How a restore of an image of `size` (height, width) with `options` runs on these engines
        (`plan.plan_image`, the decision `adaptbir plan` takes too): sizes, tiled or not and why, the
        predicted peak. Raises InputError when nothing fits."""
        return plan_image(self.manifest, size, options, backend=self.engines.backend,
                          precision=self.engines.compute_precision, memory_budget=self.memory_budget)

    # ------------------------------------------------------------------------------- 4 to 6

    def run(self, x: np.ndarray, decision: Gate, *, steps: int, seed: int | None = None,
            x_T: np.ndarray | None = None, noise: np.ndarray | None = None, color_fix: str = "none",
            tile_size: int | None = None, plan: RestorePlan | None = None, progress: Progress | None = None,
            timings: Timings | None = None, on_stage: StageHook | None = None, on_step: StepCallback | None = None
            ) -> LatentResult:
        """Encode and mix, sample, decode a padded image x [1,3,H,W] in [-1,1] for a decided gate.

        The tiled stages run on `plan.grid` when the caller has a plan (`Pipeline.restore` plans before any
        engine runs), else on the grid of a plan of the padded size with `tile_size` (pixels). The noise comes
        from `seed` (the runtime's RNG protocol), or `x_T` [1,4,h,w] and `noise` [steps,1,4,h,w] given (golden
        tests). After each sampling step `progress(i, n)` and `on_step(SamplerStep)` (x_t and the x0
        prediction) are called."""
        timings = timings or Timings()
        pad = self.manifest.latent.pad_multiple
        if x.ndim != 4 or x.shape[:2] != (1, 3) or x.shape[2] % pad or x.shape[3] % pad:
            raise InputError(f"expected a padded image [1,3,H,W] with H, W multiples of {pad}, got {list(x.shape)}")
        if seed is None and (x_T is None or noise is None):
            raise InputError("give a seed, or both x_T and noise")
        if plan is None:
            padded = tuple(x.shape[2:])
            plan = plan_restore(self.manifest, Geometry(padded, padded, padded, padded), backend=self.engines.backend,
                                precision=self.engines.compute_precision, tile_size=tile_size, score_given=True,
                                memory_budget=self.memory_budget)
        windows, tiles = plan.grid, plan.tiles
        begin = on_stage or (lambda stage, tiles: None)
        begin("encode", tiles)
        with timings.stage("encode"):
            z_restore, z_identity = self.encode(x, windows, timings)
            cond = self.mix(z_restore, z_identity, decision.k)
        schedule = Schedule.from_manifest(self.manifest.schedule, steps)
        source = NoiseSource(seed or 0, cond.shape)
        start = source.draw() if x_T is None else x_T.astype(np.float32)
        noise_at = (lambda i: source.draw()) if noise is None else (lambda i: noise[i])
        begin("sample", tiles)
        with timings.stage("sample"):
            latent = sample(self.eps_model(cond, decision.w, windows, timings), start, schedule, noise_at,
                            _step_callback(progress, on_step))
        begin("decode", tiles)
        with timings.stage("decode"):
            decoded = self.decode(latent, windows, timings)
            if color_fix != "none":
                decoded = apply_color_fix(decoded, self.decode(cond, windows, timings), color_fix)
        return LatentResult(latent, decoded, to_uint8(decoded), decision, seed, steps, plan)


def _step_callback(progress: Progress | None, on_step: StepCallback | None) -> StepCallback | None:
    """The sampler's one callback, serving the simple `progress(i, n)` and the full `on_step`."""
    if progress is None and on_step is None:
        return None

    def each_step(s: SamplerStep) -> None:
        if on_step is not None:
            on_step(s)
        if progress is not None:
            progress(s.step, s.steps)

    return each_step
