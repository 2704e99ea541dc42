"""How a restore will run, decided before any engine runs: sizes, MUSIQ tokens, tiled or not and why, and the
predicted peak memory against a budget (`adaptbir plan`, `Pipeline.plan`).

One untiled pass is the reference's result; tiles (512 px, blended) are an approximation taken only when the
untiled pass would not fit the memory budget, or when asked for (`tile_size`). The budget defaults to
`BUDGET_FRACTION` of the memory this process can reach: what it holds plus what the system (or its cgroup)
still makes available.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .backend import Backend, Runtime, describe
from .errors import InputError
from .graphs import GRAPHS
from .manifest import Manifest
from .memory import (
    IMAGE_BYTES_PER_PIXEL,
    OPENVINO_COMPILED_SHARES,
    PROCESS_BYTES,
    GiB,
    available_bytes,
    openvino_musiq_bytes,
    openvino_unet_call_bytes,
    openvino_vae_call_bytes,
    rss_bytes,
)
from .preprocess import Geometry, plan_geometry
from .sizes import describe_size
from .tiling import TILE_ABOVE_PIXELS, TILE_PX, Tile, grid

if TYPE_CHECKING:
    from .options import RestoreOptions

BUDGET_FRACTION = 0.85  # of RSS + available: room for the caller's own memory and the estimate's error
STAGES = ("musiq", "encode", "sample", "decode")


@dataclass(frozen=True)
class RestorePlan:
    geometry: Geometry
    tokens: int | None  # MUSIQ's token count; None when the score is given (or there is no MUSIQ)
    tile_px: int | None  # tile size in pixels; None = one untiled pass
    grid: tuple[Tile, ...]  # the latent windows every tiled stage runs on (one: the whole latent)
    reason: str  # why tiled or not
    stages: dict[str, int]  # predicted peak RSS of the process during each stage, bytes
    budget: int | None  # bytes; None where the available memory cannot be read
    backend: str
    precision: str

    @property
    def tiled(self) -> bool:
        return self.tile_px is not None

    @property
    def tiles(self) -> int:
        return len(self.grid)

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
                "size_change": g.journey(), "why": self.reason, "predicted_peak_gib": round(self.peak_bytes / GiB, 2),
                "peak_stage": self.peak_stage, "stages_gib": {k: round(v / GiB, 2) for k, v in self.stages.items()},
                "budget_gib": None if self.budget is None else round(self.budget / GiB, 2),
                "backend": self.backend, "precision": self.precision}

    def summary(self) -> str:
        g = self.geometry
        how = f"{self.tiles} tiles of {self.tile_px} px" if self.tiled else "untiled"
        tokens = "score given" if self.tokens is None else f"{self.tokens} MUSIQ tokens"
        return (f"{g.journey()}, padded {describe_size(*g.padded)}, {tokens}; {how}: "
                f"{self.reason}; predicted peak {self.peak_bytes / GiB:.1f} GiB ({self.peak_stage})")


def default_budget() -> int | None:
    """`BUDGET_FRACTION` of what this process holds plus what it can still allocate; None if unknown."""
    available, held = available_bytes(), rss_bytes()
    if available is None or held is None:
        return None
    return int(BUDGET_FRACTION * (available + held))


def predicted_stages(manifest: Manifest, backend: str, precision: str, padded: tuple[int, int],
                     window: tuple[int, int] | None, tokens: int | None) -> dict[str, int]:
    """Peak RSS of the process during each stage of one restore of a `padded` image whose tiled stages run
    on latent windows of `window` (height, width; None: the whole latent). MUSIQ runs when `tokens` is
    given, always on the whole image."""
    factor = manifest.latent.downsample_factor
    whole = (padded[0] // factor, padded[1] // factor)
    described = describe(backend)
    if described.runtime is Runtime.OPENVINO:
        return _openvino_stages(manifest, described, precision, padded, whole, window or whole, tokens)
    graph_bytes = sum(manifest.graph_bytes(name) for name in manifest.graphs)
    held = (PROCESS_BYTES + described.host_weight_bytes(graph_bytes, precision, manifest.precision)
            + IMAGE_BYTES_PER_PIXEL * padded[0] * padded[1])
    calls = {}
    for name, entry in manifest.graphs.items():
        graph = GRAPHS[name]
        if graph.stage == "musiq" and tokens is None:
            continue  # the score is given: MUSIQ does not run
        size = (window or whole) if graph.tiled else whole
        calls[graph.stage] = graph.call_bytes(manifest.hyperparameters, *size, tokens=tokens,
                                              heads_at_once=entry.attention_heads_at_once)
    # The process's one ONNX Runtime arena keeps the blocks of its largest call (backends._share_cpu_arena): a
    # stage holds the largest call so far, not only its own (measured: a tiled restore after an untiled MUSIQ).
    stages, largest = {}, 0
    for stage in (stage for stage in STAGES if stage in calls):
        largest = max(largest, calls[stage])
        stages[stage] = held + largest
    return stages


def _openvino_stages(manifest: Manifest, backend: Backend, precision: str, padded: tuple[int, int],
                     whole: tuple[int, int], window: tuple[int, int], tokens: int | None) -> dict[str, int]:
    """`predicted_stages` on OpenVINO (runtime/memory.py, "one restore on OpenVINO"): each stage holds the graphs
    compiled so far (weights and compiled models), the image, and its own call's buffers; MUSIQ computes in f32
    (its fp32 weights by the f32 factor), the other graphs in `precision`."""
    hyperparameters = manifest.hyperparameters
    held = PROCESS_BYTES + IMAGE_BYTES_PER_PIXEL * padded[0] * padded[1]
    stages = {}
    for stage in STAGES:
        names = [name for name in manifest.graphs if GRAPHS[name].stage == stage]
        if not names or (stage == "musiq" and tokens is None):
            continue  # not run, so never compiled: OpenVINO holds nothing of it
        for name in names:
            graph_precision, directory = ("f32", None) if GRAPHS[name].fp32_only else (precision, manifest.precision)
            held += backend.weight_bytes(manifest.graph_bytes(name), graph_precision, directory)
        held += int(OPENVINO_COMPILED_SHARES[stage] * backend.runtime_bytes)  # the compiled models, stage by stage
        size = window if all(GRAPHS[name].tiled for name in names) else whole
        if stage == "musiq":
            call = musiq_call_bytes(manifest, backend.name, tokens, padded)
        elif stage == "sample":
            call = openvino_unet_call_bytes(hyperparameters["unet"], *size, precision)
        else:
            call = openvino_vae_call_bytes(hyperparameters["vae"], *size, precision, decoder=stage == "decode")
        stages[stage] = held + call
    return stages


def musiq_call_bytes(manifest: Manifest, backend: str, tokens: int, padded: tuple[int, int]) -> int:
    """One MUSIQ call's memory beyond what the process held, on `backend`, for a `padded` image: ONNX
    Runtime's unfused attention grows with the tokens' square, OpenVINO's fused attention linearly
    (runtime/memory.py). The plan and the check before MUSIQ runs (`Stages.check_musiq_fits`) ask here."""
    if describe(backend).runtime is Runtime.OPENVINO:
        return openvino_musiq_bytes(tokens, padded[0] * padded[1])
    factor = manifest.latent.downsample_factor
    return GRAPHS["musiq"].call_bytes(manifest.hyperparameters, padded[0] // factor, padded[1] // factor,
                                      tokens=tokens)


def musiq_tokens(manifest: Manifest, backend: str, padded: tuple[int, int]) -> int:
    """MUSIQ's token count for a padded image, refused (InputError) beyond what the backend serves: TensorRT
    plans serve the token counts of their profile (up to the directory's `musiq.n_max`); the other backends
    any count that fits in memory. `restore`, `plan` and a score alone all ask here."""
    tokens = manifest.musiq.tokens(*padded)
    limit = describe(backend).musiq_token_limit(manifest)
    if limit is not None and tokens > limit:
        raise InputError(
            f"image too large for the MUSIQ TensorRT plan: {tokens} tokens, its profile serves at most {limit}; "
            "give the score (--score S), use the ort-cpu or openvino backend (no token limit), or rebuild with a "
            "larger `adaptbir-export build --musiq-n-max` and its plans")
    return tokens


def plan_image(manifest: Manifest, size: tuple[int, int], options: RestoreOptions, *, backend: str = "ort-cpu",
               precision: str | None = None, memory_budget: int | None = None) -> RestorePlan:
    """The plan of restoring an image of `size` (height, width) with `options`, on `backend`: the one
    decision `Pipeline.restore`, `Pipeline.plan`, `adaptbir plan` and `adaptbir-ray` take. `memory_budget`
    (bytes) applies where the options give none (default: `default_budget()`)."""
    geometry = plan_geometry(*size, sr_scale=options.sr_scale, resize_back=options.resize_back,
                             pad_multiple=manifest.latent.pad_multiple)
    budget = memory_budget if options.memory_budget is None else options.memory_budget
    return plan_restore(manifest, geometry, backend=backend, precision=precision, tile_size=options.tile_size,
                        score_given=options.score is not None, memory_budget=budget)


def plan_restore(manifest: Manifest, geometry: Geometry, *, backend: str = "ort-cpu", precision: str | None = None,
                 tile_size: int | None = None, score_given: bool = False, memory_budget: int | None = None
                 ) -> RestorePlan:
    """The plan of one restore of an image whose sizes are `geometry` (`preprocess.plan_geometry`).
    `tile_size` in pixels forces the choice (0 = never tile, else tiles of that size when the image is
    larger); otherwise untiled whenever the predicted peak fits `memory_budget` (bytes; default
    `default_budget()`), 512 px tiles when only they fit. Raises InputError when not even the tiles fit."""
    precision = precision or manifest.precision
    padded, factor = geometry.padded, manifest.latent.downsample_factor
    latent = (padded[0] // factor, padded[1] // factor)
    tokens = None
    if not score_given and any(GRAPHS[name].stage == "musiq" for name in manifest.graphs):
        tokens = musiq_tokens(manifest, backend, padded)
    budget = default_budget() if memory_budget is None else memory_budget

    def plan(tile_px: int | None, reason: str) -> RestorePlan:
        windows = grid(*latent, tile_px // factor if tile_px else None)  # the one conversion to latent units
        stages = predicted_stages(manifest, backend, precision, padded, (windows[0].h, windows[0].w), tokens)
        return RestorePlan(geometry, tokens, tile_px, windows, reason, stages, budget, backend, precision)

    if tile_size is not None:
        tile = tile_size if tile_size and max(padded) > tile_size else None
        return plan(tile, f"tile size {tile_size} px given" if tile_size else "tiling turned off (tile size 0)")
    if not describe(backend).predicts_memory:  # device memory is not modelled: the former pixel rule
        large = padded[0] * padded[1] > TILE_ABOVE_PIXELS
        return plan(TILE_PX if large else None,
                    f"{backend}: device memory is not predicted; tiles above {describe_size(768, 768)}")
    if budget is None:
        return plan(None, "untiled (the available memory cannot be read here)")
    untiled = plan(None, f"its predicted peak fits the {budget / GiB:.1f} GiB memory budget")
    if untiled.peak_bytes <= budget:
        return untiled
    tiled = plan(TILE_PX, f"untiled would need {untiled.peak_bytes / GiB:.1f} GiB "
                          f"({untiled.peak_stage}), over the {budget / GiB:.1f} GiB memory budget")
    if tiled.peak_bytes > budget:
        stage = tiled.peak_stage
        hint = "give the score (--score S) or downscale it" if stage == "musiq" else "downscale it"
        raise InputError(f"a {describe_size(*geometry.input)} image needs about {tiled.peak_bytes / GiB:.1f} GiB "
                         f"even in {TILE_PX} px tiles ({stage}), over the {budget / GiB:.1f} GiB budget; "
                         f"{hint}, or raise the budget (--memory-budget) on a machine with more memory")
    return tiled
