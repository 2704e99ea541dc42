"""Measurements each in a fresh session or process: the torch-free peak RSS of a restore (`probe.py` in a
subprocess), OpenVINO's load and first-call (compile) time, and OpenVINO's per-node-type profile of one UNet
step."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .peaks import openvino_config, timed


def unet_feeds(manifest, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """The UNet's inputs for an image of `size` (H, W): a zero latent and conditioning, the directory's
    context."""
    latent = manifest.latent
    x = np.zeros((1, latent.channels, size[0] // latent.downsample_factor, size[1] // latent.downsample_factor),
                 np.float32)
    return {"x": x, "t": np.array([500]), "context": manifest.load_context(), "cond": x,
            "w": np.array([0.5], np.float32)}


def openvino_load_times(engines_dir: Path, args, size: tuple[int, int]) -> dict[str, float]:
    """A fresh load of the directory on the openvino backend (graphs read and checked), then the first UNet call
    at the benchmark shape, where OpenVINO prepares the weights and compiles for the shape (there is no compiled-
    model cache: measured, it cost more memory than the time it saved, runtime/backends.py)."""
    from adaptbir.runtime.backends import Engines

    start = time.perf_counter()
    engines = Engines.load(engines_dir, backend="openvino", threads=args.threads, precision=args.cpu_precision)
    load = time.perf_counter() - start
    first_call = timed(lambda: engines.run("unet", unet_feeds(engines.manifest, size)))
    return {"load_s": load, "first_call_s": first_call}


def openvino_profile(manifest, size: tuple[int, int], precision: str, threads: int | None,
                     runs: int) -> dict[str, Any]:
    """Where one UNet step's time goes on OpenVINO's CPU plugin: the directory's UNet compiled as the openvino
    backend compiles it (`precision`, threads, one stream) plus PERF_COUNT, one unmeasured call, then `runs`
    calls; `infer_request.get_profiling_info()` after each, summed by node type (Convolution,
    FullyConnected, Subgraph, Reorder, ...) with the kernels (exec types) each ran. Compiled apart from the
    measured sessions (no compiled-model cache: the profiled model is not what a restore loads)."""
    import openvino

    from adaptbir.runtime.backends import prepared_openvino_model

    core = openvino.Core()
    feeds = unet_feeds(manifest, size)
    model = prepared_openvino_model(core, manifest.path("unet"), precision)  # as the backend prepares it
    model.reshape({name: openvino.PartialShape(list(array.shape)) for name, array in feeds.items()})
    request = core.compile_model(model, "CPU", openvino_config(precision, threads, PERF_COUNT="YES")
                                 ).create_infer_request()
    del model
    request.infer(feeds)
    by_type: dict[str, dict[str, Any]] = {}
    walls = []
    for _ in range(runs):
        walls.append(timed(lambda: request.infer(feeds)))
        for info in request.get_profiling_info():
            if info.status != openvino.ProfilingInfo.Status.EXECUTED:
                continue
            entry = by_type.setdefault(info.node_type, {"ms": 0.0, "nodes": set(), "exec_types": {}})
            ms = info.real_time.total_seconds() * 1e3 / runs  # per call
            entry["ms"] += ms
            entry["nodes"].add(info.node_name)
            entry["exec_types"][info.exec_type] = entry["exec_types"].get(info.exec_type, 0.0) + ms
    total = sum(e["ms"] for e in by_type.values())
    types = {
        name: {"ms": e["ms"], "share": e["ms"] / total if total else 0.0, "nodes": len(e["nodes"]),
               "exec_types": dict(sorted(e["exec_types"].items(), key=lambda kv: -kv[1]))}
        for name, e in sorted(by_type.items(), key=lambda kv: -kv[1]["ms"])}
    return {"precision": precision, "runs": runs, "latent": list(feeds["x"].shape[2:]),
            "wall_ms_median": statistics.median(walls) * 1e3, "profiled_ms": total, "by_type": types}


def peak_rss(engines: Path, size: str, steps: int, threads: int | None, backend: str,
             precision: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "adaptbir.benchmarks.probe", "--engines", str(engines), "--size", size,
           "--steps", str(steps), "--backend", backend] + (["--threads", str(threads)] if threads else []) + (
        ["--cpu-precision", precision] if precision else [])
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "probe failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])
