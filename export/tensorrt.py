"""TensorRT plans from an engine directory (`adaptbir-export trt`).

Plans are built through polygraphy's TensorRT loaders. TensorRT 11 builds strongly typed networks only:
precision comes from the ONNX graph itself, so an fp16 plan is built from an fp16 engine directory as is
(no builder precision flags). Each plan is stored under a cache key of ONNX sha256 + profile + flags +
TensorRT version + GPU compute capability, recorded in the manifest, and reused while the key holds. A
timing cache beside the plans (polygraphy merges each build's timings into it) speeds up rebuilds.

Not validated on hardware: no development machine has TensorRT and a GPU together (docs/backends.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptbir.runtime.atomic import atomic_write
from adaptbir.runtime.errors import AdaptBIRError
from adaptbir.runtime.graphs import GRAPHS, LATENT_FACTOR, GraphSpec
from adaptbir.runtime.manifest import FileRecord, Plan, TensorRTSection, load_manifest
from adaptbir.runtime.musiq_patches import token_count
from adaptbir.runtime.sizes import Size, parse_size

Shape = tuple[int, ...]
FLAGS = ("STRONGLY_TYPED",)
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class ImageProfile:
    """Image sizes (height × width, multiples of 64) and the largest batch a plan must serve."""

    min: Size
    opt: Size
    max: Size
    batch: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"min": "x".join(map(str, self.min)), "opt": "x".join(map(str, self.opt)),
                "max": "x".join(map(str, self.max)), "batch": self.batch}


def profile_from_args(shape: str | None, min_shape: str | None, opt_shape: str | None, max_shape: str | None,
                      batch: int = 1) -> ImageProfile:
    ranged = (min_shape, opt_shape, max_shape)
    if shape and any(ranged):
        raise AdaptBIRError("give either --shape or --min/--opt/--max, not both")
    if batch < 1:
        raise AdaptBIRError(f"--batch must be at least 1, not {batch}")
    if shape:
        size = parse_size(shape)
        return ImageProfile(size, size, size, batch)
    if not all(ranged):
        raise AdaptBIRError("give --shape HxW, or all three of --min, --opt and --max")
    lo, mid, hi = (parse_size(s) for s in ranged)
    if not all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)):
        raise AdaptBIRError(f"profile sizes must grow: min {min_shape} <= opt {opt_shape} <= max {max_shape}")
    return ImageProfile(lo, mid, hi, batch)


def input_shapes(spec: GraphSpec, profile: ImageProfile, n_max: int, factor: int = LATENT_FACTOR,
                 tokens: Callable[[int, int], int] = token_count) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every input of the manifest's `spec`, its symbolic dimensions sized by the
    graph's description: latents `factor` times smaller than images, `tokens(H, W)` MUSIQ tokens (at most
    `n_max`; the directory's `MusiqLimits.tokens`)."""
    graph = GRAPHS[spec.name]
    levels = [(profile.min, 1, min(tokens(*profile.min), n_max)),
              (profile.opt, 1, min(tokens(*profile.opt), n_max)),
              (profile.max, profile.batch, n_max)]
    shapes = [spec.input_shapes(**graph.symbol_sizes(size, batch, n, factor=factor)) for size, batch, n in levels]
    return {name: (shapes[0][name], shapes[1][name], shapes[2][name]) for name in shapes[0]}


def plan_key(onnx_sha256: str, shapes: dict[str, tuple[Shape, Shape, Shape]], trt_version: str,
             compute_capability: str, flags: tuple[str, ...] = FLAGS) -> str:
    blob = json.dumps({"onnx": onnx_sha256, "shapes": {k: [list(s) for s in v] for k, v in sorted(shapes.items())},
                       "flags": sorted(flags), "tensorrt": trt_version, "gpu": compute_capability}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ environment


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise AdaptBIRError(
            "TensorRT is not installed: install the gpu extra (pip install 'adaptbir[gpu]', TensorRT 11) on a "
            "machine with an NVIDIA GPU"
        ) from err
    return tensorrt


def gpu_compute_capability() -> str:
    """Compute capability of GPU 0 ("9.0"), through cuda-python or nvidia-smi."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, count = cudart.cudaGetDeviceCount()
        if int(err) == 0 and count > 0:
            err, prop = cudart.cudaGetDeviceProperties(0)
            if int(err) == 0:
                return f"{prop.major}.{prop.minor}"
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        result = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                                text=True, check=False)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[0]
    raise AdaptBIRError("no NVIDIA GPU found (CUDA reports no device): TensorRT plans are built on the GPU they run on")


# ---------------------------------------------------------------------------------------------- building


def _build_plan(trt, onnx_path: Path, shapes, workspace_gib: float, timing_cache: Path) -> bytes:
    """One serialized plan through polygraphy's loaders: a strongly typed network parsed from the ONNX file
    (external data included), one optimisation profile, the workspace limit, and the shared timing cache
    (loaded before and merged back after the build). TF32 stays off, as polygraphy sets it: fp32 is fp32."""
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, Profile, engine_bytes_from_network
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    profile = Profile()
    for name, (lo, mid, hi) in shapes.items():
        profile.add(name, lo, mid, hi)
    config = CreateConfig(profiles=[profile], load_timing_cache=str(timing_cache),
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gib * 2**30)})
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            plan = engine_bytes_from_network(NetworkFromOnnxPath(str(onnx_path), strongly_typed=True), config=config,
                                             save_timing_cache=str(timing_cache))
    except PolygraphyException as err:
        raise AdaptBIRError(f"TensorRT failed to build {onnx_path.name}: {str(err).splitlines()[0]}") from err
    return bytes(plan)


def build_plans(engine_dir: Path, profile: ImageProfile, workspace_gib: float = 8.0) -> Iterator[str]:
    """Build (or reuse) one plan per graph; yields a progress line per graph, then records them in the manifest."""
    manifest = load_manifest(engine_dir)
    trt = import_tensorrt()
    capability = gpu_compute_capability()
    old = manifest.tensorrt if manifest.tensorrt and manifest.tensorrt.version == trt.__version__ else None
    timing_cache = engine_dir / TIMING_CACHE
    plans: dict[str, Plan] = {}
    files: dict[str, FileRecord] = {}
    for name, graph in manifest.graphs.items():
        shapes = input_shapes(manifest.graph(name), profile, manifest.musiq.n_max, manifest.latent.downsample_factor,
                              manifest.musiq.tokens)
        key = plan_key(manifest.files[graph.file].sha256, shapes, trt.__version__, capability)
        file = f"{name}.{key[:16]}.plan"
        previous = old.plans.get(name) if old else None
        if previous and previous.key == key and (engine_dir / file).is_file():
            plans[name], files[file] = previous, manifest.files[file]
            yield f"{name}: plan {file} up to date"
            continue
        plan = _build_plan(trt, manifest.path(name), shapes, workspace_gib, timing_cache)
        atomic_write(engine_dir / file, lambda f, p=plan: f.write(p))
        plans[name] = Plan(file, key, {k: [list(s) for s in v] for k, v in shapes.items()})
        files[file] = FileRecord.of(engine_dir / file)
        yield f"{name}: built {file} ({len(plan) / 2**20:.1f} MiB)"
    section = TensorRTSection(trt.__version__, capability, FLAGS, profile.to_dict(), TIMING_CACHE, plans)
    manifest.with_tensorrt(section, files).write(engine_dir)
    stale = {p.file for p in manifest.tensorrt.plans.values()} - set(files) if manifest.tensorrt else set()
    for file in stale:  # unlisted first, then removed: a reader never meets a listed file that is gone
        (engine_dir / file).unlink(missing_ok=True)
