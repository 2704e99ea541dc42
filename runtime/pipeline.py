"""The API layer: images in, images out, around the paper's stages (`runtime/stages.py`).

    pipeline = Pipeline.from_engines("engines/sd21-fp16", backend="ort-cpu")
    result = pipeline.restore(image, seed=0)          # uint8 HxWx3/4 numpy array, PIL image or LoadedImage
    result = pipeline.restore(image, RestoreOptions(seed=0, w=0.5))   # the same options as one value
    result.image, result.score, result.label, result.k, result.w, result.timings

Here live what an image is to a caller — input kinds, alpha, ICC and EXIF carried over, the SR pre-scale,
padding and resizing back, seeds derived from the image's pixels when not given, the options
(`runtime/options.py`) put on this directory's schedule, and the `Result`. One pipeline may be used from
several threads at once: it holds no per-call state, and the same seeds give the same results as
sequential calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import __version__
from .arguments import check_arguments, check_memory_budget
from .backends import Engines
from .errors import ArgumentError
from .gating import Gate
from .image_io import LoadedImage, from_array, resize_alpha, to_array
from .options import RANDOM, RestoreOptions, seed_for
from .plan import RestorePlan
from .preprocess import Geometry, finish, from_model_range, prepare, to_model_range
from .sampler import SamplerStep, StepCallback
from .stages import GateHook, LatentResult, Progress, StageHook, Stages, Timings

__all__ = ["GateHook", "LatentResult", "Pipeline", "Progress", "RestoreOptions", "RestorePlan", "Result",
           "SamplerStep", "StageHook", "StepCallback", "Timings"]


@dataclass
class Result:
    image: Any  # same kind as the input: uint8 numpy HxWx3/4 or PIL image
    score: float  # the quality score the gate used: measured by MUSIQ, or given by the caller
    score_source: str  # "measured" | "given"
    label: str  # severe | medium | mild
    k: float
    w: float
    seed: int
    steps: int
    timings: dict[str, float]
    sizes: dict[str, list[int]]
    plan: RestorePlan  # how it ran: tiled or not and why, the predicted peak
    warnings: list[str] = field(default_factory=list)
    backend: str = "ort-cpu"
    precision: str = "fp32"  # what the UNet, encoders and decoder computed in (MUSIQ: always fp32)

    @property
    def tiled(self) -> bool:
        return self.plan.tiled

    def record(self) -> dict[str, Any]:
        return {"score": self.score, "score_source": self.score_source, "class": self.label, "k": self.k,
                "w": self.w, "seed": self.seed, "steps": self.steps, "sizes": self.sizes,
                "size_change": self.plan.geometry.journey(), "tiled": self.tiled,
                "tiling": self.plan.reason, "predicted_peak_gib": round(self.plan.peak_bytes / 2**30, 2),
                "timings": self.timings, "warnings": self.warnings, "backend": self.backend,
                "compute_precision": self.precision}


class Pipeline:
    def __init__(self, engines: Engines, context: np.ndarray | None = None, memory_budget: int | None = None):
        """`context` [1,77,C] replaces the directory's empty-prompt context (golden tests, custom prompts).
        `memory_budget` (bytes) decides tiling: untiled, the reference's result, whenever its predicted peak
        fits (default: 85 % of what the process holds plus what it can still allocate, `runtime/plan.py`)."""
        self.stages = Stages(engines, context, check_memory_budget(memory_budget))
        self.engines = engines
        self.manifest = engines.manifest

    @classmethod
    def from_engines(cls, path: str | Path, backend: str = "ort-cpu", threads: int | None = None,
                     verify: bool = True, precision: str | None = None, memory_budget: int | None = None
                     ) -> Pipeline:
        """`precision`: OpenVINO's inference precision, bf16 or f32 (default: bf16 where the CPU has it)."""
        engines = Engines.load(path, backend=backend, threads=threads, verify=verify, precision=precision)
        return cls(engines, memory_budget=memory_budget)

    @property
    def identity(self) -> str:
        return self.manifest.identity

    @property
    def max_steps(self) -> int:
        """The most sampling steps this directory's schedule allows (its timesteps, at most 1000)."""
        return self.manifest.max_steps

    def score(self, image_u8: np.ndarray) -> float:
        """MUSIQ score of a uint8 HxWx3 image, as the pipeline measures it (on the padded image)."""
        return self.stages.score(image_u8)

    def options(self, options: RestoreOptions | None = None, **changes: Any) -> RestoreOptions:
        """`options` (default: all defaults) with `changes` (each checked), on this directory's schedule: steps
        filled in from its default and checked against its timesteps."""
        if options is None or changes:  # made (and checked) once; given options are not checked again
            options = RestoreOptions(**changes) if options is None else replace(options, **changes)
        return options.for_schedule(self.manifest.schedule.default_steps, self.max_steps)

    def plan(self, size: tuple[int, int], options: RestoreOptions | None = None, **changes: Any) -> RestorePlan:
        """How `restore` would run an image of `size` (height, width) with these options, before anything
        runs: processing size, MUSIQ tokens, tiled or not and why, predicted peak memory (InputError when
        not even tiles fit the budget). Keyword arguments are `RestoreOptions` fields."""
        return self.stages.plan(size, self.options(options, **changes))

    def decide(self, score: float, k: float | None = None, w: float | None = None) -> Gate:
        check_arguments(score=score, k=k, w=w)
        return self.stages.decide(score, k, w)

    def restore_float(self, x: np.ndarray, options: RestoreOptions | None = None, *, x_T: np.ndarray | None = None,
                      noise: np.ndarray | None = None, progress: Progress | None = None,
                      on_stage: StageHook | None = None, on_step: StepCallback | None = None, **changes: Any
                      ) -> LatentResult:
        """Stages 3–6 on an already padded float image x [1,3,H,W] in [-1,1]: score (unless given), gate,
        encode and mix, sample, decode (the pre-scale and resizing back do not apply). `x_T` [1,4,h,w] and
        `noise` [steps,1,4,h,w] replace the seeded draws (golden tests)."""
        options = self.options(options, **changes)
        check_arguments(progress=progress, on_stage=on_stage, on_step=on_step)
        timings = Timings()
        given = x_T is not None and noise is not None  # the draws themselves: no seed is needed
        seed = options.seed if given and options.seed != RANDOM else seed_for(options.seed, x)
        score = options.score
        if score is None:
            with timings.stage("musiq"):
                score = self.stages.score(from_model_range(x), timings)
        return self.stages.run(x, self.stages.decide(score, options.k, options.w), steps=options.steps, seed=seed,
                               x_T=x_T, noise=noise, color_fix=options.color_fix, tile_size=options.tile_size,
                               progress=progress, timings=timings, on_stage=on_stage, on_step=on_step)

    def restore(self, image: np.ndarray | Image.Image | LoadedImage, options: RestoreOptions | None = None, *,
                progress: Progress | None = None, on_stage: StageHook | None = None,
                on_step: StepCallback | None = None, on_gate: GateHook | None = None, **changes: Any) -> Result:
        """Restore one image; returns it in the input's kind, with score, class, k, w, seed and timings.

        `options` (`RestoreOptions`), or its fields as keyword arguments (`restore(image, seed=0, w=0.5)`),
        or both (the keywords change the options). `progress(i, n)` follows the sampling steps (raise to
        cancel); `on_step(SamplerStep)` gets each step's timestep, x_t and x0 prediction (read-only views, e.g.
        for a preview); `on_stage(name, tiles)` is called as each stage begins (musiq, encode, sample, decode)
        with the number of tiles it runs on; `on_gate(Gate, seed)` once the gate has decided score, class, k
        and w (before encoding: a service shows them while sampling runs). Tiling follows `plan` (the same
        options give the same plan); `Result.plan` says what was decided and why.

        Every argument is checked before any engine runs (`ArgumentError`, see `runtime/options.py`)."""
        options = self.options(options, **changes)
        check_arguments(progress=progress, on_stage=on_stage, on_step=on_step, on_gate=on_gate)
        notes = options.warnings
        timings = Timings()
        started = time.perf_counter()
        loaded = image if isinstance(image, LoadedImage) else from_array(image)
        if 0 in loaded.rgb.shape[:2]:
            raise ArgumentError(f"the image is empty ({loaded.rgb.shape[1]}×{loaded.rgb.shape[0]} pixels, W×H)")
        seed = seed_for(options.seed, loaded.rgb)
        with timings.stage("preprocess"):
            plan = self.stages.plan(loaded.rgb.shape[:2], options)  # before any engine
            geometry = plan.geometry
            padded = prepare(loaded.rgb, geometry, options.sr_scale)
        measured = None
        if options.score is None:
            if on_stage:
                on_stage("musiq", 1)
            with timings.stage("musiq"):
                measured = self.stages.score(padded, timings)
        decision = self.stages.decide(measured if measured is not None else options.score, options.k, options.w)
        if on_gate:
            on_gate(decision, seed)
        latent = self.stages.run(to_model_range(padded), decision, steps=options.steps, seed=seed,
                                 color_fix=options.color_fix, plan=plan, progress=progress, timings=timings,
                                 on_stage=on_stage, on_step=on_step)
        with timings.stage("postprocess"):
            rgb = finish(latent.image_u8, geometry)
            out = self._like_input(image, loaded, rgb)
        timings.stages["total"] = time.perf_counter() - started
        if measured is not None and measured < 0:  # the reference asserts this away; random weights do it
            notes.append(f"negative MUSIQ score {measured:.3f} (random weights?): treated as severe")
        source = "given" if measured is None else "measured"
        return Result(out, decision.score, source, decision.label, decision.k, decision.w, seed, options.steps,
                      timings.to_dict(), _sizes(geometry), plan, notes, self.engines.backend,
                      self.engines.compute_precision)

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


def _sizes(g: Geometry) -> dict[str, list[int]]:
    return {"input": list(g.input), "processing": list(g.processing), "padded": list(g.padded),
            "output": list(g.output)}
