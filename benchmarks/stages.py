"""The benchmark's stage runners: fixed inputs per stage for one pipeline, alternating measurement of several
sides (runtime, torch, fp32, another backend), and the accuracy of a reduced-precision side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from adaptbir.runtime.errors import AdaptBIRError

STAGES = ("musiq", "dual_encoder", "unet_step", "loop", "decoder", "e2e")


class StageRunner:
    """Callables per stage for one pipeline; all inputs are fixed so both sides see the same data."""

    def __init__(self, pipeline, size: tuple[int, int], steps: int):
        from adaptbir.runtime.musiq_patches import batch_feeds, extract_tokens
        from adaptbir.runtime.preprocess import to_model_range
        from adaptbir.runtime.sampler import Schedule

        self.pipeline, self.steps = pipeline, steps
        rng = np.random.default_rng(0)
        self.photo = (rng.random((*size, 3)) * 255).astype(np.uint8)
        self.image = to_model_range(self.photo)
        h, w = size[0] // 8, size[1] // 8
        self.latent = rng.standard_normal((1, 4, h, w), dtype=np.float32)
        self.cond = rng.standard_normal((1, 4, h, w), dtype=np.float32)
        self.musiq_feeds = batch_feeds([extract_tokens(self.photo)])
        self.unet_feeds = {"x": self.latent, "t": np.array([500]), "context": pipeline.stages.context,
                           "cond": self.cond, "w": np.array([0.8], np.float32)}
        self.schedule = Schedule.from_manifest(pipeline.manifest.schedule, steps)

    def run(self, stage: str) -> dict[str, float]:
        """Seconds of one execution of `stage`, plus engine time and overhead for e2e."""
        from adaptbir.runtime.sampler import NoiseSource, sample
        from adaptbir.runtime.stages import Timings
        from adaptbir.runtime.tiling import grid

        engines = self.pipeline.engines
        start = time.perf_counter()
        if stage == "musiq":
            engines.run("musiq", self.musiq_feeds)
        elif stage == "dual_encoder":
            engines.run("dual_encoder", {"image": self.image})
        elif stage == "unet_step":
            engines.run("unet", self.unet_feeds)
        elif stage == "loop":
            timings = Timings()
            eps = self.pipeline.stages.eps_model(self.cond, 0.8, grid(*self.cond.shape[2:], None), timings)
            noise = NoiseSource(0, self.latent.shape)
            sample(eps, noise.draw(), self.schedule, lambda i: noise.draw())
        elif stage == "decoder":
            engines.run("decoder", {"latent": self.latent})
        elif stage == "e2e":
            result = self.pipeline.restore(self.photo, seed=0, steps=self.steps, tile_size=0)
            total = time.perf_counter() - start
            engine = result.timings["engine_s"]
            return {"s": total, "engine_s": engine, "overhead_s": total - engine}
        else:
            raise AdaptBIRError(f"unknown stage {stage!r}")
        return {"s": time.perf_counter() - start}


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(runners: dict[str, StageRunner], stages: list[str], warmup: int, runs: int,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """Alternate the sides run by run (runtime, torch, runtime, torch, ...) for every stage."""
    samples: dict[str, dict[str, list[dict[str, float]]]] = {s: {side: [] for side in runners} for s in stages}
    for stage in stages:
        for i in range(warmup + runs):
            for side, runner in runners.items():
                result = runner.run(stage)
                if i >= warmup:
                    samples[stage][side].append(result)
            progress(f"{stage}: run {i + 1}/{warmup + runs}{' (warm-up)' if i < warmup else ''}")
    out: dict[str, Any] = {}
    for stage, by_side in samples.items():
        entry: dict[str, Any] = {side: summarize([r["s"] for r in rs]) for side, rs in by_side.items()}
        if stage == "e2e":
            rt = by_side["runtime"]
            entry["runtime"]["engine_median"] = statistics.median(r["engine_s"] for r in rt)
            overhead = [r["overhead_s"] for r in rt]
            entry["overhead"] = {**summarize(overhead),
                                 "fraction_median": statistics.median(r["overhead_s"] / r["s"] for r in rt)}
        for other in by_side.keys() - {"runtime"}:
            ratios = [a["s"] / b["s"] for a, b in zip(by_side["runtime"], by_side[other], strict=True)]
            entry[f"ratio_runtime_over_{other}"] = {**summarize(ratios), "pairs": ratios}
        out[stage] = entry
    return out


GATE_SCORES = (39.9, 40.0, 40.1, 69.9, 70.0, 70.1)


def accuracy(subject: StageRunner, baseline: StageRunner, labels: tuple[str, str], size: tuple[int, int],
             steps: int) -> dict[str, Any]:
    """A reduced-precision side (fp16 or int8 engines, OpenVINO bf16) against its fp32 baseline on the same inputs:
    every graph's PSNR over the baseline's range, the final image of a `steps`-step restore, MUSIQ."""
    from adaptbir.runtime.gating import gate
    from adaptbir.runtime.metrics import psnr, psnr_over_range

    pipelines = {"baseline": baseline.pipeline, "subject": subject.pipeline}
    graphs: dict[str, Any] = {}
    calls = {"dual_encoder": {"image": baseline.image}, "unet": baseline.unet_feeds,
             "decoder": {"latent": baseline.latent}}
    if pipelines["baseline"].engines.has("musiq"):
        calls["musiq"] = baseline.musiq_feeds
    for name, feeds in calls.items():
        pairs = list(zip(pipelines["subject"].engines.run(name, feeds), pipelines["baseline"].engines.run(name, feeds),
                         strict=True))
        dbs = [db for a, b in pairs if (db := psnr_over_range(a, b)) is not None]
        graphs[name] = {"max_abs": max(float(np.abs(a - b).max()) for a, b in pairs),
                        "psnr_db": min(dbs) if dbs else None,
                        "finite": all(bool(np.all(np.isfinite(a))) for a, _ in pairs)}
    images = {p: pipe.restore(baseline.photo, seed=0, steps=steps, score=55).image for p, pipe in pipelines.items()}
    scores = {}
    for seed in range(4):  # a few different photos
        photo = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
        scores[seed] = {p: pipe.score(photo) for p, pipe in pipelines.items()}
    shift = max(abs(v["subject"] - v["baseline"]) for v in scores.values())
    # a score closer than `shift` to a class boundary may change class: those of GATE_SCORES that would
    flips = sorted({s for s in GATE_SCORES for d in (-shift, shift) if gate(s + d).label != gate(s).label})
    return {
        "subject": labels[0], "baseline": labels[1],
        "graphs": graphs,
        "final_image_steps": steps,
        "final_image_psnr_db": psnr(images["subject"], images["baseline"], peak=255.0),
        "final_image_max_abs_u8": int(np.abs(images["subject"].astype(int) - images["baseline"]).max()),
        "musiq_scores": scores, "musiq_max_abs_shift": shift,
        "gate_flips_near_40_70": flips,
        "musiq_graph_identical": pipelines["subject"].manifest.files["musiq.onnx"]
        == pipelines["baseline"].manifest.files["musiq.onnx"],
    }
